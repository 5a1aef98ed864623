"""`croupier simulate`: the dry run. What will my training see?

Runs the sampling core offline over synthetic clusters (`--cluster-sizes`), a dataset's
cluster sidecar (`--dataset`), a mixture (`--mix`) or one cluster id per dataset index
(`--cluster-ids FILE.npy`: what `ClusterBatchSampler` samples a map-style dataset with; the
jsonl of `--world W --rank R` is that rank's indices), and prints either every step's ids
(jsonl; one rank's slice with --world/--rank) or a per-cluster summary with the schedule of
active clusters over the run and a warning when the end of training collapses onto a few
clusters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from croupier.cluster_ids import load_cluster_ids
from croupier.errors import ConfigError, EndOfData
from croupier.layout import ClusterLayout
from croupier.server.cli.policy_args import (
    add_block_size_argument,
    add_policy_arguments,
    add_token_arguments,
    load_mix_args,
    policy_from_args,
    refuse_block_size_for_dataset,
    synthetic_layout,
    token_schedule_from_args,
)
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.token_mixture import TokenMixDealer
from croupier.topology import Topology

__all__ = ["Schedule", "format_summary", "layout_from_args", "policy_from_args", "register", "run", "simulate"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="dry-run the sampler: per-step ids or a per-cluster summary",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cluster-sizes", help="synthetic clusters with contiguous ids, e.g. 5000,300,20,1")
    src.add_argument("--dataset", help="dataset folder with a croupier cluster sidecar")
    src.add_argument("--mix", help="a mixture file (TOML): sources with weights and policies (docs/sampling.md)")
    src.add_argument("--cluster-ids", help="a .npy file of one cluster id per dataset index (-1 = excluded): "
                                           "the sequence ClusterBatchSampler yields for that array")
    p.add_argument("--selection", help="sample only inside this named selection of the dataset")
    add_block_size_argument(p)
    add_policy_arguments(p, batch_required=False)
    add_token_arguments(p)
    p.add_argument("--state-dir", default=None,
                   help="replay a job's sequence from its state directory (a folder or s3://bucket/prefix): batch, "
                        "seed and policy from its newest checkpoint, online changes from its event log (give the "
                        "layout: --cluster-sizes, --dataset, --mix or --cluster-ids; a job dealt in tokens: the "
                        "flags it was served with)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps to simulate (required; with --state-dir the default is the job's generated step)")
    p.add_argument("--world", type=int, default=1, help="ranks in the world (jsonl: print one rank's slice)")
    p.add_argument("--rank", type=int, help="the rank whose slice jsonl prints")
    p.add_argument("--format", choices=("jsonl", "summary"), default="summary")
    p.set_defaults(func=run)


def layout_from_args(args: argparse.Namespace) -> ClusterLayout:
    if getattr(args, "cluster_ids", None) is not None:
        if getattr(args, "selection", None):
            raise ConfigError("--selection needs --dataset: with --cluster-ids, set excluded indices to -1")
        if args.block_size is not None:
            raise ConfigError(f"--block-size {args.block_size} applies to --cluster-sizes only: --cluster-ids "
                              "indices are read one by one")
        return load_cluster_ids(args.cluster_ids, f"--cluster-ids {args.cluster_ids}")
    if args.cluster_sizes is not None:
        if getattr(args, "selection", None):
            raise ConfigError("--selection needs --dataset: synthetic clusters have no selections")
        return synthetic_layout(args)
    refuse_block_size_for_dataset(args)
    from croupier.datasets import open_dataset

    return open_dataset(args.dataset).layout(getattr(args, "selection", None))


@dataclass
class Schedule:
    """What a dry run saw: per-tenth active counts and the last tenth's spread."""

    steps_run: int
    active_at_tenth: list[tuple[int, int]]
    last_tenth_clusters: int
    last_tenth_top_share: float
    end_of_data_step: int | None


