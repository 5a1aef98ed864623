"""Mixture specs: a TOML file naming the sources of one job, validated before anything runs.

```toml
budget_steps = 20000                 # optional: for clip = "auto"
on_source_exhausted = "redistribute" # or "stop": end the job when any source runs dry
unit = "samples"                     # or "tokens": weights count tokens (needs token counts)

[sources.web]                        # the table name is the source's name
dataset = "/data/web"                # built by `croupier shards build`, or an s3:// URL
weight = 3.0                         # relative; 0 pauses the source
policy = "clusterclip"               # uniform | clusterclip | weighted | random
clip = 4                             # or "auto"
```

Other source keys: `selection` (draw only inside that named selection), `cluster_weights`
(weighted: a list, or "@FILE" with one number per line), `epochs` (random: passes at most),
`remote` (where ranks read the shards, default the sidecar's remote or the dataset),
`cluster_sizes` with `block_size` (a synthetic source with contiguous ids, for dry runs and
tests; no shards), `token_budget` (unit = "tokens", two sources or more: the stream tokens, EOS
included, the source deals at most under a job dealt in tokens; then its share goes to the
others). Unknown keys are refused by name.

Global ids are each source's local ids offset by the full id spaces of the sources before it,
in file order. A mixture of one source builds the single-dataset sampler: same fingerprint,
same sequence as `croupier serve DATASET` with the same flags.

This module reads and opens (files, sidecars, `s3://`); the sampler a `Mixture` stands for
is built by the pure core, `croupier.server.sampling.mixture.mixture_sampler`.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.bounds import INT64_MAX, cluster_sizes
from croupier.datasets import open_dataset
from croupier.errors import ConfigError, CroupierError
from croupier.format.sidecar import Sidecar
from croupier.format.sidecar_layout import TOKEN_COUNTS
from croupier.layout import ClusterLayout

UNITS: tuple[str, ...] = ("samples", "tokens")
SOURCE_POLICIES: tuple[str, ...] = ("uniform", "clusterclip", "weighted", "random")
ON_SOURCE_EXHAUSTED: tuple[str, ...] = ("redistribute", "stop")
_TOP_KEYS = ("sources", "budget_steps", "min_active_share", "on_source_exhausted", "unit")
_SOURCE_KEYS = ("dataset", "cluster_sizes", "block_size", "weight", "policy", "clip", "cluster_weights",
                "selection", "epochs", "remote", "token_budget")


@dataclass(frozen=True)
class SourceInfo:
    """What ranks and operators learn about a source (JobInfo.sources)."""

    name: str
    remote: str
    fingerprint: str
    offset: int
    size: int
    selection: str
    num_clusters: int
    weight: float
    policy: str


@dataclass(frozen=True)
class SourceDecl:
    """A source as the file declares it (before its dataset is opened)."""

    name: str
    weight: float
    policy: str
    clip: int | None
    auto_clip: bool
    dataset: str | None
    cluster_sizes: tuple[int, ...] | None
    block_size: int | None
    cluster_weights: tuple[float, ...] | None
    selection: str | None
    epochs: int | None
    remote: str | None
    token_budget: int | None = None  # stream tokens (tokens + EOS) at most, under steps in tokens


@dataclass(frozen=True)
class MixSpec:
    """A parsed, validated mixture file (datasets not opened yet)."""

    sources: tuple[SourceDecl, ...]
    budget_steps: int | None
    min_active_share: float
    on_source_exhausted: str
    unit: str
    path: str


@dataclass(frozen=True, eq=False)
class Mixture:
    """A mixture with its datasets opened: builds the job's sampler and describes the sources."""

    spec: MixSpec
    layouts: tuple[ClusterLayout, ...]
    infos: tuple[SourceInfo, ...]
    sample_weights: tuple[float, ...]
    token_counts: tuple[Any, ...] = ()

    def token_counts_by_offset(self) -> list[tuple[int, Any]] | None:
        """(id offset, per-sample token counts) per source, when every source has counts."""
        if len(self.token_counts) != len(self.infos) or any(c is None for c in self.token_counts):
            return None
        return [(info.offset, c) for info, c in zip(self.infos, self.token_counts)]

    @property
    def single(self) -> bool:
        return len(self.infos) == 1

    @property
    def num_samples(self) -> int:
        return sum(i.size for i in self.infos)

