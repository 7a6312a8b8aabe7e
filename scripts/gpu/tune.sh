#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: time the CUDA row kernels' launch-shape
# variants (Note [Tuning knobs] in csrc/cuda/launch_shape.cuh) side by side
# (scripts/gpu/README.md).
#
#   bash scripts/gpu/tune.sh [RESULTS_DIR]   # default $GPU_RESULTS/tune, GPU_RESULTS=gpu-results
#
# For each variant (a set of -D flags, passed to nvcc through NVCC_APPEND_FLAGS)
# it recompiles the CUDA kernels only (the rest of the build is reused), prints
# ptxas's registers and spills of the block-walk kernels (without and with a
# logit map), and runs the GPU
# benchmark on the shapes that matter (no torch.compile; eager and the
# installed peers, such as Liger Kernel, are timed in every run, so each
# variant's ratios come from one process). It ends with one table: variant,
# shape, mode, xent µs, % of copy bandwidth, eager/xent, liger/xent.
#
# Files in RESULTS_DIR (a rerun replaces them): tune.log (everything),
# tune.json (every run's benchmark JSON, by variant), tune_summary.txt (the
# table). Record the outcome in benchmarks/NOTES.md, and make the winner the
# default in csrc/cuda/launch_shape.cuh.
#
# Knobs: GPU_TUNE_SECONDS (overall deadline, default 540), GPU_TUNE_SHAPES
# (default below), GPU_TUNE_VARIANTS (';'-separated "name=flags" list),
# GPU_TUNE_REUSE_BUILD (1: a first variant without flags uses the extension
# already built in place; session.sh sets it right after check.sh's build),
# PYTHON (python3), CUDA_HOME, MAX_JOBS.

set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd) || exit 2
RESULTS=${1:-${GPU_RESULTS:-$ROOT/gpu-results}/tune}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2
cd "$ROOT" || exit 2
rm -f "$RESULTS"/{tune.log,tune.json,tune_summary.txt}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_TUNE_SECONDS:-540}))
SHAPES=${GPU_TUNE_SHAPES:-8192x128256:bf16,4096x32000:bf16,8192x50257:fp32,65536x1000:fp32}
VARIANTS=${GPU_TUNE_VARIANTS:-"base=;u2b8=-DXENT_CUDA_UNROLL_2B=8;u4b8=-DXENT_CUDA_UNROLL_4B=8;grid1=-DXENT_CUDA_BLOCK_GRID_PER_SM=1;t1024u4=-DXENT_CUDA_BLOCK_THREADS=1024 -DXENT_CUDA_BLOCK_MIN_BLOCKS=1 -DXENT_CUDA_BLOCK_GRID_PER_SM=1 -DXENT_CUDA_UNROLL_4B=8"}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # benchmarks/run.py imports the in-place build
LOG=$RESULTS/tune.log
WORK=$(mktemp -d)  # each variant's build log and benchmark JSON
trap 'rm -rf "$WORK"' EXIT
# The system compiler: see check.sh (a CXX that links libstdc++ into the extension).
[[ -x /usr/bin/g++ && -x /usr/bin/gcc ]] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCH=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')" 2>/dev/null || echo 9.0)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee -a "$LOG"

IFS=';' read -r -a LIST <<<"$VARIANTS"
for v in "${LIST[@]}"; do
  name=${v%%=*}
  flags=${v#*=}
  left=$((DEADLINE - $(date +%s)))
  if ((left < 90)); then
    echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"
    continue
  fi
  echo "=== $name: NVCC_APPEND_FLAGS='$flags' ($(($(date +%s) - START))s since start)" | tee -a "$LOG"
  # Every variant is rebuilt (an earlier run's extension may be another
  # variant), except a first one without flags under GPU_TUNE_REUSE_BUILD=1.
  if [[ ${GPU_TUNE_REUSE_BUILD:-0} == 1 && -z $flags && $v == "${LIST[0]}" ]] &&
    compgen -G "xent_ext/_C*.so" >/dev/null; then
    echo "  the extension already built in place (no flags): not rebuilt" | tee -a "$LOG"
  else
    rm -f xent_ext/_C*.so build/temp.*/csrc/cuda/kernels.o
  fi
  if compgen -G "xent_ext/_C*.so" >/dev/null; then
    :
  elif ! NVCC_APPEND_FLAGS="$flags -Xptxas -v" TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout $((left - 60)) $PY setup.py build_ext --inplace >"$WORK/build_$name.log" 2>&1; then
    echo "build failed:" | tee -a "$LOG"
    grep -E "error" "$WORK/build_$name.log" | head -10 | tee -a "$LOG"
    continue
  fi
  # Registers and spills of the block-walk kernels (mangled names contain "WalkE2E": kBlock = 2),
  # without and with the logit map (the last template argument, "Lb0E" / "Lb1E").
  for map in 0 1; do
    grep -A3 -E "Compiling entry function '.*(index|prob)_(forward|backward)_kernel.*WalkE2E.*Lb${map}E" \
      "$WORK/build_$name.log" 2>/dev/null |
      grep -E "registers|spill" | sort | uniq -c | head -6 | sed "s/^/  ptxas (logit map $map): /" | tee -a "$LOG"
  done
  left=$((DEADLINE - $(date +%s)))
  timeout $((left > 30 ? left - 15 : 15)) $PY benchmarks/run.py --device cuda --shapes "$SHAPES" --no-compile \
    --max-time 0.5 --json "$WORK/$name.json" --budget $((left > 60 ? left - 45 : 10)) >>"$LOG" 2>&1
  echo "  bench rc=$?" | tee -a "$LOG"
done

$PY - "$WORK" "$RESULTS" "${LIST[@]}" <<'EOF' 2>&1 | tee "$RESULTS/tune_summary.txt"
import json, os, sys
work, out, variants = sys.argv[1], sys.argv[2], [v.split("=", 1)[0] for v in sys.argv[3:]]
runs = {}
for name in variants:
    path = os.path.join(work, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            runs[name] = json.load(f)
with open(os.path.join(out, "tune.json"), "w") as f:
    json.dump(runs, f)
print(f"{'variant':<11} {'shape':<14} {'dtype':<5} {'mode':<8} {'xent us':>9} {'%copy':>6} {'eager/x':>8} {'liger/x':>8}")
for name, run in runs.items():
    for row in run.get("rows", []):
        impls = row.get("impls", {})
        x = impls.get("xent", {})
        if not x.get("median_ms"):
            continue
        def ratio(peer):
            p = impls.get(peer, {})
            return f"{p['median_ms'] / x['median_ms']:.2f}" if p.get("median_ms") else "-"
        shape = "x".join(str(d) for d in row["shape"])
        print(f"{name:<11} {shape:<14} {row['dtype']:<5} {row['mode']:<8} {x['median_ms'] * 1e3:>9.0f} "
              f"{x.get('pct_of_copy') or 0:>6.1f} {ratio('eager'):>8} {ratio('liger'):>8}")
EOF
# Leave no variant behind: ninja does not see NVCC_APPEND_FLAGS, so a later
# build here would otherwise link the last variant's object.
rm -f xent_ext/_C*.so build/temp.*/csrc/cuda/kernels.o
echo "total: $(($(date +%s) - START))s"
