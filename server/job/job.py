"""One training job as the sampler server sees it: the global sequence, its ranks, checkpoints.

This is the server's domain logic, free of gRPC so it is testable directly. It composes
three parts, each with one job:

- **The sequence window** (`sequence_window.SequenceWindow`): the generator, the batches of
  recent steps, saved states and exact replay of any older step, online changes included.
  The job generates each step through it, doing its per-step duties first (adaptation, the
  automatic checkpoint, the generated-step mark).
- **The rank table** (`ranks.RankTable`): positions moved only by idempotent
  acknowledgements, per-worker lanes, liveness, the slowest step. A rank may receive step t
  on its training stream only when t < its position + lookahead and t < the slowest live
  rank's position + max lag; a read-only stream is bounded by the lag bound alone. A Join
  carrying a checkpoint token re-forms the job at the token's step, possibly with another
  world size.
- **The checkpoint writer** (`checkpoint_writer.CheckpointWriter`): every `checkpoint_every`
  generated steps, on demand, after every online change and on shutdown, the job takes an
  immutable snapshot (`CheckpointMeta` + sampler state bytes) under its lock and the writer
  writes it without the lock. It also keeps the generated-step mark durable ahead of
  generation, so a restarted server accepts reconnecting ranks wherever they were.

Every public method takes the job's one lock briefly; waiting (flow control) and checkpoint
I/O happen outside it. Two documented exceptions write under the lock: an online change
(`update`) is made durable before any batch can use it, and when a burst of generation
outruns the background writer the mark is written in line (see `_ensure_mark_locked`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from croupier.errors import ConfigError, CroupierError, EndOfData, FingerprintMismatch, StateError
from croupier.server.durability.checkpoint_writer import CheckpointMeta, CheckpointWriteError, CheckpointWriter, WriterHealth
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.sequence_window import Saved, SequenceWindow
from croupier.server.feedback.adapt import Adapter, AdaptSpec
from croupier.server.durability.change_log import LOG_NAME, change_to_event, event_to_change
from croupier.server.durability.event_log import EventLog, iter_events
from croupier.server.feedback.loss_report import ReportRefused, layout_group_of
from croupier.server.sampling.mix_sampler import MixSampler, SourceCounters
from croupier.server.job.token_tally import TokenTally, tokens_lookup
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.job.ranks import RankProgress, RankTable, RankView
from croupier.server.sampling.state import Change, SamplerState
from croupier.server.durability.checkpoint_store import CheckpointStore, StoredCheckpoint
from croupier.server.durability.resume_token import CheckpointToken
from croupier.topology import Topology, per_rank_batch

if TYPE_CHECKING:
    from croupier.mixture import Mixture

log = logging.getLogger("croupier.server.job.job")

MAX_SLICES_PER_MESSAGE = 32
"""Most steps packed into one stream message."""
MAX_IDS_PER_MESSAGE = 1 << 20
"""Most sample ids in one stream message (8 MiB of packed int64, under the 16 MiB limit)."""
MARK_AHEAD_WINDOWS = 4
"""The generated-step mark is kept this many lookahead windows ahead of generation."""

__all__ = ["Job", "JobSpec", "JobStatus", "SliceData", "SliceStream", "JoinResult", "CheckpointResult",
           "RankProgress", "RankView", "StepOutOfRange", "UnknownJob", "NotJoined", "JobReformed",
           "CheckpointUnavailable", "StateDirInvalid"]


class StepOutOfRange(CroupierError):
    """A step is negative, beyond the end of data, or further ahead than the server allows."""


class UnknownJob(CroupierError):
    """A request names a job this server does not serve."""


class NotJoined(CroupierError):
    """A rank calls before any rank has joined, so the job has no world yet."""


class JobReformed(CroupierError):
    """The job was re-formed (resume token, new world) while a rank's stream was open."""


class CheckpointUnavailable(CroupierError):
    """A checkpoint a caller asked for could not be written (the state directory refuses writes)."""


class StateDirInvalid(StateError):
    """The state directory holds checkpoints, none of which is valid: refused, not reset."""


@dataclass(frozen=True)
class JobSpec:
    """What the operator fixes for a job besides the sampler itself."""

    name: str = "default"
    dataset_remote: str = ""
    dataset_fingerprint: str = ""
    selection: str = ""
    max_lag: int = 128
    max_lookahead: int = 64
    checkpoint_every: int = 1000
    snapshot_every: int = 32
    rank_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_lag < 1:
            raise ConfigError(f"max lag must be >= 1 step, got {self.max_lag}")
        if self.max_lookahead < 1:
            raise ConfigError(f"max lookahead must be >= 1 step, got {self.max_lookahead}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint interval must be >= 0 steps (0 = off), got {self.checkpoint_every}")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot interval must be >= 1 step, got {self.snapshot_every}")
        if not self.rank_timeout_s > 0:
            raise ConfigError(f"rank liveness timeout must be > 0 seconds, got {self.rank_timeout_s}")


@dataclass(frozen=True)
class SliceData:
    """One rank's share of one step; `ids` is empty and `end` True past the end of data."""

    step: int
    ids: np.ndarray
    end: bool = False


@dataclass(frozen=True)
class JoinResult:
    next_step: int
    per_rank_batch: int
    world: int


@dataclass(frozen=True)
class CheckpointResult:
    """A durable checkpoint: its token and step. `path` is for the server's own logs and
    operators' tools; it never goes to a rank."""

    token: str
    step: int
    path: str


@dataclass(frozen=True)
class JobStatus:
    """A consistent snapshot for GetStatus, the status table and metrics."""

    generated_step: int
    durable_step: int
    slowest_step: int
    fastest_step: int
    world: int
    ranks: tuple[RankView, ...]
    active_clusters: int
    clip: int
    end_step: int | None
    sizes: np.ndarray
    draws: np.ndarray
    passes: np.ndarray
    clipped_at: np.ndarray
    steps_generated: int
    steps_replayed: int
    slices_served: int
    ids_served: int
    checkpoint: WriterHealth | None = None
    sources: SourceCounters | None = None
    adapt: "AdaptView | None" = None
    changes: tuple[tuple[int, str, str, float], ...] = ()
    log_failures: int = 0
    adapt_failures: int = 0
    tokens: np.ndarray | None = None
    tokens_since: int = 0


