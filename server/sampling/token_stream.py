"""Steps in tokens: the sampler's document order as one global token stream, cut into steps.

The document sampler (`Sampler` or `MixSampler`) draws documents in chunks of `chunk`
documents; their order defines one stream: each document's tokens followed by EOS, back to
back (a document of n tokens holds n + 1 stream tokens). Step t covers stream tokens
[offset(t), offset(t) + G(t)), where G comes from the token schedule (`TokenSchedule`:
"0:G0,S1:G1,...", global tokens per step from a step on; offsets are its prefix sums), and
data-parallel rank r of D covers the r-th of D equal parts of the step (every G divisible by
D). A document that straddles a boundary is split: its parts go to adjacent ranks or steps.

`TokenDealer` deals `TokenStep`s; `TokenStep.part(rank, world)` is a rank's `TokenSlice`:
its documents, their stream lengths, the stream tokens to skip in the first and where the
last one ends. The dealer's state is the document sampler's state before the chunk in use
plus the position inside it (O(clusters)); it travels as a `SamplerState` whose `extra`
holds the position, so a job's checkpoints and an embedded reader's state take it as they
take a document sampler's. The clip and the per-cluster counters count a document when its
chunk is drawn (at most one chunk ahead of the stream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from croupier.errors import ConfigError, FingerprintMismatch, StateError
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.state import Change, SamplerState

__all__ = ["TokenDealer", "TokenSchedule", "TokenSlice", "TokenStep", "counts_lookup"]

MAX_SCHEDULE_POINTS = 1024


@dataclass(frozen=True)
class TokenSchedule:
    """Global tokens per step: ((first step, tokens), ...), the first at step 0, steps increasing."""

    points: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.points or self.points[0][0] != 0:
            raise ConfigError(f"a token schedule starts at step 0, got {self._text()!r}")
        if len(self.points) > MAX_SCHEDULE_POINTS:
            raise ConfigError(f"a token schedule has at most {MAX_SCHEDULE_POINTS} points, got {len(self.points)}")
        last = -1
        for step, tokens in self.points:
            if isinstance(step, bool) or not isinstance(step, int) or step <= last:
                raise ConfigError(f"token schedule steps must be increasing integers from 0, got {self._text()!r}")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens < 2 ** 40:
                raise ConfigError(f"global tokens per step must be an integer in [1, 2**40), got {tokens!r} at "
                                  f"step {step}")
            last = step

    @classmethod
    def constant(cls, tokens: int) -> TokenSchedule:
        return cls(((0, int(tokens)),))

    @classmethod
    def parse(cls, text: str) -> TokenSchedule:
        """"0:G0,S1:G1,..." (a plain "G" is a constant schedule)."""
        text = text.strip()
        try:
            if ":" not in text:
                return cls.constant(int(text))
            pts = []
            for item in text.split(","):
                step, tokens = item.split(":")
                pts.append((int(step), int(tokens)))
        except ValueError:
            raise ConfigError(f"a token schedule is 'STEP:TOKENS,...' from step 0 (e.g. '0:262144,1000:524288'), "
                              f"got {text!r}") from None
        return cls(tuple(pts))

    def _text(self) -> str:
        return ",".join(f"{s}:{g}" for s, g in self.points)

    def __str__(self) -> str:
        return self._text()

    def from_step(self, step: int, tokens: int) -> TokenSchedule:
        """This schedule until `step`, then `tokens` per step (its later points dropped): an
        online change of G."""
        return TokenSchedule(tuple(p for p in self.points if p[0] < step) + ((int(step), int(tokens)),))

    def tokens_at(self, step: int) -> int:
        """G of `step`."""
        tokens = self.points[0][1]
        for s, g in self.points:
            if s > step:
                break
            tokens = g
        return tokens

    def offset(self, step: int) -> int:
        """Stream tokens before `step` (the prefix sum of G)."""
        total = 0
        for i, (s, g) in enumerate(self.points):
            end = self.points[i + 1][0] if i + 1 < len(self.points) else None
            if step <= s:
                break
            total += g * ((step if end is None else min(step, end)) - s)
        return total

    def check_world(self, world: int) -> None:
        """Every G must split evenly over `world` data-parallel ranks."""
        for step, tokens in self.points:
            if tokens % world:
                raise ConfigError(f"global tokens {tokens} (from step {step}) are not divisible by the "
                                  f"data-parallel world size {world}")


@dataclass(frozen=True, eq=False)
class TokenSlice:
    """A rank's part of a step: documents (ids) with their stream lengths (tokens + EOS), the
    stream tokens of the first to skip, and the end (exclusive) inside the last one."""

    ids: np.ndarray
    lengths: np.ndarray
    skip: int
    end: int

    @property
    def tokens(self) -> int:
        if len(self.ids) == 1:
            return self.end - self.skip
        return int(self.lengths[:-1].sum()) - self.skip + self.end

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of the stream tokens taken from each document."""
        n = len(self.ids)
        return [(self.skip if i == 0 else 0, self.end if i == n - 1 else int(self.lengths[i])) for i in range(n)]


