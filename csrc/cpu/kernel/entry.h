// The CPU cross-entropy kernels' entry points: index- and probability-target
// forward and backward, typed per dtype and coefficient kind, and the
// KernelTable that exports them.
//
// The algorithm is written once on raw pointers with at::vec::Vectorized and
// at::parallel_for, in the headers of cpu/kernel/ (vec, exp, coef, layout,
// stats, reduce, grad). This header is included only by
// csrc/cpu/kernel_{default,avx2,avx512}.cpp, each compiled with its own ISA
// flags and -DCPU_CAPABILITY=<ISA>, so the vector code becomes three copies
// picked at run time (kernel_dispatch.cpp). Everything in cpu/kernel/ has
// internal linkage except the one kernels_<ISA>() table.
#pragma once

#include "common/xent_math.h"
#include "cpu/kernel/coef.h"
#include "cpu/kernel/grad.h"
#include "cpu/kernel/layout.h"
#include "cpu/kernel/map.h"
#include "cpu/kernel/reduce.h"
#include "cpu/kernel/stats.h"
#include "cpu/kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <type_traits>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Upstream gradient of row r: per-row for 'none', the scalar otherwise; of
// the input's dtype T or of the accumulation dtype (Note [Loss dtype]).
template <typename T>
struct GradOut {
  using acc_t = acc_type<T>;
  const T* per_row = nullptr;
  const acc_t* per_row_acc = nullptr;
  int64_t sn = 0, sk = 0, K = 1;
  acc_t scalar = 0;

  // A known scalar upstream gradient (the fused forward+backward uses 1).
  explicit GradOut(double scalar_) : scalar(static_cast<acc_t>(scalar_)) {}

  GradOut(const at::Tensor& grad_loss, int64_t reduction, int64_t K_, double scale) : K(K_) {
    const bool in_acc = grad_loss.scalar_type() != c10::CppTypeToScalarType<T>::value;
    if (reduction == kReductionNone) {
      if (in_acc) {
        per_row_acc = grad_loss.data_ptr<acc_t>();
      } else {
        per_row = grad_loss.data_ptr<T>();
      }
      sn = grad_loss.stride(0);
      sk = grad_loss.stride(1);
    } else {
      const double g = in_acc ? static_cast<double>(*grad_loss.data_ptr<acc_t>())
                              : static_cast<double>(*grad_loss.data_ptr<T>());
      scalar = static_cast<acc_t>(g * scale);
    }
  }
  acc_t operator()(int64_t r) const {
    if (per_row) {
      return static_cast<acc_t>(per_row[row_offset(r, K, sn, sk)]);
    }
    return per_row_acc ? per_row_acc[row_offset(r, K, sn, sk)] : scalar;
  }
};

// The (2, N, K) float64 row statistics (Note [Row max and log-sum apart]):
// max[r] = row_stats[0] of row r, log_sum[r] = row_stats[1].
template <typename P>
struct RowStatsOf {
  P* max;
  P* log_sum;

  explicit RowStatsOf(const at::Tensor& row_stats)
      : max(row_stats.data_ptr<double>()), log_sum(max + row_stats.size(1) * row_stats.size(2)) {}
};

// ---------------------------------------------------------------------------
// Index targets.

// Everything about class-index targets that both the backward and the fused
// forward+backward need to turn a row into a GradPlan.
template <typename T>
struct IndexRows {
  using acc_t = acc_type<T>;
  int64_t C, K;
  const int64_t* target;
  int64_t tn, tk;
  const acc_t* w;
  acc_t weight_sum;  // Σ w (C without a weight)
  acc_t eps;
  int64_t ignore_index;
  double z_loss;  // 0: off

