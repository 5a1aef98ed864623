"""A job's online changes on disk: the state directory's append-only `events.log`.

Every online change (an operator's `croupier update`, a controller's proposal) is appended to
`STATE_DIR/events.log` (`event_log.EventLog`: binary, CRC per record, torn tail dropped on
open) before the sampler can use it; checkpoints store only how many of the changes their
sampler state already holds. So a checkpoint stays O(clusters) however many changes a run
makes, and a restarted server (or `croupier simulate --state-dir`, or `croupier report`)
replays the sequence exactly from the latest checkpoint plus the log.

Mapping of a `state.Change` onto an `event_log.Event`:
- kind "weights": per-cluster weights (and a clip, if the change sets both);
- kind "clip": a clip alone;
- kind "sources": every source's weight (a mixture);
- kind "source:I": source I's weight (`weights` of length 1) and/or clip;
- kind "tokens": a job dealt in tokens, G from the step on (carried in the record's clip field).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from croupier.errors import ConfigError
from croupier.server.durability.event_log import Event, iter_events
from croupier.server.sampling.state import Change

LOG_NAME = "events.log"


def change_to_event(ch: Change) -> Event:
    """The log record of a change (a change setting two weight vectors at once is refused)."""
    origin = ch.origin or "operator"
    if ch.global_tokens is not None:
        if ch.clip is not None or ch.weights is not None or ch.source is not None or ch.source_weights is not None:
            raise ConfigError("a change of global tokens per step changes only that: give other changes separately")
        return Event(step=ch.step, kind="tokens", origin=origin, clip=int(ch.global_tokens))
    vectors = sum(x is not None for x in (ch.weights, ch.source_weights)) + (ch.source is not None)
    if vectors > 1:
        raise ConfigError("one change sets one kind of weights: cluster weights, every source's weight, or one "
                          "source; give them as separate changes")
    if ch.source is not None:
        w = None if ch.source_weight is None else np.array([ch.source_weight], dtype=np.float64)
        return Event(step=ch.step, kind=f"source:{ch.source}", origin=origin, clip=ch.clip, weights=w)
    if ch.source_weights is not None:
        return Event(step=ch.step, kind="sources", origin=origin, clip=ch.clip,
                     weights=np.array(ch.source_weights, dtype=np.float64))
    if ch.weights is not None:
        return Event(step=ch.step, kind="weights", origin=origin, clip=ch.clip,
                     weights=np.array(ch.weights, dtype=np.float64))
    return Event(step=ch.step, kind="clip", origin=origin, clip=ch.clip)


def event_to_change(ev: Event) -> Change:
    w = None if ev.weights is None else tuple(float(x) for x in ev.weights)
    origin = "" if ev.origin == "operator" else ev.origin
    if ev.kind.startswith("source:"):
        return Change(step=ev.step, clip=ev.clip, source=int(ev.kind.split(":", 1)[1]),
                      source_weight=None if w is None else w[0], origin=origin)
    if ev.kind == "sources":
        return Change(step=ev.step, clip=ev.clip, source_weights=w, origin=origin)
    if ev.kind == "tokens":
        return Change(step=ev.step, global_tokens=ev.clip, origin=origin)
    if ev.kind in ("weights", "clip"):
        return Change(step=ev.step, clip=ev.clip, weights=w, origin=origin)
    raise ConfigError(f"unknown change kind {ev.kind!r} in the event log")


def read_changes(state_dir: str | Path) -> list[Change]:
    """Every whole change in a state directory's log, in order (none if there is no log)."""
    path = Path(state_dir) / LOG_NAME
    if not path.exists():
        return []
    return [event_to_change(ev) for ev in iter_events(path)]
