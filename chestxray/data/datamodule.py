"""The chest X-ray data as a LightningDataModule: find, decode once, check for leakage, split, load."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from chestxray.data import dicom, duplicates
from chestxray.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, BadImageError, ImageLimits
from chestxray.data.sources import DEFAULT_CLASSES, SPLITS, LabelledFiles, ensure_dataset, load_labelled, load_splits
from chestxray.data.splits import group_ids, holdout, kfold
from chestxray.data.store import DecodedImages, DecodeSettings, ImageArray, choose_store, decode_images
from chestxray.errors import ConfigError, DataError
from chestxray.runtime.distributed import world_size
from chestxray.runtime.parallel import available_cpus, cap_to_cores

log = logging.getLogger(__name__)


__all__ = ["DEFAULT_CLASSES", "SPLITS", "BadFilesError", "ChestXrayDataModule", "DataError", "ImageDataset"]


class BadFilesError(DataError):
    """Files that cannot be decoded, all listed at once (data.on_bad_file=error)."""

    def __init__(self, bad: Sequence[BadImageError]):
        self.bad = list(bad)
        lines = "\n".join(f"  {err.path}: {err.reason}" for err in self.bad)
        super().__init__(
            f"{len(self.bad)} unreadable image file(s) (data.on_bad_file=error):\n{lines}\n"
            "Fix or remove them, or pass data.on_bad_file=skip to train without them."
        )


def handle_bad_files(bad: Sequence[BadImageError], on_bad_file: str, where: str) -> None:
    """Warn once per bad file and summarise (skip), or raise one error listing them all (error)."""
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"data.on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    if not bad:
        return
    if on_bad_file == "error":
        raise BadFilesError(bad)
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


def patient_of(path: Path, listed: str | None) -> str | None:
    """Whose image this is, for grouping only: a label file's patient column, else a DICOM file's PatientID as an
    opaque key (chestxray.data.dicom.patient_key: the ID never leaves it; DICOM by content, whatever the name);
    None for other files."""
    return listed if listed is not None else dicom.patient_key(path)


def patients_of(paths: Sequence[Path], source: LabelledFiles) -> list[str | None]:
    """patient_of for each decoded file of a set, with its label file's patient column where it has one."""
    listed = dict(zip(source.paths, source.patients, strict=False))
    return [patient_of(p, listed.get(p)) for p in paths]


def split_size(positions: np.ndarray | None, groups: np.ndarray) -> dict[str, int]:
    """The images and groups of one side of the split (none for val_fraction=0)."""
    if positions is None:
        return {"images": 0, "groups": 0}
    return {"images": len(positions), "groups": len(np.unique(groups[positions]))}


