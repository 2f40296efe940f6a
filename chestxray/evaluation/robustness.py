"""The robustness bench: accuracy under acquisition shifts at 5 severities each (python -m chestxray.robustness).

Each shift is an OpenCV operation on the decoded image. Where a shift happens in the physical chain before the file
is written (contrast, gamma, brightness, blur, resolution, JPEG compression, rotation, cropping or padding, a burnt-in
marker) it is applied to the full-resolution decode, and the image then goes through the model's own resize
(`resize_square`) like any file. Gaussian noise is the exception: it is added at the model's resolution, because the
files' sizes differ tenfold and noise added at full resolution would be averaged away by the resize on large files
and not on small ones; at the model's resolution one severity means the same noise for every image.

Every view of an image, severity 0 included, comes from one decode through one path (shift, then the model's
resize), so a row's change from severity 0 is the shift's alone: severity 0 is not the reduced JPEG decode that
training and predict.py use (libjpeg's 1/2, 1/4, 1/8 scale), which differs from the full decode resized by about
0.84 grey levels on average on the 66 test images at 224 px. Each severity changes the image more than the one
before it (the tests check this, and that severity 0 is the shifted path at a null shift). Images are streamed: each
file is read once, its shifted versions are resized and predicted, and only per-image correctness is kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from chestxray.data.images import BadImageError, ImageLimits, decode_bytes, read_bytes, resize_square
from chestxray.data.preprocess import preprocess_image
from chestxray.data.sources import TrainingData
from chestxray.evaluation.metrics import wilson_interval
from chestxray.runtime.files import atomic_write

log = logging.getLogger(__name__)

SEVERITIES = 5


def _contrast(image: np.ndarray, k: int) -> np.ndarray:
    """Contrast towards the image's mean grey: x 0.8, 0.65, 0.5, 0.35, 0.2 (an under-exposed, flat radiograph)."""
    alpha = (1.0, 0.8, 0.65, 0.5, 0.35, 0.2)[k]
    mean = float(image.mean())
    return cv2.convertScaleAbs(image, alpha=alpha, beta=mean * (1 - alpha))


def _gamma(image: np.ndarray, k: int) -> np.ndarray:
    """A different detector response curve: gamma 1.3, 1.6, 2.0, 2.5, 3.0 (darker mid-tones)."""
    gamma = (1.0, 1.3, 1.6, 2.0, 2.5, 3.0)[k]
    table = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def _brightness(image: np.ndarray, k: int) -> np.ndarray:
    """A brighter exposure: +20, +40, +60, +80, +100 grey levels, clipped at white."""
    return cv2.add(image, np.full_like(image, 20 * k)) if k else image


