"""Evaluation numbers and figures, shared by trainer.test and predict.py.

Figures are plain matplotlib `Figure` objects (no pyplot, so no global state and nothing to close), drawn once
by `render` into an image that is both saved as PNG and logged to TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.stats import binomtest, rankdata
from torchmetrics.functional.classification import (
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_specificity,
)

CALIBRATION_BINS = 10


def _macro_auc(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """One-vs-rest ROC-AUC from ranks (ties averaged), macro over classes: the Mann-Whitney form, fast to resample."""
    aucs = []
    for c in range(k):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        ranks = rankdata(probs[:, c])
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, k: int, resamples: int, seed: int) -> dict:
    """Percentile 95% intervals of macro ROC-AUC and per-class sensitivity over `resamples` seeded resamples.

    The rows are put in a canonical order first, so the same predictions give the same intervals whatever order they
    come in (a training run's test loader and predict.py list the files differently).
    """
    order = np.lexsort((*probs.T[::-1], labels))
    labels, probs = labels[order], probs[order]
    rng = np.random.default_rng(seed)
    n = len(labels)
    preds = probs.argmax(1)
    aucs, sens = [], []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        y = labels[pick]
        counts = np.bincount(y, minlength=k)
        hits = np.bincount(y[preds[pick] == y], minlength=k)
        sens.append(np.where(counts > 0, hits / np.maximum(counts, 1), np.nan))
        if (counts > 0).all():  # AUC needs every class present in the resample
            aucs.append(_macro_auc(y, probs[pick], k))
    sens_array = np.array(sens)

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[~np.isnan(values)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None

    return {
        "auc": interval(np.array(aucs)),
        "sensitivity": [interval(sens_array[:, c]) for c in range(k)],
    }


def classification_metrics(
    labels: Sequence[int], probs: np.ndarray, classes: Sequence[str], resamples: int = 1000, seed: int = 0
) -> dict:
    """Accuracy with a Wilson 95% interval, per-class sensitivity/specificity/precision/F1, ROC-AUC, ECE, loss.

    With resamples > 0, bootstrap 95% intervals for the macro ROC-AUC and each class's sensitivity.
    """
    y_np, p_np = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    y, p = torch.as_tensor(y_np), torch.as_tensor(p_np, dtype=torch.float32)
    n, k = len(y_np), len(classes)
    correct = int((p_np.argmax(1) == y_np).sum())
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    per_class_fns = {
        "sensitivity": multiclass_recall,
        "specificity": multiclass_specificity,
        "precision": multiclass_precision,
        "f1": multiclass_f1_score,
    }
    values = {name: fn(p, y, k, average=None).tolist() for name, fn in per_class_fns.items()}
    support = np.bincount(y_np, minlength=k).tolist()
    present = all(support)
    intervals = bootstrap_intervals(y_np, p_np, k, resamples, seed) if resamples > 0 else None
    per_class = {}
    for i, c in enumerate(classes):
        per_class[c] = {**{name: values[name][i] for name in per_class_fns}, "support": support[i]}
        if intervals:
            per_class[c]["sensitivity_ci95"] = intervals["sensitivity"][i]
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "accuracy_ci95": [ci.low, ci.high],
        "loss": float(-np.log(np.clip(p_np[np.arange(n), y_np], 1e-12, None)).mean()),
        "macro_roc_auc_ovr": float(multiclass_auroc(p, y, k, average="macro")) if present else None,
        "macro_roc_auc_ovr_ci95": intervals["auc"] if intervals and present else None,
        "bootstrap": {"resamples": resamples, "seed": seed} if intervals else None,
        "expected_calibration_error": float(multiclass_calibration_error(p, y, k, n_bins=CALIBRATION_BINS)),
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": multiclass_confusion_matrix(p, y, k).tolist(),
    }


def _interval(values: Sequence[float] | None) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "n/a"


def summary_text(metrics: dict) -> str:
    """The printed report: one screen, the numbers a reader checks first; leak-free numbers beside, if any."""
    clean = metrics.get("leak_free")
    columns = [("all", metrics)] + ([("leak-free", clean)] if clean and clean.get("n") else [])
    lines = ["leak-free: none (every image duplicates a train image)"] if clean and not clean.get("n") else []
    for label, m in columns:
        lo, hi = m["accuracy_ci95"]
        auc = m["macro_roc_auc_ovr"]
        auc_text = f"{auc:.3f} (95% CI {_interval(m.get('macro_roc_auc_ovr_ci95'))}, bootstrap)" if auc else "n/a"
        lines += [
            f"{label + ':':<11}accuracy {m['accuracy']:.3f} ({m['correct']}/{m['n']}), 95% CI {lo:.3f}-{hi:.3f} "
            f"(Wilson); macro ROC-AUC {auc_text}; ECE {m['expected_calibration_error']:.3f}; loss {m['loss']:.3f}"
        ]
    lines.append(f"{'class':<18}" + "".join(f"{'sens':>7}{'(95% CI)':>14}{'spec':>7}{'n':>5}" for _ in columns))
    for name in metrics["per_class"]:
        row = f"{name:<18}"
        for _, m in columns:
            c = m["per_class"][name]
            row += f"{c['sensitivity']:>7.3f}{_interval(c.get('sensitivity_ci95')):>14}{c['specificity']:>7.3f}"
            row += f"{c['support']:>5}"
        lines.append(row)
    width = max(len(c) for c in metrics["classes"]) + 2
    lines.append("confusion matrix, all images (rows: truth, columns: prediction)")
    lines.append(" " * width + "".join(f"{c[:10]:>12}" for c in metrics["classes"]))
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12}" for v in row))
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------------------


def confusion_figure(metrics: dict, title: str = "") -> Figure:
    """Counts and row-normalised rates side by side: the second shows sensitivity on the diagonal."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = metrics["classes"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, data, name, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], rates, "row-normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set(
            xticks=range(len(classes)),
            yticks=range(len(classes)),
            xticklabels=classes,
            yticklabels=classes,
            xlabel="predicted",
            ylabel="true",
            title=name,
        )
        for i in range(len(classes)):
            for j in range(len(classes)):
                dark = data[i, j] > data.max() / 2
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="white" if dark else "black")
    fig.suptitle(f"{title} accuracy {metrics['accuracy']:.3f} (n={metrics['n']})".strip())
    return fig


