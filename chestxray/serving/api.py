"""The LitAPI that answers POST /predict: the checkpoint(s) loaded as predict.py loads them, batched by LitServe."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from fastapi import HTTPException, Request

from chestxray.data.images import DISPLAY_SIDE, BadImageError, ImageLimits, decode_bytes
from chestxray.models.checkpoints import load_models, read_checkpoint
from chestxray.models.classifier import ChestXrayClassifier, Ensemble
from chestxray.models.selection import select

try:
    import litserve as ls
except ImportError:  # the serve extra is optional: chestxray.serving.server says which extra to install
    ls = None

# Fields a model's output may carry (the out-of-distribution check, conformal prediction sets): passed through to
# the JSON answer when the predictor provides them, absent otherwise.
OPTIONAL_FIELDS = ("ood_score", "in_distribution", "prediction_set", "confidence", "accepted")
LOW_CONFIDENCE = 0.5


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_info(paths: Sequence[str]) -> dict:
    """GET /info's model part, read from the checkpoints without building the network (the main process)."""
    members = []
    for path in paths:
        checkpoint = read_checkpoint(path)
        hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
        temperature = float(state["temperature"]) if "temperature" in state else 1.0
        calibrated = bool(state["calibrated"]) if "calibrated" in state else False
        members.append(
            {
                "checkpoint": Path(path).name,
                "sha256": sha256(path),
                "backbone": hparams.get("backbone"),
                "temperature": temperature,
                "calibrated": calibrated,
            }
        )
    first = read_checkpoint(paths[0])["hyper_parameters"]
    return {
        "classes": list(first["classes"]),
        "image_size": int(first["image_size"]),
        "preprocess": str(first.get("preprocess", "none")),  # data.preprocess, applied to uploads as in training
        "members": members,
    }