  IndexRows(const at::Tensor& input, const at::Tensor& target_, const at::Tensor& weight, int64_t ignore, double ls,
            double z_loss_)
      : C(input.size(1)), K(input.size(2)), target(target_.data_ptr<int64_t>()), tn(target_.stride(0)),
        tk(target_.stride(1)), w(weight.defined() ? weight.data_ptr<acc_t>() : nullptr),
        eps(static_cast<acc_t>(ls)), ignore_index(ignore), z_loss(z_loss_) {
    double sum = static_cast<double>(C);
    if (w) {
      sum = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        sum += static_cast<double>(w[c]);
      }
    }
    weight_sum = static_cast<acc_t>(sum);
  }
  int64_t y(int64_t r) const {
    return target[row_offset(r, K, tn, tk)];
  }
  // grad_scaled: the row's upstream gradient times the cross-entropy's
  // scale (1 / total weight for 'mean').
  GradPlan<acc_t> plan(int64_t r, acc_t grad_scaled, const RowStatsOf<const double>& stats) const {
    const int64_t t = y(r);
    const bool valid = t != ignore_index;
    const acc_t w_y = valid && w ? w[t] : acc_t(1);
    return {math::index_grad_coefs<acc_t>(grad_scaled, valid, w_y, weight_sum, eps, C), stats.max[r],
            stats.log_sum[r], valid ? t : -1};
  }
  // The plan with the z-loss (Note [Z-loss in the kernels]); grad_z: the
  // row's upstream gradient times the z-loss's scale (Note [Z-loss
  // denominator]). A plan of its own, so the plan without it is the code it
  // was: per row, the short-row walks feel every branch.
  GradPlan<acc_t> plan(int64_t r, acc_t grad_scaled, acc_t grad_z, const RowStatsOf<const double>& stats) const {
    GradPlan<acc_t> p = plan(r, grad_scaled, stats);
    if (p.y >= 0) {  // an ignored row has no z-loss either
      p.k.a += math::z_loss_softmax_coef<acc_t>(grad_z, z_loss, p.max, p.log_sum);
    }
    return p;
  }
};

// The z-loss 'mean' denominator of class-index targets (Note [Z-loss
// denominator], ops_common.h): the count of rows not ignored when the op
// counted it (with a weight), else the stored total weight (the count without
// a weight). The forward and the backward read it the same way, so the fused
// and the recomputed gradient take the same scale.
template <typename acc_t>
double index_z_loss_denominator(const at::Tensor& z_loss_count, const at::Tensor& total_weight) {
  return static_cast<double>(z_loss_count.defined() ? *z_loss_count.data_ptr<acc_t>()
                                                    : *total_weight.data_ptr<acc_t>());
}

// Note [Z-loss in the kernels]
// The z-loss term z_loss * lse^2 of a counted row (math::z_loss_term, from
// the row's saved max and log-sum, so exactly what the backward reads) is
// added to the row's loss for 'none', and for 'mean' and 'sum' summed on its
// own (the same deterministic sum as the losses) and added, divided by its
// denominator, to the cross-entropy's reduced value, which keeps torch's order
// of reduction. Its gradient is a term of GradCoefs::a (math::
// z_loss_softmax_coef), added to the plan of every counted row, so every walk
// and the kept exps serve it unchanged. With z_loss == 0 none of this runs:
// every number is what it was without the z-loss.

