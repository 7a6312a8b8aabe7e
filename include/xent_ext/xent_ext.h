// xent_ext for C++ (libtorch) programs: exact, fused cross-entropy.
//
//   #include <xent_ext/xent_ext.h>
//   at::Tensor loss = xent_ext::cross_entropy(logits, target);   // like torch::nn::functional::cross_entropy
//   loss.backward();
//
// CMake: find_package(xent_ext REQUIRED) and
// target_link_libraries(app PRIVATE xent_ext::xent_ext).
//
// Linking and registration
// ------------------------
// The operators live in libxent_ext.so and are registered with torch's
// dispatcher by that library's static initializers (TORCH_LIBRARY). Everything
// in this header is inline and reaches the ops through the dispatcher by name,
// so a program references no symbol of libxent_ext.so, and a linker in
// --as-needed mode (Ubuntu's default) drops it: the ops are then missing and
// the calls below throw "operator xent_ext::... is not registered". Link it
// with -Wl,--no-as-needed (as for torchvision). The CMake target
// xent_ext::xent_ext does this for you: it adds -Wl,--no-as-needed to the
// consumer's link line. Without CMake:
//   g++ app.o -Wl,--no-as-needed -lxent_ext -Wl,--as-needed -ltorch -ltorch_cpu -lc10 ...
// Loading it at run time also works: dlopen("libxent_ext.so", RTLD_NOW | RTLD_GLOBAL)
// before the first call.
//
// The operators (schemas in csrc/ops.cpp, Note [Op schemas])
// ---------------------------------------------------------------
// Canonical inputs: logits (N, C, K) with any strides, float64/float32/
// bfloat16/float16; class-index targets (N, K) int64 (or uint8); probability
// targets (N, C, K) of the logits' dtype; class weights (C,) or nullopt;
// reduction 0 none / 1 mean / 2 sum (xent_ext::reduction). Forwards return
// (loss, row_stats, aux): loss (N, K) for 'none', else 0-d, in the logits'
// dtype (or, with loss_dtype = the accumulation dtype, float32 for
// float32/bfloat16/float16 logits: what autocast asks for); row_stats (2, N, K) float64, each row's max and log Σ exp(x - max),
// which the backward forms softmax from (lse = row_stats[0] + row_stats[1]
// where one is wanted); aux is the
// weighted-mean denominator total_weight (index targets, 0-d) or coef_sum
// (probability targets, (N, K)). A class index outside [0, C) that is not
// ignore_index throws c10::IndexError("Target 7 is out of bounds."). The
// backward ops take grad_loss in the logits' dtype or the accumulation dtype
// and return gradients in the logits' dtype.
// These raw ops are not differentiable by autograd; xent_ext::cross_entropy is.
//
// Thread safety: as torch's own ops.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace xent_ext {

// torch's reduction enum (torch.nn._reduction.get_enum).
namespace reduction {
constexpr int64_t kNone = 0;
constexpr int64_t kMean = 1;
constexpr int64_t kSum = 2;
}  // namespace reduction

namespace detail {

inline c10::OperatorHandle find_op(const char* name) {
  std::optional<c10::OperatorHandle> handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), "operator ", name,
              " is not registered: libxent_ext.so is not loaded. Link it with -Wl,--no-as-needed "
              "(the CMake target xent_ext::xent_ext does), or dlopen it before the first call.");
  return *handle;
}

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using OptDtype = std::optional<at::ScalarType>;

}  // namespace detail

// ---------------------------------------------------------------------------
// The operators, typed. Each takes the LLM extras (logit_scale, softcap,
// z_loss; off at their defaults) last; the autograd twins below call them with
// the defaults.

// -> (loss, row_stats, total_weight). loss_dtype: nullopt for a loss in the
// input's dtype, the accumulation dtype for one in that.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_index_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::optional<at::ScalarType> loss_dtype = std::nullopt,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_index_forward")
          .typed<detail::Tensor3(const at::Tensor&, const at::Tensor&, const detail::OptTensor&, int64_t, double,
                                 int64_t, detail::OptDtype, double, std::optional<double>, double)>();
  return op.call(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, logit_scale, softcap, z_loss);
}

// -> (loss, row_stats, total_weight, grad_input): also the input gradient for an
// upstream gradient of 1 (for 'none', of 1 on every row), computed in the same pass.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_index_forward_with_grad(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::optional<at::ScalarType> loss_dtype = std::nullopt,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_index_forward_with_grad")
          .typed<detail::Tensor4(const at::Tensor&, const at::Tensor&, const detail::OptTensor&, int64_t, double,
                                 int64_t, detail::OptDtype, double, std::optional<double>, double)>();
  return op.call(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, logit_scale, softcap, z_loss);
}

