#!/usr/bin/env bash
# Build the xent_ext wheel against the torch already installed in PYTHON's
# environment (no build isolation: the extension must be compiled against the
# torch it will run with). Called by .ci/run and .github/workflows/wheels.yml.
#
#   scripts/ci/build_wheel.sh PYTHON OUTDIR
#
# Honours the build switches (README): MAX_JOBS, CUDA_HOME,
# TORCH_CUDA_ARCH_LIST, XENT_EXT_CPU_ONLY, XENT_EXT_ISAS. Prints the wheel's path
# as its last line.
set -euo pipefail
PY=${1:?usage: build_wheel.sh PYTHON OUTDIR}
OUTDIR=${2:?usage: build_wheel.sh PYTHON OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUTDIR"
# A stale build/ from another torch would be reused by setuptools.
rm -rf "$ROOT/build" "$ROOT"/*.egg-info
# A release wheel requires the torch minor it was built for, not the exact
# torch (Note [Build identity], setup.py).
XENT_EXT_RELEASE_WHEEL=1 "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$OUTDIR" "$ROOT" >&2
ls -t "$OUTDIR"/xent_ext-*.whl | head -n 1
