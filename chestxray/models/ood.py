"""What a trained classifier knows it does not know: an out-of-distribution flag and split-conformal prediction sets.

Both are fitted after training on the validation split of the best checkpoint (chestxray.training.fit.calibrate, the
same pass that fits the temperature) and kept as buffers of the classifier, so the checkpoint alone is enough and the
ONNX graph computes the same numbers (its extra outputs).

Detectors (a score per image, higher = less like the validation images):
- ``msp``: minus the maximum softmax probability of the calibrated logits (Hendrycks & Gimpel, 2017);
- ``energy``: minus T-logsumexp of the raw logits, T = 1 (Liu et al., 2020);
- ``mahalanobis``: half the squared Mahalanobis distance of the pooled features to the nearest class mean, with one
  covariance shared by the classes (Lee et al., 2018);
- ``knn``: Euclidean distance of the unit-length pooled features to the nearest unit-length training feature
  (Sun et al., 2022, k = 1);
- ``knn_layers`` (the default): the same distance at the end of every stage of the backbone (each stage's output
  averaged over its positions, Backbone.trunk_and_stages), each standardised by the validation images' distances and
  summed: the feature ensemble of Lee et al. (2018) applied to KNN. The pooled features of a classifier trained on
  three classes of radiographs keep only what separates those classes, so a photograph or a page of text can land
  near a radiograph there; the early stages still see grey levels, texture and edges that no radiograph has. On the
  benchmark (docs/benchmarks.md) it lets 1% of far out-of-distribution images through where ``knn`` lets 35%.

All five are written here rather than called from pytorch-ood (tests/test_ood.py checks the first four against
pytorch-ood's score on the same logits, features and statistics): its Mahalanobis and KNN keep their statistics as
plain attributes (not buffers, so not in a checkpoint); its KNN searches with scikit-learn (not exportable to ONNX);
its Mahalanobis inverts the raw scatter matrix, which is singular when there are fewer images than feature
dimensions, so we shrink the covariance (Ledoit-Wolf) instead; and importing it adds about 2 s to every predict.py
start for the two one-line formulas of msp and energy. pytorch-ood has no multi-layer KNN.

Mahalanobis and KNN statistics (class means, shared covariance, the KNN bank) come from the training images'
features (without augmentation; at most MAX_BANK of them in the bank, a seeded sample); every detector's threshold
lets ``pass_rate`` (default 95%) of the validation images through, scored against those statistics. Fitting the
statistics on the 38 validation images alone (the fallback when no training features are given, with out-of-fold
scores so an image is not its own nearest neighbour) let 63% of far out-of-distribution images through ``knn`` on
the benchmark, against 23% with the training images' (an earlier quickstart model, docs/benchmarks.md): with few
reference images, in-distribution images are far from all of them too.

Prediction sets are split-conformal with the LAC score, 1 - p(true class) (Sadinle et al., 2019): of the methods with
the marginal guarantee, it gives the smallest sets on average, which is what a reader of three classes needs; APS
adapts the set size to the image but is larger on average and needs randomisation to be exact. The set is every class
whose calibrated probability is at least 1 - q, where q is the ceil((n+1)(1 - alpha))-th smallest validation score,
plus the predicted class (so never empty; this only adds coverage). The guarantee is marginal and rests on the
validation and new images being exchangeable: it says nothing for images outside the distribution, and with n
validation images the achieved coverage varies around the target by about sqrt(alpha(1-alpha)/n). And the same
validation images pick the best epoch, fit the temperature, set the detector thresholds and calibrate the sets
(evaluation.metrics.COVERAGE_CAVEAT, said wherever the coverage is claimed): the guarantee holds only for images
exchangeable with them, and is optimistic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf
from torch import nn

from chestxray.errors import ConfigError
from chestxray.evaluation.metrics import COVERAGE_CAVEAT

log = logging.getLogger(__name__)

DETECTORS = ("msp", "energy", "mahalanobis", "knn", "knn_layers")
DEFAULT_DETECTOR = "knn_layers"  # the best on benchmarks/ood_benchmark.py (docs/benchmarks.md)
DEFAULT_BEFORE_KNN_LAYERS = "knn"  # what checkpoints fitted before knn_layers used when their settings named none
MAX_BANK = 4096  # KNN rows kept in the checkpoint: 4 bytes x (width + sum of stage widths), 32 MB for VGG19;
# an adapted checkpoint keeps these and at most as many site rows (chestxray.models.recalibrate.bank_rows)
OUT_OF_FOLD = 10  # folds for the out-of-fold validation scores of the fitted detectors


def check_settings(ood: dict, conformal: dict) -> tuple[str, float, float]:
    """(detector, pass_rate, coverage) of model.ood and model.conformal, or one ConfigError naming the setting."""
    detector = ood.get("detector", DEFAULT_DETECTOR)
    pass_rate, coverage = ood.get("pass_rate", 0.95), conformal.get("coverage", 0.90)
    if detector not in DETECTORS:
        raise ConfigError(f"model.ood.detector={detector}: must be one of {', '.join(DETECTORS)}")
    for key, value in (("model.ood.pass_rate", pass_rate), ("model.conformal.coverage", coverage)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ConfigError(f"{key}={value}: must be a number greater than 0 and less than 1")
    return detector, float(pass_rate), float(coverage)


# --- scores (torch: what the checkpoint and the ONNX graph compute) -------------------------------------------------


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Minus the maximum softmax probability: pytorch-ood's MaxSoftmax.score."""
    return -logits.softmax(1).amax(1)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Minus logsumexp of the logits (T = 1): pytorch-ood's EnergyBased.score."""
    return -torch.logsumexp(logits, 1)


def unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """0.5 * min over classes of (f - mu_c)' P (f - mu_c): pytorch-ood's Mahalanobis score."""
    centred = features.double()[:, None, :] - means.double()[None, :, :]  # N x C x D, float64 as in knn
    return (0.5 * ((centred @ precision.double()) * centred).sum(-1).amin(1)).float()


def knn(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Distance of the unit-length features to the nearest row of `bank` (unit-length already)."""
    # |a - b|^2 = 2 - 2 a.b for unit vectors: a matrix product (torch.cdist has no ONNX export), in float64 because
    # near neighbours have a.b close to 1 and float32's cancellation would move the distance by about 1e-2
    nearest = (unit(features.double()) @ bank.double().T).amax(1)
    return (2.0 - 2.0 * nearest).clamp(min=0.0).sqrt().float()


def stage_distances(layers: list[torch.Tensor], banks: list[torch.Tensor], n: int) -> torch.Tensor:
    """N x stages: each stage's KNN distance to its bank (N x 0 for a backbone that declares no stages)."""
    if not layers:
        return torch.zeros(n, 0)
    return torch.stack([knn(f, bank) for f, bank in zip(layers, banks, strict=True)], 1)


def knn_layers(distances: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum over the stages of each stage's KNN distance (stage_distances), standardised by the validation images'
    distances (their mean and standard deviation): a stage that is far for every image weighs no more than one that is
    near for all. NaN without stages: no score, so no threshold and no flag (like an unfitted detector)."""
    z = ((distances - centre) / scale).sum(1)
    return z if distances.shape[1] else z + float("nan")


def split_features(features: torch.Tensor, detector: OodDetector) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pooled features, [each stage's mean output]) of Backbone.trunk_and_stages' N x (width + sum of stages)."""
    widths = [detector.class_means.shape[1]] + [bank.shape[1] for bank in detector.layer_banks()]
    pooled, *layers = torch.split(features.flatten(1).float(), widths, dim=1)
    return pooled, layers


def all_scores(
    raw_logits: torch.Tensor,
    temperature: torch.Tensor,
    features: torch.Tensor,
    detector: OodDetector,
    origin: bool = False,
) -> torch.Tensor:
    """N x 5: every detector's score (columns in DETECTORS order), higher = more unusual. With `origin`, the scores
    of the detector as training fitted it, before adapt.py added a site (OodDetector's origin buffers)."""
    pooled, layers = split_features(features, detector)
    banks = [detector.bank, *detector.layer_banks()]
    centre, scale = detector.layer_centre, detector.layer_scale
    if origin:  # the training images' rows only: a site's row stands in for the first row (a training image's);
        # a bank without a row per origin flag (a stage bank of a checkpoint fitted before knn_layers) is left as it is
        rows = detector.origin_rows
        banks = [torch.where(rows[:, None], bank, bank[:1]) if len(rows) == len(bank) else bank for bank in banks]
        centre, scale = detector.origin_centre, detector.origin_scale
    distances = stage_distances(layers, banks[1:], pooled.shape[0])  # not len(): it fixes the batch
    return torch.stack(
        [
            msp(raw_logits.float() / temperature),
            energy(raw_logits.float()),
            mahalanobis(pooled, detector.class_means, detector.precision),
            knn(pooled, banks[0]),
            knn_layers(distances, centre, scale),
        ],
        dim=1,
    )


def margins(
    raw_logits: torch.Tensor, temperature: torch.Tensor, features: torch.Tensor, detector: OodDetector, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the chosen detector's score minus its threshold: the flag; the same for the detector as training fitted it:
    the confidence's gate). They are one and the same until adapt.py recalibrates the detector to a site, which
    then counts as in distribution; the gate still says how unlike the training images an image is, and the
    network's answers are least reliable there (docs/benchmarks.md, a new site)."""
    margin = all_scores(raw_logits, temperature, features, detector)[:, k] - detector.thresholds[k]
    if detector.origin_rows.shape[0] == 1:  # never recalibrated (a shape, so the ONNX export takes the same path)
        return margin, margin
    origin = all_scores(raw_logits, temperature, features, detector, origin=True)[:, k] - detector.origin_thresholds[k]
    # recalibrated from a detector never fitted: no trained detector to gate with (a value: no Python branch on it)
    return margin, torch.where(torch.isnan(detector.origin_thresholds[k]), margin, origin)


class OodDetector(nn.Module):
    """The fitted statistics and thresholds, as buffers (saved in the checkpoint, traced into the ONNX graph).

    Before a fit (or in a checkpoint from before detectors existed) the thresholds are NaN, so every score minus its
    threshold is NaN: the columns stay empty rather than show a flag nobody fitted.
    """

    def __init__(self, num_classes: int, width: int, stage_widths: tuple[int, ...]):
        super().__init__()
        self.register_buffer("class_means", torch.zeros(num_classes, width))
        self.register_buffer("precision", torch.eye(width))
        self.register_buffer("bank", torch.zeros(1, width))  # one row: a minimum over no rows does not exist
        self.stages = len(stage_widths)
        for j, stage_width in enumerate(stage_widths):  # knn_layers: a bank per stage, and its standardisation
            self.register_buffer(f"layer_bank{j}", torch.zeros(1, stage_width))
        self.register_buffer("layer_centre", torch.zeros(self.stages))
        self.register_buffer("layer_scale", torch.ones(self.stages))
        self.register_buffer("thresholds", torch.full((len(DETECTORS),), float("nan")))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # validation images (the thresholds)
        self.register_buffer("n_reference", torch.zeros((), dtype=torch.long))  # images of the statistics
        # the detector as training fitted it, kept by adapt.py's recalibration (chestxray.models.recalibrate): which
        # bank rows are the training images' (one True row: all of them), their standardisation and thresholds (NaN:
        # never recalibrated, the detector is its own origin)
        self.register_buffer("origin_rows", torch.ones(1, dtype=torch.bool))
        self.register_buffer("origin_centre", torch.zeros(self.stages))
        self.register_buffer("origin_scale", torch.ones(self.stages))
        self.register_buffer("origin_thresholds", torch.full((len(DETECTORS),), float("nan")))

    def layer_banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"layer_bank{j}") for j in range(self.stages)]


def upgrade_state(state: dict[str, torch.Tensor], prefix: str = "ood.") -> bool:
    """A checkpoint fitted before knn_layers existed: its four thresholds get a NaN one for it (no flag nobody
    fitted), so it loads and its own detector (model.ood.detector in its settings) works as it did. True when the
    state was such a checkpoint's."""
    thresholds = state.get(prefix + "thresholds")
    if thresholds is None or len(thresholds) >= len(DETECTORS):
        return False
    missing = torch.full((len(DETECTORS) - len(thresholds),), float("nan"), dtype=thresholds.dtype)
    state[prefix + "thresholds"] = torch.cat([thresholds, missing])
    return True


def take_shapes(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Give the module's buffers the shapes saved in `state` (the KNN bank has a row per validation image, the class
    means a row per class present), so that load_state_dict can copy them; missing entries get the current ones."""
    for name, buffer in module.named_buffers():
        saved = state.setdefault(prefix + name, buffer.clone())
        if saved.shape != buffer.shape:
            setattr(module, name, torch.empty_like(saved, device=buffer.device))


class ConformalSets(nn.Module):
    """The LAC threshold as a probability: a class is in the set when its calibrated probability reaches min_prob."""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_prob", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))


def prediction_sets(probs: torch.Tensor, min_prob: torch.Tensor) -> torch.Tensor:
    """N x K bool: the classes at or above min_prob, and always the predicted one."""
    top = nn.functional.one_hot(probs.argmax(1), probs.shape[1]).bool()
    return (probs >= min_prob) | top


# --- fitting (after training, on the validation split) ----------------------------------------------------------


def fit_gaussian(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (of the classes present) and the precision of the shared Ledoit-Wolf-shrunk covariance.

    The precision is the pseudo-inverse: shrinkage makes the covariance invertible whenever the images spread at all
    within their classes, but with one image per class (a tiny split) the centred features are all zero and so is
    the shrunk covariance; its pseudo-inverse (zero) makes every Mahalanobis score 0 instead of crashing the fit."""
    x, y = features.double().numpy(), labels.numpy()
    present = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in present])
    centred = x - means[np.searchsorted(present, y)]
    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    precision = np.linalg.pinv(covariance, hermitian=True)
    return torch.from_numpy(means).float(), torch.from_numpy(precision).float()


