"""`ClusterBatchSampler`: the server's sequence as a batch sampler for map-style datasets.

Its indices are the in-process sampler's rank slices; a Hugging Face dataset read through
`DataLoader(ds, batch_sampler=...)` gives exactly those rows; `StatefulDataLoader` (no workers
here; with workers in tests/integration/) resumes exactly; another configuration's state and
bad inputs are refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest

from croupier.client import ClusterBatchSampler
from croupier.cluster_ids import layout_from_cluster_ids
from croupier.errors import ConfigError, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.topology import Topology
from roundtrip import assert_resume_exact

N = 300


def cluster_ids(n: int = N, seed: int = 3) -> np.ndarray:
    """Long-tailed cluster ids 0..5 with a few excluded (-1) indices."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(6, size=n, p=[0.45, 0.25, 0.15, 0.08, 0.05, 0.02])
    ids[: 6] = np.arange(6)  # every cluster is used
    ids[rng.choice(np.arange(6, n), size=20, replace=False)] = -1
    return ids


POLICIES = [
    ({"policy": "clusterclip", "clip": 2}, PolicyConfig("clusterclip", clip=2)),
    ({"policy": "random"}, PolicyConfig("random")),
    ({"policy": "clusterclip", "clip": "auto", "budget_steps": 30},
     PolicyConfig("clusterclip", auto_clip=True, budget_steps=30)),
    ({"policy": "weighted", "weights": [1, 2, 0, 1, 1, 3], "clip": 3},
     PolicyConfig("weighted", clip=3, weights=(1, 2, 0, 1, 1, 3))),
    ({"policy": "g2s", "switch_step": 5}, PolicyConfig("g2s", switch_step=5)),
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("options", "config"), POLICIES)
def test_each_rank_yields_its_slice_of_the_in_process_sampler(world, options, config) -> None:
    ids = cluster_ids()
    reference = Sampler(ClusterLayout.from_assignments(ids), config, global_batch=16, seed=7)
    batches = [reference.next_batch() for _ in range(25)]
    per = 16 // world
    for rank in range(world):
        sampler = ClusterBatchSampler(ids, **options, global_batch=16, seed=7, rank=rank, world=world, steps=25)
        got = list(sampler)
        assert got == [b[rank * per:(rank + 1) * per].tolist() for b in batches]
        assert all(type(i) is int for step in got for i in step)
        assert sampler.fingerprint == reference.fingerprint


def test_cluster_ids_as_list_tensor_and_hf_column_give_one_sequence() -> None:
    import datasets
    import torch

    ids = cluster_ids()
    ds = datasets.Dataset.from_dict({"row": list(range(N)), "cluster": ids.tolist()})
    runs = []
    # (a numpy-formatted column is the same Arrow column: `datasets`' numpy formatter imports
    # torchvision.io.VideoReader, which torchvision 0.29 no longer has, once torchvision is loaded)
    for clusters in (ids, ids.tolist(), torch.tensor(ids), ds["cluster"], ds.with_format("arrow")["cluster"],
                     ids.astype(np.int32)):
        s = ClusterBatchSampler(clusters, policy="clusterclip", clip=2, global_batch=8, rank=1, world=2, steps=10)
        runs.append((s.fingerprint, list(s)))
    assert all(r == runs[0] for r in runs[1:])
    assert runs[0][0] == Sampler(ClusterLayout.from_assignments(ids), PolicyConfig("clusterclip", clip=2), 8).fingerprint


