"""`croupier report`: the figures a user looks at to choose and defend a clip threshold.

Data comes from a live server (`from_server`: its GetStatus counters, and optionally a few
seconds of watching rank progress) or from a server's state directory (`from_state_dir`:
the newest valid checkpoint and the online changes, read with the server's own state-directory
reader, `StateDir`). Neither source
keeps per-step history, so the draws-over-time curves are recomputed by replaying the
sampler from step 0 with the same dataset layout, policy, batch, seed and online changes:
the sequence is deterministic, and the replay's final counters are checked against the
server's before the history is used (the report says so on the page).

`write_report(data, out)` writes sizes_vs_draws.png, passes.png, draws_over_time.png,
rank_lag.png (when rank progress over time is known) and index.html. A mixture job adds
sources_over_time.png (each source's share of the draws per interval against its weight
share in force) and sources.txt; its replay needs the mixture file (`--mix`, or the one the
server's server.json names).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError, StateError

RANK_HISTORY_FILE = "rank_progress.jsonl"
"""JSON lines {"t", "steps": [next_step of rank 0, 1, ...]} a watcher (e.g. the demo) appends."""


@dataclass
class ReportData:
    """Everything the report draws; per-cluster arrays have one entry per cluster."""

    source: str
    policy: str
    clip: int | None
    step: int
    global_batch: int
    seed: int
    sizes: np.ndarray
    draws: np.ndarray
    passes: np.ndarray
    clipped_at: np.ndarray
    history_steps: np.ndarray | None = None
    history: np.ndarray | None = None
    rank_times: np.ndarray | None = None
    rank_steps: np.ndarray | None = None
    max_lag: int | None = None
    notes: list[str] = field(default_factory=list)
    source_names: tuple[str, ...] | None = None
    source_weights: np.ndarray | None = None
    source_draws: np.ndarray | None = None
    source_exhausted_at: np.ndarray | None = None
    source_history: np.ndarray | None = None
    source_weight_history: np.ndarray | None = None
    changes: list[tuple[int, str, str]] = field(default_factory=list)
    weight_steps: np.ndarray | None = None
    weight_history: np.ndarray | None = None
    weight_origins: list[str] = field(default_factory=list)
    group_loss: np.ndarray | None = None
    tokens: np.ndarray | None = None
    tokens_since: int = 0
    source_tokens: np.ndarray | None = None  # a token-exact mixture: stream tokens dealt per source
    source_token_targets: np.ndarray | None = None  # and what its shares called for

    @property
    def num_clusters(self) -> int:
        return len(self.sizes)


# -- replay ------------------------------------------------------------------------------------
def replay_history(layout: Any, config: Any, global_batch: int, seed: int, upto: int,
                   events: Sequence[dict] = (), points: int = 200) -> tuple[np.ndarray, np.ndarray, Any]:
    """Cumulative per-cluster draws at about `points` steps in [0, upto], by replaying the sampler.

    Returns (steps, history of shape (len(steps), K), final ClusterCounters). Online changes
    (`events`, as the server records them: {"step", "clip", "weights", ...}) are scheduled first.
    """
    from croupier.server.sampling.sampler import Sampler

    steps, hist, final, _, _ = replay_sampler(Sampler(layout, config, int(global_batch), int(seed)), upto, events,
                                              points)
    return steps, hist, final


def replay_sampler(sampler: Any, upto: int, events: Sequence[dict] = (), points: int = 200
                   ) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray | None, np.ndarray | None]:
    """`replay_history` for any fresh sampler (one dataset or a mixture). The last two values
    are, for a mixture, cumulative per-source draws and the source weights in force at each
    mark (None for one dataset)."""
    from croupier.errors import EndOfData
    from croupier.server.sampling.state import Change

    for ev in sorted(events, key=lambda e: int(e["step"])):
        sampler.schedule_change(Change.from_dict(ev))
    upto = max(0, int(upto))
    marks = np.unique(np.linspace(0, upto, num=min(points, upto + 1)).round().astype(np.int64))
    mixture = hasattr(sampler, "source_counters")
    rows, steps, src_rows, w_rows = [], [], [], []
    for mark in marks:
        try:
            while sampler.step < mark:
                sampler.next_batch()
        except EndOfData:
            break
        steps.append(int(sampler.step))
        rows.append(sampler.counters().draws)
        if mixture:
            sc = sampler.source_counters()
            src_rows.append(sc.draws)
            w_rows.append(sc.weights)
    return (np.asarray(steps, dtype=np.int64), np.vstack(rows), sampler.counters(),
            np.vstack(src_rows) if mixture else None, np.vstack(w_rows) if mixture else None)


def _layout_for(dataset: str, selection: str = "") -> Any:
    from croupier.datasets import open_dataset

    return open_dataset(dataset).layout(selection or None)


def _attach_history(data: ReportData, layout: Any, config: Any, events: Sequence[dict], sampler: Any = None) -> None:
    """Replays the sampler; keeps the history only if it reproduces the source's counters."""
    from croupier.server.sampling.sampler import Sampler

    t0 = time.perf_counter()
    if sampler is None:
        sampler = Sampler(layout, config, data.global_batch, data.seed)
    steps, hist, final, src_hist, w_hist = replay_sampler(sampler, data.step, events)
    if len(final.draws) != data.num_clusters or not np.array_equal(final.draws, data.draws):
        data.notes.append("draws over time omitted: replaying the sampler did not reproduce the server's "
                          "counters (online changes the source does not record?)")
        return
    data.history_steps, data.history = steps, hist
    data.source_history, data.source_weight_history = src_hist, w_hist
    data.notes.append(f"draws over time recomputed by replaying the deterministic sampler to step {data.step} "
                      f"({time.perf_counter() - t0:.1f} s); its final counters equal the server's")


