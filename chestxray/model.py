"""The re-headed VGG19 and the LightningModule that trains, validates and tests it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models import VGG19_Weights, vgg19

log = logging.getLogger(__name__)

# Index of the last layer (a MaxPool) of each of VGG19's five convolutional blocks in `features`.
VGG19_BLOCK_ENDS = (4, 9, 18, 27, 36)
# The last convolutional block's output (its final ReLU), where Grad-CAM looks.
GRADCAM_LAYER = 35


class WeightsError(RuntimeError):
    """ImageNet weights could not be had: says which setting to use instead."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged; raised before the bad step is applied, so the last checkpoint stays good."""


def _load_imagenet_weights(model: nn.Module, weights_path: str | None) -> None:
    if weights_path:
        model.load_state_dict(read_vgg19_weights(weights_path, model))
        return
    weights = VGG19_Weights.IMAGENET1K_V1
    try:
        model.load_state_dict(weights.get_state_dict(progress=False))
    except Exception as err:  # noqa: BLE001 - offline, proxy, corrupt download: same advice
        raise WeightsError(
            f"could not download the ImageNet VGG19 weights ({weights.url}): {type(err).__name__}: {err}\n"
            "  On a machine without internet, download that file elsewhere and pass model.weights_path=FILE,\n"
            "  or train from scratch with model.pretrained=false."
        ) from err


def read_vgg19_weights(weights_path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A VGG19 state dict from a file, or WeightsError saying what the file is instead (one line)."""
    path = Path(weights_path)
    setting = f"model.weights_path={weights_path}"
    if not path.is_file():
        raise WeightsError(f"{setting}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors all mean "not a torch weights file"
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{setting}: not a PyTorch weights file ({detail})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{setting}: not a state dict (a mapping of parameter names to tensors)")
    expected = (model or vgg19(weights=None)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise WeightsError(f"{setting}: not torchvision VGG19 weights: keys {'; '.join(parts)}")
    return state


def build_vgg19(
    num_classes: int, pretrained: bool = True, weights_path: str | None = None, dropout: float = 0.1
) -> nn.Module:
    """VGG19 (ImageNet weights when pretrained) with the notebook's small head on globally pooled features."""
    model = vgg19(weights=None)
    if pretrained or weights_path:
        _load_imagenet_weights(model, weights_path)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(512, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )
    return model


def freeze_features(model: nn.Module, freeze: str | int) -> None:
    """'none' trains everything; 'features' trains only the head; N freezes the first N conv blocks."""
    if freeze in (None, "none", 0):
        return
    if freeze == "features":
        blocks = len(VGG19_BLOCK_ENDS)
    else:
        try:
            blocks = int(freeze)
        except (TypeError, ValueError):
            raise ValueError(f"model.freeze must be 'none', 'features' or 0..5, got {freeze!r}") from None
        if not 0 <= blocks <= len(VGG19_BLOCK_ENDS):
            raise ValueError(f"model.freeze must be 'none', 'features' or 0..5, got {freeze!r}")
    if blocks == 0:
        return
    for layer in model.features[: VGG19_BLOCK_ENDS[blocks - 1] + 1]:
        layer.requires_grad_(False)


class ChestXrayClassifier(L.LightningModule):
    """Takes uint8 images (N x 3 x S x S), returns logits; normalisation lives here so it runs on the device."""

    def __init__(
        self,
        classes: Sequence[str],
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        pretrained: bool = True,
        weights_path: str | None = None,
        freeze: str | int = "none",
        cache_features: bool = False,
        channels_last: bool = True,
        compile: bool | str = False,
        dropout: float = 0.1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable | None = None,
    ):
        super().__init__()
        # Plain values only, so a checkpoint loads with weights_only=True and alone is enough to predict.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams.classes = list(classes)
        self.hparams.mean, self.hparams.std = list(mean), list(std)
        if compile not in (False, True, "default", "reduce-overhead", "max-autotune"):
            raise ValueError(f"model.compile must be false, true, reduce-overhead or max-autotune, got {compile!r}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = build_vgg19(len(classes), pretrained, weights_path, dropout)
        freeze_features(self.net, freeze)
        if cache_features and freeze != "features":
            raise ValueError("model.cache_features=true needs model.freeze=features (a frozen backbone)")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.criterion = nn.CrossEntropyLoss()
        num_classes = len(classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        # In the checkpoint, so that a resumed run's best covers the epochs before the interruption too.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)
        self.feature_cache: dict[tuple[str, int], torch.Tensor] = {}
        # the losses of the batches whose gradients the next optimizer step applies (several with accumulation)
        self._pending_losses: list[tuple[torch.Tensor, int]] = []

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes)

    def configure_model(self) -> None:
        """model.compile: torch.compile the network in place (its parameter names, and checkpoints, unchanged)."""
        mode = self.hparams.get("compile", False)
        if mode and not getattr(self.net, "_compiled_call_impl", None):
            self.net.compile(mode=None if mode in (True, "default") else mode)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float normalised as the notebook's Normalize(mean, std) after ToTensor."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    def _features(self, images: torch.Tensor, index: torch.Tensor, stage: str) -> torch.Tensor:
        """Backbone output of a frozen backbone (cache_features), computed once per image."""
        keys = [(stage, int(i)) for i in index]
        missing = [k for k, key in enumerate(keys) if key not in self.feature_cache]
        if missing:
            with torch.no_grad():
                feats = self.net.avgpool(self.net.features(self.preprocess(images[missing])))
            for k, f in zip(missing, feats, strict=True):
                self.feature_cache[keys[k]] = f
        return torch.stack([self.feature_cache[key] for key in keys])

    def _logits(self, images: torch.Tensor, index: torch.Tensor, stage: str) -> torch.Tensor:
        if self.hparams.cache_features:
            return self.net.classifier(self._features(images, index, stage))
        return self(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, index = batch
        logits = self._logits(images, index, "train")
        loss = self.criterion(logits, labels)
        self._pending_losses.append((loss.detach(), batch_idx))
        self.train_loss(loss)
        self.train_acc(logits, labels)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
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

    def on_train_start(self) -> None:
        # The sanity check's few batches must not count towards the validation metrics.
        self.val_loss.reset()
        self.val_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, index = batch
        logits = self._logits(images, index, "val")
        self.val_loss(self.criterion(logits, labels))
        self.val_acc(logits, labels)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-image probabilities for the evaluation reports (chestxray.evaluation), which compute and log."""
        images, _, index = batch
        logits = self._logits(images, index, f"test{dataloader_idx}")
        return {"index": index, "probs": logits.float().softmax(1)}

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (pass optimizer=..., a partial torch.optim class)")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"},
        }
