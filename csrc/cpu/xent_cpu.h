// Interface between the op wrappers (csrc/xent_ext.cpp) and the CPU kernels,
// which are compiled once per ISA (xent_kernel_{default,avx2,avx512}.cpp) and
// picked at run time from at::native::get_cpu_capability().
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
// (xent_kernel_<isa>.cpp); the build defines XENT_HAVE_<ISA> for those it
// compiled.
const KernelTable& kernels_DEFAULT();
const KernelTable& kernels_AVX2();
const KernelTable& kernels_AVX512();

// The table for the ISA ATen itself would use (honours ATEN_CPU_CAPABILITY).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace xent_ext
