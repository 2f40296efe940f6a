"""predict.py's work: decode the inputs in DataLoader workers, predict batch by batch, stream the rows, report.

Memory does not grow with the number of inputs: images live only in the loader's few batches in flight, rows
are appended to predictions.csv as each batch finishes (flushed, so a killed run leaves every finished row whole),
only the per-image probabilities are kept for the report, and the report's figures re-read the few images they
show. Unreadable files become error rows without a forward pass.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from chestxray import settings
from chestxray.data.images import BadImageError, ImageLimits, ImageTags, image_tags, load_image
from chestxray.data.sources import InputImage, find_inputs
from chestxray.errors import PredictError
from chestxray.evaluation.report import (
    FLAG_TEXT,
    Evaluation,
    ReportSettings,
    Uncertainty,
    prediction_fields,
    prediction_row,
    summary_text,
    write_report,
)
from chestxray.evaluation.saliency import write_overlays
from chestxray.models import selection
from chestxray.models.checkpoints import load_models, preprocess_of
from chestxray.models.classifier import ChestXrayClassifier, Ensemble, Predictor
from chestxray.runtime.console import say, tidy_lightning_output
from chestxray.runtime.distributed import all_gather, gather_by_index
from chestxray.runtime.files import atomic_write, probe_writable
from chestxray.runtime.folders import claim
from chestxray.runtime.parallel import available_cpus, cap_to_cores

log = logging.getLogger(__name__)


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


def csv_row(
    item: InputImage,
    classes: Sequence[str],
    probs: np.ndarray | None,
    error: str,
    ood_score: float | None = None,
    in_set: np.ndarray | None = None,
    tags: ImageTags | None = None,
    confidence: float | None = None,
    accepted: bool | None = None,
) -> dict:
    """predictions.csv's row of one input; tags (modality, view) read from the file's header when not given."""
    label = classes[item.label] if item.label is not None else ""
    if probs is not None and not error:
        return prediction_row(item.path, label, classes, probs, ood_score, in_set, tags, confidence, accepted)
    return prediction_row(item.path, label, classes, None, tags=tags) | {"error": error or "not predicted"}


class PredictionWriter(BasePredictionWriter):
    """Appends each finished batch's rows to the CSV (flushed), keeps the probabilities, writes Grad-CAM overlays."""

    def __init__(
        self,
        out_dir: Path,
        inputs: Sequence[InputImage],
        classes: Sequence[str],
        limits: ImageLimits,
        gradcam_models=None,
        models: Sequence[ChestXrayClassifier] = (),
    ):
        super().__init__("batch")
        # the prediction sets of an ensemble exist when every member has a conformal fit
        self.models = list(models)
        self.with_sets = bool(self.models) and all(bool(m.conformal.fitted) for m in self.models)
        self.ood_scores: list[float] = []
        self.gates: list[float] = []  # the confidence's gate (chestxray.models.ood.margins)
        self.sets: list[np.ndarray] = []
        self.uncertainty: Uncertainty | None = None  # set by results()
        self.out_dir, self.inputs, self.classes = out_dir, list(inputs), list(classes)
        self.gradcam_models, self.limits = gradcam_models, limits
        self.overlay_names: set[str] = set()
        self.fields = [*prediction_fields(classes), "error"]
        self.positions: list[int] = []
        self.probs: list[np.ndarray] = []
        self.errors: dict[int, str] = {}
        self.lateral: list[int] = []  # positions of DICOM side views (flagged in the CSV and the printout)
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
        good_positions, (probs, ood_scores, sets, gates), errors = prediction
        positions = good_positions.tolist()
        probs_of = dict(zip(positions, probs.float().cpu().numpy(), strict=True))
        ood_of = dict(zip(positions, ood_scores.double().cpu().numpy(), strict=True))
        sets_of = dict(zip(positions, sets.bool().cpu().numpy(), strict=True))
        gates = gates.double().cpu().numpy()
        gate_of = dict(zip(positions, gates, strict=True))
        chosen = self._selection(probs.float().cpu().numpy(), ood_scores.double().cpu().numpy(), gates)
        confidence_of = dict(zip(positions, chosen.confidence if chosen else [None] * len(positions), strict=True))
        accepted = chosen.accepted if chosen and chosen.accepted is not None else [None] * len(positions)
        accepted_of = dict(zip(positions, accepted, strict=True))
        for position, error in zip(batch[1].tolist(), errors, strict=True):
            p, score = probs_of.get(position), ood_of.get(position)
            in_set = sets_of.get(position) if self.with_sets else None
            extra = {"confidence": confidence_of.get(position), "accepted": accepted_of.get(position)}
            # the header's modality and view, read again here: the batch carries pixels only (Predictor's contract)
            tags = image_tags(self.inputs[position].path)
            if tags.lateral and not error:
                self.lateral.append(position)
            self._writer.writerow(csv_row(self.inputs[position], self.classes, p, error, score, in_set, tags, **extra))
            if error:
                self.errors[position] = error
                log.warning("cannot predict %s: %s", self.inputs[position].path, error)
            else:
                self.positions.append(position)
                self.probs.append(p)
                self.ood_scores.append(score)
                self.gates.append(gate_of[position])
                self.sets.append(sets_of[position])
        self._fh.flush()  # every finished row on disk: a kill -9 or an out-of-memory kill loses none
        if self.gradcam_models is not None and probs_of:
            good = [k for k, e in enumerate(errors) if not e]
            paths = [self.inputs[p].path for p in probs_of]
            names = [self._overlay_name(p) for p in paths]
            write_overlays(
                self.out_dir / "gradcam",
                self.gradcam_models,
                batch[0][good],
                paths,
                names,
                np.stack(list(probs_of.values())),
                self.classes,
                self.limits,
            )

    def _selection(self, probs: np.ndarray, ood_scores: np.ndarray, gates: np.ndarray) -> selection.Selection | None:
        """Each answer's confidence and acceptance (chestxray.models.selection); None without the models."""
        return selection.select(self.models, probs, ood_scores, gates) if self.models and len(probs) else None

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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._fh is not None:  # a stopped run: the finished rows are on disk already; close the file cleanly
            self._fh.close()

    def results(self) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """(positions, probabilities, errors) of every rank, each image once: every rank must call it. The
        out-of-distribution scores and prediction sets, in the same order, are kept in self.uncertainty."""
        k = len(self.classes)
        probs = torch.from_numpy(np.array(self.probs, dtype=np.float32).reshape(-1, k))
        scores = torch.tensor(self.ood_scores, dtype=torch.float64)
        gates = torch.tensor(self.gates, dtype=torch.float64)
        sets = torch.from_numpy(np.array(self.sets, dtype=bool).reshape(-1, k))
        gathered = gather_by_index([(torch.tensor(self.positions, dtype=torch.long), probs, scores, sets, gates)])
        if gathered:
            positions, probs, scores, sets, gates = (t.numpy() for t in gathered)
        else:
            positions = np.zeros(0, int)
            probs, scores, sets, gates = probs.numpy(), scores.numpy(), sets.numpy(), gates.numpy()
        chosen = self._selection(probs, scores, gates)
        self.uncertainty = Uncertainty.of(list(self.models), scores, sets, chosen) if self.models else None
        errors = {k: v for part in all_gather(self.errors) for k, v in part.items()}
        self.lateral = sorted({k for part in all_gather(self.lateral) for k in part})
        return positions, probs, errors

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
            uncertainty=self.uncertainty,
        )


