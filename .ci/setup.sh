#!/usr/bin/env bash
# Creates (or refreshes) .venv with croupier and everything it needs. Idempotent: a second
# run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.croupier-setup
want=$(cat pyproject.toml .ci/constraints.txt .ci/dev-constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# Everything: the tests' tools, reports, Ray, trainer integrations, and the shard builder with
# faiss for this machine (docs/install.md lists the extras).
extras=dev,build
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras=dev,build-gpu
fi
# streaming-community replaces mosaicml-streaming (both own the `streaming/` folder): a venv set
# up before the switch drops the old one first, or uninstalling it later would delete the other's files.
if .venv/bin/python -m pip show -q mosaicml-streaming >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y mosaicml-streaming
fi
echo "croupier setup: installing into .venv (first run takes a few minutes)" >&2
.venv/bin/python -m pip install -q -c .ci/constraints.txt -c .ci/dev-constraints.txt "torchvision" -e ".[$extras]"
echo "$want" > "$stamp"
