"""Which answers are accepted: the certified acceptance threshold kept in a checkpoint, and each answer's confidence.

Fitted after training on the validation split, in the same pass as the temperature, the out-of-distribution detector
and the conformal threshold (chestxray.training.fit.calibrate), and refitted on a new site's images by adapt.py. An
answer is accepted when the image is in distribution (the detector passes it) and its confidence reaches the
threshold that chestxray.evaluation.selective.certify chose so that accepted answers err at most
``model.selective.risk`` of the time, with probability at least 1 - ``model.selective.delta``.

The threshold is a buffer (+inf: the calibration images could not certify the risk, so nothing is accepted; NaN: not
fitted, e.g. a checkpoint written before it existed), so the checkpoint alone is enough. The confidence is computed
from the calibrated probabilities and the detector's score, outside the network (and the ONNX graph), so every
runtime gives it the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chestxray.errors import ConfigError
from chestxray.evaluation import selective

log = logging.getLogger(__name__)

# model.selective.confidence: benchmarks/confidence_benchmark.py (docs/benchmarks.md) compares them. *_gated: minus
# 1 for an answer the gate flags, so every such answer ranks below every other: on a shifted site it tracks mistakes
# where the probability alone does not (failure AUROC 0.82 against 0.68 on actualmed-site), and in distribution,
# where few are flagged, it is the probability itself. The gate is the detector as training fitted it
# (ood.margins): the flag itself until adapt.py recalibrates the detector to a site; after that the site counts as
# in distribution for the flag, but an image unlike the training images still ranks low (benchmarks/site_benchmark.py:
# 0.77 against 0.71 on actualmed-site's other images, gated by the recalibrated flag).
CONFIDENCE_KINDS = ("max_probability_gated", "max_probability", "margin", "doctor")
DEFAULT_CONFIDENCE = "max_probability_gated"
# certify()'s `needed`: accepted answers, at the lowest error rate among the thresholds it tested, that would certify
# the risk; calibration images needed are more (only a share of them is accepted)
NEEDED = "; roughly {} accepted answers at the lowest error rate seen would be needed"
DEFAULTS = {"confidence": DEFAULT_CONFIDENCE, "risk": 0.1, "delta": 0.1}


def check_settings(settings: dict | None) -> tuple[str, float, float]:
    """(confidence, risk, delta) of model.selective, or one ConfigError naming the setting."""
    settings = {**DEFAULTS, **dict(settings or {})}
    kind, risk, delta = settings["confidence"], settings["risk"], settings["delta"]
    if kind not in CONFIDENCE_KINDS:
        raise ConfigError(f"model.selective.confidence={kind}: must be one of {', '.join(CONFIDENCE_KINDS)}")
    for key, value in (("model.selective.risk", risk), ("model.selective.delta", delta)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ConfigError(f"{key}={value}: must be a number greater than 0 and less than 1")
    return str(kind), float(risk), float(delta)


def confidence_of(probs: np.ndarray, kind: str, gate: np.ndarray | None = None) -> np.ndarray:
    """Each answer's confidence (higher = more likely right) from its calibrated probabilities and, for a gated kind,
    the gate: the score minus the threshold of the detector as training fitted it (chestxray.models.ood.margins;
    above 0: unlike the training images, confidence lowered by 1; NaN: no detector). Until adapt.py recalibrates
    the detector to a site, the gate is the flag itself."""
    gated = kind.endswith("_gated")
    confidence = selective.CONFIDENCES[kind.removesuffix("_gated")](np.asarray(probs, np.float64))
    if gated and gate is not None:
        confidence = confidence - (np.asarray(gate, np.float64) > 0)
    return confidence


class AcceptanceThreshold(nn.Module):
    """The certified threshold and what it rests on, as buffers (saved in the checkpoint)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))
        self.register_buffer("bound", torch.ones((), dtype=torch.float64))  # certified error bound of accepted
        self.register_buffer("best_bound", torch.ones((), dtype=torch.float64))  # the lowest bound reachable
        self.register_buffer("needed", torch.tensor(-1, dtype=torch.long))  # images the target needs (-1: unknown)


