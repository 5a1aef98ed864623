"""Embedded dealing: the dataset with no server yields exactly `croupier simulate`'s slices
(and so `croupier serve`'s), resumes from its own state in O(clusters), and its state moves
to a served job of the same configuration and back, exactly; another configuration is refused.

Workers (processes) are in tests/integration/test_embedded_workers.py."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from cases.dealt import by_step, simulated
from cases.shards_build import read_back
from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.client.dataset_state import decode_sampler_state
from croupier.client.errors import Mismatch
from croupier.errors import ConfigError, FingerprintMismatch
from croupier.format.sidecar import Sidecar
from croupier.mixture import load_mix
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import SamplerState
from croupier.topology import Topology
from jobs import start_server

B = 8
POLICY = {"policy": "clusterclip", "clip": 2}


def embedded(ds: Path, cache: Path, rank: int = 0, world: int = 1, **kw) -> CroupierIterableDataset:
    opts = {**POLICY, "global_batch": B, "seed": 3, **kw}
    return CroupierIterableDataset.embedded(ds, cache_dir=cache, topology=Topology(rank=rank, world=world), **opts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, build_dataset) -> Path:
    return build_dataset(tmp_path_factory.mktemp("emb"), num_docs=240, topics=4)


def read(ds: CroupierIterableDataset, per_rank: int, workers: int) -> list[dict]:
    """Every sample, in order, through a DataLoader with `workers` worker processes."""
    loader = DataLoader(ds, batch_size=per_rank, num_workers=workers, collate_fn=lambda batch: batch)
    return [sample for batch in loader for sample in batch]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_yields_exactly_the_simulated_slices(dataset: Path, tmp_path: Path, world: int,
                                                        workers: int) -> None:
    side = Sidecar.open(dataset)
    config = PolicyConfig.from_options(**POLICY)
    texts = [r["text"] for r in read_back(dataset, tmp_path / "rb")]
    for rank in range(world):
        got = read(embedded(dataset, tmp_path / "cache", rank, world, steps=30), B // world, workers)
        want = simulated(Sampler(side.layout(), config, B, 3), 30, rank, world)
        assert by_step(got) == want
        assert len(got) == 30 * B // world
        assert [s["text"] for s in got] == [texts[i] for _, ids in want for i in ids]


def test_a_selection_is_dealt_as_simulate_deals_it(dataset: Path, tmp_path: Path) -> None:
    side = Sidecar.open(dataset)
    side.write_selection("even", np.arange(0, side.layout().num_samples, 2), {"by": "test"})
    side = Sidecar.open(dataset)
    got = list(embedded(dataset, tmp_path / "cache", 1, 2, steps=12, selection="even"))
    want = simulated(Sampler(side.layout("even"), PolicyConfig.from_options(**POLICY), B, 3), 12, 1, 2)
    assert by_step(got) == want
    assert all(s[ID_KEY] % 2 == 0 for s in got)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, build_dataset) -> Path:
    root = tmp_path_factory.mktemp("mix")
    dss = [build_dataset(root / f"s{i}", num_docs=n, topics=3) for i, n in enumerate((120, 160, 200))]
    text = "\n".join(f'[sources.s{i}]\ndataset = "{d}"\nweight = {w}\npolicy = "clusterclip"\nclip = 3\n'
                     for i, (d, w) in enumerate(zip(dss, (1, 2, 3))))
    (root / "mix.toml").write_text(text)
    return root / "mix.toml"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_a_three_source_mixture_yields_exactly_the_simulated_slices(mixture: Path, tmp_path: Path,
                                                                     world: int, workers: int) -> None:
    mix = load_mix(mixture, tmp_path / "side")
    for rank in range(world):
        ds = CroupierIterableDataset.embedded(mix=mixture, global_batch=12, seed=5, cache_dir=tmp_path / "cache",
                                              topology=Topology(rank=rank, world=world), steps=20)
        got = read(ds, 12 // world, workers)
        assert by_step(got) == simulated(mixture_sampler(mix, 12, 5), 20, rank, world)
        assert {s[STEP_KEY] for s in got} == set(range(20))


def test_its_own_state_resumes_exactly_mid_step_without_a_replay(dataset: Path, tmp_path: Path) -> None:
    whole = [s[ID_KEY] for s in embedded(dataset, tmp_path / "c", steps=20)]
    ds = embedded(dataset, tmp_path / "c", steps=20)
    it = iter(ds)
    head = [next(it)[ID_KEY] for _ in range(5 * B + 3)]  # mid-step 5
    state = ds.state_dict()
    assert (state["next_step"], state["skip"]) == (5, 3)
    saved = SamplerState.from_bytes(decode_sampler_state(state["sampler_state"]))
    json.dumps(state)  # a state is JSON text (the demo's trainer writes it so)
    assert saved.step == 5  # the state of the position itself: a resume computes nothing before it
    resumed = embedded(dataset, tmp_path / "c", steps=20)
    resumed.load_state_dict(state)
    tail = [s[ID_KEY] for s in resumed]
    assert head + tail == whole


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_dataloader_resumes_exactly(dataset: Path, tmp_path: Path, workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        ds = embedded(dataset, tmp_path / "c", 1, 2, steps=24)
        return StatefulDataLoader(ds, batch_size=B // 2, num_workers=workers, collate_fn=lambda b: b)

    whole = [[s[ID_KEY] for s in batch] for batch in loader()]
    first = loader()
    it = iter(first)
    head = [[s[ID_KEY] for s in next(it)] for _ in range(9)]
    state = first.state_dict()
    del it
    again = loader()
    again.load_state_dict(state)
    tail = [[s[ID_KEY] for s in batch] for batch in again]
    assert head + tail == whole
    assert len(whole) == 24


def test_packed_sequences_pack_the_embedded_slices(dataset: Path, tmp_path: Path, tiny_tokenizer: Path) -> None:
    from croupier.client.packing import PackedSequences

    items = list(PackedSequences(embedded(dataset, tmp_path / "c", steps=6), seq_len=64, rows=4,
                                 tokenizer=str(tiny_tokenizer), eos_id=102))
    want = simulated(Sampler(Sidecar.open(dataset).layout(), PolicyConfig.from_options(**POLICY), B, 3), 6, 0, 1)
    assert [item[STEP_KEY] for item in items] == list(range(6))
    assert all(tuple(item["input_ids"].shape) == (4, 64) for item in items)
    docs = [int(d) for d in items[0]["document_ids"].flatten().tolist() if d >= 0]
    firsts = list(dict.fromkeys(docs))  # each document's first appearance, in order
    assert firsts == want[0][1][:len(firsts)] and len(firsts) >= 2


def test_a_state_of_another_configuration_is_refused(dataset: Path, tmp_path: Path) -> None:
    ds = embedded(dataset, tmp_path / "c", steps=4)
    list(ds)
    other = embedded(dataset, tmp_path / "c", steps=4, seed=4)
    other.load_state_dict(ds.state_dict())
    with pytest.raises(FingerprintMismatch, match="sampler"):
        list(other)


def test_what_needs_a_running_job_is_refused_naming_the_server(dataset: Path, tmp_path: Path) -> None:
    ds = embedded(dataset, tmp_path / "c", steps=2)
    with pytest.raises(ConfigError, match="croupier serve"):
        ds.report_losses(0, [1.0] * B)
    with pytest.raises(ConfigError, match="croupier serve"):
        ds.state_dict(next_step=1, checkpoint=True)
    with pytest.raises(ConfigError, match="not divisible|divide|split"):
        embedded(dataset, tmp_path / "c", 0, 3)
    with pytest.raises(ConfigError, match="clip"):
        embedded(dataset, tmp_path / "c", clip="lots")
    with pytest.raises(ConfigError, match="mixture file fixes"):
        CroupierIterableDataset.embedded(mix="m.toml", global_batch=B, cache_dir=tmp_path, clip=2)


def served(stack: ExitStack, dataset: Path, state_dir: Path) -> str:
    """A `croupier serve DATASET --policy clusterclip --clip 2 --global-batch 8 --seed 3` job in process."""
    side = Sidecar.open(dataset)
    spec = JobSpec(name="j", dataset_remote=str(dataset), dataset_fingerprint=side.fingerprint)
    job = Job(side.layout(), PolicyConfig.from_options(**POLICY), B, 3, spec=spec,
              store=CheckpointStore(state_dir))
    _, port = start_server(stack, job)
    return f"127.0.0.1:{port}"


def test_an_embedded_state_resumes_on_a_served_job_and_back(dataset: Path, tmp_path: Path) -> None:
    whole = [s[ID_KEY] for s in embedded(dataset, tmp_path / "c", steps=38)]
    ds = embedded(dataset, tmp_path / "c", steps=12)
    head = [s[ID_KEY] for s in ds]
    state = ds.state_dict()
    assert state["next_step"] == 12 and state["token"] == ""
    with ExitStack() as stack:
        addr = served(stack, dataset, tmp_path / "state")
        on_server = CroupierIterableDataset(addr, "j", cache_dir=tmp_path / "c", steps=14, topology=Topology(0, 1))
        on_server.load_state_dict(state)  # the job adopts the embedded sampler state at step 12
        middle = [s[ID_KEY] for s in on_server]  # the state's own iteration: 12 steps more
        back = on_server.state_dict(checkpoint=True)
        on_server.close()
        assert back["next_step"] == 24 and back["token"]
    assert SamplerState.from_bytes(decode_sampler_state(back["sampler_state"])).step == 24
    again = embedded(dataset, tmp_path / "c", steps=14)
    again.load_state_dict(back)
    tail = [s[ID_KEY] for s in again]
    assert head + middle + tail == whole


def test_a_served_job_refuses_an_embedded_state_of_another_configuration(dataset: Path, tmp_path: Path) -> None:
    ds = embedded(dataset, tmp_path / "c", steps=3, clip=3)
    list(ds)
    with ExitStack() as stack:
        addr = served(stack, dataset, tmp_path / "state")
        on_server = CroupierIterableDataset(addr, "j", cache_dir=tmp_path / "c", steps=2, topology=Topology(0, 1))
        on_server.load_state_dict(ds.state_dict())
        with pytest.raises(Mismatch, match="FAILED_PRECONDITION.*sampler state fingerprint mismatch"):
            list(on_server)
        on_server.close()


def test_the_readers_counters_are_public_and_travel_in_the_state(dataset: Path, tmp_path: Path) -> None:
    ds = embedded(dataset, tmp_path / "c", steps=4)
    assert ds.reader_stats() == {}
    assert len(list(ds)) == 4 * B
    stats = ds.reader_stats()
    assert stats["samples_read"] == 4 * B and stats["shards_downloaded"] + stats["shards_reused"] >= 1
    assert ds.state_dict()["reader"] == stats
    assert ds.flush_losses() is True and ds.loss_report_stats() == {}