def per_class_figure(metrics: dict) -> Figure:
    names = list(metrics["per_class"])
    x = np.arange(len(names))
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for offset, key in ((-0.2, "sensitivity"), (0.2, "specificity")):
        values = [metrics["per_class"][c][key] for c in names]
        ax.bar(x + offset, values, width=0.4, label=key)
        if key == "sensitivity":
            cis = [metrics["per_class"][c].get("sensitivity_ci95") for c in names]
            if all(cis):
                low = [v - ci[0] for v, ci in zip(values, cis, strict=True)]
                high = [ci[1] - v for v, ci in zip(values, cis, strict=True)]
                ax.errorbar(x + offset, values, yerr=[low, high], fmt="none", ecolor="k", capsize=3, lw=1)
    # the numbers go under each class name: over the bars the sensitivity's error bar would cross them
    labels = [
        f"{c}\nsens {metrics['per_class'][c]['sensitivity']:.2f}\nspec {metrics['per_class'][c]['specificity']:.2f}"
        for c in names
    ]
    ax.set(xticks=x, xticklabels=labels, ylim=(0, 1.05), ylabel="rate", title="per-class sensitivity / specificity")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the plot, never over a bar
    return fig


def reliability_figure(labels: Sequence[int], probs: np.ndarray, metrics: dict) -> Figure:
    """Confidence of the predicted class against how often it is right, per confidence bin."""
    probs = np.asarray(probs)
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(labels)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(CALIBRATION_BINS)])
    count = np.bincount(which, minlength=CALIBRATION_BINS)
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centres, np.nan_to_num(acc), width=1 / CALIBRATION_BINS, edgecolor="k", alpha=0.7, label="accuracy")
    for c, a, m in zip(centres, acc, count, strict=True):
        if m:
            ax.text(c, min(a + 0.03, 1.02), str(m), ha="center", fontsize=7)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.08),
        xlabel="confidence (max probability)",
        ylabel="accuracy",
        title=f"reliability, ECE {metrics['expected_calibration_error']:.3f}",
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def pick_gallery(preds: Sequence[int], labels: Sequence[int | None], limit: int = 24) -> list[int]:
    """Tiles that cover every (truth, prediction) cell: mistakes of every kind and correct images of every class.

    Cells take turns, mistakes first, one tile per turn, until the grid is full; within a cell, images in order.
    """
    cells: dict[tuple, list[int]] = {}
    for i, (p, y) in enumerate(zip(preds, labels, strict=True)):
        truth = y if y is not None and y >= 0 else None
        cells.setdefault((truth, p), []).append(i)
    order = sorted(cells, key=lambda c: (c[0] is None or c[0] == c[1], -1 if c[0] is None else c[0], c[1]))
    chosen: list[int] = []
    turn = 0
    while len(chosen) < limit and any(turn < len(cells[c]) for c in order):
        chosen += [cells[c][turn] for c in order if turn < len(cells[c])][: limit - len(chosen)]
        turn += 1
    return chosen


