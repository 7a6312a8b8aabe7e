#!/usr/bin/env bash
# One call on the lent GPU machine: build xent_ext there, run the CUDA tests,
# then the GPU benchmark. See benchmarks/README.md ("On a lent GPU") for how to
# call it and where to record the results.
#
#   bash scripts/gpu_check.sh            # in the repository root; $OUT: where logs go
#
# Every stage is time-boxed (timeout) against one overall deadline, so the
# script ends within GPU_CHECK_SECONDS (default 480) even if a stage hangs;
# a stage that fails does not stop the next ones. The last thing printed is a
# digest (test counts and failures, the benchmark summary and targets line,
# and a table of stage, rc, seconds), also written to $OUT/summary.txt, so
# that the last 12,000 characters of output hold what matters.
#
# Files written to $OUT (8, no folders): build.log (machine, versions, peers'
# install, build, `python -m xent_ext`), test_cuda.log (tests/test_cuda.py),
# test_suite.log (the rest of the suite, CUDA twins only: -k cuda),
# test_cpu.log (the CPU tests, run beside both CUDA test stages on the
# host's spare cores, at the host's ISA, often AVX512; then, if time is
# left, the CPU benchmark), bench_cuda.log/.json,
# bench_nocheck.log, summary.txt. JUnit XML goes to /tmp (the
# device tool brings back at most 8 files).
#
# Knobs (environment): GPU_CHECK_SECONDS (overall deadline), GPU_CHECK_XDIST
# (pytest-xdist workers for the suite stage; 0: none; default 8),
# GPU_CHECK_CPU_XDIST (workers for the CPU tests; 0: skip them; default 6),
# GPU_CHECK_BUILD_CAP (most seconds for the build; default 330),
# GPU_CHECK_BENCH_RESERVE (seconds kept for the benchmarks after the tests;
# default 150), GPU_CHECK_CPU_BENCH_SECONDS (the CPU benchmark's part of them;
# default 0: skipped, for sessions whose own machine has AVX512; 100 runs it),
# GPU_CHECK_BENCH_ARGS (extra arguments for the benchmark), PYTHON (python3).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-480}
XDIST_N=${GPU_CHECK_XDIST:-8}
CPU_XDIST_N=${GPU_CHECK_CPU_XDIST:-6}
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-330}
# Seconds kept for the two benchmarks (GPU, then the CPU one at the host's ISA)
# once the tests are done, and the part of them the CPU benchmark gets.
BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-150}
CPU_BENCH_SECONDS=${GPU_CHECK_CPU_BENCH_SECONDS:-0}
CPU_TEST_RESERVE=$BENCH_RESERVE
START=$(date +%s)
DEADLINE=$((START + TOTAL))
export PYTHONUNBUFFERED=1

BUILD_LOG=$OUT/build.log
STAGES=()  # "name rc seconds"

now() { date +%s; }

# budget CAP RESERVE [FLOOR]: seconds for the next stage: at most CAP, leaving
# RESERVE seconds before the deadline for the stages after it; but at least
# FLOOR (taken from the later stages) while the deadline allows. Stages are
# given in run order: build, test_cuda.py, the suite's twins (the CPU tests
# beside both), the GPU benchmark, the CPU benchmark, the target-check-off rows.
budget() {
  local left=$((DEADLINE - $(now)))
  local t=$(($1 < left - $2 ? $1 : left - $2))
  local floor=${3:-0}
  ((t < floor)) && t=$((floor < left - 10 ? floor : left - 10))
  echo "$t"
}

