"""A job's online changes: validated, made durable before any batch can use them, then scheduled.

An online change (an operator's `croupier update`, a controller's proposal) names a step not
generated yet. It is first validated against the job's sampler (on a probe, leaving the
generator untouched), then appended to the state directory's event log (`change_log`; the
append is fsynced under the job's lock: no batch may use a change that a crash could lose),
and only then scheduled on the sequence. When the log refuses the write the change is not
applied and the caller gets CheckpointUnavailable; the server keeps serving.

`OnlineChanges` holds no lock: the job calls it under its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from croupier.errors import ConfigError
from croupier.server.durability.change_log import change_to_event
from croupier.server.durability.log_copies import MirroredLog
from croupier.server.durability.state_dir import StateDirInvalid
from croupier.server.job.adaptive import Adaptation
from croupier.server.job.status import ChangeHistory
from croupier.server.job.types import CheckpointUnavailable
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.sequence_window import SequenceWindow
from croupier.server.sampling.state import Change

log = logging.getLogger(__name__)

__all__ = ["OnlineChanges", "requested_change"]


def requested_change(gen: Sampler | MixSampler, step: int, clip: int = 0, weights: Sequence[float] | None = None, *,
                     source: str = "", source_weight: float | None = None,
                     source_weights: Sequence[float] | None = None, global_tokens: int = 0,
                     world: int | None = None) -> Change:
    """The change an update request asks for (see `Job.update`); ConfigError names what is wrong."""
    if step < gen.step:
        raise ConfigError(f"step {step} is already generated (generated step {gen.step}); "
                          f"a change must name a step >= {gen.step}")
    if global_tokens:
        schedule = getattr(gen, "schedule", None)
        if schedule is None:
            raise ConfigError(f"global tokens {global_tokens}: this job deals documents (--global-batch); a change "
                              "of global tokens per step applies to a job dealt in tokens")
        if clip or weights or source or source_weight is not None or source_weights:
            raise ConfigError("a change of global tokens per step changes only that: give other changes separately")
        new = schedule.from_step(int(step), int(global_tokens))  # the schedule's own checks (range)
        if world:
            new.check_world(world)
        return Change(step=int(step), global_tokens=int(global_tokens))
    w = list(weights) if weights else None
    src_index: int | None = None
    if source or source_weight is not None or source_weights:
        if not isinstance(gen, MixSampler):
            raise ConfigError(f"this job serves one dataset: a source change (source {source!r}) "
                              "applies to mixtures (serve --mix)")
        if source_weight is not None and not source:
            raise ConfigError("a source weight names its source (--source NAME)")
        if source:
            src_index = gen.source_index(source)
    return Change(step=int(step), clip=int(clip) if clip else None,
                  weights=None if w is None else tuple(float(x) for x in w), source=src_index,
                  source_weight=None if source_weight is None else float(source_weight),
                  source_weights=tuple(float(x) for x in source_weights) if source_weights else None)


class OnlineChanges:
    """Records the online changes of one job's sequence (see the module docstring).

    new_sampler: a fresh sampler of the job (the probe a change is validated on).
    history: what status shows of the changes; adaptation: the adaptive job's controller
    (kept aware of the weights in force), None for other jobs.
    """

    def __init__(self, seq: SequenceWindow, new_sampler: Callable[[], Sampler | MixSampler],
                 history: ChangeHistory, adaptation: Adaptation | None) -> None:
        self._seq = seq
        self._new_sampler = new_sampler
        self.history = history
        self._adaptation = adaptation
        self.log: MirroredLog | None = None
        self.failures = 0  # event-log writes refused
        self._on_logged: Callable[[int, str], None] | None = None

    @property
    def in_log(self) -> bool:
        """Whether changes are kept in the event log (a checkpoint then stores only their count)."""
        return self.log is not None

    def record(self, change: Change) -> None:
        """Validates, logs (durably, before use) and schedules a change."""
        probe = self._new_sampler()  # validates against the job's sampler without touching the generator
        probe.load_state(self._seq.gen.state())
        probe.schedule_change(change)
        if self.log is not None:
            if self.log.closed:
                raise CheckpointUnavailable(f"online change not applied: the event log {self.log.path} is closed "
                                            "(the job has stopped)")
            missing = [p for p in self.log.paths if not p.exists()]
            if missing:
                self.failures += 1
                raise CheckpointUnavailable(f"online change not applied: {missing[0]} was removed while the job ran "
                                            "(a change written there would not survive a restart); restore the state "
                                            "directory, the server keeps serving")
            try:
                self.log.append(change_to_event(change))
            except OSError as exc:
                self.failures += 1
                raise CheckpointUnavailable(f"online change not applied: the event log {self.log.path} refuses "
                                            f"writes ({exc.strerror or exc}); the server keeps serving") from None
            if self._on_logged is not None:
                self._on_logged(len(self.log), self.log.digest)
        self._seq.add_change(change)
        self.history.note(change)
        if self._adaptation is not None:
            self._adaptation.note(change)

    def restored(self, changes: list[Change], n_applied: int) -> None:
        """The sequence resumed from a checkpoint holding the first `n_applied` of `changes`:
        the rest (durable in the log, made after it) are scheduled again."""
        self._seq.events = list(changes)
        for ev in changes[n_applied:]:
            self._seq.gen.schedule_change(ev)
            if self._adaptation is not None:
                self._adaptation.note(ev)
        for ev in changes:
            self.history.note(ev)

    def digest_upto(self, n: int) -> str:
        """The running digest of the log's first n records (hex; "" without a log)."""
        if self.log is None or n >= len(self.log.digests):
            return ""
        return self.log.digests[n].hex()

    def close(self) -> None:
        """Closes the event log (idempotent). Changes recorded after it are no longer durable:
        the job calls it when it stops."""
        if self.log is not None:
            self.log.close()

    def open_log(self, path: Path, resumed: bool, logged: Callable[[], list[Change]],
                 on_logged: Callable[[int, str], None] | None = None) -> None:
        """Opens the state directory's event log and its copy (checked by `log_copies.reconcile`
        before) and reconciles them with the changes the job restored. `resumed`: the job
        resumed from a checkpoint; `logged()`: the changes the log holds, read when they must be
        scheduled from step 0; `on_logged(records, digest)`: after every append (the mark)."""
        self.log = MirroredLog(path.parent)
        self._on_logged = on_logged
        events = self._seq.events
        if events and len(self.log) == 0:
            # A checkpoint from before the event log listed them: they move into the log, once.
            for ch in events:
                self.log.append(change_to_event(ch))
        elif not resumed and not events and len(self.log):
            # Changes made before the first checkpoint: durable in the log, scheduled from step 0.
            # The adapter (no checkpoint holds it) is told of them in order, as it was when they
            # were recorded: the weights in force and the operator's prior it proposes from.
            self._seq.events = logged()
            for ev in self._seq.events:
                self._seq.gen.schedule_change(ev)
                self.history.note(ev)
                if self._adaptation is not None:
                    self._adaptation.note(ev)
        elif len(self.log) != len(events):
            raise StateDirInvalid(f"{self.log.path} holds {len(self.log)} changes but the job restored "
                                  f"{len(events)}")
        if on_logged is not None:  # the mark records the log from the start
            on_logged(len(self.log), self.log.digest)
