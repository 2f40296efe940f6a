"""Trust signals that track mistakes: selective answers with a certified risk, failure-detection scores, and the
folder-level alarm that needs no labels.

- **Confidence scores** (higher = more likely right): the candidates compared by benchmarks/confidence_benchmark.py.
  They take calibrated probabilities (or logits for energy), so they are cheap enough to compute in every answer.
- **certify()**: the threshold of Geifman and El-Yaniv's selection with guaranteed risk (SGR, "Selective
  classification for deep neural networks", NeurIPS 2017). A binary search over the calibration images' own
  confidences tests ceil(log2 n) thresholds; each gets a one-sided Clopper-Pearson bound on the error rate of the
  answers it accepts at level delta / ceil(log2 n), so all bounds hold together with probability at least 1 - delta
  (a union bound). The laxest tested threshold whose bound is within `risk` is kept. When none is, nothing is
  accepted, and the result says what risk the images could certify and roughly how many images the target needs.
  scikit-learn and torchmetrics have no selective-risk certificate, hence this small function (scipy gives the
  bound).
- **risk_coverage(), aurc(), failure_auroc()**: how well a confidence ranks right answers above wrong ones (Jaeger et
  al., "A call to reflect on evaluation practices for failure detection in image classification", ICLR 2023).
- **shift_alarm()**: a set's share flagged out of distribution against what the detector's threshold lets through,
  by a one-sided binomial test (scipy.stats.binomtest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def max_probability(probs: np.ndarray) -> np.ndarray:
    """The largest calibrated probability (maximum softmax)."""
    return probs.max(1)


def margin(probs: np.ndarray) -> np.ndarray:
    """The largest probability minus the second largest."""
    top2 = np.sort(probs, 1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def doctor(probs: np.ndarray) -> np.ndarray:
    """DOCTOR's D_alpha (Granese et al., NeurIPS 2021) as a confidence: the sum of squared probabilities, 1 for a
    one-hot answer and 1/K for a uniform one (D_alpha = 1 - this; its ratio form ranks the same way)."""
    return (probs**2).sum(1)


def neg_energy(logits: np.ndarray) -> np.ndarray:
    """Minus the energy, logsumexp of the logits (Liu et al. 2020): higher for images the model knows."""
    m = logits.max(1)
    return m + np.log(np.exp(logits - m[:, None]).sum(1))


CONFIDENCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_probability": max_probability,
    "margin": margin,
    "doctor": doctor,
}


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and the error rate of the k most confident answers, for k = 1..n (ties broken by the sort)."""
    order = np.argsort(-np.asarray(confidence, float), kind="stable")
    wrong = 1.0 - np.asarray(correct, float)[order]
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(wrong) / k


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The area under the risk-coverage curve (lower is better): the mean selective risk over every coverage."""
    if not len(confidence):
        return float("nan")
    return float(risk_coverage(confidence, correct)[1].mean())


def failure_auroc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """How often a right answer is more confident than a wrong one (0.5: chance); NaN when all are right or all
    wrong (nothing to rank)."""
    correct = np.asarray(correct, bool)
    if correct.all() or not correct.any():
        return float("nan")
    return float(roc_auc_score(correct, confidence))


def risk_bound(errors: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound, at level 1 - delta, on an error rate seen as errors / n."""
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, errors + 1, n - errors))


def images_needed(error_rate: float, risk: float, delta: float, limit: int = 100_000) -> int | None:
    """Roughly how many accepted images at this error rate a certificate of `risk` needs (None: not below risk)."""
    if error_rate >= risk:
        return None
    n = 1
    while n <= limit:
        if risk_bound(round(error_rate * n), n, delta) <= risk:
            return n
        n = max(n + 1, int(n * 1.1))
    return None


