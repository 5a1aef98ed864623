"""A missing Python module ends a command in one line that says what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from croupier.errors import MissingDependency
from croupier.optional import install_hint, require


def _cli_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """Runs `croupier ARGV` in a fresh interpreter in which `import MODULE` fails."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from croupier.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _corpus(path: Path, n: int = 30) -> Path:
    path.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (i % 7)}) + "\n" for i in range(n)))
    return path


def test_build_without_faiss_says_which_extra_to_install_in_one_line(tmp_path):
    out = tmp_path / "out"
    r = _cli_without("faiss", "shards", "build", str(_corpus(tmp_path / "docs.jsonl")), "--out", str(out),
                     "--embedder", "hashing", "--clusters", "2", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "'faiss'" in lines[0] and "pip install 'croupier[build]'" in lines[0] and "'croupier[build-gpu]'" in lines[0]
    assert not out.exists()  # it failed before doing any work


def test_a_wrapped_module_names_its_extra(tmp_path):
    src = tmp_path / "docs.jsonl.zst"
    src.write_bytes(b"\x28\xb5\x2f\xfd")  # never read: the import fails first
    r = _cli_without("zstandard", "shards", "build", str(src), "--out", str(tmp_path / "out"),
                     "--embedder", "hashing", "--clusters", "2", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "reading docs.jsonl.zst needs the Python module 'zstandard'" in lines[0]
    assert "pip install 'croupier[build]'" in lines[0]


def test_an_unwrapped_import_still_ends_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(10)]}), src)
    r = _cli_without("pyarrow", "shards", "build", str(src), "--out", str(tmp_path / "out"),
                     "--embedder", "hashing", "--clusters", "2", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Python module 'pyarrow" in lines[0] and "pip install 'croupier[build]'" in lines[0]
    assert "Traceback" not in r.stderr


def test_require_and_hints():
    assert require("json", "tests") is json
    with pytest.raises(MissingDependency, match=r"clustering needs the Python module 'croupier_no_such_module'"):
        require("croupier_no_such_module", "clustering")
    assert install_hint("faiss.contrib") == install_hint("faiss")
    assert install_hint("streaming.base").startswith("pip install streaming-community")
