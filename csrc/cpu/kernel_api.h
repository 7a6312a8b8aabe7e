// Interface between the op wrappers (csrc/cpu/ops_cpu.cpp) and the CPU kernels,
// which are compiled once per ISA (kernel_{default,avx2,avx512}.cpp, the
// algorithm in cpu/kernel/) and picked at run time (kernel_dispatch.cpp).
//
// The wrappers validate and allocate; kernels only read and write the tensors
// they are given. All tensors are CPU tensors; shapes are canonical:
// input (N, C, K) with any strides, index targets (N, K) int64 with any
// strides, per-row outputs (N, K) contiguous.
#pragma once

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

struct IndexForwardArgs {
  at::Tensor input;         // (N, C, K)
  at::Tensor target;        // (N, K) int64, already range-checked
  at::Tensor weight;        // (C,) accumulation dtype, contiguous; or undefined
  int64_t ignore_index;
  double label_smoothing;   // <= 0 means off
  int64_t reduction;
  at::Tensor loss;          // 'none': (N, K) input dtype, contiguous; else 0-d input dtype
  at::Tensor lse;           // (N, K) float64, contiguous
  at::Tensor total_weight;  // 0-d accumulation dtype: Σ w[y] over non-ignored rows
  at::Tensor grad_input;    // undefined, or (N, C, K): also write d(loss)/d(input) for an
                            // upstream gradient of 1 ('mean'/'sum' only)
};

struct IndexBackwardArgs {
  at::Tensor grad_loss;     // 'none': (N, K) any strides; else 0-d
  at::Tensor input;
  at::Tensor target;
  at::Tensor weight;
  at::Tensor lse;
  at::Tensor total_weight;
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  at::Tensor grad_input;    // (N, C, K), any non-overlapping strides
};

struct ProbForwardArgs {
  at::Tensor input;         // (N, C, K)
  at::Tensor target;        // (N, C, K), same dtype as input, any strides
  at::Tensor weight;
  double label_smoothing;
  int64_t reduction;
  at::Tensor loss;
  at::Tensor lse;           // (N, K) float64
  at::Tensor coef_sum;      // (N, K) accumulation dtype: Σ_c w_c q_c
};

struct ProbBackwardArgs {
  at::Tensor grad_loss;
  at::Tensor input;
  at::Tensor target;
  at::Tensor weight;
  at::Tensor lse;
  at::Tensor coef_sum;
  double label_smoothing;
  int64_t reduction;
  at::Tensor grad_input;    // (N, C, K) or undefined when not wanted
  at::Tensor grad_target;   // (N, C, K) or undefined when not wanted
};

struct KernelTable {
  const char* isa;
  void (*index_forward)(const IndexForwardArgs&);
  void (*index_backward)(const IndexBackwardArgs&);
  void (*prob_forward)(const ProbForwardArgs&);
  void (*prob_backward)(const ProbBackwardArgs&);
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
