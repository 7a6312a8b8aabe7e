// CUDA kernels for cross-entropy: forward (row statistics, loss, lse, and the
// gradient when asked) and backward, for class-index and probability targets.
//
// The math is csrc/common/xent_math.h, shared with the CPU kernels; this file
// only moves data. No torch header here (Note [Lean CUDA translation unit]).
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
// Note [Deterministic reduction on the GPU]
// 'mean' and 'sum' never use atomics: per-row values are written to a buffer,
// summed in fixed tiles of kReduceTile rows (one block each, a fixed tree in
// double), then the tile sums by one block, again a fixed tree. Neither the
// grid size nor the GPU changes the order, so results are bitwise
// reproducible, and the loss needs no host sync (CUDA-graph capturable).
//
// Note [No FMA contraction on the GPU]
// The same gradient is computed by two kernels: the fused forward (for an
// upstream gradient of 1) and the backward (a retain_graph second backward,
// double backward, or a recompute under graph capture). With nvcc's default
// --fmad=true each kernel may contract a*b - c*d into an FMA differently (which
// product is fused depends on scheduling), so the two gradients differed in
// the last bit: torch.autograd.gradcheck's reentrancy check failed on an H200
// for fp64 with label smoothing. This file is built with --fmad=false (setup.py,
// CMakeLists.txt): every product and sum rounds as written, in both kernels,
// as in the CPU build (Note [No FMA contraction on the CPU], setup.py). The
// cost is one more instruction for some mul-adds of a memory-bound kernel; the
// math library's own explicit fma() calls (exp, log) are unaffected.
//
// Note [Bad targets on the GPU]
// A class index outside [0, C) (and not ignore_index) never triggers a
// device-side assert, which would leave the process's CUDA context unusable.
// The first such row is recorded with atomicMin in a device flag (the
// wrapper may check it with one host sync and raise torch's IndexError), and
// the row computes NaN: its loss, lse and gradient are NaN, and so is the
// weighted-mean denominator. Nothing reads memory through a bad index.
#include "cuda/kernel_api.h"

#include "common/xent_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <limits>

namespace xent_ext {
namespace cuda {
namespace {

using math::RowStats;


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

template <typename T>
constexpr int kVecOf = 16 / sizeof(T);

// Note [Tuning knobs]
// The launch shape of the row kernels, as macros so that a GPU session can
// time variants without editing this file: build with, e.g.,
// NVCC_APPEND_FLAGS="-DXENT_CUDA_UNROLL_2B=4" (nvcc appends it; remove the
// object first so the build recompiles). scripts/gpu_tune.sh does that for a
// list of variants. The first GPU run (H200) read at half of copy bandwidth
// with the defaults below (benchmarks/NOTES.md). Timed on an H200
// (2026-12-04, benchmarks/results-gpu-h200.md): 4 packs per lane for 2-byte
// types (was 2) made the bf16 forward 13 % faster (52 -> 60 % of copy), 8 for
// 4-byte types gained nothing; 1024-thread blocks, one row per SM, and fewer
// launched blocks were all slower.
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
// bf16/fp16 forwards with label smoothing or probability targets (64-100
// bytes, not yet timed); warp and thread walks spill a few per-row values,
// outside the inner loops (-Xptxas -v). float64 kernels get 128 registers.
#define XENT_ROW_KERNEL_BOUNDS(walk, T)                                  \
  __launch_bounds__((walk) == Walk::kBlock ? kBlockThreads : 256,         \
                    sizeof(T) == 8 ? 1 : ((walk) == Walk::kBlock ? XENT_CUDA_BLOCK_MIN_BLOCKS : 4))

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
template <typename T, CoefMode kMode>
struct StatsStep {
  using A = math::acc_type<T>;
  const RowPtrs<T>& io;
  const Coefs<A, kMode>& coefs;
  RowStats<A> st;

