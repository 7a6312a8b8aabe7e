// The CUDA ops. The op wrappers are ops_impl.h's, shared with the CPU: the
// prologue (ops_common.h: checks, canonical arguments, outputs), then what is
// CUDA's own, here: the input's device and current stream, scratch from
// torch's caching allocator, the plain-struct arguments of cuda/kernel_api.h,
// the kernels (kernels.cu) and, for the index forwards, the target check.
// Registered for the CUDA dispatch key. Mirrors cpu/ops_cpu.cpp.
#include "cuda/kernel_api.h"
#include "ops_common.h"
#include "ops_impl.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace xent_ext {
namespace {

using at::Tensor;
using namespace ops;

cuda::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return cuda::Dtype::kDouble;
    case at::kFloat:
      return cuda::Dtype::kFloat;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case at::kHalf:
      return cuda::Dtype::kHalf;
    default:
      TORCH_CHECK(false, "xent_ext: no CUDA kernel for dtype ", t);
  }
}

cuda::Logits logits_of(const Tensor& x) {
  return {x.data_ptr(), kernel_dtype(x.scalar_type()), x.size(0), x.size(1), x.size(2),
          x.stride(0), x.stride(1), x.stride(2)};
}

cuda::Strided3 strided_of(const Tensor& t) {
  if (!t.defined()) {
    return {nullptr, 0, 0, 0};
  }
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

// Whether a loss (or its upstream gradient) is in the accumulation dtype
// rather than the input's (Note [Loss dtype on the GPU], row_io.cuh); the
// prologue has checked it is one of the two.
bool in_accumulation_dtype(const Tensor& t, const Tensor& input) {
  return t.scalar_type() != input.scalar_type();
}

// Note [Target check on the GPU]: skipped while the stream is being captured
// into a CUDA graph, where a host sync is illegal; bad rows are NaN there.
bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

void raise_if_bad_target(const Tensor& bad_row, const Tensor& target, cudaStream_t stream) {
  if (!cuda_target_check().load(std::memory_order_relaxed) || stream_capturing(stream)) {
    return;
  }
  const int64_t row = bad_row.item<int64_t>();  // the one host sync
  if (row == std::numeric_limits<int64_t>::max()) {
    return;
  }
  const int64_t K = target.size(1);
  const int64_t value = target.select(0, row / K).select(0, row % K).item<int64_t>();
  TORCH_CHECK_INDEX(false, "Target ", value, " is out of bounds.");
}

// What ops_impl.h's DeviceOps calls for CUDA: allocate, launch, check.
struct CudaDevice {
  static Tensor gradient(const Tensor& like) {
    return empty_gradient(like);
  }
  static void index_forward(const IndexForwardCall& c);
  static void index_backward(const IndexBackwardCall& c);
  static void prob_forward(const ProbForwardCall& c);
  static void prob_backward(const ProbBackwardCall& c);
};

// Both index forwards: scratch, the launch, then the target check.
void CudaDevice::index_forward(const IndexForwardCall& c) {
  const Tensor& input = c.input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t R = input.size(0) * input.size(2);
  const bool reduce = c.reduction != kReductionNone;
  const bool smoothing = c.label_smoothing > 0;
  const bool z_loss = c.extras.has_z_loss();
  const Tensor bad_row =
      at::full({1}, std::numeric_limits<int64_t>::max(), input.options().dtype(at::kLong));
  const Tensor scalars = at::empty({4}, input.options().dtype(at::kDouble));
  const Tensor partials = at::empty({cuda::loss_sums(smoothing, z_loss) * cuda::reduce_tiles(R)},
                                    input.options().dtype(at::kDouble));
  const Tensor row_nll = reduce ? at::empty({R}, input.options().dtype(acc)) : Tensor();
  const Tensor row_smooth = reduce && smoothing ? at::empty({R}, input.options().dtype(acc)) : Tensor();
  const Tensor row_z = reduce && z_loss ? at::empty({R}, input.options().dtype(acc)) : Tensor();

  cuda::IndexForwardLaunch a;
  a.x = logits_of(input);
  a.target = c.target.data_ptr<int64_t>();
  a.tn = c.target.stride(0);
  a.tk = c.target.stride(1);
  a.weight = data_or_null(c.weight);
  a.ignore_index = c.ignore_index;
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.loss = c.out.loss.data_ptr();
  a.loss_acc = in_accumulation_dtype(c.out.loss, input);
  a.row_stats = c.out.row_stats.data_ptr<double>();
  a.total_weight = c.out.total_weight.data_ptr();
  a.grad = strided_of(c.out.grad_input);
  a.bad_row = bad_row.data_ptr<int64_t>();
  a.extras = c.extras;
  a.z_loss_count = data_or_null(c.z_loss_count);
  a.scratch = {scalars.data_ptr<double>(), partials.data_ptr<double>(), data_or_null(row_nll), data_or_null(row_smooth),
               data_or_null(row_z)};
  C10_CUDA_CHECK(cuda::launch_index_forward(a, stream));
  raise_if_bad_target(bad_row, c.target, stream);
}

void CudaDevice::index_backward(const IndexBackwardCall& c) {
  const Tensor& input = c.input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor scalars = at::empty({1}, input.options().dtype(at::kDouble));

  cuda::IndexBackwardLaunch a;
  a.x = logits_of(c.input);
  a.grad_loss = c.grad_loss.data_ptr();
  a.grad_loss_acc = in_accumulation_dtype(c.grad_loss, input);
  a.gln = c.reduction == kReductionNone ? c.grad_loss.stride(0) : 0;
  a.glk = c.reduction == kReductionNone ? c.grad_loss.stride(1) : 0;
  a.target = c.target.data_ptr<int64_t>();
  a.tn = c.target.stride(0);
  a.tk = c.target.stride(1);
  a.weight = data_or_null(c.weight);
  a.row_stats = c.row_stats.data_ptr<double>();
  a.total_weight = c.total_weight.data_ptr();
  a.ignore_index = c.ignore_index;
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.extras = c.extras;
  a.z_loss_count = data_or_null(c.z_loss_count);
  a.grad = strided_of(c.grad_input);
  a.scalars = scalars.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_index_backward(a, stream));
}

