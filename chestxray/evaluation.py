"""One result type for every evaluation (trainer.test on each set, predict.py) and the report written from it.

An Evaluation holds only per-image probabilities with paths and labels; figures re-read the few images they show,
so a report costs the same memory for 66 images or 100,000.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure

from chestxray import reports
from chestxray.images import DEFAULT_LIMITS, BadImageError, ImageLimits, load_image, read_image

DISPLAY_SIDE = 256  # short side of gallery and Grad-CAM images, whatever the model's input size


@dataclass(frozen=True)
class ReportSettings:
    """conf/report: how much goes into a report."""

    bootstrap_resamples: int = 1000  # 0 turns the bootstrap intervals off
    seed: int = 0
    gallery_tiles: int = 24
    gradcam_tiles: int = 6
    limits: ImageLimits = DEFAULT_LIMITS  # the run's data.max_pixels / min_image_side, for re-reading images


@dataclass
class Evaluation:
    """Per-image results of one set: paths, labels (-1 unknown), probabilities, and which images leak."""

    name: str
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    probs: np.ndarray
    leaking: np.ndarray  # duplicates of a train image (near-duplicate or identical), per the leakage check

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    def select(self, mask: np.ndarray) -> Evaluation:
        keep = np.flatnonzero(mask)
        return Evaluation(
            self.name,
            self.classes,
            [self.paths[i] for i in keep],
            self.labels[keep],
            self.probs[keep],
            self.leaking[keep],
        )

    def metrics(self, settings: ReportSettings) -> dict | None:
        """All numbers of the labelled images, and again without the leaking ones when some leak; None if unlabelled."""
        labelled = self.select(self.labels >= 0)
        if not len(labelled.paths):
            return None
        result = reports.classification_metrics(
            labelled.labels, labelled.probs, self.classes, settings.bootstrap_resamples, settings.seed
        )
        result = {"name": self.name, **result, "leak_free": None, "leaking_images": []}
        if labelled.leaking.any():
            clean = labelled.select(~labelled.leaking)
            result["leaking_images"] = [
                str(p) for p, leak in zip(labelled.paths, labelled.leaking, strict=True) if leak
            ]
            result["leak_free"] = (
                reports.classification_metrics(
                    clean.labels, clean.probs, self.classes, settings.bootstrap_resamples, settings.seed
                )
                if len(clean.paths)
                else {"n": 0}  # every image duplicates a train image: no leak-free number exists
            )
        return result


def leak_free(metrics: dict) -> dict | None:
    """The leak-free metrics of a report: its own numbers when nothing leaks, None when everything does."""
    clean = metrics.get("leak_free")
    if clean is None:
        return metrics
    return clean if clean.get("n") else None


def display_image(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """The source image, upright RGB, scaled to a short side of DISPLAY_SIDE with its aspect ratio kept."""
    image = read_image(path, DISPLAY_SIDE, limits)
    scale = DISPLAY_SIDE / min(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def figures(evaluation: Evaluation, metrics: dict, settings: ReportSettings, model=None) -> dict[str, Figure]:
    """confusion_matrix, per_class, reliability, gallery (and gradcam_gallery with a model) of the labelled images."""
    ev = evaluation.select(evaluation.labels >= 0)
    preds = ev.preds
    confidence = ev.probs.max(1)
    chosen = reports.pick_gallery(preds.tolist(), ev.labels.tolist(), settings.gallery_tiles)
    result = {
        "confusion_matrix": reports.confusion_figure(metrics, evaluation.name),
        "per_class": reports.per_class_figure(metrics),
        "reliability": reports.reliability_figure(ev.labels, ev.probs, metrics),
        "gallery": reports.gallery_figure(
            [display_image(ev.paths[i], settings.limits) for i in chosen],
            preds[chosen].tolist(),
            ev.labels[chosen].tolist(),
            ev.classes,
            confidence[chosen].tolist(),
        ),
    }
    if model is not None and settings.gradcam_tiles:
        result["gradcam_gallery"] = gradcam_figure(ev, model, settings)
    return result


def gradcam_figure(ev: Evaluation, model, settings: ReportSettings) -> Figure:
    """Grad-CAM of a few images (every kind of mistake first), over the source images, with the colour scale."""
    from chestxray.saliency import gradcam_maps, overlay

    chosen = reports.pick_gallery(ev.preds.tolist(), ev.labels.tolist(), settings.gradcam_tiles)
    size, limits = model.hparams.image_size, settings.limits
    views = torch.from_numpy(np.stack([load_image(ev.paths[i], size, limits) for i in chosen]))
    maps = gradcam_maps(model, views, ev.preds[chosen].tolist())
    overlays = [overlay(display_image(ev.paths[i], limits), heat) for i, heat in zip(chosen, maps, strict=True)]
    return reports.gallery_figure(
        overlays,
        ev.preds[chosen].tolist(),
        ev.labels[chosen].tolist(),
        ev.classes,
        ev.probs.max(1)[chosen].tolist(),
        columns=3,
        colorbar="Grad-CAM: evidence for the predicted class",
    )


def prediction_fields(classes: Sequence[str]) -> list[str]:
    """predictions.csv's columns, the same in training's test reports and predict.py (which adds error)."""
    return ["path", "label", "pred", *[f"prob_{c}" for c in classes]]


def prediction_row(path: str | Path, label: str, classes: Sequence[str], probs: np.ndarray) -> dict[str, str]:
    """One image's row of predictions.csv: the predicted class and every class's probability."""
    row = {"path": str(path), "label": label, "pred": classes[int(probs.argmax())]}
    return row | {f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, probs, strict=True)}


def write_predictions(evaluation: Evaluation, path: Path) -> None:
    """Per image: path, label, pred, probabilities, leaking (what the sweep summary's paired test reads)."""
    classes = evaluation.classes
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*prediction_fields(classes), "leaking"])
        writer.writeheader()
        for p, y, probs, leak in zip(
            evaluation.paths, evaluation.labels, evaluation.probs, evaluation.leaking, strict=True
        ):
            writer.writerow(prediction_row(p, classes[y] if y >= 0 else "", classes, probs) | {"leaking": int(leak)})