def _listed(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple | ListConfig) else [str(value)]


def required(cfg: DictConfig, key: str, what: str) -> None:
    if OmegaConf.is_missing(cfg, key):
        raise PredictError(f"{key}= is required: {what}")


def check_output_dir(folder: str | os.PathLike) -> Path:
    """predict.py's output folder, writable, before any model is loaded."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise PredictError(f"output_dir={path}: is a file, not a folder")
    if rank_zero_only.rank == 0 and (path / "predictions.csv").exists():  # two runs never write into one folder
        raise PredictError(f"output_dir={path}: holds the predictions of another run; pick another folder")
    try:
        probe_writable(path)
    except OSError as err:
        raise PredictError(f"output_dir={path}: cannot write there ({err.strerror or err})") from None
    return path


def limits_of(cfg: DictConfig) -> ImageLimits:
    return ImageLimits(cfg.data.max_pixels, cfg.data.min_image_side, lateral=cfg.data.get("lateral", "flag"))


def predict(cfg: DictConfig) -> dict:
    """Run predict.py's job; returns counts. A UserError (PredictError, CheckpointError...) when it cannot."""
    tidy_lightning_output()
    required(cfg, "ckpt", "the checkpoint of a training run, e.g. ckpt=outputs/train/runs/<time>/checkpoints/best.ckpt")
    required(cfg, "inputs", "an image, a folder, a glob or a list of these, e.g. inputs=scan.png")
    settings.check(cfg, settings.PREDICT_RULES)
    settings.check_predict_overrides(settings.hydra_overrides())
    out = check_output_dir(cfg.output_dir)
    if out.resolve() == Path(cfg.paths.output_dir).resolve():  # the run folder: run_entry_point holds it
        return _predict(cfg, out)
    with claim(out, resuming=True, setting="output_dir"):  # a folder given by hand: no two runs write in it at once
        return _predict(cfg, out)


