"""One result type for every evaluation (trainer.test on each set, predict.py) and the report written from it.

An Evaluation holds per-image probabilities with paths and labels, and (from trainer.test) the numbers the module's
metric collections computed; predict.py's numbers come from the same collections over its whole arrays
(chestxray.evaluation.metrics.evaluate). Figures re-read the few images they show, so a report costs the same
memory for 66 images or 100,000.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestxray.data.images import DEFAULT_LIMITS, BadImageError, ImageLimits, ImageTags, display_image, image_tags
from chestxray.evaluation import figures, metrics, selective
from chestxray.runtime.files import atomic_write, atomic_writer

UNCERTAINTY_FIELDS = ("ood_score", "in_distribution", "prediction_set")  # chestxray.models.ood
SELECTIVE_FIELDS = ("confidence", "accepted")  # chestxray.models.selection
FLAG_TEXT = "outside what the model was trained on"  # how a flagged answer is marked where it is printed
SMALL_SET = 10  # below this many labelled images a report prints each answer and the accuracy, no per-class table


@dataclass(frozen=True)
class ReportSettings:
    """conf/report: how much goes into a report."""

    bootstrap_resamples: int = 1000  # 0 turns the bootstrap intervals off
    seed: int = 0
    gallery_tiles: int = 24
    gradcam_tiles: int = 6
    limits: ImageLimits = DEFAULT_LIMITS  # the run's data.max_pixels / min_image_side, for re-reading images


@dataclass
class Uncertainty:
    """Per image: the detector's score minus its threshold (above 0: flagged; NaN: no detector fitted) and the
    prediction sets (None: no conformal fit); what they were fitted with (chestxray.models.ood)."""

    ood_scores: np.ndarray
    sets: np.ndarray | None
    detector: str
    pass_rate: float
    coverage: float
    validation_images: int  # what the threshold and the coverage guarantee rest on
    confidence: np.ndarray | None = None  # per image, higher = more likely right (chestxray.models.selection)
    accepted: np.ndarray | None = None  # per image (None: no acceptance threshold)
    selective: dict | None = None  # the threshold's settings and certificate (Selection.as_dict)

    members: int = 1  # an ensemble's: each member's threshold and sets, validation_images the fewest of theirs

    @classmethod
    def of(cls, model, ood_scores: np.ndarray, sets: np.ndarray | None, selection=None) -> Uncertainty:
        """From a loaded model, or an ensemble's members (a list: the settings of the first, the fewest validation
        images of any, since an ensemble flags where any member does and unites their sets), its outputs and their
        Selection."""
        members = list(model) if isinstance(model, (list, tuple)) else [model]
        first = members[0]
        fitted = bool(first.conformal.fitted)
        return cls(
            ood_scores,
            sets if fitted else None,
            first.ood_detector,
            first.pass_rate,
            first.coverage,
            min(int(m.ood.n_fit) for m in members),
            None if selection is None else selection.confidence,
            None if selection is None else selection.accepted,
            None if selection is None else selection.as_dict(),
            len(members),
        )

    def subset(self, keep: np.ndarray) -> Uncertainty:
        """The same for some of the images (a boolean mask)."""

        def part(values):
            return None if values is None else values[keep]

        changed = {k: part(getattr(self, k)) for k in ("ood_scores", "sets", "confidence", "accepted")}
        return Uncertainty(**{**self.__dict__, **changed})

    def alarm(self) -> selective.Alarm | None:
        """The folder-level alarm (chestxray.evaluation.selective.shift_alarm): None without a detector."""
        if np.isnan(self.ood_scores).all() or not len(self.ood_scores):
            return None
        return selective.shift_alarm(int((self.ood_scores > 0).sum()), len(self.ood_scores), self.pass_rate)

    def numbers(self, labels: np.ndarray, probs: np.ndarray | None = None) -> dict:
        """Share flagged and the folder-level alarm; for labelled images, empirical coverage and set sizes, and the
        accepted answers' share and accuracy (metrics.json's "uncertainty")."""
        result: dict = {"validation_images": self.validation_images, "members": self.members}
        if not np.isnan(self.ood_scores).all():
            flagged = self.ood_scores > 0
            result["out_of_distribution"] = {
                "detector": self.detector,
                "pass_rate_target": self.pass_rate,
                "images": len(flagged),
                "flagged": int(flagged.sum()),
                "share_flagged": float(flagged.mean()) if len(flagged) else None,
            }
            alarm = self.alarm()
            if alarm is not None:
                result["shift_alarm"] = {**alarm.as_dict(), "text": alarm.text()}
        if self.confidence is not None and probs is not None and len(labels):
            result["selective"] = selective_numbers(self, labels, probs)
        if self.sets is not None and len(labels):
            sizes = self.sets.sum(1)
            covered = self.sets[np.arange(len(labels)), labels]
            single = sizes == 1
            result["prediction_sets"] = {
                "coverage_target": self.coverage,
                "images": len(labels),
                "covered": int(covered.sum()),
                "empirical_coverage": float(covered.mean()),
                "mean_set_size": float(sizes.mean()),
                "singletons": int(single.sum()),
                "singleton_accuracy": float(covered[single].mean()) if single.any() else None,
            }
        return result


def _count(k: int | None, n: int | None, share: float) -> str:
    """k of n (a share of 5 images says no more than the count), with the percentage from SMALL_SET images on."""
    if k is None or n is None:  # a metrics.json written before the counts were kept
        return f"{100 * share:.1f}%"
    return f"{k} of {n}" if n < SMALL_SET else f"{k} of {n} ({100 * share:.1f}%)"


def selective_numbers(uncertainty: Uncertainty, labels: np.ndarray, probs: np.ndarray) -> dict:
    """The accepted answers of labelled images: how many, how often right (Wilson interval), and how well the
    confidence ranks right above wrong answers (failure AUROC, AURC)."""
    correct = probs.argmax(1) == labels
    confidence = uncertainty.confidence
    result = {
        **(uncertainty.selective or {}),
        "failure_auroc": _finite(selective.failure_auroc(confidence, correct)),
        "aurc": _finite(selective.aurc(confidence, correct)),
    }
    accepted = uncertainty.accepted
    if accepted is None:
        return result
    k, right = int(accepted.sum()), int(correct[accepted].sum())
    result |= {
        "accepted": k,
        "share_accepted": k / len(labels),
        "accepted_correct": right,
        "accuracy_accepted": right / k if k else None,
        "accuracy_accepted_ci95": metrics.wilson_interval(right, k) if k else None,
    }
    return result


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def selective_text(numbers: dict, images: int | None = None) -> str:
    """The printed line of metrics.json's "selective". Of a set of fewer than SMALL_SET images, no failure AUROC: a
    ranking of two or three answers is a rate that says nothing (metrics.json keeps it)."""
    target = f"error at most {100 * numbers['risk_target']:.0f}% with probability {100 * (1 - numbers['delta']):.0f}%"
    auroc = numbers.get("failure_auroc")
    few = images is not None and images < SMALL_SET
    ranking = f"; failure AUROC of {numbers['confidence']} {auroc:.3f}" if auroc is not None and not few else ""
    if "accepted" not in numbers:
        return f"accepted: none decided ({numbers.get('why_not') or 'no acceptance threshold'}){ranking}"
    k, n = numbers["accepted"], round(numbers["accepted"] / numbers["share_accepted"]) if numbers["accepted"] else 0
    if not numbers["certified"]:
        needed = numbers.get("images_needed")
        return (
            f"accepted: none: the {numbers['calibration_images']} calibration images could not certify {target} (the "
            f"best they certify is {100 * numbers['best_certifiable_risk']:.0f}%"
            + (f"; roughly {needed} accepted answers at the lowest error rate seen would be needed" if needed else "")
            + f"){ranking}"
        )
    if not k:
        return f"accepted: 0 answers (threshold certified for {target}){ranking}"
    lo, hi = numbers["accuracy_accepted_ci95"]
    return (
        f"accepted: {k} of {n} answers ({100 * numbers['share_accepted']:.1f}%), {numbers['accepted_correct']} right "
        f"(accuracy {numbers['accuracy_accepted']:.3f}, 95% CI {lo:.3f}-{hi:.3f}, Wilson; certified for {target} on "
        f"{numbers['calibration_images']} calibration images){ranking}"
    )


def uncertainty_text(numbers: dict | None) -> list[str]:
    """The printed lines of metrics.json's "uncertainty" (none when nothing was fitted)."""
    if not numbers:
        return []
    lines, n, members = [], numbers["validation_images"], numbers.get("members", 1)
    each = f"each of {members} members' " if members > 1 else ""
    of_n = f"its validation images, the fewest {n}" if members > 1 else f"{n} validation images"
    ood = numbers.get("out_of_distribution")
    if ood and ood["share_flagged"] is not None:
        images = ood.get("images")
        lines.append(
            f"out of distribution ({ood['detector']}, {each}threshold passing {100 * ood['pass_rate_target']:.0f}% "
            f"of {of_n}): {_count(ood['flagged'], images, ood['share_flagged'])} flagged as {FLAG_TEXT}"
        )
    sets = numbers.get("prediction_sets")
    if sets:
        target = f"{100 * sets['coverage_target']:.0f}%"
        covered = _count(sets.get("covered"), sets.get("images"), sets["empirical_coverage"])
        lines.append(
            f"{target} prediction sets ({each}guarantee from {of_n}): {covered} covered, mean size "
            f"{sets['mean_set_size']:.2f}"
        )
        lines.append(f"  caveat: {metrics.COVERAGE_CAVEAT}")
    if numbers.get("selective"):
        images = (ood or {}).get("images") or (sets or {}).get("images")
        lines.append(selective_text(numbers["selective"], images))
    if numbers.get("shift_alarm"):
        lines.append(numbers["shift_alarm"]["text"])
    if not lines:
        lines.append("no out-of-distribution detector or prediction sets: the checkpoint carries no fit")
    return lines


