"""How many cores this process may use, and a bounded thread map for reading and decoding files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which a scheduler or container may have narrowed)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_to_cores(setting: str, workers: int) -> tuple[int, str | None]:
    """At most the cores this process may use (more worker processes only thrash: 1,000 of them once drove the load
    past 400); with the message to give when the setting was capped, None when it was not."""
    cores = available_cpus()
    if workers <= cores:
        return workers, None
    return cores, f"{setting}={workers}: this machine has {cores} cores for this run; using {cores}"


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """fn over items in threads, results in completion order, at most `window` items in flight (bounded memory).

    Stopping early (an exception, Ctrl-C) cancels what has not started, so it returns within one item's time.
    """
    window = window or 4 * workers
    iterator = iter(items)
    pool = ThreadPoolExecutor(workers)
    pending: set[Future] = set()
    try:
        for item in iterator:
            pending.add(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                item = next(iterator, _END)
                if item is not _END:
                    pending.add(pool.submit(fn, item))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
