"""The demo's training worker: one torchrun rank training the tiny LM on croupier's slices.

    torchrun --nproc_per_node 2 -m croupier.apps.demo_train --server HOST:PORT --job demo \
        --cache CACHE --run-dir RUN --stop-step 150 [--resume]

Each rank reads its slice of every global batch through `CroupierIterableDataset` and a
`DataLoader` (one DataLoader batch = one step's slice), encodes the texts as bytes and takes
one data-parallel step (gradients averaged over gloo by DistributedDataParallel). Per step,
every rank appends {"step", "rank", "ids", "loss"} to RUN/records.rank<R>.jsonl, which the
demo uses to check that what the ranks trained on is exactly the server's sequence.

At `--stop-step` every rank stores its dataset state (the server checkpoint token included)
and rank 0 stores the model and optimizer in RUN/ckpt/; `--resume` continues from there, on
a restarted server, at the step the checkpoint names.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from croupier.apps.tinylm import TinyLMConfig, build_model, encode, make_optimizer, train_step
from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.format.atomic import atomic_path, write_json_atomic
from croupier.topology import Topology

CKPT_DIR = "ckpt"
MODEL_FILE = "model.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m croupier.apps.demo_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="sampler server HOST:PORT")
    p.add_argument("--job", default="demo")
    p.add_argument("--cache", required=True, help="local shard cache root")
    p.add_argument("--run-dir", required=True, help="run folder (records, checkpoints)")
    p.add_argument("--stop-step", type=int, required=True, help="train steps < this, then checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from RUN/ckpt")
    p.add_argument("--text-field", default="text")
    p.add_argument("--context", type=int, default=TinyLMConfig.context)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--lookahead", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        return _train(args)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    topo = Topology.detect()
    run = Path(args.run_dir)
    ckpt = run / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    with (run / "pids.txt").open("a") as f:  # lets the launcher check nothing outlives the run
        f.write(f"{os.getpid()}\n")

    cfg = TinyLMConfig(context=args.context)
    model = build_model(cfg, seed=args.seed)
    optimizer = make_optimizer(model, lr=args.lr)
    ds = CroupierIterableDataset(args.server, args.job, cache_dir=args.cache, topology=topo,
                                 lookahead=args.lookahead, start_step=0)
    start = 0
    if args.resume:
        saved = torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state_file = ckpt / f"data.rank{topo.rank}.json"
        if not state_file.exists():  # a new world size: every rank's state names the same step
            state_file = ckpt / "data.rank0.json"
        state = json.loads(state_file.read_text())
        ds.load_state_dict(state)
        start = int(state["next_step"])
        if start != int(saved["next_step"]):
            raise RuntimeError(f"model checkpoint is at step {saved['next_step']}, data state at {start}")
    if args.stop_step <= start:
        raise SystemExit(f"stop step {args.stop_step} is not after the resume step {start}")
    ds.steps = args.stop_step - start
    ddp = DistributedDataParallel(model)
    loader = DataLoader(ds, batch_size=None, num_workers=0)  # batching by step below

    records = (run / f"records.rank{topo.rank}.jsonl").open("a", encoding="utf-8")
    step_texts: list[str] = []
    step_ids: list[int] = []
    current = None
    next_step = start
    t0 = time.perf_counter()

    def flush(step: int) -> None:
        examples = encode(step_texts, cfg.context)
        value = train_step(ddp, optimizer, examples)
        records.write(json.dumps({"step": step, "rank": topo.rank, "ids": step_ids, "loss": round(value, 5),
                                  "t": round(time.perf_counter() - t0, 3)}) + "\n")
        records.flush()

    try:
        for sample in loader:
            step = int(sample[STEP_KEY])
            if current is not None and step != current:
                flush(current)
                step_texts.clear()
                step_ids.clear()
            current = step
            step_texts.append(str(sample[args.text_field]))
            step_ids.append(int(sample[ID_KEY]))
        if current is not None:
            flush(current)
            next_step = current + 1
    finally:
        records.close()
    if next_step != args.stop_step:
        raise RuntimeError(f"rank {topo.rank} stopped at step {next_step}, expected {args.stop_step} "
                           "(the sequence ended early: the clip exhausted every cluster?)")

    state = ds.state_dict(next_step=next_step, checkpoint=True)
    write_json_atomic(ckpt / f"data.rank{topo.rank}.json", state, indent=None)
    ds.close()
    if topo.rank == 0:
        with atomic_path(ckpt / MODEL_FILE) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "config": cfg.to_dict(), "next_step": next_step}, tmp)
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