// Note [Gradient in the forward]
// When the loss is about to be differentiated (input requires grad), the
// forward also writes the gradient for an upstream gradient of 1 (of 1 on
// every row for 'none'), row by row, right after each row's statistics, while
// the row is still in cache: the logits are read from memory once for forward
// and backward together (1R + 1W instead of 2R + 1W), and the first backward
// only rescales when the upstream gradient is not 1, without reading the
// logits again (xent_ext/_ops.py). The mean's denominator, needed for that
// scale, is summed from the targets first.
template <typename T, Coef kCoef, bool kExtras>
void index_forward_typed(const ops::IndexForwardCall& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const int64_t C = input.size(1), K = input.size(2);
  const int64_t R = input.size(0) * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const T* x = input.data_ptr<T>();
  const double z_loss = args.extras.z_loss;
  const bool has_z_loss = kExtras && args.extras.has_z_loss();  // Note [The extras variant]
  const IndexRows<T> rows(input, args.target, args.weight, args.ignore_index, args.label_smoothing, z_loss);
  const bool smoothing = args.label_smoothing > 0;
  const RowStatsOf<double> stats(args.out.row_stats);
  const CoefSource<T> coef = weight_source<T>(args.weight);
  const Layout<T> L = make_layout<T>(input, nullptr, args.extras);
  const VecMap<acc_t> map(L.map);

  // Σ w[y] over non-ignored rows: the weighted mean's denominator.
  const std::unique_ptr<acc_t[]> row_weight = row_buffer<acc_t>(R);  // Note [Uninitialized row buffers]
  at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = rows.y(r);
      row_weight[r] = y == rows.ignore_index ? acc_t(0) : (rows.w ? rows.w[y] : acc_t(1));
    }
  });
  const double total_weight = deterministic_sum(row_weight.get(), R);
  *args.out.total_weight.data_ptr<acc_t>() = static_cast<acc_t>(total_weight);
  const bool reduce = args.reduction != kReductionNone;
  const double denominator = args.reduction == kReductionMean ? total_weight : 1.0;

  // 'none', or no smoothing: the row loss. Reduced with smoothing: the nll
  // part, with the smoothing part in row_smooth (math::reduced_smoothed_loss).
  // Reduced with the z-loss: its terms in row_z (Note [Z-loss in the kernels]).
  const std::unique_ptr<acc_t[]> row_loss = row_buffer<acc_t>(R);
  const std::unique_ptr<acc_t[]> row_smooth = reduce && smoothing ? row_buffer<acc_t>(R) : nullptr;
  const std::unique_ptr<acc_t[]> row_z = reduce && has_z_loss ? row_buffer<acc_t>(R) : nullptr;
  acc_t* const loss_out = row_loss.get();
  acc_t* const smooth_out = row_smooth.get();
  acc_t* const z_out = row_z.get();
  const auto finish = [&](int64_t r0, int64_t n, const RowStats<acc_t>* st, const double* log_sum) {
    // Locals, not the closure's references: stores to the outputs cannot
    // make the compiler reload them (Note [Finishing rows in groups]).
    const int64_t* const target = rows.target;
    const int64_t tn = rows.tn, tk = rows.tk, ignore_index = rows.ignore_index;
    const acc_t* const w = rows.w;
    const acc_t eps = rows.eps;
    const T* const xp = x;
    double* const max_out = stats.max;
    double* const log_sum_out = stats.log_sum;
    acc_t* const loss = loss_out;
    acc_t* const smooth = smooth_out;
    acc_t* const zl = z_out;
    int64_t y[kMaxFinishRows];
    acc_t x_y[kMaxFinishRows];
    TORCH_INTERNAL_ASSERT(n <= kMaxFinishRows);
    for (int64_t j = 0; j < n; ++j) {
      max_out[r0 + j] = static_cast<double>(st[j].ref);
      log_sum_out[r0 + j] = log_sum[j];
      y[j] = target[row_offset(r0 + j, K, tn, tk)];
    }
    for (int64_t j = 0; j < n; ++j) {
      // An ignored row reads nothing: with C = 0 there is no logit to read.
      x_y[j] = y[j] == ignore_index ? acc_t(0) : static_cast<acc_t>(xp[row_offset(r0 + j, K, sn, sk) + y[j] * sc]);
    }
    if constexpr (kExtras) {
      map.apply(x_y, nullptr, n);  // z_y, as the row's other z (Note [Logit map on the CPU])
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = r0 + j;
      if (y[j] == ignore_index) {
        // torch selects rather than multiplies: an ignored row is exactly 0
        // even when its logits hold a nan.
        loss[r] = acc_t(0);
        if (smooth) {
          smooth[r] = acc_t(0);
        }
        continue;
      }
      const acc_t w_y = w ? w[y[j]] : acc_t(1);
      const acc_t log_sum_j = static_cast<acc_t>(log_sum[j]);
      if (!smooth) {
        loss[r] = math::index_row_loss(st[j], log_sum_j, x_y[j], w_y, eps, C, smoothing);
      } else {
        loss[r] = math::index_row_nll(st[j], log_sum_j, x_y[j], w_y);
        smooth[r] = math::coef_row_loss(st[j], log_sum_j);
      }
    }
    if (has_z_loss) {  // a loop of its own: the one above stays the default path's
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = r0 + j;
        const bool counted = y[j] != ignore_index;  // an ignored row's loss stays exactly 0
        const acc_t term =
            counted ? math::z_loss_term<acc_t>(z_loss, static_cast<double>(st[j].ref), log_sum[j]) : acc_t(0);
        if (zl) {
          zl[r] = term;
        } else if (counted) {
          loss[r] += term;
        }
      }
    }
  };
  if (args.out.grad_input.defined()) {
    // The scale from the stored, acc_t-rounded total weight, which is what a
    // recomputing backward reads (Note [Recomputed equals fused]).
    const double stored_denominator = args.reduction == kReductionMean
        ? static_cast<double>(*args.out.total_weight.data_ptr<acc_t>())
        : 1.0;
    const double z_denominator = has_z_loss && args.reduction == kReductionMean
        ? index_z_loss_denominator<acc_t>(args.z_loss_count, args.out.total_weight)
        : 1.0;
    const GradOut<T> unit(1.0 / stored_denominator);
    const GradOut<T> unit_z(1.0 / z_denominator);
    const RowStatsOf<const double> saved(args.out.row_stats);
    const auto plan_of = [&](int64_t r) {
      if constexpr (kExtras) {
        if (has_z_loss) {
          return rows.plan(r, unit(r), unit_z(r), saved);
        }
      }
      return rows.plan(r, unit(r), saved);
    };
    const auto walker = make_grad_walker<T, kCoef, kExtras>(L, args.out.grad_input, coef, plan_of);
    for_each_row_stats<T, kCoef, kExtras>(L, coef, finish, [&](int64_t r0, int64_t n, const auto* exps) {
      walker.rows(r0, n, exps);
    });
  } else {
    for_each_row_stats<T, kCoef, kExtras>(L, coef, finish);
  }

  if (!reduce) {
    write_rows<T>(args.out.loss, row_loss.get(), R);
    return;
  }
  const double nll_sum = deterministic_sum(row_loss.get(), R);
  double value = smoothing
      ? math::reduced_smoothed_loss(nll_sum, deterministic_sum(row_smooth.get(), R), denominator, args.label_smoothing, C)
      : nll_sum / denominator;
  if (has_z_loss) {
    const double z_denominator = args.reduction == kReductionMean
        ? index_z_loss_denominator<acc_t>(args.z_loss_count, args.out.total_weight)
        : 1.0;
    value += deterministic_sum(row_z.get(), R) / z_denominator;
  }
  write_scalar<T>(args.out.loss, value);
}

