"""The sampling core: (cluster layout, policy config, global batch, seed) -> global batches.

Pure and vectorized: no network, no per-sample Python loops. The batch of step t is a
function of the state at step t, and the per-step randomness comes from a generator keyed
by (seed, step), so replaying from any saved state reproduces the sequence byte for byte.

Cluster-balanced steps draw each slot's cluster from the active clusters (probability
proportional to weight, equal by default), then take the cluster's next samples in a keyed
pseudo-random order for its current pass (`permutation.permute`, keyed by hashing
(seed, cluster, pass)). Under a clip a cluster holds `clip * size` draws; slots that overflow
a cluster's room are re-drawn from the clusters still active, so no sample is ever drawn
more than `clip` times and a knocked-out cluster's mass spreads over the rest. Random steps
walk a chain of keyed permutations of the whole layout: plain shuffling, one pass an epoch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.server.sampling.autoclip import AutoClip, derive_clip
from croupier.server.sampling.permutation import derive_keys, mix64, permute, seed_key, unpermute
from croupier.server.sampling.policy import PolicyConfig, check_clip, check_weights
from croupier.server.sampling.state import Change, SamplerState

ENGINE_VERSION = 1
_CLUSTER_TAG = 0x43_4C_55_53  # purpose tags for seed_key: distinct streams per use
_RANDOM_TAG = 0x52_41_4E_44
_STEP_TAG = 0x53_54_45_50
_BLOCK_TAG = np.uint64(0x424C_4F43_4B53_0001)
_SLOT_MASK = 0xFFFFFFFF
_NONE = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class ClusterCounters:
    """Per-cluster counters for status tables and plots (arrays of length K)."""

    sizes: np.ndarray
    draws: np.ndarray
    passes: np.ndarray
    clipped_at: np.ndarray

    @property
    def active(self) -> np.ndarray:
        return self.clipped_at < 0


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, first index, length) of each run of equal values in a sorted array."""
    n = sorted_values.size
    if not n:
        return sorted_values, _NONE, _NONE
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    lengths = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
    lengths[-1] = n - starts[-1]
    return sorted_values[starts], starts, lengths


def in_pass_order(k: np.ndarray, n: np.ndarray, keys: np.ndarray, s: int | np.ndarray) -> np.ndarray:
    """Position inside its cluster of the k-th draw of a pass (vectorized over draws; the read
    block size `s` is one number, or one per draw).

    Block size 1: a keyed permutation of [0, n). Block size S: blocks of S positions (the last
    one, of `last` positions, shorter) visited in a keyed order; the k-th draw falls in the
    block at slot k // S of that order, counting the short block's slot `p_last` as `last`
    positions long; inside a block, a keyed permutation.
    """
    if np.isscalar(s):
        if s == 1:
            return permute(k, n, keys)
        return _block_walk(k, n, keys, np.full(np.shape(k), s, dtype=np.int64))
    s = np.asarray(s, dtype=np.int64)
    out = np.empty(np.shape(k), dtype=np.int64)
    one = s == 1
    if one.any():
        out[one] = permute(k[one], n[one], keys[one])
    if not one.all():
        many = ~one
        out[many] = _block_walk(k[many], n[many], keys[many], s[many])
    return out


