"""Selective answers (chestxray.evaluation.selective): the certified risk holds over many random calibration sets,
nothing is accepted when the images cannot certify it, failure scores rank mistakes, and the alarm fires on a shifted
set only."""

import math

import numpy as np
import pytest

from chestxray.evaluation import selective


def _population(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Confidences whose answers are right more often the higher they are: P(right | c) = c, c ~ Beta(8, 1)."""
    confidence = rng.beta(8, 1, n)
    return confidence, rng.random(n) < confidence


@pytest.mark.parametrize("n", [30, 300])
def test_the_certified_risk_holds_over_random_calibration_sets(n):
    """Accepted answers on fresh images of the same kind err more than `risk` in at most about delta of the draws
    (SGR's guarantee), and the threshold accepts something once the images can certify it."""
    rng = np.random.default_rng(0)
    risk, delta, draws = 0.1, 0.1, 300
    test_conf, test_right = _population(200_000, rng)
    violations, accepted_any = 0, 0
    for _ in range(draws):
        cert = selective.certify(*_population(n, rng), risk=risk, delta=delta)
        if not cert.accepts_any:
            continue
        accepted_any += 1
        keep = test_conf >= cert.threshold
        violations += (1 - test_right[keep].mean()) > risk
        assert cert.bound <= risk and cert.accepted > 0
    assert violations / draws <= delta + 0.03
    if n == 300:  # the top half err about 4% of the time: 300 images certify a threshold most times (78% seen)
        assert accepted_any / draws > 0.6


def test_a_naive_threshold_breaks_the_guarantee_that_the_bound_keeps():
    """The control: the threshold where the calibration images' own error rate first reaches the target (no bound)
    errs above it on fresh images far more often than delta. So the test above can tell a certificate from none."""
    rng = np.random.default_rng(1)
    test_conf, test_right = _population(200_000, rng)
    violations = 0
    for _ in range(200):
        conf, right = _population(30, rng)
        coverage, risk = selective.risk_coverage(conf, right)
        k = int(np.flatnonzero(risk <= 0.1).max()) + 1 if (risk <= 0.1).any() else 0
        threshold = np.sort(conf)[::-1][k - 1] if k else math.inf
        keep = test_conf >= threshold
        violations += keep.any() and (1 - test_right[keep].mean()) > 0.1
    assert violations / 200 > 0.2


def test_too_few_images_accept_nothing_and_say_what_they_could_certify():
    rng = np.random.default_rng(2)
    conf, right = rng.random(12), rng.random(12) < 0.7  # 12 images, 70% right: no threshold certifies 10% risk
    cert = selective.certify(conf, right, risk=0.1, delta=0.1)
    assert not cert.accepts_any and cert.accepted == 0 and cert.threshold == math.inf
    assert 0.1 < cert.best_bound <= 1.0
    assert cert.as_dict()["threshold"] is None  # JSON-safe
    perfect = selective.certify(np.linspace(0, 1, 12), np.ones(12, bool), risk=0.1, delta=0.1)
    assert (
        not perfect.accepts_any and perfect.needed is not None and perfect.needed > 12
    )  # 12 right of 12 is not enough
    assert selective.certify(np.linspace(0, 1, 200), np.ones(200, bool)).accepts_any  # 200 right of 200 are


def test_the_bound_is_clopper_pearson():
    assert selective.risk_bound(0, 22, 0.1) == pytest.approx(1 - 0.1 ** (1 / 22))
    assert selective.risk_bound(3, 3, 0.1) == 1.0 and selective.risk_bound(0, 0, 0.1) == 1.0
    assert selective.risk_bound(5, 100, 0.05) > 0.05


def test_failure_scores_rank_mistakes():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    right = np.array([1, 1, 0, 1, 0], bool)
    assert selective.failure_auroc(conf, right) == pytest.approx(5 / 6)
    coverage, risk = selective.risk_coverage(conf, right)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4, 2 / 5])
    assert selective.aurc(conf, right) == pytest.approx(np.mean([0, 0, 1 / 3, 1 / 4, 2 / 5]))
    assert selective.aurc(-conf, right) > selective.aurc(conf, right)
    assert math.isnan(selective.failure_auroc(conf, np.ones(5, bool)))


def test_the_confidence_candidates():
    probs = np.array([[0.8, 0.15, 0.05], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(selective.max_probability(probs), [0.8, 0.4])
    np.testing.assert_allclose(selective.margin(probs), [0.65, 0.05])
    np.testing.assert_allclose(selective.doctor(probs), [0.665, 0.345])
    logits = np.log(probs) + 3.0
    np.testing.assert_allclose(selective.neg_energy(logits), [3.0, 3.0], atol=1e-12)


def test_the_alarm_fires_on_a_shifted_set_and_not_on_an_exchangeable_one():
    rng = np.random.default_rng(3)
    pass_rate = 0.95
    exchangeable = [selective.shift_alarm(int((rng.random(66) > pass_rate).sum()), 66, pass_rate) for _ in range(500)]
    assert sum(a.fired for a in exchangeable) / 500 <= 0.02  # its level is 0.01
    shifted = selective.shift_alarm(103, 211, pass_rate)  # 49% flagged, as the second hospital
    assert shifted.fired and shifted.text().startswith("ALARM: 103 of 211 images flagged out of distribution (49%)")
    assert "python adapt.py" in shifted.text()
    test_folder = selective.shift_alarm(5, 66, pass_rate)  # 7.6% of the real test folder
    assert not test_folder.fired and "no sign" in test_folder.text()
    assert selective.shift_alarm(0, 0, pass_rate).p_value == 1.0
