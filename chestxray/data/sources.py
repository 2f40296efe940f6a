"""Where images come from: class folders (DATA/<split>/<class>/), a label file (data.index=FILE), or predict.py's
inputs (files, folders, globs).

A label file is a CSV in UTF-8 with a header and the columns `path,label[,split]`, as the large public sets ship
them. A path is relative to the file's folder and must stay inside it (no `..` out of it), or absolute. Each image is
listed once: a path listed twice with the same label and split is counted once (with a warning), with different
ones it is an error naming both lines. Class folders and label files give the same LabelledFiles, so everything
downstream (decoding, bad files, splits, leakage, reports) is one code path.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chestxray.data.images import is_image_file, list_images
from chestxray.errors import DataError, require

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DEFAULT_CLASSES = ("Normal", "Covid", "Viral Pneumonia")
_SHOWN = 10  # how many offending lines an error lists

__all__ = ["DEFAULT_CLASSES", "SPLITS", "DataError", "InputImage", "LabelledFiles", "find_inputs", "load_labelled"]


@dataclass
class LabelledFiles:
    """Image files with their class index, and where they came from (for messages)."""

    paths: list[Path]
    labels: list[int]
    where: str
    # a label file's optional patient column: images of one patient stay on one side of every split. Read for
    # grouping only: never written to any output.
    patients: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def scan_class_folders(
    folder: Path,
    classes: Sequence[str],
    setting: str = "data.data_dir",
    strict: bool = False,
    missing_ok: bool = False,
) -> LabelledFiles:
    """folder/<class>/ images for each class, checking the layout first.

    strict (an evaluation set): the class folders must be exactly the model's classes. Otherwise an extra folder
    is a warning and a missing class an error, unless missing_ok (the audit: a hospital's images need not hold every
    class), where at least one class folder must be there and a folder that is no class is an error.
    """
    if not folder.is_dir():
        raise DataError(f"split folder not found: {folder} (expected {folder}/<class>/ for {list(classes)}; {setting})")
    present = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if strict and present != set(classes):
        raise DataError(
            f"{setting}={folder}: its class folders {sorted(present)} differ from the model's classes "
            f"{list(classes)}; rename the folders (or use a label file with the model's class names)"
        )
    if missing_ok and not present & set(classes):
        raise DataError(
            f"{setting}={folder}: no class folder in it (expected folders named like some of {list(classes)}, or "
            "train/ and test/ holding them)"
        )
    extras = sorted(present - set(classes))
    if missing_ok and extras:  # some classes may be missing: a misnamed class folder must not pass for one
        raise DataError(
            f"{setting}={folder}: its folder {extras[0]}/ is not one of the classes {list(classes)}; rename it "
            "(or move it out)"
        )
    for extra in extras:
        warnings.warn(f"ignoring unexpected folder {folder / extra} (not one of {list(classes)})", stacklevel=2)
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if missing_ok and name not in present:
            continue
        if not class_dir.is_dir():
            raise DataError(f"class folder not found: {class_dir} (classes: {list(classes)})")
        files = list_images(class_dir)
        if not files:
            raise DataError(f"class folder has no JPEG, PNG, TIFF or DICOM images: {class_dir}")
        paths += files
        labels += [label] * len(files)
    return LabelledFiles(paths, labels, str(folder))


def _listed(lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return "\n".join(f"  {line}" for line in lines[:_SHOWN]) + more


def text_table(index: Path, setting: str, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header's columns and each row with the line it starts on; one error naming a line that is not UTF-8.
    Label files (CSV) and a site's MANIFEST.tsv are read here alike."""
    raw = index.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write, is fine
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{setting}={index}: line {line} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
            "save the label file as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip() for c in reader.fieldnames or []]
    rows = []
    start = reader.line_num + 1  # a quoted field may span lines: a row is named by the line it starts on
    for row in reader:
        rows.append((start, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
        start = reader.line_num + 1
    return columns, rows


def _inside(path: str) -> bool:
    """A relative path that does not climb out of the label file's folder."""
    return os.path.normpath(path).split(os.sep)[0] != os.pardir


def read_index(index: Path, classes: Sequence[str], setting: str = "data.index") -> dict[str | None, LabelledFiles]:
    """A label file's rows grouped by split (None when it has no split column); every problem in one error."""
    if not index.is_file():
        raise DataError(f"{setting}={index}: file not found")
    columns, rows = text_table(index, setting)
    if not {"path", "label"} <= set(columns):
        raise DataError(
            f"{setting}={index}: needs a header with the columns path,label[,split][,patient]; found {columns}"
        )
    has_split = "split" in columns
    has_patient = "patient" in columns
    class_index = {c: i for i, c in enumerate(classes)}
    unknown, missing, bad_split, outside, conflicts = [], [], [], [], []
    first: dict[str, tuple[int, str, str | None]] = {}  # real path -> (line, label, split) of its first row
    repeated = 0
    groups: dict[str | None, LabelledFiles] = {}
    for line, row in rows:
        given = row["path"]
        path = Path(given) if os.path.isabs(given) else index.parent / given
        split = (row.get("split") or None) if has_split else None
        if row["label"] not in class_index:
            unknown.append(f"line {line}: {row['label']!r}")
        elif has_split and split not in SPLITS:
            bad_split.append(f"line {line}: split {row['split']!r}" if row.get("split") else f"line {line}: no split")
        elif not os.path.isabs(given) and not _inside(given):
            outside.append(f"line {line}: {given}")
        elif not path.is_file():
            missing.append(f"line {line}: {path}")
        else:
            key = os.path.realpath(path)
            if key in first:
                line0, label0, split0 = first[key]
                if (label0, split0) != (row["label"], split):
                    conflicts.append(
                        f"lines {line0} and {line}: {given} is {label0}{f' ({split0})' if split0 else ''} and "
                        f"{row['label']}{f' ({split})' if split else ''}"
                    )
                repeated += 1
                continue
            first[key] = (line, row["label"], split)
            group = groups.setdefault(split, LabelledFiles([], [], f"{index}" + (f" (split={split})" if split else "")))
            group.paths.append(path)
            group.labels.append(class_index[row["label"]])
            group.patients.append((row.get("patient") or "").strip() or None if has_patient else None)
    if unknown:
        raise DataError(f"{setting}={index}: labels that are not one of {list(classes)}:\n{_listed(unknown)}")
    if bad_split:
        raise DataError(f"{setting}={index}: the split column must be one of {list(SPLITS)}:\n{_listed(bad_split)}")
    if outside:
        raise DataError(
            f"{setting}={index}: relative paths must stay inside the label file's folder (use an absolute path for "
            f"files elsewhere):\n{_listed(outside)}"
        )
    if missing:
        raise DataError(f"{setting}={index}: {len(missing)} listed file(s) do not exist:\n{_listed(missing)}")
    if conflicts:
        raise DataError(
            f"{setting}={index}: images listed twice with different labels or splits:\n{_listed(conflicts)}"
        )
    if repeated:
        warnings.warn(
            f"{setting}={index}: {repeated} row(s) repeat an image already listed: each counted once", stacklevel=2
        )
    for group in groups.values():  # the order of class folders: the split does not depend on the rows' order
        order = sorted(range(len(group)), key=lambda i: (group.labels[i], str(group.paths[i])))
        group.paths, group.labels = [group.paths[i] for i in order], [group.labels[i] for i in order]
        group.patients = [group.patients[i] for i in order]
    return groups


def load_splits(data_dir: Path, index: Path | None, classes: Sequence[str]) -> dict[str, LabelledFiles]:
    """Train and test, from the label file when there is one (read once), else from DATA/<split>/<class>/."""
    if index is None:
        return {split: scan_class_folders(data_dir / split, classes) for split in SPLITS}
    groups = read_index(index, classes)
    if None in groups:
        raise DataError(
            f"data.index={index}: line 1 (the header) has no split column: training needs path,label,split with "
            "split train or test on every row"
        )
    for split in SPLITS:
        if split not in groups:
            raise DataError(f"data.index={index}: no rows with split={split}")
        _check_every_class(groups[split], classes)
    return {split: groups[split] for split in SPLITS}


def load_labelled(source: str | Path, classes: Sequence[str], setting: str) -> LabelledFiles:
    """A whole labelled set: a folder of class folders, or a label file (its split column, if any, ignored)."""
    source = Path(source)
    if source.is_file() or source.suffix.lower() == ".csv":
        groups = read_index(source, classes, setting)
        files = LabelledFiles([], [], str(source))
        for group in groups.values():
            files.paths += group.paths
            files.labels += group.labels
        if not files.paths:
            raise DataError(f"{setting}={source}: no rows")
        return files
    return scan_class_folders(source, classes, setting, strict=True)


@dataclass(frozen=True)
class TrainingData:
    """What a checkpoint's run trained on, for the commands that must not count those images as new: the leak-free
    numbers (robustness), a site's copies of training images and the images mixed into fine-tuning (adapt.py), int8
    calibration (ONNX)."""

    train: LabelledFiles | None  # None: not known here, `note` says why
    threshold: int  # data.leakage_threshold: bits within which two perceptual hashes are one image
    cleared: frozenset[str]  # real paths of images whose train copies the run dropped (data.drop_leaking=true)
    note: str  # where they come from, or why they are not known


def saved_training_data(settings: Mapping | None, where: str) -> TrainingData:
    """The train images named by the data settings a run saved in its checkpoint (the LightningDataModule's
    hyper-parameters, which travel with the checkpoint and its adapted copies), listed as training lists them (class
    folders or data.index). A run with data.drop_leaking=true dropped its train copies of its own test and
    evaluation images: those are `cleared`. Not known (train None, with the reason) for a checkpoint without data
    settings or a dataset not there any more; `where` names the checkpoint in that reason."""
    from chestxray.data.duplicates import DEFAULT_THRESHOLD

    if not settings or not settings.get("classes") or not (settings.get("data_dir") or settings.get("index")):
        note = f"{where} saved no data settings, so its train images are not known"
        return TrainingData(None, DEFAULT_THRESHOLD, frozenset(), note)
    threshold = int(settings.get("leakage_threshold") or DEFAULT_THRESHOLD)
    classes, data_dir, index = list(settings["classes"]), settings.get("data_dir"), settings.get("index")
    try:
        files = load_splits(Path(str(data_dir or ".")), Path(str(index)) if index else None, classes)
    except (DataError, OSError) as err:
        named = f"data.index={index}" if index else f"data.data_dir={data_dir}"
        note = f"the train images of {where}, {named}, cannot be listed here: {err}"
        if not Path(str(index or data_dir)).is_absolute():
            note += " (a relative path: run this from the folder train.py ran in)"
        return TrainingData(None, threshold, frozenset(), note)
    note = f"compared with the {len(files['train'])} train images of {index or data_dir}"
    cleared: set[str] = set()
    if settings.get("drop_leaking"):
        cleared = {os.path.realpath(p) for p in files["test"].paths}
        for name, source in (settings.get("eval_sets") or {}).items():
            try:
                cleared |= {os.path.realpath(p) for p in load_labelled(str(source), classes, f"eval_sets.{name}").paths}
            except (DataError, OSError):
                continue  # an evaluation set no longer there: its images are compared like any others
        note += " (data.drop_leaking=true: its own test and evaluation images leak no more)"
    return TrainingData(files["train"], threshold, frozenset(cleared), note)


def _check_every_class(files: LabelledFiles, classes: Sequence[str]) -> None:
    counts = Counter(files.labels)
    empty = [name for label, name in enumerate(classes) if not counts[label]]
    if empty:
        raise DataError(f"{files.where}: no images of class {', '.join(empty)}")


KAGGLE_DATASET = "pranavraikokte/covid19-image-dataset"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"


def ensure_dataset(data_dir: Path, download: bool) -> None:
    """Offer the Kaggle download (kagglehub) when the data folder is missing; stop with instructions offline."""
    if data_dir.exists():
        return
    reason = "automatic download is off (data.download=false)"
    if download:
        try:
            _download(data_dir)
            return
        except Exception as err:  # noqa: BLE001 - any failure ends in the same instructions
            reason = f"automatic download from Kaggle failed: {type(err).__name__}: {err}"
    raise DataError(
        f"data folder not found: {data_dir}\n"
        f"  {reason}\n"
        f"  Get the 'Covid-19 Image Dataset' from {KAGGLE_URL} (or `kagglehub.dataset_download"
        f"('{KAGGLE_DATASET}')`),\n"
        "  unzip it so that DATA/train/<class>/ and DATA/test/<class>/ exist, and pass\n"
        "  data.data_dir=DATA (or set the CHESTXRAY_DATA environment variable)."
    )


def _download(data_dir: Path) -> None:
    kagglehub = require("kagglehub", "kaggle", "the automatic download (data.download=true)")

    log.info("data folder %s not found: downloading %s with kagglehub", data_dir, KAGGLE_DATASET)
    root = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    source = next((p for p in [root / "Covid19-dataset", root] if (p / "train").is_dir()), None)
    if source is None:
        raise DataError(f"downloaded {KAGGLE_DATASET} to {root} but found no train/ folder in it")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), data_dir, target_is_directory=True)
    log.info("linked %s -> %s", data_dir, source)


