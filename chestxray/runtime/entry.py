"""How train.py, predict.py (and serve.py) run their work: in the run folder they hold, with one-line refusals
(exit 2) and the shells' exit codes on SIGTERM and Ctrl-C."""

from __future__ import annotations

import logging
import sys

from chestxray.errors import UserError
from chestxray.runtime.console import REFUSED, to_log_files
from chestxray.runtime.folders import claim, discard_if_empty
from chestxray.runtime.interrupt import run_until_signal


def run_entry_point(program: str, work, run_folder: str, stopped: str, fresh_folder: bool = True):
    """Run an entry point's work in its run folder, which it holds for the run: a UserError is one line on stderr
    and in the run's log, exit status 2, and a run refused before any work leaves only that log; SIGTERM and Ctrl-C
    stop it with 143 and 130 (chestxray.runtime.interrupt). In a sweep, a refused job fails alone: it returns NaN (what
    Optuna counts as a failed trial) rather than raising, because Hydra's sweeper would then stop after the batch
    without calling the callback that writes the sweep's summary; that summary names the refused jobs, and the
    sweep exits 2."""
    from chestxray import STARTED

    claimed = False
    try:
        with claim(run_folder, resuming=not fresh_folder):
            claimed = True
            return run_until_signal(program, work, stopped)
    except UserError as err:
        message = f"{program}{REFUSED}{type(err).__name__}: {err}"
        print(message, file=sys.stderr, flush=True)
        to_log_files(message, logging.ERROR)
        if fresh_folder and claimed:  # never touch a folder this run was refused (another run's)
            discard_if_empty(run_folder, STARTED)
        if _in_a_sweep():  # the job fails alone: the sweep goes on, and its summary names it (chestxray.summary)
            return float("nan")
        sys.exit(2)


def _in_a_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
