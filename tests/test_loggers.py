"""logger=csv, logger=mlflow, logger=many: the same scalars, parameters and figures reach each; a resumed run
continues them. MLflow is tested against a real tracking server started here, read back through its REST API."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import TINY, run_script, train_config
from tests.test_tensorboard import free_port
from tests.test_train import read_events


def csv_metrics(run) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_the_csv_logger_gets_every_scalar_and_the_parameters(tiny_run, tmp_path, synthetic_dir):
    from lightning.pytorch.loggers import CSVLogger

    from chestxray.training.fit import build

    out = tiny_run["dir"]  # trained with logger=[tensorboard,csv]
    rows = csv_metrics(out)
    assert len(column(rows, "train/loss")) == 2 and len(column(rows, "val/acc")) == 2
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert column(rows, "test/acc") == pytest.approx([results["test/acc"]])
    hparams = (out / "csv" / "hparams.yaml").read_text()
    assert "optimizer/lr: 0.001" in hparams and "model/backbone: vgg19" in hparams
    _, _, trainer = build(train_config(tmp_path / "alone", synthetic_dir, "logger=csv"))
    assert len(trainer.loggers) == 1 and isinstance(trainer.loggers[0], CSVLogger)  # logger=csv alone: no TensorBoard


def test_a_run_without_a_logger_builds_without_the_learning_rate_monitor(tmp_path, synthetic_dir):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from chestxray.training.fit import build

    _, _, trainer = build(train_config(tmp_path, synthetic_dir, "~logger"))
    assert not trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    _, _, trainer = build(train_config(tmp_path, synthetic_dir))
    assert any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)


@pytest.mark.slow
def test_a_resumed_run_appends_to_its_csv_log(tmp_path, synthetic_dir):
    run = tmp_path / "run"
    run_script(
        "train.py",
        *TINY,
        "logger=csv",
        "test=false",
        f"data.data_dir={synthetic_dir}",
        f"hydra.run.dir={run}",
    )
    assert len(column(csv_metrics(run), "train/loss")) == 2
    run_script("train.py", f"resume={run}", "trainer.max_epochs=3")
    assert column(csv_metrics(run), "epoch")[-1] == 2 and len(column(csv_metrics(run), "train/loss")) == 3


def mlflow_api(port: int, endpoint: str, body: dict | None = None, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}{query}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 and a free port, with a SQLite store and artifacts in tmp_path."""
    if shutil.which("mlflow") is None:
        pytest.fail("the mlflow command is missing: pip install -e '.[dev]' (the mlflow extra)")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        else:
            pytest.fail("the MLflow server did not answer within 2 minutes")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_gets_the_run_its_parameters_metrics_and_figures_and_a_resume_continues_it(
    mlflow_server, tmp_path, synthetic_dir
):
    port, run = mlflow_server, tmp_path / "run"
    uri = f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"
    run_script("train.py", *TINY, "logger=many", uri, f"data.data_dir={synthetic_dir}", f"hydra.run.dir={run}")
    experiment = mlflow_api(port, "experiments/get-by-name", experiment_name="chestxray")["experiment"]
    runs = mlflow_api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run_id = runs[0]["info"]["run_id"]
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == run_id
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert (
        params["optimizer/lr"] == "0.001" and params["model/backbone"] == "vgg19" and params["data/image_size"] == "32"
    )
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    results = json.loads((run / "results.json").read_text())["metrics"]
    # the same scalars as TensorBoard and the CSV log
    events = read_events(run / "tensorboard")
    for key in ("test/acc", "test/acc_leak_free", "test/loss", "val/acc_best"):
        assert metrics[key] == pytest.approx(results[key], abs=1e-6)
        assert metrics[key] == pytest.approx(events.Scalars(key)[-1].value, abs=1e-6)
        assert column(csv_metrics(run), key)[-1] == pytest.approx(metrics[key], abs=1e-6)
    history = mlflow_api(port, "metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert len(history) == 2
    figures = mlflow_api(port, "artifacts/list", run_id=run_id, path="figures/test")
    assert {"confusion_matrix.png", "gallery.png", "reliability.png"} <= {
        f["path"].split("/")[-1] for f in figures["files"]
    }

    run_script("train.py", f"resume={run}", "trainer.max_epochs=3", "test=false")
    again = mlflow_api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in again] == [run_id]  # the same MLflow run, continued
    history = mlflow_api(port, "metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert len(history) == 3
    tags = {t["key"]: t["value"] for t in again[0]["data"]["tags"]}
    assert tags["resumed/trainer/max_epochs"] == "3"  # a changed setting is kept as a tag (MLflow keeps params fixed)
