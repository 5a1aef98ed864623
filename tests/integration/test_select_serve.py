"""A selection served by `croupier serve` survives a restart, and the job resumes inside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cases.select import selection_sampler
from croupier.cli import main
from croupier.format.sidecar import Sidecar
from croupier.proto import slice_ids
from croupier.server.sampling.policy import PolicyConfig
from workers.harness import terminate


# -- through `croupier serve` --------------------------------------------------------------------------
@pytest.mark.slow
def test_selection_survives_serve_restart_and_resume(ds: Path, tmp_path: Path):
    from croupier.grpc_options import channel_options
    from croupier.proto import pb2, pb2_grpc

    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.5", "--name", "half"]) == 0
    chosen = set(np.asarray(Sidecar.open(ds).selection("half")).tolist())
    ref = selection_sampler(ds, "half", PolicyConfig("uniform"), batch=8)
    expected = [ref.next_batch() for _ in range(30)]
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "croupier", "serve", str(ds), "--selection", "half", "--policy", "uniform",
           "--global-batch", "8", "--seed", "0", "--state-dir", str(state), "--checkpoint-every", "5"]

    def start():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = proc.stdout.readline()
        assert line, "server exited before serving"
        info = json.loads(line)
        ch = grpc.insecure_channel(info["address"], options=channel_options())
        return proc, ch, pb2_grpc.SamplerStub(ch)

    def fetch(stub, a, b):
        out = []
        for t in range(a, b):
            out.append(slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=1, step=t),
                                               timeout=20).slice))
            stub.Ack(pb2.AckRequest(rank=0, world_size=1, next_step=t + 1), timeout=20)
        return out

    def stop(proc, ch):
        ch.close()
        assert terminate(proc, 20)[0] == 0

    proc, ch, stub = start()
    try:
        stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
        got = fetch(stub, 0, 20)
        token = stub.Checkpoint(pb2.CheckpointRequest(step=12), timeout=20).token
    finally:
        stop(proc, ch)
    proc, ch, stub = start()
    try:
        assert stub.Join(pb2.JoinRequest(rank=0, world_size=1, resume_token=token), timeout=20).next_step == 12
        replay = fetch(stub, 12, 30)
    finally:
        stop(proc, ch)
    for t, b in enumerate(got):
        assert np.array_equal(b, expected[t]), t
    for t, b in zip(range(12, 30), replay):
        assert np.array_equal(b, expected[t]), t
        assert set(b.tolist()) <= chosen
