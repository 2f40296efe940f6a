"""The out-of-distribution flag and the split-conformal prediction sets (chestxray.models.ood): their guarantees on
synthetic outputs, their formulas against pytorch-ood's, their life in the checkpoint and the ONNX graph, and the
columns and report lines of predict.py and of training's test report."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from chestxray.data.images import list_images, load_image
from chestxray.errors import ConfigError
from chestxray.evaluation.report import FLAG_TEXT, UNCERTAINTY_FIELDS, prediction_row
from chestxray.models import ood
from chestxray.models.checkpoints import load_model
from chestxray.models.classifier import ChestXrayClassifier, Probabilities

CLASSES = ["a", "b", "c"]
ROOT = Path(__file__).resolve().parents[1]


def synthetic_outputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fair but imperfect 3-class model: about 75% accurate, probabilities spread out."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1.0, (n, 3))
    logits[np.arange(n), labels] += 1.5
    return torch.from_numpy(logits), torch.from_numpy(labels)


def split_coverage(logits, labels, n_cal: int, coverage: float, rng) -> tuple[float, float, float, int]:
    """One random calibration/test split: (coverage, mean set size, singleton accuracy, singletons) on the test part."""
    order = torch.from_numpy(rng.permutation(len(labels)))
    cal, test = order[:n_cal], order[n_cal:]
    probs = logits.softmax(1)
    min_prob = ood.conformal_min_prob(probs[cal], labels[cal], coverage)
    sets = ood.prediction_sets(probs[test], torch.tensor(min_prob))
    covered = sets[torch.arange(len(test)), labels[test]]
    single = sets.sum(1) == 1
    return float(covered.double().mean()), float(sets.sum(1).double().mean()), covered[single].sum(), int(single.sum())


@pytest.mark.parametrize("n_cal", [38, 300])
def test_mean_coverage_over_random_splits_is_the_nominal_level(n_cal):
    """Split conformal: over splits, E[coverage] is in [1 - alpha, 1 - alpha + 1/(n+1)] (continuous scores); the
    argmax always in the set can only add a little. 400 splits of 3000 outputs: the mean's standard error is < 0.003."""
    logits, labels = synthetic_outputs(3000)
    rng = np.random.default_rng(1)
    results = [split_coverage(logits, labels, n_cal, 0.9, rng) for _ in range(400)]
    coverage, size = np.mean([r[0] for r in results]), np.mean([r[1] for r in results])
    assert 0.9 - 0.01 <= coverage <= 0.9 + 1 / (n_cal + 1) + 0.01, coverage
    assert 1.2 < size < 2.6, size  # informative sets: neither all classes nor always one (the model is 75% right)
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert accuracy < 0.85  # so 90% coverage needs sets larger than one class, and the check above means something


def test_singleton_sets_are_right_as_often_as_marginal_coverage_implies():
    """What marginal coverage says of singletons: with a share s of singleton sets, they are right at least
    1 - alpha / s of the time (larger sets cover at most always), and more often than the model's top-1 answer.
    "At least the stated coverage" does not follow: with coverage exactly 90% and larger sets covering more, singletons
    are right less than 90% of the time (here about 87%), whatever the method (LAC or APS)."""
    logits, labels = synthetic_outputs(3000, seed=2)
    rng = np.random.default_rng(3)
    results = [split_coverage(logits, labels, 300, 0.9, rng) for _ in range(200)]
    right, singles = sum(float(r[2]) for r in results), sum(r[3] for r in results)
    share = singles / (200 * 2700)
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert 0.2 < share < 0.9 and right / singles >= 1 - 0.1 / share - 0.005
    assert right / singles > accuracy + 0.05


def test_too_few_calibration_images_give_every_class():
    probs = torch.tensor([[0.8, 0.1, 0.1]] * 5)
    assert ood.conformal_min_prob(probs, torch.zeros(5, dtype=torch.long), 0.9) == 0.0  # rank 6 of 5 does not exist
    assert ood.prediction_sets(probs, torch.tensor(0.0)).all()


