from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.data import ChestXrayDataModule, DataError

EXPECTED = {
    "train": {"Normal": 70, "Covid": 111, "Viral Pneumonia": 70},
    "test": {"Normal": 20, "Covid": 26, "Viral Pneumonia": 20},
}


def make_dm(data_dir, **kwargs) -> ChestXrayDataModule:
    args = dict(data_dir=str(data_dir), image_size=32, check_leakage=False, download=False)
    return ChestXrayDataModule(**{**args, **kwargs})


@pytest.fixture(scope="module")
def datamodule(data_dir):
    dm = make_dm(data_dir)
    dm.setup()
    return dm


def test_finds_every_image_with_its_label(datamodule):
    dm = datamodule
    train_paths = dm.datasets["train"].paths + dm.datasets["val"].paths
    train_labels = dm.datasets["train"].labels.tolist() + dm.datasets["val"].labels.tolist()
    assert len(train_paths) == 251 and len(dm.datasets["test"]) == 66
    for split, paths, labels in (
        ("train", train_paths, train_labels),
        ("test", dm.datasets["test"].paths, dm.datasets["test"].labels.tolist()),
    ):
        assert Counter(dm.classes[y] for y in labels) == EXPECTED[split]
        for path, label in zip(paths, labels, strict=True):
            assert path.parent.name == dm.classes[label]
            assert path.parent.parent.name == split
    assert dm.classes == ["Normal", "Covid", "Viral Pneumonia"]
    assert dm.datasets["train"].images.dtype.is_floating_point is False
    assert tuple(dm.datasets["test"].images.shape) == (66, 3, 32, 32)


def test_val_split_is_stratified_disjoint_and_seeded(datamodule, data_dir):
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    assert not set(train.paths) & set(val.paths)
    assert len(val) == 38  # ceil(0.15 * 251), as scikit-learn rounds the test share
    fractions = np.bincount(val.labels.numpy(), minlength=3) / np.array([70, 111, 70])
    assert np.allclose(fractions, 0.15, atol=0.02), fractions
    again = make_dm(data_dir)
    again.setup()
    assert again.datasets["val"].paths == val.paths
    other = make_dm(data_dir, seed=7)
    other.setup()
    assert other.datasets["val"].paths != val.paths


def test_val_fraction_zero_validates_on_test_folder(data_dir):
    dm = make_dm(data_dir, val_fraction=0)
    dm.setup()
    assert dm.datasets["val"] is dm.datasets["test"]
    assert len(dm.datasets["train"]) == 251


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
    dm = make_dm(data_dir, augment=True)
    dm.setup()
    train = dm.datasets["train"]
    augmented = [train[i][0] for i in range(8)]
    assert all(a.dtype == torch.uint8 and a.shape == (3, 32, 32) for a in augmented)
    assert any(not torch.equal(a, train.images[i]) for i, a in enumerate(augmented))
    val = dm.datasets["val"]
    assert all(torch.equal(val[i][0], val.images[i]) for i in range(4))


def test_feature_cache_with_augmentation_is_refused(tmp_path):
    from chestxray.training import build
    from tests.conftest import train_config

    cfg = train_config(tmp_path, "model.freeze=features", "model.cache_features=true", "data.augment=true")
    with pytest.raises(ValueError, match="data.augment=false"):
        build(cfg)
