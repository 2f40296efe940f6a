"""Training end to end: what a run writes, which checkpoint it tests, calibration, resume, stops and sweeps."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chestxray.errors import NonFiniteLossError, OutputDirError
from chestxray.evaluation import metrics
from chestxray.models.checkpoints import load_model
from chestxray.training.fit import build, check_files, train
from tests.conftest import ROOT, TINY, run_script, signal_when, train_config

SCALARS = {
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "val/acc_best",
    "test/loss",
    "test/acc",
    "test/acc_leak_free",
    "test/loss_leak_free",
}

# The report without its slowest parts (intervals, galleries): for tests about something else.
CHEAP_REPORT = ["report.bootstrap_resamples=0", "report.gallery_tiles=0", "report.gradcam_tiles=0"]


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def report_probs(folder: Path) -> dict[str, np.ndarray]:
    with open(folder / "predictions.csv", newline="") as fh:
        return {r["path"]: np.array([float(r[k]) for k in r if k.startswith("prob_")]) for r in csv.DictReader(fh)}


# --- the fast tier: one fast_dev_run, and a two-epoch run's files -----------------------------------------------


def test_fast_dev_run_goes_through_train_test_and_report(tmp_path, data_dir):
    out = tmp_path / "fdr"
    cfg = train_config(out, data_dir, "debug=fdr", "data.check_leakage=true")
    value = train(cfg)
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == 8 and 0 <= report["accuracy"] <= 1  # one test batch of 8
    assert report["accuracy"] == pytest.approx(json.loads((out / "results.json").read_text())["metrics"]["test/acc"])
    assert value == pytest.approx(json.loads((out / "results.json").read_text())["metrics"]["val/acc_best"])
    with open(out / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_bf16_mixed_trains_in_bf16_and_tests_and_calibrates_in_fp32(tmp_path, synthetic_dir, monkeypatch):
    """trainer=cpu's bf16 on AMX: the training forward passes run in bf16, but the test report and the temperature
    come from fp32 forward passes, the model predict.py runs."""
    from chestxray.models.classifier import ChestXrayClassifier

    seen = []

    def recorded(forward):
        def recording(self, images):
            out = forward(self, images)
            stage = "train" if self.training else ("test" if self.trainer.testing else "other")
            seen.append((stage, (out[0] if isinstance(out, tuple) else out).dtype))
            return out

        return recording

    # training and validation call logits; the test and the calibration also want the pooled features (detectors)
    for name in ("logits", "logits_and_features"):
        monkeypatch.setattr(ChestXrayClassifier, name, recorded(getattr(ChestXrayClassifier, name)))
    out = tmp_path / "bf16"
    train(train_config(out, synthetic_dir, "trainer.precision=bf16-mixed", "trainer.max_epochs=1", *CHEAP_REPORT))
    dtypes = {stage: {d for s, d in seen if s == stage} for stage in ("train", "test", "other")}
    assert dtypes["train"] == {torch.bfloat16}
    assert dtypes["test"] == {torch.float32} and dtypes["other"] == {torch.bfloat16, torch.float32}
    assert torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]["calibrated"]


def test_a_run_writes_its_checkpoints_reports_and_curves(tiny_run):
    out = tiny_run["dir"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    events = read_events(out / "tensorboard")
    assert SCALARS <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 2 and len(events.Scalars("val/acc")) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["test/acc"] == pytest.approx(events.Scalars("test/acc")[-1].value)
    assert tiny_run["value"] == pytest.approx(max(e.value for e in events.Scalars("val/acc")))
    for name in ("samples", "curves", "confusion_matrix", "per_class", "reliability", "gallery", "gradcam_gallery"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "metrics.json", out / "results.json", out / "checkpoints" / "best.ckpt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # written whole, with the user's permissions


def test_best_ckpt_is_the_epoch_with_the_highest_validation_accuracy(tiny_run):
    """The first epoch that reached the highest val/acc (a later tie is not better), and last.ckpt the last."""
    out = tiny_run["dir"]
    val_acc = [e.value for e in read_events(out / "tensorboard").Scalars("val/acc")]
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert best["epoch"] == int(np.argmax(val_acc))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] == 1


def test_the_test_report_holds_the_modules_numbers_and_the_same_numbers_from_its_rows(tiny_run):
    """metrics.json is what the module's collections computed (logged to TensorBoard too); recomputing the report
    from predictions.csv with predict's path gives the same numbers."""
    out = tiny_run["dir"]
    report = json.loads((out / "metrics.json").read_text())
    events = read_events(out / "tensorboard")
    assert report["accuracy"] == pytest.approx(events.Scalars("test/acc")[-1].value, abs=1e-6)
    assert report["loss"] == pytest.approx(events.Scalars("test/loss")[-1].value, abs=1e-5)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    classes = report["classes"]
    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    again = metrics.evaluate(labels, probs, classes)
    for key in ("n", "correct", "confusion_matrix"):
        assert again[key] == report[key], key
    for key in ("accuracy", "loss", "expected_calibration_error"):
        assert again[key] == pytest.approx(report[key], abs=1e-4), key
    # the CSV keeps 6 decimals: probabilities of a barely trained model tie there, which moves the AUC a little
    assert again["macro_roc_auc_ovr"] == pytest.approx(report["macro_roc_auc_ovr"], abs=5e-3)
    clean = report["leak_free"]
    assert clean["n"] == report["n"] - len(report["leaking_images"]) and len(report["leaking_images"]) == 3
    kept = [r for r in rows if r["leaking"] == "0"]
    assert clean["correct"] == sum(r["pred"] == r["label"] for r in kept)
    assert events.Scalars("test/acc_leak_free")[-1].value == pytest.approx(clean["accuracy"], abs=1e-6)