def simulate(sampler: Sampler | MixSampler, steps: int, out: TextIO | None = None,
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


def format_mix_summary(sampler: MixSampler, sched: Schedule) -> str:
    """Per source: weight and target share, draws and actual share, clip, when it ran dry."""
    sc = sampler.source_counters()
    total = int(sc.draws.sum())
    w0 = np.array([src.weight for src in sampler.sources])
    lines = [f"mixture of {len(sc.names)} sources  clusters {sampler.layout.num_clusters}  "
             f"global batch {sampler.global_batch}  steps {sched.steps_run}  seed {sampler.seed}  "
             f"on_source_exhausted {sampler.on_source_exhausted}", ""]
    width = max(8, max(len(n) for n in sc.names))
    lines.append(f"{'source':>{width}} {'policy':>11} {'weight':>8} {'target':>7} {'draws':>10} {'share':>7} "
                 f"{'clip':>5} {'active':>11} {'exhausted at':>12}")
    shown = range(len(sc.names)) if len(sc.names) <= 40 else list(range(20)) + list(range(len(sc.names) - 20,
                                                                                        len(sc.names)))
    for n, i in enumerate(shown):
        if len(sc.names) > 40 and n == 20:
            lines.append(f"{'...':>{width}} ({len(sc.names) - 40} sources not shown)")
        ex = "-" if sc.exhausted_at[i] < 0 else str(int(sc.exhausted_at[i]))
        clip = "-" if sc.clips[i] == 0 else str(int(sc.clips[i]))
        lines.append(f"{sc.names[i]:>{width}} {sampler.sources[i].policy:>11} {sc.weights[i]:>8.4g} "
                     f"{w0[i] / w0.sum():>7.1%} {int(sc.draws[i]):>10} "
                     f"{(sc.draws[i] / total if total else 0.0):>7.1%} {clip:>5} "
                     f"{int(sc.active_clusters[i]):>5}/{int(sc.num_clusters[i]):<5} {ex:>12}")
    lines.append(f"{'total':>{width}} {'':>11} {'':>8} {'':>7} {total:>10}")
    lines.append("")
    lines.append("schedule (active clusters after each tenth of the run):")
    lines.append("  " + "  ".join(f"step {s}: {a}" for s, a in sched.active_at_tenth))
    for i in np.argsort(sc.exhausted_at, kind="stable"):
        if sc.exhausted_at[i] >= 0:
            lines.append(f"source {sc.names[i]!r} ran out of room at step {int(sc.exhausted_at[i])}: "
                         + ("its share went to the other sources" if sampler.on_source_exhausted == "redistribute"
                            else "the job ends there (on_source_exhausted=stop)"))
    if sched.end_of_data_step is not None:
        lines.append(f"END OF DATA at step {sched.end_of_data_step}")
    return "\n".join(lines)


def _from_state_dir(args: argparse.Namespace) -> tuple[Sampler | MixSampler, int]:
    """The job's sampler with its recorded online changes, and its generated step."""
    from croupier.errors import FingerprintMismatch
    from croupier.server.durability.state_dir import StateDir
    from croupier.server.sampling.policy import PolicyConfig

    flags = [f for f, v in (("--policy", args.policy), ("--clip", args.clip), ("--weights", args.weights),
                            ("--budget-steps", args.budget_steps), ("--switch-step", args.switch_step),
                            ("--switch-fraction", args.switch_fraction)) if v is not None]
    from croupier.server.durability.change_log import event_to_change
    from croupier.server.durability.log_copies import read_mark, reconcile

    state_dir = Path(args.state_dir)
    mark, mark_records = read_mark(state_dir)
    # The same checks a restarting server makes: both copies of the event log against the
    # mark; a lost or altered change refuses the replay (read-only here: nothing is repaired).
    check = reconcile(state_dir, mark_records, mark, write=False)
    logged = [event_to_change(ev) for ev in check.events]
    sd = StateDir.open(state_dir)
    ck = sd.newest()
    if ck is None:  # no checkpoint yet (as `serve` resumes): the flags give the policy, the log the changes
        if args.mix:
            with tempfile.TemporaryDirectory(prefix="croupier-mix-") as tmp:
                sampler: Sampler | MixSampler = mixture_sampler(load_mix_args(args, Path(tmp)), args.global_batch,
                                                                args.seed)
        else:
            sampler = Sampler(layout_from_args(args), policy_from_args(args), args.global_batch, args.seed)
        served = _mark_fingerprint(state_dir)
        if served and served != sampler.fingerprint:
            raise FingerprintMismatch(f"the job in {state_dir} (give the flags and layout it was served with)",
                                      expected=served, got=sampler.fingerprint)
        for ch in logged:
            sampler.schedule_change(ch)
        return sampler, max(mark, 0)
    if flags:
        raise ConfigError(f"--state-dir takes the sampling config from the job's checkpoint; remove {', '.join(flags)}")
    changes = logged if ck.meta.events_in_log else sd.changes(ck)
    if len(changes) < ck.n_changes:
        raise ConfigError(f"checkpoint {ck.path.name} holds {ck.n_changes} online changes but the event log of "
                          f"{state_dir} has {len(changes)}")
    meta = ck.meta
    if meta.global_batch != args.global_batch or meta.seed != args.seed:
        raise ConfigError(f"the job in {state_dir} ran global batch {meta.global_batch} and seed {meta.seed}; pass "
                          f"--global-batch {meta.global_batch} --seed {meta.seed}")
    if args.mix:
        with tempfile.TemporaryDirectory(prefix="croupier-mix-") as tmp:
            sampler = mixture_sampler(load_mix_args(args, Path(tmp)), meta.global_batch, meta.seed)
    else:
        sampler = Sampler(layout_from_args(args), PolicyConfig.from_dict(meta.policy), meta.global_batch, meta.seed)
    if sampler.fingerprint != meta.sampler_fingerprint:
        raise FingerprintMismatch(f"the job in {state_dir} (give the layout it was served with)",
                                  expected=meta.sampler_fingerprint, got=sampler.fingerprint)
    for ch in changes:
        sampler.schedule_change(ch)
    return sampler, max(meta.generated_step, mark)


def token_dealer_from_args(args: argparse.Namespace, schedule):  # -> TokenDealer
    """The token stream of --dataset (or --mix) under the policy flags: documents per draw
    (--doc-chunk, default about one step's worth) and the per-sample token counts of the sidecar."""
    from croupier.server.sampling.token_stream import TokenDealer, mean_stream_tokens, plan_tokens

    if args.cluster_sizes is not None or getattr(args, "cluster_ids", None):
        raise ConfigError("steps in tokens need per-sample token counts: give --dataset (built with --tokenizer, or "
                          "counted with `croupier shards tokens`)")
    if args.mix:
        with tempfile.TemporaryDirectory(prefix="croupier-mix-") as tmp:
            mixture = load_mix_args(args, Path(tmp))
        pieces = mixture.token_counts_by_offset()
        if pieces is None:
            raise ConfigError(f"--mix {args.mix}: steps in tokens need per-sample token counts in every source's sidecar")
        mean = float(np.mean([mean_stream_tokens(c, layout.ids_at(np.arange(layout.num_positions)))
                              for (_, c), layout in zip(pieces, mixture.layouts)]))
        chunk, _ = plan_tokens(schedule, mean, args.doc_chunk, None)
        return TokenDealer(lambda: mixture_sampler(mixture, chunk, args.seed), pieces, schedule, chunk)
    from croupier.datasets import open_dataset

    refuse_block_size_for_dataset(args)
    side = open_dataset(args.dataset)
    layout = side.layout(getattr(args, "selection", None))
    counts = side.token_counts()
    if counts is None:
        raise ConfigError(f"--dataset {args.dataset} has no per-sample token counts: build with --tokenizer, or run "
                          "`croupier shards tokens` on it")
    mean = mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions)))
    chunk, config = plan_tokens(schedule, mean, args.doc_chunk, policy_from_args(args))
    return TokenDealer(lambda: Sampler(layout, config, chunk, args.seed), [(0, counts)], schedule, chunk)


