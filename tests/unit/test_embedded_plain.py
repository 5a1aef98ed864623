"""Embedded dealing on the plain install (no `build` extra): a dataset of MDS shards and a
sidecar written without the build stack (`cases.plain_dataset`) is dealt with no server
exactly as `croupier simulate` deals it (so as `croupier serve` does), over 0 and 2 DataLoader
workers, a mixture of two such datasets too; its own state resumes mid-step, and moves to a
served job and back, exactly. .ci/compat.sh runs this file in the plain venvs."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from cases.dealt import by_step, simulated
from cases.plain_dataset import write_plain_dataset
from croupier.client.dataset import ID_KEY, CroupierIterableDataset
from croupier.format.sidecar import Sidecar
from croupier.mixture import load_mix
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.topology import Topology
from jobs import start_server
from workers.harness import sample_text

B = 8
POLICY = {"policy": "clusterclip", "clip": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_plain_dataset(tmp_path_factory.mktemp("plain"), 200, 5)


def embedded(ds: Path, cache: Path, rank: int = 0, world: int = 1, **kw) -> CroupierIterableDataset:
    opts = {**POLICY, "global_batch": B, "seed": 3, **kw}
    return CroupierIterableDataset.embedded(ds, cache_dir=cache, topology=Topology(rank=rank, world=world), **opts)


def read(ds: CroupierIterableDataset, per_rank: int, workers: int) -> list[dict]:
    loader = DataLoader(ds, batch_size=per_rank, num_workers=workers, collate_fn=lambda batch: batch)
    return [sample for batch in loader for sample in batch]


def test_the_dataset_is_what_the_test_wrote(dataset: Path) -> None:
    side = Sidecar.open(dataset)
    layout = side.layout()
    assert layout.num_samples == 200 and layout.num_clusters == 5
    sizes = [int(x) for x in layout.sizes]
    assert sum(sizes) == 200 and sizes == sorted(sizes, reverse=True) and sizes[-1] >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_exactly_the_simulated_slices(dataset: Path, tmp_path: Path, workers: int) -> None:
    side = Sidecar.open(dataset)
    for rank in range(2):
        got = read(embedded(dataset, tmp_path / "cache", rank, 2, steps=30), B // 2, workers)
        want = simulated(Sampler(side.layout(), PolicyConfig.from_options(**POLICY), B, 3), 30, rank, 2)
        assert by_step(got) == want
        assert len(got) == 30 * B // 2
        assert [(s["id"], s["text"]) for s in got] == [(i, sample_text(i)) for _, ids in want for i in ids]


def test_a_mixture_of_two_plain_datasets_yields_the_simulated_slices(tmp_path: Path) -> None:
    dss = [write_plain_dataset(tmp_path / f"s{i}", n, 3) for i, n in enumerate((90, 150))]
    text = "\n".join(f'[sources.s{i}]\ndataset = "{d}"\nweight = {w}\npolicy = "clusterclip"\nclip = 3\n'
                     for i, (d, w) in enumerate(zip(dss, (1, 2))))
    (tmp_path / "mix.toml").write_text(text)
    mix = load_mix(tmp_path / "mix.toml", tmp_path / "side")
    ds = CroupierIterableDataset.embedded(mix=tmp_path / "mix.toml", global_batch=12, seed=5,
                                          cache_dir=tmp_path / "cache", topology=Topology(rank=1, world=2), steps=15)
    got = read(ds, 6, 0)
    assert by_step(got) == simulated(mixture_sampler(mix, 12, 5), 15, 1, 2)


def test_its_state_resumes_mid_step_and_moves_to_a_served_job_and_back(dataset: Path, tmp_path: Path) -> None:
    whole = [s[ID_KEY] for s in embedded(dataset, tmp_path / "c", steps=30)]
    ds = embedded(dataset, tmp_path / "c", steps=10)
    it = iter(ds)
    head = [next(it)[ID_KEY] for _ in range(4 * B + 3)]
    resumed = embedded(dataset, tmp_path / "c", steps=10)
    resumed.load_state_dict(ds.state_dict())
    head += [s[ID_KEY] for s in resumed]
    state = resumed.state_dict()
    assert state["next_step"] == 10 and len(head) == 10 * B
    with ExitStack() as stack:
        side = Sidecar.open(dataset)
        spec = JobSpec(name="j", dataset_remote=str(dataset), dataset_fingerprint=side.fingerprint)
        job = Job(side.layout(), PolicyConfig.from_options(**POLICY), B, 3, spec=spec,
                  store=CheckpointStore(tmp_path / "state"))
        _, port = start_server(stack, job)
        on_server = CroupierIterableDataset(f"127.0.0.1:{port}", "j", cache_dir=tmp_path / "c", steps=10,
                                            topology=Topology(0, 1))
        on_server.load_state_dict(state)
        middle = [s[ID_KEY] for s in on_server]
        back = on_server.state_dict(checkpoint=True)
        on_server.close()
    again = embedded(dataset, tmp_path / "c", steps=10)
    again.load_state_dict(back)
    tail = [s[ID_KEY] for s in again]
    assert head + middle + tail == whole