  template <int kW, int kU>
  __device__ __forceinline__ void step(const int64_t (&idx)[kU], const bool (&valid)[kU]) {
    if (!valid[0]) {  // valid[] is a prefix: nothing in this step
      return;
    }
    A x[kU][kW];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
        load_pack<kW>(io.x, idx[u], io.sx, x[u]);
      }
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
// e * w_c * (x_c - lse). Loads of a step come first: the compiler cannot move
// them above the stores (it can't prove the gradient doesn't alias the logits).
template <typename T, CoefMode kMode>
struct GradStep {
  using A = math::acc_type<T>;
  const RowPtrs<T>& io;
  const Coefs<A, kMode>& coefs;
  math::GradCoefs<A> k;
  math::SplitLse<A> lse;
  int64_t y;  // -1: no one-hot term
  A e;        // target-gradient scale (probability targets)

  template <int kW, int kU>
  __device__ __forceinline__ void step(const int64_t (&idx)[kU], const bool (&valid)[kU]) {
    if (!valid[0]) {
      return;
    }
    A x[kU][kW];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
        load_pack<kW>(io.x, idx[u], io.sx, x[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (!valid[u]) {
        continue;
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
          A v = k.a * std::exp((x[u][i] - lse.hi) - lse.lo);
          if constexpr (kMode != CoefMode::kNone) {
            v = v - k.d * cf[i];
          }
          if (i == hit) {
            v = v - k.b;
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
          gt[i] = e * wc * ((x[u][i] - lse.hi) - lse.lo);
        }
        store_pack<kW>(io.gq, idx[u], io.sgq, gt);
      }
    }
  }
};

// An ignored row's gradient is exactly 0 when its lse is finite (every
// softmax value is then finite and is multiplied by 0; xent_math.h,
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

// ---------------------------------------------------------------------------
// Teams and their fixed-order reductions.

enum class Walk : int { kThread, kWarp, kBlock };

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

// ---------------------------------------------------------------------------
// Class-index targets.

template <typename A>
struct IndexTarget {
  int64_t y;
  bool ignored;
  bool bad;  // out of [0, C) and not ignored (Note [Bad targets on the GPU])
};

template <typename A>
__device__ __forceinline__ IndexTarget<A> index_target(const int64_t* t, int64_t tn, int64_t tk, int64_t n, int64_t k,
                                                       int64_t C, int64_t ignore_index) {
  const int64_t y = t[n * tn + k * tk];
  const bool ignored = y == ignore_index;
  return {y, ignored, !ignored && (y < 0 || y >= C)};
}

// The GradCoefs of an index-target row (xent_math.h), NaN for a bad target.
template <typename A>
__device__ __forceinline__ math::GradCoefs<A> index_row_coefs(const IndexTarget<A>& t, A grad_scaled, const A* w,
                                                              A weight_sum, A eps, int64_t C) {
  if (t.bad) {
    const A nan = quiet_nan<A>();
    return {nan, nan, nan};
  }
  const A w_y = (!t.ignored && w != nullptr) ? w[t.y] : A(1);
  return math::index_grad_coefs<A>(grad_scaled, !t.ignored, w_y, weight_sum, eps, C);
}

template <typename T, Walk kWalk, CoefMode kMode>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    index_forward_kernel(IndexForwardLaunch a) {
  using A = math::acc_type<T>;
  __shared__ RowStats<A> smem[33];
  const T* x = static_cast<const T*>(a.x.data);
  T* grad = static_cast<T*>(a.grad.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const bool smoothing = a.label_smoothing > 0;
  const bool reduce = a.reduction != kReductionNone;
  const A eps = static_cast<A>(a.label_smoothing);
  const A* w = static_cast<const A*>(a.weight);
  const Coefs<A, kMode> coefs{w, A(1), A(0)};
  // The fused gradient's upstream gradient is 1 / denominator (CPU kernel:
  // Note [Gradient in the forward]); scalars were written by the pre-pass.
  // The denominator rounded to A, as the total_weight output a recomputing
  // backward reads holds it (CPU kernel: Note [Recomputed equals fused]).
  const double denominator =
      a.reduction == kReductionMean ? static_cast<double>(static_cast<A>(a.scratch.scalars[0])) : 1.0;
  const A unit = static_cast<A>(1.0 / denominator);
  const A weight_sum = static_cast<A>(a.scratch.scalars[1]);
  A* row_nll = static_cast<A*>(a.scratch.row_nll);
  A* row_smooth = static_cast<A*>(a.scratch.row_smooth);
  T* loss = static_cast<T*>(a.loss);

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, nullptr,
                        grad != nullptr ? grad + n * a.grad.sn + k * a.grad.sk : nullptr, nullptr,
                        a.x.sc, 0, a.grad.sc, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    // Loaded before the walk so its latency hides behind it.
    const IndexTarget<A> t = index_target<A>(a.target, a.tn, a.tk, n, k, C, a.ignore_index);
    StatsStep<T, kMode> stats{io, coefs, empty_stats<A>()};
    walk_row(io, C, vectorize, team.lane, team.size, stats);
    const RowStats<A> st = team_reduce<kWalk>(stats.st, smem);

    // Note [One log per row] (xent_math.h).
    const double log_sum = math::row_log(static_cast<double>(st.sum_exp));
    const double lse = t.bad ? quiet_nan<double>() : math::log_sum_exp(st.ref, log_sum);
    if (team.leader()) {
      a.lse[r] = lse;
      A nll = A(0), smooth = A(0);  // torch selects: an ignored row is exactly 0
      if (t.bad) {
        nll = smooth = quiet_nan<A>();
      } else if (!t.ignored) {
        const A x_y = to_acc(io.x[t.y * a.x.sc]);
        const A w_y = w != nullptr ? w[t.y] : A(1);
        if (!reduce) {
          nll = math::index_row_loss(st, static_cast<A>(log_sum), x_y, w_y, eps, C, smoothing);
        } else {
          nll = math::index_row_nll(st, static_cast<A>(log_sum), x_y, w_y);
          smooth = smoothing ? math::index_row_smooth(st, static_cast<A>(log_sum)) : A(0);
        }
      }
      if (!reduce) {
        loss[r] = Store<T>::of(nll);
      } else {
        row_nll[r] = nll;
        if (smoothing) {
          row_smooth[r] = smooth;
        }
      }
    }
    if (grad != nullptr) {
      if (t.ignored && isfinite(lse)) {
        ZeroStep<T> z{io};
        walk_row(io, C, vectorize, team.lane, team.size, z);
      } else {
        GradStep<T, kMode> g{io, coefs, index_row_coefs<A>(t, unit, w, weight_sum, eps, C),
                             math::split_lse<A>(lse), (t.ignored || t.bad) ? int64_t(-1) : t.y, A(0)};
        walk_row(io, C, vectorize, team.lane, team.size, g);
      }
    }
  }
}

template <typename T, Walk kWalk, CoefMode kMode>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    index_backward_kernel(IndexBackwardLaunch a) {
  using A = math::acc_type<T>;
  const T* x = static_cast<const T*>(a.x.data);
  T* grad = static_cast<T*>(a.grad.data);
  const T* grad_loss = static_cast<const T*>(a.grad_loss);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const A eps = static_cast<A>(a.label_smoothing);
  const A* w = static_cast<const A*>(a.weight);
  const Coefs<A, kMode> coefs{w, A(1), A(0)};
  const A weight_sum = static_cast<A>(a.scalars[0]);
  // As the CPU kernel: the scalar upstream gradient times 1 / total_weight, in double.
  A scalar_grad = A(0);
  if (a.reduction != kReductionNone) {
    const double scale =
        a.reduction == kReductionMean ? 1.0 / static_cast<double>(*static_cast<const A*>(a.total_weight)) : 1.0;
    scalar_grad = static_cast<A>(static_cast<double>(to_acc(grad_loss[0])) * scale);
  }

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, nullptr, grad + n * a.grad.sn + k * a.grad.sk, nullptr,
                        a.x.sc, 0, a.grad.sc, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    const IndexTarget<A> t = index_target<A>(a.target, a.tn, a.tk, n, k, C, a.ignore_index);
    const A g_out = a.reduction == kReductionNone ? to_acc(grad_loss[n * a.gln + k * a.glk]) : scalar_grad;
    const double lse = a.lse[r];
    if (t.ignored && isfinite(lse)) {
      ZeroStep<T> z{io};
      walk_row(io, C, vectorize, team.lane, team.size, z);
      continue;
    }
    GradStep<T, kMode> g{io, coefs, index_row_coefs<A>(t, g_out, w, weight_sum, eps, C), math::split_lse<A>(lse),
                         (t.ignored || t.bad) ? int64_t(-1) : t.y, A(0)};
    walk_row(io, C, vectorize, team.lane, team.size, g);
  }
}

// ---------------------------------------------------------------------------
// Probability targets.

template <typename A>
__device__ __forceinline__ Coefs<A, CoefMode::kProb> prob_coefs(const A* w, double label_smoothing, int64_t C) {
  const math::SmoothedTarget<A> q = math::smoothed_target<A>(static_cast<A>(label_smoothing), C);
  return {w, q.scale, q.shift};
}

template <typename T, Walk kWalk, CoefMode kMode>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    prob_forward_kernel(ProbForwardLaunch a) {
  using A = math::acc_type<T>;
  __shared__ RowStats<A> smem[33];
  const T* x = static_cast<const T*>(a.x.data);
  const T* q = static_cast<const T*>(a.target.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const Coefs<A, kMode> coefs = prob_coefs<A>(static_cast<const A*>(a.weight), a.label_smoothing, C);
  A* coef_sum = static_cast<A*>(a.coef_sum);
  A* row_loss = static_cast<A*>(a.row_loss);
  T* loss = static_cast<T*>(a.loss);

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, q + n * a.target.sn + k * a.target.sk, nullptr, nullptr,
                        a.x.sc, a.target.sc, 0, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    StatsStep<T, kMode> stats{io, coefs, empty_stats<A>()};
    walk_row(io, C, vectorize, team.lane, team.size, stats);
    const RowStats<A> st = team_reduce<kWalk>(stats.st, smem);
    if (team.leader()) {
      const double log_sum = math::row_log(static_cast<double>(st.sum_exp));
      a.lse[r] = math::log_sum_exp(st.ref, log_sum);
      coef_sum[r] = st.coef_sum;
      const A l = math::prob_row_loss(st, static_cast<A>(log_sum));
      if (a.reduction == kReductionNone) {
        loss[r] = Store<T>::of(l);
      } else {
        row_loss[r] = l;
      }
    }
  }
}

template <typename T, Walk kWalk, CoefMode kMode>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    prob_backward_kernel(ProbBackwardLaunch a) {
  using A = math::acc_type<T>;
  const T* x = static_cast<const T*>(a.x.data);
  const T* q = static_cast<const T*>(a.target.data);
  T* gi = static_cast<T*>(a.grad_input.data);
  T* gt = static_cast<T*>(a.grad_target.data);
  const T* grad_loss = static_cast<const T*>(a.grad_loss);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const Coefs<A, kMode> coefs = prob_coefs<A>(static_cast<const A*>(a.weight), a.label_smoothing, C);
  const A* coef_sum = static_cast<const A*>(a.coef_sum);
  // torch's mean divides by the number of rows.
  A scalar_grad = A(0);
  if (a.reduction != kReductionNone) {
    const double scale = a.reduction == kReductionMean ? 1.0 / static_cast<double>(R) : 1.0;
    scalar_grad = static_cast<A>(static_cast<double>(to_acc(grad_loss[0])) * scale);
  }

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, q + n * a.target.sn + k * a.target.sk,
                        gi != nullptr ? gi + n * a.grad_input.sn + k * a.grad_input.sk : nullptr,
                        gt != nullptr ? gt + n * a.grad_target.sn + k * a.grad_target.sk : nullptr,
                        a.x.sc, a.target.sc, a.grad_input.sc, a.grad_target.sc};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    const A s = a.reduction == kReductionNone ? to_acc(grad_loss[n * a.gln + k * a.glk]) : scalar_grad;
    // grad_c = s (p_c Σ w q - w_c q_c): a = s Σ w q, b = 0, d = s.
    GradStep<T, kMode> g{io, coefs, {s * coef_sum[r], A(0), s}, math::split_lse<A>(a.lse[r]), int64_t(-1),
                  -s * coefs.q_scale};
    walk_row(io, C, vectorize, team.lane, team.size, g);
  }
}

// ---------------------------------------------------------------------------
// Reductions (Note [Deterministic reduction on the GPU]).

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

// The weight of each row's target (0 if ignored), for the weighted mean's
// denominator; records the first bad target.
template <typename A>
struct RowWeights {
  const int64_t* target;
  int64_t tn, tk, K, C, ignore_index;
  const A* w;
  int64_t* bad_row;