@dataclass(frozen=True, eq=False)
class TokenStep:
    """The documents covering one step's stream tokens; `head`: stream tokens of the first
    document dealt by earlier steps."""

    step: int
    ids: np.ndarray
    lengths: np.ndarray
    head: int
    tokens: int

    def part(self, rank: int, world: int) -> TokenSlice:
        """Rank r of `world`'s equal part of the step (`world` must divide its tokens)."""
        if self.tokens % world:
            raise ConfigError(f"global tokens {self.tokens} of step {self.step} are not divisible by the "
                              f"data-parallel world size {world}")
        per = self.tokens // world
        lo, hi = rank * per + self.head, (rank + 1) * per + self.head  # in the first document's frame
        starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        first = int(np.searchsorted(starts, lo, side="right") - 1)
        last = int(np.searchsorted(starts, hi, side="left") - 1)
        return TokenSlice(ids=self.ids[first:last + 1], lengths=self.lengths[first:last + 1],
                          skip=int(lo - starts[first]), end=int(hi - starts[last]))


def counts_lookup(pieces: list[tuple[int, np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
    """id -> token count (int64) over (id offset, per-sample counts) pieces (one per mixture source)."""
    if len(pieces) == 1 and pieces[0][0] == 0:
        arr = pieces[0][1]
        return lambda ids: np.asarray(arr[ids], dtype=np.int64)
    starts = np.array([o for o, _ in pieces], dtype=np.int64)

    def lookup(ids: np.ndarray) -> np.ndarray:
        src = np.searchsorted(starts, ids, side="right") - 1
        out = np.empty(ids.size, dtype=np.int64)
        for i in np.unique(src).tolist():
            sel = src == i
            out[sel] = pieces[i][1][ids[sel] - starts[i]]
        return out
    return lookup


def counts_digest(pieces: list[tuple[int, np.ndarray]]) -> str:
    """What the fingerprint binds of the token counts (a change of tokenizer changes it)."""
    h = hashlib.sha256(b"croupier.token-counts.v1")
    for offset, counts in pieces:
        h.update(str(offset).encode())
        h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


class TokenDealer:
    """Deals the token stream of a document sampler step by step (see the module docstring).

    new_inner: a fresh document sampler (global batch = `chunk` documents per draw).
    counts: per-sample token counts as (id offset, counts) pieces.

    Over a `unit = "tokens"` mixture (new_inner builds a `token_mixture.TokenUnitMix`) the
    dealer built is a `token_mixture.TokenMixDealer`: each source's share holds to the token.
    """

    def __new__(cls, new_inner: Callable[[], object] | None = None, *args: object, **kwargs: object) -> TokenDealer:
        from croupier.server.sampling.token_mixture import TokenMixDealer, TokenUnitMix

        if new_inner is None:  # copy and pickle make the object first, then set its state
            return object.__new__(cls)
        probe = new_inner()
        kind = TokenMixDealer if cls is TokenDealer and isinstance(probe, TokenUnitMix) else cls
        obj = object.__new__(kind)
        obj.__dict__["_probe"] = probe  # the first document sampler: __init__ takes it
        return obj

    def __init__(self, new_inner: Callable[[], object], counts: list[tuple[int, np.ndarray]],
                 schedule: TokenSchedule, chunk: int) -> None:
        self._new_inner = new_inner
        probe: object | None = self.__dict__.pop("_probe", None)
        self.inner: object = new_inner() if probe is None else probe
        self.schedule = self._initial_schedule = schedule
        self.chunk = int(chunk)
        self._count = counts_lookup(counts)
        inner_fp = self.inner.fingerprint  # type: ignore[attr-defined]
        ident = {"inner": inner_fp, "schedule": str(schedule), "chunk": self.chunk, "counts": counts_digest(counts),
                 "eos": 1}
        self.fingerprint = "tok:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
        self.layout = self.inner.layout  # type: ignore[attr-defined]
        self.global_batch = self.inner.global_batch  # type: ignore[attr-defined]
        self.step = 0
        self._before: SamplerState = self.inner.state()  # type: ignore[attr-defined]
        self._ids = np.empty(0, dtype=np.int64)
        self._lengths = np.empty(0, dtype=np.int64)
        self._pos = 0
        self._skip = 0
        self._pending: list[Change] = []  # online changes (token steps) the document sampler has not taken yet

    def _next_chunk(self) -> None:
        due = [c for c in self._pending if c.step <= self.step]
        if due:  # a change takes effect from the first draw made while dealing its step or later
            inner_step = self.inner.step  # type: ignore[attr-defined]
            for c in due:
                self.inner.schedule_change(dataclasses.replace(c, step=inner_step))  # type: ignore[attr-defined]
            self._pending = [c for c in self._pending if c.step > self.step]
        self._before = self.inner.state()  # type: ignore[attr-defined]
        ids = self.inner.next_batch()  # type: ignore[attr-defined]
        self._ids = ids
        self._lengths = self._count(ids) + 1  # + EOS
        self._pos = 0

    def next_step(self) -> TokenStep:
        """The documents of `self.step`'s stream tokens, then advance one step; EndOfData when
        the document sampler ends before the step is full."""
        t = self.step
        need = self.schedule.tokens_at(t)
        head = self._skip
        ids: list[np.ndarray] = []
        lens: list[np.ndarray] = []
        while need > 0:
            if self._pos >= len(self._ids):
                self._next_chunk()  # EndOfData propagates: the step cannot be filled
            avail = self._lengths[self._pos:].copy()
            avail[0] -= self._skip
            cum = np.cumsum(avail)
            k = int(np.searchsorted(cum, need, side="left"))
            if k >= len(avail):  # the rest of the chunk, and more
                ids.append(self._ids[self._pos:])
                lens.append(self._lengths[self._pos:])
                need -= int(cum[-1])
                self._pos, self._skip = len(self._ids), 0
                continue
            ids.append(self._ids[self._pos:self._pos + k + 1])
            lens.append(self._lengths[self._pos:self._pos + k + 1])
            used_in_k = need - (int(cum[k - 1]) if k else 0) + (self._skip if k == 0 else 0)
            if used_in_k == int(self._lengths[self._pos + k]):
                self._pos, self._skip = self._pos + k + 1, 0
            else:
                self._pos, self._skip = self._pos + k, used_in_k
            need = 0
        self.step = t + 1
        return TokenStep(step=t, ids=np.concatenate(ids), lengths=np.concatenate(lens), head=head,
                         tokens=self.schedule.tokens_at(t))

    def next_batch(self) -> TokenStep:  # the generator interface of a document sampler
        return self.next_step()

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> SamplerState:
        """The document sampler's state before the chunk in use, with the position in it."""
        b = self._before
        extra = {"token_stream": {"schedule": str(self.schedule), "inner_step": b.step, "inner_fingerprint": b.fingerprint, "drawn": bool(len(self._ids)),
                                  "pos": self._pos, "skip": self._skip, "inner_extra": b.extra,
                                  "inner_pending": [c.to_dict() for c in b.pending]}}
        return SamplerState(fingerprint=self.fingerprint, step=self.step, random_cursor=b.random_cursor, clip=b.clip,
                            weights=b.weights, cursor=b.cursor, draws=b.draws, clipped_at=b.clipped_at,
                            pending=tuple(self._pending), extra=extra)

    def load_state(self, state: SamplerState) -> None:
        """Continues from `state` (refuses a state of another stream: FingerprintMismatch)."""
        if state.fingerprint != self.fingerprint:
            raise FingerprintMismatch("sampler state", expected=self.fingerprint, got=state.fingerprint)
        x = (state.extra or {}).get("token_stream")
        if not isinstance(x, dict):
            raise StateError("a token stream's state lacks its position (extra.token_stream)")
        inner_state = SamplerState(fingerprint=x["inner_fingerprint"], step=int(x["inner_step"]),
                                   random_cursor=state.random_cursor, clip=state.clip, weights=state.weights,
                                   cursor=state.cursor, draws=state.draws, clipped_at=state.clipped_at,
                                   pending=tuple(Change.from_dict(c) for c in x.get("inner_pending", ())),
                                   extra=x.get("inner_extra"))
        inner = self._new_inner()
        inner.load_state(inner_state)  # type: ignore[attr-defined]
        self.inner = inner
        self._before = inner_state
        self.step = int(state.step)
        if x["drawn"]:
            self._ids = inner.next_batch()  # type: ignore[attr-defined]
            self._lengths = self._count(self._ids) + 1
        else:
            self._ids = np.empty(0, dtype=np.int64)
            self._lengths = np.empty(0, dtype=np.int64)
        self._pos, self._skip = int(x["pos"]), int(x["skip"])
        self._pending = list(state.pending)
        # the schedule with the online changes of G the state holds (a state without: the job's own)
        self.schedule = TokenSchedule.parse(str(x["schedule"])) if "schedule" in x else self._initial_schedule

    # -- what a document sampler also answers -----------------------------------------------------
    def counters(self):  # noqa: ANN201 - the document sampler's
        return self.inner.counters()  # type: ignore[attr-defined]

    @property
    def active_count(self) -> int:
        return self.inner.active_count  # type: ignore[attr-defined]

    @property
    def clip(self) -> int | None:
        return self.inner.clip  # type: ignore[attr-defined]

    @property
    def config(self):  # noqa: ANN201
        return self.inner.config  # type: ignore[attr-defined]

    @property
    def config_dict(self) -> dict:
        """The document sampler's config (the schedule travels as JobInfo.token_schedule)."""
        return self.inner.config_dict  # type: ignore[attr-defined]

    def schedule_change(self, change: Change) -> None:
        """An online change (clip, weights; a mixture's source weights) from token step
        `change.step` on: the document sampler takes it at its first draw made while dealing
        that step or a later one (documents drawn before it and dealt after it keep the old
        config, on every replay alike). Refused for a step already dealt, and checked against
        the document sampler at once."""
        if change.step < self.step:
            raise ConfigError(f"online change at step {change.step}: the token stream has dealt up to step "
                              f"{self.step - 1}")
        if change.global_tokens is not None:  # the schedule is a function of the step: it changes at once
            self.schedule = self.schedule.from_step(change.step, change.global_tokens)
            return
        probe = self._new_inner()
        probe.load_state(self.inner.state())  # type: ignore[attr-defined]
        probe.schedule_change(dataclasses.replace(change, step=probe.step))  # type: ignore[attr-defined]
        self._pending.append(change)
        self._pending.sort(key=lambda c: c.step)

    @property
    def seed(self) -> int:
        return self.inner.seed  # type: ignore[attr-defined]

    @property
    def auto_clip(self):  # noqa: ANN201
        return getattr(self.inner, "auto_clip", None)


def default_chunk(schedule: TokenSchedule, mean_stream_tokens: float) -> int:
    """Documents per draw: about one step's worth at the first G (at least 1)."""
    return max(1, math.ceil(schedule.points[0][1] / max(mean_stream_tokens, 1.0)))


def plan_tokens(schedule: TokenSchedule, mean_stream_tokens: float, chunk: int | None = None,
                config: PolicyConfig | None = None) -> tuple[int, PolicyConfig | None]:
    """(documents per draw, the document sampler's policy) of a token job: `chunk` or about one
    step's worth; an auto clip's budget (in token steps) becomes the document sampler's (in
    draws), so the clip is derived from S × G tokens over the mean stream tokens per document."""
    import dataclasses

    chunk = int(chunk) if chunk else default_chunk(schedule, mean_stream_tokens)
    if chunk < 1:
        raise ConfigError(f"documents per draw must be >= 1, got {chunk}")
    budget = None if config is None else config.budget_steps
    if config is not None and budget:
        docs = schedule.offset(int(budget)) / max(mean_stream_tokens, 1.0)
        config = dataclasses.replace(config, budget_steps=max(1, math.ceil(docs / chunk)))
    return chunk, config


def mean_stream_tokens(counts: np.ndarray, ids: np.ndarray) -> float:
    """Mean stream tokens (tokens + EOS) per document over the ids a job draws from."""
    if len(ids) == 0:
        raise ConfigError("the job draws from no sample: no token stream")
    return float(np.asarray(counts)[ids].mean()) + 1.0
