"""The training comparison on a natural long-tailed corpus, through croupier's own clusters.

The corpus is the docstrings of the installed packages (`bench.common.natural_corpus`, grouped by
package, a held-out split per package). Each build of `NATURAL_BUILDS` is made by
`croupier shards build` in its own process, as a user runs it: the default flat k-means
(K about sqrt N), flat k-means with more clusters (`kmeans-4x`: K = 4 sqrt N), and
`--group-by source` with one cluster per package or k-means inside packages (by size, or 8
per package with and without `--min-cluster-size`). All builds of
one run share an embeddings cache (`--embed-cache`), so the corpus is embedded once, not
once per build. Every sampler is served over that build's clusters from a real server, and
held-out loss is evaluated per *true* package, over several training seeds.

The comparison is paired: the corpus, the held-out split and the builds are fixed (seed 0);
a training seed sets the model init and the sampler seed, and every sampler of that seed
starts from the same init and is evaluated on the same held-out documents. The table
reports, per build and sampler, the mean over seeds of

    mean        mean over packages of the held-out loss (nats per byte)
    rare25      the same over the rarest quarter of the evaluated packages (by training size)
    common25    the same over the commonest quarter
    rare_share  share of the trained examples that came from the rarest quarter
    d_mean, d_rare25   the paired difference to random of the same seed (negative: better)

and in how many seeds the row is below random on mean and on rare25.

    python -m bench.train_natural --scale long --out out/train_natural
    python -m bench.train_natural --scale wide --out out/train_natural_wide  # 2 passes, 4x corpus

`python -m bench.train_compare --corpus natural` runs the same study with the same flags. The
training and evaluation of one sampler is the shared harness, `bench.studies.harness`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import natural_corpus as nc
from bench.studies.harness import Prepared, RunResult, Variant, single_thread_torch, summarize, train_one

_CORPUS = nc.STUDY_CORPUS
NATURAL_SCALES: dict[str, dict[str, Any]] = {
    # fraction / max_docs / max_files / min_docs: the corpus (bench.common.natural_corpus); passes and
    # batch: the training budget (passes over the training documents, examples per step);
    # seeds: one training run per seed and sampler; embedder: the builds' (model-free hashing
    # by default; --embedder minilm embeds once per run, 4 to 6 minutes for the quick corpus
    # on 2 shared cores, then the other builds reuse it through the embeddings cache).
    "tiny": {"fraction": 1.0, "max_docs": 30, "max_files": 3, "min_docs": 5, "passes": 1.0, "batch": 16,
             "seeds": (0,), "embedder": "hashing"},
    "quick": {**_CORPUS, "passes": 2.0, "batch": 32, "seeds": (0, 1, 2), "embedder": "hashing"},
    # the quick corpus with 4x the training budget: the model gets past the first-line
    # statistics every init learns alike, so the samplers' differences outgrow the init's
    "long": {**_CORPUS, "passes": 8.0, "batch": 32, "seeds": (0, 1, 2), "embedder": "hashing"},
    # the same number of steps as long over 4x the corpus (40% of each package): 2 passes, the
    # regime of a pretraining run, with the build's default embedder (MiniLM: about 20 minutes
    # on 2 cores the first time, then from --embed-cache)
    "wide": {**_CORPUS, "fraction": 0.4, "passes": 2.0, "batch": 32, "seeds": (0, 1, 2), "embedder": "minilm"},
}


@dataclass(frozen=True)
class BuildSetting:
    """One `croupier shards build` of the comparison: a name, its extra arguments and, for
    flat k-means with another K, `k_factor` (K = round(k_factor x sqrt N))."""

    name: str
    args: tuple[str, ...] = ()
    k_factor: float | None = None

    def cli_args(self, n: int) -> list[str]:
        if self.k_factor is None:
            return list(self.args)
        return [*self.args, "--clusters", str(int(max(1, min(n, round(self.k_factor * math.sqrt(n))))))]


NATURAL_BUILDS: tuple[BuildSetting, ...] = (
    BuildSetting("kmeans", ()),  # the build default: flat k-means, K about sqrt(N)
    BuildSetting("kmeans-4x", (), k_factor=4.0),  # flat k-means, 4x the default K
    BuildSetting("kmeans-8x", (), k_factor=8.0),  # flat k-means, 8x (bench_tail_clustering: 6 of 97 drowned)
    BuildSetting("source", ("--group-by", "source")),  # grouping default: one cluster per source
    BuildSetting("source/50", ("--group-by", "source", "--cluster-size", "50")),
    BuildSetting("source/150", ("--group-by", "source", "--cluster-size", "150")),
    BuildSetting("source/8", ("--group-by", "source", "--clusters-per-group", "8")),
    BuildSetting("source/8/min50", ("--group-by", "source", "--clusters-per-group", "8", "--min-cluster-size", "50")),
)


def natural_policies(budget_steps: int, clips: Sequence[int] = ()) -> list[Variant]:
    """The cluster-balanced samplers run on every build: uniform, clusterclip at the auto clip
    and at each fixed clip of `clips` (extend this list to add samplers)."""
    return [Variant("uniform", {"policy": "uniform"}),
            Variant("clusterclip auto", {"policy": "clusterclip", "auto_clip": True, "budget_steps": budget_steps,
                                         "on_exhausted": "random"})] + [
        Variant(f"clusterclip {c}", {"policy": "clusterclip", "clip": int(c), "on_exhausted": "random"})
        for c in clips]


def natural_variants(builds: Sequence[BuildSetting], budget_steps: int, clips: Sequence[int] = ()) -> list[Variant]:
    """random once (on the first build: it ignores the clusters), then every policy on every build."""
    out = [Variant("random", {"policy": "random"}, build=builds[0].name)]
    for b in builds:
        out += [Variant(v.name, v.policy, build=b.name) for v in natural_policies(budget_steps, clips)]
    return out


def run_build(jsonl: Path, out: Path, setting: BuildSetting, embedder: str, n: int, seed: int = 0,
              embed_cache: Path | None = None) -> float:
    """`croupier shards build` in its own process, as a user runs it; returns seconds."""
    cmd = [sys.executable, "-m", "croupier", "shards", "build", str(jsonl), "--out", str(out), "--embedder",
           embedder, "--keep-fields", "source", "--seed", str(seed), "--overwrite", "--quiet",
           *setting.cli_args(n)]
    if embed_cache is not None:
        cmd += ["--embed-cache", str(embed_cache)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build {setting.name!r} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def prepare_natural(dataset: Path, heldout: Sequence[dict], names: Sequence[str]) -> tuple[Prepared, dict[str, Any]]:
    """The sampler draws from the sidecar's clusters; evaluation groups are the true sources.

    Returns the Prepared corpus (its clusters fields hold source codes into `names`, its
    layout croupier's clusters) and the build's diagnostics against the sources.
    """
    from croupier.format.sidecar import Sidecar
    from croupier.shards.build.mds import MDSSource
    from croupier.shards.diagnostics import long_tail_report

    side = Sidecar.open(dataset)
    layout = side.layout()
    n = side.num_samples
    with MDSSource(dataset) as src:
        texts = src.texts(0, n, "text")
        sources = src.get(np.arange(n), "source")
    code = {s: i for i, s in enumerate(names)}
    train_codes = np.array([code[s] for s in sources], dtype=np.int64)
    held_codes = np.array([code.get(d["source"], -1) for d in heldout], dtype=np.int64)
    if (held_codes < 0).any():
        raise ValueError("held-out documents from a source with no training documents")
    labels = np.full(n, -1, dtype=np.int64)
    pos = np.arange(layout.num_positions)
    labels[layout.ids_at(pos)] = layout.clusters_of(pos)
    rep = long_tail_report(labels, train_codes, list(names), "source")
    cache = side.manifest.get("embed_cache") or {}
    diag = {"clusters": int(layout.num_clusters), "nmi": rep.nmi, "drowned": len(rep.drowned),
            "sources": len(names), "rare_quarter_purity": rep.rare_quarter_purity,
            "embeddings_reused": bool(cache.get("hit", False))}
    prep = Prepared(dataset=dataset, layout=layout, fingerprint=side.fingerprint, num_clusters=len(names),
                    train_sizes=np.bincount(train_codes, minlength=len(names)), train_texts=texts,
                    train_clusters=train_codes, heldout_texts=[d["text"] for d in heldout],
                    heldout_clusters=held_codes)
    return prep, diag


def rare_share(result: RunResult, prep: Prepared) -> float:
    """Share of the trained examples that came from the rarest quarter of the evaluated sources."""
    ok = np.flatnonzero(np.bincount(prep.heldout_clusters, minlength=prep.num_clusters) > 0)
    order = ok[np.argsort(prep.train_sizes[ok], kind="stable")]
    rare = order[: max(1, len(order) // 4)]
    if result.ids is None:
        raise ValueError(f"{result.name}: the run kept no sample ids")
    per = np.bincount(prep.train_clusters[result.ids], minlength=prep.num_clusters)
    return float(per[rare].sum() / max(1, len(result.ids)))


def _select(builds: Sequence[str] | None) -> list[BuildSetting]:
    settings = list(NATURAL_BUILDS)
    if builds:
        known = [b.name for b in settings]
        unknown = [b for b in builds if b not in known]
        if unknown:
            raise ValueError(f"unknown build(s) {unknown}; valid: {known}")
        settings = [b for b in settings if b.name in builds]
    return settings


def compare_natural(scale: str = "quick", out: str | Path | None = None, *, site_packages: str | Path | None = None,
                    builds: Sequence[str] | None = None, only: Sequence[str] | None = None,
                    embed_cache: str | Path | None = None, clips: Sequence[int] = (), log=sys.stderr,
                    **overrides: Any) -> tuple[list[RunResult], dict[str, Any]]:
    """Natural corpus, croupier's own clusters, per-source held-out loss over several seeds.

    The corpus (docstrings of installed packages, `bench.common.natural_corpus`) and its held-out
    split are fixed (seed 0); each build runs once (`croupier shards build`, seed 0), all of
    them through one embeddings cache (`embed_cache`, default: a folder of the run's temporary
    work, so the corpus is embedded once per run; give a folder to keep it across runs);
    every sampler trains once per seed (model init and sampler seed); `clips` adds clusterclip
    at those fixed clips to every build. Writes results.json and table.txt under `out` when given.
    """
    if scale not in NATURAL_SCALES:
        raise ValueError(f"unknown natural scale {scale!r}; valid scales: {', '.join(NATURAL_SCALES)}")
    params = dict(NATURAL_SCALES[scale], **{k: v for k, v in overrides.items() if v is not None})
    settings = _select(builds)
    single_thread_torch()
    cfg = nc.CorpusConfig(site_packages=str(site_packages or nc.default_site_packages()), fraction=params["fraction"],
                          max_docs=params["max_docs"], min_docs=params["min_docs"], max_files=params["max_files"])
    t0 = time.perf_counter()
    train, heldout = nc.split(nc.collect(cfg))
    names = sorted({d["source"] for d in train})
    sizes = nc.source_sizes(train)
    print(f"[natural] {len(train)} training docstrings from {len(names)} packages ({max(sizes.values())} down to "
          f"{min(sizes.values())}), {len(heldout)} held out from {len({d['source'] for d in heldout})}; "
          f"collected in {time.perf_counter() - t0:.0f}s", file=log, flush=True)
    steps = max(1, int(round(params["passes"] * len(train) / params["batch"])))
    all_variants = natural_variants(settings, steps, clips)
    if only:
        valid = sorted({v.name for v in all_variants})
        unknown = [o for o in only if o not in valid]
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; valid: {valid}")
        all_variants = [v for v in all_variants if v.name in only]
    results: list[RunResult] = []
    build_info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="croupier-natural-") as tmp:
        work = Path(tmp)
        jsonl = nc.write_jsonl(work / "train.jsonl", train)
        cache_dir = Path(embed_cache) if embed_cache is not None else work / "embed-cache"
        preps: dict[str, Prepared] = {}
        for i, b in enumerate(settings):
            secs = run_build(jsonl, work / f"ds-{i}", b, params["embedder"], len(train), embed_cache=cache_dir)
            preps[b.name], diag = prepare_natural(work / f"ds-{i}", heldout, names)
            build_info[b.name] = {"args": b.cli_args(len(train)), "build_s": secs, **diag}
            print(f"[natural] build {b.name} ({' '.join(b.cli_args(len(train))) or 'defaults'}): {diag['clusters']} "
                  f"clusters, NMI {diag['nmi']:.2f}, {diag['drowned']} of {diag['sources']} sources drowned; "
                  f"{secs:.0f}s{' (embeddings reused)' if diag['embeddings_reused'] else ''}", file=log, flush=True)
        for seed in params["seeds"]:
            for v in all_variants:
                prep = preps[v.build]
                r = train_one(prep, v, steps=steps, batch=params["batch"], cache=work / f"cache-{v.build}", seed=seed)
                r.metrics = summarize(r, prep.train_sizes, np.asarray(prep.layout.sizes))
                r.metrics["rare_share"] = rare_share(r, prep)
                results.append(r)
                print(f"[natural] seed {seed} {v.build} {v.name}: mean {r.metrics['mean']:.4f} rare25 "
                      f"{r.metrics['rare25']:.4f} ({r.train_s:.0f}s)", file=log, flush=True)
    info = {"mode": "natural", "scale": scale, "params": {**params, "seeds": list(params["seeds"]), "clips": list(clips)},
            "train_docs": len(train), "heldout_docs": len(heldout), "sources": names,
            "source_sizes": [sizes[n] for n in names], "steps": steps, "builds": build_info,
            "variants": [{"build": v.build, "sampler": v.name, "policy": v.policy} for v in all_variants]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**info, "results": [
            {"build": b, "sampler": r.name, "seed": r.seed, "clip": r.clip, **r.metrics, "train_s": r.train_s,
             "heldout_per_source": [None if np.isnan(x) else x for x in r.heldout_per_cluster]}
            for b, r in zip(_builds_of(results, all_variants), results)]}, indent=1))
        (out / "table.txt").write_text(format_natural(results, info) + "\n\n" + format_per_seed(results, info) + "\n")
    return results, info


def _builds_of(results: Sequence[RunResult], variants_run: Sequence[Variant]) -> list[str]:
    """The build of each result (results run seed-major over `variants_run`)."""
    return [variants_run[i % len(variants_run)].build for i in range(len(results))]


def _rows(results: Sequence[RunResult], info: dict[str, Any]) -> tuple[dict[tuple[str, str], list[RunResult]],
                                                                       dict[int, dict[str, float]]]:
    """Results by (build, sampler), and random's metrics by seed."""
    builds = _builds_of(results, [Variant(v["sampler"], v["policy"], v["build"]) for v in info["variants"]])
    base = {r.seed: r.metrics for b, r in zip(builds, results) if r.name == "random"}
    rows: dict[tuple[str, str], list[RunResult]] = {}
    for b, r in zip(builds, results):
        rows.setdefault((b, r.name), []).append(r)
    return rows, base


def paired(rs: Sequence[RunResult], base: dict[int, dict[str, float]], key: str) -> tuple[float, int, int]:
    """Mean over seeds of (row - random of the same seed) on `key`, seeds below random, seeds paired."""
    d = [r.metrics[key] - base[r.seed][key] for r in rs if r.seed in base]
    return (float(np.mean(d)) if d else float("nan")), sum(x < 0 for x in d), len(d)


def format_natural(results: Sequence[RunResult], info: dict[str, Any]) -> str:
    """Per build and sampler: mean over seeds of mean / rare25 / common25 / rare_share, the
    paired difference to random, and in how many seeds it beat random on mean and on rare25."""
    rows, base = _rows(results, info)
    seeds = len(info["params"]["seeds"])
    head = (f"{'build':<11} {'clusters':>8} {'NMI':>5} {'drowned':>7} {'sampler':<17} {'clip':>5} {'mean':>7} "
            f"{'rare25':>7} {'common25':>8} {'rare_share':>10} {'d_mean':>8} {'d_rare25':>8} "
            f"{'beats random (mean, rare25)':>28}")
    lines = [head, "-" * len(head)]
    for (b, name), rs in rows.items():
        d = info["builds"][b]
        m = {k: float(np.mean([r.metrics[k] for r in rs])) for k in ("mean", "rare25", "common25", "rare_share")}
        clips = sorted({r.clip for r in rs if r.clip})
        wins, dm, dr = "-", "-", "-"
        if name != "random" and base:
            dmv, wm, k = paired(rs, base, "mean")
            drv, wr, _ = paired(rs, base, "rare25")
            wins, dm, dr = f"{wm}/{k}, {wr}/{k}", f"{dmv:+.4f}", f"{drv:+.4f}"
        shown = "any" if name == "random" else b
        lines.append(f"{shown:<11} {d['clusters'] if name != 'random' else '-':>8} "
                     f"{(format(d['nmi'], '.2f') if name != 'random' else '-'):>5} "
                     f"{(d['drowned'] if name != 'random' else '-'):>7} {name:<17} "
                     f"{('/'.join(map(str, clips)) or '-'):>5} {m['mean']:>7.4f} {m['rare25']:>7.4f} "
                     f"{m['common25']:>8.4f} {m['rare_share']:>10.3f} {dm:>8} {dr:>8} {wins:>28}")
    lines.append(f"(means over {seeds} seed(s); loss: held-out nats/byte per true source, lower is better; "
                 f"d_*: paired difference to random of the same seed)")
    return "\n".join(lines)


def format_per_seed(results: Sequence[RunResult], info: dict[str, Any]) -> str:
    """Per build and sampler, mean and rare25 of every seed (the table's inputs)."""
    rows, _ = _rows(results, info)
    seeds = list(info["params"]["seeds"])
    head = f"{'build':<11} {'sampler':<17} {'mean, seeds ' + ' / '.join(map(str, seeds)):<32} rare25"
    lines = [head, "-" * len(head)]
    for (b, name), rs in rows.items():
        by = {r.seed: r.metrics for r in rs}
        mean = " / ".join(f"{by[s]['mean']:.4f}" if s in by else "-" for s in seeds)
        rare = " / ".join(f"{by[s]['rare25']:.4f}" if s in by else "-" for s in seeds)
        lines.append(f"{'any' if name == 'random' else b:<11} {name:<17} {mean:<32} {rare}")
    return "\n".join(lines)


def add_natural_arguments(group: argparse._ActionsContainer,
                          seeds_help: str = "comma-separated seeds (default: the natural scale's)") -> None:
    """The natural study's own flags (besides --scale, --out, --only, --passes), on `group`:
    the same in `python -m bench.train_natural` and `python -m bench.train_compare --corpus natural`."""
    group.add_argument("--site-packages", default=None, help="folder whose packages' docstrings make the corpus "
                                                             "(default: this interpreter's site-packages)")
    group.add_argument("--builds", default="", help=f"comma-separated builds (default: all of "
                                                    f"{', '.join(b.name for b in NATURAL_BUILDS)})")
    group.add_argument("--seeds", default="", help=seeds_help)
    group.add_argument("--embedder", default=None, help="the builds' embedder (default: the scale's)")
    group.add_argument("--fraction", type=float, default=None, help="share of each package's docstrings kept")
    group.add_argument("--clips", default="", help="comma-separated fixed clips: clusterclip at each of them on every "
                                                   "build, besides the auto clip (default: none)")
    group.add_argument("--embed-cache", default=None, metavar="DIR",
                       help="the builds' embeddings cache, kept across runs (default: one per run, in its temporary "
                            "folder: every build after the first reuses the first's embeddings)")


def run_natural(args: argparse.Namespace, only: Sequence[str] | None) -> int:
    """Runs the study from parsed flags (`add_natural_arguments`' and scale, out, passes) and
    prints its tables; `only`: the sampler names to run (None: all)."""
    t0 = time.perf_counter()
    seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip()) or None
    results, info = compare_natural(args.scale or "quick", args.out, site_packages=args.site_packages,
                                    builds=[b.strip() for b in args.builds.split(",") if b.strip()] or None,
                                    only=only, seeds=seeds, embedder=args.embedder, fraction=args.fraction,
                                    passes=args.passes, embed_cache=args.embed_cache,
                                    clips=[int(c) for c in args.clips.split(",") if c.strip()])
    print(f"\n{info['train_docs']} training docstrings from {len(info['sources'])} packages "
          f"({max(info['source_sizes'])} down to {min(info['source_sizes'])}), {info['heldout_docs']} held out; "
          f"{info['steps']} steps x {info['params']['batch']} ({info['params']['passes']} passes), "
          f"seeds {info['params']['seeds']}, embedder {info['params']['embedder']}")
    print(format_natural(results, info))
    print()
    print(format_per_seed(results, info))
    print(f"wrote {args.out}/results.json, table.txt in {time.perf_counter() - t0:.0f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.train_natural`: the natural study alone."""
    p = argparse.ArgumentParser(prog="python -m bench.train_natural", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(NATURAL_SCALES), default="quick")
    p.add_argument("--out", default="out/train_natural", help="folder for results.json, table.txt")
    p.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
    p.add_argument("--passes", type=float, default=None, help="training budget in passes (default: the scale's)")
    add_natural_arguments(p.add_argument_group("natural corpus"))
    args = p.parse_args(argv)
    return run_natural(args, [s.strip() for s in args.only.split(",") if s.strip()] or None)


if __name__ == "__main__":
    sys.exit(main())
