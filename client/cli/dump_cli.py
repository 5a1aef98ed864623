"""`croupier client dump`: the operator's smoke test of a running server.

Joins as one rank, prints that rank's (step, ids) for a few steps, and with `--read` also
reads every sample from the shards (through the local cache) and reports samples/s, so one
command shows that the server deals, the remote is reachable and the shards decode.

`--format jsonl` prints one `{"step": t, "indices": [...]}` line per step, the shape of
`croupier simulate --format jsonl`, so a dry run and a live server can be diffed; the job
line and the read report then go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from croupier.client.cli.connection_args import add_connection_arguments, connection_from_args
from croupier.errors import EndOfData
from croupier.topology import Topology

FORMATS = ("text", "jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    client = subparsers.add_parser("client", help="trainer-side tools (smoke tests against a server)")
    sub = client.add_subparsers(dest="client_command", metavar="CLIENT_COMMAND")
    sub.required = True
    dump = sub.add_parser("dump", help="print a rank's (step, ids); with --read, read the samples")
    add_connection_arguments(dump, token_flag=True)
    dump.add_argument("--job", default=None, help="job name (default: the job the server serves)")
    dump.add_argument("--rank", type=int, default=0, help="rank to join as (default 0)")
    dump.add_argument("--world", type=int, default=1, help="world size (default 1)")
    dump.add_argument("--steps", type=int, default=4, help="steps to print (default 4)")
    dump.add_argument("--start-step", type=int, default=None, help="first step (default: the rank's position)")
    dump.add_argument("--read", action="store_true", help="read the samples and report samples/s")
    dump.add_argument("--cache-dir", default=None, help="shard cache for --read (default: a temporary folder)")
    dump.add_argument("--remote", default=None, help="shard remote for --read (default: the job's)")
    dump.add_argument("--format", default="text", choices=FORMATS,
                      help="text (default: one tab-separated line per step) or jsonl (as `croupier simulate`)")
    dump.add_argument("--max-ids", type=int, default=16, help="text: ids printed per step, 0 = all (default 16)")
    dump.set_defaults(func=run_dump)


def _format_ids(ids, max_ids: int) -> str:
    shown = ids if max_ids <= 0 else ids[:max_ids]
    text = " ".join(str(i) for i in shown.tolist())
    if len(shown) < len(ids):
        text += f" ... (+{len(ids) - len(shown)})"
    return text


def run_dump(args: argparse.Namespace) -> int:
    from croupier.client.rank_client import RankClient

    conn = connection_from_args(args)
    jsonl = args.format == "jsonl"
    note = sys.stderr if jsonl else sys.stdout  # jsonl keeps stdout to the per-step lines
    topology = Topology(rank=args.rank, world=args.world)
    token = conn.token or ""  # resolved already: "" sends none
    job = args.job
    if job is None:
        with RankClient(conn.server, job="?", topology=topology, token=token, tls_root_cert=conn.tls_ca,
                        tls_server_name=conn.tls_server_name) as probe:
            job = probe.status().job.job
    client = RankClient(conn.server, job=job, topology=topology, token=token, tls_root_cert=conn.tls_ca,
                        tls_server_name=conn.tls_server_name, start_step=args.start_step, read_only=True)
    store = None
    tmp = None
    try:
        info = client.join()
        start = client.next_step
        client.plan(start, start + args.steps)
        print(f"job {info.job}: dataset {info.dataset_fingerprint} at {info.dataset_remote or '-'}, "
              f"policy {info.policy}, global batch {info.global_batch}, rank {args.rank}/{args.world}, "
              f"steps {start}..{start + args.steps - 1}", file=note)
        if args.read:
            from croupier.client.readers.shard_cache import ShardCache

            cache = args.cache_dir
            if cache is None:
                tmp = tempfile.TemporaryDirectory(prefix="croupier-dump-")
                cache = tmp.name
            store = ShardCache(args.remote or info.dataset_remote, cache,
                               fingerprint=info.dataset_fingerprint or None)
            client.plan(start, start + args.steps, on_slice=lambda step, ids: store.prefetch(ids))
        samples = 0
        began = time.perf_counter()
        for step, ids in client:
            if jsonl:
                print(json.dumps({"step": step, "indices": ids.tolist()}))
            else:
                print(f"step {step}\t{_format_ids(ids, args.max_ids)}")
            if store is not None:
                samples += len(store.get(ids))
                store.release(ids)
        elapsed = time.perf_counter() - began
        if store is not None:
            rate = samples / elapsed if elapsed > 0 else float("inf")
            print(f"read {samples} samples in {elapsed:.3f} s: {rate:,.0f} samples/s; cache {store.stats()}", file=note)
        return 0
    except EndOfData as exc:
        print(f"end of data: {exc}", file=sys.stderr)
        return 0
    finally:
        client.close()
        if store is not None:
            store.close()
        if tmp is not None:
            tmp.cleanup()