def _block_walk(k: np.ndarray, n: np.ndarray, keys: np.ndarray, s: np.ndarray) -> np.ndarray:
    nb = (n + s - 1) // s
    last = n - (nb - 1) * s
    block_keys = mix64(keys ^ _BLOCK_TAG)
    p_last = unpermute(nb - 1, nb, block_keys)
    lo = p_last * s
    before = k < lo
    inside = ~before & (k < lo + last)
    after = ~before & ~inside
    slot = np.where(before, k // s, p_last)
    off = np.where(before, k % s, k - lo)
    slot[after] = p_last[after] + 1 + (k[after] - lo[after] - last[after]) // s[after]
    off[after] = (k[after] - lo[after] - last[after]) % s[after]
    block = permute(slot, nb, block_keys)
    size = np.where(block == nb - 1, last, s)
    return block * s + permute(off, size, derive_keys(np.uint64(0), keys, block))


class Sampler:
    """Generates the one global sequence of batches for a dataset, policy, batch and seed."""

    def __init__(self, layout: ClusterLayout, config: PolicyConfig, global_batch: int, seed: int = 0) -> None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
            raise ConfigError(f"global batch must be an integer >= 1, got {global_batch!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        k = layout.num_clusters
        if config.weights is not None and len(config.weights) != k:
            raise ConfigError(f"weights has {len(config.weights)} entries but the layout has {k} clusters")
        self.layout = layout
        self.config = config
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.auto_clip: AutoClip | None = None
        base_clip = config.clip
        if config.auto_clip:
            assert config.budget_steps is not None  # validated by PolicyConfig
            self.auto_clip = derive_clip(layout.sizes, self.global_batch, config.budget_steps,
                                         config.min_active_share)
            base_clip = self.auto_clip.clip
        if base_clip is not None:
            check_clip(int(base_clip), int(layout.sizes.sum()))
        self._base_clip = base_clip
        ident = {"engine": ENGINE_VERSION, "layout": layout.fingerprint, "policy": config.to_dict(),
                 "block_size": int(layout.block_size),
                 "global_batch": self.global_batch, "seed": self.seed}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
        self.fingerprint = f"smp:{digest}"
        self._cluster_key = seed_key(self.seed, _CLUSTER_TAG)
        self._random_key = seed_key(self.seed, _RANDOM_TAG)
        self._sizes = layout.sizes
        self._offsets = layout.offsets
        self.step = 0
        self._random_cursor = 0
        self._clip = base_clip
        self._weights = None if config.weights is None else np.asarray(config.weights, dtype=np.float64)
        self._cursor = np.zeros(k, dtype=np.int64)
        self._extra = np.zeros(k, dtype=np.int64)  # draws - cursor: only random steps add to it
        self._clipped_at = np.full(k, -1, dtype=np.int64)
        self._pending: list[Change] = []
        self._rebuild_active()

    # -- public API ---------------------------------------------------------------------------
    @property
    def clip(self) -> int | None:
        """Clip threshold in force now (after applied online changes); None = no clip."""
        return self._clip

    @property
    def active_count(self) -> int:
        """Clusters that cluster-balanced steps can still draw from."""
        return int(self._n_active)

    def next_batch(self, part: tuple[int, int] | None = None) -> np.ndarray:
        """The global batch of `self.step` (int64 sample ids), then advance one step.

        part: (start, stop) of the slots wanted (a rank's slice): only they are returned, and
        only their in-cluster positions are computed; the state advances exactly as for the
        whole batch, and the ids equal the whole batch's [start:stop].
        Raises EndOfData, leaving the state unchanged, when the clip has exhausted the
        clusters and the policy says stop.
        """
        step = self.step
        self._apply_changes(step)
        b = self.global_batch
        if self.config.is_random_phase(step):
            positions = self._random_positions(b)
        else:
            if self._room is not None and self._room < b and self.config.on_exhausted == "stop":
                raise EndOfData(step, f"end of data at step {step}: the clip has left {self._room} draws "
                                      f"in {self._n_active} active clusters, fewer than the global batch {b}")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _STEP_TAG, step])))
            positions = self._cluster_positions(rng, b, step, part)
            unfilled = np.flatnonzero(positions == -1)
            if unfilled.size:
                positions[unfilled] = self._random_positions(unfilled.size)
        self.step = step + 1
        if part is not None:
            positions = positions[part[0]:part[1]]
        return self.layout.ids_at(positions)

    def schedule(self, step: int, clip: int | None = None, weights: list[float] | np.ndarray | None = None) -> None:
        """Record an online change that takes effect at the start of `step` (>= current step)."""
        if step < self.step:
            raise ConfigError(f"a change must name a future step; step {step} is before the sampler's step {self.step}")
        if clip is None and weights is None:
            raise ConfigError("a change needs a new clip or new weights")
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, np.integer)) or clip < 1:
                raise ConfigError(f"clip must be an integer >= 1, got {clip!r}")
            if self.config.policy not in ("clusterclip", "weighted"):
                raise ConfigError(f"policy {self.config.policy!r} takes no clip; the clip applies to clusterclip and weighted")
            clip = int(clip)
            check_clip(clip, int(self._sizes.sum()))
        wt: tuple[float, ...] | None = None
        if weights is not None:
            wt = tuple(float(w) for w in weights)
            if len(wt) != self.layout.num_clusters:
                raise ConfigError(f"weights has {len(wt)} entries but the layout has {self.layout.num_clusters} clusters")
            check_weights(wt)
            if self.config.policy == "random":
                raise ConfigError("policy 'random' draws no clusters; weights do not apply")
        self._pending.append(Change(step=int(step), clip=clip, weights=wt))
        self._pending.sort(key=lambda c: c.step)

    def schedule_change(self, change: Change) -> None:
        """`schedule` for a recorded change; refuses the fields only a mixture has."""
        if change.source is not None or change.source_weight is not None or change.source_weights is not None:
            raise ConfigError("this job serves one dataset: source weights apply to mixtures (serve --mix)")
        self.schedule(change.step, clip=change.clip,
                      weights=None if change.weights is None else list(change.weights))

    @property
    def config_dict(self) -> dict:
        """What JobInfo.policy_json and checkpoints record: the policy config."""
        return self.config.to_dict()

    def state(self) -> SamplerState:
        """A snapshot from which `load_state` continues the sequence exactly."""
        return SamplerState(
            fingerprint=self.fingerprint, step=self.step, random_cursor=self._random_cursor, clip=self._clip,
            weights=None if self._weights is None else self._weights.copy(), cursor=self._cursor.copy(),
            draws=self._cursor + self._extra, clipped_at=self._clipped_at.copy(), pending=tuple(self._pending))

    def load_state(self, state: SamplerState) -> None:
        """Continue from `state`; refuses a state of another dataset, policy, batch or seed."""
        if state.fingerprint != self.fingerprint:
            raise FingerprintMismatch("sampler state", expected=self.fingerprint, got=state.fingerprint)
        k = self.layout.num_clusters
        if len(state.cursor) != k or len(state.draws) != k or len(state.clipped_at) != k:
            raise StateError(f"sampler state has {len(state.cursor)} clusters, the layout has {k}")
        self.step = int(state.step)
        self._random_cursor = int(state.random_cursor)
        self._clip = state.clip
        self._weights = None if state.weights is None else np.array(state.weights, dtype=np.float64)
        self._cursor = np.array(state.cursor, dtype=np.int64)
        self._extra = np.array(state.draws, dtype=np.int64) - self._cursor
        self._clipped_at = np.array(state.clipped_at, dtype=np.int64)
        self._pending = list(state.pending)
        self._rebuild_active()

    def counters(self) -> ClusterCounters:
        """Per-cluster draws, completed cluster-balanced passes and clipped-at steps."""
        return ClusterCounters(sizes=self._sizes, draws=self._cursor + self._extra,
                               passes=self._cursor // self._sizes, clipped_at=self._clipped_at.copy())

    # -- internals ----------------------------------------------------------------------------
    def _rebuild_active(self) -> None:
        """Recompute the active set and its sampling table after a knockout or a change."""
        ok = np.ones(len(self._sizes), dtype=bool) if self._weights is None else self._weights > 0
        if self._clip is not None:
            ok &= self._cursor < self._clip * self._sizes
        self._is_active = ok
        self._active = np.flatnonzero(ok)
        self._n_active = int(self._active.size)  # uniform draws read _active[:_n_active] (see _knock_out)
        self._cum = None if self._weights is None else np.cumsum(self._weights[self._active])
        self._room = None
        self._cap = None if self._clip is None else self._clip * self._sizes  # draws a cluster holds
        if self._cap is not None:
            self._room = int((self._cap[self._active] - self._cursor[self._active]).sum())

    def _knock_out(self, clusters: np.ndarray) -> None:
        """Removes clusters (sorted) whose room the clip has used up (their room is already zero).

        Uniform draws read only the first `_n_active` entries of `_active`: the removed entries
        are closed up in place (a few block moves) instead of rebuilding the list from the
        flags, which costs a pass over every cluster at each knockout.
        """
        self._is_active[clusters] = False
        if self._weights is not None:
            self._active = np.flatnonzero(self._is_active)
            self._n_active = int(self._active.size)
            self._cum = np.cumsum(self._weights[self._active])
            return
        n, active = self._n_active, self._active
        gone = np.searchsorted(active[:n], clusters).tolist() + [n]
        to = gone[0]
        for lo, hi in zip(gone, gone[1:]):  # the entries strictly between two removed ones move left
            active[to:to + hi - lo - 1] = active[lo + 1:hi]
            to += hi - lo - 1
        self._n_active = to

    def _apply_changes(self, step: int) -> None:
        if not self._pending or self._pending[0].step > step:
            return
        while self._pending and self._pending[0].step <= step:
            change = self._pending.pop(0)
            if change.clip is not None:
                self._clip = change.clip
            if change.weights is not None:
                self._weights = np.asarray(change.weights, dtype=np.float64)
        if self._clip is not None:
            capped = self._cursor >= self._clip * self._sizes
            self._clipped_at[~capped] = -1
            self._clipped_at[capped & (self._clipped_at < 0)] = step
        self._rebuild_active()

    def _draw_clusters(self, rng: np.random.Generator, m: int) -> np.ndarray:
        if self._cum is None:
            return self._active[rng.integers(0, self._n_active, size=m)]
        u = rng.random(m) * self._cum[-1]
        idx = np.searchsorted(self._cum, u, side="right")
        np.minimum(idx, self._active.size - 1, out=idx)
        return self._active[idx]

    def _cluster_positions(self, rng: np.random.Generator, m: int, step: int,
                           part: tuple[int, int] | None = None) -> np.ndarray:
        """Layout positions for m slots from the active clusters; -1 where all are exhausted
        (with `part`: -2 for the filled slots outside [start, stop), whose positions are not
        computed).

        Rounds assign clusters to slots (re-drawing slots that overflow a clipped cluster's
        room); then each cluster's slots, in slot order, take its next stream positions.
        A (cluster, slot) pair travels as one int64 key, cluster * 2**32 + slot, so one sort
        groups a round's slots by cluster in slot order, and the accepted keys of all rounds,
        sorted, are the whole step's grouping.
        """
        pending = np.arange(m, dtype=np.int64)
        accepted: list[np.ndarray] = []
        cap = self._cap  # None: no clip
        while pending.size and self._n_active:
            keys = np.sort((self._draw_clusters(rng, pending.size) << 32) | pending)
            if cap is None:
                accepted.append(keys)
                pending = _NONE
                break
            uniq, first, counts = _runs(keys >> 32)
            room = cap[uniq] - self._cursor[uniq]
            take = np.minimum(counts, room)
            over = np.flatnonzero(counts > room)
            if over.size:  # a cluster's slots past its room (the last ones of its run) are drawn again
                extra = counts[over] - room[over]
                run_start = first[over] + room[over] - np.cumsum(extra) + extra
                redraw = np.repeat(run_start, extra) + np.arange(int(extra.sum()))
                keep = np.ones(keys.size, dtype=bool)
                keep[redraw] = False
                accepted.append(keys[keep])
                pending = np.sort(keys[redraw] & _SLOT_MASK)
            else:  # no cluster overflows: every slot keeps its cluster
                accepted.append(keys)
                pending = _NONE
            self._cursor[uniq] += take
            self._room -= int(take.sum())  # type: ignore[operator]  # always set with a clip
            done = uniq[take == room]
            if done.size:
                self._clipped_at[done] = step
                self._knock_out(done)
        out = np.full(m, -1 if part is None else -2, dtype=np.int64)
        if pending.size:
            out[pending] = -1
        if not accepted:
            return out
        keys = accepted[0] if len(accepted) == 1 else np.sort(np.concatenate(accepted), kind="stable")  # merges runs
        sc = keys >> 32
        slot_of = keys & _SLOT_MASK
        if cap is None:
            uniq, first, counts = _runs(sc)
            self._cursor[uniq] += counts
        # the i-th key of the sorted step is draw cursor_after - (end of its cluster's run - i) of its cluster
        if part is not None:  # only the wanted slots' positions: the others' keys are never needed
            i = np.flatnonzero((slot_of >= part[0]) & (slot_of < part[1]))
            sc_w, slot_of = sc[i], slot_of[i]
            k = self._cursor[sc_w] - np.searchsorted(sc, sc_w, side="right") + i
            sc = sc_w
        else:
            if cap is not None:
                uniq, first, counts = _runs(sc)
            ends = np.repeat(first + counts, counts)
            k = self._cursor[sc] - ends + np.arange(sc.size)
        n_c = self._sizes[sc]
        passes = k // n_c
        keys = derive_keys(self._cluster_key, sc, passes)
        out[slot_of] = self._offsets[sc] + self._in_pass_order(k - passes * n_c, n_c, keys)
        return out

    def _in_pass_order(self, k: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return in_pass_order(k, n, keys, self.layout.block_size)

    def _random_positions(self, m: int) -> np.ndarray:
        """The next m positions of the chain of keyed whole-layout permutations."""
        total = self.layout.num_positions
        out = np.empty(m, dtype=np.int64)
        filled = 0
        g = self._random_cursor
        while filled < m:
            epoch, off = divmod(g, total)
            take = min(m - filled, total - off)
            key = derive_keys(self._random_key, np.array([epoch]), np.array([0]))[0]
            out[filled:filled + take] = permute(np.arange(off, off + take), total, key)
            filled += take
            g += take
        self._random_cursor = g
        clusters, counts = np.unique(self.layout.clusters_of(out), return_counts=True)
        self._extra[clusters] += counts
        return out
