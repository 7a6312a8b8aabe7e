// The launch shape of the row kernels: the tuning knobs, the team a row is
// walked by (Note [Row walks on the GPU], row_walk.cuh), the grid, and the
// macros that launch a kernel template for the walk and dtype chosen at run
// time. Included by kernels.cu only (no torch header).
#pragma once

#include "cuda/kernel_api.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace xent_ext {
namespace cuda {

enum class Walk : int { kThread, kWarp, kBlock };

// Note [Tuning knobs]
// The launch shape of the row kernels, as macros so that a tuning run can
// time variants without editing this file: build with, e.g.,
// NVCC_APPEND_FLAGS="-DXENT_CUDA_UNROLL_2B=4" (nvcc appends it; remove the
// object first so the build recompiles). scripts/gpu/tune.sh does that for a
// list of variants. The defaults below are the fastest variants timed
// (benchmarks/): more packs in flight per lane paid for 2-byte types but not
// for 4-byte ones; bigger blocks, one row per SM and fewer launched blocks
// did not pay.
#ifndef XENT_CUDA_UNROLL_2B
#define XENT_CUDA_UNROLL_2B 4  // 16-byte packs in flight per lane, 2-byte types
#endif
#ifndef XENT_CUDA_UNROLL_4B
#define XENT_CUDA_UNROLL_4B 4  // ... 4-byte types (8 for double is fixed)
#endif
#ifndef XENT_CUDA_BLOCK_THREADS
#define XENT_CUDA_BLOCK_THREADS 512  // block walk: threads per row (<= 1024)
#endif
#ifndef XENT_CUDA_BLOCK_MIN_BLOCKS
#define XENT_CUDA_BLOCK_MIN_BLOCKS 2  // block walk: resident blocks per SM asked of ptxas
#endif
#ifndef XENT_CUDA_BLOCK_GRID_PER_SM
#define XENT_CUDA_BLOCK_GRID_PER_SM 4  // block walk: blocks launched per SM (grid-stride over rows)
#endif

// 16-byte packs in flight per lane: 32 logits per step for 2-byte types, 16
// for 4-byte ones, 8 for double (Note [Registers and occupancy]).
template <typename T>
constexpr int kUnrollVectorOf = sizeof(T) == 2 ? XENT_CUDA_UNROLL_2B : (sizeof(T) == 4 ? XENT_CUDA_UNROLL_4B : 4);
constexpr int kUnrollScalar = 8;  // scalar loads in flight per lane
constexpr int kBlockThreads = XENT_CUDA_BLOCK_THREADS;
static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "the block walk reduces through smem[33]");
constexpr int kWarpBlockThreads = 256;
constexpr int kThreadBlockThreads = 256;
constexpr int kReduceThreads = 256;

// Note [Registers and occupancy]
// Row kernels are memory-bound: what matters is bytes in flight per SM, i.e.
// resident warps times loads per lane. Capping registers at 64 per thread
// (1024 resident threads per SM, 2 blocks of 512 or 4 of 256) keeps enough
// warps to cover DRAM latency. The block walks (the vocabulary-sized rows)
// fit without spilling, except, with 4 packs per lane for 2-byte types, the
// bf16/fp16 forwards with label smoothing or probability targets (a few
// values, not yet timed); warp and thread walks spill a few per-row values,
// outside the inner loops (-Xptxas -v). The kernels with a logit map (Note
// [Logit map on the GPU], row_walk.cuh) carry its tanh and slope too and
// spill more, about 100 bytes in the bf16/fp16 block walks (not yet timed;
// scripts/gpu/tune.sh prints them apart). float64 kernels get 128 registers.
#define XENT_ROW_KERNEL_BOUNDS(walk, T)                                  \
  __launch_bounds__((walk) == Walk::kBlock ? kBlockThreads : 256,         \
                    sizeof(T) == 8 ? 1 : ((walk) == Walk::kBlock ? XENT_CUDA_BLOCK_MIN_BLOCKS : 4))

inline int multiprocessors() {
  int device = 0;
  cudaGetDevice(&device);
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) {
    return 132;
  }
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      cudaGetLastError();  // clear it: the count is only a sizing hint
      sms = 132;
    }
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Unit class strides for everything the row touches allow team walks.
inline Walk choose_walk(int64_t C, bool unit_class_strides) {
  if (!unit_class_strides || C <= 16) {
    return Walk::kThread;
  }
  return C <= 4096 ? Walk::kWarp : Walk::kBlock;
}

struct Grid {
  unsigned blocks;
  unsigned threads;
};

inline Grid grid_for(Walk walk, int64_t R) {
  const int64_t sms = multiprocessors();
  int64_t threads, rows_per_block, max_blocks;
  switch (walk) {
    case Walk::kThread:
      threads = kThreadBlockThreads;
      rows_per_block = threads;
      max_blocks = sms * 8;
      break;
    case Walk::kWarp:
      threads = kWarpBlockThreads;
      rows_per_block = threads / 32;
      max_blocks = sms * 8;
      break;
    default:
      threads = kBlockThreads;
      rows_per_block = 1;
      max_blocks = sms * XENT_CUDA_BLOCK_GRID_PER_SM;
      break;
  }
  int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  blocks = blocks < max_blocks ? blocks : max_blocks;
  return {static_cast<unsigned>(blocks < 1 ? 1 : blocks), static_cast<unsigned>(threads)};
}

template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kDouble:
      return fn(double{});
    case Dtype::kFloat:
      return fn(float{});
    case Dtype::kBFloat16:
      return fn(__nv_bfloat16{});
    case Dtype::kHalf:
      return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

// Launches KERNEL<T, walk, MODE, MAP> over R rows.
#define XENT_LAUNCH_ROWS(KERNEL, T, MODE, MAP, WALK, R, STREAM, ARGS)                             \
  do {                                                                                           \
    const Grid grid_ = grid_for(WALK, R);                                                        \
    switch (WALK) {                                                                              \
      case Walk::kThread:                                                                        \
        KERNEL<T, Walk::kThread, MODE, MAP><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);   \
        break;                                                                                   \
      case Walk::kWarp:                                                                          \
        KERNEL<T, Walk::kWarp, MODE, MAP><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);     \
        break;                                                                                   \
      default:                                                                                   \
        KERNEL<T, Walk::kBlock, MODE, MAP><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);    \
        break;                                                                                   \
    }                                                                                            \
  } while (0)

// Index kernels come in three variants: without label smoothing (no
// coefficients), with it, and with a logit map, which serves both (Note
// [Logit map on the GPU], row_walk.cuh).
#define XENT_LAUNCH_INDEX_ROWS(KERNEL, T, SMOOTHING, MAP, WALK, R, STREAM, ARGS)  \
  do {                                                                           \
    if (MAP) {                                                                   \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kIndex, true, WALK, R, STREAM, ARGS);  \
    } else if (SMOOTHING) {                                                      \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kIndex, false, WALK, R, STREAM, ARGS); \
    } else {                                                                     \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kNone, false, WALK, R, STREAM, ARGS);  \
    }                                                                            \
  } while (0)

// Probability kernels: with a logit map or without.
#define XENT_LAUNCH_PROB_ROWS(KERNEL, T, MAP, WALK, R, STREAM, ARGS)             \
  do {                                                                          \
    if (MAP) {                                                                  \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kProb, true, WALK, R, STREAM, ARGS);  \
    } else {                                                                    \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kProb, false, WALK, R, STREAM, ARGS); \
    }                                                                           \
  } while (0)

}  // namespace cuda
}  // namespace xent_ext
