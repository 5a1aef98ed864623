"""The embed stage on Ray: chunks of documents over an actor pool, written in place.

Ray Data maps chunk numbers over a pool of actors; each actor loads the embedder once (one
GPU per actor when the cluster has GPUs and the embedder is MiniLM) and writes its chunks'
rows of the float16 embedding matrix, memory-mapped in the work folder, in place. Every
finished chunk is recorded in the state, so a resumed embed redoes only the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import CroupierError, DatasetError
from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig
from croupier.shards.build.context import BuildContext
from croupier.shards.build.ray_stages.session import RaySession
from croupier.shards.build.stages.embed import chunk_docs, embedding_dim, make_embedder
from croupier.shards.ray_errors import error_row, raise_error_row


class EmbedActor:
    """Ray Data actor: loads the embedder once, embeds whole chunks into the shared memmap."""

    def __init__(self, cfg: BuildConfig, work: str, parts: list[dict[str, Any]], n: int) -> None:
        from croupier.shards.build.textstore import TextStore

        self.cfg, self.n = cfg, n
        self.emb = make_embedder(cfg)
        self.store = TextStore(Path(work) / work_files.PARTS, parts, cfg.keep_fields)
        self.path = Path(work) / work_files.EMBEDDINGS

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        arr = np.load(self.path, mmap_mode="r+")
        c = self.cfg.chunk
        done, secs = [], []
        for i in np.asarray(batch["chunk"]).tolist():
            lo, hi = i * c, min(self.n, (i + 1) * c)
            t0 = time.perf_counter()
            try:
                vectors = self.emb.encode(self.store.text_range(lo, hi))
            except CroupierError as exc:  # carried as data: Ray Data keeps only a traceback's text
                return {"chunk": np.asarray([i]), "seconds": np.asarray([0.0]),
                        "describe": np.asarray([""], dtype=object), "error": np.asarray([error_row(exc)], dtype=object)}
            secs.append(time.perf_counter() - t0)
            arr[lo:hi] = vectors.astype(np.float16)
            done.append(i)
        arr.flush()
        del arr
        return {"chunk": np.asarray(done, dtype=np.int64), "seconds": np.asarray(secs),
                "describe": np.asarray([json.dumps(self.emb.describe())] * len(done), dtype=object),
                "error": np.asarray([""] * len(done), dtype=object)}


class RayEmbed:
    """The Ray engine's embed stage (see the module docstring)."""

    name = "embed"

    def __init__(self, session: RaySession) -> None:
        self.session = session

    def run(self, ctx: BuildContext) -> None:
        import ray

        cfg, st = ctx.cfg, ctx.state
        n, c = ctx.n, cfg.chunk
        path = ctx.work / work_files.EMBEDDINGS
        done: list[int] = st.setdefault("ray_embed_chunks", [])
        if not done or not path.exists():
            done.clear()
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, embedding_dim(cfg)))
            del arr
        todo = sorted(set(range((n + c - 1) // c)) - set(done))
        bar = ctx.progress.bar("embed", total=n, initial=sum(chunk_docs(i, c, n) for i in done))
        t0 = time.perf_counter()
        encode_s = 0.0
        workers = self.session.workers
        gpus = self.session.gpus() if cfg.embedder != "hashing" else 0  # a sentence model
        try:
            if todo:
                ds = ray.data.from_items([{"chunk": i} for i in todo], override_num_blocks=len(todo)).map_batches(
                    EmbedActor, batch_size=1,
                    fn_constructor_kwargs={"cfg": cfg, "work": str(ctx.work), "parts": st["parts"], "n": n},
                    compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo), gpus or len(todo)))),
                    num_gpus=1 if gpus else 0)
                for row in ds.iter_rows():
                    raise_error_row(row["error"])
                    i = int(row["chunk"])
                    done.append(i)
                    st["embedder"] = json.loads(row["describe"])
                    encode_s += float(row["seconds"])
                    bar.update(chunk_docs(i, c, n))
                    ctx.commit(self.name, i)
        finally:
            bar.close()
        if "embedder" not in st:
            raise DatasetError("the embedding stage finished without describing its embedder; "
                               "pass --overwrite to start over")
        ctx.timed(self.name, t0, n)["encode_seconds"] = encode_s
        return None
