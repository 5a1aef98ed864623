"""The checked-in generated modules are exactly what proto/generate.sh produces."""

from __future__ import annotations

from cases.proto import ROOT
from croupier.proto import API_VERSION, SERVICE_NAME, pb2, pb2_grpc


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