def _predict(cfg: DictConfig, out: Path) -> dict:
    paths = _listed(cfg.ckpt)
    models = load_models(paths)
    classes, image_size = models[0].classes, models[0].hparams.image_size
    inputs = find_inputs(_listed(cfg.inputs), classes)
    if not inputs:
        raise PredictError(f"no JPEG, PNG, TIFF or DICOM image found in inputs={cfg.inputs}")
    limits = replace(limits_of(cfg), preprocess=preprocess_of(models[0]))  # the checkpoint's, as in training
    predictor = runtime_module(cfg, paths, models)
    writer = PredictionWriter(out, inputs, classes, limits, models if cfg.gradcam else None, models)
    trainer: L.Trainer = instantiate(
        cfg.trainer, precision=cfg.precision, logger=False, callbacks=[writer], enable_progress_bar=False
    )
    loader = file_loader(cfg, inputs, image_size, trainer, limits)
    trainer.predict(predictor, dataloaders=loader, return_predictions=False)
    positions, probs, errors = writer.results()
    if not trainer.is_global_zero:
        return {}
    if trainer.world_size > 1:
        merge_parts(out, inputs)
    if not len(positions):
        raise PredictError(f"none of the {len(inputs)} input image(s) could be read (see the warnings above)")
    evaluation = writer.evaluation(positions, probs)
    report_settings = ReportSettings(**OmegaConf.to_container(cfg.report), limits=limits)
    report, _ = write_report(evaluation, out, report_settings, models)
    if report is None:
        report_unlabelled(evaluation, out)
    show(evaluation, report, cfg.print_limit, {str(inputs[i].path) for i in writer.lateral})
    if str(cfg.precision) not in ("32", "32-true") and cfg.runtime == "torch":
        say(
            f"precision={cfg.precision}: these probabilities come from {cfg.precision} autocast, not the fp32 of the "
            "training run's test report (they differ in the second or third decimal)"
        )
    return {"predicted": len(positions), "errors": len(errors), "output_dir": str(out), "metrics": report}


def report_unlabelled(evaluation: Evaluation, out: Path) -> None:
    """No labels, no accuracy: metrics.json holds what needs none (the share flagged and the folder-level alarm),
    and the alarm is printed."""
    if evaluation.uncertainty is None:
        return
    numbers = evaluation.uncertainty.numbers(np.zeros(0, np.int64))
    atomic_write(out / "metrics.json", json.dumps({"name": evaluation.name, "n": 0, "uncertainty": numbers}, indent=2))
    if numbers.get("shift_alarm"):
        say(numbers["shift_alarm"]["text"])


def file_loader(
    cfg: DictConfig, inputs: Sequence[InputImage], image_size: int, trainer: L.Trainer, limits: ImageLimits
) -> DataLoader:
    """Batches of decoded files, decoded in decode_workers processes (auto: one per core but one), in batches of
    data.eval_batch_size (null: 8 on CPU, 64 on CUDA, as training's evaluation)."""
    workers, capped = cap_to_cores(
        "decode_workers", available_cpus() - 1 if cfg.decode_workers == "auto" else int(cfg.decode_workers)
    )
    if capped:
        log.warning(capped)
    on_cuda = isinstance(trainer.accelerator, CUDAAccelerator)
    batch_size = cfg.data.eval_batch_size or (64 if on_cuda else 8)
    dataset = FileDataset([i.path for i in inputs], image_size, limits)
    return DataLoader(dataset, batch_size=batch_size, num_workers=max(0, workers))


