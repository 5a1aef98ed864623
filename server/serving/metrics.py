"""Prometheus metrics of a sampler server, read from the job at scrape time.

Exported (prefix `croupier_`): steps_generated_total, steps_replayed_total,
slices_served_total, indices_served_total, generated_step, durable_step, slowest_step,
active_clusters, clipped_clusters, cluster_draws{cluster} (per cluster, only up to
`MAX_CLUSTER_SERIES` clusters to bound cardinality; draws_total over all of them always),
rank_lag_steps{rank} (a rank's acknowledged step behind the fastest rank's),
max_rank_lag_steps, refused_calls_total{method,code}, silent_ranks and rank_live{rank}
(ranks past the liveness timeout), checkpoint_failures_total, checkpoint_healthy (0 while
checkpoint writes fail) and generated_mark (the durable generated-step mark). Mixture jobs add
source_draws{source}, source_weight{source}, source_share{source} (of all draws so far) and
source_exhausted{source} (1 once the source ran out of room); up to MAX_SOURCE_SERIES sources.
Adaptive jobs add loss_reports_total{result="accepted"|"refused"}, loss_samples_total,
weight_changes_total{origin}, adapt_failures_total and event_log_failures_total.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from croupier.server.job.job import Job

MAX_CLUSTER_SERIES = 1024
MAX_SOURCE_SERIES = 4096


class JobCollector(Collector):
    """Reads one consistent `Job.status()` per scrape."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def collect(self) -> Iterator:
        st = self.job.status()
        for name, value, doc in (
            ("croupier_steps_generated", st.steps_generated, "Global batches generated."),
            ("croupier_steps_replayed", st.steps_replayed, "Global batches recomputed from a saved state."),
            ("croupier_slices_served", st.slices_served, "Rank slices delivered."),
            ("croupier_indices_served", st.ids_served, "Sample ids delivered to ranks."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        clipped = int((st.clipped_at >= 0).sum())
        for name, value, doc in (
            ("croupier_generated_step", st.generated_step, "Next step the generator produces."),
            ("croupier_durable_step", st.durable_step, "Step of the newest durable checkpoint (-1: none)."),
            ("croupier_slowest_step", st.slowest_step, "Smallest acknowledged step over the ranks."),
            ("croupier_active_clusters", st.active_clusters, "Clusters not knocked out by the clip."),
            ("croupier_clipped_clusters", clipped, "Clusters knocked out by the clip."),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("croupier_draws", "Draws over all clusters.", value=int(st.draws.sum()))
        if len(st.draws) <= MAX_CLUSTER_SERIES:
            draws = CounterMetricFamily("croupier_cluster_draws", "Draws per cluster.", labels=["cluster"])
            for c, d in enumerate(st.draws.tolist()):
                draws.add_metric([str(c)], d)
            yield draws
        if st.sources is not None and len(st.sources.names) <= MAX_SOURCE_SERIES:
            sc = st.sources
            total = int(sc.draws.sum()) or 1
            fam = {"draws": CounterMetricFamily("croupier_source_draws", "Draws per mixture source.",
                                                labels=["source"]),
                   "weight": GaugeMetricFamily("croupier_source_weight", "Weight in force per mixture source.",
                                               labels=["source"]),
                   "share": GaugeMetricFamily("croupier_source_share", "Share of all draws per mixture source.",
                                              labels=["source"]),
                   "dry": GaugeMetricFamily("croupier_source_exhausted",
                                            "1 once a mixture source ran out of room (clip or epoch cap).",
                                            labels=["source"])}
            for i, name in enumerate(sc.names):
                fam["draws"].add_metric([name], int(sc.draws[i]))
                fam["weight"].add_metric([name], float(sc.weights[i]))
                fam["share"].add_metric([name], float(sc.draws[i]) / total)
                fam["dry"].add_metric([name], 1.0 if sc.exhausted_at[i] >= 0 else 0.0)
            yield from fam.values()
        if st.adapt is not None:
            reports = CounterMetricFamily("croupier_loss_reports", "Step loss reports, by result.", labels=["result"])
            reports.add_metric(["accepted"], st.adapt.accepted)
            reports.add_metric(["refused"], st.adapt.refused)
            yield reports
            yield CounterMetricFamily("croupier_loss_samples", "Per-sample losses folded into the statistics.",
                                      value=st.adapt.samples)
            yield CounterMetricFamily("croupier_adapt_failures", "Controller proposals that failed (logged).",
                                      value=st.adapt_failures)
        if st.changes:
            by: dict[str, int] = {}
            for _, origin, _, _ in st.changes:
                by[origin] = by.get(origin, 0) + 1
            fam = CounterMetricFamily("croupier_weight_changes", "Online changes (of the last 64), by origin.",
                                      labels=["origin"])
            for origin, n in sorted(by.items()):
                fam.add_metric([origin], n)
            yield fam
        yield CounterMetricFamily("croupier_event_log_failures", "Appends to the event log that failed.",
                                  value=st.log_failures)
        lag = GaugeMetricFamily("croupier_rank_lag_steps", "Steps a rank is behind the fastest rank.",
                                labels=["rank"])
        for r in st.ranks:
            lag.add_metric([str(r.rank)], st.fastest_step - r.next_step)
        yield lag
        yield GaugeMetricFamily("croupier_max_rank_lag_steps", "Fastest minus slowest acknowledged step.",
                                value=st.fastest_step - st.slowest_step)
        live = GaugeMetricFamily("croupier_rank_live", "1 while a rank is within the liveness timeout.",
                                 labels=["rank"])
        for r in st.ranks:
            live.add_metric([str(r.rank)], 1 if r.live else 0)
        yield live
        yield GaugeMetricFamily("croupier_silent_ranks", "Ranks silent past the liveness timeout.",
                                value=sum(not r.live for r in st.ranks))
        if st.checkpoint is not None:
            yield CounterMetricFamily("croupier_checkpoint_failures", "Checkpoint or mark writes that failed.",
                                      value=st.checkpoint.failures)
            yield GaugeMetricFamily("croupier_checkpoint_healthy", "0 while checkpoint writes fail, else 1.",
                                    value=1 if st.checkpoint.ok else 0)
            yield GaugeMetricFamily("croupier_generated_mark", "Durable generated-step mark (-1: none).",
                                    value=st.checkpoint.mark)


class SessionCollector(Collector):
    """Open sessions and what node agents report about their nodes (per node, labelled)."""

    def __init__(self, sessions: Callable[[], list]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator:
        sessions = self.sessions()
        yield GaugeMetricFamily("croupier_open_sessions", "Open Session streams (one per node behind agents).",
                                value=len(sessions))
        families = {
            "lanes": GaugeMetricFamily("croupier_node_lanes", "Open lanes of a node's session.", labels=["node"]),
            "down": GaugeMetricFamily("croupier_node_bytes_downloaded", "Shard bytes a node's cache downloaded.",
                                      labels=["node"]),
            "bytes": GaugeMetricFamily("croupier_node_cache_bytes", "Bytes in a node's shard cache.",
                                       labels=["node"]),
            "hit": GaugeMetricFamily("croupier_node_cache_hit_ratio",
                                     "Share of a node's shard requests served from its cache.", labels=["node"]),
        }
        for st in sessions:
            node = st.node.node if st.HasField("node") and st.node.node else ""
            if not node:
                continue
            r = st.node
            families["lanes"].add_metric([node], st.lanes)
            families["down"].add_metric([node], r.bytes_downloaded)
            families["bytes"].add_metric([node], r.cache_bytes)
            asked = r.cache_hits + r.cache_misses
            families["hit"].add_metric([node], r.cache_hits / asked if asked else 0.0)
        yield from families.values()


class ServerMetrics:
    """A registry for one server; `refused(method, code)` counts refused calls."""

    def __init__(self, job: Job) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(JobCollector(job))
        self._refused = Counter("croupier_refused_calls", "Calls refused, by method and status code.",
                                ["method", "code"], registry=self.registry)
        self._http = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def attach_sessions(self, servicer: Any) -> None:
        """Adds the open sessions of `servicer` (a SamplerServicer) and their node reports."""
        self.registry.register(SessionCollector(lambda: [x.status() for x in list(servicer.sessions.values())]))

    def refused(self, method: str, code: grpc.StatusCode) -> None:
        self._refused.labels(method.rsplit("/", 1)[-1], code.name).inc()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Starts the /metrics HTTP endpoint; returns its port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
