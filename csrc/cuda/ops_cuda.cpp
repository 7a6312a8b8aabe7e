// CUDA op wrappers: the shared prologue (ops_common.h: checks, canonical
// arguments, outputs), then what is CUDA's own (the input's device and
// current stream, scratch from torch's caching allocator, the plain-struct
// arguments of cuda/kernel_api.h), then the kernels (kernels.cu) and, for
// the index forwards, the target check; registered for the CUDA dispatch key.
// Mirrors cpu/ops_cpu.cpp.
#include "cuda/kernel_api.h"
#include "ops_common.h"

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

// Both index forwards: scratch, the launch, then the target check.
void index_forward(const IndexForwardCall& c) {
  const Tensor& input = c.input;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t R = input.size(0) * input.size(2);
  const bool reduce = c.reduction != kReductionNone;
  const bool smoothing = c.label_smoothing > 0;
  const Tensor bad_row =
      at::full({1}, std::numeric_limits<int64_t>::max(), input.options().dtype(at::kLong));
  const Tensor scalars = at::empty({4}, input.options().dtype(at::kDouble));
  const Tensor partials = at::empty({2 * cuda::reduce_tiles(R)}, input.options().dtype(at::kDouble));
  const Tensor row_nll = reduce ? at::empty({R}, input.options().dtype(acc)) : Tensor();
  const Tensor row_smooth = reduce && smoothing ? at::empty({R}, input.options().dtype(acc)) : Tensor();

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
  a.lse = c.out.lse.data_ptr<double>();
  a.total_weight = c.out.total_weight.data_ptr();
  a.grad = strided_of(c.out.grad_input);
  a.bad_row = bad_row.data_ptr<int64_t>();
  a.scratch = {scalars.data_ptr<double>(), partials.data_ptr<double>(), data_or_null(row_nll), data_or_null(row_smooth)};
  C10_CUDA_CHECK(cuda::launch_index_forward(a, stream));
  raise_if_bad_target(bad_row, c.target, stream);
}

std::tuple<Tensor, Tensor, Tensor> index_forward_cuda(
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
std::tuple<Tensor, Tensor, Tensor, Tensor> index_forward_with_grad_cuda(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  const IndexForwardCall c =
      index_forward_prologue(input, target, weight, ignore_index, label_smoothing, reduction, /*with_grad=*/true,
                             "xent_ext::cross_entropy_index_forward_with_grad");
  index_forward(c);
  return {c.out.loss, c.out.lse, c.out.total_weight, c.out.grad_input};
}

Tensor index_backward_cuda(
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
                              reduction, "xent_ext::cross_entropy_index_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor scalars = at::empty({1}, input.options().dtype(at::kDouble));

  cuda::IndexBackwardLaunch a;
  a.x = logits_of(c.input);
  a.grad_loss = c.grad_loss.data_ptr();
  a.gln = c.reduction == kReductionNone ? c.grad_loss.stride(0) : 0;
  a.glk = c.reduction == kReductionNone ? c.grad_loss.stride(1) : 0;
  a.target = c.target.data_ptr<int64_t>();
  a.tn = c.target.stride(0);
  a.tk = c.target.stride(1);
  a.weight = data_or_null(c.weight);
  a.lse = c.lse.data_ptr<double>();
  a.total_weight = c.total_weight.data_ptr();
  a.ignore_index = c.ignore_index;
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.grad = strided_of(c.grad_input);
  a.scalars = scalars.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_index_backward(a, stream));
  return c.grad_input;
}

std::tuple<Tensor, Tensor, Tensor> prob_forward_cuda(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    double label_smoothing,
    int64_t reduction) {
  const ProbForwardCall c =
      prob_forward_prologue(input, target, weight, label_smoothing, reduction, "xent_ext::cross_entropy_prob_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = input.size(0) * input.size(2);
  const Tensor partials = at::empty({cuda::reduce_tiles(R)}, input.options().dtype(at::kDouble));
  const Tensor row_loss = c.reduction != kReductionNone
                              ? at::empty({R}, input.options().dtype(accumulation_dtype(input.scalar_type())))
                              : Tensor();

  cuda::ProbForwardLaunch a;
  a.x = logits_of(c.input);
  a.target = strided_of(c.target);
  a.weight = data_or_null(c.weight);
  a.label_smoothing = c.label_smoothing;
  a.reduction = c.reduction;
  a.loss = c.out.loss.data_ptr();
  a.lse = c.out.lse.data_ptr<double>();
  a.coef_sum = c.out.coef_sum.data_ptr();
  a.partials = partials.data_ptr<double>();
  a.row_loss = data_or_null(row_loss);
  C10_CUDA_CHECK(cuda::launch_prob_forward(a, stream));
  return {c.out.loss, c.out.lse, c.out.coef_sum};
}

std::tuple<Tensor, Tensor> prob_backward_cuda(
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
                             target_grad, "xent_ext::cross_entropy_prob_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (input_grad || target_grad) {
    cuda::ProbBackwardLaunch a;
    a.x = logits_of(c.input);
    a.target = strided_of(c.target);
    a.grad_loss = c.grad_loss.data_ptr();
    a.gln = c.reduction == kReductionNone ? c.grad_loss.stride(0) : 0;
    a.glk = c.reduction == kReductionNone ? c.grad_loss.stride(1) : 0;
    a.weight = data_or_null(c.weight);
    a.lse = c.lse.data_ptr<double>();
    a.coef_sum = c.coef_sum.data_ptr();
    a.label_smoothing = c.label_smoothing;
    a.reduction = c.reduction;
    a.grad_input = strided_of(c.out.grad_input);
    a.grad_target = strided_of(c.out.grad_target);
    C10_CUDA_CHECK(cuda::launch_prob_backward(a, stream));
  }
  return prob_backward_result(c.out, c.input);
}

}  // namespace
}  // namespace xent_ext

TORCH_LIBRARY_IMPL(xent_ext, CUDA, m) {
  m.impl("cross_entropy_index_forward", &xent_ext::index_forward_cuda);
  m.impl("cross_entropy_index_forward_with_grad", &xent_ext::index_forward_with_grad_cuda);
  m.impl("cross_entropy_index_backward", &xent_ext::index_backward_cuda);
  m.impl("cross_entropy_prob_forward", &xent_ext::prob_forward_cuda);
  m.impl("cross_entropy_prob_backward", &xent_ext::prob_backward_cuda);
}
