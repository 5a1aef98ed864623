"""Operator commands against a running sampler server.

    croupier status --server HOST:PORT [--json] [--top N]     per-cluster table, totals, rank steps,
                                                             checkpoint health, generated mark, event log
    croupier checkpoint --server HOST:PORT --step S           durable checkpoint; prints its token
    croupier update --server HOST:PORT --step S [--clip N] [--weights W,...]   (admin token)
    croupier update --server HOST:PORT --step S --source NAME [--weight W] [--clip N]   (mixtures)
    croupier update --server HOST:PORT --step S --global-tokens G   (a job dealt in tokens)

Common options (`croupier.client.cli.connection_args`, shared by every client command): --token-file F
(default: $CROUPIER_TOKEN), --tls-ca PEM (TLS, trusting this CA or self-signed certificate),
--tls-server-name NAME (when the address is not the name in the certificate), and
--timeout SECONDS. A refused call prints its gRPC status and message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from croupier import bounds
from croupier.client.cli.connection_args import add_connection_arguments, connection_from_args
from croupier.errors import ConfigError
from croupier.proto import pb2, pb2_grpc


def _common(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def register(subparsers: argparse._SubParsersAction) -> None:
    st = subparsers.add_parser("status", help="per-cluster table and rank progress of a running server")
    _common(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--top", type=int, default=40, help="clusters shown, largest first (0 = all)")
    st.set_defaults(func=_guard(status))
    ck = subparsers.add_parser("checkpoint", help="make the sampler state at a step durable; print its token")
    _common(ck)
    ck.add_argument("--step", type=int, required=True, help="the step a trainer would resume at")
    ck.add_argument("--job", default="", help="job name (default: the server's)")
    ck.set_defaults(func=_guard(checkpoint))
    up = subparsers.add_parser("update", help="change the clip or cluster weights from a future step (admin)")
    _common(up)
    up.add_argument("--step", type=int, required=True, help="first step the change applies to")
    up.add_argument("--clip", type=int, default=0, help="new clip threshold (0 = unchanged)")
    up.add_argument("--weights", default=None, help="new per-cluster weights: comma list or @FILE")
    up.add_argument("--source", default="", help="mixtures: the source that --weight and --clip apply to")
    up.add_argument("--weight", type=float, default=None, help="mixtures: the source's new weight (0 pauses it)")
    up.add_argument("--source-weights", default=None,
                    help="mixtures: every source's weight, in the mixture file's order (comma list or @FILE)")
    up.add_argument("--global-tokens", type=int, default=0,
                    help="a job dealt in tokens: global tokens per step from --step on (the schedule's later points "
                         "go; divisible by the world)")
    up.set_defaults(func=_guard(update))


def connect(args: argparse.Namespace) -> tuple[pb2_grpc.SamplerStub, grpc.Channel, tuple]:
    """A stub, its channel and the call metadata from the common options."""
    config = connection_from_args(args).channel_config()
    channel = config.open()
    return pb2_grpc.SamplerStub(channel), channel, config.metadata()


MAX_TIMEOUT_S = 24 * 3600.0
"""Longest --timeout an admin call takes (a day)."""


def check_args(args: argparse.Namespace) -> None:
    """The numeric flags of status, checkpoint and update against the limits the RPCs have
    (steps and clip thresholds an int64 holds, finite weights, a positive timeout), before
    connecting; the server judges the values by its own rules (a step in the past, ...)."""
    bounds.duration("--timeout", args.timeout, high=MAX_TIMEOUT_S)
    if getattr(args, "top", None) is not None:
        bounds.int_range("--top", args.top, 0, bounds.INT32_MAX, "clusters shown, 0 = all")
    if getattr(args, "step", None) is not None:
        bounds.wire_int64("--step", args.step)
    if getattr(args, "clip", None) is not None:
        bounds.wire_int64("--clip", args.clip)
    if getattr(args, "global_tokens", None) is not None:
        bounds.int_range("--global-tokens", args.global_tokens, 0, 2**40 - 1, "tokens per step, 0 = unchanged")
    weight = getattr(args, "weight", None)
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"--weight must be a finite number >= 0 (0 pauses the source), got {weight}")


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        check_args(args)
        try:
            return fn(args)
        except grpc.RpcError as exc:
            print(f"croupier {args.command}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2

    return wrapped


def status_dict(resp: pb2.GetStatusResponse) -> dict[str, Any]:
    job = resp.job
    return {
        "job": job.job, "sampler_fingerprint": job.sampler_fingerprint,
        "dataset_fingerprint": job.dataset_fingerprint, "policy": job.policy, "global_batch": job.global_batch,
        "token_schedule": job.token_schedule,
        "world_size": job.world_size, "generated_step": resp.generated_step, "durable_step": resp.durable_step,
        "generated_mark": resp.generated_mark, "checkpoint_error": resp.checkpoint_error,
        "checkpoint_failures": resp.checkpoint_failures, "checkpoints_healthy": not resp.checkpoint_error,
        "event_log": event_log_dict(resp),
        "slowest_step": resp.slowest_step, "fastest_step": resp.fastest_step,
        "active_clusters": resp.active_clusters, "clip": resp.clip,
        "clusters": {"size": list(resp.cluster_sizes), "draws": list(resp.cluster_draws),
                     "passes": list(resp.cluster_passes), "clipped_at": list(resp.cluster_clipped_at)},
        "ranks": [{"rank": r.rank, "next_step": r.next_step, "delivered_step": r.delivered_step,
                   "seconds_since_seen": round(r.seconds_since_seen, 3), "connected": r.connected,
                   "live": r.live}
                  for r in resp.ranks],
        "open_streams": resp.open_streams,
        "sessions": [{"peer": x.peer, "node": x.node.node, "agent_id": x.node.agent_id, "ranks": list(x.ranks),
                      "lanes": x.lanes, "consumers": x.node.consumers, "seconds_open": round(x.seconds_open, 1),
                      "bytes_downloaded": x.node.bytes_downloaded, "shards_downloaded": x.node.shards_downloaded,
                      "cache_hits": x.node.cache_hits, "cache_misses": x.node.cache_misses,
                      "cache_bytes": x.node.cache_bytes, "cache_limit": x.node.cache_limit}
                     for x in resp.sessions],
        "sources": [_source_dict(x) for x in job.sources],
        "tokens": ({"drawn": resp.tokens_drawn, "since_step": resp.tokens_since_step,
                    "per_cluster": list(resp.cluster_tokens)} if resp.tokens_counted else None),
        "adapt": {"controller": resp.adapt.controller, "adapt_every": resp.adapt.adapt_every,
                  "groups": resp.adapt.groups, "reports_accepted": resp.adapt.reports_accepted,
                  "reports_refused": resp.adapt.reports_refused, "samples_reported": resp.adapt.samples_reported,
                  "group_loss": [None if g != g else g for g in resp.adapt.group_loss],
                  "group_weight": list(resp.adapt.group_weight),
                  "source_loss": [None if g != g else g for g in resp.adapt.source_loss],
                  "source_samples": list(resp.adapt.source_samples),
                  "changes": [{"step": c.step, "origin": c.origin, "kind": c.kind, "max_ratio": c.max_ratio}
                              for c in resp.adapt.changes]},
    }


EVENT_LOG_PREFIX = "event_log_"
"""GetStatusResponse fields about the job's event log (the durable record of online changes)
carry this prefix; status shows every one the server sends, under "event_log"."""


def event_log_dict(resp: pb2.GetStatusResponse) -> dict[str, Any]:
    """What the status response says about the event log: each `event_log_*` field by its
    short name (none when this server's protocol carries none)."""
    out: dict[str, Any] = {}
    for field in resp.DESCRIPTOR.fields:
        if field.name.startswith(EVENT_LOG_PREFIX):
            value = getattr(resp, field.name)
            out[field.name[len(EVENT_LOG_PREFIX):]] = value if isinstance(value, (bool, int, float, str)) \
                else str(value)
    return out


def health_lines(resp: pb2.GetStatusResponse) -> list[str]:
    """The durability lines of the status table: checkpoint health, the generated mark, the event log."""
    if resp.checkpoint_error:
        ck = (f"checkpoints FAILING: {resp.checkpoint_error} ({resp.checkpoint_failures} failed writes since start; "
              "the server serves on and retries)")
    else:
        ck = f"checkpoints healthy ({resp.checkpoint_failures} failed writes since start)"
    lines = [ck, f"generated mark {resp.generated_mark} (highest step durably recorded as generated)"]
    log_state = event_log_dict(resp)
    if log_state:
        lines.append("event log " + "  ".join(f"{k} {v if v != '' else '-'}" for k, v in log_state.items()))
    return lines


def _source_dict(x: pb2.SourceInfo) -> dict[str, Any]:
    return {"name": x.name, "remote": x.remote, "fingerprint": x.fingerprint, "offset": x.offset, "size": x.size,
            "selection": x.selection, "num_clusters": x.num_clusters, "weight": x.weight, "policy": x.policy,
            "clip": x.clip, "draws": x.draws, "exhausted_at": x.exhausted_at, "active_clusters": x.active_clusters,
            "tokens_dealt": x.tokens_dealt, "tokens_target": x.tokens_target}


def format_status(resp: pb2.GetStatusResponse, top: int = 40) -> str:
    """The human table: job line, clusters (largest first), totals, ranks."""
    job = resp.job
    sizes = np.asarray(resp.cluster_sizes, dtype=np.int64)
    draws = np.asarray(resp.cluster_draws, dtype=np.int64)
    passes = np.asarray(resp.cluster_passes, dtype=np.int64)
    clipped = np.asarray(resp.cluster_clipped_at, dtype=np.int64)
    k = len(sizes)
    lines = [
        f"job {job.job!r}  policy {job.policy}  clip {resp.clip or '-'}  global batch {job.global_batch}  "
        f"world {job.world_size}  seed {job.seed}",
        f"sampler {job.sampler_fingerprint}  dataset {job.dataset_fingerprint or '-'}"
        + (f"  token schedule {job.token_schedule} (global tokens from a step on)" if job.token_schedule else ""),
        f"generated step {resp.generated_step}  durable step {resp.durable_step}  "
        f"slowest {resp.slowest_step}  fastest {resp.fastest_step}",
        *health_lines(resp),
        "",
        f"{'cluster':>8} {'size':>10} {'draws':>12} {'draws/size':>10} {'passes':>7} {'clipped at':>10}",
    ]
    order = np.argsort(-sizes, kind="stable")
    shown = order if top <= 0 else order[:top]
    for c in shown:
        ratio = draws[c] / sizes[c] if sizes[c] else 0.0
        cut = "-" if clipped[c] < 0 else str(clipped[c])
        lines.append(f"{c:>8} {sizes[c]:>10} {draws[c]:>12} {ratio:>10.2f} {passes[c]:>7} {cut:>10}")
    if len(shown) < k:
        lines.append(f"{'...':>8} ({k - len(shown)} smaller clusters not shown; --top 0 shows all)")
    lines.append(f"{'total':>8} {int(sizes.sum()):>10} {int(draws.sum()):>12}   "
                 f"clusters {k}, active {resp.active_clusters}, clipped {int((clipped >= 0).sum())}")
    if resp.tokens_counted:
        since = f" since step {resp.tokens_since_step}" if resp.tokens_since_step else ""
        lines.append(f"tokens dealt{since}: {resp.tokens_drawn:,}")
        if len(resp.cluster_tokens) == k:
            tok = np.asarray(resp.cluster_tokens, dtype=np.int64)
            lines.append("tokens per cluster (largest clusters first): " + ", ".join(
                f"{int(c)}: {int(tok[c]):,}" for c in shown[:10]))
    if len(job.sources) > 1:
        total = sum(x.draws for x in job.sources) or 1
        wsum = sum(x.weight for x in job.sources) or 1.0
        width = max(8, *(len(x.name) for x in job.sources))
        lines += ["", f"{'source':>{width}} {'policy':>11} {'weight':>8} {'target':>7} {'draws':>12} {'share':>7} "
                      f"{'clip':>5} {'active':>11} {'exhausted at':>12}"]
        for x in job.sources:
            ex = "-" if x.exhausted_at < 0 else str(x.exhausted_at)
            lines.append(f"{x.name:>{width}} {x.policy:>11} {x.weight:>8.4g} {x.weight / wsum:>7.1%} "
                         f"{x.draws:>12} {x.draws / total:>7.1%} {x.clip or '-':>5} "
                         f"{x.active_clusters:>5}/{x.num_clusters:<5} {ex:>12}")
        if any(x.tokens_target for x in job.sources):  # a token-exact mixture: tokens against target
            lines.append(f"{'source':>{width}} {'tokens dealt':>16} {'target':>16} {'dealt - target':>14}")
            lines += [f"{x.name:>{width}} {x.tokens_dealt:>16,} {x.tokens_target:>16,} "
                      f"{x.tokens_dealt - x.tokens_target:>+14,}" for x in job.sources]
    a = resp.adapt
    if a.controller:
        lines += ["", f"adaptive weights: {a.controller} over {a.groups} every {a.adapt_every} steps; reports "
                      f"{a.reports_accepted} accepted, {a.reports_refused} refused ({a.samples_reported} samples)"]
        if len(a.group_loss):
            loss = np.asarray(a.group_loss)
            weight = np.asarray(a.group_weight)
            share = weight / weight.sum() if weight.sum() > 0 else weight
            order = np.argsort(-np.nan_to_num(loss, nan=-np.inf), kind="stable")[:10]
            lines.append(f"{'group':>8} {'loss EMA':>10} {'weight share':>12}  (highest loss first)")
            for g in order:
                lines.append(f"{int(g):>8} {loss[g]:>10.4f} {share[g]:>12.2%}")
    if len(a.source_loss) and len(a.source_loss) == len(job.sources):
        lines.append("per-source loss EMA: " + ", ".join(
            f"{x.name} {v:.4f} ({n} samples)" for x, v, n in zip(job.sources, a.source_loss, a.source_samples)))
    if a.changes:
        lines += ["", f"{'change at':>10} {'by':>14} {'kind':>18} {'max ratio':>9}  (last {len(a.changes)})"]
        for c in list(a.changes)[-10:]:
            lines.append(f"{c.step:>10} {c.origin:>14} {c.kind[-18:]:>18} {c.max_ratio:>9.2f}")
    lines += ["", f"{'rank':>6} {'next step':>10} {'delivered':>10} {'lag':>5} {'seen (s ago)':>12} {'stream':>7}"]
    for r in resp.ranks:
        lines.append(f"{r.rank:>6} {r.next_step:>10} {r.delivered_step:>10} {resp.fastest_step - r.next_step:>5} "
                     f"{r.seconds_since_seen:>12.1f} {'open' if r.connected else '-':>7}")
    if not resp.ranks:
        lines.append(f"{'':>6} no rank has joined")
    lines += ["", f"open streams {resp.open_streams}, sessions {len(resp.sessions)}"]
    if resp.sessions:
        lines.append(f"{'node':>12} {'ranks':>12} {'lanes':>6} {'consumers':>9} {'downloaded':>12} "
                     f"{'cache':>12} {'limit':>12} {'hit rate':>8}")
        for x in sorted(resp.sessions, key=lambda x: (x.node.node, x.peer)):
            r = x.node
            asked = r.cache_hits + r.cache_misses
            ranks = ",".join(map(str, x.ranks)) or "-"
            lines.append(f"{(r.node or x.peer)[-12:]:>12} {ranks[-12:]:>12} {x.lanes:>6} {r.consumers:>9} "
                         f"{_mib(r.bytes_downloaded):>12} {_mib(r.cache_bytes):>12} "
                         f"{_mib(r.cache_limit) if r.cache_limit else '-':>12} "
                         f"{(f'{r.cache_hits / asked:.2f}' if asked else '-'):>8}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def status(args: argparse.Namespace) -> int:
    stub, channel, md = connect(args)
    with channel:
        resp = stub.GetStatus(pb2.GetStatusRequest(include_clusters=True), metadata=md, timeout=args.timeout)
    print(json.dumps(status_dict(resp)) if args.json else format_status(resp, args.top))
    return 0


def checkpoint(args: argparse.Namespace) -> int:
    stub, channel, md = connect(args)
    with channel:
        resp = stub.Checkpoint(pb2.CheckpointRequest(job=args.job, step=args.step), metadata=md, timeout=args.timeout)
    print(json.dumps({"token": resp.token, "step": resp.step}))
    return 0


def update(args: argparse.Namespace) -> int:
    from croupier.values import parse_weights

    weights = parse_weights(args.weights) or ()
    source_weights = parse_weights(args.source_weights) or ()
    if args.weight is not None and not args.source:
        raise ConfigError(f"--weight {args.weight} needs --source NAME (the mixture source it applies to)")
    if args.source and args.weight is None and not args.clip:
        raise ConfigError(f"--source {args.source} needs --weight or --clip")
    if not args.clip and not weights and args.weight is None and not source_weights and not args.global_tokens:
        raise ConfigError("update needs --clip, --weights, --source with --weight, --source-weights or --global-tokens")
    req = pb2.UpdateRequest(step=args.step, clip=args.clip, weights=weights, source=args.source,
                            source_weights=source_weights, global_tokens=args.global_tokens)
    if args.weight is not None:
        req.source_weight = args.weight
    stub, channel, md = connect(args)
    with channel:
        resp = stub.Update(req, metadata=md, timeout=args.timeout)
    print(json.dumps({"effective_step": resp.effective_step}))
    return 0
