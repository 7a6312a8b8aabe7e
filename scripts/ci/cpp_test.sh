#!/usr/bin/env bash
# Build xent_ext's C++ library with CMake against the torch of a given Python,
# install it, then build the C++ test (tests/cpp) as a consumer of the
# installed package (find_package(xent_ext)) and run it with ctest.
#
#   bash scripts/ci/cpp_test.sh [PYTHON] [BUILD_DIR]
#
# PYTHON (default python3) is the interpreter whose torch is used: its
# torch.utils.cmake_prefix_path is where find_package(Torch) looks. BUILD_DIR
# (default build-cpp/) keeps the library build (incremental; wiped when the
# torch changes), the install prefix (BUILD_DIR/install, fresh each run) and
# the consumer build (BUILD_DIR/consumer).
#
# Needs cmake >= 3.18 (pip-installs it into PYTHON's environment if missing or
# older), a C++ compiler, and ninja if available (PYTHON's environment or PATH;
# make otherwise). With a CUDA build of torch, torch's own CMake needs the CUDA
# toolkit (nvcc) even for this CPU-only build: CUDA_HOME, default
# /usr/local/cuda (CMakeLists.txt, Note [torch's CMake and CUDA]).
# Environment: MAX_JOBS (parallel compile jobs, default: all cores),
# XENT_EXT_ISAS (as for setup.py, e.g. "default,avx2"), XENT_EXT_CMAKE_ARGS
# (more arguments for configuring the library, e.g. -DXENT_EXT_WITH_CUDA=ON).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${1:-python3}
BUILD=${2:-$ROOT/build-cpp}
case "$BUILD" in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
PREFIX=$BUILD/install
CONSUMER=$BUILD/consumer

t_all=$(date +%s)
stage_start=0
stage() { stage_start=$(date +%s); echo; echo "=== cpp: $* ($(date -u +%H:%M:%S))"; }
stage_end() { echo "--- cpp: done in $(( $(date +%s) - stage_start ))s"; }

stage "tools"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "cpp_test.sh: no python '$PY'" >&2
  exit 2
fi
PY=$(command -v "$PY")
SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
cmake_ok() { # cmake_ok CMAKE: at least 3.18
  local v
  v=$("$1" --version 2>/dev/null | head -n1 | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] && set -- $v && { [ "$1" -gt 3 ] || { [ "$1" -eq 3 ] && [ "$2" -ge 18 ]; }; }
}
CMAKE=""
for c in "$SCRIPTS/cmake" "$(command -v cmake || true)"; do
  if [ -n "$c" ] && [ -x "$c" ] && cmake_ok "$c"; then CMAKE=$c; break; fi
done
if [ -z "$CMAKE" ]; then
  echo "no cmake >= 3.18: pip-installing cmake into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --quiet --disable-pip-version-check "cmake>=3.18"
  CMAKE=$SCRIPTS/cmake
fi
CTEST=$(dirname "$CMAKE")/ctest
GEN=()
for n in "$SCRIPTS/ninja" "$(command -v ninja || true)"; do
  if [ -n "$n" ] && [ -x "$n" ]; then GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$n"); break; fi
done
[ ${#GEN[@]} -gt 0 ] || GEN=(-G "Unix Makefiles")
echo "cmake: $CMAKE ($("$CMAKE" --version | head -n1)); generator: ${GEN[1]}; jobs: $JOBS"

read -r TORCH_VERSION TORCH_CUDA TORCH_PREFIX < <("$PY" -c '
import torch, torch.utils
print(torch.__version__, torch.version.cuda or "none", torch.utils.cmake_prefix_path)')
echo "torch $TORCH_VERSION (CUDA $TORCH_CUDA), CMake prefix $TORCH_PREFIX"
TORCH_ARGS=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX")
if [ "$TORCH_CUDA" != none ]; then
  # Note [torch's CMake and CUDA]: find_package(Torch) needs nvcc and the toolkit.
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cpp_test.sh: torch $TORCH_VERSION is a CUDA $TORCH_CUDA build: its CMake config needs the CUDA toolkit." >&2
    echo "Set CUDA_HOME to a CUDA $TORCH_CUDA toolkit (no $CUDA_HOME/bin/nvcc), or use a CPU build of torch." >&2
    exit 2
  fi
  export PATH="$CUDA_HOME/bin:$PATH"
  # The build's default architectures (csrc/build_flags.txt), for the consumer
  # build too, which does not read that file.
  default_archs=$(sed -n 's/^CUDA_ARCHS *= *//p' "$ROOT/csrc/build_flags.txt" | tr ' ' ';')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$default_archs}
  TORCH_ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
  echo "CUDA toolkit for torch's CMake: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"
fi
stage_end

# A build dir configured for another torch (or generator) is started afresh:
# CMake caches Torch_DIR.
STAMP="$PY $TORCH_VERSION $TORCH_PREFIX ${GEN[*]}"
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/.cpp_test_stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "cpp: $BUILD was configured for another torch or generator: starting afresh"
  rm -rf "$BUILD"
fi
mkdir -p "$BUILD"

stage "configure the library"
ISA_ARGS=()
[ -z "${XENT_EXT_ISAS:-}" ] || ISA_ARGS=(-DXENT_EXT_ISAS="$XENT_EXT_ISAS")
# shellcheck disable=SC2086
"$CMAKE" -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release "${TORCH_ARGS[@]}" \
  -DXENT_EXT_BUILD_TESTS=OFF "${ISA_ARGS[@]}" ${XENT_EXT_CMAKE_ARGS:-}
echo "$STAMP" > "$BUILD/.cpp_test_stamp"
stage_end

stage "build the library"
"$CMAKE" --build "$BUILD" --parallel "$JOBS"
stage_end

stage "install into $PREFIX"
rm -rf "$PREFIX"
"$CMAKE" --install "$BUILD" --prefix "$PREFIX"
stage_end

stage "configure tests/cpp as a consumer of the installed package"
# Only the install prefix on CMAKE_PREFIX_PATH: torch is found through the
# package's own hint. -Wl,--as-needed as on distributions that default to it:
# the package must keep libxent_ext.so linked all the same.
rm -rf "$CONSUMER"
"$CMAKE" -S "$ROOT/tests/cpp" -B "$CONSUMER" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_EXE_LINKER_FLAGS="-Wl,--as-needed" \
  "${TORCH_ARGS[@]:1}"
stage_end

stage "build the consumer"
"$CMAKE" --build "$CONSUMER" --parallel "$JOBS"
stage_end

stage "ctest"
(cd "$CONSUMER" && "$CTEST" --output-on-failure --timeout 600)
stage_end

echo
echo "cpp: torch $TORCH_VERSION: C++ library built, installed and tested in $(( $(date +%s) - t_all ))s"
