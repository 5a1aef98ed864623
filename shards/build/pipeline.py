"""A build from start to end: prepare the folder, run the stages, write the sidecar, publish.

`plan(cfg, engine)` lists the stages of a build, in order: the engine's own (ingest, embed,
assign, write) and the ones every engine shares:

    ingest    inputs -> text parts (engine); with --adopt, the adopted dataset's size; token
              corpora -> the token store (`stages.token_ingest`, on the driver)
    choose_k  K from --clusters or the corpus size            | with --group-by:
    embed     the embedding matrix (engine; with --embeddings |   groups   field codes, K
              the user's, with --embedder none an empty one)  |
    train     k-means centroids on a sample                   |   embed    (engine)
    assign    nearest centroid of every document (engine)     |   assign   clusters inside groups
    order     drop empty clusters, sort ids by cluster
    write     MDS shards in the cluster order (engine; not with --adopt)
    arrays    the sidecar's per-sample arrays in sample-id order
    tokens    with --adopt and --tokenizer: the dataset's token counts

`run_build(cfg, engine, hook)` runs them through `run_stages` (a finished stage is skipped on
resume), writes the sidecar manifest last, and with an object-store `--out` publishes the
finished folder and removes the local copy.
"""

from __future__ import annotations

import shutil
import time

from croupier.errors import DatasetError
from croupier.format.mds_index import INDEX_BASENAME
from croupier.format.sidecar_layout import MANIFEST
from croupier.shards.build.config import BuildConfig, BuildResult, Hook
from croupier.shards.build.context import BuildContext, BuildPaths
from croupier.shards.build.stage import Engine, Stage, finished, run_stages
from croupier.shards.build.workspace import open_workspace, resume_key


def plan(cfg: BuildConfig, engine: Engine) -> list[Stage]:
    """The stages of a build with these settings on this engine, in order."""
    from croupier.shards.build.stages.arrays import SidecarArrays
    from croupier.shards.build.stages.groups import ClusterGroups, GroupCodes
    from croupier.shards.build.stages.ingest import AdoptDataset
    from croupier.shards.build.stages.kmeans import ChooseK, TrainCentroids
    from croupier.shards.build.stages.order import OrderByCluster
    from croupier.shards.build.stages.token_ingest import TokenIngest
    from croupier.shards.build.stages.tokens import CountTokens

    if cfg.adopt is not None:
        stages: list[Stage] = [AdoptDataset()]
    else:
        stages = [TokenIngest() if cfg.token_inputs else engine.ingest()]
    if cfg.group_by is None:
        stages += [ChooseK(), _embed(cfg, engine), TrainCentroids(), engine.assign()]
    else:
        stages += [GroupCodes(), _embed(cfg, engine), ClusterGroups()]
    stages.append(OrderByCluster())
    if cfg.adopt is None:
        stages.append(engine.write())
    stages.append(SidecarArrays())
    if cfg.adopt is not None and cfg.tokenizer is not None:
        stages.append(CountTokens())
    return stages


def _embed(cfg: BuildConfig, engine: Engine) -> Stage:
    """The embed stage: the user's embeddings, none (`--embedder none`), or the engine's embedder."""
    from croupier.shards.build.embed import NO_EMBEDDER
    from croupier.shards.build.stages.given import GivenEmbeddings, NoEmbeddings

    if cfg.embeddings is not None:
        return GivenEmbeddings()
    if cfg.embedder == NO_EMBEDDER:
        return NoEmbeddings()
    return engine.embed()


def run_build(cfg: BuildConfig, engine: Engine, hook: Hook | None = None) -> BuildResult:
    """Run or resume a build on `engine`. `hook(stage, unit)` runs after every committed unit."""
    paths = BuildPaths.of(cfg)
    with engine.session(cfg):
        ctx = BuildContext(cfg, paths, hook)
        return engine.result(_run(ctx, engine), ctx.state)


def _run(ctx: BuildContext, engine: Engine) -> BuildResult:
    from croupier.shards.build.cluster import check_available
    from croupier.shards.build.stages.sidecar import write_manifest

    check_available()  # before any work: a build without faiss fails at once, in one line
    cfg, paths = ctx.cfg, ctx.paths
    if paths.remote_out is not None and (paths.side / MANIFEST).exists():
        return _publish(ctx, resumed=True)  # built before, its upload was cut short
    if paths.remote_out is not None and not paths.state.exists() and not cfg.overwrite:
        from croupier.format.remote import exists, join

        paths.out.parent.mkdir(parents=True, exist_ok=True)
        if exists(join(paths.remote_out, INDEX_BASENAME), paths.out.parent):
            raise DatasetError(f"{paths.remote_out} already holds an MDS dataset (index.json); "
                               "pass --overwrite to replace it")
    try:
        resumed = open_workspace(ctx, resume_key(ctx, engine.key()))
        stages = plan(cfg, engine)
        if resumed:
            ctx.progress.log(f"resuming the unfinished build in {paths.out} "
                             f"(finished stages: {', '.join(finished(stages, ctx.state)) or 'none'})")
        run_stages(stages, ctx)
        fp = write_manifest(ctx)
    finally:
        ctx.close()
    if paths.remote_out is not None:
        return _publish(ctx, resumed=resumed)
    st = ctx.state
    return BuildResult(out=paths.out, fingerprint=fp, num_samples=ctx.n, num_clusters=int(st["k_final"]),
                       layout=cfg.layout, skipped=int(st.get("skipped", 0)), resumed=resumed, timings=ctx.timings)


def _publish(ctx: BuildContext, resumed: bool) -> BuildResult:
    """Upload the finished staging copy to the object store, then drop the copy."""
    from croupier.format.remote import publish
    from croupier.format.sidecar import Sidecar

    paths = ctx.paths
    remote = str(paths.remote_out)
    t0 = time.perf_counter()
    side = Sidecar.open(paths.out)
    files = publish(paths.out, remote)
    ctx.timed("publish", t0, side.num_samples)
    ctx.progress.log(f"uploaded {files} files to {remote}")
    res = BuildResult(out=remote, fingerprint=side.fingerprint, num_samples=side.num_samples,
                      num_clusters=side.num_clusters, layout=side.layout_kind,
                      skipped=int(side.manifest.get("skipped_records", 0)), resumed=resumed, timings=ctx.timings)
    del side
    shutil.rmtree(paths.out)
    return res
