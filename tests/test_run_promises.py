"""What a run promises, it does: the best checkpoint by what it monitors, a run from another run's checkpoint that
describes only its own epochs and changes nothing outside its folder, this command line's optimizer settings after a
restore, and a run that learns nothing says so."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from chestxray.errors import ConfigError, ResumeError
from chestxray.training.fit import best_checkpoint_callback, check_files, check_same_optimizer, train
from tests.conftest import train_config
from tests.scripted import ScriptedClassifier

CHEAP = ["report.bootstrap_resamples=0", "report.gallery_tiles=0", "report.gradcam_tiles=0", "logger=csv"]
SCRIPTED = "model._target_=tests.scripted.ScriptedClassifier"


def files_of(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_best_checkpoint_is_the_epoch_with_the_highest_val_acc(tmp_path, synthetic_dir, monkeypatch):
    """val/acc 0.4, 0.8, 0.6: best.ckpt is epoch 1, val/acc_best 0.8, and that checkpoint is the one calibrated."""
    monkeypatch.setattr(ScriptedClassifier, "VAL_ACC", [0.4, 0.8, 0.6])
    out = tmp_path / "run"
    cfg = train_config(out, synthetic_dir, SCRIPTED, "trainer.max_epochs=3", *CHEAP)
    callbacks = dict(cfg.callbacks)  # last.ckpt's callback first: Lightning's checkpoint_callback would be that one
    cfg.callbacks = {"last_checkpoint": callbacks.pop("last_checkpoint"), **callbacks}
    value = train(cfg)
    best = ckpt(out / "checkpoints" / "best.ckpt")
    assert best["epoch"] == 1 and value == pytest.approx(0.8)
    assert bool(best["state_dict"]["calibrated"]) and not bool(
        ckpt(out / "checkpoints" / "last.ckpt")["state_dict"]["calibrated"]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["val/acc_best"] == pytest.approx(0.8)
    assert Path(results["best_checkpoint"]).name == "best.ckpt"


def test_the_best_checkpoint_callback_is_found_by_its_monitor_not_its_place():
    last = ModelCheckpoint(filename="last", monitor=None)
    best = ModelCheckpoint(filename="best", monitor="val/acc", mode="max")
    assert best_checkpoint_callback([last, best]) is best
    assert best_checkpoint_callback([last]) is None
    with pytest.raises(ConfigError, match=r"monitor=val/acc mode=min.*mode: max"):
        best_checkpoint_callback([last, ModelCheckpoint(monitor="val/acc", mode="min")])
    with pytest.raises(ConfigError, match=r"monitor=val/loss mode=min"):
        best_checkpoint_callback([best, ModelCheckpoint(monitor="val/loss", mode="min")])


def test_a_best_checkpoint_by_the_lowest_val_acc_is_refused_before_any_work(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"callbacks: a ModelCheckpoint with monitor=val/acc mode=min"):
        train(train_config(out, synthetic_dir, "callbacks.model_checkpoint.mode=min", *CHEAP))
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_from_another_runs_checkpoint_reports_its_own_epochs_and_changes_nothing_there(
    tmp_path, synthetic_dir, monkeypatch
):
    """Run A's best epoch scored 0.9; run B continues from A's last.ckpt and scores 0.5 then 0.6: B's val/acc_best,
    best.ckpt, curves and calibration are B's own, and no file of A changes."""
    monkeypatch.setattr(ScriptedClassifier, "VAL_ACC", [0.9, 0.9, 0.5, 0.6])
    a, b = tmp_path / "a", tmp_path / "b"
    train(train_config(a, synthetic_dir, SCRIPTED, *CHEAP))
    before = files_of(a)
    value = train(
        train_config(
            b, synthetic_dir, SCRIPTED, f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=4", *CHEAP
        )
    )
    assert files_of(a) == before
    assert value == pytest.approx(0.6)
    best = ckpt(b / "checkpoints" / "best.ckpt")
    assert best["epoch"] == 3 and bool(best["state_dict"]["calibrated"])
    results = json.loads((b / "results.json").read_text())
    assert Path(results["best_checkpoint"]).resolve() == (b / "checkpoints" / "best.ckpt").resolve()
    assert [h["epoch"] for h in json.loads((b / "history.json").read_text())] == [2, 3]