def _token_job_changes(args: argparse.Namespace, dealer) -> int:  # noqa: ANN001 - a TokenDealer at step 0
    """`simulate --global-tokens G --state-dir DIR`: the served token job's online changes
    scheduled on `dealer` (built from the flags the job was served with; its fingerprint must be
    the job's), after the checks a restarting server makes; the job's generated step."""
    from croupier.errors import FingerprintMismatch
    from croupier.server.durability.change_log import event_to_change
    from croupier.server.durability.log_copies import read_mark, reconcile
    from croupier.server.durability.state_dir import StateDir

    state_dir = Path(args.state_dir)
    mark, mark_records = read_mark(state_dir)
    check = reconcile(state_dir, mark_records, mark, write=False)
    ck = StateDir.open(state_dir).newest()
    served = ck.meta.sampler_fingerprint if ck is not None else _mark_fingerprint(state_dir)
    if served and served != dealer.fingerprint:
        raise FingerprintMismatch(f"the job in {state_dir} (give the flags, dataset and token schedule it was served "
                                  "with)", expected=served, got=dealer.fingerprint)
    for ev in check.events:
        dealer.schedule_change(event_to_change(ev))
    return max(mark, 0 if ck is None else ck.meta.generated_step)


def _run_tokens(args: argparse.Namespace, schedule) -> int:
    """`simulate --global-tokens G`: each step's documents with the stream tokens taken from the
    first and last (jsonl: `first_skip`, `last_end`), or the summary with the schedule."""
    if args.steps is None and not args.state_dir:
        raise ConfigError("--steps is required (steps to simulate)")
    world = args.world
    schedule.check_world(world)
    if args.rank is not None:
        Topology(rank=args.rank, world=world)
    dealer = token_dealer_from_args(args, schedule)
    if args.state_dir:
        generated = _token_job_changes(args, dealer)
        if args.steps is None:
            args.steps = generated
    exact = isinstance(dealer, TokenMixDealer)
    if args.format == "jsonl":
        for t in range(args.steps):
            try:
                st = dealer.next_step()
            except EndOfData as exc:
                print(f"croupier simulate: end of data at step {exc.step}", file=sys.stderr)
                break
            sl = st.part(0 if args.rank is None else args.rank, 1 if args.rank is None else world)
            row = {"step": t, "tokens": sl.tokens, "indices": sl.ids.tolist(), "first_skip": sl.skip,
                   "last_end": sl.end}
            if exact:  # each piece's stream tokens, and the step's tokens per source against its target
                row.update(token_mix_row(dealer, st, sl))
            sys.stdout.write(json.dumps(row) + "\n")
        return 0
    sched = simulate(dealer, args.steps)
    print(f"steps in tokens: schedule {schedule} (global tokens from a step on), {schedule.offset(sched.steps_run):,} "
          f"tokens in {sched.steps_run} steps, {dealer.chunk} documents per draw")
    print(format_token_mix_summary(dealer, sched) if exact else format_summary(dealer, sched))
    return 0


