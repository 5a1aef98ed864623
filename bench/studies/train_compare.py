"""Training comparison: which sampler gives the best held-out loss on a long-tailed corpus?

The same tiny byte-level decoder-only LM (croupier.apps.tinylm, fixed seed) is trained for the
same number of examples (steps x global batch, a few passes over the data) on the same
corpus, once per sampler: random, uniform, clusterclip at `--clip auto` and at two fixed
thresholds, g2s and s2g. Every run goes through the real path: a sampler server (gRPC, in
this process, bound to a local port) and the client's `CroupierIterableDataset`, which
streams the MDS shards `croupier shards build` wrote.

Corpus: `croupier.shards.build.synthetic` (planted topics, Zipf-like sizes). Each topic is split
into training documents (sharded by `croupier shards build`) and held-out documents. The
sampler's clusters are the planted topics by default (k-means on this corpus splits the big
topics and evens out cluster sizes, which would hide the long tail the samplers differ on);
`--clusters kmeans` uses the sidecar's k-means clusters instead (held-out documents go to the
nearest centroid). After training, held-out loss is averaged per cluster and the table reports:

    mean       mean over clusters of the held-out loss (nats per byte)
    rare25     mean held-out loss over the rarest quartile of clusters (by training size)
    common25   mean held-out loss over the most common quartile of clusters
    rare_gap   held-out minus training loss on the rarest quartile: the over-fitting that
               the clip is meant to prevent

Clipped runs continue as random once every cluster is exhausted (`on_exhausted="random"`),
so every sampler trains on the same number of examples.

    python -m bench.train_compare --scale full --out out/train_compare

`--corpus natural` runs the natural study instead (`bench.studies.train_natural`, also its own
entry point `python -m bench.train_natural`): the docstrings of the installed packages
grouped by package, built by `croupier shards build`, each sampler served over croupier's own
clusters, held-out loss per *true* package, paired over several training seeds.

    python -m bench.train_compare --corpus natural --scale long --out out/train_natural

The training and evaluation of one sampler is the shared harness, `bench.studies.harness`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.studies import train_natural as tn
from bench.studies.harness import Prepared, RunResult, Variant, single_thread_torch, summarize, train_one

SCALES: dict[str, dict[str, Any]] = {
    # docs: corpus size before the held-out split; passes: training budget in passes over the
    # training documents; batch: global batch (examples per step).
    "tiny": {"docs": 240, "topics": 8, "alpha": 1.2, "passes": 1.0, "batch": 16, "clips": (2, 6)},
    "quick": {"docs": 1500, "topics": 20, "alpha": 1.2, "passes": 3.0, "batch": 32, "clips": (2, 8)},
    "full": {"docs": 4000, "topics": 32, "alpha": 1.2, "passes": 3.0, "batch": 32, "clips": (2, 8)},
}
HELDOUT_FRACTION = 0.2
MIN_HELDOUT = 3


def adaptive_variants(budget_steps: int) -> list[Variant]:
    """random, static clusterclip (auto clip) and the same with each controller re-weighting it."""
    auto = {"policy": "clusterclip", "auto_clip": True, "budget_steps": budget_steps, "on_exhausted": "random"}
    return [Variant("random", {"policy": "random"}), Variant("clusterclip auto", auto)] + [
        Variant(f"adapt {name}", auto, adapt=name) for name in ("odm", "ado", "loss-softmax")]


def variants(budget_steps: int, clips: Sequence[int]) -> list[Variant]:
    """random, uniform, clusterclip (auto + fixed clips), g2s, s2g for a budget of steps."""
    out = [Variant("random", {"policy": "random"}), Variant("uniform", {"policy": "uniform"}),
           Variant("clusterclip auto", {"policy": "clusterclip", "auto_clip": True, "budget_steps": budget_steps,
                                        "on_exhausted": "random"})]
    out += [Variant(f"clusterclip {c}", {"policy": "clusterclip", "clip": int(c), "on_exhausted": "random"})
            for c in clips]
    out += [Variant(p, {"policy": p, "switch_fraction": 0.5, "budget_steps": budget_steps}) for p in ("g2s", "s2g")]
    return out


def split_corpus(docs: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Per topic, HELDOUT_FRACTION (at least MIN_HELDOUT) of the documents are held out."""
    topics = np.array([d["topic"] for d in docs])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D]))
    held = np.zeros(len(docs), dtype=bool)
    for t in np.unique(topics):
        idx = np.flatnonzero(topics == t)
        k = max(MIN_HELDOUT, int(round(HELDOUT_FRACTION * len(idx))))
        if len(idx) - k < 2:
            continue  # too small to split: keep it all for training
        held[rng.choice(idx, size=k, replace=False)] = True
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def prepare(work: Path, docs: int, topics: int, alpha: float, seed: int = 0, clusters: str = "topics") -> Prepared:
    """Generate, split, shard + embed + cluster (hashing embedder, K = topics), assign held-out.

    clusters="topics": the sampler's clusters are the planted topics (kept as an MDS column),
    so the comparison measures the samplers on a known long-tailed mix; "kmeans": the
    sidecar's k-means clusters, held-out documents assigned to the nearest centroid.
    """
    from croupier.format.sidecar import Sidecar
    from croupier.layout import ClusterLayout
    from croupier.shards.build.builder import BuildConfig, build
    from croupier.shards.build.embed import get_embedder
    from croupier.shards.build.mds import MDSSource
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    t0 = time.perf_counter()
    corpus = generate_corpus(docs, topics, alpha=alpha, seed=seed)
    train, heldout = split_corpus(corpus, seed)
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "train.jsonl"
    write_jsonl(jsonl, train)
    dataset = work / "dataset"
    build(BuildConfig(out=str(dataset), inputs=(str(jsonl),), embedder="hashing", clusters=topics,
                      keep_fields=("topic",), seed=seed, progress=False, overwrite=True))
    side = Sidecar.open(dataset)
    n = side.num_samples
    with MDSSource(dataset) as src:
        train_texts = src.texts(0, n, "text")
        train_topics = np.asarray(src.get(np.arange(n), "topic"), dtype=np.int64)
    if clusters == "topics":
        present = np.unique(train_topics)
        remap = np.full(topics, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        layout = ClusterLayout.from_assignments(remap[train_topics])
        labels = remap[train_topics]
        held_clusters = remap[np.array([d["topic"] for d in heldout], dtype=np.int64)]
    elif clusters == "kmeans":
        layout = side.layout()
        labels = np.full(n, -1, dtype=np.int64)
        pos = np.arange(layout.num_positions)
        labels[layout.ids_at(pos)] = layout.clusters_of(pos)
        emb = get_embedder("hashing", seed=seed).encode([d["text"] for d in heldout])
        held_clusters = np.argmax(emb @ np.asarray(side.centroids(), dtype=np.float32).T, axis=1).astype(np.int64)
    else:
        raise ValueError(f"unknown cluster source {clusters!r}; valid: topics, kmeans")
    return Prepared(dataset=dataset, layout=layout, fingerprint=side.fingerprint,
                    num_clusters=layout.num_clusters, train_sizes=np.asarray(layout.sizes),
                    train_texts=train_texts, train_clusters=labels, heldout_texts=[d["text"] for d in heldout],
                    heldout_clusters=held_clusters, build_s=time.perf_counter() - t0)


def format_table(results: Sequence[RunResult]) -> str:
    head = f"{'sampler':<18} {'clip':>4} {'mean':>7} {'rare25':>7} {'common25':>8} {'rare_gap':>8} {'max_pass':>8} {'train_s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        lines.append(f"{r.name:<18} {str(r.clip or '-'):>4} {m['mean']:>7.4f} {m['rare25']:>7.4f} "
                     f"{m['common25']:>8.4f} {m['rare_gap']:>+8.4f} {m['max_passes']:>8.1f} {r.train_s:>7.1f}")
    return "\n".join(lines)


