"""The classifier (a torchvision backbone under the notebook's head) as a LightningModule, and the modules that
predict with one or several trained classifiers.

Metrics live here, one MetricCollection per stage (chestxray.evaluation.metrics defines them): train and val log
accuracy and loss every epoch; test keeps, per test dataloader, the full report collection on all images and on the
leak-free ones (a mask from the batch), and the calibration metrics before temperature scaling. What the test sets'
report files need beyond numbers (each image's probabilities) is kept in `test_results` for the report callback.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric

from chestxray.errors import ConfigError, NonFiniteLossError
from chestxray.evaluation import metrics
from chestxray.models import ood as ood_lib
from chestxray.models import selection
from chestxray.models.backbones import XRV, XRV_WEIGHTS, build_network, freeze_stages, get_backbone
from chestxray.runtime.distributed import gather_by_index

log = logging.getLogger(__name__)

# (calibrated probabilities N x K, the detector's score minus its threshold N, prediction sets N x K bool, the
# confidence's gate N): what a classifier answers for images, in the ONNX graph's output order
Answered = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """An optimizer's class as a dotted name (torch.optim.adam.Adam): what a checkpoint records of it."""
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


@dataclass
class TestResult:
    """One evaluated set after trainer.test: the collections' numbers and each image's probabilities."""

    index: np.ndarray  # positions in the set's dataset, sorted
    probs: np.ndarray  # calibrated (what the model answers)
    raw_probs: np.ndarray  # before temperature scaling
    numbers: dict  # {"all": ..., "leak_free": ..., "uncalibrated": ...} (chestxray.evaluation.metrics.summarise)
    ood_scores: np.ndarray | None = None  # the detector's score minus its threshold (NaN: no detector fitted)
    sets: np.ndarray | None = None  # N x K bool prediction sets (None: no conformal fit)
    gates: np.ndarray | None = None  # the confidence's gate (ood.margins; None: the detector's score itself)


