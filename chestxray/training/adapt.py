"""adapt.py's work: a trained checkpoint meets a new site's labelled images.

1. Local validation: the checkpoint as it is, on every site image (it never saw them, so these numbers are out of
   sample): accuracy and per-class sensitivity with Wilson intervals, the share flagged and the folder-level alarm,
   the coverage of its prediction sets, its share accepted.
2. Recalibration on the site images (chestxray.models.recalibrate): temperature, the detector's bank and thresholds,
   conformal sets, the acceptance threshold.
3. Adaptation of the weights when it helps: the head fine-tuned on the site images, with the checkpoint's own
   training images mixed in where the data settings saved in it name them and they are here, chosen only
   when its cross-validated accuracy on the site images is above the unadapted model's.
4. Honest figures: every after-adaptation number is cross-fitted. The site images are split in k folds (grouped by
   patient where the folder's MANIFEST.tsv or a DICOM file's PatientID names them, stratified by class:
   scikit-learn's StratifiedGroupKFold); each fold's answers come from a recalibration (and fine-tuning) fitted on
   the other folds only. The written checkpoint is fitted on all of them; the cross-fitted numbers estimate how it
   does on new images of the site.

A folder with fewer than `min_per_class` images of a class it has is refused (AdaptError, exit 2); classes it lacks
are named as what cannot be estimated. No patient identifier is written anywhere: groups are used, never shown.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedGroupKFold

from chestxray import settings
from chestxray.data.datamodule import patient_of
from chestxray.data.images import BadImageError, ImageLimits, load_image
from chestxray.data.sources import TrainingData, find_inputs, text_table
from chestxray.errors import AdaptError
from chestxray.evaluation import figures, metrics, selective
from chestxray.evaluation.report import SMALL_SET
from chestxray.evaluation.robustness import leak_mask_of_runs
from chestxray.models import recalibrate, selection
from chestxray.models.checkpoints import ADAPTED_ON, load_model, preprocess_of, training_data
from chestxray.runtime.console import say, shown
from chestxray.runtime.files import atomic_write, atomic_writer

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.tsv"  # a site folder's optional file list: path (relative to the folder) and patient columns


@dataclass
class Site:
    """The site's readable labelled images, decoded at the model's size, and their patient groups."""

    paths: list[Path]
    labels: np.ndarray
    groups: np.ndarray  # integer codes: a patient (or an image when no patient is known)
    images: torch.Tensor  # N x 3 x S x S uint8
    grouped_by_patient: bool
    skipped: int = 0
    training_copies: int | None = None  # site images that copy a training image, left out (None: not compared)

    def without(self, drop: np.ndarray) -> Site:
        """The site without the images `drop` marks, counted as training copies."""
        keep = ~drop
        return replace(
            self,
            paths=[p for p, k in zip(self.paths, keep, strict=True) if k],
            labels=self.labels[keep],
            groups=self.groups[keep],
            images=self.images[torch.from_numpy(keep)],
            training_copies=int(drop.sum()),
        )


def drop_training_copies(site: Site, run: TrainingData, limits: ImageLimits) -> tuple[Site, str]:
    """The site without its images that copy one of the checkpoint's training images (perceptual hash, as the audit
    and training check), and a note: the checkpoint saw those, so they would flatter its numbers, and fine-tuning
    mixes training images into every fold's fit. Not compared (with the reason) where the run's training images
    cannot be listed."""
    mask, how = leak_mask_of_runs([run], site.paths, limits)
    if mask is None:
        return site, f"not compared with the checkpoint's training images: {how}"
    if not mask.any():
        return replace(site, training_copies=0), f"no site image copies a training image ({how})"
    return site.without(mask), (
        f"{int(mask.sum())} site image(s) copy a training image of the checkpoint ({how}): left out, as the "
        "checkpoint saw them"
    )


def read_site(folder: str | Path, model, limits: ImageLimits) -> Site:
    """The labelled images under `folder` (class folders named like the model's classes). Images in folders that
    name no class are left out with a warning naming those folders; a site none of whose images can be read is
    refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdaptError(f"site={folder}: not a folder (it should hold one folder of images per class)")
    found = find_inputs(str(folder), model.classes)
    inputs = [i for i in found if i.label is not None]
    if not inputs:
        raise AdaptError(f"site={folder}: no labelled images (expected class folders named {', '.join(model.classes)})")
    unlabelled = sorted({_first_folder(i.path, folder) for i in found if i.label is None})
    if unlabelled:
        log.warning(
            "site=%s: %d image(s) in %s, which name no class (%s): left out",
            folder,
            len(found) - len(inputs),
            ", ".join(unlabelled),
            ", ".join(model.classes),
        )
    size, images, kept, skipped = int(model.hparams.image_size), [], [], 0
    for item in inputs:
        try:
            images.append(torch.from_numpy(load_image(item.path, size, limits)))
            kept.append(item)
        except BadImageError as err:
            skipped += 1
            log.warning("skipped %s: %s", item.path, err.reason)
    if not kept:
        raise AdaptError(f"site={folder}: none of its {len(inputs)} labelled image(s) could be read (see the warnings)")
    paths = [i.path for i in kept]
    groups, by_patient = patient_groups(folder, paths)
    labels = np.array([i.label for i in kept], dtype=np.int64)
    return Site(paths, labels, groups, torch.stack(images), by_patient, skipped)


def _first_folder(path: Path, folder: Path) -> str:
    """The folder right under the site that holds `path`, as the user would name it ("." for the site itself)."""
    parts = path.relative_to(folder).parts
    return f"{parts[0]}/" if len(parts) > 1 else "."


def patient_groups(folder: Path, paths: Sequence[Path]) -> tuple[np.ndarray, bool]:
    """Integer group codes of the images' patients, as training groups them (chestxray.data.datamodule.patient_of):
    MANIFEST.tsv's patient column, else a DICOM file's PatientID as an opaque key; an image of no known patient is a
    group of its own. Also whether any patient was known."""
    listed: dict[str, str] = {}
    manifest = folder / MANIFEST
    if manifest.is_file():
        _, rows = text_table(manifest, "site", delimiter="\t")
        for _, row in rows:
            if row.get("path") and row.get("patient"):
                listed[str((folder / row["path"]).resolve())] = row["patient"]
    from_manifest = [listed.get(str(p.resolve())) for p in paths]
    if listed and not any(from_manifest):
        log.warning(
            "site=%s: %s names %d image(s), none of them among the site's images (its path column is relative to "
            "the site folder)",
            folder,
            MANIFEST,
            len(listed),
        )
    known = [patient_of(p, mine) for p, mine in zip(paths, from_manifest, strict=True)]
    keys = [key if key else f"image:{k}" for k, key in enumerate(known)]
    codes = {key: code for code, key in enumerate(dict.fromkeys(keys))}
    return np.array([codes[k] for k in keys], dtype=np.int64), any(known)


def check_site(site: Site, classes: Sequence[str], min_per_class: int, folder: str) -> list[str]:
    """Refuse a site with too few images of a class it has; return what cannot be estimated (classes it lacks)."""
    counts = np.bincount(site.labels, minlength=len(classes))
    dropped = f" once {site.training_copies} copies of training images are left out" if site.training_copies else ""
    if not len(site.labels):
        raise AdaptError(f"site={folder}: no image left{dropped}")
    few = [f"{classes[c]} has {counts[c]}" for c in range(len(classes)) if 0 < counts[c] < min_per_class]
    if few:
        raise AdaptError(
            f"site={folder}: {', '.join(few)} image(s){dropped}; adapt.py needs at least min_per_class="
            f"{min_per_class} images of each class the folder has (remove that class folder, or add images)"
        )
    present = [c for c in range(len(classes)) if counts[c]]
    if len(present) < 2:
        raise AdaptError(
            f"site={folder}: images of one class only ({classes[present[0]]}){dropped}; adapt.py needs two"
        )
    if len(np.unique(site.groups)) < 2:
        raise AdaptError(
            f"site={folder}: all {len(site.labels)} images{dropped} are of one patient (by {MANIFEST} or their "
            "DICOM PatientID); cross-fitting needs images of two patients at least"
        )
    notes = [
        f"{classes[c]}: no site images, so its sensitivity on this site and the sets' coverage for it cannot be "
        "estimated (recalibration never sees it)"
        for c in range(len(classes))
        if not counts[c]
    ]
    notes += [
        f"{classes[c]}: all its site images are of one patient, so the folds that hold that patient out are "
        "recalibrated without that class"
        for c in present
        if site.grouped_by_patient and len(np.unique(site.groups[site.labels == c])) < 2
    ]
    return notes


@torch.no_grad()
def trunk_features(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Backbone.trunk_and_stages of uint8 images, fp32, in batches (what the head and the detector take)."""
    model.eval()
    parts = [
        model.backbone.trunk_and_stages(model.net, model.preprocess(images[k : k + batch_size]))
        for k in range(0, len(images), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, model.backbone.width)


@torch.no_grad()
def head_logits(model, features: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model.backbone.head_on_pooled(model.net, features).float()


# --- the checkpoint's own training images (mixed into fine-tuning) -----------------------------------------------


def training_images(run: TrainingData, model, limits: ImageLimits, limit: int) -> tuple[torch.Tensor, np.ndarray, str]:
    """(images, labels, where) of up to `limit` of the checkpoint's train images (checkpoints.training_data: the data
    settings saved in it), drawn with a fixed seed; empty, with the reason, when they cannot be listed or read."""
    size = int(model.hparams.image_size)
    empty = torch.zeros(0, 3, size, size, dtype=torch.uint8), np.zeros(0, np.int64)
    if run.train is None:
        return *empty, f"the training images are not available here: {run.note}"
    if limit == 0:
        return *empty, "none asked (max_training_images=0)"
    train = run.train
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(train), min(limit, len(train)), replace=False)) if len(train) else []
    images, labels = [], []
    for k in chosen:
        try:
            images.append(torch.from_numpy(load_image(train.paths[k], size, limits)))
            labels.append(train.labels[k])
        except BadImageError:
            continue
    if not images:
        return *empty, f"no readable training images in {train.where}"
    return torch.stack(images), np.array(labels, np.int64), f"{len(images)} training images of {train.where}"


# --- weights: the head fine-tuned ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """adapt.finetune settings."""

    epochs: int = 30
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0


def finetune_head(
    model,
    features: torch.Tensor,
    labels: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None,
    tuning: Tuning,
) -> None:
    """Fine-tune the head in place on the site images' trunk features (full batches; the trunk is unchanged, so its
    features are computed once), the site and the training images weighing half each when training images are
    given: the site is learnt without forgetting what the training images taught."""
    torch.manual_seed(tuning.seed)
    head = model.backbone.head(model.net)
    params = [p for p in head.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=tuning.lr, weight_decay=tuning.weight_decay)
    head.train()
    with torch.enable_grad():
        for _ in range(tuning.epochs):
            optimizer.zero_grad()
            loss = F.cross_entropy(model.backbone.head_on_pooled(model.net, features), labels)
            if extra is not None and len(extra[1]):
                loss = 0.5 * loss + 0.5 * F.cross_entropy(model.backbone.head_on_pooled(model.net, extra[0]), extra[1])
            loss.backward()
            optimizer.step()
    head.eval()
    for p, flag in zip(params, saved, strict=True):
        p.requires_grad_(flag)


# --- cross-fitting -----------------------------------------------------------------------------------------------


@dataclass
class CrossFit:
    """Per-image outputs of models fitted without that image, and which images fitted each fold's model."""

    outputs: dict[str, np.ndarray]
    folds: list[dict[str, list[int]]] = field(default_factory=list)  # {"fit": [...], "held_out": [...]}


