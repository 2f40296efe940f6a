"""Run folders: one per run, never shared, and nothing left behind by a run that was refused before it did any work.

- `outputs/<task>/runs/<time>` (and a sweep's `outputs/<task>/multiruns/<time>`) is created exclusively when Hydra
  resolves it: a second run started in the same second gets `<time>_2`, and so on (conf/hydra/default.yaml).
- A folder given by hand (hydra.run.dir=PATH) that already holds a run is refused, unless it is resumed; while a run
  works in its folder it holds the folder's lock, so a second run started into it at the same time is refused too.
- A run refused before its first checkpoint (a bad setting, missing data or weights) leaves only its log, which says
  why.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only

from chestxray.errors import OutputDirError
from chestxray.runtime.files import numbered

log = logging.getLogger(__name__)

LOCK = ".run.lock"
# What a run leaves in its folder once it has done work: another run must not write here.
RUN_MARKERS = ("checkpoints", "results.json", "predictions.csv", "metrics.json")


def new_folder(base: str) -> str:
    """`base` created now, or `base_2`, `base_3`... if another run took it first (mkdir is the atomic claim)."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for candidate in numbered(base):
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def run_dir(resume: str | None, base: str) -> str:
    """hydra.run.dir: the resumed run's own folder, else a new one (also for a resume= that names no folder, or the
    folder of another command's run: its refusal is logged in a new folder instead of in that one)."""
    ours = resume and Path(resume).is_dir() and job_of(resume) in ("train", None)
    return str(resume) if ours else new_folder(base)


def job_of(folder: str | Path) -> str | None:
    """The command whose run a Hydra run folder holds (hydra.job.name in its .hydra/hydra.yaml: train, predict,
    adapt...; whatever task_name says, debug runs included); None where it says none."""
    try:
        saved = yaml.safe_load((Path(folder) / ".hydra" / "hydra.yaml").read_text())
        job = saved["hydra"]["job"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return str(job) if job else None


def hydra_subdir(resume: str | None, output_dir: str) -> str | None:
    """hydra.output_subdir: none for a resumed run (chestxray.training.resume writes its merged settings) and none for a
    folder that already holds a run (whose saved settings must stay as they are: the run is refused)."""
    return None if resume or holds_a_run(output_dir) else ".hydra"


@contextlib.contextmanager
def claim(folder: str | Path, resuming: bool, setting: str = "hydra.run.dir") -> Iterator[None]:
    """Hold the run folder for the length of the run; refuse a folder that holds another run (unless resuming) or
    that another process is working in. Ranks other than 0 of a DDP run share rank 0's folder."""
    folder = Path(folder)
    if rank_zero_only.rank != 0:
        yield
        return
    if not resuming:
        done = [m for m in RUN_MARKERS if (folder / m).exists()]
        if done:
            raise OutputDirError(
                f"{setting}={folder} already holds a run ({', '.join(done)}): pick another folder, or continue that "
                f"run with resume={folder}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirError(f"{setting}={folder}: another run is working in this folder right now") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK)


ARTEFACTS = (".hydra", "tensorboard", "csv", "mlflow.json", "samples.png", "leakage.json", LOCK)


def discard_if_empty(folder: str | Path, started: float) -> None:
    """After a refusal: if the run wrote no checkpoint or report, remove what it set up (Hydra's .hydra/, logger
    folders, the first figures): only those names, and only if this process made or changed them (at or after
    `started`), so that a folder given by hand (hydra.run.dir=.) loses nothing else. The log, which says why the run
    was refused, stays."""
    folder = Path(folder)
    if rank_zero_only.rank != 0 or not folder.is_dir() or holds_a_run(folder):
        return
    for name in ARTEFACTS:
        entry = folder / name
        try:
            if entry.stat().st_mtime < started:
                continue
        except OSError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def holds_a_run(folder: str | Path) -> bool:
    return any((Path(folder) / m).exists() for m in RUN_MARKERS)
