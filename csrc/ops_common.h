// Argument checks and output allocation shared by the CPU (cpu/ops_cpu.cpp) and
// CUDA (cuda/ops_cuda.cpp) op wrappers: one definition of what a valid call
// of each op is, so both devices reject the same inputs with the same words.
#pragma once

#include "common/xent_math.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <optional>

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

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
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

inline Tensor loss_output(const Tensor& input, int64_t reduction) {
  if (reduction == kReductionNone) {
    return at::empty({input.size(0), input.size(2)}, input.options());
  }
  return at::empty({}, input.options());
}

inline void check_same_device(const Tensor& t, const Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

inline void check_grad_loss(const Tensor& grad_loss, const Tensor& input, int64_t reduction, const char* op) {
  check_same_device(grad_loss, input, "grad_loss", op);
  TORCH_CHECK(grad_loss.scalar_type() == input.scalar_type(), op, ": grad_loss has dtype ",
              grad_loss.scalar_type(), " but input has ", input.scalar_type());
  if (reduction == kReductionNone) {
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == input.size(0) && grad_loss.size(1) == input.size(2),
                op, ": expected grad_loss of shape [", input.size(0), ", ", input.size(2), "], got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": expected a scalar grad_loss, got shape ", grad_loss.sizes());
  }
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

// What each op's arguments must satisfy, on either device (the device-specific
// wrappers call these first).
inline void check_forward_args(const Tensor& input, int64_t reduction, const char* op) {
  check_input(input, op);
  check_reduction(reduction, op);
}

inline void check_fused_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kReductionMean || reduction == kReductionSum, op,
              ": reduction must be 1 (mean) or 2 (sum): with 'none' the upstream gradient differs per row, got ",
              reduction);
}

inline void check_index_backward_args(const Tensor& grad_loss, const Tensor& input, const Tensor& lse,
                                      const Tensor& total_weight, int64_t reduction, const char* op) {
  check_forward_args(input, reduction, op);
  check_grad_loss(grad_loss, input, reduction, op);
  check_row_stat(lse, input, at::kDouble, "lse", op);
  check_total_weight(total_weight, input, op);
}

inline void check_prob_backward_args(const Tensor& grad_loss, const Tensor& input, const Tensor& lse,
                                     const Tensor& coef_sum, int64_t reduction, const char* op) {
  check_forward_args(input, reduction, op);
  check_grad_loss(grad_loss, input, reduction, op);
  check_row_stat(lse, input, at::kDouble, "lse", op);
  check_row_stat(coef_sum, input, accumulation_dtype(input.scalar_type()), "coef_sum", op);
}

// Note [Target check on the GPU]
// Whether the CUDA forward checks class indices with one host sync after its
// kernels (Note [Bad targets on the GPU], cuda/kernels.cu). On by default;
// XENT_EXT_CUDA_TARGET_CHECK=0 at import, or xent_ext.set_cuda_target_check,
// turns it off. Defined in ops.cpp.
std::atomic<bool>& cuda_target_check();

}  // namespace ops
}  // namespace xent_ext
