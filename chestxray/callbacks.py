"""Lightning callbacks: the pictures of a run, the evaluation reports of trainer.test, a stable best.ckpt."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from chestxray import reports
from chestxray.distributed import gather_by_index
from chestxray.evaluation import Evaluation, ReportSettings, leak_free, side_by_side, write_report

log = logging.getLogger(__name__)


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int = 0) -> None:
    """A rendered figure (H x W x 3) into TensorBoard's Images tab."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def metric_prefix(set_name: str) -> str:
    """TensorBoard and callback-metric prefix of an evaluated set: test/..., eval/<name>/..."""
    return "test" if set_name == "test" else f"eval/{set_name}"


def report_folder(output_dir: Path, set_name: str) -> Path:
    """The test report in the run folder itself; each evaluation set's in eval/<name>/."""
    return output_dir if set_name == "test" else output_dir / "eval" / set_name


class RunReports(L.Callback):
    """samples.png at the start of fit, history.json and curves.png at its end (all epochs, across resumes)."""

    def __init__(self, output_dir: str, samples_per_class: int = 4):
        self.output_dir = Path(output_dir)
        self.samples_per_class = samples_per_class
        self.history: list[dict] = []

    def _save(self, trainer: L.Trainer, name: str, fig: Figure, step: int = 0) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_image(trainer, name, reports.render(fig, self.output_dir / f"{name}.png"), step)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or "train" not in getattr(datamodule, "datasets", {}):
            return
        dataset = datamodule.datasets["train"]
        rng = np.random.default_rng(0)
        by_class: dict[str, list[np.ndarray]] = {}
        for label, name in enumerate(pl_module.classes):
            idx = np.flatnonzero(dataset.labels.numpy() == label)
            chosen = rng.choice(idx, min(self.samples_per_class, len(idx)), replace=False)
            by_class[name] = [dataset[int(i)][0].permute(1, 2, 0).numpy() for i in chosen]  # after augmentation
        self._save(trainer, "samples", reports.samples_figure(by_class))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in metrics})
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]

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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "history.json").write_text(json.dumps(self.history, indent=2))
        self._save(trainer, "curves", reports.curves_figure(self.history, best), trainer.current_epoch)


class TestReports(L.Callback):
    """After trainer.test: per set (the test folder, each evaluation set) its metrics, logged and written.

    Collects the per-image probabilities that test_step returns, gathers them from every rank, logs
    `test/acc`, `test/loss` (`eval/<name>/...` for evaluation sets) and their `_leak_free` twins, and writes each
    set's report folder (metrics.json, figures) and a side-by-side summary.
    """

    def __init__(self, output_dir: str, settings: dict | None = None):
        self.output_dir = Path(output_dir)
        self.settings = ReportSettings(**(settings or {}))
        self._parts: dict[int, list] = defaultdict(list)
        self.results: dict[str, Evaluation] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = defaultdict(list)
        self.results = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._parts[dataloader_idx].append((outputs["index"].cpu(), outputs["probs"].cpu()))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        for idx, (name, dataset) in enumerate(datamodule.test_sets.items()):
            gathered = gather_by_index(self._parts[idx])  # every rank takes part
            if gathered is None:
                continue
            index, probs = (t.numpy() for t in gathered)
            leaking = datamodule.leaking[name]
            evaluation = Evaluation(
                name,
                pl_module.classes,
                [dataset.paths[i] for i in index],
                dataset.labels.numpy()[index],
                probs.astype(np.float64),
                leaking[index],
            )
            self.results[name] = evaluation
            quick = evaluation.metrics(ReportSettings(bootstrap_resamples=0))
            prefix = metric_prefix(name)
            # without leaking images the leak-free numbers are the numbers; values are identical on every rank
            # (gathered above), and sync_dist keeps Lightning's bookkeeping consistent
            nothing = {"accuracy": float("nan"), "loss": float("nan")}  # every image leaks: no leak-free number
            for suffix, m in (("", quick), ("_leak_free", leak_free(quick) or nothing)):
                pl_module.log(f"{prefix}/acc{suffix}", m["accuracy"], add_dataloader_idx=False, sync_dist=True)
                pl_module.log(f"{prefix}/loss{suffix}", m["loss"], add_dataloader_idx=False, sync_dist=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.results:
            return
        written = {}
        settings = replace(self.settings, limits=trainer.datamodule.settings.limits)
        for name, evaluation in self.results.items():
            folder = report_folder(self.output_dir, name)
            metrics, images = write_report(evaluation, folder, settings, pl_module, predictions=True)
            for figure_name, image in images.items():
                tag = f"{metric_prefix(name)}/{figure_name}"
                log_image(trainer, "test/gradcam" if tag == "test/gradcam_gallery" else tag, image, trainer.global_step)
            if metrics:
                written[name] = metrics
                log.info("%s report (%s):\n%s", name, folder, reports.summary_text(metrics))
        if len(written) > 1 or any(m["leak_free"] for m in written.values()):
            log.info("all evaluated sets, all images and leak-free:\n%s", side_by_side(written))


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also keeps `best.ckpt` beside `epoch_NNN.ckpt`: a stable name for the best epoch."""

    BEST_NAME = "best.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._link_best(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._link_best(trainer)

    def _link_best(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.best_model_path or not os.path.exists(self.best_model_path):
            return
        best = Path(self.best_model_path)
        link = best.with_name(self.BEST_NAME)
        if link.is_symlink() and os.readlink(link) == best.name:
            return
        tmp = link.with_name(f".{self.BEST_NAME}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(best.name)  # relative: the run folder can be moved
        except OSError:  # no symbolic links here (Windows without the privilege): a hard link, else a copy
            try:
                os.link(best, tmp)
            except OSError:
                import shutil

                shutil.copyfile(best, tmp)
        os.replace(tmp, link)
