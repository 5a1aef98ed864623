"""One training job as the sampler server sees it: the global sequence, its ranks, checkpoints.

This is the server's domain logic, free of gRPC so it is testable directly:

- **Generation window.** A live `Sampler` (the generator) produces global batches in step
  order; recent batches stay in memory, so every rank's request (and re-request) of a step in
  the window returns identical ids. A step older than the window is recomputed by replaying a
  sampler restored from the nearest saved state at or before it (an in-memory snapshot, a
  durable checkpoint, or the fresh state of step 0) and re-applying the online changes that
  state does not hold yet. The sequence is deterministic, so replay is exact.
- **Ranks and flow control.** The first Join fixes the world size. A rank may receive step t
  only when t < its acknowledged step + lookahead and t < the slowest rank's acknowledged
  step + max_lag; ranks that have not joined yet count at the step the job formed at. A
  rank that disconnects and returns resumes at its acknowledged step. A Join carrying a
  checkpoint token re-forms the job at the token's step, possibly with another world size.
- **Checkpoints.** Every `checkpoint_every` generated steps, on demand (any step the server
  can reach, including one between two saved states), after every online change and on
  shutdown, the sampler state (O(clusters) bytes) and the job's metadata go to the
  `CheckpointStore`. On start the job resumes from the newest valid checkpoint.

Every public method takes the job's one lock; waiting (flow control) happens outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from croupier import __version__
from croupier.errors import ConfigError, CroupierError, EndOfData, FingerprintMismatch, StateError
from croupier.server.engine import Sampler
from croupier.server.layout import ClusterLayout
from croupier.server.policy import PolicyConfig
from croupier.server.state import SamplerState
from croupier.server.store import CheckpointStore, StoredCheckpoint
from croupier.server.token import CheckpointToken
from croupier.server.topology import Topology, per_rank_batch

log = logging.getLogger("croupier.server.job")

MAX_SLICES_PER_MESSAGE = 32
"""Most steps packed into one stream message."""
MAX_IDS_PER_MESSAGE = 1 << 20
"""Most sample ids in one stream message (8 MiB of packed int64, under the 16 MiB limit)."""


class StepOutOfRange(CroupierError):
    """A step is negative, beyond the end of data, or further ahead than the server allows."""


class UnknownJob(CroupierError):
    """A request names a job this server does not serve."""


class NotJoined(CroupierError):
    """A rank calls before any rank has joined, so the job has no world yet."""


class JobReformed(CroupierError):
    """The job was re-formed (resume token, new world) while a rank's stream was open."""


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

    def __post_init__(self) -> None:
        if self.max_lag < 1:
            raise ConfigError(f"max lag must be >= 1 step, got {self.max_lag}")
        if self.max_lookahead < 1:
            raise ConfigError(f"max lookahead must be >= 1 step, got {self.max_lookahead}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint interval must be >= 0 steps (0 = off), got {self.checkpoint_every}")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot interval must be >= 1 step, got {self.snapshot_every}")


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
    token: str
    step: int
    path: str


@dataclass
class RankProgress:
    """What the server knows of one rank."""

    next_step: int
    delivered_step: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    streams: int = 0


@dataclass(frozen=True)
class RankView:
    rank: int
    next_step: int
    delivered_step: int
    seconds_since_seen: float
    connected: bool


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


@dataclass
class _Saved:
    """An in-memory sampler state and how many online changes it already holds."""

    state: SamplerState
    n_events: int


class _Waiter:
    """A blocked stream or GetSlice. `lagged`: held by the lag bound (woken when the slowest
    rank moves) rather than by its own lookahead (woken only by its own rank's acks)."""

    __slots__ = ("event", "cancelled", "lagged")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cancelled = False
        self.lagged = True


