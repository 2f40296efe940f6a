"""Grad-CAM (pytorch-grad-cam) on the last convolutional block of VGG19, drawn over the source image."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from chestxray.model import GRADCAM_LAYER, ChestXrayClassifier


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


def gradcam_maps(
    model: ChestXrayClassifier, images: torch.Tensor, targets: Sequence[int], batch_size: int = 16
) -> np.ndarray:
    """Grad-CAM maps in [0, 1], N x S x S, for uint8 images N x 3 x S x S and the given target classes."""
    net = model.net
    device = next(net.parameters()).device
    maps = []
    was_training = net.training
    net.eval()
    # Grad-CAM needs gradients even when called from trainer.test or predict, which run in inference mode; and the
    # eager network (its hooks), when model.compile is on.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.compiler.set_stance("force_eager"),
        GradCAM(net, [net.features[GRADCAM_LAYER]]) as cam,
    ):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].clone().to(device)
            chunk_targets = [ClassifierOutputTarget(int(t)) for t in targets[start : start + batch_size]]
            maps.append(cam(model.preprocess(chunk), chunk_targets))
    net.train(was_training)
    return np.concatenate(maps) if maps else np.zeros((0, images.shape[-2], images.shape[-1]), np.float32)


def overlay(display: np.ndarray, heat: np.ndarray, title: str | None = None) -> np.ndarray:
    """The map (at the model's size) stretched over the display image (RGB uint8, any size), jet colours."""
    heat = cv2.resize(heat.astype(np.float32), (display.shape[1], display.shape[0]), interpolation=cv2.INTER_CUBIC)
    image = show_cam_on_image(display.astype(np.float32) / 255.0, np.clip(heat, 0, 1), use_rgb=True)
    return put_title(image, title) if title else image
