import json
import shutil

import cv2
import numpy as np
import pytest

from chestxray.audit import main
from chestxray.duplicates import DEFAULT_THRESHOLD, cross_split_pairs


@pytest.fixture
def variants(tmp_path, data_dir):
    """One real image, three altered copies of it, and another patient's image."""
    src = data_dir / "train" / "Normal" / "01.jpeg"
    image = cv2.imread(str(src))
    out = tmp_path / "v"
    out.mkdir()
    cv2.imwrite(str(out / "requality.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 40])
    cv2.imwrite(str(out / "resized.png"), cv2.resize(image, (image.shape[1] // 3, image.shape[0] // 3)))
    stretched = np.clip((image.astype(np.float32) - 30) * 1.5, 0, 255).astype(np.uint8)
    cv2.imwrite(str(out / "contrast.jpg"), stretched)
    shutil.copy(data_dir / "train" / "Normal" / "02.jpeg", out / "other_patient.jpeg")
    shutil.copy(data_dir / "test" / "Normal" / "0101.jpeg", out / "another.jpeg")
    return src, out


def test_near_duplicates_found_and_different_patients_not(variants):
    src, out = variants
    copies = [out / "requality.jpg", out / "resized.png", out / "contrast.jpg"]
    pairs = cross_split_pairs([src], copies + [out / "other_patient.jpeg", out / "another.jpeg"])
    assert {p.test.name for p in pairs} == {"requality.jpg", "resized.png", "contrast.jpg"}
    assert all(p.distance <= DEFAULT_THRESHOLD for p in pairs)


def test_audit_of_the_real_dataset_finds_its_leaks(data_dir, tmp_path, capsys):
    assert main([str(data_dir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    s = report["summary"]
    assert report["files"] == 317 and s["bad_files"] == 0
    assert s["exact_duplicate_groups"] == 10 and s["exact_duplicate_pairs_train_test"] == 6
    leaks = {(r["a"], r["b"]) for r in report["near_duplicates"] if r["cross_split"]}
    assert ("train/Covid/COVID-00033.jpg", "test/Covid/COVID-00037.jpg") in leaks
    assert ("train/Covid/090.jpeg", "test/Covid/0112.jpg") in leaks
    covid = report["per_split_class"]["train"]["Covid"]
    assert covid["count"] == 111 and covid["bit_depths"] == {"8": 110, "16": 1}
    assert covid["modes"] == {"RGB": 70, "RGBA": 4, "L": 37}
    markdown = (tmp_path / "audit.md").read_text()
    assert "**train/test leakage**: `test/Covid/COVID-00012.jpg`, `train/Covid/COVID-00012.jpg`" in markdown
    assert "leak:" in capsys.readouterr().out


def test_audit_of_a_missing_folder_fails_clearly(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "split folder not found" in capsys.readouterr().err


def test_training_start_warns_about_and_can_drop_leaking_images(data_dir, tmp_path):
    from chestxray.data import ChestXrayDataModule

    dm = ChestXrayDataModule(str(data_dir), image_size=32, download=False, report_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"11 train/test near-duplicate pair\(s\) \(7 train images\)"):
        dm.setup()
    assert json.loads((tmp_path / "leakage.json").read_text())["pairs"]
    dropping = ChestXrayDataModule(str(data_dir), image_size=32, download=False, drop_leaking=True)
    with pytest.warns(UserWarning):
        dropping.setup()
    assert len(dropping.datasets["train"]) + len(dropping.datasets["val"]) == 251 - 7
