// The per-row math of cross-entropy, shared by the CPU and CUDA kernels.
//
// Everything that decides a number lives here, so the CPU tests also test the
// formulas the CUDA kernels use. Kernels only move data: they accumulate
// RowStats over a row (in chunks, merged with `merge`), turn them into a loss
// with `index_row_loss` / `coef_row_loss`, and in backward evaluate
// `grad = a * softmax - d * coef` plus a `-b` at the target class.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define XENT_HD __host__ __device__ __forceinline__
#else
#define XENT_HD inline
#endif

namespace xent_ext {

// Same numbering as torch.nn._reduction.get_enum.
enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// Note [Logit scale, softcap and z-loss]
// The LLM extras of one call, each off at its default (which reproduces
// torch's cross-entropy exactly). The loss they define (README, "LLM
// extras"; docs/semantics.md) is, per logit and per row,
//   z    = softcap * tanh(logit_scale * x / softcap)   (softcap on)
//   z    = logit_scale * x                             (softcap off)
//   loss = cross_entropy(z, ...) + z_loss * lse(z)^2 on every row that counts
// with the z-loss term reduced by the number of counted rows for 'mean' (not
// by the class weights). The kernels read x once, map it in registers
// (LogitMap) and treat z as the logits from there on: row_stats hold z's max
// and log-sum, and every gradient is formed for z and multiplied by dz/dx as
// it is written. softcap and logit_scale are validated by the op prologue
// (ops_common.h, check_extras): softcap > 0 and finite or off, logit_scale
// finite and non-zero, z_loss >= 0 and finite.
struct Extras {
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0: off
  double z_loss = 0.0;   // 0: off

