import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chestxray.inference import load_checkpoint
from chestxray.training import OutputDirError, train
from tests.conftest import FAST, ROOT, train_config

SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"}


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_run_writes_checkpoints_and_curves(trained_run):
    out = trained_run["dir"]
    ckpts = {p.name for p in (out / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts
    best = [n for n in ckpts if n.startswith("epoch_")]
    assert len(best) == 1, ckpts
    events = read_events(out / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert SCALARS <= tags, tags
    assert len(events.Scalars("train/loss")) == 2 and len(events.Scalars("val/acc")) == 2
    assert trained_run["value"] == pytest.approx(max(e.value for e in events.Scalars("val/acc")))


def test_checkpoint_reload_reproduces_test_accuracy(trained_run):
    out = trained_run["dir"]
    logged = read_events(out / "tensorboard").Scalars("test/acc")[-1].value
    best = next((out / "checkpoints").glob("epoch_*.ckpt"))
    model = load_checkpoint(best)
    assert model.classes == ["Normal", "Covid", "Viral Pneumonia"]
    assert model.hparams.image_size == 32
    from hydra.utils import instantiate

    dm = instantiate(trained_run["cfg"].data)
    dm.setup()
    correct = total = 0
    with torch.inference_mode():
        for images, labels, _ in dm.test_dataloader():
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    assert total == 66
    assert correct / total == pytest.approx(logged, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(logged, abs=1e-6)


def test_resume_continues_at_the_next_epoch(trained_run, tmp_path):
    last = trained_run["dir"] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    cfg = train_config(tmp_path, f"ckpt_path={last}", "trainer.max_epochs=3", "test=false")
    train(cfg)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["global_step"] == 3 * 4  # three epochs of four batches, only the third one run here
    epochs = [e.step for e in read_events(tmp_path / "tensorboard").Scalars("train/loss")]
    assert len(epochs) == 1


def test_output_folder_below_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = train_config(blocker / "run")
    with pytest.raises(OutputDirError, match=str(blocker / "run")):
        train(cfg)


@pytest.mark.slow
def test_lr_multirun_makes_one_folder_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in FAST if not o.startswith("trainer.max_epochs")]
    cmd = [sys.executable, "train.py", "-m", "optimizer.lr=1e-3,1e-2", "trainer.max_epochs=1", "test=false"]
    result = subprocess.run(
        [*cmd, *overrides, f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for run, lr in zip(runs, ("0.001", "0.01"), strict=True):
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert f"optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()
