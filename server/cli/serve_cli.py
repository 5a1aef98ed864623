"""`croupier serve`: run the sampler server for one job, as a sidecar beside the trainers.

    croupier serve DATASET --policy clusterclip --clip 5 --global-batch 1024 --seed 0 \\
        --state-dir DIR [--port 0] [--token-file F] [--tls-cert C --tls-key K]
    croupier serve --cluster-sizes 5000,300,20,1 --global-batch 64 --state-dir DIR   # synthetic

On start it resumes from the newest valid checkpoint in --state-dir (a directory whose
checkpoints are all invalid is refused; --fresh sets them aside and starts at step 0), binds (loopback unless
--host says otherwise; --port 0 picks a free port), prints one JSON line
{"event": "serving", "address": "127.0.0.1:PORT", ...} to stdout and writes the same object
to DIR/server.json. SIGTERM or SIGINT checkpoints and stops gracefully (exit 1, with a message, when that final
checkpoint cannot be written). Logs are JSON lines
on stderr.

Every numeric flag is checked against the limits the code has (`croupier.bounds`: int64
steps and sizes, the step memory cap, the gRPC message a world-1 slice travels in, ports,
durations) before --state-dir is touched; a start refused later (the job's own checks, a
port that cannot be bound) removes what it wrote there, so a refused start leaves the state
directory as it was.

Security defaults: without --token-file any local user may call the server, `Update`
included, and it says so in a warning at start. A --host that is not loopback is refused
unless both a token and TLS are configured, or --insecure says the network is trusted.
/metrics (no authentication) binds to loopback unless --metrics-host widens it. Server
token files must hold at least 16 characters.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from croupier import bounds, logs
from croupier.bearer import MIN_SERVER_TOKEN_CHARS, read_token_file
from croupier.errors import ConfigError, CroupierError
from croupier.layout import ClusterLayout
from croupier.server.cli.policy_args import (
    add_block_size_argument,
    add_policy_arguments,
    add_token_arguments,
    check_sequence_args,
    load_mix_args,
    policy_from_args,
    refuse_block_size_for_dataset,
    synthetic_layout,
    token_schedule_from_args,
)
from croupier.server.cli.state_location import RemoteStart, add_state_location_arguments, check_state_location_args
from croupier.server.durability.checkpoint_store import CheckpointStore, atomic_write_bytes
from croupier.server.job.job import CheckpointUnavailable, Job, JobSpec
from croupier.server.sampling.mixture import source_policy
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.serving.metrics import ServerMetrics
from croupier.server.serving.service import SamplerServer, create_server, describe
from croupier.values import parse_log_level

if TYPE_CHECKING:
    from croupier.mixture import Mixture

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the sampler server for one job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("dataset")
    data.add_argument("dataset", nargs="?", help="MDS dataset folder (or object-store URL such as s3://bucket/prefix, "
                                                "credentials and S3_ENDPOINT_URL from the environment) with a "
                                                "croupier cluster sidecar")
    data.add_argument("--mix", default=None, metavar="FILE",
                      help="a mixture file (TOML): many datasets, each weighted and with its own policy; replaces "
                           "DATASET and the sampling policy flags (docs/sampling.md)")
    data.add_argument("--selection", default="", help="draw only from this named selection of the sidecar")
    data.add_argument("--cluster-sizes", default="",
                      help="synthetic layout for tests and demos, e.g. 5000,300,20,1 (no dataset)")
    data.add_argument("--remote", default="", help="where ranks fetch shards (default: the dataset folder)")
    add_block_size_argument(data)
    sampling = p.add_argument_group("sampling (the same flags as `croupier simulate`)")
    add_policy_arguments(sampling, batch_required=False)
    add_token_arguments(sampling)
    ad = p.add_argument_group("adaptive weights (docs/feedback.md)")
    ad.add_argument("--adapt", default=None, metavar="NAME",
                    help="re-weight from the ranks' loss reports with this controller: loss-softmax, odm or ado")
    ad.add_argument("--adapt-every", type=int, default=100, help="steps between the controller's proposals (default 100)")
    ad.add_argument("--adapt-groups", default="clusters", choices=("clusters", "sources"),
                    help="what the controller weights: clusters, or a mixture's sources (default clusters)")
    ad.add_argument("--adapt-param", action="append", default=None, metavar="KEY=VALUE",
                    help="a controller or guardrail parameter (repeatable), e.g. temperature=0.5, floor=0.2")
    job = p.add_argument_group("job")
    job.add_argument("--job", default="default", help="job name ranks must give (empty accepts any)")
    job.add_argument("--state-dir", required=True,
                     help="durable checkpoints live here: a folder, or s3://bucket/prefix (state that outlives "
                          "this host, guarded by a lease; docs/server.md)")
    add_state_location_arguments(job)
    job.add_argument("--max-lag", type=int, default=128, help="most steps a rank may run ahead of the slowest")
    job.add_argument("--lookahead", type=int, default=64, help="most steps streamed ahead of a rank's ack")
    job.add_argument("--checkpoint-every", type=int, default=1000, help="automatic checkpoint interval (0 = off)")
    job.add_argument("--keep-checkpoints", type=int, default=4, help="automatic checkpoints kept")
    job.add_argument("--fresh", action="store_true",
                     help="set aside what --state-dir holds (into a stale-* folder) and start at step 0")
    job.add_argument("--accept-log-damage", action="store_true",
                     help="start although online changes the job acknowledged are lost or altered in both copies "
                          "of the event log: keep the whole ones, log which steps may differ from what was delivered")
    job.add_argument("--rank-timeout", type=float, default=120.0,
                     help="seconds of silence after which a rank stops holding the others back")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    net.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    net.add_argument("--token-file", default=None, help="require this bearer token on every call")
    net.add_argument("--admin-token-file", default=None, help="token that Update (online changes) requires")
    net.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    net.add_argument("--tls-key", default=None, help="PEM private key")
    net.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback --host without a token and TLS (a trusted network)")
    net.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    net.add_argument("--metrics-host", default="127.0.0.1",
                     help="address /metrics binds to (default loopback: it has no authentication)")
    net.add_argument("--max-workers", type=int, default=4,
                     help="threads for disk-writing calls (Checkpoint, Update); streams cost no thread")
    net.add_argument("--streams-per-peer", type=int, default=4096, help="open streams one connection may hold")
    net.add_argument("--calls-per-peer", type=int, default=1024, help="unary calls one connection may have in flight")
    net.add_argument("--grace", type=float, default=2.0, help="seconds open calls get on shutdown")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def dataset_from_args(args: argparse.Namespace) -> tuple[ClusterLayout, str, str, Any]:
    """(layout, dataset fingerprint, remote, per-sample token counts or None) from DATASET or
    --cluster-sizes."""
    if bool(args.dataset) == bool(args.cluster_sizes):
        raise ConfigError("give exactly one of DATASET (a folder with a cluster sidecar) or --cluster-sizes")
    if args.cluster_sizes:
        if args.selection:
            raise ConfigError("--selection needs a DATASET with a sidecar, not --cluster-sizes")
        return synthetic_layout(args), "", args.remote, None
    refuse_block_size_for_dataset(args)
    from croupier.datasets import SIDECAR_CACHE_DIR, open_dataset, read_location

    side = open_dataset(args.dataset, Path(args.state_dir) / SIDECAR_CACHE_DIR)
    layout = side.layout(args.selection or None)
    return layout, side.fingerprint, read_location(args.dataset, side, args.remote), side.token_counts()


def _lock_state_dir(state_dir: Path) -> int:
    """Holds an exclusive lock on the state dir for the process's life (released on any exit)."""
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = f" (pid {holder['pid']} on host {holder['host']})" if isinstance(holder, dict) and "pid" in holder \
            and "host" in holder else ""
        raise ConfigError(f"state directory {state_dir} is in use by another croupier server{who}") from None
    try:  # who holds it, for the next server's refusal (best effort: the lock is what counts)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    except OSError:
        pass
    return fd


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, token: str | None, tls: bool, insecure: bool) -> None:
    """Refuses to serve beyond loopback without both a token and TLS, unless --insecure."""
    if is_loopback(host) or insecure or (token is not None and tls):
        return
    missing = " and ".join(m for m, ok in (("--token-file", token is not None), ("--tls-cert/--tls-key", tls))
                           if not ok)
    raise ConfigError(f"--host {host} is not a loopback address: serving beyond this machine needs a token and "
                      f"TLS (missing: {missing}); pass --insecure to serve without them on a trusted network")


