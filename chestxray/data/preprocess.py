"""data.preprocess: histogram equalisation that removes some of the differences between scanners and exposures.

Applied at one place, on the model's view (`chestxray.data.images.model_view`, after the resize to S x S), so that
training, test, predict, ONNX (whose graph takes the same uint8 views), Grad-CAM and the robustness bench see the
same pixels, and the decoded-image store is keyed by it. The setting is kept in the checkpoint (the classifier's
`preprocess` hyper-parameter), so predict.py takes it from there.

- none: the notebook's pixels.
- equalize: global histogram equalisation (cv2.equalizeHist) of the grey image.
- clahe: contrast-limited adaptive equalisation (cv2.createCLAHE, clip 2.0 on an 8 x 8 grid of tiles): local
  contrast, with the noise amplification of plain equalisation limited.

Both turn the image grey (a radiograph is; the few colour files of the dataset are grey in RGB).
"""

from __future__ import annotations

import cv2
import numpy as np

PREPROCESS = ("none", "equalize", "clahe")
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)


def preprocess_image(image: np.ndarray, mode: str) -> np.ndarray:
    """H x W x 3 uint8 RGB -> the same shape, equalised as `mode` says ("none": the image itself)."""
    if mode == "none":
        return image
    if mode not in PREPROCESS:
        raise ValueError(f"data.preprocess={mode}: must be one of {', '.join(PREPROCESS)}")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if mode == "equalize":
        grey = cv2.equalizeHist(grey)
    else:
        grey = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(grey)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
