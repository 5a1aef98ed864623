"""The pieces of the Hugging Face Trainer integration that need no processes: the model's keys only,
one step per batch with its ids, per-sample losses, a loader-state file per rank, the refusals;
and `CroupierTrainer` itself in one process on an embedded job, resumed from its own checkpoint.
(Two ranks under torchrun and `accelerate launch` against a server: tests/e2e/test_hf_trainer.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from croupier.client.dataset import CroupierIterableDataset
from croupier.client.loss_fold import fold_token_losses
from croupier.client.packing import PackedSequences
from croupier.errors import ConfigError, StateError
from croupier.integrations.batches import (
    IDS_KEY,
    SliceCollator,
    croupier_datasets,
    forward_keys,
    model_inputs,
    split_meta,
)
from croupier.integrations.loader import pack_counters, wait_logs
from croupier.integrations.loader_state import load_rank_state, save_rank_state, state_path
from croupier.integrations.sample_losses import sample_losses, token_losses
from croupier.integrations.transformers import CroupierTrainer
from croupier.topology import Topology


def _gpt2(vocab: int = 50) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2,
                                                                n_positions=64))


def _packed_item() -> dict:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    docs = torch.tensor([[3, 3, 4, 4], [4, 4, -1, -1]])
    return {"input_ids": ids, "labels": torch.where(docs >= 0, ids, -100), "loss_mask": docs >= 0,
            "document_ids": docs, "position_ids": torch.tensor([[0, 1, 0, 1], [2, 3, 0, 0]]),
            "_croupier_step": 7, IDS_KEY: torch.tensor([3, 4])}


def test_the_model_gets_only_the_keys_its_forward_names():
    keys = forward_keys(_gpt2())
    assert {"input_ids", "labels", "position_ids", "attention_mask"} <= keys
    assert not {"document_ids", "loss_mask", "kwargs", "self"} & keys
    batch, meta = split_meta(_packed_item())
    assert sorted(meta) == ["_croupier_ids", "_croupier_step"]
    assert sorted(model_inputs(batch, keys)) == ["input_ids", "labels", "position_ids"]
    with pytest.raises(ConfigError, match=r"include none of the model's forward arguments"):
        model_inputs({"text": ["a"]}, keys)


def test_a_slice_collator_keeps_step_and_ids_and_refuses_two_steps():
    collate = SliceCollator(torch.utils.data.default_collate)
    batch = collate([{"x": 1, "_croupier_step": 3, "_croupier_id": 11}, {"x": 2, "_croupier_step": 3,
                                                                          "_croupier_id": 4}])
    assert batch["_croupier_step"] == 3 and batch[IDS_KEY].tolist() == [11, 4] and batch["x"].tolist() == [1, 2]
    assert sorted(batch) == ["_croupier_ids", "_croupier_step", "x"]
    with pytest.raises(ConfigError, match=r"samples of steps \[3, 4\].*per-device batch size"):
        collate([{"x": 1, "_croupier_step": 3, "_croupier_id": 1}, {"x": 2, "_croupier_step": 4, "_croupier_id": 2}])


def test_plain_rows_report_their_mean_next_token_loss():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    losses, present = sample_losses(np.array([20, 21]), logits, labels, {})
    per = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3], reduction="mean")
    assert math.isclose(losses[0], float(per), rel_tol=1e-6)
    assert present.tolist() == [True, False] and math.isnan(losses[1])
    with pytest.raises(ConfigError, match=r"a plain batch of 2 rows cannot report the 3 samples"):
        sample_losses(np.array([1, 2, 3]), logits, labels, {})


def test_packed_rows_fold_per_document_like_loss_fold():
    item = _packed_item()
    logits = torch.randn(2, 4, 12)
    losses, present = sample_losses(np.array([3, 4]), logits, item["labels"], item)
    folded = fold_token_losses(np.array([3, 4]), token_losses(logits, item["labels"]), item["document_ids"],
                               item["loss_mask"])
    np.testing.assert_array_equal(losses, folded.losses)
    # shifted next-token losses, within each row: document 3 predicts one token, document 4 three
    assert present.tolist() == [True, True] and folded.tokens.tolist() == [1, 3]
    doc3 = torch.nn.functional.cross_entropy(logits[0, :1], item["input_ids"][0, 1:2])
    assert math.isclose(losses[0], float(doc3), rel_tol=1e-6)


def test_a_loader_state_file_per_rank_round_trips_and_refuses_another_world(tmp_path):
    states = {r: {"dataset": {"next_step": 10 + r}, "rank": r} for r in (0, 1)}
    for r in (0, 1):
        assert save_rank_state(tmp_path / "checkpoint-10", r, 2, states[r]) == state_path(tmp_path / "checkpoint-10", r)
    assert sorted(p.name for p in (tmp_path / "checkpoint-10").iterdir()) == ["croupier_loader.rank0.pt",
                                                                              "croupier_loader.rank1.pt"]
    assert [load_rank_state(tmp_path / "checkpoint-10", r, 2) for r in (0, 1)] == [states[0], states[1]]
    with pytest.raises(StateError, match=r"saved by rank 1 of world 2, loaded by rank 1 of world 4"):
        load_rank_state(tmp_path / "checkpoint-10", 1, 4)
    with pytest.raises(StateError, match=r"no croupier loader state for rank 2 \(croupier_loader.rank2.pt is missing"):
        load_rank_state(tmp_path / "checkpoint-10", 2, 4)


def test_counters_and_waits_for_the_log():
    stats = dict(steps=2, documents=5, tokens_in=90, tokens_packed=64, tokens_padding=0, tokens_dropped=20,
                 carry_dropped=0)
    packed = {"dataset": {}, "carry_tokens": [], "stats": stats}
    state = {"_snapshot": {"_worker_snapshots": {"worker_0": {"dataset_state": packed},
                                                 "worker_1": {"dataset_state": dict(packed)}}}}
    assert pack_counters(state) == {k: 2 * v for k, v in stats.items()}
    assert pack_counters({"dataset_state": {"next_step": 3}}) == {}
    assert wait_logs([0.5, 1.5]) == {"croupier/data_wait_s": 1.0, "croupier/data_wait_max_s": 1.5,
                                     "croupier/data_wait_total_s": 2.0}
    assert wait_logs([]) == {}


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                                          logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                                          per_device_train_batch_size=2, **kw)


def test_refusals_at_construction(tmp_path):
    embedded = CroupierIterableDataset.embedded(str(tmp_path / "ds"), global_batch=4, cache_dir=tmp_path / "c",
                                                policy="clusterclip", clip=2, topology=Topology(0, 1))
    with pytest.raises(ConfigError, match=r"report_losses=True: .*loss feedback \(serve --adapt\)"):
        CroupierTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=embedded, report_losses=True)
    with pytest.raises(ConfigError, match=r"^train_dataset must be a CroupierIterableDataset or PackedSequences "
                                          r"\(the rank's slices\), got TensorDataset$"):
        CroupierTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=torch.utils.data.TensorDataset())
    trainer = CroupierTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=embedded)
    assert trainer.args.ignore_data_skip  # the loader state is the position: no batch skipping on resume
    assert croupier_datasets(trainer.train_dataset) == (embedded, None)


class _Record(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.trainer: CroupierTrainer | None = None
        self.seen: list[tuple[int, int, list[int], list[int]]] = []

    def on_step_end(self, args, state, control, **kwargs):
        last = self.trainer.last_batch
        self.seen.append((state.global_step, last["step"], last["ids"].tolist(), last["input_ids"].flatten().tolist()))


def _trainer(tmp_path, data, tokenizer, record: _Record) -> CroupierTrainer:
    dataset = CroupierIterableDataset.embedded(str(data), global_batch=4, cache_dir=tmp_path / "cache",
                                               policy="clusterclip", clip=3, start_step=0, topology=Topology(0, 1))
    packed = PackedSequences(dataset, tokenizer=tokenizer, eos_id=tokenizer.sep_token_id, seq_len=16, rows=2)
    trainer = CroupierTrainer(model=_gpt2(len(tokenizer)), args=_args(tmp_path), train_dataset=packed)
    record.trainer = trainer
    trainer.add_callback(record)
    return trainer


def test_the_trainer_resumes_from_its_checkpoint_on_exactly_the_next_batch(tmp_path, build_dataset, tiny_tokenizer):
    """One process, an embedded job: 4 steps with checkpoints at 2 and 4; a new trainer resumed from
    checkpoint-2 trains steps 3 and 4 on the ids and tokens of the first run's steps 3 and 4."""
    data = build_dataset(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)
    first = _Record()
    trainer = _trainer(tmp_path, data, tokenizer, first)
    trainer.train()
    assert [s[:2] for s in first.seen] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert load_rank_state(tmp_path / "run" / "checkpoint-2", 0, 1)["dataset_state"]["dataset"]["next_step"] == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["croupier/steps"] for h in logged] == [2.0, 4.0]
    assert all(h["croupier/data_wait_max_s"] >= h["croupier/data_wait_s"] > 0 for h in logged)
    second = _Record()
    _trainer(tmp_path, data, tokenizer, second).train(resume_from_checkpoint=tmp_path / "run" / "checkpoint-2")
    assert second.seen == first.seen[2:]


