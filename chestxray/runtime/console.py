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