@dataclass
class Evaluation:
    """Per-image results of one set: paths, labels (-1 unknown), probabilities, and which images leak."""

    name: str
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    probs: np.ndarray  # what the model answers (calibrated, when it is)
    leaking: np.ndarray  # duplicates of a train image (near-duplicate or identical), or of a patient with train images
    numbers: dict | None = None  # {"all", "leak_free", "uncalibrated"} from the module's metric collections
    raw_probs: np.ndarray | None = None  # before temperature scaling, when the model was calibrated
    temperature: float | None = None  # the fitted temperature, when the model was calibrated
    shares_with_test: int | None = None  # images this evaluation set shares with the test folder
    splits: dict | None = None  # the test report of a training run: images and groups on each side of the hold-out
    uncertainty: Uncertainty | None = None  # the out-of-distribution flag and prediction sets, when fitted

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    def _numbers(self, labels: np.ndarray, probs: np.ndarray, leaking: np.ndarray) -> dict:
        return {
            "all": metrics.evaluate(labels, probs, self.classes),
            "leak_free": metrics.evaluate(labels[~leaking], probs[~leaking], self.classes),
        }

    def metrics(self, settings: ReportSettings) -> dict | None:
        """All numbers of the labelled images, and again without the leaking ones when some leak; None if unlabelled."""
        labelled = self.labels >= 0
        if not labelled.any():
            return None
        y, p, leak = self.labels[labelled], self.probs[labelled], self.leaking[labelled]
        numbers = self.numbers or self._numbers(y, p, leak)
        resamples, seed = settings.bootstrap_resamples, settings.seed
        result = {"name": self.name, **metrics.with_intervals(numbers["all"], y, p, resamples, seed)}
        result["leak_free"], result["leaking_images"] = None, []
        if leak.any():
            paths = [path for path, k in zip(self.paths, labelled, strict=True) if k]
            result["leaking_images"] = [str(path) for path, k in zip(paths, leak, strict=True) if k]
            clean = numbers["leak_free"]  # {"n": 0} when every image duplicates a train image
            result["leak_free"] = metrics.with_intervals(clean, y[~leak], p[~leak], resamples, seed)
        if self.temperature is not None and numbers.get("uncalibrated"):
            after = {k: numbers["all"][k] for k in ("expected_calibration_error", "loss")}
            result["calibration"] = {"temperature": self.temperature, "before": numbers["uncalibrated"], "after": after}
        if self.shares_with_test is not None:
            result["shares_with_test"] = self.shares_with_test
        if self.splits:
            result["splits"] = self.splits
        if self.uncertainty is not None:
            result["uncertainty"] = self.uncertainty.subset(labelled).numbers(y, p)
        return result