# stage NAME SECONDS LOG CMD...: run CMD under timeout, output to stdout and LOG
# (with QUIET=1: to LOG only, e.g. the build's thousands of header warnings).
stage() {
  local name=$1 secs=$2 log=$3
  shift 3
  if ((secs < 20)); then
    echo "=== $name: skipped, ${secs}s left before the deadline" | tee -a "$log"
    STAGES+=("$name skip 0")
    return 0
  fi
  echo | tee -a "$log"
  echo "=== $name (timeout ${secs}s, $(date -u +%H:%M:%S), $(($(now) - START))s since start)" | tee -a "$log"
  local t0 rc
  t0=$(now)
  if [[ ${QUIET:-0} == 1 ]]; then
    echo "(output in $(basename "$log"))"
    timeout -k 10 "$secs" "$@" >>"$log" 2>&1
    rc=$?
  else
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  ((rc == 124 || rc == 137)) && echo "--- $name: TIMED OUT after ${secs}s" | tee -a "$log"
  echo "--- $name: rc=$rc in $(($(now) - t0))s" | tee -a "$log"
  STAGES+=("$name $rc $(($(now) - t0))")
  return "$rc"
}

# ---------------------------------------------------------------- machine
ARCH=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')" 2>/dev/null || echo "")
if [[ -z $ARCH ]]; then
  ARCH=9.0
  ARCH_NOTE="(torch saw no GPU: assumed 9.0)"
else
  ARCH_NOTE="(from torch.cuda.get_device_capability())"
fi
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  CUDA_HOME_GUESS=/usr/local/cuda
elif command -v nvcc >/dev/null; then
  CUDA_HOME_GUESS=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
else
  CUDA_HOME_GUESS=${CUDA_HOME:-/usr/local/cuda}
fi
export CUDA_HOME=${CUDA_HOME:-$CUDA_HOME_GUESS}
# The device image sets CXX=/opt/gcc/bin/g++, whose links put libstdc++'s code
# into the extension itself (a second libstdc++ beside torch's): the first error
# message the extension formatted (any TORCH_CHECK) segfaulted in
# std::ostream (H200, 2026-11-27). The system compiler links libstdc++.so.
if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then
  echo "compilers: CC/CXX were '${CC:-}'/'${CXX:-}'; using /usr/bin/gcc and /usr/bin/g++"
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
export PY ARCH ARCH_NOTE  # for the stage functions below, run by `timeout bash -c NAME`

machine_info() {
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  echo
  echo "uname: $(uname -srm); CPUs: $(nproc); $(free -g | awk '/^Mem:/ {print "RAM " $2 " GiB"}')"
  echo "python: $(command -v "$PY") $($PY -V 2>&1)"
  $PY - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
for name in ("triton", "setuptools", "wheel", "ninja", "pytest", "pytest-timeout", "pytest-xdist", "numpy",
             "liger-kernel", "quack-kernels", "nvidia-cutlass-dsl"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
  echo "CUDA_HOME=$CUDA_HOME"
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  echo "c++: $(c++ --version | head -1); ninja $(ninja --version 2>/dev/null || echo missing)"
  echo "TORCH_CUDA_ARCH_LIST will be $ARCH $ARCH_NOTE"
  df -h /tmp | tail -1
}
export -f machine_info
stage machine 60 "$BUILD_LOG" bash -c machine_info

# ---------------------------------------------------------------- peers
# Liger Kernel (pure Python + Triton) travels as a wheel in .whl/ (see benchmarks/README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  if stage peers-install 60 "$BUILD_LOG" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    $PY -c "import liger_kernel.transformers.functional as f, importlib.metadata as md; print('liger-kernel', md.version('liger-kernel'), 'imports')" 2>&1 | tail -3 | tee -a "$BUILD_LOG"
  fi
else
  echo "=== peers-install: no .whl/ folder: Liger Kernel will show as 'not installed'" | tee -a "$BUILD_LOG"
fi

# ---------------------------------------------------------------- build
# In place (no pip, no network). A stale extension left by an earlier call on
# a warm machine is removed first, so nothing below runs against it; build/
# stays, so ninja only recompiles what changed.
rm -f xent_ext/_C*.so
build() {
  CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=16 $PY setup.py build_ext --inplace
}
export -f build
QUIET=1 stage build "$(budget "$BUILD_CAP" 150 120)" "$BUILD_LOG" bash -c build
BUILD_RC=$?
build_section() { sed -n '/^=== build/,/^--- build.*: rc=/p' "$BUILD_LOG"; }
if ((BUILD_RC != 0 && BUILD_RC != 124 && BUILD_RC != 137)) &&
  ! build_section | grep -qE '^\[[0-9]+/[0-9]+\]|nvcc|c\+\+ |g\+\+ |gcc '; then
  # Failed before compiling anything: most likely setuptools rejecting the
  # project metadata (pyproject.toml). Build the same sources in a scratch
  # copy without it and bring the extension back.
  build_scratch() {
    rm -rf /tmp/xbuild && mkdir -p /tmp/xbuild && cp -r setup.py csrc xent_ext /tmp/xbuild/ &&
      (cd /tmp/xbuild && CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=16 $PY setup.py build_ext --inplace) &&
      cp /tmp/xbuild/xent_ext/_C*.so xent_ext/
  }
  export -f build_scratch
  QUIET=1 stage build-scratch "$(budget "$BUILD_CAP" 150 120)" "$BUILD_LOG" bash -c build_scratch
  BUILD_RC=$?
fi
xent_info() {
  echo "libstdc++ of the extension: $(ldd xent_ext/_C*.so | grep -o 'libstdc++[^ ]*' | head -1 || true)," \
    "std::ostream code inside it: $(nm -DC --defined-only xent_ext/_C*.so 2>/dev/null | grep -c 'basic_ostream') symbols (want 0)"
  $PY -c "import xent_ext; print('xent_ext imported from', xent_ext.__file__)" && $PY -m xent_ext
}
export -f xent_info
stage xent-info 60 "$BUILD_LOG" bash -c xent_info

# ---------------------------------------------------------------- tests
PYTEST_COMMON=(-p no:cacheprovider -ra)
if $PY -c "import pytest_timeout" 2>/dev/null; then HAVE_TIMEOUT=1; else HAVE_TIMEOUT=0; fi
if ((XDIST_N > 0)) && $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "$XDIST_N"); else XDIST=(); fi
SESSION_TIMEOUT=0
$PY -m pytest --help 2>/dev/null | grep -q -- '--session-timeout' && SESSION_TIMEOUT=1

