"""Loss feedback at the library level: statistics, report validation, controllers, and a
synthetic training loop through the real sampler whose loss depends on the cluster."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from croupier.errors import ConfigError, CroupierError, StateError
from croupier.layout import ClusterLayout
from croupier.server.feedback.controllers import CONTROLLERS, GUARDRAILS, bound_shares, make_controller, round_mantissa
from croupier.server.feedback.loss_stats import LossStats
from croupier.server.feedback.loss_validation import ReportRefused, check_report, layout_group_of
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler

# -- statistics -------------------------------------------------------------------------------


def test_stats_fold_means_and_ema() -> None:
    s = LossStats(4, ema_decay=0.5)
    s.add(3, np.array([0, 0, 2]), np.array([1.0, 3.0, 5.0]))
    s.add(7, np.array([0, 1]), np.array([10.0, 4.0]))
    assert s.ema[0] == 0.5 * 2.0 + 0.5 * 10.0  # first report sets the EMA, the second folds in
    assert s.ema[1] == 4.0 and s.ema[2] == 5.0 and np.isnan(s.ema[3])
    assert s.samples.tolist() == [3, 1, 1, 0] and s.reports.tolist() == [2, 1, 1, 0]
    assert s.loss_sum.tolist() == [14.0, 4.0, 5.0, 0.0]
    assert s.last_step.tolist() == [7, 7, 3, -1] and s.total_reports == 2
    assert s.filled_ema()[3] == pytest.approx((6.0 + 4.0 + 5.0) / 3)
    s.add(8, np.zeros(0, np.int64), np.zeros(0))  # an empty report still counts as a report
    assert s.total_reports == 3


def test_stats_round_trip_is_exact() -> None:
    rng = np.random.default_rng(1)
    s = LossStats(1000, ema_decay=0.8)
    for step in range(20):
        g = rng.integers(0, 1000, 256)
        s.add(step, g, rng.random(256) * 5)
    t = LossStats.from_bytes(s.to_bytes())
    for name in ("ema", "loss_sum", "reports", "samples", "last_step"):
        assert np.array_equal(getattr(s, name), getattr(t, name), equal_nan=True), name
    assert t.total_reports == 20 and t.ema_decay == 0.8 and t.to_bytes() == s.to_bytes()
    assert len(s.to_bytes()) < 5 * 8 * 1000 + 200  # O(groups)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:-10], "checksum"),
    (lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:], "checksum"),
    (lambda b: b"XXXXXXXX" + b[8:], "magic"),
    (lambda b: b[:6], "magic"),
])
def test_stats_refuse_corruption(damage, match) -> None:
    s = LossStats(5)
    s.add(0, np.array([1, 2]), np.array([1.0, 2.0]))
    with pytest.raises(StateError, match=match):
        LossStats.from_bytes(damage(s.to_bytes()))


def test_stats_refuse_bad_construction_and_groups() -> None:
    with pytest.raises(ConfigError, match="groups >= 1"):
        LossStats(0)
    with pytest.raises(ConfigError, match="ema_decay"):
        LossStats(3, ema_decay=1.0)
    s = LossStats(3)
    with pytest.raises(ConfigError, match="group 3 is outside"):
        s.add(0, np.array([0, 3]), np.array([1.0, 1.0]))
    assert s.total_reports == 0 and s.samples.sum() == 0


# -- report validation ------------------------------------------------------------------------


def _layout_and_ids() -> tuple[ClusterLayout, np.ndarray]:
    layout = ClusterLayout.from_sizes([5, 3, 7])
    return layout, np.array([0, 6, 14, 5, 9], dtype=np.int64)


def test_report_maps_ids_to_groups() -> None:
    layout, ids = _layout_and_ids()
    groups, losses = check_report(ids, [1.0, 2.0, 3.0, 4.0, 0.0], layout_group_of(layout))
    assert groups.tolist() == [0, 1, 2, 1, 2] and losses.dtype == np.float64
    members = ClusterLayout.from_assignments(np.array([2, 0, 1, 0, -1, 2]))
    g, _ = check_report([0, 3, 2], [1.0, 1.0, 1.0], layout_group_of(members))
    assert g.tolist() == [2, 0, 1]
    g, _ = check_report([0, 3, 2], [1.0, 1.0, 1.0], np.array([2, 0, 1, 0, -1, 2]))
    assert g.tolist() == [2, 0, 1]


@pytest.mark.parametrize("losses, present, rule, words", [
    ([1.0, 2.0, 3.0], None, "length", ["3 losses", "5 ids"]),
    ([1.0, np.nan, 3.0, np.inf, 1.0], None, "finite", ["index 1", "nan", "2 non-finite"]),
    ([1.0, 2.0, 3.0, np.inf, 1.0], None, "finite", ["index 3", "inf"]),
    ([1.0, 2.0, -0.5, 1.0, 1.0], None, "non-negative", ["index 2", "-0.5"]),
    ([1.0, np.nan, 3.0, -1.0, 1.0], [True, False, True, True, True], "non-negative", ["index 3", "-1.0"]),
    ([1.0, 2.0, 3.0, 1.0, 1.0], [True, False], "mask-length", ["2 flags", "5 ids"]),
])
def test_report_refusals_name_rule_and_value(losses, present, rule, words) -> None:
    layout, ids = _layout_and_ids()
    stats = LossStats(layout.num_clusters)
    before = stats.to_bytes()
    with pytest.raises(ReportRefused) as info:
        groups, vals = check_report(ids, losses, layout_group_of(layout), present=present)
        stats.add(0, groups, vals)
    assert info.value.rule == rule
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert isinstance(info.value, ConfigError) and isinstance(info.value, CroupierError)
    assert stats.to_bytes() == before  # nothing changed


def test_report_refuses_ids_outside_the_layout() -> None:
    layout, _ = _layout_and_ids()
    with pytest.raises(ReportRefused, match="sample id 15 is outside"):
        check_report([0, 15], [1.0, 1.0], layout_group_of(layout))
    members = ClusterLayout.from_assignments(np.array([2, 0, 1, 0, -1, 2]))
    with pytest.raises(ReportRefused, match="sample id 4 belongs to no cluster"):
        check_report([0, 4], [1.0, 1.0], layout_group_of(members))


def test_report_absent_entries_are_left_out() -> None:
    layout, ids = _layout_and_ids()
    groups, losses = check_report(ids, [1.0, np.nan, 3.0, np.nan, 5.0], layout_group_of(layout),
                                  present=[True, False, True, False, True])
    assert groups.tolist() == [0, 2, 2] and losses.tolist() == [1.0, 3.0, 5.0]


# -- controllers ------------------------------------------------------------------------------


def test_registry_rejects_unknown_names_and_params() -> None:
    assert {"loss-softmax", "odm", "ado"} <= set(CONTROLLERS)
    with pytest.raises(ConfigError, match="unknown controller 'doremi'; valid controllers: ado, loss-softmax, odm"):
        make_controller("doremi")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) lr for controller 'loss-softmax'; valid "
                                          r"parameters: ceiling, floor, min_reports, precision_bits, smoothing, "
                                          r"temperature"):
        make_controller("loss-softmax", lr=0.1)
    for bad, match in [(dict(temperature=0.0), "temperature"), (dict(floor=1.5), "floor"),
                       (dict(ceiling=0.5), "ceiling"), (dict(smoothing=1.0), "smoothing"),
                       (dict(min_reports=-1), "min_reports")]:
        with pytest.raises(ConfigError, match=match):
            make_controller("loss-softmax", **bad)
    with pytest.raises(ConfigError, match="explore"):
        make_controller("odm", explore=2.0)
    with pytest.raises(ConfigError, match="min_points"):
        make_controller("ado", min_points=1)
    assert set(GUARDRAILS) == {"floor", "ceiling", "smoothing", "min_reports", "precision_bits"}


def test_bound_shares_and_rounding() -> None:
    w = np.array([0.9, 0.05, 0.03, 0.02, 0.0])
    active = np.array([True, True, True, True, False])
    out = bound_shares(w, active, 0.1 / 4, 2.0 / 4)
    assert out[4] == 0 and out.sum() == pytest.approx(1.0)
    assert out[0] == pytest.approx(0.5) and (out[:4] >= 0.025 - 1e-15).all()
    assert out[1] / out[2] == pytest.approx(0.05 / 0.03)  # proportional where unbound
    r = round_mantissa(np.array([1 / 3, 0.1, 0.0]), 12)
    assert r[2] == 0 and abs(r[0] - 1 / 3) < 1 / 3 * 2 ** -12
    assert (r[:2].view(np.uint64) & np.uint64((1 << 40) - 1) == 0).all()  # low 40 mantissa bits are zero


def _stats_with(ema_by_group: list[float], reports: int = 20) -> LossStats:
    s = LossStats(len(ema_by_group))
    g = np.arange(len(ema_by_group))
    for step in range(reports):
        s.add(step, g, np.array(ema_by_group))
    return s


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_guardrails_min_reports_and_paused_groups(name: str) -> None:
    ctl = make_controller(name, min_reports=30)
    s = _stats_with([1.0, 5.0, 1.0, 1.0], reports=20)
    assert ctl.propose(s, np.ones(4), 20) is None  # 20 reports < 30
    ctl = make_controller(name, min_reports=0)
    w = np.array([1.0, 0.0, 1.0, 2.0])
    proposed = 0
    for step in range(6):
        s.add(20 + step, np.arange(4), np.array([1.0, 5.0, 1.0, 1.0]) * (1 + step) ** -0.5)
        out = ctl.propose(s, w, 20 + step)
        if out is not None:
            assert out[1] == 0.0 and (out[[0, 2, 3]] > 0).all()
            w = out
            proposed += 1
    assert proposed >= 1


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_controller_is_deterministic_and_its_state_round_trips(name: str) -> None:
    def drive(ctl, steps, w):
        outs = []
        for step in steps:
            rng = np.random.default_rng([7, step])
            s_add(step, rng)
            out = ctl.propose(stats, w, step)
            if out is not None:
                w = out
            outs.append(None if out is None else out.copy())
        return outs, w

    stats = LossStats(16)

    def s_add(step, rng):
        g = rng.integers(0, 16, 200)
        stats.add(step, g, (1 + (g == 3) * 4.0) * (1 + step) ** -0.3 * (1 + 0.05 * rng.standard_normal(200)))

    a = make_controller(name)
    first, w = drive(a, range(0, 60), np.ones(16))
    saved_stats, saved = stats.to_bytes(), a.state_bytes()
    tail_a, _ = drive(a, range(60, 120), w)
    stats = LossStats.from_bytes(saved_stats)
    b = make_controller(name)
    b.load_state_bytes(saved)
    tail_b, _ = drive(b, range(60, 120), w)
    assert any(x is not None for x in tail_a)
    for x, y in zip(tail_a, tail_b):
        assert (x is None and y is None) or np.array_equal(x, y)
    d = b.describe()
    assert d["controller"] == name and d["groups"] == 16 and d["proposals"] >= 1 and "floor" in d["guardrails"]


def test_controller_state_refuses_corruption_and_other_controllers() -> None:
    a = make_controller("odm", min_reports=0)
    a.propose(_stats_with([1.0, 2.0]), np.ones(2), 5)
    data = a.state_bytes()
    with pytest.raises(StateError, match="checksum"):
        make_controller("odm").load_state_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    with pytest.raises(StateError, match="of controller 'odm', this is 'ado'"):
        make_controller("ado").load_state_bytes(data)
    with pytest.raises(StateError, match="magic"):
        make_controller("odm").load_state_bytes(b"nonsense")
    with pytest.raises(ConfigError, match="3 entries but the statistics have 2"):
        a.propose(_stats_with([1.0, 2.0]), np.ones(3), 6)
    with pytest.raises(ConfigError, match="weight 1 is nan"):
        a.propose(_stats_with([1.0, 2.0]), np.array([1.0, np.nan]), 6)


# -- the synthetic training loop ---------------------------------------------------------------

K, BATCH, WORLD, STEPS, EVERY, LOOKAHEAD = 8, 64, 4, 100, 10, 2


def _train(name: str, hot_scale: float, policy: str, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """100 steps of the real sampler; each rank reports a loss per sample of its slice.

    The loss of a sample of cluster c after the run has trained n samples of c is
    scale_c × (1 + n/100)^-0.3 × (1 + 5% noise): it falls as the cluster is learned, and
    cluster 0's is `hot_scale` times the others'. Every 10 steps the controller proposes and
    the proposal is scheduled beyond the lookahead. Returns the weights after each change and
    the draws per cluster over the last 50 steps.
    """
    layout = ClusterLayout.from_sizes([2000] * K)
    config = PolicyConfig("weighted", weights=(1.0,) * K) if policy == "weighted" \
        else PolicyConfig("clusterclip", clip=4)
    sampler = Sampler(layout, config, BATCH, seed=seed)
    group_of = layout_group_of(layout)
    stats = LossStats(K)
    ctl = make_controller(name)
    scale = np.ones(K)
    scale[0] = hot_scale
    trained = np.zeros(K)
    current = np.ones(K)
    history = [current / current.sum()]
    late = np.zeros(K)
    for step in range(STEPS):
        batch = sampler.next_batch()
        rng = np.random.default_rng([seed, step])
        for rank in range(WORLD):
            ids = batch[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD]
            c = group_of(ids)
            loss = scale[c] * (1 + trained[c] / 100) ** -0.3 * (1 + 0.05 * rng.standard_normal(ids.size))
            stats.add(step, *check_report(ids, loss, group_of))
        clusters = group_of(batch)
        np.add.at(trained, clusters, 1)
        if step >= STEPS - 50:
            np.add.at(late, clusters, 1)
        if step % EVERY == EVERY - 1:
            proposal = ctl.propose(stats, current, step)
            if proposal is not None:
                sampler.schedule(step + 1 + LOOKAHEAD, weights=proposal)
                current = proposal
                history.append(current / current.sum())
    return history, late / late.sum()


@pytest.mark.parametrize("policy", ["weighted", "clusterclip"])
@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_hot_cluster_share_at_least_doubles(name: str, policy: str) -> None:
    history, late = _train(name, hot_scale=5.0, policy=policy)
    uniform = 1 / K
    assert len(history) > 1, "the controller never proposed"
    peak = max(w[0] for w in history)
    assert peak >= 2 * uniform, f"{name}: cluster 0's weight peaked at {peak:.3f}, not 2 x {uniform}"
    assert late[0] >= 2 * uniform, f"{name}: cluster 0 got {late[0]:.3f} of the draws of the last 50 steps"


@pytest.mark.parametrize("policy", ["weighted", "clusterclip"])
@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_equal_losses_move_no_weight_more_than_ten_percent(name: str, policy: str) -> None:
    history, _ = _train(name, hot_scale=1.0, policy=policy)
    worst = max(float(np.abs(w * K - 1).max()) for w in history)
    assert worst <= 0.10, f"{name}: a weight moved {worst:.1%} from uniform with equal losses"


def test_stats_small_and_large_reports_fold_alike() -> None:
    """A report much smaller than the group count takes an O(samples) path; same result."""
    rng = np.random.default_rng(5)
    g = rng.integers(0, 50, 40)
    x = rng.random(40)
    small, large = LossStats(1000), LossStats(50)
    small.add(1, g, x)
    large.add(1, g, x)
    assert np.array_equal(small.ema[:50], large.ema, equal_nan=True)
    assert np.array_equal(small.loss_sum[:50], large.loss_sum) and np.array_equal(small.samples[:50], large.samples)


def test_ado_recovers_a_power_law_exponent() -> None:
    """Losses that follow L = c_g × N^-0.4 (N: samples reported in all) give slope -0.4 for every group."""
    ctl = make_controller("ado", min_reports=0)
    stats = LossStats(3)
    c = np.array([1.0, 2.0, 4.0])
    w = np.ones(3)
    total = 0
    for call in range(8):
        g = np.repeat(np.arange(3), 10 * 2 ** call)  # one report per call, at growing intervals
        stats.add(call, g, c[g] * (total + g.size / 2) ** -0.4)  # the loss at the interval's middle
        total += g.size
        out = ctl.propose(stats, w, call)
    slope, var = ctl.fitted_slopes()
    assert np.allclose(slope, -0.4, atol=0.02) and (var < 1e-4).all()
    assert out is not None and out[2] > out[1] > out[0]  # equal exponents: the higher loss falls faster per sample


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=40),
       st.floats(0.0, 1.0), st.floats(1.0, 50.0), st.integers(0, 2 ** 32 - 1))
def test_bound_shares_property(raw: list[float], floor: float, ceiling: float, seed: int) -> None:
    """Any proposal, any feasible bounds: shares sum to 1, stay within bounds, 0 off the active set."""
    w = np.asarray(raw)
    active = np.random.default_rng(seed).random(w.size) < 0.8
    if not active.any():
        active[0] = True
    a = int(active.sum())
    out = bound_shares(w, active, floor / a, ceiling / a)
    assert out.sum() == pytest.approx(1.0, rel=1e-9)
    assert (out[~active] == 0).all()
    assert (out[active] >= floor / a * (1 - 1e-9)).all() and (out[active] <= ceiling / a * (1 + 1e-9)).all()


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_equal_losses_propose_the_prior_back(name: str) -> None:
    """Operator weights (or a prior set later) come back unchanged when every group's loss is equal."""
    stats = LossStats(4)
    base = np.array([4.0, 2.0, 1.0, 1.0])
    ctl = make_controller(name, min_reports=0)
    out = None
    for step in range(8):
        g = np.repeat(np.arange(4), (base * 8).astype(int))  # drawn in proportion to the weights
        stats.add(step, g, np.full(g.size, 2.0 * (1 + step) ** -0.3))
        out = ctl.propose(stats, base if out is None else out, step)
        if out is not None:
            assert np.allclose(out, base / base.sum(), rtol=1e-3), out
    assert out is not None
    ctl.set_prior(np.array([1.0, 1.0, 1.0, 1.0]))
    assert np.array_equal(ctl.prior, np.full(4, 0.25))