  XENT_HD bool maps_logits() const {
    return logit_scale != 1.0 || softcap != 0.0;
  }
  XENT_HD bool has_z_loss() const {
    return z_loss != 0.0;
  }
};

namespace math {

// Note [Accumulation dtype]
// fp32 for fp32/bf16/fp16 logits, fp64 for fp64, on both devices. bf16/fp16
// are widened in registers as they are loaded and narrowed as they are stored:
// no fp32 copy of the logits or of the gradient is ever materialized.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// Note [Row statistics]
// For a row x_0..x_{C-1} and per-class coefficients coef_c we keep
//   ref      a shift, the largest x seen so far (or -inf while every x is -inf)
//   sum_exp  Σ exp(x_c - ref)
//   coef_dot Σ coef_c (x_c - ref)        (Σ coef_c x_c while ref is -inf)
//   coef_sum Σ coef_c
// so that lse = ref + log(sum_exp) and
//   Σ coef_c (lse - x_c) = coef_sum * log(sum_exp) - coef_dot.
// The right-hand side is a sum of two non-negative terms when coef >= 0 (x_c
// <= ref), so label smoothing and probability targets lose no precision to
// cancellation even at large logit offsets, where `lse * Σcoef - Σ coef x`
// would lose ~|lse| ulps. coef_c is w_c for label smoothing and w_c q_c for
// probability targets. Merging two partial rows rescales to the larger ref:
// one exp per chunk, never one per element.
template <typename acc_t>
struct RowStats {
  acc_t ref;
  acc_t sum_exp;
  acc_t coef_dot;
  acc_t coef_sum;
};

template <typename acc_t>
XENT_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Note [Rows of -inf]
// A chunk whose logits are all -inf contributes nothing to sum_exp but its
// coefficients still see the -inf logits (torch's smoothing term is +inf
// there, and 0 * -inf is nan). Shifting it by ref = -inf would make every
// x - ref a nan, so such a chunk is accumulated with shift 0 (see
// `accumulation_shift`) and merged without rescaling. A row of only -inf
// ends with m = log_sum = -inf and a nan loss, as in torch.
template <typename acc_t>
XENT_HD acc_t accumulation_shift(acc_t ref) {
  return ref == neg_inf<acc_t>() ? acc_t(0) : ref;
}

// Fold `b` (the later chunk) into `a`. The order of merges is fixed by the
// chunk order, so a row's result never depends on how chunks were spread
// across threads.
template <typename acc_t>
XENT_HD void merge(RowStats<acc_t>& a, const RowStats<acc_t>& b) {
  if (b.ref == neg_inf<acc_t>()) {  // b adds no probability mass
    a.coef_dot += b.coef_dot;
    a.coef_sum += b.coef_sum;
    return;
  }
  if (a.ref == neg_inf<acc_t>()) {  // a holds no probability mass
    a.ref = b.ref;
    a.sum_exp = b.sum_exp;
    a.coef_dot += b.coef_dot;
    a.coef_sum += b.coef_sum;
    return;
  }
  // nan-propagating max: a nan ref must poison the row, as in torch.
  const acc_t m = (a.ref != a.ref || a.ref > b.ref) ? a.ref : b.ref;
  const acc_t da = a.ref - m;
  const acc_t db = b.ref - m;
  a.sum_exp = a.sum_exp * std::exp(da) + b.sum_exp * std::exp(db);
  a.coef_dot = (a.coef_dot + a.coef_sum * da) + (b.coef_dot + b.coef_sum * db);
  a.coef_sum += b.coef_sum;
  a.ref = m;
}

// Note [Row max and log-sum apart]
// What the backward (and the gradient computed in the forward) forms softmax
// from is kept per row as two float64 numbers, row_stats = (m, log_sum): m
// the row's largest logit (an input value, so exact in the accumulation
// type; -inf for a row of only -inf, nan when the row holds a nan) and
// log_sum = log Σ exp(x - m). Softmax is then exp((x - m) - log_sum), in
// that order and in the accumulation type, as torch's log_softmax forms its
// output (x - max - log(sum)). Folding the two into one lse = m + log_sum
// would lose log_sum to rounding as soon as |m| is large against it: the sum
// of a large m and a number of order log(C) keeps only the bits of log_sum
// above m's last place, so a row [M, M, 0] would get softmax [0, 1, 0] rather
// than [1/2, 1/2, 0] once M is large enough, in any precision. Kept apart,
// x - m is exact near the maximum (Sterbenz) and log_sum keeps all its bits,
// whatever the offset of the row. The loss already uses the same split,
// (m - x_y) + log_sum (index_row_nll).
//
// Note [One log per row]
// Both the loss and the saved log_sum need log(sum_exp). It is taken once per
// row, in double: the saved log_sum is it, and the loss uses
// acc_t(log_sum), which is at least as accurate as a log in acc_t. sum_exp is
// in [1, C] for any row with a finite maximum, so log_sum is small and exact
// enough either way. Taking it once matters for short rows, where two scalar
// logs per row are a large share of the CPU forward, so the CPU's column
// walks take it for a group of rows with one vector log
// (csrc/cpu/kernel/stats.h, row_logs).
//
// Note [Log in the accumulation type]
// Those column walks take the log in acc_t: for fp32 that is eight rows per
// AVX2 instruction sequence instead of four in double, and a vector log in
// double still shows in a short-row forward. sum_exp is itself an
// fp32 sum, so its log in fp32 (Sleef: within 1 ulp) adds at most an ulp of
// log(C) to a loss already rounded to fp32, and the softmax exp((x - m) -
// log_sum) moves by about as much, relative. Rows walked one at a time (long
// rows) keep the double log: one per row costs nothing there.
XENT_HD double row_log(double sum_exp) {
  return std::log(sum_exp);
}

// A row's saved statistics (Note [Row max and log-sum apart]) in the
// accumulation type, as the backward reads them.
template <typename acc_t>
struct SoftmaxShift {
  acc_t max;      // m
  acc_t log_sum;  // log Σ exp(x - m)
};

template <typename acc_t>
XENT_HD SoftmaxShift<acc_t> softmax_shift(double max, double log_sum) {
  return {static_cast<acc_t>(max), static_cast<acc_t>(log_sum)};
}

// log softmax of one logit: (x - m) - log_sum, in this order.
template <typename acc_t>
XENT_HD acc_t log_softmax(acc_t x, const SoftmaxShift<acc_t>& s) {
  return (x - s.max) - s.log_sum;
}

// Whether every softmax value of the row is finite (so 0 * softmax is 0).
XENT_HD bool finite_softmax(double max, double log_sum) {
  return std::isfinite(max) && std::isfinite(log_sum);
}

// Note [Kept exps and the row statistics]
// A gradient formed from exps kept over a chunk, e_c = exp(x_c - shift) with
// shift the chunk's accumulation_shift, reaches softmax as e_c times this
// factor, exp((shift - m) - log_sum): the same split as log_softmax, with
// shift - m exact whenever it is small. A chunk of only -inf logits (shift 0)
// kept e_c = 0; its softmax is 0 when the row has a finite maximum, and the
// factor must then be 0 too, not exp(-m - log_sum), which overflows for a
// very negative m and would make 0 * inf a nan.
XENT_HD double kept_exp_factor(double chunk_ref, double max, double log_sum) {
  if (chunk_ref == neg_inf<double>() && std::isfinite(max)) {
    return 0.0;
  }
  return std::exp((accumulation_shift(chunk_ref) - max) - log_sum);
}

// Loss of one row with a class-index target (torch's nll + label smoothing,
// docs/semantics.md §5.2):
//   (1 - eps) * nll + (eps / C) * smooth,
//   nll = w_y * (lse - x_y),  smooth = Σ_c w_c (lse - x_c).
// (lse - x_y) is formed as (ref - x_y) + log(sum_exp): both parts are exact
// or small, so a large logit offset costs no accuracy. log_sum is
// row_log(sum_exp) (Note [One log per row]).
template <typename acc_t>
XENT_HD acc_t index_row_nll(const RowStats<acc_t>& st, acc_t log_sum, acc_t x_target, acc_t w_target) {
  return w_target * ((st.ref - x_target) + log_sum);
}

// Σ_c coef_c (lse - x_c) of one row (Note [Row statistics]): the smoothing
// term of a class-index target (coef_c = w_c) and the whole loss of a
// probability target (coef_c = w_c q_c, q = target * (1 - eps) + eps / C).
template <typename acc_t>
XENT_HD acc_t coef_row_loss(const RowStats<acc_t>& st, acc_t log_sum) {
  return st.coef_sum * log_sum - st.coef_dot;
}

// Note [Smoothing off]
// Without smoothing the nll is used alone, not multiplied by (1 - 0): an inf
// nll must stay inf, and the smoothing term (inf when a logit is -inf) must
// not enter at all, or 0 * inf would turn the loss into nan.
template <typename T>
XENT_HD T smoothed_loss(T nll, T smooth, T label_smoothing, int64_t num_classes) {
  return (T(1) - label_smoothing) * nll + (label_smoothing / T(num_classes)) * smooth;
}

template <typename acc_t>
XENT_HD acc_t index_row_loss(
    const RowStats<acc_t>& st,
    acc_t log_sum,
    acc_t x_target,
    acc_t w_target,
    acc_t label_smoothing,
    int64_t num_classes,
    bool smoothing) {
  const acc_t nll = index_row_nll(st, log_sum, x_target, w_target);
  return smoothing ? smoothed_loss(nll, coef_row_loss(st, log_sum), label_smoothing, num_classes) : nll;
}

// The reduced loss with smoothing, in torch's order: each part is reduced
// (and divided by the weighted-mean denominator) on its own, then combined.
// This matters at the edges: with every target weight 0 the nll part is
// 0/0 = nan and so is torch's loss, where (Σ loss) / 0 would give inf.
XENT_HD double reduced_smoothed_loss(
    double nll_sum, double smooth_sum, double denominator, double label_smoothing, int64_t num_classes) {
  return smoothed_loss(nll_sum / denominator, smooth_sum / denominator, label_smoothing, num_classes);
}

// Probability-target coefficient q_c = t_c * (1 - eps) + eps / C
// (docs/semantics.md §5.3).
template <typename acc_t>
struct SmoothedTarget {
  acc_t scale;  // 1 - eps
  acc_t shift;  // eps / C
};

template <typename acc_t>
XENT_HD SmoothedTarget<acc_t> smoothed_target(acc_t label_smoothing, int64_t num_classes) {
  if (label_smoothing > acc_t(0)) {
    return {acc_t(1) - label_smoothing, label_smoothing / acc_t(num_classes)};
  }
  return {acc_t(1), acc_t(0)};
}

// Backward of one row: grad_c = a * softmax_c - d * coef_c - (c == y ? b : 0).
// Derivation for index targets (docs/semantics.md §5.2), with
// s = grad_out * scale:
//   a = s ((1-eps) w_y + (eps/C) Σw),  b = s (1-eps) w_y,  d = s eps / C,
// coef_c = w_c (1 without a weight). For probability targets:
//   a = s Σ_c w_c q_c,  b = 0,  d = s,  coef_c = w_c q_c.
// An ignored row has a = b = d = 0 and still evaluates 0 * softmax, so a nan
// or +inf logit gives a nan gradient there, exactly as torch's
// log_softmax_backward does; kernels may write zeros directly when
// finite_softmax holds.
template <typename acc_t>
struct GradCoefs {
  acc_t a;
  acc_t b;
  acc_t d;
};

template <typename acc_t>
XENT_HD GradCoefs<acc_t> index_grad_coefs(
    acc_t grad_scaled,  // grad_out * (1 / total_weight for mean, else 1)
    bool valid,
    acc_t w_target,
    acc_t weight_sum,
    acc_t label_smoothing,
    int64_t num_classes) {
  if (!valid) {
    return {acc_t(0), acc_t(0), acc_t(0)};
  }
  // Note [Smoothing off] applies here too: no eps term without smoothing.
  if (!(label_smoothing > acc_t(0))) {
    const acc_t b = grad_scaled * w_target;
    return {b, b, acc_t(0)};
  }
  const acc_t d = grad_scaled * (label_smoothing / acc_t(num_classes));
  const acc_t b = grad_scaled * ((acc_t(1) - label_smoothing) * w_target);
  return {b + d * weight_sum, b, d};
}

// The logit map of Note [Logit scale, softcap and z-loss] and its slope, in
// the accumulation type. With softcap on, z = cap * tanh(x * inner) with
// inner = logit_scale / softcap (one product rather than a product and a
// quotient; the two differ by an ulp of the argument) and dz/dx = logit_scale
// * (1 - t^2) with t = tanh(x * inner): torch's tanh backward forms the same
// 1 - t^2. Kernels specialize on maps_logits(): without a map they read x as
// z, so the default path does no extra arithmetic.
template <typename acc_t>
struct LogitMap {
  acc_t scale;  // logit_scale
  acc_t cap;    // softcap; 0: off
  acc_t inner;  // logit_scale / softcap; 0 when off

