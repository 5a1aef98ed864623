"""Where a rank sits in the job: a frozen value object, with environment detection apart.

The global batch of every step is fixed by the sampler; a `Topology` only decides which
contiguous slice of it a rank reads. Tests build any world directly, without env vars.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from croupier.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """Rank `rank` of `world` ranks; `local_rank` is the rank's index on its node."""

    rank: int
    world: int
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world}")
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is outside the world [0, {self.world})")
        if self.local_rank < 0:
            raise ConfigError(f"local rank must be >= 0, got {self.local_rank}")

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> Topology:
        """Reads torchrun's RANK, WORLD_SIZE and LOCAL_RANK (defaults: a single rank)."""
        env = os.environ if env is None else env
        try:
            rank = int(env.get("RANK", "0"))
            world = int(env.get("WORLD_SIZE", "1"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
        return cls(rank=rank, world=world, local_rank=local_rank)

    @classmethod
    def data_parallel(cls, env: Mapping[str, str] | None = None, *, tensor: int = 1, pipeline: int = 1,
                      context: int = 1) -> Topology:
        """The data-parallel rank and size of this process, from torchrun's env and the parallel sizes.

        With tensor, context or pipeline parallelism the ranks of one data-parallel group must
        read the same slice, so croupier's world is the data-parallel size. The mapping is the
        default layout of Megatron-LM and torchtitan: tensor-parallel innermost, then context,
        then data, pipeline outermost, i.e. global rank g has data-parallel rank
        (g // (tensor * context)) % dp_size with dp_size = WORLD_SIZE / (tensor * context * pipeline).
        Another layout passes `Topology(dp_rank, dp_size)` itself.
        """
        base = cls.detect(env)
        for name, size in (("tensor", tensor), ("pipeline", pipeline), ("context", context)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"{name}-parallel size must be an int >= 1, got {size!r}")
        model = tensor * pipeline * context
        if base.world % model:
            raise ConfigError(f"world size {base.world} is not divisible by tensor x context x pipeline = "
                              f"{tensor} x {context} x {pipeline} = {model}")
        dp_size = base.world // model
        return cls(rank=(base.rank // (tensor * context)) % dp_size, world=dp_size, local_rank=base.local_rank)

    def slice_bounds(self, global_batch: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous slice of a global batch."""
        per_rank = per_rank_batch(global_batch, self.world)
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def slice(self, batch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch (a view, no copy)."""
        start, stop = self.slice_bounds(len(batch))
        return batch[start:stop]


def per_rank_batch(global_batch: int, world: int) -> int:
    """Samples per rank per step; refuses a global batch that does not split evenly."""
    if global_batch < 1:
        raise ConfigError(f"global batch must be >= 1, got {global_batch}")
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    if global_batch % world:
        raise ConfigError(f"global batch {global_batch} is not divisible by world size {world}")
    return global_batch // world
