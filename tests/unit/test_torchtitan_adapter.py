"""The torchtitan adapter in-process: torchtitan's batch format (inputs and labels shifted within
documents), its state layout (`dp_rank_{r}` + `world_size`, as `ParallelAwareDataloader`), an
exact resume at the same data-parallel degree, and a resume at another degree through the
global step (where torchtitan refuses); the Configurable loader built through torchtitan 0.3's
own `Config.build` with its `HuggingFaceTokenizer`, saved and loaded by DCP as its checkpointer does.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from croupier.client.dataset import CroupierIterableDataset
from croupier.errors import ConfigError, StateError
from croupier.integrations.torchtitan import (
    IGNORE_INDEX,
    CroupierTitanLoader,
    build_croupier_dataloader,
    titan_batch,
)
from croupier.topology import Topology

B, SEED, SEQ, ROWS = 8, 5, 256, 2  # 2 rows of 257 hold any 8 documents of this corpus: no carry
EOS = 102  # the tiny WordPiece tokenizer's [SEP]: it has no EOS token


@pytest.fixture(scope="module")
def ds_dir(build_dataset, tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("titan"))


@pytest.fixture(scope="module")
def hf_tok(tiny_tokenizer):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)


def loader(ds_dir, tmp_path, tok, rank: int, world: int, **kwargs) -> CroupierTitanLoader:
    def make(topology: Topology) -> CroupierIterableDataset:
        return CroupierIterableDataset.embedded(ds_dir, global_batch=B, cache_dir=tmp_path / "cache", seed=SEED,
                                                policy="clusterclip", clip=3, topology=topology)

    return build_croupier_dataloader(make, dp_rank=rank, dp_world_size=world, seq_len=SEQ, local_batch_size=ROWS,
                                     tokenizer=tok, eos_id=EOS, **kwargs)


def take(ld: CroupierTitanLoader, n: int) -> list[tuple[int, list[int], list[list[int]], list[list[int]]]]:
    """(step, document ids, input rows, label rows) of the next n batches."""
    out = []
    it = iter(ld)
    for _ in range(n):
        inputs, labels = next(it)
        assert set(inputs) == {"input", "positions"}
        assert inputs["input"].shape == labels.shape == (ROWS, SEQ)
        out.append((ld.next_step - 1, ld.last_document_ids, inputs["input"].tolist(), labels.tolist()))
    return out


def test_titan_batch_shifts_labels_within_documents():
    eos = 9
    item = {"input_ids": torch.tensor([[5, 6, 7, eos, 8, 0]]), "labels": torch.tensor([[5, 6, 7, eos, 8, -100]]),
            "document_ids": torch.tensor([[3, 3, 3, 3, 4, -1]]), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 0]])}
    inputs, labels = titan_batch(item)
    assert inputs["input"].tolist() == [[5, 6, 7, eos, 8]]
    assert inputs["positions"].tolist() == [[0, 1, 2, 3, 0]]
    assert labels.tolist() == [[6, 7, eos, IGNORE_INDEX, IGNORE_INDEX]]
    assert set(titan_batch(item, positions=False)[0]) == {"input"}


def test_same_degree_resume_is_exact_per_dp_rank(ds_dir, tmp_path, hf_tok):
    whole = [take(loader(ds_dir, tmp_path, hf_tok, r, 2), 8) for r in (0, 1)]
    first = [loader(ds_dir, tmp_path, hf_tok, r, 2) for r in (0, 1)]
    for ld in first:
        take(ld, 5)
    saved: dict = {}
    for ld in first:  # what DCP gathers: each rank's own key, world_size alike on all
        saved.update(ld.state_dict())
    assert sorted(saved) == ["croupier_global", "dp_rank_0", "dp_rank_1", "world_size"]
    assert saved["world_size"] == 2
    assert isinstance(saved["dp_rank_1"], bytes) and pickle.loads(saved["dp_rank_1"])["next_step"] == 5
    for r in (0, 1):
        again = loader(ds_dir, tmp_path, hf_tok, r, 2)
        again.load_state_dict(saved)
        assert take(again, 3) == whole[r][5:]
        assert [s for s, *_ in whole[r]] == list(range(8))
        assert again.resumed_from_degree is None


def test_another_degree_resumes_through_the_global_step(ds_dir, tmp_path, hf_tok):
    two = [loader(ds_dir, tmp_path, hf_tok, r, 2) for r in (0, 1)]
    ref2 = [take(ld, 4) for ld in two]
    saved: dict = {}
    for ld in two:
        saved.update(ld.state_dict())
    one = loader(ds_dir, tmp_path, hf_tok, 0, 1)
    one.load_state_dict({k: saved[k] for k in ("dp_rank_0", "world_size", "croupier_global")})  # DCP's, for rank 0
    assert one.resumed_from_degree == 2
    resumed = take(one, 3)
    whole = take(loader(ds_dir, tmp_path, hf_tok, 0, 1), 7)
    assert resumed == whole[4:]  # the world-1 run from step 0, exactly (no step of this size carries)
    assert [s for s, *_ in resumed] == [4, 5, 6]
    # and world 1's step is the union of world 2's slices, in rank order
    for (s, ids, *_), (_, ids0, *_), (_, ids1, *_) in zip(whole[:4], ref2[0], ref2[1]):
        assert ids == ids0 + ids1, f"step {s}"
    assert one.carry_dropped_on_resume == 0 and one.metrics()["croupier/tokens_dropped"] == 0


def test_refusals(ds_dir, tmp_path, hf_tok):
    from croupier.client.packing import PackedSequences

    ds = CroupierIterableDataset.embedded(ds_dir, global_batch=B, cache_dir=tmp_path / "c", clip=3,
                                          topology=Topology(1, 2))
    packed = PackedSequences(ds, seq_len=SEQ + 1, rows=ROWS, tokenizer=hf_tok, eos_id=EOS)
    with pytest.raises(ConfigError, match="reads rank 1 of 2, but this loader is for data-parallel rank 0 of 2"):
        CroupierTitanLoader(packed, dp_rank=0, dp_world_size=2)
    with pytest.raises(ConfigError, match="takes a PackedSequences"):
        CroupierTitanLoader(ds, dp_rank=1, dp_world_size=2)
    ld = CroupierTitanLoader(packed, dp_rank=1, dp_world_size=2)
    with pytest.raises(StateError, match="world_size must be an int >= 1, got 0"):
        ld.load_state_dict({"dp_rank_1": b"", "world_size": 0})
    with pytest.raises(StateError, match="has no entry 'dp_rank_1'"):
        ld.load_state_dict({"dp_rank_0": b"", "world_size": 2})
    with pytest.raises(StateError, match="not a croupier torchtitan loader state"):
        ld.load_state_dict({"dp_rank_1": pickle.dumps({"x": 1}), "world_size": 2})
    with pytest.raises(ConfigError, match="local_batch_size must be an int >= 1, got 0"):
        build_croupier_dataloader(lambda t: ds, dp_rank=1, dp_world_size=2, seq_len=8, local_batch_size=0,
                                  tokenizer=hf_tok, eos_id=EOS)
    ld.load_state_dict({})  # torchtitan: an empty state is valid


def test_torchtitan_config_build_tokenizer_and_dcp_round_trip(ds_dir, tmp_path, tiny_tokenizer):
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from croupier.integrations.torchtitan import CroupierTitanDataLoader

    tok = HuggingFaceTokenizer(tokenizer_path=str(tiny_tokenizer))
    config = CroupierTitanDataLoader.Config(dataset_path=str(ds_dir), cache_dir=str(tmp_path / "cache"),
                                            global_batch=B, seed=SEED, clip="3", eos_id=EOS)

    def build() -> CroupierTitanLoader:
        return config.build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=SEQ, local_batch_size=ROWS,
                            snapshot_every_n_steps=1)

    first = build()
    assert isinstance(first, BaseDataLoader) and isinstance(first, CroupierTitanLoader)
    whole = take(build(), 6)
    assert take(first, 3) == whole[:3]
    dcp.save({"dataloader": first}, checkpoint_id=str(tmp_path / "ckpt"))
    again = build()
    dcp.load({"dataloader": again}, checkpoint_id=str(tmp_path / "ckpt"))
    assert take(again, 3) == whole[3:]
    # torchtitan's tokenizer encodes what the Hugging Face one does
    hf = build_croupier_dataloader(lambda t: CroupierIterableDataset.embedded(
        ds_dir, global_batch=B, cache_dir=tmp_path / "cache", seed=SEED, clip=3, topology=t),
        dp_rank=0, dp_world_size=1, seq_len=SEQ, local_batch_size=ROWS, tokenizer=str(tiny_tokenizer), eos_id=EOS)
    assert take(hf, 2) == whole[:2]


def test_metrics_reach_torchtitans_metric_logger(ds_dir, tmp_path, hf_tok):
    from types import SimpleNamespace

    from torchtitan.components.metrics import BaseLogger

    class Recorder(BaseLogger):
        def __init__(self) -> None:
            self.logged: list[tuple[int, dict]] = []

        def log(self, metrics: dict, step: int) -> None:
            self.logged.append((step, metrics))

    ld = loader(ds_dir, tmp_path, hf_tok, 0, 1)
    take(ld, 2)
    recorder = Recorder()
    ld.log_metrics(SimpleNamespace(logger=recorder), 2)
    ld.log_metrics(SimpleNamespace(logger=recorder), 3)
    (step, first), (_, second) = recorder.logged
    assert step == 2 and first["croupier/step"] == 1
    assert first["croupier/steps"] == 2 and first["croupier/documents"] == 2 * B
    assert first["croupier/tokens_padding"] == 2 * ROWS * (SEQ + 1) - first["croupier/tokens_packed"]
    assert first["croupier/data_wait_total_s"] >= first["croupier/data_wait_max_s"] >= first["croupier/data_wait_s"] > 0
    assert "croupier/data_wait_s" not in second  # waits are reported once


def test_a_grown_dp_degree_resumes_from_the_shared_entry_through_dcp(ds_dir, tmp_path, hf_tok):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    one = loader(ds_dir, tmp_path, hf_tok, 0, 1)
    take(one, 3)
    dcp.save({"dataloader": one}, checkpoint_id=str(tmp_path / "ckpt"))
    ref = [take(loader(ds_dir, tmp_path, hf_tok, r, 2), 5)[3:] for r in (0, 1)]
    for r in (0, 1):
        grown = loader(ds_dir, tmp_path, hf_tok, r, 2)
        if r == 1:  # its dp_rank_1 key is not in the checkpoint: a strict load refuses
            with pytest.raises(CheckpointException) as refused:
                dcp.load({"dataloader": grown}, checkpoint_id=str(tmp_path / "ckpt"))
            assert "Missing key in checkpoint state_dict: dataloader.dp_rank_1" in str(refused.value.failures[0])
            grown = loader(ds_dir, tmp_path, hf_tok, r, 2)
        dcp.load({"dataloader": grown}, checkpoint_id=str(tmp_path / "ckpt"),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        assert grown.resumed_from_degree == 1
        assert take(grown, 2) == ref[r]