def split(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds stratified by class and grouped by patient; k at most the number of groups of the rarest class."""
    per_class = [len(np.unique(groups[labels == c])) for c in np.unique(labels)]
    k = min(max(2, min(folds, min(per_class))), len(np.unique(groups)))  # check_site: two groups at least
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def cross_fit(
    n: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    fit_and_answer: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
) -> CrossFit:
    """Each fold's held-out answers from fit_and_answer(fit_indices, held_out_indices), which must fit on the first
    only; assembled into per-image arrays in the images' order."""
    outputs: dict[str, np.ndarray] = {}
    record = []
    for fit_idx, held_idx in splits:
        if np.intersect1d(fit_idx, held_idx).size:
            raise ValueError("a fold's fitting images include held-out ones")
        answers = fit_and_answer(fit_idx, held_idx)
        for key, value in answers.items():
            if key not in outputs:
                outputs[key] = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
            outputs[key][held_idx] = value
        record.append({"fit": sorted(map(int, fit_idx)), "held_out": sorted(map(int, held_idx))})
    return CrossFit(outputs, record)


# --- numbers -----------------------------------------------------------------------------------------------------


def site_numbers(classes: Sequence[str], labels: np.ndarray, out: dict[str, np.ndarray], pass_rate: float) -> dict:
    """Accuracy and per-class sensitivity (Wilson intervals; classes without images: null), share flagged and the
    alarm, sets' coverage, share accepted and the accepted answers' accuracy, and the confidence's failure AUROC."""
    n = len(labels)
    correct = out["probs"].argmax(1) == labels
    flagged = out["margin"] > 0
    result: dict = {
        "n": n,
        "accuracy": float(correct.mean()),
        "accuracy_ci95": metrics.wilson_interval(correct.sum(), n),
    }
    result["sensitivity"] = {}
    for c, name in enumerate(classes):
        mine = labels == c
        k = int(correct[mine].sum())
        result["sensitivity"][name] = (
            {"value": k / mine.sum(), "ci95": metrics.wilson_interval(k, int(mine.sum())), "n": int(mine.sum())}
            if mine.any()
            else None
        )
    if not np.isnan(out["margin"]).all():
        alarm = selective.shift_alarm(int(flagged.sum()), n, pass_rate)
        result["flagged"] = int(flagged.sum())
        result["share_flagged"] = float(flagged.mean())
        result["alarm"] = {**alarm.as_dict(), "text": alarm.text()}
    covered = out["sets"][np.arange(n), labels]
    result["set_coverage"] = float(covered.mean())
    result["set_coverage_ci95"] = metrics.wilson_interval(int(covered.sum()), n)
    result["mean_set_size"] = float(out["sets"].sum(1).mean())
    accepted = out["accepted"].astype(bool)
    k = int(accepted.sum())
    result["accepted"] = k
    result["share_accepted"] = k / n
    result["accuracy_accepted"] = float(correct[accepted].mean()) if k else None
    result["accuracy_accepted_ci95"] = metrics.wilson_interval(int(correct[accepted].sum()), k) if k else None
    result["failure_auroc"] = _finite(selective.failure_auroc(out["confidence"], correct))
    result["aurc"] = _finite(selective.aurc(out["confidence"], correct))
    return result


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# --- the command -------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A way to adapt: recalibration only, or the head fine-tuned then recalibrated."""

    name: str
    finetune: bool


def adapt(cfg: DictConfig) -> dict:
    """Run adapt.py's job; returns the report. AdaptError (or another UserError) when it cannot."""
    for key in ("ckpt", "site"):
        if OmegaConf.is_missing(cfg, key):
            raise AdaptError(f"{key}= is required: python adapt.py ckpt=CHECKPOINT site=FOLDER")
    settings.check(cfg, settings.ADAPT_RULES)
    if not isinstance(cfg.ckpt, str):
        raise AdaptError(f"ckpt={cfg.ckpt}: adapt.py takes one checkpoint (adapt each member of an ensemble alone)")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.ckpt)
    if not bool(model.ood.fitted):
        raise AdaptError(
            f"ckpt={cfg.ckpt}: carries no out-of-distribution detector fitted in training (last.ckpt, or a checkpoint "
            "older than the detectors): adapt.py recalibrates it with the training images' rows in its bank, so "
            "give the run's checkpoints/best.ckpt"
        )
    limits = ImageLimits(cfg.max_pixels, cfg.min_image_side, preprocess=preprocess_of(model))
    site = read_site(cfg.site, model, limits)
    run = training_data(cfg.ckpt)  # the checkpoint's train images: copies of them are left out, some are mixed in
    if cfg.check_training_copies:
        site, copies = drop_training_copies(site, run, limits)
    else:
        copies = "not compared with the checkpoint's training images (check_training_copies=false)"
    notes = ([copies] if site.training_copies != 0 else []) + check_site(
        site, model.classes, int(cfg.min_per_class), str(cfg.site)
    )
    if not site.grouped_by_patient:
        notes.append(
            f"no patient known (no {MANIFEST} with a patient column, no DICOM PatientID): folds are split by image "
            "(images of one patient may fall on both sides, which flatters the after-adaptation numbers)"
        )
    features = trunk_features(model, site.images)
    raw = head_logits(model, features)
    labels = torch.from_numpy(site.labels)
    before = site_numbers(model.classes, site.labels, recalibrate.outputs(model, raw, features), model.pass_rate)

    extra, where = None, "no fine-tuning asked (adapt.finetune=false)"
    if cfg.finetune:
        images, train_labels, where = training_images(run, model, limits, int(cfg.max_training_images))
        if len(train_labels):
            extra = (trunk_features(model, images), torch.from_numpy(train_labels))
        else:
            notes.append(f"fine-tuned on the site images only: {where}")
    tuning = Tuning(int(cfg.epochs), float(cfg.lr), float(cfg.weight_decay), int(cfg.seed))
    candidates = [Candidate("recalibrated", False)] + ([Candidate("head fine-tuned", True)] if cfg.finetune else [])
    splits = split(site.labels, site.groups, int(cfg.folds), int(cfg.seed))

    def fitter(candidate: Candidate):
        def fit_and_answer(fit_idx: np.ndarray, held_idx: np.ndarray) -> dict[str, np.ndarray]:
            adapted, _ = adapted_model(model, candidate, features[fit_idx], labels[fit_idx], extra, tuning)
            logits = head_logits(adapted, features)
            return recalibrate.outputs(adapted, logits[held_idx], features[held_idx])

        return fit_and_answer

    crossed = {c.name: cross_fit(len(labels), splits, fitter(c)) for c in candidates}
    after = {name: site_numbers(model.classes, site.labels, c.outputs, model.pass_rate) for name, c in crossed.items()}
    comparison = paired_comparison(crossed, site.labels, float(cfg.finetune_level))
    chosen = candidates[-1] if comparison and comparison["chosen"] else candidates[0]
    final, calibration = adapted_model(model, chosen, features, labels, extra, tuning)
    target = out / "checkpoints" / "adapted.ckpt"
    path = write_checkpoint(cfg.ckpt, final, calibration.state, target, chosen.finetune, site, str(cfg.site))
    report = {
        "checkpoint": str(cfg.ckpt),
        "adapted_checkpoint": str(path),
        "site": str(cfg.site),
        "images": len(labels),
        "skipped": site.skipped,
        "training_copies": site.training_copies,
        "training_copies_check": copies,
        "per_class": {c: int((site.labels == k).sum()) for k, c in enumerate(model.classes)},
        "grouped_by_patient": site.grouped_by_patient,
        "groups": int(len(np.unique(site.groups))),
        "folds": [{"fit": len(f["fit"]), "held_out": len(f["held_out"])} for f in crossed[chosen.name].folds],
        "fine_tuning_images": where,
        "before": before,
        "after": after,
        "chosen": chosen.name,
        "fine_tuning_comparison": comparison,
        "final_fit": {
            "temperature": calibration.temperature,
            "acceptance": calibration.certificate.as_dict(),
            "acceptance_text": selection.certificate_text(calibration.certificate),
        },
        "notes": notes,
    }
    atomic_write(out / "site_report.json", json.dumps(report, indent=2))
    atomic_write(out / "site_report.md", report_markdown(report, model.classes))
    draw_risk_coverage(out, site.labels, crossed[chosen.name].outputs)
    say(summary_lines(report))
    return report


