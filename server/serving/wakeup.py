"""Waking a waiting stream coroutine: from any thread, with a timeout, cheaply.

Every open stream of the server waits between messages, thousands of times a second across a
large job. Most of those waits carry a long, liveness-only timeout (re-check flow control
every few seconds). Arming an asyncio timer for each (`call_later`, then `cancel` when the
stream is woken long before it fires) costs a heap entry, a handle object and their cleanup
per wait. `CoarseTimers` instead keeps long waits in one table that the server's once-a-second
ticker sweeps: a dict insert and delete per wait, and a long wait may run up to one sweep
interval past its timeout. Short timeouts (a held confirmation, a call's deadline) keep a
precise timer.
"""

from __future__ import annotations

import asyncio
import threading

COARSE_MIN_S = 1.0
"""Waits at least this long use the shared sweep instead of a timer of their own."""


class CoarseTimers:
    """Long waits of one event loop, woken by `fire` (called periodically on the loop)."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due: dict[Wakeup, float] = {}

    def fire(self, now: float) -> int:
        """Wakes every wait whose deadline has passed; returns how many."""
        late = [w for w, t in self.due.items() if t <= now]
        for w in late:
            del self.due[w]
            w._set()
        return len(late)


class Wakeup:
    """Wakes one waiting coroutine from any thread (directly on the loop's own thread, through
    call_soon_threadsafe from others). A wake-up between `arm()` and `wait()` is not lost."""

    __slots__ = ("loop", "thread", "fut", "flag", "timers")

    def __init__(self, loop: asyncio.AbstractEventLoop, timers: CoarseTimers | None = None) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.fut: asyncio.Future | None = None
        self.flag = False
        self.timers = timers

    def __call__(self) -> None:
        if threading.get_ident() == self.thread:
            self._set()
        else:
            self.loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        self.flag = True
        f = self.fut
        if f is not None and not f.done():
            f.set_result(None)

    def arm(self) -> None:
        self.flag = False

    async def wait(self, timeout: float) -> None:
        """Returns when woken, or about `timeout` seconds later (up to a sweep later for long
        waits on shared timers)."""
        if self.flag:
            return
        self.fut = f = self.loop.create_future()
        timers = self.timers
        if timers is not None and timeout >= COARSE_MIN_S:
            timers.due[self] = self.loop.time() + timeout
            try:
                await f
            finally:
                timers.due.pop(self, None)
                self.fut = None
            return
        timer = self.loop.call_later(timeout, self._set)
        try:
            await f
        finally:
            timer.cancel()
            self.fut = None
