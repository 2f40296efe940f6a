"""Which train images fit the model and which pick the best epoch: a stratified hold-out or one of k folds, made of
groups that never straddle it.

A group is the images of one patient (a label file's patient column) and the near-duplicate copies the leakage check
finds within train (the real dataset's train folder holds exact copies: Normal 019 = 020, 093 = 094, ...): a copy on
each side would let val/acc, which picks the best epoch, fits the temperature and ranks sweeps, score an image the
model was trained on. The split is drawn over groups, stratified by each group's class (its most common label), with
scikit-learn's train_test_split and StratifiedKFold; with no group larger than one image it is the same split as
drawing over images. (scikit-learn's StratifiedGroupKFold gives k folds too, but not a hold-out of a given fraction,
and not the images' split when every group is one image.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from chestxray.data.sources import DataError


def group_ids(n: int, patients: Sequence[str | None] = (), pairs: Iterable[tuple[int, int]] = ()) -> np.ndarray:
    """One id per image, shared by the images of one patient and by near-duplicate pairs (transitively): the id of
    a group is its first image's position."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, patient in enumerate(patients):
        if patient is not None:
            join(first.setdefault(patient, i), i)
    for i, j in pairs:
        join(i, j)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def _units(labels: Sequence[int], groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids in order of their first image, each group's label, each image's group position)."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    ids, member = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(ids), labels.max() + 1 if len(labels) else 1), dtype=np.int64)
    np.add.at(counts, (member, labels), 1)  # images per group and class: O(images), for 100,000 images too
    unit_labels = counts.argmax(1)
    return ids, unit_labels, member


def _expand(chosen_units: np.ndarray, member: np.ndarray) -> np.ndarray:
    return np.sort(np.flatnonzero(np.isin(member, chosen_units)))


def holdout(
    labels: Sequence[int], fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (fit, val) positions; a fraction of train's groups held out for validation."""
    _, unit_labels, member = _units(labels, groups)
    try:
        fit, val = train_test_split(
            np.arange(len(unit_labels)), test_size=fraction, stratify=list(unit_labels), random_state=seed
        )
    except ValueError as err:
        raise DataError(
            f"data.val_fraction={fraction} cannot make a stratified hold-out of {len(unit_labels)} train image groups "
            f"over {len(set(unit_labels))} classes: {err}"
        ) from err
    return _expand(fit, member), _expand(val, member)


def kfold(
    labels: Sequence[int], folds: int, fold: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) positions of fold `fold` of `folds` stratified, seeded folds of groups: each image validates once."""
    if not 0 <= fold < folds:
        raise DataError(f"data.fold={fold} must be between 0 and data.folds-1={folds - 1}")
    if folds < 2:
        raise DataError(f"data.folds={folds}: k-fold needs at least 2 folds")
    _, unit_labels, member = _units(labels, groups)
    smallest = min(np.bincount(unit_labels))
    if smallest < folds:
        raise DataError(f"data.folds={folds} is more than the {smallest} train image groups of the smallest class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fit, val = list(splitter.split(np.zeros(len(unit_labels)), list(unit_labels)))[fold]
    return _expand(fit, member), _expand(val, member)