MAX_WORKERS = 1024
"""Most threads --max-workers may ask for (each is an OS thread for disk-writing calls)."""


def check_serve_args(args: argparse.Namespace) -> None:
    """Every numeric flag of `serve` against the limits the code has (`croupier.bounds`), and
    the files the start reads, before anything is read from or written to --state-dir: a
    refused start leaves the state directory as it was."""
    check_sequence_args(args, served=True)
    bounds.port("--port", args.port)
    bounds.port("--metrics-port", args.metrics_port, zero="turns /metrics off")
    bounds.int_range("--max-lag", args.max_lag, 1, bounds.INT32_MAX, "steps")
    bounds.int_range("--lookahead", args.lookahead, 1, bounds.INT32_MAX, "steps")
    bounds.int64("--checkpoint-every", args.checkpoint_every)
    bounds.int_range("--keep-checkpoints", args.keep_checkpoints, 1, bounds.INT32_MAX, "checkpoints kept")
    bounds.duration("--rank-timeout", args.rank_timeout)
    bounds.duration("--grace", args.grace, zero_ok=True)
    bounds.int_range("--max-workers", args.max_workers, 1, MAX_WORKERS, "threads")
    bounds.int_range("--streams-per-peer", args.streams_per_peer, 1, bounds.INT32_MAX, "streams")
    bounds.int_range("--calls-per-peer", args.calls_per_peer, 1, bounds.INT32_MAX, "calls")
    bounds.int64("--adapt-every", args.adapt_every, 1)
    check_state_location_args(args)
    parse_log_level(args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from None


def adapt_from_args(args: argparse.Namespace) -> Any:
    """The AdaptSpec of --adapt (None without it), checked before the job is made."""
    if not args.adapt:
        if args.adapt_param:
            raise ConfigError("--adapt-param needs --adapt NAME")
        return None
    from croupier.server.feedback.adapt import AdaptSpec, parse_params

    return AdaptSpec(controller=args.adapt, every=args.adapt_every, groups=args.adapt_groups,
                     params=parse_params(args.adapt_param))


def run(args: argparse.Namespace) -> int:
    check_serve_args(args)
    on_store = RemoteStart.prepare(args)  # an object-store --state-dir: args.state_dir is now its local copy
    before = _entries(Path(args.state_dir))
    token = read_token_file(args.token_file, MIN_SERVER_TOKEN_CHARS) if args.token_file else None
    admin = read_token_file(args.admin_token_file, MIN_SERVER_TOKEN_CHARS) if args.admin_token_file else None
    check_exposure(args.host, token, bool(args.tls_cert), args.insecure)
    adapt = adapt_from_args(args)
    schedule = token_schedule_from_args(args)
    mixture = None
    if args.mix:
        from croupier.format.remote import SIDECAR_CACHE_DIR

        if args.dataset:
            raise ConfigError(f"give DATASET {args.dataset} or --mix {args.mix}, not both")
        mixture = load_mix_args(args, Path(args.state_dir) / SIDECAR_CACHE_DIR)
        first = mixture.infos[0]
        layout = mixture.layouts[0]
        config = source_policy(mixture, 0) if mixture.single else None
        dataset_fp, remote, selection = (first.fingerprint, first.remote, first.selection) if mixture.single \
            else ("", "", "")
        token_counts = mixture.token_counts_by_offset()
    else:
        config = policy_from_args(args)
        layout, dataset_fp, remote, counts = dataset_from_args(args)
        token_counts = None if counts is None else [(0, counts)]
        selection = args.selection
    tokens = _tokens_from_args(args, schedule, mixture, layout, token_counts, config)
    if tokens is not None and mixture is None:
        config = tokens[3]
    spec = JobSpec(name=args.job, dataset_remote=remote, dataset_fingerprint=dataset_fp, selection=selection,
                   max_lag=args.max_lag, max_lookahead=args.lookahead, checkpoint_every=args.checkpoint_every,
                   rank_timeout_s=args.rank_timeout)
    store = CheckpointStore(args.state_dir, keep=args.keep_checkpoints)
    lock_fd = _lock_state_dir(store.dir)
    try:
        if on_store is not None:
            logs.configure(args.log_level)  # the lease's wait and takeover are logged as serving is
            on_store.acquire()
        return _serve(args, layout, config, spec, store, token, admin, mixture, token_counts, adapt,
                      None if tokens is None else tokens[:3], on_store)
    except CroupierError:
        _remove_new_entries(store.dir, before)  # under the lock: nobody else writes there now
        raise
    finally:
        if on_store is not None:
            on_store.close()
        os.close(lock_fd)
        if before is None:
            _remove_if_empty(store.dir)


def _tokens_from_args(args: argparse.Namespace, schedule: Any, mixture: Any, layout: ClusterLayout,
                      token_counts: Any, config: PolicyConfig | None) -> tuple[Any, Any, int, Any] | None:
    """(schedule, per-sample token counts, documents per draw, the document sampler's policy)
    of a job dealt in tokens (--global-tokens / --token-schedule), None for one in documents.
    A `unit = "tokens"` mixture dealt in tokens holds its shares to the token (token_mixture)."""
    if schedule is None:
        budgets = [] if mixture is None else [d.name for d in mixture.spec.sources if d.token_budget is not None]
        if budgets:
            raise ConfigError(f"token_budget (source {budgets[0]!r}) stops a source at N tokens and needs steps in "
                              "tokens (--global-tokens or --token-schedule), not --global-batch")
        return None
    import numpy as np

    from croupier.server.sampling.token_stream import mean_stream_tokens, plan_tokens

    if token_counts is None:
        raise ConfigError("steps in tokens need per-sample token counts: build the dataset with --tokenizer, or run "
                          "`croupier shards tokens` on it (for --mix: on every source)")
    if mixture is None:
        counts = token_counts[0][1]
        mean = mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions)))
        chunk, doc_policy = plan_tokens(schedule, mean, args.doc_chunk, config)
        return schedule, token_counts, chunk, doc_policy
    mean = float(np.mean([mean_stream_tokens(c, lay.ids_at(np.arange(lay.num_positions)))
                          for (_, c), lay in zip(token_counts, mixture.layouts)]))
    chunk, _ = plan_tokens(schedule, mean, args.doc_chunk, None)
    return schedule, token_counts, chunk, config


