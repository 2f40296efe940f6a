"""A checkpoint written by chestxray 0.3.0, rebuilt from tests/fixtures/checkpoint-0.3.0.json: everything that
version wrote except the tensors, which are listed by shape and filled here from a fixed seed (a 32 px VGG19 is
80 MB; the fixture is a few kB). The fixture also holds the probabilities 0.3.0 gave for probe_images with those
weights, so a test can check that this version loads the file and answers the same."""

from __future__ import annotations

import numpy as np
import torch


def _fill(node, generator: torch.Generator):
    if isinstance(node, dict) and set(node) == {"tensor", "dtype"}:
        dtype = getattr(torch, node["dtype"])
        if dtype == torch.bool:
            return torch.ones(node["tensor"], dtype=dtype)
        if dtype.is_floating_point and len(node["tensor"]) > 1:  # weights at He scale, so the answers are not 0 or 1
            fan_in = int(np.prod(node["tensor"][1:]))
            noise = torch.randn(node["tensor"], generator=generator, dtype=torch.float64)
            return (noise * (2.0 / fan_in) ** 0.5).to(dtype)
        return torch.zeros(node["tensor"], dtype=dtype)
    if isinstance(node, dict):
        return {k: _fill(v, generator) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, generator) for v in node]
    return node


def fill_checkpoint(skeleton: dict) -> dict:
    """The checkpoint dict: seeded weights (temperature 1.5, calibrated) in the skeleton's shapes."""
    generator = torch.Generator().manual_seed(0)
    kept = {k: v for k, v in skeleton.items() if k not in ("expected_probabilities", "written_by")}
    checkpoint = {k: _fill(v, generator) for k, v in kept.items()}
    checkpoint["state_dict"]["temperature"] = torch.tensor(1.5)
    return checkpoint


def probe_images(size: int) -> np.ndarray:
    """Four fixed uint8 images (N x 3 x S x S)."""
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (4, 1, size, size), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(grey, 3, axis=1))
