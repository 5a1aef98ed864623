"""Adaptive weights through the server: loss reports, controllers, recorded changes, refusals,
kill -9 replay from the event log, and `simulate --state-dir`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.adapt import HOT, SIZES, B, losses_of
from croupier.client.rank_client import Backoff, RankClient
from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.topology import Topology
from jobs import get_slice, start_server, train_step


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs and servers a test opens, stopped and closed when it ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def hot_share(batches: list[np.ndarray]) -> float:
    ids = np.concatenate(batches)
    return float((ids // 200 == HOT).mean())


@pytest.mark.parametrize("controller", ["loss-softmax", "odm", "ado"])
def test_a_cluster_with_5x_loss_at_least_doubles_its_share_within_100_steps(tmp_path: Path, controller: str,
                                                                           closing: ExitStack) -> None:
    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
              spec=JobSpec(name="a", max_lookahead=2), store=CheckpointStore(tmp_path / "s"),
              adapt=AdaptSpec(controller, every=10))
    _, port = start_server(closing, job, checkpoint=True)
    with RankClient(f"127.0.0.1:{port}", job="a", topology=Topology(0, 1), lookahead=2, stop_step=100,
                    backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
        batches = []
        for step, ids in c:
            batches.append(ids)
            c.report_losses(step, losses_of(ids))
            assert c.flush_losses(10)
        stats = c.loss_report_stats()
    assert stats["accepted"] == 100 and stats["refused"] == 0 and stats["dropped"] == 0
    st = job.status()
    assert st.adapt is not None and st.adapt.accepted == 100
    assert hot_share(batches[-30:]) >= 2 * (1 / 8), hot_share(batches[-30:])
    assert any(origin == controller for _, origin, _, _ in st.changes)
    assert st.adapt.group_weight[HOT] > 2 * np.median(st.adapt.group_weight)


def test_equal_losses_move_no_weight_by_more_than_ten_percent() -> None:
    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
              spec=JobSpec(name="a", max_lookahead=2), adapt=AdaptSpec("loss-softmax", every=10))
    job.join(0, 1, "a")
    for t in range(100):
        train_step(job, 0, 1, t)
        acc, refused = job.report_losses(0, 1, [(t, np.ones(B), None)], "a")
        assert acc == 1 and not refused
    w = job.status().adapt.group_weight
    assert np.abs(w / w.mean() - 1).max() <= 0.10
    job.close()


def test_reports_that_break_a_rule_are_refused_by_name_and_change_nothing() -> None:
    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("weighted", weights=(1.0,) * 8), B, 0,
              spec=JobSpec(name="a", max_lookahead=4), adapt=AdaptSpec("odm", every=10))
    job.join(0, 2, "a")
    job.join(1, 2, "a")
    for t in range(3):
        get_slice(job, 0, 2, t)
    job.ack(0, 2, 3)  # rank 0 trained steps 0..2
    good = np.ones(B // 2)
    bad = {"dealt": (5, good, None), "length": (0, np.ones(3), None), "finite": (1, np.r_[good[:-1], np.nan], None),
           "non-negative": (2, np.r_[good[:-1], -1.0], None)}
    for rule, report in bad.items():
        acc, refused = job.report_losses(0, 2, [report], "a")
        assert acc == 0 and refused[0][1] == rule, (rule, refused)
    inf = job.report_losses(0, 2, [(1, np.r_[good[:-1], np.inf], None)], "a")[1]
    assert inf[0][1] == "finite" and "inf" in inf[0][2]
    assert job.status().adapt.accepted == 0 and job.status().adapt.samples == 0
    # A rank that never received step 1 (rank 1 has none delivered), an unknown rank, a duplicate.
    assert job.report_losses(1, 2, [(1, good, None)], "a")[1][0][1] == "dealt"
    with pytest.raises(ConfigError, match="rank 7"):
        job.report_losses(7, 2, [(0, good, None)], "a")
    acc, refused = job.report_losses(0, 2, [(0, good, None), (0, good, None)], "a")
    assert acc == 1 and [r[1] for r in refused] == ["duplicate"]
    # A job that does not adapt refuses reports with the reason.
    plain = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=3), B, 0)
    with pytest.raises(ConfigError, match="does not adapt"):
        plain.report_losses(0, 1, [(0, good, None)])
    with pytest.raises(ConfigError, match="unknown controller 'pid'; valid controllers: ado, loss-softmax, odm"):
        AdaptSpec("pid", every=10)
    with pytest.raises(ConfigError, match="policy clusterclip or weighted"):
        Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("random"), B, 0, adapt=AdaptSpec("odm", every=10))
    job.close()


def test_status_table_json_and_metrics_show_the_controller(tmp_path: Path, closing: ExitStack) -> None:
    from prometheus_client import generate_latest

    from croupier.client.cli.admin_cli import format_status, status_dict
    from croupier.server.serving.metrics import ServerMetrics
    from croupier.server.serving.service import status_response

    job = closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
                                    spec=JobSpec(name="a", max_lookahead=2), store=CheckpointStore(tmp_path / "s"),
                                    adapt=AdaptSpec("loss-softmax", every=5)))
    job.join(0, 1, "a")
    for t in range(30):
        ids = train_step(job, 0, 1, t)
        job.report_losses(0, 1, [(t, losses_of(ids), None)], "a")
    job.report_losses(0, 1, [(3, np.ones(2), None)], "a")
    resp = status_response(job, job.status(), include_clusters=True)
    table = format_status(resp)
    assert "adaptive weights: loss-softmax over clusters every 5 steps; reports 30 accepted, 1 refused" in table
    assert "loss-softmax" in table.split("change at")[1]
    d = status_dict(resp)
    assert d["adapt"]["group_weight"][HOT] == max(d["adapt"]["group_weight"])
    text = generate_latest(ServerMetrics(job).registry).decode()
    assert 'croupier_loss_reports_total{result="accepted"} 30.0' in text
    assert 'croupier_loss_reports_total{result="refused"} 1.0' in text
    assert 'croupier_weight_changes_total{origin="loss-softmax"}' in text


def test_report_shows_weights_over_time_and_who_changed_them(tmp_path: Path, closing: ExitStack) -> None:
    job = closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
                                    spec=JobSpec(name="a", max_lookahead=2), store=CheckpointStore(tmp_path / "s"),
                                    adapt=AdaptSpec("odm", every=5)))
    job.join(0, 1, "a")
    for t in range(40):
        ids = train_step(job, 0, 1, t)
        job.report_losses(0, 1, [(t, losses_of(ids), None)], "a")
    job.update(41, clip=60)
    job.checkpoint_now()
    job.close()
    (tmp_path / "s" / "server.json").write_text(json.dumps({"dataset": ""}))
    from croupier.apps.report import attach_changes, from_state_dir, write_report

    # A --cluster-sizes job's layout is not in its state directory, so the report data is assembled
    # from the state directory's pieces: its event log and its checkpoint's loss statistics.
    from croupier.server.durability.state_dir import StateDir

    ck, changes = StateDir.open(tmp_path / "s").latest()
    events = [c.to_dict() for c in changes]
    assert [e.get("origin", "operator") for e in events][-1] == "operator"
    assert {e.get("origin") for e in events[:-1]} == {"odm"}
    from croupier.apps.report import ReportData

    data = ReportData(source="t", policy="clusterclip", clip=50, step=40, global_batch=B, seed=0,
                      sizes=np.array(SIZES), draws=np.ones(8, dtype=np.int64), passes=np.zeros(8, dtype=np.int64),
                      clipped_at=np.full(8, -1))
    from croupier.apps.report import _group_loss_of

    attach_changes(data, events, _group_loss_of(ck.payload.adapter))
    assert data.group_loss is not None and np.argmax(data.group_loss) == HOT
    write_report(data, tmp_path / "rep")
    assert (tmp_path / "rep" / "weights_over_time.png").stat().st_size > 0
    assert "odm" in (tmp_path / "rep" / "changes.txt").read_text()
    with pytest.raises(ConfigError):
        from_state_dir(tmp_path / "s")  # names no dataset


def test_faults_a_refusing_event_log_a_failing_controller_and_an_unreachable_server(tmp_path: Path, monkeypatch,
                                                                                    closing: ExitStack) -> None:
    """No fault in the feedback path stalls the sequence: each is refused or dropped, counted and logged."""
    from prometheus_client import generate_latest

    from croupier.client.loss_sender import LossSender
    from croupier.errors import CroupierError
    from croupier.server.durability.event_log import EventLog
    from croupier.server.serving.metrics import ServerMetrics

    j = closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
                                  spec=JobSpec(name="a", max_lookahead=2), store=CheckpointStore(tmp_path / "s"),
                                  adapt=AdaptSpec("loss-softmax", every=5)))
    j.join(0, 1, "a")

    def full_disk(self, event):  # the state directory's disk refuses the append
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(EventLog, "append", full_disk)
        with pytest.raises(CroupierError, match="online change not applied.*No space left"):
            j.update(3, clip=60)
        for t in range(12):  # controller proposals fail the same way: logged, counted, generation goes on
            ids = train_step(j, 0, 1, t)
            j.report_losses(0, 1, [(t, losses_of(ids), None)], "a")
    st = j.status()
    assert st.log_failures >= 2 and st.adapt_failures >= 1 and st.generated_step >= 12 and not st.changes
    text = generate_latest(ServerMetrics(j).registry).decode()
    assert "croupier_adapt_failures_total" in text and "croupier_event_log_failures_total" in text

    def broken(self, stats, weights, step):
        raise RuntimeError("controller bug")

    with monkeypatch.context() as m:
        m.setattr(type(j.adapter.controller), "propose", broken)
        assert not get_slice(j, 0, 1, 16).end
    assert j.status().adapt_failures > st.adapt_failures
    # Healthy again: the next proposal is recorded.
    get_slice(j, 0, 1, 25)
    assert any(origin == "loss-softmax" for _, origin, _, _ in j.status().changes)
    j.close()

    def unreachable(batch):
        raise ConnectionError("server gone")

    rep = LossSender(unreachable, interval_s=0.01, max_batch=2, max_pending=4)
    for step in range(10):
        rep.add(step, np.ones(4))  # returns at once: the sender thread meets the fault
    rep.close(timeout=5)
    assert rep.counters["queued"] == 10 and rep.counters["dropped"] == 10 and rep.counters["sent"] == 0


def test_a_mixture_adapts_its_source_weights() -> None:
    from croupier.mixture import open_mix, parse_mix

    mix = open_mix(parse_mix('[sources.hot]\ncluster_sizes = [400, 400]\nweight = 1\npolicy = "uniform"\n'
                             '[sources.cold]\ncluster_sizes = [400, 400]\nweight = 1\npolicy = "uniform"\n'))
    job = Job(None, None, B, 0, spec=JobSpec(name="m", max_lookahead=2), mixture=mix,
              adapt=AdaptSpec("loss-softmax", every=10, groups="sources"))
    job.join(0, 1, "m")
    batches = []
    for t in range(100):
        ids = train_step(job, 0, 1, t)
        batches.append(ids)
        assert job.report_losses(0, 1, [(t, np.where(ids < 800, 5.0, 1.0), None)], "m")[0] == 1
    hot = float((np.concatenate(batches[-30:]) < 800).mean())
    assert hot >= 0.75, hot  # from half of every batch to at least three quarters
    assert job.source_counters().weights[0] > 2 * job.source_counters().weights[1]
    with pytest.raises(ConfigError, match="needs a mixture"):
        Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, 0,
            adapt=AdaptSpec("odm", every=10, groups="sources"))
    job.close()


@pytest.mark.slow
def test_the_training_process_reports_while_dataloader_workers_hold_the_streams(tmp_path: Path,
                                                                                 closing: ExitStack) -> None:
    """DataLoader workers read the slices; the main process reports each trained step's losses
    (the report names the step, the server knows its ids)."""
    from torch.utils.data import DataLoader

    from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
    from croupier.format.fingerprint import index_fingerprint
    from workers.harness import write_mds

    n = sum(SIZES)
    remote = write_mds(tmp_path / "ds", n)
    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
              spec=JobSpec(name="w", max_lookahead=4, dataset_remote=str(remote),
                           dataset_fingerprint=index_fingerprint((remote / "index.json").read_bytes())),
              adapt=AdaptSpec("loss-softmax", every=5))
    _, port = start_server(closing, job)
    ds = CroupierIterableDataset(f"127.0.0.1:{port}", "w", cache_dir=tmp_path / "cache", steps=12,
                                 topology=Topology(0, 1), lookahead=4, agent="")
    closing.callback(ds.close)
    steps = []
    for batch in DataLoader(ds, batch_size=B, num_workers=2):
        step = int(batch[STEP_KEY][0])
        steps.append(step)
        ds.report_losses(step, losses_of(batch[ID_KEY].numpy()))
    assert ds._control_client().flush_losses(30)
    ds.close()
    assert sorted(steps) == list(range(12))
    st = job.status()
    assert st.adapt.accepted == 12 and st.adapt.refused == 0 and st.adapt.samples == 12 * B


def test_a_mixture_adapting_its_clusters_keeps_per_source_statistics_too(tmp_path: Path, closing: ExitStack) -> None:
    from croupier.client.cli.admin_cli import format_status
    from croupier.mixture import open_mix, parse_mix
    from croupier.server.serving.service import status_response

    mix = open_mix(parse_mix('[sources.hot]\ncluster_sizes = [400, 400]\nweight = 1\npolicy = "clusterclip"\n'
                             'clip = 20\n[sources.cold]\ncluster_sizes = [400, 400]\nweight = 1\n'
                             'policy = "uniform"\n'))
    job = closing.enter_context(Job(None, None, B, 0, spec=JobSpec(name="m", max_lookahead=2), mixture=mix,
                                    store=CheckpointStore(tmp_path / "s"), adapt=AdaptSpec("odm", every=10)))
    job.join(0, 1, "m")
    for t in range(30):
        ids = train_step(job, 0, 1, t)
        job.report_losses(0, 1, [(t, np.where(ids < 800, 4.0, 1.0), None)], "m")
    view = job.status().adapt
    assert view.group_loss.shape == (4,) and view.source_loss is not None
    assert view.source_loss[0] == pytest.approx(4.0) and view.source_loss[1] == pytest.approx(1.0)
    assert int(view.source_samples.sum()) == 30 * B
    assert "per-source loss EMA: hot 4.0000" in format_status(status_response(job, job.status(), True))
    job.checkpoint_now()
    job.close()
    again = closing.enter_context(Job(None, None, B, 0, spec=JobSpec(name="m", max_lookahead=2), mixture=mix,
                                      store=CheckpointStore(tmp_path / "s"), adapt=AdaptSpec("odm", every=10)))
    assert np.array_equal(again.status().adapt.source_samples, view.source_samples)


@pytest.mark.parametrize("controller", ["loss-softmax", "odm", "ado"])
def test_a_job_killed_before_its_first_checkpoint_adapts_on_as_an_uninterrupted_one(tmp_path: Path, controller: str,
                                                                                  closing: ExitStack) -> None:
    """The operator's changes made before the first checkpoint are in the event log only: a
    restarted job tells its controller of them (the weights in force, the operator's prior)
    as the uninterrupted job's controller was told, so the two go on with the same proposals
    and the same batches."""
    spec = JobSpec(name="a", max_lookahead=2, checkpoint_every=1000)

    def make(state: Path) -> Job:
        return closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("weighted", weights=(1.0,) * 8),
                                         B, 0, spec=spec, store=CheckpointStore(state),
                                         adapt=AdaptSpec(controller, every=5)))

    def train(job: Job, start: int, stop: int, report: bool) -> list[np.ndarray]:
        out = []
        for t in range(start, stop):
            ids = train_step(job, 0, 1, t)
            if report:
                assert job.report_losses(0, 1, [(t, losses_of(ids), None)], "a")[0] == 1
            out.append(ids)
        return out

    kill_at, end = 12, 80
    uninterrupted, killed = make(tmp_path / "u"), make(tmp_path / "k")
    for job in (uninterrupted, killed):
        job.join(0, 1, "a")
        job.update(3, weights=[1.0, 4.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0])  # the operator's base weights
        job.update(7, clip=40)
        job.update(9, weights=[1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 0.5, 1.0])
    before = [train(job, 0, kill_at, report=False) for job in (uninterrupted, killed)]
    assert all(np.array_equal(a, b) for a, b in zip(*before))
    killed.close()  # kill -9 before the first checkpoint: the event log and the mark, no checkpoint file
    assert CheckpointStore(tmp_path / "k").steps() == []
    restarted = make(tmp_path / "k")
    assert restarted.resumed_from is None
    restarted.join(0, 1, "a")
    restarted.ack(0, 1, kill_at)  # the reconnecting rank says where it is
    want = train(uninterrupted, kill_at, end, report=True)
    got = train(restarted, kill_at, end, report=True)
    u, r = uninterrupted.status(), restarted.status()
    assert any(origin == controller for _, origin, _, _ in u.changes), "the controller never proposed"
    assert r.changes == u.changes
    assert np.array_equal(r.adapt.group_weight, u.adapt.group_weight)
    for t, (a, b) in enumerate(zip(want, got), start=kill_at):
        assert np.array_equal(a, b), t