// -> grad_input (N, C, K). grad_loss: (N, K) for 'none', else a scalar, in the
// input's dtype or the accumulation dtype.
inline at::Tensor cross_entropy_index_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_stats, const at::Tensor& total_weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_index_backward")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const detail::OptTensor&,
                            const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, double, std::optional<double>, double)>();
  return op.call(grad_loss, input, target, weight, row_stats, total_weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
}

// -> (loss, row_stats, coef_sum)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, std::optional<at::ScalarType> loss_dtype = std::nullopt,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_prob_forward")
          .typed<detail::Tensor3(const at::Tensor&, const at::Tensor&, const detail::OptTensor&, double, int64_t,
                                 detail::OptDtype, double, std::optional<double>, double)>();
  return op.call(input, target, weight, label_smoothing, reduction, loss_dtype, logit_scale, softcap, z_loss);
}

// -> (loss, row_stats, coef_sum, grad_input, grad_target): the forward, and the
// gradients asked for an upstream gradient of 1 (for 'none', of 1 on every row);
// a gradient not asked for is an empty tensor.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_with_grad(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, int64_t reduction, bool input_grad, bool target_grad,
    std::optional<at::ScalarType> loss_dtype = std::nullopt,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_prob_forward_with_grad")
          .typed<detail::Tensor5(const at::Tensor&, const at::Tensor&, const detail::OptTensor&, double, int64_t, bool,
                                 bool, detail::OptDtype, double, std::optional<double>, double)>();
  return op.call(input, target, weight, label_smoothing, reduction, input_grad, target_grad, loss_dtype, logit_scale, softcap, z_loss);
}

// -> (grad_input, grad_target); a gradient not asked for is an empty tensor.
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& row_stats, const at::Tensor& coef_sum,
    double label_smoothing, int64_t reduction, bool input_grad, bool target_grad,
    double logit_scale = 1.0, std::optional<double> softcap = std::nullopt, double z_loss = 0.0) {
  static const auto op =
      detail::find_op("xent_ext::cross_entropy_prob_backward")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const detail::OptTensor&, const at::Tensor&, const at::Tensor&,
                                                    double, int64_t, bool, bool, double, std::optional<double>, double)>();
  return op.call(grad_loss, input, target, weight, row_stats, coef_sum, label_smoothing, reduction, input_grad,
                 target_grad, logit_scale, softcap, z_loss);
}

// ---------------------------------------------------------------------------
// Autograd on the canonical (N, C, K) ops. First-order gradients w.r.t. the
// logits (and probability targets); no gradient for the class weights, no
// double backward (the Python package has both). The twin of the Python
// autograd in xent_ext/_ops.py (setup_context and backward): the two must
// agree.

namespace detail {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
inline std::optional<at::Tensor> or_nullopt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The first backward's gradient from the one computed in the forward for an
// upstream gradient of 1 (Note [Gradient in the forward], xent_ext/_ops.py):
// handed out as it is when the upstream gradient is 1, else scaled in place,
// row by row for 'none'. The logits are not read again.
inline at::Tensor scale_stored_gradient(at::Tensor grad, const at::Tensor& grad_loss, int64_t reduction) {
  at::Tensor g = grad_loss;
  if (reduction == reduction::kNone) {
    bool expanded = g.numel() > 0;  // one upstream value for every row (loss.sum().backward())
    for (int64_t s : g.strides()) {
      expanded = expanded && s == 0;
    }
    if (!expanded) {
      // (N, K) upstream, broadcast over the classes. In the gradient's dtype:
      // a float32 upstream on a bfloat16 gradient would take float32 copies
      // of the gradient's size.
      g = g.unsqueeze(1);
      return grad.mul_(g.scalar_type() == grad.scalar_type() ? g : g.to(grad.scalar_type()));
    }
    g = g.as_strided({}, {});
  }
  g = g.reshape({});
  if (g.item<double>() == 1.0) {
    return grad;
  }
  // A 0-d factor: the product is formed in float32 (float64) and rounded once.
  return grad.mul_(g);
}

struct IndexCrossEntropy : public torch::autograd::Function<IndexCrossEntropy> {
  // fused: compute the gradient in the forward (Note [Gradient in the forward]).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                            int64_t reduction, std::optional<at::ScalarType> loss_dtype, bool fused) {
    at::Tensor loss, row_stats, total_weight, grad;
    if (fused) {
      std::tie(loss, row_stats, total_weight, grad) = cross_entropy_index_forward_with_grad(
          input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype);
      ctx->saved_data["fused_grad"] = grad;
    } else {
      std::tie(loss, row_stats, total_weight) =
          cross_entropy_index_forward(input, target, weight, ignore_index, label_smoothing, reduction, loss_dtype);
    }
    ctx->save_for_backward({input, target, or_undefined(weight), row_stats, total_weight});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list grads(8);
    if (!grad_loss.defined()) {
      return grads;
    }
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    auto it = ctx->saved_data.find("fused_grad");
    if (it != ctx->saved_data.end()) {
      at::Tensor fused = it->second.toTensor();
      ctx->saved_data.erase(it);  // handed out (or scaled in place) once
      grads[0] = scale_stored_gradient(fused, grad_loss, reduction);
      return grads;
    }
    // A second backward: from the saved logits, which autograd checks were
    // not modified in place since the forward.
    const auto saved = ctx->get_saved_variables();
    grads[0] = cross_entropy_index_backward(grad_loss, saved[0], saved[1], or_nullopt(saved[2]), saved[3], saved[4],
                                            ctx->saved_data["ignore_index"].toInt(),
                                            ctx->saved_data["label_smoothing"].toDouble(), reduction);
    return grads;
  }
};

