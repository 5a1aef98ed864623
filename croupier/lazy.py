"""Lazy public surfaces for packages: a name is imported from its module on first use.

`croupier.server`, `croupier.shards` and the subpackages that re-export their public names
use this, so importing a package (or a light module under it: `croupier.server.sampling`
never pulls in gRPC) costs nothing until a name is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["exports"]


def exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for a package whose public `name` lives in module `table[name]`."""

    def getattr_(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def dir_() -> list[str]:
        return sorted(table)

    return getattr_, dir_
