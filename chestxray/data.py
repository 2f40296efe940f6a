"""The chest X-ray folders as a LightningDataModule: scan, decode once, split, load."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from chestxray.images import BadImageError, ImageCache, list_images

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("Normal", "Covid", "Viral Pneumonia")
KAGGLE_DATASET = "pranavraikokte/covid19-image-dataset"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """The data folder is missing or not laid out as DATA/{train,test}/<class>/ images."""


class BadFilesError(DataError):
    """Files that cannot be decoded, all listed at once (data.on_bad_file=error)."""

    def __init__(self, bad: Sequence[BadImageError]):
        self.bad = list(bad)
        lines = "\n".join(f"  {err.path}: {err.reason}" for err in self.bad)
        super().__init__(
            f"{len(self.bad)} unreadable image file(s) (data.on_bad_file=error):\n{lines}\n"
            "Fix or remove them, or pass data.on_bad_file=skip to train without them."
        )


def scan_split(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image paths and labels of one split, checking the folder layout first."""
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir} (expected {split_dir}/<class>/ for {list(classes)})")
    present = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for extra in sorted(present - set(classes)):
        warnings.warn(
            f"ignoring unexpected folder {split_dir / extra} (not one of data.classes={list(classes)})",
            stacklevel=2,
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(f"class folder not found: {class_dir} (data.classes={list(classes)})")
        files = list_images(class_dir)
        if not files:
            raise DataError(f"class folder has no .jpeg/.jpg/.png images: {class_dir}")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def handle_bad_files(bad: Sequence[BadImageError], on_bad_file: str, where: str) -> None:
    """Warn once per bad file and summarise (skip), or raise one error listing them all (error)."""
    if not bad:
        return
    if on_bad_file == "error":
        raise BadFilesError(bad)
    if on_bad_file != "skip":
        raise ValueError(f"data.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    for err in bad:
        warnings.warn(f"skipping unreadable image {err.path}: {err.reason}", stacklevel=2)
    warnings.warn(f"{where}: skipped {len(bad)} unreadable image file(s)", stacklevel=2)


def train_transform() -> v2.Transform:
    """Mild geometric and exposure jitter that keeps a chest X-ray plausible (no flips: the heart is on the left)."""
    return v2.Compose(
        [
            v2.RandomAffine(degrees=7, translate=(0.04, 0.04), scale=(0.95, 1.05)),
            v2.ColorJitter(brightness=0.15, contrast=0.15),
        ]
    )


class CachedImages(Dataset):
    """Decoded uint8 images in memory; normalisation happens in the model, on the model's device."""

    def __init__(self, paths: Sequence[Path], images: torch.Tensor, labels: Sequence[int], transform=None):
        self.paths = list(paths)
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], index


class ChestXrayDataModule(L.LightningDataModule):
    """DATA/{train,test}/<class>/ as train / val (stratified hold-out of train) / test loaders."""

    def __init__(
        self,
        data_dir: str,
        classes: Sequence[str] = DEFAULT_CLASSES,
        image_size: int = 224,
        val_fraction: float = 0.15,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        augment: bool = False,
        seed: int = 2022,
        on_bad_file: str = "skip",
        cache_dir: str | None = None,
        download: bool = True,
        check_leakage: bool = True,
        drop_leaking: bool = False,
        leakage_threshold: int = 40,
        report_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.classes = list(classes)
        self.datasets: dict[str, CachedImages] = {}
        self.skipped: list[BadImageError] = []

    # --- preparing ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Offer the Kaggle download when the data folder is missing; fail with instructions offline."""
        if self.data_dir.exists():
            return
        reason = "automatic download is off (data.download=false)"
        if self.hparams.download:
            try:
                self._download()
                return
            except Exception as err:  # noqa: BLE001 - any failure ends in the same instructions
                reason = f"automatic download from Kaggle failed: {type(err).__name__}: {err}"
        raise DataError(
            f"data folder not found: {self.data_dir}\n"
            f"  {reason}\n"
            f"  Get the 'Covid-19 Image Dataset' from {KAGGLE_URL} (or `kagglehub.dataset_download"
            f"('{KAGGLE_DATASET}')`),\n"
            "  unzip it so that DATA/train/<class>/ and DATA/test/<class>/ exist, and pass\n"
            "  data.data_dir=DATA (or set the CHESTXRAY_DATA environment variable)."
        )

    def _download(self) -> None:
        import kagglehub

        log.info("data folder %s not found: downloading %s with kagglehub", self.data_dir, KAGGLE_DATASET)
        root = Path(kagglehub.dataset_download(KAGGLE_DATASET))
        source = next((p for p in [root / "Covid19-dataset", root] if (p / "train").is_dir()), None)
        if source is None:
            raise DataError(f"downloaded {KAGGLE_DATASET} to {root} but found no train/ folder in it")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), self.data_dir, target_is_directory=True)
        log.info("linked %s -> %s", self.data_dir, source)

    # --- setting up ----------------------------------------------------------------------------------

    def _decode_split(self, split: str) -> tuple[list[Path], torch.Tensor, list[int]]:
        paths, labels = scan_split(self.data_dir / split, self.classes)
        decoded = ImageCache(self.hparams.image_size, self.hparams.cache_dir).decode_all(paths)
        handle_bad_files(decoded.bad, self.hparams.on_bad_file, f"{self.data_dir / split}")
        self.skipped += decoded.bad
        label_of = dict(zip(paths, labels, strict=True))
        good_labels = [label_of[p] for p in decoded.paths]
        for label, name in enumerate(self.classes):
            if label not in good_labels:
                raise DataError(f"no readable images left in {self.data_dir / split / name}")
        return decoded.paths, torch.from_numpy(decoded.images), good_labels

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.data_dir.is_dir():
            self.prepare_data()
        splits = {split: self._decode_split(split) for split in SPLITS}
        if self.hparams.check_leakage:
            splits["train"] = self._check_leakage(splits["train"], splits["test"])
        train_paths, train_images, train_labels = splits["train"]
        test_paths, test_images, test_labels = splits["test"]
        self.datasets["test"] = CachedImages(test_paths, test_images, test_labels)
        augment = train_transform() if self.hparams.augment else None
        if self.hparams.val_fraction <= 0:
            # The original notebook's protocol: the test folder also picks the best epoch (optimistic).
            self.datasets["train"] = CachedImages(train_paths, train_images, train_labels, augment)
            self.datasets["val"] = self.datasets["test"]
            return
        try:
            fit_idx, val_idx = train_test_split(
                np.arange(len(train_paths)),
                test_size=self.hparams.val_fraction,
                stratify=train_labels,
                random_state=self.hparams.seed,
            )
        except ValueError as err:
            raise DataError(
                f"data.val_fraction={self.hparams.val_fraction} cannot make a stratified hold-out of "
                f"{len(train_paths)} train images over {len(self.classes)} classes: {err}"
            ) from err
        fit_idx, val_idx = np.sort(fit_idx), np.sort(val_idx)

        def subset(idx: np.ndarray, transform=None) -> CachedImages:
            return CachedImages(
                [train_paths[i] for i in idx],
                train_images[torch.from_numpy(idx)],
                [train_labels[i] for i in idx],
                transform,
            )

        self.datasets["train"] = subset(fit_idx, augment)
        self.datasets["val"] = subset(val_idx)

    def _check_leakage(self, train, test):
        """Warn about (and optionally drop) train images that are near-duplicates of test images."""
        from chestxray.duplicates import cross_split_pairs, write_leakage_report

        train_paths, train_images, train_labels = train
        pairs = cross_split_pairs(train_paths, test[0], self.hparams.leakage_threshold)
        if not pairs:
            return train
        report_dir = self.hparams.report_dir if rank_zero_only.rank == 0 else None
        report = write_leakage_report(pairs, report_dir, self.hparams.leakage_threshold)
        leaking = {pair.train for pair in pairs}
        where = f" (report: {report})" if report else ""
        warnings.warn(
            f"{len(pairs)} train/test near-duplicate pair(s) ({len(leaking)} train images) found: the test "
            f"accuracy may be inflated by leakage{where}. Pass data.drop_leaking=true to drop them from train.",
            stacklevel=2,
        )
        if not self.hparams.drop_leaking:
            return train
        keep = [i for i, p in enumerate(train_paths) if p not in leaking]
        log.warning("data.drop_leaking=true: dropping %d leaking train image(s)", len(train_paths) - len(keep))
        return (
            [train_paths[i] for i in keep],
            train_images[torch.as_tensor(keep, dtype=torch.long)],
            [train_labels[i] for i in keep],
        )

    # --- loading --------------------------------------------------------------------------------------

    def _pin_memory(self) -> bool:
        if self.hparams.pin_memory is not None:
            return bool(self.hparams.pin_memory)
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        sampler = None
        if not shuffle and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each val/test image exactly once across ranks (Lightning's default sampler pads with repeats).
            sampler = UnrepeatedDistributedSampler(self.datasets[split], shuffle=False)
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=bool(self.hparams.persistent_workers and workers > 0),
            pin_memory=self._pin_memory(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
