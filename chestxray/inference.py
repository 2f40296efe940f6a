"""predict.py's work: find inputs, decode them in DataLoader workers, predict batch by batch, stream the rows.

Memory does not grow with the number of inputs: images live only in the loader's few batches in flight, rows
are appended to predictions.csv as each batch finishes (a stopped run leaves the rows it finished), only the
per-image probabilities are kept for the report, and the report's figures re-read the few images they show.
"""

from __future__ import annotations

import csv
import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from chestxray import reports
from chestxray.checkpoints import CheckpointError, check_same_preprocessing, load_checkpoint
from chestxray.console import tidy_lightning_output
from chestxray.distributed import all_gather, gather_by_index
from chestxray.evaluation import (
    Evaluation,
    ReportSettings,
    display_image,
    prediction_fields,
    prediction_row,
    write_report,
)
from chestxray.export import Probabilities
from chestxray.images import (
    DEFAULT_LIMITS,
    BadImageError,
    ImageLimits,
    is_image_file,
    list_images,
    load_image,
)
from chestxray.model import ChestXrayClassifier
from chestxray.store import default_workers

log = logging.getLogger(__name__)


class PredictError(RuntimeError):
    """A reason predict.py cannot produce any prediction (exit status 2)."""


@dataclass
class InputImage:
    path: Path
    label: int | None  # from a parent folder named like a class, else None


def find_inputs(inputs: str | Sequence[str], classes: Sequence[str]) -> list[InputImage]:
    """Files, folders (recursive) and globs; ground truth from the nearest parent folder named like a class."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    found: list[Path] = []
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found += list_images(path, recursive=True)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found += [p for p in matches if p.is_file() and is_image_file(p)]
            found += [f for p in matches if p.is_dir() for f in list_images(p, recursive=True)]
    unique = list(dict.fromkeys(found))
    class_index = {c: i for i, c in enumerate(classes)}
    return [
        InputImage(p, next((class_index[q.name] for q in p.parents if q.name in class_index), None)) for p in unique
    ]


class FileDataset(Dataset):
    """Decodes one file per item, in the DataLoader's workers: (image, position, error); a bad file gives zeros."""

    def __init__(self, paths: Sequence[Path], image_size: int, limits: ImageLimits):
        self.paths, self.image_size, self.limits = list(paths), image_size, limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, str]:
        path = self.paths[position]
        try:
            return torch.from_numpy(load_image(path, self.image_size, self.limits)), position, ""
        except BadImageError as err:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), position, err.reason


class Ensemble(L.LightningModule):
    """The average of the members' class probabilities (one member: that checkpoint's own probabilities)."""

    def __init__(self, members: Sequence[ChestXrayClassifier]):
        super().__init__()
        self.net = Probabilities(members)  # the same module the ONNX export traces

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def csv_row(item: InputImage, classes: Sequence[str], probs: np.ndarray | None, error: str) -> dict:
    label = classes[item.label] if item.label is not None else ""
    if probs is not None and not error:
        return prediction_row(item.path, label, classes, probs)
    return {"path": str(item.path), "label": label, "error": error or "not predicted"}


