"""train.py's work: build the data, model, callbacks, loggers and Trainer from the Hydra config; fit; calibrate and
test the best epoch; keep the reported numbers."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, open_dict

from chestxray import settings
from chestxray.errors import ConfigError, OutputDirError, ResumeError, UserError
from chestxray.evaluation import metrics
from chestxray.models import ood, selection
from chestxray.models.calibration import identifiable_temperature, nll_at
from chestxray.models.checkpoints import AtomicCheckpointIO, read_checkpoint
from chestxray.models.classifier import optimizer_class
from chestxray.runtime.console import shown, tidy_lightning_output
from chestxray.runtime.distributed import gather_by_index
from chestxray.runtime.files import atomic_write
from chestxray.training.callbacks import RunFigures
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
        checkpoint = read_checkpoint(cfg.ckpt_path, "ckpt_path")
        where = f"resume={cfg.paths.output_dir}" if continues_this_run(cfg) else f"ckpt_path={cfg.ckpt_path}"
        check_fits(checkpoint, cfg, where)
        check_training_state(checkpoint, cfg, where)
        check_same_optimizer(checkpoint, cfg, where)
        check_epochs_left(checkpoint, cfg, where)


def continues_this_run(cfg: DictConfig) -> bool:
    """Whether ckpt_path is this run's own checkpoint (resume=RUN runs in RUN from RUN/checkpoints/last.ckpt): then
    its records (best checkpoint, curves, running best) are this run's too; another run's checkpoint gives none."""
    ckpt = cfg.get("ckpt_path")
    return bool(ckpt) and Path(ckpt).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve())


def epochs_trained(checkpoint: dict) -> int | None:
    """The epochs a checkpoint has finished: its fit loop's processed epochs (a checkpoint written at the end of an
    epoch is saved before Lightning counts that epoch completed, and one written mid-epoch has not finished it).
    None for a checkpoint without the loop's state."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return None


def check_epochs_left(checkpoint: dict, cfg: DictConfig, where: str) -> None:
    """Lightning continues a checkpoint from its epoch count up to trainer.max_epochs: with no epoch left it trains
    none, warns, tests the checkpoint's weights and fails at the end on a val/acc_best it never logged. Refused
    here, before any image is decoded."""
    done, max_epochs = epochs_trained(checkpoint), cfg.trainer.get("max_epochs")
    if done is None or max_epochs is None or max_epochs < 0:  # -1: no limit on epochs
        return
    if max_epochs <= done:
        raise ResumeError(
            f"{where}: trainer.max_epochs={max_epochs} but the checkpoint has already trained {done} epochs, so "
            f"there is nothing left to train; set trainer.max_epochs above {done}"
        )


def check_training_state(checkpoint: dict, cfg: DictConfig, where: str) -> None:
    """Lightning continues a checkpoint's optimizer state, and fails on one without it (adapt.py's checkpoints, or a
    weights-only save) only after every image is decoded. Refused here, with the setting that starts from weights."""
    if "optimizer_states" not in checkpoint:
        raise ResumeError(
            f"{where}: the checkpoint holds weights only, no optimizer state to continue (adapt.py writes such "
            f"checkpoints); start a new run from its weights with model.init_from={cfg.ckpt_path}"
        )


