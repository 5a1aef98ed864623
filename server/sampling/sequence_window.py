"""The sequence window of a job: the generated global batches and how any step is recomputed.

A live generator (`Sampler` or `MixSampler`) produces global batches in step order; recent
batches stay in memory, so every request (and re-request) of a step in the window returns
identical ids. A step older than the window is recomputed by replaying a sampler restored
from the nearest saved state at or before it (an in-memory snapshot, a checkpoint this
server wrote or loaded, a checkpoint in the state directory, or the fresh state of step 0)
and re-applying the online changes (the typed change list) that state does not hold yet.
The sequence is deterministic, so replay is exact.

The window knows nothing of ranks, flow control or disks: generating one step is the job's
(`generate_one`, which runs the job's per-step duties first), and a checkpoint from the state
directory arrives through `load_saved`. Like the rank table, it has no lock of its own: the
job calls it under its lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from croupier.errors import EndOfData, StateError
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import Change, SamplerState

Generator = Sampler | MixSampler

def json_key(change: Change) -> str:
    """A change's identity for comparisons (its serialized form, origin aside)."""
    d = change.to_dict()
    d.pop("origin", None)
    return json.dumps(d, sort_keys=True)


PINNED_KEPT = 16
"""Checkpoint states kept in memory (the newest), for replays near them."""


@dataclass
class Saved:
    """An in-memory sampler state and how many online changes it already holds."""

    state: SamplerState
    n_events: int


