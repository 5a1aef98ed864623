"""The checked-in generated modules are exactly what proto/generate.sh produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from croupier.proto import API_VERSION, SERVICE_NAME, pb2, pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("croupier_pb2.py", "croupier_pb2.pyi", "croupier_pb2_grpc.py")


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "croupier" / "v1" / name).read_bytes()
        checked_in = (ROOT / "proto" / "croupier" / "v1" / name).read_bytes()
        assert fresh == checked_in, f"proto/croupier/v1/{name} is stale: run bash proto/generate.sh"


def test_contract_names() -> None:
    assert API_VERSION == "croupier.v1"
    assert SERVICE_NAME == "croupier.v1.Sampler"
    assert hasattr(pb2_grpc, "SamplerStub")
    assert pb2.DESCRIPTOR.name == "croupier/v1/croupier.proto"
    # Every field of every message carries a comment in the .proto (style rule 9).
    text = (ROOT / "proto" / "croupier" / "v1" / "croupier.proto").read_text().splitlines()
    for i, line in enumerate(text):
        stripped = line.strip()
        if stripped and not stripped.startswith(("//", "message", "enum", "service", "rpc", "}",
                                                 "syntax", "package", "option", "reserved")):
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