def adapted_model(model, candidate: Candidate, features, labels, extra, tuning: Tuning):
    """(a copy of `model`, its head fine-tuned (candidate.finetune) and recalibrated on these images, that fit).
    Always from the unadapted model: a detector refitted twice would have the images in its bank already, and its
    out-of-fold distances would be zero."""
    adapted = copy.deepcopy(model)
    if candidate.finetune:
        finetune_head(adapted, features, labels, extra, tuning)
    calibration = recalibrate.fit(adapted, head_logits(adapted, features), features, labels)
    recalibrate.apply(adapted, calibration.state)
    return adapted, calibration


def paired_comparison(crossed: dict[str, CrossFit], labels: np.ndarray, level: float) -> dict | None:
    """The fine-tuned head against the unadapted weights on the same cross-fitted images: images it gets right that
    they get wrong (wins) and the reverse (losses), and a one-sided sign test (scipy.stats.binomtest) of the wins
    among them. Fine-tuning is chosen only when p < level: with a few dozen images a higher accuracy by a couple of
    images is noise, and the weights as they were are then kept. None without a fine-tuned candidate."""
    if len(crossed) < 2:
        return None
    base, tuned = (c.outputs["probs"].argmax(1) == labels for c in crossed.values())
    wins, losses = int((tuned & ~base).sum()), int((~tuned & base).sum())
    p = float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue) if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p_value": p, "level": level, "chosen": p < level}


