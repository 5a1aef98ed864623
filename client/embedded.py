"""Embedded dealing: every rank computes the global sequence itself, with no server.

The sequence is a pure function of (dataset or mixture, selection, policy, global batch,
seed) until an online change arrives, so a rank can run the very sampler `croupier serve`
runs (`server.sampling`) and cut its own slice of every step (`Topology.slice`). What it
yields is what `croupier serve` with the same flags deals that rank: the golden vectors pin
both. `EmbeddedJob` is the job's configuration (what `serve` is told); `EmbeddedDealer` is
one reader's lane of it, with the duck interface of `RankClient` that
`CroupierIterableDataset` reads through (join, next_step, plan, next_slice, close).

Each dealer computes every step of the sequence (a DataLoader worker reading every N-th step
still computes the steps between), keeps the sampler state of its position (a resume costs
O(clusters), not a replay), and runs a second sampler up to `lookahead` lane steps ahead to
name the shards to prefetch.

What needs a running job is not here: online changes (`croupier update`), loss feedback
(`serve --adapt`), central status and the node agent's shared cache. A multi-node job may
run embedded (every rank computes the same sequence); move to the server when the sequence
must change while the job runs.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.proto import pb2
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import SamplerState
from croupier.server.sampling.token_stream import (
    TokenDealer,
    TokenSchedule,
    TokenStep,
    mean_stream_tokens,
    plan_tokens,
)
from croupier.topology import Topology

log = logging.getLogger(__name__)

__all__ = ["EmbeddedDealer", "EmbeddedJob", "SERVER_ONLY"]

SERVER_ONLY = ("online changes (croupier update), loss feedback (serve --adapt) and server checkpoints need a "
               "running job: start `croupier serve` with the same configuration and read from it")
"""Why a request is refused in embedded mode, and the way to get it."""

REPLAY_NOTICE_STEPS = 10_000
"""A start this many steps past the nearest saved state is logged (it replays the steps)."""


@dataclass(frozen=True, eq=False)
class EmbeddedJob:
    """The configuration of an embedded job: what `croupier serve` would be given.

    dataset: a dataset folder or `s3://` URL with a cluster sidecar (or None with `mix`).
    mix: a mixture file (the TOML of `serve --mix`); the file fixes policies per source.
    selection: a named selection of the dataset to draw from.
    policy: the sampling policy (None with `mix`).
    remote: where shards are read from (None: where `serve` would say).
    sidecar_cache: where a remote dataset's sidecar is cached (None: a temporary folder).
    """

    dataset: str | None
    mix: str | None
    selection: str | None
    policy: PolicyConfig | None
    global_batch: int
    seed: int
    remote: str | None = None
    sidecar_cache: str | None = None
    tokens: TokenSchedule | None = None  # steps in tokens (`server.sampling.token_stream`); None: documents
    doc_chunk: int | None = None  # with tokens: documents per draw (None: about one step's worth)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.mix is None):
            raise ConfigError("embedded dealing needs a dataset or mix=, exactly one")
        if self.mix is not None and (self.policy is not None or self.selection):
            raise ConfigError(f"mix={self.mix!r}: the mixture file fixes the sources and their policies; "
                              "pass no policy or selection beside it")
        if self.dataset is not None and self.policy is None:
            raise ConfigError("embedded dealing over a dataset needs a policy")

    def open(self) -> EmbeddedSequence:
        """Opens the dataset (or the mixture's) sidecars: the job's sampler factory and its JobInfo."""
        cache = Path(self.sidecar_cache) if self.sidecar_cache else None
        if self.mix is not None:
            from croupier.mixture import load_mix

            # deferred: a source's shard index is checked by the shard store that first reads it
            if cache is None:
                with tempfile.TemporaryDirectory(prefix="croupier-mix-") as tmp:
                    mixture = load_mix(self.mix, Path(tmp), deferred=True)
            else:
                mixture = load_mix(self.mix, cache, deferred=True)
            if self.remote:
                raise ConfigError(f"remote={self.remote!r} names one dataset, but {self.mix} is a mixture of "
                                  f"{len(mixture.infos)} sources, each read from its own remote")
            if self.tokens is not None:
                pieces = mixture.token_counts_by_offset()
                if pieces is None:
                    raise ConfigError(f"mix={self.mix!r}: steps in tokens need per-sample token counts in every "
                                      "source's sidecar")
                mean = float(np.mean([mean_stream_tokens(c, lay.ids_at(np.arange(lay.num_positions)))
                                      for (_, c), lay in zip(pieces, mixture.layouts)]))
                chunk, _ = plan_tokens(self.tokens, mean, self.doc_chunk, None)
                schedule = self.tokens
                return EmbeddedSequence(lambda: TokenDealer(lambda: mixture_sampler(mixture, chunk, self.seed),
                                                            pieces, schedule, chunk), self._mix_info(mixture))
            return EmbeddedSequence(lambda: mixture_sampler(mixture, self.global_batch, self.seed),
                                    self._mix_info(mixture))
        from croupier.datasets import open_dataset, read_location

        assert self.dataset is not None and self.policy is not None  # checked at construction
        side = open_dataset(self.dataset, cache)
        layout = side.layout(self.selection or None)
        policy = self.policy
        info = pb2.JobInfo(job="embedded", dataset_remote=read_location(self.dataset, side, self.remote),
                           dataset_fingerprint=side.fingerprint, global_batch=self.global_batch,
                           policy=policy.policy, policy_json=policy.canonical_json(), seed=self.seed,
                           num_samples=layout.num_samples, num_clusters=layout.num_clusters,
                           selection=self.selection or "")
        if self.tokens is not None:
            counts = side.token_counts()
            if counts is None:
                raise ConfigError(f"{self.dataset} has no per-sample token counts for steps in tokens: build with "
                                  "--tokenizer, or run `croupier shards tokens` on it")
            mean = mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions)))
            chunk, planned = plan_tokens(self.tokens, mean, self.doc_chunk, policy)
            doc_policy = policy if planned is None else planned
            schedule = self.tokens
            return EmbeddedSequence(lambda: TokenDealer(lambda: Sampler(layout, doc_policy, chunk, self.seed),
                                                        [(0, counts)], schedule, chunk), info)
        return EmbeddedSequence(lambda: Sampler(layout, policy, self.global_batch, self.seed), info)

    def _mix_info(self, mixture: Any) -> pb2.JobInfo:
        """The JobInfo `serve --mix` sends for this mixture (sources in file order)."""
        first = mixture.infos[0]
        info = pb2.JobInfo(job="embedded", global_batch=self.global_batch, seed=self.seed,
                           policy="mixture", num_samples=mixture.num_samples)
        if mixture.single:
            info.dataset_remote, info.dataset_fingerprint, info.selection = first.remote, first.fingerprint, \
                first.selection
        for src in mixture.infos:
            info.sources.add(name=src.name, remote=src.remote, fingerprint=src.fingerprint, offset=src.offset,
                             size=src.size, selection=src.selection, num_clusters=src.num_clusters,
                             weight=src.weight, policy=src.policy, exhausted_at=-1)
        return info


Generator = Sampler | MixSampler | TokenDealer


class EmbeddedSequence:
    """An opened embedded job: new samplers of its sequence, and its JobInfo."""

    def __init__(self, new_sampler: Callable[[], Generator], info: pb2.JobInfo) -> None:
        self.new_sampler = new_sampler
        probe = new_sampler()
        self.fingerprint = probe.fingerprint
        self.num_clusters = probe.layout.num_clusters
        info.sampler_fingerprint = self.fingerprint
        if not info.num_clusters:
            info.num_clusters = self.num_clusters
        self.info = info

    def sampler_at(self, step: int, state: SamplerState | None) -> Generator:
        """A sampler before `step`: from `state` (a state of this sequence at or before it) or
        from step 0, computing the steps between."""
        sampler = self.new_sampler()
        if state is not None:
            if state.fingerprint != self.fingerprint:
                raise FingerprintMismatch("sampler state", expected=self.fingerprint, got=state.fingerprint)
            if state.step > step:
                raise StateError(f"the saved sampler state is at step {state.step}, past the start step {step}")
            sampler.load_state(state)
        if step - sampler.step >= REPLAY_NOTICE_STEPS:
            log.info("embedded dealing computes %d steps to reach step %d (no saved sampler state near it)",
                     step - sampler.step, step)
        while sampler.step < step:
            sampler.next_batch()  # EndOfData here: the start is past the end; next_slice says so
        return sampler


class EmbeddedDealer:
    """One reader's lane of an embedded job: this rank's slices of steps first, first +
    stride, ... (DataLoader worker w of N: stride N), in the interface of `RankClient`.

    One sampler generates the sequence up to `lookahead` lane steps ahead of the consumer,
    naming each slice's shards to `on_slice` as it is dealt (prefetch); the slices wait in a
    queue. The sampler state of the consumer's position comes from a second sampler that
    catches up only when it is asked for (`state_before`), so a reader that never saves its
    state deals each step once, and one that saves every step deals it twice.

    state: a sampler state at or before the first step to read (None: compute from step 0).
    start_step: where an unplanned reader starts (the state's step, else 0).
    """

    agent = ""
    read_only = False

    def __init__(self, job: EmbeddedJob, topology: Topology, *, lookahead: int = 64,
                 state: SamplerState | None = None, start_step: int | None = None) -> None:
        if lookahead < 0:
            raise ConfigError(f"lookahead must be >= 0, got {lookahead}")
        self.job = job
        self.topology = topology
        self.lookahead = int(lookahead)
        self._state = state
        self._start = start_step if start_step is not None else (0 if state is None else int(state.step))
        self._seq: EmbeddedSequence | None = None
        self._gen: Generator | None = None  # the sequence, dealt ahead of the consumer
        self._gen_end: int | None = None  # the end of data, once the generator met it
        self._ahead: deque[tuple[int, np.ndarray, list | None]] = deque()  # lane slices dealt, not yet consumed
        self.last_spans: list[tuple[int, int, int]] | None = None  # tokens: (start, end, length) per document
        self._tracker: Generator | None = None  # catches up to the consumer's position on demand
        self._tracker_from: SamplerState | None = None
        self._first = self._want = self._start
        self._stop: int | None = None
        self._stride = 1
        self._on_slice: Callable[[int, np.ndarray], None] | None = None

    # -- the RankClient interface the dataset reads through -------------------------------------
    def join(self) -> pb2.JobInfo:
        """Opens the job's sidecars (once): its JobInfo, as a server would send it."""
        if self._seq is None:
            self._seq = self.job.open()
            if self.job.tokens is None:
                Topology(rank=self.topology.rank, world=self.topology.world).slice_bounds(self.job.global_batch)
            else:
                self.job.tokens.check_world(self.topology.world)
        return self._seq.info

    @property
    def job_info(self) -> pb2.JobInfo:
        return self.join()

    @property
    def per_rank_batch(self) -> int:
        lo, hi = self.topology.slice_bounds(self.job.global_batch)
        return hi - lo

    @property
    def next_step(self) -> int:
        """The next step this reader delivers."""
        return self._want

    def plan(self, start_step: int, stop_step: int | None = None, step_stride: int = 1, step_offset: int = 0,
             on_slice: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Reads steps start_step, start_step + step_stride, ... below stop_step (None: to the
        end); only before the first `next_slice()`. The offset only aligns the first step."""
        if self._gen is not None:
            raise StateError("plan() must be called before the first next_slice()")
        if start_step < 0 or (stop_step is not None and stop_step < 0) or step_stride < 1:
            raise ConfigError(f"bad plan: start {start_step}, stop {stop_step}, stride {step_stride} "
                              "(need start >= 0, stop >= 0, stride >= 1)")
        first = start_step + (step_offset - start_step) % step_stride
        self._first = self._want = first
        self._stop, self._stride, self._on_slice = stop_step, int(step_stride), on_slice

    def next_slice(self, timeout: float | None = None) -> tuple[int, np.ndarray]:  # noqa: ARG002 - RankClient's
        """The next (step, ids) of this lane; EndOfData at the end of the sequence or stop step."""
        if self._gen is None:
            self._open()
        step = self._want
        self._deal(step + max(1, self.lookahead) * self._stride)
        if not self._ahead or self._ahead[0][0] != step:
            raise EndOfData(step, f"no steps left for rank {self.topology.rank} from step {step}")
        step, ids, spans = self._ahead.popleft()
        self._want = step + self._stride
        self.last_spans = spans
        return step, ids

    def close(self) -> None:
        """Drops the slices dealt ahead (nothing to release: no channel, no thread); the state
        of the position can still be taken."""
        self._ahead.clear()

    # -- state ----------------------------------------------------------------------------------
    def state_before(self, step: int) -> SamplerState | None:
        """The sampler state before `step` (None when this dealer cannot reach it: before the
        step it started from, or past the end of data). Positions only move forward, and so
        does the sampler that computes it."""
        if self._seq is None or self._tracker_from is None:
            return self._state if self._state is not None and self._state.step <= step else None
        if self._tracker is None:
            if self._tracker_from.step > step:
                return self._state if self._state is not None and self._state.step <= step else None
            self._tracker = self._seq.new_sampler()
            self._tracker.load_state(self._tracker_from)
        tracker = self._tracker
        if tracker.step > step:
            return None
        part = (0, 0) if isinstance(tracker, Sampler) else None  # the state only: no positions at all
        while tracker.step < step:
            try:
                tracker.next_batch(part) if isinstance(tracker, Sampler) and part is not None else tracker.next_batch()
            except EndOfData:
                return None
        return tracker.state()

    # -- internals ------------------------------------------------------------------------------
    def _open(self) -> None:
        self.join()
        assert self._seq is not None
        state = self._state if self._state is not None and self._state.step <= self._first else None
        try:
            self._gen = self._seq.sampler_at(self._first, state)
        except EndOfData as exc:
            self._gen = self._seq.new_sampler()
            self._gen_end = exc.step
            return
        self._tracker_from = self._gen.state()

    def _deal(self, horizon: int) -> None:
        """Generates the sequence up to `horizon` (at most the stop step), queueing this lane's
        slices and naming each to `on_slice`."""
        gen = self._gen
        assert gen is not None
        if self._stop is not None:
            horizon = min(horizon, self._stop)
        part = self.topology.slice_bounds(self.job.global_batch) if isinstance(gen, Sampler) else None
        while gen.step < horizon and self._gen_end is None:
            step = gen.step
            try:
                # only this rank's positions, when the sampler can compute a part of the batch
                batch = gen.next_batch(part) if isinstance(gen, Sampler) and part is not None else gen.next_batch()
            except EndOfData:
                self._gen_end = step
                return
            if step >= self._first and (step - self._first) % self._stride == 0:
                spans = None
                if isinstance(batch, TokenStep):  # steps in tokens: this rank's equal part of the stream
                    sl = batch.part(self.topology.rank, self.topology.world)
                    ids = sl.ids
                    spans = [(a, b, int(n)) for (a, b), n in zip(sl.ranges(), sl.lengths.tolist())]
                else:
                    ids = batch if part is not None else self.topology.slice(batch)
                self._ahead.append((step, ids, spans))
                if self._on_slice is not None:
                    self._on_slice(step, ids)
