"""The mixture sampling core: many sources, each weighted, each drawn by its own policy.

One global sequence over several datasets (sources). Every step:

1. **Shares.** Each eligible source (weight > 0, not exhausted) gets floor(p_s * B) or
   ceil(p_s * B) of the B slots, p_s = weight / sum of eligible weights: the sources whose
   running deficit (target minus dealt, carried from step to step) is largest get the
   rounded-up counts. So each batch is within +-1 slot of weight x B per source and the
   cumulative count stays within a slot or two of its exact share, for any run length.
   The deficits start at zero and restart at zero whenever the weights or the set of
   eligible sources change.
2. **Exhaustion.** A source whose clip (or epoch cap) has too little room left for its
   count gives the rest to the other sources (`on_source_exhausted = "redistribute"`,
   largest remainder over their shares) or ends the job (`"stop"`); the job also ends when
   the sources' room together is smaller than a batch. Either way EndOfData leaves the
   state unchanged.
3. **Draws inside a source.** Cluster policies (`uniform`, `clusterclip`, `weighted`) draw
   each slot's cluster among the source's active clusters (uniformly or by cluster weight),
   re-draw slots that overflow a clipped cluster's room inside the same source, and take
   each cluster's next positions in a keyed pseudo-random order per pass (with the source's
   read block size), as the single-source engine does. `random` walks a chain of keyed
   permutations of the source's positions, one pass an epoch (`epochs` caps it).
4. **Order.** The B slots are dealt in a keyed random order, so every rank's contiguous
   slice holds a mixture, not one source.

All of it is vectorized over sources and clusters (no per-source Python loop, except for
`random` sources and sources read through a member table): 1,000 sources of 100 clusters
cost about what one source of 100,000 clusters costs. State is O(clusters + sources).

A mixture of exactly one source does not come here: `mixture.Mixture.new_sampler` builds
the single-source `engine.Sampler`, so its fingerprint and sequence are today's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.mixture import ON_SOURCE_EXHAUSTED, SOURCE_POLICIES, check_source_weights
from croupier.server.sampling.permutation import derive_keys, permute, seed_key
from croupier.server.sampling.policy import check_clip, check_weights
from croupier.server.sampling.sampler import ClusterCounters, in_pass_order
from croupier.server.sampling.state import Change, SamplerState

MIX_ENGINE_VERSION = 1
_CLUSTER_TAG = 0x4D_43_4C_55  # distinct from the single-source engine's tags
_RANDOM_TAG = 0x4D_52_4E_44
_STEP_TAG = 0x4D_53_54_50
_NO_CAP = np.int64(1) << np.int64(62)


@dataclass(frozen=True)
class MixSource:
    """One source as the engine sees it (validated by `mixture`).

    layout: the source's clusters over its own (local) ids, restricted to a selection if any.
    id_offset: the source's first global id (sum of the full id spaces before it).
    clip: repeat clip inside the source (clusterclip/weighted); None = none.
    cluster_weights: per-cluster weights inside the source (weighted); None = uniform.
    epochs: passes a `random` source may make; None = unlimited.
    """

    name: str
    layout: ClusterLayout
    id_offset: int
    weight: float
    policy: str
    clip: int | None = None
    cluster_weights: tuple[float, ...] | None = None
    epochs: int | None = None

    def ident(self) -> dict[str, Any]:
        return {"name": self.name, "layout": self.layout.fingerprint, "block_size": int(self.layout.block_size),
                "id_offset": int(self.id_offset), "num_samples": int(self.layout.num_samples),
                "weight": float(self.weight), "policy": self.policy, "clip": self.clip,
                "cluster_weights": None if self.cluster_weights is None else list(self.cluster_weights),
                "epochs": self.epochs}


@dataclass(frozen=True, eq=False)
class SourceCounters:
    """Per-source counters for status tables, summaries and plots (arrays of length S)."""

    names: tuple[str, ...]
    weights: np.ndarray
    clips: np.ndarray  # 0 = no clip
    draws: np.ndarray
    exhausted_at: np.ndarray  # -1 while the source still has room
    active_clusters: np.ndarray
    num_clusters: np.ndarray
    tokens_dealt: np.ndarray | None = None  # token-exact mixtures: stream tokens dealt since step 0
    tokens_target: np.ndarray | None = None  # and the tokens the shares called for


def allocate(weights: np.ndarray, eligible: np.ndarray, total: int,
             deficit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts, new deficit): `total` slots over the eligible sources, floor or ceil of each share.

    The sources with the largest carried deficit (ties: the lower index) get the rounded-up
    counts. Pure: the caller commits the new deficit."""
    w = np.where(eligible, weights, 0.0)
    q = w / w.sum() * total
    base = np.floor(q).astype(np.int64)
    rest = int(total - base.sum())
    d = deficit + (q - base)
    counts = base.copy()
    if rest > 0:
        order = np.argsort(-np.where(eligible, d, -np.inf), kind="stable")[:rest]
        counts[order] += 1
        d[order] -= 1.0
    return counts, np.where(eligible, d, 0.0)