def fit(
    probs: np.ndarray,
    labels: np.ndarray,
    ood_margin: np.ndarray,
    settings: dict | None,
    gate: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], selective.Certificate]:
    """The acceptance threshold of calibration images (their calibrated probabilities, labels, the detector's score
    minus its threshold, and the confidence's gate: the flag itself when not given): certify() over the images the
    detector passes (the flagged ones are never accepted, so they are not part of what the certificate is about).
    Returns the checkpoint's state entries and the certificate."""
    kind, risk, delta = check_settings(settings)
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    confidence = confidence_of(probs, kind, ood_margin if gate is None else gate)
    passes = ~(np.asarray(ood_margin, np.float64) > 0)  # NaN (no detector): every image passes
    confidence = np.where(passes, confidence, -np.inf)
    certificate = selective.certify(confidence, probs.argmax(1) == labels, risk, delta)
    state = {
        "selective.threshold": torch.tensor(certificate.threshold, dtype=torch.float64),
        "selective.fitted": torch.tensor(True),
        "selective.n_fit": torch.tensor(certificate.images),
        "selective.bound": torch.tensor(certificate.bound, dtype=torch.float64),
        "selective.best_bound": torch.tensor(certificate.best_bound, dtype=torch.float64),
        "selective.needed": torch.tensor(-1 if certificate.needed is None else certificate.needed),
    }
    return state, certificate


def certificate_text(certificate: selective.Certificate) -> str:
    """One line: what the threshold accepts and certifies, or why nothing is accepted and what would be needed."""
    target = f"error at most {certificate.risk:.0%} with probability {1 - certificate.delta:.0%}"
    if certificate.accepts_any:
        return (
            f"acceptance threshold {certificate.threshold:.4f} on {certificate.images} calibration images: accepts "
            f"{certificate.accepted} ({certificate.errors} wrong), certified {target} (bound {certificate.bound:.3f})"
        )
    needed = NEEDED.format(certificate.needed) if certificate.needed else ""
    return (
        f"no acceptance threshold: {certificate.images} calibration images cannot certify {target} (the best they "
        f"certify is {certificate.best_bound:.0%}){needed}; no answer is accepted"
    )


@dataclass
class Selection:
    """Per answer: its confidence, and whether it is accepted (None: the checkpoint carries no threshold)."""

    confidence: np.ndarray
    accepted: np.ndarray | None
    kind: str
    risk: float
    delta: float
    threshold: float | None  # +inf: nothing accepted; None: not fitted
    n_fit: int
    bound: float | None
    best_bound: float | None
    needed: int | None
    why_not: str = ""  # when accepted is None

    def as_dict(self) -> dict:
        """What metrics.json says about the threshold (JSON-safe: +inf is null with certified false)."""
        finite = self.threshold is not None and math.isfinite(self.threshold)
        return {
            "confidence": self.kind,
            "risk_target": self.risk,
            "delta": self.delta,
            "threshold": self.threshold if finite else None,
            "certified": finite,
            "calibration_images": self.n_fit,
            "certified_bound": self.bound if finite else None,
            "best_certifiable_risk": self.best_bound,
            "images_needed": self.needed,
            "why_not": self.why_not or None,
        }


def select(
    models: Sequence[nn.Module], probs: np.ndarray, ood_margin: np.ndarray, gate: np.ndarray | None = None
) -> Selection:
    """The confidence and acceptance of answers given by `models` (one checkpoint, or an ensemble's members), from
    their probabilities, the detector's flag margin and the confidence's gate (the flag margin when not given):
    the first member's confidence kind; an ensemble's averaged answers have no certified threshold of their own, so
    none is accepted (accepted None, and why)."""
    first = models[0]
    kind, risk, delta = check_settings(first.hparams.get("selective"))
    gate = ood_margin if gate is None else gate
    confidence = confidence_of(probs, kind, gate) if len(probs) else np.zeros(0)
    buffers: AcceptanceThreshold = first.selective
    fitted = bool(buffers.fitted)
    common = {
        "confidence": confidence,
        "kind": kind,
        "risk": risk,
        "delta": delta,
        "threshold": float(buffers.threshold) if fitted else None,
        "n_fit": int(buffers.n_fit),
        "bound": float(buffers.bound) if fitted else None,
        "best_bound": float(buffers.best_bound) if fitted else None,
        "needed": int(buffers.needed) if fitted and int(buffers.needed) >= 0 else None,
    }
    if len(models) > 1:
        return Selection(accepted=None, why_not="an ensemble's averaged answers have no certified threshold", **common)
    if not fitted:
        return Selection(accepted=None, why_not="the checkpoint carries no acceptance threshold", **common)
    margin = np.asarray(ood_margin, np.float64)
    accepted = ~(margin > 0) & (confidence >= float(buffers.threshold))
    return Selection(accepted=accepted, **common)
