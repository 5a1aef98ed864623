"""What a simulated consumer has received, stamped on arrival by a background reader task.

A trainer's `RankClient` reads its stream on a background thread and queues slices ahead of
the training loop; the loop waits only when the slice it wants has not arrived yet. The
benchmarks' simulated consumers do the same: one reader task per consumer drains its stream
into a `StepInbox` as messages arrive, and the consumer's wait for step t is how long after
wanting t its slice arrived (zero when it was already there). Reading the stream only when a
step falls due would instead charge the client process's own scheduling (hundreds of
simulated consumers waking on one shared clock) to the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable


class StepInbox:
    """Steps received so far, each with the wall time its slice arrived."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self._event = asyncio.Event()
        self._failed: BaseException | None = None

    def add(self, steps: Iterable[int]) -> None:
        """Records the steps of one received message (the first arrival of a step counts)."""
        now = time.time()
        for s in steps:
            self.arrived.setdefault(s, now)
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        """The reader gave up: a consumer waiting on the inbox gets `exc`."""
        self._failed = exc
        self._event.set()

    async def wait(self, step: int, want: float) -> float:
        """Seconds the consumer, wanting `step` at wall time `want`, waited for its slice."""
        while step not in self.arrived:
            if self._failed is not None:
                raise self._failed
            self._event.clear()
            await self._event.wait()
        return max(0.0, self.arrived.pop(step) - want)