def _int(where: str, key: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= INT64_MAX:
        raise ConfigError(f"{where}: {key} must be an integer in [{low}, {INT64_MAX}], got {v!r}")
    return v


def _weights_list(where: str, v: Any, base: Path) -> tuple[float, ...]:
    if isinstance(v, str) and v.startswith("@"):
        p = (base / v[1:]) if not Path(v[1:]).is_absolute() else Path(v[1:])
        try:
            v = [float(x) for x in p.read_text().replace(",", " ").split()]
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read cluster_weights file {str(p)!r}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError(f"{where}: cluster_weights file {str(p)!r} holds a value that is not a number") from None
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}: cluster_weights must be a non-empty list of numbers or \"@FILE\"")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ConfigError(f"{where}: cluster_weights must be finite numbers >= 0; entry {i} is {x!r}")
        out.append(float(x))
    if not any(x > 0 for x in out):
        raise ConfigError(f"{where}: at least one cluster weight must be > 0")
    return tuple(out)


def parse_mix(text: str, path: str = "<mix>") -> MixSpec:
    """A validated MixSpec from TOML text; every refusal names the key, the source and the value."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # duplicate tables (source names) land here too
        raise ConfigError(f"mixture file {path} is not valid TOML: {exc} (a source name used twice is "
                          "refused here too)") from None
    base = Path(path).parent if path != "<mix>" else Path(".")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"mixture file {path}: unknown top-level keys {unknown}; valid keys: {list(_TOP_KEYS)}")
    budget = doc.get("budget_steps")
    if budget is not None:
        budget = _int(path, "budget_steps", budget, 1)
    share = doc.get("min_active_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ConfigError(f"mixture file {path}: min_active_share must be in (0, 1], got {share!r}")
    on_ex = doc.get("on_source_exhausted", "redistribute")
    if on_ex not in ON_SOURCE_EXHAUSTED:
        raise ConfigError(f"mixture file {path}: on_source_exhausted must be one of {list(ON_SOURCE_EXHAUSTED)}, "
                          f"got {on_ex!r}")
    unit = doc.get("unit", "samples")
    if unit not in UNITS:
        raise ConfigError(f"mixture file {path}: unit must be one of {list(UNITS)}, got {unit!r}")
    sources = doc.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"mixture file {path} declares no sources: add one [sources.NAME] table per dataset")
    decls = []
    for name, t in sources.items():
        where = f"mixture file {path}, source {name!r}"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: must be a table ([sources.{name}]), got {type(t).__name__}")
        unknown = sorted(set(t) - set(_SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {list(_SOURCE_KEYS)}")
        if ("dataset" in t) == ("cluster_sizes" in t):
            raise ConfigError(f"{where}: give exactly one of dataset (a built dataset) or cluster_sizes (synthetic)")
        if "weight" not in t:
            raise ConfigError(f"{where}: weight is required (a number >= 0; 0 pauses the source)")
        w = t["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}: weight must be a finite number >= 0, got {w!r}")
        policy = t.get("policy")
        if policy not in SOURCE_POLICIES:
            raise ConfigError(f"{where}: policy must be one of {list(SOURCE_POLICIES)}, got {policy!r}")
        clip, auto = None, False
        if "clip" in t:
            if t["clip"] == "auto":
                auto = True
                if budget is None:
                    raise ConfigError(f"{where}: clip = \"auto\" needs budget_steps at the top level of the file")
            else:
                clip = _int(where, "clip", t["clip"], 1)
            if policy not in ("clusterclip", "weighted"):
                raise ConfigError(f"{where}: policy {policy!r} takes no clip; the clip applies to clusterclip "
                                  "and weighted")
        elif policy == "clusterclip":
            raise ConfigError(f"{where}: policy 'clusterclip' needs clip (an integer >= 1, or \"auto\")")
        cw = None
        if "cluster_weights" in t:
            if policy != "weighted":
                raise ConfigError(f"{where}: cluster_weights apply to policy 'weighted', not {policy!r}")
            cw = _weights_list(where, t["cluster_weights"], base)
        elif policy == "weighted":
            raise ConfigError(f"{where}: policy 'weighted' needs cluster_weights")
        epochs = None
        if "epochs" in t:
            if policy != "random":
                raise ConfigError(f"{where}: epochs caps a 'random' source; a cluster policy is capped by its clip")
            epochs = _int(where, "epochs", t["epochs"], 1)
        sizes = None
        if "cluster_sizes" in t:
            cs = t["cluster_sizes"]
            if isinstance(cs, str):
                try:
                    cs = [int(x) for x in cs.split(",") if x.strip()]
                except ValueError:
                    raise ConfigError(f"{where}: cluster_sizes must be integers, got {t['cluster_sizes']!r}") from None
            if not isinstance(cs, list) or not cs or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                         for x in cs):
                raise ConfigError(f"{where}: cluster_sizes must be a non-empty list of integers >= 1")
            sizes = tuple(cluster_sizes(f"{where}: cluster_sizes", cs))
            if "selection" in t:
                raise ConfigError(f"{where}: selection needs a dataset; synthetic clusters have no selections")
        block = None
        if "block_size" in t:
            if sizes is None:
                raise ConfigError(f"{where}: block_size applies to cluster_sizes only; a dataset's read blocks "
                                  "come from its sidecar")
            block = _int(where, "block_size", t["block_size"], 1)
        for key in ("dataset", "selection", "remote"):
            if key in t and (not isinstance(t[key], str) or not t[key]):
                raise ConfigError(f"{where}: {key} must be a non-empty string, got {t[key]!r}")
        token_budget = None
        if "token_budget" in t:
            if unit != "tokens":
                raise ConfigError(f"{where}: token_budget counts tokens and needs unit = \"tokens\" at the top "
                                  f"level, got unit = {unit!r}")
            token_budget = _int(where, "token_budget", t["token_budget"], 1)
        ds = t.get("dataset")
        if ds is not None and "://" not in ds and not Path(ds).is_absolute():
            ds = str((base / ds).resolve())
        decls.append(SourceDecl(name=name, weight=float(w), policy=policy, clip=clip, auto_clip=auto,
                                dataset=ds, cluster_sizes=sizes, block_size=block, cluster_weights=cw,
                                selection=t.get("selection"), epochs=epochs, remote=t.get("remote"),
                                token_budget=token_budget))
    if len(decls) < 2 and decls[0].token_budget is not None:
        raise ConfigError(f"mixture file {path}: token_budget {decls[0].token_budget} of the only source "
                          f"{decls[0].name!r} needs a second source to take its share (one source: use --steps)")
    check_source_weights([d.weight for d in decls], [d.name for d in decls])
    synthetic = [n for d in decls for n in (d.cluster_sizes or ())]
    if synthetic:  # the sources' ids are one id space: their sizes' total must fit int64 too
        cluster_sizes(f"mixture file {path}: every source's cluster_sizes together", synthetic)
    return MixSpec(sources=tuple(decls), budget_steps=budget, min_active_share=float(share),
                   on_source_exhausted=on_ex, unit=unit, path=path)


def load_mix(path: str | Path, sidecar_cache: Path | None = None, *, deferred: bool = False) -> Mixture:
    """Reads and validates a mixture file, then opens every source's dataset (or synthetic layout).

    deferred: open each local source's sidecar by its manifest alone (`Sidecar.open_deferred`):
    the check of its shards' index is left to the shard store that first reads the source
    (which refuses other shards by the same fingerprint), so a job whose first batch touches a
    few of many sources opens only those sources' indexes. For a reader (embedded dealing);
    a server checks every source at start.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mixture file {str(p)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"mixture file {str(p)!r} is not UTF-8 text (TOML is): byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}") from None
    return open_mix(parse_mix(text, str(p)), sidecar_cache, deferred=deferred)


