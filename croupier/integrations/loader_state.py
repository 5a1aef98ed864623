"""One loader-state file per rank in a trainer's checkpoint folder.

Frameworks save what rank 0 holds (model, optimizer) or what every rank holds alike (RNG
states per process); a croupier loader's position is different on every rank — each reads
its own slice — so every rank writes its own file, `croupier_loader.rank<R>.pt`, beside the
framework's. The file records the rank and world it was saved by: a resume on another world
size is refused here (the per-rank positions then name other ranks' slices); resume such a
run through a global step instead (`CroupierIterableDataset.state_dict(next_step)`).

Writes are atomic (a temporary file renamed into place), so a crash leaves either the old
file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from croupier.errors import StateError
from croupier.format.atomic import atomic_path

STATE_FILE = "croupier_loader.rank{rank}.pt"
FILE_VERSION = 1


def state_path(folder: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank`'s loader state lives in a checkpoint folder."""
    return Path(folder) / STATE_FILE.format(rank=rank)


def save_rank_state(folder: str | os.PathLike, rank: int, world: int, state: Any) -> Path:
    """Writes this rank's loader state into `folder` (created if needed); returns the file."""
    path = state_path(folder, rank)
    with atomic_path(path) as tmp:
        torch.save({"version": FILE_VERSION, "rank": rank, "world": world, "loader": state}, tmp)
    return path


def load_rank_state(folder: str | os.PathLike, rank: int, world: int) -> Any:
    """This rank's loader state from `folder`; refuses a missing file or another rank or world."""
    path = state_path(folder, rank)
    if not path.is_file():
        raise StateError(f"checkpoint {os.fspath(folder)!r} holds no croupier loader state for rank {rank} "
                         f"({path.name} is missing): it was not saved by a croupier adapter, or the save did not "
                         f"finish")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or saved.get("version") != FILE_VERSION:
        raise StateError(f"{path}: loader state file version {getattr(saved, 'get', lambda k: None)('version')!r} "
                         f"is not supported (expected {FILE_VERSION})")
    if (saved["rank"], saved["world"]) != (rank, world):
        raise StateError(f"{path}: saved by rank {saved['rank']} of world {saved['world']}, loaded by rank {rank} "
                         f"of world {world}: resume on the same world size")
    return saved["loader"]
