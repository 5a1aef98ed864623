"""The embed stage on the local engine: the embedding matrix, chunk by chunk, resumable.

Documents are embedded `chunk` at a time into a float16 memory-mapped (N, dim) matrix in the
work folder; every finished chunk is committed, so a resumed build starts at the first chunk
the state does not hold. With `--embed-cache DIR` a matrix stored for the same texts and
embedder is copied instead (`croupier.shards.build.embed_cache`), and a freshly embedded one
is stored there. `make_embedder` and `embedding_dim` are the embedder every engine uses.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig
from croupier.shards.build.context import BuildContext


def make_embedder(cfg: BuildConfig) -> Any:
    """The build's embedder (`--embedder`), with the settings that apply to it."""
    from croupier.shards.build.embed import get_embedder, is_model_folder

    kwargs: dict[str, Any] = {}
    if cfg.embedder == "minilm" or is_model_folder(cfg.embedder):
        kwargs = {"device": cfg.device, "batch_size": cfg.batch_size}
    elif cfg.embedder == "hashing":
        kwargs = {"seed": cfg.seed}
    return get_embedder(cfg.embedder, **kwargs)


def embedding_dim(cfg: BuildConfig) -> int:
    """The embedder's dimension, without loading a model when its class states it."""
    from croupier.shards.build.embed import EMBEDDERS

    dim = getattr(EMBEDDERS.get(cfg.embedder), "dim", None)
    if isinstance(dim, int):
        return dim
    return int(make_embedder(cfg).dim)


def chunk_docs(i: int, chunk: int, n: int) -> int:
    """Documents in chunk `i` of `n` documents cut into chunks of `chunk`."""
    return min(n, (i + 1) * chunk) - i * chunk


class EmbedChunks:
    """The local engine's embed stage (see the module docstring)."""

    name = "embed"

    def run(self, ctx: BuildContext) -> None:
        cfg, st = ctx.cfg, ctx.state
        n, c = ctx.n, cfg.chunk
        emb = make_embedder(cfg)
        st["embedder"] = emb.describe()
        path = ctx.work / work_files.EMBEDDINGS
        done = int(st.get("embed_chunks", 0))
        texts = ctx.text_reader()
        cache, key = None, None
        if cfg.embed_cache is not None:
            from croupier.shards.build.embed_cache import EmbeddingCache, cache_key

            t0 = time.perf_counter()
            cache = EmbeddingCache(cfg.embed_cache)
            key = cache_key(st["embedder"], (texts(lo, min(n, lo + c)) for lo in range(0, n, c)))
            found = cache.fetch(key, n, emb.dim, path) if done == 0 else None
            fault = None if found is None else found.fault
            if fault is not None:  # logged whatever --quiet says, and kept in the manifest
                ctx.progress.warn(f"embeddings cache {cfg.embed_cache}: {fault}; embedding again and replacing it")
            st["embed_cache"] = {"key": key, "hit": bool(found is not None and found.hit), "fault": fault}
            if found is not None and found.hit:
                ctx.progress.log(f"embeddings of {n} documents reused from {cache.path(key)}")
                ctx.timed(self.name, t0, 0).update(encode_seconds=0.0, cached_docs=float(n))
                return None
        if done == 0 or not path.exists():
            done = 0
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, emb.dim))
        else:
            arr = np.load(path, mmap_mode="r+")
        nchunks = (n + c - 1) // c
        bar = ctx.progress.bar("embed", total=n, initial=min(n, done * c))
        t0 = time.perf_counter()
        encode_s = 0.0  # time inside the embedder itself: the rest is pipeline overhead
        try:
            for i in range(done, nchunks):
                lo, hi = i * c, min(n, (i + 1) * c)
                batch = texts(lo, hi)
                t1 = time.perf_counter()
                vectors = emb.encode(batch)
                encode_s += time.perf_counter() - t1
                arr[lo:hi] = vectors.astype(np.float16)
                arr.flush()
                st["embed_chunks"] = i + 1
                bar.update(hi - lo)
                ctx.commit(self.name, i)
        finally:
            bar.close()
        del arr
        ctx.timed(self.name, t0, n - min(n, done * c))["encode_seconds"] = encode_s
        if cache is not None and key is not None:
            ctx.progress.log(f"embeddings stored in {cache.store(key, path)}")
        return None
