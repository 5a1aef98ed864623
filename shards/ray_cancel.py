"""Stopping a Ray stage's outstanding tasks when the driver stops early.

A stage's driver that stops early (an error, Ctrl-C, a build's interrupt) cancels the tasks it
still waits for. Ray's default cancel raises KeyboardInterrupt inside a running task, and a
task interrupted in the middle of an import (the first `from streaming import MDSWriter` in a
worker imports transformers and torch, seconds of work) leaves half-initialised modules in
that worker's `sys.modules`; Ray reuses the worker, and the next task there fails with
`ImportError: cannot import name ...`. So running tasks are force-cancelled: Ray ends the
worker process and starts a fresh one for later tasks. Each task writes its output afresh
(clearing leftovers first), so nothing a killed task half-wrote is reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def cancel_tasks(refs: Iterable[Any]) -> None:
    """Cancels the tasks behind `refs`; running ones end with their worker process."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - a task that finished meanwhile needs no cancel
            pass