  __device__ void operator()(int64_t r, double (&acc)[1]) const {
    const IndexTarget<A> t = index_target<A>(target, tn, tk, r / K, r % K, C, ignore_index);
    if (t.ignored) {
      return;
    }
    if (t.bad) {
      atomicMin(reinterpret_cast<unsigned long long*>(bad_row), static_cast<unsigned long long>(r));
      acc[0] += quiet_nan<double>();
      return;
    }
    acc[0] += w != nullptr ? static_cast<double>(w[t.y]) : 1.0;
  }
};

template <typename A>
struct StoreTotalWeight {
  A* total_weight;
  double* scalar;

  __device__ void operator()(const double (&totals)[1]) const {
    *scalar = totals[0];
    *total_weight = static_cast<A>(totals[0]);
  }
};

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

// The reduced loss with class indices, in torch's order (xent_math.h).
template <typename T, int kN>
struct IndexLoss {
  T* loss;
  const double* total_weight;
  int64_t reduction;
  double label_smoothing;
  int64_t C;

  __device__ void operator()(const double (&totals)[kN]) const {
    const double denominator = reduction == kReductionMean ? *total_weight : 1.0;
    double value = totals[0] / denominator;
    if constexpr (kN == 2) {
      value = math::reduced_smoothed_loss(totals[0], totals[1], denominator, label_smoothing, C);
    }
    *loss = Store<T>::of(value);
  }
};

template <typename T>
struct ProbLoss {
  T* loss;
  double denominator;

