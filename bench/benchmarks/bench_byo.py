"""Bring your own: a build from given embeddings and a cluster field against the default build.

On N synthetic records (the long-tailed topical corpus of `croupier.shards.build.synthetic`,
with its topic as a `source` field) and an (N, 384) float32 matrix standing for embeddings the
user already holds (made before the clock starts):

- default:       `shards build` with the MiniLM embedder and k-means (K about sqrt N);
- given+field:   `--embeddings emb.npy --group-by source` (one cluster per value, nothing embedded);
- field only:    `--embedder none --group-by source` (no embeddings at all).

And a tokenized corpus: the same documents tokenized (MiniLM's BERT tokenizer), written as a
Megatron indexed dataset (.bin + .idx), built with `--embeddings` against building the text
with `--tokenizer` (tokenize and store text + tokens): time and shard-bytes ratios.

Reported: seconds of each build and the ratios default / given (the issue expects >= 20x on
CPU). The machine is shared (2 cores), so times are noisy. Scales: quick = 3,000 records
(a few minutes on 2 cores), full = 20,000 (the issue's size).

    python -m bench.benchmarks.bench_byo --scale quick
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

SCALES = {"quick": {"docs": 3_000, "topics": 12}, "full": {"docs": 20_000, "topics": 24}}
DIM = 384


def write_megatron(prefix: Path, docs: list) -> None:
    """Documents as a Megatron indexed dataset: one uint16 sequence per document (MMIDIDX layout)."""
    import numpy as np

    sizes = np.array([len(d) for d in docs], dtype="<i4")
    pointers = (np.concatenate([[0], np.cumsum(sizes.astype(np.int64))[:-1]]) * 2).astype("<i8")
    with open(prefix.with_suffix(".bin"), "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=np.uint16).tobytes())
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1)
    prefix.with_suffix(".idx").write_bytes(head + sizes.tobytes() + pointers.tobytes()
                                           + np.arange(len(docs) + 1, dtype="<i8").tobytes())


def _disk(folder: Path) -> int:
    """Bytes of the MDS shards and index (the sidecar, the same embeddings in both, left out)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "croupier" not in f.relative_to(folder).parts)


def _timed_build(**kw: object) -> tuple[float, object]:
    from croupier.shards.build.builder import BuildConfig, build

    t0 = time.perf_counter()
    res = build(BuildConfig(progress=False, **kw))  # type: ignore[arg-type]
    return time.perf_counter() - t0, res


def run(scale: str = "quick") -> list[dict]:
    import numpy as np

    from croupier.shards.build.embed import minilm_model_path
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl
    from croupier.tokenizer import encode, load_tokenizer

    s = SCALES[scale]
    n = s["docs"]
    rows: list[dict] = []

    def row(metric: str, value: float | None, unit: str, ratio: float | None = None, target: float | None = None):
        rows.append({"bench": "byo", "metric": metric, "value": None if value is None else round(value, 2),
                     "unit": unit, "reference": None, "ratio": None if ratio is None else round(ratio, 1),
                     "target": target})

    with tempfile.TemporaryDirectory(prefix="croupier-bench-byo-") as tmp:
        folder = Path(tmp)
        docs = generate_corpus(n, s["topics"], seed=0)
        for d in docs:
            d["source"] = f"topic-{d['topic']:02d}"
        write_jsonl(folder / "in.jsonl", docs)
        np.save(folder / "emb.npy", np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32))
        inputs = (str(folder / "in.jsonl"),)
        t_default, r_default = _timed_build(out=str(folder / "default"), inputs=inputs, embedder="minilm")
        t_given, r_given = _timed_build(out=str(folder / "given"), inputs=inputs, embeddings=str(folder / "emb.npy"),
                                        group_by="source")
        t_field, _ = _timed_build(out=str(folder / "field"), inputs=inputs, embedder="none", group_by="source")
        label = f"N={n}"
        row(f"default build (MiniLM + k-means, {r_default.num_clusters} clusters), {label}",  # type: ignore[attr-defined]
            t_default, "s")
        row(f"given embeddings + --group-by ({r_given.num_clusters} clusters), {label}",  # type: ignore[attr-defined]
            t_given, "s")
        row(f"--embedder none + --group-by, {label}", t_field, "s")
        row("default / given-embeddings build time", None, "x", t_default / t_given, 20.0)
        row("default / field-only build time", None, "x", t_default / t_field)

        tok = load_tokenizer(minilm_model_path())
        token_docs = encode(tok, [d["text"] for d in docs])
        write_megatron(folder / "corpus", token_docs)
        t_text, _ = _timed_build(out=str(folder / "text-tok"), inputs=inputs, embeddings=str(folder / "emb.npy"),
                                 tokenizer=minilm_model_path(), clusters=r_default.num_clusters)  # type: ignore[attr-defined]
        t_meg, _ = _timed_build(out=str(folder / "megatron"), inputs=(str(folder / "corpus.idx"),),
                                embeddings=str(folder / "emb.npy"), clusters=r_default.num_clusters)  # type: ignore[attr-defined]
        d_text, d_meg = _disk(folder / "text-tok"), _disk(folder / "megatron")
        row(f"text + --tokenizer build (tokenize, store text and tokens), {label}", t_text, "s")
        row(f"Megatron .bin/.idx build (tokens only), {label}", t_meg, "s")
        row("text+tokenize / Megatron build time", None, "x", t_text / t_meg)
        row("text+tokens / tokens-only shard bytes", None, "x", d_text / d_meg)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    args = ap.parse_args()
    for r in run(args.scale):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