# The CPU tests start as soon as the build is done and run beside both CUDA
# test stages on the host's spare cores (they time nothing), at the host's ISA:
# AVX512 on the H200 machines, which a session's own machine may lack (Zen 3
# machines did; the Zen 4 of 2026-12-04 did not). They are waited for before
# the benchmarks, which they would disturb.
T=$(budget 300 "$CPU_TEST_RESERVE")
CPU_PID=
if ((CPU_XDIST_N > 0)) && $PY -c "import xdist" 2>/dev/null && ((T >= 20)); then
  (
    echo "=== test-cpu (timeout ${T}s, $(date -u +%H:%M:%S)): ATen CPU capability" \
      "$($PY -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>&1)," \
      "xent_ext $($PY -c 'import xent_ext; print(xent_ext.cpu_capability())' 2>&1); $(grep -o -m1 'avx512[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    grep -m1 'model name' /proc/cpuinfo
    XENT_TEST_DEVICES=cpu OMP_NUM_THREADS=2 timeout -k 10 "$T" $PY -m pytest tests -q -m "not cuda" \
      --ignore=tests/test_cuda.py --ignore=tests/test_install.py --maxfail=30 "${PYTEST_COMMON[@]}" \
      -n "$CPU_XDIST_N" --junitxml=/tmp/test_cpu.xml
    rc=$?
    echo  # a run killed by timeout leaves pytest's progress line open
    echo "--- test-cpu: rc=$rc"
  ) >"$OUT/test_cpu.log" 2>&1 &
  CPU_PID=$!
fi

if [[ -f tests/test_cuda.py ]]; then
  # Floor 90 s: these tests are the call's first purpose (58-73 s on an H200).
  T=$(budget 120 $((BENCH_RESERVE + 60)) 90)
  # --maxfail rather than -x: one call is all a session gets, so see every failure there is.
  ARGS=(tests/test_cuda.py -q --maxfail=20 "${PYTEST_COMMON[@]}" --junitxml=/tmp/test_cuda.xml)
  ((HAVE_TIMEOUT)) && ARGS+=(--timeout=60)
  stage test-cuda "$T" "$OUT/test_cuda.log" $PY -m pytest "${ARGS[@]}"
