#!/usr/bin/env bash
# Regenerates the Python modules of the croupier.v1 gRPC contract from
# proto/croupier/v1/croupier.proto. The generated files are checked in; tests/test_proto.py
# regenerates into a temporary folder and fails if anything differs.
#
#   bash proto/generate.sh            # writes next to the .proto
#   bash proto/generate.sh OUT_DIR    # writes OUT_DIR/croupier/v1/croupier_pb2{,_grpc}.py{,i}
#
# The .proto is compiled with proto/ as the include root, so the descriptor names the file
# "croupier/v1/croupier.proto" (what reflection shows). protoc writes the stub module's import
# of the message module as a top-level `from croupier.v1 import ...`; the package lives at
# croupier.proto.croupier.v1, so that one line is rewritten.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
py="${PYTHON:-$here/../.venv/bin/python}"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  croupier/v1/croupier.proto
stub="$out/croupier/v1/croupier_pb2_grpc.py"
sed -i 's/^from croupier\.v1 import croupier_pb2 as /from croupier.proto.croupier.v1 import croupier_pb2 as /' "$stub"
grep -q '^from croupier.proto.croupier.v1 import croupier_pb2 as ' "$stub"