  __device__ void operator()(const double (&totals)[1]) const {
    *loss = Store<T>::of(totals[0] / denominator);
  }
};

// ---------------------------------------------------------------------------
// Launching.

int multiprocessors() {
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
Walk choose_walk(int64_t C, bool unit_class_strides) {
  if (!unit_class_strides || C <= 16) {
    return Walk::kThread;
  }
  return C <= 4096 ? Walk::kWarp : Walk::kBlock;
}

struct Grid {
  unsigned blocks;
  unsigned threads;
};

Grid grid_for(Walk walk, int64_t R) {
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

// Launches KERNEL<T, walk, MODE> over R rows.
#define XENT_LAUNCH_ROWS(KERNEL, T, MODE, WALK, R, STREAM, ARGS)                              \
  do {                                                                                        \
    const Grid grid_ = grid_for(WALK, R);                                                     \
    switch (WALK) {                                                                           \
      case Walk::kThread:                                                                     \
        KERNEL<T, Walk::kThread, MODE><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);     \
        break;                                                                                \
      case Walk::kWarp:                                                                       \
        KERNEL<T, Walk::kWarp, MODE><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);       \
        break;                                                                                \
      default:                                                                                \
        KERNEL<T, Walk::kBlock, MODE><<<grid_.blocks, grid_.threads, 0, STREAM>>>(ARGS);      \
        break;                                                                                \
    }                                                                                         \
  } while (0)

// Index kernels come in two modes: with label smoothing (coefficients) or without.
#define XENT_LAUNCH_INDEX_ROWS(KERNEL, T, SMOOTHING, WALK, R, STREAM, ARGS)       \
  do {                                                                            \
    if (SMOOTHING) {                                                              \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kIndex, WALK, R, STREAM, ARGS);       \
    } else {                                                                      \
      XENT_LAUNCH_ROWS(KERNEL, T, CoefMode::kNone, WALK, R, STREAM, ARGS);        \
    }                                                                             \
  } while (0)

}  // namespace

