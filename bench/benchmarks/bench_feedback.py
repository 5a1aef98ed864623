"""Loss feedback at 100,000 groups: event log size, controller cost, statistics cost.

- Event log: bytes a weight change takes in the log, for 100,000 groups, in three shapes of
  change: a controller's change (every weight moves; shares rounded to the default 12
  mantissa bits, smoothed from the previous weights), the same at full float64 precision,
  and an operator's change of 100 weights. Printed per change and for 1,000 changes
  (written for real at full scale; at quick scale 20 changes are written and the total is
  20 × 50). Plus the append time (write + fsync) and the time to replay the whole log.
- Controllers: one `propose` of each controller over 100,000 groups (after 200 reports of
  4,096 samples), and the checkpoint sizes of the statistics and the controllers' state.
- Statistics: `LossStats.add` throughput in samples/s (reports of 4,096 samples).
- Controllers at cluster granularity (10,000 groups, about one sample a group between
  proposals): how far weights scatter with equal losses, and how much weight 100 groups
  with 5× the loss get (see `_many_groups`).

Sizes do not depend on the machine; times are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

GROUPS = 100_000
SCALES = {"full": {"changes": 1000, "dense_changes": 100}, "quick": {"changes": 20, "dense_changes": 10}}


def _log_sizes(changes: int, mode: str) -> dict:
    from croupier.server.durability.event_log import Event, EventLog, iter_events
    from croupier.server.feedback.controllers import round_mantissa

    rng = np.random.default_rng(0)
    w = np.full(GROUPS, 1.0 / GROUPS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.log"
        append_s = 0.0
        with EventLog(path) as log:
            base = path.stat().st_size
            for i in range(changes):
                if mode == "sparse":
                    w = w.copy()
                    w[rng.integers(0, GROUPS, 100)] = rng.random(100) / GROUPS
                else:
                    proposal = rng.gamma(4.0, 1.0, GROUPS)
                    w = 0.5 * w / w.sum() + 0.5 * proposal / proposal.sum()
                    if mode == "rounded":
                        w = round_mantissa(w, 12)
                t0 = time.perf_counter()
                log.append(Event(10 * (i + 1), "weights", "ado" if mode != "sparse" else "operator", weights=w))
                append_s += time.perf_counter() - t0
        total = path.stat().st_size - base
        t0 = time.perf_counter()
        n = sum(1 for _ in iter_events(path))
        replay_s = time.perf_counter() - t0
    assert n == changes
    return {"per_change": total / changes, "append_ms": append_s / changes * 1e3, "replay_s": replay_s}


def _controllers() -> list[dict]:
    from croupier.server.feedback.controllers import CONTROLLERS, make_controller
    from croupier.server.feedback.loss_stats import LossStats

    rng = np.random.default_rng(1)
    stats = LossStats(GROUPS)
    hardness = rng.gamma(4.0, 0.5, GROUPS)
    per_report = 4096
    t_add = 0.0
    rows = []
    ctls = {name: make_controller(name) for name in CONTROLLERS}
    w = np.ones(GROUPS)
    times: dict[str, list[float]] = {name: [] for name in ctls}
    for report in range(200):
        g = rng.integers(0, GROUPS, per_report)
        loss = hardness[g] * (1 + stats.samples[g]) ** -0.2 * (1 + 0.05 * rng.standard_normal(per_report))
        t0 = time.perf_counter()
        stats.add(report // 8, g, loss)
        t_add += time.perf_counter() - t0
        if report % 40 == 39:
            for name, ctl in ctls.items():
                t0 = time.perf_counter()
                ctl.propose(stats, w, report // 8)
                times[name].append(time.perf_counter() - t0)
    rows.append({"bench": f"feedback G={GROUPS:.0e}", "metric": "LossStats.add", "value": 200 * per_report / t_add,
                 "unit": "samples/s", "reference": None, "ratio": None, "target": "(info)"})
    rows.append({"bench": f"feedback G={GROUPS:.0e}", "metric": "loss statistics checkpoint",
                 "value": len(stats.to_bytes()) / 1e6, "unit": "MB", "reference": None, "ratio": None,
                 "target": "(info, O(groups))"})
    for name, ctl in ctls.items():
        rows.append({"bench": f"feedback G={GROUPS:.0e}", "metric": f"{name}: propose", "value": max(times[name]) * 1e3,
                     "unit": "ms", "reference": None, "ratio": None,
                     "target": f"(info; state {len(ctl.state_bytes()) / 1e6:.1f} MB)"})
    return rows


def _many_groups() -> list[dict]:
    """Controllers at cluster granularity: 10,000 groups, global batch 1,024 from 8 ranks, a
    proposal every 10 steps, 300 steps (about one sample a group between proposals). Draws
    follow the weights (multinomial); a sample's loss is scale × (1 + n/2)^-0.3 × (1 + 5%
    noise), n its group's samples so far. Reports the spread of the weights with equal losses
    and the weight of 100 groups whose loss is 5× the others'."""
    from croupier.server.feedback.controllers import CONTROLLERS, make_controller
    from croupier.server.feedback.loss_stats import LossStats

    g_count, batch, ranks = 10_000, 1024, 8
    rows = []
    for name in sorted(CONTROLLERS):
        result = {}
        for hot in (False, True):
            rng = np.random.default_rng(0)
            stats, ctl, w = LossStats(g_count), make_controller(name), np.ones(g_count)
            scale = np.ones(g_count)
            if hot:
                scale[:100] = 5.0
            trained = np.zeros(g_count)
            for step in range(300):
                g = rng.choice(g_count, size=batch, p=w / w.sum())
                loss = scale[g] * (1 + trained[g] / 2) ** -0.3 * (1 + 0.05 * rng.standard_normal(batch))
                for r in range(ranks):
                    stats.add(step, g[r::ranks], loss[r::ranks])
                np.add.at(trained, g, 1)
                if step % 10 == 9:
                    out = ctl.propose(stats, w, step)
                    if out is not None:
                        w = out
            result[hot] = w / w.sum() * g_count
        eq, hot_w = result[False], result[True]
        rows.append({"bench": "feedback G=1e+04", "metric": f"{name}: equal losses, weight range x uniform",
                     "value": float(eq.max()), "unit": "x", "reference": None, "ratio": None,
                     "target": f"(info; min {eq.min():.2f}, 99th pct {np.quantile(eq, 0.99):.2f})"})
        rows.append({"bench": "feedback G=1e+04", "metric": f"{name}: 100 groups at 5x loss, their weight",
                     "value": float(hot_w[:100].mean()), "unit": "x uniform", "reference": None, "ratio": None,
                     "target": "(info)"})
    return rows