else
  echo "=== test-cuda: tests/test_cuda.py does not exist" | tee -a "$OUT/test_cuda.log"
  STAGES+=("test-cuda skip 0")
fi

T=$(budget 150 $((BENCH_RESERVE)))
ARGS=(tests -q -k cuda --ignore=tests/test_cuda.py --maxfail=30 "${PYTEST_COMMON[@]}" "${XDIST[@]}"
  --junitxml=/tmp/test_suite.xml)
((HAVE_TIMEOUT)) && ARGS+=(--timeout=90)
# Stop cleanly (with a report and the XML) before the hard timeout.
((HAVE_TIMEOUT && SESSION_TIMEOUT && T > 40)) && ARGS+=(--session-timeout=$((T - 25)))
stage test-suite "$T" "$OUT/test_suite.log" $PY -m pytest "${ARGS[@]}"
if [[ -n $CPU_PID ]]; then
  wait "$CPU_PID"
  CPU_RC=$(sed -n 's/^--- test-cpu: rc=//p' "$OUT/test_cpu.log" | tail -1)
  STAGES+=("test-cpu ${CPU_RC:-?} -")
fi

# ---------------------------------------------------------------- benchmark
T=$(budget 300 "$CPU_BENCH_SECONDS" 90)
BENCH_BUDGET=$((T > 120 ? T - 50 : T / 2))
# shellcheck disable=SC2086
stage bench "$T" "$OUT/bench_cuda.log" $PY -m xent_ext.bench --device cuda --json "$OUT/bench_cuda.json" \
  --max-time 1 --budget "$BENCH_BUDGET" ${GPU_CHECK_BENCH_ARGS:-}

# The CPU benchmark on the host's cores (AVX512 where it has them) at 1 and 2
# threads, when asked for (GPU_CHECK_CPU_BENCH_SECONDS > 0): issue 4's targets
# are set for a 2-core AVX512 machine, which a session's own machine may not
# be. Appended to test_cpu.log (the device tool brings back at most 8 files).
if ((CPU_BENCH_SECONDS > 0)); then
  T=$(budget 150 10)
  stage bench-cpu "$T" "$OUT/test_cpu.log" env OMP_NUM_THREADS=2 $PY -m xent_ext.bench --quick --threads 1,2 \
    --max-time 2
fi

# The same small shapes with the CUDA target check off (no host sync per
# forward), to size what the sync costs (benchmarks/NOTES.md). Only if time is left.
T=$(budget 90 10)
stage bench-nocheck "$T" "$OUT/bench_nocheck.log" env XENT_EXT_CUDA_TARGET_CHECK=0 $PY -m xent_ext.bench \
  --device cuda --shapes 8x256000,16x21x128x128,65536x1000,4096x32000:bf16 --no-compile --max-time 0.5 \
  --budget $((T > 40 ? T - 30 : 10))

# ---------------------------------------------------------------- digest
pytest_digest() {  # LOG: the counts line and the first failures
  [[ -f $1 ]] || { echo "  (no log)"; return; }
  local log=/tmp/digest_$(basename "$1")
  sed '/^=== bench-cpu/,$d' "$1" >"$log"  # test_cpu.log ends with the CPU benchmark
  grep -E '(passed|failed|error|skipped|no tests ran|deselected)' "$log" | grep -vE '^(FAILED|ERROR) ' | tail -1 | sed 's/^/  /'
  grep -E '^(FAILED|ERROR) ' "$log" | head -20 | cut -c1-240 | sed 's/^/  /'
  local n
  n=$(grep -cE '^(FAILED|ERROR) ' "$log")
  ((n > 20)) && echo "  ... $((n - 20)) more in $(basename "$1")"
  grep -E 'Timeout|session timeout|TIMED OUT' "$log" | head -3 | cut -c1-240 | sed 's/^/  /'
}