def check_same_optimizer(checkpoint: dict, cfg: DictConfig, where: str) -> None:
    """A checkpoint's optimizer state (momentum buffers, Adam's moments) continues only the same kind of optimizer:
    its settings (optimizer.lr, ...) may change, its kind may not.

    Compared by class name where the checkpoint records it (ChestXrayClassifier.on_save_checkpoint), so no optimizer
    class is imported from the checkpoint. Older checkpoints are compared by the names of their settings, which must
    all be settings of the configured optimizer: torch adds settings over versions (Adam's decoupled_weight_decay),
    so a checkpoint from an older torch lacks some, which load_state_dict accepts."""
    saved = checkpoint.get("optimizer_states") or []
    if not saved or not saved[0].get("param_groups"):
        return
    probe = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    have = set(saved[0]["param_groups"][0]) - {"params", "initial_lr"}
    classes = checkpoint.get("optimizer_classes")
    if classes:
        same, what = classes[0] == optimizer_class(probe), f"it was {classes[0]}"
    else:
        same, what = have <= set(probe.param_groups[0]) - {"params"}, f"its settings: {', '.join(sorted(have))}"
    if not same:
        raise ResumeError(
            f"{where}: optimizer={cfg.optimizer._target_} is not the kind of optimizer the checkpoint was trained with "
            f"({what}): its state cannot continue another kind; keep that optimizer (its settings may change), or "
            "start a new run without the checkpoint"
        )


class StartFromAnotherRun(L.Callback):
    """ckpt_path= in a new run: the checkpoint's weights, optimizer state and epoch, and none of its run's records.

    Lightning also restores what the callbacks and the module kept about that run: ModelCheckpoint's best_model_path
    (the other run's best.ckpt, which calibration would then rewrite and the test would score), the curves' history
    and the running best of val/acc. Dropped here, before Lightning loads them, so that this run's val/acc_best,
    best.ckpt, curves and optimized_metric describe its own epochs. (resume= continues the same run: all are kept.)
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint.get("callbacks", {}).clear()
        pl_module.val_acc_best.reset()


def best_checkpoint_callback(callbacks: list[L.Callback]) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps the best epoch by what it monitors: the highest val/acc. Found by its monitor,
    not by its place in the list (Lightning's trainer.checkpoint_callback is merely the first one). A checkpoint
    callback that monitors anything else, or val/acc the wrong way round, is refused: train.py would calibrate and
    test a checkpoint that is not the one whose val/acc_best it reports. None: no callback picks a best epoch, and
    the weights at the end of training are tested (the run says so)."""
    monitored = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    best = [c for c in monitored if c.monitor == metrics.VAL_ACC and c.mode == "max"]
    wrong = [c for c in monitored if c not in best]
    if wrong:
        which = "; ".join(f"monitor={c.monitor} mode={c.mode}" for c in wrong)
        raise ConfigError(
            f"callbacks: a ModelCheckpoint with {which}: the best checkpoint is the one with the highest "
            f"{metrics.VAL_ACC} (monitor: {metrics.VAL_ACC}, mode: max), which train.py calibrates and tests; "
            "remove it, or set those"
        )
    return best[0] if best else None


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
    model = instantiate_model(cfg)
    loggers = instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), with_logger=bool(loggers))
    best_checkpoint_callback(callbacks)  # refused now, before any image is decoded
    if cfg.get("ckpt_path") and not continues_this_run(cfg):
        callbacks.insert(0, StartFromAnotherRun())
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    if isinstance(trainer.accelerator, CUDAAccelerator) and cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)  # TF32 tensor cores for fp32 matmuls and convs
    return datamodule, model, trainer


def instantiate_model(cfg: DictConfig) -> L.LightningModule:
    """The model group's classifier; with model.init_from=FILE, its network's weights are that checkpoint's (read
    with weights_only): a new run from them, with a fresh optimizer, epoch count and records (unlike ckpt_path=).
    init_from is not a hyper-parameter of the classifier: its checkpoints do not need the file to load."""
    init_from = cfg.model.get("init_from")
    if init_from and cfg.get("ckpt_path"):
        raise ConfigError("model.init_from and ckpt_path: pick one (weights only, or weights, optimizer and epoch)")
    with open_dict(cfg):
        cfg.model.pop("init_from", None)
    try:
        model = _instantiate(cfg.model)
    finally:
        with open_dict(cfg):
            cfg.model["init_from"] = init_from
    if init_from:
        load_weights(model, init_from, cfg.data)
    return model


