#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, both in one go (scripts/gpu/README.md):
# check.sh (build, CUDA tests, GPU benchmark), then tune.sh (launch-shape
# variants of the row kernels, timed side by side) with the time that is left.
#
#   bash scripts/gpu/session.sh [RESULTS_DIR]   # default $GPU_RESULTS, GPU_RESULTS=gpu-results
#
# Results: RESULTS_DIR/check/ (check.sh's files, summary.txt its digest) and
# RESULTS_DIR/tune/ (tune.sh's, tune_summary.txt its table); both digests are
# printed again at the end.
#
# Knobs: GPU_SESSION_SECONDS (overall, default 585), GPU_SESSION_CHECK_SECONDS
# (check.sh's part, default 420); check.sh's and tune.sh's own knobs pass
# through. The CPU tests and the CPU benchmark are off by default here
# (GPU_CHECK_CPU_XDIST=0, GPU_CHECK_CPU_BENCH_SECONDS=0): the tuning needs the
# time.

set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd) || exit 2
START=$(date +%s)
TOTAL=${GPU_SESSION_SECONDS:-585}
RESULTS=${1:-${GPU_RESULTS:-$HERE/../../gpu-results}}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2

GPU_CHECK_SECONDS=${GPU_SESSION_CHECK_SECONDS:-420} \
  GPU_CHECK_CPU_XDIST=${GPU_CHECK_CPU_XDIST:-0} GPU_CHECK_CPU_BENCH_SECONDS=${GPU_CHECK_CPU_BENCH_SECONDS:-0} \
  GPU_CHECK_BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-130} bash "$HERE/check.sh" "$RESULTS/check"
CHECK_RC=$?

LEFT=$((START + TOTAL - $(date +%s) - 10))
echo
echo "=== session: check.sh rc=$CHECK_RC; ${LEFT}s left for tune.sh"
TUNE_RC=skipped
if compgen -G "$HERE/../../xent_ext/_C*.so" >/dev/null && ((LEFT >= 90)); then
  GPU_TUNE_SECONDS=$LEFT GPU_TUNE_REUSE_BUILD=1 \
    GPU_TUNE_SHAPES=${GPU_TUNE_SHAPES:-8192x128256:bf16,8192x50257:fp32,4096x32000:bf16} \
    GPU_TUNE_VARIANTS=${GPU_TUNE_VARIANTS:-"base=;u2b8=-DXENT_CUDA_UNROLL_2B=8;t1024u4=-DXENT_CUDA_BLOCK_THREADS=1024 -DXENT_CUDA_BLOCK_MIN_BLOCKS=1 -DXENT_CUDA_BLOCK_GRID_PER_SM=1 -DXENT_CUDA_UNROLL_4B=8"} \
    bash "$HERE/tune.sh" "$RESULTS/tune"
  TUNE_RC=$?
fi

echo
echo "=== session: check rc=$CHECK_RC, tune rc=$TUNE_RC, $(($(date +%s) - START))s; results in $RESULTS"
[[ -f $RESULTS/check/summary.txt ]] && tail -n 60 "$RESULTS/check/summary.txt"
[[ $TUNE_RC != skipped && -f $RESULTS/tune/tune_summary.txt ]] && cat "$RESULTS/tune/tune_summary.txt"
[[ $CHECK_RC == 0 ]]
