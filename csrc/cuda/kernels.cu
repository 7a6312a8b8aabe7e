// CUDA kernels for cross-entropy: forward (row statistics, loss, row_stats,
// and the gradient when asked) and backward, for class-index and probability
// targets.
//
// The math is csrc/common/xent_math.h, shared with the CPU kernels; this file
// only moves data. No torch header here (Note [Lean CUDA translation unit]).
//
// The pieces: row_io.cuh (loads, stores, coefficients), row_walk.cuh (how a
// team walks a row), reduce.cuh (fixed-order reductions), launch_shape.cuh
// (tuning knobs, grids, launch macros). The build flags, --fmad=false among
// them, are in csrc/build_flags.txt.
//
// Note [Bad targets on the GPU]
// A class index outside [0, C) (and not ignore_index) never triggers a
// device-side assert, which would leave the process's CUDA context unusable.
// The first such row is recorded with atomicMin in a device flag (the
// wrapper may check it with one host sync and raise torch's IndexError), and
// the row computes NaN: its loss, row_stats and gradient are NaN, and so is the
// weighted-mean denominator. Nothing reads memory through a bad index.
//
// Note [Gradient into the logits]
// The *_grad_into_ ops (ops_impl.h) pass the logits themselves as the
// gradient, so every kernel that writes an input gradient must read each
// logit before its gradient is written and never after. A row is walked by
// one team (a thread, a warp or a block; no row is split across blocks), and
// walk_row gives every element to the same lane in every walk of the row, so:
//   - the statistics walk only reads; the team's reduction (team_reduce)
//     completes before the gradient walk starts;
//   - the gradient walk (GradStep) reads a step's logits into registers
//     before it stores the step's gradient, lane by lane, and every element
//     is read and written by the same lane, once;
//   - the one logit read by another lane, the target logit the leader needs
//     for the loss, is read before the team's reduction, which orders it
//     before any lane's gradient store: __syncthreads for a block, the
//     __syncwarp before the gradient walk for a warp (shuffles alone do not
//     order memory), program order for a thread;
//   - an ignored row's zeros (ZeroStep) read nothing.
// Different rows never share memory (ops_common.h rejects overlapping
// logits). The probability op runs the target's gradient first, into its own
// tensor, then the input's into the logits (ops_impl.h); its kernel reads
// the target and the row statistics, never the logits of another row.
#include "cuda/kernel_api.h"

#include "common/xent_math.h"
#include "cuda/launch_shape.cuh"
#include "cuda/reduce.cuh"
#include "cuda/row_io.cuh"
#include "cuda/row_walk.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace xent_ext {
namespace cuda {
namespace {

using math::RowStats;

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
    // The target logit, read by the leader before the team's reduction, so
    // before any lane writes a gradient (Note [Gradient into the logits]).
    A x_y = A(0);
    if (team.leader() && !t.ignored && !t.bad) {
      x_y = to_acc(io.x[t.y * a.x.sc]);
    }
    const RowStats<A> st = team_reduce<kWalk>(stats.st, smem);