def leak_free(report: dict) -> dict | None:
    """The leak-free metrics of a report: its own numbers when nothing leaks, None when everything does."""
    clean = report.get("leak_free")
    if clean is None:
        return report
    return clean if clean.get("n") else None


# --- files -------------------------------------------------------------------------------------------------------


def prediction_fields(classes: Sequence[str]) -> list[str]:
    """predictions.csv's columns, the same in training's test reports and predict.py (which adds error).
    modality and view come from a DICOM header (empty for other files): nothing else of a header is written."""
    probs = [f"prob_{c}" for c in classes]
    return ["path", "label", "modality", "view", "pred", *probs, *UNCERTAINTY_FIELDS, *SELECTIVE_FIELDS]


def prediction_row(
    path: str | Path,
    label: str,
    classes: Sequence[str],
    probs: np.ndarray | None,
    ood_score: float | None = None,
    in_set: np.ndarray | None = None,
    tags: ImageTags | None = None,
    confidence: float | None = None,
    accepted: bool | None = None,
) -> dict[str, str]:
    """One image's row of predictions.csv: the file's modality and view (read from its header when not given); the
    predicted class and every class's probability (none without probs: an error row); the detector's score minus its
    threshold and whether that passes; the prediction set, classes joined by '|' (empty when not fitted); the
    answer's confidence and whether it is accepted (empty without an acceptance threshold)."""
    tags = image_tags(path) if tags is None else tags
    row = {"path": str(path), "label": label, "modality": tags.modality, "view": tags.view}
    if probs is None:
        return row
    row["pred"] = classes[int(probs.argmax())]
    row |= {f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, probs, strict=True)}
    known = ood_score is not None and not np.isnan(ood_score)
    row["ood_score"] = f"{ood_score:.6f}" if known else ""
    row["in_distribution"] = str(int(ood_score <= 0)) if known else ""
    row["prediction_set"] = "|".join(c for c, k in zip(classes, in_set, strict=True) if k) if in_set is not None else ""
    row["confidence"] = f"{confidence:.6f}" if confidence is not None else ""
    row["accepted"] = str(int(accepted)) if accepted is not None else ""
    return row


