// The CPU ops. The op wrappers are ops_impl.h's, shared with CUDA: the
// prologue (ops_common.h: checks, canonical arguments, outputs), then what is
// the CPU's own, here: the class-index range check, huge pages for the
// gradient, the kernels for the ISA in use (cpu/kernel_api.h). Registered for
// the CPU dispatch key. Mirrors cuda/ops_cuda.cpp.
#include "common/xent_math.h"
#include "cpu/kernel_api.h"
#include "ops_common.h"
#include "ops_impl.h"

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

// What ops_impl.h's DeviceOps calls for the CPU: the kernels for the ISA in
// use, which take the prologue's canonical arguments as they are.
struct CpuDevice {
  static Tensor gradient(const Tensor& like) {
    return empty_gradient_like(like);
  }
  // Both index forwards: the range check, then the kernel.
  static void index_forward(const IndexForwardCall& c) {
    check_target_range(c.target, c.input.size(1), c.ignore_index);
    cpu::kernels().index_forward(c);
  }
  static void index_backward(const IndexBackwardCall& c) {
    cpu::kernels().index_backward(c);
  }
  static void prob_forward(const ProbForwardCall& c) {
    cpu::kernels().prob_forward(c);
  }
  static void prob_backward(const ProbBackwardCall& c) {
    cpu::kernels().prob_backward(c);
  }
};

}  // namespace
}  // namespace xent_ext

TORCH_LIBRARY_IMPL(xent_ext, CPU, m) {
  xent_ext::ops::register_device_ops<xent_ext::CpuDevice>(m);
}
