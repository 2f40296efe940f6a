"""Honest numbers: extra evaluation sets, leak-free metrics, bootstrap intervals, galleries that cover every case."""

import json
import logging
import shutil

import numpy as np
import pytest

from chestxray.data import DataError
from chestxray.reports import classification_metrics, pick_gallery
from chestxray.training import train
from tests.conftest import train_config
from tests.test_train import read_events


def test_an_evaluation_set_copied_from_the_test_folder_gets_the_test_folders_numbers(data_dir, tmp_path, caplog):
    copy = tmp_path / "hospital_b"
    shutil.copytree(data_dir / "test", copy)
    out = tmp_path / "run"
    cfg = train_config(out, data_dir, "data.check_leakage=true", f"+eval_sets.hospital_b={copy}")
    with caplog.at_level(logging.INFO):
        train(cfg)
    test = json.loads((out / "metrics.json").read_text())
    other = json.loads((out / "eval" / "hospital_b" / "metrics.json").read_text())
    for key in ("n", "accuracy", "accuracy_ci95", "confusion_matrix", "per_class", "macro_roc_auc_ovr", "loss"):
        assert other[key] == pytest.approx(test[key]) if isinstance(test[key], float) else other[key] == test[key], key
    # the same leakage check: the copies of the leaking test images leak too, and the same number stays leak-free
    assert len(other["leaking_images"]) == len(test["leaking_images"]) > 0
    assert other["leak_free"]["accuracy"] == pytest.approx(test["leak_free"]["accuracy"])
    for name in ("confusion_matrix", "per_class", "reliability", "gallery", "gradcam_gallery"):
        assert (out / "eval" / "hospital_b" / f"{name}.png").stat().st_size > 1000, name
    events = read_events(out / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert {"eval/hospital_b/acc", "eval/hospital_b/loss", "eval/hospital_b/acc_leak_free"} <= tags
    assert events.Scalars("eval/hospital_b/acc")[-1].value == pytest.approx(events.Scalars("test/acc")[-1].value)
    assert "eval/hospital_b/gallery" in events.Tags()["images"]
    side_by_side = next(r.getMessage() for r in caplog.records if "all evaluated sets" in r.getMessage())
    rows = [line for line in side_by_side.splitlines() if line.startswith(("test ", "hospital_b "))]
    assert len(rows) == 2 and rows[0].split()[1:] == rows[1].split()[1:]  # same n, accuracy, intervals, leak-free
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert results["eval/hospital_b/acc"] == pytest.approx(test["accuracy"])


def test_an_evaluation_set_with_other_class_names_is_refused_naming_them(data_dir, tmp_path):
    other = tmp_path / "other"
    for name in ("Normal", "COVID-19", "Pneumonia"):
        (other / name).mkdir(parents=True)
    cfg = train_config(tmp_path / "run", data_dir, f"+eval_sets.other={other}")
    with pytest.raises(DataError, match=r"class folders \['COVID-19', 'Normal', 'Pneumonia'\] differ from the model's"):
        train(cfg)


def test_bootstrap_intervals_contain_the_estimate_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    logits = rng.normal(size=(120, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    a = classification_metrics(labels, probs, ["a", "b", "c"], resamples=300, seed=1)
    b = classification_metrics(labels, probs, ["a", "b", "c"], resamples=300, seed=1)
    c = classification_metrics(labels, probs, ["a", "b", "c"], resamples=300, seed=2)
    lo, hi = a["macro_roc_auc_ovr_ci95"]
    assert lo < a["macro_roc_auc_ovr"] < hi and hi - lo < 0.2
    for name, m in a["per_class"].items():
        lo, hi = m["sensitivity_ci95"]
        assert lo <= m["sensitivity"] <= hi, name
    assert a == b and a["macro_roc_auc_ovr_ci95"] != c["macro_roc_auc_ovr_ci95"]
    assert a["bootstrap"] == {"resamples": 300, "seed": 1}
    assert classification_metrics(labels, probs, ["a", "b", "c"], resamples=0)["macro_roc_auc_ovr_ci95"] is None
    # the same predictions in another order (predict.py lists files differently from a test loader): same intervals
    shuffled = rng.permutation(len(labels))
    d = classification_metrics(labels[shuffled], probs[shuffled], ["a", "b", "c"], resamples=300, seed=1)
    assert d["macro_roc_auc_ovr_ci95"] == a["macro_roc_auc_ovr_ci95"]
    assert [m["sensitivity_ci95"] for m in d["per_class"].values()] == [
        m["sensitivity_ci95"] for m in a["per_class"].values()
    ]


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
    from chestxray.reports import curves_figure, gallery_figure

    history = [{"epoch": e, "train/loss": 1 - e / 10, "val/loss": 1 - e / 20} for e in range(3)]
    curves = curves_figure(history, best_epoch=1)
    assert all(float(t).is_integer() for t in curves.axes[0].get_xticks())  # no epoch 0.5
    tiles = [np.zeros((40, 60, 3), np.uint8)] * 2
    gallery = gallery_figure(tiles, [0, 1], [0, 0], ["Normal", "Viral Pneumonia"], [0.9, 0.6], colorbar="evidence")
    assert any(ax.get_ylabel() == "evidence" for ax in gallery.axes)  # the colour scale
    titles = [ax.get_title() for ax in gallery.axes if ax.get_title()]
    assert titles == ["pred: Normal 0.90\ntrue: Normal", "pred: Viral Pneumonia 0.60\ntrue: Normal"]
