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
from types import SimpleNamespace

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


class MLFlowLogger:
    """Stands in for Lightning's (log_hyperparameters routes on the type's name) and for a tracking server."""

    def __init__(self, tracking_uri: str):
        self._tracking_uri, self.run_id, self.experiment_id, self.params = tracking_uri, "run-1", "1", {}

    @property
    def experiment(self):
        return self

    def get_run(self, run_id: str):
        return SimpleNamespace(data=SimpleNamespace(params={}))

    def log_hyperparams(self, params: dict) -> None:
        self.params.update(params)


def test_a_password_in_the_tracking_uri_is_written_nowhere_and_mlflow_gets_it_as_credentials(tmp_path, monkeypatch):
    """$MLFLOW_TRACKING_URI with user:password@ (and a token in its query), resolved into the config: not in the
    parameters of any logger, hparams.yaml, TensorBoard's events or mlflow.json; MLflow gets the password through
    its credential variables, so that its own messages, which show the host, do not hold it either."""
    from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    from chestxray.training.loggers import MLFLOW_RUN_FILE, instantiate_loggers, log_hyperparameters

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # so that the test's end unsets them again
        monkeypatch.delenv(name)
    secret_uri = "https://alice:S3CRET-PASS@mlflow.example.com/?token=T0KEN&site=a"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    cfg = train_config(tmp_path, tmp_path / "no-data", "logger=many")  # nothing is trained: no data needed
    assert cfg.logger.mlflow.tracking_uri == secret_uri
    built = instantiate_loggers(cfg.logger, tmp_path)
    mlflow = next(logger for logger in built if isinstance(logger, LightningMLFlowLogger))
    creds = mlflow._mlflow_client._tracking_client.store.get_host_creds()
    assert (creds.username, creds.password) == ("alice", "S3CRET-PASS") and "S3CRET" not in creds.host
    stand_in = MLFlowLogger(secret_uri)  # as if built from the URI as it is
    loggers = [*(logger for logger in built if logger is not mlflow), stand_in]
    log_hyperparameters(loggers, cfg, ["val/acc"])
    for logger in built:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()
        logger.save()
    assert stand_in.params["logger/mlflow/tracking_uri"] == "https://mlflow.example.com/?site=a"
    assert json.loads((tmp_path / MLFLOW_RUN_FILE).read_text())["tracking_uri"] == "https://mlflow.example.com/?site=a"
    written = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    assert {f.name for f in written} >= {"hparams.yaml", MLFLOW_RUN_FILE} and any("events" in f.name for f in written)
    for secret in (b"S3CRET", b"T0KEN"):
        assert not [f for f, content in written.items() if secret in content], secret
        assert secret.decode() not in json.dumps(stand_in.params)


def test_an_mlflow_logger_without_a_tracking_uri_setting_takes_the_environments(tmp_path, monkeypatch):
    """A logger config of one's own with no tracking_uri key: MLflow's default, $MLFLOW_TRACKING_URI (without its
    credentials), not a local ./mlruns folder."""
    from omegaconf import OmegaConf

    from chestxray.training.loggers import instantiate_loggers

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    node = {"mlflow": {"_target_": "lightning.pytorch.loggers.MLFlowLogger", "experiment_name": "x"}}
    (logger,) = instantiate_loggers(OmegaConf.create(node), tmp_path)
    assert logger._tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


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


def test_a_uri_with_a_credential_on_trains_command_line_is_refused_before_hydra_records_it(tmp_path):
    """As Hydra parses the override (escapes, quotes, sweeps, dicts) and as typed where it cannot: the setting is
    named, never the value; a path with '@' and ':' in it is no URI."""
    from chestxray.runtime.secrets import credential_argument, redact_uri

    key = "logger.mlflow.tracking_uri"
    for arg in (
        f"{key}=https://alice:S3CRET@host",
        f"{key}=choice('https://u:p@h','x')",
        f"{key}=https\\://u\\:p@h",
        f"{key}='https://alice:pa,ss@host'",
        f"{key}='https://alice:pa]ss@host'",
        f"{key}=https://TOKEN@host",
        f"{key}='https://host/?token=abc'",
        f"+{key}=[http://h,https://u:p@h]",
        f"{key}=https://alice:pa,ss@host",  # a sweep to Hydra, recorded as typed with -m
        f"{key}='https://h/?X-Amz-Signature=zz'",
        f"{key}=https://alice:S3/CRET@host",  # '/', '?', '#' in a password end the host for urlsplit
        f"{key}=https://alice:p?w@host",
        f"{key}='https://m/?accessToken=S3'",  # camelCase and run-together names
        f"{key}='https://m/?sessiontoken=S3'",
        f"{key}='https://alice:${{oc.env:PW,S3CRET}}@host'",  # Hydra records the default as typed
    ):
        assert credential_argument(["logger=mlflow", arg, "-m"]) == key, arg
    assert credential_argument(["+logger.mlflow={tracking_uri:'https://u:p@h'}"]) == "logger.mlflow"
    for name in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN"):
        assert credential_argument([f"+hydra.job.env_set.{name}=S3CRET"]) == f"hydra.job.env_set.{name}"
    assert credential_argument(["+hydra.job.env_set.OMP_NUM_THREADS=2", "hydra.job.env_set.HOME=/x"]) is None
    harmless = [
        f"{key}=https://host:5000/x",
        f"{key}='https://alice:${{oc.env:PW}}@host'",  # recorded unresolved
        "data.data_dir=/a/b@c:d",
        "+tags=[http://ci,owner:alice@x.org]",
        "+logger.mlflow.tags={server:'http://ci',owner:alice@x.org}",
        "x='https://h/x?author=bob&design=1&signal=2'",
        "logger.mlflow.artifact_location=wasbs://container@account.blob.core.windows.net/mlflow",  # no secret
        f"{key}=postgresql://mlflow@db/mlflow",
        f"{key}=https://h:5000/users/@me",
        "+tags=http://ci,alice@x",
        "hydra.run.dir=x",
        "a=x,y",
        "~logger",
    ]
    assert [a for a in harmless if credential_argument([a])] == []
    assert redact_uri("https://alice:pa]ss@host/x") == "https://host/x"
    assert redact_uri("https://alice:pa@ss]word@host/x?token=t&a=b") == "https://host/x?a=b"
    assert redact_uri("https://alice:S3/CRET@host/x?accessToken=t") == "https://host/x"
    assert redact_uri("wasbs://container@account/x") == "wasbs://container@account/x"
    out = tmp_path / "run"
    uri = "https://alice:S3CRET-PASS@mlflow.example.com"
    args = ("logger=mlflow", f"{key}={uri}", f"hydra.run.dir={out}")
    result = run_script("train.py", *args, ok=False)
    assert result.returncode == 2 and f"{key}=: a credential (a URI's user:password@" in result.stderr
    assert "S3CRET" not in result.stderr + result.stdout and not out.exists()  # no .hydra folder recorded it
