"""Checkpoints written whole, read safely (torch.load(weights_only=True)), loaded by Lightning, and one clear line
when a file is not one of ours or does not fit what it is used for."""

from __future__ import annotations

import inspect
import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from chestxray.data import sources
from chestxray.data.sources import TrainingData
from chestxray.errors import CheckpointError
from chestxray.models.classifier import ChestXrayClassifier
from chestxray.runtime.files import atomic_writer

log = logging.getLogger(__name__)
# What members of an ensemble must share (each applies its own normalisation and backbone inside the graph).
ENSEMBLE_KEYS = ("classes", "image_size", "preprocess")  # preprocess: on the uint8 views, before any graph
# What a run continued from a checkpoint must share with it (hyper-parameter: the config key that sets it).
RESUME_KEYS = {
    "classes": "data.classes",
    "image_size": "data.image_size",
    "preprocess": "data.preprocess",
    "mean": "model.mean",
    "std": "model.std",
    "backbone": "model.backbone",
}
# adapt.py's record, in adapted.ckpt, of the site images it was fitted on: [{"site", "paths", "labels"}, ...]
ADAPTED_ON = "chestxray_adapted_on"
UNFITTED = (
    "%s: nothing was fitted into this checkpoint after training (temperature, out-of-distribution detector, "
    "prediction sets, acceptance threshold): its probabilities are uncalibrated, and ood_score, in_distribution, "
    "prediction_set and accepted stay empty. train.py fits them into checkpoints/best.ckpt at the end of a run; "
    "last.ckpt is written before, to resume from"
)
# Loading for prediction: no ImageNet download, no compile, no feature cache.
INFERENCE = {"pretrained": False, "weights_path": None, "compile": False, "cache_features": False}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning writes (last.ckpt, best.ckpt) whole or not at all, on any local disk.

    Lightning's TorchCheckpointIO writes through an fsspec transaction, whose local file system stages the bytes in
    $TMPDIR and moves them into place: a rename on one file system, but a copy onto the checkpoint where $TMPDIR is
    another one (a tmpfs /tmp, outputs on a cluster's shared disk), so a kill during that copy leaves half of the last
    good resume point. Here the temporary file is beside the checkpoint, synced and renamed into place; other URLs
    (s3://, gs://) go to Lightning's own."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_writer(path, "wb") as fh:
            torch.save(checkpoint, fh)
        return None


def read_checkpoint(path: str | Path, setting: str = "ckpt") -> dict:
    """The checkpoint's dict, loaded without running any code from the file, with its hyper-parameters checked."""
    path = Path(path)
    where = f"{setting}={path}"
    if not path.is_file():
        raise CheckpointError(
            f"{where}: file not found (a .ckpt written by train.py, e.g. <run>/checkpoints/best.ckpt)"
        )
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as fh:
        is_pickle = fh.read(1) == b"\x80"  # the PROTO opcode that starts torch's legacy format
    if not (is_zip or is_pickle):
        raise CheckpointError(f"{where}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        # memory-mapped (zip format): checking a checkpoint before Lightning loads it does not read it whole twice
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip().startswith("Unsupported")), "")
        raise CheckpointError(
            f"{where}: refusing to load it: torch.load(weights_only=True) cannot read it, so it would need arbitrary "
            f"unpickling (code could run), which is not allowed for a checkpoint ({reason or type(err).__name__})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{where}: cannot read this checkpoint ({type(err).__name__}: {err})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "classes" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(f"{where}: not a chestxray checkpoint (no state_dict with class names in it)")
    if "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{where}: not a checkpoint written by Lightning (no pytorch-lightning_version in it)")
    known = set(inspect.signature(ChestXrayClassifier.__init__).parameters) - {"self"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise CheckpointError(
            f"{where}: its hyper_parameters have setting(s) this version does not know: {', '.join(unknown)} "
            "(written by another version of chestxray?)"
        )
    return checkpoint


def training_data(path: str | Path, setting: str = "ckpt") -> TrainingData:
    """The images the checkpoint was fitted on: its run's train images, from the data settings Lightning saved in it
    (the datamodule's hyper-parameters), and for adapt.py's adapted.ckpt the site images it was recalibrated (and
    perhaps fine-tuned) on. One source for every command, which moves with the checkpoint."""
    checkpoint = read_checkpoint(path, setting)
    run = sources.saved_training_data(checkpoint.get("datamodule_hyper_parameters"), f"{setting}={path}")
    sites = checkpoint.get(ADAPTED_ON) or []
    if run.train is None or not sites:
        return run
    named = ", ".join(f"{len(s['paths'])} of {s['site']}" for s in sites)
    fitted = [Path(p) for s in sites for p in s["paths"]]
    gone = [p for p in fitted if not p.is_file()]
    if gone:  # a leak check without them would count them as new: not known, rather than wrong
        note = f"the site images adapt.py fitted {setting}={path} on ({named}) are not all here ({gone[0]} is gone)"
        return replace(run, train=None, note=note)
    return replace(
        run,
        train=sources.LabelledFiles(
            [*run.train.paths, *fitted],
            [*run.train.labels, *(int(k) for s in sites for k in s["labels"])],
            f"{run.train.where} and the site images adapt.py fitted on",
        ),
        # with data.drop_leaking=true the run cleared its own test and evaluation images: one that adapt.py then
        # fitted on (a site that was an evaluation set) is no longer clear
        cleared=run.cleared - {str(p) for p in fitted},
        note=f"{run.note} and the site images adapt.py fitted it on ({named})",
    )


def load_model(path: str | Path, setting: str = "ckpt") -> ChestXrayClassifier:
    """The trained classifier of a checkpoint, in eval mode on the CPU: Lightning's load_from_checkpoint with
    weights_only=True, after read_checkpoint has said in one line what is wrong with a file that is not one."""
    written_with_fits = "ood.fitted" in read_checkpoint(path, setting)["state_dict"]  # older: on_load_checkpoint says
    try:
        model = ChestXrayClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, **INFERENCE)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{setting}={path}: its weights do not fit the model its hyper-parameters describe ({detail})"
        ) from None
    if written_with_fits and not (model.calibrated or model.ood.fitted or model.selective.fitted):
        log.warning(UNFITTED, f"{setting}={path}")
    return model.eval()


