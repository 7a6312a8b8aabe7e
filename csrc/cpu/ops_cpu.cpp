// The CPU implementations of the xent_ext operators (schemas in csrc/ops.cpp):
// validate, allocate, call the kernel for the ISA in use (cpu/kernel_api.h).
#include "common/xent_math.h"
#include "cpu/kernel_api.h"
#include "ops_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <atomic>
#include <optional>
#include <string>
#include <tuple>

namespace xent_ext {

namespace {

using at::Tensor;
using namespace ops;

// Every class index must be in [0, C) unless it is ignore_index. The error
// names the first bad target in row order, as torch's does.
void check_target_range(const Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t N = target.size(0), K = target.size(1);
  const int64_t tn = target.stride(0), tk = target.stride(1);
  const int64_t* t = target.data_ptr<int64_t>();
  const auto bad = [&](int64_t r) {
    const int64_t y = t[cpu::row_offset(r, K, tn, tk)];
    return y != ignore_index && (y < 0 || y >= C);
  };
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, N * K, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (bad(r)) {
        any_bad.store(true, std::memory_order_relaxed);
        return;
      }
    }
  });
  if (!any_bad.load()) {
    return;
  }
  for (int64_t r = 0; r < N * K; ++r) {
    if (bad(r)) {
      TORCH_CHECK_INDEX(false, "Target ", t[cpu::row_offset(r, K, tn, tk)], " is out of bounds.");
    }
  }
}

// Note [Huge pages for the gradient]
// The gradient is as large as the logits (1 GB for 4096 x 128256 bf16) and
// freshly allocated, so the first write of every page takes a page fault: on
// the VMs we measured, faulting 4 KB pages cost more than the whole backward
// computation (350 ms of 520 ms for 512 MB). Asking for transparent huge pages
// on the untouched allocation (what torch does for every tensor under
// THP_MEM_ALLOC_ENABLE=1) cuts that ~5x. It is advice: where THP is off, or
// the memory was already touched, nothing changes.
Tensor empty_gradient_like(const Tensor& t) {
  Tensor out = at::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const size_t bytes = out.numel() * out.element_size();
  if (bytes >= 4 * kHugePage) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
    if (last > first) {
      (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return out;
}

cpu::IndexForwardArgs index_forward_args(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction,
    const char* op) {
  check_forward_args(input, reduction, op);
  cpu::IndexForwardArgs args;
  args.input = input;
  args.target = canonical_index_target(target, input, op);
  args.weight = canonical_weight(weight, input, op);
  check_target_range(args.target, input.size(1), ignore_index);
  args.ignore_index = ignore_index;
  args.label_smoothing = label_smoothing;
  args.reduction = reduction;
  args.loss = loss_output(input, reduction);
  args.lse = at::empty({input.size(0), input.size(2)}, input.options().dtype(at::kDouble));
  args.total_weight = at::empty({}, input.options().dtype(accumulation_dtype(input.scalar_type())));
  return args;
}

std::tuple<Tensor, Tensor, Tensor> index_forward_cpu(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  cpu::IndexForwardArgs args = index_forward_args(
      input, target, weight, ignore_index, label_smoothing, reduction, "xent_ext::cross_entropy_index_forward");
  cpu::kernels().index_forward(args);
  return {args.loss, args.lse, args.total_weight};
}

// The forward that also writes the gradient for an upstream gradient of 1
// (Note [Gradient in the forward], csrc/cpu/kernel/entry.h).
std::tuple<Tensor, Tensor, Tensor, Tensor> index_forward_with_grad_cpu(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_index_forward_with_grad";
  check_fused_reduction(reduction, op);
  cpu::IndexForwardArgs args =
      index_forward_args(input, target, weight, ignore_index, label_smoothing, reduction, op);
  args.grad_input = empty_gradient_like(input);
  cpu::kernels().index_forward(args);
  return {args.loss, args.lse, args.total_weight, args.grad_input};
}

Tensor index_backward_cpu(
    const Tensor& grad_loss,
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    const Tensor& lse,
    const Tensor& total_weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_index_backward";
  check_index_backward_args(grad_loss, input, lse, total_weight, reduction, op);
  cpu::IndexBackwardArgs args;
  args.grad_loss = grad_loss;
  args.input = input;
  args.target = canonical_index_target(target, input, op);
  args.weight = canonical_weight(weight, input, op);
  args.lse = lse.contiguous();
  args.total_weight = total_weight;
  args.ignore_index = ignore_index;
  args.label_smoothing = label_smoothing;
  args.reduction = reduction;
  // Keeps the input's memory format (channels-last stays channels-last), so
  // the gradient is written in the order the logits are read.
  args.grad_input = empty_gradient_like(input);
  cpu::kernels().index_backward(args);
  return args.grad_input;
}

std::tuple<Tensor, Tensor, Tensor> prob_forward_cpu(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_prob_forward";
  check_forward_args(input, reduction, op);
  cpu::ProbForwardArgs args;
  args.input = input;
  args.target = canonical_prob_target(target, input, op);
  args.weight = canonical_weight(weight, input, op);
  args.label_smoothing = label_smoothing;
  args.reduction = reduction;
  args.loss = loss_output(input, reduction);
  args.lse = at::empty({input.size(0), input.size(2)}, input.options().dtype(at::kDouble));
  args.coef_sum = at::empty({input.size(0), input.size(2)}, input.options().dtype(accumulation_dtype(input.scalar_type())));
  cpu::kernels().prob_forward(args);
  return {args.loss, args.lse, args.coef_sum};
}

std::tuple<Tensor, Tensor> prob_backward_cpu(
    const Tensor& grad_loss,
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    const Tensor& lse,
    const Tensor& coef_sum,
    double label_smoothing,
    int64_t reduction,
    bool input_grad,
    bool target_grad) {
  constexpr const char* op = "xent_ext::cross_entropy_prob_backward";
  check_prob_backward_args(grad_loss, input, lse, coef_sum, reduction, op);
  cpu::ProbBackwardArgs args;
  args.grad_loss = grad_loss;
  args.input = input;
  args.target = canonical_prob_target(target, input, op);
  args.weight = canonical_weight(weight, input, op);
  args.lse = lse.contiguous();
  args.coef_sum = coef_sum.contiguous();
  args.label_smoothing = label_smoothing;
  args.reduction = reduction;
  if (input_grad) {
    args.grad_input = empty_gradient_like(input);
  }
  if (target_grad) {
    args.grad_target = empty_gradient_like(target);
  }
  cpu::kernels().prob_backward(args);
  // A gradient that was not asked for comes back as an empty tensor: op
  // schemas cannot return None.
  const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, input.options()); };
  return {or_empty(args.grad_input), or_empty(args.grad_target)};
}

}  // namespace
}  // namespace xent_ext

TORCH_LIBRARY_IMPL(xent_ext, CPU, m) {
  m.impl("cross_entropy_index_forward", &xent_ext::index_forward_cpu);
  m.impl("cross_entropy_index_forward_with_grad", &xent_ext::index_forward_with_grad_cpu);
  m.impl("cross_entropy_index_backward", &xent_ext::index_backward_cpu);
  m.impl("cross_entropy_prob_forward", &xent_ext::prob_forward_cpu);
  m.impl("cross_entropy_prob_backward", &xent_ext::prob_backward_cpu);
}