class SequenceWindow:
    """Batches of the recent steps, saved states, and replay (see the module docstring).

    new_sampler: a fresh generator of the job (same layout, policy, batch and seed).
    snapshot_every: an in-memory state is kept every this many generated steps.
    lookahead: the most steps a replay recomputes past the one asked for (a rank's window).
    load_saved: the newest valid checkpoint at or before a step from the state directory, as
        (its step, its state), or None (consulted only when the in-memory states are further than snapshot_every away).
    """

    def __init__(self, new_sampler: Callable[[], Generator], snapshot_every: int, lookahead: int,
                 load_saved: Callable[[int], tuple[int, Saved] | None] | None = None) -> None:
        self._new_sampler = new_sampler
        self.snapshot_every = snapshot_every
        self.lookahead = lookahead
        self._load_saved = load_saved
        self.gen: Generator = new_sampler()
        self.batches: dict[int, np.ndarray] = {}
        self.snapshots: dict[int, Saved] = {0: Saved(self.gen.state(), 0)}
        self.pinned: dict[int, Saved] = {}  # states of checkpoints this server wrote or loaded
        self.replayer: tuple[Generator, int] | None = None
        self.events: list[Change] = []  # every online change, in order
        self.end_step: int | None = None
        self.steps_generated = 0
        self.steps_replayed = 0

    # -- state ------------------------------------------------------------------------------------
    def is_end(self, step: int) -> bool:
        return self.end_step is not None and step >= self.end_step

    def current(self) -> Saved:
        """The generator's state now, with the changes it holds."""
        return Saved(self.gen.state(), len(self.events))

    def restored(self, step: int, saved: Saved) -> None:
        """The generator was loaded from a checkpoint of `step`: keep its state for replays."""
        self.snapshots = {0: self.snapshots[0], step: saved}
        self.pinned[step] = saved

    def adopt(self, state: SamplerState) -> Saved:
        """Continues the generator from `state`, a state of this sequence at a step it has not
        reached yet (saved by an embedded reader, or handed out by another server of the job):
        the steps before it are not generated, and replay from step 0 if anyone asks for them.

        Refused (StateError) when the state is not ahead of the generator, or when an online
        change recorded before its step is missing from it: the state would then continue
        another sequence than this job's. Changes at or after its step are scheduled on it.
        """
        if state.step <= self.gen.step:
            raise StateError(f"a sampler state of step {state.step} is not ahead of the generator's step {self.gen.step}")
        held = {json_key(c) for c in state.pending}
        early = [c for c in self.events if c.step < state.step]
        if early:
            raise StateError(f"the job recorded an online change at step {early[0].step}, before the sampler state's "
                             f"step {state.step}, which that state does not hold: resume with the job's own "
                             "checkpoint token")
        self.gen.load_state(state)
        for ev in self.events:
            if json_key(ev) not in held:
                self.gen.schedule_change(ev)
        saved = self.current()
        self.snapshots[state.step] = saved
        self.pinned[state.step] = saved
        self.replayer = None
        return saved

    def pin(self, step: int, saved: Saved) -> None:
        """Keeps a checkpoint's state in memory (replays near it need no disk read)."""
        self.pinned[step] = saved

    def add_change(self, change: Change) -> None:
        """Schedules an online change on the generator; the states saved before it replay it."""
        self.gen.schedule_change(change)
        self.events.append(change)
        self.pinned[self.gen.step] = self.current()
        self.replayer = None

    def snapshot_due(self) -> None:
        """Keeps an in-memory state of the generator's step when one is due."""
        step = self.gen.step
        if step % self.snapshot_every == 0 and step not in self.snapshots:
            self.snapshots[step] = self.current()

    def generated(self, step: int, batch: np.ndarray) -> None:
        """The generator produced `step`'s batch."""
        self.batches[step] = batch
        self.steps_generated += 1

    def trim(self, low: int) -> None:
        """Drops batches before `low` and snapshots no replay from `low` on needs."""
        for s in [s for s in self.batches if s < low]:
            del self.batches[s]
        keep_from = max((s for s in self.snapshots if s <= low), default=0)
        for s in [s for s in self.snapshots if 0 < s < keep_from]:
            del self.snapshots[s]
        if len(self.pinned) > PINNED_KEPT:
            for s in sorted(self.pinned)[:-PINNED_KEPT]:
                del self.pinned[s]

    # -- batches ----------------------------------------------------------------------------------
    def batch(self, step: int, generate_one: Callable[[], None]) -> np.ndarray | None:
        """The global batch of `step` (generating up to it, or replaying it), or None at or past
        the end of data. `generate_one` generates the generator's next step (the job's duties
        included) and sets `end_step` at the end of data."""
        b = self.batches.get(step)
        if b is not None:
            return b
        while self.gen.step <= step and self.end_step is None:
            generate_one()
        if self.is_end(step):
            return None
        b = self.batches.get(step)
        if b is None:
            b = self.replay(step)
        return b

    def state_at(self, step: int, generate_one: Callable[[], None]) -> Saved:
        """The sampler state before `step` (generating or replaying as needed)."""
        if step >= self.gen.step:
            while self.gen.step < step and self.end_step is None:
                generate_one()
            return self.current()
        if step in self.snapshots and self.snapshots[step].n_events == len(self.events):
            return self.snapshots[step]
        sampler, n = self._base_for(step)
        while sampler.step < step:
            t = sampler.step
            self.batches.setdefault(t, sampler.next_batch())
            self.steps_replayed += 1
        self.replayer = (sampler, n)
        return Saved(sampler.state(), n)

    def peek(self, step: int, holder: object) -> np.ndarray | None:
        """The global batch of `step` for a read-only reader, None at or past the end of data:
        from the window when it holds the step, else from the reader's own sampler (kept on
        `holder.cursor`, made from the nearest saved state, or the generator's state for a
        step it has not reached), advanced to the step. Neither the window nor the generator
        moves, so a reader of any step costs one sampler, never a growing window."""
        if self.is_end(step):
            return None
        b = self.batches.get(step)
        if b is not None:
            return b
        cursor: tuple[Generator, int] | None = getattr(holder, "cursor", None)
        if cursor is None or cursor[1] != len(self.events) or cursor[0].step > step:
            if step >= self.gen.step:
                base, n = self.gen, len(self.events)
            else:
                base, n = self._base_for(step)
            sampler = self._new_sampler()
            sampler.load_state(base.state())
            cursor = (sampler, n)
        sampler = cursor[0]
        try:
            while sampler.step < step:
                sampler.next_batch()
                self.steps_replayed += 1
            b = sampler.next_batch()
        except EndOfData:
            return None
        holder.cursor = cursor  # type: ignore[attr-defined]
        return b

    def replay(self, step: int, upto: int | None = None) -> np.ndarray:
        """Recomputes the batches of [step, upto) from the nearest saved state (upto: the
        lookahead past `step`, at most the generator's step); returns step's."""
        sampler, n = self._base_for(step)
        stop = min(step + self.lookahead, self.gen.step) if upto is None else upto
        out = None
        while sampler.step < stop:
            t = sampler.step
            b = sampler.next_batch()  # EndOfData cannot happen before the generator's step
            self.steps_replayed += 1
            if t >= step:
                self.batches[t] = b
                if out is None:
                    out = b
        self.replayer = (sampler, n)
        assert out is not None or upto is not None
        return out  # type: ignore[return-value]

    def _base_for(self, step: int) -> tuple[Generator, int]:
        """A sampler positioned at or before `step`, with every online change applied.

        In-memory states first (the replayer, snapshots, pinned checkpoints); the state
        directory only when it holds a nearer one."""
        cands: list[tuple[int, str]] = [(0, "snapshot")]
        if self.replayer is not None and self.replayer[0].step <= step:
            cands.append((self.replayer[0].step, "replayer"))
        cands.append((max((s for s in self.snapshots if s <= step), default=0), "snapshot"))
        pinned = max((s for s in self.pinned if s <= step), default=-1)
        if pinned >= 0:
            cands.append((pinned, "pinned"))
        best = max(cands)
        if self._load_saved is not None and best[0] < step - self.snapshot_every:
            found = self._load_saved(step)
            if found is not None and found[0] > best[0]:
                return self.sampler_from(found[1])
        if best[1] == "replayer":
            assert self.replayer is not None
            return self.replayer
        saved = self.snapshots[best[0]] if best[1] == "snapshot" else self.pinned[best[0]]
        return self.sampler_from(saved)

    def sampler_from(self, saved: Saved) -> tuple[Generator, int]:
        """A new sampler at a saved state, with the online changes it lacks scheduled."""
        s = self._new_sampler()
        s.load_state(saved.state)
        for ev in self.events[saved.n_events:]:
            if ev.step < s.step:
                raise StateError(f"online change at step {ev.step} predates the saved state at step {s.step}")
            s.schedule_change(ev)
        return s, len(self.events)
