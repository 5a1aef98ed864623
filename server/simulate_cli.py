"""`croupier simulate`: the dry run. What will my training see?

Runs the sampling core offline over synthetic clusters (`--cluster-sizes`) or a dataset's
cluster sidecar (`--dataset`), and prints either every step's ids (jsonl; one rank's slice
with --world/--rank) or a per-cluster summary with the schedule of active clusters over the
run and a warning when the end of training collapses onto a few clusters.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from croupier.errors import ConfigError, EndOfData
from croupier.server.engine import Sampler
from croupier.server.layout import ClusterLayout
from croupier.server.sampling_args import (add_block_size_argument, add_policy_arguments, policy_from_args,
                                           refuse_block_size_for_dataset, synthetic_layout)
from croupier.server.topology import Topology

__all__ = ["Schedule", "format_summary", "layout_from_args", "policy_from_args", "register", "run", "simulate"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="dry-run the sampler: per-step ids or a per-cluster summary",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cluster-sizes", help="synthetic clusters with contiguous ids, e.g. 5000,300,20,1")
    src.add_argument("--dataset", help="dataset folder with a croupier cluster sidecar")
    p.add_argument("--selection", help="sample only inside this named selection of the dataset")
    add_block_size_argument(p)
    add_policy_arguments(p)
    p.add_argument("--steps", type=int, required=True, help="steps to simulate")
    p.add_argument("--world", type=int, default=1, help="ranks in the world (jsonl: print one rank's slice)")
    p.add_argument("--rank", type=int, help="the rank whose slice jsonl prints")
    p.add_argument("--format", choices=("jsonl", "summary"), default="summary")
    p.set_defaults(func=run)


def layout_from_args(args: argparse.Namespace) -> ClusterLayout:
    if args.cluster_sizes is not None:
        if getattr(args, "selection", None):
            raise ConfigError("--selection needs --dataset: synthetic clusters have no selections")
        return synthetic_layout(args)
    refuse_block_size_for_dataset(args)
    from croupier.shards.sidecar import Sidecar

    return Sidecar.open(args.dataset).layout(getattr(args, "selection", None))


@dataclass
class Schedule:
    """What a dry run saw: per-tenth active counts and the last tenth's spread."""

    steps_run: int
    active_at_tenth: list[tuple[int, int]]
    last_tenth_clusters: int
    last_tenth_top_share: float
    end_of_data_step: int | None


def simulate(sampler: Sampler, steps: int, out: TextIO | None = None,
             topology: Topology | None = None) -> Schedule:
    """Runs `steps` steps; writes jsonl lines to `out` when given; returns the schedule."""
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    marks = {min(steps - 1, (steps * i) // 10) for i in range(1, 11)} if steps else set()
    tenth_start = steps - max(1, steps // 10)
    k = sampler.layout.num_clusters
    draws_before = np.zeros(k, dtype=np.int64)
    active: list[tuple[int, int]] = []
    end = None
    for t in range(steps):
        if t == tenth_start:
            draws_before = sampler.counters().draws
        try:
            batch = sampler.next_batch()
        except EndOfData as exc:
            end = exc.step
            break
        if out is not None:
            ids = batch if topology is None else topology.slice(batch)
            out.write(json.dumps({"step": t, "indices": ids.tolist()}) + "\n")
        if t in marks:
            active.append((t + 1, sampler.active_count))
    last = sampler.counters().draws - draws_before
    total = int(last.sum())
    return Schedule(steps_run=sampler.step, active_at_tenth=active,
                    last_tenth_clusters=int((last > 0).sum()),
                    last_tenth_top_share=float(last.max() / total) if total else 0.0,
                    end_of_data_step=end)


def format_summary(sampler: Sampler, sched: Schedule) -> str:
    c = sampler.counters()
    k = len(c.sizes)
    lines = [f"policy {sampler.config.policy}  clusters {k}  samples {sampler.layout.num_positions}  "
             f"global batch {sampler.global_batch}  steps {sched.steps_run}  seed {sampler.seed}"]
    if sampler.auto_clip is not None:
        lines.append(sampler.auto_clip.reason())
    elif sampler.clip is not None:
        lines.append(f"clip {sampler.clip}")
    lines.append("")
    lines.append(f"{'cluster':>8} {'size':>10} {'draws':>10} {'passes':>7} {'clipped at':>10}")
    order = np.argsort(-c.sizes, kind="stable")
    shown = order if k <= 40 else np.concatenate([order[:20], order[-20:]])
    for i, ci in enumerate(shown):
        if k > 40 and i == 20:
            lines.append(f"{'...':>8} ({k - 40} clusters not shown)")
        clipped = "-" if c.clipped_at[ci] < 0 else str(int(c.clipped_at[ci]))
        lines.append(f"{int(ci):>8} {int(c.sizes[ci]):>10} {int(c.draws[ci]):>10} {int(c.passes[ci]):>7} {clipped:>10}")
    lines.append(f"{'total':>8} {int(c.sizes.sum()):>10} {int(c.draws.sum()):>10}")
    lines.append("")
    lines.append("schedule (active clusters after each tenth of the run):")
    lines.append("  " + "  ".join(f"step {s}: {a}" for s, a in sched.active_at_tenth))
    lines.append(f"last tenth drew from {sched.last_tenth_clusters} of {k} clusters "
                 f"(largest share {sched.last_tenth_top_share:.0%})")
    if sched.end_of_data_step is not None:
        lines.append(f"END OF DATA at step {sched.end_of_data_step}: every cluster reached the clip "
                     f"(on_exhausted=stop)")
    share = sampler.config.min_active_share
    if sampler.clip is not None and sampler.active_count < share * k:
        lines.append(
            f"WARNING: training ends with {sampler.active_count} of {k} clusters active "
            f"({sampler.active_count / k:.0%} < {share:.0%}); the last tenth drew from only "
            f"{sched.last_tenth_clusters} clusters. The end of training collapses onto the largest "
            f"clusters: raise the clip, or use --clip auto --budget-steps {sched.steps_run}.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    layout = layout_from_args(args)
    sampler = Sampler(layout, policy_from_args(args), args.global_batch, args.seed)
    topology = None
    if args.rank is not None:
        topology = Topology(rank=args.rank, world=args.world)
        topology.slice_bounds(args.global_batch)  # refuses a batch that does not split evenly
    elif args.world != 1:
        Topology(rank=0, world=args.world).slice_bounds(args.global_batch)
    if args.format == "jsonl":
        sched = simulate(sampler, args.steps, sys.stdout, topology)
        if sched.end_of_data_step is not None:
            print(f"croupier simulate: end of data at step {sched.end_of_data_step}", file=sys.stderr)
        return 0
    sched = simulate(sampler, args.steps)
    print(format_summary(sampler, sched))
    return 0