class Job:
    """The sampler server's domain object; see the module docstring."""

    def __init__(self, layout: ClusterLayout, config: PolicyConfig, global_batch: int, seed: int = 0,
                 spec: JobSpec | None = None, store: CheckpointStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = layout
        self.config = config
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.spec = spec or JobSpec()
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._gen = self._new_sampler()
        self.fingerprint = self._gen.fingerprint
        self._batches: dict[int, np.ndarray] = {}
        self._snapshots: dict[int, _Saved] = {0: _Saved(self._gen.state(), 0)}
        self._pinned: dict[int, _Saved] = {}  # checkpoints taken without a store
        self._replayer: tuple[Sampler, int] | None = None
        self._events: list[dict[str, Any]] = []
        self._end_step: int | None = None
        self._world: int | None = None
        self._formed_at = 0
        self._formation: tuple[int, int] | None = None  # (token step, world) of the last re-form
        self._epoch = 0  # bumps on every re-form; open streams of an older epoch end
        self._ranks: dict[int, RankProgress] = {}
        self._waiters: dict[int, set[_Waiter]] = {}
        self._slowest = 0
        self._durable_step = -1
        self._high_water = 0  # highest step this job's generator is known to have reached
        self._steps_generated = 0
        self._steps_replayed = 0
        self._slices_served = 0
        self._ids_served = 0
        self.resumed_from: int | None = None
        if store is not None:
            self._resume_from_store()

    # -- construction helpers -------------------------------------------------------------------
    def _new_sampler(self) -> Sampler:
        return Sampler(self.layout, self.config, self.global_batch, self.seed)

    def _resume_from_store(self) -> None:
        assert self.store is not None
        for step in reversed(self.store.steps()):
            try:
                ck = self.store.load(step)
                state = SamplerState.from_bytes(ck.state)
            except StateError as exc:
                log.warning("checkpoint corrupt, falling back to the previous one",
                            extra={"event": "checkpoint_corrupt", "path": str(self.store.path_of(step)),
                                   "reason": str(exc)})
                continue
            got = ck.meta.get("sampler_fingerprint", state.fingerprint)
            if got != self.fingerprint or state.fingerprint != self.fingerprint:
                raise FingerprintMismatch(f"state directory {self.store.dir}", expected=self.fingerprint, got=got)
            self._restore(ck, state)
            return

    def _restore(self, ck: StoredCheckpoint, state: SamplerState) -> None:
        self._gen.load_state(state)
        meta = ck.meta
        self._events = list(meta.get("events", []))
        self._snapshots = {0: self._snapshots[0], ck.step: _Saved(state, len(self._events))}
        self._durable_step = ck.step
        # The crashed server may have generated (and ranks consumed) up to one checkpoint
        # interval past its newest checkpoint; accept positions up to there from reconnecting ranks.
        self._high_water = int(meta.get("generated_step", ck.step)) + self.spec.checkpoint_every
        self._end_step = meta.get("end_step")
        world = meta.get("world")
        self._world = int(world) if world else None
        self._formed_at = int(meta.get("formed_at", 0))
        if meta.get("formation"):
            self._formation = tuple(meta["formation"])  # type: ignore[assignment]
        now = self._clock()
        for r, nxt in (meta.get("ranks") or {}).items():
            self._ranks[int(r)] = RankProgress(next_step=int(nxt), delivered_step=int(nxt), last_seen=now)
        self._recompute_slowest()
        self.resumed_from = ck.step
        log.info("resumed from checkpoint", extra={"event": "resumed", "path": str(ck.path), "step": ck.step,
                                                   "world": self._world})

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
                if self._end_step is not None and token.step > self._end_step:
                    raise StepOutOfRange(f"resume token step {token.step} is past the end of data "
                                         f"at step {self._end_step}")
            Topology(rank=rank, world=world)
            if global_batch and global_batch != self.global_batch:
                raise ConfigError(f"global batch {global_batch} does not match the job's global batch "
                                  f"{self.global_batch}")
            p = per_rank_batch(self.global_batch, world)
            now = self._clock()
            if token is not None:
                if self._formation != (token.step, world) or self._world != world:
                    self._reform(token.step, world)
                prog = self._ranks.setdefault(rank, RankProgress(next_step=token.step))
                prog.next_step = token.step
                prog.delivered_step = token.step
            else:
                if self._world is None:
                    self._world = world
                elif world != self._world:
                    raise ConfigError(f"world size {world} does not match the job's world size {self._world}; "
                                      "pass a checkpoint token to re-form the job with another world size")
                prog = self._ranks.setdefault(rank, RankProgress(next_step=self._formed_at))
            prog.last_seen = now
            self._recompute_slowest()
            log.info("rank joined", extra={"event": "join", "rank": rank, "world": world,
                                           "next_step": prog.next_step, "client_version": client_version,
                                           "resume_step": None if token is None else token.step})
            return JoinResult(next_step=prog.next_step, per_rank_batch=p, world=world)

    def ack(self, rank: int, world: int, next_step: int, job: str = "") -> tuple[int, int]:
        """A rank has consumed every step before `next_step`; returns (slowest, fastest)."""
        self._check_job(job)
        with self._lock:
            prog = self._rank_locked(rank, world)
            if next_step < 0:
                raise StepOutOfRange(f"acknowledged step {next_step} is negative")
            far = self._far_bound()
            if next_step > far:
                raise StepOutOfRange(f"acknowledged step {next_step} is ahead of anything the rank could have "
                                     f"received ({self._far_reason()})")
            prog.last_seen = self._clock()
            if next_step > prog.next_step:
                old_next, prog.next_step = prog.next_step, next_step
                self._after_progress(rank, old_next)
            return self._slowest, self._fastest()

    def get_slice(self, rank: int, world: int, step: int, job: str = "",
                  is_active: Callable[[], bool] = lambda: True, timeout: float | None = None) -> SliceData:
        """Rank's slice of `step`, waiting while the step is beyond the lag bound."""
        self._check_job(job)
        waiter = _Waiter()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            prog = self._rank_locked(rank, world)
            self._check_step(step, "step")
            prog.last_seen = self._clock()
            self._waiters.setdefault(rank, set()).add(waiter)
        try:
            while True:
                waiter.event.clear()
                with self._lock:
                    self._check_world(world)
                    if step < self._slowest + self.spec.max_lag or self._is_end(step):
                        out = self._slice_locked(step, rank, world)
                        prog = self._ranks[rank]
                        prog.delivered_step = max(prog.delivered_step, step + 1)
                        return out
                if not is_active() or waiter.cancelled:
                    raise StepOutOfRange(f"step {step} is beyond the lag bound and the caller went away")
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise StepOutOfRange(f"step {step} stayed beyond the lag bound (slowest step {self._slowest} + "
                                         f"max lag {self.spec.max_lag}) until the deadline")
                waiter.event.wait(wait)
        finally:
            with self._lock:
                self._waiters.get(rank, set()).discard(waiter)

    def open_stream(self, rank: int, world: int, start_step: int, lookahead: int = 0, step_stride: int = 1,
                    step_offset: int = 0, stop_step: int = 0, job: str = "") -> "SliceStream":
        """A cursor that yields the rank's slices from `start_step` under flow control."""
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
        la = self.spec.max_lookahead if lookahead == 0 else min(int(lookahead), self.spec.max_lookahead)
        with self._lock:
            prog = self._rank_locked(rank, world)
            self._check_step(start_step, "start step")
            if start_step != prog.next_step:
                # The rank says where it is: back (restarted from an older checkpoint) or ahead of
                # what this server knows (it reconnects after a server restart).
                prog.next_step = start_step
                self._recompute_slowest()
                self._notify(rank)  # the rank's other streams (DataLoader workers) see the new position
            prog.streams += 1
            prog.last_seen = self._clock()
            first = start_step + ((step_offset - start_step) % stride)
            waiter = _Waiter()
            self._waiters.setdefault(rank, set()).add(waiter)
            epoch = self._epoch
        log.info("stream opened", extra={"event": "stream_open", "rank": rank, "start_step": start_step,
                                         "stride": stride, "offset": step_offset})
        return SliceStream(self, rank, world, first, la, stride, stop_step, waiter, epoch)

    # -- public API: checkpoints, changes, status ----------------------------------------------------
    def checkpoint(self, step: int, job: str = "", kind: str = "token") -> CheckpointResult:
        """Makes the sampler state before `step` durable; returns the token that resumes there."""
        self._check_job(job)
        with self._lock:
            if step < 0:
                raise StepOutOfRange(f"checkpoint step {step} is negative")
            if step > self._far_bound():
                raise StepOutOfRange(f"checkpoint step {step} is too far ahead ({self._far_reason()})")
            if self._end_step is not None and step > self._end_step:
                raise StepOutOfRange(f"checkpoint step {step} is past the end of data at step {self._end_step}")
            saved = self._state_at_locked(step)
            path = self._persist_locked(saved, kind=kind)
            token = CheckpointToken(self.fingerprint, step).encode()
            log.info("checkpoint", extra={"event": "checkpoint", "step": step, "path": path, "kind": kind})
            return CheckpointResult(token=token, step=step, path=path)

    def checkpoint_now(self, kind: str = "auto") -> int:
        """Durably saves the generator's current state (shutdown, schedule changes); its step."""
        with self._lock:
            saved = _Saved(self._gen.state(), len(self._events))
            self._persist_locked(saved, kind=kind)
            return saved.state.step

    def update(self, step: int, clip: int = 0, weights: list[float] | None = None) -> int:
        """Schedules an online change from `step` (>= the generated step); returns `step`."""
        with self._lock:
            if step < self._gen.step:
                raise ConfigError(f"step {step} is already generated (generated step {self._gen.step}); "
                                  f"a change must name a step >= {self._gen.step}")
            w = list(weights) if weights else None
            self._gen.schedule(step, clip=clip or None, weights=w)
            self._events.append({"step": int(step), "clip": int(clip) if clip else None, "weights": w})
            self._replayer = None
            self._persist_locked(_Saved(self._gen.state(), len(self._events)), kind="auto")
            log.info("online change scheduled", extra={"event": "update", "step": step, "clip": clip or None,
                                                       "weights": None if w is None else len(w)})
            return int(step)

    def status(self) -> JobStatus:
        with self._lock:
            c = self._gen.counters()
            now = self._clock()
            ranks = tuple(RankView(r, p.next_step, p.delivered_step, max(now - p.last_seen, 0.0), p.streams > 0)
                          for r, p in sorted(self._ranks.items()))
            return JobStatus(
                generated_step=self._gen.step, durable_step=self._durable_step, slowest_step=self._slowest,
                fastest_step=self._fastest(), world=self._world or 0, ranks=ranks,
                active_clusters=int(c.active.sum()), clip=int(self._gen.clip or 0), end_step=self._end_step,
                sizes=c.sizes, draws=c.draws, passes=c.passes, clipped_at=c.clipped_at,
                steps_generated=self._steps_generated, steps_replayed=self._steps_replayed,
                slices_served=self._slices_served, ids_served=self._ids_served)

    @property
    def world(self) -> int | None:
        return self._world

    # -- internals: validation ------------------------------------------------------------------
    def _check_job(self, job: str) -> None:
        if job and job != self.spec.name:
            raise UnknownJob(f"this server serves job {self.spec.name!r}, not {job!r}")

    def _check_world(self, world: int) -> None:
        if self._world is None:
            raise NotJoined("no rank has joined yet: call Join first")
        if world != self._world:
            raise ConfigError(f"world size {world} does not match the job's world size {self._world}")

    def _rank_locked(self, rank: int, world: int) -> RankProgress:
        Topology(rank=rank, world=world)
        self._check_world(world)
        prog = self._ranks.get(rank)
        if prog is None:  # a rank may call again after a server restart without re-joining
            prog = self._ranks[rank] = RankProgress(next_step=self._formed_at, last_seen=self._clock())
            self._recompute_slowest()
        return prog

    def _far_bound(self) -> int:
        base = max(self._slowest, self._high_water, self._gen.step)
        return base + self.spec.max_lag + self.spec.max_lookahead

    def _far_reason(self) -> str:
        return (f"the bound is step {self._far_bound()}: the furthest of slowest rank step {self._slowest} and "
                f"generated step {max(self._gen.step, self._high_water)}, + max lag {self.spec.max_lag} "
                f"+ lookahead {self.spec.max_lookahead}")

    def _check_step(self, step: int, what: str) -> None:
        if step < 0:
            raise StepOutOfRange(f"{what} {step} is negative")
        far = self._far_bound()
        if step > far and not self._is_end(step):
            raise StepOutOfRange(f"{what} {step} is too far ahead ({self._far_reason()})")

    def _is_end(self, step: int) -> bool:
        return self._end_step is not None and step >= self._end_step

    # -- internals: ranks ---------------------------------------------------------------------
    def _reform(self, step: int, world: int) -> None:
        log.info("job re-formed", extra={"event": "reform", "step": step, "world": world,
                                          "old_world": self._world})
        self._world = world
        self._formed_at = step
        self._formation = (step, world)
        self._epoch += 1
        self._ranks = {}
        self._recompute_slowest()
        self._notify_all()

    def _recompute_slowest(self) -> None:
        world = self._world or 0
        steps = [p.next_step for r, p in self._ranks.items() if r < world]
        if len(steps) < world or not steps:
            steps.append(self._formed_at)
        old = self._slowest
        self._slowest = min(steps)
        if self._slowest != old:
            self._trim_locked()
            self._notify_lagged()

    def _fastest(self) -> int:
        return max((p.next_step for p in self._ranks.values()), default=self._formed_at)

    def _after_progress(self, rank: int, old_next: int) -> None:
        if old_next <= self._slowest:  # only the slowest rank's progress can move the slowest step
            self._recompute_slowest()
        self._notify(rank)

    def _notify(self, rank: int) -> None:
        for w in self._waiters.get(rank, ()):
            w.event.set()

    def _notify_all(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                w.event.set()

    def _notify_lagged(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                if w.lagged:
                    w.event.set()

    # -- internals: the sequence --------------------------------------------------------------
    def _trim_locked(self) -> None:
        """Drops batches and snapshots no rank can need without a replay."""
        lo = self._slowest - self.spec.max_lookahead
        for s in [s for s in self._batches if s < lo]:
            del self._batches[s]
        keep_from = max((s for s in self._snapshots if s <= lo), default=0)
        for s in [s for s in self._snapshots if 0 < s < keep_from]:
            del self._snapshots[s]

    def _generate_one_locked(self) -> None:
        gen = self._gen
        step = gen.step
        if step % self.spec.snapshot_every == 0 and step not in self._snapshots:
            self._snapshots[step] = _Saved(gen.state(), len(self._events))
        every = self.spec.checkpoint_every
        if self.store is not None and every and step % every == 0 and step > max(self._durable_step, 0):
            self._persist_locked(_Saved(gen.state(), len(self._events)), kind="auto")
        try:
            self._batches[step] = gen.next_batch()
        except EndOfData:
            self._end_step = step
            log.info("end of data", extra={"event": "end_of_data", "step": step})
            self._notify_all()
            return
        self._steps_generated += 1

    def _batch_locked(self, step: int) -> np.ndarray | None:
        """The global batch of `step`, or None at or past the end of data."""
        b = self._batches.get(step)
        if b is not None:
            return b
        while self._gen.step <= step and self._end_step is None:
            self._generate_one_locked()
        if self._is_end(step):
            return None
        b = self._batches.get(step)
        if b is None:
            b = self._replay_locked(step)
        return b

    def _base_for(self, step: int) -> tuple[Sampler, int]:
        """A sampler positioned at or before `step`, with every online change applied."""
        best: tuple[int, str] = (-1, "")
        if self._replayer is not None and self._replayer[0].step <= step:
            best = (self._replayer[0].step, "replayer")
        snap = max((s for s in self._snapshots if s <= step), default=0)
        if snap > best[0]:
            best = (snap, "snapshot")
        pinned = max((s for s in self._pinned if s <= step), default=-1)
        if pinned > best[0]:
            best = (pinned, "pinned")
        if self.store is not None:
            for s in reversed(self.store.steps()):
                if s <= step:
                    if s > best[0]:
                        try:
                            ck = self.store.load(s)
                            st = SamplerState.from_bytes(ck.state)
                            if st.fingerprint != self.fingerprint:
                                raise StateError(f"checkpoint {ck.path} belongs to sampler {st.fingerprint}")
                            saved = _Saved(st, int(ck.meta.get("n_events", len(ck.meta.get("events", [])))))
                            return self._sampler_from(saved)
                        except StateError as exc:
                            log.warning("checkpoint corrupt, falling back to the previous one",
                                        extra={"event": "checkpoint_corrupt", "path": str(self.store.path_of(s)),
                                               "reason": str(exc)})
                            continue
                    break
        if best[1] == "replayer":
            assert self._replayer is not None
            return self._replayer
        saved = self._snapshots[best[0]] if best[1] == "snapshot" else self._pinned[best[0]]
        return self._sampler_from(saved)

    def _sampler_from(self, saved: _Saved) -> tuple[Sampler, int]:
        s = self._new_sampler()
        s.load_state(saved.state)
        for ev in self._events[saved.n_events:]:
            if ev["step"] < s.step:
                raise StateError(f"online change at step {ev['step']} predates the saved state at step {s.step}")
            s.schedule(ev["step"], clip=ev["clip"], weights=ev["weights"])
        return s, len(self._events)

    def _replay_locked(self, step: int, upto: int | None = None) -> np.ndarray:
        """Recomputes the batches of [step, upto) from the nearest saved state; returns step's."""
        sampler, n = self._base_for(step)
        stop = min(step + self.spec.max_lookahead, self._gen.step) if upto is None else upto
        out = None
        while sampler.step < stop:
            t = sampler.step
            b = sampler.next_batch()  # EndOfData cannot happen before the generator's step
            self._steps_replayed += 1
            if t >= step:
                self._batches[t] = b
                if out is None:
                    out = b
        self._replayer = (sampler, n)
        assert out is not None or upto is not None
        return out  # type: ignore[return-value]

    def _state_at_locked(self, step: int) -> _Saved:
        """The sampler state before `step` (generating or replaying as needed)."""
        if step >= self._gen.step:
            while self._gen.step < step and self._end_step is None:
                self._generate_one_locked()
            return _Saved(self._gen.state(), len(self._events))
        if step in self._snapshots and self._snapshots[step].n_events == len(self._events):
            return self._snapshots[step]
        sampler, n = self._base_for(step)
        while sampler.step < step:
            t = sampler.step
            self._batches.setdefault(t, sampler.next_batch())
            self._steps_replayed += 1
        self._replayer = (sampler, n)
        return _Saved(sampler.state(), n)

    def _persist_locked(self, saved: _Saved, kind: str) -> str:
        step = saved.state.step
        if self.store is None:
            self._pinned[step] = saved
            return ""
        meta = {
            "format": "croupier.checkpoint", "server_version": __version__, "job": self.spec.name,
            "sampler_fingerprint": self.fingerprint, "dataset_fingerprint": self.spec.dataset_fingerprint,
            "global_batch": self.global_batch, "seed": self.seed, "policy": self.config.to_dict(),
            "world": self._world, "formed_at": self._formed_at, "generated_step": self._gen.step,
            "formation": list(self._formation) if self._formation else None,
            "ranks": {str(r): p.next_step for r, p in self._ranks.items()},
            "events": self._events, "n_events": saved.n_events, "end_step": self._end_step,
            "created": time.time(),
        }
        path = self.store.write(step, meta, saved.state.to_bytes(), kind=kind)
        self._durable_step = max(self._durable_step, step)
        log.info("checkpoint written", extra={"event": "checkpoint_written", "step": step, "kind": kind,
                                              "path": str(path)})
        return str(path)

    def _slice_locked(self, step: int, rank: int, world: int) -> SliceData:
        batch = self._batch_locked(step)
        if batch is None:
            return SliceData(step=step, ids=np.empty(0, dtype=np.int64), end=True)
        p = self.global_batch // world  # divisibility was checked when the rank joined
        ids = batch[rank * p:(rank + 1) * p]
        self._slices_served += 1
        self._ids_served += len(ids)
        return SliceData(step=step, ids=ids)


class SliceStream:
    """One open stream of a rank's slices (StreamSlices); made by `Job.open_stream`.

    `next_chunk()` blocks until at least one slice is deliverable under flow control and
    returns consecutive slices of this stream's steps (several when available), or None
    when the stream is finished (stop step reached, end of data sent, or cancelled). Call
    `cancel()` from another thread to release a waiting `next_chunk()`, and `close()` once.
    """

    def __init__(self, job: Job, rank: int, world: int, first: int, lookahead: int, stride: int,
                 stop_step: int, waiter: _Waiter, epoch: int) -> None:
        self._job = job
        self.rank = rank
        self.world = world
        self.next = first
        self.lookahead = lookahead
        self.stride = stride
        self.stop = stop_step
        self._waiter = waiter
        self._epoch = epoch
        self.finished = False
        self._closed = False

    def cancel(self) -> None:
        self._waiter.cancelled = True
        self._waiter.event.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        job = self._job
        with job._lock:
            job._waiters.get(self.rank, set()).discard(self._waiter)
            prog = job._ranks.get(self.rank)
            if prog is not None and self._epoch == job._epoch:
                prog.streams = max(prog.streams - 1, 0)
                prog.last_seen = job._clock()
        log.info("stream closed", extra={"event": "stream_close", "rank": self.rank, "next": self.next})

    def __iter__(self) -> Iterator[list[SliceData]]:
        while True:
            chunk = self.next_chunk()
            if chunk is None:
                return
            yield chunk

    def next_chunk(self, poll: float = 10.0) -> list[SliceData] | None:
        job = self._job
        while True:
            if self._waiter.cancelled or self.finished:
                return None
            self._waiter.event.clear()
            with job._lock:
                if self._epoch != job._epoch:
                    raise JobReformed(f"the job was re-formed at step {job._formed_at} with world size {job._world}; "
                                      "join again")
                chunk = self._collect_locked()
            if chunk:
                return chunk
            if self.finished:
                return None
            self._waiter.event.wait(poll)

    def _collect_locked(self) -> list[SliceData]:
        job = self._job
        prog = job._ranks.get(self.rank)
        if prog is None:
            raise JobReformed("the rank is no longer part of the job; join again")
        own_bound = prog.next_step + self.lookahead
        lag_bound = job._slowest + job.spec.max_lag
        bound = min(own_bound, lag_bound)
        self._waiter.lagged = lag_bound <= own_bound
        if self.stop:
            bound = min(bound, self.stop)
        out: list[SliceData] = []
        n_ids = 0
        while self.next < bound or job._is_end(self.next):
            if self.stop and self.next >= self.stop:
                break
            sl = job._slice_locked(self.next, self.rank, self.world)
            out.append(sl)
            n_ids += len(sl.ids)
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
