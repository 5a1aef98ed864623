"""Token-exact mixtures: a `unit = "tokens"` mixture dealt in tokens gives every source its exact share.

A job dealt in tokens (`token_stream`) over a mixture of two or more sources whose file says
`unit = "tokens"` deals each source from its own sub-stream:

1. **Sub-streams.** Source i's documents come from its own single-source `Sampler` (its policy
   and clip, seeded from (seed, i)), `chunk_i` documents a draw; in that order they form the
   source's token stream (each document's tokens then EOS), as `token_stream` forms one.
2. **Quotas.** Step t's G(t) tokens are split over the eligible sources (weight > 0, not
   exhausted) by `mix_sampler.allocate`: source i gets floor(p_i * G) or ceil(p_i * G) tokens,
   p_i = its weight over the eligible weights, the rounded-up ones going to the largest carried
   deficit (target minus dealt). So every step holds each source's share to the token, and the
   cumulative count stays within one token of the exact share (deficits restart at zero when
   the eligible set changes). Each sub-stream is cut at its quota: a document that straddles
   the cut is split, its rest opening the source's part of a later step.
3. **Budgets and exhaustion.** A source stops at its `token_budget` (stream tokens, EOS
   included) or when its sampler can draw no more (the clip), in the middle of a step if so;
   the rest of its quota goes to the other sources by largest remainder over their shares
   (`on_source_exhausted = "redistribute"`), or the job ends there (`"stop"`). Either way the
   step still holds exactly G tokens; EndOfData leaves the state unchanged.
4. **Order.** A step's document pieces are riffled in a keyed order (seed, step), each source's
   pieces keeping their stream order, so every rank's equal part holds a mix. Ranks cut the
   step's concatenated pieces into D equal parts (`MixTokenStep.part`).

State: each sub-stream's sampler state before its chunk in use plus the position in it, the
deficits, the targets and the tokens dealt (O(clusters + sources)), in one `SamplerState`.
The fingerprint is of kind `tokmix:` (engine `token-exact mixture`, its version).

`TokenDealer` builds this dealer by itself when its document sampler is a `TokenUnitMix`
(what `mixture.mixture_sampler` returns for such a mixture), so `serve`, `simulate` and the
embedded mode deal the same sequence. A document-dealt job over the same mixture draws as
`MixSampler` always did (same fingerprint, same sequence).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.server.sampling.mix_sampler import MixSampler, MixSource, SourceCounters, allocate
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import ClusterCounters, Sampler
from croupier.server.sampling.state import SamplerState
from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule, TokenSlice, TokenStep, counts_digest

__all__ = ["MixTokenStep", "SpanSlice", "TokenMixDealer", "TokenMixSource", "TokenUnitMix", "TOKEN_MIX_VERSION"]

TOKEN_MIX_VERSION = 1
_SEED_TAG = 0x544D_5344  # a source's sampler seed: SeedSequence([seed, tag, source])
_ORDER_TAG = 0x544D_4F52  # a step's riffle: SeedSequence([seed, tag, step])


@dataclass(frozen=True, eq=False)
class TokenMixSource:
    """One source of a token-exact mixture.

    counts: per-sample token counts over the source's local ids.
    chunk: documents per draw of its sampler.
    token_budget: stream tokens (tokens + EOS) it deals at most; None = no budget.
    epochs: a `random` source's epoch cap in the file (refused here: budgets count tokens).
    """

    name: str
    layout: ClusterLayout
    id_offset: int
    weight: float
    config: PolicyConfig
    counts: np.ndarray
    chunk: int
    token_budget: int | None = None
    epochs: int | None = None


class TokenUnitMix(MixSampler):
    """The `MixSampler` of a `unit = "tokens"` mixture: it deals documents exactly as `MixSampler`
    (same fingerprint, same sequence) and carries the sources a token stream over it deals
    token-exact (`TokenDealer` then builds a `TokenMixDealer`)."""

    def __init__(self, sources: Sequence[MixSource], global_batch: int, seed: int, on_source_exhausted: str,
                 token_sources: Sequence[TokenMixSource]) -> None:
        super().__init__(sources, global_batch, seed, on_source_exhausted)
        self.token_sources = tuple(token_sources)

    def next_batch(self) -> np.ndarray:
        budgets = [s.name for s in self.token_sources if s.token_budget is not None]
        if budgets:
            raise ConfigError(f"token_budget (source {budgets[0]!r}) stops a source at N tokens and needs steps in "
                              "tokens (--global-tokens or --token-schedule), not --global-batch")
        return super().next_batch()


@dataclass(frozen=True, eq=False)
class SpanSlice(TokenSlice):
    """A rank's part of a token-exact mixture's step: each document's stream tokens
    [starts[i], ends[i]) (`skip` and `end` are the first's start and the last's end)."""

    starts: np.ndarray
    ends: np.ndarray

    @property
    def tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts.tolist(), self.ends.tolist()))


@dataclass(frozen=True, eq=False)
class MixTokenStep(TokenStep):
    """A step of a token-exact mixture: document pieces (ids, stream lengths, [starts, ends)),
    `sources` the source index of each, in the step's riffled order; `targets` each source's
    exact share of the step's tokens over the sources eligible at its start (where a source runs
    out inside the step: what it dealt, the rest shared by the others' weights)."""

    starts: np.ndarray
    ends: np.ndarray
    sources: np.ndarray
    targets: np.ndarray

    def source_tokens(self, num_sources: int) -> np.ndarray:
        """Tokens of each source in this step."""
        return np.bincount(self.sources, weights=self.ends - self.starts, minlength=num_sources).astype(np.int64)

    def part(self, rank: int, world: int) -> TokenSlice:
        """Rank r of `world`'s equal part of the step's concatenated pieces."""
        if self.tokens % world:
            raise ConfigError(f"global tokens {self.tokens} of step {self.step} are not divisible by the "
                              f"data-parallel world size {world}")
        per = self.tokens // world
        lo, hi = rank * per, (rank + 1) * per
        cum = np.concatenate(([0], np.cumsum(self.ends - self.starts)))
        first = int(np.searchsorted(cum, lo, side="right") - 1)
        last = int(np.searchsorted(cum, hi, side="left") - 1)
        starts = self.starts[first:last + 1].copy()
        ends = self.ends[first:last + 1].copy()
        starts[0] += lo - int(cum[first])
        ends[-1] = int(self.starts[last]) + hi - int(cum[last])
        return SpanSlice(ids=self.ids[first:last + 1], lengths=self.lengths[first:last + 1], skip=int(starts[0]),
                         end=int(ends[-1]), starts=starts, ends=ends)


