"""Grad-CAM (pytorch-grad-cam) on each backbone's last convolutional stage, drawn over the source image.

A model here is anything with the classifier's `net`, `backbone` and `preprocess` (chestxray.models.classifier): the
evaluation layer sits below the models and takes them as they are passed in, without importing them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from chestxray.data.images import BadImageError, ImageLimits, display_image, load_image
from chestxray.evaluation.figures import gallery_figure, pick_gallery

log = logging.getLogger(__name__)


def put_title(image: np.ndarray, text: str) -> np.ndarray:
    """Write text in the top-left corner, white on a dark band, sized to stay readable at any image size.

    A band rather than an outline: OpenCV advances each glyph by the stroke thickness, so a thicker outline drawn
    under the text drifts away from it along the line.
    """
    out = image.copy()
    scale = max(0.45, min(image.shape[:2]) / 420)
    thickness = max(1, round(scale * 1.6))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(4 * scale))
    cv2.rectangle(out, (0, 0), (width + 2 * pad, height + baseline + 2 * pad), (0, 0, 0), cv2.FILLED)
    origin = (pad, pad + height)
    cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


class _TrunkThenHead(torch.nn.Module):
    """The network run as trunk then head (chestxray.models.backbones): torchvision's output, without the in-place ReLU
    after DenseNet's last norm, which would rectify the activation Grad-CAM keeps for that layer."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone, net = self.model.backbone, self.model.net
        return backbone.head(net)(backbone.trunk(net, x))


def gradcam_maps(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    images: torch.Tensor,
    targets: Sequence[int],
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM maps in [0, 1], N x S x S, for uint8 images N x 3 x S x S and the given target classes; for several
    models (an ensemble), the average of their maps."""
    if not hasattr(models, "backbone"):  # several members (a list, a ModuleList): the average of their maps
        return np.mean([gradcam_maps(m, images, targets, batch_size) for m in models], axis=0)
    model = models
    device = next(model.net.parameters()).device
    maps = []
    was_training = model.training
    # Grad-CAM needs gradients even when called from trainer.test or predict, which run in inference mode; and the
    # eager network (its hooks), when model.compile is on. pytorch-grad-cam puts the model in eval mode.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.compiler.set_stance("force_eager"),
        GradCAM(_TrunkThenHead(model), [model.backbone.gradcam_layer(model.net)]) as cam,
    ):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].clone().to(device)
            chunk_targets = [ClassifierOutputTarget(int(t)) for t in targets[start : start + batch_size]]
            maps.append(cam(model.preprocess(chunk), chunk_targets))
    model.train(was_training)  # the module's own train(): frozen stages stay in eval mode
    return np.concatenate(maps) if maps else np.zeros((0, images.shape[-2], images.shape[-1]), np.float32)


def overlay(display: np.ndarray, heat: np.ndarray, title: str | None = None) -> np.ndarray:
    """The map (at the model's size) stretched over the display image (RGB uint8, any size), jet colours."""
    heat = cv2.resize(heat.astype(np.float32), (display.shape[1], display.shape[0]), interpolation=cv2.INTER_CUBIC)
    image = show_cam_on_image(display.astype(np.float32) / 255.0, np.clip(heat, 0, 1), use_rgb=True)
    return put_title(image, title) if title else image


def gradcam_gallery(
    paths: Sequence,
    preds: np.ndarray,
    labels: np.ndarray,
    confidences: np.ndarray,
    classes: Sequence[str],
    models,
    limits: ImageLimits,
    tiles: int,
) -> Figure:
    """Grad-CAM of a few images (every kind of mistake first), over the source images, with the colour scale."""
    models = [models] if hasattr(models, "backbone") else list(models)
    chosen = pick_gallery(preds.tolist(), labels.tolist(), tiles)
    size = models[0].hparams.image_size
    views = torch.from_numpy(np.stack([load_image(paths[i], size, limits) for i in chosen]))
    maps = gradcam_maps(models, views, preds[chosen].tolist())
    overlays = [overlay(display_image(paths[i], limits), heat) for i, heat in zip(chosen, maps, strict=True)]
    return gallery_figure(
        overlays,
        preds[chosen].tolist(),
        labels[chosen].tolist(),
        classes,
        confidences[chosen].tolist(),
        columns=3,
        colorbar="Grad-CAM: evidence for the predicted class",
    )


def write_overlays(
    folder: Path,
    models,
    images: torch.Tensor,
    paths: Sequence[Path],
    names: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    limits: ImageLimits,
) -> None:
    """One overlay PNG per image over the source at a readable size; a file that cannot be re-read is skipped."""
    if not len(paths):
        return
    folder.mkdir(parents=True, exist_ok=True)
    preds = probs.argmax(1).tolist()
    maps = gradcam_maps(models, images, preds)
    for path, name, heat, pred, p in zip(paths, names, maps, preds, probs, strict=True):
        try:
            image = overlay(display_image(path, limits), heat, f"{classes[pred]} {p[pred]:.2f}")
        except BadImageError as err:  # changed or gone since it was predicted: its row stands, its overlay cannot
            log.warning("no Grad-CAM overlay for %s: %s", path, err.reason)
            continue
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
