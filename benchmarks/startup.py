"""Where a short training run's seconds go: from `python train.py` to the first step, and from the last epoch to exit.

    python benchmarks/startup.py [--trainer cpu|gpu] [--data DIR] [--image-size 224] [--epochs 2] [--repeats 2]

Runs train.py as a user would (a fresh process) with a clock callback that notes when the model is built, the
data set up (decoded, checked for leakage), the first training step starts, the last epoch ends and the test
report is written; the parent notes the process start and exit. Medians of the repeats, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CHESTXRAY_DATA", str(ROOT.parent / "shared" / "data" / "covid19-image-dataset"))
MARKS = ("built", "data_ready", "first_step", "last_epoch_end", "report_written")


class Clock(L.Callback):
    """Writes wall-clock times of a run's milestones to a JSON file (used through +callbacks.clock=...)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.marks: dict[str, float] = {"built": time.time()}

    def _mark(self, name: str, first: bool = False) -> None:
        if not (first and name in self.marks):
            self.marks[name] = time.time()
            self.path.write_text(json.dumps(self.marks))

    def setup(self, trainer, pl_module, stage: str) -> None:  # after the datamodule's setup
        self._mark("data_ready", first=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._mark("first_step", first=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mark("last_epoch_end")

    def on_test_end(self, trainer, pl_module) -> None:
        self._mark("report_written")


def one_run(args, work: Path, k: int) -> dict[str, float]:
    marks_file = work / f"marks{k}.json"
    cmd = [
        sys.executable, "train.py", f"trainer={args.trainer}", f"data.data_dir={args.data}",
        f"data.image_size={args.image_size}", "model.pretrained=false", f"trainer.max_epochs={args.epochs}",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={work / f'run{k}'}",
        "+callbacks.clock._target_=benchmarks.startup.Clock", f"+callbacks.clock.path={marks_file}",
    ]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    end = time.time()
    m = json.loads(marks_file.read_text())
    return {
        "start -> model built (imports, config, VGG19)": m["built"] - start,
        "model built -> data ready (decode, leakage check)": m["data_ready"] - m["built"],
        "data ready -> first training step (sanity check, loaders)": m["first_step"] - m["data_ready"],
        "start -> first training step": m["first_step"] - start,
        "first step -> last epoch end (the epochs)": m["last_epoch_end"] - m["first_step"],
        "last epoch end -> report written (test, metrics, figures, Grad-CAM)": m["report_written"]
        - m["last_epoch_end"],
        "report written -> exit": end - m["report_written"],
        "last epoch end -> exit": end - m["last_epoch_end"],
        "whole process": end - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(args, Path(tmp), k) for k in range(args.repeats)]
    print(
        f"python train.py trainer={args.trainer}, {args.image_size} px, {args.epochs} epochs, median of {args.repeats}"
    )
    print("\n| phase | seconds |\n|---|---:|")
    for phase in runs[0]:
        print(f"| {phase} | {statistics.median(r[phase] for r in runs):.1f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
