// xent_ext's operators: their schemas (TORCH_LIBRARY), the one definition of
// each op's arguments and results for every device, and their Meta kernels
// (output shapes only). The implementations are registered per device:
// csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp.
//
// Call flow: xent_ext.cross_entropy (Python: torch-identical argument checks,
// view as (N, C, K)) -> torch.ops.xent_ext.cross_entropy_*_forward ->
// dispatcher -> the CPU or CUDA implementation. Autograd is registered from
// Python (xent_ext/_ops.py); for C++ programs, include/xent_ext/xent_ext.h.
//
// This file, csrc/cpu and csrc/cuda make the C++ library (CMakeLists.txt);
// the Python extension adds csrc/python_module.cpp.
#include "ops_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>

namespace xent_ext {

std::atomic<bool>& ops::cuda_target_check() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

namespace {

using at::Tensor;
using namespace ops;

// Note [Meta kernels]
// What torch.compile, torch.export and opcheck trace the ops with (fake
// tensors run the Meta kernel), and what a call on 'meta' tensors returns:
// the outputs' shapes, dtypes and strides from the same allocation code as
// the CPU and CUDA ops (ops_common.h), with symbolic sizes. No argument
// checks: a traced call is checked when it runs.

std::tuple<Tensor, Tensor, Tensor> index_forward_meta(const Tensor& input, const Tensor&,
                                                      const std::optional<Tensor>&, int64_t, double, int64_t reduction,
                                                      std::optional<at::ScalarType> loss_dtype, double, std::optional<double>, double) {
  const IndexForwardOutputs out = index_forward_outputs(input, reduction, /*with_grad=*/false, loss_dtype);
  return {out.loss, out.row_stats, out.total_weight};
}

// The gradient goes into `input` (the schema's Tensor(a!)); the results are the forward's.
std::tuple<Tensor, Tensor, Tensor> index_forward_grad_into_meta(
    Tensor& input, const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, std::optional<at::ScalarType> loss_dtype, double logit_scale,
    std::optional<double> softcap, double z_loss) {
  return index_forward_meta(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, logit_scale,
                            softcap, z_loss);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> index_forward_with_grad_meta(
    const Tensor& input, const Tensor&, const std::optional<Tensor>&, int64_t, double, int64_t reduction,
    std::optional<at::ScalarType> loss_dtype, double, std::optional<double>, double) {
  const IndexForwardOutputs out = index_forward_outputs(input, reduction, /*with_grad=*/true, loss_dtype);
  return {out.loss, out.row_stats, out.total_weight, out.grad_input};
}

Tensor index_backward_meta(const Tensor&, const Tensor& input, const Tensor&, const std::optional<Tensor>&,
                           const Tensor&, const Tensor&, int64_t, double, int64_t, double, std::optional<double>, double) {
  return empty_gradient(input);
}

std::tuple<Tensor, Tensor, Tensor> prob_forward_meta(const Tensor& input, const Tensor&,
                                                     const std::optional<Tensor>&, double, int64_t reduction,
                                                     std::optional<at::ScalarType> loss_dtype, double, std::optional<double>, double) {
  const ProbForwardOutputs out = prob_forward_outputs(input, reduction, loss_dtype);
  return {out.loss, out.row_stats, out.coef_sum};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prob_forward_with_grad_meta(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>&, double, int64_t reduction,
    bool input_grad, bool target_grad, std::optional<at::ScalarType> loss_dtype, double, std::optional<double>, double) {
  const ProbForwardOutputs out = prob_forward_outputs(input, reduction, loss_dtype);
  const auto [grad_input, grad_target] =
      prob_backward_result(prob_backward_outputs(input, target, input_grad, target_grad), input);
  return {out.loss, out.row_stats, out.coef_sum, grad_input, grad_target};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> prob_forward_grad_into_meta(
    Tensor& input, const Tensor& target, const std::optional<Tensor>&, double, int64_t reduction, bool target_grad,
    std::optional<at::ScalarType> loss_dtype, double, std::optional<double>, double) {
  const ProbForwardOutputs out = prob_forward_outputs(input, reduction, loss_dtype);
  const auto [grad_input, grad_target] =
      prob_backward_result(prob_backward_outputs(input, target, /*input_grad=*/false, target_grad), input);
  return {out.loss, out.row_stats, out.coef_sum, grad_target};
}

std::tuple<Tensor, Tensor> prob_backward_meta(const Tensor&, const Tensor& input, const Tensor& target,
                                              const std::optional<Tensor>&, const Tensor&, const Tensor&, double,
                                              int64_t, bool input_grad, bool target_grad, double, std::optional<double>, double) {
  return prob_backward_result(prob_backward_outputs(input, target, input_grad, target_grad), input);
}

}  // namespace
}  // namespace xent_ext

// Note [Op schemas]
// Inputs are canonical: logits (N, C, K) with any strides, class-index
// targets (N, K), probability targets (N, C, K). The Python layer reshapes
// every torch-accepted shape to this. `reduction` uses torch's enum (0 none,
// 1 mean, 2 sum). Forwards return (loss, row_stats, aux): row_stats (2, N, K)
// float64 holds each row's max and log Σ exp(x - max) (Note [Row max and
// log-sum apart], common/xent_math.h), what the backward forms softmax
// from; aux is the weighted-mean denominator (index) or the per-row Σ w q
// (probability). The *_with_grad forwards also return the gradients for an
// upstream gradient of 1 (of 1 on every row for 'none': the gradient of the
// sum of the rows' losses); the probability one, as
// cross_entropy_prob_backward, those asked for by input_grad and target_grad,
// and empty tensors for the others.
// loss_dtype, on every forward: None for a loss in the input's dtype, the
// accumulation dtype for one in that (autocast; Note [Loss dtype],
// ops_common.h); the backward ops take a grad_loss of either dtype.
// The LLM extras (logit_scale, softcap, z_loss; Note [Logit scale, softcap
// and z-loss], common/xent_math.h) are trailing arguments of every op, with
// defaults that mean "off"; the backward ops take the forward's. The
// *_grad_into_ forwards write the gradient for an upstream gradient of 1 into
// `input` itself (Tensor(a!): inplace_backward, no logits-sized buffer); the
// probability one returns the target's gradient (asked for by target_grad,
// computed before the logits are overwritten) or an empty tensor. New options
// are appended the same way, which keeps old call sites valid.
TORCH_LIBRARY(xent_ext, m) {
  m.def(
      "cross_entropy_index_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor total_weight)");
  m.def(
      "cross_entropy_index_forward_with_grad(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor total_weight, Tensor grad_input)");
  m.def(
      "cross_entropy_index_forward_grad_into_(Tensor(a!) input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor total_weight)");
  m.def(
      "cross_entropy_index_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor row_stats, Tensor total_weight, int ignore_index, float label_smoothing, int reduction, "
      "float logit_scale=1.0, float? softcap=None, float z_loss=0.0) -> Tensor");
  m.def(
      "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int reduction, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor coef_sum)");
  m.def(
      "cross_entropy_prob_forward_with_grad(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int reduction, bool input_grad, bool target_grad, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor coef_sum, Tensor grad_input, Tensor grad_target)");
  m.def(
      "cross_entropy_prob_forward_grad_into_(Tensor(a!) input, Tensor target, Tensor? weight, "
      "float label_smoothing, int reduction, bool target_grad, ScalarType? loss_dtype=None, float logit_scale=1.0, float? softcap=None, float z_loss=0.0) "
      "-> (Tensor loss, Tensor row_stats, Tensor coef_sum, Tensor grad_target)");
  m.def(
      "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor row_stats, Tensor coef_sum, float label_smoothing, int reduction, bool input_grad, bool target_grad, "
      "float logit_scale=1.0, float? softcap=None, float z_loss=0.0) -> (Tensor grad_input, Tensor grad_target)");
}

TORCH_LIBRARY_IMPL(xent_ext, Meta, m) {
  m.impl("cross_entropy_index_forward", &xent_ext::index_forward_meta);
  m.impl("cross_entropy_index_forward_with_grad", &xent_ext::index_forward_with_grad_meta);
  m.impl("cross_entropy_index_backward", &xent_ext::index_backward_meta);
  m.impl("cross_entropy_prob_forward", &xent_ext::prob_forward_meta);
  m.impl("cross_entropy_prob_backward", &xent_ext::prob_backward_meta);
  m.impl("cross_entropy_prob_forward_with_grad", &xent_ext::prob_forward_with_grad_meta);
  m.impl("cross_entropy_index_forward_grad_into_", &xent_ext::index_forward_grad_into_meta);
  m.impl("cross_entropy_prob_forward_grad_into_", &xent_ext::prob_forward_grad_into_meta);
}
