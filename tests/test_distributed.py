"""DDP on CPU (gloo), cluster-style sweeps, and surviving faults."""

import csv
import json
import signal
import sys

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chestxray.errors import NonFiniteLossError
from chestxray.training.fit import build, train
from tests.conftest import ROOT, TINY, compose_config, run_script, signal_when, train_config


def scalars(folder, tag: str) -> list[float]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def probabilities(folder) -> dict[str, list[float]]:
    with open(folder / "predictions.csv", newline="") as fh:
        return {r["path"]: [float(r[k]) for k in r if k.startswith("prob_")] for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_a_single_process_reload(tmp_path, data_dir):
    run = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    run_script("train.py", *TINY, "data.check_leakage=true", f"data.data_dir={data_dir}", *ddp, f"hydra.run.dir={run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # one run folder: rank 1 re-uses it (its own log file, no second .hydra/ or TensorBoard run)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [".hydra", "checkpoints", "tensorboard"]
    assert not (run / ".run.lock").exists()  # released at the end
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files of one process (rank 0) only
    logged = scalars(run / "tensorboard", "test/acc")[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = sum(1 for _ in (data_dir / "test").rglob("*.*"))
    assert metrics["n"] == n_test and metrics["accuracy"] == pytest.approx(logged, abs=1e-6)

    best = run / "checkpoints" / "best.ckpt"
    single_out, ddp_out = tmp_path / "pred", tmp_path / "pred_ddp"
    predict = ["predict.py", f"ckpt={best}", f"inputs={data_dir / 'test'}", "trainer.accelerator=cpu"]
    # (the best checkpoint is calibrated: rank 0 wrote the temperature, every rank tested with it)
    run_script(*predict, f"output_dir={single_out}", f"hydra.run.dir={tmp_path / 'p1'}")
    single = json.loads((single_out / "metrics.json").read_text())
    assert single["accuracy"] == pytest.approx(logged, abs=1e-6)
    run_script(
        *predict,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.eval_batch_size=4",
        f"output_dir={ddp_out}",
        f"hydra.run.dir={tmp_path / 'p2'}",
    )
    rows = (ddp_out / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == n_test and len({r.split(",")[0] for r in rows}) == n_test
    assert json.loads((ddp_out / "metrics.json").read_text())["confusion_matrix"] == single["confusion_matrix"]
    # image by image: the DDP test report, one process and two processes predict the same probabilities
    reference = probabilities(run)
    for other in (probabilities(single_out), probabilities(ddp_out)):
        assert set(other) == set(reference)
        assert all(np.allclose(other[p], reference[p], atol=2e-6) for p in reference)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path, synthetic_dir):
    sweep = tmp_path / "sweep"
    overrides = [*TINY, f"data.data_dir={synthetic_dir}"]
    run_script(
        "train.py",
        "-m",
        "hydra/launcher=local",
        "optimizer.lr=1e-3,1e-2",
        "trainer.max_epochs=1",
        "test=false",
        *overrides,
        f"hydra.sweep.dir={sweep}",
    )
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    assert list((sweep / ".submitit").rglob("*_result.pkl"))


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.slow
def test_optuna_search_runs_three_trials_and_reports_the_best_lr(tmp_path, synthetic_dir):
    sweep = tmp_path / "optuna"
    overrides = [*TINY, f"data.data_dir={synthetic_dir}"]
    result = run_script(
        "train.py",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=3",
        "trainer.max_epochs=1",
        "test=false",
        *overrides,
        f"hydra.sweep.dir={sweep}",
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "optimizer.lr" in best["best_params"] and 1e-5 <= best["best_params"]["optimizer.lr"] <= 1e-1
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1", "2"]
    assert "Best parameters" in result.stdout + result.stderr


@pytest.mark.slow
def test_sigkill_never_leaves_half_a_checkpoint(tmp_path, synthetic_dir):
    """SIGKILL cannot be handled: last.ckpt must still be whole (Lightning writes it to a temporary file first)."""
    run = tmp_path / "killed"
    args = [o for o in TINY if "debug" not in o]
    cmd = [sys.executable, "train.py", *args, "debug=default", f"data.data_dir={synthetic_dir}", "trainer.max_epochs=4"]
    cmd += ["data.batch_size=2", "test=false", f"hydra.run.dir={run}"]
    last = run / "checkpoints" / "last.ckpt"
    proc, _, _ = signal_when(cmd, last.exists, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)  # it loads
    weights = [v for k, v in saved["state_dict"].items() if k.startswith("net.")]  # (an unfitted detector is NaN)
    assert saved["epoch"] < 3 and all(torch.isfinite(v).all() for v in weights if v.is_floating_point())


@pytest.mark.slow
def test_same_seed_deterministic_runs_log_identical_metrics(tmp_path, synthetic_dir):
    histories = []
    for name in ("a", "b"):
        train(train_config(tmp_path / name, synthetic_dir, "trainer.deterministic=true", "test=false"))
        histories.append(json.loads((tmp_path / name / "history.json").read_text()))
    assert histories[0] == histories[1]


def test_diverging_lr_stops_with_epoch_and_step(tmp_path, synthetic_dir):
    cfg = train_config(tmp_path, synthetic_dir, "optimizer.lr=1e12", "trainer.max_epochs=5", "test=false")
    with pytest.raises(NonFiniteLossError, match=r"at epoch \d+, step \d+"):
        train(cfg)


class PoisonAtSecondEpoch(L.Callback):
    """Makes every logit NaN from the second epoch on, after the first epoch's checkpoints were written."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                pl_module.net.classifier[-1].bias.fill_(float("nan"))


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, synthetic_dir):
    datamodule, model, trainer = build(train_config(tmp_path, synthetic_dir, "trainer.max_epochs=3", "test=false"))
    trainer.callbacks.append(PoisonAtSecondEpoch())
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(model, datamodule=datamodule)
    message = str(err.value)
    assert "training loss is nan at epoch 1, step 4 (batch 0)" in message
    assert "checkpoints already written are kept" in message
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 4
    weights = [v for k, v in last["state_dict"].items() if k.startswith("net.")]  # (an unfitted detector is NaN)
    assert weights and all(torch.isfinite(v).all() for v in weights if v.is_floating_point())


def test_trainer_configs_compose_without_a_gpu():
    gpu = compose_config("train", ["trainer=gpu"])
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "32-true"  # fp32 + TF32: faster at batch 4
    assert gpu.trainer._target_ == "lightning.pytorch.trainer.Trainer" and gpu.trainer.max_epochs == 10
    assert gpu.data == compose_config("train", []).data  # loader settings live in data/, chosen for the device there
    assert compose_config("train", ["trainer.accelerator=gpu"]).trainer.accelerator == "gpu"
    ddp = compose_config("train", ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 4 and ddp.trainer.num_nodes == 2
    assert compose_config("train", ["trainer=cpu"]).trainer._target_ == "lightning.pytorch.trainer.Trainer"
    notebook = compose_config("train", ["experiment=notebook"])
    assert notebook.data.val_fraction == 0 and notebook.data.eval_batch_size == 1
    assert notebook.trainer.max_epochs == 10 and notebook.optimizer.lr == 1e-3
    fast = compose_config("train", ["experiment=gpu_fast"])
    assert fast.data.batch_size == 64 and fast.trainer.precision == "bf16-mixed" and fast.model.compile
    assert fast.model.channels_last and fast.optimizer.lr == pytest.approx(1e-3 * 64 / 4)
    assert fast.trainer.accelerator == "gpu" and fast.optimizer._target_ == "torch.optim.SGD"


def test_sigterm_stops_the_work_with_143_and_says_how_to_go_on(capsys):
    """The fast tier's check of interrupt.py, in this process: the signal stops the work where it is (a long sleep
    here), one line says what to do next, the exit status is 128 + 15, and the previous handler is back."""
    import os
    import time

    from chestxray.runtime.interrupt import run_until_signal

    before = signal.getsignal(signal.SIGTERM)
    reached = []

    def work():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        reached.append("the end")

    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        run_until_signal("train.py", work, "resume with: python train.py resume=RUN")
    assert stop.value.code == 143 and not reached and time.monotonic() - start < 10
    assert "train.py: stopped by SIGTERM: resume with: python train.py resume=RUN" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert run_until_signal("train.py", lambda: 0.5, "") == 0.5  # work that finishes returns its value