template <typename T, Coef kCoef, bool kExtras>
void index_backward_typed(const ops::IndexBackwardCall& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const IndexRows<T> rows(input, args.target, args.weight, args.ignore_index, args.label_smoothing,
                          args.extras.z_loss);
  const RowStatsOf<const double> stats(args.row_stats);
  const bool mean = args.reduction == kReductionMean;
  const double scale = mean ? 1.0 / static_cast<double>(*args.total_weight.data_ptr<acc_t>()) : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, input.size(2), scale);
  // The z-loss's upstream gradient (Note [Z-loss denominator]); without the
  // z-loss it is never read.
  const bool has_z_loss = kExtras && args.extras.has_z_loss();  // Note [The extras variant]
  const double z_scale = has_z_loss && mean
      ? 1.0 / index_z_loss_denominator<acc_t>(args.z_loss_count, args.total_weight)
      : 1.0;
  const GradOut<T> grad_z(args.grad_loss, args.reduction, input.size(2), z_scale);
  const auto plan_of = [&](int64_t r) {
    if constexpr (kExtras) {
      if (has_z_loss) {
        return rows.plan(r, grad_out(r), grad_z(r), stats);
      }
    }
    return rows.plan(r, grad_out(r), stats);
  };
  const Layout<T> L = make_layout<T>(input, nullptr, args.extras);
  make_grad_walker<T, kCoef, kExtras>(L, args.grad_input, weight_source<T>(args.weight), plan_of).run();
}

// ---------------------------------------------------------------------------
// Probability targets.

