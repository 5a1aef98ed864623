"""A natural long-tailed corpus available offline: docstrings of installed Python packages.

Every module, class and function docstring of the packages in a `site-packages` folder is one
document, `{"text": docstring, "source": top-level package}`. The files are parsed with `ast`
(never imported), so any installed package can be read safely and quickly. Package sizes
follow the real long tail of a Python environment: thousands of docstrings for the big
scientific and cloud libraries, a handful for small helpers.

Deterministic for the same folder and settings: folders and files are walked in sorted order,
at most `max_files` files per package are parsed (evenly spaced over the sorted list, so a
big package is covered end to end), exact duplicate texts are kept only the first time they
are seen (a duplicated docstring would leak from training into the held-out split), each
package keeps `ceil(fraction x its docstrings)` of them (at most `max_docs`; chosen by a
generator seeded from (seed, package name)), and packages left with fewer than `min_docs`
are dropped. `split` then holds out `heldout_fraction` of every package (at least
`min_heldout`), seeded the same way.

    python -m bench.common.natural_corpus --out out/natural [--fraction 0.25 --max-docs 800]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SKIP_DIRS = frozenset({"__pycache__", ".git"})


@dataclass(frozen=True)
class CorpusConfig:
    """What `collect` reads and keeps; see the module docstring."""

    site_packages: str
    fraction: float = 1.0
    max_docs: int = 2000
    min_docs: int = 5
    max_files: int = 400
    min_chars: int = 24
    max_chars: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        for name, v, lo in (("max_docs", self.max_docs, 1), ("min_docs", self.min_docs, 1),
                            ("max_files", self.max_files, 1), ("min_chars", self.min_chars, 1),
                            ("max_chars", self.max_chars, 1)):
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if self.min_docs > self.max_docs:
            raise ValueError(f"min_docs ({self.min_docs}) must not exceed max_docs ({self.max_docs})")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")


# The corpus the natural training study reads at its quick and long scales
# (bench.studies.train_natural) and bench_tail_clustering clusters: 10% of each package's
# docstrings, at most 2,000 of them and 400 files per package, packages keeping at least 4.
STUDY_CORPUS: dict[str, Any] = {"fraction": 0.1, "max_docs": 2000, "max_files": 400, "min_docs": 4}


def default_site_packages() -> Path:
    """The running interpreter's purelib folder (the virtualenv's site-packages)."""
    return Path(sysconfig.get_paths()["purelib"])


def top_level_sources(site_packages: Path) -> list[tuple[str, list[Path]]]:
    """(package name, its .py files in sorted order) for every top-level package or module.

    A package is a folder with `__init__.py`; a module a `.py` file; names starting with an
    underscore followed by another underscore (`__editable__...`, `__pycache__`) and metadata
    folders (`*.dist-info`) are skipped.
    """
    out = []
    for entry in sorted(site_packages.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith("__") or name.endswith((".dist-info", ".egg-info", ".libs")):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            out.append((name, list(_py_files(entry))))
        elif entry.is_file() and name.endswith(".py"):
            out.append((name[:-3], [entry]))
    return out


def _py_files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py"):
                yield Path(root) / f


def spread(items: Sequence[Path], k: int) -> list[Path]:
    """At most k items, evenly spaced over the sequence (all of them when there are k or fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file (cleaned); [] for a file ast cannot read."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, OSError, MemoryError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def source_seed(seed: int, name: str, salt: int) -> np.random.SeedSequence:
    """A package's generator seed, from (seed, crc32 of its name, salt): a tuple, never a sum."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode()), salt])


def collect(cfg: CorpusConfig) -> list[dict]:
    """The corpus: one `{"text", "source"}` record per kept docstring, packages in sorted order."""
    site = Path(cfg.site_packages)
    if not site.is_dir():
        raise FileNotFoundError(f"site-packages folder {str(site)!r} does not exist")
    seen: set[str] = set()
    docs: list[dict] = []
    for name, files in top_level_sources(site):
        texts = []
        for path in spread(files, cfg.max_files):
            for doc in docstrings(path):
                if len(doc) < cfg.min_chars or doc in seen:
                    continue
                seen.add(doc)
                texts.append(doc[: cfg.max_chars])
        keep = min(cfg.max_docs, math.ceil(cfg.fraction * len(texts)))
        if keep < cfg.min_docs:
            continue
        if keep < len(texts):
            rng = np.random.default_rng(source_seed(cfg.seed, name, 0xD0C))
            texts = [texts[i] for i in np.sort(rng.choice(len(texts), size=keep, replace=False))]
        docs.extend({"text": t, "source": name} for t in texts)
    if len({d["source"] for d in docs}) < 2:
        raise ValueError(f"{str(site)!r} gave {len({d['source'] for d in docs})} package(s) with at least "
                         f"{cfg.min_docs} docstrings; a long-tailed corpus needs at least 2")
    return docs


def split(docs: Sequence[dict], heldout_fraction: float = 0.2, min_heldout: int = 2, min_train: int = 3,
          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Per source, hold out `heldout_fraction` (at least `min_heldout`) of its documents.

    A source that would keep fewer than `min_train` training documents is not split (all of
    it trains, and it is not evaluated). Input order is kept within each side.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if min_heldout < 1 or min_train < 1:
        raise ValueError(f"min_heldout and min_train must be >= 1, got {min_heldout} and {min_train}")
    by: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by.setdefault(d["source"], []).append(i)
    held = np.zeros(len(docs), dtype=bool)
    for name in sorted(by):
        idx = np.asarray(by[name])
        k = max(min_heldout, int(round(heldout_fraction * len(idx))))
        if len(idx) - k < min_train:
            continue
        rng = np.random.default_rng(source_seed(seed, name, 0x4E1D))
        held[rng.choice(idx, size=k, replace=False)] = True
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def write_jsonl(path: Path, docs: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_sizes(docs: Sequence[dict]) -> dict[str, int]:
    """Documents per source, largest first (ties by name)."""
    counts: dict[str, int] = {}
    for d in docs:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def assemble(out: Path, cfg: CorpusConfig, heldout_fraction: float = 0.2) -> tuple[Path, Path]:
    """Collect, split and write `train.jsonl`, `heldout.jsonl` and `sources.json` under `out`."""
    docs = collect(cfg)
    train, held = split(docs, heldout_fraction, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources.json").write_text(json.dumps({"config": cfg.__dict__, "train": source_sizes(train),
                                                  "heldout": source_sizes(held)}, indent=1))
    return write_jsonl(out / "train.jsonl", train), write_jsonl(out / "heldout.jsonl", held)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.common.natural_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl, heldout.jsonl, sources.json")
    p.add_argument("--site-packages", default=str(default_site_packages()))
    p.add_argument("--fraction", type=float, default=1.0, help="share of each package's docstrings kept")
    p.add_argument("--max-docs", type=int, default=2000, help="at most this many docstrings per package")
    p.add_argument("--min-docs", type=int, default=5, help="drop packages with fewer docstrings")
    p.add_argument("--max-files", type=int, default=400, help="at most this many files parsed per package")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = CorpusConfig(site_packages=args.site_packages, fraction=args.fraction, max_docs=args.max_docs,
                       min_docs=args.min_docs, max_files=args.max_files, seed=args.seed)
    train, held = assemble(Path(args.out), cfg)
    sizes = source_sizes(read_jsonl(train))
    v = list(sizes.values())
    print(f"{train}: {sum(v)} documents from {len(v)} packages ({v[0]} down to {v[-1]}); "
          f"{held}: {len(read_jsonl(held))} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
