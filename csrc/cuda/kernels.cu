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
//
// Note [Z-loss on the GPU]
// The z-loss term (Note [Z-loss], xent_math.h) of a counted row is formed by
// the row's leader from the row statistics it also saves (math::z_loss_term),
// so the forward and a backward agree on lse to the bit. 'none' adds it to
// the row's loss (an ignored row stays exactly 0); 'mean' and 'sum' keep it
// in a per-row buffer of its own and sum it beside the cross-entropy in the
// same fixed-order reduction (reduce.cuh), then add Σ z / denominator to the
// cross-entropy reduced as before, so the cross-entropy's own order of
// reduction does not change. The denominator is the z_loss_count tensor when
// there is one (class weights), else the total weight (equal to the count of
// counted rows without weights) or R (probability targets). Its gradient is
// one more term of the softmax coefficient `a` of a counted row
// (add_z_loss_coef), in the fused forward and the backward alike, with the
// denominator rounded to the accumulation type as the backward reads it, so
// the two agree to the bit. z_loss == 0 adds nothing anywhere: every number
// is what it was without the z-loss.
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

// The class weight of an index kernel's coefficients. A mapped kernel runs
// in CoefMode::kIndex with smoothing off too (Note [Logit map on the GPU],
// row_walk.cuh); its coefficients are then 1, so d = 0 leaves the gradient
// exact whatever the weights hold, and the smoothing sums go unused. An
// unmapped kIndex kernel always has smoothing on.
template <bool kMap, typename A>
__device__ __forceinline__ const A* coef_weight(const A* w, bool smoothing) {
  return (kMap && !smoothing) ? nullptr : w;
}

// Note [Z-loss on the GPU]: the z-loss's share of the softmax coefficient of
// a counted row whose z-loss upstream gradient is grad_z; nothing when the
// z-loss is off or the row does not count.
template <typename A>
__device__ __forceinline__ void add_z_loss_coef(math::GradCoefs<A>& k, bool counted, A grad_z, const Extras& extras,
                                                const SavedRow& saved) {
  if (extras.has_z_loss() && counted) {
    k.a = k.a + math::z_loss_softmax_coef<A>(grad_z, extras.z_loss, saved.max, saved.log_sum);
  }
}

// The z-loss gradient's scale for an upstream gradient of 1 with class
// indices: 1 / denominator for 'mean' (Note [Z-loss on the GPU]), else 1. The
// denominator is read in the accumulation type, as total_weight and
// z_loss_count are stored, by the fused forward and the backward alike.
template <typename A>
__device__ __forceinline__ double index_z_loss_scale(int64_t reduction, const void* z_loss_count, A total_weight) {
  if (reduction != kReductionMean) {
    return 1.0;
  }
  const A denominator = z_loss_count != nullptr ? *static_cast<const A*>(z_loss_count) : total_weight;
  return 1.0 / static_cast<double>(denominator);
}

