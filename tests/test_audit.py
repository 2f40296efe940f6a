import json
import os
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestxray.audit import main
from chestxray.data.duplicates import DEFAULT_THRESHOLD, hamming_pairs, hash_files, near_pairs


@pytest.fixture
def variants(tmp_path, data_dir):
    """One image, three altered copies of it, and two other patients' images."""
    normal = sorted((data_dir / "train" / "Normal").iterdir())
    src = normal[0]
    image = cv2.imread(str(src))
    out = tmp_path / "v"
    out.mkdir()
    cv2.imwrite(str(out / "requality.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 40])
    cv2.imwrite(str(out / "resized.png"), cv2.resize(image, (image.shape[1] * 2 // 3, image.shape[0] * 2 // 3)))
    # a contrast change that clips nothing (a clipping stretch wipes out small, generated images)
    darker_midtones = (255 * (image / 255.0) ** 1.4).astype(np.uint8)
    cv2.imwrite(str(out / "contrast.jpg"), darker_midtones)
    shutil.copy(normal[1], out / f"other_patient{normal[1].suffix}")
    shutil.copy(sorted((data_dir / "test" / "Normal").iterdir())[0], out / "another.jpeg")
    return src, out


def test_near_duplicates_found_and_different_patients_not(variants):
    src, out = variants
    copies = [out / "requality.jpg", out / "resized.png", out / "contrast.jpg"]
    others = [p for p in out.iterdir() if p not in copies]
    candidates = copies + others
    src_hash, _ = hash_files([src])
    hashes, ok = hash_files(candidates)
    assert ok.all()
    pairs = near_pairs([src], src_hash, candidates, hashes, DEFAULT_THRESHOLD)
    assert {p.test.name for p in pairs} == {"requality.jpg", "resized.png", "contrast.jpg"}
    assert all(p.distance <= DEFAULT_THRESHOLD for p in pairs)


def brute_force(a: np.ndarray, b: np.ndarray | None, threshold: int) -> list[tuple[int, int, int]]:
    bits_a = np.unpackbits(a, axis=1).astype(bool)
    bits_b = bits_a if b is None else np.unpackbits(b, axis=1).astype(bool)
    distance = (bits_a[:, None, :] != bits_b[None, :, :]).sum(-1)
    return sorted(
        (i, j, int(distance[i, j]))
        for i, j in zip(*np.nonzero(distance <= threshold), strict=True)
        if b is not None or j > i
    )


@pytest.mark.parametrize("threshold", [40, 110, 124])
def test_blocked_search_equals_brute_force_on_random_hashes(threshold, monkeypatch):
    from chestxray.data import duplicates

    rng = np.random.default_rng(threshold)
    a = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    a[100] = a[7]  # an exact copy
    a[200] = a[7] ^ np.eye(1, 32, 3, dtype=np.uint8)[0]  # one bit apart
    b = rng.integers(0, 256, (130, 32), dtype=np.uint8)
    b[5] = a[9]
    monkeypatch.setattr(duplicates, "_BLOCK_BYTES", 32 * 500 * 7)  # blocks of 7 rows: many blocks, ragged end
    within = sorted(hamming_pairs(a, None, threshold))
    across = sorted(hamming_pairs(a, b, threshold))
    assert within == brute_force(a, None, threshold) and (7, 100, 0) in within and (7, 200, 1) in within
    assert across == brute_force(a, b, threshold) and (9, 5, 0) in across


@pytest.mark.real_data
def test_audit_of_the_real_dataset_finds_its_leaks(real_data_dir, tmp_path, capsys):
    assert main([str(real_data_dir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    s = report["summary"]
    assert report["files"] == 317 and s["bad_files"] == 0
    assert s["exact_duplicate_groups"] == 10 and s["exact_duplicate_pairs_train_test"] == 6
    assert s["near_duplicate_pairs"] == 11 and s["near_duplicate_pairs_train_test"] == 5
    leaks = {(r["a"], r["b"]) for r in report["near_duplicates"] if r["cross_split"]}
    assert ("train/Covid/COVID-00033.jpg", "test/Covid/COVID-00037.jpg") in leaks
    assert ("train/Covid/090.jpeg", "test/Covid/0112.jpg") in leaks
    covid = report["per_split_class"]["train"]["Covid"]
    assert covid["count"] == 111 and covid["bit_depths"] == {"8": 110, "16": 1}
    assert covid["modes"] == {"RGB": 70, "RGBA": 4, "L": 37}
    markdown = (tmp_path / "audit.md").read_text()
    assert "**train/test leakage**: `test/Covid/COVID-00012.jpg`, `train/Covid/COVID-00012.jpg`" in markdown
    assert "leak:" in capsys.readouterr().out


def test_audit_of_one_labelled_folder_and_against_another(synthetic_dir, tmp_path, capsys):
    one = tmp_path / "hospital"
    shutil.copytree(synthetic_dir / "test", one)  # class folders, no train/test
    assert main([str(one), "--against", str(synthetic_dir), "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert list(report["per_split_class"]) == ["all"]
    assert report["files"] == sum(1 for _ in one.rglob("*.*"))
    shared = report["against"]["shared"]
    identical = {r["ours"] for r in shared if r["identical"]}
    assert identical == {str(p.relative_to(one)) for p in one.rglob("*.*")}  # each is a copy of a test image
    leak_copies = {(r["ours"], r["theirs"].rsplit(".", 1)[0]) for r in shared if not r["identical"]}
    assert {(f"Covid/leak_{k}.jpg", f"train/Covid/train_0000{k}") for k in range(3)} == leak_copies  # leak_k copies
    assert "shared with" in capsys.readouterr().out


def test_each_audit_keeps_a_folder_of_its_own(synthetic_dir, tmp_path, capsys, monkeypatch):
    """Without --out, each audit writes outputs/audit/runs/<date>_<time>/ (a second one no longer replaces the
    first's report); an --out that holds an audit is refused before the scan."""
    site = tmp_path / "site"
    shutil.copytree(synthetic_dir / "test", site)
    monkeypatch.chdir(tmp_path)
    times = iter(["2026-12-07_10-00-00", "2026-12-07_10-00-01", "2026-12-07_10-00-01"])
    monkeypatch.setattr("chestxray.audit.time.strftime", lambda fmt: next(times))
    assert main([str(site)]) == 0 and main([str(synthetic_dir)]) == 0
    first, second = (
        tmp_path / "outputs/audit/runs" / t / "audit.json" for t in ("2026-12-07_10-00-00", "2026-12-07_10-00-01")
    )
    assert json.loads(first.read_text())["data_dir"] == str(site)
    assert json.loads(second.read_text())["data_dir"] == str(synthetic_dir)
    assert main([str(site)]) == 0  # the same second as the second: a folder of its own all the same
    assert json.loads((second.parent.with_name(second.parent.name + "_2") / "audit.json").read_text())["files"]
    capsys.readouterr()
    assert main([str(site), "--out", str(first.parent)]) == 2
    said = f"--out={first.parent} holds an audit already: pick another folder (each audit keeps its own)"
    assert capsys.readouterr().err == f"audit: error: {said}\n"


def test_a_hospitals_folder_need_not_hold_every_class(synthetic_dir, tmp_path, capsys):
    """A second site with Normal and Covid only is audited, and checked --against, as it is; a folder with no class
    folder at all is one line naming the option."""
    site = tmp_path / "site"
    for name in ("Normal", "Covid"):
        shutil.copytree(synthetic_dir / "test" / name, site / name)
    assert main([str(synthetic_dir), "--against", str(site), "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["against"]["files"] == sum(1 for p in site.rglob("*") if p.is_file()) and report["against"]["shared"]
    assert main([str(site), "--out", str(tmp_path / "b")]) == 0
    per_class = json.loads((tmp_path / "b" / "audit.json").read_text())["per_split_class"]["all"]
    assert {name for name, stats in per_class.items() if stats["count"]} == {"Normal", "Covid"}
    split = tmp_path / "split"  # train/ and test/ holding some of the classes
    for part in ("train", "test"):
        shutil.copytree(site / "Normal", split / part / "Normal")
    assert main([str(synthetic_dir), "--against", str(split), "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    shutil.copytree(site / "Covid", site / "COVID-19")  # a misnamed class folder must not pass for a missing class
    assert main([str(site), "--out", str(tmp_path / "e")]) == 2
    assert f"DATA={site}: its folder COVID-19/ is not one of the classes" in capsys.readouterr().err
    (tmp_path / "empty" / "misc").mkdir(parents=True)
    assert main([str(synthetic_dir), "--against", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"audit: error: --against={tmp_path / 'empty'}: no class folder in it")
    assert err.count("\n") == 1


def test_audit_of_a_missing_folder_fails_clearly(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.fixture
def no_scan(monkeypatch):
    """A scan fails the test: a bad --out must be refused before the files are read, not after."""
    monkeypatch.setattr("chestxray.audit.scan", lambda *a, **k: pytest.fail("scanned before --out was checked"))


def test_an_out_below_or_at_a_file_is_refused_before_the_scan(no_scan, synthetic_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert main([str(synthetic_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"audit: error: --out={out} ") and "a file, not a folder" in err
        assert err.count("\n") == 1  # one line, no traceback
    assert blocker.read_text() == "x"


def test_an_out_this_user_cannot_write_or_reach_is_refused_before_the_scan(
    no_scan, synthetic_dir, tmp_path, capsys, monkeypatch
):
    """A folder this user may not write in, or not even enter (os.stat raises PermissionError below it): one line,
    exit 2. The permissions are those os.access and the file system report, made so here because root (CI) may
    write anywhere."""
    locked, hidden = tmp_path / "locked", tmp_path / "hidden"
    locked.mkdir()
    hidden.mkdir()
    access, stat = os.access, os.stat
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))

    def no_entry(path, *args, **kwargs):
        if Path(path).is_relative_to(hidden) and Path(path) != hidden:
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", no_entry)
    for out, expected in (
        (locked, f"--out={locked}: cannot write in {locked}"),
        (locked / "new", f"--out={locked / 'new'}: cannot write in {locked}"),
        (hidden / "inner" / "report", f"--out={hidden / 'inner' / 'report'}: cannot enter {hidden} "),
    ):
        assert main([str(synthetic_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"audit: error: {expected}") and err.count("\n") == 1, err
    assert not (locked / "new").exists()


@pytest.mark.real_data
def test_training_start_flags_the_leaking_test_images_and_can_drop_their_train_copies(real_data_dir, tmp_path):
    from chestxray.data.datamodule import ChestXrayDataModule

    dm = ChestXrayDataModule(str(real_data_dir), image_size=32, download=False, report_dir=str(tmp_path))
    expected = r"11 near-duplicate pair\(s\) of 7 train image\(s\) and 9 test image\(s\) found"
    with pytest.warns(UserWarning, match=expected):
        dm.setup()
    pairs = json.loads((tmp_path / "leakage.json").read_text())["pairs"]["test"]
    flagged = {p for p, leak in zip(dm.test_sets["test"].paths, dm.leaking["test"], strict=True) if leak}
    assert flagged == {real_data_dir / "test" / "Covid" / name for name in {r["test"].split("/")[-1] for r in pairs}}
    assert len(flagged) == 9  # of the 26 Covid test images
    dropping = ChestXrayDataModule(str(real_data_dir), image_size=32, download=False, drop_leaking=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropping.setup()
    assert len(dropping.datasets["train"]) + len(dropping.datasets["val"]) == 251 - 7
    assert not dropping.leaking["test"].any()  # their train copies are gone: nothing leaks any more


def test_which_duplicate_pairs_cross_the_split_is_exact(synthetic_dir, tmp_path):
    """Exact groups spanning both splits, near-duplicates within each split and across it: every pair counted once,
    and a pair crosses the split exactly when its two files are in different splits, whichever comes first."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("Normal", "Covid", "Viral Pneumonia"):
            (root / split / name).mkdir(parents=True)
            for src in sorted((synthetic_dir / split / name).glob("*_0000[0-2].*")):
                shutil.copy(src, root / split / name / src.name)
    train_covid = sorted((root / "train" / "Covid").iterdir())[0]
    shutil.copy(train_covid, root / "test" / "Covid" / "copy1.jpeg")  # a group of 3: train + 2 test copies
    shutil.copy(train_covid, root / "test" / "Normal" / "copy2.jpeg")
    test_normal = sorted((root / "test" / "Normal").glob("test_*"))[0]
    shutil.copy(test_normal, root / "test" / "Viral Pneumonia" / "same.png")  # exact, within test
    image = cv2.imread(str(sorted((root / "train" / "Normal").iterdir())[1]))
    half = cv2.resize(image, (image.shape[1] * 2 // 3, image.shape[0] * 2 // 3))
    cv2.imwrite(str(root / "train" / "Viral Pneumonia" / "near_train.png"), half)  # near, within train
    image = cv2.imread(str(sorted((root / "test" / "Covid").glob("test_*"))[1]))
    cv2.imwrite(str(root / "train" / "Covid" / "a_near_test.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 40])  # across
    image = cv2.imread(str(sorted((root / "test" / "Normal").glob("test_*"))[1]))
    cv2.imwrite(str(root / "train" / "Normal" / "same_pixels.png"), image)  # other bytes, the same hash: across
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    s = report["summary"]
    assert (s["exact_duplicate_groups"], s["exact_duplicate_pairs"], s["exact_duplicate_pairs_train_test"]) == (2, 4, 2)
    assert (s["near_duplicate_pairs"], s["near_duplicate_pairs_train_test"]) == (3, 2)
    assert {r["distance_bits"] for r in report["near_duplicates"] if r["cross_split"]} >= {0}
    for row in report["near_duplicates"]:
        assert row["cross_split"] == (row["a"].split("/")[0] != row["b"].split("/")[0]), row
    crossing = {frozenset(g["files"]) for g in report["exact_duplicates"] if g["cross_split"]}
    assert crossing == {
        frozenset([str(train_covid.relative_to(root)), "test/Covid/copy1.jpeg", "test/Normal/copy2.jpeg"])
    }