def test_the_best_checkpoint_is_calibrated_on_the_validation_split(tiny_run):
    out = tiny_run["dir"]
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    temperature = float(best["state_dict"]["temperature"])
    assert bool(best["state_dict"]["calibrated"]) and temperature != 1.0
    assert float(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["temperature"]) == 1
    report = json.loads((out / "metrics.json").read_text())
    calibration = report["calibration"]
    assert calibration["temperature"] == pytest.approx(temperature)
    assert calibration["after"]["loss"] == pytest.approx(report["loss"])
    # the reported probabilities are the calibrated ones: softmax(logits / T) of the checkpoint
    model = load_model(out / "checkpoints" / "best.ckpt")
    from hydra.utils import instantiate

    dm = instantiate(tiny_run["cfg"].data)
    dm.setup()
    test = dm.test_sets["test"]
    batch = torch.stack([test[i][0] for i in range(8)])
    with torch.inference_mode():
        expected = (model.logits(batch) / temperature).softmax(1).numpy()
        uncalibrated = model.logits(batch).softmax(1).numpy()
    reported = report_probs(out)
    got = np.array([reported[str(test.paths[i])] for i in range(8)])
    assert np.abs(got - expected).max() < 1e-5 and np.abs(got - uncalibrated).max() > 1e-4
    assert (got.argmax(1) == uncalibrated.argmax(1)).all()
    # fitted on the validation split's logits (not the test folder's): the same fit on them gives the same T
    from chestxray.models.calibration import fit_temperature

    def logits_of(dataset):
        with torch.inference_mode():
            return torch.cat(
                [
                    model.logits(torch.stack([dataset[i][0] for i in range(s, min(s + 16, len(dataset)))]))
                    for s in range(0, len(dataset), 16)
                ]
            )

    val = dm.datasets["val"]
    assert fit_temperature(logits_of(val), val.labels) == pytest.approx(temperature, rel=1e-4)
    assert fit_temperature(logits_of(test), test.labels) != pytest.approx(temperature, rel=1e-2)


