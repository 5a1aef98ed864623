"""`croupier shards build --engine ray`: the build's stages on a Ray cluster, the same dataset as local.

`RayEngine` runs the heavy stages on Ray (`croupier.shards.build.ray_stages`) and keeps the
driver's work O(chunk + K); the others are the stages every engine shares, on the driver:

    ingest  Ray Data maps over groups of input files, each parsed by the local reader
    embed   Ray Data maps chunk numbers over an actor pool (the model loads once per actor)
    train   faiss k-means on the driver, on the local engine's seeded uniform sample
    assign  one Ray task per assignment chunk, the local per-chunk search
    group   with --group-by, in place of train and assign: the local grouping stages
    order   the local counting sort (driver, chunked, memory-mapped)
    write   runs of whole shard blocks, one Ray task and MDSWriter each, merged into the
            `index.json` MDSWriter itself would have written, byte for byte
    arrays, sidecar  as locally

With --embeddings or --embedder none the embed stage is the driver's (`stages.given`), as
locally; token corpora are refused (they build on the local engine).

Every stage is resumable: finished groups, chunks and write tasks are recorded in the build
state after each one, so a killed build resumes per stage and per task; a build resumes only
on the engine it started with. Ray retries tasks whose worker died; a bad record is a
`DatasetError` naming the file and line. The work folder must be visible to every Ray node
(one machine, or a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from croupier.errors import ConfigError
from croupier.shards.build.config import BuildConfig, BuildResult, Hook
from croupier.shards.build.pipeline import run_build
from croupier.shards.build.ray_stages.assign import RayAssign
from croupier.shards.build.ray_stages.embed import RayEmbed
from croupier.shards.build.ray_stages.ingest import RayIngest
from croupier.shards.build.ray_stages.session import RaySession
from croupier.shards.build.ray_stages.write import RayWrite, write_runs
from croupier.shards.build.stage import Stage
from croupier.shards.ray_errors import unwrap

__all__ = ["RayBuildResult", "RayEngine", "build_ray", "write_runs"]


@dataclass
class RayBuildResult(BuildResult):
    """A build result plus which process wrote each shard (basename -> pid)."""

    shard_writers: dict[str, int] = field(default_factory=dict)
    workers: int = 0


class RayEngine:
    """Ingest, embed, assign and write on a Ray cluster (`address`, `workers`: see `RaySession`)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        self.ray = RaySession(address, workers)

    def key(self) -> dict[str, Any]:
        return {"engine": self.name}

    @contextmanager
    def session(self, cfg: BuildConfig) -> Iterator[None]:
        """The cluster around the build; a failure that carries a croupier error raises that error."""
        try:
            self.ray.open(quiet=not cfg.progress)
            yield
        except Exception as exc:
            inner = unwrap(exc)
            if inner is not exc:
                raise inner from None
            raise
        finally:
            self.ray.close()

    def ingest(self) -> Stage:
        return RayIngest(self.ray)

    def embed(self) -> Stage:
        return RayEmbed(self.ray)

    def assign(self) -> Stage:
        return RayAssign(self.ray)

    def write(self) -> Stage:
        return RayWrite(self.ray)

    def result(self, res: BuildResult, state: dict[str, Any]) -> RayBuildResult:
        return RayBuildResult(**vars(res), shard_writers=dict(state.get("shard_writers", {})),
                              workers=self.ray.workers)


def build_ray(cfg: BuildConfig, *, address: str | None = None, workers: int | None = None,
              hook: Hook | None = None) -> RayBuildResult:
    """Run or resume a build on Ray (a running cluster at `address`, else the current or a local one)."""
    if cfg.adopt is not None:
        raise ConfigError("--engine ray builds from inputs; --adopt runs on the local engine (--engine local)")
    if cfg.embed_cache is not None:
        raise ConfigError(f"--embed-cache {cfg.embed_cache} is used by the local engine only; "
                          "drop --engine ray (or --embed-cache)")
    if cfg.token_inputs:
        raise ConfigError(f"--engine ray builds from text inputs; token corpora ({cfg.inputs[0]}, ...) run on the "
                          "local engine (--engine local)")
    return cast(RayBuildResult, run_build(cfg, RayEngine(address, workers), hook))