def _noise(image: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Gaussian noise of 4, 8, 16, 24, 32 grey levels (one draw per image, the same pattern at every severity),
    the same on the three channels (a radiograph is grey)."""
    sigma = (0, 4, 8, 16, 24, 32)[k]
    if not sigma:
        return image
    pattern = np.random.default_rng(seed).standard_normal(image.shape[:2], dtype=np.float32)
    noisy = image.astype(np.float32) + sigma * pattern[:, :, None]
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, k: int) -> np.ndarray:
    """Gaussian blur (focal spot, motion): sigma 0.25%, 0.5%, 1%, 1.5%, 2% of the short side, so the same at every
    file size (at 224 px: 0.6 to 4.5 px)."""
    fraction = (0, 0.0025, 0.005, 0.01, 0.015, 0.02)[k]
    if not fraction:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=fraction * min(image.shape[:2]))


def _shrunk(image: np.ndarray, short_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _downsample(image: np.ndarray, k: int, image_size: int) -> np.ndarray:
    """A source of lower resolution than the model sees: short side 1/1.5, 1/2, 1/3, 1/4, 1/6 of the detail the
    model's input holds, the smaller of the model's input side and the image's own short side (the model's resize
    then interpolates up). Relative to the image's side where it is smaller than the input, so that an image already
    smaller than image_size / 1.5 is still shrunk at every severity instead of passing through unchanged."""
    divisor = (1, 1.5, 2, 3, 4, 6)[k]
    detail = min(min(image.shape[:2]), image_size)
    return image if k == 0 else _shrunk(image, max(2, round(detail / divisor)))


def _upsample(image: np.ndarray, k: int, image_size: int) -> np.ndarray:
    """A small source enlarged by a viewer or export (bicubic, with its overshoot at edges) back to the file's size:
    from 1/1.5, 1/2, 1/3, 1/4, 1/6 of the model's input side. (Nearest-neighbour enlargement was tried: its blocks
    alias against the model's pixel grid, so a stronger severity could change the model's view less.)"""
    if k == 0:
        return image
    small = _downsample(image, k, image_size)
    return cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)


def _jpeg(image: np.ndarray, k: int) -> np.ndarray:
    """The file saved again as JPEG at quality 60, 40, 25, 15, 8 (lossy PACS export)."""
    quality = (100, 60, 40, 25, 15, 8)[k]
    if k == 0:
        return image
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "OpenCV could not encode a JPEG"
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _rotation(image: np.ndarray, k: int) -> np.ndarray:
    """A patient not square to the detector: 3, 6, 9, 12, 15 degrees about the centre, black corners."""
    if k == 0:
        return image
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), 3.0 * k, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def _crop(image: np.ndarray, k: int) -> np.ndarray:
    """Collimated tighter: 4%, 8%, 12%, 16%, 20% of each side cut off (the rest fills the model's input)."""
    if k == 0:
        return image
    h, w = image.shape[:2]
    dy, dx = round(h * 0.04 * k), round(w * 0.04 * k)
    return image[dy : h - dy, dx : w - dx]


def _pad(image: np.ndarray, k: int) -> np.ndarray:
    """Collimated wider or placed on a larger canvas: a black border of 5%, 10%, 15%, 20%, 25% of each side."""
    if k == 0:
        return image
    h, w = image.shape[:2]
    dy, dx = round(h * 0.05 * k), round(w * 0.05 * k)
    return cv2.copyMakeBorder(image, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def _text(image: np.ndarray, k: int) -> np.ndarray:
    """A burnt-in white marker ("L PORTABLE") in the top-left corner, 3%, 5%, 7%, 9%, 11% of the short side high."""
    if k == 0:
        return image
    height = (0, 0.03, 0.05, 0.07, 0.09, 0.11)[k] * min(image.shape[:2])
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / cv2.getTextSize("L", font, 1.0, 1)[0][1]
    thickness = max(1, round(scale * 2))
    out = image.copy()
    origin = (round(height * 0.5), round(height * 1.5))
    cv2.putText(out, "L PORTABLE", origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


@dataclass(frozen=True)
class Shift:
    """One acquisition shift: `apply(image, severity, image_size, seed)` on the full-resolution RGB decode, or at
    the model's resolution when `after_resize`."""

    name: str
    levels: str  # what severities 1..5 are, for the table
    apply: Callable[[np.ndarray, int, int, int], np.ndarray]
    after_resize: bool = False


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("contrast", "x 0.8 / 0.65 / 0.5 / 0.35 / 0.2", lambda im, k, size, seed: _contrast(im, k)),
        Shift("gamma", "1.3 / 1.6 / 2.0 / 2.5 / 3.0", lambda im, k, size, seed: _gamma(im, k)),
        Shift("brightness", "+20 / 40 / 60 / 80 / 100 levels", lambda im, k, size, seed: _brightness(im, k)),
        Shift("noise", "sigma 4 / 8 / 16 / 24 / 32 levels", lambda im, k, size, seed: _noise(im, k, seed), True),
        Shift("blur", "sigma 0.25 / 0.5 / 1 / 1.5 / 2 % of side", lambda im, k, size, seed: _blur(im, k)),
        Shift(
            "downsample",
            "min(side, input) / 1.5 / 2 / 3 / 4 / 6",
            lambda im, k, size, seed: _downsample(im, k, size),
        ),
        Shift(
            "upsample",
            "from min(side, input) / 1.5 / 2 / 3 / 4 / 6",
            lambda im, k, size, seed: _upsample(im, k, size),
        ),
        Shift("jpeg", "quality 60 / 40 / 25 / 15 / 8", lambda im, k, size, seed: _jpeg(im, k)),
        Shift("rotation", "3 / 6 / 9 / 12 / 15 degrees", lambda im, k, size, seed: _rotation(im, k)),
        Shift("crop", "4 / 8 / 12 / 16 / 20 % per side", lambda im, k, size, seed: _crop(im, k)),
        Shift("pad", "5 / 10 / 15 / 20 / 25 % per side", lambda im, k, size, seed: _pad(im, k)),
        Shift("text", "3 / 5 / 7 / 9 / 11 % of side high", lambda im, k, size, seed: _text(im, k)),
    )
}


def working_image(image: np.ndarray, work_side: int | None) -> np.ndarray:
    """The decoded image, or with `work_side` one whose short side is at most that."""
    return image if work_side is None else _shrunk(image, work_side)


def image_seed(path: Path) -> int:
    """A noise seed of the file's name: the same noise for an image in every run, different between images."""
    return int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:4], "little")


