"""The client library against a real in-process sampler server and real MDS shards.

Every test compares what the client delivers with an in-process `Sampler` run of the same
layout, policy, batch and seed: the one global sequence.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from croupier.cli import main as cli_main
from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.client.errors import (
    ClientError,
    InvalidRequest,
    Mismatch,
    NotFound,
    OutOfRange,
    Unauthenticated,
    Unavailable,
)
from croupier.client.rank_client import Backoff, RankClient
from croupier.errors import ConfigError, DatasetError, EndOfData, FingerprintMismatch, StateError
from croupier.format.fingerprint import index_fingerprint
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.resume_token import CheckpointToken
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.serving.service import create_server
from croupier.topology import Topology
from roundtrip import assert_resume_exact
from workers.harness import cluster_sizes, free_port, sample_text, self_signed, write_mds

N = 200
SIZES = cluster_sizes(N, 8)
B = 8
SEED = 3
CONFIG = PolicyConfig(policy="clusterclip", clip=3)
JOB = "t"

pytestmark = pytest.mark.timeout(120)


def reference(steps: int, sizes=SIZES, config=CONFIG, batch=B) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(sizes), config, batch, seed=SEED)
    return [s.next_batch() for _ in range(steps)]


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    return write_mds(tmp_path_factory.mktemp("mds") / "ds", N)


class Servers:
    """Starts in-process servers for a test and stops them all at the end."""

    def __init__(self, tmp: Path, remote: Path) -> None:
        self.tmp = tmp
        self.remote = remote
        self.running: list = []

    def start(self, *, state: str = "state", token: str | None = None, port: int = 0, sizes=SIZES,
              config=CONFIG, lookahead: int = 16, remote: Path | None = None, tls: tuple[Path, Path] | None = None):
        remote = remote or self.remote
        fp = index_fingerprint((remote / "index.json").read_bytes())
        spec = JobSpec(name=JOB, dataset_remote=str(remote), dataset_fingerprint=fp, max_lookahead=lookahead)
        job = Job(ClusterLayout.from_sizes(sizes), config, B, SEED, spec=spec,
                  store=CheckpointStore(self.tmp / state))
        cert, key = tls if tls else (None, None)
        server, bound = create_server(job, f"127.0.0.1:{port}", token=token, max_workers=16, tls_cert=cert,
                                      tls_key=key)
        self.running.append(server)
        return server, f"127.0.0.1:{bound}"

    def stop_all(self) -> None:
        for s in self.running:
            s.stop(0)


@pytest.fixture
def servers(tmp_path, mds):
    s = Servers(tmp_path, mds)
    yield s
    s.stop_all()


def client(address: str, rank: int = 0, world: int = 1, **kw) -> RankClient:
    kw.setdefault("backoff", Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30))
    return RankClient(address, job=JOB, topology=Topology(rank, world), **kw)


def test_ranks_receive_their_slices_of_the_global_sequence(servers):
    _, addr = servers.start()
    ref = reference(12)
    got: dict[int, list] = {}

    def run(rank: int) -> None:
        with client(addr, rank, 2, stop_step=12, lookahead=3) as c:
            got[rank] = list(c)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for s, _ in got[0]] == list(range(12)) == [s for s, _ in got[1]]
    for step in range(12):
        union = np.concatenate([got[0][step][1], got[1][step][1]])
        np.testing.assert_array_equal(union, ref[step])


def test_state_dict_round_trip_resumes_exactly(servers):
    _, addr = servers.start()
    ref = reference(10)
    with client(addr, lookahead=2) as c:
        head = [c.next_slice() for _ in range(4)]
        state = c.state_dict()
    assert state["next_step"] == 4 and state["token"].startswith("croupier-ckpt-v1:4:")
    assert [s for s, _ in head] == [0, 1, 2, 3]
    with client(addr, stop_step=10) as c:
        c.load_state_dict(state)
        tail = list(c)
    assert [s for s, _ in tail] == list(range(4, 10))
    for step, ids in head + tail:
        np.testing.assert_array_equal(ids, ref[step])
    with client(addr) as c:  # a re-request of a step returns the same slice
        np.testing.assert_array_equal(c.get_slice(2), ref[2])


def test_rank_client_passes_the_shared_resume_check(servers):
    _, addr = servers.start()
    opened: list[RankClient] = []

    def make() -> RankClient:
        opened.append(client(addr, lookahead=3))
        return opened[-1]

    def advance(c: RankClient) -> np.ndarray:
        step, ids = c.next_slice()
        return np.concatenate([[step], ids])

    try:
        tail = assert_resume_exact(make, advance, lambda c: c.state_dict(), lambda c, s: c.load_state_dict(s),
                                   k=5, tail=6)
    finally:
        for c in opened:
            c.close()
    ref = reference(11)
    for row in tail:
        np.testing.assert_array_equal(row[1:], ref[row[0]])
    assert [int(row[0]) for row in tail] == list(range(5, 11))


def test_load_state_dict_refuses_another_sampler(servers):
    _, addr = servers.start()
    with client(addr) as c:
        state = c.state_dict(checkpoint=False)
    other = dict(state, sampler_fingerprint="smp:000000000000000000000000")
    with client(addr) as c:
        c.load_state_dict(dict(other, token=""))
        with pytest.raises(FingerprintMismatch, match="smp:000000000000000000000000"):
            c.next_slice()
    with client(addr) as c:
        c.join()
        with pytest.raises(FingerprintMismatch):
            c.load_state_dict(dict(other, token=""))
        with pytest.raises(StateError, match="version"):
            c.load_state_dict(dict(state, version=99))
        with pytest.raises(StateError, match="lacks"):
            c.load_state_dict({"next_step": 3})


def test_reconnects_after_server_restart_and_keeps_the_sequence(servers):
    port = free_port()
    server, addr = servers.start(port=port, lookahead=2)
    ref = reference(12)
    with client(addr, stop_step=12, lookahead=2) as c:
        got = [c.next_slice() for _ in range(4)]
        server.stop(0)  # the stream breaks; buffered steps are still delivered
        restarted = threading.Timer(0.5, lambda: servers.start(port=port, lookahead=2))
        restarted.start()
        got += list(c)
        restarted.join()
    assert [s for s, _ in got] == list(range(12))
    for step, ids in got:
        np.testing.assert_array_equal(ids, ref[step])


def test_errors_are_typed_and_carry_the_server_message(servers):
    _, addr = servers.start(token="s3cret")
    with client(addr, token="") as c, pytest.raises(Unauthenticated) as info:
        c.join()
    assert info.value.details and "token" in info.value.details.lower()
    with client(addr, token="wrong") as c, pytest.raises(Unauthenticated):
        c.next_slice()
    with RankClient(addr, job="nope", topology=Topology(0, 1), token="s3cret") as c, \
            pytest.raises(NotFound, match="nope"):
        c.join()
    with client(addr, token="s3cret") as c:
        c.join()
        with pytest.raises(OutOfRange, match="too far ahead"):
            c.checkpoint(step=10_000)
    with client(addr, rank=0, world=3, token="s3cret") as c, pytest.raises(InvalidRequest, match="world size 3"):
        c.join()
    with client(addr, token="s3cret", resume_token="garbage") as c, pytest.raises(InvalidRequest, match="garbage"):
        c.join()
    foreign = CheckpointToken("smp:0123456789abcdef01234567", 2).encode()
    with client(addr, token="s3cret", resume_token=foreign) as c, \
            pytest.raises(Mismatch, match="smp:0123456789abcdef01234567"):
        c.join()
    dead = f"127.0.0.1:{free_port()}"
    with client(dead, backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_after_s=0.3)) as c, \
            pytest.raises(Unavailable):
        c.join()
    assert issubclass(Unavailable, ClientError)


def test_end_of_data_ends_the_iteration(servers):
    sizes, config = [6, 4, 3, 3], PolicyConfig(policy="clusterclip", clip=1)
    _, addr = servers.start(sizes=sizes, config=config)
    with client(addr) as c:
        got = list(c)
        with pytest.raises(EndOfData):
            c.next_slice()
    ref = []
    s = Sampler(ClusterLayout.from_sizes(sizes), config, B, seed=SEED)
    with pytest.raises(EndOfData):
        while True:
            ref.append(s.next_batch())
    # clip 1: each of the 16 samples is dealt once, 8 a step
    assert len(ref) == 2 and [step for step, _ in got] == [0, 1]
    for (_, ids), want in zip(got, ref):
        np.testing.assert_array_equal(ids, want)


def check_batches(batches: list[dict], ref: list[np.ndarray], steps: range) -> None:
    """Exactly one DataLoader batch per step of `steps`, in step order; decoded columns match the
    shards."""
    assert [batch[STEP_KEY].tolist() for batch in batches] == [[t] * B for t in steps]
    for t, batch in zip(steps, batches):
        ids = batch[ID_KEY].numpy()
        np.testing.assert_array_equal(ids, ref[t])
        np.testing.assert_array_equal(batch["id"].numpy(), ids)
        assert list(batch["text"]) == [sample_text(int(i)) for i in ids]


def test_dataset_yields_decoded_samples_in_server_order(servers, tmp_path):
    _, addr = servers.start()
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=6, topology=Topology(0, 1))
    check_batches(list(DataLoader(ds, batch_size=B)), reference(6), range(6))


def test_dataloader_with_two_workers_gives_the_server_order(servers, tmp_path):
    _, addr = servers.start()
    ref = reference(16)
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=9, topology=Topology(0, 1),
                                 lookahead=4, cache_limit=4096)
    batches = list(DataLoader(ds, batch_size=B, num_workers=2))
    check_batches(batches, ref, range(9))
    # The trainer's main process checkpoints at the step it trained last; workers resume there.
    state = ds.state_dict(next_step=int(batches[-1][STEP_KEY][0]) + 1, checkpoint=True)
    ds.close()
    assert state["next_step"] == 9 and state["token"].startswith("croupier-ckpt-v1:9:")
    resumed = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=7, topology=Topology(0, 1),
                                      lookahead=4)
    resumed.load_state_dict(state)
    check_batches(list(DataLoader(resumed, batch_size=B, num_workers=3)), ref, range(9, 16))


def test_dataset_state_dict_resumes_exactly(servers, tmp_path):
    _, addr = servers.start()
    ref = reference(6)
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=3, topology=Topology(0, 1))
    check_batches(list(DataLoader(ds, batch_size=B)), ref, range(3))
    assert ds.state_dict()["token"] == ""  # local by default: no server call
    state = ds.state_dict(checkpoint=True)
    ds.close()
    # the saved dataset's next iteration: its 3 steps from step 3
    assert (state["next_step"], state["stop_step"]) == (3, 6) and state["token"]
    resumed = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=3, topology=Topology(0, 1))
    resumed.load_state_dict(state)
    check_batches(list(DataLoader(resumed, batch_size=B)), ref, range(3, 6))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_shard_is_a_dataset_error_naming_the_shard(servers, tmp_path, damage):
    broken = write_mds(tmp_path / "broken", N, hashes=["sha1"])
    victim = sorted(broken.glob("shard.*.mds"))[1]
    if damage == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[-5:] = b"XXXXX"
        victim.write_bytes(bytes(data))
    _, addr = servers.start(remote=broken, sizes=[N], config=PolicyConfig(policy="random"))
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=N // B, topology=Topology(0, 1))
    with pytest.raises(DatasetError, match=victim.name):
        list(DataLoader(ds, batch_size=B))


def test_rewritten_dataset_is_refused_not_mixed(servers, tmp_path, mds):
    remote = tmp_path / "remote"
    shutil.copytree(mds, remote)
    _, addr = servers.start(remote=remote)
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=2, topology=Topology(0, 1))
    check_batches(list(DataLoader(ds, batch_size=B)), reference(2), range(2))
    shutil.rmtree(remote)
    write_mds(remote, N, size_limit=1 << 10)  # same samples, other shards: another fingerprint
    with pytest.raises(FingerprintMismatch, match="dataset"):
        list(DataLoader(ds, batch_size=B))


def test_dump_prints_the_rank_slices_and_reads_them(servers, tmp_path, capsys):
    _, addr = servers.start()
    ref = reference(3)
    rc = cli_main(["client", "dump", "--server", addr, "--rank", "1", "--world", "2", "--steps", "3",
                   "--read", "--cache-dir", str(tmp_path / "cache"), "--max-ids", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines == [f"step {t}\t" + " ".join(str(i) for i in ref[t][B // 2:]) for t in range(3)]
    assert "samples/s" in out and "read 12 samples" in out


def test_tls_with_the_server_certificate(servers, tmp_path):
    cert, key = self_signed(tmp_path)
    _, addr = servers.start(tls=(cert, key), token="tls-token")
    addr = addr.replace("127.0.0.1", "localhost")
    with client(addr, tls_root_cert=cert, token="tls-token", stop_step=3) as c:
        got = list(c)
    assert [s for s, _ in got] == [0, 1, 2]
    for (_, ids), want in zip(got, reference(3)):
        np.testing.assert_array_equal(ids, want)
    with client(addr, token="tls-token", rpc_timeout_s=2,
                backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_after_s=0.5)) as c, \
            pytest.raises(Unavailable):
        c.join()  # a plaintext client cannot talk to a TLS server


def test_one_channel_opener_checks_the_server_name_for_sync_and_asyncio_channels(servers, tmp_path):
    """`ChannelConfig` opens RankClient's channel and the node agent's grpc.aio one with the same
    TLS, server name and token: reached at a name the certificate does not hold, both connect
    when told the certificate's name."""
    import asyncio

    from croupier.client.channel import ChannelConfig
    from croupier.proto import SERVICE_NAME, pb2

    cert, key = self_signed(tmp_path, "croupier.test")  # names croupier.test and 127.0.0.1
    _, addr = servers.start(tls=(cert, key), token="tls-token")
    local = addr.replace("127.0.0.1", "localhost")
    with client(local, tls_root_cert=cert, tls_server_name="croupier.test", token="tls-token", stop_step=3) as c:
        assert [step for step, _ in c] == [0, 1, 2]
    with client(local, tls_root_cert=cert, token="tls-token", rpc_timeout_s=2,
                backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_after_s=0.5)) as c, \
            pytest.raises(Unavailable):
        c.join()  # the name is checked

    async def version(config: ChannelConfig) -> pb2.GetVersionResponse:
        channel = config.open_aio()
        try:
            call = channel.unary_unary(f"/{SERVICE_NAME}/GetVersion",
                                       request_serializer=pb2.GetVersionRequest.SerializeToString,
                                       response_deserializer=pb2.GetVersionResponse.FromString)
            return await call(pb2.GetVersionRequest(), metadata=config.metadata(), timeout=10)
        finally:
            await channel.close()

    got = asyncio.run(version(ChannelConfig(local, cert, "croupier.test", "tls-token")))
    assert got.api_version == "croupier.v1"
    with pytest.raises(ConfigError, match="needs a TLS root certificate"):
        ChannelConfig(local, None, "croupier.test")


