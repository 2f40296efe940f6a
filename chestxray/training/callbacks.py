"""Lightning callbacks that write what a run shows: its pictures and curves, and the report of every evaluated set.

Checkpoints are Lightning's own ModelCheckpoint (conf/callbacks): best.ckpt by val/acc, last.ckpt every epoch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from chestxray.evaluation import figures
from chestxray.evaluation.metrics import HISTORY, VAL_ACC, set_prefix
from chestxray.evaluation.report import (
    Evaluation,
    ReportSettings,
    Uncertainty,
    side_by_side,
    summary_text,
    write_report,
)
from chestxray.models.selection import select
from chestxray.runtime.console import shown
from chestxray.runtime.files import atomic_write
from chestxray.training.loggers import log_figure

log = logging.getLogger(__name__)


def report_folder(output_dir: Path, set_name: str) -> Path:
    """The test report in the run folder itself; each evaluation set's in eval/<name>/."""
    return output_dir if set_name == "test" else output_dir / "eval" / set_name


class RunFigures(L.Callback):
    """samples.png at the start of fit; history.json and curves.png at its end, with every epoch across resumes.

    The history is this callback's state in the checkpoint (Lightning's Callback.state_dict): Lightning keeps no
    per-epoch record of its own (callback_metrics holds the latest epoch only), and the loggers are write-only and
    optional (logger=null, or an MLflow server elsewhere), so they cannot be read back to draw the curves.
    """

    def __init__(self, output_dir: str, samples_per_class: int = 4):
        self.output_dir = Path(output_dir)
        self.samples_per_class = samples_per_class
        self.history: list[dict] = []

    def _save(self, trainer: L.Trainer, name: str, fig: Figure, step: int = 0) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        png = self.output_dir / f"{name}.png"
        log_figure(trainer, name, figures.render(fig, png), png, step)

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
        self._save(trainer, "samples", figures.samples_figure(by_class))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in HISTORY if k in metrics})
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        with_val = [h for h in self.history if VAL_ACC in h]
        best = max(with_val, key=lambda h: h[VAL_ACC])["epoch"] if with_val else None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.output_dir / "history.json", json.dumps(self.history, indent=2))
        self._save(trainer, "curves", figures.curves_figure(self.history, best), trainer.current_epoch)


class ReportWriter(L.Callback):
    """After trainer.test, per evaluated set (the test folder, each evaluation set): metrics.json, predictions.csv
    and the figures, from the numbers and per-image probabilities the module computed; the figures to the loggers;
    the report and a side-by-side table of every set to the log."""

    def __init__(self, output_dir: str, settings: dict | None = None):
        self.output_dir = Path(output_dir)
        self.settings = ReportSettings(**(settings or {}))
        self.reports: dict[str, dict] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        settings = ReportSettings(**{**self.settings.__dict__, "limits": datamodule.settings.limits})
        calibrated = bool(pl_module.calibrated)
        self.reports = {}
        for name, result in pl_module.test_results.items():
            dataset = datamodule.test_sets[name]
            evaluation = Evaluation(
                name,
                pl_module.classes,
                [dataset.paths[i] for i in result.index],
                dataset.labels.numpy()[result.index],
                result.probs,
                datamodule.leaking[name][result.index],
                numbers=result.numbers,
                raw_probs=result.raw_probs,
                temperature=float(pl_module.temperature) if calibrated else None,
                shares_with_test=datamodule.shared_with_test.get(name),
                splits=datamodule.split_groups if name == "test" else None,
                uncertainty=Uncertainty.of(
                    pl_module,
                    result.ood_scores,
                    result.sets,
                    select([pl_module], result.probs, result.ood_scores, result.gates),
                ),
            )
            folder = report_folder(self.output_dir, name)
            report, images = write_report(evaluation, folder, settings, pl_module, predictions=True)
            for figure_name, image in images.items():
                tag = f"{set_prefix(name)}/{figure_name}"
                log_figure(trainer, tag, image, folder / f"{figure_name}.png", trainer.global_step)
            if report:
                self.reports[name] = report
                log.info("%s report (%s):\n%s", name, shown(folder), summary_text(report))
        if len(self.reports) > 1 or any(m["leak_free"] for m in self.reports.values()):
            log.info("all evaluated sets, all images and leak-free:\n%s", side_by_side(self.reports))