    // Note [One log per row] (xent_math.h).
    const double log_sum = math::row_log(static_cast<double>(st.sum_exp));
    // What the backward reads back (SavedRow, row_io.cuh).
    const SavedRow saved = t.bad ? SavedRow(quiet_nan<double>(), quiet_nan<double>())
                                 : SavedRow(static_cast<double>(st.ref), log_sum);
    if (team.leader()) {
      a.row_stats[r] = saved.max;
      a.row_stats[R + r] = saved.log_sum;
      A nll = A(0), smooth = A(0);  // torch selects: an ignored row is exactly 0
      if (t.bad) {
        nll = smooth = quiet_nan<A>();
      } else if (!t.ignored) {
        const A w_y = w != nullptr ? w[t.y] : A(1);
        if (!reduce) {
          nll = math::index_row_loss(st, static_cast<A>(log_sum), x_y, w_y, eps, C, smoothing);
        } else {
          nll = math::index_row_nll(st, static_cast<A>(log_sum), x_y, w_y);
          smooth = smoothing ? math::coef_row_loss(st, static_cast<A>(log_sum)) : A(0);
        }
      }
      if (!reduce) {
        store_row_value<T>(a.loss, r, a.loss_acc, nll);
      } else {
        row_nll[r] = nll;
        if (smoothing) {
          row_smooth[r] = smooth;
        }
      }
    }
    if (grad != nullptr) {
      if constexpr (kWalk == Walk::kWarp) {
        __syncwarp();  // Note [Gradient into the logits]: the leader's x_y read comes first
      }
      if (t.ignored && saved.finite()) {
        ZeroStep<T> z{io};
        walk_row(io, C, vectorize, team.lane, team.size, z);
      } else {
        GradStep<T, kMode> g{io, coefs, index_row_coefs<A>(t, unit, w, weight_sum, eps, C),
                             saved.shift<A>(), (t.ignored || t.bad) ? int64_t(-1) : t.y, A(0)};
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
    scalar_grad = static_cast<A>(static_cast<double>(load_row_value<T>(a.grad_loss, 0, a.grad_loss_acc)) * scale);
  }

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, nullptr, grad + n * a.grad.sn + k * a.grad.sk, nullptr,
                        a.x.sc, 0, a.grad.sc, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    const IndexTarget<A> t = index_target<A>(a.target, a.tn, a.tk, n, k, C, a.ignore_index);
    const A g_out = a.reduction == kReductionNone
                        ? load_row_value<T>(a.grad_loss, n * a.gln + k * a.glk, a.grad_loss_acc)
                        : scalar_grad;
    const SavedRow saved(a.row_stats, R, r);
    if (t.ignored && saved.finite()) {
      ZeroStep<T> z{io};
      walk_row(io, C, vectorize, team.lane, team.size, z);
      continue;
    }
    GradStep<T, kMode> g{io, coefs, index_row_coefs<A>(t, g_out, w, weight_sum, eps, C), saved.shift<A>(),
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
      a.row_stats[r] = static_cast<double>(st.ref);
      a.row_stats[R + r] = log_sum;
      coef_sum[r] = st.coef_sum;
      const A l = math::coef_row_loss(st, static_cast<A>(log_sum));
      if (a.reduction == kReductionNone) {
        store_row_value<T>(a.loss, r, a.loss_acc, l);
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
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const Coefs<A, kMode> coefs = prob_coefs<A>(static_cast<const A*>(a.weight), a.label_smoothing, C);
  const A* coef_sum = static_cast<const A*>(a.coef_sum);
  // torch's mean divides by the number of rows.
  A scalar_grad = A(0);
  if (a.reduction != kReductionNone) {
    const double scale = a.reduction == kReductionMean ? 1.0 / static_cast<double>(R) : 1.0;
    scalar_grad = static_cast<A>(static_cast<double>(load_row_value<T>(a.grad_loss, 0, a.grad_loss_acc)) * scale);
  }

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, q + n * a.target.sn + k * a.target.sk,
                        gi != nullptr ? gi + n * a.grad_input.sn + k * a.grad_input.sk : nullptr,
                        gt != nullptr ? gt + n * a.grad_target.sn + k * a.grad_target.sk : nullptr,
                        a.x.sc, a.target.sc, a.grad_input.sc, a.grad_target.sc};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    const A s = a.reduction == kReductionNone
                    ? load_row_value<T>(a.grad_loss, n * a.gln + k * a.glk, a.grad_loss_acc)
                    : scalar_grad;
    // grad_c = s (p_c Σ w q - w_c q_c): a = s Σ w q, b = 0, d = s.
    GradStep<T, kMode> g{io, coefs, {s * coef_sum[r], A(0), s}, SavedRow(a.row_stats, R, r).shift<A>(), int64_t(-1),
                         -s * coefs.q_scale};
    walk_row(io, C, vectorize, team.lane, team.size, g);
  }
}

// ---------------------------------------------------------------------------
// What the reductions of reduce.cuh sum, and where their totals go.

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

// The reduced loss with class indices, in torch's order (xent_math.h).
template <typename T, int kN>
struct IndexLoss {
  void* loss;
  bool loss_acc;  // Note [Loss dtype on the GPU]
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
    store_row_value<T>(loss, 0, loss_acc, value);
  }
};

template <typename T>
struct ProbLoss {
  void* loss;
  bool loss_acc;
  double denominator;

  __device__ void operator()(const double (&totals)[1]) const {
    store_row_value<T>(loss, 0, loss_acc, totals[0] / denominator);
  }
};

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
          IndexLoss<T, 2>{a.loss, a.loss_acc, a.scratch.scalars, a.reduction, a.label_smoothing, a.x.C});
    } else {
      sum_tiles_kernel<1><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(
          RowValues<A, 1>{{nll}}, R, a.scratch.partials);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      finish_kernel<1><<<1, kReduceThreads, 0, stream>>>(
          a.scratch.partials, tiles,
          IndexLoss<T, 1>{a.loss, a.loss_acc, a.scratch.scalars, a.reduction, a.label_smoothing, a.x.C});
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
                                                       ProbLoss<T>{a.loss, a.loss_acc, denominator});
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