class MixSampler:
    """Generates the one global sequence of batches of a mixture; see the module docstring.

    The interface is the single-source `Sampler`'s (next_batch, schedule_change, state,
    load_state, counters), so the job core serves either."""

    def __init__(self, sources: Sequence[MixSource], global_batch: int, seed: int = 0,
                 on_source_exhausted: str = "redistribute") -> None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
            raise ConfigError(f"global batch must be an integer >= 1, got {global_batch!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        if on_source_exhausted not in ON_SOURCE_EXHAUSTED:
            raise ConfigError(f"unknown on_source_exhausted {on_source_exhausted!r}; valid choices: "
                              f"{', '.join(ON_SOURCE_EXHAUSTED)}")
        if len(sources) < 2:
            raise ConfigError(f"a mixture engine needs at least 2 sources, got {len(sources)}")
        self.sources = tuple(sources)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.on_source_exhausted = on_source_exhausted
        s_count = len(self.sources)
        sizes = [src.layout.sizes for src in self.sources]
        self._k_of = np.array([len(z) for z in sizes], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(self._k_of)]).astype(np.int64)
        k = int(self._first[-1])
        self._sizes = np.concatenate(sizes).astype(np.int64)
        self._src_of = np.repeat(np.arange(s_count, dtype=np.int64), self._k_of)
        self._local_off = np.concatenate([src.layout.offsets[:-1] for src in self.sources]).astype(np.int64)
        self._block = np.repeat(np.array([src.layout.block_size for src in self.sources], dtype=np.int64),
                                self._k_of)
        self._id_off = np.array([src.id_offset for src in self.sources], dtype=np.int64)
        self._is_random = np.array([src.policy == "random" for src in self.sources])
        self._contiguous = np.array([src.layout.members is None for src in self.sources])
        self._positions = np.array([src.layout.num_positions for src in self.sources], dtype=np.int64)
        for i, src in enumerate(self.sources):
            if src.policy not in SOURCE_POLICIES:
                raise ConfigError(f"source {src.name!r}: policy {src.policy!r} cannot be used inside a mixture; "
                                  f"valid: {', '.join(SOURCE_POLICIES)}")
            if src.clip is not None:
                check_clip(int(src.clip), int(src.layout.num_positions))
            if src.cluster_weights is not None and len(src.cluster_weights) != self._k_of[i]:
                raise ConfigError(f"source {src.name!r}: cluster_weights has {len(src.cluster_weights)} entries "
                                  f"but the source has {int(self._k_of[i])} clusters")
        total_samples = int(sum(int(src.layout.num_samples) for src in self.sources))
        layout_offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        ident = {"engine": "mix", "version": MIX_ENGINE_VERSION, "global_batch": self.global_batch,
                 "seed": self.seed, "on_source_exhausted": on_source_exhausted,
                 "sources": [src.ident() for src in self.sources]}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
        self.fingerprint = f"mix:{digest}"
        # The combined cluster list (for status and counts): the ids it implies are not used.
        self.layout = ClusterLayout(offsets=layout_offsets, members=None, num_samples=total_samples,
                                    fingerprint=self.fingerprint)
        self._cluster_key = seed_key(self.seed, _CLUSTER_TAG)
        self._random_key = seed_key(self.seed, _RANDOM_TAG)
        self.step = 0
        self._src_weight = np.array([float(src.weight) for src in self.sources], dtype=np.float64)
        self._src_clip = np.array([0 if src.clip is None else int(src.clip) for src in self.sources], dtype=np.int64)
        self._cw = np.ones(k, dtype=np.float64)
        self._has_cw = False
        for i, src in enumerate(self.sources):
            if src.cluster_weights is not None:
                self._cw[self._first[i]:self._first[i + 1]] = src.cluster_weights
                self._has_cw = True
        self._deficit = np.zeros(s_count, dtype=np.float64)
        self._random_cursor = np.zeros(s_count, dtype=np.int64)
        self._exhausted_at = np.full(s_count, -1, dtype=np.int64)
        self._cursor = np.zeros(k, dtype=np.int64)
        self._draws = np.zeros(k, dtype=np.int64)
        self._clipped_at = np.full(k, -1, dtype=np.int64)
        self._pending: list[Change] = []
        self._epoch_src = np.array([i for i, src in enumerate(self.sources)
                                    if src.policy == "random" and src.epochs is not None], dtype=np.int64)
        self._epoch_cap = np.array([int(self.sources[i].epochs) * int(self._positions[i]) for i in self._epoch_src],
                                   dtype=np.int64)
        self._rebuild()

    # -- the Sampler interface ------------------------------------------------------------------
    @property
    def clip(self) -> int | None:
        """The largest source clip in force (for the one-number status field); None = none."""
        m = int(self._src_clip.max())
        return m or None

    @property
    def active_count(self) -> int:
        return int(self._active.size) + int(sum(self._k_of[i] for i in np.flatnonzero(self._is_random)
                                                if self._exhausted_at[i] < 0))

    @property
    def config_dict(self) -> dict[str, Any]:
        """What JobInfo.policy_json and checkpoints record for a mixture."""
        return {"mixture": [src.ident() for src in self.sources], "on_source_exhausted": self.on_source_exhausted}

    def source_index(self, name: str) -> int:
        for i, src in enumerate(self.sources):
            if src.name == name:
                return i
        raise ConfigError(f"unknown source {name!r}; the mixture's sources: "
                          f"{', '.join(src.name for src in self.sources)}")

    def source_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Source index of each global id; ReportRefused (rule `id`) for an id in no source."""
        from croupier.errors import ReportRefused

        ids = np.asarray(ids, dtype=np.int64)
        src = np.searchsorted(self._id_off, ids, side="right") - 1
        ends = self._id_off + np.array([s.layout.num_samples for s in self.sources], dtype=np.int64)
        bad = (src < 0) | (ids >= ends[np.maximum(src, 0)])
        if bad.any():
            raise ReportRefused("id", f"sample id {int(ids[bad][0])} lies in no source of the mixture")
        return src

    def cluster_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Index in the combined cluster list of each global id (ReportRefused for an id in
        no cluster, e.g. outside a source's selection)."""
        from croupier.errors import ReportRefused
        from croupier.layout import layout_group_of

        ids = np.asarray(ids, dtype=np.int64)
        src = self.source_of_ids(ids)
        if not hasattr(self, "_group_of"):
            self._group_of: dict[int, Any] = {}
        out = np.empty(ids.size, dtype=np.int64)
        for i in np.unique(src).tolist():
            sel = src == i
            fn = self._group_of.get(i)
            if fn is None:
                fn = self._group_of[i] = layout_group_of(self.sources[i].layout)
            try:
                out[sel] = fn(ids[sel] - self._id_off[i]) + self._first[i]
            except ReportRefused as exc:
                raise ReportRefused("id", f"source {self.sources[i].name!r}: {exc}") from None
        return out

    def cluster_weights(self) -> np.ndarray:
        """Per-cluster weights inside the sources, over the combined cluster list."""
        return self._cw.copy()

    def next_batch(self) -> np.ndarray:
        """The global batch of `self.step` (int64 global ids), then advance one step.

        Raises EndOfData, leaving the state unchanged, when the sources cannot fill a batch
        (or one source cannot fill its share and `on_source_exhausted` is "stop")."""
        step = self.step
        self._apply_changes(step)
        counts, deficit = self._plan(step)
        self._deficit = deficit
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _STEP_TAG, step])))
        slot_src = np.repeat(np.arange(len(self.sources), dtype=np.int64), counts)
        slot_src = slot_src[rng.permutation(self.global_batch)]
        ids = np.empty(self.global_batch, dtype=np.int64)
        clustered = ~self._is_random[slot_src]
        if clustered.any():
            slots = np.flatnonzero(clustered)
            ids[slots] = self._cluster_ids(rng, slot_src[slots], step)
        for i in np.flatnonzero(self._is_random & (counts > 0)):
            slots = np.flatnonzero(slot_src == i)
            ids[slots] = self._random_ids(int(i), slots.size)
        self._mark_exhausted(step, counts)
        self.step = step + 1
        return ids

    def schedule(self, step: int, clip: int | None = None, weights: Sequence[float] | None = None) -> None:
        """Per-cluster weights for every source (a vector over all clusters); see schedule_change."""
        self.schedule_change(Change(step=int(step), clip=clip, weights=None if weights is None
                                    else tuple(float(w) for w in weights)))

    def schedule_change(self, change: Change) -> None:
        """Records an online change that takes effect at the start of `change.step`.

        A mixture change names a source (`source`, with a new `source_weight` and/or `clip`),
        or sets every source's weight (`source_weights`), or the cluster weights inside the
        sources (`weights`, one per cluster of the combined list, in source order)."""
        if change.step < self.step:
            raise ConfigError(f"a change must name a future step; step {change.step} is before the sampler's "
                              f"step {self.step}")
        s_count = len(self.sources)
        if change.source is None and change.clip is not None:
            raise ConfigError("in a mixture a clip change names its source (--source NAME)")
        if change.source is not None:
            if not 0 <= change.source < s_count:
                raise ConfigError(f"source index {change.source} is out of range (the mixture has {s_count})")
            src = self.sources[change.source]
            if change.source_weight is None and change.clip is None:
                raise ConfigError(f"a change to source {src.name!r} needs a new weight or clip")
            if change.source_weight is not None:
                w = self._src_weight.copy()
                w[change.source] = change.source_weight
                check_source_weights(w, [x.name for x in self.sources])
            if change.clip is not None:
                if src.policy not in ("clusterclip", "weighted"):
                    raise ConfigError(f"source {src.name!r} has policy {src.policy!r}, which takes no clip; the "
                                      "clip applies to clusterclip and weighted")
                check_clip(int(change.clip), int(src.layout.num_positions))
        if change.source_weights is not None:
            if len(change.source_weights) != s_count:
                raise ConfigError(f"source weights has {len(change.source_weights)} entries but the mixture has "
                                  f"{s_count} sources")
            check_source_weights(np.asarray(change.source_weights), [x.name for x in self.sources])
        if change.weights is not None:
            if len(change.weights) != len(self._sizes):
                raise ConfigError(f"weights has {len(change.weights)} entries but the mixture has "
                                  f"{len(self._sizes)} clusters")
            check_weights(change.weights)
        if change.source is None and change.source_weights is None and change.weights is None:
            raise ConfigError("a change needs a new weight, clip or weights")
        self._pending.append(change)
        self._pending.sort(key=lambda c: c.step)

    def state(self) -> SamplerState:
        extra = {"src_weight": self._src_weight.tolist(), "src_clip": self._src_clip.tolist(),
                 "deficit": self._deficit.tolist(), "random_cursor": self._random_cursor.tolist(),
                 "exhausted_at": self._exhausted_at.tolist()}
        return SamplerState(
            fingerprint=self.fingerprint, step=self.step, random_cursor=0, clip=self.clip,
            weights=self._cw.copy() if self._has_cw else None, cursor=self._cursor.copy(),
            draws=self._draws.copy(), clipped_at=self._clipped_at.copy(), pending=tuple(self._pending),
            extra=extra)

    def load_state(self, state: SamplerState) -> None:
        if state.fingerprint != self.fingerprint:
            raise FingerprintMismatch("sampler state", expected=self.fingerprint, got=state.fingerprint)
        k, s_count = len(self._sizes), len(self.sources)
        if len(state.cursor) != k or len(state.draws) != k or len(state.clipped_at) != k:
            raise StateError(f"sampler state has {len(state.cursor)} clusters, the mixture has {k}")
        extra = state.extra or {}
        try:
            arrays: dict[str, np.ndarray] = {name: np.array(extra[name], dtype=dt) for name, dt in
                      (("src_weight", np.float64), ("src_clip", np.int64), ("deficit", np.float64),
                       ("random_cursor", np.int64), ("exhausted_at", np.int64))}
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"mixture sampler state lacks its per-source part: {exc}") from None
        if any(a.shape != (s_count,) for a in arrays.values()):
            raise StateError(f"mixture sampler state does not hold {s_count} sources")
        self.step = int(state.step)
        self._src_weight = arrays["src_weight"]
        self._src_clip = arrays["src_clip"]
        self._deficit = arrays["deficit"]
        self._random_cursor = arrays["random_cursor"]
        self._exhausted_at = arrays["exhausted_at"]
        self._has_cw = state.weights is not None
        self._cw = np.ones(k) if state.weights is None else np.array(state.weights, dtype=np.float64)
        self._cursor = np.array(state.cursor, dtype=np.int64)
        self._draws = np.array(state.draws, dtype=np.int64)
        self._clipped_at = np.array(state.clipped_at, dtype=np.int64)
        self._pending = list(state.pending)
        self._rebuild()

    def counters(self) -> ClusterCounters:
        return ClusterCounters(sizes=self._sizes, draws=self._draws.copy(),
                               passes=self._cursor // self._sizes, clipped_at=self._clipped_at.copy())

    def source_counters(self) -> SourceCounters:
        draws = np.bincount(self._src_of, weights=self._draws, minlength=len(self.sources)).astype(np.int64)
        act = np.bincount(self._src_of[self._active], minlength=len(self.sources)).astype(np.int64)
        act[self._is_random & (self._exhausted_at < 0)] = self._k_of[self._is_random & (self._exhausted_at < 0)]
        return SourceCounters(names=tuple(src.name for src in self.sources), weights=self._src_weight.copy(),
                              clips=self._src_clip.copy(), draws=draws, exhausted_at=self._exhausted_at.copy(),
                              active_clusters=act, num_clusters=self._k_of.copy())

    # -- shares and room ---------------------------------------------------------------------
    def _room(self) -> np.ndarray:
        """Draws each source can still make (_NO_CAP when unbounded): kept up to date per step."""
        room = self._croom.copy()
        if self._epoch_cap.size:
            rs = self._epoch_src
            room[rs] = np.maximum(0, self._epoch_cap - self._random_cursor[rs])
        return room

    def _recount_room(self) -> None:
        """Recompute the cluster sources' room from the per-cluster state (O(clusters))."""
        per = np.where(self._is_active & (self._cap < _NO_CAP), self._cap - self._cursor, 0)
        sums = np.add.reduceat(per, self._first[:-1])  # every source has >= 1 cluster
        has_cluster = self._hi > self._lo
        room = np.where(self._src_clip > 0, sums, _NO_CAP).astype(np.int64)
        room[~self._is_random & ~has_cluster] = 0
        room[self._is_random] = _NO_CAP
        self._croom = room

    def _plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(per-source counts, new deficit) for this step; EndOfData if they cannot be met."""
        b = self.global_batch
        room = self._room()
        eligible = (self._src_weight > 0) & (self._exhausted_at < 0) & (room > 0)
        if not eligible.any():
            raise EndOfData(step, f"end of data at step {step}: every source with weight > 0 is exhausted")
        counts, deficit = allocate(self._src_weight, eligible, b, self._deficit)
        short = np.flatnonzero(counts > room)
        if short.size and self.on_source_exhausted == "stop":
            i = int(short[0])
            raise EndOfData(step, f"end of data at step {step}: source {self.sources[i].name!r} has "
                                  f"{int(room[i])} draws left, fewer than its share {int(counts[i])} "
                                  "(on_source_exhausted=stop)")
        total_room = int(np.minimum(room[eligible], b).sum())
        if total_room < b:
            raise EndOfData(step, f"end of data at step {step}: the sources have {total_room} draws left, "
                                  f"fewer than the global batch {b}")
        open_ = eligible.copy()
        while short.size:
            excess = int((counts[short] - room[short]).sum())
            counts[short] = room[short]
            open_[short] = False
            extra, _ = allocate(self._src_weight, open_, excess, np.zeros(len(self.sources)))
            counts += extra
            short = np.flatnonzero(counts > room)
        return counts, deficit

    def _mark_exhausted(self, step: int, counts: np.ndarray) -> None:
        room = self._room()
        newly = (self._exhausted_at < 0) & (room == 0)
        if newly.any():
            self._exhausted_at[newly] = step
            self._deficit[:] = 0.0  # the eligible set changed: shares restart from here

    # -- internals ----------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Recompute per-cluster caps, the active set and its cumulative weights."""
        clip_of = self._src_clip[self._src_of]
        self._cap = np.where(clip_of > 0, clip_of * self._sizes, _NO_CAP)
        ok = (~self._is_random[self._src_of]) & (self._cw > 0) & (self._cursor < self._cap)
        ok &= self._exhausted_at[self._src_of] < 0
        self._is_active = ok
        self._index_active()
        self._recount_room()

    def _index_active(self) -> None:
        self._active = np.flatnonzero(self._is_active)
        self._cum = np.cumsum(self._cw[self._active]) if self._has_cw else None
        src = self._src_of[self._active]
        s_range = np.arange(len(self.sources))
        self._lo = np.searchsorted(src, s_range, side="left")
        self._hi = np.searchsorted(src, s_range, side="right")

    def _apply_changes(self, step: int) -> None:
        if not self._pending or self._pending[0].step > step:
            return
        while self._pending and self._pending[0].step <= step:
            ch = self._pending.pop(0)
            if ch.source is not None:
                if ch.source_weight is not None:
                    self._src_weight[ch.source] = ch.source_weight
                if ch.clip is not None:
                    self._src_clip[ch.source] = ch.clip
                    self._exhausted_at[ch.source] = -1  # a raised clip can re-open a source
            if ch.source_weights is not None:
                self._src_weight = np.array(ch.source_weights, dtype=np.float64)
            if ch.weights is not None:
                self._cw = np.array(ch.weights, dtype=np.float64)
                self._has_cw = True
        self._deficit[:] = 0.0
        self._rebuild()
        capped = self._cursor >= self._cap
        self._clipped_at[~capped] = -1
        self._clipped_at[capped & (self._clipped_at < 0)] = step

    def _draw_clusters(self, rng: np.random.Generator, src: np.ndarray) -> np.ndarray:
        """Each slot's cluster among its source's active clusters: uniformly, or (when any
        cluster weights are set) in proportion to them."""
        lo, hi = self._lo[src], self._hi[src]
        if self._cum is None:
            idx = lo + (rng.random(src.size) * (hi - lo)).astype(np.int64)
            np.minimum(idx, hi - 1, out=idx)
            return self._active[idx]
        base = np.where(lo > 0, self._cum[np.maximum(lo - 1, 0)], 0.0)
        top = self._cum[hi - 1]
        u = base + rng.random(src.size) * (top - base)
        idx = np.searchsorted(self._cum, u, side="right")
        np.clip(idx, lo, hi - 1, out=idx)
        return self._active[idx]

    def _cluster_ids(self, rng: np.random.Generator, slot_src: np.ndarray, step: int) -> np.ndarray:
        """Global ids for slots of cluster-policy sources (their room covers their counts)."""
        m = slot_src.size
        assigned = np.full(m, -1, dtype=np.int64)
        pending = np.arange(m)
        sizes = self._sizes
        while pending.size:
            chosen = self._draw_clusters(rng, slot_src[pending])
            keys = np.sort((chosen << 32) | pending)
            sc, slots = keys >> 32, keys & 0xFFFFFFFF
            starts = np.flatnonzero(np.concatenate(([True], sc[1:] != sc[:-1])))
            uniq, counts = sc[starts], np.diff(np.append(starts, sc.size))
            ordinal = np.arange(sc.size) - np.repeat(starts, counts)
            cur = self._cursor[uniq]
            take = np.minimum(counts, self._cap[uniq] - cur)
            ok = ordinal < np.repeat(take, counts)
            assigned[slots[ok]] = sc[ok]
            self._cursor[uniq] += take
            clipped = self._src_clip[self._src_of[uniq]] > 0
            if clipped.any():
                self._croom -= np.bincount(self._src_of[uniq[clipped]], weights=take[clipped],
                                           minlength=len(self.sources)).astype(np.int64)
            done = uniq[cur + take >= self._cap[uniq]]
            if done.size:
                self._clipped_at[done] = step
                self._is_active[done] = False
                self._index_active()
                dry = self._hi <= self._lo
                self._croom[dry & ~self._is_random] = 0
            pending = np.sort(slots[~ok])
            if pending.size and (self._hi[slot_src[pending]] <= self._lo[slot_src[pending]]).any():
                raise StateError("a mixture source ran out of room inside a step it was planned for")
        keys = np.sort((assigned << 32) | np.arange(m))
        sc, slot_of = keys >> 32, keys & 0xFFFFFFFF
        starts = np.flatnonzero(np.concatenate(([True], sc[1:] != sc[:-1])))
        uniq, counts = sc[starts], np.diff(np.append(starts, sc.size))
        self._draws[uniq] += counts
        start = self._cursor[uniq] - counts
        k = np.repeat(start, counts) + (np.arange(sc.size) - np.repeat(starts, counts))
        n_c = sizes[sc]
        passes = k // n_c
        keys_c = derive_keys(self._cluster_key, sc, passes)
        local = self._local_off[sc] + in_pass_order(k - passes * n_c, n_c, keys_c, self._block[sc])
        out = np.empty(m, dtype=np.int64)
        out[slot_of] = self._to_ids(self._src_of[sc], local)
        return out

    def _to_ids(self, src: np.ndarray, local_positions: np.ndarray) -> np.ndarray:
        """Global ids of local layout positions of the given sources."""
        ids = local_positions + self._id_off[src]
        member = ~self._contiguous[src]
        if member.any():
            for i in np.unique(src[member]):
                sel = src == i
                ids[sel] = self._id_off[i] + self.sources[i].layout.ids_at(local_positions[sel])
        return ids

    def _random_ids(self, i: int, m: int) -> np.ndarray:
        """The next m positions of source i's chain of keyed permutations, as global ids."""
        src = self.sources[i]
        total = int(self._positions[i])
        out = np.empty(m, dtype=np.int64)
        filled = 0
        g = int(self._random_cursor[i])
        while filled < m:
            epoch, off = divmod(g, total)
            take = min(m - filled, total - off)
            key = derive_keys(self._random_key, np.array([i]), np.array([epoch]))[0]
            out[filled:filled + take] = permute(np.arange(off, off + take), total, key)
            filled += take
            g += take
        self._random_cursor[i] = g
        clusters = src.layout.clusters_of(out) + self._first[i]
        np.add.at(self._draws, clusters, 1)
        return self._id_off[i] + src.layout.ids_at(out)
