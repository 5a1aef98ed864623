"""The sampling core: golden vectors, invariants (Hypothesis), statistics, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import POLICIES, PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import SamplerState
from croupier.topology import Topology
from roundtrip import assert_resume_exact

SIZES = [5000, 300, 20, 1]

CONFIGS = {
    "random": PolicyConfig("random"),
    "uniform": PolicyConfig("uniform"),
    "clusterclip": PolicyConfig("clusterclip", clip=3),
    "g2s": PolicyConfig("g2s", switch_step=2),
    "s2g": PolicyConfig("s2g", switch_step=2),
    "weighted": PolicyConfig("weighted", weights=(1.0, 2.0, 3.0, 4.0), clip=2),
}


def make(policy: str, sizes=SIZES, batch: int = 16, seed: int = 0) -> Sampler:
    return Sampler(ClusterLayout.from_sizes(sizes), CONFIGS[policy], batch, seed)


# Pinned first two batches (global batch 16, seed 0, sizes 5000,300,20,1). A change here
# changes every user's training sequence: it must be deliberate and versioned.
GOLDEN = {
    "random": [[4440, 4220, 3331, 2312, 2281, 389, 5267, 2592, 2697, 2941, 1110, 4722, 204, 2729, 4615, 1785],
              [650, 4489, 4885, 139, 1251, 1414, 2063, 4693, 2102, 1975, 9, 4262, 543, 3657, 3685, 359]],
    "uniform": [[5320, 5188, 5162, 5070, 5304, 5320, 3774, 5320, 496, 5320, 5320, 5147, 5320, 5320, 5119, 2550],
               [3167, 5301, 2774, 5315, 5059, 5064, 5303, 5319, 5320, 1507, 4181, 3851, 5320, 5040, 5320, 5010]],
    "clusterclip": [[5320, 5188, 5162, 5070, 5304, 5320, 3774, 5320, 496, 5301, 5147, 5119, 5315, 5059, 5064, 2550],
                   [3167, 5303, 2774, 5040, 5010, 5219, 5292, 5290, 5319, 1507, 4181, 3851, 5314, 2476, 5313, 5179]],
    "g2s": [[4440, 4220, 3331, 2312, 2281, 389, 5267, 2592, 2697, 2941, 1110, 4722, 204, 2729, 4615, 1785],
           [650, 4489, 4885, 139, 1251, 1414, 2063, 4693, 2102, 1975, 9, 4262, 543, 3657, 3685, 359]],
    "s2g": [[5320, 5188, 5162, 5070, 5304, 5320, 3774, 5320, 496, 5320, 5320, 5147, 5320, 5320, 5119, 2550],
           [3167, 5301, 2774, 5315, 5059, 5064, 5303, 5319, 5320, 1507, 4181, 3851, 5320, 5040, 5320, 5010]],
    "weighted": [[5304, 5301, 5320, 5320, 5188, 5315, 5303, 5162, 5319, 5314, 5070, 5313, 5317, 5308, 3774, 496],
                [5306, 5305, 5147, 5312, 5119, 2550, 5059, 5064, 5040, 5311, 5300, 5318, 3167, 5302, 5307, 5316]],
}


@pytest.mark.parametrize("policy", POLICIES)
def test_golden_vectors(policy: str) -> None:
    s = make(policy)
    got = [s.next_batch().tolist() for _ in range(2)]
    assert got == GOLDEN[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_same_inputs_same_sequence_other_seed_other_sequence(policy: str) -> None:
    a, b, c = make(policy), make(policy), make(policy, seed=1)
    first_a, first_c = a.next_batch(), c.next_batch()
    assert np.array_equal(first_a, b.next_batch())
    for _ in range(4):
        assert np.array_equal(a.next_batch(), b.next_batch())
    assert not np.array_equal(first_a, first_c)  # same step, other seed: another batch


sizes_st = st.lists(st.integers(1, 60), min_size=1, max_size=12)


@given(sizes=sizes_st, clip=st.integers(1, 4), per_rank=st.integers(1, 8),
       world=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 1000), block=st.sampled_from([1, 3, 8]))
@settings(max_examples=40, deadline=None)
def test_clip_is_exact_and_passes_do_not_repeat(sizes, clip, per_rank, world, seed, block) -> None:
    layout = ClusterLayout.from_sizes(sizes, block_size=block)
    batch = per_rank * world
    s = Sampler(layout, PolicyConfig("clusterclip", clip=clip), batch, seed)
    seen: list[np.ndarray] = []
    while True:
        try:
            ids = s.next_batch()
        except EndOfData:
            break
        assert len(ids) == batch
        seen.append(ids)
        assert s.step < 10_000
    allids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    counts = np.bincount(allids, minlength=layout.num_positions)
    assert counts.max(initial=0) <= clip
    # counters equal what was delivered
    c = s.counters()
    per_cluster = np.add.reduceat(counts, layout.offsets[:-1])
    assert np.array_equal(per_cluster, c.draws)
    # within one pass of a cluster no sample repeats: the k-th pass covers each member once
    cluster_of = layout.clusters_of(allids)
    for ci in range(layout.num_clusters):
        stream = allids[cluster_of == ci]
        n = sizes[ci]
        for start in range(0, len(stream) - n + 1, n):
            assert len(set(stream[start:start + n].tolist())) == n


@given(sizes=sizes_st, policy=st.sampled_from(["random", "uniform", "clusterclip", "g2s", "s2g"]),
       seed=st.integers(0, 1000), k=st.integers(0, 6))
@settings(max_examples=40, deadline=None)
def test_world_size_never_changes_the_sequence_and_slices_partition(sizes, policy, seed, k) -> None:
    cfg = CONFIGS[policy] if policy != "clusterclip" else PolicyConfig("clusterclip", clip=50,
                                                                          on_exhausted="random")
    batch = 16
    s = Sampler(ClusterLayout.from_sizes(sizes), cfg, batch, seed)
    for _ in range(k + 3):
        ids = s.next_batch()
        for world in (1, 2, 4, 8):
            parts = [Topology(r, world).slice(ids) for r in range(world)]
            assert all(len(p) == batch // world for p in parts)
            assert np.array_equal(np.concatenate(parts), ids)


@given(sizes=sizes_st, policy=st.sampled_from(list(CONFIGS)), seed=st.integers(0, 1000),
       k=st.integers(0, 8))
@settings(max_examples=40, deadline=None)
def test_checkpoint_at_any_step_resumes_exactly(sizes, policy, seed, k) -> None:
    layout = ClusterLayout.from_sizes(sizes)
    cfg = CONFIGS[policy]
    if policy == "weighted":
        cfg = PolicyConfig("weighted", weights=tuple(range(1, len(sizes) + 1)), clip=3, on_exhausted="random")
    elif policy == "clusterclip":
        cfg = PolicyConfig("clusterclip", clip=2, on_exhausted="random")
    assert_resume_exact(
        make=lambda: Sampler(layout, cfg, 8, seed),
        advance=lambda s: s.next_batch(),
        save=lambda s: s.state().to_bytes(),
        load=lambda s, b: s.load_state(SamplerState.from_bytes(b)),
        k=k, tail=6)


@given(seed=st.integers(0, 1000), change_at=st.integers(0, 6), k=st.integers(0, 10),
       clip=st.integers(1, 5))
@settings(max_examples=30, deadline=None)
def test_online_changes_replay_exactly(seed, change_at, k, clip) -> None:
    layout = ClusterLayout.from_sizes([40, 9, 3, 1])

    def make_sampler() -> Sampler:
        s = Sampler(layout, PolicyConfig("clusterclip", clip=2, on_exhausted="random"), 8, seed)
        s.schedule(change_at, clip=clip)
        s.schedule(change_at + 2, weights=[1.0, 0.0, 2.0, 1.0])
        return s

    assert_resume_exact(make=make_sampler, advance=lambda s: s.next_batch(),
                        save=lambda s: s.state().to_bytes(),
                        load=lambda s, b: s.load_state(SamplerState.from_bytes(b)), k=k, tail=8)


def test_online_clip_change_takes_effect_at_its_step() -> None:
    layout = ClusterLayout.from_sizes([1000, 2])
    s = Sampler(layout, PolicyConfig("clusterclip", clip=1), 10, 0)
    s.schedule(3, clip=4)
    for _ in range(3):
        s.next_batch()
    assert s.counters().draws[1] == 2  # cluster 1 (size 2) clipped at 1 pass
    assert s.counters().clipped_at[1] >= 0
    for _ in range(5):
        s.next_batch()
    assert s.counters().draws[1] == 8  # reactivated at step 3, clipped again at 4 passes
    with pytest.raises(ConfigError, match="future step"):
        s.schedule(2, clip=5)


def test_uniform_draw_counts_are_uniform_over_clusters() -> None:
    sizes = [5000, 1200, 300, 80, 20, 5]
    s = Sampler(ClusterLayout.from_sizes(sizes), PolicyConfig("clusterclip", clip=10**6), 60, 3)
    for _ in range(200):
        s.next_batch()
    draws = s.counters().draws
    _, p = stats.chisquare(draws)
    assert p > 0.001, draws
    assert draws.sum() == 60 * 200


def test_random_draw_counts_follow_cluster_sizes_and_one_pass_is_one_epoch() -> None:
    sizes = np.array([600, 250, 100, 40, 10])
    layout = ClusterLayout.from_sizes(sizes)
    s = Sampler(layout, PolicyConfig("random"), 50, 5)
    epoch = np.concatenate([s.next_batch() for _ in range(sizes.sum() // 50)])
    assert np.array_equal(np.sort(epoch), np.arange(sizes.sum()))  # plain shuffling: each once
    s2 = Sampler(layout, PolicyConfig("random"), 50, 6)
    for _ in range(7):
        s2.next_batch()
    draws = s2.counters().draws
    _, p = stats.chisquare(draws, sizes / sizes.sum() * draws.sum())
    assert p > 0.001, draws


def test_switching_policies_change_phase_at_the_switch() -> None:
    layout = ClusterLayout.from_sizes([10_000, 10])
    g2s = Sampler(layout, PolicyConfig("g2s", switch_fraction=0.5, budget_steps=20), 100, 0)
    first = np.concatenate([g2s.next_batch() for _ in range(10)])
    second = np.concatenate([g2s.next_batch() for _ in range(10)])
    small = lambda ids: float(np.mean(ids >= 10_000))  # noqa: E731
    assert small(first) < 0.05 and small(second) > 0.4


def test_end_of_data_stops_cleanly_or_continues_as_random() -> None:
    layout = ClusterLayout.from_sizes([5, 3])
    s = Sampler(layout, PolicyConfig("clusterclip", clip=2), 4, 0)
    for _ in range(4):
        s.next_batch()
    before = s.state().to_bytes()
    with pytest.raises(EndOfData) as info:
        s.next_batch()
    assert info.value.step == 4 and s.state().to_bytes() == before
    r = Sampler(layout, PolicyConfig("clusterclip", clip=2, on_exhausted="random"), 4, 0)
    batches = [r.next_batch() for _ in range(8)]
    assert all(len(b) == 4 for b in batches)


def test_auto_clip_keeps_the_requested_share_active() -> None:
    rng = np.random.default_rng(0)
    sizes = np.sort((rng.pareto(1.0, 60) * 50).astype(int) + 10)[::-1]
    layout = ClusterLayout.from_sizes(sizes)
    budget = int(3 * sizes.sum() / 32)  # about three passes over the data at batch 32
    cfg = PolicyConfig("clusterclip", auto_clip=True, budget_steps=budget, min_active_share=0.5)
    s = Sampler(layout, cfg, 32, 1)
    for _ in range(budget):
        s.next_batch()
    assert s.active_count >= 30
    fixed = Sampler(layout, PolicyConfig("clusterclip", clip=3, on_exhausted="random"), 32, 1)
    for _ in range(budget):
        fixed.next_batch()
    assert fixed.active_count < s.active_count
    assert "auto" in s.auto_clip.reason()


def test_state_is_small_and_strict() -> None:
    s = make("clusterclip")
    s.next_batch()
    blob = s.state().to_bytes()
    assert len(blob) < 1024
    other = make("clusterclip", seed=1)
    with pytest.raises(FingerprintMismatch, match=s.fingerprint):
        other.load_state(SamplerState.from_bytes(blob))
    with pytest.raises(StateError, match="checksum"):
        SamplerState.from_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(StateError, match="magic"):
        SamplerState.from_bytes(b"garbage" * 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "nope"}, "valid policies: random, uniform, clusterclip, g2s, s2g, weighted"),
    ({"policy": "clusterclip", "clip": 0}, "clip must be an integer >= 1, got 0"),
    ({"policy": "clusterclip"}, "needs a clip"),
    ({"policy": "uniform", "clip": 3}, "takes no clip"),
    ({"policy": "weighted"}, "needs per-cluster weights"),
    ({"policy": "weighted", "weights": (0.0, 0.0)}, "at least one weight"),
    ({"policy": "weighted", "weights": (1.0, -1.0)}, "weight 1 is -1.0"),
    ({"policy": "g2s"}, "exactly one of switch_step or switch_fraction"),
    ({"policy": "clusterclip", "auto_clip": True}, "needs budget_steps"),
    ({"policy": "random", "on_exhausted": "loop"}, "valid choices: stop, random"),
])
def test_bad_policy_config_is_refused_with_the_rule(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        PolicyConfig(**kwargs)


def test_bad_layout_and_sampler_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        ClusterLayout.from_sizes([])
    with pytest.raises(ConfigError, match="cluster 1 has size 0"):
        ClusterLayout.from_sizes([3, 0, 2])
    layout = ClusterLayout.from_sizes([3, 2])
    with pytest.raises(ConfigError, match="global batch must be an integer >= 1"):
        Sampler(layout, PolicyConfig("uniform"), 0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        Sampler(layout, PolicyConfig("uniform"), 4, seed=-1)
    with pytest.raises(ConfigError, match="weights has 3 entries but the layout has 2"):
        Sampler(layout, PolicyConfig("weighted", weights=(1, 1, 1)), 4)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        Topology(0, 3).slice(np.arange(8))
    with pytest.raises(ConfigError, match="rank 4 is outside the world"):
        Topology(4, 4)


def test_member_list_layouts_draw_their_members() -> None:
    labels = np.array([1, 0, 1, 1, 0, 2, -1, 2])
    layout = ClusterLayout.from_assignments(labels)
    s = Sampler(layout, PolicyConfig("uniform"), 6, 0)
    ids = np.concatenate([s.next_batch() for _ in range(20)])
    assert set(ids.tolist()) <= {0, 1, 2, 3, 4, 5, 7}
    assert 6 not in ids


@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=6), block=st.integers(2, 50),
       seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_block_order_reads_one_block_at_a_time_and_covers_each_pass(sizes, block, seed) -> None:
    layout = ClusterLayout.from_sizes(sizes, block_size=block)
    s = Sampler(layout, PolicyConfig("uniform"), 16, seed)
    ids = np.concatenate([s.next_batch() for _ in range(3 * sum(sizes) // 16 + 1)])
    cluster_of = layout.clusters_of(ids)
    for c, n in enumerate(sizes):
        stream = ids[cluster_of == c] - layout.offsets[c]
        for p in range(len(stream) // n):
            one_pass = stream[p * n:(p + 1) * n]
            assert np.array_equal(np.sort(one_pass), np.arange(n))
            blocks = one_pass // block
            # each block is read in one contiguous run within the pass
            runs = 1 + int(np.count_nonzero(blocks[1:] != blocks[:-1]))
            assert runs == (n + block - 1) // block


def test_block_size_is_part_of_the_fingerprint() -> None:
    a = Sampler(ClusterLayout.from_sizes([10, 5]), PolicyConfig("uniform"), 4)
    b = Sampler(ClusterLayout.from_sizes([10, 5], block_size=4), PolicyConfig("uniform"), 4)
    assert a.fingerprint != b.fingerprint
    with pytest.raises(ConfigError, match="block size must be an integer >= 1, got 0"):
        ClusterLayout.from_sizes([10, 5], block_size=0)


@pytest.mark.parametrize("block", [1, 7])
@pytest.mark.parametrize("config", [PolicyConfig("clusterclip", clip=2), PolicyConfig("uniform"),
                                    PolicyConfig("clusterclip", clip=1, on_exhausted="random"),
                                    PolicyConfig("g2s", switch_step=5)])
def test_a_part_of_the_batch_equals_the_whole_batchs_slice_and_the_state_moves_alike(config, block) -> None:
    """`next_batch(part)` (an embedded rank computes only its slice's positions) returns the
    whole batch's [start:stop] and leaves the very state the whole batch leaves."""
    layout = ClusterLayout.from_sizes(np.random.default_rng(0).integers(1, 300, 50), block_size=block)
    whole, part = Sampler(layout, config, 64, 1), Sampler(layout, config, 64, 1)
    for t in range(60):
        lo = (t % 8) * 8
        try:
            batch = whole.next_batch()
        except EndOfData:
            with pytest.raises(EndOfData):
                part.next_batch((lo, lo + 8))
            break
        assert np.array_equal(part.next_batch((lo, lo + 8)), batch[lo:lo + 8]), t
        assert part.state().to_bytes() == whole.state().to_bytes(), t