def test_scores_are_pytorch_oods(tmp_path):
    """msp, energy, Mahalanobis and KNN give pytorch-ood's scores on the same logits, features and statistics."""
    detector = pytest.importorskip("pytorch_ood.detector")
    torch.manual_seed(0)
    logits, features, labels = torch.randn(50, 3), torch.randn(50, 16), torch.arange(50) % 3
    assert torch.allclose(ood.msp(logits), detector.MaxSoftmax(None).predict_logits(logits))
    assert torch.allclose(ood.energy(logits), detector.EnergyBased(None).predict_logits(logits))
    means, precision = ood.fit_gaussian(features, labels)
    reference = detector.Mahalanobis(None)
    reference.mu, reference.precision = means, precision
    new = torch.randn(20, 16)
    assert torch.allclose(ood.mahalanobis(new, means, precision), reference.predict_features(new), rtol=1e-4)
    knn = detector.KNN(None, k=1).fit_features(features, labels)
    assert torch.allclose(ood.knn(new, ood.unit(features)).double(), knn.predict_features(new), atol=1e-5)


@pytest.mark.parametrize("with_training_features", [True, False])
def test_thresholds_pass_the_pass_rate_of_new_in_distribution_images(with_training_features):
    """Statistics from the training features and thresholds from validation images scored against them, or (without
    training features) out-of-fold validation scores: on fresh in-distribution features about 95% pass (in-sample
    scores would put the KNN threshold at 0, flagging everything new), and shifted features are caught."""
    torch.manual_seed(0)
    centres = torch.randn(3, 32) * 3

    def draw(n):  # pooled features, then two 'stages' (knn_layers): halves of them plus their own noise
        labels = torch.arange(n) % 3
        pooled = centres[labels] + torch.randn(n, 32)
        return torch.cat([pooled, pooled[:, :16] + torch.randn(n, 16), pooled[:, 16:]], 1), labels

    features, labels = draw(300)
    logits = torch.randn(300, 3)
    reference = draw(600) if with_training_features else None
    detector = ood.OodDetector(3, 32, (16, 16))
    result = ood.fit(logits, features, labels, 1.0, 0.95, 0.9, reference, detector=detector)
    assert result.n == 300 and result.n_reference == (600 if with_training_features else 300)
    state = {k.removeprefix("ood."): v for k, v in result.state.items() if k.startswith("ood.")}
    ood.take_shapes(detector, state)
    detector.load_state_dict(state)
    fresh, _ = draw(3000)
    shifted = fresh + 4.0
    for k, name in ((2, "mahalanobis"), (3, "knn"), (4, "knn_layers")):
        thresholds = detector.thresholds[k]
        passed = float(
            (ood.all_scores(torch.randn(3000, 3), torch.tensor(1.0), fresh, detector)[:, k] <= thresholds)
            .double()
            .mean()
        )
        caught = float(
            (ood.all_scores(torch.randn(3000, 3), torch.tensor(1.0), shifted, detector)[:, k] > thresholds)
            .double()
            .mean()
        )
        assert 0.9 <= passed <= 0.99, (name, passed)
        assert caught > 0.9, (name, caught)


def tiny_model(**kwargs) -> ChestXrayClassifier:
    torch.manual_seed(0)
    return ChestXrayClassifier(CLASSES, 32, pretrained=False, **kwargs).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def fitted_checkpoint(tmp_path: Path, **kwargs) -> tuple[ChestXrayClassifier, Path]:
    """A tiny model, fitted on 24 random 'validation' images as fit.calibrate does, saved as Lightning would."""
    model = tiny_model(**kwargs)
    with torch.no_grad():
        raw, features = model.logits_and_features(images(24))
    result = ood.fit(raw, features, torch.arange(24) % 3, 1.3, model.pass_rate, model.coverage, detector=model.ood)
    state = model.state_dict() | result.state | {"temperature": torch.tensor(1.3), "calibrated": torch.tensor(True)}
    path = tmp_path / "fitted.ckpt"
    saved = {"state_dict": state, "hyper_parameters": dict(model.hparams), "epoch": 0}
    torch.save({**saved, "pytorch-lightning_version": L.__version__}, path)
    return model, path


