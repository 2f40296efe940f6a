"""Build the data, model, callbacks, logger and Trainer from a Hydra config; fit, then test the best epoch."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from chestxray.callbacks import metric_prefix
from chestxray.console import tidy_lightning_output

log = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    """The run folder cannot be written: raised before any training starts."""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story: train.py prints them without a traceback and exits 2."""
    from chestxray.checkpoints import CheckpointError
    from chestxray.data import DataError
    from chestxray.model import NonFiniteLossError, WeightsError
    from chestxray.resume import ResumeError

    return DataError, WeightsError, NonFiniteLossError, OutputDirError, CheckpointError, ResumeError


def reported_metrics(cfg: DictConfig) -> list[str]:
    """Compared across runs in TensorBoard's HParams tab and printed at the end of a run."""
    names = ["val/acc_best"]
    if cfg.get("test"):
        for set_name in ["test", *(cfg.get("eval_sets") or {})]:
            prefix = metric_prefix(set_name)
            names += [f"{prefix}/acc", f"{prefix}/acc_leak_free", f"{prefix}/loss"]
    return names


def _instantiate(node, **kwargs):
    """hydra.utils.instantiate, but our own errors come out as themselves, not wrapped in Hydra's."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, user_errors()):
            raise err.__cause__ from None
        raise


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail now, not after an epoch, when checkpoints and logs could not be written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write the output folder {path} (paths.output_dir): {err}") from err
    return path


def check_files(cfg: DictConfig) -> None:
    """ckpt_path: one clear error before any image is decoded (Lightning would read it only after setup).

    model.weights_path needs no check here: building the model reads it, and that comes before any decoding too.
    """
    from chestxray.checkpoints import read_checkpoint
    from chestxray.resume import check_fits

    if cfg.get("ckpt_path"):
        check_fits(read_checkpoint(cfg.ckpt_path, "ckpt_path"), cfg, f"ckpt_path={cfg.ckpt_path}")


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Each entry of the callbacks group with a _target_ (set one to null to drop it)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


@rank_zero_only
def log_hyperparameters(logger: Logger | None, cfg: DictConfig, metric_names: Sequence[str]) -> None:
    """The whole config for TensorBoard's HParams tab, with the metrics runs are compared on."""
    if logger is None:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(params)
        return
    params.pop("hydra", None)
    flat = _flatten(params)
    logger.log_hyperparams(flat)
    # The HParams tab needs the metric names up front; Lightning's metrics= would also log a dummy point for
    # each of them at step 0, so write only the plugin's summaries.
    if logger.experiment is not None:
        writer = logger.experiment._get_file_writer()
        for summary in hparams(flat, {name: 0.0 for name in metric_names}):
            writer.add_summary(summary)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple | dict) or value is None else value
    return flat


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The three objects of a run, from the config alone."""
    if cfg.model.get("cache_features") and cfg.data.get("augment"):
        raise ValueError("model.cache_features=true computes features once, so it needs data.augment=false")
    eval_sets = OmegaConf.to_container(cfg.eval_sets, resolve=True) if cfg.get("eval_sets") else {}
    datamodule = _instantiate(cfg.data, eval_sets=eval_sets)
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model = _instantiate(cfg.model, optimizer=optimizer, scheduler=scheduler)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    trainer = instantiate(cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=logger)
    if isinstance(trainer.accelerator, CUDAAccelerator) and cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)  # TF32 tensor cores for fp32 matmuls and convs
    return datamodule, model, trainer


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, and return cfg.optimized_metric for sweepers."""
    from chestxray.resume import resume_config

    tidy_lightning_output()
    if cfg.get("resume"):
        cfg = resume_config(cfg)
    check_writable(cfg.paths.output_dir)
    check_files(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model, trainer = build(cfg)
    log_hyperparameters(trainer.logger, cfg, reported_metrics(cfg))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        if not best:
            rank_zero_warn("no best checkpoint was saved: testing the weights at the end of training")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}")
    if rank_zero_only.rank == 0:
        write_results(cfg, metrics, best)
    return metrics.get(name) if name else None


def write_results(cfg: DictConfig, metrics: dict[str, float], best: str) -> None:
    """Log the reported metrics and keep them in results.json (what the sweep summary reads)."""
    if best:
        log.info("best checkpoint: %s (also checkpoints/best.ckpt)", best)
    names = [*reported_metrics(cfg), cfg.get("optimized_metric")]
    reported = {name: metrics[name] for name in dict.fromkeys(names) if name in metrics}
    for name, value in reported.items():
        log.info("%s = %.4f", name, value)
    results = {"metrics": reported, "optimized_metric": cfg.get("optimized_metric"), "best_checkpoint": best}
    (Path(cfg.paths.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