def test_a_hugging_face_dataset_through_dataloader_gives_exactly_the_rows_of_the_indices() -> None:
    import datasets
    from torch.utils.data import DataLoader

    ids = cluster_ids()
    ds = datasets.Dataset.from_dict({"row": list(range(N)), "text": [f"doc {i}" for i in range(N)],
                                     "cluster": ids.tolist()})
    expect = list(ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=2, global_batch=12, rank=2,
                                      world=3, steps=20))
    sampler = ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=2, global_batch=12, rank=2, world=3,
                                  steps=20)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=lambda rows: rows)
    assert len(loader) == 20
    got = list(loader)
    assert [[r["row"] for r in batch] for batch in got] == expect
    assert [[r["text"] for r in batch] for batch in got] == [[f"doc {i}" for i in step] for step in expect]
    assert all(r["cluster"] >= 0 for batch in got for r in batch)  # excluded rows are never dealt


def make_sampler(**over) -> ClusterBatchSampler:
    options = {"policy": "clusterclip", "clip": 2, "global_batch": 8, "seed": 1, "rank": 0, "world": 2, "steps": 40}
    options.update(over)
    return ClusterBatchSampler(cluster_ids(), **options)


def test_the_sampler_round_trip_is_exact_and_loads_without_a_replay(monkeypatch) -> None:
    def advance(s: ClusterBatchSampler) -> list[int]:
        it = getattr(s, "_test_iter", None)
        if it is None:
            it = s._test_iter = iter(s)
        return next(it)

    def load(s: ClusterBatchSampler, state) -> None:
        calls = []
        real = Sampler.next_batch
        monkeypatch.setattr(Sampler, "next_batch", lambda self: calls.append(1) or real(self))
        s.load_state_dict(state)
        monkeypatch.setattr(Sampler, "next_batch", real)
        assert calls == []  # O(clusters): the state is loaded, not replayed

    tail = assert_resume_exact(make_sampler, advance, lambda s: s.state_dict(), load, k=13, tail=20)
    assert len(tail) == 20


def test_state_is_small_and_versioned_and_finishes_the_pass_it_was_saved_in() -> None:
    s = make_sampler(steps=10)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert set(state) == {"version", "fingerprint", "next_step", "stop_step", "sampler_state"}
    assert state["version"] == 1 and state["next_step"] == 4 and state["stop_step"] == 10
    assert isinstance(state["sampler_state"], bytes) and len(state["sampler_state"]) < 1024  # 6 clusters
    rest = list(it)
    nxt = list(s)  # a new pass continues the sequence for another 10 steps
    assert len(rest) == 6 and len(nxt) == 10 and s.step == 20 and s.state_dict()["stop_step"] is None

    again = make_sampler(steps=10)
    again.load_state_dict(state)
    assert again.step == 4 and list(again) == rest and list(again) == nxt
    whole = list(make_sampler(steps=20))
    assert whole == first + rest + nxt


def test_start_step_and_iteration_continue_one_sequence() -> None:
    whole = list(make_sampler(steps=30))
    assert list(make_sampler(steps=12, start_step=18)) == whole[18:30]
    s = make_sampler(steps=5)
    assert [step for _ in range(6) for step in s] == whole
    assert len(s) == 5
    with pytest.raises(TypeError, match="no length without steps="):
        len(make_sampler(steps=None))


def test_a_newer_iterator_retires_the_older_one() -> None:
    s = make_sampler(steps=10)
    old = iter(s)
    a = next(old)
    new = iter(s)
    b = next(new)
    assert list(old) == []
    assert [a, b] == list(make_sampler(steps=2))


def test_end_of_data_ends_the_iteration() -> None:
    ids = np.array([0] * 10 + [1] * 5)
    s = ClusterBatchSampler(ids, policy="clusterclip", clip=1, global_batch=5, rank=0, world=1)
    got = list(s)
    assert len(got) == 3 and s.end_of_data_step == 3
    assert sorted(i for step in got for i in step) == list(range(15))
    assert list(s) == []


