"""Stopping on SIGTERM and Ctrl-C within seconds, with the exit status shells use (143 and 130).

SIGTERM is what `timeout`, schedulers and container runtimes send. Python turns Ctrl-C (SIGINT) into
KeyboardInterrupt; this module makes SIGTERM do the same, so both stop the work at the next Python instruction
(a training step, a predicted batch, a decoded file) through the handling Lightning already has for Ctrl-C:
callbacks see the exception, loggers are finalised, and `last.ckpt` of the last finished epoch stays as it was.
Lightning then calls sys.exit(1); the entry points turn that into 128 + the signal's number.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from chestxray.runtime.console import to_log_files


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives."""


_received: list[int] = []


def received() -> int | None:
    """The signal that stopped the work, if one did."""
    return _received[-1] if _received else None


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
    raise Terminated(f"received signal {signum}")


def _on_sigint(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt (Terminated for SIGTERM) in the main thread."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _received.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_until_signal(program: str, work: Callable[[], object], stopped: str) -> object:
    """Run work(); on SIGTERM or Ctrl-C print one line ('<program>: stopped by SIGTERM: <stopped>') and exit 128+N."""
    with stop_on_signals():
        try:
            return work()
        except (KeyboardInterrupt, SystemExit):
            signum = received()
            if signum is None:  # an exit of its own (a usage error), not a signal
                raise
            exit_for_signal(program, signum, stopped)


def exit_for_signal(program: str, signum: int, stopped: str) -> NoReturn:
    """Say what stopped the run and what to do next, on stderr and in the run's log; exit 128 + the signal."""
    message = f"{program}: stopped by {signal.Signals(signum).name}: {stopped}"
    print(message, file=sys.stderr, flush=True)
    to_log_files(message, logging.WARNING)
    sys.exit(128 + signum)
