"""Classifiers whose validation accuracy or answers a test sets, to check what train.py does with them."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from chestxray.evaluation import metrics
from chestxray.models.classifier import ChestXrayClassifier


class ScriptedAccuracy(Metric):
    """val/acc as the test scripted it for each epoch (the real images still go through the network)."""

    full_state_update = False

    def __init__(self, values: list[float], epoch):
        super().__init__()
        self.values, self.epoch = values, epoch
        self.add_state("seen", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.seen += len(target)

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.values[self.epoch()])


class ScriptedClassifier(ChestXrayClassifier):
    """val/acc of epoch e is VAL_ACC[e] (set by the test before building the model)."""

    VAL_ACC: list[float] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_metrics[metrics.ACC] = ScriptedAccuracy(list(self.VAL_ACC), lambda: self.current_epoch)


class ConstantClassifier(ChestXrayClassifier):
    """Answers the first class for every image, whatever it learns (a bias far above the network's logits)."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = super().logits(images)
        return out + torch.tensor([100.0, 0.0, 0.0], device=out.device)


class SplitAwareClassifier(ChestXrayClassifier):
    """Calibration sees scripted logits: spread-out ones for the validation images (predict loader 0) and uniform
    ones for the training images (loader 1), so a conformal fit on the wrong split gives another threshold (a real
    model's probabilities on both sit near 1/3 in a tiny run, where the two agree to 1e-4)."""

    @staticmethod
    def scripted_logits(index: torch.Tensor, loader: int) -> torch.Tensor:
        table = 3.0 * torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))
        return table[index] if loader == 0 else torch.zeros(len(index), 3)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        index, raw, features = super().predict_step(batch, batch_idx, dataloader_idx)
        return index, self.scripted_logits(index.cpu(), dataloader_idx).to(raw), features
