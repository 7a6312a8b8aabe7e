// CPU op wrappers: the shared prologue (ops_common.h: checks, canonical
// arguments, outputs), then what is the CPU's own (the class-index range
// check, huge pages for the gradient), then the kernel for the ISA in use
// (cpu/kernel_api.h); registered for the CPU dispatch key. Mirrors
// cuda/ops_cuda.cpp.
#include "common/xent_math.h"
#include "cpu/kernel_api.h"
#include "ops_common.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <atomic>
#include <cstdint>
#include <optional>
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
// freshly allocated, so the first write of every page takes a page fault:
// faulting 4 KB pages can cost more than the whole backward computation
// (benchmarks/NOTES.md). Asking for transparent huge pages on the untouched
// allocation (what torch does for every tensor under THP_MEM_ALLOC_ENABLE=1)
// takes most of that away. It is advice: where THP is off, or the memory was
// already touched, nothing changes.
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

// Both index forwards: the range check, then the kernel.
void index_forward(const IndexForwardCall& c) {
  check_target_range(c.target, c.input.size(1), c.ignore_index);
  cpu::IndexForwardArgs args;
  args.input = c.input;
  args.target = c.target;
  args.weight = c.weight;
  args.ignore_index = c.ignore_index;
  args.label_smoothing = c.label_smoothing;
  args.reduction = c.reduction;
  args.loss = c.out.loss;
  args.lse = c.out.lse;
  args.total_weight = c.out.total_weight;
  args.grad_input = c.out.grad_input;
  cpu::kernels().index_forward(args);
}

std::tuple<Tensor, Tensor, Tensor> index_forward_cpu(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  const IndexForwardCall c = index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction,
                                                    /*with_grad=*/false, "xent_ext::cross_entropy_index_forward");
  index_forward(c);
  return {c.out.loss, c.out.lse, c.out.total_weight};
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
  const IndexForwardCall c =
      index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction, /*with_grad=*/true,
                             "xent_ext::cross_entropy_index_forward_with_grad", empty_gradient_like);
  index_forward(c);
  return {c.out.loss, c.out.lse, c.out.total_weight, c.out.grad_input};
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
  const IndexBackwardCall c =
      index_backward_prologue(grad_loss, input, target, weight, lse, total_weight, ignore_index, label_smoothing,
                              reduction, "xent_ext::cross_entropy_index_backward", empty_gradient_like);
  cpu::IndexBackwardArgs args;
  args.grad_loss = c.grad_loss;
  args.input = c.input;
  args.target = c.target;
  args.weight = c.weight;
  args.lse = c.lse;
  args.total_weight = c.total_weight;
  args.ignore_index = c.ignore_index;
  args.label_smoothing = c.label_smoothing;
  args.reduction = c.reduction;
  args.grad_input = c.grad_input;
  cpu::kernels().index_backward(args);
  return c.grad_input;
}

std::tuple<Tensor, Tensor, Tensor> prob_forward_cpu(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    double label_smoothing,
    int64_t reduction) {
  const ProbForwardCall c =
      prob_forward_prologue(input, target, weight, label_smoothing, reduction, "xent_ext::cross_entropy_prob_forward");
  cpu::ProbForwardArgs args;
  args.input = c.input;
  args.target = c.target;
  args.weight = c.weight;
  args.label_smoothing = c.label_smoothing;
  args.reduction = c.reduction;
  args.loss = c.out.loss;
  args.lse = c.out.lse;
  args.coef_sum = c.out.coef_sum;
  cpu::kernels().prob_forward(args);
  return {c.out.loss, c.out.lse, c.out.coef_sum};
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
  const ProbBackwardCall c =
      prob_backward_prologue(grad_loss, input, target, weight, lse, coef_sum, label_smoothing, reduction, input_grad,
                             target_grad, "xent_ext::cross_entropy_prob_backward", empty_gradient_like);
  cpu::ProbBackwardArgs args;
  args.grad_loss = c.grad_loss;
  args.input = c.input;
  args.target = c.target;
  args.weight = c.weight;
  args.lse = c.lse;
  args.coef_sum = c.coef_sum;
  args.label_smoothing = c.label_smoothing;
  args.reduction = c.reduction;
  args.grad_input = c.out.grad_input;
  args.grad_target = c.out.grad_target;
  cpu::kernels().prob_backward(args);
  return prob_backward_result(c.out, c.input);
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
