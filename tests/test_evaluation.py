"""Honest numbers on other sets: evaluation sets with their own reports, leak-free numbers, and a set that is the test
folder said to be so."""

import json
import logging
import shutil

import pytest

from chestxray.errors import DataError
from chestxray.training.fit import train
from tests.conftest import train_config
from tests.test_train import read_events


@pytest.mark.slow
def test_an_evaluation_set_copied_from_the_test_folder_gets_its_numbers_and_is_called_a_copy(
    data_dir, tmp_path, caplog
):
    copy = tmp_path / "hospital_b"
    shutil.copytree(data_dir / "test", copy)
    out = tmp_path / "run"
    cfg = train_config(out, data_dir, "data.check_leakage=true", f"+eval_sets.hospital_b={copy}")
    with caplog.at_level(logging.INFO):
        with pytest.warns(UserWarning, match=r"evaluation set hospital_b shares (\d+) of its \1 images with the test"):
            train(cfg)
    test = json.loads((out / "metrics.json").read_text())
    other = json.loads((out / "eval" / "hospital_b" / "metrics.json").read_text())
    for key in ("n", "accuracy", "accuracy_ci95", "confusion_matrix", "per_class", "macro_roc_auc_ovr", "loss"):
        assert other[key] == pytest.approx(test[key]) if isinstance(test[key], float) else other[key] == test[key], key
    assert other["shares_with_test"] == other["n"] and "shares_with_test" not in test
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
    messages = [r.getMessage() for r in caplog.records]
    side_by_side = next(m for m in messages if "all evaluated sets" in m)
    rows = [line for line in side_by_side.splitlines() if line.startswith(("test ", "hospital_b "))]
    assert len(rows) == 2 and rows[0].split()[1:8] == rows[1].split()[1:8]  # same n, accuracy, intervals, leak-free
    assert f"(shares {other['n']} images with test)" in rows[1]
    printed = next(m for m in messages if m.startswith("hospital_b report"))
    assert f"shares {other['n']} of its {other['n']} images with the test folder" in printed
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert results["eval/hospital_b/acc"] == pytest.approx(test["accuracy"])


def test_an_evaluation_set_with_other_class_names_is_refused_naming_them(data_dir, tmp_path):
    other = tmp_path / "other"
    for name in ("Normal", "COVID-19", "Pneumonia"):
        (other / name).mkdir(parents=True)
    cfg = train_config(tmp_path / "run", data_dir, f"+eval_sets.other={other}")
    with pytest.raises(DataError, match=r"class folders \['COVID-19', 'Normal', 'Pneumonia'\] differ from the model's"):
        train(cfg)
