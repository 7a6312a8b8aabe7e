// What every xent_ext operator does before its kernel, on any device: the
// argument checks (one definition of a valid call, so the CPU and CUDA ops
// reject the same inputs with the same words), the canonical target and
// weight, and the outputs, allocated. Each op's prologue below returns them
// as one struct; the device wrappers (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp)
// add only what is theirs and call the kernel. The output shapes are also
// the Meta kernels' (ops.cpp), which torch.compile's fake tensors run.
#pragma once

#include "common/xent_math.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

namespace xent_ext {
namespace ops {

using at::Tensor;

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 3, op, ": expected input of shape (N, C, K), got ", input.sizes());
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": expected float64, float32, bfloat16 or float16 input, got ", t);
}

// Note [Loss dtype]
// Every forward takes loss_dtype: None (or the input's own dtype) writes the
// loss in the input's dtype; the accumulation dtype (Note [Accumulation
// dtype]) writes it in that, straight from the kernels' accumulators. That is
// what autocast asks of cross-entropy (torch runs it in fp32): bf16 or fp16
// logits are read as they are and give an fp32 loss, with no fp32 copy of the
// logits. The gradient is always in the input's dtype, and the backward ops
// take an upstream gradient of either dtype.
inline at::ScalarType loss_dtype_of(const Tensor& input, std::optional<at::ScalarType> loss_dtype) {
  return loss_dtype.value_or(input.scalar_type());
}

inline void check_loss_dtype(const Tensor& input, std::optional<at::ScalarType> loss_dtype, const char* op) {
  if (!loss_dtype.has_value()) {
    return;
  }
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(*loss_dtype == t || *loss_dtype == accumulation_dtype(t), op,
              ": loss_dtype must be None, the input's dtype (", t, ") or its accumulation dtype (",
              accumulation_dtype(t), "), got ", *loss_dtype);
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The LLM extras (Note [Logit scale, softcap and z-loss], common/xent_math.h)
// as the ops take them: softcap None is off. Invalid values are a ValueError
// in Python (TORCH_CHECK_VALUE); the front end checks them first with its own
// words, so these guard direct callers of the ops.
inline Extras make_extras(double logit_scale, std::optional<double> softcap, double z_loss, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale != 0.0, op,
                    ": logit_scale must be finite and non-zero, got ", logit_scale);
  TORCH_CHECK_VALUE(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0.0), op,
                    ": softcap must be None or a finite number > 0, got ", softcap.value_or(0.0));
  TORCH_CHECK_VALUE(std::isfinite(z_loss) && z_loss >= 0.0, op,
                    ": z_loss must be a finite number >= 0, got ", z_loss);
  Extras e;
  e.logit_scale = logit_scale;
  e.softcap = softcap.value_or(0.0);
  e.z_loss = z_loss;
  return e;
}

// Note [Z-loss denominator]
// 'mean' divides the z-loss sum by the number of rows that count (Note
// [Z-loss]). For class-index targets without a weight that is the total
// weight the kernels already sum; with a weight it is counted here, a 0-d
// tensor of the accumulation dtype on the input's device (two small ATen ops,
// no host sync), only when the z-loss is on and reduced by 'mean'.
// Probability targets count every row (N * K).
inline Tensor z_loss_count(const Tensor& target, const Tensor& weight, int64_t ignore_index, const Extras& extras,
                           int64_t reduction, at::ScalarType acc) {
  if (!extras.has_z_loss() || reduction != kReductionMean || !weight.defined()) {
    return Tensor();
  }
  return target.ne(ignore_index).sum(acc);
}

// The gradient written into the logits themselves (the *_grad_into_ ops,
// inplace_backward): any strides, but no two elements may share memory.
inline Tensor gradient_into_input(const Tensor& input) {
  return input;
}

inline void check_gradient_into_input(const Tensor& input, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
              ": the gradient cannot be written into an input whose elements share memory (an expanded "
              "tensor); make it contiguous first");
}