def test_detector_and_sets_are_saved_in_the_checkpoint_and_reload_with_the_same_scores(tmp_path, caplog):
    model, path = fitted_checkpoint(tmp_path, ood={"detector": "mahalanobis", "pass_rate": 0.9})
    with caplog.at_level(logging.WARNING):
        loaded = load_model(path)
    assert "no out-of-distribution detector" not in caplog.text
    assert bool(loaded.ood.fitted) and bool(loaded.conformal.fitted) and int(loaded.ood.n_fit) == 24
    assert loaded.ood.bank.shape == (24, 512) and loaded.ood_detector == "mahalanobis" and loaded.pass_rate == 0.9
    x = images(8, seed=5)
    first, again = ood.score_images(loaded, x), ood.score_images(load_model(path), x)
    assert np.isfinite(first.scores).all() and np.array_equal(first.scores, again.scores)
    assert np.array_equal(first.in_distribution, first.margin <= 0) and first.detector == "mahalanobis"
    with torch.no_grad():
        probs, margin, sets, _ = Probabilities([loaded]).answers(x)
    assert np.allclose(margin.numpy(), first.margin, atol=1e-5)
    assert sets[torch.arange(8), probs.argmax(1)].all()  # the answer is always in its set


def test_an_old_checkpoint_loads_with_one_line_and_empty_columns(tmp_path, caplog):
    model = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("ood.", "conformal."))}
    hparams = {k: v for k, v in model.hparams.items() if k not in ("ood", "conformal")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(path)
    lines = [r.getMessage() for r in caplog.records if "out-of-distribution" in r.getMessage()]
    assert len(lines) == 1 and "carries no out-of-distribution detector or conformal fit" in lines[0]
    with torch.no_grad():
        probs, margin, _, _ = Probabilities([loaded]).answers(images(3))
    assert torch.isnan(margin).all()
    row = prediction_row("x.png", "", CLASSES, probs[0].numpy(), float(margin[0]), None)
    assert all(row[f] == "" for f in UNCERTAINTY_FIELDS)
    with pytest.raises(ValueError, match="no out-of-distribution fit"):
        ood.score_images(loaded, images(2))


def test_a_checkpoint_fitted_before_knn_layers_keeps_its_own_detector(tmp_path):
    """Four thresholds and no stage banks (fitted by the version before knn_layers): it loads, its knn flag is the
    same as before, and knn_layers, never fitted there, leaves the column empty rather than flag anything."""
    model, path = fitted_checkpoint(tmp_path, ood={"detector": "knn", "pass_rate": 0.95})
    saved = torch.load(path, weights_only=True)
    state = saved["state_dict"]
    for key in [k for k in state if k.startswith(("ood.layer_bank", "ood.layer_centre", "ood.layer_scale"))]:
        del state[key]
    state["ood.thresholds"] = state["ood.thresholds"][:4]
    torch.save(saved, tmp_path / "before.ckpt")
    old, new = load_model(tmp_path / "before.ckpt"), load_model(path)
    x = images(5, seed=3)
    assert np.allclose(ood.score_images(old, x).margin, ood.score_images(new, x).margin)
    assert torch.isnan(old.ood.thresholds[4]) and old.ood_detector == "knn"
    old.hparams.ood = {"detector": "knn_layers"}
    with torch.no_grad():
        assert torch.isnan(old.answers(x)[1]).all()
    # settings that never named a detector (the default then was knn): it keeps knn, not today's default
    saved["hyper_parameters"]["ood"] = {"pass_rate": 0.95}
    torch.save(saved, tmp_path / "unnamed.ckpt")
    unnamed = load_model(tmp_path / "unnamed.ckpt")
    assert unnamed.ood_detector == "knn"
    assert np.allclose(ood.score_images(unnamed, x).margin, ood.score_images(new, x).margin)


def test_knn_layers_standardisation_is_floored_and_absent_without_stages():
    """A stage where every validation image is at the same distance does not divide by almost nothing; a backbone that
    declares no stages has no knn_layers score (NaN: no flag), while the other detectors still score."""
    distances = torch.tensor([[0.5, 0.1], [0.5, 0.3], [0.5, 0.2]])
    centre, scale = ood.standardise(distances)
    assert torch.allclose(centre, torch.tensor([0.5, 0.2])) and scale[0] == pytest.approx(0.005)
    assert scale[1] == pytest.approx(0.1)
    detector = ood.OodDetector(num_classes=3, width=4, stage_widths=())
    scores = ood.all_scores(torch.randn(2, 3), torch.ones(()), torch.randn(2, 4), detector)
    assert scores.shape == (2, len(ood.DETECTORS)) and torch.isnan(scores[:, 4]).all()
    assert torch.isfinite(scores[:, :4]).all()
    g = torch.Generator().manual_seed(0)
    labels, reference = torch.arange(30) % 3, (torch.randn(60, 4, generator=g), torch.arange(60) % 3)
    for ref in (reference, None):  # statistics from the training images, or out of fold on the validation split
        fit = ood.fit(
            torch.randn(30, 3, generator=g),
            torch.randn(30, 4, generator=g),
            labels,
            1.0,
            0.95,
            0.9,
            ref,
            detector=detector,
        )
        thresholds = fit.state["ood.thresholds"]
        assert torch.isnan(thresholds[4]) and torch.isfinite(thresholds[:4]).all()


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_the_onnx_graph_gives_the_same_score_and_sets_as_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from chestxray.inference.onnx import OnnxPredictor, export_onnx

    _, path = fitted_checkpoint(tmp_path)  # the default detector (knn_layers)
    model = load_model(path)
    x = images(6, seed=9)
    adapted = recalibrated(path, images(8, seed=10))  # its gate is the detector as trained, not its flag
    for name, each in (("as trained", model), ("recalibrated", adapted)):
        graph = export_onnx([each], tmp_path / f"{name}.onnx")
        probs, margin, sets, gate = OnnxPredictor(graph).probabilities(x)
        with torch.no_grad():
            t_probs, t_margin, t_sets, t_gate = Probabilities([each]).answers(x)
        assert torch.allclose(probs, t_probs, atol=1e-5) and torch.allclose(margin, t_margin, atol=1e-4), name
        assert torch.equal(sets, t_sets) and torch.isfinite(margin).all(), name
        assert torch.allclose(gate, t_gate, atol=1e-4) and torch.isfinite(gate).all(), name
    assert torch.equal(gate, margin) is False  # the recalibrated graph's gate is not its flag


def recalibrated(path: Path, site: torch.Tensor) -> ChestXrayClassifier:
    """The checkpoint at `path`, recalibrated on `site` images (labels 0, 1, 2, 0, ...) as adapt.py does."""
    from chestxray.models import recalibrate
    from chestxray.training.adapt import head_logits, trunk_features

    model = load_model(path)
    features = trunk_features(model, site)
    fitted = recalibrate.fit(model, head_logits(model, features), features, torch.arange(len(site)) % 3)
    recalibrate.apply(model, fitted.state)
    return model


def save_as_checkpoint(model: ChestXrayClassifier, like: Path, path: Path) -> Path:
    torch.save({**torch.load(like, weights_only=True), "state_dict": model.state_dict()}, path)
    return path


def test_after_recalibration_the_gate_is_the_detector_as_trained_and_the_flag_the_sites(tmp_path, monkeypatch):
    """adapt.py makes a site's images count as in distribution (the flag), while the confidence's gate stays the
    detector training fitted: for any image it equals the unadapted checkpoint's flag margin, also after a second
    site that fills the bank (every training row is kept; the previous site's rows are sampled)."""
    _, path = fitted_checkpoint(tmp_path)  # knn_layers, 24 training rows
    monkeypatch.setattr(ood, "MAX_BANK", 16)  # a first site of 12 (kept), a second of 10: 6 of the first are kept
    model, site = load_model(path), images(12, seed=10)
    first = recalibrated(path, site)
    second = recalibrated(save_as_checkpoint(first, path, tmp_path / "first.ckpt"), images(10, seed=11))
    x = torch.cat([site[:4], images(6, seed=12)])
    with torch.no_grad():
        _, margin, _, gate = model.answers(x)
        _, first_margin, _, first_gate = first.answers(x)
        _, _, _, second_gate = second.answers(x)
    assert torch.equal(gate, margin)  # never recalibrated: the gate is the flag
    assert torch.allclose(first_gate, margin, atol=1e-5) and torch.allclose(second_gate, margin, atol=1e-5)
    assert (first_margin[:4] < margin[:4]).all()  # the site's own images are nearer the recalibrated bank
    assert int(first.ood.origin_rows.sum()) == 24 and len(first.ood.origin_rows) == 36  # 24 training rows + 12 site
    assert int(second.ood.origin_rows.sum()) == 24 and len(second.ood.origin_rows) == 24 + 6 + 10  # 6 of the first
    assert len(second.ood.bank) == len(second.ood.origin_rows) == len(second.ood.layer_bank0)


def test_a_checkpoint_without_stage_banks_or_without_a_detector_recalibrates_and_answers(tmp_path):
    """A checkpoint fitted before knn_layers (knn, one placeholder row per stage bank) recalibrates, twice, and
    answers with its gate the trained knn flag; one whose detector was never fitted gates by the flag itself."""
    _, path = fitted_checkpoint(tmp_path, ood={"detector": "knn", "pass_rate": 0.95})
    saved = torch.load(path, weights_only=True)
    for key in [k for k in saved["state_dict"] if k.startswith("ood.layer_")]:
        del saved["state_dict"][key]
    saved["state_dict"]["ood.thresholds"] = saved["state_dict"]["ood.thresholds"][:4]
    torch.save(saved, tmp_path / "before.ckpt")
    unfitted = tiny_model()
    torch.save({**saved, "state_dict": unfitted.state_dict()}, tmp_path / "unfitted.ckpt")
    x = images(5, seed=3)
    for name in ("before.ckpt", "unfitted.ckpt"):
        trained = load_model(tmp_path / name)
        first = recalibrated(tmp_path / name, images(12, seed=10))
        second = recalibrated(save_as_checkpoint(first, tmp_path / name, tmp_path / "again.ckpt"), images(9, seed=4))
        with torch.no_grad():
            _, margin, _, _ = trained.answers(x)
            _, second_margin, _, gate = second.answers(x)
        if name == "before.ckpt":
            assert torch.allclose(gate, margin, atol=1e-5), name
        else:  # nothing trained to gate with: the flag of the recalibrated detector
            assert torch.isnan(margin).all() and torch.equal(gate, second_margin) and torch.isfinite(gate).all()


def test_a_joined_bank_keeps_every_training_row_and_at_most_max_bank_site_rows(monkeypatch):
    from chestxray.models import recalibrate

    monkeypatch.setattr(ood, "MAX_BANK", 100)
    training = torch.ones(80, dtype=torch.bool)
    old, new = recalibrate.bank_rows(training, 10)
    assert len(old) == 80 and len(new) == 10  # both fit: every row
    old, new = recalibrate.bank_rows(training, 1000)
    assert len(old) == 80 and len(new) == 100 and new.tolist() == sorted(set(new.tolist()))
    again = torch.cat([training, torch.zeros(100, dtype=torch.bool)])  # a second site: the first site's rows go first
    old, new = recalibrate.bank_rows(again, 60)
    assert old[:80].tolist() == list(range(80)) and len(old) == 80 + 40 and len(new) == 60
    assert len(recalibrate.joined_bank(torch.ones(80, 4), torch.ones(100_000, 4), training)) == 180


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.ood.detector=odin", "model.ood.detector=odin: must be one of " + ", ".join(ood.DETECTORS)),
        ("model.ood.pass_rate=1", "model.ood.pass_rate=1: must be a number greater than 0 and less than 1"),
        ("model.conformal.coverage=0", "model.conformal.coverage=0: must be a number greater than 0 and less than 1"),
    ],
)
def test_settings_out_of_range_are_one_line_naming_them(override, message):
    from chestxray import settings
    from tests.conftest import compose_config

    cfg = compose_config("train", ["paths.output_dir=/tmp/unused", override])
    with pytest.raises(ConfigError) as err:
        settings.check(cfg, settings.TRAIN_RULES)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="model.ood.detector=odin"):
        tiny_model(ood={"detector": "odin"})


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_training_fits_and_reports_them_and_predict_writes_the_same_columns(tiny_run, tmp_path, capsys):
    """The run's best.ckpt carries the fit; its test report and predict.py's rows agree, image by image."""
    from chestxray.inference.predict import predict
    from tests.conftest import predict_config

    model = load_model(tiny_run["ckpt"])
    n = int(model.ood.n_fit)
    assert bool(model.ood.fitted) and bool(model.conformal.fitted) and n >= 8
    assert int(model.ood.n_reference) == len(model.ood.bank) > n  # the training images' features
    report = json.loads((tiny_run["dir"] / "metrics.json").read_text())["uncertainty"]
    assert report["validation_images"] == n
    assert report["out_of_distribution"]["detector"] == ood.DEFAULT_DETECTOR
    assert report["prediction_sets"]["coverage_target"] == 0.9 and 1 <= report["prediction_sets"]["mean_set_size"] <= 3
    trained = read_rows(tiny_run["dir"] / "predictions.csv")
    out = tmp_path / "predict"
    summary = predict(predict_config(out, tiny_run["ckpt"], tiny_run["data"] / "test", "print_limit=1000"))
    rows = read_rows(out / "predictions.csv")
    assert set(rows) == set(trained) and all(f in next(iter(rows.values())) for f in UNCERTAINTY_FIELDS)
    flagged = 0
    for name, row in rows.items():
        score, members = float(row["ood_score"]), row["prediction_set"].split("|")
        assert row["in_distribution"] == str(int(score <= 0)) and row["pred"] in members
        assert set(members) <= set(CLASSES_OF_RUN) and abs(score - float(trained[name]["ood_score"])) < 1e-4
        assert row["prediction_set"] == trained[name]["prediction_set"]
        flagged += score > 0
    predicted = summary["metrics"]["uncertainty"]
    assert predicted["out_of_distribution"]["flagged"] == flagged
    sets = predicted["prediction_sets"]
    covered = np.mean([r["label"] in r["prediction_set"].split("|") for r in rows.values()])
    assert abs(sets["empirical_coverage"] - covered) < 1e-9
    printed = capsys.readouterr().out
    assert printed.count(FLAG_TEXT) == flagged + 1  # each flagged answer, and the report line
    assert f"guarantee from {n} validation images" in printed


