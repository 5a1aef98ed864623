"""The `streaming` library is reached in one module only (croupier/format/streaming_lib.py), and
that module resolves every name croupier uses on the installed release."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from croupier.errors import MissingDependency
from croupier.format import streaming_lib

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("croupier", "client", "server", "shards", "proto")
"""The folders that ship in the package (pyproject's package-dir)."""
ALLOWED = REPO / "croupier" / "format" / "streaming_lib.py"


def _streaming_imports(path: Path) -> list[str]:
    """`module:line` of every import of `streaming` (any submodule) in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                  if name == "streaming" or name.startswith("streaming.")]
    return found


def test_only_streaming_lib_imports_the_library() -> None:
    offenders = [hit for folder in PRODUCT for path in sorted((REPO / folder).rglob("*.py"))
                 if path != ALLOWED for hit in _streaming_imports(path)]
    assert offenders == []


def test_no_product_source_names_streaming_base_outside_streaming_lib() -> None:
    # importlib strings too: the private modules are spelled out in one file only
    offenders = [str(path.relative_to(REPO)) for folder in PRODUCT for path in sorted((REPO / folder).rglob("*.py"))
                 if path != ALLOWED and "streaming.base" in path.read_text()]
    assert offenders == []


def test_the_scan_sees_an_import() -> None:
    assert _streaming_imports(REPO / "tests" / "cases" / "shards_build.py")[:1] == [
        "tests/cases/shards_build.py:28 streaming.base.compression"]


def test_parse_version() -> None:
    assert streaming_lib.parse_version("0.14.2") == (0, 14, 2)
    assert streaming_lib.parse_version("0.13.0rc1") == (0, 13, 0)
    assert streaming_lib.parse_version("1.0") == (1, 0)
    assert streaming_lib.parse_version("dev") == ()
    assert streaming_lib.parse_version("0.12.9") < streaming_lib.MIN_VERSION <= streaming_lib.parse_version("0.13.0")


def test_installed_release_is_supported_and_named() -> None:
    import streaming

    assert streaming_lib.version() == streaming.__version__
    assert streaming_lib.parse_version(streaming_lib.version()) >= streaming_lib.MIN_VERSION
    assert streaming_lib.distribution() in streaming_lib.TESTED


def test_every_name_resolves_to_the_library_object() -> None:
    import streaming
    from streaming.base.format.mds.reader import MDSReader
    from streaming.base.storage import CloudDownloader, CloudUploader
    from streaming.base.stream import Stream

    assert streaming_lib.MDSWriter is streaming.MDSWriter
    assert streaming_lib.MDSReader is MDSReader
    assert streaming_lib.Stream is Stream
    assert streaming_lib.CloudDownloader is CloudDownloader
    assert streaming_lib.CloudUploader is CloudUploader
    assert "xxh64" in streaming_lib.get_hashes()
    assert streaming_lib.get_hash("sha1", b"abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"


def test_decompress_round_trip() -> None:
    from streaming.base.compression import compress

    assert streaming_lib.decompress("zstd:7", compress("zstd:7", b"croupier" * 10)) == b"croupier" * 10


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'StreamingDataset'"):
        _ = streaming_lib.StreamingDataset


def test_missing_private_name_says_what_to_install() -> None:
    with pytest.raises(MissingDependency, match=r"streaming\.base\.hashing\.no_such_name.*"
                                                r"pip install 'streaming-community>=0\.14\.2'"):
        streaming_lib._load("streaming.base.hashing", "no_such_name")
