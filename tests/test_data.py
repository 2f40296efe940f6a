import csv
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.data.datamodule import ChestXrayDataModule, DataError
from chestxray.data.sources import read_index

EXPECTED = {
    "train": {"Normal": 70, "Covid": 111, "Viral Pneumonia": 70},
    "test": {"Normal": 20, "Covid": 26, "Viral Pneumonia": 20},
}


def make_dm(data_dir, **kwargs) -> ChestXrayDataModule:
    # the disk store: decoded once per test session, opened from the cache by every later setup
    args = dict(data_dir=str(data_dir), image_size=32, check_leakage=False, download=False, store="disk")
    return ChestXrayDataModule(**{**args, **kwargs})


def setup(dm: ChestXrayDataModule) -> ChestXrayDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    return dm


def train_folder_counts(data_dir: Path) -> list[int]:
    return [len(list((data_dir / "train" / c).iterdir())) for c in ("Normal", "Covid", "Viral Pneumonia")]


@pytest.mark.real_data
def test_finds_every_image_of_the_real_dataset_with_its_label(real_data_dir):
    dm = setup(make_dm(real_data_dir))
    train_paths = dm.datasets["train"].paths + dm.datasets["val"].paths
    train_labels = dm.datasets["train"].labels.tolist() + dm.datasets["val"].labels.tolist()
    assert len(train_paths) == 251 and len(dm.test_sets["test"]) == 66
    for split, paths, labels in (
        ("train", train_paths, train_labels),
        ("test", dm.test_sets["test"].paths, dm.test_sets["test"].labels.tolist()),
    ):
        assert Counter(dm.classes[y] for y in labels) == EXPECTED[split]
        for path, label in zip(paths, labels, strict=True):
            assert path.parent.name == dm.classes[label] and path.parent.parent.name == split
    image, label, position, leaking = dm.test_sets["test"][0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 32, 32) and position == 0 and not leaking


def test_val_split_is_stratified_disjoint_and_seeded(data_dir):
    dm = setup(make_dm(data_dir))
    train, val = dm.datasets["train"], dm.datasets["val"]
    counts = np.array(train_folder_counts(data_dir))
    assert not set(train.paths) & set(val.paths) and len(train) + len(val) == counts.sum()
    assert len(val) == int(np.ceil(0.15 * counts.sum()))  # as scikit-learn rounds the test share
    fractions = np.bincount(val.labels.numpy(), minlength=3) / counts
    assert np.allclose(fractions, 0.15, atol=0.03), fractions
    assert setup(make_dm(data_dir)).datasets["val"].paths == val.paths
    assert setup(make_dm(data_dir, seed=7)).datasets["val"].paths != val.paths


def test_val_fraction_zero_validates_on_test_folder(data_dir):
    dm = setup(make_dm(data_dir, val_fraction=0))
    assert dm.datasets["val"] is dm.test_sets["test"]
    assert len(dm.datasets["train"]) == sum(train_folder_counts(data_dir))


def test_k_folds_are_disjoint_stratified_cover_train_once_and_never_touch_test(data_dir):
    folds = [setup(make_dm(data_dir, fold=k, folds=5)) for k in range(5)]
    test_paths = set(folds[0].test_sets["test"].paths)
    every_train = set(folds[0].datasets["train"].paths) | set(folds[0].datasets["val"].paths)
    vals = [dm.datasets["val"].paths for dm in folds]
    assert sum(len(v) for v in vals) == len(every_train) == sum(train_folder_counts(data_dir))
    assert set().union(*map(set, vals)) == every_train  # each train image validates exactly once
    for dm in folds:
        val = set(dm.datasets["val"].paths)
        assert not val & set(dm.datasets["train"].paths) and not val & test_paths
        assert not set(dm.datasets["train"].paths) & test_paths
        share = np.bincount(dm.datasets["val"].labels.numpy(), minlength=3) / np.array(train_folder_counts(data_dir))
        assert np.allclose(share, 0.2, atol=0.05), share
    assert setup(make_dm(data_dir, fold=2, folds=5)).datasets["val"].paths == vals[2]  # seeded
    with pytest.raises(DataError, match=r"data.fold=5 must be between 0 and data.folds-1=4"):
        setup(make_dm(data_dir, fold=5, folds=5))


def write_index(data_dir: Path, index: Path, with_split: bool = True) -> None:
    """A label file listing every image of the folder layout: absolute paths (the data is not below the file)."""
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"] if with_split else ["path", "label"])
        for split in ("train", "test"):
            for path in sorted((data_dir / split).rglob("*.*")):
                writer.writerow([path, path.parent.name, split] if with_split else [path, path.parent.name])


@pytest.mark.real_data
def test_label_file_of_the_real_dataset_gives_the_same_split_and_images(real_data_dir, tmp_path):
    check_label_file_matches_folders(real_data_dir, tmp_path)