template <typename T, Coef kCoef, bool kExtras>
void prob_forward_typed(const ops::ProbForwardCall& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const at::Tensor& target = args.target;
  const int64_t C = input.size(1);
  const int64_t R = input.size(0) * input.size(2);
  const RowStatsOf<double> stats(args.out.row_stats);
  acc_t* coef_sum = args.out.coef_sum.data_ptr<acc_t>();
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);
  const double z_loss = args.extras.z_loss;
  const bool has_z_loss = kExtras && args.extras.has_z_loss();  // Note [The extras variant]
  const bool reduce = args.reduction != kReductionNone;

  const std::unique_ptr<acc_t[]> row_loss = row_buffer<acc_t>(R);  // Note [Uninitialized row buffers]
  // Reduced with the z-loss: its terms, every row counting (Note [Z-loss in the kernels]).
  const std::unique_ptr<acc_t[]> row_z = reduce && has_z_loss ? row_buffer<acc_t>(R) : nullptr;
  for_each_row_stats<T, kCoef, kExtras>(
      make_layout<T>(input, &target, args.extras), coef,
      [&](int64_t r0, int64_t n, const RowStats<acc_t>* st, const double* log_sum) {
        for (int64_t j = 0; j < n; ++j) {
          stats.max[r0 + j] = static_cast<double>(st[j].ref);
          stats.log_sum[r0 + j] = log_sum[j];
          coef_sum[r0 + j] = st[j].coef_sum;
          row_loss[r0 + j] = math::coef_row_loss(st[j], static_cast<acc_t>(log_sum[j]));
        }
        if (has_z_loss) {  // a loop of its own: the one above stays the default path's
          for (int64_t j = 0; j < n; ++j) {
            const acc_t term = math::z_loss_term<acc_t>(z_loss, static_cast<double>(st[j].ref), log_sum[j]);
            if (row_z) {
              row_z[r0 + j] = term;
            } else {
              row_loss[r0 + j] += term;
            }
          }
        }
      });
  if (!reduce) {
    write_rows<T>(args.out.loss, row_loss.get(), R);
    return;
  }
  // torch's mean divides by the number of rows N * d1 * ... * dk, not by
  // weights; so does the z-loss's, every row counting.
  const double denominator = args.reduction == kReductionMean ? static_cast<double>(R) : 1.0;
  double value = deterministic_sum(row_loss.get(), R) / denominator;
  if (has_z_loss) {
    value += deterministic_sum(row_z.get(), R) / denominator;
  }
  write_scalar<T>(args.out.loss, value);
}

