"""Regenerating the croupier.v1 modules with the pinned grpcio-tools changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cases.proto import ROOT

GENERATED = ("croupier_pb2.py", "croupier_pb2.pyi", "croupier_pb2_grpc.py")


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "croupier" / "v1" / name).read_bytes()
        checked_in = (ROOT / "proto" / "croupier" / "v1" / name).read_bytes()
        assert fresh == checked_in, f"proto/croupier/v1/{name} is stale: run bash proto/generate.sh"
