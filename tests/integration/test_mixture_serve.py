"""Mixtures through a real `croupier serve --mix`: two datasets read from their own remotes,
elastic resume, an online source change, and kill -9 replay."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.shards_build import read_back
from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.client.rank_client import Backoff, RankClient
from croupier.mixture import load_mix
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.state import Change
from croupier.topology import Topology
from workers.harness import kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
B = 8


class Serve:
    """A `croupier serve --mix` subprocess on loopback. `stop(sig)` signals it and returns the
    exit code; `close()` (idempotent) kills it if it still runs and closes its pipe and log.
    Tests start it through the `serve` fixture, which closes it when the test ends."""

    def __init__(self, mix: Path, state: Path, extra: list[str] | None = None) -> None:
        log_path = state.parent / f"{state.name}.log"
        self.log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "croupier", "serve", "--mix", str(mix), "--job", "mx", "--global-batch",
               str(B), "--seed", "2", "--state-dir", str(state), "--lookahead", "4", "--max-lag", "32",
               "--checkpoint-every", "5", "--log-level", "WARNING", *(extra or [])]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        except BaseException:
            self.log.close()
            raise
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(10)
                raise RuntimeError(f"serve exited {self.proc.returncode}: {log_path.read_text()}")
            self.info = json.loads(line)
            self.address = self.info["address"]
        except BaseException:
            self.close()
            raise

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self.close()

    def close(self) -> None:
        kill_tree(self.proc)  # a no-op once it has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Servers and agents a test starts, ended when it ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def serve(closing: ExitStack) -> Callable[..., Serve]:
    """serve(mix, state, extra=None) -> a started `Serve`, ended when the test ends."""

    def start(mix: Path, state: Path, extra: list[str] | None = None) -> Serve:
        server = Serve(mix, state, extra)
        closing.callback(server.close)
        return server

    return start


def rank(address: str, r: int, world: int, **kw) -> RankClient:
    return RankClient(address, job="mx", topology=Topology(r, world),
                      backoff=Backoff(initial_s=0.02, max_s=0.3, give_up_after_s=60), **kw)


def test_a_rank_reads_two_sources_from_their_own_remotes(tmp_path: Path, build_dataset, serve,
                                                        closing: ExitStack) -> None:
    web = build_dataset(tmp_path / "web", num_docs=160, topics=4)
    books = build_dataset(tmp_path / "books", num_docs=90, topics=3)
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\ndataset = "{web}"\nweight = 2\npolicy = "clusterclip"\nclip = 3\n\n'
                   f'[sources.books]\ndataset = "{books}"\nweight = 1\npolicy = "uniform"\n')
    server = serve(mix, tmp_path / "state")
    samples = list(CroupierIterableDataset(server.address, "mx", cache_dir=tmp_path / "cache", steps=6,
                                           topology=Topology(0, 1), agent=""))
    assert server.stop() == 0
    # The same job served afresh and read through a node agent: the same samples, one node cache per source.
    server = serve(mix, tmp_path / "state2")
    runtime = tmp_path / "run"
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "croupier", "agent", "--server", server.address,
                                  "--runtime-dir", str(runtime), "--cache-dir", str(tmp_path / "node-cache")],
                                 stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    closing.callback(kill_tree, agent)
    deadline = time.monotonic() + 60
    while not (runtime / "agent.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    via_agent = list(CroupierIterableDataset(server.address, "mx", steps=6, topology=Topology(0, 1),
                                             agent=str(runtime)))
    assert [s[ID_KEY] for s in via_agent] == [s[ID_KEY] for s in samples]
    assert all(a["text"] == b["text"] for a, b in zip(via_agent, samples))
    assert len(list((tmp_path / "node-cache").glob("mds-*"))) == 2
    agent.send_signal(signal.SIGTERM)  # the agent stops before its server
    agent.wait(60)
    assert server.stop() == 0
    mixture = load_mix(mix)
    ref = mixture_sampler(mixture, B, 2)
    want = np.concatenate([ref.next_batch() for _ in range(6)])
    got = np.array([s[ID_KEY] for s in samples])
    assert np.array_equal(got, want) and [s[STEP_KEY] for s in samples] == [t for t in range(6) for _ in range(B)]
    # Each source's samples read back independently, through mosaicml-streaming's shard readers.
    readers = {name: read_back(path, tmp_path / f"read-back-{name}") for name, path in (("web", web), ("books", books))}
    used = set()
    for s in samples:
        src = 0 if s[ID_KEY] < mixture.infos[1].offset else 1
        info = mixture.infos[src]
        expect = readers[info.name][int(s[ID_KEY]) - info.offset]
        for key, value in expect.items():
            assert s[key] == value, (info.name, s[ID_KEY], key)
        used.add(info.name)
    assert used == {"web", "books"}
    assert len(list((tmp_path / "cache").glob("mds-*"))) == 2  # one cache folder per source


def test_elastic_resume_online_change_and_kill9_replay(tmp_path: Path, serve) -> None:
    mix = tmp_path / "mix.toml"
    mix.write_text('[sources.a]\ncluster_sizes = [40, 30, 20]\nweight = 3\npolicy = "clusterclip"\nclip = 4\n\n'
                   '[sources.b]\ncluster_sizes = [100]\nweight = 1\npolicy = "random"\n\n'
                   '[sources.c]\ncluster_sizes = [8, 8, 8, 8]\nweight = 1\npolicy = "uniform"\n')
    state = tmp_path / "state"
    server = serve(mix, state)
    ref = mixture_sampler(load_mix(mix), B, 2)
    change = subprocess.run([sys.executable, "-m", "croupier", "update", "--server", server.address, "--step", "6",
                             "--source", "c", "--weight", "0"], capture_output=True, text=True)
    assert change.returncode == 0, change.stderr
    ref.schedule_change(Change(step=6, source=2, source_weight=0.0))
    want = [ref.next_batch() for _ in range(30)]
    bad = subprocess.run([sys.executable, "-m", "croupier", "update", "--server", server.address, "--step", "40",
                          "--source", "zz", "--weight", "1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown source 'zz'" in bad.stderr

    def read(address: str, world: int, start: int, stop: int, token: str = "") -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        for r in range(world):
            c = rank(address, r, world, start_step=start, stop_step=stop, resume_token=token or None)
            parts.append([ids for _, ids in c])
            c.close()
        return [np.concatenate([p[t] for p in parts]) for t in range(stop - start)]

    got = read(server.address, 2, 0, 12)
    for t in range(12):
        assert np.array_equal(got[t], want[t]), t
    c = rank(server.address, 0, 2)
    c.join()
    token = c.checkpoint(step=9)
    c.close()
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    again = serve(mix, state)
    status = json.loads(subprocess.run([sys.executable, "-m", "croupier", "status", "--server", again.address,
                                        "--json"], capture_output=True, text=True, check=True).stdout)
    names = [s["name"] for s in status["sources"]]
    assert names == ["a", "b", "c"]
    # Elastic: the trainer restarts from its step-9 token with 4 ranks.
    got = read(again.address, 4, 9, 20, token)
    for t, batch in zip(range(9, 20), got):
        assert np.array_equal(batch, want[t]), t
    assert not any((batch >= 190).any() for batch in want[6:20])  # source c (ids 190..221) paused
    assert again.stop() == 0
    # The report replays the mixture (file named by server.json) with its online change.
    rep = subprocess.run([sys.executable, "-m", "croupier", "report", "--state-dir", str(state), "--out",
                          str(tmp_path / "rep")], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    assert "its final counters equal the server's" in rep.stdout
    assert (tmp_path / "rep" / "sources_over_time.png").stat().st_size > 0
    table = (tmp_path / "rep" / "sources.txt").read_text().splitlines()
    assert [line.split()[0] for line in table[1:]] == ["a", "b", "c"] and table[3].split()[1] == "0"


def test_sources_share_one_pool_of_prefetch_threads(tmp_path: Path, build_dataset) -> None:
    """Threads do not grow with the sources a rank reads: the stores share the pool's."""
    import threading

    from croupier.client.readers.mix_cache import MixStore
    from croupier.client.readers.shard_cache import PrefetchPool, ShardStore
    from croupier.mixture import open_mix, parse_mix

    paths = [build_dataset(tmp_path / f"d{i}", num_docs=60, topics=2) for i in range(5)]
    mix = open_mix(parse_mix("".join(f'[sources.d{i}]\ndataset = "{p}"\nweight = 1\npolicy = "uniform"\n'
                                     for i, p in enumerate(paths))))
    pool = PrefetchPool(2)
    store = MixStore(list(mix.infos), lambda i, src, limit: ShardStore(src.remote, tmp_path / "cache",
                                                                       fingerprint=src.fingerprint,
                                                                       prefetch_pool=pool), on_close=pool.close)
    sampler = mixture_sampler(mix, 20, 0)
    before = threading.active_count()
    batches = [sampler.next_batch() for _ in range(6)]
    for b in batches:
        store.prefetch(b)
    for b in batches:
        samples = store.get(b)
        assert len(samples) == len(b)
        store.release(b)
    assert store.stats()["sources_open"] == 5
    assert threading.active_count() - before <= 2
    assert sum(th.name.startswith("croupier-prefetch-pool") for th in threading.enumerate()) == 2
    store.close()
    assert not any(th.name.startswith("croupier-prefetch-pool") for th in threading.enumerate())
