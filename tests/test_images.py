"""Bad input, odd formats and hostile files, on images of the dataset plus crafted files."""

import io
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from chestxray.data.datamodule import BadFilesError, ChestXrayDataModule, DataError
from chestxray.data.images import BadImageError, ImageLimits, list_images, load_image, read_image
from tests.conftest import CLASSES

BAD = {
    "zero.jpeg": "empty file (0 bytes)",
    "truncated.jpeg": "truncated JPEG",
    "truncated.png": "truncated PNG",
    "text.jpg": "not a JPEG, PNG, TIFF or DICOM image",
    "garbage.jpg": "unreadable JPEG header",
}


def first(folder: Path, suffix: str) -> Path:
    return next(p for p in sorted(folder.rglob("*")) if p.suffix.lower() == suffix)


@pytest.fixture
def messy(tmp_path, data_dir) -> Path:
    """train/ and test/ with 3 images per class, odd but valid files, and broken ones."""
    root = tmp_path / "messy"
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for src in sorted((data_dir / split / name).iterdir())[:3]:
                shutil.copy(src, folder / src.name)
    bad = root / "train" / "Normal"
    jpeg = first(data_dir / "train", ".jpeg").read_bytes()
    png = first(data_dir, ".png").read_bytes()
    (bad / "zero.jpeg").write_bytes(b"")
    (bad / "truncated.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "text.jpg").write_text("not an image at all")
    (bad / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8 + b"\xff\xd9")
    covid = root / "train" / "Covid"
    shutil.copy(first(data_dir / "train", ".jpeg"), covid / "UPPER.JPG")
    shutil.copy(first(data_dir, ".png"), covid / "UPPER.PNG")
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


@pytest.mark.real_data
def test_real_sixteen_bit_rgba_png_of_the_dataset(real_data_dir):
    raw = cv2.imread(str(real_data_dir / "train" / "Covid" / "09.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    image = read_image(real_data_dir / "train" / "Covid" / "09.png")
    expected = np.round(raw[:, :, 2].astype(np.float64) * raw[:, :, 3] / 65535 * 255 / 65535)
    assert np.abs(image[:, :, 0].astype(int) - expected).max() <= 1


@pytest.mark.real_data
def test_grayscale_becomes_three_equal_channels(real_data_dir):
    image = read_image(real_data_dir / "test" / "Covid" / "COVID-00012.jpg")  # stored as L
    assert image.shape[2] == 3 and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_listing_takes_any_case_and_skips_hidden_and_unknown(messy):
    names = {p.name for p in list_images(messy / "train" / "Covid")}
    assert {"UPPER.JPG", "UPPER.PNG", "rgba.png", "deep16.png"} <= names
    assert ".DS_Store" not in names and "notes.txt" not in names


@pytest.mark.parametrize("name, reason", list(BAD.items()))
def test_each_bad_file_is_named_with_its_reason(messy, name, reason):
    path = messy / "train" / "Normal" / name
    with pytest.raises(BadImageError) as err:
        read_image(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def make_dm(root, **kwargs):
    return ChestXrayDataModule(str(root), image_size=32, check_leakage=False, download=False, **kwargs)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_skip_warns_per_file_naming_it_with_a_summary_and_trains_on_the_rest(messy, store):
    dm = make_dm(messy, val_fraction=0.3, store=store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught]
    skipped = sorted(m for m in messages if m.startswith("skipping unreadable image"))
    expected = sorted(f"skipping unreadable image {messy / 'train' / 'Normal' / n}: " for n in BAD)
    assert len(skipped) == 5 and all(m.startswith(e) for m, e in zip(skipped, expected, strict=True))
    assert all(reason in "".join(skipped) for reason in BAD.values())
    assert any("skipped 5 unreadable image file(s)" in m for m in messages)
    assert any("unexpected folder" in m and "Stray" in m for m in messages)
    assert {Path(e.path).name for e in dm.skipped} == set(BAD)
    every = dm.datasets["train"].paths + dm.datasets["val"].paths
    assert len(every) == 9 + 4  # 3 per class, plus UPPER.JPG, UPPER.PNG, rgba.png, deep16.png
    assert {"UPPER.JPG", "UPPER.PNG", "rgba.png", "deep16.png"} <= {p.name for p in every}


def test_error_mode_lists_every_bad_file_at_once(messy):
    with pytest.raises(BadFilesError) as err:
        make_dm(messy, on_bad_file="error", val_fraction=0).setup()
    message = str(err.value)
    for name in BAD:
        assert str(messy / "train" / "Normal" / name) in message
    assert "data.on_bad_file" in message


def test_too_small_hold_out_names_the_setting(messy):
    with pytest.raises(DataError, match=r"data.val_fraction=0.15 cannot make a stratified hold-out of 13"):
        make_dm(messy).setup()


def test_empty_class_is_an_error(messy):
    folder = messy / "test" / "Normal"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no JPEG, PNG, TIFF or DICOM images: .*test/Normal"):
        make_dm(messy).setup()


def test_reduced_jpeg_decoding_is_close_to_a_full_decode(data_dir):
    path = max((data_dir / "train").rglob("*.jpeg"), key=lambda p: p.stat().st_size)
    full = cv2.resize(read_image(path), (64, 64), interpolation=cv2.INTER_AREA)
    reduced = load_image(path, 64).transpose(1, 2, 0)
    assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 2.0


# --- hostile and odd files --------------------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    """A valid PNG of width x height declared in its header, small on disk (a decompression bomb when large)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(12_000, 10_000))  # 120 megapixels in ~100 kB
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(BadImageError, match=r"12000 x 10000 = 120,000,000 pixels is above data.max_pixels=100,000,000"):
        read_image(bomb)
    assert not decoded  # refused from the header: never handed to the decoder
    with pytest.raises(BadImageError, match="above data.max_pixels=1,000"):
        read_image(bomb, limits=ImageLimits(max_pixels=1_000))


def progressive_jpeg(side: int, extra_scans: int = 0) -> bytes:
    """A progressive JPEG (about 10 scans), its last scan repeated `extra_scans` more times: a few kB that take a
    pass over every block per scan (100,000 scans of a 4000 x 4000 file: 88 s of one core)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(90, 110, (side, side), dtype=np.uint8), "L").save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(tmp_path, monkeypatch):
    from chestxray.data.codestreams import MAX_JPEG_SCANS, jpeg_scans

    ordinary = tmp_path / "ordinary.jpg"
    ordinary.write_bytes(progressive_jpeg(64))
    assert 5 <= jpeg_scans(ordinary.read_bytes()) <= 12 and read_image(ordinary).shape == (64, 64, 3)
    bomb = tmp_path / "scans.jpg"
    bomb.write_bytes(progressive_jpeg(64, MAX_JPEG_SCANS))
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(BadImageError, match=rf"scans\.jpg: JPEG of {jpeg_scans(bomb.read_bytes()):,} scans, above 500"):
        read_image(bomb)
    assert not decoded


def test_the_pixel_limit_is_inclusive_to_the_pixel(tmp_path):
    """An image of exactly max_pixels is decoded; one pixel more is refused (the limit is a maximum, not a bound)."""
    exact = tmp_path / "exact.png"
    exact.write_bytes(png_bytes(50, 40))  # 2,000 pixels
    assert read_image(exact, limits=ImageLimits(max_pixels=2_000)).shape == (40, 50, 3)
    with pytest.raises(BadImageError, match=r"50 x 40 = 2,000 pixels is above data.max_pixels=1,999"):
        read_image(exact, limits=ImageLimits(max_pixels=1_999))


def test_tiny_image_is_refused_with_the_setting(tmp_path):
    tiny = tmp_path / "one.png"
    tiny.write_bytes(png_bytes(1, 1))
    with pytest.raises(BadImageError, match=r"1 x 1 pixels is smaller than data.min_image_side=32"):
        read_image(tiny)
    ok = tmp_path / "small.png"
    ok.write_bytes(png_bytes(40, 32))
    assert read_image(ok).shape == (32, 40, 3)
    for width, height in ((1000, 31), (31, 1000), (1, 1000), (1000, 1)):  # the shorter side counts, either way round
        strip = tmp_path / f"strip_{width}x{height}.png"
        strip.write_bytes(png_bytes(width, height))
        with pytest.raises(BadImageError, match=rf"{width} x {height} pixels is smaller than data.min_image_side=32"):
            read_image(strip)
    for width, height in ((1000, 32), (32, 1000)):
        wide = tmp_path / f"ok_{width}x{height}.png"
        wide.write_bytes(png_bytes(width, height))
        assert read_image(wide).shape == (height, width, 3)


def exif_rotated_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A 60 x 40 JPEG with a bright top-left block, tagged with an EXIF orientation; returns the stored pixels."""
    stored = np.zeros((40, 60), np.uint8)
    stored[:10, :20] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return stored


def test_jpeg_exif_orientation_is_applied_as_cv2_imread_does(tmp_path):
    path = tmp_path / "phone.jpg"
    exif_rotated_jpeg(path, 6)  # 6: rotate 90 degrees clockwise to display
    image = read_image(path)[:, :, 0]
    assert image.shape == (60, 40)  # upright: portrait
    assert image[:20, -10:].mean() > 200 and image[-20:, :10].mean() < 50  # the block went to the top right
    assert np.array_equal(image > 128, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 128)
    for orientation in range(1, 9):
        exif_rotated_jpeg(path, orientation)
        expected = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(read_image(path)[:, :, 0] > 128, expected > 128), orientation


@pytest.fixture
def odd_files(tmp_path) -> Path:
    """Valid but unusual files that must keep working, and a GIF named .png."""
    folder = tmp_path / "odd"
    folder.mkdir()
    grey = (np.arange(64 * 48) % 251).reshape(48, 64).astype(np.uint8)
    Image.fromarray(grey).convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    Image.fromarray(grey).save(folder / "progressive.jpg", "JPEG", progressive=True)
    Image.fromarray(grey).convert("P").save(folder / "palette.png")
    cv2.imwrite(str(folder / "grey16.png"), grey.astype(np.uint16) * 257)
    Image.fromarray(grey).save(folder / "named.png", "GIF")
    shutil.copy(folder / "progressive.jpg", folder / "a name with spaces ñ é ü.jpg")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return folder


def test_unusual_but_valid_files_decode_and_a_gif_is_refused(odd_files):
    for name in ("cmyk.jpg", "progressive.jpg", "palette.png", "grey16.png", "a name with spaces ñ é ü.jpg"):
        image = read_image(odd_files / name)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8, name
    assert (
        abs(
            int(read_image(odd_files / "grey16.png")[10, 10, 0]) - int(read_image(odd_files / "palette.png")[10, 10, 0])
        )
        <= 1
    )
    with pytest.raises(BadImageError, match="not a JPEG, PNG, TIFF or DICOM image"):
        read_image(odd_files / "named.png")
    listed = list_images(odd_files, recursive=True)  # the link loop is entered once, not forever
    assert sorted(p.name for p in listed) == sorted(p.name for p in odd_files.iterdir() if p.is_file())