struct ProbCrossEntropy : public torch::autograd::Function<ProbCrossEntropy> {
  // fused: compute the gradients asked for in the forward.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, double label_smoothing, int64_t reduction,
                            std::optional<at::ScalarType> loss_dtype, bool fused) {
    at::Tensor loss, row_stats, coef_sum;
    if (fused) {
      at::Tensor grad_input, grad_target;
      std::tie(loss, row_stats, coef_sum, grad_input, grad_target) = cross_entropy_prob_forward_with_grad(
          input, target, weight, label_smoothing, reduction, input.requires_grad(), target.requires_grad(),
          loss_dtype);
      ctx->saved_data["fused_grad_input"] = grad_input;
      ctx->saved_data["fused_grad_target"] = grad_target;
      ctx->saved_data["fused_input"] = input.requires_grad();
      ctx->saved_data["fused_target"] = target.requires_grad();
    } else {
      std::tie(loss, row_stats, coef_sum) =
          cross_entropy_prob_forward(input, target, weight, label_smoothing, reduction, loss_dtype);
    }
    ctx->save_for_backward({input, target, or_undefined(weight), row_stats, coef_sum});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list grads(7);
    const bool want_input = ctx->needs_input_grad(0), want_target = ctx->needs_input_grad(1);
    if (!grad_loss.defined() || !(want_input || want_target)) {
      return grads;
    }
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    auto it = ctx->saved_data.find("fused_grad_input");
    if (it != ctx->saved_data.end()) {
      const at::Tensor fused_input = it->second.toTensor();
      const at::Tensor fused_target = ctx->saved_data["fused_grad_target"].toTensor();
      const bool have_input = ctx->saved_data["fused_input"].toBool();
      const bool have_target = ctx->saved_data["fused_target"].toBool();
      ctx->saved_data.erase("fused_grad_input");  // handed out (or scaled in place) once
      ctx->saved_data.erase("fused_grad_target");
      if ((have_input || !want_input) && (have_target || !want_target)) {
        if (want_input) {
          grads[0] = scale_stored_gradient(fused_input, grad_loss, reduction);
        }
        if (want_target) {
          grads[1] = scale_stored_gradient(fused_target, grad_loss, reduction);
        }
        return grads;
      }
    }
    // A second backward: from the saved logits, which autograd checks were
    // not modified in place since the forward.
    const auto saved = ctx->get_saved_variables();
    auto [grad_input, grad_target] = cross_entropy_prob_backward(
        grad_loss, saved[0], saved[1], or_nullopt(saved[2]), saved[3], saved[4],
        ctx->saved_data["label_smoothing"].toDouble(), reduction, want_input, want_target);
    if (want_input) {
      grads[0] = grad_input;
    }
    if (want_target) {
      grads[1] = grad_target;
    }
    return grads;
  }
};

// Note [Autocast] (C++): torch.autocast runs cross-entropy in fp32 (its fp32
// list): float32, bfloat16 and float16 tensors count as float32, float64 stays.
// This is the dtype a tensor of dtype t computes in under autocast on `device`.
inline at::ScalarType autocast_dtype(at::ScalarType t, c10::DeviceType device) {
  const bool low = t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
  return low && at::autocast::is_autocast_enabled(device) ? at::kFloat : t;
}

// (C,), (N, C) or (N, C, d1, ..., dk) as (N, C, K): a view unless the strides can't be merged.
// The twin of _as_ncK in xent_ext/functional.py: the two must agree.
inline at::Tensor as_nck(const at::Tensor& t) {
  if (t.dim() == 1) {
    return t.unsqueeze(0).unsqueeze(-1);
  }
  if (t.dim() == 2) {
    return t.unsqueeze(-1);
  }
  return t.flatten(2);
}

}  // namespace detail