def split_keys(data) -> tuple[str, ...]:
    """The data settings that draw the validation split: k-fold's when data.fold is set, else the hold-out's."""
    return ("seed", "folds", "fold") if data.get("fold") is not None else ("seed", "val_fraction")


def seen_in_validation(saved: dict | None, data) -> str | None:
    """Why this run's validation images may be images the checkpoint it starts from was trained on (None when they
    cannot be): its run listed the same train images and split them another way. Then the validation accuracy, the
    best epoch, the temperature and every threshold fitted on them would flatter."""
    if not saved:
        return None

    def where(value) -> Path | None:
        return Path(str(value)).resolve() if value else None

    same = all(where(saved.get(k)) == where(data.get(k)) for k in ("data_dir", "index"))
    keys = sorted(set(split_keys(data)) | set(split_keys(saved)), key=("seed", "val_fraction", "folds", "fold").index)
    differ = [f"data.{k}={data.get(k)} here, {saved.get(k)} there" for k in keys if saved.get(k) != data.get(k)]
    if not same or not differ:
        return None
    return (
        f"it was trained on the same train images split another way ({'; '.join(differ)}): some of this run's "
        "validation images were its training images, which flatters the validation accuracy, the best epoch's "
        "pick, the temperature and the thresholds fitted on them; keep its split settings"
    )


def load_weights(model: L.LightningModule, path: str, data=None) -> None:
    """The network's weights (net.*) of a checkpoint, which must have the same backbone and classes; a warning when
    this run's validation images may be some it was trained on (seen_in_validation)."""
    checkpoint = read_checkpoint(path, "model.init_from")
    state = checkpoint["state_dict"]
    weights = {k: v for k, v in state.items() if k.startswith("net.")}
    mine = {k: v for k, v in model.state_dict().items() if k.startswith("net.")}
    differ = [k for k in mine if k not in weights or weights[k].shape != mine[k].shape]
    if differ or not weights:
        raise ConfigError(
            f"model.init_from={path}: its network does not fit this model (e.g. {differ[0] if differ else 'no net.*'}"
            "): the same model.backbone and data.classes are needed"
        )
    model.load_state_dict(weights, strict=False)
    log.info("network weights from %s (model.init_from): a new run, with a fresh optimizer and epoch count", path)
    why = seen_in_validation(checkpoint.get("datamodule_hyper_parameters"), data) if data is not None else None
    if why:
        log.warning("model.init_from=%s: %s", path, why)


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
    keeper = best_checkpoint_callback(trainer.callbacks)
    best = keeper.best_model_path if keeper else ""
    if best:  # the temperature (model.calibrate), the out-of-distribution detector and the prediction sets
        check_inside(best, cfg.paths.output_dir)
        calibrate(trainer, model, datamodule, best, temperature=cfg.model.get("calibrate", True))
    if cfg.get("test"):
        if not best:
            rank_zero_warn(
                f"no checkpoint callback keeps the best epoch by {metrics.VAL_ACC}: testing the weights at the end "
                "of training"
            )
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if name and name not in results:
        raise ConfigError(f"optimized_metric={name}: not logged by this run; logged: {', '.join(sorted(results))}")
    if rank_zero_only.rank == 0:
        write_results(cfg, results, best, set_names)
        warn_if_nothing_learned(trainer, datamodule)
    return results.get(name) if name else None


def check_inside(path: str, run_folder: str) -> None:
    """The best checkpoint is rewritten (calibration) and scored: it must be this run's own file."""
    if not Path(path).resolve().is_relative_to(Path(run_folder).resolve()):
        raise OutputDirError(f"the best checkpoint {path} is not inside this run's folder {run_folder}: not touched")


