"""`croupier demo` end to end at a reduced size: real build, real server process (SIGKILLed
and restarted), real 2-rank torchrun training; exact resume; report files; nothing left over."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from croupier.apps.demo import MARKER, DemoConfig, DemoError, run_demo
from croupier.cli import main as cli_main
from croupier.errors import ConfigError

SHM = Path("/dev/shm")


def _alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _naming(folder: Path, settle_s: float = 5.0) -> list[str]:
    """Command lines of live processes that name `folder` (waits up to `settle_s` for dying ones).

    A process can leave its parent's session and process group, but not its command line."""
    needle = str(folder).encode()
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if needle in cmd and _alive(int(entry)):
                shown = cmd.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry}: {shown}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _shm() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def _new_shm(before: set[str], settle_s: float = 5.0) -> set[str]:
    """Segments that appeared since `before` and are still there after `settle_s` (others' transient ones go)."""
    deadline = time.monotonic() + settle_s
    new = _shm() - before
    while new and time.monotonic() < deadline:
        time.sleep(0.2)
        new &= _shm()
    return new


def _small(out: Path, **kw) -> DemoConfig:
    params = dict(out=out, docs=160, topics=6, steps=12, global_batch=8, world=2, verbose=False, timeout_s=600)
    params.update(kw)
    return DemoConfig(**params)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path):
    shm_before = _shm()
    lines: list[str] = []
    result = run_demo(_small(tmp_path / "demo"), echo=lines.append)

    assert result.resume_exact
    assert result.resumed_from is not None  # the restarted server resumed from its state directory
    assert any("SIGKILL" in line for line in lines)
    assert any("resume is EXACT" in line for line in lines)
    assert any(str(result.out) in line for line in lines)  # it says where its outputs are
    for name in ("sizes_vs_draws.png", "passes.png", "draws_over_time.png", "rank_lag.png", "index.html"):
        path = result.report_dir / name
        assert path.stat().st_size > 0, name
    html = (result.report_dir / "index.html").read_text()
    assert "sizes_vs_draws.png" in html and "passes.png" in html
    # per-cluster table: one row per cluster with size, draws, passes, clipped, loss
    rows = [line for line in result.table.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) >= 2
    assert sum(int(r.split()[2]) for r in rows) == 12 * 8
    # every server, torchrun and rank process is gone; no shared memory left
    assert len(result.pids) >= 2 + 2 + 4  # 2 servers, 2 torchruns, 2 ranks x 2 phases
    assert [p for p in result.pids if _alive(p)] == []
    assert _naming(tmp_path) == []
    assert _new_shm(shm_before) == set()


@pytest.mark.slow
def test_demo_failure_still_cleans_up(tmp_path):
    """On the user's own JSON lines: a training phase that times out raises DemoError, and no
    child survives it: not the server, not torchrun, and not torchrun's workers, which run in
    sessions of their own (found by their command line, which names this test's folder)."""
    corpus = tmp_path / "mine.jsonl"
    with open(corpus, "w") as f:
        for i in range(60):
            f.write(json.dumps({"id": i, "body": f"note {i}: " + ("alpha beta " if i % 3 else "gamma delta ") * 4}) + "\n")
    # far more steps than fit in the timeout: the workers are surely up and training when it hits
    cfg = _small(tmp_path / "demo", corpus=corpus, text_field="body", steps=20_000, timeout_s=25.0)
    demo_pids: list[int] = []
    from croupier.apps.demo import Demo

    demo = Demo(cfg, echo=lambda s: None)
    with pytest.raises(DemoError, match="timed out"):
        try:
            demo.run()
        finally:
            demo_pids = demo._all_pids()
    assert demo_pids
    assert len(demo_pids) >= 2 + 2  # the server, torchrun and its two workers (from pids.txt)
    assert [p for p in demo_pids if _alive(p)] == []
    assert _naming(tmp_path) == []
    from croupier.format.sidecar import Sidecar

    assert Sidecar.open(tmp_path / "demo" / "dataset").num_samples == 60  # it built the user's corpus


def test_demo_config_refuses_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by world size 2"):
        DemoConfig(out=tmp_path, global_batch=7, world=2)
    with pytest.raises(ConfigError, match="steps must be >= 4"):
        DemoConfig(out=tmp_path, steps=3)
    with pytest.raises(ConfigError, match="does not exist"):
        DemoConfig(out=tmp_path, corpus=tmp_path / "missing.jsonl")


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = cli_main(["demo", "--out", str(out), "--docs", "60", "--topics", "3", "--steps", "4"])
    assert code == 2
    assert "is not a demo folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / MARKER).exists()
