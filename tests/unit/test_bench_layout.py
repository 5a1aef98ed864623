"""bench/ keeps its three parts apart: every benchmark module under bench/benchmarks/ is found
by `python -m bench`'s discovery (and nothing else is), and no module under bench/ imports
another in a circle. Imports are read with `ast` (nothing is imported to walk them), function-
level imports included: a lazy import closes a circle as surely as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cases.bench import ROOT, bench_runner

BENCH = ROOT / "bench"
BENCHMARKS = BENCH / "benchmarks"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bench_modules() -> dict[str, Path]:
    """Every module under bench/, by dotted name."""
    return {_module_name(p): p for p in sorted(BENCH.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for a in node.names:
                if f"{base}.{a.name}" in known:  # `from bench.common import table`: the submodule
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = bench_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def _defines_run(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(isinstance(n, ast.FunctionDef) and n.name == "run" and n.args.args for n in tree.body)


def test_discovery_finds_every_benchmark_module_and_only_those() -> None:
    files = sorted(p.stem for p in BENCHMARKS.glob("bench_*.py"))
    assert files, "no bench/benchmarks/bench_*.py"
    assert bench_runner.discover() == files
    for stem in files:
        assert _defines_run(BENCHMARKS / f"{stem}.py"), f"{stem} has no run(scale)"
    stray = [str(p.relative_to(ROOT)) for p in BENCH.rglob("bench_*.py") if p.parent != BENCHMARKS]
    assert not stray, f"benchmark modules outside bench/benchmarks/ are not discovered: {stray}"


def test_no_module_in_bench_imports_another_in_a_circle() -> None:
    graph = import_graph()
    # the walk sees real imports (a walker that saw none would pass vacuously)
    assert "bench.studies.harness" in graph["bench.studies.train_compare"]
    assert "bench.studies.harness" in graph["bench.studies.train_natural"]
    assert "bench.common.table" in graph["bench.__main__"]
    assert "bench.common.shard_data" in graph["bench.benchmarks.bench_read"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_parts_import_one_way() -> None:
    """common imports neither benchmarks nor studies; benchmarks and studies not each other."""
    graph = import_graph()
    part = {"common": "bench.common", "benchmarks": "bench.benchmarks", "studies": "bench.studies"}
    forbidden = {"common": ("benchmarks", "studies"), "benchmarks": ("studies",), "studies": ("benchmarks",)}
    bad = []
    for name, targets in graph.items():
        for src, pkg in part.items():
            if name == pkg or name.startswith(pkg + "."):
                bad += [(name, t) for t in targets for dst in forbidden[src]
                        if t == part[dst] or t.startswith(part[dst] + ".")]
    assert not bad, bad


@pytest.mark.parametrize("graph, circle", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),  # train_compare <-> train_natural, as it was
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph: dict[str, set[str]], circle: list[str] | None) -> None:
    assert find_cycle(graph) == circle