def gallery_figure(
    images: Sequence[np.ndarray],
    preds: Sequence[int],
    labels: Sequence[int | None],
    classes: Sequence[str],
    confidences: Sequence[float] | None = None,
    columns: int = 6,
    colorbar: str | None = None,
) -> Figure:
    """The notebook's check as a grid: each image titled with its prediction and truth, mistakes in red.

    colorbar: a label for a jet colour scale from 0 to 1 (for Grad-CAM overlays).
    """
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    cols = min(columns, max(n, 1))
    fig = Figure(figsize=(2.5 * cols + (0.8 if colorbar else 0), 2.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for k, (ax, image, pred, label) in enumerate(zip(axes, images, preds, labels, strict=False)):
        ax.imshow(image, cmap="gray")
        known = label is not None and label >= 0
        wrong = known and pred != label
        confidence = f" {confidences[k]:.2f}" if confidences is not None else ""
        truth = f"\ntrue: {classes[label]}" if known else ""
        ax.set_title(f"pred: {classes[pred]}{confidence}{truth}", fontsize=8, color="red" if wrong else "black")
    if colorbar:
        mappable = ScalarMappable(Normalize(0, 1), cmap="jet")
        fig.colorbar(mappable, ax=list(axes), shrink=0.6, label=colorbar)
    return fig


def curves_figure(history: Sequence[dict], best_epoch: int | None) -> Figure:
    """The notebook's two panels: loss and accuracy per epoch, train and val; best epoch marked."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage in ("train", "val"):
            values = [h.get(f"{stage}/{metric}", np.nan) for h in history]
            ax.plot(epochs, values, marker="o", label=f"{stage}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=metric, title={"loss": "loss", "acc": "accuracy"}[metric])
        ax.grid(True, alpha=0.4)
        ax.legend()
    return fig


def samples_figure(images_by_class: dict[str, Sequence[np.ndarray]]) -> Figure:
    """A few training images per class, as the model sees them (after resizing and augmentation)."""
    per_class = max(len(v) for v in images_by_class.values())
    fig = Figure(figsize=(2.2 * per_class, 2.4 * len(images_by_class)), layout="constrained")
    axes = fig.subplots(len(images_by_class), per_class, squeeze=False)
    for row, (name, images) in enumerate(images_by_class.items()):
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(images):
                ax.imshow(images[col], cmap="gray")
                ax.set_title(name, fontsize=9)
    return fig


def render(fig: Figure, path=None, dpi: int = 100) -> np.ndarray:
    """Draw the figure once (Agg), save it as PNG if a path is given, and return its RGB pixels (H x W x 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    if path is not None:
        Image.fromarray(rgb).save(path)
    return rgb
