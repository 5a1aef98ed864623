"""`croupier client dump`: the operator's smoke test of a running server.

Joins as one rank, prints that rank's (step, ids) for a few steps, and with `--read` also
reads every sample from the shards (through the local cache) and reports samples/s, so one
command shows that the server deals, the remote is reachable and the shards decode.

`--format jsonl` prints one `{"step": t, "indices": [...]}` line per step, the shape of
`croupier simulate --format jsonl`, so a dry run and a live server can be diffed; the job
line and the read report then go to stderr.

Arguments are checked before anything connects (a step range inside int64, a rank inside
its world). A command-line tool should not retry for minutes: the server must answer within
`--connect-timeout` seconds (default `CONNECT_TIMEOUT_S`), or the command fails with one
line; trainers' `RankClient`s keep their long retry. While it waits (for the server to
answer, or for a step), it says so on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from croupier import bounds
from croupier.client.backoff import Backoff
from croupier.client.cli.connection_args import add_connection_arguments, connection_from_args
from croupier.errors import EndOfData
from croupier.topology import Topology

FORMATS = ("text", "jsonl")
CONNECT_TIMEOUT_S = 10.0
"""How long `client dump` waits for the server to answer before it gives up (default)."""
MAX_CONNECT_TIMEOUT_S = 24 * 3600.0
NOTE_AFTER_S = 2.0
"""A wait longer than this is told on stderr (what the command waits for)."""
NOTE_EVERY_S = 30.0
"""And again this often while it lasts."""


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
    dump.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                      help=f"give up when the server has not answered for this long (default {CONNECT_TIMEOUT_S:g})")
    dump.set_defaults(func=run_dump)


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag against what the server takes, before anything connects."""
    bounds.int_range("--world", args.world, 1, bounds.INT32_MAX, "ranks in the world")
    bounds.int_range("--rank", args.rank, 0, args.world - 1, f"a rank of world {args.world}")
    bounds.int_range("--steps", args.steps, 1, bounds.INT64_MAX, "steps to print")
    if args.start_step is not None:
        bounds.int_range("--start-step", args.start_step, 0, bounds.INT64_MAX - args.steps,
                         f"the last step printed, start + --steps {args.steps}, must fit a 64-bit integer")
    bounds.int_range("--max-ids", args.max_ids, 0, bounds.INT64_MAX, "ids printed per step, 0 = all")
    bounds.duration("--connect-timeout", args.connect_timeout, high=MAX_CONNECT_TIMEOUT_S)


def quiet_retries() -> None:
    """The client's per-retry warnings stay off the terminal when nothing configured logging
    (`telling` says what the command waits for, the final error says why it gave up)."""
    import logging

    if not logging.getLogger().handlers:
        logging.getLogger("croupier.client").addHandler(logging.NullHandler())


@contextmanager
def telling(what: str, out=None) -> Iterator[None]:
    """Says on stderr what the command waits for when a wait lasts over NOTE_AFTER_S (and every
    NOTE_EVERY_S while it lasts), so a wait is never silent."""
    done = threading.Event()
    began = time.monotonic()

    def watch() -> None:
        wait = NOTE_AFTER_S
        while not done.wait(wait):
            print(f"croupier client dump: {what} ({time.monotonic() - began:.0f} s so far)",
                  file=out or sys.stderr, flush=True)
            wait = NOTE_EVERY_S

    t = threading.Thread(target=watch, name="croupier-dump-wait", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _format_ids(ids, max_ids: int) -> str:
    shown = ids if max_ids <= 0 else ids[:max_ids]
    text = " ".join(str(i) for i in shown.tolist())
    if len(shown) < len(ids):
        text += f" ... (+{len(ids) - len(shown)})"
    return text


def run_dump(args: argparse.Namespace) -> int:
    from croupier.client.rank_client import RankClient

    check_args(args)
    conn = connection_from_args(args)
    quiet_retries()
    patience = float(args.connect_timeout)
    # Short retries for a command-line tool: an unreachable server fails the command within
    # --connect-timeout (each call, and each reconnect of the stream, gives up after it).
    retry: dict[str, Any] = {"backoff": Backoff(initial_s=min(0.05, patience), max_s=max(min(1.0, patience / 4), min(0.05, patience)),
                                give_up_after_s=patience),
             "rpc_timeout_s": patience}
    reach = f"waiting for the server at {conn.server} to answer (giving up after {patience:g} s)"
    jsonl = args.format == "jsonl"
    note = sys.stderr if jsonl else sys.stdout  # jsonl keeps stdout to the per-step lines
    topology = Topology(rank=args.rank, world=args.world)
    token = conn.token or ""  # resolved already: "" sends none
    job = args.job
    if job is None:
        with RankClient(conn.server, job="?", topology=topology, token=token, tls_root_cert=conn.tls_ca,
                        tls_server_name=conn.tls_server_name, **retry) as probe, telling(reach):
            job = probe.status().job.job
    client = RankClient(conn.server, job=job, topology=topology, token=token, tls_root_cert=conn.tls_ca,
                        tls_server_name=conn.tls_server_name, start_step=args.start_step, read_only=True, **retry)
    store = None
    tmp = None
    try:
        with telling(reach):
            info = client.join()
        start = client.next_step
        bounds.int_range("--steps", args.steps, 1, bounds.INT64_MAX - start,
                         f"the last step printed, the rank's step {start} + --steps, must fit a 64-bit integer")
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
        for step, ids in _steps(client, conn.server):
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


def _steps(client: Any, server: str) -> Iterator[tuple[int, np.ndarray]]:
    """The client's (step, ids) until its stop, telling on stderr when a step is slow to come
    (an adaptive job's step waits until the server has generated it; a slow or restarting
    server delays any)."""
    while True:
        what = (f"waiting for step {client.next_step} from {server}: the server has not sent it yet (an adaptive "
                "job's step comes once the server has generated it)")
        with telling(what):
            try:
                item = client.next_slice()
            except EndOfData:
                return
        yield item
