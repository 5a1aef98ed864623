"""The append-only event log of online changes: exact round trip, torn tail, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from croupier.errors import ConfigError, StateError
from croupier.layout import ClusterLayout
from croupier.server.durability.event_log import Event, EventLog, iter_events, records_upto, scan
from croupier.server.feedback.controllers import round_mantissa
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler


def _events(k: int = 500) -> list[Event]:
    rng = np.random.default_rng(3)
    w1 = rng.random(k)
    w2 = w1.copy()
    w2[[5, 77]] = [0.0, 3.25]                  # a sparse operator change: XOR-coded
    w3 = round_mantissa(rng.random(k), 12)     # a controller's rounded change
    w4 = np.array([-0.0, 1e-300, 5e-324, 1.0, 2.0])  # odd bit patterns, another kind and length
    return [Event(10, "weights", "operator", weights=w1), Event(20, "weights", "operator", clip=3, weights=w2),
            Event(30, "weights", "odm", weights=w3), Event(35, "clip", "operator", clip=2),
            Event(40, "sources", "operator", weights=w4), Event(41, "weights", "ado", weights=w3)]


def _write(path: Path, events: list[Event]) -> None:
    with EventLog(path) as log:
        start = len(log)
        for i, e in enumerate(events):
            assert log.append(e) == start + i
        assert len(log) == start + len(events)


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    events = _events()
    _write(path, events)
    got = list(iter_events(path))
    assert len(got) == len(events)
    for a, b in zip(events, got):
        assert a.same_as(b), (a, b)
    assert np.signbit(got[4].weights[0])  # -0.0 survives
    assert [e.step for e in records_upto(path, 3)] == [10, 20, 30]
    assert records_upto(path, 0) == []
    assert scan(path).records == len(events) and scan(path).torn_offset is None
    # reopening appends after the existing records, the XOR chain continues
    with EventLog(path) as log:
        assert len(log) == len(events) and log.torn is None
        log.append(Event(50, "weights", "operator", weights=events[2].weights * 2))
    last = list(iter_events(path))[-1]
    assert np.array_equal(last.weights, events[2].weights * 2)


def test_compact_for_sparse_and_rounded_changes(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    k = 20_000
    rng = np.random.default_rng(0)
    w = round_mantissa(rng.random(k), 12)
    sizes = []
    with EventLog(path) as log:
        for i in range(3):
            before = path.stat().st_size
            w = w.copy()
            w[rng.integers(0, k, 20)] = 0.5 + i
            log.append(Event(i, "weights", "operator", weights=w))
            sizes.append(path.stat().st_size - before)
    assert sizes[0] < 2.5 * k          # rounded weights: well under 8 bytes each
    assert max(sizes[1:]) < 2_000      # 20 changed weights of 20,000: the XOR record is tiny


def test_records_upto_more_than_the_log_holds(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    _write(path, _events()[:2])
    with pytest.raises(StateError, match="references 5 event log records but the log holds 2"):
        records_upto(path, 5)
    with pytest.raises(ConfigError, match="record count"):
        records_upto(path, -1)
    with pytest.raises(StateError, match="does not exist"):
        records_upto(tmp_path / "missing.log", 1)


@pytest.mark.parametrize("cut", [1, 3, 7, 9, 40])
def test_torn_tail_is_reported_and_repaired(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "events.log"
    events = _events()
    _write(path, events[:3])
    whole = path.stat().st_size
    _write(path, events[3:4])  # a fourth record, then tear it as a crash mid-append would
    full = path.read_bytes()
    path.write_bytes(full[:whole + min(cut, len(full) - whole - 1)])
    s = scan(path)
    assert s.records == 3 and s.torn_offset == whole and s.torn_bytes == min(cut, len(full) - whole - 1)
    assert len(list(iter_events(path))) == 3
    with pytest.raises(StateError, match="holds 3 whole records .torn tail"):
        records_upto(path, 4)
    with EventLog(path) as log:  # opening truncates the torn tail and appends after record 3
        assert log.torn is not None and log.torn.torn_offset == whole and len(log) == 3
        log.append(events[3])
    got = list(iter_events(path))
    assert len(got) == 4 and got[3].same_as(events[3])


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    _write(path, _events()[:2])
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))  # the file grew but the record never landed
    s = scan(path)
    assert s.records == 2 and s.torn_offset == size and s.torn_bytes == 4096


def test_torn_header_of_a_new_log(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_bytes(b"CRPEV")
    assert scan(path).records == 0 and scan(path).torn_bytes == 5
    with EventLog(path) as log:
        log.append(_events()[3])
    assert len(list(iter_events(path))) == 1


def _offsets(path: Path) -> list[int]:
    """Start offsets of the records (8-byte file header, 8-byte record header, payload, crc)."""
    data = path.read_bytes()
    out, off = [], 12
    while off < len(data):
        out.append(off)
        off += 8 + int.from_bytes(data[off:off + 4], "little") + 4
    return out


@pytest.mark.parametrize("where, match", [("payload", "payload checksum"), ("length", "corrupt header")])
def test_corruption_in_the_middle_is_refused_by_record_and_offset(tmp_path: Path, where: str, match: str) -> None:
    path = tmp_path / "events.log"
    _write(path, _events())
    offsets = _offsets(path)
    data = bytearray(path.read_bytes())
    target = offsets[2]
    data[target + (30 if where == "payload" else 1)] ^= 0x40
    path.write_bytes(bytes(data))
    for read in (scan, lambda p: list(iter_events(p)), EventLog):
        with pytest.raises(StateError, match=f"record 2 at offset {target} .*{match}"):
            read(path)


def test_bad_magic_and_version(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_bytes(b"NOTALOG!" + bytes(8))
    with pytest.raises(StateError, match="not a croupier event log"):
        scan(path)
    path.write_bytes(b"CRPEVLG1" + (9).to_bytes(4, "little"))
    with pytest.raises(StateError, match="version 9 is not supported"):
        scan(path)


def test_event_validation() -> None:
    with pytest.raises(ConfigError, match="new clip or new weights"):
        Event(1, "weights", "operator")
    with pytest.raises(ConfigError, match="step must be an integer >= 0"):
        Event(-1, "clip", "operator", clip=2)
    with pytest.raises(ConfigError, match="origin must be a non-empty string"):
        Event(1, "clip", "", clip=2)
    with pytest.raises(ConfigError, match="clip must be an integer >= 1"):
        Event(1, "clip", "operator", clip=0)


def test_replay_from_the_log_reproduces_the_sequence(tmp_path: Path) -> None:
    """Changes applied live and recorded; a fresh sampler fed only the log replays every batch."""
    layout = ClusterLayout.from_sizes([50, 30, 200, 7, 90])
    config = PolicyConfig("clusterclip", clip=3)
    live = Sampler(layout, config, 16, seed=4)
    path = tmp_path / "events.log"
    rng = np.random.default_rng(9)
    batches = []
    with EventLog(path) as log:
        for step in range(60):
            if step % 10 == 5:
                w = round_mantissa(rng.random(5) + 0.01, 12)
                e = Event(step + 3, "weights", "odm", clip=4 if step == 25 else None, weights=w)
                log.append(e)
                live.schedule(e.step, clip=e.clip, weights=e.weights)
            batches.append(live.next_batch())
    replay = Sampler(layout, config, 16, seed=4)
    for e in iter_events(path):
        replay.schedule(e.step, clip=e.clip, weights=e.weights)
    for step, want in enumerate(batches):
        assert np.array_equal(replay.next_batch(), want), f"step {step} differs on replay"


def test_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    with EventLog(tmp_path / "events.log") as log:
        n = len(synced)
        log.append(_events()[3])
        assert len(synced) == n + 1


def test_crash_restore_replays_every_delivered_step(tmp_path: Path) -> None:
    """A run that adapts weights, checkpoints at step 40 (sampler, statistics, controller, log
    count) and dies at step 80 mid-append: restoring the checkpoint and scheduling the log's
    records after the count reproduces every step delivered since, and the controller goes on
    from its checkpointed statistics."""
    from croupier.server.feedback.controllers import make_controller
    from croupier.server.feedback.loss_stats import LossStats
    from croupier.server.feedback.loss_validation import check_report, layout_group_of
    from croupier.server.sampling.state import SamplerState

    layout = ClusterLayout.from_sizes([300, 200, 500, 100, 400, 250])
    config = PolicyConfig("clusterclip", clip=3)
    group_of = layout_group_of(layout)
    path = tmp_path / "events.log"
    sampler = Sampler(layout, config, 24, seed=2)
    stats, ctl = LossStats(6), make_controller("odm")
    hard = np.array([1.0, 3.0, 1.0, 1.0, 2.0, 1.0])
    delivered: list[np.ndarray] = []
    weights = np.ones(6)
    with EventLog(path) as log:
        for step in range(80):
            if step == 40:
                checkpoint = (sampler.state().to_bytes(), stats.to_bytes(), ctl.state_bytes(), len(log))
            batch = sampler.next_batch()
            delivered.append(batch)
            stats.add(step, *check_report(batch, hard[group_of(batch)] * (1 + step) ** -0.2, group_of))
            if step % 10 == 9:
                proposal = ctl.propose(stats, weights, step)
                if proposal is not None:
                    log.append(Event(step + 3, "weights", ctl.name, weights=proposal))  # write ahead...
                    sampler.schedule(step + 3, weights=proposal)                        # ...then schedule
                    weights = proposal
        assert len(log) > checkpoint[3] >= 1
    with open(path, "ab") as f:  # the crash: half a record, never scheduled
        f.write(path.read_bytes()[12:40])
    state, stats_bytes, ctl_bytes, count = checkpoint
    restored = Sampler(layout, config, 24, seed=2)
    restored.load_state(SamplerState.from_bytes(state))
    with EventLog(path) as log:
        assert log.torn is not None
        for e in iter_events(path, start=count):
            restored.schedule(e.step, clip=e.clip, weights=e.weights)
    for step in range(40, 80):
        assert np.array_equal(restored.next_batch(), delivered[step]), f"step {step} differs after the crash"
    stats2 = LossStats.from_bytes(stats_bytes)
    ctl2 = make_controller("odm")
    ctl2.load_state_bytes(ctl_bytes)
    assert stats2.total_reports == 40 and ctl2.proposals == ctl.proposals - (len(list(iter_events(path))) - count)
    batch = restored.next_batch()
    stats2.add(80, *check_report(batch, hard[group_of(batch)], group_of))
    assert ctl2.propose(stats2, weights, 80) is not None
    with pytest.raises(StateError, match="references 99 event log records"):
        list(iter_events(path, start=99))
