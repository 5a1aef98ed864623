"""Download threads shared by the shard caches of one process (a mixture's sources).

A rank reading a mixture holds one `ShardCache` per source; with threads of their own it
would hold `threads` per source. A `PrefetchPool` given to each of them (`prefetch_pool=`)
holds `threads` in all: each thread takes the next shard any attached cache wants (caches in
turn), under that cache's own rules (need order, cache limit), and loads it; with nothing
to do it sleeps until a cache asks again (or a short timeout, for room freed by reads).
"""

from __future__ import annotations

import threading
from typing import Protocol

from croupier.errors import ConfigError


class PoolClient(Protocol):
    """What the pool needs of a cache's per-process runtime (`ShardRuntime`)."""

    def claim_prefetch(self) -> int | None: ...

    def prefetch_load(self, s: int) -> None: ...

    def pool_load_done(self) -> None: ...


class PrefetchPool:
    """The shared download threads (see the module docstring); started on first use."""

    def __init__(self, threads: int = 4) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"prefetch pool threads must be an integer >= 1, got {threads!r}")
        self.size = threads
        self._cond = threading.Condition()
        self._runtimes: list[PoolClient] = []
        self._threads: list[threading.Thread] = []
        self._turn = 0
        self._wanted = False
        self._closed = False

    def attach(self, rt: PoolClient) -> None:
        """A cache has shards to prefetch (idempotent); starts the threads on first use."""
        with self._cond:
            if rt not in self._runtimes:
                self._runtimes.append(rt)
            while len(self._threads) < self.size and not self._closed:
                t = threading.Thread(target=self._worker, name=f"croupier-prefetch-pool-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
            self._wanted = True
            self._cond.notify_all()

    def detach(self, rt: PoolClient) -> None:
        with self._cond:
            if rt in self._runtimes:
                self._runtimes.remove(rt)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _take(self) -> tuple[PoolClient, int] | None:
        with self._cond:
            rts = list(self._runtimes)
            self._turn += 1
        for i in range(len(rts)):
            rt = rts[(self._turn + i) % len(rts)]
            s = rt.claim_prefetch()
            if s is not None:
                return rt, s
        return None

    def _worker(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            job = self._take()
            if job is None:
                with self._cond:
                    if not self._wanted and not self._closed:
                        self._cond.wait(0.05)
                    self._wanted = False
                continue
            rt, s = job
            try:
                rt.prefetch_load(s)
            finally:
                rt.pool_load_done()


__all__ = ["PoolClient", "PrefetchPool"]