digest() {
  echo "===================================================================== digest"
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1);" \
    "TORCH_CUDA_ARCH_LIST=$ARCH; $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"
  echo "build: rc=$BUILD_RC ($(build_section | grep -cE '^\[[0-9]+/[0-9]+\]') ninja steps," \
    "$(build_section | grep -c 'warning:') compiler warnings; log: build.log)"
  if ((BUILD_RC != 0)); then
    build_section | grep -E '(error|Error|ERROR)' | grep -v 'Werror' | head -25 | cut -c1-300 | sed 's/^/  /'
    echo "  -- last lines of the build:"
    build_section | tail -15 | cut -c1-300 | sed 's/^/  /'
  fi
  sed -n '/^=== xent-info/,/^--- xent-info/p' "$BUILD_LOG" | grep -vE '^(===|---)' | head -8 | sed 's/^/  /'
  echo "tests/test_cuda.py (--maxfail=20):"
  pytest_digest "$OUT/test_cuda.log"
  echo "suite, CUDA twins (-k cuda):"
  pytest_digest "$OUT/test_suite.log"
  echo "CPU tests (host ISA, beside the twins):"
  head -2 "$OUT/test_cpu.log" 2>/dev/null | cut -c1-240 | sed 's/^/  /'
  pytest_digest "$OUT/test_cpu.log"
  echo "benchmark:"
  if [[ -f $OUT/bench_cuda.log ]]; then
    grep -E '^(GPU|torch|peers|copy):' "$OUT/bench_cuda.log" | cut -c1-240 | sed 's/^/  /'
    if grep -q '^summary (copy bandwidth' "$OUT/bench_cuda.log"; then
      # the summary table, then the targets line
      sed -n '/^summary (copy bandwidth/,/^$/p' "$OUT/bench_cuda.log" | cut -c1-300 | sed 's/^/  /'
    else  # stopped early: xent's line of each row done, the targets line if printed, the end of the log
      grep -E '^[0-9x]+ +(fp32|bf16|fp16) ' "$OUT/bench_cuda.log" | cut -c1-200 | sed 's/^/  /'
      grep -E '^targets' "$OUT/bench_cuda.log" | tail -1 | sed 's/^/  /'
      tail -6 "$OUT/bench_cuda.log" | cut -c1-240 | sed 's/^/  /'
    fi
    sed -n '/^notes:/,/^$/p' "$OUT/bench_cuda.log" | head -15 | cut -c1-240 | sed 's/^/  /'
    grep -E '^elapsed:' "$OUT/bench_cuda.log" | sed 's/^/  /'
  fi
  if [[ -f $OUT/bench_nocheck.log ]] && grep -q '^summary (copy bandwidth' "$OUT/bench_nocheck.log"; then
    echo "benchmark, target check off:"
    sed -n '/^summary (copy bandwidth/,/^$/p' "$OUT/bench_nocheck.log" | cut -c1-300 | sed 's/^/  /'
  fi
  if grep -q '^=== bench-cpu' "$OUT/test_cpu.log" 2>/dev/null; then
    echo "CPU benchmark (host cores; the ISA line says whether AVX512):"
    sed -n '/^=== bench-cpu/,$p' "$OUT/test_cpu.log" >/tmp/bench_cpu.log
    grep -E '^(CPU|ISA):' /tmp/bench_cpu.log | sed 's/^/  /'
    grep -E '^[0-9x]+ +(fp32|bf16|fp16) ' /tmp/bench_cpu.log | cut -c1-200 | sed 's/^/  /'
    sed -n '/^targets/,$p' /tmp/bench_cpu.log | head -20 | cut -c1-240 | sed 's/^/  /'
  fi
  echo
  printf '%-14s %5s %8s\n' stage rc seconds
  local s
  for s in "${STAGES[@]}"; do
    # shellcheck disable=SC2086
    printf '%-14s %5s %8s\n' $s
  done
  echo "total: $(($(now) - START))s (deadline ${TOTAL}s); files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
}
digest 2>&1 | tee "$OUT/summary.txt"

FAILED=0
for s in "${STAGES[@]}"; do
  # shellcheck disable=SC2086
  set -- $s
  [[ $2 == 0 || $2 == skip ]] || FAILED=1
done
exit $FAILED