def plot(results: Sequence[RunResult], sizes: np.ndarray, path: Path) -> Path:
    """Three panels: per-cluster held-out loss (minus random's, when random ran) vs cluster
    size; the mean / rare25 / common25 summary; the rare-cluster train/held-out gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r.heldout_per_cluster for r in results if r.name == "random"), None)
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.3, 1.2, 0.8]})
    for i, r in enumerate(results):
        y = r.heldout_per_cluster - (base if base is not None else 0.0)
        ok = ~np.isnan(y)
        ax.plot(sizes[ok] * np.exp(0.04 * (i - len(results) / 2)), y[ok], "o", ms=3.5, alpha=0.8,
                label=r.name, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("cluster size (training documents)")
    if base is not None:
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_ylabel("held-out loss − random's (nats/byte)")
        ax.set_title("Per cluster, relative to random (below 0: better)")
    else:
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title("Held-out loss per cluster")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    names = ("mean", "rare25", "common25")
    x = np.arange(len(names))
    w = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        ax2.bar(x + i * w, [r.metrics[n] for n in names], width=w, label=r.name, color=f"C{i}")
        ax3.bar(i, r.metrics["rare_gap"], color=f"C{i}")
    lo = min(r.metrics[n] for r in results for n in names)
    hi = max(r.metrics[n] for r in results for n in names)
    pad = 0.1 * (hi - lo) + 0.02
    ax2.set_ylim(lo - pad, hi + pad)
    ax2.set_xticks(x + w * (len(results) - 1) / 2, names)
    ax2.set_ylabel("held-out loss (nats/byte)")
    ax2.set_title("Summary over clusters (lower is better)")
    ax2.grid(True, axis="y", alpha=0.3)
    ax3.set_xticks(np.arange(len(results)), [r.name for r in results], rotation=45, ha="right", fontsize=8)
    ax3.axhline(0.0, color="0.5", lw=0.8)
    ax3.set_ylabel("held-out − train loss (nats/byte)")
    ax3.set_title("Over-fitting on the rarest quartile")
    ax3.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(scale: str = "full", out: str | Path | None = None, *, only: Sequence[str] | None = None,
            seed: int = 0, clusters: str = "topics", log=sys.stderr, adaptive: bool = False,
            **overrides: Any) -> tuple[list[RunResult], dict[str, Any]]:
    """Runs the whole comparison; writes results.json and compare.png under `out` when given."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    params = dict(SCALES[scale], **{k: v for k, v in overrides.items() if v is not None})
    single_thread_torch()
    with tempfile.TemporaryDirectory(prefix="croupier-compare-") as tmp:
        work = Path(tmp)
        prep = prepare(work, params["docs"], params["topics"], params["alpha"], seed, clusters)
        n = len(prep.train_texts)
        steps = max(1, int(round(params["passes"] * n / params["batch"])))
        all_variants = adaptive_variants(steps) if adaptive else variants(steps, params["clips"])
        if only:
            valid = [v.name for v in all_variants]
            unknown = [o for o in only if o not in valid]
            if unknown:
                raise ValueError(f"unknown sampler(s) {unknown}; valid: {valid}")
            all_variants = [v for v in all_variants if v.name in only]
        print(f"[compare] {n} training docs in {prep.num_clusters} clusters (sizes {int(prep.train_sizes.min())}.."
              f"{int(prep.train_sizes.max())}), {len(prep.heldout_texts)} held-out; {steps} steps x "
              f"{params['batch']} = {steps * params['batch']} examples ({params['passes']} passes); "
              f"built in {prep.build_s:.1f}s", file=log, flush=True)
        results = []
        for v in all_variants:
            r = train_one(prep, v, steps=steps, batch=params["batch"], cache=work / "cache", seed=seed)
            r.metrics = summarize(r, prep.train_sizes)
            results.append(r)
            print(f"[compare] {v.name}: held-out mean {r.metrics['mean']:.4f} ({r.train_s:.1f}s)", file=log, flush=True)
        info = {"scale": scale, "clusters_from": clusters, "params": {**params, "clips": list(params["clips"])}, "train_docs": n,
                "heldout_docs": len(prep.heldout_texts), "clusters": prep.num_clusters,
                "cluster_sizes": prep.train_sizes.tolist(), "steps": steps, "seed": seed}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot(results, np.asarray(info["cluster_sizes"]), out / "compare.png")
        (out / "results.json").write_text(json.dumps({
            **info,
            "results": [{"sampler": r.name, "policy": r.policy, "clip": r.clip, **r.metrics,
                         "train_s": r.train_s, "final_train_loss": r.final_train_loss,
                         "heldout_per_cluster": [None if np.isnan(x) else x for x in r.heldout_per_cluster],
                         "train_per_cluster": [None if np.isnan(x) else x for x in r.train_per_cluster],
                         "draws": r.draws.tolist()} for r in results]}, indent=1))
        (out / "table.txt").write_text(format_table(results) + "\n")
    return results, info


