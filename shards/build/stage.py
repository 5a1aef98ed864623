"""The build as stages: what a stage is, what an engine provides, and the runner that resumes.

A `Stage` is one resumable step of the build (ingest, embed, train, assign, order, write,
arrays, ...). It is named, and `run(ctx)` does its work, resuming its own partial progress
(finished parts, chunks or tasks recorded in the build state as it goes) when the build was
interrupted inside it. `run_stages` owns the rest of the bookkeeping, once for every stage:
a stage whose `<name>_done` flag the state holds is skipped; a stage that returns is marked
done and the state saved (and, when the stage returns a unit number, the hook told).

An `Engine` provides the stages that run differently on each engine (ingest, embed, assign,
write) and the session around a build (Ray's cluster connection, say); every other stage is
the same object on every engine (`croupier.shards.build.pipeline.plan`). The local engine
is `croupier.shards.build.builder.LocalEngine`, the Ray engine
`croupier.shards.build.ray_builder.RayEngine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from croupier.shards.build.config import BuildConfig, BuildResult
from croupier.shards.build.context import BuildContext


class Stage(Protocol):
    """One resumable step of the build."""

    name: str
    """Names the state's `<name>_done` flag and the stage in hook calls and timings."""

    def run(self, ctx: BuildContext) -> int | None:
        """Do (or finish) the stage's work. Returns the unit number to report with the stage's
        completion (`hook(name, unit)`), or None when its last unit was reported already."""
        ...


class Engine(Protocol):
    """Where the build's heavy stages run: the stages it implements and the session around them."""

    name: str

    def key(self) -> dict[str, Any]:
        """Entries of the resume key: a build resumes only on the engine it started with."""
        ...

    def session(self, cfg: BuildConfig) -> AbstractContextManager[None]:
        """Set up and tear down what the engine's stages need, around the whole build."""
        ...

    def ingest(self) -> Stage:
        """Read the inputs into text parts; sets the state's `parts`, `skipped`, `n`."""
        ...

    def embed(self) -> Stage:
        """Embed every document into `work/embeddings.npy`; sets the state's `embedder`."""
        ...

    def assign(self) -> Stage:
        """Nearest trained centroid of every document into `work/assign.npy`."""
        ...

    def write(self) -> Stage:
        """The MDS shards (and token counts) in the cluster order into `work/mds`."""
        ...

    def result(self, res: BuildResult, state: dict[str, Any]) -> BuildResult:
        """The build's result, with what the engine adds to it."""
        ...


def done_flag(stage: Stage) -> str:
    return f"{stage.name}_done"


def run_stages(stages: Sequence[Stage], ctx: BuildContext) -> None:
    """Run the stages in order; a stage done (in this or an interrupted run) is skipped."""
    for stage in stages:
        if ctx.state.get(done_flag(stage)):
            continue
        unit = stage.run(ctx)
        ctx.state[done_flag(stage)] = True
        if unit is None:
            ctx.save()
        else:
            ctx.commit(stage.name, unit)


def finished(stages: Sequence[Stage], state: dict[str, Any]) -> list[str]:
    """The names of the stages an interrupted build finished."""
    return [s.name for s in stages if state.get(done_flag(s))]
