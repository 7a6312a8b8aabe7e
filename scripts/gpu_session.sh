#!/usr/bin/env bash
# A whole lent-GPU session in one device call: scripts/gpu_check.sh (build,
# CUDA tests, GPU benchmark), then scripts/gpu_tune.sh (launch-shape variants
# of the row kernels, timed side by side) with the time that is left.
#
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# The two scripts write more files than the device tool brings back (8), so
# they write under /tmp/gpu_session and this script returns five: the two
# digests (summary.txt, tune_summary.txt), the two benchmark JSONs
# (bench_cuda.json, tune.json) and every log in logs.tar.gz.
#
# Knobs: GPU_SESSION_SECONDS (overall, default 585), GPU_SESSION_CHECK_SECONDS
# (gpu_check.sh's part, default 420); gpu_check.sh's and gpu_tune.sh's own
# knobs pass through. The CPU tests and CPU benchmark are off by default here
# (GPU_CHECK_CPU_XDIST=0, GPU_CHECK_CPU_BENCH_SECONDS=0): sessions' own
# machines now have AVX512 (benchmarks/README.md), and the tuning needs the time.

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
TOTAL=${GPU_SESSION_SECONDS:-585}
FINAL_OUT=${OUT:-/tmp/gpu_session_out}
WORK=/tmp/gpu_session
rm -rf "$WORK" && mkdir -p "$WORK/check" "$WORK/tune" "$FINAL_OUT"

OUT=$WORK/check GPU_CHECK_SECONDS=${GPU_SESSION_CHECK_SECONDS:-420} \
  GPU_CHECK_CPU_XDIST=${GPU_CHECK_CPU_XDIST:-0} GPU_CHECK_CPU_BENCH_SECONDS=${GPU_CHECK_CPU_BENCH_SECONDS:-0} \
  GPU_CHECK_BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE:-130} bash scripts/gpu_check.sh
CHECK_RC=$?

LEFT=$((START + TOTAL - $(date +%s) - 10))
echo
echo "=== gpu_session: gpu_check.sh rc=$CHECK_RC; ${LEFT}s left for gpu_tune.sh"
TUNE_RC=skipped
if compgen -G "xent_ext/_C*.so" >/dev/null && ((LEFT >= 90)); then
  OUT=$WORK/tune GPU_TUNE_SECONDS=$LEFT GPU_TUNE_REUSE_BUILD=1 \
    GPU_TUNE_SHAPES=${GPU_TUNE_SHAPES:-8192x128256:bf16,8192x50257:fp32,4096x32000:bf16} \
    GPU_TUNE_VARIANTS=${GPU_TUNE_VARIANTS:-"base=;u2b8=-DXENT_CUDA_UNROLL_2B=8;t1024u4=-DXENT_CUDA_BLOCK_THREADS=1024 -DXENT_CUDA_BLOCK_MIN_BLOCKS=1 -DXENT_CUDA_BLOCK_GRID_PER_SM=1 -DXENT_CUDA_UNROLL_4B=8"} \
    bash scripts/gpu_tune.sh
  TUNE_RC=$?
fi

for f in check/summary.txt check/bench_cuda.json tune/tune_summary.txt tune/tune.json; do
  [[ -f $WORK/$f ]] && cp "$WORK/$f" "$FINAL_OUT/"
done
tar -C "$WORK" -czf "$FINAL_OUT/logs.tar.gz" check tune
echo
echo "=== gpu_session: check rc=$CHECK_RC, tune rc=$TUNE_RC, $(($(date +%s) - START))s; returned: $(ls "$FINAL_OUT" | tr '\n' ' ')"
[[ -f $WORK/check/summary.txt ]] && tail -n 60 "$WORK/check/summary.txt"
[[ -f $WORK/tune/tune_summary.txt ]] && cat "$WORK/tune/tune_summary.txt"
[[ $CHECK_RC == 0 ]]