def test_the_state_of_another_configuration_is_refused() -> None:
    state = make_sampler().state_dict()
    for other in ({"seed": 2}, {"clip": 3}, {"global_batch": 16}, {"policy": "random", "clip": None}):
        with pytest.raises(FingerprintMismatch, match="ClusterBatchSampler state .* fingerprint mismatch"):
            make_sampler(**other).load_state_dict(state)
    ids = cluster_ids()
    ids[7] = 5 if ids[7] != 5 else 4
    with pytest.raises(FingerprintMismatch):
        ClusterBatchSampler(ids, policy="clusterclip", clip=2, global_batch=8, seed=1, rank=0, world=2,
                            ).load_state_dict(state)
    # the position is global: another rank (or a world splitting the same batch) resumes it
    s = make_sampler(rank=3, world=4)
    s.load_state_dict(state)
    assert s.step == 0


@pytest.mark.parametrize(("edit", "message"), [
    (lambda st: {**st, "version": 2}, "ClusterBatchSampler state version 2 is not supported (expected 1)"),
    (lambda st: {k: v for k, v in st.items() if k != "stop_step"}, "ClusterBatchSampler state keys"),
    (lambda st: {**st, "extra": 1}, "ClusterBatchSampler state keys"),
    (lambda st: {**st, "sampler_state": st["sampler_state"][:-3] + b"xyz"}, "sampler state checksum mismatch"),
    (lambda st: {**st, "sampler_state": "text"}, "sampler_state must be bytes, got str"),
    (lambda st: {**st, "next_step": 9}, "next_step 9 differs from its sampler state's step 4"),
    (lambda st: {**st, "stop_step": 2}, "stop_step 2 must be None or an integer > next_step 4"),
    (lambda st: [1, 2], "a ClusterBatchSampler state is a mapping, got list"),
])
def test_a_bad_state_is_refused_and_changes_nothing(edit, message) -> None:
    s = make_sampler()
    it = iter(s)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    fresh = make_sampler()
    with pytest.raises(StateError) as err:
        fresh.load_state_dict(edit(state))
    assert message.lower() in str(err.value).lower() and "\n" not in str(err.value)
    assert fresh.step == 0


def bad_ids(kind: str):
    return {"float": np.array([0.0, 1.0]), "2d": np.zeros((2, 3), dtype=int), "empty": np.array([], dtype=int),
            "all -1": np.full(4, -1), "below -1": np.array([0, -2, 1]), "gap": np.array([0, 2, 2, -1]),
            "bool": np.array([True, False]), "strings": ["a", "b"]}[kind]