// Class weights as a contiguous (C,) tensor of the accumulation dtype.
inline Tensor canonical_weight(const std::optional<Tensor>& weight, const Tensor& input, const char* op) {
  if (!weight.has_value() || !weight->defined()) {
    return Tensor();
  }
  const int64_t C = input.size(1);
  TORCH_CHECK(weight->dim() == 1 && weight->numel() == C, op,
              ": weight tensor should be defined either for all ", C,
              " classes or no classes but got weight tensor of shape: ", weight->sizes());
  TORCH_CHECK(weight->device() == input.device(), op, ": weight is on ", weight->device(),
              " but input is on ", input.device());
  return weight->to(accumulation_dtype(input.scalar_type())).contiguous();
}

// (N, K) int64 class indices; uint8 is widened (O(N), cheap).
inline Tensor canonical_index_target(const Tensor& target, const Tensor& input, const char* op) {
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
              ": expected target dtype to be Long or Byte, but got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == input.size(0) && target.size(1) == input.size(2), op,
              ": expected target of shape [", input.size(0), ", ", input.size(2), "], got ", target.sizes());
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but input is on ", input.device());
  return target.scalar_type() == at::kLong ? target : target.to(at::kLong);
}

inline void check_same_device(const Tensor& t, const Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

// grad_loss: of the input's dtype or of the accumulation dtype (the loss's
// under autocast, Note [Loss dtype]).
inline void check_grad_loss(const Tensor& grad_loss, const Tensor& input, int64_t reduction, const char* op) {
  check_same_device(grad_loss, input, "grad_loss", op);
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(grad_loss.scalar_type() == t || grad_loss.scalar_type() == accumulation_dtype(t), op,
              ": expected grad_loss of the input's dtype (", t, ") or its accumulation dtype (",
              accumulation_dtype(t), "), got ", grad_loss.scalar_type());
  if (reduction == kReductionNone) {
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == input.size(0) && grad_loss.size(1) == input.size(2),
                op, ": expected grad_loss of shape [", input.size(0), ", ", input.size(2), "], got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": expected a scalar grad_loss, got shape ", grad_loss.sizes());
  }
}

// row_stats: the (2, N, K) float64 statistics the forward returned (Note [Row
// max and log-sum apart], common/xent_math.h).
inline void check_row_stats(const Tensor& row_stats, const Tensor& input, const char* op) {
  check_same_device(row_stats, input, "row_stats", op);
  TORCH_CHECK(row_stats.scalar_type() == at::kDouble && row_stats.dim() == 3 && row_stats.size(0) == 2 &&
                  row_stats.size(1) == input.size(0) && row_stats.size(2) == input.size(2),
              op, ": expected row_stats of dtype Double and shape [2, ", input.size(0), ", ", input.size(2),
              "] (as returned by the forward), got ", row_stats.scalar_type(), " ", row_stats.sizes());
}

inline void check_row_stat(const Tensor& t, const Tensor& input, at::ScalarType dtype, const char* name, const char* op) {
  check_same_device(t, input, name, op);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == input.size(0) && t.size(1) == input.size(2),
              op, ": expected ", name, " of dtype ", dtype, " and shape [", input.size(0), ", ", input.size(2),
              "], got ", t.scalar_type(), " ", t.sizes());
}

inline void check_total_weight(const Tensor& total_weight, const Tensor& input, const char* op) {
  check_same_device(total_weight, input, "total_weight", op);
  TORCH_CHECK(total_weight.numel() == 1 && total_weight.scalar_type() == accumulation_dtype(input.scalar_type()),
              op, ": total_weight must be the 0-d tensor returned by the forward");
}

inline Tensor canonical_prob_target(const Tensor& target, const Tensor& input, const char* op) {
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": expected probability target of shape ", input.sizes(),
              ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), op, ": expected probability target of dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but input is on ", input.device());
  return target;
}

// What each op's arguments must satisfy, on either device (the prologues
// below call these first).
inline void check_forward_args(const Tensor& input, int64_t reduction, const char* op) {
  check_input(input, op);
  check_reduction(reduction, op);
}

inline void check_forward_args(const Tensor& input, int64_t reduction, std::optional<at::ScalarType> loss_dtype,
                               const char* op) {
  check_forward_args(input, reduction, op);
  check_loss_dtype(input, loss_dtype, op);
}

inline void check_index_backward_args(const Tensor& grad_loss, const Tensor& input, const Tensor& row_stats,
                                      const Tensor& total_weight, int64_t reduction, const char* op) {
  check_forward_args(input, reduction, op);
  check_grad_loss(grad_loss, input, reduction, op);
  check_row_stats(row_stats, input, op);
  check_total_weight(total_weight, input, op);
}