def test_label_file_gives_the_same_split_and_images_as_the_folders(synthetic_dir, tmp_path):
    check_label_file_matches_folders(synthetic_dir, tmp_path)


def check_label_file_matches_folders(data_dir: Path, tmp_path: Path) -> None:
    index = tmp_path / "labels" / "index.csv"
    index.parent.mkdir()
    write_index(data_dir, index)
    folders = setup(make_dm(data_dir))
    listed = setup(make_dm(tmp_path / "unused", index=str(index)))
    for name in ("train", "val"):
        assert [p.resolve() for p in listed.datasets[name].paths] == [p.resolve() for p in folders.datasets[name].paths]
        assert torch.equal(listed.datasets[name].labels, folders.datasets[name].labels)
    ours, theirs = listed.test_sets["test"], folders.test_sets["test"]
    assert [p.resolve() for p in ours.paths] == [p.resolve() for p in theirs.paths]
    assert all(torch.equal(ours[i][0], theirs[i][0]) for i in range(0, len(ours), 7))


def test_a_runs_training_data_is_listed_as_training_listed_it(synthetic_dir, tmp_path):
    """sources.saved_training_data (what robustness, adapt.py and int8 calibration compare with or mix in): a run
    trained from a label file lists its train rows; data.drop_leaking=true clears its test and evaluation images; a
    dataset no longer there, or no data settings at all, is not known, with the setting named."""
    import os

    from chestxray.data.sources import DEFAULT_CLASSES, saved_training_data

    index = tmp_path / "index.csv"
    write_index(synthetic_dir, index)
    settings = {"data_dir": str(tmp_path / "unused"), "index": str(index), "classes": list(DEFAULT_CLASSES)}
    run = saved_training_data(settings, "ckpt=a.ckpt")
    folders = sorted(p.resolve() for p in (synthetic_dir / "train").rglob("*.*"))
    assert sorted(p.resolve() for p in run.train.paths) == folders and not run.cleared
    assert run.threshold == 40 and run.note == f"compared with the {len(folders)} train images of {index}"
    evaluation = tmp_path / "eval"
    shutil.copytree(synthetic_dir / "test", evaluation)
    dropped = {**settings, "drop_leaking": True, "eval_sets": {"other": str(evaluation)}}
    run = saved_training_data(dropped, "ckpt=a.ckpt")
    tests = {os.path.realpath(p) for p in (*(synthetic_dir / "test").rglob("*.*"), *evaluation.rglob("*.*"))}
    assert run.cleared == tests and "leak no more" in run.note
    gone = saved_training_data({**settings, "index": None, "data_dir": str(tmp_path / "gone")}, "ckpt=a.ckpt")
    assert gone.train is None and f"data.data_dir={tmp_path / 'gone'}, cannot be listed here" in gone.note
    elsewhere = saved_training_data({**settings, "index": None, "data_dir": "../moved"}, "ckpt=a.ckpt")
    assert elsewhere.note.endswith("(a relative path: run this from the folder train.py ran in)")
    unknown = saved_training_data(None, "ckpt=a.ckpt")
    assert unknown.train is None
    assert unknown.note == "ckpt=a.ckpt saved no data settings, so its train images are not known"


def test_label_file_errors_name_the_file_line_and_problem(synthetic_dir, tmp_path):
    index = tmp_path / "labels.csv"
    image = next((synthetic_dir / "train" / "Normal").iterdir())
    index.write_text(
        f"path,label,split\n{image},Normal,train\n{image},Pneumonia,train\n{tmp_path / 'gone.png'},Covid,test\n"
    )
    with pytest.raises(DataError, match=r"labels.csv: labels that are not one of .*\n  line 3: 'Pneumonia'"):
        read_index(index, ["Normal", "Covid", "Viral Pneumonia"])
    index.write_text(f"path,label,split\n{image},Normal,train\n{tmp_path / 'gone.png'},Covid,test\n")
    with pytest.raises(DataError, match=r"1 listed file\(s\) do not exist:\n  line 3: .*gone.png"):
        read_index(index, ["Normal", "Covid", "Viral Pneumonia"])
    index.write_text("file,class\nx.png,Normal\n")
    with pytest.raises(DataError, match=r"needs a header with the columns path,label\[,split\]"):
        read_index(index, ["Normal"])
    index.write_text(f"path,label\n{image},Normal\n")
    with pytest.raises(DataError, match=r"labels.csv: line 1 \(the header\) has no split column"):
        setup(make_dm(tmp_path, index=str(index)))
    index.write_text(f"path,label,split\n{image},Normal,train\n{image},Normal\n")
    with pytest.raises(DataError, match=r"the split column must be one of \['train', 'test'\]:\n  line 3: no split"):
        read_index(index, ["Normal"])