def write_predictions(evaluation: Evaluation, path: Path) -> None:
    """Per image: path, label, pred, probabilities, leaking (what the sweep summary's paired test reads)."""
    classes, extra = evaluation.classes, evaluation.uncertainty
    n = len(evaluation.paths)
    scores = extra.ood_scores if extra else [None] * n
    sets = extra.sets if extra and extra.sets is not None else [None] * n
    confidence = extra.confidence if extra and extra.confidence is not None else [None] * n
    accepted = extra.accepted if extra and extra.accepted is not None else [None] * n
    with atomic_writer(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*prediction_fields(classes), "leaking"])
        writer.writeheader()
        for p, y, probs, leak, score, in_set, conf, acc in zip(
            evaluation.paths,
            evaluation.labels,
            evaluation.probs,
            evaluation.leaking,
            scores,
            sets,
            confidence,
            accepted,
            strict=True,
        ):
            row = prediction_row(p, classes[y] if y >= 0 else "", classes, probs, score, in_set, None, conf, acc)
            writer.writerow(row | {"leaking": int(leak)})


def report_figures(evaluation: Evaluation, report: dict, settings: ReportSettings, models=None) -> dict:
    """confusion_matrix, per_class, reliability (before and after calibration), gallery, and gradcam_gallery with
    the model(s), of the labelled images."""
    labelled = evaluation.labels >= 0
    paths = [p for p, k in zip(evaluation.paths, labelled, strict=True) if k]
    labels, probs = evaluation.labels[labelled], evaluation.probs[labelled]
    preds, confidence = probs.argmax(1), probs.max(1)
    panels = {"": (probs, report["expected_calibration_error"])}
    if report.get("calibration"):
        before = report["calibration"]["before"]["expected_calibration_error"]
        panels = {
            "before calibration, ": (evaluation.raw_probs[labelled], before),
            f"calibrated (T = {report['calibration']['temperature']:.2f}), ": panels[""],
        }
    chosen = figures.pick_gallery(preds.tolist(), labels.tolist(), settings.gallery_tiles)
    result = {
        "confusion_matrix": figures.confusion_figure(report, evaluation.name),
        "per_class": figures.per_class_figure(report),
        "reliability": figures.reliability_figure(labels, panels),
        "gallery": figures.gallery_figure(
            [display_image(paths[i], settings.limits) for i in chosen],
            preds[chosen].tolist(),
            labels[chosen].tolist(),
            evaluation.classes,
            confidence[chosen].tolist(),
        ),
    }
    extra = evaluation.uncertainty
    if extra is not None and extra.confidence is not None:
        chosen_answers = None if extra.accepted is None else extra.accepted[labelled]
        result["risk_coverage"] = figures.risk_coverage_figure(
            extra.confidence[labelled], preds == labels, chosen_answers, (extra.selective or {}).get("risk_target")
        )
    if models is not None and settings.gradcam_tiles:
        from chestxray.evaluation.saliency import gradcam_gallery

        result["gradcam_gallery"] = gradcam_gallery(
            paths, preds, labels, confidence, evaluation.classes, models, settings.limits, settings.gradcam_tiles
        )
    return result