def test_calibrate_false_leaves_the_model_and_its_report_uncalibrated(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    train(train_config(out, synthetic_dir, "model.calibrate=false", "trainer.max_epochs=1", *CHEAP_REPORT))
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert float(best["temperature"]) == 1.0 and not bool(best["calibrated"])
    assert "calibration" not in json.loads((out / "metrics.json").read_text())


def test_output_folder_below_a_file_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = train_config(blocker / "run", data_dir)
    with pytest.raises(OutputDirError, match=str(blocker / "run")):
        train(cfg)


# --- the slow tier ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_model_learns_and_the_report_is_the_best_checkpoint_image_by_image(trained_run):
    out = trained_run["dir"]
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert results["test/acc"] > 0.6  # chance is 1/3; the generated classes are learnt to about 0.9 and above
    val_acc = [h["val/acc"] for h in json.loads((out / "history.json").read_text())]
    best_epoch = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")["epoch"]
    assert max(val_acc) > min(val_acc) and best_epoch == int(np.argmax(val_acc))  # the best epoch, not the worst
    reported = report_probs(out)
    from hydra.utils import instantiate

    dm = instantiate(trained_run["cfg"].data)
    dm.setup()
    test = dm.test_sets["test"]
    images = torch.stack([test[i][0] for i in range(len(test))])
    model = load_model(out / "checkpoints" / "best.ckpt")
    with torch.inference_mode():
        probs = model(images).softmax(1).numpy()
    best = np.array([reported[str(p)] for p in test.paths])
    assert np.abs(best - probs).max() < 1e-5
    assert (probs.argmax(1) == test.labels.numpy()).mean() == pytest.approx(results["test/acc"], abs=1e-6)


class RuinTheLastEpoch(L.Callback):
    """From the last epoch on, the model calls everything the first class: the last epoch is never the best."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                head = pl_module.net.classifier[-1]
                head.weight.zero_()
                head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))


@pytest.mark.slow
def test_the_test_report_is_of_the_best_epoch_not_the_last(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    cfg = train_config(out, synthetic_dir, "trainer.max_epochs=3", "optimizer=adam", "optimizer.lr=1e-4")
    datamodule, model, trainer = build(cfg)
    trainer.callbacks.append(RuinTheLastEpoch())
    trainer.fit(model, datamodule=datamodule)
    best = trainer.checkpoint_callback.best_model_path
    assert torch.load(best, weights_only=True)["epoch"] < 2
    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
    reported = report_probs(out)
    test = datamodule.test_sets["test"]
    images = torch.stack([test[i][0] for i in range(len(test))])
    for name, should_match in (("best.ckpt", True), ("last.ckpt", False)):
        with torch.inference_mode():
            probs = load_model(out / "checkpoints" / name)(images).softmax(1).numpy()
        got = np.array([reported[str(p)] for p in test.paths])
        assert (np.abs(got - probs).max() < 1e-5) == should_match, name


@pytest.mark.slow
def test_a_nan_in_the_first_of_two_accumulated_batches_stops_training(tmp_path, synthetic_dir):
    """trainer.accumulate_grad_batches=2: batch 0's loss is NaN, batch 1's is not; the step must not be applied."""

    class PoisonOneBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                self.saved = pl_module.net.classifier[-1].bias.detach().clone()
                with torch.no_grad():
                    pl_module.net.classifier[-1].bias.fill_(float("nan"))
            elif trainer.current_epoch == 1 and batch_idx == 1:
                with torch.no_grad():
                    pl_module.net.classifier[-1].bias.copy_(self.saved)

    cfg = train_config(
        tmp_path, synthetic_dir, "trainer.max_epochs=3", "trainer.accumulate_grad_batches=2", "test=false"
    )
    datamodule, model, trainer = build(cfg)
    trainer.callbacks.append(PoisonOneBatch())
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 1, step 2 \(batch 0\)"):
        trainer.fit(model, datamodule=datamodule)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(
        torch.isfinite(v).all() for k, v in last["state_dict"].items() if k.startswith("net.") and v.is_floating_point()
    )


@pytest.mark.slow
def test_wrong_checkpoint_and_weights_files_are_named_with_what_is_wrong(tmp_path, synthetic_dir, tiny_run):
    text = tmp_path / "notes.ckpt"
    text.write_text("I am not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    cases = [
        (f"ckpt_path={tmp_path / 'missing.ckpt'}", rf"ckpt_path={tmp_path / 'missing.ckpt'}: file not found"),
        (f"ckpt_path={text}", rf"ckpt_path={text}: not a PyTorch checkpoint"),
        (f"ckpt_path={other}", rf"ckpt_path={other}: not a chestxray checkpoint"),
        (f"ckpt_path={tiny_run['dir'] / 'checkpoints' / 'last.ckpt'}", r"data.image_size=64 but the checkpoint has 32"),
        (f"ckpt_path={tiny_run['dir'] / 'checkpoints' / 'last.ckpt'}", r"model.backbone=resnet50 but the checkpoint"),
    ]
    for override, message in cases:
        extra = (
            ["data.image_size=64"]
            if "image_size" in message
            else ["model.backbone=resnet50"]
            if "backbone" in message
            else []
        )
        with pytest.raises(Exception, match=message) as err:
            check_files(train_config(tmp_path / "run", synthetic_dir, override, *extra))
        assert "\n" not in str(err.value)  # one line
    run = tmp_path / "r"
    result = run_script(
        "train.py", *TINY, f"data.data_dir={synthetic_dir}", f"ckpt_path={text}", f"hydra.run.dir={run}", ok=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"train.py: error: CheckpointError: ckpt_path={text}:")
    assert "decoding" not in result.stderr  # refused before any image was decoded
    assert [p.name for p in run.iterdir()] == ["train.log"]  # only the log that explains the refusal


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.image_size=-1"], "train.py: error: ConfigError: data.image_size=-1: must be an integer at least 32"),
        (["trainer.max_epochs=0"], "train.py: error: ConfigError: trainer.max_epochs=0: must be an integer at least 1"),
        (["optimizer=adam", "experiment=notebook"], "train.py: error: ConfigError: optimizer=adam contradicts"),
    ],
)
def test_bad_settings_are_refused_at_once_leaving_only_the_log(tmp_path, synthetic_dir, overrides, message):
    run = tmp_path / "run"
    start = time.monotonic()
    result = run_script("train.py", f"data.data_dir={synthetic_dir}", *overrides, f"hydra.run.dir={run}", ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "decoding" not in result.stderr and time.monotonic() - start < 60
    assert [p.name for p in run.iterdir()] == ["train.log"] and message in (run / "train.log").read_text()


# --- run folders ----------------------------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    from chestxray.runtime.folders import new_folder

    base = str(tmp_path / "runs" / "2026-12-01_10-00-00")
    assert [Path(new_folder(base)).name for _ in range(3)] == [
        "2026-12-01_10-00-00",
        "2026-12-01_10-00-00_2",
        "2026-12-01_10-00-00_3",
    ]


@pytest.mark.slow
def test_two_trainings_started_together_never_share_a_folder(tmp_path, synthetic_dir):
    """The default run folder with a fixed time stamp (as two runs in the same second get), resolved by each process:
    two folders, each with its own settings and checkpoints. The same folder given by hand: the second is refused."""
    base = tmp_path / "runs" / "same-second"
    common = [*TINY, f"data.data_dir={synthetic_dir}", "test=false", "trainer.max_epochs=1"]
    cmds = [
        [sys.executable, "train.py", *common, f"optimizer.lr={lr}", f"hydra.run.dir=${{chestxray.run_dir:null,{base}}}"]
        for lr in ("0.1", "0.0001")
    ]
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read()[-2000:] for p in procs]
    folders = sorted(base.parent.iterdir())
    assert [f.name for f in folders] == ["same-second", "same-second_2"]
    lrs = {f.name: (f / ".hydra" / "overrides.yaml").read_text() for f in folders}
    assert sorted("optimizer.lr=0.1" in t for t in lrs.values()) == [False, True]
    for folder in folders:
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["epoch"] == 0 and len(list((folder / "tensorboard").glob("events.*"))) == 1
    again = run_script("train.py", *common, f"hydra.run.dir={folders[0]}", ok=False)
    assert again.returncode == 2
    assert f"OutputDirError: hydra.run.dir={folders[0]} already holds a run (checkpoints" in again.stderr


@pytest.mark.slow
def test_resume_continues_the_run_in_its_folder_with_its_settings(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    base = [o for o in TINY if "max_epochs" not in o]
    run_script(
        "train.py",
        *base,
        f"data.data_dir={synthetic_dir}",
        "trainer.max_epochs=2",
        "test=false",
        f"hydra.run.dir={run}",
    )
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    # only the new setting on the command line: data dir, image size, pretrained... come from the run
    run_script("train.py", f"resume={run}", "trainer.max_epochs=3")
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == 2 and final["global_step"] == 3 * 4
    assert final["hyper_parameters"]["image_size"] == 32
    assert len(read_events(run / "tensorboard").Scalars("train/loss")) == 3  # one TensorBoard run, every epoch once
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0, 1, 2]
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert f"data.data_dir={synthetic_dir}" in overrides and "trainer.max_epochs=3" in overrides
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no second run folder

    changed = run_script("train.py", f"resume={run}", "data.image_size=64", ok=False)
    assert changed.returncode == 2 and f"resume={run}: data.image_size=64 but the checkpoint has 32" in changed.stderr
    assert "data.image_size=64" not in (run / ".hydra" / "overrides.yaml").read_text()  # a refusal changes nothing
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / ".hydra").is_dir()  # and deletes nothing
    again = run_script("train.py", f"resume={run}", "trainer.max_epochs=4")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    out = again.stdout + again.stderr
    assert out.count("`Trainer.fit` stopped") == 1  # each message once (not also through Lightning's own handler)
    assert "Tip:" not in out and "LeafSpec" not in out
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_script("train.py", f"resume={empty}", ok=False)
    assert missing.returncode == 2 and "not the folder of a train.py run" in missing.stderr


@pytest.mark.slow
def test_resume_runs_with_the_new_learning_rate_and_a_schedule_stretched_to_the_new_length(tmp_path, synthetic_dir):
    """The case that was wrong: 2 epochs of cosine at lr 0.01, resumed to 4 epochs at lr 1e-4. The learning rate
    logged is the one that ran: 0.01, 0.005, then the new cosine over 4 epochs (5e-5, 1.46e-5), not 0 and back up;
    the saved config says 1e-4. Another kind of optimizer is refused in one line."""
    run = tmp_path / "run"
    base = [o for o in TINY if "max_epochs" not in o]
    run_script(
        "train.py",
        *base,
        f"data.data_dir={synthetic_dir}",
        "scheduler=cosine",
        "optimizer.lr=0.01",
        "test=false",
        f"hydra.run.dir={run}",
    )
    run_script("train.py", f"resume={run}", "trainer.max_epochs=4", "optimizer.lr=0.0001")
    lr = [e.value for e in read_events(run / "tensorboard").Scalars("lr-SGD")]
    assert lr == pytest.approx([0.01, 0.005, 5e-5, 1.4644660940672625e-05], rel=1e-5)
    assert "lr: 0.0001" in (run / ".hydra" / "config.yaml").read_text()
    adam = run_script("train.py", f"resume={run}", "trainer.max_epochs=5", "optimizer=adam", ok=False)
    assert adam.returncode == 2 and "optimizer=torch.optim.Adam is not the kind of optimizer" in adam.stderr


def test_resume_overrides_replace_saved_ones_of_the_same_key():
    from chestxray.training.resume import merge_overrides

    saved = ["data.image_size=32", "trainer.max_epochs=2", "+eval_sets.b=/x"]
    assert merge_overrides(saved, ["trainer.max_epochs=5"]) == [
        "data.image_size=32",
        "+eval_sets.b=/x",
        "trainer.max_epochs=5",
    ]
    assert merge_overrides(["trainer.max_epochs=5"], ["trainer.max_epochs=2"]) == ["trainer.max_epochs=2"]
    assert merge_overrides(saved, ["+eval_sets.b=/y"])[-1] == "++eval_sets.b=/y"  # may exist already: forced


def test_resume_of_another_commands_run_folder_is_refused_and_writes_nothing_there(tmp_path):
    """resume= naming an adapt.py or predict.py run's folder: refused in one line naming the command, and its log
    goes to a new folder, not into that run's."""
    from omegaconf import OmegaConf

    from chestxray.errors import ResumeError
    from chestxray.runtime.folders import run_dir
    from chestxray.training.resume import resume_config

    adapt = tmp_path / "adapt-run"
    (adapt / ".hydra").mkdir(parents=True)
    (adapt / ".hydra" / "config.yaml").write_text("task_name: adapt\nsite: somewhere\n")
    (adapt / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: adapt\n")
    (adapt / ".hydra" / "overrides.yaml").write_text("- site=somewhere\n")
    new = run_dir(str(adapt), str(tmp_path / "train" / "runs" / "now"))
    assert Path(new) == tmp_path / "train" / "runs" / "now" and Path(new).is_dir()
    with pytest.raises(ResumeError, match=r"adapt-run: the folder of a run of adapt.py, not of train.py$"):
        resume_config(OmegaConf.create({"resume": str(adapt)}))
    assert sorted(p.name for p in adapt.rglob("*")) == [".hydra", "config.yaml", "hydra.yaml", "overrides.yaml"]
    (adapt / ".hydra" / "config.yaml").write_text("task_name: debug\n")  # train.py debug=limit: a train.py run
    (adapt / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n")
    assert run_dir(str(adapt), str(tmp_path / "other")) == str(adapt)


class WorseEveryEpoch(L.Callback):
    """Makes the model call everything the first class, from the first epoch after the resume."""

    def on_train_epoch_start(self, trainer, pl_module):
        with torch.no_grad():
            head = pl_module.net.classifier[-1]
            head.weight.zero_()
            head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))


@pytest.mark.slow
def test_best_validation_accuracy_survives_a_resume(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    train(train_config(out, synthetic_dir, "test=false", "trainer.max_epochs=1"))
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert "val_acc_best.max_value" in saved["state_dict"]  # the running best is in the checkpoint
    saved["state_dict"]["val_acc_best.max_value"] = torch.tensor(0.99)  # as if epoch 0 had been that good
    torch.save(saved, last)
    datamodule, model, trainer = build(train_config(out, synthetic_dir, "test=false", "trainer.max_epochs=3"))
    trainer.callbacks.append(WorseEveryEpoch())
    trainer.fit(model, datamodule=datamodule, ckpt_path=last)
    assert trainer.callback_metrics["val/acc"] < 0.5
    assert float(trainer.callback_metrics["val/acc_best"]) == pytest.approx(0.99)
    assert [e.value for e in read_events(out / "tensorboard").Scalars("val/acc_best")][-2:] == pytest.approx([0.99] * 2)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]  # curves.png of a resumed run shows every epoch
    assert (out / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_sigterm_stops_training_with_143_and_resume_finishes_the_run(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    args = [o for o in TINY if "debug" not in o]
    cmd = [sys.executable, "train.py", *args, "debug=default", f"data.data_dir={synthetic_dir}", "trainer.max_epochs=4"]
    cmd += ["data.batch_size=2", "test=false", f"hydra.run.dir={run}"]
    last = run / "checkpoints" / "last.ckpt"
    proc, stderr, seconds = signal_when(cmd, last.exists, signal.SIGTERM)
    assert seconds < 15
    assert proc.returncode == 143, stderr[-3000:]
    message = f"train.py: stopped by SIGTERM: resume with: python train.py resume={run}"
    assert message in stderr and message in (run / "train.log").read_text()  # in the run's log too
    saved = torch.load(last, weights_only=True)  # never half-written: it loads
    assert saved["epoch"] < 3
    steps_per_epoch = saved["global_step"] // (saved["epoch"] + 1)
    run_script("train.py", f"resume={run}")
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 4 * steps_per_epoch
    steps = [e.step for e in read_events(run / "tensorboard").Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # resumed, not restarted: each epoch once


@pytest.mark.slow
def test_lr_multirun_makes_one_folder_per_run_and_a_summary(tmp_path, synthetic_dir):
    """A refused job (lr=abc) fails alone: the other runs finish, the summary is written and names it, exit 2."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if "check_leakage" not in o]
    result = run_script(
        "train.py",
        "-m",
        "optimizer.lr=1e-3,abc,1e-2",
        "trainer.max_epochs=1",
        *overrides,
        f"data.data_dir={synthetic_dir}",
        f"hydra.sweep.dir={sweep}",
        ok=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sweep: job 1 refused: train.py: error: ConfigError: optimizer.lr=abc" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(sweep / "1")) == ["train.log"]  # a refused run leaves only its log
    runs = [sweep / "0", sweep / "2"]
    for run, lr in zip(runs, ("0.001", "0.01"), strict=True):
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert f"optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()
    with open(sweep / "summary.csv", newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"0", "2"}
    assert (
        "Refused (no results; its log says why): `1`: train.py: error: ConfigError: optimizer.lr=abc"
        in (sweep / "summary.md").read_text()
    )
    for run in runs:
        report = json.loads((run / "metrics.json").read_text())
        results = json.loads((run / "results.json").read_text())
        row = rows[run.name]
        assert float(row["test/acc"]) == pytest.approx(report["accuracy"], abs=1e-4)
        assert float(row["val/acc_best"]) == pytest.approx(results["metrics"]["val/acc_best"], abs=1e-4)
        assert float(row["test/acc_leak_free"]) == pytest.approx(report["leak_free"]["accuracy"], abs=1e-4)
    values = [float(r["val/acc_best"]) for r in rows.values()]
    assert values == sorted(values, reverse=True)  # best first
    assert "McNemar" in (sweep / "summary.md").read_text()


def test_checkpoints_are_written_beside_their_place_and_renamed_into_it(tmp_path, synthetic_dir, monkeypatch):
    """Not staged in $TMPDIR (another file system, often) and copied: a kill mid-copy would leave half a last.ckpt."""
    import tempfile

    from chestxray.models.checkpoints import AtomicCheckpointIO

    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    moves, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((Path(a), Path(b))), replace(a, b))[1])
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["x"].sum() == 3
    assert [b for _, b in moves] == [target] and moves[0][0].parent == target.parent
    assert not list(elsewhere.iterdir())
    _, _, trainer = build(train_config(tmp_path / "built", synthetic_dir, "debug=fdr"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_one_fit_image_per_class_trains_calibrates_and_reports(tmp_path):
    """Two images per class split half and half: the fit still ends with a test report and a best.ckpt that carries
    the detector and the sets (the Mahalanobis fit on one image per class used to raise LinAlgError: exit 1)."""
    from chestxray.synthetic import make_dataset

    data = tmp_path / "data"
    make_dataset(data, {"train": 2, "test": 2}, size=48, seed=1)
    out = tmp_path / "run"
    train(train_config(out, data, "data.val_fraction=0.5", "data.batch_size=1", *CHEAP_REPORT))
    state = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert bool(state["ood.fitted"]) and bool(state["conformal.fitted"])
    assert (out / "metrics.json").is_file()


def test_the_conformal_threshold_is_fitted_on_the_validation_splits_logits(tmp_path, synthetic_dir):
    """best.ckpt's conformal threshold is the one of the validation split's calibrated probabilities, not of the
    training images' (scripted to differ: tests.scripted.SplitAwareClassifier)."""
    from hydra.utils import instantiate

    from chestxray.models import ood
    from tests.scripted import SplitAwareClassifier

    out = tmp_path / "run"
    target = "model._target_=tests.scripted.SplitAwareClassifier"
    cfg = train_config(out, synthetic_dir, target, "trainer.max_epochs=1", "test=false", *CHEAP_REPORT)
    train(cfg)
    state = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    dm = instantiate(cfg.data)
    dm.setup()
    val, fit = dm.datasets["val"].labels, dm.datasets["train"].labels
    logits = SplitAwareClassifier.scripted_logits(torch.arange(len(val)), 0)
    expected = ood.conformal_min_prob((logits / state["temperature"]).softmax(1), val, 0.9)
    train_logits = SplitAwareClassifier.scripted_logits(torch.arange(len(fit)), 1)
    on_train = ood.conformal_min_prob((train_logits / state["temperature"]).softmax(1), fit, 0.9)
    assert abs(expected - on_train) > 0.05  # the test can tell the two apart
    assert float(state["conformal.min_prob"]) == pytest.approx(expected, abs=1e-5)