def lr_per_epoch(run: Path) -> list[float]:
    import csv

    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    return [float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")]


@pytest.mark.slow
def test_a_restored_run_takes_this_command_lines_optimizer_and_schedule(tmp_path, synthetic_dir):
    """Two epochs of cosine at lr 0.01, then four epochs in all at lr 1e-4: the last two epochs follow the new
    cosine (1e-4 over 4 epochs), not the old one (0 at epoch 2, then climbing back)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(train_config(a, synthetic_dir, "scheduler=cosine", "optimizer.lr=0.01", *CHEAP))
    assert lr_per_epoch(a) == pytest.approx([0.01, 0.005])
    last = a / "checkpoints" / "last.ckpt"
    train(
        train_config(
            b,
            synthetic_dir,
            "scheduler=cosine",
            "optimizer.lr=0.0001",
            "trainer.max_epochs=4",
            f"ckpt_path={last}",
            *CHEAP,
        )
    )
    assert lr_per_epoch(b) == pytest.approx([5e-5, 1.4644660940672625e-05])
    saved = ckpt(b / "checkpoints" / "last.ckpt")
    assert saved["lr_schedulers"][0]["T_max"] == 4 and saved["lr_schedulers"][0]["base_lrs"] == [0.0001]


def test_another_kind_of_optimizer_cannot_continue_a_checkpoint(tmp_path, tiny_run):
    out = tmp_path / "run"
    with pytest.raises(ResumeError, match=r"ckpt_path=.*optimizer=torch.optim.Adam is not the kind of optimizer"):
        train(
            train_config(
                out, tiny_run["data"], "optimizer=adam", f"ckpt_path={tiny_run['dir'] / 'checkpoints' / 'last.ckpt'}"
            )
        )
    assert not (out / "checkpoints").exists()
    assert ckpt(tiny_run["dir"] / "checkpoints" / "last.ckpt")["optimizer_classes"] == ["torch.optim.sgd.SGD"]


def test_a_run_that_learns_nothing_says_so(tmp_path, synthetic_dir, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="chestxray"):
        constant = "model._target_=tests.scripted.ConstantClassifier"
        train(train_config(out, synthetic_dir, constant, "trainer.max_epochs=1", *CHEAP))  # one epoch is every epoch
    lines = [r.getMessage() for r in caplog.records if "learned nothing" in r.getMessage()]
    assert len(lines) == 1 and "predicted one class for every validation image in every epoch" in lines[0]
    assert all(h["val/classes"] == 1 for h in json.loads((out / "history.json").read_text()))


@pytest.mark.parametrize("max_epochs", [2, 1])
def test_a_checkpoint_with_no_epochs_left_is_refused_before_training(tmp_path, tiny_run, max_epochs):
    """ckpt_path= of a finished 2-epoch run with trainer.max_epochs not above 2 would train zero epochs, test the other
    run's weights and fail at the end (val/acc_best not logged, exit 2): refused at once, in one line."""
    out = tmp_path / "run"
    last = tiny_run["dir"] / "checkpoints" / "last.ckpt"
    cfg = train_config(out, tiny_run["data"], f"trainer.max_epochs={max_epochs}", f"ckpt_path={last}")
    with pytest.raises(ResumeError, match=rf"ckpt_path=.*trainer.max_epochs={max_epochs} but the checkpoint has "):
        train(cfg)
    assert not (out / "checkpoints").exists()
    check_files(train_config(out, tiny_run["data"], "trainer.max_epochs=3", f"ckpt_path={last}"))  # one epoch left


def test_an_optimizer_state_from_an_older_torch_continues_the_same_optimizer(tmp_path, synthetic_dir):
    """The resumed optimizer must be of the checkpoint's kind; torch adds settings over versions (Adam's
    decoupled_weight_decay), so a checkpoint saved without one is still Adam (torch's load_state_dict accepts it).
    Another kind is still refused: by its settings for a checkpoint without the class, by class where it has it."""
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    group = {k: v for k, v in adam.state_dict()["param_groups"][0].items() if k != "decoupled_weight_decay"}
    older = {"optimizer_states": [{"state": {}, "param_groups": [group]}]}
    cfg = train_config(tmp_path / "run", synthetic_dir, "optimizer=adam")
    check_same_optimizer(older, cfg, "ckpt_path=old.ckpt")  # no ResumeError
    adam.load_state_dict(older["optimizer_states"][0])  # what Lightning will do with it
    sgd = train_config(tmp_path / "run", synthetic_dir, "optimizer=sgd")
    with pytest.raises(ResumeError, match=r"optimizer=torch.optim.SGD is not the kind .* \(its settings: amsgrad, "):
        check_same_optimizer(older, sgd, "ckpt_path=old.ckpt")
    recorded = {**older, "optimizer_classes": ["torch.optim.adam.Adam"]}
    check_same_optimizer(recorded, cfg, "ckpt_path=old.ckpt")
    with pytest.raises(ResumeError, match=r"SGD is not the kind .* \(it was torch.optim.adam.Adam\)"):
        check_same_optimizer(recorded, sgd, "ckpt_path=old.ckpt")


def test_a_weights_only_checkpoint_is_refused_before_training_with_the_setting_that_takes_it(tmp_path, tiny_run):
    """adapt.py's checkpoints hold no optimizer state: Lightning would fail on it after decoding every image."""
    saved = ckpt(tiny_run["ckpt"])
    saved.pop("optimizer_states")
    weights = tmp_path / "adapted.ckpt"
    torch.save(saved, weights)
    out = tmp_path / "run"
    cfg = train_config(out, tiny_run["data"], "trainer.max_epochs=4", f"ckpt_path={weights}")
    with pytest.raises(ResumeError, match=rf"no optimizer state .* model.init_from={weights}$"):
        train(cfg)
    assert not (out / "checkpoints").exists()


def test_settings_that_would_train_no_step_are_refused(tmp_path, synthetic_dir):
    """A batch larger than the fit split (the last incomplete batch is dropped), or limit_train_batches=0: Lightning
    would train nothing and test the untrained weights. One line naming the setting, before any epoch."""
    from chestxray import settings

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^data.batch_size=500: more than the \d+ images of the fit split"):
        train(train_config(out, synthetic_dir, "data.batch_size=500", *CHEAP))
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()
    for value in ("0", "0.0"):
        cfg = train_config(out, synthetic_dir, f"trainer.limit_train_batches={value}")
        with pytest.raises(ConfigError, match=rf"^trainer.limit_train_batches={value}: no step would train"):
            settings.check(cfg, settings.TRAIN_RULES)


def test_the_batch_check_counts_each_process_share_as_the_distributed_sampler_pads_it(monkeypatch):
    """9 fit images on 2 processes: 5 each (the sampler pads), so a batch of 5 trains a step and 6 does not."""
    from chestxray.data import datamodule

    monkeypatch.setattr(datamodule, "world_size", lambda: 2)
    dm = datamodule.ChestXrayDataModule("unused", batch_size=5, download=False)
    dm._check_a_batch_trains(9)
    dm.hparams.batch_size = 6
    with pytest.raises(ConfigError, match=r"^data.batch_size=6: more than the 9 images of the fit split \(2 processes"):
        dm._check_a_batch_trains(9)
