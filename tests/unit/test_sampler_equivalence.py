"""The sampler's per-step numpy work, restructured for speed, deals exactly what the plain
algorithm deals: every id, every EndOfData and every state field, over policies, clips,
parts of the batch, online changes and resumes. The plain algorithm lives here as the
reference (one grouping sort per round and one for the step, the active list rebuilt from
its flags at every knockout, the draws counted per cluster); so does the plain keyed
permutation, which the in-place one must equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from croupier.errors import EndOfData
from croupier.layout import ClusterLayout
from croupier.server.sampling import permutation as perm
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler, _runs

# -- the reference: the plain algorithm ------------------------------------------------------


def _group(clusters: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.sort((clusters.astype(np.int64) << 32) | slots.astype(np.int64))
    return keys >> 32, keys & 0xFFFFFFFF


class ReferenceSampler(Sampler):
    """The sampler with the plain per-step algorithm (what the optimised one must equal)."""

    def _rebuild_active(self) -> None:
        ok = np.ones(len(self._sizes), dtype=bool) if self._weights is None else self._weights > 0
        if self._clip is not None:
            ok &= self._cursor < self._clip * self._sizes
        self._is_active = ok
        self._active = np.flatnonzero(ok)
        self._n_active = self._active.size
        self._cum = None if self._weights is None else np.cumsum(self._weights[self._active])
        self._room = None
        if self._clip is not None:
            self._room = int((self._clip * self._sizes[self._active] - self._cursor[self._active]).sum())

    def _knock_out(self, clusters: np.ndarray) -> None:
        self._is_active[clusters] = False
        self._active = np.flatnonzero(self._is_active)
        self._n_active = self._active.size
        if self._weights is not None:
            self._cum = np.cumsum(self._weights[self._active])

    def _draw_clusters(self, rng: np.random.Generator, m: int) -> np.ndarray:
        if self._cum is None:
            return self._active[rng.integers(0, self._active.size, size=m)]
        u = rng.random(m) * self._cum[-1]
        idx = np.searchsorted(self._cum, u, side="right")
        np.minimum(idx, self._active.size - 1, out=idx)
        return self._active[idx]

    def _cluster_positions(self, rng, m, step, part=None):  # noqa: ANN001, ANN202 - the plain algorithm
        assigned = np.full(m, -1, dtype=np.int64)
        pending = np.arange(m)
        sizes = self._sizes
        while pending.size and self._active.size:
            chosen = self._draw_clusters(rng, pending.size)
            if self._clip is None:
                assigned[pending] = chosen
                break
            sc, slots = _group(chosen, pending)
            uniq, first, counts = _runs(sc)
            ordinal = np.arange(sc.size) - np.repeat(first, counts)
            cur = self._cursor[uniq]
            take = np.minimum(counts, self._clip * sizes[uniq] - cur)
            ok = ordinal < np.repeat(take, counts)
            assigned[slots[ok]] = sc[ok]
            self._cursor[uniq] += take
            self._room -= int(take.sum())
            done = uniq[cur + take >= self._clip * sizes[uniq]]
            if done.size:
                self._clipped_at[done] = step
                self._knock_out(done)
            pending = np.sort(slots[~ok])
        out = np.full(m, -1, dtype=np.int64)
        filled = np.flatnonzero(assigned >= 0)
        if not filled.size:
            return out
        sc, slot_of = _group(assigned[filled], filled)
        uniq, first, counts = _runs(sc)
        if self._clip is None:
            self._cursor[uniq] += counts
        start = self._cursor[uniq] - counts
        k = np.repeat(start, counts) + (np.arange(sc.size) - np.repeat(first, counts))
        if part is not None:
            wanted = (slot_of >= part[0]) & (slot_of < part[1])
            out[slot_of[~wanted]] = -2
            sc, slot_of, k = sc[wanted], slot_of[wanted], k[wanted]
        n_c = sizes[sc]
        passes = k // n_c
        keys = perm.derive_keys(self._cluster_key, sc, passes)
        out[slot_of] = self._offsets[sc] + self._in_pass_order(k - passes * n_c, n_c, keys)
        return out


U64 = np.uint64
C1, C2, C3 = U64(0xBF58476D1CE4E5B9), U64(0x94D049BB133111EB), U64(0x9E3779B97F4A7C15)


def ref_mix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.uint64)
    z = z ^ (z >> U64(30))
    z = z * C1
    z = z ^ (z >> U64(27))
    z = z * C2
    return z ^ (z >> U64(31))


def ref_derive_keys(base: np.uint64, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h = ref_mix64(np.asarray(a, dtype=np.uint64) ^ ref_mix64(np.full(np.shape(a), base, dtype=np.uint64) ^ C3))
    return ref_mix64(h ^ np.asarray(b, dtype=np.uint64) ^ C1)


def _ref_round(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    t = (v ^ k) * C1
    t = t ^ (t >> U64(31))
    t = t * C2
    return t >> U64(32)


def _ref_feistel(v, a, b, rk):  # noqa: ANN001, ANN202
    left, right = np.divmod(v, b)
    for i in range(0, 4, 2):
        left = (left + _ref_round(right, rk[i])) % a
        right = (right + _ref_round(left, rk[i + 1])) % b
    return left * b + right


def _ref_feistel_inverse(v, a, b, rk):  # noqa: ANN001, ANN202
    left, right = np.divmod(v, b)
    for i in range(2, -1, -2):
        right = (right + b - _ref_round(left, rk[i + 1]) % b) % b
        left = (left + a - _ref_round(right, rk[i]) % a) % a
    return left * b + right


def _ref_walk(x, n, key, network):  # noqa: ANN001, ANN202
    x = np.asarray(x, dtype=np.uint64)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape)
    a = np.maximum(np.sqrt(n.astype(np.float64)).astype(np.uint64), U64(1))
    b = (n + a - U64(1)) // a
    rk = [key ^ U64(t) for t in (0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3)]
    out = network(x, a, b, rk)
    outside = np.flatnonzero(out >= n)
    while outside.size:
        cur = network(out[outside], a[outside], b[outside], [k[outside] for k in rk])
        out[outside] = cur
        outside = outside[cur >= n[outside]]
    return out.astype(np.int64)


# -- the permutation -------------------------------------------------------------------------


@pytest.mark.parametrize("hi", [2, 3, 10, 1000, 10**6, 2**40])
def test_permutation_equals_the_plain_network(hi: int) -> None:
    g = np.random.Generator(np.random.PCG64(hi))
    for _ in range(20):
        m = int(g.integers(1, 2000))
        n = g.integers(1, hi, size=m, endpoint=True).astype(np.int64)
        x = (g.random(m) * n).astype(np.int64)
        keys = g.integers(0, 2**63, size=m, dtype=np.int64).astype(np.uint64) * U64(3)
        np.testing.assert_array_equal(perm.permute(x, n, keys), _ref_walk(x, n, keys, _ref_feistel))
        np.testing.assert_array_equal(perm.unpermute(x, n, keys), _ref_walk(x, n, keys, _ref_feistel_inverse))
        np.testing.assert_array_equal(perm.mix64(keys), ref_mix64(keys))
        base = U64(int(g.integers(0, 2**63)))
        np.testing.assert_array_equal(perm.derive_keys(base, x, n), ref_derive_keys(base, x, n))
        size = int(min(n[0], 3000))  # one domain whole, one key: a bijection like the reference's
        np.testing.assert_array_equal(perm.permute(np.arange(size), size, keys[0]),
                                      _ref_walk(np.arange(size), size, keys[0], _ref_feistel))


def test_permutation_leaves_its_inputs_alone() -> None:
    x, n, keys = np.arange(50), np.full(50, 77), np.arange(50, dtype=np.uint64) * U64(0x9E3779B97F4A7C15)
    before = (x.copy(), n.copy(), keys.copy())
    perm.permute(x, n, keys)
    perm.derive_keys(U64(5), x, keys)
    perm.mix64(keys)
    for got, want in zip((x, n, keys), before):
        np.testing.assert_array_equal(got, want)


# -- the sampler -----------------------------------------------------------------------------


def _sizes(k: int, seed: int) -> np.ndarray:
    g = np.random.Generator(np.random.PCG64(seed))
    return np.maximum(1, (g.pareto(1.2, size=k) * 4).astype(np.int64) + 1)


SIZES = _sizes(60, 1)
WEIGHTS = tuple(float(w) for w in np.random.Generator(np.random.PCG64(2)).random(60) * (np.arange(60) % 7 != 0))

CONFIGS = {
    "clusterclip 1": (PolicyConfig(policy="clusterclip", clip=1), 1),
    "clusterclip 2": (PolicyConfig(policy="clusterclip", clip=2), 1),
    "clusterclip 3, then random": (PolicyConfig(policy="clusterclip", clip=3, on_exhausted="random"), 1),
    "clusterclip 2, blocks of 4": (PolicyConfig(policy="clusterclip", clip=2), 4),
    "uniform": (PolicyConfig(policy="uniform"), 1),
    "uniform, blocks of 3": (PolicyConfig(policy="uniform"), 3),
    "weighted, clip 2": (PolicyConfig(policy="weighted", weights=WEIGHTS, clip=2), 1),
    "weighted": (PolicyConfig(policy="weighted", weights=WEIGHTS), 1),
    "g2s": (PolicyConfig(policy="g2s", switch_step=3), 1),
    "s2g": (PolicyConfig(policy="s2g", switch_step=4), 1),
}
PARTS = [None, (0, 0), (0, 8), (8, 40), (63, 64)]


def _pair(name: str, batch: int = 64, seed: int = 7) -> tuple[Sampler, Sampler]:
    config, block = CONFIGS[name]
    layout = ClusterLayout.from_sizes(SIZES, block_size=block)
    return Sampler(layout, config, batch, seed), ReferenceSampler(layout, config, batch, seed)


def _same_state(a: Sampler, b: Sampler) -> None:
    sa, sb = a.state(), b.state()
    assert (sa.step, sa.random_cursor, sa.clip, sa.fingerprint) == (sb.step, sb.random_cursor, sb.clip, sb.fingerprint)
    for field in ("cursor", "draws", "clipped_at"):
        np.testing.assert_array_equal(getattr(sa, field), getattr(sb, field), err_msg=field)
    assert a.active_count == b.active_count
    assert a._room == b._room


def _run_both(a: Sampler, b: Sampler, steps: int, part: tuple[int, int] | None) -> int:
    """Deals up to `steps` steps on both, comparing every batch and state; returns steps dealt."""
    for t in range(steps):
        try:
            got = a.next_batch(part)
        except EndOfData as exc:
            with pytest.raises(EndOfData) as ref:
                b.next_batch(part)
            assert (exc.step, str(exc)) == (ref.value.step, str(ref.value))
            return t
        np.testing.assert_array_equal(got, b.next_batch(part), err_msg=f"step {a.step - 1}")
        _same_state(a, b)
    return steps


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimised_sampler_deals_what_the_plain_one_deals(name: str, part: tuple[int, int] | None) -> None:
    a, b = _pair(name)
    dealt = _run_both(a, b, 60, part)
    assert dealt > 3


@pytest.mark.parametrize("name", ["clusterclip 2", "weighted, clip 2", "clusterclip 3, then random", "uniform"])
def test_online_changes_and_resumes_match_the_plain_sampler(name: str) -> None:
    a, b = _pair(name)
    config, _ = CONFIGS[name]
    clip_change = config.clip is not None
    for s in (a, b):
        if clip_change:
            s.schedule(2, clip=config.clip + 1)
        if config.policy == "weighted":
            s.schedule(4, weights=list(reversed(WEIGHTS)))
    assert _run_both(a, b, 5, (8, 40)) == 5
    resumed = Sampler(a.layout, a.config, a.global_batch, a.seed)
    resumed.load_state(b.state())
    assert _run_both(resumed, b, 40, None) > 3


def test_draws_count_every_dealt_sample_of_its_cluster() -> None:
    """An independent check of the draws counter: ids are positions here (synthetic layout)."""
    layout = ClusterLayout.from_sizes(SIZES)
    s = Sampler(layout, PolicyConfig(policy="g2s", switch_step=2), 64, 3)
    dealt = np.concatenate([s.next_batch() for _ in range(12)])
    np.testing.assert_array_equal(s.state().draws, np.bincount(layout.clusters_of(dealt), minlength=len(SIZES)))
    clipped = Sampler(layout, PolicyConfig(policy="clusterclip", clip=2), 64, 3)
    dealt = np.concatenate([clipped.next_batch() for _ in range(8)])
    counts = np.bincount(layout.clusters_of(dealt), minlength=len(SIZES))
    np.testing.assert_array_equal(clipped.counters().draws, counts)
    assert (counts <= 2 * SIZES).all()


def test_a_step_with_many_knockouts_keeps_the_active_list_exact() -> None:
    """Clip 1 on clusters of one sample: almost every slot knocks its cluster out."""
    layout = ClusterLayout.from_sizes(np.ones(3000, dtype=np.int64))
    a = Sampler(layout, PolicyConfig(policy="clusterclip", clip=1), 512, 11)
    b = ReferenceSampler(layout, PolicyConfig(policy="clusterclip", clip=1), 512, 11)
    assert _run_both(a, b, 10, (100, 300)) == 5  # 3000 samples, once each: 5 full steps
    assert a.active_count == 3000 - 5 * 512