# --- predict.py's inputs -----------------------------------------------------------------------------------------


@dataclass
class InputImage:
    path: Path
    label: int | None  # from a parent folder named like a class (inside the input's folder), else None


def find_inputs(inputs: str | Sequence[str], classes: Sequence[str]) -> list[InputImage]:
    """Files, folders (recursive) and globs, each image once however often and however it is named (a relative and
    an absolute spelling, a `..` detour, its folder as well); ground truth from the nearest parent folder named like
    a class, inside the folder given (a glob's leading folder without wildcards, a named file's own folder)."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    found: list[tuple[Path, Path]] = []  # (image, the folder its label may come from, at most)
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found += [(f, path) for f in list_images(path, recursive=True)]
        elif path.is_file():
            found.append((path, path.parent))
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            root = _glob_root(item)
            found += [(p, root) for p in matches if p.is_file() and is_image_file(p)]
            found += [(f, root) for p in matches if p.is_dir() for f in list_images(p, recursive=True)]
    class_index = {c: i for i, c in enumerate(classes)}
    unique: dict[str, InputImage] = {}
    conflicting: set[str] = set()
    for p, scope in found:
        key, label = os.path.realpath(p), _label(p, scope, class_index)
        if key not in unique:
            unique[key] = InputImage(p, label)
        elif label is not None and unique[key].label not in (None, label):  # a link from one class folder into another
            conflicting.add(key)
        elif unique[key].label is None:  # the label either naming gives, whatever the order of the inputs
            unique[key] = InputImage(unique[key].path, label)
    for key in conflicting:
        log.warning("%s is in two class folders (by a link): left unlabelled", unique[key].path)
        unique[key] = InputImage(unique[key].path, None)
    if len(unique) < len(found):
        log.warning(
            "%d input(s) named an image already listed (the same file by another path): each predicted once",
            len(found) - len(unique),
        )
    return list(unique.values())


def _glob_root(pattern: str) -> Path:
    """The folder a glob searches from: its leading parts without wildcards (test/Covid for test/Covid/**/*.png), so
    that a glob's files are labelled as the files of that folder are."""
    parts = Path(pattern).parts
    fixed = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def _label(path: Path, scope: Path, class_index: dict[str, int]) -> int | None:
    """The class of the nearest folder named like one, from the image's folder up to `scope` (the folder the user
    gave, or a named file's own folder), never above it: a folder of unsorted images kept somewhere under a
    folder named Covid is not labelled Covid."""
    for folder in path.parents:
        if folder.name in class_index:
            return class_index[folder.name]
        if folder == scope:
            return None
    return None
