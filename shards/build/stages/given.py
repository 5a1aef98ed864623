"""The embed stage without an embedder: embeddings from the user, or none at all (both engines).

`GivenEmbeddings` (`--embeddings FILE|FIELD`) copies the user's vectors into the work
folder's float16 matrix, the one the embed stage would have written, so k-means (over the
corpus, or inside --group-by groups) and the sidecar run on them unchanged; the state's
`embedder` records where they came from (`croupier.shards.build.embeddings_in`).
`NoEmbeddings` (`--embedder none`, with --group-by and one cluster per group) writes an
(N, 0) matrix: the clusters are the field's values and nothing is embedded. Both run on the
driver, so the Ray engine uses them as they are.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext

GIVEN = "given"
"""The embedder name a sidecar records for embeddings from the user."""


def embeddings_source(ctx: BuildContext) -> Any:
    """The `--embeddings` source of this build: a .npy or Parquet file, or a field of the records."""
    from croupier.shards.build.embeddings_in import FieldSource, NpySource, ParquetSource, is_file_source

    cfg = ctx.cfg
    value = str(cfg.embeddings)
    if is_file_source(value):
        if value.lower().endswith(".npy"):
            return NpySource(value)
        return ParquetSource(value, cfg.embeddings_column, cfg.embeddings_key)
    return FieldSource(value, lambda: field_values(ctx, value), ctx.n)


def field_values(ctx: BuildContext, field: str) -> Any:
    """The values of a record field, document by document (an adopted dataset's column, or the inputs
    read again with the ingest's own settings plus the field, so the same records are kept)."""
    cfg = ctx.cfg
    if cfg.adopt is not None:
        source = ctx.source()
        source.require_column(field)
        for lo in range(0, ctx.n, cfg.chunk):
            yield from source.texts(lo, min(ctx.n, lo + cfg.chunk), field)
        return
    from croupier.shards.build.inputs import InputReader

    keep = tuple(dict.fromkeys((*cfg.keep_fields, field)))
    reader = InputReader(cfg.inputs, cfg.text_field, keep, cfg.skip_bad)
    for _pos, _text, kept in reader.records():
        yield kept[field]


class GivenEmbeddings:
    """The user's embeddings, validated, into `work/embeddings.npy` (float16)."""

    name = "embed"

    def run(self, ctx: BuildContext) -> None:
        cfg, st = ctx.cfg, ctx.state
        n = ctx.n
        t0 = time.perf_counter()
        source = embeddings_source(ctx)
        source.check_count(n, int(st.get("skipped", 0)))
        if cfg.embeddings_key is not None:
            source.check_keys(lambda: field_values(ctx, str(cfg.embeddings_key)))
        path = ctx.work / work_files.EMBEDDINGS
        arr: Any = None
        lo = 0
        for block in source.blocks(cfg.chunk):
            if arr is None:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, block.shape[1]))
            if lo + len(block) > n:
                from croupier.shards.build.embeddings_in import length_mismatch

                raise length_mismatch(source.what, lo + len(block), n)
            arr[lo:lo + len(block)] = block.astype(np.float16)
            lo += len(block)
        if arr is None:
            from croupier.shards.build.embeddings_in import length_mismatch

            raise length_mismatch(source.what, 0, n)
        arr.flush()
        dim = int(arr.shape[1])
        del arr
        st["embedder"] = {"name": GIVEN, "dim": dim, **source.provenance()}
        ctx.progress.log(f"embeddings of {n} documents ({dim}-d) taken from {source.what.removeprefix('--embeddings ')}")
        ctx.timed(self.name, t0, n)["encode_seconds"] = 0.0
        return None


class NoEmbeddings:
    """`--embedder none`: an (N, 0) matrix; the --group-by field alone makes the clusters."""

    name = "embed"

    def run(self, ctx: BuildContext) -> None:
        n = ctx.n
        arr = np.lib.format.open_memmap(ctx.work / work_files.EMBEDDINGS, mode="w+", dtype=np.float16, shape=(n, 0))
        del arr
        ctx.state["embedder"] = {"name": "none", "dim": 0}
        return None