void CudaDevice::prob_forward(const ProbForwardCall& c) {
  const Tensor& input = c.input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = input.size(0) * input.size(2);
  const bool reduce = c.reduction != kReductionNone;
  const bool z_loss = c.extras.has_z_loss();
  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  const Tensor partials =
      at::empty({cuda::loss_sums(false, z_loss) * cuda::reduce_tiles(R)}, input.options().dtype(at::kDouble));
  const Tensor row_loss = reduce ? at::empty({R}, input.options().dtype(acc)) : Tensor();
  const Tensor row_z = reduce && z_loss ? at::empty({R}, input.options().dtype(acc)) : Tensor();

  cuda::ProbForwardLaunch a;
  a.x = logits_of(c.input);
  a.target = strided_of(c.target);
  a.weight = data_or_null(c.weight);
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.loss = c.out.loss.data_ptr();
  a.loss_acc = in_accumulation_dtype(c.out.loss, input);
  a.row_stats = c.out.row_stats.data_ptr<double>();
  a.coef_sum = c.out.coef_sum.data_ptr();
  a.extras = c.extras;
  a.partials = partials.data_ptr<double>();
  a.row_loss = data_or_null(row_loss);
  a.row_z = data_or_null(row_z);
  C10_CUDA_CHECK(cuda::launch_prob_forward(a, stream));
}

// Only called when a gradient was asked for.
void CudaDevice::prob_backward(const ProbBackwardCall& c) {
  const Tensor& input = c.input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  cuda::ProbBackwardLaunch a;
  a.x = logits_of(c.input);
  a.target = strided_of(c.target);
  a.grad_loss = c.grad_loss.data_ptr();
  a.grad_loss_acc = in_accumulation_dtype(c.grad_loss, input);
  a.gln = c.reduction == kReductionNone ? c.grad_loss.stride(0) : 0;
  a.glk = c.reduction == kReductionNone ? c.grad_loss.stride(1) : 0;
  a.weight = data_or_null(c.weight);
  a.row_stats = c.row_stats.data_ptr<double>();
  a.coef_sum = c.coef_sum.data_ptr();
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.extras = c.extras;
  a.grad_input = strided_of(c.out.grad_input);
  a.grad_target = strided_of(c.out.grad_target);
  C10_CUDA_CHECK(cuda::launch_prob_backward(a, stream));
}

}  // namespace
}  // namespace xent_ext

TORCH_LIBRARY_IMPL(xent_ext, CUDA, m) {
  xent_ext::ops::register_device_ops<xent_ext::CudaDevice>(m);
}
