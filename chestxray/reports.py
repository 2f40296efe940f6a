"""Evaluation numbers and figures, shared by trainer.test and predict.py."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.stats import binomtest  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_specificity,
)

CALIBRATION_BINS = 10


def classification_metrics(labels: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy with a Wilson 95% interval, per-class sensitivity/specificity/precision/F1, ROC-AUC, ECE."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    n, k = len(y), len(classes)
    correct = int((p.argmax(1) == y).sum())
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    per_class_fns = {
        "sensitivity": multiclass_recall,
        "specificity": multiclass_specificity,
        "precision": multiclass_precision,
        "f1": multiclass_f1_score,
    }
    per_class_values = {name: fn(p, y, k, average=None).tolist() for name, fn in per_class_fns.items()}
    support = torch.bincount(y, minlength=k).tolist()
    per_class = {
        c: {**{name: per_class_values[name][i] for name in per_class_fns}, "support": support[i]}
        for i, c in enumerate(classes)
    }
    present = len(set(y.tolist())) == k
    auc = float(multiclass_auroc(p, y, k, average="macro")) if present else None
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "accuracy_ci95": [ci.low, ci.high],
        "macro_roc_auc_ovr": auc,
        "expected_calibration_error": float(multiclass_calibration_error(p, y, k, n_bins=CALIBRATION_BINS)),
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": multiclass_confusion_matrix(p, y, k).tolist(),
    }


def summary_text(metrics: dict) -> str:
    """The printed report: one screen, the numbers a reader checks first."""
    lo, hi = metrics["accuracy_ci95"]
    auc = metrics["macro_roc_auc_ovr"]
    lines = [
        f"accuracy {metrics['accuracy']:.3f} ({metrics['correct']}/{metrics['n']}), 95% CI {lo:.3f}-{hi:.3f} (Wilson)",
        f"macro ROC-AUC (one-vs-rest) {auc:.3f}" if auc is not None else "macro ROC-AUC: n/a (a class is absent)",
        f"expected calibration error {metrics['expected_calibration_error']:.3f}",
        f"{'class':<18}{'sens':>7}{'spec':>7}{'prec':>7}{'F1':>7}{'n':>5}",
    ]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:<18}{m['sensitivity']:>7.3f}{m['specificity']:>7.3f}{m['precision']:>7.3f}"
            f"{m['f1']:>7.3f}{m['support']:>5}"
        )
    width = max(len(c) for c in metrics["classes"]) + 2
    lines.append("confusion matrix (rows: truth, columns: prediction)")
    lines.append(" " * width + "".join(f"{c[:10]:>12}" for c in metrics["classes"]))
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12}" for v in row))
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------------


def confusion_figure(metrics: dict) -> Figure:
    """Counts and row-normalised rates side by side: the second shows sensitivity on the diagonal."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = metrics["classes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for ax, data, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], rates, "row-normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set(
            xticks=range(len(classes)),
            yticks=range(len(classes)),
            xticklabels=classes,
            yticklabels=classes,
            xlabel="predicted",
            ylabel="true",
            title=title,
        )
        for i in range(len(classes)):
            for j in range(len(classes)):
                dark = data[i, j] > data.max() / 2
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="white" if dark else "black")
    fig.suptitle(f"accuracy {metrics['accuracy']:.3f} (n={metrics['n']})")
    return fig


def per_class_figure(metrics: dict) -> Figure:
    names = list(metrics["per_class"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    for offset, key in ((-0.2, "sensitivity"), (0.2, "specificity")):
        values = [metrics["per_class"][c][key] for c in names]
        bars = ax.bar(x + offset, values, width=0.4, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1.1), ylabel="rate", title="per-class sensitivity / specificity")
    ax.legend(loc="lower right")
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
    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
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


def gallery_figure(
    images: Sequence[np.ndarray],
    preds: Sequence[int],
    labels: Sequence[int | None],
    classes: Sequence[str],
    columns: int = 6,
) -> Figure:
    """The notebook's check, as a grid: each image titled `Pred: X | GT: Y`, mistakes in red."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    cols = min(columns, max(n, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, pred, label in zip(axes.flat, images, preds, labels, strict=False):
        ax.imshow(image, cmap="gray")
        truth = classes[label] if label is not None and label >= 0 else "?"
        wrong = label is not None and label >= 0 and pred != label
        ax.set_title(
            f"Pred: {classes[pred]} | GT: {truth}" + (" ✗" if wrong else ""),
            fontsize=8,
            color="red" if wrong else "black",
        )
    return fig


def pick_gallery(preds: Sequence[int], labels: Sequence[int | None], limit: int = 24) -> list[int]:
    """Mistakes first (up to two thirds of the grid), then correct ones, then any remaining mistakes."""
    wrong = [i for i, (p, y) in enumerate(zip(preds, labels, strict=True)) if y is not None and y >= 0 and p != y]
    wrong_set = set(wrong)
    right = [i for i in range(len(preds)) if i not in wrong_set]
    first = wrong[: max(1, 2 * limit // 3)]
    chosen = first + right[: limit - len(first)]
    return chosen + wrong[len(first) : len(first) + limit - len(chosen)]


def curves_figure(history: Sequence[dict], best_epoch: int | None) -> Figure:
    """The notebook's two panels: loss and accuracy per epoch, train and val; best epoch marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage in ("train", "val"):
            values = [h.get(f"{stage}/{metric}", np.nan) for h in history]
            ax.plot(epochs, values, marker="o", label=f"{stage}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", ylabel=metric, title={"loss": "loss", "acc": "accuracy"}[metric])
        ax.grid(True, alpha=0.4)
        ax.legend()
    return fig


def samples_figure(images_by_class: dict[str, Sequence[np.ndarray]]) -> Figure:
    """A few training images per class, as the model sees them (after resizing and augmentation)."""
    per_class = max(len(v) for v in images_by_class.values())
    fig, axes = plt.subplots(
        len(images_by_class), per_class, figsize=(2.2 * per_class, 2.4 * len(images_by_class)), squeeze=False
    )
    for row, (name, images) in enumerate(images_by_class.items()):
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(images):
                ax.imshow(images[col], cmap="gray")
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_evaluation(
    out_dir: Path,
    labels: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    images: Sequence[np.ndarray],
) -> tuple[dict, dict[str, Figure]]:
    """metrics.json plus the figures (returned open, so the caller can also log them to TensorBoard)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, probs, classes)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    preds = np.asarray(probs).argmax(1).tolist()
    chosen = pick_gallery(preds, list(labels))
    figures = {
        "confusion_matrix": confusion_figure(metrics),
        "per_class": per_class_figure(metrics),
        "reliability": reliability_figure(labels, probs, metrics),
        "gallery": gallery_figure(
            [images[i] for i in chosen], [preds[i] for i in chosen], [labels[i] for i in chosen], classes
        ),
    }
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png", dpi=100)
    return metrics, figures