def compare_adaptive(scale: str, out: str | Path | None, seeds: Sequence[int], clusters: str = "topics",
                     log=sys.stderr, **overrides: Any) -> tuple[dict[str, dict[str, list[float]]], str]:
    """Static clusterclip vs the three controllers vs random, over several seeds (corpus, model
    and sampler seed move together); returns per-sampler metric lists and the table."""
    per: dict[str, dict[str, list[float]]] = {}
    group: dict[str, list[list[float | None]]] = {}
    for seed in seeds:
        results, info = compare(scale, None, seed=seed, clusters=clusters, log=log, adaptive=True, **overrides)
        for r in results:
            m = per.setdefault(r.name, {})
            for key in ("mean", "worst25", "rare25", "common25"):
                m.setdefault(key, []).append(r.metrics[key])
            group.setdefault(r.name, []).append([None if np.isnan(x) else float(x) for x in r.heldout_per_cluster])
    head = (f"{'sampler':<20} {'mean':>15} {'worst25':>15} {'rare25':>15} {'common25':>15}   "
            f"(mean ± sd over seeds {', '.join(map(str, seeds))})")
    lines = [head, "-" * len(head)]
    for name, m in per.items():
        cells = " ".join(f"{np.mean(v):>7.4f}±{np.std(v):<6.4f}" for v in (m["mean"], m["worst25"], m["rare25"],
                                                                           m["common25"]))
        lines.append(f"{name:<20} {cells}")
    base = per.get("clusterclip auto")
    if base:
        lines.append("")
        for name, m in per.items():
            if name.startswith("adapt"):
                wins = sum(a < b for a, b in zip(m["worst25"], base["worst25"]))
                lines.append(f"{name}: worst25 below static clusterclip in {wins} of {len(seeds)} seeds; "
                             f"mean {'at or below' if np.mean(m['mean']) <= np.mean(base['mean']) else 'above'} it")
    table = "\n".join(lines)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptive.json").write_text(json.dumps({"seeds": list(seeds), "scale": scale, "metrics": per,
                                                       "heldout_per_cluster": group}, indent=1))
        (out / "adaptive.txt").write_text(table + "\n")
    return per, table


