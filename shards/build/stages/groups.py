"""The --group-by stages: the groups' codes, then the clusters inside every group (both engines).

`GroupCodes` reads the field from the ingested parts before anything is embedded, so a field
that cannot group (one value, as many values as documents) is refused before the costly
stage, and fixes K from the rule. `ClusterGroups` takes the place of train and assign: one
cluster per group, or k-means inside each group over the embedding matrix, one group's
sample in memory at a time (`croupier.shards.build.grouping.cluster_by_group`).
"""

from __future__ import annotations

import time

import numpy as np

from croupier.errors import ConfigError
from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext
from croupier.shards.build.grouping import (
    GroupingConfig,
    cluster_by_group,
    group_codes,
    read_group_files,
    write_group_files,
)


def _rule(ctx: BuildContext) -> GroupingConfig:
    rule = ctx.cfg.grouping()
    if rule is None:
        raise ConfigError("the grouping stages run only in a build with --group-by FIELD")
    return rule


class GroupCodes:
    """The group code of every document (sorted group names) and K from the grouping rule."""

    name = "groups"

    def run(self, ctx: BuildContext) -> int:
        rule, st = _rule(ctx), ctx.state
        store = ctx.store()
        codes, names = group_codes(lambda lo, hi: [e[rule.field] for e in store.extras(np.arange(lo, hi))],
                                   ctx.n, rule.field, ctx.cfg.assign_chunk)
        write_group_files(ctx.work, codes, names)
        counts = np.bincount(codes, minlength=len(names))
        st["clusters"] = int(sum(rule.clusters_for(int(c)) for c in counts))
        st["groups"] = len(names)
        ctx.progress.log(f"--group-by {rule.field!r}: {st['groups']} groups, {st['clusters']} clusters "
                         f"({rule.rule()})")
        return 0


class ClusterGroups:
    """The cluster of every document, group-major, in place of train and assign."""

    name = "assign"

    def run(self, ctx: BuildContext) -> int:
        rule, cfg, work = _rule(ctx), ctx.cfg, ctx.work
        n = ctx.n
        codes, names = read_group_files(work)
        emb = np.load(work / work_files.EMBEDDINGS, mmap_mode="r")
        out = np.lib.format.open_memmap(work / work_files.ASSIGN, mode="w+", dtype=np.int32, shape=(n,))
        t0 = time.perf_counter()
        centroids, cluster_groups = cluster_by_group(
            emb, codes, len(names), rule, seed=cfg.seed, niter=cfg.niter, max_train=cfg.max_train, out=out,
            chunk=cfg.assign_chunk, log=ctx.progress.log)
        out.flush()
        del out
        write_npy_atomic(work / work_files.CENTROIDS_RAW, centroids)
        write_npy_atomic(work / work_files.CLUSTER_GROUPS_RAW, cluster_groups)
        ctx.timed("train", t0, n)
        ctx.state["objective"] = None
        return 0
