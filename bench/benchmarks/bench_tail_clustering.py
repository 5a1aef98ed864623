"""Which clustering keeps a long tail's rare groups apart: flat k-means at several K, against
hierarchical (bisecting) and balanced variants, on the natural corpus.

ClusterClip can only up-sample a rare group when the group owns a cluster. This benchmark
embeds the natural corpus (bench/common/natural_corpus.py: docstrings of the installed packages, the
package as the true group) with the build's embedder and clusters the same matrix with:

- flat spherical k-means (what `croupier shards build` does) at K = f x sqrt(N), f = 1, 2, 4, 8;
- bisecting k-means from sqrt(default K) clusters up to K, splitting next either the cluster of the
  widest spread (mean cosine distance to its centroid: a mixed cluster, whatever its size;
  "density-aware") or of the largest summed distance (classic bisecting);
- balanced k-means: flat centroids, then every document to its nearest centroid that still
  has room (capacity N/K);
- hierarchical k-means on the centroids (the concept-balancing of Vo et al. 2024, "Automatic
  data curation for self-supervised learning"): flat k-means into 8 x the default K fine
  clusters, then k-means of the fine centroids (one point each) into K, so a dense region
  that took many fine clusters becomes one cluster and balancing no longer favours it.

For each: NMI against the packages, the packages *drowned* (under 10% of the cluster holding
most of them: balancing clusters cannot reach them; shards/diagnostics.py), the rarest
quarter's mean purity, and its *tail gain*: the share of the draws balancing these clusters
would deal the rarest quarter of packages, over its natural share (the figure that predicted
the training outcome; docs/demo.md). A last line gives the embedding's own limit, whatever
the clustering: the share of a document's possible same-package neighbours among its 10
nearest, for the rarest and the commonest quarter of packages. The reference is flat k-means at the build's default K (about sqrt N)
in the same run; the ratio is drowned / the reference's drowned.

Scales: quick uses the hashing embedder (model-free, seconds), full MiniLM (the build
default; a few minutes on 2 cores, kept in --cache). `--embedder tfidf-words|tfidf-chars`
clusters lexical or stylistic representations instead (`LSA_EMBEDDERS`), `--fraction 0.4`
the 4x larger corpus.

Run: python -m bench.benchmarks.bench_tail_clustering [--scale quick|full] [--embedder NAME] [--fraction F] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from croupier.shards.build.cluster import normalize
from croupier.shards.diagnostics import MIN_TAIL_GAIN


def _kmeans(points: np.ndarray, k: int, seed: int = 0, niter: int = 20, nredo: int = 1) -> np.ndarray:
    import faiss

    d = points.shape[1]
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, nredo=nredo,
                      max_points_per_centroid=max(1, len(points) // k + 1), min_points_per_centroid=1)
    km.train(np.ascontiguousarray(points, dtype=np.float32))
    return normalize(km.centroids.reshape(k, d))


def _nearest(x: np.ndarray, centroids: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(x, k)


def flat(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """What the build does: spherical k-means, every document to its nearest centroid."""
    return _nearest(x, _kmeans(x, k, seed))[1][:, 0]


def bisecting(x: np.ndarray, k: int, k0: int, by: str, seed: int = 0, min_size: int = 2) -> np.ndarray:
    """From flat k0 clusters, split one cluster in two (2-means) until k: the cluster of the
    widest mean spread (`by="spread"`) or of the largest summed spread (`by="sse"`)."""
    labels = flat(x, k0, seed)
    clusters = {c: np.flatnonzero(labels == c) for c in range(k0)}

    def score(ids: np.ndarray) -> float:
        if len(ids) < 2 * min_size:
            return -1.0
        c = normalize(x[ids].mean(0, keepdims=True))[0]
        spread = float(np.mean(1.0 - x[ids] @ c))
        return spread if by == "spread" else spread * len(ids)

    heap = [(-score(ids), c) for c, ids in clusters.items()]
    heapq.heapify(heap)
    nxt = k0
    while len(clusters) < k and heap:
        s, c = heapq.heappop(heap)
        if -s < 0:
            break
        ids = clusters.pop(c)
        side = np.argmax(x[ids] @ _kmeans(x[ids], 2, seed + nxt).T, axis=1)
        if side.min() == side.max():
            clusters[c] = ids
            continue
        for j in (0, 1):
            clusters[nxt] = ids[side == j]
            heapq.heappush(heap, (-score(clusters[nxt]), nxt))
            nxt += 1
    centroids = normalize(np.stack([x[ids].mean(0) for ids in clusters.values()]))
    return _nearest(x, centroids)[1][:, 0]


def balanced(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Flat centroids; documents, most confident first, to the nearest centroid with room (N/K)."""
    sims, cand = _nearest(x, _kmeans(x, k, seed), k)
    cap = math.ceil(len(x) / k)
    load = np.zeros(k, dtype=np.int64)
    labels = np.full(len(x), -1, dtype=np.int64)
    for i in np.argsort(-sims[:, 0], kind="stable"):
        for j in cand[i]:
            if load[j] < cap:
                labels[i] = j
                load[j] += 1
                break
    return labels


