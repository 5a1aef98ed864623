"""The write stage: MDS shards in the cluster order, and the writing every engine shares.

The write order is the cluster order (`order.npy`) for `--layout cluster-major`, else input
order. Cluster-major shards are cut into shard-aligned read blocks: every cluster starts a
fresh shard and each shard holds `block` consecutive samples of one cluster (the last of a
cluster fewer), so the sampler's block-local order (layout block_size) reads one shard at a
time per cluster. `block` fills three quarters of --shard-size on average, so a block of
longer documents rarely spills into a second shard. `shard_blocks` gives the blocks as
ranges of the write order and `write_run` writes whole blocks with one MDSWriter: the local
engine writes all of them in one run (`WriteShards`), the Ray engine cuts them into runs
written in parallel, whose shards are the same.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig
from croupier.shards.build.context import BuildContext

HASHES = ["sha1", "xxh64"]
"""The hashes every shard records in index.json."""


def mds_columns(ctx: BuildContext) -> dict[str, str]:
    """The MDS columns: the text, the kept fields typed from what ingest saw, the token ids.

    With --tokenizer the tokenizer is loaded here, so one that cannot load is refused before
    any shard is written.
    """
    from croupier.shards.build.textstore import mds_encoding

    cfg = ctx.cfg
    if cfg.token_inputs:  # token corpora: the token column only (a --tokenizer only decodes them to embed)
        from croupier.tokenizer import TOKEN_COLUMN_ENCODING

        return {cfg.token_field: TOKEN_COLUMN_ENCODING}
    types: dict[str, set[str]] = {f: set() for f in cfg.keep_fields}
    for p in ctx.state["parts"]:
        for f, ts in p["types"].items():
            types[f].update(ts)
    columns = {cfg.text_field: "str", **{f: mds_encoding(types[f]) for f in cfg.keep_fields}}
    if cfg.tokenizer is not None:
        from croupier.tokenizer import TOKEN_COLUMN_ENCODING

        ctx.tokenizer()
        columns[cfg.token_field] = TOKEN_COLUMN_ENCODING
    return columns


def cluster_bytes(ctx: BuildContext, offsets: np.ndarray) -> np.ndarray:
    """Approximate stored bytes of every final cluster (text, kept fields, MDS overhead, tokens)."""
    cfg, work = ctx.cfg, ctx.work
    store = ctx.store()
    assign = np.load(work / work_files.ASSIGN, mmap_mode="r")
    remap = np.load(work / work_files.REMAP)
    k2 = len(offsets) - 1
    out = np.zeros(k2, dtype=np.float64)
    c = cfg.assign_chunk
    for lo in range(0, len(assign), c):
        hi = min(len(assign), lo + c)
        # per-sample MDS overhead: 4-byte offset + 4-byte length per variable column
        w = store.nbytes(lo, hi) + 4 * (1 + len(cfg.keep_fields) + 1)
        if cfg.tokenizer is not None and not cfg.token_inputs:
            w = 2 * w  # int32 token ids take about as many bytes as the text
        out += np.bincount(remap[np.asarray(assign[lo:hi])], weights=w, minlength=k2)
    return out


def shard_blocks(ctx: BuildContext) -> list[tuple[int, int]]:
    """The shard-aligned blocks as [lo, hi) ranges of the write order (one block: input order).

    The block size is kept in the state (`block_size`), and in the manifest for the sampler.
    """
    cfg, st = ctx.cfg, ctx.state
    n = ctx.n
    if not cfg.cluster_major:
        return [(0, n)]
    offsets = np.load(ctx.work / work_files.OFFSETS)
    if "block_size" not in st:
        total = float(cluster_bytes(ctx, offsets).sum())
        st["block_size"] = max(1, int(0.75 * cfg.shard_size * n / max(1.0, total)))
    block = int(st["block_size"])
    blocks: list[tuple[int, int]] = []
    for k in range(len(offsets) - 1):
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        blocks.extend((b0, min(hi, b0 + block)) for b0 in range(lo, hi, block))
    return blocks


def _start_shard(writer: Any) -> None:
    """End the shard being filled, so the next sample starts a new one.

    MDSWriter has no public call for this: `flush_shard` writes the shard, `_reset_cache`
    empties the writer's buffer as its own rollover does.
    """
    if writer.new_samples:
        writer.flush_shard()
        writer._reset_cache()


def _write_docs(cfg: BuildConfig, writer: Any, store: Any, ids: np.ndarray, tokenizer: Any) -> np.ndarray | None:
    """Write these documents (in this order) as the next samples; returns their token counts
    with a tokenizer or from token corpora, else None."""
    if cfg.token_inputs:  # documents that are token ids already: a token column, no text
        docs = store.docs(ids)
        for d in docs:
            writer.write({cfg.token_field: d})
        return np.fromiter((len(d) for d in docs), dtype=np.int32, count=len(docs))
    texts = store.texts(ids)
    extras = store.extras(ids) if cfg.keep_fields else [{}] * len(texts)
    counts = None
    if tokenizer is not None:
        from croupier.tokenizer import encode

        tokens = encode(tokenizer, texts)
        counts = np.fromiter((len(t) for t in tokens), dtype=np.int32, count=len(tokens))
        extras = [{**extra, cfg.token_field: t} for extra, t in zip(extras, tokens)]
    for text, extra in zip(texts, extras):
        writer.write({cfg.text_field: text, **extra})
    return counts


def write_run(cfg: BuildConfig, store: Any, order: np.ndarray | None, blocks: Sequence[tuple[int, int]],
              columns: dict[str, str], folder: Path, tokenizer: Any = None, bar: Any = None) -> np.ndarray | None:
    """Write whole blocks (ranges of the write order) as MDS shards into `folder`, afresh.

    `order` maps write positions to document ids (None: input order). Every block starts a
    shard. Returns the token count of every written sample in write order with a tokenizer,
    else None.
    """
    from croupier.format.streaming_lib import MDSWriter

    shutil.rmtree(folder, ignore_errors=True)
    writer = MDSWriter(out=str(folder), columns=columns, compression=cfg.compression,
                       hashes=HASHES, size_limit=cfg.shard_size, max_workers=1)
    counts: list[np.ndarray] = []
    c = cfg.chunk
    try:
        for b0, b1 in blocks:
            _start_shard(writer)
            for a in range(b0, b1, c):
                ids = np.asarray(order[a:min(b1, a + c)]) if order is not None else np.arange(a, min(b1, a + c))
                got = _write_docs(cfg, writer, store, ids, None if cfg.token_inputs else tokenizer)
                if got is not None:
                    counts.append(got)
                if bar is not None:
                    bar.update(len(ids))
        writer.finish()
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        writer.executor.shutdown(wait=True)
    if tokenizer is None and not cfg.token_inputs:
        return None
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int32)


class WriteShards:
    """The local engine's write stage: every block in one run into `work/mds`."""

    name = "write"

    def run(self, ctx: BuildContext) -> int:
        cfg, st = ctx.cfg, ctx.state
        n = ctx.n
        columns = st["columns"] = mds_columns(ctx)
        blocks = shard_blocks(ctx)
        order = np.load(ctx.work / work_files.ORDER, mmap_mode="r") if cfg.cluster_major else None
        t0 = time.perf_counter()
        bar = ctx.progress.bar("write", total=n)
        try:
            counts = write_run(cfg, ctx.store(), order, blocks, columns, ctx.work / work_files.MDS,
                               ctx.tokenizer() if cfg.tokenizer is not None and not cfg.token_inputs else None, bar)
        finally:
            bar.close()
        ctx.timed(self.name, t0, n)
        if counts is not None:
            write_npy_atomic(ctx.work / work_files.TOKEN_COUNTS, counts)
        return 0