@dataclass(frozen=True)
class Certificate:
    """The acceptance threshold (accept when confidence >= threshold; +inf accepts nothing) and what it rests on."""

    threshold: float
    risk: float  # the target: accepted answers err at most this often...
    delta: float  # ...with probability at least 1 - delta over the calibration images
    images: int  # calibration images
    accepted: int  # of them accepted at the threshold
    errors: int  # wrong among those accepted
    bound: float  # the certified upper bound on the accepted answers' error rate (1 when nothing is accepted)
    best_bound: float  # the lowest bound any tested threshold reached: the risk these images could certify
    needed: int | None  # roughly how many calibration images the target would need at the error rate seen

    @property
    def accepts_any(self) -> bool:
        return math.isfinite(self.threshold)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def certify(confidence: np.ndarray, correct: np.ndarray, risk: float = 0.1, delta: float = 0.1) -> Certificate:
    """SGR (module docstring): the laxest of ceil(log2 n) binary-searched thresholds whose Clopper-Pearson bound at
    delta / ceil(log2 n) is within `risk`; +inf (accept nothing) when none is."""
    confidence = np.asarray(confidence, float)
    correct = np.asarray(correct, bool)
    keep = np.isfinite(confidence)
    confidence, correct = confidence[keep], correct[keep]
    n = len(confidence)
    if n == 0:
        return Certificate(math.inf, risk, delta, 0, 0, 0, 1.0, 1.0, None)
    order = np.argsort(confidence, kind="stable")
    sorted_conf = confidence[order]
    steps = max(1, math.ceil(math.log2(n)))
    low, high = 0, n - 1
    tested: list[tuple[float, int, int, float]] = []  # threshold, accepted, errors, bound
    for _ in range(steps):
        z = (low + high + 1) // 2 if high > low else low
        threshold = float(sorted_conf[z])
        accepted = confidence >= threshold
        errors = int((~correct[accepted]).sum())
        bound = risk_bound(errors, int(accepted.sum()), delta / steps)
        tested.append((threshold, int(accepted.sum()), errors, bound))
        if bound <= risk:
            high = z - 1 if z > 0 else 0
        else:
            low = min(z + 1, n - 1)
        if low > high:
            break
    good = [t for t in tested if t[3] <= risk]
    best_bound = min(t[3] for t in tested)
    overall_error = float((~correct).mean())
    needed = images_needed(min((t[2] / t[1] for t in tested if t[1]), default=overall_error), risk, delta / steps)
    if not good:
        return Certificate(math.inf, risk, delta, n, 0, 0, 1.0, best_bound, needed)
    threshold, accepted, errors, bound = min(good, key=lambda t: t[0])
    return Certificate(threshold, risk, delta, n, accepted, errors, bound, best_bound, needed)


@dataclass(frozen=True)
class Alarm:
    """A set's share flagged out of distribution, tested against what the detector's threshold lets through."""

    flagged: int
    images: int
    expected: float  # the share flagged that in-distribution images give: 1 - model.ood.pass_rate
    p_value: float
    level: float

    @property
    def fired(self) -> bool:
        return self.p_value < self.level

    def text(self, validate_command: str = "python adapt.py ckpt=CHECKPOINT site=FOLDER") -> str:
        share = self.flagged / self.images if self.images else 0.0
        rate = f" ({share:.0%})" if self.images >= 10 else ""  # below 10 images, the count says as much
        seen = f"{self.flagged} of {self.images} images flagged out of distribution{rate}"
        where = f"where about {self.expected:.0%} is expected (binomial test p = {self.p_value:.2g})"
        if not self.fired:
            return f"{seen}, {where}: no sign that the set as a whole is unlike the training images"
        return (
            f"ALARM: {seen}, {where}: these images are not like the training data; validate the model on labelled "
            f"images from this source before use ({validate_command})"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "fired": self.fired}


def shift_alarm(flagged: int, images: int, pass_rate: float, level: float = 0.01) -> Alarm:
    """One-sided binomial test of `flagged` of `images` against the share the threshold flags, 1 - pass_rate."""
    expected = 1.0 - pass_rate
    if images <= 0:
        return Alarm(0, 0, expected, 1.0, level)
    p_value = float(stats.binomtest(int(flagged), int(images), expected, alternative="greater").pvalue)
    return Alarm(int(flagged), int(images), expected, p_value, level)
