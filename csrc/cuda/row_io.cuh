// Reading and writing one row of the logits and its companions: conversions
// to and from the accumulation type, 16-byte vector packs, the row's
// pointers and its per-class coefficients. Included by kernels.cu only (no
// torch header).
#pragma once

#include "common/xent_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace xent_ext {
namespace cuda {

// ---------------------------------------------------------------------------
// Conversions.

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

// Round-to-nearest-even conversions, as torch's.
template <typename T>
struct Store;
template <>
struct Store<float> {
  template <typename A>
  __device__ static float of(A v) { return static_cast<float>(v); }
};
template <>
struct Store<double> {
  template <typename A>
  __device__ static double of(A v) { return static_cast<double>(v); }
};
template <>
struct Store<__nv_bfloat16> {
  template <typename A>
  __device__ static __nv_bfloat16 of(A v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};
template <>
struct Store<__half> {
  template <typename A>
  __device__ static __half of(A v) { return __float2half_rn(static_cast<float>(v)); }
};

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return std::numeric_limits<A>::quiet_NaN();
}

// Note [Loss dtype on the GPU]
// The loss is written in the input's dtype or, under autocast, in the
// accumulation dtype (fp32 for bf16/fp16 logits), straight from the
// accumulator: the logits are read as they are, never converted to an fp32
// copy. A backward's upstream gradient comes in either dtype too. Which one
// is a launch flag, not a template parameter: it touches one value per row,
// not the inner loops.
template <typename T>
__device__ __forceinline__ math::acc_type<T> load_row_value(const void* p, int64_t i, bool acc) {
  using A = math::acc_type<T>;
  if constexpr (std::is_same_v<T, A>) {  // fp32, fp64: one dtype either way
    return static_cast<const T*>(p)[i];
  }
  return acc ? static_cast<const A*>(p)[i] : to_acc(static_cast<const T*>(p)[i]);
}

template <typename T, typename V>
__device__ __forceinline__ void store_row_value(void* p, int64_t i, bool acc, V v) {
  using A = math::acc_type<T>;
  if (acc && !std::is_same_v<T, A>) {
    static_cast<A*>(p)[i] = static_cast<A>(v);
  } else {
    static_cast<T*>(p)[i] = Store<T>::of(v);
  }
}

// A row's saved statistics (Note [Row max and log-sum apart], xent_math.h)
// as the gradient reads them: row_stats is (2, R), the row max at [r] and the
// log-sum at [R + r] (kernel_api.h). The forward's own gradient takes the
// same two doubles as it stores them, so it equals a recomputing backward's
// to the bit.
struct SavedRow {
  double max;
  double log_sum;

  __device__ __forceinline__ SavedRow(const double* row_stats, int64_t R, int64_t r)
      : max(row_stats[r]), log_sum(row_stats[R + r]) {}
  __device__ __forceinline__ SavedRow(double m, double l) : max(m), log_sum(l) {}

  template <typename A>
  __device__ __forceinline__ math::SoftmaxShift<A> shift() const {
    return math::softmax_shift<A>(max, log_sum);
  }
  // Every softmax value of the row is finite (an ignored row's gradient is then 0).
  __device__ __forceinline__ bool finite() const { return math::finite_softmax(max, log_sum); }
};

// One logit as the math sees it: z = map(x) in a mapped kernel (Note [Logit
// map on the GPU], row_walk.cuh), x itself otherwise.
template <bool kMap, typename A>
__device__ __forceinline__ A mapped(const math::LogitMap<A>& map, A x) {
  if constexpr (kMap) {
    return map(x);
  } else {
    return x;
  }
}

// Note [One tanh per logit]
// With softcap on, z = cap * tanh(x * inner) and dz/dx = scale * (1 - t^2)
// take the same tanh (LogitMap, xent_math.h). Called one after the other,
// each behind LogitMap's own test of cap, the compiler forms that tanh twice;
// inside one branch on cap both tests fold away and it forms it once. So
// map_pack tests cap once per pack, and map_logits once per step rather than
// once per logit, each arm the same code (the branch is uniform: cap is the
// launch's).
template <int kW, typename A>
__device__ __forceinline__ void map_pack(const math::LogitMap<A>& map, const A (&x)[kW], A (&z)[kW], A (&slope)[kW]) {
  if (map.cap != A(0)) {
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      z[i] = map(x[i]);
      slope[i] = map.slope(x[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      z[i] = map(x[i]);
      slope[i] = map.slope(x[i]);
    }
  }
}

// Maps a step's valid packs of logits to z in place.
template <int kW, int kU, typename A>
__device__ __forceinline__ void map_logits(const math::LogitMap<A>& map, const bool (&valid)[kU], A (&x)[kU][kW]) {
  if (map.cap != A(0)) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          x[u][i] = map(x[u][i]);
        }
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          x[u][i] = map(x[u][i]);
        }
      }
    }
  }
}

