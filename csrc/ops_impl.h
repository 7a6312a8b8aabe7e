// The op implementations, written once for every device: each op's C++
// signature (its schema is in ops.cpp), its prologue (ops_common.h), the
// device's kernel call, and its results. A device supplies a struct with
//
//   static Tensor gradient(const Tensor& like);   // allocates a gradient
//   static void index_forward(const IndexForwardCall&);
//   static void index_backward(const IndexBackwardCall&);
//   static void prob_forward(const ProbForwardCall&);
//   static void prob_backward(const ProbBackwardCall&);
//
// (cross_entropy_prob_forward_with_grad runs prob_forward, then
// prob_backward for an upstream gradient of 1; the *_grad_into_ forwards do
// the same with the gradient written into the input, so a device's kernels
// must read each logit before they write its gradient.)
//
// and registers the ops with `register_device_ops<Device>(m)` in its
// TORCH_LIBRARY_IMPL block (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp). Include it
// from one translation unit per device, inside no namespace of its own: the
// device struct lives in that unit's anonymous namespace, and so do these
// instantiations.
#pragma once

#include "ops_common.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace xent_ext {
namespace ops {

template <typename Device>
struct DeviceOps {
  static std::tuple<Tensor, Tensor, Tensor> index_forward(
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      int64_t ignore_index,
      double label_smoothing,
      int64_t reduction,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_index_forward";
    const IndexForwardCall c =
        index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype,
                               make_extras(logit_scale, softcap, z_loss, op), /*with_grad=*/false, op);
    Device::index_forward(c);
    return {c.out.loss, c.out.row_stats, c.out.total_weight};
  }

