"""Two servers never write one job: a lease on the job's state location, with a short TTL.

The lease is one object, `lease.json`, beside the job's state: who holds it (host, pid,
address once serving), its TTL and a renewal count. It is taken with a conditional create
(`If-None-Match: *`), renewed every TTL/3 with a conditional write on the ETag the holder
last wrote (`If-Match`), and deleted on a clean stop, so the next server starts at once.

**Taking over.** A server that finds the lease held watches it. When it changes (the holder
renewed it), the holder is alive: the start is refused, naming it. When it stays unchanged
for longer than its TTL (on the store's own clock: the response's Date minus the object's
Last-Modified, so no two hosts' clocks are compared; and on this server's monotonic clock
since it first saw it), the holder is gone (a kill -9, a lost host): the server takes it over
with a conditional write on the ETag it watched, and says so.

**Fencing.** The holder writes state only while its last successful renewal is younger than
two thirds of the TTL (measured from when that renewal was sent), so it has stopped writing
a third of a TTL before anyone may take over. A renewal that finds the lease changed (taken
over after this server stalled past its TTL) marks it lost: every later write is refused and
`on_lost` is called (the server stops).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from croupier.errors import ConfigError
from croupier.server.durability.object_store import ObjectStoreLocation, Precondition, Stored

__all__ = ["DEFAULT_TTL_S", "LEASE_NAME", "Lease", "LeaseHeld"]

LEASE_NAME = "lease.json"
DEFAULT_TTL_S = 15.0
MIN_TTL_S = 1.0
MAX_TTL_S = 300.0
CLOCK_SLACK_S = 1.0
"""Added to a lease's TTL before it counts as expired (Last-Modified has one-second granularity)."""

log = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """Another server holds the job's state location and is alive."""


def describe(info: dict[str, Any]) -> str:
    """'pid 123 on host h (serving at a:p)' for a lease's holder."""
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    if info.get("address"):
        text += f" (serving at {info['address']})"
    return text


class Lease:
    """This server's lease on `location` (see the module docstring)."""

    def __init__(self, location: ObjectStoreLocation, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ConfigError(f"--lease-ttl must be in [{MIN_TTL_S:g}, {MAX_TTL_S:g}] seconds, got {ttl_s!r}")
        self.location = location
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self.info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "ttl_s": self.ttl_s,
                                     "renewals": 0, "address": ""}
        self._etag: str | None = None
        self._valid_until = 0.0
        self.lost = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.location.url}/{LEASE_NAME}"

    # -- taking it --------------------------------------------------------------------------------
    def acquire(self, poll_s: float | None = None) -> dict[str, Any] | None:
        """Takes the lease; returns the holder it took over from (None when it was free).
        LeaseHeld when a live server holds it; OSError when the store cannot be reached."""
        poll = poll_s if poll_s is not None else min(0.5, self.ttl_s / 10)
        seen: Stored | None = None
        seen_at = 0.0
        while True:
            sent = self._clock()
            cur = self.location.get(LEASE_NAME)
            if cur is None:
                try:
                    self._take(sent, if_absent=True)
                    return None
                except Precondition:
                    continue  # another server created it just now: watch that one
            holder = _parse(cur.data)
            if seen is not None and cur.etag != seen.etag:
                raise LeaseHeld(f"the job at {self.location.url} is held by {describe(holder)}: it renewed its "
                                f"lease while this server waited, so it is alive; stop it first, or give another "
                                f"--state-dir")
            if seen is None:
                seen, seen_at = cur, self._clock()
                log.warning("waiting for the lease on the job's state to expire",
                            extra={"event": "lease_wait", "lease": self.where, "holder": describe(holder),
                                   "ttl_s": holder.get("ttl_s"), "age_s": cur.age_s})
            ttl = _ttl_of(holder)
            if (cur.age_s is not None and cur.age_s > ttl + CLOCK_SLACK_S) \
                    or self._clock() - seen_at > ttl + CLOCK_SLACK_S:
                try:
                    self._take(sent, if_match=cur.etag)
                except Precondition:
                    continue  # changed under us: the next read decides who holds it
                log.warning("took over the job from a server whose lease expired",
                            extra={"event": "lease_takeover", "lease": self.where, "previous": describe(holder),
                                   "age_s": cur.age_s})
                return holder
            time.sleep(poll)

    def _take(self, sent: float, *, if_absent: bool = False, if_match: str | None = None) -> None:
        self.info["renewals"] = 0
        self._etag = self.location.put(LEASE_NAME, self._encode(), if_absent=if_absent, if_match=if_match)
        self._valid_until = sent + self.ttl_s * 2 / 3

    def _encode(self) -> bytes:
        return json.dumps(dict(self.info, renewed_unix=time.time())).encode()

    # -- holding it -------------------------------------------------------------------------------
    def set_address(self, address: str) -> None:
        """Names the address this server serves at in the lease (written at once, by a renewal)."""
        self.info["address"] = address
        self.renew()

    def renew(self) -> bool:
        """One renewal; False when it failed (the store unreachable, or the lease lost)."""
        with self._lock:
            if self.lost or self._etag is None:
                return False
            sent = self._clock()
            self.info["renewals"] += 1
            try:
                self._etag = self.location.put(LEASE_NAME, self._encode(), if_match=self._etag)
            except Precondition:
                try:
                    cur = self.location.get(LEASE_NAME)
                    holder = describe(_parse(cur.data)) if cur is not None else "nobody (the lease was deleted)"
                except OSError:
                    holder = "another server"
                self.lost = f"the lease {self.where} was taken over by {holder}"
                log.critical("lease lost: this server stops writing the job's state",
                             extra={"event": "lease_lost", "lease": self.where, "holder": holder})
                return False
            except OSError as exc:
                log.warning("lease renewal failed; retrying", extra={"event": "lease_renew_failed",
                                                                     "lease": self.where, "reason": str(exc)})
                return False
            self._valid_until = sent + self.ttl_s * 2 / 3
            return True

    def check(self) -> None:
        """Raises OSError (ENOLCK) unless this server may write the job's state now."""
        if self.lost:
            raise OSError(errno.ENOLCK, self.lost)
        left = self._valid_until - self._clock()
        if self._etag is None or left <= 0:
            raise OSError(errno.ENOLCK, f"the lease {self.where} was not renewed within two thirds of its "
                                        f"{self.ttl_s:g} s TTL: writes wait for the next renewal")

    def start(self, on_lost: Callable[[str], None]) -> None:
        """Renews every TTL/3 in a daemon thread (every second while renewals fail); calls
        `on_lost` once if the lease is taken over."""
        def loop() -> None:
            wait = self.ttl_s / 3
            while not self._stop.wait(wait):
                ok = self.renew()
                if self.lost:
                    on_lost(self.lost)
                    return
                wait = self.ttl_s / 3 if ok else min(1.0, self.ttl_s / 6)

        self._thread = threading.Thread(target=loop, name="croupier-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops renewing and deletes the lease (a clean stop: the next server starts at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            if self._etag is None or self.lost:
                return
            try:
                self.location.delete(LEASE_NAME, if_match=self._etag)
            except (Precondition, OSError) as exc:
                log.warning("could not release the lease", extra={"event": "lease_release_failed",
                                                                  "lease": self.where, "reason": str(exc)})
            self._etag = None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _ttl_of(holder: dict[str, Any]) -> float:
    """The holder's own TTL (an unreadable lease counts with the longest one allowed)."""
    ttl = holder.get("ttl_s")
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and MIN_TTL_S <= ttl <= MAX_TTL_S:
        return float(ttl)
    return MAX_TTL_S