template <typename T, Walk kWalk, CoefMode kMode, bool kMap>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    index_forward_kernel(IndexForwardLaunch a) {
  using A = math::acc_type<T>;
  __shared__ RowStats<A> smem[33];
  const T* x = static_cast<const T*>(a.x.data);
  T* grad = static_cast<T*>(a.grad.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const bool smoothing = a.label_smoothing > 0;
  const bool reduce = a.reduction != kReductionNone;
  const bool z_loss = a.extras.has_z_loss();
  const A eps = static_cast<A>(a.label_smoothing);
  const A* w = static_cast<const A*>(a.weight);
  const Coefs<A, kMode> coefs{coef_weight<kMap>(w, smoothing), A(1), A(0)};
  const math::LogitMap<A> map = math::logit_map<A>(a.extras);
  // The fused gradient's upstream gradient is 1 / denominator (CPU kernel:
  // Note [Gradient in the forward]); scalars were written by the pre-pass.
  // The denominator rounded to A, as the total_weight output a recomputing
  // backward reads holds it (CPU kernel: Note [Recomputed equals fused]).
  const A total_weight = static_cast<A>(a.scratch.scalars[0]);
  const double denominator = a.reduction == kReductionMean ? static_cast<double>(total_weight) : 1.0;
  const A unit = static_cast<A>(1.0 / denominator);
  const A z_unit = z_loss ? static_cast<A>(index_z_loss_scale<A>(a.reduction, a.z_loss_count, total_weight)) : A(0);
  const A weight_sum = static_cast<A>(a.scratch.scalars[1]);
  A* row_nll = static_cast<A*>(a.scratch.row_nll);
  A* row_smooth = static_cast<A*>(a.scratch.row_smooth);
  A* row_z = static_cast<A*>(a.scratch.row_z);

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, nullptr,
                        grad != nullptr ? grad + n * a.grad.sn + k * a.grad.sk : nullptr, nullptr,
                        a.x.sc, 0, a.grad.sc, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    // Loaded before the walk so its latency hides behind it.
    const IndexTarget<A> t = index_target<A>(a.target, a.tn, a.tk, n, k, C, a.ignore_index);
    StatsStep<T, kMode, kMap> stats{io, coefs, map, empty_stats<A>()};
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
      A nll = A(0), smooth = A(0), zl = A(0);  // torch selects: an ignored row is exactly 0
      if (t.bad) {
        nll = smooth = zl = quiet_nan<A>();
      } else if (!t.ignored) {
        const A z_y = mapped<kMap>(map, x_y);
        const A w_y = w != nullptr ? w[t.y] : A(1);
        if (!reduce) {
          nll = math::index_row_loss(st, static_cast<A>(log_sum), z_y, w_y, eps, C, smoothing);
        } else {
          nll = math::index_row_nll(st, static_cast<A>(log_sum), z_y, w_y);
          smooth = smoothing ? math::coef_row_loss(st, static_cast<A>(log_sum)) : A(0);
        }
        if (z_loss) {  // Note [Z-loss on the GPU]
          zl = math::z_loss_term<A>(a.extras.z_loss, saved.max, saved.log_sum);
        }
      }
      if (!reduce) {
        store_row_value<T>(a.loss, r, a.loss_acc, z_loss ? nll + zl : nll);
      } else {
        row_nll[r] = nll;
        if (smoothing) {
          row_smooth[r] = smooth;
        }
        if (z_loss) {
          row_z[r] = zl;
        }
      }
    }
    if (grad != nullptr) {
      if constexpr (kWalk == Walk::kWarp) {
        __syncwarp();  // Note [Gradient into the logits]: the leader's x_y read comes first
      }
      if (t.ignored && saved.finite()) {
        ZeroStep<T> zero{io};
        walk_row(io, C, vectorize, team.lane, team.size, zero);
      } else {
        math::GradCoefs<A> coef = index_row_coefs<A>(t, unit, w, weight_sum, eps, C);
        add_z_loss_coef<A>(coef, !t.ignored && !t.bad, z_unit, a.extras, saved);
        GradStep<T, kMode, kMap> g{io, coefs, map, coef, saved.shift<A>(), (t.ignored || t.bad) ? int64_t(-1) : t.y,
                                   A(0)};
        walk_row(io, C, vectorize, team.lane, team.size, g);
      }
    }
  }
}

