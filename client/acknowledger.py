"""A rank's consumed position and its acknowledgements to the server.

The consumer takes steps; the server needs to know how far it got (flow control holds fast
ranks near slow ones, and a restarted server learns where the rank is). Acknowledging every
step would cost the server a message per step per rank, so acknowledgements are batched:
one after `every` consumed steps, one every `interval_s` while the consumed position is ahead
of what the server confirmed, and a heartbeat every `heartbeat_s` while nothing new was
consumed (a trainer in a long evaluation stays live). They travel in-band on the open lane
(`LaneCall.ack`), off the consumer's path (a thread runs `run`); the server confirms each as
a lane event (`confirm`). Re-sending is harmless: an acknowledgement is idempotent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from croupier.client.transport import LaneCall


class Acknowledger:
    """The consumed position of one `RankClient` and when it is acknowledged (see the module
    docstring). Thread-safe: the consumer, the stream thread and the ack thread share it."""

    def __init__(self, every: int, interval_s: float, heartbeat_s: float) -> None:
        self.every = int(every)
        self.interval_s = float(interval_s)
        self.heartbeat_s = float(heartbeat_s)
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._next: int | None = None  # next step the consumer will train on
        self._acked = -1  # last acknowledgement the server confirmed
        self._pending = 0  # steps consumed since then
        self._sent_at = time.monotonic()

    @property
    def next_step(self) -> int | None:
        """The next step the consumer will train on (None before the rank knows where it starts)."""
        return self._next

    def start_at(self, step: int | None) -> None:
        """The consumer (re)starts at `step` (join, plan, a loaded state)."""
        self._next = step

    def consumed(self, step: int) -> None:
        """The consumer took `step`; an acknowledgement is due after `every` of them."""
        with self._lock:
            self._next = step + 1
            self._pending += 1
            if self._pending >= self.every:
                self._due.set()

    def position(self) -> int | None:
        """The consumed position to (re-)send: the next step the consumer will train on."""
        with self._lock:
            return self._next

    def send(self, call: LaneCall | None, force: bool = False) -> None:
        """Acknowledges the consumed position on `call` when it moved past the confirmed one (or
        `force`); without an open lane nothing is sent: the next (re)connect carries it."""
        with self._lock:
            position = self._next
            if position is None or (position <= self._acked and not force):
                return
        if call is not None and call.ack(position):
            with self._lock:
                self._sent_at = time.monotonic()

    def confirm(self, position: int) -> None:
        """The server confirmed an acknowledgement of `position`."""
        with self._lock:
            if position > self._acked:
                self._acked = position
            self._pending = 0 if self._next is None or self._next <= self._acked else self._pending
            self._sent_at = time.monotonic()

    def wake(self) -> None:
        """Ends `run`'s current wait (at close)."""
        self._due.set()

    def run(self, closed: threading.Event, send: Callable[[bool], None]) -> None:
        """The ack thread: `send(force)` when `every` steps were consumed, every `interval_s`,
        forced as a heartbeat every `heartbeat_s`; returns once `closed` is set."""
        while not closed.is_set():
            self._due.wait(min(self.interval_s, self.heartbeat_s))
            self._due.clear()
            if closed.is_set():
                return
            send(time.monotonic() - self._sent_at >= self.heartbeat_s)


__all__ = ["Acknowledger"]