class ChestXrayClassifier(L.LightningModule):
    """Takes uint8 images (N x 3 x S x S), returns logits; normalisation lives here so it runs on the device."""

    def __init__(
        self,
        classes: Sequence[str],
        image_size: int = 224,
        preprocess: str = "none",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        backbone: str = "vgg19",
        pretrained: bool = True,
        weights_path: str | None = None,
        freeze: str | int = "none",
        cache_features: bool = False,
        channels_last: bool = True,
        compile: bool | str = False,
        dropout: float = 0.1,
        calibrate: bool = True,
        ood: dict | None = None,
        conformal: dict | None = None,
        selective: dict | None = None,
        xrv_weights: str = XRV_WEIGHTS[0],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__()
        # Plain values only, so a checkpoint loads with weights_only=True and alone is enough to predict.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams.classes = list(classes)
        self.hparams.mean, self.hparams.std = list(mean), list(std)
        if compile not in COMPILE_MODES:
            raise ConfigError(f"model.compile={compile}: must be false, true, reduce-overhead or max-autotune")
        ood_lib.check_settings(dict(ood or {}), dict(conformal or {}))
        selection.check_settings(selective)
        if cache_features and freeze != "features":
            raise ConfigError("model.cache_features=true needs model.freeze=features (a frozen backbone)")
        if backbone == XRV and (list(mean) != [0.5] * 3 or list(std) != [0.5] * 3):
            raise ConfigError(
                f"model.backbone={XRV} needs model.mean and model.std of [0.5, 0.5, 0.5] (it converts [-1, 1] to "
                f"torchxrayvision's [-1024, 1024] inside the network), not {list(mean)} and {list(std)}"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone = get_backbone(backbone)
        self.net = build_network(backbone, len(classes), pretrained, weights_path, dropout, xrv_weights)
        self.frozen = freeze_stages(self.net, backbone, freeze)
        self.train()  # frozen stages in eval mode from the start (Lightning keeps each module's mode as it finds it)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        # Temperature scaling (chestxray.models.calibration): fitted after training, saved in the checkpoint.
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        num_classes = len(classes)
        # The out-of-distribution detector and the conformal threshold (chestxray.models.ood), fitted with T.
        self.ood = ood_lib.OodDetector(num_classes, self.backbone.width, self.backbone.stage_widths)
        self.conformal = ood_lib.ConformalSets()
        # The acceptance threshold (chestxray.models.selection), fitted with them.
        self.selective = selection.AcceptanceThreshold()
        self.train_metrics = metrics.stage_metrics(num_classes).clone(prefix="train/")
        self.val_metrics = metrics.stage_metrics(num_classes).clone(prefix="val/")
        # In the checkpoint, so that a resumed run's best covers the epochs before the interruption too.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)
        self.test_metrics = nn.ModuleDict()
        self.test_set_names: list[str] = []
        self.test_results: dict[str, TestResult] = {}
        self._test_outputs: dict[int, list] = {}
        self.feature_cache: dict[tuple[str, int], torch.Tensor] = {}
        # the losses of the batches whose gradients the next optimizer step applies (several with accumulation)
        self._pending_losses: list[tuple[torch.Tensor, int]] = []

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes)

    @property
    def ood_detector(self) -> str:
        return ood_lib.check_settings(dict(self.hparams.get("ood") or {}), {})[0]

    @property
    def coverage(self) -> float:
        return ood_lib.check_settings({}, dict(self.hparams.get("conformal") or {}))[2]

    @property
    def pass_rate(self) -> float:
        return ood_lib.check_settings(dict(self.hparams.get("ood") or {}), {})[1]

    def train(self, mode: bool = True) -> ChestXrayClassifier:
        """Frozen stages stay in eval mode, so their BatchNorm statistics stay those they were trained with."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The optimizers' classes by name, which a run continuing this checkpoint must use too
        (chestxray.training.fit.check_same_optimizer): the names of an optimizer's settings change over torch
        versions, its class does not."""
        if self._trainer is not None and self.trainer.optimizers:
            checkpoint["optimizer_classes"] = [optimizer_class(o) for o in self.trainer.optimizers]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written before temperature scaling existed load as uncalibrated (T = 1); before detectors and
        prediction sets existed, with none fitted (one line says so). The fitted statistics' shapes follow the
        validation split (the KNN bank has a row per image), so the buffers take the checkpoint's shapes first."""
        state = checkpoint.get("state_dict", {})
        state.setdefault("temperature", torch.ones(()))
        state.setdefault("calibrated", torch.zeros((), dtype=torch.bool))
        if "ood.fitted" not in state:  # not a checkpoint being fitted right now (fit.calibrate reads best.ckpt first)
            log.warning(
                "this checkpoint carries no out-of-distribution detector or conformal fit (written before they "
                "existed): ood_score, in_distribution and prediction_set stay empty"
            )
        if ood_lib.upgrade_state(state) and "detector" not in (self.hparams.get("ood") or {}):
            # fitted before knn_layers existed: keep the default its thresholds were fitted for
            self.hparams["ood"] = {**(self.hparams.get("ood") or {}), "detector": ood_lib.DEFAULT_BEFORE_KNN_LAYERS}
        if "selective.fitted" not in state and "ood.fitted" in state:
            log.warning(
                "this checkpoint carries no acceptance threshold (written before it existed): confidence is given, "
                "accepted stays empty"
            )
        for name, buffer in self.selective.named_buffers():
            state.setdefault(f"selective.{name}", buffer.clone())
        ood_lib.take_shapes(self.ood, state, "ood.")
        ood_lib.take_shapes(self.conformal, state, "conformal.")

    def configure_model(self) -> None:
        """model.compile: torch.compile the network in place (its parameter names, and checkpoints, unchanged)."""
        mode = self.hparams.get("compile", False)
        if mode and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile(mode=None if mode in (True, "default") else mode)

    # --- the network ---------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float normalised as the notebook's Normalize(mean, std) after ToTensor."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The network's output before temperature scaling: what training optimises."""
        return self.net(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (divided by the fitted temperature; T = 1 until calibrated): what predictions use."""
        return self.logits(images) / self.temperature

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits before temperature scaling, what the detectors score: the pooled features then each stage's mean
        output, Backbone.trunk_and_stages): one pass, head(trunk(x)) being the network."""
        features = self.backbone.trunk_and_stages(self.net, self.preprocess(images))
        return self.backbone.head_on_pooled(self.net, features), features

    def answers_of(self, raw_logits: torch.Tensor, features: torch.Tensor) -> Answered:
        """(calibrated probabilities, the detector's score minus its threshold, prediction sets N x K bool, the
        confidence's gate: ood.margins)."""
        probs = (raw_logits.float() / self.temperature).softmax(1)
        k = ood_lib.DETECTORS.index(self.ood_detector)
        margin, gate = ood_lib.margins(raw_logits, self.temperature, features, self.ood, k)
        return probs, margin, ood_lib.prediction_sets(probs, self.conformal.min_prob), gate

    def answers(self, images: torch.Tensor) -> Answered:
        return self.answers_of(*self.logits_and_features(images))

    def _features(self, images: torch.Tensor, index: torch.Tensor, stage: str) -> torch.Tensor:
        """What a frozen backbone gives the head and the detectors (trunk_and_stages, cache_features), computed once
        per image."""
        keys = [(stage, int(i)) for i in index]
        missing = [k for k, key in enumerate(keys) if key not in self.feature_cache]
        if missing:
            with torch.no_grad():
                feats = self.backbone.trunk_and_stages(self.net, self.preprocess(images[missing]))
            for k, f in zip(missing, feats, strict=True):
                self.feature_cache[keys[k]] = f
        return torch.stack([self.feature_cache[key] for key in keys])

    def _fp32(self):
        """Evaluation and calibration in fp32 whatever precision trains (trainer=cpu's bf16 on AMX, gpu_fast's): the
        test report and the temperature are those of the fp32 model that predict.py runs."""
        return torch.autocast(self.device.type, enabled=False)

    def _raw_logits(self, images: torch.Tensor, index: torch.Tensor, stage: str) -> torch.Tensor:
        if self.hparams.cache_features:
            return self.backbone.head_on_pooled(self.net, self._features(images, index, stage))
        return self.logits(images)

    def _logits_and_features(
        self, images: torch.Tensor, index: torch.Tensor, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.cache_features:
            features = self._features(images, index, stage)
            return self.backbone.head_on_pooled(self.net, features), features
        return self.logits_and_features(images)

    # --- fit -----------------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, index, _ = batch
        logits = self._raw_logits(images, index, "train")
        loss = F.cross_entropy(logits, labels)
        self._pending_losses.append((loss.detach(), batch_idx))
        self.train_metrics.update(preds=logits, target=labels, value=loss.detach())
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss changes the weights.

        Checked here, after backward was queued, rather than in training_step: reading the loss waits for the
        device, and waiting before backward would leave a GPU idle while the backward kernels are launched.
        """
        if not self._pending_losses:
            return
        pending, self._pending_losses = self._pending_losses, []
        finite_each = torch.isfinite(torch.stack([loss for loss, _ in pending]))
        finite = bool(finite_each.all())
        if self.trainer.world_size > 1:  # gradients are averaged across ranks: all stop, or none
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:  # name this rank's first non-finite batch (the last one if another rank's was)
            loss, batch_idx = next(
                (item for item, ok in zip(pending, finite_each.tolist(), strict=True) if not ok), pending[-1]
            )
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}): training stopped before this step was applied; the checkpoints already "
                "written are kept. Lower optimizer.lr or check the data."
            )

    def on_fit_start(self) -> None:
        """A model being trained is not calibrated (fine-tuning from a calibrated best.ckpt starts again at T = 1),
        and has no detector or prediction sets fitted: its features and probabilities are about to change."""
        self.temperature.fill_(1.0)
        self.calibrated.fill_(False)
        self.ood.fitted.fill_(False)
        self.ood.thresholds.fill_(float("nan"))
        self.conformal.fitted.fill_(False)
        self.selective.fitted.fill_(False)
        self.selective.threshold.fill_(float("nan"))

    def on_train_start(self) -> None:
        # The sanity check's few batches must not count towards the validation metrics.
        self.val_metrics.reset()
        if self.trainer.ckpt_path:  # restored from a checkpoint (resume=, ckpt_path=): this run's settings win
            self._apply_configured_optimization()

    def _apply_configured_optimization(self) -> None:
        """Lightning restores the optimizer's and the scheduler's saved state, their settings included: the old
        learning rate, and a schedule as long as the old max_epochs (a cosine that reached 0 at the old end climbs
        back). Here the settings of this run's config replace them after the restore, so a resumed run runs with what
        its command line, saved config and logged hyper-parameters say: the optimizer's hyper-parameters are set
        again (its state, e.g. momentum buffers, is kept) and the scheduler is built anew from its config, with its
        new length, and stepped to this epoch, as if the run had had these settings from the start."""
        optimizer = self.trainer.optimizers[0]
        for group, configured in zip(optimizer.param_groups, self._configured_groups, strict=True):
            group.update(configured)
            group.pop("initial_lr", None)  # the scheduler built below sets it from the configured lr
        for config in self.trainer.lr_scheduler_configs:
            scheduler = self.scheduler_factory(optimizer=optimizer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": a replay, on purpose
                for _ in range(self.current_epoch):
                    scheduler.step()
            config.scheduler = scheduler

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, index, _ = batch
        logits = self._raw_logits(images, index, "val")
        loss = F.cross_entropy(logits, labels, reduction="none")
        self.val_metrics.update(preds=logits, target=labels, value=loss)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_metrics[metrics.ACC].compute())
        self.log(metrics.BEST, self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def predict_step(
        self, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, logits before temperature scaling, pooled features) of a labelled loader: what calibration,
        the detectors and the prediction sets fit on."""
        images, _, index, _ = batch
        with self._fp32():
            raw, features = self._logits_and_features(images, index, f"calibration{dataloader_idx}")
            return index, raw.float(), features.float()

    # --- test: one report collection per evaluated set -----------------------------------------------------------

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.test_set_names = list(getattr(datamodule, "test_sets", None) or ["test"])
        k = len(self.classes)
        self.test_metrics = nn.ModuleDict(
            {
                str(i): nn.ModuleDict(
                    {
                        "all": metrics.report_metrics(k),
                        "leak_free": metrics.report_metrics(k),
                        "uncalibrated": metrics.calibration_metrics(k),
                    }
                )
                for i in range(len(self.test_set_names))
            }
        ).to(self.device)
        self._test_outputs = {i: [] for i in range(len(self.test_set_names))}
        self.test_results = {}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, index, leaking = batch
        with self._fp32():
            raw, features = self._logits_and_features(images, index, f"test{dataloader_idx}")
            raw = raw.float()
            _, margin, sets, gate = self.answers_of(raw, features.float())
        logits = raw / self.temperature
        probs, raw_probs = logits.softmax(1), raw.softmax(1)
        loss = F.cross_entropy(logits, labels, reduction="none")
        collections = self.test_metrics[str(dataloader_idx)]
        collections["all"].update(preds=probs, target=labels, value=loss)
        keep = ~leaking
        if keep.any():  # the leak-free numbers: the same metrics through the batch's mask
            collections["leak_free"].update(preds=probs[keep], target=labels[keep], value=loss[keep])
        raw_loss = F.cross_entropy(raw, labels, reduction="none")
        collections["uncalibrated"].update(preds=raw_probs, target=labels, value=raw_loss)
        outputs = (index.cpu(), probs.cpu(), raw_probs.cpu(), margin.cpu(), sets.cpu(), gate.cpu())
        self._test_outputs[dataloader_idx].append(outputs)

    def on_test_epoch_end(self) -> None:
        for i, name in enumerate(self.test_set_names):
            collections = self.test_metrics[str(i)]
            numbers = {
                "all": metrics.summarise(metrics.compute(collections["all"]), self.classes),
                "uncalibrated": metrics.summarise_calibration(collections["uncalibrated"].compute()),
            }
            seen = int(collections["leak_free"]["confusion"].compute().sum())  # across ranks
            numbers["leak_free"] = (
                metrics.summarise(metrics.compute(collections["leak_free"]), self.classes) if seen else {"n": 0}
            )
            for collection in collections.values():
                collection.reset()
            prefix = metrics.set_prefix(name)
            clean = (
                numbers["leak_free"] if numbers["leak_free"]["n"] else {"accuracy": float("nan"), "loss": float("nan")}
            )
            for leak_free, m in ((False, numbers["all"]), (True, clean)):
                for metric, value in ((metrics.ACC, m["accuracy"]), (metrics.LOSS, m["loss"])):
                    logged = metrics.metric_name(prefix, metric, leak_free)
                    self.log(logged, value, add_dataloader_idx=False, sync_dist=True)
            gathered = gather_by_index(self._test_outputs[i])  # every rank takes part
            if gathered is not None:
                index, probs, raw_probs, margin, sets, gate = (t.numpy() for t in gathered)
                self.test_results[name] = TestResult(
                    index,
                    probs.astype(np.float64),
                    raw_probs.astype(np.float64),
                    numbers,
                    margin.astype(np.float64),
                    sets if bool(self.conformal.fitted) else None,
                    gate.astype(np.float64),
                )
        self._test_outputs = {}

    # --- optimisation --------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ConfigError("no optimizer configured (pass optimizer=..., a partial torch.optim class)")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        # as configured, before a scheduler changes the lr: what a restored optimizer is given back (on_train_start)
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"},
        }


class Probabilities(nn.Module):
    """uint8 images -> the members' averaged class probabilities, each member calibrated and normalising its own
    input: what predict.py computes, as one graph (the ONNX export traces this module)."""

    def __init__(self, members: Sequence[ChestXrayClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images).float().softmax(1) for m in self.members]).mean(0)

    def answers(self, images: torch.Tensor) -> Answered:
        """(averaged probabilities, out-of-distribution score, prediction sets, the confidence's gate): each
        member's own detector and conformal threshold; an ensemble flags (and gates) an image when any member does
        (the largest score minus threshold) and its set is the union of the members' sets (at least each member's
        coverage)."""
        probs, margin, sets, gate = zip(*(m.answers(images) for m in self.members), strict=True)
        return (
            torch.stack(probs).mean(0),
            torch.stack(margin).amax(0),
            torch.stack(sets).any(0),
            torch.stack(gate).amax(0),
        )


class Answers(nn.Module):
    """Probabilities.answers as a module's forward: the ONNX graph's four outputs (probs, ood_score, sets, gate)."""

    def __init__(self, members: Sequence[ChestXrayClassifier]):
        super().__init__()
        self.net = Probabilities(members)

    def forward(self, images: torch.Tensor) -> Answered:
        return self.net.answers(images)


class Predictor(L.LightningModule):
    """Trainer.predict's module: probabilities of the readable images of a batch; unreadable ones never reach the
    network (their rows are errors)."""

    def probabilities(self, images: torch.Tensor) -> Answered:
        """(probabilities N x K, out-of-distribution score N, prediction sets N x K bool, the confidence's gate N)."""
        raise NotImplementedError

    def predict_step(self, batch, batch_idx: int) -> tuple[torch.Tensor, tuple, list[str]]:
        """(positions of the readable images, their (probs, ood score, sets, gate), every image's error or "")."""
        images, positions, errors = batch
        good = torch.tensor([not e for e in errors], dtype=torch.bool)
        if good.any():
            answers = self.probabilities(images[good])
        else:
            none = images.new_zeros(0, dtype=torch.float32)
            answers = (images.new_zeros((0, 0), dtype=torch.float32), none, images.new_zeros((0, 0)), none)
        return positions[good.to(positions.device)], answers, list(errors)


class Ensemble(Predictor):
    """One checkpoint's probabilities, or the average of several (each member applies its own preprocessing)."""

    def __init__(self, members: Sequence[ChestXrayClassifier]):
        super().__init__()
        self.net = Probabilities(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def probabilities(self, images: torch.Tensor) -> Answered:
        return self.net.answers(images)
