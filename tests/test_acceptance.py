"""Answers accepted with a stated risk (chestxray.models.selection): the threshold fitted with the calibration, kept in
the checkpoint, old checkpoints without it, and predict.py's confidence and accepted columns and alarm line."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chestxray.errors import ConfigError
from chestxray.inference.predict import predict
from chestxray.models import selection
from chestxray.models.checkpoints import load_model
from chestxray.models.classifier import ChestXrayClassifier
from tests.conftest import predict_config


def fake_model(state: dict[str, torch.Tensor] | None = None, settings: dict | None = None):
    buffers = selection.AcceptanceThreshold()
    if state:
        buffers.load_state_dict({k.removeprefix("selective."): v for k, v in state.items()})
    return SimpleNamespace(hparams={"selective": settings or {}}, selective=buffers)


def confident_probs(n: int, rng: np.random.Generator, wrong_share: float) -> tuple[np.ndarray, np.ndarray]:
    """n answers over 3 classes: the confident ones right, a share of low-confidence ones wrong."""
    top = rng.uniform(0.4, 1.0, n)
    probs = np.stack([top, (1 - top) * 0.6, (1 - top) * 0.4], 1)
    labels = np.zeros(n, int)
    wrong = top < np.quantile(top, wrong_share)
    labels[wrong] = 1
    return probs, labels


def test_the_threshold_accepts_in_distribution_confident_answers_only():
    rng = np.random.default_rng(0)
    probs, labels = confident_probs(400, rng, 0.3)
    margin = np.where(rng.uniform(size=400) < 0.05, 1.0, -1.0)  # 5% flagged
    state, certificate = selection.fit(probs, labels, margin, {"risk": 0.1, "delta": 0.1})
    assert certificate.accepts_any and certificate.bound <= 0.1
    chosen = selection.select([fake_model(state)], probs, margin)
    confidence = probs.max(1) - (margin > 0)
    assert np.array_equal(chosen.accepted, (margin <= 0) & (confidence >= certificate.threshold))
    assert not chosen.accepted[margin > 0].any()  # flagged answers are never accepted, however confident
    assert (chosen.accepted & (probs.argmax(1) != labels)).mean() / chosen.accepted.mean() <= 0.1
    assert chosen.as_dict()["certified"] and chosen.as_dict()["threshold"] == pytest.approx(certificate.threshold)


def test_too_few_calibration_images_accept_nothing_and_say_what_they_could_certify():
    rng = np.random.default_rng(1)
    probs, labels = confident_probs(20, rng, 0.2)
    state, certificate = selection.fit(probs, labels, np.full(20, -1.0), {})
    chosen = selection.select([fake_model(state)], probs, np.full(20, -1.0))
    assert not certificate.accepts_any and not chosen.accepted.any()
    text = selection.certificate_text(certificate)
    assert "cannot certify" in text and "would be needed" in text
    assert chosen.as_dict()["best_certifiable_risk"] > 0.1 and chosen.as_dict()["images_needed"] > 20


def test_no_threshold_or_an_ensemble_gives_confidence_but_no_acceptance():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    unfitted = selection.select([fake_model()], probs, np.zeros(2))
    assert unfitted.accepted is None and np.allclose(unfitted.confidence, [0.7, 0.4]) and unfitted.why_not
    state, _ = selection.fit(probs, np.array([0, 0]), np.zeros(2), {})
    ensemble = selection.select([fake_model(state), fake_model(state)], probs, np.zeros(2))
    assert ensemble.accepted is None and "ensemble" in ensemble.why_not


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="model.selective.risk"):
        selection.check_settings({"risk": 1.5})
    with pytest.raises(ConfigError, match="model.selective.confidence"):
        selection.check_settings({"confidence": "energy"})
    assert selection.check_settings({"confidence": "doctor"}) == ("doctor", 0.1, 0.1)
    assert selection.check_settings({})[0] == "max_probability_gated"


def test_the_gated_confidence_ranks_every_flagged_answer_below_every_passed_one():
    probs = np.array([[0.99, 0.005, 0.005], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    margin = np.array([2.0, -1.0, np.nan])  # flagged, passed, no detector
    gated = selection.confidence_of(probs, "max_probability_gated", margin)
    assert np.allclose(gated, [-0.01, 0.5, 0.9]) and gated[0] < gated[1]
    assert np.allclose(selection.confidence_of(probs, "max_probability", margin), [0.99, 0.5, 0.9])


def test_training_fits_the_threshold_into_the_checkpoint_and_old_checkpoints_load_without_it(
    tiny_run, tmp_path, caplog
):
    checkpoint = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    assert bool(state["selective.fitted"]) and int(state["selective.n_fit"]) > 0
    model = load_model(tiny_run["ckpt"])
    assert bool(model.selective.fitted)
    for key in [k for k in state if k.startswith("selective.")]:
        del state[key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    caplog.clear()
    loaded = load_model(old)
    assert not bool(loaded.selective.fitted)
    assert sum("no acceptance threshold" in r.getMessage() for r in caplog.records) == 1  # said once
    assert isinstance(loaded, ChestXrayClassifier)


def test_predict_writes_confidence_and_accepted_and_reports_them_with_the_alarm(tiny_run, tmp_path, capsys):
    out = tmp_path / "pred"
    predict(predict_config(out, tiny_run["ckpt"], tiny_run["data"] / "test", "print_limit=100"))
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["confidence"] and r["accepted"] in ("0", "1") for r in rows)
    probs = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    flagged = np.array([r["in_distribution"] == "0" for r in rows])
    expected = probs.max(1) - flagged  # max_probability_gated: flagged answers lowered by 1
    assert np.allclose([float(r["confidence"]) for r in rows], expected, atol=1e-5)
    accepted = np.array([r["accepted"] == "1" for r in rows])
    assert not accepted[np.array([r["in_distribution"] == "0" for r in rows])].any()
    report = json.loads((out / "metrics.json").read_text())["uncertainty"]
    chosen, alarm = report["selective"], report["shift_alarm"]
    assert chosen["accepted"] == accepted.sum() and chosen["share_accepted"] == pytest.approx(accepted.mean())
    assert alarm["images"] == len(rows) and alarm["flagged"] == sum(r["in_distribution"] == "0" for r in rows)
    printed = capsys.readouterr().out
    assert "accepted" in printed and alarm["text"] in printed and "confidence" in printed
    assert (out / "risk_coverage.png").exists()