@pytest.mark.parametrize(("options", "message"), [
    ({"clusters": bad_ids("float")}, "cluster ids must be integers (a cluster id per index, -1 = excluded), got dtype "
                                     "float64"),
    ({"clusters": bad_ids("bool")}, "cluster ids must be integers"),
    ({"clusters": bad_ids("strings")}, "cluster ids must be integers"),
    ({"clusters": bad_ids("2d")}, "cluster ids must be 1-D (one cluster id per dataset index), got shape (2, 3)"),
    ({"clusters": bad_ids("empty")}, "cluster ids are empty"),
    ({"clusters": bad_ids("all -1")}, "all 4 indices are -1 (excluded)"),
    ({"clusters": bad_ids("below -1")}, "cluster ids must be >= 0, or -1 for an excluded index; index 1 has -2"),
    ({"clusters": bad_ids("gap")}, "cluster ids must be dense (every id in 0..2 used); cluster 1 has no index"),
    ({"selection": "top"}, "selection 'top' needs a croupier dataset path as clusters"),
    ({"rank": 1, "world": None}, "give both rank and world, or neither"),
    ({"topology": Topology(0, 2)}, "give topology or rank/world, not both"),
    ({"global_batch": 7}, "global batch 7 is not divisible by world size 2"),
    ({"global_batch": 0}, "global batch must be an integer >= 1, got 0"),
    ({"policy": "bogus", "clip": None}, "unknown policy 'bogus'"),
    ({"clip": "lots"}, "clip must be an integer >= 1 or 'auto', got 'lots'"),
    ({"clip": "auto"}, "auto clip needs budget_steps"),
    ({"policy": "weighted", "weights": [1, 2]}, "weights has 2 entries but the layout has 6 clusters"),
    ({"steps": -1}, "steps must be an integer >= 0, got -1"),
    ({"start_step": 2.5}, "start_step must be an integer >= 0, got 2.5"),
    ({"start_step": 10_000}, "start_step 10000 is past the end of data at step"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"rank": 2, "world": 2}, "rank 2 is outside the world [0, 2)"),
])
def test_bad_inputs_are_refused_in_one_line(options, message) -> None:
    options = {"clusters": cluster_ids(), "policy": "clusterclip", "clip": 2, "global_batch": 8, "rank": 0,
               "world": 2, **options}
    with pytest.raises(ConfigError) as err:
        ClusterBatchSampler(options.pop("clusters"), **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rank_and_world_come_from_torchrun_or_a_topology(monkeypatch) -> None:
    whole = list(make_sampler(rank=0, world=1, global_batch=8, steps=6))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = ClusterBatchSampler(cluster_ids(), policy="clusterclip", clip=2, global_batch=8, seed=1, steps=6)
    assert (s.topology.rank, s.topology.world) == (3, 4)
    assert list(s) == [step[6:8] for step in whole]
    # tensor parallel 2: global ranks 2k and 2k+1 read data-parallel slice k of 2
    dp = Topology.data_parallel(tensor=2)
    s = ClusterBatchSampler(cluster_ids(), policy="clusterclip", clip=2, global_batch=8, seed=1, steps=6,
                            topology=dp)
    assert (dp.rank, dp.world) == (1, 2) and list(s) == [step[4:8] for step in whole]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert list(ClusterBatchSampler(cluster_ids(), policy="clusterclip", clip=2, global_batch=8, seed=1,
                                    steps=6)) == whole


def test_stateful_dataloader_without_workers_resumes_exactly() -> None:
    import datasets
    from torchdata.stateful_dataloader import StatefulDataLoader

    ids = cluster_ids()
    ds = datasets.Dataset.from_dict({"row": list(range(N)), "cluster": ids.tolist()})

    def make() -> dict:
        sampler = ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=2, global_batch=8, seed=5, rank=1,
                                      world=2, steps=30)
        loader = StatefulDataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=lambda rows: rows)
        return {"loader": loader, "it": None}

    def advance(h: dict) -> list[int]:
        if h["it"] is None:
            h["it"] = iter(h["loader"])
        return [r["row"] for r in next(h["it"])]

    def load(h: dict, state: dict) -> None:
        h["loader"].load_state_dict(state)

    tail = assert_resume_exact(make, advance, lambda h: h["loader"].state_dict(), load, k=11, tail=19)
    whole = list(ClusterBatchSampler(ids, policy="clusterclip", clip=2, global_batch=8, seed=5, rank=1, world=2,
                                     steps=30))
    assert tail == whole[11:30]


def test_a_croupier_dataset_path_uses_its_sidecar(build_dataset, tmp_path) -> None:
    from croupier.datasets import open_dataset

    root = build_dataset(tmp_path, num_docs=120, topics=3)
    layout = open_dataset(str(root)).layout(None)
    reference = Sampler(layout, PolicyConfig("clusterclip", clip=2), global_batch=8, seed=0)
    expect = [reference.next_batch()[4:8].tolist() for _ in range(12)]
    for path in (root, str(root)):
        s = ClusterBatchSampler(path, policy="clusterclip", clip=2, global_batch=8, rank=1, world=2, steps=12)
        assert list(s) == expect and s.num_samples == layout.num_samples


def test_layout_from_cluster_ids_is_from_assignments() -> None:
    ids = cluster_ids()
    a, b = layout_from_cluster_ids(ids), ClusterLayout.from_assignments(ids)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.members, b.members)
    assert np.array_equal(a.offsets, b.offsets)
