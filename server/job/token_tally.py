"""Tokens dealt per cluster: LLM teams count tokens, not documents.

When the job's dataset (or every source of a mixture) carries per-sample token counts in its
sidecar (`shards build --tokenizer`, `shards tokens`), the job adds up, per cluster, the
tokens of every sample it generates: `status` and `report` show tokens next to draws. The
tally is exact: it travels in every checkpoint whose sampler state is the generator's own
(automatic, shutdown and online-change checkpoints), with the step it counts up to, so a
restarted server continues it; restored from any other checkpoint (a trainer's token at an
older step) it restarts at that step and says so (`since`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from croupier.errors import StateError
from croupier.server.sampling.token_stream import counts_lookup

_MAGIC = b"CRPTOKS1"


class TokenTally:
    """Per-cluster token sums of generated batches (see the module docstring).

    tokens_of: id -> token count (vectorized); cluster_of: id -> cluster index (vectorized).
    """

    def __init__(self, num_clusters: int, tokens_of: Callable[[np.ndarray], np.ndarray],
                 cluster_of: Callable[[np.ndarray], np.ndarray]) -> None:
        self.tokens = np.zeros(int(num_clusters), dtype=np.int64)
        self.since = 0
        self._tokens_of = tokens_of
        self._cluster_of = cluster_of

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size:
            self.tokens += np.bincount(self._cluster_of(ids), weights=self._tokens_of(ids),
                                       minlength=len(self.tokens)).astype(np.int64)

    def to_bytes(self, step: int) -> bytes:
        """The tally as of `step` (the generator's step when it is saved)."""
        return _MAGIC + struct.pack("<qq", int(step), self.since) + self.tokens.astype("<i8").tobytes()

    def load(self, data: bytes, state_step: int) -> None:
        """Continues a saved tally when it counts up to `state_step`; else restarts there."""
        if not data.startswith(_MAGIC) or len(data) != len(_MAGIC) + 16 + 8 * len(self.tokens):
            raise StateError("the checkpoint's token tally is damaged or counts another number of clusters")
        step, since = struct.unpack_from("<qq", data, len(_MAGIC))
        if step != state_step:
            self.restart(state_step)
            return
        self.since = int(since)
        self.tokens = np.frombuffer(data, dtype="<i8", offset=len(_MAGIC) + 16).astype(np.int64)

    def restart(self, step: int) -> None:
        self.tokens[:] = 0
        self.since = int(step)


def tokens_lookup(counts: list[tuple[int, np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
    """id -> tokens (float64, for the tally's sums) over (id offset, per-sample counts) pieces
    (one per mixture source); `token_stream.counts_lookup` as floats."""
    look = counts_lookup(counts)
    return lambda ids: look(ids).astype(np.float64)


def mixture_cluster_of(gen: object) -> Callable[[np.ndarray], np.ndarray] | None:
    """A mixture's id -> global cluster lookup (its sources' offsets and selections), also under
    steps in tokens (the token dealer's document sampler); None for a single source."""
    for g in (gen, getattr(gen, "inner", None)):
        of = getattr(g, "cluster_of_ids", None)
        if of is not None:
            return of
    return None