def mismatches(saved: Mapping[str, Any], wanted: Mapping[str, tuple[str, Any]]) -> list[str]:
    """'<setting>=<value> but the checkpoint has <saved value>' for each hyper-parameter that differs.

    `wanted` maps a hyper-parameter to (the setting that gives it, its value); a checkpoint older than a
    hyper-parameter has the model's default for it.
    """
    defaults = {k: p.default for k, p in inspect.signature(ChestXrayClassifier.__init__).parameters.items()}
    differ = []
    for key, (setting, value) in wanted.items():
        have = saved.get(key, defaults.get(key))
        if _plain(have) != _plain(value):
            differ.append(f"{setting}={value} but the checkpoint has {have}")
    return differ


def _plain(value):
    if isinstance(value, list | tuple):
        return [float(v) if isinstance(v, int | float) else v for v in value]
    return value


def preprocess_of(model: ChestXrayClassifier) -> str:
    """The data.preprocess a checkpoint was trained with ("none" for checkpoints older than the setting)."""
    return str(model.hparams.get("preprocess", "none"))


def load_models(paths: Sequence[str | Path], setting: str = "ckpt") -> list[ChestXrayClassifier]:
    """The members of an ensemble (or one model): each loaded, all predicting the same classes at one image size."""
    models = [load_model(p, setting) for p in paths]
    first = models[0].hparams
    for path, model in zip(paths[1:], models[1:], strict=True):
        differ = mismatches(model.hparams, {k: (f"{k} of {paths[0]}", first[k]) for k in ENSEMBLE_KEYS})
        if differ:
            raise CheckpointError(f"{setting}={path} cannot be averaged with {paths[0]}: {'; '.join(differ)}")
    return models
