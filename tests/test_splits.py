"""Grouped splits: a patient's images and near-duplicate copies on one side of the hold-out and of every fold;
the same split as over images when no group has two; drop_leaking keeps every other image's side."""

import csv
import warnings

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold, train_test_split

from chestxray.data.splits import group_ids, holdout, kfold
from tests.test_data import make_dm, setup


def test_groups_join_patients_and_copies_transitively():
    groups = group_ids(6, ["p1", None, "p1", None, "p2", None], [(1, 3), (3, 5)])
    assert groups.tolist() == [0, 1, 0, 1, 4, 1]
    assert group_ids(3).tolist() == [0, 1, 2]


def test_without_groups_of_two_the_split_is_the_split_over_images():
    labels = np.repeat([0, 1, 2], [40, 70, 30])
    fit, val = holdout(labels, 0.15, 7, group_ids(len(labels)))
    old_fit, old_val = train_test_split(np.arange(len(labels)), test_size=0.15, stratify=labels, random_state=7)
    assert fit.tolist() == sorted(old_fit) and val.tolist() == sorted(old_val)
    fit, val = kfold(labels, 5, 3, 7, group_ids(len(labels)))
    old = list(StratifiedKFold(5, shuffle=True, random_state=7).split(np.zeros(len(labels)), labels))[3]
    assert fit.tolist() == sorted(old[0]) and val.tolist() == sorted(old[1])


def test_no_group_straddles_the_hold_out_or_any_fold():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 90, 50])
    patients = [f"p{label}-{rng.integers(0, 25)}" for label in labels]  # about 75 patients, 1-6 images each
    groups = group_ids(len(labels), patients)
    for seed in range(5):
        fit, val = holdout(labels, 0.15, seed, groups)
        assert not set(groups[fit]) & set(groups[val]) and len(fit) + len(val) == len(labels)
    vals = [kfold(labels, 5, k, 0, groups)[1] for k in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(labels)))  # each image validates once
    for k, val in enumerate(vals):
        fit = kfold(labels, 5, k, 0, groups)[0]
        assert not set(groups[fit]) & set(groups[val])


@pytest.mark.real_data
def test_the_real_train_folders_copies_stay_on_one_side(real_data_dir):
    """Normal 019 = 020 and 093 = 094, Viral Pneumonia 019 = 020: exact copies in train, never split apart."""
    copies = [("Normal", "019", "020"), ("Normal", "093", "094"), ("Viral Pneumonia", "019", "020")]
    for kwargs in ({}, {"fold": 0}, {"fold": 1}, {"fold": 2}, {"fold": 3}, {"fold": 4}):
        dm = setup(make_dm(real_data_dir, check_leakage=True, **kwargs))
        side = {
            (p.parent.name, p.stem[-3:]): "val" if p in set(dm.datasets["val"].paths) else "fit"
            for p in [*dm.datasets["val"].paths, *dm.datasets["train"].paths]
        }
        for cls, a, b in copies:
            assert side[(cls, a)] == side[(cls, b)], (kwargs, cls, a, b)
        # each side counts a joined pair as one group: its images exceed its groups by the pairs on that side, and
        # over both sides by all 5 the train folder has (the 3 copies above and 2 near-duplicate pairs)
        joined = {s: dm.split_groups[s]["images"] - dm.split_groups[s]["groups"] for s in ("fit", "val")}
        assert joined["fit"] + joined["val"] == 5, (kwargs, joined)
        for s in ("fit", "val"):
            assert joined[s] >= sum(side[(cls, a)] == s for cls, a, _ in copies), (kwargs, s, joined)


def test_a_label_files_patients_stay_on_one_side(synthetic_dir, tmp_path):
    index = tmp_path / "labels.csv"
    with open(index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "patient"])
        for split in ("train", "test"):
            for i, path in enumerate(sorted((synthetic_dir / split).rglob("*.*"))):
                writer.writerow([path, path.parent.name, split, f"{path.parent.name}-{i // 3}"])  # 3 images a patient
    dm = setup(make_dm(synthetic_dir, index=str(index)))
    patient = {}
    with open(index) as fh:
        for row in csv.DictReader(fh):
            patient[row["path"]] = row["patient"]
    fit = {patient[str(p)] for p in dm.datasets["train"].paths}
    val = {patient[str(p)] for p in dm.datasets["val"].paths}
    assert fit and val and not fit & val
    assert dm.split_groups["val"]["groups"] == len(val) < dm.split_groups["val"]["images"]


def test_drop_leaking_keeps_every_other_images_side_and_fold(synthetic_dir):
    """The generated set has 3 test images copied from train: dropping those train copies changes nobody else's
    side, for the hold-out and for every fold."""
    for kwargs in ({}, {"fold": 1}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keep = setup(make_dm(synthetic_dir, check_leakage=True, **kwargs))
            drop = setup(make_dm(synthetic_dir, check_leakage=True, drop_leaking=True, **kwargs))
        dropped = {p for p in [*keep.datasets["train"].paths, *keep.datasets["val"].paths]} - {
            p for p in [*drop.datasets["train"].paths, *drop.datasets["val"].paths]
        }
        assert len(dropped) == 3
        assert set(drop.datasets["val"].paths) == set(keep.datasets["val"].paths) - dropped
        assert set(drop.datasets["train"].paths) == set(keep.datasets["train"].paths) - dropped
