"""Which train images fit the model and which pick the best epoch: a stratified hold-out or one of k folds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from chestxray.data.sources import DataError


def holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (fit, val) positions; fraction of train held out for validation."""
    try:
        fit, val = train_test_split(
            np.arange(len(labels)), test_size=fraction, stratify=list(labels), random_state=seed
        )
    except ValueError as err:
        raise DataError(
            f"data.val_fraction={fraction} cannot make a stratified hold-out of {len(labels)} train images "
            f"over {len(set(labels))} classes: {err}"
        ) from err
    return np.sort(fit), np.sort(val)


def kfold(labels: Sequence[int], folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) positions of fold `fold` of `folds` stratified, seeded folds: each image validates exactly once."""
    if not 0 <= fold < folds:
        raise DataError(f"data.fold={fold} must be between 0 and data.folds-1={folds - 1}")
    if folds < 2:
        raise DataError(f"data.folds={folds}: k-fold needs at least 2 folds")
    smallest = min(np.bincount(np.asarray(labels)))
    if smallest < folds:
        raise DataError(f"data.folds={folds} is more than the {smallest} train images of the smallest class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fit, val = list(splitter.split(np.zeros(len(labels)), list(labels)))[fold]
    return np.sort(fit), np.sort(val)
