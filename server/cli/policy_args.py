"""The command-line flags that fix a sampling sequence, shared by `serve` and `simulate`.

Both commands must read the same flags the same way: a dry run with `simulate` shows exactly
the sequence `serve` will deal for the same flags. Policy flags (`--policy`, `--clip`,
`--weights`, ...), `--global-batch`, `--seed`, and the synthetic layout (`--cluster-sizes`
with `--block-size`) are declared and parsed here only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from croupier import bounds
from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import ON_EXHAUSTED, POLICIES, PolicyConfig
from croupier.values import parse_weights


def add_policy_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, batch_required: bool = True) -> None:
    """--policy, --clip and the other policy flags, --global-batch and --seed (batch_required
    False: a command that also deals in tokens checks that one of the two is given)."""
    p.add_argument("--policy", default=None, help=f"one of: {', '.join(POLICIES)} (default clusterclip)")
    p.add_argument("--clip", help="repeat clip threshold (integer >= 1) or 'auto' (needs --budget-steps)")
    p.add_argument("--budget-steps", type=int, help="planned training steps (for --clip auto and --switch-fraction)")
    p.add_argument("--min-active-share", type=float, default=0.5,
                   help="--clip auto keeps at least this share of clusters active to the end (default 0.5)")
    p.add_argument("--weights", help="per-cluster weights (policy weighted): comma list or @FILE (one per line)")
    p.add_argument("--switch-step", type=int, help="g2s/s2g: first step of the second phase")
    p.add_argument("--switch-fraction", type=float, help="g2s/s2g: switch at this fraction of --budget-steps")
    p.add_argument("--on-exhausted", choices=ON_EXHAUSTED, default="stop",
                   help="when the clip exhausts every cluster: stop (end of data) or continue as random")
    p.add_argument("--global-batch", type=int, required=batch_required, help="samples per step over all ranks")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def add_block_size_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--block-size", type=int, default=None,
                   help="--cluster-sizes: in-cluster read block in samples (default 1 = fully random order; "
                        "a dataset's block size comes from its sidecar)")


def policy_from_args(args: argparse.Namespace) -> PolicyConfig:
    """A validated PolicyConfig from the policy flags (`PolicyConfig.from_options` reads them)."""
    return PolicyConfig.from_options(policy=args.policy, clip=args.clip, weights=parse_weights(args.weights),
                                     switch_step=args.switch_step, switch_fraction=args.switch_fraction,
                                     budget_steps=args.budget_steps, on_exhausted=args.on_exhausted,
                                     min_active_share=args.min_active_share, clip_name="--clip")


def load_mix_args(args: argparse.Namespace, sidecar_cache: Path | None = None):  # -> Mixture
    """The mixture of --mix FILE; refuses the flags the file fixes itself (policy, clip, ...)."""
    from croupier.mixture import load_mix

    fixed = [flag for flag, v in (("--policy", args.policy), ("--clip", args.clip), ("--weights", args.weights),
                                  ("--budget-steps", args.budget_steps), ("--switch-step", args.switch_step),
                                  ("--switch-fraction", args.switch_fraction)) if v is not None]
    for flag, name in (("--selection", "selection"), ("--cluster-sizes", "cluster_sizes"), ("--dataset", "dataset"),
                       ("--remote", "remote"), ("--block-size", "block_size")):
        if getattr(args, name, None):
            fixed.append(flag)
    if args.on_exhausted != "stop":
        fixed.append("--on-exhausted")
    if args.min_active_share != 0.5:
        fixed.append("--min-active-share")
    if fixed:
        raise ConfigError(f"--mix {args.mix}: the mixture file fixes the sources and their policies; "
                          f"remove {', '.join(fixed)} (set them per source, or at the file's top level)")
    check_sequence_args(args)
    return load_mix(args.mix, sidecar_cache)


def check_sequence_args(args: argparse.Namespace, served: bool = False) -> None:
    """Checks the flags of `add_policy_arguments` (and --block-size, --cluster-sizes) against
    the limits the code has (`croupier.bounds`), before anything is read, started or written.
    served: the global batch must also fit a world-1 rank's slice in one gRPC message (`serve`)."""
    batch = getattr(args, "global_batch", None)
    if batch is not None:
        (bounds.served_global_batch if served else bounds.global_batch)("--global-batch", batch)
    if getattr(args, "seed", None) is not None:
        bounds.int64("--seed", args.seed)
    for flag, name, low in (("--budget-steps", "budget_steps", 1), ("--switch-step", "switch_step", 0),
                            ("--block-size", "block_size", 1)):
        value = getattr(args, name, None)
        if value is not None:
            bounds.int64(flag, value, low)
    clip = getattr(args, "clip", None)  # an integer or "auto"; the policy checks its lower bound and its form
    if clip is not None and str(clip).strip().isdigit() and int(clip) > bounds.INT64_MAX:
        bounds.int64("--clip", int(clip), 1)
    if getattr(args, "cluster_sizes", None):
        parse_sizes(args.cluster_sizes)


