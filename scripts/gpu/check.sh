#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build xent_ext in place, run the CUDA tests,
# then the GPU benchmark, all within one time budget (scripts/gpu/README.md).
#
#   bash scripts/gpu/check.sh [RESULTS_DIR]   # default $GPU_RESULTS/check, GPU_RESULTS=gpu-results
#
# Every stage is time-boxed against one deadline (GPU_CHECK_SECONDS, default
# 480), so the script ends in time even if a stage hangs; a stage that fails
# does not stop the next ones. The last thing printed is a digest (test counts
# and failures, the benchmark summary and targets line, a table of stage, rc
# and seconds), also written to RESULTS_DIR/summary.txt.
#
# Files in RESULTS_DIR (a rerun replaces them): build.log (machine, versions,
# build, `python -m xent_ext`), test_cuda.log (tests/test_cuda.py),
# test_suite.log (the rest of the suite's CUDA twins: -k cuda), test_cpu.log
# (the CPU tests at the host's ISA, run beside the CUDA tests on the spare
# cores), bench_cuda.log/.json, bench_nocheck.log (small shapes, CUDA target
# check off), bench_cpu.log (only when asked for), summary.txt.
#
# Knobs (environment; the README says how to size them): GPU_CHECK_SECONDS,
# GPU_CHECK_BUILD_CAP (330), GPU_CHECK_BENCH_RESERVE (150),
# GPU_CHECK_XDIST (8 pytest-xdist workers for the suite; 0: none),
# GPU_CHECK_CPU_XDIST (6 workers for the CPU tests; 0: skip them),
# GPU_CHECK_CPU_BENCH_SECONDS (0: no CPU benchmark), GPU_CHECK_BENCH_ARGS,
# PYTHON (python3), CUDA_HOME, MAX_JOBS.

set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd) || exit 2
RESULTS=${1:-${GPU_RESULTS:-$ROOT/gpu-results}/check}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2
cd "$ROOT" || exit 2
rm -f "$RESULTS"/{build.log,test_cuda.log,test_suite.log,test_cpu.log,bench_cuda.log,bench_cuda.json} \
  "$RESULTS"/{bench_nocheck.log,bench_cpu.log,summary.txt}
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-480}
XDIST_N=${GPU_CHECK_XDIST:-8}
CPU_XDIST_N=${GPU_CHECK_CPU_XDIST:-6}
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-330}
# Seconds kept for the benchmarks once the tests are done, and the part of
# them the CPU benchmark gets.
BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-150}
CPU_BENCH_SECONDS=${GPU_CHECK_CPU_BENCH_SECONDS:-0}
START=$(date +%s)
DEADLINE=$((START + TOTAL))
export PYTHONUNBUFFERED=1
# benchmarks/run.py imports the extension built in place here.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
BENCH=("$PY" benchmarks/run.py)

BUILD_LOG=$RESULTS/build.log
STAGES=()  # "name rc seconds"

now() { date +%s; }

# budget CAP RESERVE [FLOOR]: seconds for the next stage: at most CAP, leaving
# RESERVE seconds before the deadline for the stages after it; but at least
# FLOOR (taken from the later stages) while the deadline allows.
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
# Machine code for the visible card only: the build is then as short as it gets.
ARCH=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')" 2>/dev/null || echo "")
if [[ -z $ARCH ]]; then
  ARCH=9.0
  ARCH_NOTE="(torch saw no GPU: assumed 9.0)"
else
  ARCH_NOTE="(from torch.cuda.get_device_capability())"
