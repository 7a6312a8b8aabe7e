// xent_ext's operators: their schemas (TORCH_LIBRARY), the one definition of
// each op's arguments and results for every device. The implementations are
// registered per device: csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp.
//
// Call flow: xent_ext.cross_entropy (Python: torch-identical argument checks,
// view as (N, C, K)) -> torch.ops.xent_ext.cross_entropy_*_forward ->
// dispatcher -> the CPU or CUDA implementation. Autograd and fake (meta)
// kernels are registered from Python (xent_ext/_ops.py).
//
// This file, csrc/cpu and csrc/cuda make the C++ library (CMakeLists.txt);
// the Python extension adds csrc/python_module.cpp.
#include "ops_common.h"

#include <torch/library.h>

#include <atomic>

namespace xent_ext {

std::atomic<bool>& ops::cuda_target_check() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

}  // namespace xent_ext

// Note [Op schemas]
// Inputs are canonical: logits (N, C, K) with any strides, class-index
// targets (N, K), probability targets (N, C, K). The Python layer reshapes
// every torch-accepted shape to this. `reduction` uses torch's enum (0 none,
// 1 mean, 2 sum). Forwards return (loss, lse, aux): lse (N, K) float64 is
// what the backward recomputes softmax from; aux is the weighted-mean
// denominator (index) or the per-row Σ w q (probability). The *_with_grad
// forward also returns the input gradient for an upstream gradient of 1.
// Room to grow without breaking callers: new options (z_loss, logit_softcap,
// logit_scale) are appended as trailing arguments with defaults that mean
// "off", which keeps old call sites valid; an in-place gradient is a
// separate `*_backward_` op that writes into the logits; a CUDA
// implementation is a TORCH_LIBRARY_IMPL(xent_ext, CUDA, m) block.
TORCH_LIBRARY(xent_ext, m) {
  m.def(
      "cross_entropy_index_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse, Tensor total_weight)");
  m.def(
      "cross_entropy_index_forward_with_grad(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor lse, Tensor total_weight, Tensor grad_input)");
  m.def(
      "cross_entropy_index_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int ignore_index, float label_smoothing, int reduction) -> Tensor");
  m.def(
      "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int reduction) -> (Tensor loss, Tensor lse, Tensor coef_sum)");
  m.def(
      "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor coef_sum, float label_smoothing, int reduction, bool input_grad, bool target_grad) "
      "-> (Tensor grad_input, Tensor grad_target)");
}
