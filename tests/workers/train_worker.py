"""A small data-parallel training loop over croupier, run by torchrun in the multi-process tests.

Each rank reads its slices through `CroupierIterableDataset` + `DataLoader`, trains a tiny
linear model whose gradients are all-reduced over gloo (which keeps the ranks in step), and
appends one JSON line per step to <out>/records.rank<R>.jsonl: the step, the rank, the world,
the global ids it was dealt, and the `id`/`text` columns it decoded from the shards. Every
`--ckpt-every` steps every rank stores its dataset state as <ckpt>/rank<R>.step<S>.json.

With `--resume`, the ranks agree on the newest checkpoint step every rank has written (an
all-reduce MIN) and resume from it; a rank of a new world size with no file of its own reads
rank 0's (all ranks of a step share the same next step and token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.topology import Topology


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--stop-step", type=int, required=True)
    p.add_argument("--per-rank-batch", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-step", type=int, default=None, help="resume from this checkpoint step")
    p.add_argument("--token", default=None)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--attempt", type=int, default=0, help="launch number, recorded with every step")
    return p.parse_args()


def checkpoint_steps(ckpt: Path, rank: int) -> list[int]:
    pattern = re.compile(rf"rank{rank}\.step(\d+)\.json$")
    return sorted(int(m.group(1)) for f in ckpt.glob(f"rank{rank}.step*.json") if (m := pattern.search(f.name)))


def write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main() -> int:
    args = parse_args()
    dist.init_process_group("gloo")
    topo = Topology.detect()
    out, ckpt = Path(args.out), Path(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    (out / f"pid.rank{topo.rank}").write_text(str(os.getpid()))

    ds = CroupierIterableDataset(args.server, args.job, cache_dir=args.cache, topology=topo,
                                 token=args.token, lookahead=args.lookahead, start_step=0)
    start = 0
    if args.resume:
        if args.resume_step is not None:
            start = args.resume_step
        else:
            mine = checkpoint_steps(ckpt, topo.rank) or checkpoint_steps(ckpt, 0)
            latest = torch.tensor([mine[-1] if mine else 0], dtype=torch.int64)
            dist.all_reduce(latest, op=dist.ReduceOp.MIN)
            start = int(latest.item())
        if start > 0:
            source = ckpt / f"rank{topo.rank}.step{start}.json"
            if not source.exists():
                source = ckpt / f"rank0.step{start}.json"
            ds.load_state_dict(json.loads(source.read_text()))
    ds.steps = args.stop_step - start

    loader = DataLoader(ds, batch_size=args.per_rank_batch, num_workers=0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    restart = args.attempt
    with (out / f"records.rank{topo.rank}.jsonl").open("a") as records:
        for batch in loader:
            steps = batch[STEP_KEY].tolist()
            step = steps[0]
            ids = batch[ID_KEY].tolist()
            features = torch.stack([batch["id"].float() / 1000.0,
                                    torch.tensor([len(t) / 100.0 for t in batch["text"]])], dim=1)
            loss = model(features).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
            records.write(json.dumps({
                "step": step, "steps": steps, "rank": topo.rank, "world": topo.world, "ids": ids,
                "col_id": batch["id"].tolist(), "text": list(batch["text"]), "restart": restart,
            }) + "\n")
            records.flush()
            if (step + 1) % args.ckpt_every == 0:
                state = ds.state_dict(next_step=step + 1, checkpoint=True)
                write_atomic(ckpt / f"rank{topo.rank}.step{step + 1}.json", state)
            if args.step_sleep:
                time.sleep(args.step_sleep)
    ds.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
