"""`CroupierDataModule` in-process: why the state must be rank-independent (Lightning saves
rank 0's loader state, a prefetched batch ahead), the state it saves instead (the global next
step of the batch the trainer took) restoring any rank exactly, the data wait and counters in
Lightning's logged metrics, and the refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.errors import ConfigError, StateError
from croupier.integrations.lightning import CroupierDataModule, CroupierLogCallback, batch_step
from croupier.topology import Topology

B, SEED = 8, 2


@pytest.fixture(scope="module")
def ds_dir(build_dataset, tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("lightning"))


def dataset(ds_dir, tmp_path, rank: int = 0, world: int = 1) -> CroupierIterableDataset:
    return CroupierIterableDataset.embedded(ds_dir, global_batch=B, cache_dir=tmp_path / "cache", seed=SEED, clip=3,
                                            topology=Topology(rank, world))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {STEP_KEY: torch.tensor([s[STEP_KEY] for s in samples]), ID_KEY: torch.tensor([s[ID_KEY] for s in samples])}


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch[ID_KEY] if ID_KEY in batch else batch["input_ids"]  # a packer's batch: its tokens
        self.seen.append(ids.tolist())
        return self.layer(ids.float().reshape(-1, 1) / 1000).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, data, steps: int, ckpt_path=None, callbacks=()) -> tuple[Tiny, pl.Trainer]:
    model = Tiny()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         callbacks=[*callbacks, pl.callbacks.ModelCheckpoint(
                             dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)])
    trainer.fit(model, train_dataloaders=data if isinstance(data, StatefulDataLoader) else None,
                datamodule=data if isinstance(data, CroupierDataModule) else None, ckpt_path=ckpt_path)
    return model, trainer


def test_lightning_saves_a_loader_state_one_prefetched_batch_ahead(ds_dir, tmp_path):
    """The reason for a state of our own: at the step-3 checkpoint the plain loader had yielded 4 batches."""
    loader = StatefulDataLoader(dataset(ds_dir, tmp_path), batch_size=B, collate_fn=collate)
    fit(tmp_path, loader, 3)
    ckpt = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["_num_yielded"] == 4
    assert state["dataset_state"]["next_step"] == 4


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
def test_resume_from_a_lightning_checkpoint_is_exact_and_logs_the_data_wait(ds_dir, tmp_path):
    whole, _ = fit(tmp_path / "a", CroupierDataModule(dataset(ds_dir, tmp_path), batch_size=B, collate_fn=collate), 6)
    data = CroupierDataModule(dataset(ds_dir, tmp_path), batch_size=B, collate_fn=collate)
    first, trainer = fit(tmp_path / "b", data, 3, callbacks=[CroupierLogCallback()])
    assert {"croupier/data_wait_s", "croupier/step", "croupier/samples"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["croupier/samples"].item() == 3 * B
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "step=3.ckpt", weights_only=False)
    assert ckpt["CroupierDataModule"]["next_step"] == 3
    (loader_state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["next_step"] == 3  # the loader's entry holds the same global state
    later = CroupierDataModule(lambda topo: dataset(ds_dir, tmp_path, topo.rank, topo.world), batch_size=B,
                               collate_fn=collate)  # a factory: built in setup() for the trainer's rank
    again, _ = fit(tmp_path / "b", later, 6, ckpt_path=tmp_path / "b" / "ckpt" / "step=3.ckpt")
    assert first.seen + again.seen == whole.seen and len(whole.seen) == 6


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
def test_packed_rows_resume_exactly(ds_dir, tmp_path, tiny_tokenizer):
    from croupier.client.packing import PackedSequences

    def module() -> CroupierDataModule:
        return CroupierDataModule(PackedSequences(dataset(ds_dir, tmp_path), seq_len=64, rows=2, max_carry=0,
                                                  tokenizer=str(tiny_tokenizer), eos_id=102), batch_size=None)

    whole, _ = fit(tmp_path / "a", module(), 5)
    first, _ = fit(tmp_path / "b", module(), 3)
    again, _ = fit(tmp_path / "b", module(), 5, ckpt_path=tmp_path / "b" / "ckpt" / "step=3.ckpt")
    assert first.seen + again.seen == whole.seen and len(whole.seen) == 5


def test_rank_zeros_state_resumes_every_rank_exactly(ds_dir, tmp_path):
    """What Lightning does with 2 ranks: rank 0's state is loaded into rank 1, which must continue its own slice."""
    def module(rank: int) -> CroupierDataModule:
        return CroupierDataModule(dataset(ds_dir, tmp_path, rank, 2), batch_size=B // 2, collate_fn=collate)

    ref = {r: [b[ID_KEY].tolist() for _, b in zip(range(6), module(r).train_dataloader())] for r in (0, 1)}
    rank0 = module(0)
    it = iter(rank0.train_dataloader())
    for _ in range(4):
        rank0.on_before_batch_transfer(next(it), 0)  # the trainer takes 4 steps; the fetcher is ahead
    next(it)
    saved = rank0.state_dict()
    assert saved["next_step"] == 4
    for r in (0, 1):
        restored = module(r)
        restored.load_state_dict(saved)
        loader = restored.train_dataloader()
        loader.load_state_dict(saved)  # Lightning's combined_loader entry, from rank 0
        got = [restored.on_before_batch_transfer(b, 0)[ID_KEY].tolist() for _, b in zip(range(2), loader)]
        assert got == ref[r][4:]


def test_refusals(ds_dir, tmp_path, tiny_tokenizer):
    from croupier.client.packing import PackedSequences

    ds = dataset(ds_dir, tmp_path)
    with pytest.raises(ConfigError, match="max_carry=8: Lightning saves rank 0's loader state only"):
        CroupierDataModule(PackedSequences(ds, seq_len=8, rows=1, tokenizer=str(tiny_tokenizer), eos_id=102),
                           batch_size=None)
    packed = PackedSequences(ds, seq_len=8, rows=1, tokenizer=str(tiny_tokenizer), eos_id=102, max_carry=0)
    with pytest.raises(ConfigError, match="batch_size=4 with PackedSequences"):
        CroupierDataModule(packed, batch_size=4)
    assert CroupierDataModule(packed, batch_size=None).inner is ds
    with pytest.raises(ConfigError, match="batch_size must be the per-rank batch"):
        CroupierDataModule(ds, batch_size=None)
    with pytest.raises(ConfigError, match="takes a CroupierIterableDataset or PackedSequences"):
        CroupierDataModule([1, 2], batch_size=2)
    with pytest.raises(ConfigError, match=r"a batch mixes steps \[3, 4\]"):
        batch_step({STEP_KEY: torch.tensor([3, 4])})
    assert batch_step({STEP_KEY: 7}) == 7
    with pytest.raises(ConfigError, match="the dataset factory is called in setup"):
        CroupierDataModule(lambda topo: ds, batch_size=B).train_dataloader()
    data = CroupierDataModule(ds, batch_size=B)
    with pytest.raises(StateError, match="version 9 is not supported"):
        data.load_state_dict({"version": 9})
    with pytest.raises(StateError, match="next_step must be None or an int >= 0, got -1"):
        data.load_state_dict({"version": 1, "next_step": -1, "dataset": {}})
    data.on_before_batch_transfer({STEP_KEY: torch.tensor([2, 2])}, 0)
    with pytest.raises(StateError, match="took step 4 after step 2"):
        data.on_before_batch_transfer({STEP_KEY: torch.tensor([4, 4])}, 0)