template <typename T, Walk kWalk, CoefMode kMode, bool kMap>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    index_backward_kernel(IndexBackwardLaunch a) {
  using A = math::acc_type<T>;
  const T* x = static_cast<const T*>(a.x.data);
  T* grad = static_cast<T*>(a.grad.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const bool smoothing = a.label_smoothing > 0;
  const A eps = static_cast<A>(a.label_smoothing);
  const A* w = static_cast<const A*>(a.weight);
  const Coefs<A, kMode> coefs{coef_weight<kMap>(w, smoothing), A(1), A(0)};
  const math::LogitMap<A> map = math::logit_map<A>(a.extras);
  const A weight_sum = static_cast<A>(a.scalars[0]);
  // As the CPU kernel: the scalar upstream gradient times 1 / total_weight, in
  // double; the z-loss's the same times its own scale (Note [Z-loss on the GPU]).
  A scalar_grad = A(0), scalar_z_grad = A(0);
  if (a.reduction != kReductionNone) {
    const A total_weight = *static_cast<const A*>(a.total_weight);
    const double scale = a.reduction == kReductionMean ? 1.0 / static_cast<double>(total_weight) : 1.0;
    const double g = static_cast<double>(load_row_value<T>(a.grad_loss, 0, a.grad_loss_acc));
    scalar_grad = static_cast<A>(g * scale);
    if (a.extras.has_z_loss()) {
      scalar_z_grad = static_cast<A>(g * index_z_loss_scale<A>(a.reduction, a.z_loss_count, total_weight));
    }
  }

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, nullptr, grad + n * a.grad.sn + k * a.grad.sk, nullptr,
                        a.x.sc, 0, a.grad.sc, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    const IndexTarget<A> t = index_target<A>(a.target, a.tn, a.tk, n, k, C, a.ignore_index);
    const bool none = a.reduction == kReductionNone;
    const A g_out = none ? load_row_value<T>(a.grad_loss, n * a.gln + k * a.glk, a.grad_loss_acc) : scalar_grad;
    const SavedRow saved(a.row_stats, R, r);
    if (t.ignored && saved.finite()) {
      ZeroStep<T> zero{io};
      walk_row(io, C, vectorize, team.lane, team.size, zero);
      continue;
    }
    math::GradCoefs<A> coef = index_row_coefs<A>(t, g_out, w, weight_sum, eps, C);
    add_z_loss_coef<A>(coef, !t.ignored && !t.bad, none ? g_out : scalar_z_grad, a.extras, saved);
    GradStep<T, kMode, kMap> g{io, coefs, map, coef, saved.shift<A>(), (t.ignored || t.bad) ? int64_t(-1) : t.y, A(0)};
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

template <typename T, Walk kWalk, CoefMode kMode, bool kMap>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    prob_forward_kernel(ProbForwardLaunch a) {
  using A = math::acc_type<T>;
  __shared__ RowStats<A> smem[33];
  const T* x = static_cast<const T*>(a.x.data);
  const T* q = static_cast<const T*>(a.target.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const Coefs<A, kMode> coefs = prob_coefs<A>(static_cast<const A*>(a.weight), a.label_smoothing, C);
  const math::LogitMap<A> map = math::logit_map<A>(a.extras);
  const bool z_loss = a.extras.has_z_loss();
  A* coef_sum = static_cast<A*>(a.coef_sum);
  A* row_loss = static_cast<A*>(a.row_loss);
  A* row_z = static_cast<A*>(a.row_z);

  const TeamRows<kWalk> team;
  for (int64_t r = team.first; r < R; r += team.stride) {
    const int64_t n = r / K, k = r % K;
    const RowPtrs<T> io{x + n * a.x.sn + k * a.x.sk, q + n * a.target.sn + k * a.target.sk, nullptr, nullptr,
                        a.x.sc, a.target.sc, 0, 0};
    const bool vectorize = kWalk != Walk::kThread && same_alignment(io);
    StatsStep<T, kMode, kMap> stats{io, coefs, map, empty_stats<A>()};
    walk_row(io, C, vectorize, team.lane, team.size, stats);
    const RowStats<A> st = team_reduce<kWalk>(stats.st, smem);
    if (team.leader()) {
      const double log_sum = math::row_log(static_cast<double>(st.sum_exp));
      a.row_stats[r] = static_cast<double>(st.ref);
      a.row_stats[R + r] = log_sum;
      coef_sum[r] = st.coef_sum;
      const A l = math::coef_row_loss(st, static_cast<A>(log_sum));
      // Every row counts (Note [Z-loss on the GPU]).
      const A zl = z_loss ? math::z_loss_term<A>(a.extras.z_loss, static_cast<double>(st.ref), log_sum) : A(0);
      if (a.reduction == kReductionNone) {
        store_row_value<T>(a.loss, r, a.loss_acc, z_loss ? l + zl : l);
      } else {
        row_loss[r] = l;
        if (z_loss) {
          row_z[r] = zl;
        }
      }
    }
  }
}

template <typename T, Walk kWalk, CoefMode kMode, bool kMap>
__global__ void XENT_ROW_KERNEL_BOUNDS(kWalk, T)
    prob_backward_kernel(ProbBackwardLaunch a) {
  using A = math::acc_type<T>;
  const T* x = static_cast<const T*>(a.x.data);
  const T* q = static_cast<const T*>(a.target.data);
  T* gi = static_cast<T*>(a.grad_input.data);
  T* gt = static_cast<T*>(a.grad_target.data);
  const int64_t C = a.x.C, K = a.x.K, R = a.x.N * a.x.K;
  const Coefs<A, kMode> coefs = prob_coefs<A>(static_cast<const A*>(a.weight), a.label_smoothing, C);
  const math::LogitMap<A> map = math::logit_map<A>(a.extras);
  const A* coef_sum = static_cast<const A*>(a.coef_sum);
  // torch's mean divides by the number of rows; so does the z-loss's (every
  // row counts), so s is the z-loss's upstream gradient too.
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
    const SavedRow saved(a.row_stats, R, r);
    // grad_c = s (p_c Σ w q - w_c q_c): a = s Σ w q, b = 0, d = s.
    math::GradCoefs<A> coef{s * coef_sum[r], A(0), s};
    add_z_loss_coef<A>(coef, /*counted=*/true, s, a.extras, saved);
    GradStep<T, kMode, kMap> g{io, coefs, map, coef, saved.shift<A>(), int64_t(-1), -s * coefs.q_scale};
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

// The reduced loss with class indices, in torch's order (xent_math.h):
// totals are Σ nll, then Σ smooth when smoothing is on, then Σ z-loss when
// the z-loss is on (loss_sums, kernel_api.h), and the z-loss is added to the
// cross-entropy reduced as without it (Note [Z-loss on the GPU]).
template <typename T, int kN>
struct IndexLoss {
  using A = math::acc_type<T>;
  void* loss;
  bool loss_acc;  // Note [Loss dtype on the GPU]
  const double* total_weight;
  int64_t reduction;
  double label_smoothing;
  int64_t C;
  bool smoothing;
  bool z_loss;
  const void* z_loss_count;  // 0-d A, or nullptr: the total weight

  __device__ void operator()(const double (&totals)[kN]) const {
    const double denominator = reduction == kReductionMean ? *total_weight : 1.0;
    double value = totals[0] / denominator;
    if constexpr (kN >= 2) {
      if (smoothing) {
        value = math::reduced_smoothed_loss(totals[0], totals[1], denominator, label_smoothing, C);
      }
      if (z_loss) {
        const double z_denominator = reduction != kReductionMean ? 1.0
                                     : z_loss_count != nullptr
                                         ? static_cast<double>(*static_cast<const A*>(z_loss_count))
                                         : *total_weight;
        value = value + totals[kN - 1] / z_denominator;
      }
    }
    store_row_value<T>(loss, 0, loss_acc, value);
  }
};

// The reduced loss with probability targets: Σ loss, then Σ z-loss when it
// is on, each divided by the same denominator (R for 'mean').
template <typename T, int kN>
struct ProbLoss {
  void* loss;
  bool loss_acc;
  double denominator;

  __device__ void operator()(const double (&totals)[kN]) const {
    double value = totals[0] / denominator;
    if constexpr (kN == 2) {
      value = value + totals[1] / denominator;
    }
    store_row_value<T>(loss, 0, loss_acc, value);
  }
};

// Sums kN per-row values over R rows and hands the totals to `finish`
// (Note [Deterministic reduction on the GPU], reduce.cuh).
template <int kN, typename Values, typename Finish>
cudaError_t launch_row_sums(const Values& values, const Finish& finish, int64_t R, double* partials,
                            cudaStream_t stream) {
  const int64_t tiles = reduce_tiles(R);
  sum_tiles_kernel<kN><<<static_cast<unsigned>(tiles), kReduceThreads, 0, stream>>>(values, R, partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finish_kernel<kN><<<1, kReduceThreads, 0, stream>>>(partials, tiles, finish);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_index_forward(const IndexForwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = math::acc_type<T>;
    const int64_t R = a.x.N * a.x.K;
    const int64_t tiles = reduce_tiles(R);
    const bool smoothing = a.label_smoothing > 0;
    const bool z_loss = a.extras.has_z_loss();
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
      XENT_LAUNCH_INDEX_ROWS(index_forward_kernel, T, smoothing, a.extras.maps_logits(), choose_walk(a.x.C, unit), R,
                             stream, a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (a.reduction == kReductionNone) {
      return cudaSuccess;
    }
    const A* nll = static_cast<const A*>(a.scratch.row_nll);
    const A* smooth = static_cast<const A*>(a.scratch.row_smooth);
    const A* z = static_cast<const A*>(a.scratch.row_z);
    // Σ nll [, Σ smooth] [, Σ z-loss] (loss_sums, kernel_api.h).
    switch (loss_sums(smoothing, z_loss)) {
      case 1:
        return launch_row_sums<1>(RowValues<A, 1>{{nll}},
                                  IndexLoss<T, 1>{a.loss, a.loss_acc, a.scratch.scalars, a.reduction, a.label_smoothing,
                                                  a.x.C, smoothing, z_loss, a.z_loss_count},
                                  R, a.scratch.partials, stream);
      case 2:
        return launch_row_sums<2>(RowValues<A, 2>{{nll, smoothing ? smooth : z}},
                                  IndexLoss<T, 2>{a.loss, a.loss_acc, a.scratch.scalars, a.reduction, a.label_smoothing,
                                                  a.x.C, smoothing, z_loss, a.z_loss_count},
                                  R, a.scratch.partials, stream);
      default:
        return launch_row_sums<3>(RowValues<A, 3>{{nll, smooth, z}},
                                  IndexLoss<T, 3>{a.loss, a.loss_acc, a.scratch.scalars, a.reduction, a.label_smoothing,
                                                  a.x.C, smoothing, z_loss, a.z_loss_count},
                                  R, a.scratch.partials, stream);
    }
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
      XENT_LAUNCH_INDEX_ROWS(index_backward_kernel, T, a.label_smoothing > 0, a.extras.maps_logits(),
                             choose_walk(a.x.C, unit), R, stream, a);
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
      XENT_LAUNCH_PROB_ROWS(prob_forward_kernel, T, a.extras.maps_logits(), choose_walk(a.x.C, unit), R, stream, a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (a.reduction == kReductionNone) {
      return cudaSuccess;
    }
    // torch's mean divides by the number of rows N * d1 * ... * dk (0/0 = nan for none).
    const double denominator = a.reduction == kReductionMean ? static_cast<double>(R) : 1.0;
    const A* loss = static_cast<const A*>(a.row_loss);
    if (a.extras.has_z_loss()) {
      return launch_row_sums<2>(RowValues<A, 2>{{loss, static_cast<const A*>(a.row_z)}},
                                ProbLoss<T, 2>{a.loss, a.loss_acc, denominator}, R, a.partials, stream);
    }
    return launch_row_sums<1>(RowValues<A, 1>{{loss}}, ProbLoss<T, 1>{a.loss, a.loss_acc, denominator}, R, a.partials,
                              stream);
  });
}

cudaError_t launch_prob_backward(const ProbBackwardLaunch& a, cudaStream_t stream) {
  return dispatch_dtype(a.x.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const int64_t R = a.x.N * a.x.K;
    if (R > 0) {
      const bool unit = a.x.sc == 1 && a.target.sc == 1 && (a.grad_input.data == nullptr || a.grad_input.sc == 1) &&
                        (a.grad_target.data == nullptr || a.grad_target.sc == 1);
      XENT_LAUNCH_PROB_ROWS(prob_backward_kernel, T, a.extras.maps_logits(), choose_walk(a.x.C, unit), R, stream, a);
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
