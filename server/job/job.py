"""One training job as the sampler server sees it (free of gRPC): the coordinator of its parts, under one lock.

`Job` owns the one lock and the one source of truth (the sequence window, the rank table, the
formation, the generated high-water step) and calls its parts under that lock, each doing one
thing with no lock of its own: `flow` (waiters, bounds, streams), `ranks` (positions, liveness),
`checkpoints` (schedule, mark, payload), `recovery` (where a restart resumes), `changes` (online
changes), `adaptive` (loss feedback), `slices` (a rank's cut of a step), `status`.

Every public method takes the lock briefly; waiting (flow control) and checkpoint I/O happen
outside it. Two documented exceptions write under the lock: an online change (`update`) is
made durable before any batch can use it, and when a burst of generation outruns the background
writer the mark is written in line (`Checkpoints.ensure_mark`). Values and errors: `types`, `status`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from croupier.errors import ConfigError, CroupierError, EndOfData
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.checkpoint_writer import CheckpointMeta, WriterHealth
from croupier.server.durability.resume_token import ResumeToken
from croupier.server.durability.state_dir import Checkpoint, StateDir
from croupier.server.feedback.adapt import Adapter, AdaptSpec
from croupier.server.feedback.loss_validation import layout_group_of
from croupier.server.job.adaptive import Adaptation, LossSteps
from croupier.server.job.changes import OnlineChanges, requested_change
from croupier.server.job.checkpoints import MARK_AHEAD_WINDOWS, Checkpoints, snapshot
from croupier.server.job.flow import (
    MAX_IDS_PER_MESSAGE,
    MAX_SLICES_PER_MESSAGE,
    Flow,
    SliceStream,
    Waiter,
    stream_shape,
)
from croupier.server.job.ranks import RankProgress, RankTable, RankView
from croupier.server.job.recovery import Recovery, restore_parts, resume_point, state_point
from croupier.server.job.slices import cut_slice, per_rank_size, read_slice
from croupier.server.job.status import AdaptView, ChangeHistory, JobStatus, job_status
from croupier.server.job.token_tally import TokenTally, mixture_cluster_of, tokens_lookup
from croupier.server.job.types import (
    CheckpointResult,
    CheckpointUnavailable,
    JobReformed,
    JobSpec,
    JoinResult,
    NotJoined,
    SliceData,
    StateDirInvalid,
    StepOutOfRange,
    UnknownJob,
)
from croupier.server.sampling.mix_sampler import MixSampler, SourceCounters
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.sequence_window import Saved, SequenceWindow
from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule, TokenStep
from croupier.topology import Topology

if TYPE_CHECKING:
    from croupier.mixture import Mixture

log = logging.getLogger(__name__)

__all__ = ["Job", "JobSpec", "JobStatus", "AdaptView", "SliceData", "SliceStream", "JoinResult", "CheckpointResult",
           "RankProgress", "RankView", "StepOutOfRange", "UnknownJob", "NotJoined", "JobReformed",
           "CheckpointUnavailable", "StateDirInvalid", "MAX_SLICES_PER_MESSAGE", "MAX_IDS_PER_MESSAGE",
           "MARK_AHEAD_WINDOWS"]


class Job:
    """The sampler server's domain object; see the module docstring.

    fresh: set aside (into a `stale-*` folder) whatever the state directory holds and start
        at step 0; without it, a state directory whose checkpoints are all invalid is refused.
    fault_hook: passed to the checkpoint writer (called with each target path before a write).
    """

    def __init__(self, layout: ClusterLayout, config: PolicyConfig, global_batch: int, seed: int = 0,
                 spec: JobSpec | None = None, store: CheckpointStore | None = None,
                 clock: Callable[[], float] = time.monotonic, *, fresh: bool = False,
                 fault_hook: Callable[[Path], None] | None = None, mixture: Mixture | None = None,
                 adapt: AdaptSpec | None = None, token_counts: list[tuple[int, np.ndarray]] | None = None,
                 accept_log_damage: bool = False,
                 tokens: tuple[TokenSchedule, list[tuple[int, np.ndarray]], int] | None = None) -> None:
        self.mixture = mixture
        self.tokens = tokens  # steps in tokens: (schedule, per-sample counts, documents per draw)
        if tokens is not None:
            global_batch = tokens[2]
        self.config = config
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.spec = spec or JobSpec()
        self.store = store
        self._lock = threading.Lock()
        self.layout = layout
        self._recovery: Recovery | None = None
        self._seq = SequenceWindow(self._new_sampler, self.spec.snapshot_every, self.spec.max_lookahead,  # replays
                                   None if store is None else lambda step: self._recovery.load_saved(step))  # type: ignore[union-attr]
        gen = self._seq.gen
        self.layout = gen.layout
        self.fingerprint = gen.fingerprint
        self._table = RankTable(self.spec.rank_timeout_s, clock)
        self._flow = Flow(self._table, self.spec.max_lag, self.spec.max_lookahead, self._slice_locked,
                          self._seq.is_end, self._read_slice_locked)
        self._formation: tuple[int, int] | None = None  # (token step, world) of the last re-form
        self._high_water = 0  # highest step this job's generator is known to have reached
        self._slices_served = 0
        self._ids_served = 0
        self.resumed_from: int | None = None
        self._log_start = ""
        self._adaptation = None if adapt is None else Adaptation.for_generator(adapt, gen, self.layout)
        self._tally: TokenTally | None = None
        if token_counts:
            cluster_of = mixture_cluster_of(gen) or layout_group_of(self.layout)
            self._tally = TokenTally(self.layout.num_clusters, tokens_lookup(token_counts), cluster_of)
        names = None if mixture is None else [info.name for info in mixture.infos]
        self._changes = OnlineChanges(self._seq, self._new_sampler, ChangeHistory(names), self._adaptation)
        self._ckpt = Checkpoints(store, self.fingerprint, self.spec.checkpoint_every, self.spec.max_lookahead,
                                 fault_hook)
        if store is not None:
            recovery = self._recovery = Recovery(StateDir(store), self.fingerprint)
            try:
                self._resume(fresh, accept_log_damage)
                self._changes.open_log(recovery.state_dir.log_path, self.resumed_from is not None,
                                       lambda: recovery.changes(None), self._ckpt.records_changed)
            except BaseException:
                self._changes.close()
                self._ckpt.stop()
                raise

    # -- construction and recovery --------------------------------------------------------------
    def _new_sampler(self) -> Sampler | MixSampler:
        if self.tokens is not None:
            schedule, pieces, chunk = self.tokens
            return TokenDealer(self._new_document_sampler, pieces, schedule, chunk)  # type: ignore[return-value]
        return self._new_document_sampler()

    def _new_document_sampler(self) -> Sampler | MixSampler:
        if self.mixture is not None:
            return mixture_sampler(self.mixture, self.global_batch, self.seed)
        return Sampler(self.layout, self.config, self.global_batch, self.seed)

    def _resume(self, fresh: bool, accept_log_damage: bool) -> None:
        assert self._recovery is not None
        if fresh:
            self._recovery.set_aside()
            self._log_start = "ok (started fresh)"
            return
        mark = self._ckpt.read_mark()  # both copies of the event log checked against it: repaired, or refused
        self._log_start = self._recovery.check_records(mark, self._ckpt.read_mark_records(), accept_log_damage)
        ck = self._recovery.newest()
        if ck is not None:
            self._restore(ck, mark)
        elif mark > 0:
            self._high_water = mark
            self._ckpt.resumed(None, mark)
            log.info("no checkpoint; generated-step mark found",
                     extra={"event": "resumed_mark", "mark": mark, "path": self._ckpt.mark_path})

    def _restore(self, ck: Checkpoint, mark: int) -> None:
        """Puts every part back where the checkpoint `ck` (and the generated-step mark) left it."""
        assert self._recovery is not None
        self._high_water = restore_parts(ck, mark, self._recovery, self._seq, self._changes, self._adaptation,
                                         self._tally, self._ckpt, self._table, self.spec.checkpoint_every)
        self._formation = ck.meta.formation
        self.resumed_from = ck.step

    # -- what the job is ------------------------------------------------------------------------
    @property
    def policy_name(self) -> str:
        """The policy (JobInfo.policy): a single source's, or "mixture"."""
        config = getattr(self._seq.gen, "config", None)  # None: a mixture dealt in tokens
        return "mixture" if isinstance(self._seq.gen, MixSampler) or config is None else config.policy

    @property
    def token_schedule(self) -> TokenSchedule | None:
        """A job dealt in tokens: its schedule with the online changes of G made so far."""
        return None if self.tokens is None else self._seq.gen.schedule  # type: ignore[union-attr]

    @property
    def policy_json(self) -> str:
        """The full sampling config as canonical JSON (JobInfo.policy_json)."""
        return json.dumps(self._seq.gen.config_dict, sort_keys=True, separators=(",", ":"))

    @property
    def adapter(self) -> Adapter | None:
        """The adaptive job's adapter (None for other jobs)."""
        return None if self._adaptation is None else self._adaptation.adapter

    @property
    def world(self) -> int | None:
        return self._table.world

    def check_job(self, job: str) -> None:
        """UnknownJob unless `job` is empty or this job's name."""
        if job and job != self.spec.name:
            raise UnknownJob(f"this server serves job {self.spec.name!r}, not {job!r}")

    # -- ranks ------------------------------------------------------------------------------------
    def join(self, rank: int, world: int, job: str = "", global_batch: int = 0,
             resume_token: str = "", client_version: str = "", sampler_state: bytes = b"") -> JoinResult:
        """Registers a rank; returns where it resumes. A resume token re-forms the job at the
        token's step, possibly with another world size; so does a `sampler_state` saved
        elsewhere (an embedded reader's), which the job continues from, and checkpoints, when
        its generator has not reached that step (`recovery.state_point`)."""
        self.check_job(job)
        adopted = None
        with self._lock:
            token = resume_point(resume_token, self.fingerprint, self._seq.end_step) if resume_token else None
            Topology(rank=rank, world=world)
            if global_batch and global_batch != self.global_batch:
                raise ConfigError(f"global batch {global_batch} does not match the job's global batch "
                                  f"{self.global_batch}")
            p = per_rank_size(self.token_schedule, self.global_batch, world)
            at = None if token is None else token.step
            if token is None and sampler_state:
                at, took = state_point(sampler_state, self.fingerprint, self._seq, self._adaptation is not None)
                adopted = at if took else None
                if took:
                    self._high_water = max(self._high_water, at)
                    if self._tally is not None:
                        self._tally.restart(at)
            if at is not None and (self._formation != (at, world) or self._table.world != world):
                self._reform_locked(at, world)
            prog = self._table.join(rank, world, at)
            self._recompute_locked()
            log.info("rank joined", extra={"event": "join", "rank": rank, "world": world,
                                           "next_step": prog.next_step, "client_version": client_version,
                                           "resume_step": at, "adopted_state": adopted is not None})
        if adopted is not None and self.store is not None:
            try:
                self.checkpoint(adopted, kind="auto")
            except CroupierError as exc:  # the job goes on; the state is still in memory
                log.warning("could not checkpoint an adopted sampler state: %s", exc,
                            extra={"event": "adopt_checkpoint", "step": adopted})
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

    def ack_lanes(self, job: str, acks: list[tuple[int, int, int, int, int]]) -> list[CroupierError | None]:
        """Acknowledgements, each (rank, world, next_step, step_stride, step_offset): the stream
        (stride, offset) of the rank consumed every one of its steps before next_step. Applied
        in order under one lock acquisition, with the slowest step's consequences (trim, waking
        lagged waiters) applied once at the end. A session carrying a node's lanes acknowledges
        them together this way. Returns, per acknowledgement, None or the error that refused
        it (the others still apply)."""
        self.check_job(job)
        out: list[CroupierError | None] = []
        notify: set[int] = set()
        lag_moved = recompute = False
        with self._lock:
            far = self._flow.far_bound(self._generated())
            for rank, world, next_step, step_stride, step_offset in acks:
                try:
                    stride = self._flow.check_ack(next_step, step_stride, step_offset, far, self._generated())
                    self._rank_locked(rank, world)
                except CroupierError as exc:
                    out.append(exc)
                    continue
                readmitted, moved, slowest_moved = self._table.acknowledge(rank, next_step, stride, step_offset)
                recompute = recompute or readmitted
                lag_moved = lag_moved or slowest_moved
                if moved or readmitted:
                    notify.add(rank)
                out.append(None)
            if recompute:
                self._recompute_locked()
            if lag_moved:
                self._trim_locked()
                self._flow.notify_lagged()
            for rank in notify:
                self._flow.notify(rank)
        return out

    # -- slices: GetSlice and streams -------------------------------------------------------------
    def begin_get_slice(self, rank: int, world: int, step: int, job: str = "") -> Waiter:
        """Validates a GetSlice and registers its waiter; pair with `try_slice` (until it has
        the slice, waiting on the waiter's event in between) and `end_wait`."""
        self.check_job(job)
        with self._lock:
            self._rank_locked(rank, world)
            self._flow.check_step(step, "step", self._generated())
            if self._table.seen(rank):
                self._recompute_locked()
            return self._flow.wait_on((rank,))

    def try_slice(self, rank: int, world: int, step: int) -> SliceData | None:
        """Rank's slice of `step` when the lag bound lets it through now, else None. Read-only:
        the rank's position does not move."""
        with self._lock:
            self._check_world(world)
            return self._slice_locked(step, rank, world) if self._flow.releases(step) else None

    def end_wait(self, rank: int, waiter: Waiter) -> None:
        with self._lock:
            self._flow.discard((rank,), waiter)

    def open_stream(self, rank: int, world: int, start_step: int, lookahead: int = 0, step_stride: int = 1,
                    step_offset: int = 0, stop_step: int = 0, job: str = "", read_only: bool = False,
                    rank_count: int = 1) -> SliceStream:
        """A cursor that yields the rank's slices from `start_step` under flow control. Opening
        it never moves the rank's position (only acknowledgements do).

        rank_count > 1: the stream carries ranks rank .. rank + rank_count - 1 (a node agent's
        ranks); each of its slices is those ranks' slices one after another, and a step is
        delivered only when every one of them may receive it."""
        self.check_job(job)
        stride, count, la = stream_shape(rank, world, lookahead, step_stride, step_offset, stop_step, rank_count,
                                         self.spec.max_lookahead)
        ranks = range(rank, rank + count)
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
            if read_only:  # a reader of any step: no bound but the data's end (it moves no rank)
                if start_step < 0:
                    raise StepOutOfRange(f"start step {start_step} is negative")
            else:
                self._flow.check_step(start_step, "start step", self._generated())
            first = start_step + ((step_offset - start_step) % stride)
            waiter = self._flow.wait_on(ranks)
            epoch = self._flow.epoch
        log.info("stream opened", extra={"event": "stream_open", "rank": rank, "rank_count": count,
                                         "start_step": start_step, "stride": stride, "offset": step_offset,
                                         "read_only": read_only})
        return SliceStream(self, rank, world, first, la, stride, stop_step, waiter, epoch, read_only, count)

    def poll_stream(self, stream: SliceStream) -> list[SliceData] | None:
        """`SliceStream.poll`: the stream's slices deliverable now, None when it is finished."""
        with self._lock:
            return self._flow.poll(stream)

    def poll_streams(self, streams: Iterable[SliceStream]) -> list[list[SliceData] | None | CroupierError]:
        """`poll_stream` of many streams under one lock acquisition (a session's woken lanes);
        per stream its slices, None when finished, or the error that ended it."""
        out: list[list[SliceData] | None | CroupierError] = []
        with self._lock:
            for st in streams:
                try:
                    out.append(self._flow.poll(st))
                except CroupierError as exc:
                    out.append(exc)
        return out

    def close_stream(self, stream: SliceStream) -> None:
        """`SliceStream.close`: its waiter goes, its ranks count one open stream less."""
        with self._lock:
            self._flow.closed(stream)

    # -- checkpoints and changes ----------------------------------------------------------------
    def checkpoint(self, step: int, job: str = "", kind: str = "token", include_state: bool = False) -> CheckpointResult:
        """Makes the sampler state before `step` durable; returns the token that resumes there
        (and, with `include_state`, the state itself, for an embedded reader).

        The state is taken under the lock, written without it. CheckpointUnavailable when the
        state directory refuses the write (the job goes on serving)."""
        self.check_job(job)
        with self._lock:
            if step < 0:
                raise StepOutOfRange(f"checkpoint step {step} is negative")
            if step > self._flow.far_bound(self._generated()):
                raise StepOutOfRange(f"checkpoint step {step} is too far ahead "
                                     f"({self._flow.far_reason(self._generated())})")
            if self._seq.end_step is not None and step > self._seq.end_step:
                raise StepOutOfRange(f"checkpoint step {step} is past the end of data at step {self._seq.end_step}")
            saved = self._seq.state_at(step, self._generate_one_locked)
            self._seq.pin(step, saved)
            meta, data = self._snapshot_locked(saved)
        path = self._ckpt.write(step, meta, data, kind)
        token = ResumeToken(self.fingerprint, step).encode()
        log.info("checkpoint", extra={"event": "checkpoint", "step": step, "path": path, "kind": kind})
        return CheckpointResult(token=token, step=step, path=path,
                                sampler_state=saved.state.to_bytes() if include_state else b"")

    def checkpoint_now(self, kind: str = "auto") -> int:
        """Durably saves the generator's current state (shutdown); its step. Raises
        CheckpointUnavailable when the state directory refuses the write."""
        with self._lock:
            saved = self._seq.current()
            self._seq.pin(saved.state.step, saved)
            meta, data = self._snapshot_locked(saved)
        self._ckpt.write(saved.state.step, meta, data, kind)
        return saved.state.step

    def update(self, step: int, clip: int = 0, weights: list[float] | None = None, *, source: str = "",
               source_weight: float | None = None, source_weights: list[float] | None = None,
               global_tokens: int = 0) -> int:
        """Schedules an online change from `step` (>= the generated step); returns `step`.

        `source` (a mixture source's name) makes `clip` and `source_weight` apply to that
        source; `source_weights` sets every source's weight; `global_tokens` (a job dealt in
        tokens) sets G from `step` on, divisible by the world. The change is durable before
        this returns, and before any batch can use it: it is logged under the lock, and not
        applied when it cannot be (CheckpointUnavailable)."""
        with self._lock:
            change = requested_change(self._seq.gen, step, clip, weights, source=source, source_weight=source_weight,
                                      source_weights=source_weights, global_tokens=global_tokens, world=self.world)
            self._changes.record(change)
            log.info("online change scheduled", extra={"event": "update", "step": step, "clip": clip or None,
                                                       "weights": None if change.weights is None else len(change.weights),
                                                       "source": source or None, "source_weight": source_weight,
                                                       "global_tokens": global_tokens or None})
            return int(step)

    # -- loss feedback --------------------------------------------------------------------------
    def report_losses(self, rank: int, world: int, steps: LossSteps, job: str = "") -> tuple[int, list[tuple[int, str, str]]]:
        """Folds a rank's per-sample losses of trained steps into the loss statistics.

        Returns (steps accepted, [(step, rule, message)] refused). A step is refused, changing
        nothing, when the rank was never dealt it, or its report breaks a rule (length,
        finite, non-negative, mask-length, id, duplicate); the other steps still count."""
        self.check_job(job)
        a = self._adaptation
        if a is None:
            raise ConfigError("this job does not adapt its weights (serve --adapt NAME): loss reports are not used")
        with self._lock:
            prog = self._rank_locked(rank, world)
            dealt = max(prog.delivered_step, prog.next_step)
            accepted, refused = a.report(rank, dealt, steps, lambda step: self._slice_locked(step, rank, world))
        a.log_refused(rank, refused)
        return accepted, refused

    # -- status and upkeep ----------------------------------------------------------------------
    def status(self) -> JobStatus:
        with self._lock:
            self._recompute_locked()
            return job_status(self._seq, self._table, self._ckpt.durable_step, self._ckpt.health(), self._changes,
                              self._adaptation, self._tally, self._slices_served, self._ids_served, self._log_start)

    def source_counters(self) -> SourceCounters | None:
        """Per-source weights, clips, draws and exhaustion of a mixture (None for one source)."""
        if not hasattr(self._seq.gen, "source_counters"):  # a MixSampler or a token-exact mixture's dealer
            return None
        with self._lock:
            return self._seq.gen.source_counters()

    def checkpoint_health(self) -> WriterHealth | None:
        """The checkpoint writer's state (None without a state directory)."""
        return self._ckpt.health()

    def tick(self) -> float:
        """Re-derives liveness (a rank may have turned silent); returns seconds until the next
        rank could. The server calls it periodically."""
        with self._lock:
            self._recompute_locked()
            return self._table.next_deadline()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until the background checkpoint writer has nothing pending; True when drained."""
        return self._ckpt.flush(timeout)

    def close(self) -> None:
        """Stops the background checkpoint writer (after it drains) and closes the event log.
        Idempotent; the job serves nothing durable after it."""
        try:
            self._ckpt.close()
        finally:
            self._changes.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called under the lock) ------------------------------------------------------
    def _generated(self) -> int:
        """The highest step the generator is known to have reached (here, or before a restart: the mark)."""
        return max(self._seq.gen.step, self._high_water)

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

    def _reform_locked(self, step: int, world: int) -> None:
        log.info("job re-formed", extra={"event": "reform", "step": step, "world": world,
                                          "old_world": self._table.world})
        self._formation = (step, world)
        self._table.reset(world, step)
        self._trim_locked()
        self._flow.reformed()

    def _recompute_locked(self) -> None:
        before = self._table.silent
        if self._table.recompute():
            self._trim_locked()
            self._flow.notify_lagged()
        if self._table.silent != before:
            for r in self._table.silent - before:
                log.warning("rank silent past the liveness timeout; no longer holding the others back",
                            extra={"event": "rank_silent", "rank": r, "timeout_s": self._table.timeout_s})
            for r in before - self._table.silent:
                log.info("rank back", extra={"event": "rank_back", "rank": r})

    def _trim_locked(self) -> None:
        """Drops batches and snapshots no rank can need without a replay."""
        self._seq.trim(self._table.slowest - self.spec.max_lookahead)

    def _snapshot_locked(self, saved: Saved) -> tuple[CheckpointMeta, bytes]:
        """(meta, payload) of a checkpoint of `saved`: the sampler state, the token tally (when
        the state is the generator's own) and the adapter's statistics."""
        t = self._table
        meta = CheckpointMeta(
            job=self.spec.name, sampler_fingerprint=self.fingerprint,
            dataset_fingerprint=self.spec.dataset_fingerprint, global_batch=self.global_batch, seed=self.seed,
            policy=self._seq.gen.config_dict, world=t.world, formed_at=t.formed_at,
            generated_step=self._generated(), formation=self._formation, ranks=t.positions(),
            events=() if self._changes.in_log else tuple(c.to_dict() for c in self._seq.events),
            n_events=saved.n_events, end_step=self._seq.end_step, created=time.time(),
            events_in_log=self._changes.in_log, events_digest=self._changes.digest_upto(saved.n_events))
        at_generator = self._tally is not None and saved.state.step == self._seq.gen.step
        tally = self._tally.to_bytes(saved.state.step) if at_generator and self._tally is not None else None
        adapter = None if self._adaptation is None else self._adaptation.to_bytes()
        return snapshot(meta, saved.state, tally, adapter)

    def _generate_one_locked(self) -> None:
        """Generates the generator's next step, its duties first: the controller's decision, the
        in-memory snapshot, the automatic checkpoint, the generated-step mark."""
        gen = self._seq.gen
        step = gen.step
        if self._adaptation is not None:
            self._adaptation.decide(step, self._high_water, self._changes.record)
        self._seq.snapshot_due()
        if self._ckpt.auto_due(step):
            saved = self._seq.current()
            self._seq.pin(step, saved)
            self._ckpt.submit_auto(step, *self._snapshot_locked(saved))
        self._ckpt.ensure_mark(step + 1)
        try:
            batch = gen.next_batch()
        except EndOfData:
            self._seq.end_step = step
            log.info("end of data", extra={"event": "end_of_data", "step": step})
            self._flow.notify_all()
            return
        self._seq.generated(step, batch)
        if self._tally is not None:
            self._tally.add(batch.ids if isinstance(batch, TokenStep) else batch)

    def _batch_locked(self, step: int) -> np.ndarray | None:
        """The global batch of `step`, or None at or past the end of data."""
        return self._seq.batch(step, self._generate_one_locked)

    def _read_slice_locked(self, step: int, rank: int, world: int, count: int, stream: SliceStream) -> SliceData | None:
        """A read-only slice: the shared window within the ranks' lag bound, else the reader's own sampler up to
        its stop; an endless reader, or an adaptive job's step, waits past the generated step."""
        if step < self._table.slowest + self.spec.max_lag:  # where the ranks' bound lets the shared window go
            return self._slice_locked(step, rank, world, count)
        return read_slice(self._seq, step, rank, world, count, stream, self.global_batch,
                          wait=(self._adaptation is not None or not stream.stop) and step >= self._generated())

    def _slice_locked(self, step: int, rank: int, world: int, count: int = 1) -> SliceData:
        """The slice of ranks rank .. rank + count - 1 of `step` (one after another)."""
        batch = self._batch_locked(step)
        if batch is None:
            return SliceData(step=step, ids=np.empty(0, dtype=np.int64), end=True)
        out = cut_slice(step, batch, rank, world, count, self.global_batch)  # divisibility checked at join
        self._slices_served += 1
        self._ids_served += len(out.ids)
        return out