def token_mix_row(dealer, step, part) -> dict:  # noqa: ANN001 - a TokenMixDealer, its MixTokenStep and a slice
    """jsonl fields of a token-exact mixture's step: `spans` ([start, end) of each document of the
    slice), and per source the step's tokens and its exact target share (`source_targets`)."""
    names = [s.name for s in dealer.sources]
    got = step.source_tokens(len(names))
    return {"spans": [list(r) for r in part.ranges()],
            "source_tokens": {n: int(g) for n, g in zip(names, got.tolist())},
            "source_targets": {n: round(float(x), 3) for n, x in zip(names, step.targets.tolist())}}


def format_token_mix_summary(dealer, sched: Schedule) -> str:  # noqa: ANN001 - a TokenMixDealer
    """Per source of a token-exact mixture: weight, tokens dealt against the target (the sum of
    each step's exact share), the largest gap, budget and the step it ran out."""
    dealt, target = dealer.source_tokens()
    total = int(dealt.sum())
    names = [s.name for s in dealer.sources]
    width = max(8, max(len(n) for n in names))
    lines = [f"token-exact mixture of {len(names)} sources  clusters {dealer.layout.num_clusters}  "
             f"steps {sched.steps_run}  seed {dealer.seed}  on_source_exhausted {dealer.on_source_exhausted}", ""]
    lines.append(f"{'source':>{width}} {'policy':>11} {'weight':>8} {'docs/draw':>9} {'tokens':>12} {'target':>14} "
                 f"{'share':>7} {'budget':>12} {'exhausted at':>12}")
    for i, src in enumerate(dealer.sources):
        ex = "-" if dealer.exhausted_at[i] < 0 else str(int(dealer.exhausted_at[i]))
        budget = "-" if src.token_budget is None else f"{src.token_budget:,}"
        lines.append(f"{src.name:>{width}} {src.config.policy:>11} {src.weight:>8.4g} {src.chunk:>9} "
                     f"{int(dealt[i]):>12,} {target[i]:>14,.1f} {(dealt[i] / total if total else 0.0):>7.1%} "
                     f"{budget:>12} {ex:>12}")
    lines.append(f"{'total':>{width}} {'':>11} {'':>8} {'':>9} {total:>12,} {float(target.sum()):>14,.1f}")
    lines.append(f"each step gives each source floor or ceil of its share of the step's tokens (a step where a source "
                 f"runs out: the rest by the others' shares); |tokens - target| <= "
                 f"{float(np.abs(dealt - target).max()) if total else 0.0:.2f} per source here")
    for i in np.argsort(dealer.exhausted_at, kind="stable"):
        if dealer.exhausted_at[i] >= 0:
            why = "its token budget" if dealer.sources[i].token_budget is not None and \
                dealt[i] >= dealer.sources[i].token_budget else "its clip"
            lines.append(f"source {names[i]!r} ran out ({why}) at step {int(dealer.exhausted_at[i])}: "
                         + ("its share went to the other sources" if dealer.on_source_exhausted == "redistribute"
                            else "the job ends there (on_source_exhausted=stop)"))
    if sched.end_of_data_step is not None:
        lines.append(f"END OF DATA at step {sched.end_of_data_step}")
    return "\n".join(lines)


