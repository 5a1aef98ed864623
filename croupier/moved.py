"""Import paths that moved, kept working for a deprecation period.

The README and docs of earlier releases showed these paths; each still imports, as the module
that now holds the code, with a `DeprecationWarning` naming the new path. New code imports the
new path (or the package's public surface: `croupier.server`, `croupier.client`,
`croupier.shards`). The finder is installed once, by `croupier/__init__.py`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "croupier.server.engine": "croupier.server.sampling.sampler",
    "croupier.server.mix_engine": "croupier.server.sampling.mix_sampler",
    "croupier.server.policy": "croupier.server.sampling.policy",
    "croupier.server.state": "croupier.server.sampling.state",
    "croupier.server.layout": "croupier.layout",
    "croupier.server.topology": "croupier.topology",
    "croupier.server.grpc_options": "croupier.grpc_options",
    "croupier.server.mixture": "croupier.mixture",
    "croupier.server.sampling_args": "croupier.server.cli.policy_args",
    "croupier.server.store": "croupier.server.durability.checkpoint_store",
    "croupier.client.shard_store": "croupier.client.readers.shard_cache",
    "croupier.client.loss_reporter": "croupier.client.loss_sender",
    "croupier.shards.sidecar": "croupier.format.sidecar",
    "croupier.shards.synthetic": "croupier.shards.build.synthetic",
    "croupier.train_example": "croupier.apps.train_example",
}
"""Old dotted path -> where the module lives now."""


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{self.old} moved to {self.new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The module already ran under its new name."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(fullname, new))


def install() -> None:
    """Adds the finder once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