inline void check_prob_backward_args(const Tensor& grad_loss, const Tensor& input, const Tensor& row_stats,
                                     const Tensor& coef_sum, int64_t reduction, const char* op) {
  check_forward_args(input, reduction, op);
  check_grad_loss(grad_loss, input, reduction, op);
  check_row_stats(row_stats, input, op);
  check_row_stat(coef_sum, input, accumulation_dtype(input.scalar_type()), "coef_sum", op);
}

// ---------------------------------------------------------------------------
// Outputs: each op's result shapes and dtypes, the one definition (the CPU and
// CUDA prologues below, the Meta kernels in ops.cpp; xent_ext/_ops.py relies
// on the Meta kernels for fake tensors). Sizes are read as SymInts, so that
// the Meta kernels also trace symbolic (dynamic) shapes.

// Allocates a gradient shaped like its tensor, keeping its memory format
// (channels-last stays channels-last), so the gradient is written in the
// order the logits are read. The CPU ops pass their own (Note [Huge pages
// for the gradient], cpu/ops_cpu.cpp).
using GradientAllocator = Tensor (*)(const Tensor&);

inline Tensor empty_gradient(const Tensor& t) {
  return at::empty_like(t);
}

// (N, K) per-row values of `dtype`.
inline Tensor row_output(const Tensor& input, at::ScalarType dtype) {
  return at::empty_symint({input.sym_size(0), input.sym_size(2)}, input.options().dtype(dtype));
}

// (2, N, K) float64: row_stats[0] the row max, row_stats[1] the log-sum
// (Note [Row max and log-sum apart], common/xent_math.h).
inline Tensor row_stats_output(const Tensor& input) {
  return at::empty_symint({2, input.sym_size(0), input.sym_size(2)}, input.options().dtype(at::kDouble));
}

// 'none': (N, K); 'mean' and 'sum': 0-d; of dtype `dtype` (loss_dtype_of).
inline Tensor loss_output(const Tensor& input, int64_t reduction, at::ScalarType dtype) {
  if (reduction == kReductionNone) {
    return row_output(input, dtype);
  }
  return at::empty({}, input.options().dtype(dtype));
}

struct IndexForwardOutputs {
  Tensor loss;          // 'none': (N, K) contiguous; else 0-d; loss_dtype (Note [Loss dtype])
  Tensor row_stats;     // (2, N, K) float64, contiguous: [row max, log Σ exp(x - max)]
  Tensor total_weight;  // 0-d accumulation dtype: Σ w[y] over the rows not ignored
  Tensor grad_input;    // the *_with_grad forward only: d(loss)/d(input) for an upstream
                        // gradient of 1 ('none': d(Σ_rows loss)/d(input)), (N, C, K); else undefined
};

inline IndexForwardOutputs index_forward_outputs(const Tensor& input, int64_t reduction, bool with_grad,
                                                 std::optional<at::ScalarType> loss_dtype,
                                                 GradientAllocator gradient = empty_gradient) {
  IndexForwardOutputs out;
  out.loss = loss_output(input, reduction, loss_dtype_of(input, loss_dtype));
  out.row_stats = row_stats_output(input);
  out.total_weight = at::empty({}, input.options().dtype(accumulation_dtype(input.scalar_type())));
  if (with_grad) {
    out.grad_input = gradient(input);
  }
  return out;
}

struct ProbForwardOutputs {
  Tensor loss;      // as IndexForwardOutputs::loss
  Tensor row_stats;  // as IndexForwardOutputs::row_stats
  Tensor coef_sum;  // (N, K) accumulation dtype, contiguous: Σ_c w_c q_c
};

inline ProbForwardOutputs prob_forward_outputs(const Tensor& input, int64_t reduction,
                                               std::optional<at::ScalarType> loss_dtype) {
  return {loss_output(input, reduction, loss_dtype_of(input, loss_dtype)), row_stats_output(input),
          row_output(input, accumulation_dtype(input.scalar_type()))};
}

struct ProbBackwardOutputs {
  Tensor grad_input;   // undefined when not asked for
  Tensor grad_target;  // undefined when not asked for
};