cudaError_t launch_index_forward(const IndexForwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = math::acc_type<T>;
    const int64_t R = a.x.N * a.x.K;
    const int64_t tiles = reduce_tiles(R);
    cudaError_t err;
    // Pre-pass: Σ w[y] (the weighted mean's denominator, also needed by the
    // fused gradient) and the bad-target flag; Σ_c w_c for smoothing.
    const RowWeights<A> row_weights{a.target, a.tn, a.tk, a.x.K, a.x.C, a.ignore_index,
                                    static_cast<const A*>(a.weight), a.bad_row};
    sum_tiles_kernel<1><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(row_weights, R, a.scratch.partials);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    finish_kernel<1><<<1, kReduceThreads, 0, stream>>>(
        a.scratch.partials, tiles, StoreTotalWeight<A>{static_cast<A*>(a.total_weight), a.scratch.scalars});
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    weight_sum_kernel<A><<<1, kReduceThreads, 0, stream>>>(static_cast<const A*>(a.weight), a.x.C, a.scratch.scalars + 1);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    if (R > 0) {
      const bool unit = a.x.sc == 1 && (a.grad.data == nullptr || a.grad.sc == 1);
      XENT_LAUNCH_INDEX_ROWS(index_forward_kernel, T, a.label_smoothing > 0, choose_walk(a.x.C, unit), R, stream, a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (a.reduction == kReductionNone) {
      return cudaSuccess;
    }
    const A* nll = static_cast<const A*>(a.scratch.row_nll);
    if (a.label_smoothing > 0) {
      sum_tiles_kernel<2><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(
          RowValues<A, 2>{{nll, static_cast<const A*>(a.scratch.row_smooth)}}, R, a.scratch.partials);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      finish_kernel<2><<<1, kReduceThreads, 0, stream>>>(
          a.scratch.partials, tiles,
          IndexLoss<T, 2>{static_cast<T*>(a.loss), a.scratch.scalars, a.reduction, a.label_smoothing, a.x.C});
    } else {
      sum_tiles_kernel<1><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(
          RowValues<A, 1>{{nll}}, R, a.scratch.partials);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      finish_kernel<1><<<1, kReduceThreads, 0, stream>>>(
          a.scratch.partials, tiles,
          IndexLoss<T, 1>{static_cast<T*>(a.loss), a.scratch.scalars, a.reduction, a.label_smoothing, a.x.C});
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_index_backward(const IndexBackwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = math::acc_type<T>;
    const int64_t R = a.x.N * a.x.K;
    cudaError_t err;
    weight_sum_kernel<A><<<1, kReduceThreads, 0, stream>>>(static_cast<const A*>(a.weight), a.x.C, a.scalars);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (R > 0) {
      const bool unit = a.x.sc == 1 && a.grad.sc == 1;
      XENT_LAUNCH_INDEX_ROWS(index_backward_kernel, T, a.label_smoothing > 0, choose_walk(a.x.C, unit), R, stream, a);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_prob_forward(const ProbForwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = math::acc_type<T>;
    const int64_t R = a.x.N * a.x.K;
    cudaError_t err;
    if (R > 0) {
      const bool unit = a.x.sc == 1 && a.target.sc == 1;
      XENT_LAUNCH_ROWS(prob_forward_kernel, T, CoefMode::kProb, choose_walk(a.x.C, unit), R, stream, a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (a.reduction == kReductionNone) {
      return cudaSuccess;
    }
    const int64_t tiles = reduce_tiles(R);
    sum_tiles_kernel<1><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(
        RowValues<A, 1>{{static_cast<const A*>(a.row_loss)}}, R, a.partials);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    // torch's mean divides by the number of rows N * d1 * ... * dk (0/0 = nan for none).
    const double denominator = a.reduction == kReductionMean ? static_cast<double>(R) : 1.0;
    finish_kernel<1><<<1, kReduceThreads, 0, stream>>>(a.partials, tiles,
                                                       ProbLoss<T>{static_cast<T*>(a.loss), denominator});
    return cudaGetLastError();
  });
}

cudaError_t launch_prob_backward(const ProbBackwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const int64_t R = a.x.N * a.x.K;
    if (R > 0) {
      const bool unit = a.x.sc == 1 && a.target.sc == 1 && (a.grad_input.data == nullptr || a.grad_input.sc == 1) &&
                        (a.grad_target.data == nullptr || a.grad_target.sc == 1);
      XENT_LAUNCH_ROWS(prob_backward_kernel, T, CoefMode::kProb, choose_walk(a.x.C, unit), R, stream, a);
    }
    return cudaGetLastError();
  });
}

// The architectures this file was compiled for (nvcc's __CUDA_ARCH_LIST__,
// e.g. "800,900"), for build_info().
const char* compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define XENT_STR_(...) #__VA_ARGS__
#define XENT_STR(...) XENT_STR_(__VA_ARGS__)
  return XENT_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int runtime_version_built() {
  return CUDART_VERSION;
}

}  // namespace cuda
}  // namespace xent_ext
