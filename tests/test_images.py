"""Bad input, odd formats and the decode cache, on real images from the dataset plus crafted files."""

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestxray.data import BadFilesError, ChestXrayDataModule, DataError
from chestxray.images import BadImageError, ImageCache, list_images, load_image, read_image

CLASSES = ["Normal", "Covid", "Viral Pneumonia"]


@pytest.fixture
def messy(tmp_path, data_dir) -> Path:
    """train/ and test/ with real images, odd but valid files, and broken ones."""
    root = tmp_path / "messy"
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for src in sorted((data_dir / split / name).iterdir())[:3]:
                shutil.copy(src, folder / src.name)
    bad = root / "train" / "Normal"
    jpeg = (data_dir / "train" / "Normal" / "01.jpeg").read_bytes()
    png = (data_dir / "test" / "Covid" / "094.png").read_bytes()
    (bad / "zero.jpeg").write_bytes(b"")
    (bad / "truncated.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "text.jpg").write_text("not an image at all")
    (bad / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8 + b"\xff\xd9")
    covid = root / "train" / "Covid"
    shutil.copy(data_dir / "train" / "Normal" / "01.jpeg", covid / "UPPER.JPG")
    shutil.copy(data_dir / "test" / "Covid" / "094.png", covid / "UPPER.PNG")
    rgba = np.full((40, 50, 4), 200, np.uint8)
    rgba[:, :, 3] = 255
    rgba[:10, :, 3] = 0  # fully transparent band
    rgba[10:20, :, 3] = 128  # half transparent
    cv2.imwrite(str(covid / "rgba.png"), rgba)
    deep = np.full((40, 50), 40000, np.uint16)
    deep[:, :25] = 1000
    cv2.imwrite(str(covid / "deep16.png"), deep)
    (covid / ".DS_Store").write_bytes(b"\x00\x01")
    (covid / "notes.txt").write_text("ignored")
    (root / "train" / "Stray").mkdir()
    return root


def test_sixteen_bit_is_scaled_not_truncated(messy):
    image = read_image(messy / "train" / "Covid" / "deep16.png")
    assert image.dtype == np.uint8 and image.shape == (40, 50, 3)
    assert image[0, 0, 0] == round(1000 * 255 / 65535) == 4
    assert image[0, 40, 0] == round(40000 * 255 / 65535) == 156  # truncation would give 40000 % 256 = 64


def test_rgba_transparency_composited_over_black(messy):
    image = read_image(messy / "train" / "Covid" / "rgba.png")
    assert (image[:10] == 0).all() and (image[10:20] == 100).all() and (image[20:] == 200).all()


def test_real_sixteen_bit_rgba_png_of_the_dataset(data_dir):
    raw = cv2.imread(str(data_dir / "train" / "Covid" / "09.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    image = read_image(data_dir / "train" / "Covid" / "09.png")
    expected = np.round(raw[:, :, 2].astype(np.float64) * raw[:, :, 3] / 65535 * 255 / 65535)
    assert np.abs(image[:, :, 0].astype(int) - expected).max() <= 1


def test_grayscale_becomes_three_equal_channels(data_dir):
    image = read_image(data_dir / "test" / "Covid" / "COVID-00012.jpg")  # stored as L
    assert image.shape[2] == 3 and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_listing_takes_any_case_and_skips_hidden_and_unknown(messy):
    names = {p.name for p in list_images(messy / "train" / "Covid")}
    assert {"UPPER.JPG", "UPPER.PNG", "rgba.png", "deep16.png"} <= names
    assert ".DS_Store" not in names and "notes.txt" not in names


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero.jpeg", "empty file (0 bytes)"),
        ("truncated.jpeg", "truncated JPEG"),
        ("truncated.png", "truncated PNG"),
        ("text.jpg", "not a JPEG or PNG image"),
        ("garbage.jpg", "OpenCV could not decode this JPEG file"),
    ],
)
def test_each_bad_file_is_named_with_its_reason(messy, name, reason):
    path = messy / "train" / "Normal" / name
    with pytest.raises(BadImageError) as err:
        read_image(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def make_dm(root, **kwargs):
    return ChestXrayDataModule(str(root), image_size=32, check_leakage=False, download=False, **kwargs)


def test_skip_warns_per_file_with_a_summary_and_trains_on_the_rest(messy):
    dm = make_dm(messy, val_fraction=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught]
    skipped = [m for m in messages if m.startswith("skipping unreadable image")]
    assert len(skipped) == 5
    assert any("skipped 5 unreadable image file(s)" in m for m in messages)
    assert any("unexpected folder" in m and "Stray" in m for m in messages)
    assert {Path(e.path).name for e in dm.skipped} == {
        "zero.jpeg",
        "truncated.jpeg",
        "truncated.png",
        "text.jpg",
        "garbage.jpg",
    }
    every = dm.datasets["train"].paths + dm.datasets["val"].paths
    assert len(every) == 9 + 4  # 3 real per class, plus UPPER.JPG, UPPER.PNG, rgba.png, deep16.png
    assert {"UPPER.JPG", "UPPER.PNG", "rgba.png", "deep16.png"} <= {p.name for p in every}


def test_error_mode_lists_every_bad_file_at_once(messy):
    with pytest.raises(BadFilesError) as err:
        make_dm(messy, on_bad_file="error", val_fraction=0).setup()
    message = str(err.value)
    for name in ("zero.jpeg", "truncated.jpeg", "truncated.png", "text.jpg", "garbage.jpg"):
        assert name in message
    assert "data.on_bad_file" in message


def test_too_small_hold_out_names_the_setting(messy):
    with pytest.raises(DataError, match=r"data.val_fraction=0.15 cannot make a stratified hold-out of 13"):
        make_dm(messy).setup()


def test_empty_class_is_an_error(messy):
    folder = messy / "test" / "Normal"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no .jpeg/.jpg/.png images: .*test/Normal"):
        make_dm(messy).setup()


def test_cached_image_is_bit_identical_to_a_direct_decode(tmp_path, data_dir):
    paths = [
        data_dir / "train" / "Covid" / "09.png",  # 16-bit RGBA
        data_dir / "train" / "Normal" / "01.jpeg",  # large JPEG: reduced-resolution decode
        data_dir / "test" / "Covid" / "COVID-00012.jpg",  # grey
    ]
    cache = ImageCache(64, tmp_path / "cache")
    cold = cache.decode_all(paths)
    warm = ImageCache(64, tmp_path / "cache").decode_all(paths)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    for path, a, b in zip(paths, cold.images, warm.images, strict=True):
        direct = load_image(path, 64).transpose(2, 0, 1)
        assert np.array_equal(a, direct) and np.array_equal(b, direct)


def test_changed_preprocessing_does_not_reuse_the_cache(tmp_path, data_dir):
    path = data_dir / "train" / "Normal" / "01.jpeg"
    ImageCache(64, tmp_path / "cache").decode_all([path])
    other = ImageCache(32, tmp_path / "cache").decode_all([path])
    assert other.images.shape == (1, 3, 32, 32)
    assert np.array_equal(other.images[0], load_image(path, 32).transpose(2, 0, 1))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_reduced_jpeg_decoding_is_close_to_a_full_decode(data_dir):
    path = data_dir / "train" / "Normal" / "01.jpeg"
    full = cv2.resize(read_image(path), (224, 224), interpolation=cv2.INTER_AREA)
    reduced = load_image(path, 224)
    assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 2.0
