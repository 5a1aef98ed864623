"""A trainer to copy: a causal LM from a Hugging Face config on packed sequences served by croupier.

    torchrun --nproc_per_node 2 -m croupier.apps.train_example --server HOST:PORT --job JOB \
        --tokenizer TOKENIZER_DIR --cache CACHE --run-dir RUN --steps 100 [--resume]

What it shows, in the shape torchtitan and torchtune use:
- data-parallel ranks from torchrun's env (`Topology.data_parallel`, with --tensor-parallel
  for models split over several ranks: those ranks then read the same slice);
- `PackedSequences`: every rank gets exactly --rows x --seq-len tokens every step (equal
  shapes, as DDP and FSDP need), with per-document position resets and padding masked;
- torchdata's `StatefulDataLoader` with DataLoader workers: `loader.state_dict()` is cheap
  (no server call) and is saved with the model and optimizer every --ckpt-every steps;
- DDP over gloo (CPU) or NCCL (GPU), and a checkpoint per rank with plain `torch.save`
  (model and optimizer from rank 0, loader state from every rank), written atomically;
- `--resume` continues from the newest checkpoint: the same batches, token for token, and
  (on CPU) the same losses as an uninterrupted run.

Per step every rank appends {"step", "rank", "loss", "tokens"} to RUN/log.rank<R>.jsonl, with
"tokens" a hash of its input ids, so a run can be compared with another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from croupier.client.dataset import STEP_KEY, CroupierIterableDataset
from croupier.client.packing import PackedSequences
from croupier.format.atomic import atomic_path
from croupier.tokenizer import load_tokenizer
from croupier.topology import Topology


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun -m croupier.apps.train_example", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="sampler server HOST:PORT")
    p.add_argument("--job", default="default")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder (loaded offline)")
    p.add_argument("--cache", required=True, help="local shard cache root")
    p.add_argument("--run-dir", required=True, help="logs and checkpoints")
    p.add_argument("--steps", type=int, required=True, help="train until this step (exclusive)")
    p.add_argument("--stop-after", type=int, default=None, help="exit without a word after this step (a crash)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=2, help="rows per rank per step")
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def build_model(vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    """A small Llama-style causal LM from a config (no weights downloaded)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=max(args.seq_len, 128))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        return _train(args)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    rank = dist.get_rank()
    run = Path(args.run_dir)
    ckpt_dir = run / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    topology = Topology.data_parallel(tensor=args.tensor_parallel)
    dataset = CroupierIterableDataset(args.server, args.job, cache_dir=args.cache, topology=topology,
                                      steps=args.steps, start_step=0)
    packed = PackedSequences(dataset, tokenizer=tokenizer, eos_id=eos, seq_len=args.seq_len, rows=args.rows)
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(packed, batch_size=None, num_workers=args.workers)
    model = build_model(len(tokenizer), args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.resume:
        marker = ckpt_dir / "latest.json"
        if marker.exists():
            at = json.loads(marker.read_text())["step"]
            shared = torch.load(ckpt_dir / f"model.{at}.pt", weights_only=False)
            model.load_state_dict(shared["model"])
            optimizer.load_state_dict(shared["optimizer"])
            loader.load_state_dict(torch.load(ckpt_dir / f"loader.{at}.rank{rank}.pt", weights_only=False))
    ddp = DistributedDataParallel(model)
    log = open(run / f"log.rank{rank}.jsonl", "a")
    try:
        for item in loader:
            step = int(item[STEP_KEY])
            out = ddp(input_ids=item["input_ids"], position_ids=item["position_ids"], labels=item["labels"])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            digest = hashlib.sha1(item["input_ids"].numpy().tobytes()).hexdigest()[:16]
            log.write(json.dumps({"step": step, "rank": rank, "loss": float(out.loss), "tokens": digest}) + "\n")
            log.flush()
            if (step + 1) % args.ckpt_every == 0:
                _checkpoint(ckpt_dir, step + 1, rank, model, optimizer, loader.state_dict())
            if args.stop_after is not None and step >= args.stop_after:
                log.close()
                os._exit(1)  # a crash: no clean shutdown, nothing flushed beyond what was saved
    finally:
        log.close()
    return 0


def _checkpoint(ckpt_dir: Path, step: int, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loader_state: dict) -> None:
    """Every rank saves its loader state; rank 0 the model and optimizer; then the marker."""
    with atomic_path(ckpt_dir / f"loader.{step}.rank{rank}.pt") as tmp:
        torch.save(loader_state, tmp)
    if rank == 0:
        with atomic_path(ckpt_dir / f"model.{step}.pt") as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    dist.barrier()  # the marker names a step only once every rank's part is on disk
    if rank == 0:
        with atomic_path(ckpt_dir / "latest.json") as tmp:
            tmp.write_text(json.dumps({"step": step}))


if __name__ == "__main__":
    raise SystemExit(main())