def source_seed(seed: int, index: int) -> int:
    """Source `index`'s sampler seed, derived from (seed, tag, index), never by adding."""
    return int(np.random.SeedSequence([seed, _SEED_TAG, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _SubStream:
    """One source's documents as a token stream, taken quota by quota (see the module docstring)."""

    def __init__(self, src: TokenMixSource, seed: int) -> None:
        self.src = src
        self.seed = seed
        self.sampler = Sampler(src.layout, src.config, src.chunk, seed)
        self.before = self.sampler.state()
        self.ids = np.empty(0, dtype=np.int64)  # global ids of the chunk in use
        self.lengths = np.empty(0, dtype=np.int64)
        self.pos = 0
        self.skip = 0
        self.dealt = 0  # stream tokens dealt so far
        self.ended = False  # its sampler can draw no more

    def room(self) -> int | None:
        """Stream tokens its budget has left (None: no budget)."""
        b = self.src.token_budget
        return None if b is None else b - self.dealt

    def dry(self) -> bool:
        """Can deal no more: its budget is spent, or its sampler ended and its last chunk is dealt."""
        room = self.room()
        return (room is not None and room <= 0) or (self.ended and self.pos >= len(self.ids))

    def _draw(self) -> None:
        before = self.sampler.state()
        local = self.sampler.next_batch()  # EndOfData: unchanged
        self.before = before
        self.ids = local + self.src.id_offset
        self.lengths = np.asarray(self.src.counts[local], dtype=np.int64) + 1  # + EOS
        self.pos = 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, lengths, starts, ends) of the next `n` stream tokens, fewer where the budget
        or the sampler ends first."""
        room = self.room()
        if room is not None:
            n = min(n, room)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        while n > 0:
            if self.pos >= len(self.ids):
                if self.ended:
                    break
                try:
                    self._draw()
                except EndOfData:
                    self.ended = True
                    break
            at = self.pos
            lens = self.lengths[at:]
            avail = lens.copy()
            avail[0] -= self.skip
            cum = np.cumsum(avail)
            k = int(np.searchsorted(cum, n, side="left"))
            whole = k >= len(avail)
            m = len(avail) if whole else k + 1
            starts = np.zeros(m, dtype=np.int64)
            starts[0] = self.skip
            ends = lens[:m].copy()
            if whole:
                n -= int(cum[-1])
                self.pos, self.skip = len(self.ids), 0
            else:
                ends[-1] = n - (int(cum[k - 1]) if k else 0) + (self.skip if k == 0 else 0)
                if ends[-1] == lens[k]:
                    self.pos, self.skip = self.pos + k + 1, 0
                else:
                    self.pos, self.skip = self.pos + k, int(ends[-1])
                n = 0
            out.append((self.ids[at:at + m], lens[:m], starts, ends))
        if not out:
            e = np.empty(0, dtype=np.int64)
            return e, e, e, e
        parts = [np.concatenate(x) for x in zip(*out)]
        self.dealt += int((parts[3] - parts[2]).sum())
        return parts[0], parts[1], parts[2], parts[3]

    def mark(self) -> tuple[Any, ...]:
        return self.before, bool(len(self.ids)), self.pos, self.skip, self.dealt, self.ended, self.ids

    def restore(self, mark: tuple[Any, ...]) -> None:
        before, drawn, pos, skip, dealt, ended, ids = mark
        if ids is not self.ids or self.ended != ended:
            self.load(before, drawn, pos, skip, dealt, ended)
        else:
            self.pos, self.skip, self.dealt = pos, skip, dealt

    def load(self, before: SamplerState, drawn: bool, pos: int, skip: int, dealt: int, ended: bool) -> None:
        self.sampler = Sampler(self.src.layout, self.src.config, self.src.chunk, self.seed)
        self.sampler.load_state(before)
        self.ids = np.empty(0, dtype=np.int64)
        self.lengths = np.empty(0, dtype=np.int64)
        if drawn:
            self._draw()
        self.before = before
        self.pos, self.skip, self.dealt, self.ended = int(pos), int(skip), int(dealt), bool(ended)


@dataclass(frozen=True)
class TokenMixConfig:
    """What a job asks of its generator's config: the policy name ("mixture")."""

    policy: str = "mixture"
    weights: tuple[float, ...] | None = None
    min_active_share: float = 0.5


class TokenMixDealer(TokenDealer):
    """Deals a token-exact mixture step by step (see the module docstring); the interface is
    `TokenDealer`'s. new_inner must build a `TokenUnitMix`; counts and chunk are the token
    stream's (the sources' chunks come with the `TokenUnitMix`)."""

    def __init__(self, new_inner: Callable[[], object], counts: list[tuple[int, np.ndarray]],
                 schedule: TokenSchedule, chunk: int) -> None:
        probe = self.__dict__.pop("_probe", None)
        mix = new_inner() if probe is None else probe
        if not isinstance(mix, TokenUnitMix):
            raise ConfigError(f"a token-exact mixture needs a unit = \"tokens\" mixture, got {type(mix).__name__}")
        for s in mix.token_sources:
            if s.epochs is not None:
                raise ConfigError(f"source {s.name!r}: epochs {s.epochs} caps documents, and a mixture dealt in "
                                  "tokens caps a source in tokens: use token_budget")
        self._new_inner = new_inner
        self.inner = mix
        self.mix = mix
        self.schedule = schedule
        self.chunk = int(chunk)
        self.sources = mix.token_sources
        self.on_source_exhausted = mix.on_source_exhausted
        self.seed_value = int(mix.seed)
        self._weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        ident = {"engine": "token-exact mixture", "version": TOKEN_MIX_VERSION, "schedule": str(schedule),
                 "seed": self.seed_value, "on_source_exhausted": self.on_source_exhausted, "eos": 1,
                 "counts": counts_digest(counts), "mixture": mix.fingerprint,
                 "sources": [{"name": s.name, "weight": s.weight, "policy": s.config.to_dict(), "chunk": s.chunk,
                              "token_budget": s.token_budget, "id_offset": int(s.id_offset)}
                             for s in self.sources]}
        self.fingerprint = "tokmix:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
        self.layout = ClusterLayout(offsets=mix.layout.offsets, members=None, num_samples=mix.layout.num_samples,
                                    fingerprint=self.fingerprint)
        self.global_batch = self.chunk
        self._k_of = np.array([s.layout.num_clusters for s in self.sources], dtype=np.int64)
        self._reset()

    def _reset(self) -> None:
        self.step = 0
        self._subs = [_SubStream(s, source_seed(self.seed_value, i)) for i, s in enumerate(self.sources)]
        n = len(self.sources)
        self._deficit = np.zeros(n, dtype=np.float64)
        self._target = np.zeros(n, dtype=np.float64)
        self._exhausted_at = np.full(n, -1, dtype=np.int64)

    # -- dealing -----------------------------------------------------------------------------------
    def next_step(self) -> MixTokenStep:
        """The pieces of `self.step`'s G tokens, then advance one step; EndOfData (state
        unchanged) when the sources cannot fill the step."""
        marks = [s.mark() for s in self._subs]
        saved = (self._deficit.copy(), self._target.copy(), self._exhausted_at.copy())
        try:
            return self._deal()
        except EndOfData:
            for s, m in zip(self._subs, marks):
                s.restore(m)
            self._deficit, self._target, self._exhausted_at = saved
            raise

    def _open(self) -> np.ndarray:
        dry = np.array([s.dry() for s in self._subs], dtype=bool)
        return (self._weights > 0) & (self._exhausted_at < 0) & ~dry

    def _deal(self) -> MixTokenStep:
        t = self.step
        g = self.schedule.tokens_at(t)
        open_ = self._open()
        if not open_.any():
            raise EndOfData(t, f"end of data at step {t}: every source with weight > 0 is exhausted")
        need, deficit = allocate(self._weights, open_, g, self._deficit)
        w = np.where(open_, self._weights, 0.0)
        targets = w / w.sum() * g
        pieces: list[list[tuple[np.ndarray, ...]]] = [[] for _ in self._subs]
        dealt = np.zeros(len(self._subs), dtype=np.int64)
        changed = False
        while True:
            short = 0
            for i in np.flatnonzero(need > 0).tolist():
                got = self._subs[i].take(int(need[i]))
                pieces[i].append(got)
                tokens = int((got[3] - got[2]).sum())
                dealt[i] += tokens
                if tokens < need[i]:
                    short += int(need[i]) - tokens
                    if self.on_source_exhausted == "stop":
                        raise EndOfData(t, f"end of data at step {t}: source {self.sources[i].name!r} has "
                                           f"{tokens} tokens left, fewer than its share {int(need[i])} "
                                           "(on_source_exhausted=stop)")
            now = self._open()
            gone = open_ & ~now
            if gone.any():
                self._exhausted_at[gone] = t
                changed = True
            open_ = now
            if not short:
                break
            if not open_.any():
                raise EndOfData(t, f"end of data at step {t}: the sources have {g - short} of the step's {g} "
                                   "tokens left")
            need, _ = allocate(self._weights, open_, short, np.zeros(len(self._subs)))
        if changed:  # a source ran out: its target is what it dealt, the rest goes to the others' targets
            gone = self._exhausted_at == t
            rest = float((targets[gone] - dealt[gone]).sum())
            targets[gone] = dealt[gone]
            w = np.where(open_, self._weights, 0.0)
            targets += w / w.sum() * rest if open_.any() else 0.0
        self._target += targets
        self._deficit = np.zeros_like(deficit) if changed else deficit
        self.step = t + 1
        return self._riffle(t, g, pieces, targets)

    def _riffle(self, t: int, g: int, pieces: list[list[tuple[np.ndarray, ...]]],
                targets: np.ndarray) -> MixTokenStep:
        cols = [[np.concatenate(x) for x in zip(*p)] if p else [np.empty(0, dtype=np.int64)] * 4 for p in pieces]
        n_of = np.array([len(c[0]) for c in cols], dtype=np.int64)
        grouped = np.repeat(np.arange(len(cols), dtype=np.int64), n_of)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed_value, _ORDER_TAG, t])))
        labels = grouped[rng.permutation(grouped.size)]
        where = np.argsort(labels, kind="stable")  # positions of each source's pieces, in order
        out = []
        for j in range(4):
            arr = np.empty(grouped.size, dtype=np.int64)
            arr[where] = np.concatenate([c[j] for c in cols])
            out.append(arr)
        ids, lengths, starts, ends = out
        return MixTokenStep(step=t, ids=ids, lengths=lengths, head=int(starts[0]) if starts.size else 0, tokens=g,
                            starts=starts, ends=ends, sources=labels, targets=targets)

    # -- what status and summaries show ------------------------------------------------------------
    def source_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(stream tokens dealt, target tokens) per source since step 0 (the sum of the steps'
        `MixTokenStep.targets`)."""
        return np.array([s.dealt for s in self._subs], dtype=np.int64), self._target.copy()

    def source_counters(self) -> SourceCounters:
        """Per-source weights, clips, document draws and exhaustion (as `MixSampler` gives them)."""
        cs = [s.sampler.counters() for s in self._subs]
        return SourceCounters(names=tuple(s.name for s in self.sources), weights=self._weights.copy(),
                              clips=np.array([s.sampler.clip or 0 for s in self._subs], dtype=np.int64),
                              draws=np.array([int(c.draws.sum()) for c in cs], dtype=np.int64),
                              exhausted_at=self._exhausted_at.copy(),
                              active_clusters=np.array([s.sampler.active_count for s in self._subs], dtype=np.int64),
                              num_clusters=self._k_of.copy(), tokens_dealt=self.source_tokens()[0],
                              tokens_target=self.source_tokens()[1])

    def schedule_change(self, change: object) -> None:
        raise ConfigError("online changes of a token-exact mixture (unit = \"tokens\" dealt in tokens) are not "
                          "supported yet: its shares are fixed by the mixture file")

    @property
    def exhausted_at(self) -> np.ndarray:
        """Per source: the step it ran out (budget or clip), -1 while it deals."""
        return self._exhausted_at.copy()

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> SamplerState:
        """Each sub-stream's sampler state before its chunk in use, its position, and the shares."""
        befores = [s.before for s in self._subs]
        has_w = [b.weights is not None for b in befores]
        weights = None
        if any(has_w):
            weights = np.concatenate([np.ones(len(b.cursor)) if b.weights is None else np.asarray(b.weights)
                                      for b in befores])
        subs = [{"fingerprint": b.fingerprint, "step": b.step, "random_cursor": b.random_cursor, "clip": b.clip,
                 "has_weights": h, "drawn": bool(len(s.ids)), "pos": s.pos, "skip": s.skip, "dealt": s.dealt,
                 "ended": s.ended} for s, b, h in zip(self._subs, befores, has_w)]
        extra = {"token_mixture": {"version": TOKEN_MIX_VERSION, "deficit": self._deficit.tolist(),
                                   "target": self._target.tolist(), "exhausted_at": self._exhausted_at.tolist(),
                                   "sources": subs}}
        return SamplerState(fingerprint=self.fingerprint, step=self.step, random_cursor=0, clip=self.clip,
                            weights=weights, cursor=np.concatenate([b.cursor for b in befores]),
                            draws=np.concatenate([b.draws for b in befores]),
                            clipped_at=np.concatenate([b.clipped_at for b in befores]), extra=extra)

    def load_state(self, state: SamplerState) -> None:
        """Continues from `state` (FingerprintMismatch for another stream's, StateError for a broken one)."""
        if state.fingerprint != self.fingerprint:
            raise FingerprintMismatch("sampler state", expected=self.fingerprint, got=state.fingerprint)
        x = (state.extra or {}).get("token_mixture")
        n = len(self.sources)
        if not isinstance(x, dict) or x.get("version") != TOKEN_MIX_VERSION or len(x.get("sources", ())) != n:
            raise StateError(f"a token-exact mixture's state lacks its version {TOKEN_MIX_VERSION} part for {n} "
                             "sources (extra.token_mixture)")
        k = int(self._k_of.sum())
        if len(state.cursor) != k:
            raise StateError(f"sampler state has {len(state.cursor)} clusters, the mixture has {k}")
        self._reset()
        first = np.concatenate(([0], np.cumsum(self._k_of)))
        for i, (sub, d) in enumerate(zip(self._subs, x["sources"])):
            lo, hi = int(first[i]), int(first[i + 1])
            before = SamplerState(fingerprint=d["fingerprint"], step=int(d["step"]),
                                  random_cursor=int(d["random_cursor"]), clip=d["clip"],
                                  weights=state.weights[lo:hi] if d["has_weights"] and state.weights is not None
                                  else None, cursor=state.cursor[lo:hi], draws=state.draws[lo:hi],
                                  clipped_at=state.clipped_at[lo:hi])
            sub.load(before, bool(d["drawn"]), d["pos"], d["skip"], d["dealt"], d["ended"])
        self._deficit = np.array(x["deficit"], dtype=np.float64)
        self._target = np.array(x["target"], dtype=np.float64)
        self._exhausted_at = np.array(x["exhausted_at"], dtype=np.int64)
        self.step = int(state.step)

    # -- what a document sampler also answers -----------------------------------------------------
    def counters(self) -> ClusterCounters:
        cs = [s.sampler.counters() for s in self._subs]
        return ClusterCounters(sizes=np.concatenate([c.sizes for c in cs]),
                               draws=np.concatenate([c.draws for c in cs]),
                               passes=np.concatenate([c.passes for c in cs]),
                               clipped_at=np.concatenate([c.clipped_at for c in cs]))

    @property
    def active_count(self) -> int:
        return int(sum(s.sampler.active_count for s, e in zip(self._subs, self._exhausted_at) if e < 0))

    @property
    def clip(self) -> int | None:
        clips = [s.sampler.clip for s in self._subs if s.sampler.clip is not None]
        return max(clips) if clips else None

    @property
    def config(self) -> TokenMixConfig:
        return TokenMixConfig()

    @property
    def config_dict(self) -> dict:
        """The mixture's config, with the token-exact dealing's part."""
        d = dict(self.mix.config_dict)
        d["token_exact"] = {"version": TOKEN_MIX_VERSION,
                            "sources": [{"name": s.name, "chunk": s.chunk, "token_budget": s.token_budget}
                                        for s in self.sources]}
        return d

    @property
    def seed(self) -> int:
        return self.seed_value

    @property
    def auto_clip(self) -> None:
        return None

    def source_of_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.mix.source_of_ids(ids)

    def cluster_of_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.mix.cluster_of_ids(ids)


def source_chunks(doc_shares: np.ndarray, chunk: int) -> list[int]:
    """Documents per draw of each source: its share of the documents of `chunk` (at least 1)."""
    return [max(1, math.ceil(float(q) * chunk)) for q in doc_shares]