def shifted_views(
    image: np.ndarray,
    image_size: int,
    shifts: Sequence[Shift],
    seed: int,
    preprocess: str = "none",
) -> np.ndarray:
    """The model's views (K x 3 x S x S uint8) of one decoded image: clean first, then each shift at 1..5; each
    resized and then preprocessed (the checkpoint's data.preprocess) as `model_view` does for a file. All from
    `image`: the clean view is the same resize of the same decode as every shifted one."""
    clean = resize_square(image, image_size)
    views = [clean]
    for shift in shifts:
        for k in range(1, SEVERITIES + 1):
            if shift.after_resize:
                views.append(shift.apply(clean, k, image_size, seed))
            else:
                views.append(resize_square(shift.apply(image, k, image_size, seed), image_size))
    views = [preprocess_image(v, preprocess) for v in views]
    return np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2))


def answer(predictor, batch: torch.Tensor, with_flags: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(predicted classes, which images the checkpoints' out-of-distribution detector flags, or None): one forward
    pass (chestxray.models.ood, through the predictor's answers: an ensemble flags what any member flags)."""
    if not with_flags:
        return predictor(batch).argmax(1).cpu().numpy(), None
    probs, margin = predictor.probabilities(batch)[:2]
    return probs.argmax(1).cpu().numpy(), (margin > 0).cpu().numpy()


@dataclass
class BenchResult:
    """Per image and per view (clean, then shift x severity): right or wrong, flagged or not."""

    paths: list[Path]
    labels: np.ndarray  # N
    correct: np.ndarray  # N x K bool
    flagged: np.ndarray | None  # N x K bool, or None without a detector
    leaking: np.ndarray | None  # N bool, or None when not known
    shifts: list[Shift]
    unreadable: dict[str, str]


def run_bench(
    predictor: torch.nn.Module,
    with_flags: bool,
    items: Sequence[tuple[Path, int]],
    image_size: int,
    shifts: Sequence[Shift],
    limits: ImageLimits,
    device: torch.device,
    batch_size: int,
    work_side: int | None = None,
) -> BenchResult:
    """Predict every labelled image under every shift and severity; `predictor` maps uint8 images to probabilities.

    The shifts act on the full-resolution decode, or with `work_side` on one whose short side is brought down to
    that (libjpeg's reduced decode, then INTER_AREA): at a few times the model's input side the model's views are
    nearly the same, and a 2,000-pixel image's 60 shifted versions take a second instead of ten or more."""
    correct, flagged, kept, labels, unreadable = [], [], [], [], {}
    per_image = 1 + SEVERITIES * len(shifts)
    for path, label in tqdm(items, desc=f"{per_image} views per image", unit="img", file=sys.stderr):
        try:
            # one decode for every view, severity 0 included (module docstring)
            image = working_image(decode_bytes(read_bytes(path), path, work_side, limits), work_side)
        except BadImageError as err:
            unreadable[str(path)] = err.reason
            log.warning("cannot read %s: %s", path, err.reason)
            continue
        views = shifted_views(image, image_size, shifts, image_seed(path), limits.preprocess)
        views = torch.from_numpy(views)
        preds, flags = [], []
        with torch.no_grad():
            for start in range(0, len(views), batch_size):
                predicted, flagged_here = answer(predictor, views[start : start + batch_size].to(device), with_flags)
                preds.append(predicted)
                flags.append(flagged_here)
        correct.append(np.concatenate(preds) == label)
        flagged.append(np.concatenate(flags) if flags and flags[0] is not None else None)
        kept.append(path)
        labels.append(label)
    have_flags = bool(flagged) and all(f is not None for f in flagged)
    return BenchResult(
        kept,
        np.array(labels, dtype=np.int64),
        np.array(correct, dtype=bool).reshape(len(kept), per_image),  # (0, views) when none could be read
        np.array(flagged, dtype=bool) if have_flags else None,
        None,
        list(shifts),
        unreadable,
    )


def _accuracy(correct: np.ndarray) -> tuple[float | None, list[float] | None, int]:
    n = int(correct.size)
    if not n:
        return None, None, 0
    right = int(correct.sum())
    return right / n, wilson_interval(right, n), n


def table_rows(result: BenchResult) -> list[dict]:
    """One row per shift and severity (severity 0: the clean images, once per shift so each curve starts there)."""
    rows = []
    for s, shift in enumerate(result.shifts):
        for k in range(SEVERITIES + 1):
            column = 0 if k == 0 else 1 + s * SEVERITIES + (k - 1)
            acc, ci, n = _accuracy(result.correct[:, column])
            row = {"shift": shift.name, "severity": k, "n": n, "accuracy": acc, "ci_low": ci and ci[0]}
            row["ci_high"] = ci and ci[1]
            if result.leaking is not None:
                lf, _, n_lf = _accuracy(result.correct[~result.leaking, column])
                row.update(leak_free_accuracy=lf, leak_free_n=n_lf)
            else:
                row.update(leak_free_accuracy=None, leak_free_n=None)
            flagged = None if result.flagged is None else float(result.flagged[:, column].mean())
            row["share_flagged_ood"] = flagged
            rows.append(row)
    return rows


FIELDS = ["shift", "severity", "n", "accuracy", "ci_low", "ci_high", "leak_free_accuracy", "leak_free_n"]
FIELDS.append("share_flagged_ood")


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(r[k], 4) for k in FIELDS} for r in rows)
    atomic_write(path, buffer.getvalue())


def markdown_table(rows: Sequence[dict], shifts: Sequence[Shift], leak_note: str, ood_note: str) -> str:
    """Accuracy per shift (rows) and severity (columns), leak-free accuracy and share flagged beneath when known."""
    by = {(r["shift"], r["severity"]): r for r in rows}
    header = "| shift | levels (1 .. 5) | " + " | ".join(str(k) for k in range(SEVERITIES + 1)) + " |"
    lines = [header, "|---|---|" + "---:|" * (SEVERITIES + 1)]
    for shift in shifts:
        cells = []
        for k in range(SEVERITIES + 1):
            r = by[(shift.name, k)]
            cell = _cell(r["accuracy"])
            if r["leak_free_accuracy"] is not None:
                cell += f" ({_cell(r['leak_free_accuracy'])})"
            if r["share_flagged_ood"] is not None:
                cell += f" [{r['share_flagged_ood']:.0%}]"
            cells.append(cell)
        lines.append(f"| {shift.name} | {shift.levels} | " + " | ".join(cells) + " |")
    legend = ["", "Cells: accuracy; (leak-free accuracy); [share flagged out-of-distribution]. Severity 0 is clean."]
    return "\n".join([*lines, *legend, f"Leak-free: {leak_note}", f"Out-of-distribution: {ood_note}", ""])


def severity_figure(rows: Sequence[dict], shifts: Sequence[Shift], title: str) -> Figure:
    """Accuracy against severity, one panel per shift, with its 95% Wilson interval and the leak-free curve."""
    cols = 4
    nrows = -(-len(shifts) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True)
    for ax, shift in zip(axes.flat, shifts, strict=False):
        mine = sorted((r for r in rows if r["shift"] == shift.name), key=lambda r: r["severity"])
        ks = [r["severity"] for r in mine]
        ax.plot(ks, [r["accuracy"] for r in mine], "o-", label="all")
        ax.fill_between(ks, [r["ci_low"] for r in mine], [r["ci_high"] for r in mine], alpha=0.2)
        if mine[0]["leak_free_accuracy"] is not None:
            ax.plot(ks, [r["leak_free_accuracy"] for r in mine], "s--", label="leak-free")
        if mine[0]["share_flagged_ood"] is not None:
            ax.plot(ks, [r["share_flagged_ood"] for r in mine], "^:", label="flagged OOD")
        ax.set_title(shift.name, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shifts) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("severity (0 = clean)")
    fig.supylabel("accuracy")
    fig.suptitle(title, fontsize=10)
    return fig


def write_tensorboard(folder: Path, rows: Sequence[dict], figure: np.ndarray) -> None:
    """robustness/<shift>/accuracy (and leak_free_accuracy, share_flagged_ood) against severity as the step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for r in rows:
            for key in ("accuracy", "leak_free_accuracy", "share_flagged_ood"):
                if r[key] is not None:
                    writer.add_scalar(f"robustness/{r['shift']}/{key}", r[key], global_step=r["severity"])
        writer.add_image("robustness/accuracy_vs_severity", figure, global_step=0, dataformats="HWC")


def leaking_mask(
    paths: Sequence[Path],
    hashed: tuple[np.ndarray, np.ndarray],
    train: Sequence[Path],
    threshold: int,
    limits: ImageLimits,
) -> np.ndarray:
    """Which images near-duplicate a train image (perceptual hash within `threshold` bits, as training checks);
    `hashed`: the images' own hashes and which could be hashed (duplicates.hash_files), computed once for every
    member of an ensemble."""
    from chestxray.data.duplicates import hash_files, near_pairs

    mine, ok = hashed
    theirs, theirs_ok = hash_files(train, limits)
    train_ok = [p for p, good in zip(train, theirs_ok, strict=True) if good]
    pairs = near_pairs(
        train_ok, theirs[theirs_ok], [p for p, g in zip(paths, ok, strict=True) if g], mine[ok], threshold
    )
    leaking = {p.test for p in pairs}
    return np.array([p in leaking for p in paths], dtype=bool)


def chosen_shifts(value) -> list[Shift]:
    """shifts=all, or a list of shift names; anything else is one ConfigError naming the setting."""
    from chestxray.errors import ConfigError

    names = list(SHIFTS) if value == "all" else [value] if isinstance(value, str) else [str(v) for v in value]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown or not names:
        raise ConfigError(f"shifts={value}: must be all or a list of {', '.join(SHIFTS)}")
    return [SHIFTS[n] for n in names]


def machine() -> str:
    """The CPU's model name (and the GPU's when one is used), for the table's header."""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return cpu + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def leak_mask_of_runs(
    runs: Sequence[TrainingData], paths: Sequence[Path], limits: ImageLimits
) -> tuple[np.ndarray | None, str]:
    """Which inputs duplicate a train image of any member's run (and are not images whose train copies that run
    dropped), and a note; None with the reason when a run's train images are not known."""
    import os

    from chestxray.data.duplicates import hash_files

    mask = np.zeros(len(paths), bool)
    notes, threshold, hashed = [], 0, None
    for run in runs:
        if run.train is None:
            return None, f"n/a ({run.note})"
        notes.append(run.note)
        threshold = run.threshold
        if run.train.paths:
            hashed = hashed or hash_files(paths, limits)
            mine = leaking_mask(paths, hashed, run.train.paths, run.threshold, limits)
            mask |= mine & np.array([os.path.realpath(p) not in run.cleared for p in paths], dtype=bool)
    return mask, f"{'; '.join(notes)} ({int(mask.sum())} of {len(paths)} inputs duplicate one, {threshold} bits)"
