"""`croupier shards build`: inputs -> MDS shards + embeddings + clusters + sidecar, on the local engine.

`build(cfg)` runs (or resumes) a build in this process: `LocalEngine` provides the stages
that the Ray engine (`croupier.shards.build.ray_builder`) runs its own way, and
`croupier.shards.build.pipeline` runs them with the stages both engines share. Every stage
is resumable (state in `OUT/croupier/work/state.json`, saved after every part, chunk or
task); a resumed build refuses settings or inputs that differ from the interrupted one.

`--adopt` skips ingest and write: it embeds the texts of an existing MDS dataset in place
(local or remote) and writes only the sidecar. Memory stays bounded by a chunk of texts,
the k-means training sample and O(K) arrays; everything per-document lives on disk.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from croupier.shards.build.config import BuildConfig, BuildResult, Hook, auto_clusters
from croupier.shards.build.pipeline import run_build
from croupier.shards.build.stage import Stage
from croupier.shards.build.stages.embed import EmbedChunks
from croupier.shards.build.stages.ingest import IngestInputs
from croupier.shards.build.stages.kmeans import AssignChunks
from croupier.shards.build.stages.write import WriteShards
from croupier.shards.build.work_files import TOKEN_COUNTS as TOKEN_COUNTS_WORK

__all__ = ["BuildConfig", "BuildResult", "Builder", "Hook", "LocalEngine", "TOKEN_COUNTS_WORK", "auto_clusters",
           "build"]


class LocalEngine:
    """Every stage in this process, one after the other."""

    name = "local"

    def key(self) -> dict[str, Any]:
        return {}

    def session(self, cfg: BuildConfig) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def ingest(self) -> Stage:
        return IngestInputs()

    def embed(self) -> Stage:
        return EmbedChunks()

    def assign(self) -> Stage:
        return AssignChunks()

    def write(self) -> Stage:
        return WriteShards()

    def result(self, res: BuildResult, state: dict[str, Any]) -> BuildResult:
        return res


def build(cfg: BuildConfig, hook: Hook | None = None) -> BuildResult:
    """Run or resume a build. `hook(stage, unit)` runs after every committed unit of work."""
    return run_build(cfg, LocalEngine(), hook)


class Builder:
    """One build on the local engine: `Builder(cfg, hook).run()` is `build(cfg, hook)`."""

    def __init__(self, cfg: BuildConfig, hook: Hook | None = None) -> None:
        self.cfg = cfg
        self.hook = hook

    def run(self) -> BuildResult:
        return build(self.cfg, self.hook)
