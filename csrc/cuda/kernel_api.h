// The interface between the CUDA op wrappers (ops_cuda.cpp: torch tensors,
// checks, allocation) and the kernels (kernels.cu: raw pointers only).
//
// Note [Lean CUDA translation unit]
// The .cu file includes no torch header: nvcc compiles it in seconds instead
// of minutes (torch's headers dominate a CUDA extension's build time, which
// matters on 2-core CI machines), and it cannot pick up host-only torch code.
// Everything the kernels need is described here with plain structs.
#pragma once

#include "common/xent_math.h"  // Extras; no torch header either

#include <cstdint>

#include <cuda_runtime_api.h>

namespace xent_ext {
namespace cuda {

enum class Dtype : int { kDouble, kFloat, kBFloat16, kHalf };

// Rows summed by one block of the first reduction stage (Note [Deterministic
// reduction on the GPU], reduce.cuh). Fixed, so results never depend on
// the grid size or the GPU.
constexpr int64_t kReduceTile = 4096;

inline int64_t reduce_tiles(int64_t rows) {
  return rows == 0 ? 1 : (rows + kReduceTile - 1) / kReduceTile;
}

// Logits (N, C, K) with any strides; element (n, c, k) at data[n*sn + c*sc + k*sk].
struct Logits {
  const void* data;
  Dtype dtype;
  int64_t N, C, K;
  int64_t sn, sc, sk;
};

// An (N, C, K) tensor written (or read) alongside the logits.
struct Strided3 {
  void* data;  // nullptr: not present
  int64_t sn, sc, sk;
};

// row_stats, in the launches below: the per-row statistics the forward
// saves for the backward, a (2, N, K) contiguous float64 tensor, row_stats[r]
// the row's max and row_stats[R + r] log Σ exp(x - max), R = N * K (Note [Row
// max and log-sum apart], common/xent_math.h).

// Device scratch the wrapper allocates (sizes in the comments). acc is float
// (double for float64 logits).
struct IndexScratch {
  double* scalars;     // 4 doubles: [0] total weight (double), [1] Σ_c w_c
  double* partials;    // loss_sums(smoothing, z-loss on) * reduce_tiles(R) doubles
  void* row_nll;       // R acc values (reduced forward only)
  void* row_smooth;    // R acc values (reduced forward with smoothing only)
  void* row_z;         // R acc values (reduced forward with z-loss only)
};

// Per-row values a reduced forward sums (Note [Z-loss on the GPU],
// kernels.cu): the cross-entropy (the nll for class indices), the smoothing
// term when smoothing is on, the z-loss term when it is on. The wrapper sizes
// the partials with it.
inline int64_t loss_sums(bool smoothing, bool z_loss) {
  return 1 + (smoothing ? 1 : 0) + (z_loss ? 1 : 0);
}

struct IndexForwardLaunch {
  Logits x;
  const int64_t* target;  // (N, K) strides tn, tk
  int64_t tn, tk;
  const void* weight;     // (C,) acc dtype, contiguous; nullptr: none
  int64_t ignore_index;
  double label_smoothing;  // > 0 turns smoothing on
  int64_t reduction;
  void* loss;          // (N, K) contiguous for 'none', 0-d otherwise
  bool loss_acc;       // loss in the accumulation dtype (else the input's)
  double* row_stats;   // (2, N, K) contiguous
  void* total_weight;  // 0-d acc
  Strided3 grad;       // the fused gradient (upstream gradient 1, per row for 'none'); data nullptr: none;
                       // may be the logits themselves (Note [Gradient into the logits], kernels.cu)
  int64_t* bad_row;    // 1 int64, preset to INT64_MAX; the first row with a bad target
  Extras extras;       // Note [Logit scale, softcap and z-loss] (common/xent_math.h)
  const void* z_loss_count;  // 0-d acc: the z-loss 'mean' denominator; nullptr: the total weight
  IndexScratch scratch;
};

struct IndexBackwardLaunch {
  Logits x;
  const void* grad_loss;  // 0-d, or (N, K) with strides gln, glk for 'none'
  bool grad_loss_acc;     // grad_loss in the accumulation dtype (else the input's)
  int64_t gln, glk;
  const int64_t* target;
  int64_t tn, tk;
  const void* weight;
  const double* row_stats;    // (2, N, K) contiguous
  const void* total_weight;   // 0-d acc
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  Extras extras;
  const void* z_loss_count;  // as IndexForwardLaunch
  Strided3 grad;
  double* scalars;  // 1 double of scratch: Σ_c w_c
};

struct ProbForwardLaunch {
  Logits x;
  Strided3 target;   // input dtype, read only
  const void* weight;
  double label_smoothing;
  int64_t reduction;
  void* loss;
  bool loss_acc;     // as IndexForwardLaunch
  double* row_stats;
  void* coef_sum;    // (N, K) contiguous acc
  Extras extras;     // the z-loss 'mean' denominator is R
  double* partials;  // loss_sums(false, z-loss on) * reduce_tiles(R) doubles
  void* row_loss;    // R acc values (reduced only)
  void* row_z;       // R acc values (reduced with z-loss only)
};

struct ProbBackwardLaunch {
  Logits x;
  Strided3 target;
  const void* grad_loss;
  bool grad_loss_acc;
  int64_t gln, glk;
  const void* weight;
  const double* row_stats;
  const void* coef_sum;
  double label_smoothing;
  int64_t reduction;
  Extras extras;
  Strided3 grad_input;   // data nullptr: not wanted; may be the logits themselves
  Strided3 grad_target;  // data nullptr: not wanted
};

// Each launches its kernels on `stream` and returns the first launch error
// (cudaSuccess when all launched).
cudaError_t launch_index_forward(const IndexForwardLaunch& a, cudaStream_t stream);
cudaError_t launch_index_backward(const IndexBackwardLaunch& a, cudaStream_t stream);
cudaError_t launch_prob_forward(const ProbForwardLaunch& a, cudaStream_t stream);
cudaError_t launch_prob_backward(const ProbBackwardLaunch& a, cudaStream_t stream);

// How kernels.cu was compiled: nvcc's __CUDA_ARCH_LIST__ (e.g. "800,900")
// and the CUDA runtime version it was built against (CUDART_VERSION, e.g. 13000).
const char* compiled_archs();
int runtime_version_built();

}  // namespace cuda
}  // namespace xent_ext