# -- torchdata's StatefulDataLoader ------------------------------------------------------------

def _rows(batches: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(b[STEP_KEY].tolist(), b[ID_KEY].tolist()) for b in batches]


def _stateful(addr: str, tmp_path: Path, workers: int, batch: int = B, steps: int = 10):
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=steps, topology=Topology(0, 1),
                                 lookahead=4, start_step=0)
    return StatefulDataLoader(ds, batch_size=batch, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_restores_exactly_at_any_point(servers, tmp_path, workers):
    """A loader restored from StatefulDataLoader.state_dict() yields exactly what the saved one would
    have yielded next: saved before the first batch and at several points mid-run."""
    _, addr = servers.start()
    batches = list(_stateful(addr, tmp_path, workers))
    check_batches(batches, reference(10), range(10))
    whole = _rows(batches)
    for k in (0, 3, 6):
        loader = _stateful(addr, tmp_path, workers)
        it = iter(loader)
        head = [next(it) for _ in range(k)]
        state = loader.state_dict()
        del it
        restored = _stateful(addr, tmp_path, workers)
        restored.load_state_dict(state)
        assert _rows(head) + _rows(list(restored)) == whole, f"saved after {k} batches"


def test_stateful_dataloader_state_survives_a_server_restart(servers, tmp_path):
    port = free_port()
    server, addr = servers.start(port=port)
    loader = _stateful(addr, tmp_path, 2)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()
    del it
    server.stop(0)
    servers.start(port=port)  # same port and state dir
    restored = _stateful(addr, tmp_path, 2)
    restored.load_state_dict(state)
    tail = list(restored)
    check_batches(head + tail, reference(10), range(10))


def test_stateful_dataloader_resumes_inside_a_step(servers, tmp_path):
    """Batches smaller than a step's slice: the state records the samples of the step already
    yielded, so a restore continues mid-step."""
    _, addr = servers.start()
    whole = _rows(list(_stateful(addr, tmp_path, 0, batch=B // 2, steps=4)))
    loader = _stateful(addr, tmp_path, 0, batch=B // 2, steps=4)
    it = iter(loader)
    head = [next(it) for _ in range(3)]  # one and a half steps
    state = loader.state_dict()
    restored = _stateful(addr, tmp_path, 0, batch=B // 2, steps=4)
    restored.load_state_dict(state)
    assert _rows(head) + _rows(list(restored)) == whole
    ref = reference(4)
    assert whole == [([t] * (B // 2), ref[t][h * B // 2:(h + 1) * B // 2].tolist()) for t in range(4) for h in range(2)]


def test_dataset_state_is_local_before_the_first_item(tmp_path):
    """state_dict() makes no server call: it works with no server at all, before any item."""
    ds = CroupierIterableDataset("127.0.0.1:1", JOB, cache_dir=tmp_path, start_step=5, topology=Topology(0, 1))
    state = ds.state_dict()
    assert (state["next_step"], state["skip"], state["token"]) == (5, 0, "")
    fresh = CroupierIterableDataset("127.0.0.1:1", JOB, cache_dir=tmp_path, topology=Topology(0, 1))
    assert fresh.state_dict()["next_step"] is None  # the server's position, resolved on join
    fresh.load_state_dict(state)
    assert fresh.state_dict()["next_step"] == 5


def test_dataset_state_refusals_name_the_rule(servers, tmp_path):
    _, addr = servers.start()
    ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=4, topology=Topology(0, 1))
    list(DataLoader(ds, batch_size=B, num_workers=2))
    with pytest.raises(ConfigError, match="pass next_step"):
        ds.state_dict()  # the workers' progress is invisible to the main process
    lane = {"version": 2, "sampler_fingerprint": "", "next_step": 3, "skip": 0, "stride": 2, "stop_step": 9,
            "token": ""}
    other = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=4, topology=Topology(0, 1))
    other.load_state_dict(lane)
    with pytest.raises(ConfigError, match="same num_workers"):
        list(DataLoader(other, batch_size=B))
    for bad, rule in ((dict(lane, skip=-1), "skip"), (dict(lane, stride=0), "stride"),
                      (dict(lane, version=7), "version"), ({"next_step": 1}, "lacks"),
                      (dict(lane, next_step=None), "without next_step")):
        with pytest.raises(StateError, match=rule):
            other.load_state_dict(bad)
    with pytest.raises(ConfigError, match="next_step must be"):
        other.state_dict(next_step=-2)


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_sequences_resume_token_for_token_through_stateful_dataloader(servers, tmp_path, tiny_tokenizer,
                                                                            workers):
    """Every rank item is R x L; the tokens of a run saved and restored mid-way equal an
    uninterrupted run's, carry included."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from croupier.client.packing import PackedSequences
    from croupier.tokenizer import load_tokenizer

    _, addr = servers.start()
    eos = load_tokenizer(str(tiny_tokenizer)).sep_token_id

    def loader() -> StatefulDataLoader:
        ds = CroupierIterableDataset(addr, JOB, cache_dir=tmp_path / "cache", steps=8, topology=Topology(0, 1),
                                     lookahead=4, start_step=0)
        packed = PackedSequences(ds, tokenizer=str(tiny_tokenizer), eos_id=eos, seq_len=16, rows=2)
        return StatefulDataLoader(packed, batch_size=None, num_workers=workers)

    def tokens(items) -> list[tuple[int, list[int]]]:
        return [(int(i[STEP_KEY]), i["input_ids"].flatten().tolist()) for i in items]

    whole = list(loader())
    assert [int(i[STEP_KEY]) for i in whole] == list(range(8))
    assert all(tuple(i["input_ids"].shape) == (2, 16) for i in whole)
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    restored = loader()
    restored.load_state_dict(state)
    assert tokens(head) + tokens(list(restored)) == tokens(whole)


def test_the_ranks_of_one_data_parallel_group_read_the_same_slice(servers):
    """Tensor-parallel peers are several consumers of one data-parallel rank's slice.

    A rank without a start step starts where the server says its data-parallel rank is, and a
    peer's acknowledgements move that position: peers agree on the start by joining before
    any of them reads (a trainer's peers start together, or resume from one saved state)."""
    _, addr = servers.start()
    ref = reference(8)
    got: dict[int, list] = {}
    starts: dict[int, int] = {}
    errors: list[BaseException] = []
    joined = threading.Barrier(4, timeout=60)

    def run(g: int) -> None:
        topo = Topology.data_parallel({"RANK": str(g), "WORLD_SIZE": "4"}, tensor=2)
        try:
            with RankClient(addr, job=JOB, topology=topo, stop_step=8, lookahead=3,
                            backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
                c.join()
                starts[g] = c.next_step
                joined.wait()  # nobody has read, so nobody has moved a position
                got[g] = list(c)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            joined.abort()
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(g,)) for g in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert starts == {0: 0, 1: 0, 2: 0, 3: 0}
    assert sorted(got) == [0, 1, 2, 3]
    for a, b in ((0, 1), (2, 3)):  # tensor peers: identical slices
        assert [s for s, _ in got[a]] == list(range(8)) == [s for s, _ in got[b]]
        for (_, x), (_, y) in zip(got[a], got[b]):
            np.testing.assert_array_equal(x, y)
    for step in range(8):  # the two data-parallel ranks split the global batch
        np.testing.assert_array_equal(np.concatenate([got[0][step][1], got[2][step][1]]), ref[step])
