"""croupier's packed slices through the torchtitan adapter, checkpointed as torchtitan does.

    torchrun --nproc_per_node 2 torchtitan_train.py --dataset DS --cache /tmp/cache \
        --tokenizer TOK --global-batch 8 --steps 20 --ckpt-dir ckpt
    torchrun --nproc_per_node 1 torchtitan_train.py ... --resume ckpt/step-10   # DP degree 2 -> 1

Every rank is one data-parallel rank (gloo on CPU, DDP). The loader is torchtitan 0.3's
`config.dataloader.build(dp_world_size=, dp_rank=, tokenizer=, seq_len=, local_batch_size=)`
on `CroupierTitanDataLoader.Config` (embedded dealing over `--dataset`), with torchtitan's own
`HuggingFaceTokenizer`. The model is a 1-layer GPT-2 from a config, fed torchtitan's batch
(`input`, `positions`; labels already shifted). Every `--ckpt-every` steps the states go into
a DCP checkpoint the way torchtitan's checkpointer saves them (`{"dataloader": loader,
"model": ..., "train_state": ...}` with `dcp.save`; `dcp.load` on resume), so each DP rank's
loader entry is its own `dp_rank_{r}` key. torchtitan's trainer itself needs a CUDA device
(`utils.device_module.set_device`), so this loop stands in for it on CPU.

`--records FILE` appends one JSON line per trained step and rank (the documents of the batch,
a hash of its tokens, the loader's metrics), `--crash-at-step N` ends every rank with
`os._exit` once N steps are trained: tests/e2e/test_torchtitan_loader.py uses both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.metrics import TensorBoardLogger
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from croupier.integrations.torchtitan import CroupierTitanDataLoader


class TrainState(Stateful):
    """The step counter, saved beside the loader (torchtitan's `train_state`)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder (tokenizer.json)")
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", default="3")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--local-batch-size", type=int, default=2, help="rows of seq_len tokens per DP rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--resume", help="a DCP checkpoint folder to resume from")
    p.add_argument("--records")
    p.add_argument("--tensorboard", help="log the loader metrics with torchtitan's TensorBoardLogger here")
    p.add_argument("--crash-at-step", type=int)
    p.add_argument("--attempt", type=int, default=0)
    args = p.parse_args()

    dist.init_process_group("gloo")
    if args.records:
        os.makedirs(os.path.dirname(os.path.abspath(args.records)), exist_ok=True)
    dp_rank, dp_world = dist.get_rank(), dist.get_world_size()
    tokenizer = HuggingFaceTokenizer(tokenizer_path=args.tokenizer)
    config = CroupierTitanDataLoader.Config(dataset_path=args.dataset, cache_dir=args.cache,
                                            global_batch=args.global_batch, seed=args.seed, clip=args.clip,
                                            eos_id=args.eos_id)
    loader = config.build(dp_world_size=dp_world, dp_rank=dp_rank, tokenizer=tokenizer, seq_len=args.seq_len,
                          local_batch_size=args.local_batch_size, snapshot_every_n_steps=args.ckpt_every)
    torch.manual_seed(0)
    vocab = tokenizer.tokenizer.get_vocab_size()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_layer=1, n_embd=32, n_head=2,
                                                                 n_positions=args.seq_len))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = TrainState()
    if args.resume:
        dcp.load({"dataloader": loader, "model": model.state_dict(), "train_state": train},
                 checkpoint_id=args.resume)
    metrics_logger = TensorBoardLogger(args.tensorboard) if args.tensorboard else None
    data = iter(loader)
    while train.step < args.steps:
        if args.crash_at_step is not None and train.step == args.crash_at_step:
            os._exit(3)
        inputs, labels = next(data)
        logits = ddp(input_ids=inputs["input"], position_ids=inputs["positions"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.step += 1
        metrics = loader.metrics()
        if metrics_logger is not None:
            metrics_logger.log(metrics, train.step)
        if args.records:
            digest = hashlib.sha256(inputs["input"].numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
            with open(f"{args.records}.rank{dp_rank}", "a") as f:
                f.write(json.dumps({"step": loader.next_step - 1, "train_step": train.step, "rank": dp_rank,
                                    "world": dp_world, "docs": loader.last_document_ids, "tokens": digest,
                                    "attempt": args.attempt, "metrics": metrics,
                                    "carry_dropped_on_resume": loader.carry_dropped_on_resume,
                                    "resumed_from_degree": loader.resumed_from_degree}) + "\n")
        if train.step % args.ckpt_every == 0:
            dcp.save({"dataloader": loader, "model": model.state_dict(), "train_state": train},
                     checkpoint_id=os.path.join(args.ckpt_dir, f"step-{train.step}"))
    if metrics_logger is not None:
        metrics_logger.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
