"""`croupier report` on a job dealt in tokens: the token dealer rebuilt from the state directory.

A checkpoint of a job dealt in tokens holds its token dealer's state (fingerprint `tok:` or
`tokmix:`), which only a dealer of the same stream loads: the document sampler of the job's
dataset or mixture, its per-sample token counts, the job's token schedule (`server.json`
names it) and the documents per draw (the checkpoint's global batch). The report then shows
the document draws per cluster as for any job and, for a token-exact mixture, every source's
stream tokens dealt against its target. Draws over time are not replayed for token jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from croupier.errors import ConfigError

__all__ = ["is_token_state", "token_dealer"]

TOKEN_KINDS = ("tok:", "tokmix:")


def is_token_state(fingerprint: str) -> bool:
    """Whether a checkpoint's sampler state is a token dealer's."""
    return fingerprint.startswith(TOKEN_KINDS)


def token_dealer(state_dir: Path, ck: Any, *, mix: str | None = None, dataset: str | None = None,
                 selection: str = "") -> Any:
    """The job's token dealer at its checkpoint `ck` (a `state_dir.Checkpoint`), over `mix` or
    `dataset`; ConfigError when server.json names no schedule or a source has no token counts;
    FingerprintMismatch when the inputs are not the job's."""
    import numpy as np

    from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule

    try:
        schedule = json.loads((state_dir / "server.json").read_text()).get("token_schedule", "")
    except (OSError, ValueError):
        schedule = ""
    if not schedule:
        raise ConfigError(f"state directory {state_dir} holds a job dealt in tokens and its server.json names no "
                          "token schedule")
    chunk, seed = ck.meta.global_batch, ck.meta.seed
    if mix:
        from croupier.mixture import load_mix
        from croupier.server.sampling.mixture import mixture_sampler

        m = load_mix(mix)
        pieces = m.token_counts_by_offset()
        if pieces is None:
            raise ConfigError(f"--mix {mix}: a job dealt in tokens needs token counts in every source's sidecar")
        dealer = TokenDealer(lambda: mixture_sampler(m, chunk, seed), pieces, TokenSchedule.parse(schedule), chunk)
    else:
        from croupier.datasets import open_dataset
        from croupier.server.sampling.policy import PolicyConfig
        from croupier.server.sampling.sampler import Sampler

        assert dataset is not None
        side = open_dataset(dataset)
        counts = side.token_counts()
        if counts is None:
            raise ConfigError(f"dataset {dataset} has no per-sample token counts (the job was dealt in tokens)")
        layout, config = side.layout(selection or None), PolicyConfig.from_dict(ck.meta.policy)
        dealer = TokenDealer(lambda: Sampler(layout, config, chunk, seed), [(0, np.asarray(counts))],
                             TokenSchedule.parse(schedule), chunk)
    dealer.load_state(ck.state)  # checks the fingerprint: the inputs given are the job's
    return dealer