def write_checkpoint(source: str, model, state: dict, target: Path, with_head: bool, site: Site, folder: str) -> Path:
    """The source checkpoint with the site's fitted buffers (and the fine-tuned head's weights), loaded with
    weights_only; predict.py and serve.py take it like any other. It also records the site images it was fitted on
    (ADAPTED_ON: their paths and labels, no header field), so that checkpoints.training_data counts them with the
    run's train images: every leak-free number of the adapted checkpoint leaves them out, and adapting it again
    on the same images is refused as in-sample."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint[ADAPTED_ON] = [
        *checkpoint.get(ADAPTED_ON, []),
        {"site": folder, "paths": [os.path.realpath(p) for p in site.paths], "labels": [int(k) for k in site.labels]},
    ]
    checkpoint["state_dict"].update({k: v.clone() for k, v in state.items()})
    if with_head:
        prefix = f"net.{model.backbone.head_attr}."
        checkpoint["state_dict"].update(
            {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}
        )
    checkpoint.pop("optimizer_states", None)  # a site's head is not the optimizer's: start from it with init_from
    checkpoint.pop("lr_schedulers", None)
    with atomic_writer(target, "wb") as fh:  # whole or not at all, as training writes its checkpoints
        torch.save(checkpoint, fh)
    return target


def draw_risk_coverage(out: Path, labels: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
    correct = outputs["probs"].argmax(1) == labels
    fig = figures.risk_coverage_figure(outputs["confidence"], correct, outputs["accepted"].astype(bool))
    figures.render(fig, out / "site_risk_coverage.png")


# --- what is written and printed ---------------------------------------------------------------------------------


def _ci(values) -> str:
    return f"{values[0]:.2f}-{values[1]:.2f}" if values else "n/a"


def _row(name: str, m: dict, classes: Sequence[str]) -> str:
    sens = " | ".join(
        f"{m['sensitivity'][c]['value']:.2f} ({_ci(m['sensitivity'][c]['ci95'])})" if m["sensitivity"][c] else "n/a"
        for c in classes
    )
    acc_ok = f"{m['accuracy_accepted']:.2f} ({_ci(m['accuracy_accepted_ci95'])})" if m["accepted"] else "n/a"
    auroc = f"{m['failure_auroc']:.2f}" if m["failure_auroc"] is not None else "n/a"
    flagged = f"{m['share_flagged']:.0%}" if "share_flagged" in m else "n/a"
    alarm = ("yes" if m["alarm"]["fired"] else "no") if "alarm" in m else "n/a"
    return (
        f"| {name} | {m['accuracy']:.2f} ({_ci(m['accuracy_ci95'])}) | {sens} | {flagged} | {alarm} | "
        f"{m['set_coverage']:.2f} ({_ci(m['set_coverage_ci95'])}) | {m['share_accepted']:.0%} | {acc_ok} | {auroc} |"
    )


def report_markdown(report: dict, classes: Sequence[str]) -> str:
    unseen = f" (it never saw them: {report['training_copies_check']})" if report["training_copies"] == 0 else ""
    head = " | ".join(f"sens. {c} (95% CI)" for c in classes)
    lines = [
        f"# Site report: {report['images']} labelled images",
        "",
        f"Checkpoint `{report['checkpoint']}`; adapted checkpoint `{report['adapted_checkpoint']}` "
        f"({report['chosen']}).",
        "",
        f"'before': the checkpoint as it is, on every site image{unseen}. 'after': cross-fitted over "
        f"{len(report['folds'])} folds ({'grouped by patient' if report['grouped_by_patient'] else 'by image'}, "
        f"{report['groups']} groups): each image answered by a model recalibrated (and fine-tuned) on the other "
        "folds only. Intervals are 95% Wilson.",
        "",
        f"| model | accuracy | {head} | flagged | alarm | set coverage | accepted | accuracy of accepted | "
        "failure AUROC |",
        "|---" * (8 + len(classes)) + "|",
        _row("before", report["before"], classes),
        *[_row(f"after: {name}", m, classes) for name, m in report["after"].items()],
        "",
        f"Chosen: **{report['chosen']}**. " + comparison_text(report["fine_tuning_comparison"]),
        "",
        "Fine-tuning images: " + report["fine_tuning_images"] + ".",
        "",
        "The written checkpoint is fitted on all site images: " + report["final_fit"]["acceptance_text"] + ".",
        "",
        "## What these images can and cannot tell",
        "",
        *[f"- {line}" for line in what_it_tells(report)],
        *[f"- {note}" for note in report["notes"]],
        "",
    ]
    return "\n".join(lines)


def comparison_text(comparison: dict | None) -> str:
    if comparison is None:
        return "No fine-tuning tried (finetune=false)."
    verdict = "chosen" if comparison["chosen"] else "not chosen: the weights are kept as they were"
    return (
        f"The fine-tuned head, cross-fitted, is right on {comparison['wins']} images the unadapted weights get wrong "
        f"and wrong on {comparison['losses']} they get right (one-sided sign test p = {comparison['p_value']:.2g}; "
        f"fine-tuning is kept below finetune_level={comparison['level']}): {verdict}."
    )


def what_it_tells(report: dict) -> list[str]:
    n = report["images"]
    before = report["before"]
    lo, hi = before["accuracy_ci95"]
    lines = [
        f"With {n} images an accuracy is known to about ±{(hi - lo) / 2:.0%} (the 95% interval before adaptation "
        f"is {lo:.2f}-{hi:.2f}); differences between before and after smaller than that are not evidence.",
    ]
    acceptance = report["final_fit"]["acceptance"]
    if acceptance["threshold"] is None:
        needed = acceptance.get("needed")
        lines.append(
            f"Accepting answers at an error of at most {acceptance['risk']:.0%} cannot be certified from {n} images "
            f"(the best they certify is {acceptance['best_bound']:.0%})"
            + (selection.NEEDED.format(needed) if needed else "")
            + ": the adapted checkpoint accepts no answer."
        )
    return lines


def summary_lines(report: dict) -> str:
    b, a = report["before"], report["after"][report["chosen"]]
    lines = [
        f"site: {report['images']} images; before: accuracy {b['accuracy']:.3f} ({_ci(b['accuracy_ci95'])}), "
        f"{b.get('share_flagged', float('nan')):.0%} flagged, sets cover {b['set_coverage']:.0%}, "
        f"{b['share_accepted']:.0%} accepted",
    ]
    if "alarm" in b:
        lines.append("before: " + b["alarm"]["text"])
    ranks = report["images"] >= SMALL_SET and None not in (b["failure_auroc"], a["failure_auroc"])
    lines.append(
        f"after ({report['chosen']}, cross-fitted): accuracy {a['accuracy']:.3f} ({_ci(a['accuracy_ci95'])}), sets "
        f"cover {a['set_coverage']:.0%}, {a['share_accepted']:.0%} accepted"
        + (f" ({a['accuracy_accepted']:.3f} right)" if a["accepted"] else "")
        + (f"; failure AUROC of confidence {b['failure_auroc']:.3f} -> {a['failure_auroc']:.3f}" if ranks else "")
    )
    lines.append(comparison_text(report["fine_tuning_comparison"]))
    lines.append(report["final_fit"]["acceptance_text"])
    lines += report["notes"]
    lines.append(f"adapted checkpoint: {shown(report['adapted_checkpoint'])}")
    return "\n".join(lines)
