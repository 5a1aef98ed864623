"""The distribution ships every package: pyproject's `packages` lists each folder with an `__init__.py`.

The packages live in several folders mapped through `package-dir`, so setuptools cannot find
them by itself; an editable install imports a forgotten subpackage anyway, a wheel would not.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = set()
    for name, folder in config["package-dir"].items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if name == "croupier" and rel[:1] == ("proto",):
                continue
            on_disk.add(".".join((name, *rel)))
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