class _Tokenize:
    """A data collator for plain samples: their text as padded rows, labels masked on padding."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        enc = self.tokenizer([s["text"] for s in samples], padding="max_length", truncation=True, max_length=16,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def _plain(tmp_path, data):
    return CroupierIterableDataset.embedded(str(data), global_batch=4, cache_dir=tmp_path / "cache",
                                            policy="clusterclip", clip=3, start_step=0, topology=Topology(0, 1))


@pytest.mark.parametrize("batch, error", [(4, None), (2, r"two batches in a row are of step 0: "
                                                         r"per_device_train_batch_size \(2\) is smaller than"),
                                          (8, r"a batch holds samples of steps \[0, 1\]")])
def test_plain_samples_train_one_whole_step_per_batch(tmp_path, build_dataset, tiny_tokenizer, batch, error):
    data = build_dataset(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer, local_files_only=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                                          per_device_train_batch_size=batch)
    trainer = CroupierTrainer(model=_gpt2(len(tokenizer)), args=args, train_dataset=_plain(tmp_path, data),
                              data_collator=_Tokenize(tokenizer))
    record = _Record()
    record.trainer = trainer
    trainer.add_callback(record)
    if error is not None:
        with pytest.raises(ConfigError, match=error):
            trainer.train()
        return
    trainer.train()
    dealt = [(step, [int(s["_croupier_id"]) for s in samples])
             for (step, samples), _ in zip(_plain(tmp_path, data).iter_steps(), range(2))]
    assert [(s[1], s[2]) for s in record.seen] == dealt
    assert [len(ids) for _, ids in dealt] == [4, 4]
