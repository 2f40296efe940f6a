import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chestxray.checkpoints import load_checkpoint
from chestxray.training import OutputDirError, build, check_files, train
from tests.conftest import ROOT, TINY, signal_when, train_config

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


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def run_script(*args: str, timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def report_probs(folder: Path) -> dict[str, np.ndarray]:
    with open(folder / "predictions.csv", newline="") as fh:
        return {r["path"]: np.array([float(r[k]) for k in r if k.startswith("prob_")]) for r in csv.DictReader(fh)}


def test_run_writes_checkpoints_a_stable_best_name_and_curves(trained_run):
    out = trained_run["dir"]
    checkpoints = out / "checkpoints"
    epochs = [p for p in checkpoints.glob("epoch_*.ckpt")]
    assert len(epochs) == 1 and (checkpoints / "last.ckpt").is_file()
    assert (checkpoints / "best.ckpt").resolve() == epochs[0].resolve()
    events = read_events(out / "tensorboard")
    assert SCALARS <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 10 and len(events.Scalars("val/acc")) == 10
    assert trained_run["value"] == pytest.approx(max(e.value for e in events.Scalars("val/acc")))
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["test/acc"] == pytest.approx(events.Scalars("test/acc")[-1].value)
    assert results["metrics"]["test/acc"] > 0.6  # it learned: chance is 1/3


def test_report_is_the_best_checkpoint_image_by_image(trained_run):
    """The test report's per-image probabilities are those of a reload of best.ckpt, not of the last weights."""
    out = trained_run["dir"]
    reported = report_probs(out)
    metrics = json.loads((out / "metrics.json").read_text())
    logged = read_events(out / "tensorboard").Scalars("test/acc")[-1].value
    assert metrics["accuracy"] == pytest.approx(logged, abs=1e-6)
    from hydra.utils import instantiate

    dm = instantiate(trained_run["cfg"].data)
    dm.setup()
    test = dm.test_sets["test"]
    images = torch.stack([test[i][0] for i in range(len(test))])
    probs = {}
    for name in ("best.ckpt", "last.ckpt"):
        model = load_checkpoint(out / "checkpoints" / name)
        with torch.inference_mode():
            probs[name] = model(images).softmax(1).numpy()
    best = np.array([reported[str(p)] for p in test.paths])
    assert best.shape == probs["best.ckpt"].shape and np.abs(best - probs["best.ckpt"]).max() < 1e-5
    if torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] != 9:
        assert np.abs(best - probs["last.ckpt"]).max() > 1e-3  # a test of the last weights would not match
    labels = test.labels.numpy()
    assert (probs["best.ckpt"].argmax(1) == labels).mean() == pytest.approx(logged, abs=1e-6)


def test_leak_free_numbers_exclude_exactly_the_flagged_test_images(trained_run):
    out = trained_run["dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    flagged = {Path(p).name for p in metrics["leaking_images"]}
    assert flagged == {"leak_0.jpg", "leak_1.jpg", "leak_2.jpg"}  # the generated copies of train images
    clean = metrics["leak_free"]
    assert clean["n"] == metrics["n"] - 3
    rows = [r for r in csv.DictReader(open(out / "predictions.csv")) if r["leaking"] == "0"]
    assert clean["correct"] == sum(r["pred"] == r["label"] for r in rows)
    events = read_events(out / "tensorboard")
    assert events.Scalars("test/acc_leak_free")[-1].value == pytest.approx(clean["accuracy"], abs=1e-6)


def test_output_folder_below_a_file_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = train_config(blocker / "run", data_dir)
    with pytest.raises(OutputDirError, match=str(blocker / "run")):
        train(cfg)


# --- wrong files: one clear line, status 2, before any image is decoded -------------------------------------------


def test_wrong_checkpoint_and_weights_files_are_named_with_what_is_wrong(tmp_path, synthetic_dir, trained_run):
    text = tmp_path / "notes.ckpt"
    text.write_text("I am not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    resnet = tmp_path / "resnet.pth"
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), resnet)
    cases = [
        (f"ckpt_path={tmp_path / 'missing.ckpt'}", rf"ckpt_path={tmp_path / 'missing.ckpt'}: file not found"),
        (f"ckpt_path={text}", rf"ckpt_path={text}: not a PyTorch checkpoint"),
        (f"ckpt_path={other}", rf"ckpt_path={other}: not a chestxray checkpoint"),
        (
            f"model.weights_path={resnet}",
            rf"model.weights_path={resnet}: not torchvision VGG19 weights: keys missing 38",
        ),
        (f"model.weights_path={text}", rf"model.weights_path={text}: not a PyTorch weights file"),
        (
            f"ckpt_path={trained_run['dir'] / 'checkpoints' / 'last.ckpt'}",
            r"data.image_size=64 but the checkpoint has 32",
        ),
    ]
    for override, message in cases:
        size = ["data.image_size=64"] if "last.ckpt" in override else []
        cfg = train_config(tmp_path / "run", synthetic_dir, override, *size)
        with pytest.raises(Exception, match=message) as err:
            build(cfg) if "weights_path" in override else check_files(cfg)
        assert "\n" not in str(err.value)  # one line
    result = run_script(
        "train.py",
        *TINY,
        f"data.data_dir={synthetic_dir}",
        f"ckpt_path={text}",
        f"hydra.run.dir={tmp_path / 'r'}",
        ok=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"train.py: error: CheckpointError: ckpt_path={text}:")
    assert "decoding" not in result.stderr  # refused before any image was decoded


