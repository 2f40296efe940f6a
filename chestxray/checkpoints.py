"""Reading checkpoints safely (torch.load(weights_only=True)), with one clear line when a file is not one of ours."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from chestxray.model import ChestXrayClassifier

# What must agree between checkpoints that are averaged, or between a run and the checkpoint it resumes from.
PREPROCESSING = ("classes", "image_size", "mean", "std")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the setting, the file and what is wrong."""


def read_checkpoint(path: str | Path, setting: str = "ckpt") -> dict:
    """The checkpoint's dict, loaded without running any code from the file."""
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
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "", setting: str = "ckpt") -> ChestXrayClassifier:
    """The network from the checkpoint's own hyper-parameters and weights (no ImageNet download, no compile)."""
    hparams = {**checkpoint["hyper_parameters"], "pretrained": False, "weights_path": None, "cache_features": False}
    hparams["compile"] = False
    model = ChestXrayClassifier(**hparams)
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    try:
        model.load_state_dict(weights, strict=False)
        missing = [k for k in model.state_dict() if k.startswith("net.") and k not in weights]
        if missing:
            raise RuntimeError(f"missing {len(missing)} weights, e.g. {missing[:3]}")
    except RuntimeError as err:
        raise CheckpointError(
            f"{setting}={path}: weights do not fit the model its hyper-parameters describe: {err}"
        ) from None
    return model.eval()


def load_checkpoint(path: str | Path, setting: str = "ckpt") -> ChestXrayClassifier:
    return model_from_checkpoint(read_checkpoint(path, setting), path, setting)


def preprocessing_of(model: ChestXrayClassifier) -> dict:
    return {key: model.hparams[key] for key in PREPROCESSING}


def check_same_preprocessing(models: Sequence[ChestXrayClassifier], paths: Sequence[str | Path]) -> None:
    """Checkpoints averaged together must have the same classes, image size and normalisation."""
    first = preprocessing_of(models[0])
    for model, path in zip(models[1:], paths[1:], strict=True):
        other = preprocessing_of(model)
        differ = [f"{k}: {first[k]} vs {other[k]}" for k in PREPROCESSING if first[k] != other[k]]
        if differ:
            raise CheckpointError(f"ckpt={path} cannot be averaged with {paths[0]}: they differ in {'; '.join(differ)}")