def run(scale: str = "full") -> list[dict]:
    p = SCALES[scale]
    rows = []
    for mode, changes, label in (("rounded", p["changes"], "controller change, 12-bit shares"),
                                 ("dense", p["dense_changes"], "controller change, full float64"),
                                 ("sparse", p["changes"], "operator change of 100 weights")):
        r = _log_sizes(changes, mode)
        rows.append({"bench": f"event log G={GROUPS:.0e}", "metric": f"{label}: bytes per change",
                     "value": r["per_change"], "unit": "B", "reference": 8.0 * GROUPS,
                     "ratio": 8.0 * GROUPS / r["per_change"], "target": "(info: vs raw float64)"})
        rows.append({"bench": f"event log G={GROUPS:.0e}", "metric": f"{label}: 1,000 changes",
                     "value": r["per_change"] * 1000 / 1e6, "unit": "MB", "reference": None, "ratio": None,
                     "target": f"(info; {changes} written)"})
        rows.append({"bench": f"event log G={GROUPS:.0e}", "metric": f"{label}: append (write+fsync)",
                     "value": r["append_ms"], "unit": "ms", "reference": None, "ratio": None,
                     "target": f"(info; replay {r['replay_s'] / changes * 1e3:.1f} ms/change)"})
    return rows + _controllers() + _many_groups()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = ap.parse_args(argv)
    from bench.common.table import format_table

    print(format_table(run(args.scale)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
