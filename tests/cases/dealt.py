"""What a dealing test compares: a rank's slices as `croupier simulate --format jsonl --rank R
--world W` prints them, and samples read back grouped by step."""

from __future__ import annotations

import io
import json

from croupier.client.dataset import ID_KEY, STEP_KEY
from croupier.server.cli.simulate_cli import simulate
from croupier.topology import Topology


def simulated(sampler, steps: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """(step, ids) of rank's slices over `steps` steps of `sampler`."""
    out = io.StringIO()
    simulate(sampler, steps, out, Topology(rank=rank, world=world))
    return [(d["step"], d["indices"]) for d in map(json.loads, out.getvalue().splitlines())]


def by_step(samples: list[dict]) -> list[tuple[int, list[int]]]:
    """(step, ids) of samples a dataset yielded, in step order."""
    steps: dict[int, list[int]] = {}
    for s in samples:
        steps.setdefault(s[STEP_KEY], []).append(s[ID_KEY])
    return sorted(steps.items())