CLASSES_OF_RUN = ["Normal", "Covid", "Viral Pneumonia"]


def test_knn_layers_flags_photographs_pages_and_noise(tiny_run, tmp_path):
    """The run's own detectors on the benchmark's far out-of-distribution images (benchmarks/ood_benchmark.py:
    photographs, pages of text, noise and blank frames) against its test images: knn_layers, the default, tells them
    apart and lets few through its threshold, even for this barely trained model."""
    import importlib.util

    from sklearn.metrics import roc_auc_score

    pytest.importorskip("skimage")  # the benchmark's photographs (the bench extra, in dev)
    spec = importlib.util.spec_from_file_location("ood_benchmark", ROOT / "benchmarks" / "ood_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load_model(tiny_run["ckpt"])
    size = model.hparams.image_size
    test = np.stack([load_image(p, size) for p in list_images(tiny_run["data"] / "test", recursive=True)])
    far = bench.model_view(bench.photographs() + bench.documents(12) + bench.noise_and_blank(), size, tmp_path)
    inside, outside = ood.score_images(model, test), ood.score_images(model, far)
    k = ood.DETECTORS.index("knn_layers")
    y = np.r_[np.zeros(len(test)), np.ones(len(far))]
    auroc = roc_auc_score(y, np.r_[inside.scores[:, k], outside.scores[:, k]])
    assert model.ood_detector == "knn_layers" and auroc > 0.95, auroc
    assert outside.in_distribution.mean() < 0.15 and inside.in_distribution.mean() > 0.7


@pytest.mark.parametrize("with_training_features", [True, False])
def test_one_image_per_class_fits_without_a_singular_covariance(with_training_features, caplog):
    """A tiny split (one training image per class, or two validation images fitted out of fold) leaves no spread within
    the classes: the Mahalanobis fit is skipped with one line instead of crashing the whole fit (LinAlgError), and
    the other detectors and the sets are still fitted."""
    g = torch.Generator().manual_seed(0)
    detector = ood.OodDetector(num_classes=3, width=8, stage_widths=(4, 4))
    n = 3 if with_training_features else 2
    reference = (torch.randn(3, 16, generator=g), torch.arange(3)) if with_training_features else None
    with caplog.at_level(logging.WARNING, logger="chestxray.models.ood"):
        result = ood.fit(
            torch.randn(n, 3, generator=g),
            torch.randn(n, 16, generator=g),
            torch.arange(n),
            1.0,
            0.95,
            0.9,
            reference,
            detector=detector,
        )
    assert result is not None and result.n == n
    assert torch.isfinite(result.state["ood.thresholds"]).all()
    assert not result.state["ood.precision"].any()
    skipped = [r.message.split(":")[0] for r in caplog.records]  # one line per fit that cannot be made
    assert skipped == ["mahalanobis not fitted", "prediction sets not calibrated"]


def test_the_fit_logs_the_share_that_passes_and_the_coverage_caveat(caplog):
    """log_fit says what share of the validation images the fitted threshold lets through (6 of 10 at pass_rate 0.5:
    the 'higher' quantile), not the configured rate; wherever the coverage guarantee is claimed (the log, the
    report's printout) the caveat that one validation split does four jobs is said with it."""
    from chestxray.evaluation.metrics import COVERAGE_CAVEAT
    from chestxray.evaluation.report import uncertainty_text

    g = torch.Generator().manual_seed(0)
    detector = ood.OodDetector(num_classes=3, width=4, stage_widths=(2, 2))
    labels = torch.arange(10) % 3
    result = ood.fit(torch.randn(10, 3, generator=g), torch.randn(10, 8, generator=g), labels, 1.0, 0.5, 0.9,
                     (torch.randn(30, 8, generator=g), torch.arange(30) % 3), detector=detector)  # fmt: skip
    assert result.passed_share("msp") == pytest.approx(0.6)
    with caplog.at_level(logging.INFO, logger="chestxray.models.ood"):
        ood.log_fit(result, "msp", "best.ckpt")
    line = caplog.records[-1].getMessage()
    assert "60% of them pass (target 50%)" in line and COVERAGE_CAVEAT in line
    numbers = {
        "validation_images": 10,
        "prediction_sets": {"coverage_target": 0.9, "empirical_coverage": 0.9, "mean_set_size": 1.2},
    }
    printed = uncertainty_text(numbers)
    claim = next(i for i, text in enumerate(printed) if "guarantee from 10 validation images" in text)
    assert COVERAGE_CAVEAT in printed[claim + 1]


@pytest.mark.parametrize("n", [10, 19, 20, 38])
def test_the_conformal_quantile_is_the_finite_sample_rank(n):
    """q is exactly the ceil((n+1)(1 - alpha))-th smallest validation score (the +1 is the finite-sample correction:
    at n = 10, 20 and 38 it picks a higher rank than ceil(n(1 - alpha)); at 19 both give the 18th)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    scores = torch.linspace(0.05, 0.6, n, dtype=torch.float64)[order]  # distinct, shuffled
    labels = torch.arange(n) % 3
    probs = torch.full((n, 3), 0.0, dtype=torch.float64)
    probs[torch.arange(n), labels] = 1 - scores  # p(true class) = 1 - score; the rest on the next class
    probs[torch.arange(n), (labels + 1) % 3] = scores
    rank = math.ceil((n + 1) * 0.9)
    expected = 1 - scores.sort().values[rank - 1]
    assert ood.conformal_min_prob(probs, labels, 0.9) == pytest.approx(float(expected), abs=1e-12)


def test_knn_layers_standardises_stages_of_very_different_scales():
    """A stage whose distances spread widely (about 0.5 +- 0.09) beside one where every image is at nearly the same
    distance (about 0.004 +- 0.001): images shifted by 0.1 in the quiet stage only are 100 of its standard deviations
    out, and standardised they are caught; summed raw, the wide stage's spread hides them."""
    torch.manual_seed(0)

    def draw(n, shift=0.0):
        pooled, wide = torch.randn(n, 4), torch.randn(n, 8)
        quiet = torch.zeros(n, 8)
        quiet[:, 0] = 1.0
        quiet += 0.003 * torch.randn(n, 8)
        quiet[:, 1] += shift
        return torch.cat([pooled, wide, quiet], 1), torch.arange(n) % 3

    detector = ood.OodDetector(3, 4, (8, 8))
    features, labels = draw(300)
    result = ood.fit(torch.randn(300, 3), features, labels, 1.0, 0.95, 0.9, draw(600), detector=detector)
    state = {k.removeprefix("ood."): v for k, v in result.state.items() if k.startswith("ood.")}
    ood.take_shapes(detector, state)
    detector.load_state_dict(state)
    assert state["layer_scale"][0] > 20 * state["layer_scale"][1]  # the two stages' scales differ that much
    k = ood.DETECTORS.index("knn_layers")

    def flagged(shift):
        x, _ = draw(2000, shift)
        scores = ood.all_scores(torch.randn(2000, 3), torch.tensor(1.0), x, detector)[:, k]
        return float((scores > detector.thresholds[k]).double().mean())

    assert flagged(0.0) < 0.1 and flagged(0.1) > 0.9