def _mark_fingerprint(state_dir: Path) -> str:
    """The sampler fingerprint the state directory's generated-step mark names ("": none)."""
    try:
        return str(json.loads((state_dir / "generated.mark").read_bytes()).get("sampler_fingerprint", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def run(args: argparse.Namespace) -> int:
    from croupier.server.cli.policy_args import check_sequence_args

    check_sequence_args(args)  # every numeric flag against the limits the code has, before anything is read
    if args.state_dir:
        from croupier.server.durability.remote_state import local_copy

        with local_copy(args.state_dir) as state_dir:  # an s3:// state directory: read from a fetched copy
            args.state_dir = str(state_dir)
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    schedule = token_schedule_from_args(args)
    if schedule is not None:
        return _run_tokens(args, schedule)
    if args.state_dir:
        sampler, generated = _from_state_dir(args)
        if args.steps is None:
            args.steps = generated
    elif args.steps is None:
        raise ConfigError("--steps is required (steps to simulate)")
    elif args.mix:
        with tempfile.TemporaryDirectory(prefix="croupier-mix-") as tmp:
            mixture = load_mix_args(args, Path(tmp))
        sampler = mixture_sampler(mixture, args.global_batch, args.seed)
    else:
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
    print(format_mix_summary(sampler, sched) if isinstance(sampler, MixSampler) else format_summary(sampler, sched))
    return 0
