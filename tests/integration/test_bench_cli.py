"""`python -m bench --list`, run as a user runs it, lists exactly the benchmarks discovery finds."""

from __future__ import annotations

import subprocess
import sys

from cases.bench import ROOT, bench_runner


def test_python_m_bench_lists_the_discovered_benchmarks() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == bench_runner.discover()
