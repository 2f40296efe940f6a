"""The LitAPI that answers POST /predict: the checkpoint(s) loaded as predict.py loads them, batched by LitServe."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from chestxray.data.dicom import LATERAL_VIEWS
from chestxray.data.images import DISPLAY_SIDE, BadImageError, ImageLimits, ImageTags, decode_bytes
from chestxray.evaluation.report import prediction_row
from chestxray.models.checkpoints import load_models, read_checkpoint
from chestxray.models.classifier import ChestXrayClassifier, Ensemble
from chestxray.models.ood import check_settings as ood_settings
from chestxray.models.selection import select
from chestxray.serving import signals

UPLOAD_NAME = "upload"  # what a row calls the file: never the client's file name

try:
    import litserve as ls
except ImportError:  # the serve extra is optional: chestxray.serving.server says which extra to install
    ls = None

# predictions.csv's columns (chestxray.evaluation.report.prediction_row, the shared per-image code) that the answer
# carries in its own form or not at all; every other column that code adds (new per-image fields) passes through.
ROW_HANDLED = frozenset({"path", "label", "pred", "ood_score", "in_distribution", "prediction_set"})
NOT_SCORED = "not scored"  # the answer's "ood" when the detector gave no score (NaN), as predict.py's empty cell
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
        "pass_rate": ood_settings(dict(first.get("ood") or {}), {})[1],  # model.ood.pass_rate: the alarm's baseline
        "coverage": ood_settings({}, dict(first.get("conformal") or {}))[2],  # model.conformal.coverage
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
    if answer.get("view") in LATERAL_VIEWS:
        notes.append(f"lateral view (ViewPosition {answer['view']}): the model was trained on frontal (PA/AP) views")
    if answer.get("in_distribution") is False:
        notes.append("the image looks unlike the training images (out of distribution): do not trust the answer")
    if answer.get("accepted") in (False, 0):
        notes.append("not accepted by the checkpoint's acceptance rule: do not trust the answer")
    return notes


def _json_value(text: str):
    """A predictions.csv cell as JSON: empty -> null, a number -> the number, else the text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_answer(
    classes: Sequence[str],
    probs: np.ndarray,
    width: int,
    height: int,
    ood_score: float | None = None,
    in_set: np.ndarray | None = None,
    tags: ImageTags | None = None,
    confidence: float | None = None,
    accepted: bool | None = None,
) -> dict:
    """The JSON answer of one image, from predict.py's row of it (chestxray.evaluation.report.prediction_row): the
    same modality and view, the same NaN handling (no score -> "ood_score" and "in_distribution" null and "ood"
    "not scored", not a false flag), the prediction set only when fitted; every column that code adds beyond
    those (e.g. confidence, accepted) passes through, empty cells as null."""
    row = prediction_row(UPLOAD_NAME, "", classes, probs, ood_score, in_set, tags or ImageTags(), confidence, accepted)
    answer = {
        "class": row["pred"],
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
        "width": width,
        "height": height,
    }
    for key, value in row.items():
        if key not in ROW_HANDLED and not key.startswith("prob_"):
            answer[key] = _json_value(value) if key not in ("modality", "view") else value
    scored = row["ood_score"] != ""
    answer["ood_score"] = float(ood_score) if scored else None
    answer["in_distribution"] = row["in_distribution"] == "1" if scored else None
    flag = "in distribution" if answer["in_distribution"] else "out of distribution"
    answer["ood"] = flag if scored else NOT_SCORED
    if in_set is not None:
        answer["prediction_set"] = row["prediction_set"].split("|") if row["prediction_set"] else []
    return answer


class ClassifierAPI(ls.LitAPI if ls else object):
    """setup: load_models (weights_only) on the worker's device; predict: the Ensemble's fp32 probabilities."""

    def __init__(self, ckpts: Sequence[str], limits: ImageLimits, **litapi_kwargs):
        super().__init__(**litapi_kwargs)
        self.ckpts, self.limits = list(ckpts), limits

    def setup(self, device: str) -> None:
        signals.quiet_child()  # a spawned inference worker: no fork hook ran here
        torch.set_grad_enabled(False)
        self.models = load_models(self.ckpts)
        self.classes = self.models[0].classes
        self.image_size = int(self.models[0].hparams.image_size)
        self.calibrated = all(bool(m.calibrated) for m in self.models)
        self.with_sets = all(bool(m.conformal.fitted) for m in self.models)  # as predict.py's PredictionWriter
        self.torch_device = torch.device(device)
        self.ensemble = Ensemble(self.models).to(self.torch_device).eval()

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
            probs, margin, sets, gate = self.ensemble.probabilities(views.to(self.torch_device))
            probs, margin, sets = probs.float().cpu().numpy(), margin.double().cpu().numpy(), sets.bool().cpu().numpy()
        chosen = select(self.models, probs, margin, gate.double().cpu().numpy())  # as predict.py gives them
        answers = []
        for k, item in enumerate(items):
            tags = ImageTags(item.get("modality", ""), item.get("view_position", ""))
            in_set = sets[k] if self.with_sets else None
            accepted = None if chosen.accepted is None else bool(chosen.accepted[k])
            answer = build_answer(
                self.classes,
                probs[k],
                item["width"],
                item["height"],
                margin[k],
                in_set,
                tags,
                float(chosen.confidence[k]),
                accepted,
            )
            answer["warnings"] = warnings_for(answer, self.calibrated, self.image_size)
            if item.get("gradcam"):
                answer["gradcam_png"] = self._gradcam(item, int(probs[k].argmax()))
            answers.append(answer)
        return answers[0] if single else answers

    def _gradcam(self, item: dict, target: int) -> str:
        try:
            return gradcam_png(
                self.models, item["view"].to(self.torch_device), base64.b64decode(item["image"]), target, self.limits
            )
        except BadImageError:  # decoded once already by the intake: cannot happen, but never fail the batch for it
            return ""

    def encode_response(self, output: dict) -> dict:
        return output
