// Fixed-order reductions: a row's statistics over its team (warp and block
// trees of math::merge, the online-softmax merge of xent_math.h), and the
// sums over rows behind 'mean' and 'sum'. Included by kernels.cu only (no
// torch header).
//
// Note [Deterministic reduction on the GPU]
// 'mean' and 'sum' never use atomics: per-row values are written to a buffer,
// summed in fixed tiles of kReduceTile rows (one block each, a fixed tree in
// double), then the tile sums by one block, again a fixed tree. Neither the
// grid size nor the GPU changes the order, so results are bitwise
// reproducible, and the loss needs no host sync (CUDA-graph capturable).
#pragma once

#include "common/xent_math.h"
#include "cuda/kernel_api.h"
#include "cuda/launch_shape.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace xent_ext {
namespace cuda {

using math::RowStats;

// ---------------------------------------------------------------------------
// A row's statistics over its team, merged in a fixed tree.

template <typename A>
__device__ __forceinline__ RowStats<A> empty_stats() {
  return {math::neg_inf<A>(), A(0), A(0), A(0)};
}

template <typename A>
__device__ __forceinline__ RowStats<A> warp_reduce(RowStats<A> s) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowStats<A> o;
    o.ref = __shfl_down_sync(0xffffffffu, s.ref, offset);
    o.sum_exp = __shfl_down_sync(0xffffffffu, s.sum_exp, offset);
    o.coef_dot = __shfl_down_sync(0xffffffffu, s.coef_dot, offset);
    o.coef_sum = __shfl_down_sync(0xffffffffu, s.coef_sum, offset);
    if (lane + offset < 32) {
      math::merge(s, o);
    }
  }
  return s;  // complete in lane 0
}

template <typename A>
__device__ __forceinline__ RowStats<A> warp_broadcast(const RowStats<A>& s) {
  return {__shfl_sync(0xffffffffu, s.ref, 0), __shfl_sync(0xffffffffu, s.sum_exp, 0),
          __shfl_sync(0xffffffffu, s.coef_dot, 0), __shfl_sync(0xffffffffu, s.coef_sum, 0)};
}

// The row's statistics, in every lane of the team. `smem` holds 33 entries
// (block teams only).
template <Walk kWalk, typename A>
__device__ __forceinline__ RowStats<A> team_reduce(RowStats<A> s, RowStats<A>* smem) {
  if constexpr (kWalk == Walk::kThread) {
    return s;
  } else if constexpr (kWalk == Walk::kWarp) {
    return warp_broadcast(warp_reduce(s));
  } else {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    s = warp_reduce(s);
    if (lane == 0) {
      smem[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      s = lane < warps ? smem[lane] : empty_stats<A>();
      s = warp_reduce(s);
      if (lane == 0) {
        smem[32] = s;
      }
    }
    __syncthreads();
    return smem[32];
  }
}

// ---------------------------------------------------------------------------
// Sums over rows (Note [Deterministic reduction on the GPU]).

// Sums each thread's kN values over the block in a fixed tree: smem[j][0]
// holds the total of value j afterwards, the same bits on every run.
template <int kN>
__device__ __forceinline__ void block_tree_sum(const double (&acc)[kN], double (*smem)[kReduceThreads]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    smem[j][threadIdx.x] = acc[j];
  }
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        smem[j][threadIdx.x] += smem[j][threadIdx.x + s];
      }
    }
    __syncthreads();
  }
}

// Sums kN values per row over rows [tile * kReduceTile, ...) into partials.
template <int kN, typename Values>
__global__ void __launch_bounds__(kReduceThreads) sum_tiles_kernel(Values values, int64_t R, double* partials) {
  __shared__ double smem[kN][kReduceThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kReduceTile;
  const int64_t end = begin + kReduceTile < R ? begin + kReduceTile : R;
  double acc[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    acc[j] = 0.0;
  }
  for (int64_t r = begin + threadIdx.x; r < end; r += kReduceThreads) {
    values(r, acc);
  }
  block_tree_sum<kN>(acc, smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      partials[static_cast<int64_t>(blockIdx.x) * kN + j] = smem[j][0];
    }
  }
}

// Sums the tile partials (one block) and hands the kN totals to `finish`.
template <int kN, typename Finish>
__global__ void __launch_bounds__(kReduceThreads) finish_kernel(const double* partials, int64_t tiles, Finish finish) {
  __shared__ double smem[kN][kReduceThreads];
  double acc[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    acc[j] = 0.0;
  }
  for (int64_t i = threadIdx.x; i < tiles; i += kReduceThreads) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      acc[j] += partials[i * kN + j];
    }
  }
  block_tree_sum<kN>(acc, smem);
  if (threadIdx.x == 0) {
    double totals[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      totals[j] = smem[j][0];
    }
    finish(totals);
  }
}

// Σ_c w_c in double (C without a weight), into *out; one block.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) weight_sum_kernel(const A* w, int64_t C, double* out) {
  __shared__ double smem[1][kReduceThreads];
  double acc[1] = {0.0};
  if (w != nullptr) {
    for (int64_t c = threadIdx.x; c < C; c += kReduceThreads) {
      acc[0] += static_cast<double>(w[c]);
    }
  }
  block_tree_sum<1>(acc, smem);
  if (threadIdx.x == 0) {
    *out = w != nullptr ? smem[0][0] : static_cast<double>(C);
  }
}

// Values for sum_tiles_kernel: kN per-row buffers of accumulation-type values.
template <typename A, int kN>
struct RowValues {
  const A* rows[kN];

  __device__ void operator()(int64_t r, double (&acc)[kN]) const {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      acc[j] += static_cast<double>(rows[j][r]);
    }
  }
};

}  // namespace cuda
}  // namespace xent_ext
