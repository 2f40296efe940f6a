"""Recalibration of a trained classifier on a new site's labelled images (adapt.py): the temperature, the
out-of-distribution detector's reference bank and thresholds, the conformal threshold and the acceptance threshold,
all refitted on the site's images, the network unchanged.

The detector keeps what it knew and learns the site: its KNN banks become the training images' rows plus the site's
(so the site's images count as in distribution, and the training images still do), the thresholds pass
``model.ood.pass_rate`` of the site images scored out of fold (an image is never its own nearest neighbour), and
knn_layers' standardisation is refitted on those distances. The Mahalanobis statistics (class means, covariance) stay
the training images'; only its threshold moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chestxray.evaluation.selective import Certificate
from chestxray.models import ood, selection
from chestxray.models.calibration import identifiable_temperature

INNER_FOLDS = 5  # the out-of-fold distances of the site images to the bank


@dataclass
class SiteCalibration:
    """A fit's checkpoint entries and what it says about itself."""

    state: dict[str, torch.Tensor]
    temperature: float
    certificate: Certificate
    n: int


def fit(model, raw_logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> SiteCalibration:
    """Every fitted buffer of `model` (a ChestXrayClassifier) refitted on these images' raw logits, features
    (Backbone.trunk_and_stages) and labels."""
    raw_logits, features, labels = raw_logits.float().cpu(), features.float().cpu(), labels.long().cpu()
    temperature = identifiable_temperature(raw_logits, labels) if len(labels) >= 2 else None
    temperature = float(temperature or 1.0)
    detector = model.ood
    pooled, layers = ood.split_features(features, detector)
    knn_d, layer_d = out_of_fold_distances(pooled, layers, detector)
    centre, scale = ood.standardise(layer_d)
    scores = torch.stack(
        [
            ood.msp(raw_logits / temperature),
            ood.energy(raw_logits),
            ood.mahalanobis(pooled, detector.class_means, detector.precision),
            knn_d,
            ood.knn_layers(layer_d, centre, scale),
        ],
        dim=1,
    )
    thresholds = torch.quantile(scores.double(), model.pass_rate, dim=0, interpolation="higher").float()
    probs = (raw_logits / temperature).softmax(1)
    k = ood.DETECTORS.index(model.ood_detector)
    margin = (scores[:, k] - thresholds[k]).double().numpy()
    # the confidence's gate, as the recalibrated checkpoint will compute it: the detector as training fitted it
    # (every training row is kept, and these images are not among them); a detector never fitted has none, and the
    # gate is then the flag itself (ood.margins)
    gate = ood.margins(raw_logits, torch.tensor(temperature), features, detector, k)[1].double().numpy()
    gate = np.where(np.isnan(gate), margin, gate)
    selective_state, certificate = selection.fit(
        probs.double().numpy(), labels.numpy(), margin, model.hparams.get("selective"), gate
    )
    training = training_rows(detector)
    bank = joined_bank(detector.bank, pooled, training)
    layer_banks = [joined_bank(old, layer, training) for old, layer in zip(detector.layer_banks(), layers, strict=True)]
    n = torch.tensor(len(labels))
    state = {
        "temperature": torch.tensor(temperature),
        "calibrated": torch.tensor(True),
        "ood.bank": bank,
        **{f"ood.layer_bank{j}": b for j, b in enumerate(layer_banks)},
        "ood.layer_centre": centre,
        "ood.layer_scale": scale,
        "ood.thresholds": thresholds,
        "ood.fitted": torch.tensor(True),
        "ood.n_fit": n,
        "ood.n_reference": torch.tensor(len(bank)),
        **origin_of(detector, training, len(pooled)),
        "conformal.min_prob": torch.tensor(ood.conformal_min_prob(probs, labels, model.coverage), dtype=torch.float32),
        "conformal.fitted": torch.tensor(True),
        "conformal.n_fit": n,
        **selective_state,
    }
    return SiteCalibration(state, temperature, certificate, len(labels))


def training_rows(detector) -> torch.Tensor:
    """Which rows of the detector's bank are the training images' (ood.OodDetector.origin_rows, one value per row)."""
    return detector.origin_rows.expand(len(detector.bank)).clone()


def bank_rows(training: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(which old bank rows, which of `new` site rows) a joined bank keeps: every training row (at most
    ood.MAX_BANK: training kept no more), so that the confidence's gate is the detector training fitted, and at
    most ood.MAX_BANK site rows, the new site's first; seeded samples in their order where there are more. Old rows
    come first, training rows before a previous site's. `training` marks the old rows that are training rows."""
    sites = torch.nonzero(~training).flatten()
    keep_new = min(new, ood.MAX_BANK)
    kept_sites = sites[sample(len(sites), ood.MAX_BANK - keep_new, 0)]
    kept_old = torch.cat([torch.nonzero(training).flatten(), kept_sites]).sort().values
    return kept_old, sample(new, keep_new, 1)


def sample(n: int, k: int, seed: int) -> torch.Tensor:
    """k of range(n), seeded, in order (all of them when k >= n)."""
    if n <= k:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(k, 0)].sort().values


def joined_bank(old: torch.Tensor, new: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
    """The old unit-length bank rows and these features' (unit length) that bank_rows keeps, old rows first. A bank
    that is not as long as `training` (a stage bank of a checkpoint fitted before knn_layers: one placeholder row)
    counts all its rows as training rows."""
    if len(training) != len(old):
        training = torch.ones(len(old), dtype=torch.bool)
    kept_old, kept_new = bank_rows(training, len(new))
    return torch.cat([old[kept_old].float(), ood.unit(new[kept_new].float())])


def origin_of(detector, training: torch.Tensor, new: int) -> dict[str, torch.Tensor]:
    """The joined detector's origin entries (ood.OodDetector): which rows are the training images' (those of the
    old bank's that were, `training`, where bank_rows keeps them; the `new` site's are not), and the standardisation
    and thresholds training fitted: the old detector's own, or its origin's when it was recalibrated already (a
    second site)."""
    kept_old, kept_new = bank_rows(training, new)
    again = not bool(training.all())  # a site's rows are in the bank already
    return {
        "ood.origin_rows": torch.cat([training[kept_old], torch.zeros(len(kept_new), dtype=torch.bool)]),
        "ood.origin_centre": (detector.origin_centre if again else detector.layer_centre).clone(),
        "ood.origin_scale": (detector.origin_scale if again else detector.layer_scale).clone(),
        "ood.origin_thresholds": (detector.origin_thresholds if again else detector.thresholds).clone(),
    }


def out_of_fold_distances(
    pooled: torch.Tensor, layers: list[torch.Tensor], detector
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's KNN distance (pooled, and per stage) to the old bank plus the site images of the other inner
    folds (seeded): what a new image of the site would see in the joined bank."""
    n, training = len(pooled), training_rows(detector)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    knn_d, layer_d = torch.zeros(n), torch.zeros(n, len(layers))
    for part in torch.tensor_split(order, min(INNER_FOLDS, n)):
        rest = torch.ones(n, dtype=torch.bool)
        rest[part] = False
        knn_d[part] = ood.knn(pooled[part], joined_bank(detector.bank, pooled[rest], training))
        for j, (layer, old) in enumerate(zip(layers, detector.layer_banks(), strict=True)):
            layer_d[part, j] = ood.knn(layer[part], joined_bank(old, layer[rest], training))
    return knn_d, layer_d


def apply(model, state: dict[str, torch.Tensor]) -> None:
    """Load a fit's entries into `model` in place (buffers take the fit's shapes: the banks grow)."""
    model.temperature.fill_(float(state["temperature"]))
    model.calibrated.fill_(bool(state["calibrated"]))
    for prefix, module in (("ood.", model.ood), ("conformal.", model.conformal), ("selective.", model.selective)):
        entries = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        ood.take_shapes(module, entries)
        module.load_state_dict(entries)


def outputs(model, raw_logits: torch.Tensor, features: torch.Tensor) -> dict[str, np.ndarray]:
    """What predict.py would answer for these images (raw logits and features of the model's trunk): calibrated
    probabilities, the detector's margin, prediction sets, confidence and acceptance."""
    with torch.no_grad():
        probs, margin, sets, gate = model.answers_of(raw_logits.float(), features.float())
    probs, margin, gate = probs.double().numpy(), margin.double().numpy(), gate.double().numpy()
    chosen = selection.select([model], probs, margin, gate)
    accepted = chosen.accepted if chosen.accepted is not None else np.zeros(len(probs), bool)
    return {
        "probs": probs,
        "margin": margin,
        "sets": sets.numpy(),
        "confidence": chosen.confidence,
        "accepted": accepted,
    }
