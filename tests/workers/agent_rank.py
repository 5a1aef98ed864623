"""One trainer rank reading through its node's agent, run as a real process by the agent tests.

The rank (RANK / WORLD_SIZE from the environment, CROUPIER_AGENT naming its node's agent)
iterates `CroupierIterableDataset` in a DataLoader with `--workers` worker processes, one
batch per step, and appends one JSON line per step to <out>/records.rank<R>.jsonl: the step,
the global ids and the decoded `id` / `text` columns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader

from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.topology import Topology


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--per-rank-batch", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    topo = Topology.detect()
    ds = CroupierIterableDataset("agent", args.job, topology=topo, steps=args.steps, start_step=args.start_step,
                                 lookahead=4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"records.rank{topo.rank}.jsonl", "a") as f:
        for batch in DataLoader(ds, batch_size=args.per_rank_batch, num_workers=args.workers):
            steps = batch[STEP_KEY].tolist()
            assert len(set(steps)) == 1, steps
            f.write(json.dumps({"step": steps[0], "rank": topo.rank, "ids": batch[ID_KEY].tolist(),
                                "id": batch["id"].tolist(), "text": list(batch["text"])}) + "\n")
            f.flush()
    ds.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