def display_from_bytes(data: bytes, limits: ImageLimits) -> np.ndarray:
    """The upload, upright RGB at a short side of DISPLAY_SIDE (as chestxray.data.images.display_image for files)."""
    image = decode_bytes(data, "upload", DISPLAY_SIDE, limits)
    scale = DISPLAY_SIDE / min(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def gradcam_png(models: Sequence[ChestXrayClassifier], view: torch.Tensor, data: bytes, target: int, limits) -> str:
    """The Grad-CAM overlay of the predicted class over the upload, PNG in base64."""
    from chestxray.evaluation.saliency import gradcam_maps, overlay

    heat = gradcam_maps(list(models), view[None], [target])[0]
    image = overlay(display_from_bytes(data, limits), heat)
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return base64.b64encode(png.tobytes()).decode() if ok else ""


def warnings_for(answer: dict, calibrated: bool, image_size: int) -> list[str]:
    """What a reader of the answer should know: plain sentences shown on the page."""
    notes = []
    if not calibrated:
        notes.append("the checkpoint is not calibrated (temperature 1): probabilities may be over-confident")
    if max(answer["probabilities"].values()) < LOW_CONFIDENCE:
        notes.append(f"low confidence: no class above {LOW_CONFIDENCE:.0%}")
    if min(answer["width"], answer["height"]) < image_size:
        notes.append(f"the image is smaller than the model's input ({image_size} px): it was enlarged")
    if answer.get("in_distribution") is False:
        notes.append("the image looks unlike the training images (out of distribution): do not trust the answer")
    return notes


def build_answer(
    classes: Sequence[str], probs: np.ndarray, width: int, height: int, extras: dict[str, Any] | None = None
) -> dict:
    """The JSON answer of one image; any of OPTIONAL_FIELDS that the model's output has passes through."""
    answer = {
        "class": classes[int(np.argmax(probs))],
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
        "width": width,
        "height": height,
    }
    for key in OPTIONAL_FIELDS:
        if extras and key in extras and extras[key] is not None:
            value = extras[key]
            answer[key] = value.tolist() if isinstance(value, np.ndarray | torch.Tensor) else value
    return answer


def selective_extras(models: Sequence[ChestXrayClassifier], probs: np.ndarray, margin: np.ndarray) -> dict[str, list]:
    """Each answer's confidence and acceptance, as predict.py writes them (chestxray.models.selection): accepted is
    absent when the checkpoint carries no acceptance threshold (or for an ensemble)."""
    chosen = select(models, probs, margin)
    extras: dict[str, list] = {"confidence": [float(c) for c in chosen.confidence]}
    if chosen.accepted is not None:
        extras["accepted"] = [bool(a) for a in chosen.accepted]
    return extras


class ClassifierAPI(ls.LitAPI if ls else object):
    """setup: load_models (weights_only) on the worker's device; predict: the Ensemble's fp32 probabilities."""

    def __init__(self, ckpts: Sequence[str], limits: ImageLimits, token: str | None, **litapi_kwargs):
        super().__init__(**litapi_kwargs)
        self.ckpts, self.limits, self.token = list(ckpts), limits, token

    def setup(self, device: str) -> None:
        torch.set_grad_enabled(False)
        self.models = load_models(self.ckpts)
        self.classes = self.models[0].classes
        self.image_size = int(self.models[0].hparams.image_size)
        self.calibrated = all(bool(m.calibrated) for m in self.models)
        self.torch_device = torch.device(device)
        self.ensemble = Ensemble(self.models).to(self.torch_device).eval()

    def authorize(self, request: Request) -> None:
        """token=...: every LitServe route (/predict, /health, /info) wants `Authorization: Bearer <token>`."""
        if self.token is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.token}":
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")

    def decode_request(self, request: dict) -> dict:
        """The view decoded by chestxray.serving.intake, back to a tensor (nothing here can fail on a bad file)."""
        size = self.image_size
        view = np.frombuffer(base64.b64decode(request["view"]), np.uint8).reshape(3, size, size)
        return {**request, "view": torch.from_numpy(view.copy())}

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def unbatch(self, outputs: list[dict]) -> list[dict]:
        return outputs

    def predict(self, inputs: list[dict] | dict) -> list[dict] | dict:
        """One forward pass for the batch, fp32 as predict.py (autocast off), then each answer."""
        single = isinstance(inputs, dict)
        items = [inputs] if single else inputs
        views = torch.stack([i["view"] for i in items])
        with torch.inference_mode(), torch.autocast(self.torch_device.type, enabled=False):
            probs, margin, sets = self.ensemble.probabilities(views.to(self.torch_device))
            probs = probs.float().cpu()
            extras = self._extras(margin.float().cpu(), sets.cpu())
            extras |= selective_extras(self.models, probs.numpy(), margin.double().cpu().numpy())
        answers = []
        for k, item in enumerate(items):
            p = probs[k].numpy()
            answer = build_answer(self.classes, p, item["width"], item["height"], {n: v[k] for n, v in extras.items()})
            answer["warnings"] = warnings_for(answer, self.calibrated, self.image_size)
            if item.get("gradcam"):
                answer["gradcam_png"] = self._gradcam(item, int(p.argmax()))
            answers.append(answer)
        return answers[0] if single else answers

    def _extras(self, margin: torch.Tensor, sets: torch.Tensor) -> dict[str, list]:
        """The out-of-distribution score (the detector's score minus its threshold), the flag and the prediction set
        of each image, as predict.py writes them (chestxray.models.ood); none for checkpoints without a fit (their
        score is NaN)."""
        if not len(margin) or bool(torch.isnan(margin).all()):
            return {}
        return {
            "ood_score": [float(m) for m in margin],
            "in_distribution": [bool(m <= 0) for m in margin],
            "prediction_set": [[c for c, k in zip(self.classes, row, strict=True) if k] for row in sets.tolist()],
        }

    def _gradcam(self, item: dict, target: int) -> str:
        try:
            return gradcam_png(
                self.models, item["view"].to(self.torch_device), base64.b64decode(item["image"]), target, self.limits
            )
        except BadImageError:  # decoded once already by the intake: cannot happen, but never fail the batch for it
            return ""

    def encode_response(self, output: dict) -> dict:
        return output