def warn_if_nothing_learned(trainer: L.Trainer, datamodule) -> None:
    """One line at the end of a run whose model predicted a single class for the validation images in every epoch,
    or scored only the majority class's share in every epoch: its numbers are those of a constant guess."""
    history = [h for h in getattr(run_figures(trainer), "history", []) if metrics.VAL_ACC in h]
    val = datamodule.datasets.get("val") if hasattr(datamodule, "datasets") else None
    if not history or val is None or not len(val):
        return
    labels = np.asarray(val.labels)
    majority = np.bincount(labels).max() / len(labels)
    classes = metrics.metric_name("val", metrics.CLASSES)
    constant = all(h.get(classes) == 1 for h in history)
    at_majority = all(abs(h[metrics.VAL_ACC] - majority) < 1e-6 for h in history)
    if constant or at_majority:
        what = "predicted one class for every validation image" if constant else "scored only the majority share"
        log.warning(
            "this run learned nothing: it %s in every epoch (val/acc %.3f; the largest class is %.3f of the "
            "validation images). Usual causes: a learning rate too high or too low for the optimizer (from scratch, "
            "VGG19 needs Adam at about 1e-4: experiment=quickstart, experiment=scratch224), too few epochs, or "
            "labels that do not match the images",
            what,
            history[-1][metrics.VAL_ACC],
            majority,
        )


def run_figures(trainer: L.Trainer) -> RunFigures | None:
    return next((c for c in trainer.callbacks if isinstance(c, RunFigures)), None)


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
    fitted_t = identifiable_temperature(logits, labels) if temperature else None
    if temperature and fitted_t is None and trainer.is_global_zero:
        log.warning(
            "not calibrated: the temperature that fits the %d validation images best is at the end of its range "
            "(every one of them is right by a wide margin), which says nothing about new images; T stays 1",
            len(labels),
        )
    fitted, temperature = fitted_t is not None, fitted_t or 1.0
    before, after = nll_at(logits, labels, 1.0), nll_at(logits, labels, temperature)
    uncertainty = ood.fit(
        logits, features, labels, temperature, model.pass_rate, model.coverage, reference, detector=model.ood
    )
    accepting = fit_acceptance(model, logits, features, labels, temperature, uncertainty)
    if trainer.is_global_zero:
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        checkpoint["state_dict"]["temperature"] = torch.tensor(temperature)
        checkpoint["state_dict"]["calibrated"] = torch.tensor(fitted)
        checkpoint["state_dict"].update(uncertainty.state if uncertainty else {})
        checkpoint["state_dict"].update(accepting[0] if accepting else {})
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, best)  # as Lightning wrote it: whole or not at all
        ood.log_fit(uncertainty, model.ood_detector, best)
        if accepting:
            log.info("%s (saved in %s)", selection.certificate_text(accepting[1]), best)
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


def fit_acceptance(model, logits, features, labels, temperature: float, uncertainty: ood.Fit | None):
    """The acceptance threshold (chestxray.models.selection) of the validation images, with the detector just fitted
    deciding which of them are in distribution; None without a detector fit (fewer than 2 validation images)."""
    if uncertainty is None:
        return None
    margin = detector_margin(model, logits, features, temperature, uncertainty.state)
    probs = (logits.float() / temperature).softmax(1).numpy()
    return selection.fit(probs, np.asarray(labels), margin, model.hparams.get("selective"))


def detector_margin(model, logits, features, temperature: float, state: dict) -> np.ndarray:
    """The chosen detector's score minus its threshold for these images, with the statistics of `state` (a fit's
    "ood." entries): what predict.py would give them."""
    detector = copy.deepcopy(model.ood).cpu()
    fitted = {k.removeprefix("ood."): v for k, v in state.items() if k.startswith("ood.")}
    ood.take_shapes(detector, fitted)
    detector.load_state_dict(fitted)
    scores = ood.all_scores(logits.float().cpu(), torch.tensor(temperature), features.float().cpu(), detector)
    k = ood.DETECTORS.index(model.ood_detector)
    return (scores[:, k] - detector.thresholds[k]).double().numpy()


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