def hierarchical(x: np.ndarray, k: int, fine: int, seed: int = 0) -> np.ndarray:
    """Flat k-means into `fine` clusters, then k-means of their centroids into `k`: a document
    takes the cluster of its fine cluster's centroid. The second k-means runs on few points, so it
    keeps the best of 10 starts."""
    fine_c = _kmeans(x, fine, seed)
    _, l1 = _nearest(x, fine_c)
    top = _kmeans(fine_c, k, seed, nredo=10)
    _, l2 = _nearest(fine_c, top)
    return l2[:, 0][l1[:, 0]].astype(np.int64)


def neighbour_recall(x: np.ndarray, groups: np.ndarray, k: int = 10) -> np.ndarray:
    """Per document: the share of its possible same-group neighbours (min(k, group size - 1))
    among its `k` nearest by cosine; 0 for a group of one."""
    _, nn = _nearest(x, x, k + 1)
    own = (groups[nn[:, 1:]] == groups[:, None]).sum(axis=1)
    cap = np.minimum(np.bincount(groups)[groups] - 1, k)
    return np.where(cap > 0, own / np.maximum(cap, 1), 0.0)


def quarter_means(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean of `values` over the documents of the rarest and of the commonest quarter of groups."""
    sizes = np.bincount(groups)
    order = np.argsort(sizes, kind="stable")
    q = max(1, len(order) // 4)
    return (float(values[np.isin(groups, order[:q])].mean()), float(values[np.isin(groups, order[-q:])].mean()))


LSA_EMBEDDERS = {"tfidf-words": {"analyzer": "word", "ngram_range": (1, 1), "min_df": 2, "max_df": 0.5},
                 "tfidf-chars": {"analyzer": "char", "ngram_range": (2, 4), "min_df": 3, "lowercase": False,
                                 "max_features": 200_000}}
"""Lexical and stylistic representations to compare with the build's embedders: TF-IDF of
words or of character 2-4-grams (punctuation and layout included), reduced to 256 dimensions
(latent semantic analysis). Not offered by the build: they fit on the whole corpus first."""


def lsa(texts: list[str], name: str, dim: int = 256) -> np.ndarray:
    """Unit-norm TF-IDF + truncated SVD embeddings (`LSA_EMBEDDERS[name]`), fitted on `texts`."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tf = TfidfVectorizer(sublinear_tf=True, **LSA_EMBEDDERS[name]).fit_transform(texts)
    return normalize(np.asarray(TruncatedSVD(min(dim, tf.shape[1] - 1), random_state=0).fit_transform(tf),
                                dtype=np.float32))


def embed(texts: list[str], embedder: str, cache: Path | None) -> np.ndarray:
    """Unit-norm float32 embeddings of `texts`, from `cache` when it holds this corpus's."""
    from croupier.shards.build.embed import get_embedder

    key = hashlib.sha256(json.dumps([embedder, texts]).encode()).hexdigest()[:24]
    path = cache / f"tail-{key}.npy" if cache is not None else None
    if path is not None and path.exists():
        return np.load(path)
    if embedder in LSA_EMBEDDERS:
        x = lsa(texts, embedder)
    else:
        x = normalize(np.asarray(get_embedder(embedder).encode(texts), dtype=np.float32))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
    return x


SCALES = {"quick": {"embedder": "hashing"}, "full": {"embedder": "minilm"}}


def run(scale: str = "quick", cache: Path | None = None) -> list[dict]:
    """Benchmark rows (python -m bench): drowned packages and NMI per variant, the ratio
    against flat k-means at the default K."""
    rows = []
    for r in measure(SCALES[scale]["embedder"], cache):
        if "neighbour_recall" in r:
            for q, v in r["neighbour_recall"].items():
                rows.append({"bench": "tail clustering: the embedding's 10 nearest neighbours",
                             "metric": f"own-package share of the possible, {q}", "value": v, "unit": "",
                             "reference": None, "ratio": None, "target": "(info: the limit of any clustering)"})
            continue
        name = f"tail clustering: {r['method']}, K={r['k']}"
        rows.append({"bench": name, "metric": f"drowned packages (of {r['groups']})", "value": r["drowned"],
                     "unit": "", "reference": r["reference"], "ratio": r["ratio"],
                     "target": "(info: lower keeps more of the tail apart)"})
        rows.append({"bench": name, "metric": "NMI vs packages", "value": r["nmi"], "unit": "", "reference": None,
                     "ratio": None, "target": "(info)"})
        rows.append({"bench": name, "metric": "tail gain (rarest quarter's share, balanced / natural)",
                     "value": r["tail_gain"], "unit": "x", "reference": r["reference_gain"],
                     "ratio": r["tail_gain"] / r["reference_gain"], "target": f"(info: >= {MIN_TAIL_GAIN} reaches the tail)"})
    return rows


def measure(embedder: str = "minilm", cache: Path | None = None, log=sys.stderr,
            fraction: float | None = None) -> list[dict]:
    """Every clustering of the natural corpus (`fraction` of each package's docstrings; default
    the `long` natural scale's 10%) against the packages."""
    from bench.common import natural_corpus as nc
    from croupier.shards.build.builder import auto_clusters
    from croupier.shards.diagnostics import long_tail_report

    p = nc.STUDY_CORPUS  # the corpus of the natural training study's long scale
    cfg = nc.CorpusConfig(site_packages=str(nc.default_site_packages()), fraction=fraction or p["fraction"],
                          max_docs=p["max_docs"], min_docs=p["min_docs"], max_files=p["max_files"])
    train, _ = nc.split(nc.collect(cfg))
    names = sorted({d["source"] for d in train})
    code = {n: i for i, n in enumerate(names)}
    groups = np.asarray([code[d["source"]] for d in train])
    t0 = time.perf_counter()
    x = embed([d["text"] for d in train], embedder, cache)
    print(f"[tail] {len(train)} documents, {len(names)} packages, {embedder} embeddings in "
          f"{time.perf_counter() - t0:.0f}s", file=log, flush=True)
    k1 = auto_clusters(len(train))
    variants: list[tuple[str, int, Callable[[], np.ndarray]]] = []
    for f in (1, 2, 4, 8):
        k = min(len(train), f * k1)
        variants.append(("flat k-means", k, lambda k=k: flat(x, k)))
    for f in (1, 4):
        k = min(len(train), f * k1)
        k0 = max(2, round(math.sqrt(k1)))
        variants += [("bisecting, widest spread first", k, lambda k=k, k0=k0: bisecting(x, k, k0, "spread")),
                     ("bisecting, largest sum first", k, lambda k=k, k0=k0: bisecting(x, k, k0, "sse")),
                     ("balanced (capacity N/K)", k, lambda k=k: balanced(x, k))]
    for f in (1, 2):
        k = min(len(train), f * k1)
        fine = min(len(train), 8 * k1)
        variants.append((f"hierarchical, {fine} fine", k, lambda k=k, fine=fine: hierarchical(x, k, fine)))
    rows: list[dict] = []
    ref = None
    for name, k, make in variants:
        labels = make()
        rep = long_tail_report(labels, groups, names, "source")
        row = {"method": name, "k": k, "clusters": int(len(np.unique(labels))), "nmi": rep.nmi,
               "drowned": len(rep.drowned), "groups": len(names), "rare_purity": rep.rare_quarter_purity,
               "tail_gain": rep.tail_gain}
        if ref is None:
            ref = row
        row["reference"] = ref["drowned"]
        row["ratio"] = row["drowned"] / ref["drowned"] if ref["drowned"] else float("nan")
        row["reference_gain"] = ref["tail_gain"]
        rows.append(row)
        print(f"[tail] {name:<32} K {k:>4}: NMI {rep.nmi:.3f}, drowned {len(rep.drowned):>3} of {len(names)}, "
              f"rare-quarter purity {rep.rare_quarter_purity:.2f}, tail gain {rep.tail_gain:.2f}x", file=log, flush=True)
    rare, common = quarter_means(neighbour_recall(x, groups), groups)
    rows.append({"method": "10 nearest neighbours", "k": 0, "neighbour_recall": {"rare25": rare, "common25": common},
                 "groups": len(names)})
    print(f"[tail] own-package share of the possible among the 10 nearest: rarest quarter {rare:.2f}, "
          f"commonest {common:.2f}", file=log, flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [f"{'method':<32} {'K':>5} {'NMI':>6} {'drowned':>8} {'rare25 purity':>14} {'tail gain':>10} "
           f"{'drowned / flat at sqrt N':>25}"]
    for r in rows:
        if "neighbour_recall" in r:
            nr = r["neighbour_recall"]
            out.append(f"own-package share of the possible among the 10 nearest: rarest quarter {nr['rare25']:.2f}, "
                       f"commonest quarter {nr['common25']:.2f}")
            continue
        out.append(f"{r['method']:<32} {r['k']:>5} {r['nmi']:>6.3f} {r['drowned']:>4} / {r['groups']:<3}"
                   f"{r['rare_purity']:>14.2f} {r['tail_gain']:>9.2f}x {r['ratio']:>25.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--embedder", default=None,
                    help="the embedder (default: the scale's; full: minilm, the build's), or tfidf-words / tfidf-chars")
    ap.add_argument("--fraction", type=float, default=None,
                    help="share of each package's docstrings (default 0.1; 0.4 is the 4x corpus of docs/demo.md)")
    ap.add_argument("--cache", default="out/bench-tail-cache", help="folder keeping the corpus's embeddings")
    args = ap.parse_args(argv)
    embedder = args.embedder or SCALES[args.scale]["embedder"]
    print(format_rows(measure(embedder, Path(args.cache) if args.cache else None, fraction=args.fraction)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
