"""Sending a rank's per-sample losses to the server: batched, asynchronous, never blocking.

`RankClient.report_losses(step, losses)` hands one trained step's losses (one per id of the
rank's slice, in slice order) to a `LossSender`, which returns at once. A background
thread sends whatever has accumulated every `interval_s` (or as soon as `max_batch` steps
wait) in one `ReportLoss` call. Training never waits for it: when the server is slow or
away, at most `max_pending` steps are kept and the oldest are dropped (counted); a failed
call is dropped (counted) rather than retried for long. Lost reports only reduce what the
controller learns; the sequence never depends on them.

This module was `croupier.client.loss_reporter` (an alias of the old path remains, see
`croupier.moved`), and `LossReporter` is the former name of `LossSender`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.topology import Topology

log = logging.getLogger(__name__)


def as_losses(losses: Any) -> np.ndarray:
    """A float64 vector from a tensor, array or sequence (detached, on the CPU)."""
    if hasattr(losses, "detach"):
        losses = losses.detach().to("cpu").double().numpy()
    out = np.asarray(losses, dtype=np.float64).reshape(-1)
    return out


def loss_request(job: str, topology: Topology, batch: list[tuple[int, np.ndarray, np.ndarray | None]]) -> Any:
    """The ReportLoss request of a batch of (step, losses, present) of one rank."""
    from croupier.proto import pb2

    req = pb2.ReportLossRequest(job=job, rank=topology.rank, world_size=topology.world)
    for step, losses, present in batch:
        st = req.steps.add(step=step, losses=losses.tolist())
        if present is not None:
            st.present.extend(present.tolist())
    return req


class LossSender:
    """The background sender (see the module docstring); thread-safe, fork-unaware (one per process).

    send: makes one ReportLoss call from a list of (step, losses, present) and returns the
        response (with `accepted` and `refused`); it may raise.
    """

    def __init__(self, send: Callable[[list[tuple[int, np.ndarray, np.ndarray | None]]], Any], *,
                 interval_s: float = 0.5, max_batch: int = 64, max_pending: int = 4096) -> None:
        if max_batch < 1 or max_pending < max_batch:
            raise ConfigError(f"max_batch must be >= 1 and max_pending >= max_batch, got {max_batch}, {max_pending}")
        self._send = send
        self.interval_s = float(interval_s)
        self.max_batch = int(max_batch)
        self._queue: deque[tuple[int, np.ndarray, np.ndarray | None]] = deque()
        self._max_pending = int(max_pending)
        self._cond = threading.Condition()
        self._closed = False
        self._flushing = False
        self._inflight = 0
        self.counters = {"queued": 0, "sent": 0, "accepted": 0, "refused": 0, "dropped": 0, "failed_calls": 0}
        self._refusal_rules: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="croupier-loss-sender", daemon=True)
        self._thread.start()

    def add(self, step: int, losses: Any, present: Any = None) -> None:
        """Queues one step's losses; returns at once."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}")
        values = as_losses(losses)
        mask = None if present is None else np.asarray(present, dtype=bool).reshape(-1)
        with self._cond:
            if self._closed:
                raise ConfigError("the loss sender is closed")
            self._queue.append((int(step), values, mask))
            self.counters["queued"] += 1
            while len(self._queue) > self._max_pending:
                self._queue.popleft()
                self.counters["dropped"] += 1
            if len(self._queue) >= self.max_batch:
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until everything queued so far was sent (or dropped); False on timeout."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: not self._queue and not self._inflight, timeout)
            self._flushing = False
            return done

    def close(self, timeout: float = 5.0) -> None:
        """Sends what is queued (within `timeout`) and stops the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._flushing or len(self._queue) >= self.max_batch,
                                    self.interval_s)
                if not self._queue:
                    if self._closed:
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._inflight = len(batch)
            try:
                resp = self._send(batch)
            except Exception as exc:  # noqa: BLE001 - a lost report only reduces information
                with self._cond:
                    self.counters["failed_calls"] += 1
                    self.counters["dropped"] += len(batch)
                log.warning("loss report of %d steps not delivered (dropped): %s", len(batch), exc)
            else:
                with self._cond:
                    self.counters["sent"] += len(batch)
                    self.counters["accepted"] += int(resp.accepted)
                    self.counters["refused"] += len(resp.refused)
                for r in resp.refused:
                    if r.rule not in self._refusal_rules:
                        self._refusal_rules.add(r.rule)
                        log.warning("loss report of step %d refused (%s): %s", r.step, r.rule, r.message)
            finally:
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()


LossReporter = LossSender
"""Deprecated: the former name of `LossSender` (same class)."""

__all__ = ["LossReporter", "LossSender", "as_losses", "loss_request"]
