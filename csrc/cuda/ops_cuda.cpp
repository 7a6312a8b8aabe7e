// CUDA op wrappers: validate (ops_common.h, the same checks as the CPU ops),
// allocate outputs and scratch with torch's caching allocator, launch the
// kernels (kernels.cu) on the current stream of the input's device, and
// register them for the CUDA dispatch key.
#include "cuda/kernel_api.h"
#include "ops_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

struct IndexForwardResult {
  Tensor loss, lse, total_weight, grad_input;
};

IndexForwardResult index_forward(
    const Tensor& input,
    const Tensor& target_in,
    const std::optional<Tensor>& weight_in,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction,
    bool with_grad,
    const char* op) {
  check_forward_args(input, reduction, op);
  const Tensor target = canonical_index_target(target_in, input, op);
  const Tensor weight = canonical_weight(weight_in, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t R = input.size(0) * input.size(2);
  const bool reduce = reduction != kReductionNone;
  const bool smoothing = label_smoothing > 0;

  IndexForwardResult out;
  out.loss = loss_output(input, reduction);
  out.lse = at::empty({input.size(0), input.size(2)}, input.options().dtype(at::kDouble));
  out.total_weight = at::empty({}, input.options().dtype(acc));
  if (with_grad) {
    // Keeps the input's memory format: the gradient is written in the order
    // the logits are read.
    out.grad_input = at::empty_like(input);
  }
  const Tensor bad_row =
      at::full({1}, std::numeric_limits<int64_t>::max(), input.options().dtype(at::kLong));
  const Tensor scalars = at::empty({4}, input.options().dtype(at::kDouble));
  const Tensor partials = at::empty({2 * cuda::reduce_tiles(R)}, input.options().dtype(at::kDouble));
  const Tensor row_nll = reduce ? at::empty({R}, input.options().dtype(acc)) : Tensor();
  const Tensor row_smooth = reduce && smoothing ? at::empty({R}, input.options().dtype(acc)) : Tensor();

  cuda::IndexForwardLaunch a;
  a.x = logits_of(input);
  a.target = target.data_ptr<int64_t>();
  a.tn = target.stride(0);
  a.tk = target.stride(1);
  a.weight = data_or_null(weight);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.reduction = reduction;
  a.loss = out.loss.data_ptr();
  a.lse = out.lse.data_ptr<double>();
  a.total_weight = out.total_weight.data_ptr();
  a.grad = strided_of(out.grad_input);
  a.bad_row = bad_row.data_ptr<int64_t>();
  a.scratch = {scalars.data_ptr<double>(), partials.data_ptr<double>(), data_or_null(row_nll), data_or_null(row_smooth)};
  C10_CUDA_CHECK(cuda::launch_index_forward(a, stream));
  raise_if_bad_target(bad_row, target, stream);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> index_forward_cuda(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  IndexForwardResult r = index_forward(input, target, weight, ignore_index, label_smoothing, reduction,
                                       /*with_grad=*/false, "xent_ext::cross_entropy_index_forward");
  return {r.loss, r.lse, r.total_weight};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> index_forward_with_grad_cuda(
    const Tensor& input,
    const Tensor& target,
    const std::optional<Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_index_forward_with_grad";
  check_fused_reduction(reduction, op);
  IndexForwardResult r =
      index_forward(input, target, weight, ignore_index, label_smoothing, reduction, /*with_grad=*/true, op);
  return {r.loss, r.lse, r.total_weight, r.grad_input};
}

Tensor index_backward_cuda(
    const Tensor& grad_loss,
    const Tensor& input,
    const Tensor& target_in,
    const std::optional<Tensor>& weight_in,
    const Tensor& lse_in,
    const Tensor& total_weight,
    int64_t ignore_index,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_index_backward";
  check_index_backward_args(grad_loss, input, lse_in, total_weight, reduction, op);
  const Tensor target = canonical_index_target(target_in, input, op);
  const Tensor weight = canonical_weight(weight_in, input, op);
  const Tensor lse = lse_in.contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor grad_input = at::empty_like(input);
  const Tensor scalars = at::empty({1}, input.options().dtype(at::kDouble));

  cuda::IndexBackwardLaunch a;
  a.x = logits_of(input);
  a.grad_loss = grad_loss.data_ptr();
  a.gln = reduction == kReductionNone ? grad_loss.stride(0) : 0;
  a.glk = reduction == kReductionNone ? grad_loss.stride(1) : 0;
  a.target = target.data_ptr<int64_t>();
  a.tn = target.stride(0);
  a.tk = target.stride(1);
  a.weight = data_or_null(weight);
  a.lse = lse.data_ptr<double>();
  a.total_weight = total_weight.data_ptr();
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.reduction = reduction;
  a.grad = strided_of(grad_input);
  a.scalars = scalars.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_index_backward(a, stream));
  return grad_input;
}

std::tuple<Tensor, Tensor, Tensor> prob_forward_cuda(
    const Tensor& input,
    const Tensor& target_in,
    const std::optional<Tensor>& weight_in,
    double label_smoothing,
    int64_t reduction) {
  constexpr const char* op = "xent_ext::cross_entropy_prob_forward";
  check_forward_args(input, reduction, op);
  const Tensor target = canonical_prob_target(target_in, input, op);
  const Tensor weight = canonical_weight(weight_in, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = accumulation_dtype(input.scalar_type());
  const int64_t R = input.size(0) * input.size(2);
  const bool reduce = reduction != kReductionNone;

  Tensor loss = loss_output(input, reduction);
  Tensor lse = at::empty({input.size(0), input.size(2)}, input.options().dtype(at::kDouble));
  Tensor coef_sum = at::empty({input.size(0), input.size(2)}, input.options().dtype(acc));
  const Tensor partials = at::empty({cuda::reduce_tiles(R)}, input.options().dtype(at::kDouble));
  const Tensor row_loss = reduce ? at::empty({R}, input.options().dtype(acc)) : Tensor();

  cuda::ProbForwardLaunch a;
  a.x = logits_of(input);
  a.target = strided_of(target);
  a.weight = data_or_null(weight);
  a.label_smoothing = label_smoothing;
  a.reduction = reduction;
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr<double>();
  a.coef_sum = coef_sum.data_ptr();
  a.partials = partials.data_ptr<double>();
  a.row_loss = data_or_null(row_loss);
  C10_CUDA_CHECK(cuda::launch_prob_forward(a, stream));
  return {loss, lse, coef_sum};
}

std::tuple<Tensor, Tensor> prob_backward_cuda(
    const Tensor& grad_loss,
    const Tensor& input,
    const Tensor& target_in,
    const std::optional<Tensor>& weight_in,
    const Tensor& lse_in,
    const Tensor& coef_sum_in,
    double label_smoothing,
    int64_t reduction,
    bool input_grad,
    bool target_grad) {
  constexpr const char* op = "xent_ext::cross_entropy_prob_backward";
  check_prob_backward_args(grad_loss, input, lse_in, coef_sum_in, reduction, op);
  const Tensor target = canonical_prob_target(target_in, input, op);
  const Tensor weight = canonical_weight(weight_in, input, op);
  const Tensor lse = lse_in.contiguous();
  const Tensor coef_sum = coef_sum_in.contiguous();
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor grad_input = input_grad ? at::empty_like(input) : Tensor();
  Tensor grad_target = target_grad ? at::empty_like(target) : Tensor();

  if (input_grad || target_grad) {
    cuda::ProbBackwardLaunch a;
    a.x = logits_of(input);
    a.target = strided_of(target);
    a.grad_loss = grad_loss.data_ptr();
    a.gln = reduction == kReductionNone ? grad_loss.stride(0) : 0;
    a.glk = reduction == kReductionNone ? grad_loss.stride(1) : 0;
    a.weight = data_or_null(weight);
    a.lse = lse.data_ptr<double>();
    a.coef_sum = coef_sum.data_ptr();
    a.label_smoothing = label_smoothing;
    a.reduction = reduction;
    a.grad_input = strided_of(grad_input);
    a.grad_target = strided_of(grad_target);
    C10_CUDA_CHECK(cuda::launch_prob_backward(a, stream));
  }
  // A gradient that was not asked for comes back as an empty tensor: op
  // schemas cannot return None.
  const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, input.options()); };
  return {or_empty(grad_input), or_empty(grad_target)};
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
