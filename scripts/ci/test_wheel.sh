#!/usr/bin/env bash
# Test an installed wheel, not the source tree: a fresh virtual environment
# gets torch and the wheel, and the README's test command runs from a
# temporary folder holding a copy of tests/ (so `import xent_ext` can only
# find the installed package), plus the benchmark harness beside it
# (benchmarks/run.py and benchmarks/harness/, a plain folder the wheel does
# not install, which the harness's tests find as tests/../benchmarks).
# Called by .ci/run and the workflows.
#
#   scripts/ci/test_wheel.sh PYTHON WHEEL TORCH_SPEC VENV [PYTEST_ARGS...]
#
# PYTHON makes the venv; TORCH_SPEC is a pip requirement ("torch==2.14.1");
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL pick CPU or CUDA builds of torch.
set -euo pipefail
PY=${1:?usage: test_wheel.sh PYTHON WHEEL TORCH_SPEC VENV [PYTEST_ARGS...]}
WHEEL=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
TORCH_SPEC=${3:?}
VENV=${4:?}
shift 4
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
# The wheel with its test extra (pyproject.toml: pytest, numpy, expecttest, and
# transformers/accelerate for the Hugging Face test), as the Quick start
# installs the clone with ".[test]".
"$VENV/bin/python" -m pip install --quiet "$WHEEL[test]"
"$VENV/bin/python" -c "import transformers, accelerate; print('transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/tests" "$WORK/tests"
mkdir "$WORK/benchmarks"
for f in run.py harness; do
  [ ! -e "$ROOT/benchmarks/$f" ] || cp -r "$ROOT/benchmarks/$f" "$WORK/benchmarks/"
done
cd "$WORK"
"$VENV/bin/python" - "$ROOT" <<'PY'
import pathlib, sys, xent_ext
where = pathlib.Path(xent_ext.__file__).resolve()
root = pathlib.Path(sys.argv[1]).resolve()
assert where.parent != root / "xent_ext" and "site-packages" in where.parts, (
    f"xent_ext was imported from {where.parent}, not from the installed wheel")
print("testing the installed wheel:", where.parent)
PY
"$VENV/bin/python" -m xent_ext info
# The README's test command.
"$VENV/bin/python" -m pytest tests -q "$@"
