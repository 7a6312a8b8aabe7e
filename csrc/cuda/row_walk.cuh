// Walking a row of the logits with a team of lanes, and what a walk does
// at each step: fold the logits into row statistics, write the gradient, or
// write zeros. Included by kernels.cu only (no torch header).
//
// Note [Row walks on the GPU]
// A row is the C logits of one (n, k). Three ways to cover it, chosen per
// launch (choose_walk):
//   kThread  one thread per row. For small C (<= 16) and for any class stride
//            other than 1 (NCHW: adjacent threads own adjacent k, so their
//            loads coalesce).
//   kWarp    one warp per row, for 16 < C <= 4096 with unit class stride.
//   kBlock   one block (512 threads) per row, for long rows (vocabularies).
// Teams stride over rows (grid-stride loop), so any N works with a bounded
// grid. Inside a team, lanes take interleaved 16-byte packs (kUnroll packs in
// flight per lane) when every pointer of the row shares its 16-byte alignment,
// with a scalar head and tail; otherwise interleaved scalars. Each lane folds
// its packs into RowStats (one chunk max, one exp per logit, one merge per
// step) and the team merges lane results in a fixed tree, so the result is the
// same bitwise on every run.
//
// Note [Logit map on the GPU]
// logit_scale and softcap (Note [Logit scale, softcap and z-loss],
// xent_math.h) are a template flag, kMap, of the row kernels and of the
// steps below: with kMap each logit is mapped to z = map(x) in registers as
// it is loaded, and everything after (the chunk max, the exps, the
// coefficient dot, the softmax of the gradient, the target gradient) sees z;
// the input gradient, formed for z, is multiplied by map.slope(x) as it is
// stored. Without kMap the steps compile to the code they had before the map
// existed: the default call pays nothing. The map's tanh and its slope's tanh
// are one (Note [One tanh per logit], row_io.cuh). The mapped index kernels
// are instantiated in CoefMode::kIndex only (launch_shape.cuh,
// XENT_LAUNCH_INDEX_ROWS), smoothing or not, which keeps the extra kernels
// to half of the unmapped ones'.
#pragma once

#include "common/xent_math.h"
#include "cuda/launch_shape.cuh"
#include "cuda/row_io.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace xent_ext {
namespace cuda {

using math::RowStats;

// ---------------------------------------------------------------------------
// Walking a row: fn.step<kW, kU>(idx, valid) gets, per call, up to kU packs of
// kW elements starting at idx[u] (valid[u] false past the end). Lane `lane` of
// a team of `team` takes packs lane, lane + team, ... so a team's loads of one
// step are adjacent in memory.

template <int kW, int kU, typename Fn>
__device__ __forceinline__ void visit(int64_t begin, int64_t packs, int lane, int team, Fn& fn) {
  for (int64_t p0 = 0; p0 < packs; p0 += static_cast<int64_t>(team) * kU) {
    int64_t idx[kU];
    bool valid[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + static_cast<int64_t>(u) * team + lane;
      valid[u] = p < packs;
      idx[u] = begin + p * kW;
    }
    fn.template step<kW, kU>(idx, valid);
  }
}

template <typename T, typename Fn>
__device__ __forceinline__ void walk_row(const RowPtrs<T>& io, int64_t C, bool vectorize, int lane, int team, Fn& fn) {
  constexpr int kV = kVecOf<T>;
  if (!vectorize) {
    visit<1, kUnrollScalar>(0, C, lane, team, fn);
    return;
  }
  const int64_t head = vector_head(io.x, C);
  visit<1, 1>(0, head, lane, team, fn);
  const int64_t packs = (C - head) / kV;
  visit<kV, kUnrollVectorOf<T>>(head, packs, lane, team, fn);
  const int64_t done = head + packs * kV;
  visit<1, 1>(done, C - done, lane, team, fn);
}

// All of a step's logit packs, issued together so they are in flight at once.
template <int kW, int kU, typename T, typename A>
__device__ __forceinline__ void load_logits(const RowPtrs<T>& io, const int64_t (&idx)[kU], const bool (&valid)[kU],
                                            A (&x)[kU][kW]) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) {
      load_pack<kW>(io.x, idx[u], io.sx, x[u]);
    }
  }
}

// Folds a lane's share of a row into RowStats: per step, the chunk's max, then
// one exp per logit relative to it, then one merge (Note [Row statistics],
// Note [Rows of -inf]). All of a step's loads are issued before any math, so
// kU packs are in flight per lane.
//
// Note [NaN logits on the GPU]
// The chunk max ignores NaN (one FMNMX per logit instead of a NaN-propagating
// compare-and-select), so a NaN logit shows up as a NaN sum_exp instead; the
// chunk's ref is then set to NaN, which `merge` propagates to the whole row,
// as a NaN-propagating max would (a chunk of NaNs next to -inf must not pass
// for a chunk of -inf that adds no probability mass).
template <typename T, CoefMode kMode, bool kMap>
struct StatsStep {
  using A = math::acc_type<T>;
  const RowPtrs<T>& io;
  const Coefs<A, kMode>& coefs;
  const math::LogitMap<A>& map;
  RowStats<A> st;