def run(scale: str = "full") -> list[dict]:
    """Benchmark-runner entry point: one row per sampler (held-out mean, ratio vs random)."""
    results, _ = compare(scale)
    base = next((r.metrics["mean"] for r in results if r.name == "random"), None)
    rows = []
    for r in results:
        rows.append({"bench": "train_compare", "metric": f"held-out loss, {r.name}", "value": r.metrics["mean"],
                     "unit": "nats/byte", "reference": base, "ratio": (r.metrics["mean"] / base) if base else None,
                     "target": "report (a study, no target)"})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.train_compare`: the synthetic study, its adaptive variant, or (`--corpus
    natural`) the natural study with the same flags as `python -m bench.train_natural`."""
    p = argparse.ArgumentParser(prog="python -m bench.train_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=("synthetic", "natural"), default="synthetic",
                   help="synthetic planted topics (default) or natural: docstrings of the installed packages, "
                        "grouped by package, sampled through croupier's own clusters (`shards build`)")
    p.add_argument("--scale", choices=tuple(dict.fromkeys([*SCALES, *tn.NATURAL_SCALES])), default=None,
                   help="default: full (synthetic), quick (natural)")
    p.add_argument("--out", default="out/train_compare", help="folder for compare.png, results.json, table.txt")
    p.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", choices=("topics", "kmeans"), default="topics",
                   help="sampler clusters: the planted topics (default) or the sidecar's k-means clusters")
    p.add_argument("--docs", type=int, default=None)
    p.add_argument("--topics", type=int, default=None)
    p.add_argument("--passes", type=float, default=None)
    p.add_argument("--adaptive", action="store_true",
                   help="random vs static clusterclip vs clusterclip re-weighted by odm, ado and loss-softmax "
                        "(the trainer reports per-example losses), over --seeds (default 0,1,2)")
    tn.add_natural_arguments(p.add_argument_group("natural corpus"),
                             seeds_help="comma-separated seeds (default: the natural scale's; --adaptive: 0,1,2)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    t0 = time.perf_counter()
    if args.adaptive:
        seeds_a = [int(x) for x in (args.seeds or "0,1,2").split(",") if x.strip()]
        _, table = compare_adaptive(args.scale or "full", args.out, seeds_a, clusters=args.clusters, docs=args.docs,
                                    topics=args.topics, passes=args.passes)
        print(table)
        print(f"\nloss: held-out nats/byte per cluster (lower is better); worst25 = mean of the worst quartile of "
              f"clusters; wrote {args.out}/adaptive.txt, adaptive.json in {time.perf_counter() - t0:.0f}s")
        return 0
    if args.corpus == "natural":
        if (args.scale or "quick") not in tn.NATURAL_SCALES:
            p.error(f"unknown natural scale {args.scale!r}; valid: {', '.join(tn.NATURAL_SCALES)}")
        return tn.run_natural(args, only)
    args.scale = args.scale or "full"
    if args.scale not in SCALES:
        p.error(f"unknown synthetic scale {args.scale!r}; valid: {', '.join(SCALES)}")
    results, info = compare(args.scale, args.out, only=only, seed=args.seed, clusters=args.clusters, docs=args.docs, topics=args.topics,
                            passes=args.passes)
    print(f"\n{info['train_docs']} training docs, {info['clusters']} clusters ({info['clusters_from']}), {info['steps']} steps x "
          f"{info['params']['batch']} examples ({info['params']['passes']} passes), seed {info['seed']}")
    print(format_table(results))
    print("\nloss: held-out nats/byte (lower is better); rare_gap = held-out - train on the rarest quartile")
    print(f"wrote {args.out}/compare.png, results.json, table.txt in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
