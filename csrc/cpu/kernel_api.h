// Interface between the op wrappers (csrc/cpu/ops_cpu.cpp) and the CPU kernels,
// which are compiled once per ISA (kernel_{default,avx2,avx512}.cpp, the
// algorithm in cpu/kernel/) and picked at run time (kernel_dispatch.cpp).
//
// The kernels take the op prologues' canonical arguments as they are
// (ops::*Call, csrc/ops_common.h, which documents each tensor's shape, dtype
// and strides), for CPU tensors, with class indices already range-checked.
// The prologue validates and allocates; kernels only read and write the
// tensors they are given.
#pragma once

#include "ops_common.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace xent_ext {
namespace cpu {

// Note [Row offsets]
// Row r of the canonical (N, C, K) view is (n, k) = (r / K, r % K). A 64-bit
// division is slow, and the short-row paths took one per row in up to five
// places (target check, weight pre-pass, tile gather, target lookup, x[y]):
// a large share of a short-row forward. Most inputs are 2-D (K == 1), where
// the offset is r * stride, and most (N, K) tensors with K > 1 (targets,
// per-row losses and upstream gradients of an (N, C, H, W) input) have their
// rows evenly spaced (stride_n == K * stride_k), where it is r * stride_k.
// Both branches are decided by the tensor, so they are always predicted.
inline int64_t row_offset(int64_t r, int64_t K, int64_t stride_n, int64_t stride_k) {
  if (K == 1) {
    return r * stride_n;
  }
  if (stride_n == K * stride_k) {
    return r * stride_k;
  }
  return (r / K) * stride_n + (r % K) * stride_k;
}

struct KernelTable {
  const char* isa;
  void (*index_forward)(const ops::IndexForwardCall&);
  void (*index_backward)(const ops::IndexBackwardCall&);
  void (*prob_forward)(const ops::ProbForwardCall&);
  void (*prob_backward)(const ops::ProbBackwardCall&);
};

// One per compiled ISA, each defined in its own translation unit
// (kernel_<isa>.cpp); the build defines XENT_HAVE_<ISA> for those it
// compiled.
const KernelTable& kernels_DEFAULT();
const KernelTable& kernels_AVX2();
const KernelTable& kernels_AVX512();

// The table for the ISA ATen itself would use (honours ATEN_CPU_CAPABILITY).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace xent_ext
