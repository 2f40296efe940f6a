"""Every figure of a run and of a report, as plain matplotlib `Figure` objects (no pyplot, so no global state and
nothing to close), drawn once by `render` into an image that is both saved as PNG and logged to the run's loggers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from chestxray.evaluation.metrics import ACC, CALIBRATION_BINS, LOSS, metric_name, reliability_bins
from chestxray.runtime.files import atomic_writer


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


def _two(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def per_class_figure(metrics: dict) -> Figure:
    names = list(metrics["per_class"])
    x = np.arange(len(names))
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for offset, key in ((-0.2, "sensitivity"), (0.2, "specificity")):
        values = [metrics["per_class"][c][key] for c in names]
        shown = [v is not None for v in values]  # an undefined rate gets no bar (not a bar at 0)
        ax.bar((x + offset)[shown], [v for v in values if v is not None], width=0.4, label=key)
        if key == "sensitivity":
            cis = [metrics["per_class"][c].get("sensitivity_ci95") for c in names]
            if all(cis):
                low = [v - ci[0] for v, ci in zip(values, cis, strict=True)]
                high = [ci[1] - v for v, ci in zip(values, cis, strict=True)]
                ax.errorbar(x + offset, values, yerr=[low, high], fmt="none", ecolor="k", capsize=3, lw=1)
    # the numbers go under each class name: over the bars the sensitivity's error bar would cross them
    labels = [
        f"{c}\nsens {_two(metrics['per_class'][c]['sensitivity'])}\nspec {_two(metrics['per_class'][c]['specificity'])}"
        for c in names
    ]
    ax.set(xticks=x, xticklabels=labels, ylim=(0, 1.05), ylabel="rate", title="per-class sensitivity / specificity")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the plot, never over a bar
    return fig


def reliability_figure(labels: Sequence[int], panels: dict[str, tuple[np.ndarray, float]]) -> Figure:
    """Confidence of the predicted class against how often it is right, per confidence bin (the ECE metric's bins):
    one panel per set of probabilities, e.g. before and after temperature scaling."""
    labels = np.asarray(labels)
    fig = Figure(figsize=(4.5 * len(panels), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    width = 1 / CALIBRATION_BINS
    centres = np.arange(CALIBRATION_BINS) * width + width / 2
    for ax, (title, (probs, ece)) in zip(axes, panels.items(), strict=True):
        accuracy, _, share = reliability_bins(labels, probs)
        counts = np.rint(share * len(labels)).astype(int)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.bar(centres, np.where(counts > 0, accuracy, 0), width=width, edgecolor="k", alpha=0.7, label="accuracy")
        for c, a, m in zip(centres, accuracy, counts, strict=True):  # how many images each bar stands for
            if m:
                ax.text(c, min(a + 0.03, 1.02), str(m), ha="center", fontsize=7)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.08),
            xlabel="confidence (max probability)",
            ylabel="accuracy",
            title=f"{title}ECE {ece:.3f}",
        )
        ax.legend(loc="upper left", fontsize=8)
    return fig


def risk_coverage_figure(
    confidence: np.ndarray, correct: np.ndarray, accepted: np.ndarray | None = None, risk: float | None = None
) -> Figure:
    """The error rate of the most confident answers against the share answered (Geifman and El-Yaniv's
    risk-coverage curve): where the accepted answers sit on it, and the risk they were certified for."""
    from chestxray.evaluation.selective import aurc, risk_coverage

    coverage, risks = risk_coverage(confidence, correct)
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(coverage, risks, lw=1.5, label=f"by confidence (AURC {aurc(confidence, correct):.3f})")
    ax.axhline(1 - float(np.mean(correct)), color="grey", ls=":", lw=1, label="answering everything")
    if risk is not None:
        ax.axhline(risk, color="k", ls="--", lw=1, label=f"target risk {risk:.0%}")
    if accepted is not None and accepted.any():
        share, err = accepted.mean(), 1 - float(np.mean(np.asarray(correct)[accepted]))
        ax.plot([share], [err], "o", color="C3", label=f"accepted: {share:.0%} answered, {err:.1%} wrong")
    ax.set(xlim=(0, 1), ylim=(0, max(0.05, float(risks.max()) * 1.1)), xlabel="coverage (share answered)")
    ax.set(ylabel="error rate of the answered", title=f"risk-coverage (n={len(correct)})")
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
    for ax, metric in zip(axes, (LOSS, ACC), strict=True):
        for stage in ("train", "val"):
            values = [h.get(metric_name(stage, metric), np.nan) for h in history]
            ax.plot(epochs, values, marker="o", label=f"{stage}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=metric, title={LOSS: "loss", ACC: "accuracy"}[metric])
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
        with atomic_writer(path, "wb") as fh:
            Image.fromarray(rgb).save(fh, "PNG")
    return rgb