inline ProbBackwardOutputs prob_backward_outputs(const Tensor& input, const Tensor& target, bool input_grad,
                                                 bool target_grad, GradientAllocator gradient = empty_gradient) {
  return {input_grad ? gradient(input) : Tensor(), target_grad ? gradient(target) : Tensor()};
}

// A gradient that was not asked for comes back as an empty tensor: op schemas
// cannot return None.
inline std::tuple<Tensor, Tensor> prob_backward_result(const ProbBackwardOutputs& out, const Tensor& input) {
  const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, input.options()); };
  return {or_empty(out.grad_input), or_empty(out.grad_target)};
}

// ---------------------------------------------------------------------------
// Prologues: one per op, for every device. Each checks the arguments (in the
// order that decides which error a call with several faults gets), makes
// the target and weight canonical, makes the row statistics contiguous and
// allocates the outputs. The result is what the device kernels take
// (cpu/kernel_api.h; cuda/ops_cuda.cpp turns it into cuda/kernel_api.h's
// plain structs).

struct IndexForwardCall {
  Tensor input;   // (N, C, K), any strides
  Tensor target;  // (N, K) int64, any strides (not yet range-checked)
  Tensor weight;  // (C,) accumulation dtype, contiguous; or undefined
  int64_t ignore_index;
  double label_smoothing;  // <= 0 means off
  int64_t reduction;       // torch's enum (Reduction in common/xent_math.h)
  at::ScalarType loss_dtype;  // the loss's: the input's or the accumulation dtype (Note [Loss dtype])
  Extras extras;              // Note [Logit scale, softcap and z-loss]
  Tensor z_loss_count;        // Note [Z-loss denominator]: 0-d acc, or undefined (use the total weight)
  IndexForwardOutputs out;    // out.grad_input may be the input itself (the *_grad_into_ op)
};

// with_grad: the *_with_grad forward, which also writes the input gradient
// for an upstream gradient of 1 (for 'none', of 1 on every row).
inline IndexForwardCall index_forward_prologue(const Tensor& input, const Tensor& target,
                                               const std::optional<Tensor>& weight, int64_t ignore_index,
                                               double label_smoothing, int64_t reduction,
                                               std::optional<at::ScalarType> loss_dtype, const Extras& extras,
                                               bool with_grad, const char* op,
                                               GradientAllocator gradient = empty_gradient) {
  check_forward_args(input, reduction, loss_dtype, op);
  IndexForwardCall c;
  c.input = input;
  c.target = canonical_index_target(target, input, op);
  c.weight = canonical_weight(weight, input, op);
  c.ignore_index = ignore_index;
  c.label_smoothing = label_smoothing;
  c.reduction = reduction;
  c.loss_dtype = loss_dtype_of(input, loss_dtype);
  c.extras = extras;
  c.z_loss_count = z_loss_count(c.target, c.weight, ignore_index, extras, reduction,
                                accumulation_dtype(input.scalar_type()));
  c.out = index_forward_outputs(input, reduction, with_grad, loss_dtype, gradient);
  return c;
}

struct IndexBackwardCall {
  Tensor grad_loss;  // 'none': (N, K) any strides; else 0-d; the input's or the accumulation dtype
  Tensor input;
  Tensor target;
  Tensor weight;
  Tensor row_stats;  // (2, N, K) float64, contiguous
  Tensor total_weight;
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  Extras extras;        // as IndexForwardCall::extras
  Tensor z_loss_count;  // as IndexForwardCall::z_loss_count
  Tensor grad_input;    // (N, C, K), the input's memory format (any non-overlapping strides)
};

inline IndexBackwardCall index_backward_prologue(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, const Tensor& row_stats,
                                                 const Tensor& total_weight, int64_t ignore_index,
                                                 double label_smoothing, int64_t reduction, const Extras& extras,
                                                 const char* op, GradientAllocator gradient = empty_gradient) {
  check_index_backward_args(grad_loss, input, row_stats, total_weight, reduction, op);
  IndexBackwardCall c;
  c.grad_loss = grad_loss;
  c.input = input;
  c.target = canonical_index_target(target, input, op);
  c.weight = canonical_weight(weight, input, op);
  c.row_stats = row_stats.contiguous();
  c.total_weight = total_weight;
  c.ignore_index = ignore_index;
  c.label_smoothing = label_smoothing;
  c.reduction = reduction;
  c.extras = extras;
  c.z_loss_count = z_loss_count(c.target, c.weight, ignore_index, extras, reduction,
                                accumulation_dtype(input.scalar_type()));
  c.grad_input = gradient(input);
  return c;
}