  // The forward that also writes the gradient for an upstream gradient of 1
  // (Note [Gradient in the forward], csrc/cpu/kernel/entry.h).
  static std::tuple<Tensor, Tensor, Tensor, Tensor> index_forward_with_grad(
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      int64_t ignore_index,
      double label_smoothing,
      int64_t reduction,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_index_forward_with_grad";
    const IndexForwardCall c =
        index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype,
                               make_extras(logit_scale, softcap, z_loss, op), /*with_grad=*/true, op,
                               Device::gradient);
    Device::index_forward(c);
    return {c.out.loss, c.out.row_stats, c.out.total_weight, c.out.grad_input};
  }

  // The same, with the gradient written into `input` (inplace_backward): the
  // kernels read each logit before they write its gradient.
  static std::tuple<Tensor, Tensor, Tensor> index_forward_grad_into_(
      Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      int64_t ignore_index,
      double label_smoothing,
      int64_t reduction,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_index_forward_grad_into_";
    const Extras extras = make_extras(logit_scale, softcap, z_loss, op);
    check_gradient_into_input(input, op);
    const IndexForwardCall c = index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction,
                                                      loss_dtype, extras, /*with_grad=*/true, op, gradient_into_input);
    Device::index_forward(c);
    return {c.out.loss, c.out.row_stats, c.out.total_weight};
  }

  static Tensor index_backward(
      const Tensor& grad_loss,
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      const Tensor& row_stats,
      const Tensor& total_weight,
      int64_t ignore_index,
      double label_smoothing,
      int64_t reduction,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_index_backward";
    const IndexBackwardCall c =
        index_backward_prologue(grad_loss, input, target, weight, row_stats, total_weight, ignore_index, label_smoothing,
                                reduction, make_extras(logit_scale, softcap, z_loss, op), op, Device::gradient);
    Device::index_backward(c);
    return c.grad_input;
  }

  static std::tuple<Tensor, Tensor, Tensor> prob_forward(
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      double label_smoothing,
      int64_t reduction,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_prob_forward";
    const ProbForwardCall c = prob_forward_prologue(input, target, weight, label_smoothing, reduction, loss_dtype,
                                                    make_extras(logit_scale, softcap, z_loss, op), op);
    Device::prob_forward(c);
    return {c.out.loss, c.out.row_stats, c.out.coef_sum};
  }

  // The probability forward, then the backward's kernel for an upstream
  // gradient of 1 on the forward's results (ops_common.h,
  // prob_unit_backward_call): two passes over the logits, one op, so that the
  // first backward of autograd reads only its results (Note [Gradient in the
  // forward], xent_ext/_ops.py).
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prob_forward_with_grad(
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      double label_smoothing,
      int64_t reduction,
      bool input_grad,
      bool target_grad,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_prob_forward_with_grad";
    const ProbForwardCall c = prob_forward_prologue(input, target, weight, label_smoothing, reduction, loss_dtype,
                                                    make_extras(logit_scale, softcap, z_loss, op), op);
    Device::prob_forward(c);
    const ProbBackwardCall b = prob_unit_backward_call(c, input_grad, target_grad, Device::gradient);
    if (input_grad || target_grad) {
      Device::prob_backward(b);
    }
    const auto [grad_input, grad_target] = prob_backward_result(b.out, c.input);
    return {c.out.loss, c.out.row_stats, c.out.coef_sum, grad_input, grad_target};
  }

  // The same, with the input's gradient written into `input`
  // (inplace_backward). The target's gradient, when asked for, reads the
  // logits, so its kernel runs first; then the input's, which reads each logit
  // before it writes its gradient.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> prob_forward_grad_into_(
      Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      double label_smoothing,
      int64_t reduction,
      bool target_grad,
      std::optional<at::ScalarType> loss_dtype,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_prob_forward_grad_into_";
    const Extras extras = make_extras(logit_scale, softcap, z_loss, op);
    check_gradient_into_input(input, op);
    const ProbForwardCall c =
        prob_forward_prologue(input, target, weight, label_smoothing, reduction, loss_dtype, extras, op);
    Device::prob_forward(c);
    const ProbBackwardCall for_target = prob_unit_backward_call(c, /*input_grad=*/false, target_grad, Device::gradient);
    if (target_grad) {
      Device::prob_backward(for_target);
    }
    const ProbBackwardCall for_input =
        prob_unit_backward_call(c, /*input_grad=*/true, /*target_grad=*/false, gradient_into_input);
    Device::prob_backward(for_input);
    const auto [unused, grad_target] = prob_backward_result(for_target.out, c.input);
    return {c.out.loss, c.out.row_stats, c.out.coef_sum, grad_target};
  }

  static std::tuple<Tensor, Tensor> prob_backward(
      const Tensor& grad_loss,
      const Tensor& input,
      const Tensor& target,
      const std::optional<Tensor>& weight,
      const Tensor& row_stats,
      const Tensor& coef_sum,
      double label_smoothing,
      int64_t reduction,
      bool input_grad,
      bool target_grad,
      double logit_scale,
      std::optional<double> softcap,
      double z_loss) {
    const char* op = "xent_ext::cross_entropy_prob_backward";
    const ProbBackwardCall c =
        prob_backward_prologue(grad_loss, input, target, weight, row_stats, coef_sum, label_smoothing, reduction, input_grad,
                               target_grad, make_extras(logit_scale, softcap, z_loss, op), op, Device::gradient);
    if (input_grad || target_grad) {
      Device::prob_backward(c);
    }
    return prob_backward_result(c.out, c.input);
  }
};

template <typename Device>
void register_device_ops(torch::Library& m) {
  m.impl("cross_entropy_index_forward", &DeviceOps<Device>::index_forward);
  m.impl("cross_entropy_index_forward_with_grad", &DeviceOps<Device>::index_forward_with_grad);
  m.impl("cross_entropy_index_backward", &DeviceOps<Device>::index_backward);
  m.impl("cross_entropy_prob_forward", &DeviceOps<Device>::prob_forward);
  m.impl("cross_entropy_prob_backward", &DeviceOps<Device>::prob_backward);
  m.impl("cross_entropy_prob_forward_with_grad", &DeviceOps<Device>::prob_forward_with_grad);
  m.impl("cross_entropy_index_forward_grad_into_", &DeviceOps<Device>::index_forward_grad_into_);
  m.impl("cross_entropy_prob_forward_grad_into_", &DeviceOps<Device>::prob_forward_grad_into_);
}

}  // namespace ops
}  // namespace xent_ext