def write_report(
    evaluation: Evaluation, out_dir: Path, settings: ReportSettings, models=None, predictions: bool = False
) -> tuple[dict | None, dict[str, np.ndarray]]:
    """metrics.json and the figures' PNGs in out_dir (and predictions.csv); returns the metrics and the figures'
    pixels (for the loggers). Below SMALL_SET labelled images only metrics.json is written."""
    report = evaluation.metrics(settings)
    if report is None:
        return None, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_dir / "metrics.json") as fh:
        json.dump(report, fh, indent=2)
    if predictions:
        write_predictions(evaluation, out_dir / "predictions.csv")
    if report["n"] < SMALL_SET:
        return report, {}
    try:
        drawn = report_figures(evaluation, report, settings, models)
    except BadImageError as err:  # a file changed or vanished since it was predicted: the numbers still stand
        atomic_write(out_dir / "figures_error.txt", f"figures not drawn: {err}\n")
        return report, {}
    return report, {name: figures.render(fig, out_dir / f"{name}.png") for name, fig in drawn.items()}


# --- what is printed ---------------------------------------------------------------------------------------------


def _interval(values: Sequence[float] | None) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "n/a"


def summary_text(report: dict) -> str:
    """The printed report: one screen, the numbers a reader checks first; leak-free numbers beside, if any.
    Below SMALL_SET labelled images, the accuracy alone: per-class rates of one or two images say nothing."""
    clean = report.get("leak_free")
    columns = [("all", report)] + ([("leak-free", clean)] if clean and clean.get("n") else [])
    lines = ["leak-free: none (every image duplicates a train image)"] if clean and not clean.get("n") else []
    if report["n"] < SMALL_SET:
        return "\n".join(
            [
                f"{report['correct']} of {report['n']} labelled image(s) right (below {SMALL_SET} images, counts: a "
                "rate would say no more)",
                *uncertainty_text(report.get("uncertainty")),
            ]
        )
    for label, m in columns:
        lo, hi = m["accuracy_ci95"]
        auc = m["macro_roc_auc_ovr"]
        auc_text = f"{auc:.3f} (95% CI {_interval(m.get('macro_roc_auc_ovr_ci95'))}, bootstrap)" if auc else "n/a"
        lines += [
            f"{label + ':':<11}accuracy {m['accuracy']:.3f} ({m['correct']}/{m['n']}), 95% CI {lo:.3f}-{hi:.3f} "
            f"(Wilson); macro ROC-AUC {auc_text}; ECE {m['expected_calibration_error']:.3f}; loss {m['loss']:.3f}"
        ]
    calibration = report.get("calibration")
    if calibration:
        before, after = calibration["before"], calibration["after"]
        lines.append(
            f"calibrated: temperature {calibration['temperature']:.3f} (fitted on the validation split): ECE "
            f"{before['expected_calibration_error']:.3f} -> {after['expected_calibration_error']:.3f}, "
            f"loss {before['loss']:.3f} -> {after['loss']:.3f}"
        )
    if report.get("splits"):
        sides = [
            f"{side} {s['images']} images in {s['groups']} groups"
            for side, s in report["splits"].items()
            if s["images"]
        ]
        lines.append("trained on the train split: " + "; ".join(sides) + " (a patient or a set of copies is one group)")
    lines += uncertainty_text(report.get("uncertainty"))
    if report.get("shares_with_test"):
        lines.append(
            f"shares {report['shares_with_test']} of its {report['n']} images with the test folder (identical or "
            "near-duplicate): not an independent set"
        )
    lines.append(f"{'class':<18}" + "".join(f"{'sens':>7}{'(95% CI)':>14}{'spec':>7}{'n':>5}" for _ in columns))
    for name in report["per_class"]:
        row = f"{name:<18}"
        for _, m in columns:
            c = m["per_class"][name]
            row += f"{_rate(c['sensitivity']):>7}{_interval(c.get('sensitivity_ci95')):>14}{_rate(c['specificity']):>7}"
            row += f"{c['support']:>5}"
        lines.append(row)
    width = max(len(c) for c in report["classes"]) + 2
    lines.append("confusion matrix, all images (rows: truth, columns: prediction)")
    lines.append(" " * width + "".join(f"{c[:10]:>12}" for c in report["classes"]))
    for name, row in zip(report["classes"], report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12}" for v in row))
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    """A rate to three decimals, or n/a where it is undefined (chestxray.evaluation.metrics.defined_per_class)."""
    return "n/a" if value is None else f"{value:.3f}"


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
        shared = f"  (shares {m['shares_with_test']} images with test)" if m.get("shares_with_test") else ""
        lines.append(f"{name:<16}{_accuracy(m)}{_accuracy(leak_free(m))}{auc_text:>10}{shared}")
    return "\n".join(lines)
