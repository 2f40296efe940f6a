"""A Lightning callback that leaves the pictures of a run in its folder and in TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from chestxray import reports
from chestxray.saliency import gradcam_overlays

log = logging.getLogger(__name__)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


class RunReports(L.Callback):
    """samples.png at the start, curves.png at the end of fit, the test report after trainer.test."""

    def __init__(self, output_dir: str, samples_per_class: int = 4, gradcam_images: int = 6):
        self.output_dir = Path(output_dir)
        self.samples_per_class = samples_per_class
        self.gradcam_images = gradcam_images
        self.history: list[dict] = []

    def _log_figure(self, trainer: L.Trainer, tag: str, fig: Figure, step: int = 0) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=step, close=False)

    def _save(self, trainer: L.Trainer, name: str, fig: Figure, step: int = 0, tag: str | None = None) -> Path:
        self._log_figure(trainer, tag or name, fig, step)
        return reports.save_figure(fig, self.output_dir / f"{name}.png")

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or "train" not in getattr(datamodule, "datasets", {}):
            return
        dataset = datamodule.datasets["train"]
        classes = pl_module.classes
        rng = np.random.default_rng(0)
        by_class: dict[str, list[np.ndarray]] = {}
        for label, name in enumerate(classes):
            idx = np.flatnonzero(dataset.labels.numpy() == label)
            chosen = rng.choice(idx, min(self.samples_per_class, len(idx)), replace=False)
            by_class[name] = [_hwc(dataset[int(i)][0]) for i in chosen]  # after resize and augmentation
        self._save(trainer, "samples", reports.samples_figure(by_class))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in metrics})
        self.history.append(row)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        with_val = [h for h in self.history if "val/acc" in h]
        best = max(with_val, key=lambda h: h["val/acc"])["epoch"] if with_val else None
        (self.output_dir / "history.json").write_text(json.dumps(self.history, indent=2))
        self._save(trainer, "curves", reports.curves_figure(self.history, best), trainer.current_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not trainer.is_global_zero or not pl_module.test_predictions or datamodule is None:
            return
        dataset = datamodule.datasets["test"]
        result = pl_module.test_predictions
        index = result["index"].tolist()
        labels = result["labels"].tolist()
        probs = result["probs"].numpy()
        images = [_hwc(dataset.images[i]) for i in index]
        metrics, figures = reports.write_evaluation(self.output_dir, labels, probs, pl_module.classes, images)
        step = trainer.global_step
        for name, fig in figures.items():
            self._log_figure(trainer, f"test/{name}", fig, step)
            reports.plt.close(fig)
        gradcam = self._gradcam_figure(pl_module, dataset, index, labels, probs)
        self._save(trainer, "gradcam_gallery", gradcam, step, tag="test/gradcam")
        log.info("test report (%s):\n%s", self.output_dir, reports.summary_text(metrics))

    def _gradcam_figure(self, pl_module, dataset, index, labels, probs) -> Figure:
        preds = probs.argmax(1).tolist()
        chosen = reports.pick_gallery(preds, labels, self.gradcam_images)
        images = torch.stack([dataset.images[index[i]] for i in chosen])
        overlays = gradcam_overlays(pl_module, images, [preds[i] for i in chosen])
        return reports.gallery_figure(
            overlays, [preds[i] for i in chosen], [labels[i] for i in chosen], pl_module.classes, columns=3
        )