class PredictionWriter(BasePredictionWriter):
    """Appends each finished batch's rows to the CSV (flushed), keeps the probabilities, writes Grad-CAM overlays."""

    def __init__(
        self,
        out_dir: Path,
        inputs: Sequence[InputImage],
        classes: Sequence[str],
        gradcam_models=None,
        limits: ImageLimits = DEFAULT_LIMITS,
    ):
        super().__init__("batch")
        self.out_dir, self.inputs, self.classes = out_dir, list(inputs), list(classes)
        self.gradcam_models, self.limits = gradcam_models, limits
        self.overlay_names: set[str] = set()
        self.fields = [*prediction_fields(classes), "error"]
        self.positions: list[int] = []
        self.probs: list[np.ndarray] = []
        self.errors: dict[int, str] = {}
        self.csv_path: Path | None = None
        self._fh = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f".predictions.rank{trainer.global_rank}.csv"
        self.csv_path = self.out_dir / name
        self._fh = open(self.csv_path, "w", newline="")  # noqa: SIM115 - closed in on_predict_end or at exit
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields)
        self._writer.writeheader()
        self._fh.flush()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        probs = prediction.float().cpu().numpy()
        positions = batch[1].tolist()
        errors = list(batch[2])
        for position, p, error in zip(positions, probs, errors, strict=True):
            self._writer.writerow(csv_row(self.inputs[position], self.classes, p, error))
            if error:
                self.errors[position] = error
                log.warning("cannot predict %s: %s", self.inputs[position].path, error)
            else:
                self.positions.append(position)
                self.probs.append(p)
        self._fh.flush()
        if self.gradcam_models is not None:
            good = [k for k, e in enumerate(errors) if not e]
            paths = [self.inputs[positions[k]].path for k in good]
            names = [self._overlay_name(p) for p in paths]
            write_gradcam(
                self.out_dir / "gradcam", self.gradcam_models, batch[0][good], paths, names, probs[good], self
            )

    def _overlay_name(self, path: Path) -> str:
        """<class folder>_<file stem>.png, made unique (test/x.jpg and train/x.jpg, x.jpg and x.png)."""
        name, k = f"{path.parent.name}_{path.stem}", 1
        while name + ("" if k == 1 else f"_{k}") in self.overlay_names:
            k += 1
        name += "" if k == 1 else f"_{k}"
        self.overlay_names.add(name)
        return f"{name}.png"

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fh.close()

    def results(self) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """(positions, probabilities, errors) of every rank, each image once: every rank must call it."""
        probs = torch.from_numpy(np.array(self.probs, dtype=np.float32).reshape(-1, len(self.classes)))
        gathered = gather_by_index([(torch.tensor(self.positions, dtype=torch.long), probs)])
        positions, probs = (t.numpy() for t in gathered) if gathered else (np.zeros(0, int), probs.numpy())
        return positions, probs, _gather_errors(self.errors)

    def evaluation(self, positions: np.ndarray, probs: np.ndarray) -> Evaluation:
        """The predicted images as an Evaluation (labels from class-named folders; nothing known to leak)."""
        chosen = [self.inputs[i] for i in positions]
        labels = np.array([-1 if i.label is None else i.label for i in chosen], dtype=np.int64)
        return Evaluation(
            "predict",
            self.classes,
            [i.path for i in chosen],
            labels,
            probs.astype(np.float64),
            np.zeros(len(chosen), bool),
        )


def write_gradcam(folder: Path, models, images: torch.Tensor, paths, names, probs: np.ndarray, writer) -> None:
    """One overlay PNG per image over the source at a readable size; a file that cannot be re-read is skipped."""
    import cv2

    from chestxray.saliency import gradcam_maps, overlay

    if not len(paths):
        return
    folder.mkdir(parents=True, exist_ok=True)
    preds = probs.argmax(1).tolist()
    maps = np.mean([gradcam_maps(m, images, preds) for m in models], axis=0)
    for path, name, heat, pred, p in zip(paths, names, maps, preds, probs, strict=True):
        try:
            image = overlay(display_image(path, writer.limits), heat, f"{writer.classes[pred]} {p[pred]:.2f}")
        except BadImageError as err:  # changed or gone since it was predicted: its row stands, its overlay cannot
            log.warning("no Grad-CAM overlay for %s: %s", path, err.reason)
            continue
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _listed(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple | ListConfig) else [str(value)]


def load_members(cfg: DictConfig) -> tuple[list[str], list[ChestXrayClassifier]]:
    paths = _listed(cfg.ckpt)
    try:
        models = [load_checkpoint(p) for p in paths]
        check_same_preprocessing(models, paths)
    except CheckpointError as err:
        raise PredictError(str(err)) from None
    return paths, models


def required(cfg: DictConfig, key: str, what: str) -> None:
    if OmegaConf.is_missing(cfg, key):
        raise PredictError(f"{key}= is required: {what}")