def _mixture_sampler(mix: str, global_batch: int, seed: int) -> Any:
    from croupier.mixture import load_mix
    from croupier.server.sampling.mixture import mixture_sampler

    return mixture_sampler(load_mix(mix), global_batch, seed)


def read_rank_history(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(times, rank steps) from a rank_progress.jsonl file, or None if absent/empty."""
    path = Path(path)
    if not path.is_file():
        return None
    times, rows = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rows and len(rec["steps"]) != len(rows[0]):
            continue  # the world changed: keep the first world's ranks
        times.append(float(rec["t"]))
        rows.append([int(s) for s in rec["steps"]])
    if not rows or not rows[0]:
        return None
    t = np.asarray(times)
    return t - t[0], np.asarray(rows, dtype=np.int64)


# -- sources -----------------------------------------------------------------------------------
def fetch_status(address: str, token: str | None = None, timeout: float = 10.0, *, tls_ca: str | None = None,
                 tls_server_name: str | None = None) -> Any:
    """The server's GetStatusResponse with the per-cluster arrays (TLS when `tls_ca` is given)."""
    import grpc

    from croupier.client.channel import auth_metadata, open_channel
    from croupier.client.errors import from_rpc_error
    from croupier.proto.croupier.v1 import croupier_pb2, croupier_pb2_grpc

    channel = open_channel(address, tls_ca, server_name=tls_server_name)
    try:
        stub = croupier_pb2_grpc.SamplerStub(channel)
        try:
            return stub.GetStatus(croupier_pb2.GetStatusRequest(include_clusters=True),
                                  metadata=auth_metadata(token), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "GetStatus") from None
    finally:
        channel.close()


def from_server(address: str, *, token: str | None = None, watch_s: float = 0.0, interval_s: float = 0.5,
                dataset: str | None = None, replay: bool = True, tls_ca: str | None = None,
                tls_server_name: str | None = None, mix: str | None = None) -> ReportData:
    """Report data from a live server; `watch_s` > 0 samples rank progress for that long."""
    from croupier.server.sampling.policy import PolicyConfig

    status = fetch_status(address, token, tls_ca=tls_ca, tls_server_name=tls_server_name)
    times, rows = [], []
    deadline = time.monotonic() + watch_s
    while watch_s > 0 and time.monotonic() < deadline:
        times.append(time.monotonic())
        rows.append([r.next_step for r in sorted(status.ranks, key=lambda r: r.rank)])
        time.sleep(interval_s)
        status = fetch_status(address, token, tls_ca=tls_ca, tls_server_name=tls_server_name)
    job = status.job
    policy = json.loads(job.policy_json) if job.policy_json else {"policy": job.policy}
    data = ReportData(
        source=f"server {address}", policy=job.policy, clip=int(status.clip) or None,
        step=int(status.generated_step), global_batch=int(job.global_batch), seed=int(job.seed),
        sizes=np.asarray(status.cluster_sizes, dtype=np.int64), draws=np.asarray(status.cluster_draws, dtype=np.int64),
        passes=np.asarray(status.cluster_passes, dtype=np.int64),
        clipped_at=np.asarray(status.cluster_clipped_at, dtype=np.int64))
    if data.num_clusters == 0:
        raise StateError(f"server {address} returned no per-cluster counters")
    if status.tokens_counted and len(status.cluster_tokens) == data.num_clusters:
        data.tokens = np.asarray(status.cluster_tokens, dtype=np.int64)
        data.tokens_since = int(status.tokens_since_step)
    if len(rows) >= 2 and len({len(r) for r in rows}) == 1 and rows[0]:
        t = np.asarray(times)
        data.rank_times, data.rank_steps = t - t[0], np.asarray(rows, dtype=np.int64)
    elif status.ranks:
        data.notes.append("rank lag history not shown: the server keeps only current progress "
                          "(pass --watch SECONDS to sample it); now: " +
                          ", ".join(f"rank {r.rank} at step {r.next_step}" for r in status.ranks))
    if len(job.sources) > 1:
        data.source_names = tuple(x.name for x in job.sources)
        data.source_weights = np.array([x.weight for x in job.sources])
        data.source_draws = np.array([x.draws for x in job.sources], dtype=np.int64)
        data.source_exhausted_at = np.array([x.exhausted_at for x in job.sources], dtype=np.int64)
        if any(x.tokens_target for x in job.sources):  # a token-exact mixture
            data.source_tokens = np.array([x.tokens_dealt for x in job.sources], dtype=np.int64)
            data.source_token_targets = np.array([x.tokens_target for x in job.sources], dtype=np.int64)
            replay = False
        if replay and mix:
            _attach_history(data, None, None, (), _mixture_sampler(mix, data.global_batch, data.seed))
            data.notes.append("online changes are not visible through GetStatus: a mixture with online changes "
                              "replays from its state directory (--state-dir)")
        elif replay:
            data.notes.append("draws over time omitted: a mixture replays from its file; pass --mix FILE")
        return data
    remote = dataset or job.dataset_remote
    if replay and remote and "://" not in remote:
        try:
            _attach_history(data, _layout_for(remote, job.selection), PolicyConfig.from_dict(policy), ())
        except (DatasetError, ConfigError, OSError) as exc:
            data.notes.append(f"draws over time omitted: cannot open dataset {remote}: {exc}")
    elif replay:
        data.notes.append("draws over time omitted: the dataset is remote; pass --dataset LOCAL_DIR")
    return data


def _find_dataset(state_dir: Path, meta: dict) -> tuple[str | None, str]:
    """Dataset folder and selection named by the checkpoint or a server config in the state dir."""
    for key in ("dataset_remote", "dataset", "remote"):
        if meta.get(key):
            return str(meta[key]), str(meta.get("selection") or "")
    for name in ("server.json", "config.json", "serve.json", "job.json"):
        path = state_dir / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except ValueError:
                continue
            for key in ("dataset_remote", "dataset", "remote"):
                if isinstance(cfg.get(key), str) and cfg[key]:
                    return cfg[key], str(cfg.get("selection") or "")
    return None, ""


def from_state_dir(state_dir: str | Path, *, dataset: str | None = None, selection: str | None = None,
                   replay: bool = True, mix: str | None = None) -> ReportData:
    """Report data from the newest valid checkpoint in a server's state directory.

    Cluster sizes come from the dataset's sidecar (`dataset`, or the one the state directory
    names). Rank progress over time is read from state_dir/rank_progress.jsonl when present.
    """
    from croupier.server.durability.state_dir import StateDir
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler

    state_dir = Path(state_dir)
    ck, changes = StateDir.open(state_dir).latest()
    meta, state = ck.meta, ck.state
    events = [c.to_dict() for c in changes]
    if "mixture" in meta.policy:
        return _mixture_from_state_dir(state_dir, ck, events, mix, replay)
    found, found_sel = _find_dataset(state_dir, ck.raw_meta)
    dataset = dataset or found
    if not dataset:
        raise ConfigError(f"state directory {state_dir} does not name its dataset: pass --dataset DIR")
    layout = _layout_for(dataset, selection if selection is not None else found_sel)
    config = PolicyConfig.from_dict(meta.policy)
    from croupier.apps.report_tokens import is_token_state, token_dealer

    if is_token_state(state.fingerprint):  # a job dealt in tokens: its document sampler, through its dealer
        sampler = token_dealer(state_dir, ck, dataset=dataset,
                               selection=selection if selection is not None else found_sel).inner
        replay = False
        data_note = "draws over time not replayed: the job is dealt in tokens"
    else:
        sampler = Sampler(layout, config, meta.global_batch, meta.seed)
        sampler.load_state(state)  # checks the fingerprint: the dataset given is the job's
        data_note = ""
    c = sampler.counters()
    data = ReportData(
        source=f"state directory {state_dir} (checkpoint at step {ck.step})", policy=config.policy,
        clip=sampler.clip, step=int(state.step), global_batch=meta.global_batch, seed=meta.seed,
        sizes=np.asarray(c.sizes), draws=c.draws, passes=c.passes, clipped_at=c.clipped_at)
    lag = read_rank_history(state_dir / RANK_HISTORY_FILE)
    if lag is not None:
        data.rank_times, data.rank_steps = lag
    else:
        data.notes.append("rank lag history not shown: the state directory records none")
    attach_changes(data, events, _group_loss_of(ck.payload.adapter))
    if ck.payload.tally is not None:
        from croupier.server.job.token_tally import TokenTally

        t = TokenTally(data.num_clusters, lambda ids: ids, lambda ids: ids)
        t.load(ck.payload.tally, int(state.step))
        data.tokens, data.tokens_since = t.tokens, t.since
    if data_note:
        data.notes.append(data_note)
    if replay:
        _attach_history(data, layout, config, events)
    return data


def _group_loss_of(adapter: bytes | None) -> np.ndarray | None:
    """Per-group loss EMA from an adaptive job's checkpoint section (None for other jobs)."""
    from croupier.server.feedback.adapt import split_parts
    from croupier.server.feedback.loss_stats import LossStats

    if adapter is None:
        return None
    return LossStats.from_bytes(split_parts(adapter)[1]).ema


def _mixture_from_state_dir(state_dir: Path, ck: Any, events: list[dict], mix: str | None,
                            replay: bool) -> ReportData:
    if not mix:
        try:
            mix = json.loads((state_dir / "server.json").read_text()).get("mix")
        except (OSError, ValueError):
            mix = None
    if not mix:
        raise ConfigError(f"state directory {state_dir} holds a mixture job and names no mixture file: pass --mix FILE")
    from croupier.apps.report_tokens import is_token_state, token_dealer

    b, seed, state = ck.meta.global_batch, ck.meta.seed, ck.state
    tokens = is_token_state(state.fingerprint)
    if tokens:  # a job dealt in tokens: its dealer (a token-exact mixture's counts tokens per source)
        sampler = token_dealer(state_dir, ck, mix=mix)
        if not hasattr(sampler, "source_counters"):
            sampler = sampler.inner
    else:
        sampler = _mixture_sampler(mix, b, seed)
        sampler.load_state(state)  # checks the fingerprint: the file given is the job's
    c = sampler.counters()
    sc = sampler.source_counters() if hasattr(sampler, "source_counters") else None
    data = ReportData(
        source=f"state directory {state_dir} (checkpoint at step {ck.step})",
        policy="mixture" if sc is not None else sampler.config.policy, clip=sampler.clip, step=int(state.step),
        global_batch=b, seed=seed, sizes=np.asarray(c.sizes), draws=c.draws, passes=c.passes,
        clipped_at=c.clipped_at)
    if sc is not None:
        data.source_names, data.source_weights = sc.names, sc.weights
        data.source_draws, data.source_exhausted_at = sc.draws, sc.exhausted_at
        data.source_tokens, data.source_token_targets = sc.tokens_dealt, sc.tokens_target
    lag = read_rank_history(state_dir / RANK_HISTORY_FILE)
    if lag is not None:
        data.rank_times, data.rank_steps = lag
    if replay and tokens:
        data.notes.append("draws over time not replayed: the job is dealt in tokens")
    elif replay:
        _attach_history(data, None, None, events, _mixture_sampler(mix, b, seed))
    return data


def attach_changes(data: ReportData, events: Sequence[dict], group_loss: np.ndarray | None = None) -> None:
    """Weights over time from the recorded changes (the adapted kind: cluster or source weights)."""
    rows = [(int(e["step"]), e.get("origin") or "operator", e.get("source_weights") or e.get("weights"))
            for e in events]
    data.changes = [(s, o, "weights" if w is not None else "clip") for s, o, w in rows]
    weighted = [(s, o, np.asarray(w, dtype=np.float64)) for s, o, w in rows if w is not None]
    if weighted and len({len(w) for _, _, w in weighted}) == 1:
        data.weight_steps = np.array([s for s, _, _ in weighted], dtype=np.int64)
        data.weight_history = np.vstack([w for _, _, w in weighted])
        data.weight_origins = [o for _, o, _ in weighted]
    data.group_loss = group_loss


def source_table(data: ReportData) -> str:
    """Per source: weight, target share, draws, actual share, exhausted at."""
    assert data.source_names is not None and data.source_weights is not None and data.source_draws is not None
    total = int(data.source_draws.sum()) or 1
    wsum = float(data.source_weights.sum()) or 1.0
    width = max(8, *(len(n) for n in data.source_names))
    tok, want = data.source_tokens, data.source_token_targets
    lines = [f"{'source':>{width}} {'weight':>8} {'target':>7} {'draws':>10} {'share':>7} {'exhausted at':>12}"
             + (f" {'tokens dealt':>14} {'token target':>14}" if tok is not None and want is not None else "")]
    for i, name in enumerate(data.source_names):
        ex = "-" if data.source_exhausted_at is None or data.source_exhausted_at[i] < 0 \
            else str(int(data.source_exhausted_at[i]))
        lines.append(f"{name:>{width}} {data.source_weights[i]:>8.4g} {data.source_weights[i] / wsum:>7.1%} "
                     f"{int(data.source_draws[i]):>10} {data.source_draws[i] / total:>7.1%} {ex:>12}"
                     + (f" {int(tok[i]):>14,} {int(want[i]):>14,}" if tok is not None and want is not None else ""))
    return "\n".join(lines)


# -- output ------------------------------------------------------------------------------------
def cluster_table(data: ReportData, limit: int | None = None) -> str:
    """A text table: cluster, size, draws, passes (draws/size), cursor passes, clipped at."""
    order = np.argsort(-data.sizes, kind="stable")
    tok = data.tokens
    lines = [f"{'cluster':>7} {'size':>7} {'draws':>8} {'draws/size':>10} {'passes':>6} {'clipped':>8}"
             + (f" {'tokens':>12}" if tok is not None else "")]
    shown = order if limit is None or len(order) <= limit else np.concatenate([order[: limit // 2],
                                                                              order[-(limit - limit // 2):]])
    for i, c in enumerate(shown):
        if limit is not None and len(order) > limit and i == limit // 2:
            lines.append(f"{'...':>7}")
        clipped = f"step {data.clipped_at[c]}" if data.clipped_at[c] >= 0 else "-"
        lines.append(f"{c:>7} {data.sizes[c]:>7} {data.draws[c]:>8} {data.draws[c] / data.sizes[c]:>10.2f} "
                     f"{data.passes[c]:>6} {clipped:>8}" + (f" {int(tok[c]):>12}" if tok is not None else ""))
    return "\n".join(lines)


def write_report(data: ReportData, out: str | Path) -> list[Path]:
    """Writes the PNGs and index.html into `out`; returns the PNG paths."""
    from croupier.apps import report_plots as rp

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []
    paths = [rp.plot_sizes_vs_draws(data.sizes, data.draws, out / "sizes_vs_draws.png", policy=data.policy,
                                    clip=data.clip, clipped_at=data.clipped_at)]
    images.append(("sizes_vs_draws.png", "Cluster size vs draws (log axes), with the random, uniform and clip lines"))
    paths.append(rp.plot_passes(data.sizes, data.draws, out / "passes.png", clip=data.clip,
                                clipped_at=data.clipped_at, policy=data.policy))
    images.append(("passes.png", "Passes per cluster (draws / size) against the clip line"))
    if data.history is not None and data.history_steps is not None:
        paths.append(rp.plot_draws_over_time(data.history_steps, data.history, data.sizes,
                                             out / "draws_over_time.png", clip=data.clip, policy=data.policy,
                                             source="replayed"))
        images.append(("draws_over_time.png", "Cumulative draws of the largest and smallest clusters, and active clusters"))
    if data.source_history is not None and data.source_weight_history is not None and data.history_steps is not None:
        assert data.source_names is not None
        paths.append(rp.plot_source_shares(data.history_steps, data.source_history, data.source_weight_history,
                                           data.source_names, out / "sources_over_time.png"))
        images.append(("sources_over_time.png", "Each source's share of the draws per interval against its weight share"))
    if data.source_names is not None:
        (out / "sources.txt").write_text(source_table(data) + "\n", encoding="utf-8")
    if data.weight_history is not None and data.weight_steps is not None:
        paths.append(rp.plot_weights_over_time(data.weight_steps, data.weight_history, data.weight_origins,
                                               out / "weights_over_time.png", group_loss=data.group_loss))
        images.append(("weights_over_time.png", "Weight share of the most re-weighted groups at every recorded "
                                                "change (and per-group loss), by who changed them"))
    if data.changes:
        (out / "changes.txt").write_text("step origin kind\n" + "\n".join(f"{s} {o} {k}" for s, o, k in data.changes)
                                         + "\n", encoding="utf-8")
    if data.rank_times is not None and data.rank_steps is not None and len(data.rank_times) >= 2:
        paths.append(rp.plot_rank_lag(data.rank_times, data.rank_steps, out / "rank_lag.png", max_lag=data.max_lag))
        images.append(("rank_lag.png", "Rank progress and the fastest-minus-slowest lag"))
    clipped = int((data.clipped_at >= 0).sum())
    summary = [
        ("source", data.source), ("policy", data.policy), ("clip", str(data.clip or "none")),
        ("step", str(data.step)), ("global batch", str(data.global_batch)), ("seed", str(data.seed)),
        ("clusters", f"{data.num_clusters} ({clipped} clipped)"), ("draws", f"{int(data.draws.sum()):,}"),
        ("max passes (draws/size)", f"{float((data.draws / data.sizes).max()):.2f}"),
    ]
    if data.tokens is not None:
        since = f" (since step {data.tokens_since})" if data.tokens_since else ""
        summary.append(("tokens dealt" + since, f"{int(data.tokens.sum()):,}"))
    rp.write_index_html(out, images, title=f"croupier report — {data.policy}", summary=summary, notes=data.notes)
    (out / "clusters.txt").write_text(cluster_table(data) + "\n", encoding="utf-8")
    return paths
