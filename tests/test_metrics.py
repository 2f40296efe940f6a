"""The numbers of a report: one metric collection fed batch by batch or whole, exact intervals, calibration."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap
from torchmetrics.functional.classification import multiclass_auroc, multiclass_recall

from chestxray.evaluation import metrics
from chestxray.evaluation.figures import pick_gallery
from chestxray.models.calibration import T_MAX, T_MIN, fit_temperature, nll_at

CLASSES = ["a", "b", "c"]


def example(n_per_class=40, seed=0, strength=1.5):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], n_per_class)
    logits = rng.normal(size=(len(labels), 3)) + strength * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs, logits


def test_the_collection_gives_the_same_numbers_batch_by_batch_and_whole():
    labels, probs, _ = example()
    whole = metrics.evaluate(labels, probs, CLASSES)
    collection = metrics.report_metrics(3)
    p, y = torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)
    for start in range(0, len(y), 7):
        chunk = slice(start, start + 7)
        collection.update(preds=p[chunk], target=y[chunk], value=metrics.nll(p[chunk], y[chunk]))
    batched = metrics.summarise(collection.compute(), CLASSES)
    scalars = [k for k, v in whole.items() if isinstance(v, float)]
    assert {k: batched[k] for k in scalars} == pytest.approx({k: whole[k] for k in scalars})
    assert batched["confusion_matrix"] == whole["confusion_matrix"]
    for c in CLASSES:
        assert batched["per_class"][c] == pytest.approx(whole["per_class"][c])
    assert whole["correct"] == int((probs.argmax(1) == labels).sum()) and whole["n"] == 120
    assert whole["loss"] == pytest.approx(-np.log(probs[np.arange(120), labels]).mean(), rel=1e-5)
    sens = [whole["per_class"][c]["sensitivity"] for c in CLASSES]
    assert sens == pytest.approx([((probs.argmax(1) == labels) & (labels == k)).sum() / 40 for k in range(3)])


def test_accuracy_interval_is_wilsons_at_95_percent():
    labels, probs, _ = example(seed=3)
    report = metrics.with_intervals(metrics.evaluate(labels, probs, CLASSES), labels, probs, 0, 0)
    n, k = report["n"], report["correct"]
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert report["accuracy_ci95"] == pytest.approx([centre - half, centre + half], abs=1e-9)


def test_bootstrap_intervals_are_95_percent_stratified_percentile_intervals_that_repeat_and_ignore_row_order():
    labels, probs, _ = example()
    a = metrics.bootstrap_intervals(labels, probs, 3, resamples=300, seed=1)
    # the same resamples through scipy directly (one sample per class), at 95%: a 90% interval would be narrower
    order = np.lexsort((*probs.T[::-1], labels))
    y, p = torch.tensor(labels[order]), torch.tensor(probs[order], dtype=torch.float32)
    samples = tuple(np.flatnonzero(y.numpy() == c) for c in range(3))

    def auc(*index):
        index = np.concatenate(index)
        return float(multiclass_auroc(p[index], y[index], 3, average="macro"))

    def direct(level):
        return bootstrap(
            samples,
            auc,
            n_resamples=300,
            confidence_level=level,
            method="percentile",
            vectorized=False,
            paired=False,
            random_state=np.random.default_rng(1),
        ).confidence_interval

    assert a["auc"] == pytest.approx(list(direct(0.95)), abs=1e-9)
    narrower = direct(0.90)
    assert a["auc"][1] - a["auc"][0] > narrower.high - narrower.low
    assert metrics.bootstrap_intervals(labels, probs, 3, resamples=300, seed=1) == a
    assert metrics.bootstrap_intervals(labels, probs, 3, resamples=300, seed=2) != a
    shuffled = np.random.default_rng(9).permutation(len(labels))
    assert metrics.bootstrap_intervals(labels[shuffled], probs[shuffled], 3, resamples=300, seed=1) == a
    whole = metrics.evaluate(labels, probs, CLASSES)
    for c, ci in zip(CLASSES, a["sensitivity"], strict=True):
        assert ci[0] <= whole["per_class"][c]["sensitivity"] <= ci[1]
    sens = multiclass_recall(p, y, 3, average=None)
    assert sens.tolist() == pytest.approx([whole["per_class"][c]["sensitivity"] for c in CLASSES])


def test_a_small_class_still_gets_its_intervals():
    """Stratified resampling: a class of 3 images is in every resample, so no interval is lost to a resample
    without it; a class of one image has nothing to resample."""
    labels, probs, _ = example()
    keep = np.concatenate([np.arange(80), np.arange(80, 83)])  # 40, 40 and 3 images
    small = metrics.bootstrap_intervals(labels[keep], probs[keep], 3, resamples=200, seed=0)
    assert small["auc"] is not None and all(ci is not None for ci in small["sensitivity"])
    keep = np.concatenate([np.arange(80), [80]])
    assert metrics.bootstrap_intervals(labels[keep], probs[keep], 3, resamples=200, seed=0)["auc"] is None


def test_reliability_bins_are_the_calibration_errors_bins():
    labels, probs, _ = example(seed=5, strength=0.8)
    probs[:6] = np.eye(3)[labels[:6]]  # confidences of exactly 1.0
    accuracy, confidence, share = metrics.reliability_bins(labels, probs)
    assert len(share) == metrics.CALIBRATION_BINS and share.sum() == pytest.approx(1.0)
    ece = metrics.evaluate(labels, probs, CLASSES)["expected_calibration_error"]
    assert (share * np.abs(accuracy - confidence)).sum() == pytest.approx(ece, abs=1e-6)


def test_temperature_is_the_nll_minimum_and_never_changes_a_class():
    for seed, strength in ((0, 1.5), (1, 4.0), (2, 0.3)):
        labels, _, logits = example(seed=seed, strength=strength)
        logits = torch.tensor(logits * 3.0)  # overconfident logits
        y = torch.tensor(labels)
        t = fit_temperature(logits, y)
        grid = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 2000))
        best = min(grid, key=lambda g: nll_at(logits, y, g))
        assert nll_at(logits, y, t) <= nll_at(logits, y, best) + 1e-6
        assert abs(math.log(t) - math.log(best)) < 0.01
        assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    assert fit_temperature(torch.tensor(example()[2] * 3.0), torch.tensor(example()[0])) > 1  # overconfident: T > 1


def test_a_separable_validation_split_leaves_the_temperature_at_one():
    """14 validation images all right by a margin: the NLL keeps falling as T -> 0, so no temperature is fitted
    (the quickstart on generated data gave T = 0.05 and a test loss 9 times its uncalibrated one)."""
    from chestxray.models.calibration import identifiable_temperature

    y = torch.arange(14) % 3
    for margin in (1.0, 6.0):  # at 6 the NLL is 0 in float64 well before T_MIN
        separable = torch.nn.functional.one_hot(y, 3).double() * margin
        assert fit_temperature(separable, y) < 0.2 and identifiable_temperature(separable, y) is None
    wrong = -torch.nn.functional.one_hot(y, 3).double() * 6.0  # every image wrong: T = T_MAX (doubt) is kept
    assert identifiable_temperature(wrong, y) == pytest.approx(T_MAX, rel=0.01)
    labels, _, logits = example(seed=0, strength=1.5)
    t = identifiable_temperature(torch.tensor(logits * 3.0), torch.tensor(labels))
    assert t is not None and t == pytest.approx(fit_temperature(torch.tensor(logits * 3.0), torch.tensor(labels)))


def test_gallery_shows_every_kind_of_mistake_and_every_class():
    # 20 mistakes of one kind first, then a few of other kinds, and correct images of every class
    labels = [0] * 20 + [2, 2, 1] + [0, 1, 2] * 5
    preds = [1] * 20 + [0, 1, 2] + [0, 1, 2] * 5
    chosen = pick_gallery(preds, labels, limit=12)
    cells = {(labels[i], preds[i]) for i in chosen}
    assert {(0, 1), (2, 0), (2, 1), (1, 2)} <= cells  # every kind of mistake
    assert {(0, 0), (1, 1), (2, 2)} <= cells  # correct images of every class
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert pick_gallery([0, 1], [None, None], limit=5) == [0, 1]  # no labels: one per predicted class


def test_curves_show_whole_epochs_and_the_grad_cam_gallery_its_colour_scale():
    from chestxray.evaluation.figures import curves_figure, gallery_figure

    history = [{"epoch": e, "train/loss": 1 - e / 10, "val/loss": 1 - e / 20} for e in range(3)]
    curves = curves_figure(history, best_epoch=1)
    assert all(float(t).is_integer() for t in curves.axes[0].get_xticks())  # no epoch 0.5
    tiles = [np.zeros((40, 60, 3), np.uint8)] * 2
    gallery = gallery_figure(tiles, [0, 1], [0, 0], ["Normal", "Viral Pneumonia"], [0.9, 0.6], colorbar="evidence")
    assert any(ax.get_ylabel() == "evidence" for ax in gallery.axes)  # the colour scale
    titles = [ax.get_title() for ax in gallery.axes if ax.get_title()]
    assert titles == ["pred: Normal 0.90\ntrue: Normal", "pred: Viral Pneumonia 0.60\ntrue: Normal"]


def test_the_printout_of_a_handful_of_images_is_their_accuracy_not_per_class_rates():
    from chestxray.evaluation.report import Evaluation, ReportSettings, summary_text

    labels, probs, _ = example(n_per_class=1)
    ev = Evaluation("predict", CLASSES, ["x", "y", "z"], labels, probs, np.zeros(3, bool))
    text = summary_text(ev.metrics(ReportSettings(bootstrap_resamples=0)))
    correct = int((probs.argmax(1) == labels).sum())
    assert text.startswith(f"{correct} of 3 labelled image(s) right (below 10 images, counts")
    assert "%" not in text and "accuracy" not in text
    labels, probs, _ = example(n_per_class=10)
    many = summary_text(
        Evaluation("p", CLASSES, list(range(30)), labels, probs, np.zeros(30, bool)).metrics(
            ReportSettings(bootstrap_resamples=0)
        )
    )
    assert "sens" in many and "confusion matrix" in many


def test_an_ensembles_flag_and_sets_rest_on_each_members_fit_and_the_fewest_validation_images():
    """An ensemble flags where any member does and unites their sets: the text names each member's fit and the
    fewest validation images among them, whichever member comes first."""
    from types import SimpleNamespace

    from chestxray.evaluation.report import Evaluation, ReportSettings, Uncertainty, summary_text

    def member(n: int):
        return SimpleNamespace(
            conformal=SimpleNamespace(fitted=True), ood=SimpleNamespace(n_fit=n), ood_detector="knn_layers",
            pass_rate=0.95, coverage=0.9,
        )  # fmt: skip

    labels, probs, _ = example(n_per_class=10)
    sets = np.ones((30, 3), bool)
    for order in ([member(44), member(37)], [member(37), member(44)]):
        uncertainty = Uncertainty.of(order, np.full(30, -1.0), sets)
        ev = Evaluation("predict", CLASSES, [str(k) for k in range(30)], labels, probs, np.zeros(30, bool),
                        uncertainty=uncertainty)  # fmt: skip
        text = summary_text(ev.metrics(ReportSettings(bootstrap_resamples=0)))
        assert "each of 2 members' threshold passing 95% of its validation images, the fewest 37" in text, text
        assert "(each of 2 members' guarantee from its validation images, the fewest 37)" in text
    single = Uncertainty.of(member(37), np.full(30, -1.0), sets)
    ev = Evaluation("predict", CLASSES, [str(k) for k in range(30)], labels, probs, np.zeros(30, bool),
                    uncertainty=single)  # fmt: skip
    assert "guarantee from 37 validation images" in summary_text(ev.metrics(ReportSettings(bootstrap_resamples=0)))


def test_below_a_handful_of_images_the_flags_and_sets_are_counts_and_the_set_is_named():
    from chestxray.evaluation.report import Evaluation, ReportSettings, Uncertainty, summary_text

    labels, probs, _ = example(n_per_class=1)
    sets = np.zeros((3, 3), bool)
    sets[np.arange(3), probs.argmax(1)] = True
    uncertainty = Uncertainty(np.array([0.5, -1.0, np.nan]), sets, "knn_layers", 0.95, 0.9, 37)
    ev = Evaluation("predict", CLASSES, ["x", "y", "z"], labels, probs, np.zeros(3, bool), uncertainty=uncertainty)
    text = summary_text(ev.metrics(ReportSettings(bootstrap_resamples=0)))
    covered = int(sets[np.arange(3), labels].sum())
    assert "1 of 3 flagged as outside" in text and f"{covered} of 3 covered" in text
    assert "90% prediction sets" in text and "%)" not in text  # no rate of three images
    labels, probs, _ = example(n_per_class=10)
    sets = np.ones((30, 3), bool)
    uncertainty = Uncertainty(np.full(30, -1.0), sets, "knn_layers", 0.95, 0.9, 37)
    many = Evaluation("p", CLASSES, list(range(30)), labels, probs, np.zeros(30, bool), uncertainty=uncertainty)
    text = summary_text(many.metrics(ReportSettings(bootstrap_resamples=0)))
    assert "0 of 30 (0.0%) flagged" in text and "30 of 30 (100.0%) covered" in text


def test_predict_prints_the_first_answers_up_to_the_limit_and_says_how_many_more(capsys):
    from chestxray.evaluation.report import Evaluation, Uncertainty
    from chestxray.inference.predict import show

    labels, probs, _ = example(n_per_class=10)
    sets = np.ones((30, 3), bool)
    uncertainty = Uncertainty(np.full(30, -1.0), sets, "knn_layers", 0.95, 0.9, 37)
    paths = [f"img{k:02d}.png" for k in range(30)]
    show(Evaluation("p", CLASSES, paths, labels, probs, np.zeros(30, bool), uncertainty=uncertainty), None, 20)
    out = capsys.readouterr().out
    assert "img00.png: " in out and "img19.png: " in out and "img20.png" not in out
    assert "... and 10 more answer(s) in predictions.csv (print_limit=20)" in out
    assert out.count("the 90% prediction set") == 1
    show(Evaluation("p", CLASSES, paths, labels, probs, np.zeros(30, bool), uncertainty=uncertainty), None, 0)
    assert "img00.png" not in capsys.readouterr().out


def test_the_failure_auroc_is_printed_only_for_a_set_of_at_least_a_handful_of_images():
    from chestxray.evaluation.report import selective_text, uncertainty_text

    selective = {"risk_target": 0.1, "delta": 0.1, "confidence": "max_probability_gated", "failure_auroc": 0.5}
    assert "failure AUROC of max_probability_gated 0.500" in selective_text(selective, images=30)
    assert "AUROC" not in selective_text(selective, images=3)  # one wrong answer of three: a rate of nothing
    numbers = {"validation_images": 37, "selective": selective}
    ood = {"detector": "knn_layers", "pass_rate_target": 0.95, "share_flagged": 0.0, "flagged": 0}
    assert "AUROC" not in uncertainty_text(numbers | {"out_of_distribution": ood | {"images": 3}})[-1]
    twelve = uncertainty_text(numbers | {"out_of_distribution": ood | {"images": 12}})
    assert "max_probability_gated 0.500" in twelve[-1]


def test_a_set_without_a_class_gets_its_intervals_without_a_warning_on_stderr():
    """actualmed-site has no Viral Pneumonia image: the macro AUC is undefined in every resample (None), and a
    class that is always right has a constant sensitivity; scipy's DegenerateDataWarning is not the user's concern."""
    import warnings

    labels = np.array([0] * 8 + [1] * 8)
    probs = np.tile([0.1, 0.8, 0.1], (16, 1))
    probs[0] = [0.8, 0.1, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.bootstrap_intervals(labels, probs, 3, resamples=200, seed=0)
    assert result["auc"] is None and result["sensitivity"][2] is None
    assert result["sensitivity"][1] == [1.0, 1.0] and result["sensitivity"][0][1] > 0
