#!/usr/bin/env bash
# Type-checks the sampling core, the core package and the client with mypy.
#
# croupier's packages live in several top-level folders mapped through package-dir
# (croupier.server -> server/, ...), which mypy cannot follow, so this lays the package out
# as Python sees it (a tree of links in a temporary folder) and checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/croupier"
for entry in "$repo"/croupier/*; do ln -s "$entry" "$tree/croupier/$(basename "$entry")"; done
for pkg in server client shards proto; do ln -s "$repo/$pkg" "$tree/croupier/$pkg"; done
cd "$tree"
exec "$repo/.venv/bin/python" -m mypy --config-file "$repo/pyproject.toml" \
  -p croupier.server.sampling -p croupier.client \
  -m croupier.errors -m croupier.layout -m croupier.topology -m croupier.mixture -m croupier.datasets \
  -m croupier.values -m croupier.bearer -m croupier.grpc_options -m croupier.moved -m croupier.lazy \
  -p croupier.format "$@"