def parse_sizes(text: str) -> list[int]:
    """--cluster-sizes: a comma list of sizes >= 1 whose total fits int64."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--cluster-sizes must be a comma-separated list of integers, got {text[:80]!r}") from None
    if not sizes:
        raise ConfigError("--cluster-sizes is empty: give at least one cluster size")
    return bounds.cluster_sizes("--cluster-sizes", sizes)


def synthetic_layout(args: argparse.Namespace) -> ClusterLayout:
    """Contiguous clusters from --cluster-sizes, read in blocks of --block-size (the sequence
    flags checked first: `check_sequence_args`)."""
    check_sequence_args(args)
    block = 1 if args.block_size is None else args.block_size
    return ClusterLayout.from_sizes(parse_sizes(args.cluster_sizes), block_size=block)


def refuse_block_size_for_dataset(args: argparse.Namespace) -> None:
    if args.block_size is not None:
        raise ConfigError(f"--block-size {args.block_size} applies to --cluster-sizes only: a dataset's read "
                          "blocks are fixed by its sidecar (shard-aligned when it was built)")


def add_token_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--global-tokens / --token-schedule (steps in tokens, in place of --global-batch) and --doc-chunk."""
    p.add_argument("--global-tokens", type=int, default=None,
                   help="deal steps of exactly this many tokens over all ranks (documents + EOS, split at step and "
                        "rank boundaries) instead of --global-batch documents; needs per-sample token counts")
    p.add_argument("--token-schedule", default=None,
                   help="global tokens per step from a step on, e.g. '0:262144,1000:524288' (a ramp-up); "
                        "in place of --global-tokens")
    p.add_argument("--doc-chunk", type=int, default=None,
                   help="with tokens: documents the sampler draws at a time (default: about one step's worth)")


def token_schedule_from_args(args: argparse.Namespace):  # -> TokenSchedule | None
    """The token schedule of --global-tokens / --token-schedule (None: steps in documents);
    refuses them together with --global-batch, and a command given neither."""
    from croupier.server.sampling.token_stream import TokenSchedule

    tokens, schedule = getattr(args, "global_tokens", None), getattr(args, "token_schedule", None)
    if tokens is not None and schedule is not None:
        raise ConfigError("give --global-tokens or --token-schedule, not both")
    if (tokens is not None or schedule is not None) and args.global_batch is not None:
        raise ConfigError("steps are in tokens (--global-tokens / --token-schedule) or in documents "
                          "(--global-batch), not both")
    if tokens is None and schedule is None:
        if args.global_batch is None:
            raise ConfigError("give --global-batch (documents per step) or --global-tokens (tokens per step)")
        if getattr(args, "doc_chunk", None) is not None:
            raise ConfigError("--doc-chunk applies to steps in tokens (--global-tokens)")
        return None
    return TokenSchedule.constant(tokens) if tokens is not None else TokenSchedule.parse(schedule)
