"""`croupier serve` as a user runs it: a real dataset, a real process, the admin commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from croupier.cli import main
from croupier.format.sidecar import Sidecar
from croupier.grpc_options import bearer, channel_options
from croupier.proto import pb2, pb2_grpc, slice_ids
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.synthetic import generate_corpus, write_jsonl
from workers.harness import terminate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    write_jsonl(root / "in.jsonl", generate_corpus(400, 4, seed=1))
    out = root / "data"
    build(BuildConfig(out=str(out), inputs=(str(root / "in.jsonl"),), embedder="hashing", clusters=4,
                      layout="cluster-major", shard_size=1 << 15, progress=False))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], stderr) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", *args], stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"croupier serve exited {proc.returncode}")
    return proc, json.loads(line)


@pytest.mark.slow
def test_serve_a_dataset_with_a_token_then_stop_on_sigterm(dataset: Path, tmp_path: Path, capsys) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("serve-cli-token-0123456789\n")
    state = tmp_path / "state"
    metrics_port = free_port()
    args = [str(dataset), "--policy", "clusterclip", "--clip", "3", "--global-batch", "16", "--seed", "0",
            "--state-dir", str(state), "--port", "0", "--token-file", str(token_file),
            "--metrics-port", str(metrics_port), "--job", "demo"]
    with open(tmp_path / "server.log", "w") as log:
        proc, info = start(args, log)
    try:
        assert info["event"] == "serving" and info["address"].startswith("127.0.0.1:")
        assert json.loads((state / "server.json").read_text())["address"] == info["address"]
        side = Sidecar.open(dataset)
        assert info["dataset_fingerprint"] == side.fingerprint
        with grpc.insecure_channel(info["address"], options=channel_options()) as channel:
            stub = pb2_grpc.SamplerStub(channel)
            joined = stub.Join(pb2.JoinRequest(job="demo", rank=0, world_size=2), metadata=bearer("serve-cli-token-0123456789"),
                               timeout=10)
            assert joined.job.dataset_remote == str(dataset.resolve())
            assert joined.job.num_clusters == side.num_clusters and joined.per_rank_batch == 8
            ids = slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=2, step=0),
                                          metadata=bearer("serve-cli-token-0123456789"), timeout=10).slice)
            assert len(ids) == 8 and max(ids) < side.num_samples
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert "croupier_steps_generated_total 1.0" in resp.read().decode()

        server = ["--server", info["address"]]
        assert main(["status", *server, "--timeout", "5"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["status", *server, "--token-file", str(token_file)]) == 0
        table = capsys.readouterr().out
        assert "job 'demo'" in table and "clipped at" in table and "total" in table and "rank" in table
        assert main(["status", *server, "--token-file", str(token_file), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert sum(status["clusters"]["draws"]) == 16 and status["ranks"][0]["next_step"] == 0
        assert main(["checkpoint", *server, "--token-file", str(token_file), "--step", "1"]) == 0
        ck = json.loads(capsys.readouterr().out)
        assert ck["step"] == 1 and ck["token"].startswith("croupier-ckpt-v1:1:") and "path" not in ck
        assert (state / "ckpt-000000000001.bin").exists()  # the server keeps its paths to itself
        assert main(["checkpoint", *server, "--token-file", str(token_file), "--step", "-1"]) == 2
        assert "OUT_OF_RANGE" in capsys.readouterr().err
        assert main(["update", *server, "--token-file", str(token_file), "--step", "5", "--clip", "2"]) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err

        # A second server on the same state directory is refused.
        second = subprocess.run([sys.executable, "-m", "croupier", "serve", *args[:-4], "--job", "demo"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"in use by another croupier server (pid {proc.pid} on host {socket.gethostname()})" in second.stderr
    finally:
        _, out = terminate(proc, 30)
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    logged = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    assert {"serving", "join", "refused", "stopping", "checkpoint_written"} <= {e.get("event") for e in logged}


def test_serve_refuses_bad_arguments(tmp_path: Path, capsys) -> None:
    base = ["serve", "--global-batch", "16", "--state-dir", str(tmp_path / "s")]
    for extra, message in (
        (["--clip", "2"], "exactly one of DATASET"),
        (["--cluster-sizes", "5,x", "--clip", "2"], "comma-separated list of integers"),
        (["--cluster-sizes", "5,0", "--clip", "2"], "cluster sizes must be >= 1"),
        (["--cluster-sizes", "5,3", "--clip", "lots"], "--clip must be an integer"),
        (["--cluster-sizes", "5,3", "--policy", "uniform", "--clip", "2"], "takes no clip"),
        (["--cluster-sizes", "5,3", "--clip", "2", "--tls-cert", "c.pem"], "both --tls-cert and --tls-key"),
        ([str(tmp_path / "missing"), "--clip", "2"], "does not exist"),
        ([str(tmp_path / "missing"), "--clip", "2", "--block-size", "4"], "--block-size 4 applies to --cluster-sizes"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_serve_refuses_weak_tokens_and_an_exposed_bind(tmp_path: Path, capsys) -> None:
    base = ["serve", "--cluster-sizes", "5,3", "--global-batch", "4", "--state-dir", str(tmp_path / "s")]
    weak = tmp_path / "weak"
    weak.write_text("hunter2\n")
    strong = tmp_path / "strong"
    strong.write_text("a-token-of-twenty-chars\n")
    assert main([*base, "--token-file", str(weak)]) == 2
    assert f"token in {weak} has 7 characters; a server token needs at least 16" in capsys.readouterr().err
    assert main([*base, "--token-file", str(strong), "--admin-token-file", str(weak)]) == 2
    assert "has 7 characters" in capsys.readouterr().err
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        assert main([*base, "--host", host]) == 2, host
        err = capsys.readouterr().err
        assert f"--host {host} is not a loopback address" in err, err
        assert "missing: --token-file and --tls-cert/--tls-key" in err and "--insecure" in err
    assert main([*base, "--host", "0.0.0.0", "--token-file", str(strong)]) == 2
    assert "missing: --tls-cert/--tls-key" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before touching the state directory


def _listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    hosts = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, p = fields[1].split(":")
            if int(p, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little-endian
                hosts.add(str(ipaddress.ip_address(words)))
    return hosts


@pytest.mark.slow
def test_insecure_bind_warns_and_keeps_metrics_on_loopback(tmp_path: Path) -> None:
    metrics_port = free_port()
    args = ["--cluster-sizes", "5,3", "--policy", "uniform", "--global-batch", "4", "--state-dir", str(tmp_path / "s"),
            "--host", "0.0.0.0",
            "--insecure", "--metrics-port", str(metrics_port)]
    with open(tmp_path / "server.log", "w") as log:
        proc, info = start(args, log)
    try:
        assert _listening_hosts(info["port"]) & {"0.0.0.0", "::"}  # every interface
        assert _listening_hosts(metrics_port) == {"127.0.0.1"}
        assert info["metrics_host"] == "127.0.0.1"
    finally:
        terminate(proc, 30)
    logged = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    warning = [e for e in logged if e.get("event") == "no_token"]
    assert len(warning) == 1 and warning[0]["level"] == "WARNING"
    assert "Update" in warning[0]["msg"] and "--token-file" in warning[0]["msg"]