  template <int kW, int kU>
  __device__ __forceinline__ void step(const int64_t (&idx)[kU], const bool (&valid)[kU]) {
    if (!valid[0]) {  // valid[] is a prefix: nothing in this step
      return;
    }
    A x[kU][kW];
    load_logits<kW, kU>(io, idx, valid, x);
    if constexpr (kMap) {  // from here on x holds z (Note [Logit map on the GPU])
      map_logits<kW, kU>(map, valid, x);
    }
    A m = math::neg_inf<A>();
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          m = fmax(m, x[u][i]);
        }
      }
    }
    const A shift = math::accumulation_shift(m);
    RowStats<A> chunk{m, A(0), A(0), A(0)};
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
        // Coefficients are loaded here, not with the logits, so only one
        // pack of them is live at a time (registers decide occupancy).
        A cf[kW];
        if constexpr (kMode != CoefMode::kNone) {
          load_coefs<kW>(coefs, io, idx[u], cf);
        }
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          const A d = x[u][i] - shift;
          chunk.sum_exp += std::exp(d);
          if constexpr (kMode != CoefMode::kNone) {
            chunk.coef_dot += cf[i] * d;
            chunk.coef_sum += cf[i];
          }
        }
      }
    }
    if (chunk.sum_exp != chunk.sum_exp) {  // Note [NaN logits on the GPU]
      chunk.ref = chunk.sum_exp;
    }
    math::merge(st, chunk);
  }
};

// Writes grad_c = a * softmax_c - d * coef_c - (c == y ? b : 0) (xent_math.h,
// GradCoefs) and, for probability targets, the target gradient
// e * w_c * log_softmax_c, both from the row max and log-sum kept apart (Note
// [Row max and log-sum apart], xent_math.h). With a logit map both are formed
// for z = map(x) and the input gradient is multiplied by dz/dx as it is stored
// (Note [Logit map on the GPU]).
//
// Loads of a step come first: the compiler cannot move them above the stores
// (it can't prove the gradient doesn't alias the logits). The gradient may be
// the logits themselves (Note [Gradient into the logits], kernels.cu): every
// element of a step is read, into registers, before any of the step's
// gradient is stored, and the lane that reads an element is the lane that
// writes its gradient; no later step reads it again.
template <typename T, CoefMode kMode, bool kMap>
struct GradStep {
  using A = math::acc_type<T>;
  const RowPtrs<T>& io;
  const Coefs<A, kMode>& coefs;
  const math::LogitMap<A>& map;
  math::GradCoefs<A> k;
  math::SoftmaxShift<A> shift;
  int64_t y;  // -1: no one-hot term
  A e;        // target-gradient scale (probability targets)

  template <int kW, int kU>
  __device__ __forceinline__ void step(const int64_t (&idx)[kU], const bool (&valid)[kU]) {
    if (!valid[0]) {
      return;
    }
    A x[kU][kW];
    load_logits<kW, kU>(io, idx, valid, x);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (!valid[u]) {
        continue;
      }
      // z and dz/dx of this pack (without a map, z is x and no slope is formed).
      A z[kW];
      A slope[kW];
      if constexpr (kMap) {
        map_pack<kW>(map, x[u], z, slope);
      } else {
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          z[i] = x[u][i];
        }
      }
      if (io.g != nullptr) {
        A cf[kW];
        if constexpr (kMode != CoefMode::kNone) {
          load_coefs<kW>(coefs, io, idx[u], cf);
        }
        // The target's position in this pack, if it is here (one 64-bit
        // compare per pack, not per logit).
        const int64_t off = y - idx[u];
        const int hit = (y >= 0 && off >= 0 && off < kW) ? static_cast<int>(off) : -1;
        A g[kW];
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          A v = k.a * std::exp(math::log_softmax(z[i], shift));
          if constexpr (kMode != CoefMode::kNone) {
            v = v - k.d * cf[i];
          }
          if (i == hit) {
            v = v - k.b;
          }
          if constexpr (kMap) {
            v = v * slope[i];
          }
          g[i] = v;
        }
        store_pack<kW>(io.g, idx[u], io.sg, g);
      }
      if (io.gq != nullptr) {
        A gt[kW];
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          const A wc = coefs.w != nullptr ? coefs.w[idx[u] + i] : A(1);
          gt[i] = e * wc * math::log_softmax(z[i], shift);
        }
        store_pack<kW>(io.gq, idx[u], io.sgq, gt);
      }
    }
  }
};

// An ignored row's gradient is exactly 0 when math::finite_softmax holds
// (every softmax value is then finite and is multiplied by 0; xent_math.h,
// GradCoefs): write zeros without reading the logits, as the CPU kernel does.
template <typename T>
struct ZeroStep {
  using A = math::acc_type<T>;
  const RowPtrs<T>& io;

  template <int kW, int kU>
  __device__ __forceinline__ void step(const int64_t (&idx)[kU], const bool (&valid)[kU]) {
    A z[kW];
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      z[i] = A(0);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
        store_pack<kW>(io.g, idx[u], io.sg, z);
      }
    }
  }
};

// Which rows a team owns, its lane and size.
template <Walk kWalk>
struct TeamRows {
  int64_t first, stride;
  int lane, size;

  __device__ TeamRows() {
    if constexpr (kWalk == Walk::kThread) {
      first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
      stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
      lane = 0;
      size = 1;
    } else if constexpr (kWalk == Walk::kWarp) {
      const int warps = blockDim.x >> 5;
      first = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
      stride = static_cast<int64_t>(gridDim.x) * warps;
      lane = threadIdx.x & 31;
      size = 32;
    } else {
      first = blockIdx.x;
      stride = gridDim.x;
      lane = threadIdx.x;
      size = blockDim.x;
    }
  }
  __device__ bool leader() const { return lane == 0; }
};

}  // namespace cuda
}  // namespace xent_ext
