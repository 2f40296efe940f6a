"""Temperature scaling (Guo et al., 2017): one scalar T > 0, fitted on the validation split after training, so that
softmax(logits / T) are probabilities a reader can take as risks. It never changes a predicted class (dividing every
logit by the same positive number keeps their order)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

# The search range of T: outside it the validation split is too small or too separable to say anything.
T_MIN, T_MAX = 0.05, 20.0


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of the labels (bounded Brent search over log T).

    The NLL is convex in 1/T, so it has one minimum over the range and the search finds it (tested against a grid).
    """
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    result = minimize_scalar(
        lambda log_t: nll_at(logits, labels, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(result.x))


def identifiable_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """fit_temperature's T, or None when its lower bound T_MIN is as good as the minimum found: a validation split
    whose every image is right by a wide margin has its NLL falling all the way as T -> 0, so that minimum says how
    separable those few images are, not how confident the model should be, and T_MIN would make every answer
    near-certain. Such a checkpoint stays at T = 1. (The other end is kept: a T at T_MAX flattens the answers of a
    model whose validation logits carry no information, which errs on the side of doubt.)"""
    temperature = fit_temperature(logits, labels)
    # T_MIN as good as the minimum (the NLL can also flatten to 0 in float64 before T_MIN is reached)
    return None if nll_at(logits, labels, T_MIN) <= nll_at(logits, labels, temperature) + 1e-9 else temperature
