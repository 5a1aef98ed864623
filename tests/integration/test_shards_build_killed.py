"""A build killed with SIGKILL mid-way resumes from its last chunk to the same dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cases.shards_build import snapshot
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.synthetic import write_jsonl


@pytest.mark.slow
def test_build_killed_with_sigkill_resumes_from_its_last_chunk(tmp_path, corpus):
    """A real kill -9 in the middle of the embed stage (no cleanup code runs), then resume."""
    import subprocess
    import sys

    docs = corpus[:2000]
    write_jsonl(tmp_path / "in.jsonl", docs)
    common = dict(inputs=(str(tmp_path / "in.jsonl"),), embedder="hashing", clusters=5, chunk=250,
                  part_docs=700, progress=False)
    build(BuildConfig(out=str(tmp_path / "ref"), **common))
    out = tmp_path / "killed"
    child = (
        "import os, signal\n"
        "from croupier.shards.build.builder import BuildConfig, build\n"
        "def hook(stage, chunk):\n"
        "    if (stage, chunk) == ('embed', 3):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"build(BuildConfig(out={str(out)!r}, **{common!r}), hook=hook)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    state = json.loads((out / "croupier" / "work" / "state.json").read_text())
    assert state["ingest_done"] and state["embed_chunks"] == 4 and not state.get("embed_done")
    resumed: list[tuple[str, int]] = []
    res = build(BuildConfig(out=str(out), **common), hook=lambda s, c: resumed.append((s, c)))
    assert res.resumed and [c for s, c in resumed if s == "embed"] == [4, 5, 6, 7]
    ref, got = snapshot(tmp_path / "ref"), snapshot(out)
    assert got["fp"] == ref["fp"]
    for key in ("assign", "emb", "centroids"):
        np.testing.assert_array_equal(got[key], ref[key])
