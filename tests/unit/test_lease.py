"""The job's lease and its object-store state on a real S3-compatible server (moto, loopback):
taking, refusing a live holder, taking over an expired one, fencing, release; the state's
pull and sync; an online change the bucket refuses is cut from both local copies."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from cases.s3 import BUCKET
from croupier.server.durability.lease import LEASE_NAME, Lease, LeaseHeld
from croupier.server.durability.object_store import ObjectStoreLocation, Precondition
from croupier.server.durability.remote_state import RemoteState, replica_of


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def location(s3) -> ObjectStoreLocation:
    return ObjectStoreLocation(f"s3://{BUCKET}/leases/{uuid.uuid4().hex}")


def test_conditional_writes(location: ObjectStoreLocation) -> None:
    etag = location.put("x", b"1", if_absent=True)
    with pytest.raises(Precondition):
        location.put("x", b"2", if_absent=True)
    with pytest.raises(Precondition):
        location.put("x", b"2", if_match="0" * 32)
    etag2 = location.put("x", b"2", if_match=etag)
    got = location.get("x")
    assert got is not None and got.data == b"2" and got.etag == etag2
    assert got.age_s is not None and -5 < got.age_s < 5
    assert location.list() == {"x": etag2}
    location.delete("x", if_match=etag2)
    assert location.get("x") is None and location.list() == {}


def test_free_lease_is_taken_and_released(location: ObjectStoreLocation) -> None:
    lease = Lease(location, ttl_s=5)
    assert lease.acquire() is None
    lease.check()
    assert location.get(LEASE_NAME) is not None
    lease.release()
    assert location.get(LEASE_NAME) is None
    other = Lease(location, ttl_s=5)
    assert other.acquire() is None  # at once: nothing to wait out
    other.release()


def test_live_holder_refuses_a_second_server(location: ObjectStoreLocation) -> None:
    holder = Lease(location, ttl_s=3)
    holder.acquire()
    holder.set_address("10.0.0.7:5000")
    holder.start(on_lost=lambda reason: None)
    try:
        with pytest.raises(LeaseHeld) as err:
            Lease(location, ttl_s=3).acquire(poll_s=0.05)
        assert f"is held by pid {holder.info['pid']} on host {holder.info['host']} (serving at 10.0.0.7:5000)" \
            in str(err.value)
        holder.check()
    finally:
        holder.release()


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(location: ObjectStoreLocation) -> None:
    old_clock, new_clock = Clock(), Clock()
    old = Lease(location, ttl_s=2, clock=old_clock)
    old.acquire()
    old.set_address("a:1")
    old_clock.t += 1.4  # two thirds of its TTL without a renewal: it stops writing
    with pytest.raises(OSError) as err:
        old.check()
    assert err.value.errno == errno.ENOLCK and "not renewed" in str(err.value)

    new = Lease(location, ttl_s=2, clock=new_clock)
    waited: list[float] = []

    def tick(seconds: float) -> None:  # the waiting server's clock moves while it polls
        waited.append(seconds)
        new_clock.t += 1.0

    import croupier.server.durability.lease as lease_mod

    real_sleep = lease_mod.time.sleep
    lease_mod.time.sleep = tick  # type: ignore[assignment]
    try:
        previous = new.acquire(poll_s=0.01)
    finally:
        lease_mod.time.sleep = real_sleep  # type: ignore[assignment]
    assert previous is not None and previous["address"] == "a:1" and len(waited) == 4  # TTL 2 + 1 s slack
    new.check()
    # The old server comes back: its renewal finds the lease taken, it is lost for good.
    assert old.renew() is False
    assert "taken over by pid" in old.lost
    with pytest.raises(OSError) as err:
        old.check()
    assert err.value.errno == errno.ENOLCK
    new.release()


def test_state_is_pulled_and_synced_exactly(location: ObjectStoreLocation, tmp_path: Path) -> None:
    lease = Lease(location, ttl_s=5)
    lease.acquire()
    a = tmp_path / "a"
    a.mkdir()
    (a / "ckpt-000000000010.bin").write_bytes(b"ten")
    (a / "events.log").write_bytes(b"log")
    (a / ".lock").write_bytes(b"")
    (a / "remote-sidecars").mkdir()
    (a / "remote-sidecars" / "index.json").write_bytes(b"{}")
    (a / "stale-20261207T000000").mkdir()
    (a / "stale-20261207T000000" / "generated.mark").write_bytes(b"m")
    state = RemoteState(location, a, lease)
    assert state.sync() == (3, 0)
    assert set(location.list()) == {LEASE_NAME, "ckpt-000000000010.bin", "events.log",
                                    "stale-20261207T000000/generated.mark"}
    assert state.sync() == (0, 0)  # unchanged files are not written again
    (a / "ckpt-000000000010.bin").unlink()
    (a / "ckpt-000000000020.bin").write_bytes(b"twenty")
    assert state.sync() == (1, 1)
    b = tmp_path / "b"
    b.mkdir()
    (b / "ckpt-000000000099.bin").write_bytes(b"left from an older run")
    assert RemoteState(location, b, None).pull() == 3
    assert sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) == [
        "ckpt-000000000020.bin", "events.log", "stale-20261207T000000/generated.mark"]
    assert (b / "ckpt-000000000020.bin").read_bytes() == b"twenty"
    lease.release()


def test_refused_remote_append_is_cut_from_both_local_copies(location: ObjectStoreLocation, tmp_path: Path) -> None:
    from croupier.server.durability.event_log import Event
    from croupier.server.durability.log_copies import MirroredLog

    lease = Lease(location, ttl_s=5)
    lease.acquire()
    state = RemoteState(location, tmp_path, lease)
    log = MirroredLog(tmp_path)
    state.activate()
    try:
        assert replica_of(tmp_path) is state
        log.append(Event(step=5, kind="clip", origin="operator", clip=4))
        remote_main = location.get("events.log")
        assert remote_main is not None and remote_main.data == (tmp_path / "events.log").read_bytes()
        before = (tmp_path / "events.log").read_bytes(), (tmp_path / "events.copy.log").read_bytes()
        lease.lost = "the lease was taken over by pid 1 on host h"
        with pytest.raises(OSError) as err:
            log.append(Event(step=9, kind="clip", origin="operator", clip=5))
        assert err.value.errno == errno.ENOLCK
        assert len(log) == 1
        assert ((tmp_path / "events.log").read_bytes(), (tmp_path / "events.copy.log").read_bytes()) == before
        assert location.get("events.log").data == before[0]  # type: ignore[union-attr]
    finally:
        state.deactivate()
        log.close()
    assert replica_of(tmp_path) is None


def test_a_state_url_is_read_from_a_fetched_copy(location: ObjectStoreLocation) -> None:
    from croupier.errors import StateError
    from croupier.server.durability.remote_state import local_copy

    location.put("generated.mark", b"{}")
    location.put(LEASE_NAME, b"{}")
    with local_copy(location.url) as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["generated.mark"]
    assert not folder.exists()
    with pytest.raises(StateError, match="does not exist"):
        with local_copy(location.url + "-missing"):
            pass
