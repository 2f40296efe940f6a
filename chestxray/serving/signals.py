"""How serve.py's processes end on SIGTERM and Ctrl-C: quietly, and in the order that answers the requests in flight.

LitServe's main process stops its children in order: the HTTP server first (uvicorn's graceful shutdown answers
what is in flight), then the inference workers, then the manager process that holds their queues. A terminal's
Ctrl-C, though, reaches every process of the group at once, and a service manager may signal them all: a worker
interrupted mid-request, or a queue manager gone first, made the others fail with a traceback each. So, while the
main process lives, a child leaves the group's SIGINT (and the queue manager any signal) to it; otherwise it ends
at once with exit code 0 and no traceback.
"""

from __future__ import annotations

import os
import signal

_PARENT: list[int] = []  # the pid of the process that started this one


def _on_stop(signum, frame) -> None:
    import multiprocessing

    parent_alive = bool(_PARENT) and os.getppid() == _PARENT[0]
    manager = "Manager" in multiprocessing.current_process().name
    if parent_alive and (signum == signal.SIGINT or manager):
        return  # the main process stops this one in its turn
    raise SystemExit(0)


def quiet_child() -> None:
    """In a child of serve.py's main process (forked: the HTTP server and the queue manager; spawned: the inference
    workers, from their setup): SIGTERM and SIGINT handled as the module says."""
    _PARENT[:] = [os.getppid()]
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
