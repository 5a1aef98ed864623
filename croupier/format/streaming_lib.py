"""Every reach into the `streaming` library's modules, in one place.

croupier reads and writes MDS through the `streaming` package, which two distributions ship:
mosaicml-streaming (0.13, the original; pins numpy<2.2 and transformers<5) and its maintained
continuation streaming-community (0.14+, same module, same MDS format, beside numpy 2.x and
transformers 5). Both install the same `streaming/` folder, so only one can be present. The
names croupier uses live in `streaming.base.*` modules that neither declares public; this module
imports them (lazily: `streaming` pulls in torch), checks the installed release once, and is
the only module of croupier that names `streaming.base` (tests/unit/test_streaming_lib.py greps).

Functions are wrappers; the classes (`Stream`, `CloudDownloader`, `CloudUploader`, `MDSWriter`,
`MDSReader`) resolve on first attribute access, so `from croupier.format.streaming_lib import
MDSWriter` inside a function costs nothing until then.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from importlib import metadata
from typing import Any

from croupier.errors import MissingDependency

MIN_VERSION = (0, 13)
"""Oldest release whose private modules match what croupier uses (mosaicml-streaming 0.13.0)."""

TESTED = {"mosaicml-streaming": "0.13.0", "streaming-community": "0.14.2"}
"""Distribution -> release that .ci/run tests (the default install declares streaming-community)."""

_CLASSES: dict[str, tuple[str, str]] = {
    "Stream": ("streaming.base.stream", "Stream"),
    "CloudDownloader": ("streaming.base.storage", "CloudDownloader"),
    "CloudUploader": ("streaming.base.storage", "CloudUploader"),
    "MDSWriter": ("streaming.base.format.mds.writer", "MDSWriter"),
    "MDSReader": ("streaming.base.format.mds.reader", "MDSReader"),
}
"""Public name here -> (module, attribute) in the library."""

_FUNCTIONS: dict[str, tuple[str, str]] = {
    "reader_from_json": ("streaming.base.format", "reader_from_json"),
    "get_hash": ("streaming.base.hashing", "get_hash"),
    "get_hashes": ("streaming.base.hashing", "get_hashes"),
    "decompress": ("streaming.base.compression", "decompress"),
}


def distribution() -> str | None:
    """Which distribution installed the `streaming` module ("streaming-community",
    "mosaicml-streaming"), or None when neither's metadata is present."""
    for name in ("streaming-community", "mosaicml-streaming"):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        return name
    return None


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor[, patch]) of a release string such as "0.14.2" or "0.13.0rc1"; () when unreadable."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    return tuple(int(g) for g in found.groups() if g is not None) if found else ()


@cache
def _load(module: str, attr: str) -> Any:
    """`module.attr` of the library, after the one-time release check."""
    check()
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise MissingDependency(f"{module}.{attr}", "MDS reading and writing",
                                f"pip install 'streaming-community>=0.14.2' (streaming {version()} lacks it; "
                                f"tested: {_tested()})") from exc


@cache
def check() -> str:
    """The installed `streaming` release, once checked to be one croupier can use; MissingDependency
    (one line: what to install) when the module is absent or older than MIN_VERSION."""
    try:
        streaming = importlib.import_module("streaming")
    except ImportError as exc:
        raise MissingDependency("streaming", "MDS reading and writing",
                                "pip install 'streaming-community>=0.14.2' (croupier depends on it: "
                                "this installation is incomplete)") from exc
    found = str(getattr(streaming, "__version__", "0"))
    if parse_version(found) < MIN_VERSION:
        raise MissingDependency(f"streaming>={'.'.join(map(str, MIN_VERSION))}",
                                f"MDS reading and writing (streaming {found} is too old)",
                                f"pip install 'streaming-community>=0.14.2' (tested: {_tested()})")
    return found


def version() -> str:
    """The installed `streaming` release string (checked)."""
    return check()


def _tested() -> str:
    return ", ".join(f"{name} {release}" for name, release in TESTED.items())


def reader_from_json(dirname: str, split: str | None, obj: dict[str, Any]) -> Any:
    """streaming's shard reader for one `index.json` shard entry (files under `dirname`)."""
    return _load(*_FUNCTIONS["reader_from_json"])(dirname, split, obj)


def get_hash(algo: str, data: bytes) -> str:
    """The `algo` digest of `data` as streaming writes it into index.json."""
    return _load(*_FUNCTIONS["get_hash"])(algo, data)


def get_hashes() -> set[str]:
    """The hash algorithms streaming knows."""
    return set(_load(*_FUNCTIONS["get_hashes"])())


def decompress(algo: str, data: bytes) -> bytes:
    """`data` decompressed with streaming's codec `algo` (e.g. "zstd:7")."""
    return _load(*_FUNCTIONS["decompress"])(algo, data)


def __getattr__(name: str) -> Any:
    """The library's classes, imported on first use (see the module docstring)."""
    if name in _CLASSES:
        return _load(*_CLASSES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MIN_VERSION", "TESTED", "check", "decompress", "distribution", "get_hash", "get_hashes",
           "parse_version", "reader_from_json", "version", *_CLASSES]