// ---------------------------------------------------------------------------
// The loss, as torch::nn::functional::cross_entropy computes it.
//
// input: logits (C), (N, C) or (N, C, d1, ..., dk); float64/32, bfloat16 or float16.
// target: class indices (), (N) or (N, d1, ..., dk), int64 (or uint8), each in
//   [0, C) or equal to ignore_index; or class probabilities of the input's shape
//   (told apart by shape alone, as torch does; the computation runs in the
//   promoted dtype of input, target and weight).
// weight: class weights (C,) or nullopt. ignore_index: any value (must be
//   negative with probability targets). label_smoothing: in [0, 1].
// reduction: reduction::kNone (loss shaped like the target without the class
//   dimension), kMean or kSum (0-d).
// Under autocast (at::autocast, as torch.autocast), as torch: float32,
// bfloat16 and float16 count as float32, so the loss is float32 (read from
// bfloat16/float16 logits without a float32 copy) and the gradient comes back
// in the logits' dtype.
// Differentiable w.r.t. input (and probability targets) under autograd; when
// they require grad, the gradient is computed in the forward pass and the
// first backward scales it by the upstream gradient without reading the
// logits again (so they may be modified in place after the forward, as with
// torch); a second backward reads them again, and autograd raises if they
// were modified.
// Arguments torch rejects are rejected, but not always with torch's words.
inline at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight = std::nullopt, int64_t ignore_index = -100,
                                double label_smoothing = 0.0, int64_t reduction = reduction::kMean) {
  TORCH_CHECK(input.dim() >= 1, "xent_ext::cross_entropy: expected input of shape (C), (N, C) or (N, C, d1, ..., dk), "
              "got a 0-d tensor");
  TORCH_CHECK(!(label_smoothing > 1.0), "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  // As torch: smoothing only for label_smoothing > 0 (negative and nan act as 0).
  const double smoothing = label_smoothing > 0.0 ? label_smoothing : 0.0;
  const int64_t class_dim = input.dim() == 1 ? 0 : 1;
  std::vector<int64_t> rows_shape(input.sizes().begin(), input.sizes().end());
  rows_shape.erase(rows_shape.begin() + class_dim);

  at::Tensor loss;
  if (input.sizes() == target.sizes()) {
    TORCH_CHECK(target.is_floating_point(), "Expected floating point type for target with class probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(ignore_index < 0, "ignore_index is not supported for floating point target");
    const c10::DeviceType device = input.device().type();
    at::ScalarType dtype = c10::promoteTypes(detail::autocast_dtype(input.scalar_type(), device),
                                             detail::autocast_dtype(target.scalar_type(), device));
    if (weight.has_value() && weight->defined()) {
      dtype = c10::promoteTypes(dtype, detail::autocast_dtype(weight->scalar_type(), device));
    }
    const std::optional<at::Tensor> w =
        weight.has_value() && weight->defined() ? std::optional<at::Tensor>(weight->to(dtype)) : std::nullopt;
    // Under autocast, bfloat16/float16 logits and target of one dtype are read
    // as they are, with a float32 loss; any other mix is copied to the
    // computation's dtype, as autocast itself would.
    const bool keep = dtype == at::kFloat && input.scalar_type() == target.scalar_type() &&
                      input.scalar_type() != at::kFloat;
    const at::Tensor x = detail::as_nck(keep ? input : input.to(dtype));
    const at::Tensor q = detail::as_nck(keep ? target : target.to(dtype));
    const bool fused = (x.requires_grad() || q.requires_grad()) && c10::GradMode::is_enabled();
    loss = detail::ProbCrossEntropy::apply(x, q, w, smoothing, reduction,
                                           keep ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt, fused);
  } else {
    TORCH_CHECK(target.sizes() == at::IntArrayRef(rows_shape), "xent_ext::cross_entropy: expected target of shape ",
                at::IntArrayRef(rows_shape), " (class indices) or ", input.sizes(),
                " (class probabilities) for input of shape ", input.sizes(), ", got ", target.sizes());
    at::Tensor y = input.dim() == 1 ? target.reshape({1, 1}) : (input.dim() == 2 ? target.unsqueeze(-1) : target.flatten(1));
    const bool fused = input.requires_grad() && c10::GradMode::is_enabled();
    const at::ScalarType compute = detail::autocast_dtype(input.scalar_type(), input.device().type());
    const std::optional<at::ScalarType> loss_dtype =
        compute != input.scalar_type() ? std::optional<at::ScalarType>(compute) : std::nullopt;
    loss = detail::IndexCrossEntropy::apply(detail::as_nck(input), y, weight, ignore_index, smoothing, reduction,
                                            loss_dtype, fused);
  }
  if (reduction == reduction::kNone) {
    loss = loss.reshape(rows_shape);
  }
  return loss;
}

}  // namespace xent_ext