def write_report(
    evaluation: Evaluation, out_dir: Path, settings: ReportSettings, model=None, predictions: bool = False
) -> tuple[dict | None, dict[str, np.ndarray]]:
    """metrics.json and the figures' PNGs in out_dir (and predictions.csv); returns the metrics and the figures'
    pixels (for TensorBoard)."""
    metrics = evaluation.metrics(settings)
    if metrics is None:
        return None, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if predictions:
        write_predictions(evaluation, out_dir / "predictions.csv")
    try:
        result = figures(evaluation, metrics, settings, model)
    except BadImageError as err:  # a file changed or vanished since it was predicted: the numbers still stand
        (out_dir / "figures_error.txt").write_text(f"figures not drawn: {err}\n")
        return metrics, {}
    return metrics, {name: reports.render(fig, out_dir / f"{name}.png") for name, fig in result.items()}


def _accuracy(m: dict | None) -> str:
    if not m:
        return f"{0:>6}  {'(every image leaks)':<22}"
    lo, hi = m["accuracy_ci95"]
    return f"{m['n']:>6}  {m['accuracy']:.3f} ({lo:.3f}-{hi:.3f}){'':<3}"


def side_by_side(results: dict[str, dict]) -> str:
    """One line per evaluated set: n and accuracy with its 95% interval, all images and leak-free, and the AUC."""
    lines = [f"{'set':<16}{'n':>6}  {'accuracy (95% CI)':<22}{'n':>6}  {'leak-free (95% CI)':<22}{'macro AUC':>10}"]
    for name, m in results.items():
        auc = m["macro_roc_auc_ovr"]
        auc_text = f"{auc:.3f}" if auc is not None else "n/a"
        lines.append(f"{name:<16}{_accuracy(m)}{_accuracy(leak_free(m))}{auc_text:>10}")
    return "\n".join(lines)
