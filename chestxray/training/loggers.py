"""The run's loggers (conf/logger: tensorboard, csv, mlflow, many): built from the config, given the same
hyper-parameters, scalars and figures, and continued by a resumed run.

Lightning's loggers do the logging. Two things are added where they fall short:
- CSVLogger deletes an existing metrics.csv when it starts, so a resumed run would lose its first epochs: the CSV
  logger here appends to it instead.
- MLFlowLogger starts a new MLflow run unless given its id: the id is kept in the run folder (mlflow.json), so
  `resume=` continues the same MLflow run.
- A tracking URI may carry a password (https://user:password@host): it is handed to MLflow through its credential
  variables instead, and every URI in the logged parameters and mlflow.json is written without its secrets.
Figures go to each logger that can hold them: TensorBoard's Images tab, MLflow's artifacts; the CSV logger keeps
scalars only (the PNG files are in the run folder).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import lightning as L
import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from chestxray.errors import require
from chestxray.runtime.files import atomic_write
from chestxray.runtime.secrets import redact_uri

log = logging.getLogger(__name__)

MLFLOW_RUN_FILE = "mlflow.json"


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing metrics.csv (a resumed run's earlier epochs) and its columns."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, appending to the metrics.csv a resumed run already has."""

    @property
    @rank_zero_only
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _is_mlflow(node: DictConfig) -> bool:
    return "MLFlowLogger" in str(node.get("_target_", ""))


def _redacted(tree: object) -> object:
    """Every string of a config tree through redact_uri."""
    if isinstance(tree, dict):
        return {key: _redacted(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_redacted(value) for value in tree]
    return redact_uri(tree) if isinstance(tree, str) else tree


def _credentials_to_environment(uri: str | None) -> str | None:
    """The tracking URI without user:password@, which go to MLflow's own variables instead (unless already set).

    MLflow prints its host ('View run at: ...') and puts it in its errors: with the password in the URI, both would
    write it to the console and the run's log."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    if parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def instantiate_loggers(cfg: DictConfig | None, output_dir: str | Path) -> list[Logger]:
    """Each entry of the logger group (null drops it); MLflow continues the run folder's MLflow run, if it has one."""
    loggers = []
    for node in (cfg or {}).values():
        if node is None or "_target_" not in node:
            continue
        kwargs = {}
        if _is_mlflow(node):
            require("mlflow", "mlflow", "logger=mlflow")
            saved = Path(output_dir) / MLFLOW_RUN_FILE
            if saved.is_file() and not node.get("run_id"):
                kwargs["run_id"] = json.loads(saved.read_text())["run_id"]
            uri = node.get("tracking_uri") if "tracking_uri" in node else os.environ.get("MLFLOW_TRACKING_URI")
            kwargs["tracking_uri"] = _credentials_to_environment(uri)  # MLFlowLogger's own default when not set
        loggers.append(instantiate(node, **kwargs))
    return loggers


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple | dict) or value is None else value
    return flat


@rank_zero_only
def log_hyperparameters(loggers: Sequence[Logger], cfg: DictConfig, metric_names: Sequence[str]) -> None:
    """The whole config, flattened, for every logger (TensorBoard's HParams tab gets the metrics runs are compared
    on up front); the MLflow run's id is kept in the run folder for a resume. Every URI is logged without its secrets
    ($MLFLOW_TRACKING_URI with a password, resolved into the config, would otherwise reach every logger)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params.pop("hydra", None)
    flat = _flatten(_redacted(params))
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat)
            # The HParams tab needs the metric names up front; Lightning's metrics= would also log a dummy point for
            # each of them at step 0, so write only the plugin's summaries.
            writer = logger.experiment._get_file_writer()
            for summary in hparams(flat, {name: 0.0 for name in metric_names}):
                writer.add_summary(summary)
        elif type(logger).__name__ == "MLFlowLogger":
            _log_mlflow_params(logger, flat, Path(cfg.paths.output_dir))
        else:
            logger.log_hyperparams(flat)


def _log_mlflow_params(logger: Logger, flat: dict, output_dir: Path) -> None:
    """MLflow refuses to change a logged parameter: a resumed run logs only the settings it did not have, and keeps
    the changed ones as tags (resumed/<setting>)."""
    client, run_id = logger.experiment, logger.run_id
    existing = client.get_run(run_id).data.params
    new = {k: v for k, v in flat.items() if k not in existing}
    if new:
        logger.log_hyperparams(new)
    for key, value in flat.items():
        if key in existing and existing[key] != str(value)[:250]:
            client.set_tag(run_id, f"resumed/{key}", str(value)[:250])
    saved = {"run_id": run_id, "experiment_id": logger.experiment_id, "tracking_uri": redact_uri(logger._tracking_uri)}
    atomic_write(output_dir / MLFLOW_RUN_FILE, json.dumps(saved, indent=2))


def log_figure(trainer: L.Trainer, tag: str, image: np.ndarray, png: Path, step: int = 0) -> None:
    """A rendered figure (H x W x 3, saved at `png`) into each logger that holds images."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif type(logger).__name__ == "MLFlowLogger":
            folder = "/".join(["figures", *tag.split("/")[:-1]])
            logger.experiment.log_artifact(logger.run_id, str(png), artifact_path=folder)