// Elements in a 16-byte vector pack.
template <typename T>
constexpr int kVecOf = 16 / sizeof(T);

// ---------------------------------------------------------------------------
// Loads and stores of one pack: kW == 1 is a scalar at class stride `stride`;
// kW > 1 is a 16-byte vector at unit stride, 16-byte aligned.

template <int kW, typename T, typename A>
__device__ __forceinline__ void load_pack(const T* base, int64_t c, int64_t stride, A (&out)[kW]) {
  if constexpr (kW == 1) {
    out[0] = to_acc(base[c * stride]);
  } else {
    static_assert(kW * sizeof(T) == 16, "vector packs are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(base + c);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      out[i] = to_acc(v[i]);
    }
  }
}

template <int kW, typename T, typename A>
__device__ __forceinline__ void store_pack(T* base, int64_t c, int64_t stride, const A (&in)[kW]) {
  if constexpr (kW == 1) {
    base[c * stride] = Store<T>::of(in[0]);
  } else {
    uint4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      v[i] = Store<T>::of(in[i]);
    }
    // Streaming (evict-first) store: the gradient is not read again soon, and
    // it must not push out of L2 the logits the fused forward re-reads.
    __stcs(reinterpret_cast<uint4*>(base + c), raw);
  }
}

// ---------------------------------------------------------------------------
// One row's pointers and the per-class coefficients (Note [Row statistics]).

template <typename T>
struct RowPtrs {
  const T* x;   // logits
  const T* q;   // probability target, or nullptr
  T* g;         // input gradient, or nullptr
  T* gq;        // target gradient, or nullptr
  int64_t sx, sq, sg, sgq;  // class strides
};

enum class CoefMode : int {
  kNone,   // no label smoothing with class indices: no coefficients
  kIndex,  // label smoothing with class indices: coef_c = w_c (1 without weight)
  kProb,   // probability targets: coef_c = w_c q_c, q = t * q_scale + q_shift
};

// The mode is a template parameter: without coefficients (the common case,
// no label smoothing) the inner loops carry no coefficient code or registers.
template <typename A, CoefMode kMode>
struct Coefs {
  const A* w;  // nullptr: no class weight
  A q_scale;
  A q_shift;
};

template <int kW, typename T, typename A, CoefMode kMode>
__device__ __forceinline__ void load_coefs(const Coefs<A, kMode>& k, const RowPtrs<T>& io, int64_t c, A (&out)[kW]) {
  if constexpr (kMode == CoefMode::kProb) {
    load_pack<kW>(io.q, c, io.sq, out);
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      out[i] = out[i] * k.q_scale + k.q_shift;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      out[i] = A(1);
    }
  }
  if (k.w != nullptr) {
#pragma unroll
    for (int i = 0; i < kW; ++i) {
      out[i] *= k.w[c + i];
    }
  }
}

// Whether every pointer of the row shares the logits' 16-byte alignment, so
// all of them can use vector packs from the same element on.
template <typename T>
__device__ __forceinline__ bool same_alignment(const RowPtrs<T>& io) {
  const auto mis = [](const void* p) { return reinterpret_cast<uintptr_t>(p) & 15u; };
  const uintptr_t m = mis(io.x);
  return (io.q == nullptr || mis(io.q) == m) && (io.g == nullptr || mis(io.g) == m) &&
         (io.gq == nullptr || mis(io.gq) == m);
}

// Elements before the first 16-byte boundary of the logits.
template <typename T>
__device__ __forceinline__ int64_t vector_head(const T* x, int64_t C) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(x) & 15u;
  const int64_t head = mis == 0 ? 0 : static_cast<int64_t>((16u - mis) / sizeof(T));
  return head < C ? head : C;
}

}  // namespace cuda
}  // namespace xent_ext
