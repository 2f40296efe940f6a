"""One line per message on the console: what Lightning prints, through Hydra's logging, without the noise."""

from __future__ import annotations

import logging
import warnings


class _NoProductTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


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
