"""Grad-CAM overlays (pytorch-grad-cam) on the last convolutional block of VGG19."""

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
    """Write text in the top-left corner, white on a dark outline, keeping the image size."""
    out = image.copy()
    scale = max(0.3, image.shape[1] / 450)
    thickness = max(1, round(scale * 2))
    origin = (4, 4 + round(18 * scale))
    cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def gradcam_overlays(
    model: ChestXrayClassifier,
    images: torch.Tensor,
    targets: Sequence[int],
    titles: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """One RGB overlay per uint8 image (N x 3 x S x S), at the model's input size, for the given classes."""
    net = model.net
    device = next(net.parameters()).device
    overlays: list[np.ndarray] = []
    was_training = net.training
    net.eval()
    # Grad-CAM needs gradients even when called from trainer.test or predict, which run in inference mode.
    with torch.inference_mode(False), torch.enable_grad(), GradCAM(net, [net.features[GRADCAM_LAYER]]) as cam:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].clone().to(device)
            x = model.preprocess(chunk)
            maps = cam(x, [ClassifierOutputTarget(int(t)) for t in targets[start : start + batch_size]])
            for k, heat in enumerate(maps):
                rgb = chunk[k].permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
                overlay = show_cam_on_image(rgb, heat, use_rgb=True)
                if titles is not None:
                    overlay = put_title(overlay, titles[start + k])
                overlays.append(overlay)
    net.train(was_training)
    return overlays