fi
if [[ -z ${CUDA_HOME:-} ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The system compiler: a CXX that links libstdc++'s code into the extension
# itself (a second libstdc++ beside torch's) makes the first error message the
# extension formats (any TORCH_CHECK) crash in std::ostream. The system g++
# links libstdc++.so, and xent-info below checks it.
if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then
  echo "compilers: CC/CXX were '${CC:-}'/'${CXX:-}'; using /usr/bin/gcc and /usr/bin/g++"
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
export PY ARCH_NOTE  # for the stage functions below, run by `timeout bash -c NAME`

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
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $ARCH_NOTE; MAX_JOBS=$MAX_JOBS"
  df -h /tmp | tail -1
}
export -f machine_info
stage machine 60 "$BUILD_LOG" bash -c machine_info

# ---------------------------------------------------------------- build
# In place, no pip, no network. A stale extension from an earlier run is
# removed first, so nothing below runs against it; build/ stays, so ninja only
# recompiles what changed.
rm -f xent_ext/_C*.so
QUIET=1 stage build "$(budget "$BUILD_CAP" 150 120)" "$BUILD_LOG" $PY setup.py build_ext --inplace
BUILD_RC=$?
build_section() { sed -n '/^=== build/,/^--- build.*: rc=/p' "$BUILD_LOG"; }
if ((BUILD_RC != 0 && BUILD_RC != 124 && BUILD_RC != 137)) &&
  ! build_section | grep -qE '^\[[0-9]+/[0-9]+\]|nvcc|c\+\+ |g\+\+ |gcc '; then
  # Failed before compiling anything: most likely an older setuptools
  # rejecting the project metadata (pyproject.toml). Build the same sources in
  # a scratch copy without it and bring the extension back.
  build_scratch() {
    local d
    d=$(mktemp -d) && cp -r setup.py csrc xent_ext "$d/" &&
      (cd "$d" && $PY setup.py build_ext --inplace) && cp "$d"/xent_ext/_C*.so xent_ext/
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
# test stages on the host's spare cores (they time nothing), at the host's ISA
# (a GPU host often has AVX512, which a development machine may lack). They
# are waited for before the benchmarks, which they would disturb.
T=$(budget 300 "$BENCH_RESERVE")
CPU_PID=
if ((CPU_XDIST_N > 0)) && $PY -c "import xdist" 2>/dev/null && ((T >= 20)); then
  (
    echo "=== test-cpu (timeout ${T}s, $(date -u +%H:%M:%S)): ATen CPU capability" \
      "$($PY -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>&1)," \
      "xent_ext $($PY -c 'import xent_ext; print(xent_ext.cpu_capability())' 2>&1); $(grep -o -m1 'avx512[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    grep -m1 'model name' /proc/cpuinfo
    XENT_TEST_DEVICES=cpu OMP_NUM_THREADS=2 timeout -k 10 "$T" $PY -m pytest tests -q -m "not cuda" \
      --ignore=tests/test_cuda.py --ignore=tests/test_install.py --maxfail=30 "${PYTEST_COMMON[@]}" -n "$CPU_XDIST_N"
    rc=$?
    echo  # a run killed by timeout leaves pytest's progress line open
    echo "--- test-cpu: rc=$rc"
  ) >"$RESULTS/test_cpu.log" 2>&1 &
  CPU_PID=$!
fi

if [[ -f tests/test_cuda.py ]]; then
  # A floor of 90 s: these tests are the first purpose of the check.
  T=$(budget 120 $((BENCH_RESERVE + 60)) 90)
  # --maxfail rather than -x: see every failure there is in one run.
  ARGS=(tests/test_cuda.py -q --maxfail=20 "${PYTEST_COMMON[@]}")
  ((HAVE_TIMEOUT)) && ARGS+=(--timeout=60)
  stage test-cuda "$T" "$RESULTS/test_cuda.log" $PY -m pytest "${ARGS[@]}"
else
  echo "=== test-cuda: tests/test_cuda.py does not exist" | tee -a "$RESULTS/test_cuda.log"
  STAGES+=("test-cuda skip 0")
fi

T=$(budget 150 "$BENCH_RESERVE")
ARGS=(tests -q -k cuda --ignore=tests/test_cuda.py --maxfail=30 "${PYTEST_COMMON[@]}" "${XDIST[@]}")
((HAVE_TIMEOUT)) && ARGS+=(--timeout=90)
# Stop cleanly (with a report) before the hard timeout.
((HAVE_TIMEOUT && SESSION_TIMEOUT && T > 40)) && ARGS+=(--session-timeout=$((T - 25)))
stage test-suite "$T" "$RESULTS/test_suite.log" $PY -m pytest "${ARGS[@]}"
if [[ -n $CPU_PID ]]; then
  wait "$CPU_PID"
  CPU_RC=$(sed -n 's/^--- test-cpu: rc=//p' "$RESULTS/test_cpu.log" | tail -1)
  STAGES+=("test-cpu ${CPU_RC:-?} -")
fi

# ---------------------------------------------------------------- benchmarks
# --budget: the harness starts no row after it, so a late start costs the
# last rows, never the target rows (the first two).
T=$(budget 300 "$CPU_BENCH_SECONDS" 90)
# shellcheck disable=SC2086
stage bench "$T" "$RESULTS/bench_cuda.log" "${BENCH[@]}" --device cuda --json "$RESULTS/bench_cuda.json" \
  --max-time 1 --budget $((T > 120 ? T - 50 : T / 2)) ${GPU_CHECK_BENCH_ARGS:-}

# The CPU benchmark on the host's cores at 1 and 2 threads, when asked for
# (GPU_CHECK_CPU_BENCH_SECONDS > 0): the CPU targets (benchmarks/README.md)
# are set for a 2-core AVX512 machine, which the GPU host may stand in for.
if ((CPU_BENCH_SECONDS > 0)); then
  stage bench-cpu "$(budget 150 10)" "$RESULTS/bench_cpu.log" env OMP_NUM_THREADS=2 "${BENCH[@]}" --quick \
    --threads 1,2 --max-time 2
fi

# The same small shapes with the CUDA target check off (no host sync per
# forward), to size what the sync costs (benchmarks/NOTES.md). Only if time is left.
T=$(budget 90 10)
stage bench-nocheck "$T" "$RESULTS/bench_nocheck.log" env XENT_EXT_CUDA_TARGET_CHECK=0 "${BENCH[@]}" \
  --device cuda --shapes 8x256000,16x21x128x128,65536x1000,4096x32000:bf16 --no-compile --max-time 0.5 \
  --budget $((T > 40 ? T - 30 : 10))

# ---------------------------------------------------------------- digest
pytest_digest() {  # LOG: the counts line and the first failures
  local log=$1
  [[ -f $log ]] || { echo "  (no log)"; return; }
  grep -E '(passed|failed|error|skipped|no tests ran|deselected)' "$log" | grep -vE '^(FAILED|ERROR) ' | tail -1 | sed 's/^/  /'
  grep -E '^(FAILED|ERROR) ' "$log" | head -20 | cut -c1-240 | sed 's/^/  /'
  local n
  n=$(grep -cE '^(FAILED|ERROR) ' "$log")
  ((n > 20)) && echo "  ... $((n - 20)) more in $(basename "$log")"
  grep -E 'Timeout|session timeout|TIMED OUT' "$log" | head -3 | cut -c1-240 | sed 's/^/  /'
}

bench_summary() {  # LOG: the summary table and targets line
  sed -n '/^summary (copy bandwidth/,/^$/p' "$1" | cut -c1-300 | sed 's/^/  /'
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
  pytest_digest "$RESULTS/test_cuda.log"
  echo "suite, CUDA twins (-k cuda):"
  pytest_digest "$RESULTS/test_suite.log"
  echo "CPU tests (host ISA, beside the twins):"
  head -2 "$RESULTS/test_cpu.log" 2>/dev/null | cut -c1-240 | sed 's/^/  /'
  pytest_digest "$RESULTS/test_cpu.log"
  echo "benchmark:"
  local log=$RESULTS/bench_cuda.log
  if [[ -f $log ]]; then
    grep -E '^(GPU|torch|peers|copy):' "$log" | cut -c1-240 | sed 's/^/  /'
    if grep -q '^summary (copy bandwidth' "$log"; then
      bench_summary "$log"
    else  # stopped early: xent's line of each row done, the targets line if printed, the end of the log
      grep -E '^[0-9x]+ +(fp32|bf16|fp16) ' "$log" | cut -c1-200 | sed 's/^/  /'
      grep -E '^targets' "$log" | tail -1 | sed 's/^/  /'
      tail -6 "$log" | cut -c1-240 | sed 's/^/  /'
    fi
    sed -n '/^notes:/,/^$/p' "$log" | head -15 | cut -c1-240 | sed 's/^/  /'
    grep -E '^elapsed:' "$log" | sed 's/^/  /'
  fi
  if grep -qs '^summary (copy bandwidth' "$RESULTS/bench_nocheck.log"; then
    echo "benchmark, target check off:"
    bench_summary "$RESULTS/bench_nocheck.log"
  fi
  if [[ -f $RESULTS/bench_cpu.log ]]; then
    echo "CPU benchmark (host cores; the ISA line says whether AVX512):"
    grep -E '^(CPU|ISA):' "$RESULTS/bench_cpu.log" | sed 's/^/  /'
    grep -E '^[0-9x]+ +(fp32|bf16|fp16) ' "$RESULTS/bench_cpu.log" | cut -c1-200 | sed 's/^/  /'
    sed -n '/^targets/,$p' "$RESULTS/bench_cpu.log" | head -20 | cut -c1-240 | sed 's/^/  /'
  fi
  echo
  printf '%-14s %5s %8s\n' stage rc seconds
  local s
  for s in "${STAGES[@]}"; do
    # shellcheck disable=SC2086
    printf '%-14s %5s %8s\n' $s
  done
  echo "total: $(($(now) - START))s (deadline ${TOTAL}s); files in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
}
digest 2>&1 | tee "$RESULTS/summary.txt"

FAILED=0
for s in "${STAGES[@]}"; do
  # shellcheck disable=SC2086
  set -- $s
  [[ $2 == 0 || $2 == skip ]] || FAILED=1
done
exit $FAILED