@dataclass(frozen=True, eq=False)
class AdaptView:
    """What status shows of an adaptive job: the spec, report counters and per-group figures."""

    spec: AdaptSpec
    accepted: int
    refused: int
    samples: int
    group_loss: np.ndarray
    group_samples: np.ndarray
    group_weight: np.ndarray
    source_loss: np.ndarray | None = None
    source_samples: np.ndarray | None = None


class _Waiter:
    """A blocked stream or GetSlice. `lagged`: held by the lag bound (woken when the slowest
    rank moves) rather than by its own lookahead (woken only by its own rank's acks).
    `on_wake`, when set, is called (from any thread) on every wake-up: the asyncio servicer
    hands it a thread-safe callback into its event loop."""

    __slots__ = ("event", "cancelled", "lagged", "on_wake")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cancelled = False
        self.lagged = True
        self.on_wake: Callable[[], None] | None = None

    def wake(self) -> None:
        self.event.set()
        cb = self.on_wake
        if cb is not None:
            cb()


class Job:
    """The sampler server's domain object; see the module docstring.

    fresh: set aside (into a `stale-*` folder) whatever the state directory holds and start
        at step 0; without it, a state directory whose checkpoints are all invalid is refused.
    fault_hook: passed to the checkpoint writer (called with each target path before a write).
    """

    def __init__(self, layout: ClusterLayout, config: PolicyConfig, global_batch: int, seed: int = 0,
                 spec: JobSpec | None = None, store: CheckpointStore | None = None,
                 clock: Callable[[], float] = time.monotonic, *, fresh: bool = False,
                 fault_hook: Callable[[Path], None] | None = None, mixture: "Mixture | None" = None,
                 adapt: AdaptSpec | None = None, token_counts: list[tuple[int, np.ndarray]] | None = None) -> None:
        self.mixture = mixture
        self.config = config
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.spec = spec or JobSpec()
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self.layout = layout
        self._seq = SequenceWindow(self._new_sampler, self.spec.snapshot_every, self.spec.max_lookahead,
                                   self._load_saved if store is not None else None)
        self.layout = self._seq.gen.layout
        self.fingerprint = self._seq.gen.fingerprint
        self._table = RankTable(self.spec.rank_timeout_s, clock)
        self._formation: tuple[int, int] | None = None  # (token step, world) of the last re-form
        self._epoch = 0  # bumps on every re-form; open streams of an older epoch end
        self._waiters: dict[int, set[_Waiter]] = {}
        self._durable_step = -1
        self._durable_lock = threading.Lock()
        self._high_water = 0  # highest step this job's generator is known to have reached
        self._auto_submitted = 0
        self._mark_promised = -1
        self._slices_served = 0
        self._ids_served = 0
        self.resumed_from: int | None = None
        self.adapter: Adapter | None = None if adapt is None else self._new_adapter(adapt)
        self._tally: TokenTally | None = None
        if token_counts:
            cluster_of = self._seq.gen.cluster_of_ids if isinstance(self._seq.gen, MixSampler) else layout_group_of(self.layout)
            self._tally = TokenTally(self.layout.num_clusters, tokens_lookup(token_counts), cluster_of)
        self._adapt_failures = 0
        self._log_failures = 0
        self._change_view: collections.deque[tuple[int, str, str, float]] = collections.deque(maxlen=64)
        self._last_w: dict[str, np.ndarray] = {}
        self._log: EventLog | None = None
        self._writer: CheckpointWriter | None = None
        if store is not None:
            self._writer = CheckpointWriter(store, self._on_written, fault_hook)
            try:
                self._resume_from_store(fresh)
                self._log = EventLog(store.dir / LOG_NAME)
                self._migrate_events_locked()
            except BaseException:
                self._writer.close()
                raise

    # -- construction helpers -------------------------------------------------------------------
    def _new_sampler(self) -> Sampler | MixSampler:
        if self.mixture is not None:
            return mixture_sampler(self.mixture, self.global_batch, self.seed)
        return Sampler(self.layout, self.config, self.global_batch, self.seed)

    def _new_adapter(self, spec: AdaptSpec) -> Adapter:
        """The job's adapter: groups are clusters (any policy with clusters) or a mixture's sources."""
        gen = self._seq.gen
        if spec.groups == "sources":
            if not isinstance(gen, MixSampler):
                raise ConfigError("--adapt-groups sources needs a mixture (serve --mix); this job serves one dataset")
            return Adapter(spec, gen.source_of_ids, gen.source_counters().weights)
        if isinstance(gen, MixSampler):
            return Adapter(spec, gen.cluster_of_ids, gen.cluster_weights(), source_of=gen.source_of_ids,
                           num_sources=len(gen.sources))
        if gen.config.policy not in ("clusterclip", "weighted"):
            raise ConfigError(f"--adapt works with policy clusterclip or weighted (or a mixture), not "
                              f"{gen.config.policy!r}: the controller re-weights clusters")
        weights = np.ones(self.layout.num_clusters) if gen.config.weights is None else np.array(gen.config.weights)
        return Adapter(spec, layout_group_of(self.layout), weights)

    @property
    def policy_name(self) -> str:
        """The policy (JobInfo.policy): a single source's, or "mixture"."""
        return "mixture" if isinstance(self._seq.gen, MixSampler) else self._seq.gen.config.policy

    @property
    def policy_json(self) -> str:
        """The full sampling config as canonical JSON (JobInfo.policy_json)."""
        return json.dumps(self._seq.gen.config_dict, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def _state_part(ck: StoredCheckpoint) -> bytes:
        """The sampler state of a checkpoint (an adaptive job appends its statistics after it)."""
        n = int(ck.meta.get("adapt_bytes", 0) or 0) + int(ck.meta.get("tokens_bytes", 0) or 0)
        return ck.state[:len(ck.state) - n] if n else ck.state

    def _migrate_events_locked(self) -> None:
        """Puts changes a pre-log checkpoint listed into the new event log (once)."""
        assert self._log is not None
        if self._seq.events and len(self._log) == 0:
            for ch in self._seq.events:
                self._log.append(change_to_event(ch))
        elif self.resumed_from is None and not self._seq.events and len(self._log):
            # Changes made before the first checkpoint: durable in the log, scheduled from step 0.
            self._seq.events = [event_to_change(ev) for ev in iter_events(self._log.path)]
            for ev in self._seq.events:
                self._seq.gen.schedule_change(ev)
                self._view_change(ev)
        elif len(self._log) != len(self._seq.events):
            raise StateDirInvalid(f"{self._log.path} holds {len(self._log)} changes but the job restored "
                                  f"{len(self._seq.events)}")

    def _check_state(self, ck: StoredCheckpoint) -> None:
        state = SamplerState.from_bytes(self._state_part(ck))
        meta = CheckpointMeta.from_dict(ck.meta, str(ck.path))
        if meta.sampler_fingerprint != self.fingerprint or state.fingerprint != self.fingerprint:
            raise FingerprintMismatch(f"state directory {ck.path.parent}", expected=self.fingerprint,
                                      got=meta.sampler_fingerprint)

    def _resume_from_store(self, fresh: bool) -> None:
        assert self.store is not None and self._writer is not None
        if fresh:
            aside = self.store.set_aside()
            if aside is not None:
                log.warning("starting fresh: previous checkpoints set aside",
                            extra={"event": "fresh", "path": str(aside)})
            return
        mark = self._writer.read_mark(self.fingerprint)
        skipped: list[tuple[Path, str]] = []
        ck = self.store.newest_valid(check=self._check_state, skipped=skipped)
        if ck is None:
            if skipped:
                listing = "; ".join(f"{p.name}: {why}" for p, why in skipped)
                raise StateDirInvalid(f"state directory {self.store.dir} holds {len(skipped)} checkpoint(s) and "
                                      f"none is valid ({listing}); refusing to start over silently: repair or "
                                      "remove them, or pass --fresh to set them aside and start at step 0")
            if mark > 0:
                self._high_water = mark
                self._mark_promised = mark
                log.info("no checkpoint; generated-step mark found",
                         extra={"event": "resumed_mark", "mark": mark, "path": str(self._writer.mark_path)})
            return
        self._restore(ck, SamplerState.from_bytes(self._state_part(ck)), mark)

    def _restore(self, ck: StoredCheckpoint, state: SamplerState, mark: int) -> None:
        meta = CheckpointMeta.from_dict(ck.meta, str(ck.path))
        self._seq.gen.load_state(state)
        assert self.store is not None
        logged = [event_to_change(ev) for ev in iter_events(self.store.dir / LOG_NAME)] \
            if (self.store.dir / LOG_NAME).exists() else []
        if meta.events_in_log:
            self._seq.events = logged
            n = meta.n_events
            if len(logged) < n:
                raise StateDirInvalid(f"checkpoint {ck.path.name} holds {n} online changes but {LOG_NAME} has only "
                                      f"{len(logged)}: the event log is damaged or from another job")
        else:  # a state directory from before the event log: its checkpoint lists the changes
            self._seq.events = [Change.from_dict(e) for e in meta.events]
            n = len(self._seq.events)
        if self.adapter is not None and meta.adapt_bytes:
            self.adapter.load_bytes(ck.state[len(ck.state) - meta.adapt_bytes:])
        for ev in self._seq.events[n:]:  # changes made after the checkpoint, durable in the log
            self._seq.gen.schedule_change(ev)
            if self.adapter is not None:
                self._note_adapted_locked(ev)
        for ev in self._seq.events:
            self._view_change(ev)
        if self._tally is not None:
            if meta.tokens_bytes:
                end = len(ck.state) - meta.adapt_bytes
                self._tally.load(ck.state[end - meta.tokens_bytes:end], state.step)
            else:
                self._tally.restart(state.step)
        self._seq.restored(ck.step, Saved(state, n))
        self._durable_step = ck.step
        self._auto_submitted = ck.step
        if mark >= 0:
            self._high_water = max(meta.generated_step, mark)
        else:  # a state directory from before the mark: the old server may have run one interval past
            self._high_water = meta.generated_step + self.spec.checkpoint_every
        self._mark_promised = max(mark, -1)
        self._seq.end_step = meta.end_step
        self._formation = meta.formation
        self._table.reset(meta.world, meta.formed_at)
        self._table.restore(meta.ranks)
        self._table.recompute()
        self.resumed_from = ck.step
        log.info("resumed from checkpoint", extra={"event": "resumed", "path": str(ck.path), "step": ck.step,
                                                   "world": meta.world, "high_water": self._high_water})

    # -- public API: ranks ----------------------------------------------------------------------
    def join(self, rank: int, world: int, job: str = "", global_batch: int = 0,
             resume_token: str = "", client_version: str = "") -> JoinResult:
        """Registers a rank; returns where it resumes. See the module docstring."""
        self._check_job(job)
        with self._lock:
            token = None
            if resume_token:
                token = CheckpointToken.decode(resume_token)
                if token.fingerprint != self.fingerprint:
                    raise FingerprintMismatch("checkpoint token", expected=self.fingerprint, got=token.fingerprint)
                if self._seq.end_step is not None and token.step > self._seq.end_step:
                    raise StepOutOfRange(f"resume token step {token.step} is past the end of data "
                                         f"at step {self._seq.end_step}")
            Topology(rank=rank, world=world)
            if global_batch and global_batch != self.global_batch:
                raise ConfigError(f"global batch {global_batch} does not match the job's global batch "
                                  f"{self.global_batch}")
            p = per_rank_batch(self.global_batch, world)
            t = self._table
            if token is not None:
                if self._formation != (token.step, world) or t.world != world:
                    self._reform(token.step, world)
                prog = t.get(rank)
                prog.next_step = prog.delivered_step = prog.base = token.step
                prog.lanes = {}
            else:
                if t.world is None:
                    t.world = world
                elif world != t.world:
                    raise ConfigError(f"world size {world} does not match the job's world size {t.world}; "
                                      "pass a checkpoint token to re-form the job with another world size")
                prog = t.get(rank)
            t.seen(rank)
            self._recompute_locked()
            log.info("rank joined", extra={"event": "join", "rank": rank, "world": world,
                                           "next_step": prog.next_step, "client_version": client_version,
                                           "resume_step": None if token is None else token.step})
            return JoinResult(next_step=prog.next_step, per_rank_batch=p, world=world)

    def ack(self, rank: int, world: int, next_step: int, job: str = "", step_stride: int = 1,
            step_offset: int = 0) -> tuple[int, int]:
        """The stream (step_stride, step_offset) of a rank has consumed every one of its steps
        before `next_step`; idempotent. Returns (slowest, fastest)."""
        exc = self.ack_lanes(job, [(rank, world, next_step, step_stride, step_offset)])[0]
        if exc is not None:
            raise exc
        with self._lock:
            return self._table.slowest, self._table.top

    def ack_lanes(self, job: str, acks: "list[tuple[int, int, int, int, int]]") -> "list[CroupierError | None]":
        """Acknowledgements, each (rank, world, next_step, step_stride, step_offset): the stream
        (stride, offset) of the rank consumed every one of its steps before next_step. Applied
        in order under one lock acquisition, with the slowest step's
        consequences (trim, waking lagged waiters) applied once at the end. A session carrying a
        node's lanes acknowledges them together this way. Returns, per acknowledgement, None or
        the error that refused it (the others still apply)."""
        self._check_job(job)
        out: list[CroupierError | None] = []
        notify: set[int] = set()
        lag_moved = recompute = False
        with self._lock:
            far = self._far_bound()
            for rank, world, next_step, step_stride, step_offset in acks:
                try:
                    stride = max(int(step_stride), 1)
                    if not 0 <= step_offset < stride:
                        raise ConfigError(f"step offset {step_offset} is outside [0, step stride {stride})")
                    prog = self._rank_locked(rank, world)
                    if next_step < 0:
                        raise StepOutOfRange(f"acknowledged step {next_step} is negative")
                    if next_step > far:
                        raise StepOutOfRange(f"acknowledged step {next_step} is ahead of anything the rank could "
                                             f"have received ({self._far_reason()})")
                except CroupierError as exc:
                    out.append(exc)
                    continue
                readmitted = self._table.seen(rank)
                old = prog.next_step
                moved = prog.acknowledge(next_step, stride, step_offset)
                if readmitted:
                    recompute = True
                elif moved and self._table.moved(rank, old, prog.next_step):
                    lag_moved = True
                if moved or readmitted:
                    notify.add(rank)
                out.append(None)
            if recompute:
                self._recompute_locked()
            if lag_moved:
                self._trim_locked()
                self._notify_lagged()
            for rank in notify:
                self._notify(rank)
        return out

    def poll_streams(self, streams: "list[SliceStream]") -> "list[list[SliceData] | None | CroupierError]":
        """`SliceStream.poll` of many streams under one lock acquisition (a session's woken
        lanes); per stream its slices, None when finished, or the error that ended it."""
        out: list[list[SliceData] | None | CroupierError] = []
        with self._lock:
            for st in streams:
                try:
                    out.append(st._poll_locked())
                except CroupierError as exc:
                    out.append(exc)
        return out

    def get_slice(self, rank: int, world: int, step: int, job: str = "",
                  is_active: Callable[[], bool] = lambda: True, timeout: float | None = None) -> SliceData:
        """Rank's slice of `step`, waiting while the step is beyond the lag bound. Read-only:
        the rank's position does not move."""
        self._check_job(job)
        waiter = _Waiter()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._rank_locked(rank, world)
            self._check_step(step, "step")
            if self._table.seen(rank):
                self._recompute_locked()
            self._waiters.setdefault(rank, set()).add(waiter)
        try:
            while True:
                waiter.event.clear()
                with self._lock:
                    out = self.try_slice_locked(rank, world, step)
                    if out is not None:
                        return out
                if not is_active() or waiter.cancelled:
                    raise StepOutOfRange(f"step {step} is beyond the lag bound and the caller went away")
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise StepOutOfRange(f"step {step} stayed beyond the lag bound (slowest step "
                                         f"{self._table.slowest} + max lag {self.spec.max_lag}) until the deadline")
                waiter.event.wait(wait)
        finally:
            with self._lock:
                self._waiters.get(rank, set()).discard(waiter)

    def begin_get_slice(self, rank: int, world: int, step: int, job: str = "") -> _Waiter:
        """Validates a GetSlice and registers its waiter (for the asyncio servicer); pair with
        `try_slice` and `end_wait`."""
        self._check_job(job)
        waiter = _Waiter()
        with self._lock:
            self._rank_locked(rank, world)
            self._check_step(step, "step")
            if self._table.seen(rank):
                self._recompute_locked()
            self._waiters.setdefault(rank, set()).add(waiter)
        return waiter

    def try_slice(self, rank: int, world: int, step: int) -> SliceData | None:
        with self._lock:
            return self.try_slice_locked(rank, world, step)

    def try_slice_locked(self, rank: int, world: int, step: int) -> SliceData | None:
        self._check_world(world)
        if step < self._table.slowest + self.spec.max_lag or self._is_end(step):
            return self._slice_locked(step, rank, world)
        return None

    def end_wait(self, rank: int, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.get(rank, set()).discard(waiter)

    def open_stream(self, rank: int, world: int, start_step: int, lookahead: int = 0, step_stride: int = 1,
                    step_offset: int = 0, stop_step: int = 0, job: str = "", read_only: bool = False,
                    rank_count: int = 1) -> "SliceStream":
        """A cursor that yields the rank's slices from `start_step` under flow control. Opening
        it never moves the rank's position (only acknowledgements do).

        rank_count > 1: the stream carries ranks rank .. rank + rank_count - 1 (a node agent's
        ranks); each of its slices is those ranks' slices one after another, and a step is
        delivered only when every one of them may receive it."""
        self._check_job(job)
        stride = max(int(step_stride), 1)
        if step_stride < 0:
            raise ConfigError(f"step stride must be >= 0, got {step_stride}")
        if not 0 <= step_offset < stride:
            raise ConfigError(f"step offset {step_offset} is outside [0, step stride {stride})")
        if lookahead < 0:
            raise ConfigError(f"lookahead must be >= 0, got {lookahead}")
        if stop_step < 0:
            raise ConfigError(f"stop step must be >= 0 (0 = no stop), got {stop_step}")
        if rank_count < 0:
            raise ConfigError(f"rank count must be >= 0 (0 or 1: one rank), got {rank_count}")
        count = max(int(rank_count), 1)
        if count > 1 and rank + count > world:
            raise ConfigError(f"a lane's ranks must lie in the world: ranks {rank}..{rank + count - 1} "
                              f"(rank {rank}, rank count {count}) exceed world size {world}")
        ranks = range(rank, rank + count)
        la = self.spec.max_lookahead if lookahead == 0 else min(int(lookahead), self.spec.max_lookahead)
        with self._lock:
            if read_only:
                for r in ranks:
                    Topology(rank=r, world=world)
                self._check_world(world)
            else:
                seen = False
                for r in ranks:
                    prog = self._rank_locked(r, world)
                    prog.streams += 1
                    seen = self._table.seen(r) or seen
                if seen:
                    self._recompute_locked()
            self._check_step(start_step, "start step")
            first = start_step + ((step_offset - start_step) % stride)
            waiter = _Waiter()
            for r in ranks:
                self._waiters.setdefault(r, set()).add(waiter)
            epoch = self._epoch
        log.info("stream opened", extra={"event": "stream_open", "rank": rank, "rank_count": count,
                                         "start_step": start_step, "stride": stride, "offset": step_offset,
                                         "read_only": read_only})
        return SliceStream(self, rank, world, first, la, stride, stop_step, waiter, epoch, read_only, count)

    # -- public API: checkpoints, changes, status ----------------------------------------------------
    def checkpoint(self, step: int, job: str = "", kind: str = "token") -> CheckpointResult:
        """Makes the sampler state before `step` durable; returns the token that resumes there.

        The state is taken under the lock, written without it. CheckpointUnavailable when the
        state directory refuses the write (the job goes on serving)."""
        self._check_job(job)
        with self._lock:
            if step < 0:
                raise StepOutOfRange(f"checkpoint step {step} is negative")
            if step > self._far_bound():
                raise StepOutOfRange(f"checkpoint step {step} is too far ahead ({self._far_reason()})")
            if self._seq.end_step is not None and step > self._seq.end_step:
                raise StepOutOfRange(f"checkpoint step {step} is past the end of data at step {self._seq.end_step}")
            saved = self._state_at_locked(step)
            self._seq.pin(step, saved)
            meta, data = self._payload_locked(saved)
        path = self._write(step, meta, data, kind)
        token = CheckpointToken(self.fingerprint, step).encode()
        log.info("checkpoint", extra={"event": "checkpoint", "step": step, "path": path, "kind": kind})
        return CheckpointResult(token=token, step=step, path=path)

    def checkpoint_now(self, kind: str = "auto") -> int:
        """Durably saves the generator's current state (shutdown); its step. Raises
        CheckpointUnavailable when the state directory refuses the write."""
        with self._lock:
            saved = Saved(self._seq.gen.state(), len(self._seq.events))
            self._seq.pin(saved.state.step, saved)
            meta, data = self._payload_locked(saved)
        self._write(saved.state.step, meta, data, kind)
        return saved.state.step

    def _write(self, step: int, meta: CheckpointMeta, data: bytes, kind: str) -> str:
        if self._writer is None:
            return ""
        try:
            return str(self._writer.write_now(step, meta, data, kind))
        except CheckpointWriteError as exc:
            raise CheckpointUnavailable(f"{exc}; the server keeps serving and retries; try again later") from None

    def update(self, step: int, clip: int = 0, weights: list[float] | None = None, *, source: str = "",
               source_weight: float | None = None, source_weights: list[float] | None = None) -> int:
        """Schedules an online change from `step` (>= the generated step); returns `step`.

        `source` (a mixture source's name) makes `clip` and `source_weight` apply to that
        source; `source_weights` sets every source's weight. The change is durable before
        this returns, and before any batch can use it: the checkpoint is written under the
        lock, and the change is undone when it cannot be."""
        with self._lock:
            if step < self._seq.gen.step:
                raise ConfigError(f"step {step} is already generated (generated step {self._seq.gen.step}); "
                                  f"a change must name a step >= {self._seq.gen.step}")
            w = list(weights) if weights else None
            src_index: int | None = None
            if source or source_weight is not None or source_weights:
                if not isinstance(self._seq.gen, MixSampler):
                    raise ConfigError(f"this job serves one dataset: a source change (source {source!r}) "
                                      "applies to mixtures (serve --mix)")
                if source_weight is not None and not source:
                    raise ConfigError("a source weight names its source (--source NAME)")
                if source:
                    src_index = self._seq.gen.source_index(source)
            change = Change(step=int(step), clip=int(clip) if clip else None,
                            weights=None if w is None else tuple(float(x) for x in w), source=src_index,
                            source_weight=None if source_weight is None else float(source_weight),
                            source_weights=tuple(float(x) for x in source_weights) if source_weights else None)
            self._record_change_locked(change)
            log.info("online change scheduled", extra={"event": "update", "step": step, "clip": clip or None,
                                                       "weights": None if w is None else len(w),
                                                       "source": source or None, "source_weight": source_weight})
            return int(step)

    def _record_change_locked(self, change: Change) -> None:
        """Validates, logs (durably, before use) and schedules an online change."""
        probe = self._new_sampler()  # validates against the job's sampler without touching the generator
        probe.load_state(self._seq.gen.state())
        probe.schedule_change(change)
        if self._log is not None:
            try:
                self._log.append(change_to_event(change))
            except OSError as exc:
                self._on_fault_locked()
                raise CheckpointUnavailable(f"online change not applied: the event log {self._log.path} refuses "
                                            f"writes ({exc.strerror or exc}); the server keeps serving") from None
        self._seq.add_change(change)
        self._view_change(change)
        if self.adapter is not None:
            self._note_adapted_locked(change)

    def _view_change(self, change: Change) -> None:
        """Remembers a change for status: kind, origin, largest weight ratio against the last."""
        if change.source is not None:
            name = self.mixture.infos[change.source].name if self.mixture is not None else str(change.source)
            kind, w = f"source:{name}", None
        elif change.source_weights is not None:
            kind, w = "sources", np.array(change.source_weights)
        elif change.weights is not None:
            kind, w = "weights", np.array(change.weights)
        else:
            kind, w = "clip", None
        ratio = 0.0
        if w is not None:
            prev = self._last_w.get(kind)
            if prev is not None and prev.shape == w.shape:
                a, b = w / max(w.sum(), 1e-300), prev / max(prev.sum(), 1e-300)
                both = (a > 0) & (b > 0)
                if both.any():
                    r = a[both] / b[both]
                    ratio = float(max(r.max(), 1.0 / r.min()))
            self._last_w[kind] = w
        self._change_view.append((change.step, change.origin or "operator", kind, ratio))

    def _on_fault_locked(self) -> None:
        self._log_failures += 1

    def _note_adapted_locked(self, change: Change) -> None:
        """Keeps the adapter's view of the weights in force (and the operator's prior) current."""
        a = self.adapter
        assert a is not None
        operator = not change.origin
        if a.spec.groups == "clusters" and change.weights is not None:
            a.note(np.array(change.weights), operator)
        elif a.spec.groups == "sources":
            if change.source_weights is not None:
                a.note(np.array(change.source_weights), operator)
            elif change.source is not None and change.source_weight is not None:
                w = a.weights.copy()
                w[change.source] = change.source_weight
                a.note(w, operator)

    def _adapt_locked(self, step: int) -> None:
        """Every `adapt_every` steps, before generating `step`: the controller's proposal, if
        any, becomes an ordinary recorded change at `step` (not generated yet, so beyond every
        rank's lookahead). A failing controller is logged and skipped; generation goes on."""
        a = self.adapter
        if a is None or step == 0 or step % a.spec.every:
            return
        if step < self._high_water:
            # Generated before a restart (up to the durable mark), perhaps delivered: the log
            # already holds whatever the controller decided then; deciding again would move it.
            return
        try:
            proposal = a.propose(step)
            if proposal is None:
                return
            w = tuple(float(x) for x in proposal)
            change = Change(step=step, origin=a.spec.controller,
                            **({"source_weights": w} if a.spec.groups == "sources" else {"weights": w}))
            self._record_change_locked(change)
        except Exception as exc:  # noqa: BLE001 - adaptation must never stall the sequence
            self._adapt_failures += 1
            log.error("adaptive weights not changed at step %d: %s", step, exc,
                      extra={"event": "adapt_failed", "step": step})
            return
        log.info("controller changed weights", extra={"event": "adapt", "step": step, "controller": a.spec.controller,
                                                      "reports": a.accepted})

    # -- public API: loss feedback ----------------------------------------------------------------
    def report_losses(self, rank: int, world: int, steps: list[tuple[int, np.ndarray, np.ndarray | None]],
                      job: str = "") -> tuple[int, list[tuple[int, str, str]]]:
        """Folds a rank's per-sample losses of trained steps into the loss statistics.

        Returns (steps accepted, [(step, rule, message)] refused). A step is refused, changing
        nothing, when the rank was never dealt it, or its report breaks a rule (length,
        finite, non-negative, mask-length, id, duplicate); the other steps still count."""
        self._check_job(job)
        if self.adapter is None:
            raise ConfigError("this job does not adapt its weights (serve --adapt NAME): loss reports are not used")
        accepted, refused = 0, []
        with self._lock:
            prog = self._rank_locked(rank, world)
            dealt = max(prog.delivered_step, prog.next_step)
            for step, losses, present in steps:
                try:
                    if step < 0 or step >= dealt:
                        raise ReportRefused("dealt", f"rank {rank} was never dealt step {step} (it has received "
                                                     f"steps before {dealt})")
                    sl = self._slice_locked(step, rank, world)
                    if sl.end:
                        raise ReportRefused("dealt", f"step {step} is past the end of data")
                    self.adapter.report(rank, step, sl.ids, losses, present)
                    accepted += 1
                except ReportRefused as exc:
                    self.adapter.refused += 1
                    refused.append((int(step), exc.rule, str(exc)))
        if refused:
            log.warning("loss reports refused", extra={"event": "loss_refused", "rank": rank, "count": len(refused),
                                                       "first": refused[0][2]})
        return accepted, refused

    def status(self) -> JobStatus:
        with self._lock:
            self._recompute_locked()
            c = self._seq.gen.counters()
            t = self._table
            return JobStatus(
                generated_step=self._seq.gen.step, durable_step=self._durable_step, slowest_step=t.slowest,
                fastest_step=t.fastest(), world=t.world or 0, ranks=t.views(),
                active_clusters=int(c.active.sum()), clip=int(self._seq.gen.clip or 0), end_step=self._seq.end_step,
                sizes=c.sizes, draws=c.draws, passes=c.passes, clipped_at=c.clipped_at,
                steps_generated=self._seq.steps_generated, steps_replayed=self._seq.steps_replayed,
                slices_served=self._slices_served, ids_served=self._ids_served,
                checkpoint=None if self._writer is None else self._writer.health(),
                sources=self._seq.gen.source_counters() if isinstance(self._seq.gen, MixSampler) else None,
                adapt=self._adapt_view_locked(), changes=tuple(self._change_view),
                log_failures=self._log_failures, adapt_failures=self._adapt_failures,
                tokens=None if self._tally is None else self._tally.tokens.copy(),
                tokens_since=0 if self._tally is None else self._tally.since)

    def _adapt_view_locked(self) -> AdaptView | None:
        a = self.adapter
        if a is None:
            return None
        src = a.stats if a.spec.groups == "sources" else a.source_stats
        return AdaptView(spec=a.spec, accepted=a.accepted, refused=a.refused, samples=a.samples,
                         group_loss=a.stats.ema.copy(), group_samples=a.stats.samples.copy(),
                         group_weight=a.weights.copy(),
                         source_loss=None if src is None else src.ema.copy(),
                         source_samples=None if src is None else src.samples.copy())

    def source_counters(self) -> SourceCounters | None:
        """Per-source weights, clips, draws and exhaustion of a mixture (None for one source)."""
        if not isinstance(self._seq.gen, MixSampler):
            return None
        with self._lock:
            return self._seq.gen.source_counters()

    def checkpoint_health(self) -> WriterHealth | None:
        """The checkpoint writer's state (None without a state directory)."""
        return None if self._writer is None else self._writer.health()

    def tick(self) -> float:
        """Re-derives liveness (a rank may have turned silent); returns seconds until the next
        rank could. The server calls it periodically."""
        with self._lock:
            self._recompute_locked()
            return self._table.next_deadline()

    def close(self) -> None:
        """Stops the background checkpoint writer (after it drains)."""
        if self._writer is not None:
            self._writer.flush(timeout=10.0)
            self._writer.close()

    @property
    def world(self) -> int | None:
        return self._table.world

    def check_job(self, job: str) -> None:
        """UnknownJob unless `job` is empty or this job's name."""
        self._check_job(job)

    # -- internals: validation ------------------------------------------------------------------
    def _check_job(self, job: str) -> None:
        if job and job != self.spec.name:
            raise UnknownJob(f"this server serves job {self.spec.name!r}, not {job!r}")

    def _check_world(self, world: int) -> None:
        if self._table.world is None:
            raise NotJoined("no rank has joined yet: call Join first")
        if world != self._table.world:
            raise ConfigError(f"world size {world} does not match the job's world size {self._table.world}")

    def _rank_locked(self, rank: int, world: int) -> RankProgress:
        Topology(rank=rank, world=world)
        self._check_world(world)
        new = rank not in self._table.ranks  # a rank may call again after a server restart without re-joining
        prog = self._table.get(rank)
        if new:
            self._recompute_locked()
        return prog

    def _far_bound(self) -> int:
        base = max(self._table.slowest, self._high_water, self._seq.gen.step)
        return base + self.spec.max_lag + self.spec.max_lookahead

    def _far_reason(self) -> str:
        return (f"the bound is step {self._far_bound()}: the furthest of slowest rank step {self._table.slowest} "
                f"and generated step {max(self._seq.gen.step, self._high_water)}, + max lag {self.spec.max_lag} "
                f"+ lookahead {self.spec.max_lookahead}")

    def _check_step(self, step: int, what: str) -> None:
        if step < 0:
            raise StepOutOfRange(f"{what} {step} is negative")
        far = self._far_bound()
        if step > far and not self._is_end(step):
            raise StepOutOfRange(f"{what} {step} is too far ahead ({self._far_reason()})")

    def _is_end(self, step: int) -> bool:
        return self._seq.is_end(step)

    # -- internals: ranks ---------------------------------------------------------------------
    def _reform(self, step: int, world: int) -> None:
        log.info("job re-formed", extra={"event": "reform", "step": step, "world": world,
                                          "old_world": self._table.world})
        self._formation = (step, world)
        self._epoch += 1
        self._table.reset(world, step)
        self._trim_locked()
        self._notify_all()

    def _recompute_locked(self) -> None:
        before = self._table.silent
        if self._table.recompute():
            self._trim_locked()
            self._notify_lagged()
        if self._table.silent != before:
            for r in self._table.silent - before:
                log.warning("rank silent past the liveness timeout; no longer holding the others back",
                            extra={"event": "rank_silent", "rank": r, "timeout_s": self._table.timeout_s})
            for r in before - self._table.silent:
                log.info("rank back", extra={"event": "rank_back", "rank": r})

    def _notify(self, rank: int) -> None:
        for w in self._waiters.get(rank, ()):
            w.wake()

    def _notify_all(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                w.wake()

    def _notify_lagged(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                if w.lagged:
                    w.wake()

    # -- internals: durability ------------------------------------------------------------------
    def _on_written(self, step: int) -> None:
        with self._durable_lock:
            self._durable_step = max(self._durable_step, step)

    def _payload_locked(self, saved: Saved) -> tuple[CheckpointMeta, bytes]:
        """(meta, bytes) of a checkpoint: the sampler state, then the adapter's statistics."""
        data = saved.state.to_bytes()
        meta = self._meta_locked(saved)
        if self._tally is not None and saved.state.step == self._seq.gen.step:
            tokens = self._tally.to_bytes(saved.state.step)
            meta = dataclasses.replace(meta, tokens_bytes=len(tokens))
            data += tokens
        if self.adapter is not None:
            extra = self.adapter.to_bytes()
            meta = dataclasses.replace(meta, adapt_bytes=len(extra))
            data += extra
        return meta, data

    def _meta_locked(self, saved: Saved) -> CheckpointMeta:
        t = self._table
        return CheckpointMeta(
            job=self.spec.name, sampler_fingerprint=self.fingerprint,
            dataset_fingerprint=self.spec.dataset_fingerprint, global_batch=self.global_batch, seed=self.seed,
            policy=self._seq.gen.config_dict, world=t.world, formed_at=t.formed_at,
            generated_step=max(self._seq.gen.step, self._high_water), formation=self._formation,
            ranks=t.positions(), events=() if self._log is not None else tuple(c.to_dict() for c in self._seq.events),
            n_events=saved.n_events, end_step=self._seq.end_step, created=time.time(),
            events_in_log=self._log is not None)

    def _ensure_mark_locked(self, upto: int) -> None:
        """Keeps the durable generated-step mark >= `upto` (a step about to become deliverable).

        The mark is promised MARK_AHEAD_WINDOWS lookahead windows ahead and refreshed by the
        background writer when generation gets within one window of it; only a burst that
        outruns the writer writes it in line. A refused write is logged and counted by the
        writer: serving goes on (the mark only widens what a restarted server accepts)."""
        w = self._writer
        if w is None:
            return
        window = self.spec.max_lookahead
        if upto + (MARK_AHEAD_WINDOWS - 1) * window > self._mark_promised:
            self._mark_promised = upto + MARK_AHEAD_WINDOWS * window
            w.submit_mark(self._mark_promised, self.fingerprint)
        if upto > w.mark:
            w.write_mark_now(self._mark_promised, self.fingerprint)

    # -- internals: the sequence --------------------------------------------------------------
    def _trim_locked(self) -> None:
        """Drops batches and snapshots no rank can need without a replay."""
        self._seq.trim(self._table.slowest - self.spec.max_lookahead)

    def _generate_one_locked(self) -> None:
        gen = self._seq.gen
        step = gen.step
        if self.adapter is not None:
            self._adapt_locked(step)
        self._seq.snapshot_due()
        every = self.spec.checkpoint_every
        if self._writer is not None and every and step % every == 0 and step > self._auto_submitted:
            saved = self._seq.current()
            self._seq.pin(step, saved)
            self._writer.submit(step, *self._payload_locked(saved))
            self._auto_submitted = step
        self._ensure_mark_locked(step + 1)
        try:
            batch = gen.next_batch()
        except EndOfData:
            self._seq.end_step = step
            log.info("end of data", extra={"event": "end_of_data", "step": step})
            self._notify_all()
            return
        self._seq.generated(step, batch)
        if self._tally is not None:
            self._tally.add(batch)

    def _batch_locked(self, step: int) -> np.ndarray | None:
        """The global batch of `step`, or None at or past the end of data."""
        return self._seq.batch(step, self._generate_one_locked)

    def _state_at_locked(self, step: int) -> Saved:
        """The sampler state before `step` (generating or replaying as needed)."""
        return self._seq.state_at(step, self._generate_one_locked)

    def _load_saved(self, step: int) -> tuple[int, Saved] | None:
        """The newest valid checkpoint in the state directory at or before `step` (for replays)."""
        assert self.store is not None
        ck = self.store.newest_valid(at_or_before=step, check=self._check_state)
        if ck is None:
            return None
        meta = CheckpointMeta.from_dict(ck.meta, str(ck.path))
        n = meta.n_events if meta.events_in_log else len(meta.events)
        return ck.step, Saved(SamplerState.from_bytes(self._state_part(ck)), n)

    def _slice_locked(self, step: int, rank: int, world: int, count: int = 1) -> SliceData:
        """The slice of ranks rank .. rank + count - 1 of `step` (one after another)."""
        batch = self._batch_locked(step)
        if batch is None:
            return SliceData(step=step, ids=np.empty(0, dtype=np.int64), end=True)
        p = self.global_batch // world  # divisibility was checked when the rank joined
        ids = batch[rank * p:(rank + count) * p]
        self._slices_served += 1
        self._ids_served += len(ids)
        return SliceData(step=step, ids=ids)


class SliceStream:
    """One open stream of a rank's slices (StreamSlices); made by `Job.open_stream`.

    `poll()` returns the consecutive slices deliverable now under flow control (possibly
    none), or None when the stream is finished; `next_chunk()` blocks until `poll` has
    something. `cancel()` (any thread) releases a waiting `next_chunk()`; `close()` once.
    A read-only stream is bounded by the lag bound alone and touches no rank state.
    """

    def __init__(self, job: Job, rank: int, world: int, first: int, lookahead: int, stride: int,
                 stop_step: int, waiter: _Waiter, epoch: int, read_only: bool = False, count: int = 1) -> None:
        self._job = job
        self.rank = rank
        self.count = count
        self.ranks = range(rank, rank + count)
        self.world = world
        self.next = first
        self.lookahead = lookahead
        self.stride = stride
        self.stop = stop_step
        self.read_only = read_only
        self._waiter = waiter
        self._epoch = epoch
        self.finished = False
        self._closed = False

    @property
    def waiter(self) -> _Waiter:
        return self._waiter

    def cancel(self) -> None:
        self._waiter.cancelled = True
        self._waiter.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        job = self._job
        with job._lock:
            for r in self.ranks:
                job._waiters.get(r, set()).discard(self._waiter)
                prog = job._table.ranks.get(r)
                if prog is not None and self._epoch == job._epoch and not self.read_only:
                    prog.streams = max(prog.streams - 1, 0)
        log.info("stream closed", extra={"event": "stream_close", "rank": self.rank, "next": self.next})

    def __iter__(self) -> Iterator[list[SliceData]]:
        while True:
            chunk = self.next_chunk()
            if chunk is None:
                return
            yield chunk

    def poll(self) -> list[SliceData] | None:
        """Slices deliverable now ([] when none), or None when the stream is finished."""
        with self._job._lock:
            return self._poll_locked()

    def _poll_locked(self) -> list[SliceData] | None:
        if self._waiter.cancelled or self.finished:
            return None
        self._waiter.event.clear()
        job = self._job
        if self._epoch != job._epoch:
            raise JobReformed(f"the job was re-formed at step {job._table.formed_at} with world size "
                              f"{job._table.world}; join again")
        chunk = self._collect_locked()
        if not chunk and self.finished:
            return None
        return chunk

    def next_chunk(self, poll: float = 10.0) -> list[SliceData] | None:
        while True:
            chunk = self.poll()
            if chunk is None or chunk:
                return chunk
            self._waiter.event.wait(poll)

    def _collect_locked(self) -> list[SliceData]:
        job = self._job
        table = job._table
        lag_bound = table.slowest + job.spec.max_lag
        progs: list[RankProgress] = []
        if self.read_only:
            bound = lag_bound
            self._waiter.lagged = True
        else:
            for r in self.ranks:
                prog = table.ranks.get(r)
                if prog is None:
                    raise JobReformed(f"rank {r} is no longer part of the job; join again")
                progs.append(prog)
            own_bound = min(p.next_step for p in progs) + self.lookahead
            bound = min(own_bound, lag_bound)
            self._waiter.lagged = lag_bound <= own_bound
        if self.stop:
            bound = min(bound, self.stop)
        out: list[SliceData] = []
        n_ids = 0
        while self.next < bound or job._is_end(self.next):
            if self.stop and self.next >= self.stop:
                break
            sl = job._slice_locked(self.next, self.rank, self.world, self.count)
            out.append(sl)
            n_ids += len(sl.ids)
            for prog in progs:
                prog.delivered_step = max(prog.delivered_step, self.next + 1)
            self.next += self.stride
            if sl.end:
                self.finished = True
                break
            if len(out) >= MAX_SLICES_PER_MESSAGE or n_ids >= MAX_IDS_PER_MESSAGE:
                break
        if self.stop and self.next >= self.stop:
            self.finished = True
        return out
