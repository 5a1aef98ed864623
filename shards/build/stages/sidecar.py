"""The end of a build: shards and index into the dataset folder, then the sidecar manifest.

Not a resumable stage but the build's last step, safe to run again: shards and `index.json`
(the index last) move from the work folder into the dataset folder, the sidecar's arrays
move beside the ones the arrays stage wrote, and `write_sidecar` writes the manifest, last,
bound to the index's fingerprint. Then the work folder (and the build state with it) goes.
An --adopt build writes only the sidecar (and a verbatim copy of the index when the sidecar
goes to another folder).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from croupier import __version__
from croupier.format import sidecar_layout as names
from croupier.format.atomic import replace_durably, write_bytes_atomic
from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex
from croupier.format.sidecar import token_counts_array, token_counts_entry, write_sidecar
from croupier.shards.build import work_files
from croupier.shards.build.cluster import num_gpus
from croupier.shards.build.context import BuildContext
from croupier.shards.build.stages.kmeans import kmeans_config
from croupier.shards.build.stages.tokens import SOURCE_KEY

ARRAYS = names.ARRAY_FILES


def _move_shards(ctx: BuildContext) -> bytes:
    """Shards, then index.json, from `work/mds` into the dataset folder; returns the index bytes."""
    out = ctx.paths.out
    mds_dir = ctx.work / work_files.MDS
    if (mds_dir / INDEX_BASENAME).exists():  # not yet moved (a resumed finish skips this)
        index = MDSIndex.read(mds_dir)
        for entry in index.shards:
            for info in (entry.raw, entry.zip):
                if info and (mds_dir / info.basename).exists():
                    replace_durably(mds_dir / info.basename, out / info.basename)
        replace_durably(mds_dir / INDEX_BASENAME, out / INDEX_BASENAME)  # the index last
    return (out / INDEX_BASENAME).read_bytes()


def _token_counts(ctx: BuildContext) -> dict[str, Any]:
    """With --tokenizer: moves the counts into the sidecar and returns their manifest entry."""
    cfg = ctx.cfg
    target = ctx.paths.side / names.TOKEN_COUNTS_FILE
    work = ctx.work / work_files.TOKEN_COUNTS
    if work.exists():
        replace_durably(work, target)
    source = ctx.state.get(SOURCE_KEY) or {"field": cfg.token_field, "from": "token column"}
    counts = token_counts_array(np.load(target, mmap_mode="r"), ctx.n)
    if cfg.token_inputs:
        from croupier.shards.build.stages.token_ingest import CORPORA_KEY

        return token_counts_entry(counts, {"tokenizer": None, "field": cfg.token_field, "from": "token corpus",
                                           "corpora": ctx.state.get(CORPORA_KEY, [])})
    return token_counts_entry(counts, {"tokenizer": cfg.tokenizer, "field": source["field"], "from": source["from"]})


def _adopted_from(ctx: BuildContext) -> str | None:
    """Where the shards of a sidecar written apart from them are (None: beside them)."""
    adopt = ctx.cfg.adopt
    if ctx.paths.in_place or adopt is None:
        return None
    return adopt if "://" in adopt else str(Path(adopt).resolve())


def provenance(ctx: BuildContext) -> dict[str, Any]:
    """Where the embeddings and the clusters came from, as the manifest's `provenance` records it."""
    cfg, st = ctx.cfg, ctx.state
    emb = dict(st["embedder"])
    embeddings = ({"from": "embedder", "embedder": emb.get("name")} if "from" not in emb
                  else {k: v for k, v in emb.items() if k not in ("name", "dim")})
    if emb.get("name") == "none":
        embeddings = {"from": "none"}
    rule = cfg.grouping()
    if rule is None:
        clusters: dict[str, Any] = {"from": "k-means", "clusters": int(st["clusters"])}
    elif rule.clusters_per_group is None and rule.cluster_size is None:
        clusters = {"from": "field", "field": rule.field}
    else:
        clusters = {"from": "field+k-means", "field": rule.field, "rule": rule.rule()}
    return {"embeddings": embeddings, "clusters": clusters}


def write_manifest(ctx: BuildContext) -> str:
    """Finish the dataset folder and write the sidecar manifest; returns the fingerprint."""
    cfg, st, paths = ctx.cfg, ctx.state, ctx.paths
    side, work = paths.side, ctx.work
    t0 = time.perf_counter()
    if cfg.adopt is None:
        index_bytes = _move_shards(ctx)
    else:
        index_bytes = ctx.source().index_bytes
        if not paths.in_place and not (paths.out / INDEX_BASENAME).exists():
            write_bytes_atomic(paths.out / INDEX_BASENAME, index_bytes)
    moves = [(work_files.OFFSETS, names.OFFSETS), (work_files.CENTROIDS, names.CENTROIDS)]
    if not cfg.cluster_major:
        moves += [(work_files.EMBEDDINGS, names.EMBEDDINGS), (work_files.ORDER, names.MEMBERS)]
    for work_name, role in moves:
        if (work / work_name).exists():
            replace_durably(work / work_name, side / ARRAYS[role])
    fp = index_fingerprint(index_bytes)
    offsets = np.load(side / ARRAYS[names.OFFSETS])
    centroids = np.load(side / ARRAYS[names.CENTROIDS])
    assignments = np.load(side / ARRAYS[names.ASSIGNMENTS], mmap_mode="r")
    members = None if cfg.cluster_major else np.load(side / ARRAYS[names.MEMBERS], mmap_mode="r")
    extra: dict[str, Any] = {
        "embedder": st["embedder"],
        "metric": "cosine",
        "seed": cfg.seed,
        "kmeans": {**kmeans_config(cfg, st).to_dict(), "objective": st.get("objective"), "gpu": num_gpus() > 0},
        "requested_clusters": int(st["clusters"]),
        "text_field": cfg.text_field,
        "columns": st.get("columns", {}),
        "source": ({"adopted": cfg.adopt} if cfg.adopt is not None
                   else {"inputs": [str(Path(x).resolve()) for x in cfg.inputs]}),
        **({"token_corpora": st.get("token_corpora", [])} if cfg.token_inputs else {}),
        "remote": _adopted_from(ctx),
        "skipped_records": int(st.get("skipped", 0)),
        "block_size": int(st.get("block_size", 1)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "croupier_version": __version__,
        "scores": {},
        "selections": {},
    }
    if "embed_cache" in st:
        extra["embed_cache"] = st["embed_cache"]
    if cfg.tokenizer is not None or cfg.token_inputs:
        extra[names.TOKEN_COUNTS] = _token_counts(ctx)
    grouping = cfg.grouping()
    if grouping is not None:
        from croupier.shards.build.grouping import finish

        order = np.load(work / work_files.ORDER, mmap_mode="r") if cfg.cluster_major else None
        extra["grouping"] = finish(work, side, grouping, order)
    extra["provenance"] = provenance(ctx)
    write_sidecar(paths.out, fingerprint=fp, layout=cfg.layout, assignments=assignments,
                  offsets=offsets, members=members, centroids=centroids, extra=extra)
    del assignments, members
    shutil.rmtree(work, ignore_errors=True)
    ctx.timed("final", t0, ctx.n)
    ctx.progress.log(f"wrote {ctx.n} documents in {len(offsets) - 1} clusters ({cfg.layout}) to {paths.out} [{fp}]")
    return fp
