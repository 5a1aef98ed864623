"""Where a cluster sidecar keeps what, and the names it accepts.

A sidecar lives in a `croupier/` folder beside the dataset's `index.json`:

    DATASET/croupier/manifest.json      versioned, written last, bound to index.json
    DATASET/croupier/offsets.npy        int64 (K+1,): CSR cluster offsets
    DATASET/croupier/members.npy        int64 (N,): ids per cluster (layout "original" only)
    DATASET/croupier/assignments.npy    int32 (N,): cluster of every sample id
    DATASET/croupier/centroids.npy      float32 (K, d): unit-norm cluster centroids
    DATASET/croupier/embeddings.npy     float16 (N, d): one embedding per sample id
    DATASET/croupier/scores/NAME.npy    float32 (N,): a per-sample score column
    DATASET/croupier/selections/NAME.npy int64 (n,): sorted ids of a selected subset
    DATASET/croupier/token_counts.npy   int32 (N,): tokens of every sample id (optional;
                                        manifest entry `token_counts`)

The manifest's `files` map names the array files by role; readers look arrays up through it
(`array_file`), so the writer alone decides the names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from croupier.errors import ConfigError, DatasetError

FORMAT = "croupier.sidecar"
VERSION = 1
SIDECAR_DIR = "croupier"
MANIFEST = "manifest.json"
LOCK = ".lock"
WORK_DIR = "work"
LAYOUTS = ("cluster-major", "original")

OFFSETS, MEMBERS, ASSIGNMENTS, CENTROIDS, EMBEDDINGS = "offsets", "members", "assignments", "centroids", "embeddings"
ARRAY_FILES: Mapping[str, str] = {
    OFFSETS: "offsets.npy", MEMBERS: "members.npy", ASSIGNMENTS: "assignments.npy",
    CENTROIDS: "centroids.npy", EMBEDDINGS: "embeddings.npy",
}
"""Role -> file name the writer uses for each sidecar array."""
TOKEN_COUNTS = "token_counts"
TOKEN_COUNTS_FILE = "token_counts.npy"
"""The optional per-sample token counts: manifest entry `token_counts` (not a `files` role, so
sidecars without counts, and readers that predate them, are unchanged)."""

_NAME_RE = re.compile(r"^[a-z0-9_.-]+$")
_MAX_NAME = 64


def files_map(has_members: bool) -> dict[str, str]:
    """The manifest's `files` entry: role -> file name, for the arrays a build writes."""
    return {role: name for role, name in ARRAY_FILES.items() if has_members or role != MEMBERS}


def required_roles(layout: str) -> tuple[str, ...]:
    """Arrays a sidecar of `layout` cannot be opened without."""
    return (OFFSETS, ASSIGNMENTS, MEMBERS) if layout == "original" else (OFFSETS, ASSIGNMENTS)


def array_file(manifest: Mapping[str, Any], role: str) -> str:
    """File name (relative to the sidecar folder) of array `role`, from the manifest's `files` map."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DatasetError("sidecar manifest has no 'files' map")
    name = files.get(role)
    if name is None:
        have = ", ".join(sorted(files)) or "none"
        raise DatasetError(f"sidecar manifest lists no {role!r} file; it lists: {have}")
    return checked_relative(name)


def checked_relative(name: Any) -> str:
    """A manifest file name: a relative path that stays inside the sidecar folder."""
    p = PurePosixPath(str(name))
    if not isinstance(name, str) or not name or p.is_absolute() or ".." in p.parts:
        raise DatasetError(f"sidecar manifest names file {name!r}: it must be a relative path inside the sidecar")
    return name


def validate_name(kind: str, name: str) -> str:
    """A score/selection name: 1-64 chars of [a-z0-9_.-], not starting with a dot."""
    if not isinstance(name, str) or not (1 <= len(name) <= _MAX_NAME) or not _NAME_RE.match(name) \
            or name.startswith("."):
        raise ConfigError(
            f"{kind} name must be 1-{_MAX_NAME} characters of [a-z0-9_.-] not starting with '.', got {name!r}"
        )
    return name


def score_file(name: str) -> str:
    return f"scores/{validate_name('score', name)}.npy"


def selection_file(name: str) -> str:
    return f"selections/{validate_name('selection', name)}.npy"
