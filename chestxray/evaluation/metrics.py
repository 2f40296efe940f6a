"""What every evaluation measures, defined once.

The metrics are torchmetrics objects in a `MetricCollection`: the LightningModule updates one per stage (and per test
set, with the leak-free numbers through a mask) batch by batch, and predict.py updates the same collection with its
whole arrays, so a test report and a prediction of the same images give the same numbers. The intervals need the
per-image results: Wilson for accuracy, `scipy.stats.bootstrap` (percentile) for macro ROC-AUC and per-class
sensitivity, with torchmetrics computing the statistic on each resample.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.stats import DegenerateDataWarning, binomtest, bootstrap
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
)
from torchmetrics.functional.classification import multiclass_auroc, multiclass_recall
from torchmetrics.functional.classification.calibration_error import _binning_bucketize

# Said wherever a coverage guarantee is claimed (the report's printout, training's log of the fit): the validation
# split does four jobs, so the guarantee holds for images exchangeable with it and is optimistic even for those.
COVERAGE_CAVEAT = (
    "the same validation images pick the best epoch, fit the temperature, set the detector thresholds and calibrate "
    "the sets, so the coverage is a guarantee only for images exchangeable with them, and optimistic"
)

# What every stage logs, as <stage>/<name>: train/acc, val/loss, test/acc, eval/<set>/loss, ... Every logged name is
# spelt by metric_name() from these; conf/ names VAL_ACC and BEST too, which tests/test_config.py checks.
ACC, LOSS = "acc", "loss"
CLASSES = "classes"  # train and val only: how many classes the model predicted in the epoch (1: a constant guess)
STAGE_METRICS = (ACC, LOSS)
LEAK_FREE = "_leak_free"


def metric_name(where: str, metric: str, leak_free: bool = False) -> str:
    """The one spelling of a logged metric: metric_name("val", ACC) is "val/acc", metric_name(set_prefix("x"), LOSS,
    True) is "eval/x/loss_leak_free"."""
    return f"{where}/{metric}{LEAK_FREE if leak_free else ''}"


VAL_ACC = metric_name("val", ACC)  # what best.ckpt is chosen by (conf/callbacks: model_checkpoint.monitor)
BEST = f"{VAL_ACC}_best"  # the running best of val/acc: what train.py returns (conf/train.yaml: optimized_metric)
# curves.png and history.json (which also keeps each epoch's val/classes: a run that learns nothing is told so)
HISTORY = (*(metric_name(stage, m) for stage in ("train", "val") for m in (LOSS, ACC)), metric_name("val", CLASSES))
CALIBRATION_BINS = 10
CONFIDENCE = 0.95  # of every interval
PER_CLASS = ("sensitivity", "specificity", "precision", "f1")


def set_prefix(set_name: str) -> str:
    """The metric prefix of an evaluated set: test/... for the test folder, eval/<name>/... for evaluation sets."""
    return "test" if set_name == "test" else f"eval/{set_name}"


def reported_metrics(set_names: Iterable[str]) -> list[str]:
    """The numbers a run is compared on (TensorBoard's HParams tab, the end of train.log, results.json)."""
    names = [BEST]
    for set_name in set_names:
        prefix = set_prefix(set_name)
        names += [metric_name(prefix, ACC), metric_name(prefix, ACC, True), metric_name(prefix, LOSS)]
    return names


def logged_metrics(set_names: Iterable[str]) -> list[str]:
    """Every metric a run logs (what optimized_metric may name)."""
    names = [metric_name(stage, m) for stage in ("train", "val") for m in (*STAGE_METRICS, CLASSES)] + [BEST]
    for set_name in set_names:
        prefix = set_prefix(set_name)
        names += [metric_name(prefix, m, leak_free) for m in STAGE_METRICS for leak_free in (False, True)]
    return names


def stage_metrics(num_classes: int) -> MetricCollection:
    """Accuracy and mean cross-entropy: what train and val log every epoch.

    Updated with keywords (preds=, target=, value=): each metric takes the ones its update() names.
    """
    return MetricCollection(
        {
            ACC: MulticlassAccuracy(num_classes, average="micro"),
            LOSS: MeanMetric(),
            CLASSES: PredictedClasses(num_classes),
        }
    )


class PredictedClasses(Metric):
    """How many classes the model predicted at least once: 1 is a model that answers one class whatever the image
    (VGG19 from scratch with SGD does, at a val/acc that is just that class's share). torchmetrics has no such count;
    its state is summed across DDP ranks like theirs."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.add_state("counts", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor) -> None:
        self.counts += torch.bincount(preds.argmax(1), minlength=self.counts.numel()).to(self.counts)

    def compute(self) -> torch.Tensor:
        return (self.counts > 0).sum().float()


def report_metrics(num_classes: int, sync: bool = True) -> MetricCollection:
    """Everything an evaluation report holds, from probabilities (preds=), labels (target=), per-image NLL (value=).

    sync: gather the states of every process before computing (the test loop under DDP); False for arrays that one
    process already holds whole (predict.py's report on rank 0).
    """
    k, kw = num_classes, {"sync_on_compute": sync}
    return MetricCollection(
        {
            ACC: MulticlassAccuracy(k, average="micro", **kw),
            LOSS: MeanMetric(**kw),
            "auroc": MulticlassAUROC(k, average="macro", **kw),
            "ece": MulticlassCalibrationError(k, n_bins=CALIBRATION_BINS, **kw),
            "confusion": MulticlassConfusionMatrix(k, **kw),
            "sensitivity": MulticlassRecall(k, average=None, **kw),
            "specificity": MulticlassSpecificity(k, average=None, **kw),
            "precision": MulticlassPrecision(k, average=None, **kw),
            "f1": MulticlassF1Score(k, average=None, **kw),
        }
    )


def calibration_metrics(num_classes: int) -> MetricCollection:
    """Expected calibration error and NLL: measured before temperature scaling too, to show what it changed."""
    return MetricCollection(
        {"ece": MulticlassCalibrationError(num_classes, n_bins=CALIBRATION_BINS), "loss": MeanMetric()}
    )


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image negative log-likelihood of probabilities (an ensemble's average has no logits)."""
    return -torch.log(probs.gather(1, target[:, None]).squeeze(1).clamp_min(1e-12))


def compute(collection: MetricCollection) -> dict[str, torch.Tensor]:
    """collection.compute() without torchmetrics' warnings about a class with no (or only) images in the set: such a
    class's rates are reported as undefined (defined_per_class), not as the zeros those warnings are about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
        return collection.compute()


def summarise(computed: dict[str, torch.Tensor], classes: Sequence[str]) -> dict:
    """A report collection's compute() as plain numbers; {"n": 0} when it saw no image."""
    confusion = computed["confusion"].long()
    n = int(confusion.sum())
    if n == 0:
        return {"n": 0}
    support = confusion.sum(1).tolist()
    per_class = {c: {**defined_per_class(computed, confusion, i), "support": support[i]} for i, c in enumerate(classes)}
    return {
        "n": n,
        "correct": int(confusion.trace()),
        "accuracy": float(computed[ACC]),
        "loss": float(computed[LOSS]),
        "macro_roc_auc_ovr": float(computed["auroc"]) if all(support) else None,  # undefined without every class
        "expected_calibration_error": float(computed["ece"]),
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": confusion.tolist(),
    }


def defined_per_class(computed: dict[str, torch.Tensor], confusion: torch.Tensor, i: int) -> dict[str, float | None]:
    """Class i's sensitivity, specificity, precision and F1, None where undefined (a zero denominator): sensitivity and
    F1 without an image of the class, specificity without an image of another class, precision when the model never
    answered the class. torchmetrics reports those as 0, which reads as a model that fails on the class, not as a set
    that cannot say (a leak-free subset, an evaluation set from a label file without that class)."""
    support, others, answered = (
        int(confusion[i].sum()),
        int(confusion.sum() - confusion[i].sum()),
        int(confusion[:, i].sum()),
    )
    defined = {"sensitivity": support > 0, "specificity": others > 0, "precision": answered > 0, "f1": support > 0}
    return {m: float(computed[m][i]) if defined[m] else None for m in PER_CLASS}


def summarise_calibration(computed: dict[str, torch.Tensor]) -> dict:
    return {"expected_calibration_error": float(computed["ece"]), "loss": float(computed["loss"])}


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """The report numbers of whole arrays (predict.py): the same collection the module updates batch by batch."""
    if not len(labels):
        return {"n": 0}
    collection = report_metrics(len(classes), sync=False)
    p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    collection.update(preds=p, target=y, value=nll(p, y))
    return summarise(compute(collection), classes)


def wilson_interval(correct: int, n: int, level: float = CONFIDENCE) -> list[float]:
    ci = binomtest(correct, n).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, num_classes: int, resamples: int, seed: int, level: float = CONFIDENCE
) -> dict:
    """Percentile intervals of macro ROC-AUC and each class's sensitivity over `resamples` seeded resamples,
    stratified by class: each resample draws every class's images from that class (scipy.stats.bootstrap with one
    sample per class), so every resample has every class and both statistics are always defined; torchmetrics
    computes them. None where a class has fewer than two images (nothing to resample).

    The rows are put in a canonical order first, so the same predictions give the same intervals whatever order they
    come in (a training run's test loader and predict.py list the files differently).
    """
    order = np.lexsort((*np.asarray(probs).T[::-1], labels))
    y_all = torch.as_tensor(np.asarray(labels)[order], dtype=torch.long)
    p_all = torch.as_tensor(np.asarray(probs)[order], dtype=torch.float32)
    k = num_classes
    by_class = [np.flatnonzero(y_all.numpy() == c) for c in range(k)]
    present = [c for c in range(k) if len(by_class[c])]
    if any(len(by_class[c]) < 2 for c in present):
        return {"auc": None, "sensitivity": [None] * k}

    def statistic(*samples: np.ndarray) -> np.ndarray:
        index = np.concatenate(samples).astype(np.int64)
        y, p = y_all[index], p_all[index]
        sens = multiclass_recall(p, y, k, average=None, validate_args=False)
        auc = multiclass_auroc(p, y, k, average="macro", validate_args=False) if len(present) == k else torch.nan
        return np.array([float(auc), *[float(sens[c]) for c in present]])

    with warnings.catch_warnings():
        # a statistic that is undefined (macro AUC with a class absent) or constant in every resample gives NaN
        # bounds, reported as None below; scipy's DegenerateDataWarning would print a traceback-like line to stderr
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            tuple(by_class[c] for c in present),
            statistic,
            n_resamples=resamples,
            confidence_level=level,
            method="percentile",
            vectorized=False,
            paired=False,
            random_state=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval

    def interval(i: int) -> list[float] | None:
        return None if np.isnan(low[i]) or np.isnan(high[i]) else [float(low[i]), float(high[i])]

    sensitivity = [None] * k
    for i, c in enumerate(present):
        sensitivity[c] = interval(1 + i)
    return {"auc": interval(0), "sensitivity": sensitivity}


def with_intervals(numbers: dict, labels: np.ndarray, probs: np.ndarray, resamples: int, seed: int) -> dict:
    """A summary plus its intervals: Wilson for accuracy, bootstrap for macro ROC-AUC and sensitivity."""
    if not numbers.get("n"):
        return numbers
    result = {**numbers, "accuracy_ci95": wilson_interval(numbers["correct"], numbers["n"])}
    result["per_class"] = {c: dict(v) for c, v in numbers["per_class"].items()}
    result["macro_roc_auc_ovr_ci95"] = None
    result["bootstrap"] = None
    if resamples > 0 and numbers["n"] >= 2:  # a resample of one image is that image: no interval to speak of
        intervals = bootstrap_intervals(labels, probs, len(numbers["classes"]), resamples, seed)
        if numbers["macro_roc_auc_ovr"] is not None:
            result["macro_roc_auc_ovr_ci95"] = intervals["auc"]
        for name, ci in zip(numbers["classes"], intervals["sensitivity"], strict=True):
            result["per_class"][name]["sensitivity_ci95"] = ci
        result["bootstrap"] = {"resamples": resamples, "seed": seed, "confidence_level": CONFIDENCE}
    return result


def reliability_bins(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: accuracy, mean confidence and share of the images, binned as the ECE metric bins them."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    confidence, predicted = p.max(1)
    correct = (predicted == torch.as_tensor(labels)).float()
    boundaries = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    accuracy, mean_confidence, share = (t.double().numpy() for t in _binning_bucketize(confidence, correct, boundaries))
    # torchmetrics gives confidences of exactly 1.0 a bin of their own after the last: shown in the last bin
    total = share[-2:].sum()
    if total > 0:
        accuracy[-2] = (accuracy[-2:] * share[-2:]).sum() / total
        mean_confidence[-2] = (mean_confidence[-2:] * share[-2:]).sum() / total
    share[-2] = total
    return accuracy[:-1], mean_confidence[:-1], share[:-1]