def runtime_module(cfg: DictConfig, paths: Sequence[str], models: Sequence[ChestXrayClassifier]) -> Predictor:
    """The module Trainer.predict runs: the torch ensemble, or its ONNX Runtime session (runtime=onnx)."""
    if cfg.runtime == "torch":
        return Ensemble(models)
    from chestxray.inference.onnx import OnnxPredictor

    if cfg.runtime == "onnx-int8" and any(bool(m.ood.fitted) for m in models):
        log.warning(
            "runtime=onnx-int8: ood_score and in_distribution come from int8 features against the fp32 threshold: "
            "near the checkpoint's own score, not equal to it (docs/benchmarks.md: the flag differed for 2 of 66 "
            "test images); use runtime=onnx or torch where the flag matters"
        )
    # int8: calibrated once at export, on calibration=FOLDER or the checkpoint's own train images, never on the inputs
    named = calibration_images(cfg.get("calibration"), models[0].classes)
    predictor = OnnxPredictor.from_checkpoints(paths, models, cfg.runtime, named)
    if cfg.runtime == "onnx-int8":
        say(f"runtime=onnx-int8: quantised when exported, calibrated on {predictor.calibration}")
    return predictor


def calibration_images(calibration: str | None, classes: Sequence[str]) -> list[Path] | str | None:
    """calibration=: None (the export there, or the train images for a new one), train (the checkpoint's train
    images, quantised again if named ones calibrated the export), or a folder of images (refused when it has none)."""
    from chestxray.inference.onnx import TRAIN_CALIBRATION

    if not calibration or str(calibration) == TRAIN_CALIBRATION:
        return str(calibration) if calibration else None
    named = [i.path for i in find_inputs(str(calibration), classes)]
    if not named:
        raise PredictError(f"calibration={calibration}: no image found there")
    return named


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


LATERAL_MARK = "  [lateral view: the model was trained on frontal (PA/AP) views]"


def show(evaluation: Evaluation, report: dict | None, limit: int, lateral: set[str] = frozenset()) -> None:
    """The first `limit` answers (and how many more the CSV holds), the report when labels are known: on stdout and in
    predict.log.
    Side views (lateral, DICOM ViewPosition) are marked on their line, and counted when the lines are not shown."""
    extra = evaluation.uncertainty
    shown_count = min(len(evaluation.paths), limit)
    if shown_count and extra is not None and extra.sets is not None:
        say(
            f"set {{...}}: the {100 * extra.coverage:.0f}% prediction set, the classes that hold the true one "
            f"{100 * extra.coverage:.0f} times in 100 on images like the validation images"
        )
    for k in range(shown_count):
        path, p = evaluation.paths[k], evaluation.probs[k]
        ranked = ", ".join(f"{c} {v:.3f}" for c, v in zip(evaluation.classes, p, strict=True))
        line = f"{path}: {evaluation.classes[int(p.argmax())]}  ({ranked})"
        if extra is not None and extra.sets is not None:
            members = [c for c, s in zip(evaluation.classes, extra.sets[k], strict=True) if s]
            line += "  set {" + ", ".join(members) + "}"
        if extra is not None and extra.ood_scores[k] > 0:
            line += f"  [{FLAG_TEXT}]"
        if extra is not None and extra.confidence is not None:
            line += f"  confidence {extra.confidence[k]:.3f}"
            if extra.accepted is not None:
                line += ", accepted" if extra.accepted[k] else ", not accepted"
        say(line + (LATERAL_MARK if str(path) in lateral else ""))
    if len(evaluation.paths) > shown_count:
        say(f"... and {len(evaluation.paths) - shown_count} more answer(s) in predictions.csv (print_limit={limit})")
    if lateral:
        say(
            f"{len(lateral)} lateral view(s) predicted (view column of predictions.csv; data.lateral=refuse skips "
            "them): the model was trained on frontal views"
        )
    if report:
        say(summary_text(report))