class ImageDataset(Dataset):
    """Decoded uint8 images with labels; an item is (image 3 x S x S, label, position in this dataset, leaking),
    where leaking says the image duplicates a train image (test and evaluation sets; False elsewhere).

    Normalisation happens in the model, on the model's device.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        images: ImageArray,
        labels: Sequence[int],
        transform=None,
        leaking: np.ndarray | None = None,
    ):
        self.paths = list(paths)
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.leaking = torch.zeros(len(self.paths), dtype=torch.bool) if leaking is None else torch.as_tensor(leaking)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        image = torch.from_numpy(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], index, self.leaking[index]

    def subset(self, positions: np.ndarray, transform=None) -> ImageDataset:
        return ImageDataset(
            [self.paths[i] for i in positions], self.images.subset(positions), self.labels[positions], transform
        )


class ChestXrayDataModule(L.LightningDataModule):
    """DATA/{train,test}/<class>/ (or a label file) as train / val / test loaders, plus extra evaluation sets."""

    def __init__(
        self,
        data_dir: str,
        classes: Sequence[str] = DEFAULT_CLASSES,
        index: str | None = None,
        image_size: int = 224,
        val_fraction: float = 0.15,
        folds: int = 5,
        fold: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | None = None,
        augment: bool = False,
        seed: int = 2022,
        on_bad_file: str = "skip",
        store: str = "auto",
        cache_dir: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_image_side: int = DEFAULT_MIN_SIDE,
        preprocess: str = "none",
        lateral: str = "flag",
        download: bool = True,
        check_leakage: bool = True,
        drop_leaking: bool = False,
        leakage_threshold: int = duplicates.DEFAULT_THRESHOLD,
        eval_sets: Mapping[str, str] | None = None,
        report_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.index = Path(index) if index else None
        self.classes = list(classes)
        self.eval_sets = dict(eval_sets or {})
        for name in self.eval_sets:
            if name == "test" or "/" in name:
                raise DataError(f"eval_sets.{name}: the name must not be 'test' or contain '/'")
        limits = ImageLimits(int(max_pixels), int(min_image_side), preprocess, str(lateral))
        self.settings = DecodeSettings(int(image_size), limits)
        self.datasets: dict[str, ImageDataset] = {}  # train, val
        self.test_sets: dict[str, ImageDataset] = {}  # test, then each evaluation set
        self.leaking: dict[str, np.ndarray] = {}  # per test set: images that duplicate a train image or its patient
        self.shared_with_test: dict[str, int] = {}  # per evaluation set: images the test folder has too
        self.split_groups: dict[str, dict[str, int]] = {}  # fit and val: images and groups (the test report says)
        self.skipped: list[BadImageError] = []
        self._warned_workers = False
        self._listed: dict[str, LabelledFiles] | None = None

    # --- preparing: once per machine --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Offer the Kaggle download when the data is missing; build the on-disk stores (once per machine)."""
        if self.datasets:  # set up already (trainer.test after fit prepares again): the stores exist
            return
        self._ensure_data()
        sources = self._sources()
        if self._store_mode(sources) == "disk":
            for name, files in sources.items():
                decoded = self._decode(name, files, "disk")
                if self.hparams.check_leakage:  # hashed once here, read from the store by every rank
                    duplicates.hash_decoded(decoded, self.settings.limits)

    def _ensure_data(self) -> None:
        if self.index is None:
            ensure_dataset(self.data_dir, self.hparams.download)

    def _sources(self) -> dict[str, LabelledFiles]:
        """train, test and every evaluation set, as labelled files (nothing decoded yet), listed once."""
        if self._listed is None:
            self._listed = load_splits(self.data_dir, self.index, self.classes)
            for name, source in self.eval_sets.items():
                self._listed[name] = load_labelled(source, self.classes, f"eval_sets.{name}")
        return self._listed

    def _store_mode(self, sources: Mapping[str, LabelledFiles]) -> str:
        """data.store resolved: auto goes to disk for large sets and for several processes on one machine."""
        processes = int(self.trainer.num_devices) if self.trainer is not None else 1
        count = sum(len(f) for f in sources.values())
        return choose_store(self.hparams.store, count, self.settings.image_size, processes)

    def _decode(self, name: str, files: LabelledFiles, mode: str) -> DecodedImages:
        return decode_images(
            files.paths,
            self.settings,
            mode,
            self.hparams.cache_dir,
            progress=rank_zero_only.rank == 0,
            what=f"{name} ({files.where})",
        )

    # --- setting up: in every process -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._ensure_data()
        sources = self._sources()
        mode = self._store_mode(sources)
        sets = {name: self._readable(name, files, mode) for name, files in sources.items()}
        dropped, pairs = self._check_leakage(sets) if self.hparams.check_leakage else (np.zeros(0, np.int64), [])
        patients = {name: patients_of(decoded.paths, sources[name]) for name, (decoded, _) in sets.items()}
        for name, (decoded, labels) in sets.items():
            if name != "train":
                shared = self._mark_shared_patients(name, patients[name], patients["train"])
                self.leaking[name] = self.leaking.get(name, np.zeros(len(labels), bool)) | shared
                self.test_sets[name] = ImageDataset(decoded.paths, decoded.images, labels, leaking=self.leaking[name])
        decoded, labels = sets["train"]
        train = ImageDataset(decoded.paths, decoded.images, labels)
        groups = group_ids(len(labels), patients["train"], pairs)
        fit, val = self._split(labels, groups)
        # data.drop_leaking: the split is drawn over every train image first, so the other images keep their side
        # (and fold) whether the leaking copies are dropped or not: drop and no-drop runs validate on the same images
        fit, val = np.setdiff1d(fit, dropped), None if val is None else np.setdiff1d(val, dropped)
        self.split_groups = {"fit": split_size(fit, groups), "val": split_size(val, groups)}
        augment = train_transform() if self.hparams.augment else None
        self.datasets["train"] = train.subset(fit, augment)
        self.datasets["val"] = self.test_sets["test"] if val is None else train.subset(val)
        self._check_a_batch_trains(len(fit))

    def _check_a_batch_trains(self, fit: int) -> None:
        """Training drops the last incomplete batch (a batch of one breaks batch statistics and skews the epoch's
        mean): a batch larger than each process's share of the fit split would train no step, and Lightning would
        go on to test the untrained weights. Refused here, once the split is known."""
        share, size = -(-fit // world_size()), int(self.hparams.batch_size)  # the sampler pads each share up
        if share < size:
            per = f" ({world_size()} processes: {share} each)" if world_size() > 1 else ""
            raise ConfigError(
                f"data.batch_size={size}: more than the {fit} images of the fit split{per}; the incomplete last batch "
                f"is dropped, so no step would train: set data.batch_size to {max(share, 1)} or less"
            )

    @staticmethod
    def _mark_shared_patients(name: str, patients: list[str | None], train: list[str | None]) -> np.ndarray:
        """Which images of a test set are of a patient with train images: they leak as a shared image does (the
        model has seen that patient's chest), so the leak-free numbers leave them out, whatever data.drop_leaking
        says (it drops copies, not patients). One line with the counts; never the patients."""
        known = {p for p in train if p is not None}
        shared = np.array([p is not None and p in known for p in patients], dtype=bool)
        if shared.any():
            count = len({p for p, s in zip(patients, shared, strict=True) if s})
            warnings.warn(
                f"{name}: {int(shared.sum())} of its {len(patients)} images are of {count} patient(s) who also have "
                "train images: counted as leaking (left out of the leak-free numbers)",
                stacklevel=3,
            )
        return shared

    def _readable(self, name: str, files: LabelledFiles, mode: str) -> tuple[DecodedImages, list[int]]:
        """Decoded images of a set and the labels of its readable files; bad files reported per the setting."""
        decoded = self._decode(name, files, mode)
        handle_bad_files(decoded.bad, self.hparams.on_bad_file, files.where)
        self.skipped += decoded.bad
        label_of = dict(zip(files.paths, files.labels, strict=True))
        labels = [label_of[p] for p in decoded.paths]
        if name in SPLITS:
            for label, class_name in enumerate(self.classes):
                if label not in labels:
                    raise DataError(f"no readable images of class {class_name} left in {files.where}")
        elif not labels:
            raise DataError(f"eval_sets.{name}={files.where}: none of its {len(files)} image(s) could be read")
        return decoded, labels

    def _split(self, labels: Sequence[int], groups: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(fit, val) positions in train, whole groups on each side; val None: the test folder validates."""
        hp = self.hparams
        if hp.fold is not None:
            return kfold(labels, hp.folds, hp.fold, hp.seed, groups)
        if hp.val_fraction <= 0:
            # The original notebook's protocol: the test folder also picks the best epoch (optimistic).
            return np.arange(len(labels)), None
        return holdout(labels, hp.val_fraction, hp.seed, groups)

    def _check_leakage(self, sets: dict) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Mark test-set images that duplicate train images and warn; (the positions in train of the train copies
        data.drop_leaking=true drops, the near-duplicate pairs within train that the split keeps together)."""
        train, _ = sets["train"]
        others = {name: decoded for name, (decoded, _) in sets.items() if name != "train"}
        leaks = duplicates.find_leaks(train, others, self.hparams.leakage_threshold, self.settings.limits)
        drop = self.hparams.drop_leaking
        for name, decoded in others.items():  # with the train copies dropped, nothing leaks any more
            self.leaking[name] = leaks.mask(name, decoded.paths) & (not drop)
        self.shared_with_test = leaks.shared_with_test
        for name, count in leaks.shared_with_test.items():
            if count:
                warnings.warn(
                    f"evaluation set {name} shares {count} of its {len(others[name].paths)} images with the test "
                    "folder (identical or near-duplicate): its numbers are not those of another set",
                    stacklevel=2,
                )
        if not leaks.train:
            return np.zeros(0, np.int64), leaks.within_train
        report_dir = self.hparams.report_dir if rank_zero_only.rank == 0 else None
        report = duplicates.write_leakage_report(leaks.pairs, report_dir, self.hparams.leakage_threshold)
        warnings.warn(leaks.warning(report), stacklevel=2)
        if not drop:
            return np.zeros(0, np.int64), leaks.within_train
        dropped = np.array([i for i, p in enumerate(train.paths) if p in leaks.train], dtype=np.int64)
        log.warning("data.drop_leaking=true: dropping %d leaking train image(s)", len(dropped))
        return dropped, leaks.within_train

    # --- loading -------------------------------------------------------------------------------------------------

    def _on_cuda(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _num_workers(self) -> int:
        """auto: none on CPU (the images are decoded already; workers would take cores from the model), 4 on CUDA.
        Never more than the cores this process may use: more workers only thrash."""
        workers = self.hparams.num_workers
        if workers == "auto":
            return min(4, available_cpus()) if self._on_cuda() else 0
        count, capped = cap_to_cores("data.num_workers", int(workers))
        if capped and not self._warned_workers:  # once, not per loader
            self._warned_workers = True
            warnings.warn(capped, stacklevel=2)
        return count

    def _loader(self, dataset: ImageDataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        sampler = None
        if not shuffle and world_size() > 1:
            # Each val/test image exactly once across ranks (Lightning's default sampler pads with repeats).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        workers = self._num_workers()
        pin = self.hparams.pin_memory
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_cuda() if pin is None else bool(pin),
        )

    def _eval_batch_size(self) -> int:
        """null: 64 on CUDA; 8 on CPU, where small evaluation batches are fastest (see benchmarks/)."""
        size = self.hparams.eval_batch_size
        return int(size) if size else (64 if self._on_cuda() else 8)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self._eval_batch_size(), shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        """The test folder first, then each evaluation set, in the order of `test_sets`."""
        return [self._loader(d, self._eval_batch_size(), shuffle=False) for d in self.test_sets.values()]