# --- resume ----------------------------------------------------------------------------------------------------


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
    again = run_script("train.py", f"resume={run}", "trainer.max_epochs=4")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    out = again.stdout + again.stderr
    assert out.count("`Trainer.fit` stopped") == 1  # each message once (not also through Lightning's own handler)
    assert "Tip:" not in out and "LeafSpec" not in out
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_script("train.py", f"resume={empty}", ok=False)
    assert missing.returncode == 2 and "not the folder of a train.py run" in missing.stderr


def test_resume_overrides_replace_saved_ones_of_the_same_key():
    from chestxray.resume import merge_overrides

    saved = ["data.image_size=32", "trainer.max_epochs=2", "+eval_sets.b=/x"]
    assert merge_overrides(saved, ["trainer.max_epochs=5"]) == [
        "data.image_size=32",
        "+eval_sets.b=/x",
        "trainer.max_epochs=5",
    ]
    assert merge_overrides(["trainer.max_epochs=5"], ["trainer.max_epochs=2"]) == ["trainer.max_epochs=2"]
    assert merge_overrides(saved, ["+eval_sets.b=/y"])[-1] == "++eval_sets.b=/y"  # may exist already: forced


class WorseEveryEpoch(L.Callback):
    """Makes the model call everything the first class, from the first epoch after the resume."""

    def on_train_epoch_start(self, trainer, pl_module):
        with torch.no_grad():
            head = pl_module.net.classifier[-1]
            head.weight.zero_()
            head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))


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
    args = [o for o in TINY if "max_epochs" not in o and "limit_train" not in o]
    cmd = [
        sys.executable,
        "train.py",
        *args,
        f"data.data_dir={synthetic_dir}",
        "trainer.max_epochs=4",
        "data.batch_size=2",
    ]
    cmd += ["test=false", f"hydra.run.dir={run}"]
    last = run / "checkpoints" / "last.ckpt"
    proc, stderr, seconds = signal_when(cmd, last.exists, signal.SIGTERM)
    assert seconds < 15
    assert proc.returncode == 143, stderr[-3000:]
    assert f"train.py: stopped by SIGTERM: resume with: python train.py resume={run}" in stderr
    saved = torch.load(last, weights_only=True)  # never half-written: it loads
    assert saved["epoch"] < 3
    steps_per_epoch = saved["global_step"] // (saved["epoch"] + 1)
    run_script("train.py", f"resume={run}")
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 4 * steps_per_epoch
    # resumed, not restarted: each epoch appears once in the run's TensorBoard log
    assert [e.step for e in read_events(run / "tensorboard").Scalars("train/loss")] == sorted(
        {e.step for e in read_events(run / "tensorboard").Scalars("train/loss")}
    )
    assert len(read_events(run / "tensorboard").Scalars("train/loss")) == 4


@pytest.mark.slow
def test_lr_multirun_makes_one_folder_per_run_and_a_summary(tmp_path, synthetic_dir):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    run_script(
        "train.py",
        "-m",
        "optimizer.lr=1e-3,1e-2",
        "trainer.max_epochs=1",
        *overrides,
        "data.check_leakage=true",
        f"data.data_dir={synthetic_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    for run, lr in zip(runs, ("0.001", "0.01"), strict=True):
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert f"optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()
    with open(sweep / "summary.csv", newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"0", "1"}
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        results = json.loads((run / "results.json").read_text())
        row = rows[run.name]
        assert float(row["test/acc"]) == pytest.approx(metrics["accuracy"], abs=1e-4)
        assert float(row["val/acc_best"]) == pytest.approx(results["metrics"]["val/acc_best"], abs=1e-4)
        assert float(row["test/acc_leak_free"]) == pytest.approx(metrics["leak_free"]["accuracy"], abs=1e-4)
    values = [float(r["val/acc_best"]) for r in rows.values()]
    assert values == sorted(values, reverse=True)  # best first
    assert "McNemar" in (sweep / "summary.md").read_text()