def _entries(state_dir: Path) -> set[str] | None:
    """The names in the state directory (None when it does not exist yet)."""
    try:
        return set(os.listdir(state_dir))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read --state-dir {state_dir}: {exc.strerror}") from None


def _remove_new_entries(state_dir: Path, before: set[str] | None) -> None:
    """A start refused after the job was made (the job's own checks: weights against the layout,
    --adapt against the job, a port that cannot be bound): what it wrote into the state
    directory (the lock, the event log, a mark) goes, so a refused start leaves it as it was."""
    import shutil

    for name in sorted(set(os.listdir(state_dir)) - (before or set())):
        path = state_dir / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove %s after a refused start: %s", path, exc.strerror,
                        extra={"event": "refused_start_cleanup"})


def _remove_if_empty(state_dir: Path) -> None:
    try:
        state_dir.rmdir()
    except OSError:
        pass  # not empty (a served job's files), or gone


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation while serving (Python's
default is 700)."""


def tune_gc() -> None:
    """Keeps the cycle collector out of the serving path.

    Serving allocates short-lived, acyclic objects per message (protobufs, futures, loop
    handles) that reference counting frees; at Python's default threshold the collector ran
    every few messages and each older-generation pass walked every object the job and the
    gRPC server built at start-up. Measured with bench_server_load at 1,024 ranks, it took
    about a sixth of the server's CPU. `gc.freeze()` moves the start-up objects out of the
    collector's reach, and the youngest generation may grow to GC_YOUNG_THRESHOLD objects
    before a pass; cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _serve(args: argparse.Namespace, layout: ClusterLayout, config: PolicyConfig | None, spec: JobSpec,
           store: CheckpointStore, token: str | None, admin: str | None, mixture: Mixture | None = None,
           token_counts: Any = None, adapt: Any = None, tokens: Any = None, on_store: RemoteStart | None = None) -> int:
    logs.configure(args.log_level)
    stop = threading.Event()  # installed first: a signal during start-up still stops cleanly
    received: list[int] = []
    lost: list[str] = []  # the job's lease, taken over by another server

    def on_signal(signum, frame):  # noqa: ARG001
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    job = Job(layout, config, args.global_batch, args.seed, spec=spec, store=store, fresh=args.fresh,
              accept_log_damage=args.accept_log_damage,
              mixture=mixture, adapt=adapt, token_counts=token_counts, tokens=tokens)
    metrics = ServerMetrics(job)
    server: SamplerServer | None = None
    try:  # a start that fails past here stops what it started: the server, the job's writer and event log
        host = args.host
        address = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
        server, _ = create_server(job, address, token=token, admin_token=admin, tls_cert=args.tls_cert,
                                  tls_key=args.tls_key, max_workers=args.max_workers, on_refused=metrics.refused,
                                  streams_per_peer=args.streams_per_peer, calls_per_peer=args.calls_per_peer)
        metrics.attach_sessions(server.servicer)
        metrics_port = metrics.serve(args.metrics_host, args.metrics_port) if args.metrics_port else 0
        info: dict[str, Any] = dict(describe(server), metrics_port=metrics_port, pid=os.getpid(),
                                    state_dir=str(store.dir.resolve()))
        if on_store is not None:
            info.update(state_dir=on_store.location.url, state_cache=str(store.dir.resolve()))
        if mixture is not None:
            info["mix"] = str(Path(args.mix).resolve())
        elif args.dataset:  # what `croupier report --state-dir` replays the draws on
            from croupier.format.remote import is_remote

            info["dataset"] = args.dataset if is_remote(args.dataset) else str(Path(args.dataset).resolve())
            if args.selection:
                info["selection"] = args.selection
        if metrics_port:
            info["metrics_host"] = args.metrics_host
        atomic_write_bytes(store.dir / "server.json", (json.dumps(info, indent=2) + "\n").encode())
        if on_store is not None:
            def lease_lost(reason: str) -> None:
                lost.append(reason)
                stop.set()

            on_store.activate(info["address"], lease_lost)
        if token is None:
            log.warning("no token configured: every user who can reach %s may call the server, Update "
                        "(online changes) included; pass --token-file (and --admin-token-file) to require one",
                        address, extra={"event": "no_token"})
        log.info("serving", extra=dict(info, event="serving"))
        tune_gc()
        print(json.dumps(dict(info, event="serving")), flush=True)
    except BaseException:
        metrics.stop()
        if server is not None:
            server.stop(0, checkpoint=False)  # closes the job as well
        else:
            job.close()
        raise
    assert server is not None

    while not stop.wait(1.0):
        pass
    if lost:
        log.critical("stopping: the job's lease was lost", extra={"event": "stopping", "reason": lost[0]})
        server.stop(0, checkpoint=False)
        metrics.stop()
        print(json.dumps({"event": "stopped", "error": lost[0]}), flush=True)
        print(f"croupier serve: stopped: {lost[0]}", file=sys.stderr, flush=True)
        return 1
    log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(received[0]).name})
    try:
        server.stop(args.grace)
    except CheckpointUnavailable as exc:
        metrics.stop()
        log.error("final checkpoint failed", extra={"event": "final_checkpoint_failed", "reason": str(exc)})
        print(json.dumps({"event": "stopped", "error": f"final checkpoint not written: {exc}",
                          "durable_step": job.status().durable_step}), flush=True)
        print(f"croupier serve: final checkpoint not written: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics.stop()
    print(json.dumps({"event": "stopped", "durable_step": job.status().durable_step}), flush=True)
    return 0
