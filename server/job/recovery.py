"""Where a restarting job resumes, read from its state directory and checked against the job.

A job with a state directory starts from the newest checkpoint that reads back whole and
belongs to its sampler (`state_dir.StateDir` reads; this module adds the job's checks and
decisions):

- a checkpoint of another sampler (fingerprint) refuses the start with FingerprintMismatch;
- checkpoints that are all invalid refuse it with StateDirInvalid (never a silent reset),
  unless the operator passed `--fresh`, which sets them aside (`stale-*`) and starts at 0;
- replays of steps older than every in-memory state read the newest valid checkpoint at or
  before the step (`load_saved`);
- a trainer's resume token must name this sampler and a step before the end of data
  (`resume_point`), and so must a sampler state saved elsewhere (an embedded reader's), which
  the job continues from when its generator has not reached the state's step (`state_point`).

What the job then restores into its parts is the job's own business (`Job`); this module
reads and decides, and holds no state of the job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from croupier.errors import ConfigError, FingerprintMismatch
from croupier.server.durability.event_log import whole_records
from croupier.server.durability.log_copies import digest_of, reconcile
from croupier.server.durability.resume_token import ResumeToken
from croupier.server.durability.state_dir import Checkpoint, StateDir, StateDirInvalid
from croupier.server.job.types import StepOutOfRange
from croupier.server.sampling.sequence_window import Saved, SequenceWindow
from croupier.server.sampling.state import Change, SamplerState

log = logging.getLogger(__name__)

__all__ = ["Recovery", "restore_parts", "resume_point", "state_point"]


def resume_point(token: str, fingerprint: str, end_step: int | None) -> ResumeToken:
    """A trainer's resume token checked against the job: ConfigError (TokenError) when it does
    not parse, FingerprintMismatch when it names another sampler, StepOutOfRange past the end
    of data (`end_step`, None: not reached)."""
    t = ResumeToken.decode(token)
    if t.fingerprint != fingerprint:
        raise FingerprintMismatch("checkpoint token", expected=fingerprint, got=t.fingerprint)
    if end_step is not None and t.step > end_step:
        raise StepOutOfRange(f"resume token step {t.step} is past the end of data at step {end_step}")
    return t


def state_point(data: bytes, fingerprint: str, seq: SequenceWindow, adaptive: bool) -> tuple[int, bool]:
    """(the step of a rank's sampler state, whether the job adopted it) for a Join that carries
    a state saved elsewhere (an embedded reader's). The state must be this job's sequence
    (FingerprintMismatch) within the data (StepOutOfRange). When the generator has not reached
    its step, the job continues from it (`SequenceWindow.adopt`), unless the job adapts its
    weights to loss reports, which such a state does not hold (ConfigError)."""
    state = SamplerState.from_bytes(bytes(data))
    if state.fingerprint != fingerprint:
        raise FingerprintMismatch("sampler state", expected=fingerprint, got=state.fingerprint)
    step = int(state.step)
    if seq.end_step is not None and step > seq.end_step:
        raise StepOutOfRange(f"sampler state step {step} is past the end of data at step {seq.end_step}")
    if step <= seq.gen.step:
        return step, False  # the job's own sequence reaches it
    if adaptive:
        raise ConfigError("an adaptive job's sequence depends on its loss reports, which a sampler state saved "
                          "elsewhere does not hold: resume it with the job's own checkpoint token")
    seq.adopt(state)
    return step, True


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def restore_parts(ck: Checkpoint, mark: int, recovery: Recovery, seq: SequenceWindow, changes: Any,
                  adaptation: Any, tally: Any, ckpt: Any, table: Any, checkpoint_every: int) -> int:
    """Puts the job's parts back where checkpoint `ck` (and the generated-step mark) left them:
    the generator's state, the online changes after it, the controller's and the token tally's
    sections, the window's pinned state, the rank table. Returns the generated high-water step."""
    meta, state = ck.meta, ck.state
    seq.gen.load_state(state)
    logged = recovery.changes(ck)
    if adaptation is not None and ck.payload.adapter is not None:
        adaptation.load_bytes(ck.payload.adapter)
    changes.restored(logged, ck.n_changes)
    if tally is not None:
        if ck.payload.tally is not None:
            tally.load(ck.payload.tally, state.step)
        else:
            tally.restart(state.step)
    seq.restored(ck.step, Saved(state, ck.n_changes))
    ckpt.resumed(ck.step, mark)
    # a state directory from before the mark: the old server may have run one interval past
    high_water = max(meta.generated_step, mark) if mark >= 0 else meta.generated_step + checkpoint_every
    seq.end_step = meta.end_step
    table.reset(meta.world, meta.formed_at)
    table.restore(meta.ranks)
    table.recompute()
    log.info("resumed from checkpoint", extra={"event": "resumed", "path": str(ck.path), "step": ck.step,
                                               "world": meta.world, "high_water": high_water})
    return high_water


class Recovery:
    """The state directory as one job (sampler `fingerprint`) reads it."""

    def __init__(self, state_dir: StateDir, fingerprint: str) -> None:
        self.state_dir = state_dir
        self.fingerprint = fingerprint

    def check(self, ck: Checkpoint) -> None:
        """Refuses a checkpoint of another sampler (FingerprintMismatch: the start fails)."""
        if ck.meta.sampler_fingerprint != self.fingerprint or ck.state.fingerprint != self.fingerprint:
            raise FingerprintMismatch(f"state directory {ck.path.parent}", expected=self.fingerprint,
                                      got=ck.meta.sampler_fingerprint)

    def set_aside(self) -> None:
        """`--fresh`: moves whatever the state directory holds into a `stale-*` folder."""
        aside = self.state_dir.store.set_aside()
        if aside is not None:
            log.warning("starting fresh: previous checkpoints set aside", extra={"event": "fresh", "path": str(aside)})

    def newest(self) -> Checkpoint | None:
        """The checkpoint the job resumes from; None when the directory holds none.
        StateDirInvalid when it holds some and none is valid."""
        skipped: list[tuple[Path, str]] = []
        ck = self.state_dir.newest(check=self.check, skipped=skipped)
        if ck is None and skipped:
            listing = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise StateDirInvalid(f"state directory {self.state_dir.dir} holds {len(skipped)} checkpoint(s) and "
                                  f"none is valid ({listing}); refusing to start over silently: repair or "
                                  "remove them, or pass --fresh to set them aside and start at step 0")
        return ck

    def changes(self, ck: Checkpoint | None) -> list[Change]:
        """Every online change of the job (`StateDir.changes`), the ones a checkpoint's state
        holds checked against the digest it recorded of them."""
        changes = self.state_dir.changes(ck)
        if ck is not None and ck.meta.events_in_log and ck.meta.events_digest:
            payloads, _, _ = whole_records(_read_or_empty(self.state_dir.log_path))
            if digest_of(payloads, ck.n_changes) != ck.meta.events_digest:
                raise StateDirInvalid(f"checkpoint {ck.path.name} holds {ck.n_changes} online change(s) whose digest "
                                      f"differs from the first {ck.n_changes} in {self.state_dir.log_path}: the "
                                      "event log was altered; restore it, or start over with --fresh")
        return changes

    def check_records(self, mark: int, mark_records: tuple[int, str] | None, accept_damage: bool) -> str:
        """Both copies of the event log checked against the generated-step mark, repaired from
        each other, or the start refused (`log_copies.reconcile`); what it found, for status."""
        check = reconcile(self.state_dir.dir, mark_records, mark, accept_damage=accept_damage, write=True)
        if check.accepted:
            return f"accepted damage: {check.accepted}"
        return "repaired: " + "; ".join(check.repaired) if check.repaired else "ok"

    def load_saved(self, step: int) -> tuple[int, Saved] | None:
        """The newest valid checkpoint at or before `step` as (its step, its state), for replays."""
        ck = self.state_dir.newest(at_or_before=step, check=self.check)
        if ck is None:
            return None
        return ck.step, Saved(ck.state, ck.n_changes)
