"""`croupier report` against a live `croupier serve` and against its state directory afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cases.report import pngs_ok
from croupier.apps import report
from croupier.cli import main as cli_main
from croupier.client.rank_client import RankClient
from croupier.errors import FingerprintMismatch
from croupier.topology import Topology
from workers.harness import kill_tree

STEPS = 30


BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small real dataset: MDS shards + hashing-embedding k-means sidecar."""
    from croupier.shards.build.builder import BuildConfig, build
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    root = tmp_path_factory.mktemp("report")
    write_jsonl(root / "corpus.jsonl", generate_corpus(200, 6, alpha=1.3, seed=1))
    build(BuildConfig(out=str(root / "ds"), inputs=(str(root / "corpus.jsonl"),), embedder="hashing", clusters=6,
                      progress=False))
    return root / "ds"


@pytest.fixture
def serve() -> Iterator[Callable[[Path, Path, Path], tuple[subprocess.Popen, str]]]:
    """serve(dataset, state, log) -> (process, address) of a started `croupier serve`; every
    server a test starts is ended when the test ends, passed or failed."""
    started: list[subprocess.Popen] = []

    def start(dataset: Path, state: Path, log: Path) -> tuple[subprocess.Popen, str]:
        cmd = [sys.executable, "-m", "croupier", "serve", str(dataset), "--job", "rep", "--policy", "clusterclip",
               "--clip", "2", "--on-exhausted", "random", "--global-batch", str(BATCH), "--state-dir", str(state),
               "--port", "0", "--log-level", "WARNING", "--checkpoint-every", "10"]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                info = json.loads((state / "server.json").read_text())
                if info.get("pid") == proc.pid:
                    return proc, f"127.0.0.1:{info['port']}"
            except (OSError, ValueError):
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            time.sleep(0.1)
        raise TimeoutError("server did not start")

    yield start
    for proc in started:
        kill_tree(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_report_from_live_server_and_state_dir(dataset, tmp_path, capsys, serve):
    state = tmp_path / "state"
    proc, address = serve(dataset, state, tmp_path / "server.log")
    with RankClient(address, job="rep", topology=Topology(0, 1), lookahead=4, stop_step=STEPS) as client:
        got = [ids for _, ids in client]
        token = client.checkpoint(STEPS)
    assert len(got) == STEPS and token

    live = report.from_server(address, watch_s=0.6, interval_s=0.2)
    assert live.policy == "clusterclip" and live.clip == 2
    assert live.draws.sum() == live.step * BATCH
    assert live.history is not None and live.history[-1].sum() == live.step * BATCH
    out = tmp_path / "live"
    paths = report.write_report(live, out)
    pngs_ok(out, ["sizes_vs_draws.png", "passes.png", "draws_over_time.png", "rank_lag.png"])
    assert len(paths) == 4
    html = (out / "index.html").read_text()
    assert all(p.name in html for p in paths)
    assert "replaying" in html
    _stop(proc)
    assert proc.returncode == 0

    # The state directory alone (the server is gone): newest checkpoint + replayed history.
    from_dir = report.from_state_dir(state, dataset=str(dataset))
    assert from_dir.step >= STEPS
    np.testing.assert_array_equal(from_dir.sizes, live.sizes)
    assert from_dir.history is not None
    code = cli_main(["report", "--state-dir", str(state), "--dataset", str(dataset), "--out", str(tmp_path / "cli")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "index.html" in printed and "draws/size" in printed
    pngs_ok(tmp_path / "cli", ["sizes_vs_draws.png", "passes.png", "draws_over_time.png"])

    # The state of one dataset is refused against another; a state dir must name its dataset.
    from croupier.shards.build.builder import BuildConfig, build
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    write_jsonl(tmp_path / "other.jsonl", generate_corpus(60, 3, seed=2))
    build(BuildConfig(out=str(tmp_path / "other"), inputs=(str(tmp_path / "other.jsonl"),), embedder="hashing",
                      clusters=3, progress=False))
    with pytest.raises(FingerprintMismatch):
        report.from_state_dir(state, dataset=str(tmp_path / "other"))
    # The server names its dataset in server.json: the state directory alone is enough.
    assert json.loads((state / "server.json").read_text())["dataset"] == str(dataset.resolve())
    alone = report.from_state_dir(state)
    assert alone.num_clusters == 6 and alone.step == from_dir.step
    np.testing.assert_array_equal(alone.draws, from_dir.draws)
