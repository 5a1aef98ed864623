"""`croupier serve --state-dir s3://...` on a real S3-compatible server on loopback: the job's
state outlives its host, and a lease keeps two servers from writing one job.

- kill -9 the server, delete its local disk, start another one elsewhere on the same bucket:
  it waits out the dead one's lease, takes over and says so, ranks reconnect at the same
  address, and every step (an online change included) is exact;
- a second server started while the first holds the job is refused, naming the holder;
- a clean stop releases the lease (the next server starts at once and resumes where the
  first stopped);
- a refused start writes nothing to the bucket.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.durability import SIZES, B, fetch
from cases.s3 import BUCKET
from cases.serve_process import ServeProcess
from croupier.layout import ClusterLayout
from croupier.proto import pb2
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from workers.harness import free_port, wait_for

TTL = 2.0
CHANGE_STEP, NEW_CLIP = 40, 7
ARGS = ["--cluster-sizes", ",".join(map(str, SIZES)), "--policy", "clusterclip", "--clip", "5",
        "--global-batch", str(B), "--seed", "0", "--checkpoint-every", "10", "--max-lag", "16", "--lookahead", "4",
        "--lease-ttl", str(TTL)]


def reference(n: int) -> list[np.ndarray]:
    """The job's global batches with its online change (clip 5 -> 7 from CHANGE_STEP)."""
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
    s.schedule(CHANGE_STEP, clip=NEW_CLIP)
    return [s.next_batch() for _ in range(n)]


def objects(s3, prefix: str) -> set[str]:
    got = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:] for o in got}


@pytest.fixture
def serve(tmp_path: Path, s3) -> Iterator[Callable[..., ServeProcess]]:
    """serve(url, cache, extra) -> a started server on the bucket; all ended with the test."""
    with ExitStack() as stack:

        def start(url: str, cache: Path, extra: list[str] | None = None) -> ServeProcess:
            server = ServeProcess(ARGS, url, tmp_path / "server.log", ["--state-cache", str(cache), *(extra or [])])
            stack.callback(server.close)
            return server

        yield start