def out_of_fold_scores(
    features: torch.Tensor, labels: torch.Tensor, layers: list[torch.Tensor], folds: int = OUT_OF_FOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x 2: each image's Mahalanobis and KNN score, N x stages: its KNN distance at each stage), from statistics
    fitted on the other folds (seeded folds)."""
    n = len(features)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    scores, distances = torch.zeros(n, 2), torch.zeros(n, len(layers))
    for part in torch.tensor_split(order, min(folds, n)):
        rest = torch.ones(n, dtype=torch.bool)
        rest[part] = False
        means, precision = fit_gaussian(features[rest], labels[rest])
        scores[part, 0] = mahalanobis(features[part], means, precision)
        scores[part, 1] = knn(features[part], unit(features[rest]))
        for j, layer in enumerate(layers):
            distances[part, j] = knn(layer[part], unit(layer[rest]))
    return scores, distances


def standardise(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stage, the mean and standard deviation of the validation images' KNN distances (knn_layers' weights)."""
    centre = distances.double().mean(0)
    if len(distances) < 2:
        return centre.float(), torch.ones_like(centre).float()
    # floored at 1% of the stage's mean distance (and 1e-3): a stage where every validation image is at nearly the
    # same distance would otherwise divide by almost nothing and drown the other stages
    floor = (0.01 * centre.abs()).clamp(min=1e-3)
    scale = torch.maximum(distances.double().std(0).nan_to_num(1.0), floor)
    return centre.float(), scale.float()


def conformal_min_prob(probs: torch.Tensor, labels: torch.Tensor, coverage: float) -> float:
    """1 - q, q the LAC quantile: the ceil((n+1) coverage)-th smallest of 1 - p(true class). 0 (every class) when
    n is too small for that rank to exist (n < coverage / (1 - coverage), 9 images at 90%)."""
    scores = 1.0 - probs.double()[torch.arange(len(labels)), labels]
    rank = math.ceil((len(scores) + 1) * coverage)
    if rank > len(scores):
        return 0.0
    return float(1.0 - scores.sort().values[rank - 1])


@dataclass
class Fit:
    """What a fit adds to a checkpoint's state_dict, and what it says about itself."""

    state: dict[str, torch.Tensor]
    n: int
    pass_rate: float
    coverage: float
    validation_coverage: float  # in-sample: at least the target by construction
    n_reference: int  # images the detectors' statistics come from
    passed: tuple[float, ...] = ()  # per detector (DETECTORS order): the share of validation images that pass

    def passed_share(self, detector: str) -> float:
        """The share of the validation images that the fitted threshold of `detector` actually lets through: at
        least pass_rate (the 'higher' quantile; ties can add more), NaN where the detector has no score."""
        return self.passed[DETECTORS.index(detector)] if self.passed else float("nan")


def fit(
    raw_logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    pass_rate: float,
    coverage: float,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    detector: OodDetector,
) -> Fit | None:
    """Detector statistics (from `reference`, the training images' features and labels, else the validation
    split's, out of fold) and thresholds and the conformal threshold from the validation split's outputs (None below
    2 validation images). `features` are Backbone.trunk_and_stages' (split as `detector`, the model's own, expects)."""
    features, labels = features.flatten(1).float().cpu(), labels.long().cpu()
    raw_logits = raw_logits.float().cpu()
    if len(labels) < 2:
        return None
    pooled, layers = split_features(features, detector)
    if reference is not None and len(reference[1]) >= 2:
        ref_pooled, ref_layers = split_features(reference[0].float().cpu(), detector)
        ref_labels = reference[1].long().cpu()
    else:
        ref_pooled, ref_layers, ref_labels = pooled, layers, labels
    means, precision = fit_gaussian(ref_pooled, ref_labels)  # the classes present (a tiny split may lack one)
    if not precision.any():
        log.warning(
            "mahalanobis not fitted: its %d reference images do not vary within their classes (one image per class), "
            "so there is no covariance to fit; it scores every image 0 (the other detectors are fitted)",
            len(ref_pooled),
        )
    keep = torch.randperm(len(ref_pooled), generator=torch.Generator().manual_seed(0))[:MAX_BANK].sort().values
    bank, layer_banks = unit(ref_pooled[keep]), [unit(layer[keep]) for layer in ref_layers]
    if ref_pooled is pooled:
        fitted_scores, distances = out_of_fold_scores(pooled, labels, layers)
    else:
        fitted_scores = torch.stack([mahalanobis(pooled, means, precision), knn(pooled, bank)], dim=1)
        distances = stage_distances(layers, layer_banks, len(pooled))
    centre, scale = standardise(distances)
    probs = (raw_logits / temperature).softmax(1)
    validation = torch.cat(
        [
            msp(raw_logits / temperature)[:, None],
            energy(raw_logits)[:, None],
            fitted_scores,
            knn_layers(distances, centre, scale)[:, None],
        ],
        dim=1,
    )
    thresholds = torch.quantile(validation.double(), pass_rate, dim=0, interpolation="higher").float()
    min_prob = conformal_min_prob(probs, labels, coverage)
    if math.ceil((len(labels) + 1) * coverage) > len(labels):
        log.warning(
            "prediction sets not calibrated: %d validation images are too few for %.0f%% coverage (the rank "
            "ceil((n+1) coverage) exceeds n); every set holds every class",
            len(labels),
            100 * coverage,
        )
    sets = prediction_sets(probs, torch.tensor(min_prob))
    n = torch.tensor(len(labels))
    state = {
        "ood.class_means": means,
        "ood.precision": precision,
        "ood.bank": bank,
        **{f"ood.layer_bank{j}": layer_bank for j, layer_bank in enumerate(layer_banks)},
        "ood.layer_centre": centre,
        "ood.layer_scale": scale,
        "ood.thresholds": thresholds,
        "ood.fitted": torch.tensor(True),
        "ood.n_fit": n,
        "ood.n_reference": torch.tensor(len(ref_pooled)),
        "conformal.min_prob": torch.tensor(min_prob, dtype=torch.float32),
        "conformal.fitted": torch.tensor(True),
        "conformal.n_fit": n,
    }
    covered = float(sets[torch.arange(len(labels)), labels].double().mean())
    scored = ~torch.isnan(validation).all(0)
    passed = torch.where(scored, (validation <= thresholds).double().mean(0), torch.nan)
    return Fit(state, len(labels), pass_rate, coverage, covered, len(ref_pooled), tuple(passed.tolist()))


def log_fit(result: Fit | None, detector: str, where: str) -> None:
    if result is None:
        log.warning("no out-of-distribution detector or prediction sets fitted: fewer than 2 validation images")
        return
    log.info(
        "out-of-distribution detector %s (statistics of %d images) and prediction sets fitted on %d validation "
        "images: %.0f%% of them pass (target %.0f%%); sets aim at %.0f%% coverage (%.0f%% on the validation images "
        "themselves; caveat: %s) (saved in %s)",
        detector,
        result.n_reference,
        result.n,
        100 * result.passed_share(detector),
        100 * result.pass_rate,
        100 * result.coverage,
        100 * result.validation_coverage,
        COVERAGE_CAVEAT,
        where,
    )


# --- scoring images (predict.py, the benchmarks, the robustness bench) ------------------------------------------


@dataclass
class OodScores:
    """Per image: every detector's raw score (N x 5, DETECTORS order), the chosen detector's score minus its
    threshold (above 0: flagged), and the flag as a pass."""

    scores: np.ndarray
    margin: np.ndarray
    in_distribution: np.ndarray
    detector: str


@torch.no_grad()
def score_images(model, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> OodScores:
    """Out-of-distribution scores of uint8 images (N x 3 x S x S, the model's size) by a loaded ChestXrayClassifier:
    what the robustness bench calls. Raises ValueError when the checkpoint carries no fit."""
    if not bool(model.ood.fitted):
        raise ValueError("this checkpoint carries no out-of-distribution fit (trained before detectors existed)")
    model.eval()
    images = torch.as_tensor(images)
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(model.device)
        raw, features = model.logits_and_features(batch)
        parts.append(all_scores(raw, model.temperature, features, model.ood).cpu())
    scores = torch.cat(parts).double().numpy() if parts else np.zeros((0, len(DETECTORS)))
    detector = model.ood_detector
    k = DETECTORS.index(detector)
    margin = scores[:, k] - float(model.ood.thresholds[k])
    return OodScores(scores, margin, margin <= 0, detector)