  XENT_HD acc_t operator()(acc_t x) const {
    return cap != acc_t(0) ? cap * std::tanh(x * inner) : x * scale;
  }
  XENT_HD acc_t slope(acc_t x) const {
    if (cap == acc_t(0)) {
      return scale;
    }
    const acc_t t = std::tanh(x * inner);
    return scale * (acc_t(1) - t * t);
  }
};

template <typename acc_t>
XENT_HD LogitMap<acc_t> logit_map(const Extras& e) {
  return {static_cast<acc_t>(e.logit_scale), static_cast<acc_t>(e.softcap),
          e.softcap != 0.0 ? static_cast<acc_t>(e.logit_scale / e.softcap) : acc_t(0)};
}

// Note [Z-loss]
// z_loss * lse^2 per counted row, lse = m + log_sum from the row statistics
// (Note [Row max and log-sum apart]); formed in double, where a large m
// costs log_sum no bits, and rounded once. Its gradient with respect to z_c
// is 2 * z_loss * lse * softmax_c times the row's upstream gradient: a term
// of the softmax coefficient `a` (GradCoefs), so the gradient walks are the
// same with or without it. An ignored row has neither (its upstream gradient
// for the z-loss is 0). 'mean' divides the z-loss sum by the number of
// counted rows (every row for probability targets), not by the weighted
// denominator of the cross-entropy part.
XENT_HD double row_lse(double max, double log_sum) {
  return max + log_sum;
}

template <typename acc_t>
XENT_HD acc_t z_loss_term(double z_loss, double max, double log_sum) {
  const double lse = row_lse(max, log_sum);
  return static_cast<acc_t>(z_loss * lse * lse);
}

// What the z-loss adds to GradCoefs::a of a row whose z-loss upstream
// gradient is grad_z (0 for an ignored row).
template <typename acc_t>
XENT_HD acc_t z_loss_softmax_coef(acc_t grad_z, double z_loss, double max, double log_sum) {
  return grad_z * static_cast<acc_t>(2.0 * z_loss * row_lse(max, log_sum));
}

}  // namespace math
}  // namespace xent_ext