def test_label_file_rows_are_counted_once_and_never_relabel_an_image(synthetic_dir, tmp_path):
    """A path listed twice: counted once when the rows agree, an error naming both lines when they do not, however
    the path is spelled (relative, absolute, through ..)."""
    folder = tmp_path / "set"
    shutil.copytree(synthetic_dir / "train" / "Normal", folder / "imgs")
    names = sorted(p.name for p in (folder / "imgs").iterdir())
    index = folder / "labels.csv"
    classes = ["Normal", "Covid", "Viral Pneumonia"]
    rows = [
        f"imgs/{names[0]},Normal,train",
        f"imgs/{names[1]},Covid,train",
        f"{folder / 'imgs' / names[0]},Normal,train",
    ]
    index.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"1 row\(s\) repeat an image already listed: each counted once"):
        groups = read_index(index, classes)
    assert sorted(p.name for p in groups["train"].paths) == sorted(names[:2])
    assert dict(zip([p.name for p in groups["train"].paths], groups["train"].labels, strict=True))[names[0]] == 0
    rows.append(f"imgs/../imgs/{names[1]},Normal,train")  # the Covid image again, now called Normal
    index.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(
        DataError, match=rf"lines 3 and 5: imgs/../imgs/{re.escape(names[1])} is Covid \(train\) and Normal"
    ):
        read_index(index, classes)
    index.write_text(f"path,label,split\n../elsewhere.png,Normal,train\nimgs/{names[0]},Normal,test\n")
    with pytest.raises(
        DataError, match=r"relative paths must stay inside the label file's folder .*\n  line 2: ../elsewhere.png"
    ):
        read_index(index, classes)


def test_a_label_file_that_is_not_utf8_names_its_line(tmp_path):
    index = tmp_path / "labels.csv"
    index.write_bytes("path,label,split\na.png,Normal,train\nRöntgen.png,Normal,train\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_index(index, ["Normal"])
    assert str(err.value) == (
        f"data.index={index}: line 3 is not UTF-8 text (byte 0xf6 at offset 37); save the label file as UTF-8"
    )


def test_missing_data_folder_names_path_and_setting(tmp_path):
    missing = tmp_path / "nowhere"
    dm = make_dm(missing)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(missing) in message and "data.data_dir" in message and "kaggle" in message.lower()


def test_missing_data_folder_reports_failed_download(tmp_path, monkeypatch):
    import kagglehub

    def offline(handle, *args, **kwargs):
        raise ConnectionError(f"cannot reach kaggle for {handle}")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    dm = make_dm(tmp_path / "nowhere", download=True)
    with pytest.raises(DataError, match="automatic download from Kaggle failed: ConnectionError"):
        dm.prepare_data()


def _link_dataset(data_dir: Path, target: Path, classes=("Normal", "Covid", "Viral Pneumonia")) -> Path:
    for split in ("train", "test"):
        for name in classes:
            (target / split).mkdir(parents=True, exist_ok=True)
            (target / split / name).symlink_to(data_dir / split / name)
    return target


def test_missing_class_folder_names_it(tmp_path, data_dir):
    root = _link_dataset(data_dir, tmp_path / "data", classes=("Normal", "Covid"))
    with pytest.raises(DataError, match=r"class folder not found: .*train/Viral Pneumonia"):
        make_dm(root).setup()


def test_missing_split_names_it(tmp_path, data_dir):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "Normal").symlink_to(data_dir / "train" / "Normal")
    with pytest.raises(DataError, match="split folder not found"):
        make_dm(root, classes=["Normal"]).setup()


def test_augmentation_changes_train_images_only(data_dir):
    dm = setup(make_dm(data_dir, augment=True))
    train = dm.datasets["train"]
    augmented = [train[i][0] for i in range(8)]
    assert all(a.dtype == torch.uint8 and a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(a, torch.from_numpy(train.images[i])) for i, a in enumerate(augmented))
    val = dm.datasets["val"]
    assert all(torch.equal(val[i][0], torch.from_numpy(val.images[i])) for i in range(4))


def test_feature_cache_with_augmentation_is_refused(tmp_path, data_dir):
    from chestxray.errors import ConfigError
    from chestxray.training.fit import build
    from tests.conftest import train_config

    cfg = train_config(tmp_path, data_dir, "model.freeze=features", "model.cache_features=true", "data.augment=true")
    with pytest.raises(ConfigError, match="data.augment=false"):
        build(cfg)


def test_more_loader_workers_than_cores_are_capped_with_a_warning(data_dir):
    from chestxray.runtime.parallel import available_cpus

    dm = make_dm(data_dir, num_workers=1000)
    with pytest.warns(UserWarning, match=rf"data.num_workers=1000: this machine has {available_cpus()} cores"):
        assert dm._num_workers() == available_cpus()
    assert make_dm(data_dir, num_workers=0)._num_workers() == 0
    assert make_dm(data_dir)._num_workers() == 0  # auto, on the CPU: the images are decoded already
