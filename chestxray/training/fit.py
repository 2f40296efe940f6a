"""train.py's work: build the data, model, callbacks, loggers and Trainer from the Hydra config; fit; calibrate and
test the best epoch; keep the reported numbers."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig

from chestxray.errors import ConfigError, OutputDirError, UserError
from chestxray.evaluation import metrics
from chestxray.models import ood
from chestxray.models.calibration import fit_temperature, nll_at
from chestxray.models.checkpoints import AtomicCheckpointIO, read_checkpoint
from chestxray.runtime import settings
from chestxray.runtime.console import shown, tidy_lightning_output
from chestxray.runtime.distributed import gather_by_index
from chestxray.runtime.files import atomic_write
from chestxray.training.loggers import instantiate_loggers, log_hyperparameters

log = logging.getLogger(__name__)


def _instantiate(node, **kwargs):
    """hydra.utils.instantiate, but our own errors come out as themselves, not wrapped in Hydra's."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
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
    from chestxray.training.resume import check_fits

    if cfg.get("ckpt_path"):
        check_fits(read_checkpoint(cfg.ckpt_path, "ckpt_path"), cfg, f"ckpt_path={cfg.ckpt_path}")


def instantiate_callbacks(cfg: DictConfig | None, with_logger: bool = True) -> list[L.Callback]:
    """Each entry of the callbacks group with a _target_ (set one to null to drop it). Without a logger (~logger)
    the learning-rate monitor is left out: it has nowhere to write, and Lightning refuses it."""
    if not cfg:
        return []
    callbacks = [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]
    return [c for c in callbacks if with_logger or not isinstance(c, LearningRateMonitor)]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The three objects of a run, each from its config group (the model's node names its optimizer and scheduler,
    the data's its evaluation sets)."""
    if cfg.model.get("cache_features") and cfg.data.get("augment"):
        raise ConfigError("model.cache_features=true computes features once, so it needs data.augment=false")
    datamodule = _instantiate(cfg.data)
    model = _instantiate(cfg.model)
    loggers = instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), with_logger=bool(loggers))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    if isinstance(trainer.accelerator, CUDAAccelerator) and cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)  # TF32 tensor cores for fp32 matmuls and convs
    return datamodule, model, trainer


def train(cfg: DictConfig) -> float | None:
    """Fit, calibrate and test the best checkpoint, and return cfg.optimized_metric for sweepers."""
    from chestxray.training.resume import resume_config

    tidy_lightning_output()
    choices, conf_dir = settings.hydra_choices()
    if conf_dir is not None:
        settings.check_choices(choices, conf_dir)
    if cfg.get("resume"):
        cfg = resume_config(cfg)
    settings.check(cfg, settings.TRAIN_RULES)
    check_writable(cfg.paths.output_dir)
    check_files(cfg)
    set_names = ["test", *(cfg.get("eval_sets") or {})] if cfg.get("test") else []
    name = cfg.get("optimized_metric")
    logged = metrics.logged_metrics(set_names)
    if name and name not in logged:
        raise ConfigError(f"optimized_metric={name}: not a metric this run logs; one of {', '.join(logged)}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model, trainer = build(cfg)
    log_hyperparameters(trainer.loggers, cfg, metrics.reported_metrics(set_names))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    results = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:  # the temperature (model.calibrate), the out-of-distribution detector and the prediction sets
        calibrate(trainer, model, datamodule, best, temperature=cfg.model.get("calibrate", True))
    if cfg.get("test"):
        if not best:
            rank_zero_warn("no best checkpoint was saved: testing the weights at the end of training")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if name and name not in results:
        raise ConfigError(f"optimized_metric={name}: not logged by this run; logged: {', '.join(sorted(results))}")
    if rank_zero_only.rank == 0:
        write_results(cfg, results, best, set_names)
    return results.get(name) if name else None


def calibrate(
    trainer: L.Trainer, model: L.LightningModule, datamodule, best: str, temperature: bool = True
) -> float | None:
    """Fit the temperature (unless temperature=False), the out-of-distribution detector and the conformal threshold
    on the validation split's outputs of the best checkpoint and save them in that checkpoint
    (chestxray.models.calibration, chestxray.models.ood). Skipped when the test folder is the validation set
    (experiment=notebook): fitting on the images that are scored would flatter the calibration."""
    if datamodule.datasets["val"] is datamodule.test_sets.get("test"):
        log.info("not calibrated: the validation set is the test folder (data.val_fraction=0)")
        return None
    loaders = [datamodule.val_dataloader(), ood_reference_loader(datamodule)]
    outputs = trainer.predict(model, dataloaders=loaders, ckpt_path=best, weights_only=True) or [[], []]
    gathered = gather_by_index([tuple(t.cpu() for t in output) for output in outputs[0]])
    if gathered is None:
        return None
    index, logits, features = gathered
    labels = datamodule.datasets["val"].labels[index]
    train = gather_by_index([tuple(t.cpu() for t in output) for output in outputs[1]])
    reference = (train[2], datamodule.datasets["train"].labels[train[0]]) if train else None
    fitted, temperature = temperature, fit_temperature(logits, labels) if temperature else 1.0
    before, after = nll_at(logits, labels, 1.0), nll_at(logits, labels, temperature)
    uncertainty = ood.fit(logits, features, labels, temperature, model.pass_rate, model.coverage, reference)
    if trainer.is_global_zero:
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        checkpoint["state_dict"]["temperature"] = torch.tensor(temperature)
        checkpoint["state_dict"]["calibrated"] = torch.tensor(fitted)
        checkpoint["state_dict"].update(uncertainty.state if uncertainty else {})
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, best)  # as Lightning wrote it: whole or not at all
        ood.log_fit(uncertainty, model.ood_detector, best)
    if trainer.is_global_zero and fitted:
        log.info(
            "calibrated on %d validation images: temperature %.3f, validation NLL %.3f -> %.3f (saved in %s)",
            len(labels),
            temperature,
            before,
            after,
            best,
        )
    trainer.strategy.barrier()
    return temperature


def ood_reference_loader(datamodule):
    """The training images, without augmentation, in order: what the detectors' statistics are fitted on."""
    from chestxray.data.datamodule import ImageDataset

    train = datamodule.datasets["train"]
    plain = ImageDataset(train.paths, train.images, train.labels)
    return datamodule._loader(plain, datamodule._eval_batch_size(), shuffle=False)


def write_results(cfg: DictConfig, results: dict[str, float], best: str, set_names: list[str]) -> None:
    """Log the reported metrics and keep them in results.json (what the sweep summary reads)."""
    if best:
        epoch = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        log.info("best checkpoint: %s (epoch %d)", shown(best), epoch)
    names = [*metrics.reported_metrics(set_names), cfg.get("optimized_metric")]
    reported = {name: results[name] for name in dict.fromkeys(names) if name in results}
    for name, value in reported.items():
        log.info("%s = %.4f", name, value)
    summary = {"metrics": reported, "optimized_metric": cfg.get("optimized_metric"), "best_checkpoint": best}
    atomic_write(Path(cfg.paths.output_dir) / "results.json", json.dumps(summary, indent=2))