def predict(cfg: DictConfig) -> dict:
    """Run predict.py's job; returns counts. Raises PredictError when nothing can be predicted."""
    tidy_lightning_output()
    required(cfg, "ckpt", "the checkpoint of a training run, e.g. ckpt=outputs/train/runs/<time>/checkpoints/best.ckpt")
    required(cfg, "inputs", "an image, a folder, a glob or a list of these, e.g. inputs=scan.png")
    paths, models = load_members(cfg)
    classes, image_size = models[0].classes, models[0].hparams.image_size
    inputs = find_inputs(_listed(cfg.inputs), classes)
    if not inputs:
        raise PredictError(f"no .jpeg/.jpg/.png image found in inputs={cfg.inputs}")
    out = Path(cfg.output_dir)
    predictor = runtime_module(cfg, paths, models, inputs)
    writer = PredictionWriter(out, inputs, classes, models if cfg.gradcam else None, limits_of(cfg))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer], enable_progress_bar=False)
    trainer.predict(predictor, dataloaders=file_loader(cfg, inputs, image_size), return_predictions=False)
    positions, probs, errors = writer.results()
    if not trainer.is_global_zero:
        return {}
    if trainer.world_size > 1:
        merge_parts(out, inputs)
    if not len(positions):
        raise PredictError(f"none of the {len(inputs)} input image(s) could be read (see the warnings above)")
    evaluation = writer.evaluation(positions, probs)
    settings = ReportSettings(**OmegaConf.to_container(cfg.report), limits=limits_of(cfg))
    metrics, _ = write_report(evaluation, out, settings)
    show(evaluation, metrics, cfg.print_limit)
    return {"predicted": len(positions), "errors": len(errors), "output_dir": str(out), "metrics": metrics}


def limits_of(cfg: DictConfig) -> ImageLimits:
    return ImageLimits(cfg.max_pixels, cfg.min_image_side, prefix="")


def file_loader(cfg: DictConfig, inputs: Sequence[InputImage], image_size: int) -> DataLoader:
    """Batches of decoded files; num_workers=auto decodes in one worker process per core but one."""
    workers = default_workers() - 1 if cfg.num_workers == "auto" else int(cfg.num_workers)
    dataset = FileDataset([i.path for i in inputs], image_size, limits_of(cfg))
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=max(0, workers))


def runtime_module(
    cfg: DictConfig, paths: Sequence[str], models: Sequence[ChestXrayClassifier], inputs
) -> L.LightningModule:
    """The module Trainer.predict runs: the torch ensemble, or its ONNX Runtime session (runtime=onnx)."""
    if cfg.runtime == "torch":
        return Ensemble(models)
    if cfg.runtime in ("onnx", "onnx-int8"):
        from chestxray.export import OnnxPredictor

        # int8 calibrates on the first images to predict (or calibration=FOLDER of python -m chestxray.export)
        return OnnxPredictor.from_checkpoints(paths, models, cfg.runtime, [i.path for i in inputs])
    raise PredictError(f"runtime={cfg.runtime}: must be torch, onnx or onnx-int8")


def _gather_errors(errors: dict[int, str]) -> dict[int, str]:
    return {k: v for part in all_gather(errors) for k, v in part.items()}


def merge_parts(out: Path, inputs: Sequence[InputImage]) -> None:
    """DDP: the ranks' part files as one predictions.csv in input order, each image once."""
    order = {str(item.path): i for i, item in enumerate(inputs)}
    rows: dict[str, dict] = {}
    parts = sorted(out.glob(".predictions.rank*.csv"))
    fields = None
    for part in parts:
        with open(part, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames
            rows.update({row["path"]: row for row in reader})
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(sorted(rows.values(), key=lambda r: order[r["path"]]))
    for part in parts:
        part.unlink()


def show(evaluation: Evaluation, metrics: dict | None, limit: int) -> None:
    """Each image's answer when there are few, the report when labels are known."""
    if len(evaluation.paths) <= limit:
        for path, p in zip(evaluation.paths, evaluation.probs, strict=True):
            ranked = ", ".join(f"{c} {v:.3f}" for c, v in zip(evaluation.classes, p, strict=True))
            print(f"{path}: {evaluation.classes[int(p.argmax())]}  ({ranked})")
    if metrics:
        print(reports.summary_text(metrics))