def open_mix(spec: MixSpec, sidecar_cache: Path | None = None, *, deferred: bool = False) -> Mixture:
    """Opens each source: its sidecar (fingerprint checked against its shards), selection, layout."""
    layouts, infos, weights, counts = [], [], [], []
    offset = 0
    opened = _open_sources(spec, sidecar_cache, deferred)
    for d, got in zip(spec.sources, opened):
        where = f"mixture source {d.name!r}"
        tokens_per_sample = None
        source_counts = None
        if got is None:
            assert d.cluster_sizes is not None
            layout = ClusterLayout.from_sizes(d.cluster_sizes, block_size=d.block_size or 1)
            size, fp, remote = layout.num_samples, "", d.remote or ""
        else:
            assert d.dataset is not None
            side, layout, source_counts = got
            size, fp = side.num_samples, side.fingerprint
            remote = d.remote or side.remote or d.dataset
            if spec.unit == "tokens":
                tokens_per_sample = _mean_tokens(side, layout, where)
        if d.cluster_weights is not None and len(d.cluster_weights) != layout.num_clusters:
            raise ConfigError(f"{where}: cluster_weights has {len(d.cluster_weights)} entries but the source has "
                              f"{layout.num_clusters} clusters")
        if spec.unit == "tokens" and tokens_per_sample is None:
            raise ConfigError(f"{where}: unit = \"tokens\" needs per-sample token counts, and a synthetic source "
                              "has none")
        weights.append(d.weight if tokens_per_sample is None else d.weight / tokens_per_sample)
        layouts.append(layout)
        counts.append(source_counts)
        infos.append(SourceInfo(name=d.name, remote=str(remote), fingerprint=fp, offset=offset, size=int(size),
                                selection=d.selection or "", num_clusters=layout.num_clusters, weight=d.weight,
                                policy=d.policy))
        offset += int(size)
        if offset > INT64_MAX:
            raise ConfigError(f"{where}: the sources' total size {offset} does not fit a 64-bit integer "
                              f"({INT64_MAX}): their ids are one id space")
    return Mixture(spec=spec, layouts=tuple(layouts), infos=tuple(infos), sample_weights=tuple(weights),
                   token_counts=tuple(counts))