template <typename T, Coef kCoef, bool kExtras>
void prob_backward_typed(const ops::ProbBackwardCall& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const at::Tensor& target = args.target;
  const int64_t C = input.size(1), K = input.size(2);
  const Layout<T> L = make_layout<T>(input, &target, args.extras);
  const int64_t R = L.rows();
  const RowStatsOf<const double> stats(args.row_stats);
  const acc_t* coef_sum = args.coef_sum.data_ptr<acc_t>();
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);
  // The z-loss of probability targets has the cross-entropy's denominator
  // (R for 'mean'), so one scaled upstream gradient serves both.
  const double scale = args.reduction == kReductionMean ? 1.0 / static_cast<double>(R) : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, K, scale);
  const double z_loss = args.extras.z_loss;

  if (args.out.grad_input.defined()) {
    // grad_c = s * (p_c * Σ_c' w q - w_c q_c): a = s Σ w q, d = s, no one-hot;
    // the z-loss adds to a (Note [Z-loss in the kernels]).
    const auto plan_of = [&](int64_t r) {
      const acc_t s = grad_out(r);
      GradPlan<acc_t> p{{s * coef_sum[r], acc_t(0), s}, stats.max[r], stats.log_sum[r], -1};
      if constexpr (kExtras) {
        if (z_loss != 0.0) {
          p.k.a += math::z_loss_softmax_coef<acc_t>(s, z_loss, p.max, p.log_sum);
        }
      }
      return p;
    };
    make_grad_walker<T, kCoef, kExtras>(L, args.out.grad_input, coef, plan_of).run();
  }
  if (args.out.grad_target.defined()) {
    // grad_target_c = -s (1 - eps) w_c log_softmax(z)_c. Rare (targets that
    // require grad), so a plain loop over rows; mapped logits are mapped a
    // chunk at a time, as the other walks map them.
    const at::Tensor& gt = args.out.grad_target;
    T* g = gt.data_ptr<T>();
    const int64_t gtc = gt.stride(1);
    const RowStrides gts{gt.stride(0), gt.stride(2)};
    const VecMap<acc_t> map(L.map);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(kExtras ? static_cast<size_t>(kChunk) : 0);
      for (int64_t r = begin; r < end; ++r) {
        const RowView<T> row = L.row(r);
        const math::SoftmaxShift<acc_t> shift = math::softmax_shift<acc_t>(stats.max[r], stats.log_sum[r]);
        const acc_t e = -grad_out(r) * coef.q_scale;
        T* grad_row = g + L.at(r, gts);
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t len = std::min(kChunk, C - c0);
          if constexpr (kExtras) {
            map_chunk<T>(map, row.x + c0 * row.x_stride, row.x_stride, len, z.data(), nullptr);
          }
          for (int64_t i = 0; i < len; ++i) {
            const int64_t c = c0 + i;
            const acc_t wc = coef.w ? coef.w[c] : acc_t(1);
            const acc_t zc = kExtras ? z[i] : static_cast<acc_t>(row.x[c * row.x_stride]);
            grad_row[c * gtc] = static_cast<T>(e * wc * math::log_softmax(zc, shift));
          }
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Dtype and mode dispatch.

#define XENT_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

template <Coef kCoef>
using CoefTag = std::integral_constant<Coef, kCoef>;

// Calls body(CoefTag<kCoef>) with the coefficients an index-target kernel
// needs: none without smoothing, else the weights or ones.
template <typename Body>
void with_index_coef(const at::Tensor& weight, double label_smoothing, const Body& body) {
  if (!(label_smoothing > 0)) {
    body(CoefTag<Coef::kNone>{});
  } else if (weight.defined()) {
    body(CoefTag<Coef::kWeight>{});
  } else {
    body(CoefTag<Coef::kOnes>{});
  }
}

// The same for probability targets: q, weighted or not.
template <typename Body>
void with_prob_coef(const at::Tensor& weight, const Body& body) {
  if (weight.defined()) {
    body(CoefTag<Coef::kProbWeight>{});
  } else {
    body(CoefTag<Coef::kProb>{});
  }
}

// Note [The extras variant]
// Every kernel is compiled twice: the default variant (kExtras false), which
// is the code without the LLM extras, no branch of theirs in it (a branch per
// row shows in the short-row walks), and one variant for any of them, which
// maps the logits (Note [Logit map on the CPU]; scale alone and softcap are
// told apart at run time) and adds the z-loss where it is on (Note [Z-loss
// in the kernels]). A call with the z-loss alone runs the extras variant with
// the identity map: z = x * 1 and dz/dx = 1 are exact, so its cross-entropy
// part has the default variant's bits, at the cost of the map's pass through
// scratch. The extras double the instantiations once.
template <typename Body>
void with_extras(const Extras& extras, const Body& body) {
  if (extras.maps_logits() || extras.has_z_loss()) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

void index_forward(const ops::IndexForwardCall& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_index_forward", [&] {
    with_index_coef(args.weight, args.label_smoothing, [&](auto coef) {
      with_extras(args.extras, [&](auto extras) {
        index_forward_typed<scalar_t, decltype(coef)::value, decltype(extras)::value>(args);
      });
    });
  });
}

void index_backward(const ops::IndexBackwardCall& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_index_backward", [&] {
    with_index_coef(args.weight, args.label_smoothing, [&](auto coef) {
      with_extras(args.extras, [&](auto extras) {
        index_backward_typed<scalar_t, decltype(coef)::value, decltype(extras)::value>(args);
      });
    });
  });
}

void prob_forward(const ops::ProbForwardCall& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_prob_forward", [&] {
    with_prob_coef(args.weight, [&](auto coef) {
      with_extras(args.extras, [&](auto extras) {
        prob_forward_typed<scalar_t, decltype(coef)::value, decltype(extras)::value>(args);
      });
    });
  });
}

void prob_backward(const ops::ProbBackwardCall& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_prob_backward", [&] {
    with_prob_coef(args.weight, [&](auto coef) {
      with_extras(args.extras, [&](auto extras) {
        prob_backward_typed<scalar_t, decltype(coef)::value, decltype(extras)::value>(args);
      });
    });
  });
}

#undef XENT_DISPATCH_FLOATING

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext

#define XENT_CONCAT_(a, b) a##b
#define XENT_CONCAT(a, b) XENT_CONCAT_(a, b)
#define XENT_STRINGIFY_(a) #a
#define XENT_STRINGIFY(a) XENT_STRINGIFY_(a)

// The one symbol each per-ISA translation unit exports.
const xent_ext::cpu::KernelTable& xent_ext::cpu::XENT_CONCAT(kernels_, CPU_CAPABILITY)() {
  namespace isa = xent_ext::cpu::CPU_CAPABILITY;
  static const KernelTable table{
      XENT_STRINGIFY(CPU_CAPABILITY), isa::index_forward, isa::index_backward, isa::prob_forward, isa::prob_backward};
  return table;
}
