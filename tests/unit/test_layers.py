"""The import layers, checked on the source: every import, inside functions too, followed
transitively.

croupier's packages live in several top-level folders mapped through `package-dir`, so the
walk maps folders to package names itself (import-linter only walks the root package's
folder). The layers, lowest first:

- core: `croupier` and its modules (`croupier.format`, `croupier.layout`, ...), minus the
  applications — reaches nothing of server/, client/, shards/;
- `croupier.proto`: the generated wire format;
- `croupier.server.sampling`: the pure sampler — core only, and no gRPC, ZeroMQ, torch or
  faiss anywhere below it;
- `croupier.server` (the rest), `croupier.client`, `croupier.shards`: each reaches core,
  proto (not shards) and `server.sampling`, never each other;
- `croupier.integrations` (adapters for other trainers): core, proto, `server.sampling` and
  client, like the applications; nothing of server/, client/ or shards/ reaches it;
- applications (`croupier.apps`, the `croupier` command): anything.

A command-line module (`*_cli`, or any module of a `cli` package) is imported by CLI modules
and applications only: library code never reaches into a command.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"croupier": "croupier", "croupier.proto": "proto", "croupier.server": "server",
         "croupier.client": "client", "croupier.shards": "shards"}
FORBIDDEN_IN_SAMPLING = ("grpc", "zmq", "torch", "faiss", "grpc_health", "grpc_reflection")
ALLOWED = {
    "core": {"core"},
    "proto": {"proto", "core"},
    "sampling": {"sampling", "core"},
    "server": {"server", "sampling", "core", "proto"},
    "client": {"client", "sampling", "core", "proto"},
    "shards": {"shards", "sampling", "core"},
    "integrations": {"integrations", "client", "sampling", "core", "proto"},
    "apps": {"apps", "integrations", "server", "sampling", "client", "shards", "core", "proto"},
}


def discover() -> dict[str, Path]:
    """Every product module name -> its file."""
    modules: dict[str, Path] = {}
    for pkg, folder in ROOTS.items():
        base = REPO / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if pkg == "croupier" and parts and parts[0] in ("proto",):
                continue
            modules[".".join([pkg, *parts])] = path
    return modules


def layer(module: str) -> str:
    if module.startswith("croupier.proto"):
        return "proto"
    if module.startswith("croupier.server.sampling"):
        return "sampling"
    for top in ("server", "client", "shards"):
        if module == f"croupier.{top}" or module.startswith(f"croupier.{top}."):
            return top
    if module == "croupier.integrations" or module.startswith("croupier.integrations."):
        return "integrations"
    if module.startswith("croupier.apps") or module in ("croupier.cli", "croupier.__main__"):
        return "apps"
    return "core"


def is_cli(module: str) -> bool:
    parts = module.split(".")
    return parts[-1].endswith("_cli") or "cli" in parts[1:]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(product modules, third-party top-level names) imported anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.append(stem)
            names += [f"{stem}.{a.name}" for a in node.names]  # `from croupier import server`
    internal, external = set(), set()
    for name in names:
        if name == "croupier" or name.startswith("croupier."):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                internal.add(name)
        elif name:
            external.add(name.split(".")[0])
    return internal, external


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = discover()
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = imports_of(name, path, modules)
    return edges, external


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def with_packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing a module runs its packages' `__init__` first: their imports count as its own."""
    return {m: set(d).union(*(edges.get(a, set()) for a in ancestors(m))) - {m}
            for m, d in edges.items()}


def test_layers_hold_transitively():
    edges, _ = graph()
    full = with_packages(edges)
    bad = []
    for mod in sorted(full):
        lay = layer(mod)
        for dep in sorted(closure(mod, full)):
            if layer(dep) not in ALLOWED[lay]:
                bad.append(f"{mod} ({lay}) reaches {dep} ({layer(dep)})")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_sampling_core_imports_no_io_stack():
    edges, external = graph()
    full = with_packages(edges)
    bad = []
    for mod in sorted(m for m in full if layer(m) == "sampling"):
        for dep in sorted({mod} | closure(mod, full)):
            hit = sorted(external[dep] & set(FORBIDDEN_IN_SAMPLING))
            if hit:
                bad.append(f"{mod} reaches {dep}, which imports {', '.join(hit)}")
    assert not bad, "\n".join(bad)


def test_only_commands_import_commands():
    edges, _ = graph()
    bad = [f"{mod} imports the command module {dep}"
           for mod, deps in sorted(edges.items()) for dep in sorted(deps)
           if is_cli(dep) and not (is_cli(mod) or layer(mod) == "apps")]
    assert not bad, "\n".join(bad)


def test_package_graph_has_no_cycle(capsys):
    """Print the package-level graph (what depends on what) and refuse any circle."""
    edges, _ = graph()
    pkg_edges: dict[str, set[str]] = defaultdict(set)
    for mod, deps in edges.items():
        for dep in deps:
            a, b = layer(mod), layer(dep)
            if a != b:
                pkg_edges[a].add(b)
    with capsys.disabled():
        print("\npackage graph:", file=sys.stderr)
        for a in sorted(pkg_edges):
            print(f"  {a:9s} -> {', '.join(sorted(pkg_edges[a]))}", file=sys.stderr)
    order, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            raise AssertionError("package cycle: " + " -> ".join(path + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(pkg_edges.get(n, ())):
            visit(m, path + [n])
        state[n] = 2
        order.append(n)

    for n in sorted(ALLOWED):
        visit(n, [])
    assert set(order) == set(ALLOWED)
