"""One line per message on the console: what Lightning prints, through Hydra's logging, without the noise."""

from __future__ import annotations

import logging
import warnings


class _NoProductTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


REFUSED = ": error: "  # in every refusal line, "<program>: error: <Type>: <message>" (chestxray.summary finds them)


def tidy_lightning_output() -> None:
    """Lightning's package logger has a console handler of its own and also passes every record on to the root
    logger, which Hydra prints (and writes to the run's log file): each INFO line came out twice. Keep Hydra's.
    Also drop Lightning's tips about other products, and a deprecation warning about Lightning's own code
    (torch's pytree API) that says nothing about the user's run."""
    package = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(package.handlers):
            package.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoProductTips) for f in logger.filters):
            logger.addFilter(_NoProductTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def to_log_files(text: str, level: int = logging.INFO) -> None:
    """Write text into the run's log file(s) (Hydra's file handler), not to the console: for what is printed plainly
    on stdout or stderr and also belongs in the run's log."""
    record = logging.LogRecord("chestxray", level, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def shown(path) -> str:
    """A path as a person would type it here: relative to the working folder when it is inside it (logs and
    printouts pasted elsewhere do not carry this machine's absolute paths), else as it is."""
    import os

    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def say(text: str) -> None:
    """Print text on stdout as it is (answers, reports) and keep it in the run's log."""
    print(text, flush=True)
    to_log_files(text)


def run_entry_point(program: str, work, run_folder: str, stopped: str, fresh_folder: bool = True):
    """Run an entry point's work in its run folder, which it holds for the run: a UserError is one line on stderr
    and in the run's log, exit status 2, and a run refused before any work leaves only that log; SIGTERM and Ctrl-C
    stop it with 143 and 130 (chestxray.interrupt). In a sweep, a refused job fails alone: it returns NaN (what
    Optuna counts as a failed trial) rather than raising, because Hydra's sweeper would then stop after the batch
    without calling the callback that writes the sweep's summary; that summary names the refused jobs, and the
    sweep exits 2."""
    import sys

    from chestxray import STARTED
    from chestxray.errors import UserError
    from chestxray.interrupt import run_until_signal
    from chestxray.runs import claim, discard_if_empty

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