OPEN_THREADS = 8
"""Remote sidecars of a mixture's sources downloaded at once (local ones are read in the calling thread)."""


def _open_sources(spec: MixSpec, cache: Path | None,
                  deferred: bool = False) -> list[tuple[Sidecar, ClusterLayout, Any] | None]:
    """(sidecar, layout of its selection, token counts) of each dataset source, in file order
    (None for a synthetic one), opened by a few threads; the first failing source's error,
    in file order, is raised."""

    def one(d: SourceDecl) -> tuple[Sidecar, ClusterLayout, Any] | None:
        if d.cluster_sizes is not None:
            return None
        assert d.dataset is not None
        where = f"mixture source {d.name!r}"
        side = _open_sidecar(d.dataset, cache, d.name, where, deferred)
        try:
            layout = side.layout(d.selection)
        except CroupierError as exc:
            exc.args = (f"{where}: {exc}",) + exc.args[1:]
            raise
        # the manifest was read just now: without a counts entry there are none (no second read)
        return side, layout, side.token_counts() if TOKEN_COUNTS in side.manifest else None

    remote = sum(d.dataset is not None and "://" in d.dataset for d in spec.sources)
    if remote <= 1:  # local sidecars: a few file reads each, faster in one thread than handed to several
        return [one(d) for d in spec.sources]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(OPEN_THREADS, remote), thread_name_prefix="croupier-mix-open") as pool:
        futures = [pool.submit(one, d) if d.dataset is not None and "://" in d.dataset else None
                   for d in spec.sources]
        return [one(d) if f is None else f.result() for d, f in zip(spec.sources, futures)]


def _open_sidecar(dataset: str, cache: Path | None, name: str, where: str, deferred: bool = False) -> Sidecar:
    try:
        if deferred and "://" not in dataset:
            return Sidecar.open_deferred(dataset)
        return open_dataset(dataset, None if cache is None else cache / name)
    except CroupierError as exc:  # name the source in the message, keep the error's type
        if not str(exc).startswith(where):
            exc.args = (f"{where}: {exc}",) + exc.args[1:]
        raise


def _mean_tokens(side: Any, layout: ClusterLayout, where: str) -> float:
    counts_of = getattr(side, "token_counts", None)
    counts = counts_of() if counts_of is not None else None
    if counts is None:
        raise ConfigError(f"{where}: unit = \"tokens\" needs per-sample token counts in the sidecar; build with "
                          "--tokenizer or add them with `croupier shards tokens`")
    ids = layout.ids_at(np.arange(layout.num_positions))
    mean = float(np.asarray(counts)[ids].mean())
    if not mean > 0:
        raise ConfigError(f"{where}: its samples hold no tokens (mean token count {mean})")
    return mean


def check_source_weights(weights: np.ndarray | Sequence[float], names: Sequence[str]) -> None:
    """Source weights: finite, >= 0 (0 = paused), not all zero; the bad one is named."""
    for name, w in zip(names, weights):
        if not np.isfinite(w) or w < 0:
            raise ConfigError(f"source weights must be finite and >= 0; source {name!r} has weight {w}")
    if not any(w > 0 for w in weights):
        raise ConfigError("at least one source weight must be > 0 (all are zero: every source would be paused)")
    if not np.isfinite(float(np.sum(np.asarray(weights, dtype=np.float64)))):
        raise ConfigError("source weights must have a finite sum")