struct ProbForwardCall {
  Tensor input;
  Tensor target;  // (N, C, K) of the input's dtype, any strides
  Tensor weight;
  double label_smoothing;
  int64_t reduction;
  at::ScalarType loss_dtype;  // as IndexForwardCall::loss_dtype
  Extras extras;              // as IndexForwardCall::extras ('mean' divides the z-loss by N * K)
  ProbForwardOutputs out;
};

inline ProbForwardCall prob_forward_prologue(const Tensor& input, const Tensor& target,
                                             const std::optional<Tensor>& weight, double label_smoothing,
                                             int64_t reduction, std::optional<at::ScalarType> loss_dtype,
                                             const Extras& extras, const char* op) {
  check_forward_args(input, reduction, loss_dtype, op);
  ProbForwardCall c;
  c.input = input;
  c.target = canonical_prob_target(target, input, op);
  c.weight = canonical_weight(weight, input, op);
  c.label_smoothing = label_smoothing;
  c.reduction = reduction;
  c.loss_dtype = loss_dtype_of(input, loss_dtype);
  c.extras = extras;
  c.out = prob_forward_outputs(input, reduction, loss_dtype);
  return c;
}

struct ProbBackwardCall {
  Tensor grad_loss;
  Tensor input;
  Tensor target;
  Tensor weight;
  Tensor row_stats;  // (2, N, K) float64, contiguous
  Tensor coef_sum;   // contiguous
  double label_smoothing;
  int64_t reduction;
  Extras extras;     // as ProbForwardCall::extras
  ProbBackwardOutputs out;  // out.grad_input may be the input itself (the *_grad_into_ op)
};

inline ProbBackwardCall prob_backward_prologue(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                               const std::optional<Tensor>& weight, const Tensor& row_stats,
                                               const Tensor& coef_sum, double label_smoothing, int64_t reduction,
                                               bool input_grad, bool target_grad, const Extras& extras,
                                               const char* op, GradientAllocator gradient = empty_gradient) {
  check_prob_backward_args(grad_loss, input, row_stats, coef_sum, reduction, op);
  ProbBackwardCall c;
  c.grad_loss = grad_loss;
  c.input = input;
  c.target = canonical_prob_target(target, input, op);
  c.weight = canonical_weight(weight, input, op);
  c.row_stats = row_stats.contiguous();
  c.coef_sum = coef_sum.contiguous();
  c.label_smoothing = label_smoothing;
  c.reduction = reduction;
  c.extras = extras;
  c.out = prob_backward_outputs(input, c.target, input_grad, target_grad, gradient);
  return c;
}

// The gradients the probability forward with gradient
// (cross_entropy_prob_forward_with_grad) returns, as the backward computes
// them from the forward's results for an upstream gradient of 1: for 'none'
// that of the sum of the rows' losses, which is the gradient of each row's
// loss for an upstream gradient of 1 on every row.
inline ProbBackwardCall prob_unit_backward_call(const ProbForwardCall& f, bool input_grad, bool target_grad,
                                                GradientAllocator gradient = empty_gradient) {
  ProbBackwardCall c;
  c.grad_loss = at::ones({}, f.input.options());
  c.input = f.input;
  c.target = f.target;
  c.weight = f.weight;
  c.row_stats = f.out.row_stats;
  c.coef_sum = f.out.coef_sum;
  c.label_smoothing = f.label_smoothing;
  c.reduction = f.reduction == kReductionNone ? kReductionSum : f.reduction;
  c.extras = f.extras;
  c.out = prob_backward_outputs(f.input, f.target, input_grad, target_grad, gradient);
  return c;
}

// Note [Target check on the GPU]
// Whether the CUDA forward checks class indices with one host sync after its
// kernels (Note [Bad targets on the GPU], cuda/kernels.cu). On by default;
// XENT_EXT_CUDA_TARGET_CHECK=0 at import, or xent_ext.set_cuda_target_check,
// turns it off. Defined in ops.cpp.
std::atomic<bool>& cuda_target_check();

}  // namespace ops
}  // namespace xent_ext