def log_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.mark.slow
def test_killed_server_is_taken_over_elsewhere_and_every_step_is_exact(tmp_path: Path, s3, serve, capsys) -> None:
    prefix = f"jobs/{uuid.uuid4().hex}"
    url = f"s3://{BUCKET}/{prefix}"
    port = free_port()
    ref = reference(90)
    first = serve(url, tmp_path / "host-a", ["--port", str(port)])
    assert first.info["state_dir"] == url
    for r in range(2):
        first.stub.Join(pb2.JoinRequest(rank=r, world_size=2), timeout=20)
    got = fetch(first.stub, 2, 0, 20)
    eff = first.stub.Update(pb2.UpdateRequest(step=CHANGE_STEP, clip=NEW_CLIP), timeout=20).effective_step
    assert eff == CHANGE_STEP
    got += fetch(first.stub, 2, 20, 57)
    wait_for(lambda: first.status().durable_step >= 50, 30, "the checkpoint of step 50")
    stored = objects(s3, prefix)
    assert {"events.log", "events.copy.log", "generated.mark", "server.json", "lease.json",
            "ckpt-000000000050.bin"} <= stored
    assert first.kill() == -signal.SIGKILL
    shutil.rmtree(tmp_path / "host-a")  # the first host's disk is gone

    second = serve(url, tmp_path / "host-b", ["--port", str(port)])
    assert second.info["resumed_from"] == 50
    events = log_events(tmp_path / "server.log")
    took = [e for e in events if e.get("event") == "lease_takeover"]
    assert len(took) == 1 and f"pid {first.proc.pid}" in took[0]["previous"]
    # The ranks reconnect at the same address and resume at their acknowledged step.
    nexts = [second.stub.Join(pb2.JoinRequest(rank=r, world_size=2), timeout=20).next_step for r in range(2)]
    assert nexts[0] == nexts[1] and 50 <= nexts[0] <= 57
    again = fetch(second.stub, 2, 50, 90)
    for t, batch in zip(range(50, 90), again):
        assert np.array_equal(batch, ref[t]), t  # replayed steps 50..56 included
    for t in range(57):
        assert np.array_equal(got[t], ref[t]), t
    assert second.kill(signal.SIGTERM) == 0
    assert "lease.json" not in objects(s3, prefix)  # released on the clean stop
    # `croupier simulate --state-dir s3://...` replays the job from the bucket (changes included)
    from croupier.cli import main

    assert main(["simulate", "--cluster-sizes", ",".join(map(str, SIZES)), "--global-batch", str(B), "--seed", "0",
                 "--state-dir", url, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) >= 90 and all(r["indices"] == ref[r["step"]].tolist() for r in rows[:90])


@pytest.mark.slow
def test_second_server_is_refused_naming_the_holder(tmp_path: Path, s3, serve) -> None:
    url = f"s3://{BUCKET}/jobs/{uuid.uuid4().hex}"
    first = serve(url, tmp_path / "host-a")
    r = subprocess.run([sys.executable, "-m", "croupier", "serve", *ARGS, "--state-dir", url,
                        "--state-cache", str(tmp_path / "host-b")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("croupier serve: error: the job at " + url + " is held by pid " + str(first.proc.pid))
    assert first.info["address"] in last
    assert "Traceback" not in r.stderr
    # The first server is unaffected.
    first.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
    assert fetch(first.stub, 1, 0, 3)[2].size == B


@pytest.mark.slow
def test_clean_stop_releases_the_lease_and_a_refused_start_writes_nothing(tmp_path: Path, s3, serve) -> None:
    prefix = f"jobs/{uuid.uuid4().hex}"
    url = f"s3://{BUCKET}/{prefix}"
    bad = subprocess.run([sys.executable, "-m", "croupier", "serve", *ARGS, "--state-dir", url, "--weights", "1,2",
                          "--policy", "weighted"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert objects(s3, prefix) == set()
    ref = reference(30)
    first = serve(url, tmp_path / "host-a")
    first.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
    got = fetch(first.stub, 1, 0, 25)
    assert first.kill(signal.SIGTERM) == 0
    assert "lease.json" not in objects(s3, prefix)
    second = serve(url, tmp_path / "host-a")  # the same cache folder, refreshed from the bucket
    assert second.info["resumed_from"] == 25
    assert not [e for e in log_events(tmp_path / "server.log") if e.get("event") == "lease_wait"]
    got += fetch(second.stub, 1, 25, 30)
    for t in range(30):
        assert np.array_equal(got[t], ref[t]), t


@pytest.mark.slow
def test_bucket_outage_refuses_changes_and_serving_goes_on(tmp_path: Path, monkeypatch) -> None:
    """The object store goes away while the job serves: an online change is refused
    (UNAVAILABLE, never acknowledged), ranks keep reading, checkpoint health says why; when
    the store is back, writes recover under the same lease and a restart resumes exactly."""
    import boto3
    import grpc
    from moto.server import ThreadedMotoServer

    port = free_port()
    store = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    store.start()
    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "croupier-test",
           "AWS_SECRET_ACCESS_KEY": "croupier-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = "croupier-outage"
    boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/job"
    server = ServeProcess(ARGS[:-2] + ["--lease-ttl", "3"], url, tmp_path / "server.log",
                          ["--state-cache", str(tmp_path / "cache")])
    try:
        server.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
        got = fetch(server.stub, 1, 0, 12)
        store.stop()
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Update(pb2.UpdateRequest(step=CHANGE_STEP, clip=NEW_CLIP), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "online change not applied" in err.value.details() and f"s3://{bucket}/job" in err.value.details()
        got += fetch(server.stub, 1, 12, 30)  # serving goes on
        wait_for(lambda: server.status().checkpoint_error != "", 60, "checkpoint health to report the outage")
        assert f"s3://{bucket}/job" in server.status().checkpoint_error
        store = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        store.start()  # the same in-process store, back
        wait_for(lambda: server.status().checkpoint_error == "", 90, "checkpoint writes to recover")
        assert server.kill(signal.SIGTERM) == 0
        again = ServeProcess(ARGS[:-2] + ["--lease-ttl", "3"], url, tmp_path / "server.log",
                             ["--state-cache", str(tmp_path / "cache")])
        try:
            assert again.info["resumed_from"] == 30
            again.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
            got += fetch(again.stub, 1, 30, 60)
        finally:
            again.close()
        # The refused change never took effect: the job is the one without it.
        plain = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
        for t in range(60):
            assert np.array_equal(got[t], plain.next_batch()), t
    finally:
        server.close()
        store.stop()


@pytest.mark.slow
def test_trainers_read_through_three_takeovers_on_other_hosts_and_every_step_is_exact(tmp_path: Path, s3,
                                                                                       serve) -> None:
    """Four RankClients read as trainers do while the server is killed three times, each time
    a new one started on a fresh local folder (the last host's deleted) takes the job over from
    the bucket: no rank errs, none sees a step twice, every slice equals the sequence."""
    import random
    import threading
    import time

    from croupier.client.rank_client import Backoff, RankClient
    from croupier.topology import Topology

    steps, world = 160, 4
    url = f"s3://{BUCKET}/jobs/{uuid.uuid4().hex}"
    port = free_port()
    ttl = ["--lease-ttl", "1", "--port", str(port)]
    host = 0
    server = serve(url, tmp_path / f"host-{host}", ttl)
    got: list[dict[int, list[int]]] = [{} for _ in range(world)]
    errors: list[BaseException] = []

    def read(rank: int) -> None:
        try:
            with RankClient(f"127.0.0.1:{port}", job="default", topology=Topology(rank, world), stop_step=steps,
                            backoff=Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=120)) as c:
                for step, ids in c:
                    assert step not in got[rank], f"rank {rank} got step {step} twice"
                    got[rank][step] = ids.tolist()
                    time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for k in sorted(random.Random(7).sample(range(30, steps - 40), 3)):
        deadline = time.monotonic() + 120
        while min(len(g) for g in got) < k:
            assert time.monotonic() < deadline and not errors, (errors, [len(g) for g in got])
            time.sleep(0.01)
        assert server.kill() == -signal.SIGKILL
        shutil.rmtree(tmp_path / f"host-{host}")
        host += 1
        server = serve(url, tmp_path / f"host-{host}", ttl)
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len([e for e in log_events(tmp_path / "server.log") if e.get("event") == "lease_takeover"]) == 3
    from cases.durability import reference as unchanged

    ref = unchanged(steps)  # no online change in this job
    p = B // world
    for r in range(world):
        assert sorted(got[r]) == list(range(steps)), r
        for t in range(steps):
            assert got[r][t] == ref[t][r * p:(r + 1) * p].tolist(), (r, t)
