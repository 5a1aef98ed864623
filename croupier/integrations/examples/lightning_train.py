"""A tiny causal LM trained by Lightning on croupier's slices; every rank resumes exactly.

    torchrun --nproc_per_node 2 lightning_train.py --dataset DS --cache /tmp/cache \
        --tokenizer TOK --global-batch 8 --steps 20 --ckpt-dir ckpt
    torchrun --nproc_per_node 2 lightning_train.py ... --resume ckpt/step=10.ckpt
    python lightning_train.py --devices 2 ...        # Lightning's own launcher

The data is `CroupierIterableDataset.embedded(DS, ...)` (no server), or a `croupier serve` job
with `--server HOST:PORT --job NAME`. The model is a 1-layer GPT-2 built from a config (no
download). Lightning's own `ModelCheckpoint` saves every `--ckpt-every` steps; the resume is
Lightning's `ckpt_path`. `--records FILE` appends one JSON line per trained step and rank (the
global ids), and `--crash-at-step N` ends every rank with `os._exit` before step N+1 is trained:
the two make the crash-and-resume drill of tests/e2e/test_lightning_trainer.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import transformers

from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.integrations.lightning import CroupierDataModule, CroupierLogCallback
from croupier.topology import Topology


class Collate:
    """Texts -> padded token ids (labels -100 on padding), keeping croupier's step and ids."""

    def __init__(self, tokenizer: str, max_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self._tok: Any = None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self._tok is None:
            self._tok = transformers.AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)
        enc = self._tok([s["text"] for s in samples], padding="max_length", truncation=True,
                        max_length=self.max_len, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                STEP_KEY: torch.tensor([s[STEP_KEY] for s in samples]),
                ID_KEY: torch.tensor([s[ID_KEY] for s in samples])}


class TinyLM(pl.LightningModule):
    def __init__(self, vocab: int, records: str | None, attempt: int) -> None:
        super().__init__()
        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_layer=1, n_embd=32, n_head=2, n_positions=128))
        self.records = records
        self.attempt = attempt

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"])
        if self.records:
            with open(f"{self.records}.rank{self.global_rank}", "a") as f:
                f.write(json.dumps({"step": int(batch[STEP_KEY][0]), "rank": self.global_rank,
                                    "global_step": self.global_step, "ids": batch[ID_KEY].tolist(),
                                    "attempt": self.attempt}) + "\n")
        self.log("loss", out.loss, on_step=True, batch_size=len(batch[ID_KEY]))
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class CrashAt(pl.Callback):
    """Ends the process, as a node failure would, once `step` steps are trained."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="a built dataset folder (embedded dealing)")
    p.add_argument("--server", help="HOST:PORT of `croupier serve` (instead of --dataset)")
    p.add_argument("--job", default="default")
    p.add_argument("--cache", required=True)
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="clusterclip")
    p.add_argument("--clip", default="3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--devices", type=int, default=None,
                   help="processes on this machine (default: torchrun's WORLD_SIZE, else 1); "
                        "without torchrun, Lightning's own launcher starts them")
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--resume", help="a Lightning checkpoint to resume from")
    p.add_argument("--records")
    p.add_argument("--crash-at-step", type=int)
    p.add_argument("--attempt", type=int, default=0)
    args = p.parse_args()

    world = args.devices or int(os.environ.get("WORLD_SIZE", "1"))

    def make_dataset(topo: Topology) -> CroupierIterableDataset:  # called in each rank's setup()
        if args.server:
            return CroupierIterableDataset(args.server, args.job, cache_dir=args.cache, topology=topo, start_step=0)
        return CroupierIterableDataset.embedded(args.dataset, global_batch=args.global_batch, cache_dir=args.cache,
                                                policy=args.policy, clip=int(args.clip) if args.clip.isdigit()
                                                else args.clip, seed=args.seed, topology=topo)

    data = CroupierDataModule(make_dataset, batch_size=args.global_batch // world, num_workers=args.workers,
                              collate_fn=Collate(args.tokenizer, args.max_len))
    pl.seed_everything(0, verbose=False)
    vocab = len(transformers.AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True))
    model = TinyLM(vocab, args.records, args.attempt)
    callbacks: list[pl.Callback] = [
        CroupierLogCallback(),
        pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, filename="{step}", every_n_train_steps=args.ckpt_every,
                                     save_top_k=-1, save_on_train_epoch_end=False)]
    if args.crash_at_step is not None:
        callbacks.insert(0, CrashAt(args.crash_at_step))
    trainer = pl.Trainer(accelerator="cpu", devices=world, num_nodes=1,
                         strategy="ddp" if world > 1 else "auto", max_steps=args.steps,
                         logger=pl.loggers.CSVLogger(str(Path(args.ckpt_dir).parent), name="logs"),
                         callbacks=callbacks, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
