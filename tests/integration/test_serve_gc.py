"""`croupier serve` freezes its start-up objects out of the cycle collector (needs a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys


def test_serving_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    code = ("import gc; from croupier.server.cli.serve_cli import tune_gc, GC_YOUNG_THRESHOLD; "
            "before = gc.get_threshold(); tune_gc(); after = gc.get_threshold(); "
            "assert after == (GC_YOUNG_THRESHOLD, before[1], before[2]), (before, after); "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
