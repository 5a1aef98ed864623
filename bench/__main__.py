"""`python -m bench`: run every benchmark of the project and print one summary table.

Every module `bench/benchmarks/bench_<topic>.py` exposes `run(scale) -> list[dict]` with rows
{bench, metric, value, unit, reference, ratio, target}. This runner imports each one, runs it
at the chosen scale ("quick" by default: the whole set in about 10 minutes on 2 cores), and
prints one table of the ratios against their targets. A benchmark that fails is reported as
a FAILED row with its error and the others still run; the exit code is 1 if any failed.

    python -m bench                      # every benchmark, quick scale
    python -m bench --scale full         # the sizes the issues name (much longer)
    python -m bench --only sampler,read --json out/bench.json
    python -m bench --list               # the benchmarks' names
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.common.table import COLUMNS, format_table

__all__ = ["BENCHMARKS", "COLUMNS", "PACKAGE", "discover", "format_table", "main", "run_all"]

PACKAGE = "bench.benchmarks"  # the package holding the benchmark modules
BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"  # its folder


def discover() -> list[str]:
    """Names of the benchmark modules (bench_<topic> in bench/benchmarks/), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(BENCHMARKS)]) if m.name.startswith("bench_"))


def run_all(names: Iterable[str], scale: str, log=sys.stderr) -> tuple[list[dict], list[str]]:
    """Runs each named benchmark module; returns (rows, names that failed)."""
    rows: list[dict] = []
    failed: list[str] = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[bench] {name} ({scale}) ...", file=log, flush=True)
        try:
            module = importlib.import_module(f"{PACKAGE}.{name}")
            got = list(module.run(scale))
            for row in got:
                missing = [c for c in ("bench", "metric", "value") if c not in row]
                if missing:
                    raise ValueError(f"row {row!r} lacks {missing}")
            rows.extend(got)
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc(file=log)
            failed.append(name)
            rows.append({"bench": name, "metric": "FAILED", "value": None, "unit": "",
                         "reference": None, "ratio": None, "target": f"{type(exc).__name__}: {exc}"[:80]})
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=log, flush=True)
    return rows, failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("quick", "full"), default="quick")
    parser.add_argument("--only", default="", help="comma-separated topics or module names to run")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = {w if w.startswith("bench_") else f"bench_{w}" for w in args.only.split(",") if w}
        unknown = wanted - set(names)
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; valid: {names}")
        names = [n for n in names if n in wanted]
    if not names:
        print("no benchmarks found (bench/benchmarks/bench_*.py)", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    rows, failed = run_all(names, args.scale)
    print()
    print(format_table(rows))
    print(f"\n{len(names)} benchmarks, {len(rows)} rows, {len(failed)} failed, "
          f"{time.perf_counter() - t0:.0f}s at scale {args.scale}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
