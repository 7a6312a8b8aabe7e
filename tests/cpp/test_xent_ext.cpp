// C++ test of the xent_ext library: calls the ops through the installed header
// (include/xent_ext/xent_ext.h) and compares loss and gradients with torch's
// own C++ cross-entropy (torch::nn::functional::cross_entropy + autograd).
//
//   test_xent_ext            run every case
//   test_xent_ext NAME...    run the named cases (ctest registers one test per case)
//   test_xent_ext --list     print the case names
//
// Data is random, from seeded torch generators. bf16 is compared with torch's
// fp32 result on the same (bf16-valued) inputs, with a looser tolerance.
#include <xent_ext/xent_ext.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/options/loss.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace F = torch::nn::functional;
using at::Tensor;
using xent_ext::reduction::kMean;
using xent_ext::reduction::kNone;
using xent_ext::reduction::kSum;

namespace {

int g_checks = 0;

struct CheckFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define EXPECT(cond, ...)                                                                         \
  do {                                                                                            \
    ++g_checks;                                                                                   \
    if (!(cond)) {                                                                                \
      throw CheckFailure(c10::str(__FILE__, ":", __LINE__, ": expected ", #cond, ": ", __VA_ARGS__)); \
    }                                                                                             \
  } while (0)

const char* reduction_name(int64_t r) {
  return r == kNone ? "none" : (r == kMean ? "mean" : "sum");
}

F::CrossEntropyFuncOptions::reduction_t torch_reduction(int64_t r) {
  if (r == kNone) {
    return torch::kNone;
  }
  if (r == kMean) {
    return torch::kMean;
  }
  return torch::kSum;
}

struct Tolerance {
  double rtol;
  double atol;  // relative to the largest |expected| (plus a tiny absolute floor)
};

Tolerance tolerance_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {1e-10, 1e-12};
    case at::kFloat:
      return {1e-4, 1e-5};
    default:  // bf16 / fp16: outputs rounded to 8 (11) bits, ~0.2% (0.03%)
      return {1e-2, 2e-3};
  }
}

void expect_close(const Tensor& actual, const Tensor& expected, Tolerance tol, const std::string& what) {
  EXPECT(actual.defined() && expected.defined(), what, ": undefined tensor (actual ", actual.defined(),
         ", expected ", expected.defined(), ")");
  EXPECT(actual.sizes() == expected.sizes(), what, ": shape ", actual.sizes(), " vs torch ", expected.sizes());
  const Tensor a = actual.detach().to(at::kDouble);
  const Tensor e = expected.detach().to(at::kDouble);
  if (e.numel() == 0) {
    return;
  }
  const Tensor finite = e.isfinite();
  const double scale = finite.any().item<bool>() ? e.masked_select(finite).abs().max().item<double>() : 0.0;
  const double atol = tol.atol * scale + 1e-12;
  const Tensor close = at::isclose(a, e, tol.rtol, atol, /*equal_nan=*/true);
  if (!close.all().item<bool>()) {
    const Tensor err = (a - e).abs().nan_to_num(INFINITY);
    const int64_t worst = err.flatten().argmax().item<int64_t>();
    throw CheckFailure(c10::str(what, ": mismatch in ", (~close).sum().item<int64_t>(), " of ", e.numel(),
                                " elements; worst at flat index ", worst, ": xent_ext ",
                                a.flatten()[worst].item<double>(), " vs torch ", e.flatten()[worst].item<double>(),
                                " (rtol ", tol.rtol, ", atol ", atol, ")"));
  }
  ++g_checks;
}

at::Generator make_gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// One comparison of xent_ext::cross_entropy with torch's, forward and backward.
struct Case {
  std::vector<int64_t> shape;  // input shape: (C), (N, C) or (N, C, d1, ...)
  at::ScalarType dtype = at::kFloat;
  int64_t reduction = kMean;
  bool prob = false;          // probability targets (else class indices)
  bool weighted = false;
  int64_t ignore_index = -100;
  double ignore_fraction = 0.0;  // class-index targets set to ignore_index
  double label_smoothing = 0.0;
  bool class_strided = false;  // logits laid out with the class dimension last in memory
  double upstream = 1.0;       // the scalar upstream gradient for mean / sum
  uint64_t seed = 0;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << c10::IntArrayRef(c.shape) << " " << c.dtype << " " << reduction_name(c.reduction)
    << (c.prob ? " prob" : " index") << (c.weighted ? " weighted" : "");
  if (!c.prob && c.ignore_fraction > 0) {
    s << " ignore_index=" << c.ignore_index;
  }
  if (c.label_smoothing > 0) {
    s << " smoothing=" << c.label_smoothing;
  }
  if (c.class_strided) {
    s << " class-strided";
  }
  if (c.upstream != 1.0) {
    s << " upstream=" << c.upstream;
  }
  return s.str();
}

void compare_with_torch(const Case& c) {
  const std::string what = describe(c);
  at::Generator gen = make_gen(c.seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t class_dim = c.shape.size() == 1 ? 0 : 1;
  const int64_t C = c.shape[class_dim];
  std::vector<int64_t> rows_shape = c.shape;
  rows_shape.erase(rows_shape.begin() + class_dim);

  // Logits with a spread of a few units, rounded to the test dtype.
  Tensor x_data;
  if (c.class_strided) {
    // Same logical shape, but the class dimension innermost in memory is
    // replaced by classes at the largest stride: (N, d1, C) transposed.
    std::vector<int64_t> phys = c.shape;
    std::swap(phys[1], phys.back());
    x_data = (at::randn(phys, gen, f64) * 3).to(c.dtype).transpose(1, -1);
  } else {
    x_data = (at::randn(c.shape, gen, f64) * 3).to(c.dtype);
  }
  Tensor x = x_data.detach().requires_grad_(true);

  Tensor target;
  if (c.prob) {
    target = at::softmax(at::randn(c.shape, gen, f64) * 2, class_dim).to(c.dtype).requires_grad_(true);
  } else {
    target = at::randint(0, C, rows_shape, gen, at::TensorOptions().dtype(at::kLong));
    if (c.ignore_fraction > 0) {
      const Tensor mask = at::rand(rows_shape, gen, f64) < c.ignore_fraction;
      target = at::where(mask, at::full_like(target, c.ignore_index), target);
    }
  }
  std::optional<Tensor> weight;
  if (c.weighted) {
    weight = (at::rand({C}, gen, f64) + 0.5).to(c.dtype);
  }

  // xent_ext.
  Tensor loss = xent_ext::cross_entropy(x, target, weight, c.ignore_index, c.label_smoothing, c.reduction);
  Tensor grad_loss = c.reduction == kNone ? at::randn(loss.sizes(), gen, f64).to(c.dtype)
                                          : at::full({}, c.upstream, f64).to(c.dtype);
  torch::autograd::backward({loss}, {grad_loss});

  // torch, in fp32 for bf16/fp16 inputs (same values).
  const at::ScalarType ref_dtype = (c.dtype == at::kDouble || c.dtype == at::kFloat) ? c.dtype : at::kFloat;
  Tensor x_ref = x_data.detach().to(ref_dtype).requires_grad_(true);
  Tensor target_ref = c.prob ? target.detach().to(ref_dtype).requires_grad_(true) : target;
  auto options = F::CrossEntropyFuncOptions()
                     .ignore_index(c.ignore_index)
                     .label_smoothing(c.label_smoothing)
                     .reduction(torch_reduction(c.reduction));
  if (weight) {
    options.weight(weight->to(ref_dtype));
  }
  Tensor loss_ref = F::cross_entropy(x_ref, target_ref, options);
  torch::autograd::backward({loss_ref}, {grad_loss.to(ref_dtype)});

  const Tolerance tol = tolerance_for(c.dtype);
  EXPECT(loss.scalar_type() == c.dtype, what, ": loss dtype ", loss.scalar_type());
  expect_close(loss, loss_ref, tol, what + ": loss");
  EXPECT(x.grad().defined(), what, ": no input gradient");
  EXPECT(x.grad().scalar_type() == c.dtype, what, ": gradient dtype ", x.grad().scalar_type());
  expect_close(x.grad(), x_ref.grad(), tol, what + ": input gradient");
  if (c.prob) {
    EXPECT(target.grad().defined(), what, ": no target gradient");
    expect_close(target.grad(), target_ref.grad(), tol, what + ": target gradient");
  }
}

void run_reductions(Case c) {
  for (int64_t r : {kNone, kMean, kSum}) {
    c.reduction = r;
    compare_with_torch(c);
    ++c.seed;
  }
}

// ---------------------------------------------------------------------------
// Cases.

void case_plain() {
  Case c;
  c.shape = {64, 1000};
  c.seed = 100;
  run_reductions(c);
  c.shape = {8, 5000};  // rows longer than one 2048-class chunk
  c.seed = 110;
  run_reductions(c);
  c.shape = {17};  // unbatched: (C) input, 0-d target
  c.seed = 120;
  run_reductions(c);
  c.shape = {0, 5};  // no rows: mean is nan, as torch's
  c.seed = 130;
  run_reductions(c);
}

void case_weights_ignore_smoothing() {
  Case c;
  c.shape = {50, 37};
  c.weighted = true;
  c.ignore_index = 3;
  c.ignore_fraction = 0.2;
  c.label_smoothing = 0.1;
  c.seed = 200;
  run_reductions(c);
  c.ignore_index = -100;  // negative ignore_index, heavier smoothing
  c.label_smoothing = 0.25;
  c.seed = 210;
  run_reductions(c);
  c.weighted = false;
  c.ignore_index = 0;
  c.seed = 220;
  run_reductions(c);
}

void case_kdim() {
  Case c;
  c.shape = {4, 11, 13};  // (N, C, d1)
  c.weighted = true;
  c.ignore_fraction = 0.1;
  c.label_smoothing = 0.05;
  c.seed = 300;
  run_reductions(c);
  c.class_strided = true;  // NCHW-like: classes at the largest stride
  c.seed = 310;
  run_reductions(c);
  c = Case{};
  c.shape = {2, 5, 3, 4};  // (N, C, d1, d2)
  c.seed = 320;
  run_reductions(c);
}

void case_prob() {
  Case c;
  c.prob = true;
  c.shape = {16, 29};
  c.seed = 400;
  run_reductions(c);
  c.weighted = true;
  c.label_smoothing = 0.1;
  c.seed = 410;
  run_reductions(c);
  c.shape = {4, 7, 5};  // K-dim probability targets
  c.seed = 420;
  run_reductions(c);
}

void case_bf16() {
  Case c;
  c.dtype = at::kBFloat16;
  c.shape = {32, 3000};
  c.seed = 500;
  run_reductions(c);
  c.shape = {50, 37};
  c.weighted = true;
  c.ignore_index = 3;
  c.ignore_fraction = 0.2;
  c.label_smoothing = 0.1;
  c.seed = 510;
  run_reductions(c);
  c.shape = {4, 11, 13};
  c.seed = 520;
  run_reductions(c);
  c = Case{};
  c.dtype = at::kBFloat16;
  c.prob = true;
  c.weighted = true;
  c.label_smoothing = 0.1;
  c.shape = {16, 29};
  c.seed = 530;
  run_reductions(c);
}

void case_fp64() {
  Case c;
  c.dtype = at::kDouble;
  c.shape = {20, 300};
  c.weighted = true;
  c.ignore_index = 1;
  c.ignore_fraction = 0.2;
  c.label_smoothing = 0.2;
  c.seed = 600;
  run_reductions(c);
  c = Case{};
  c.dtype = at::kDouble;
  c.prob = true;
  c.shape = {6, 9, 4};
  c.seed = 610;
  run_reductions(c);
}

// The gradient computed in the forward, scaled in place by an upstream
// gradient other than 1.
void case_upstream_scale() {
  uint64_t seed = 700;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (double g : {0.5, 0.3, -2.0}) {
      for (int64_t r : {kMean, kSum}) {
        Case c;
        c.dtype = dtype;
        c.shape = {24, 700};
        c.weighted = true;
        c.ignore_fraction = 0.1;
        c.label_smoothing = 0.1;
        c.upstream = g;
        c.reduction = r;
        c.seed = seed++;
        compare_with_torch(c);
      }
    }
  }
}

// The five ops called directly on canonical (N, C, K) tensors.
void case_raw_ops() {
  at::Generator gen = make_gen(800);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = 6, C = 300, K = 3, ignore_index = 7;
  const double smoothing = 0.1;
  const Tensor x = (at::randn({N, C, K}, gen, f64) * 3).to(at::kFloat);
  Tensor y = at::randint(0, C, {N, K}, gen, at::TensorOptions().dtype(at::kLong));
  y.index_put_({0, 0}, ignore_index);
  const Tensor w = (at::rand({C}, gen, f64) + 0.5).to(at::kFloat);
  const Tolerance tol = tolerance_for(at::kFloat);

  // row_stats: each row's max and log Σ exp(x - max), in float64.
  auto [loss_none, row_stats, total_weight] =
      xent_ext::cross_entropy_index_forward(x, y, w, ignore_index, smoothing, kNone);
  EXPECT(row_stats.scalar_type() == at::kDouble && row_stats.sizes() == at::IntArrayRef({2, N, K}), "row_stats ",
         row_stats.scalar_type(), " ", row_stats.sizes());
  const Tensor x64 = x.to(at::kDouble);
  const Tensor row_max = std::get<0>(x64.max(1));
  EXPECT(at::equal(row_stats[0], row_max), "raw: row_stats[0] is not the row max");
  expect_close(row_stats[1], at::log(at::exp(x64 - row_max.unsqueeze(1)).sum(1)), tol, "raw: row_stats[1]");
  EXPECT(loss_none.sizes() == at::IntArrayRef({N, K}), "raw: 'none' loss shape ", loss_none.sizes());

  // Per-row loss against torch (K-dim input: torch takes (N, C, K) as is).
  auto options = F::CrossEntropyFuncOptions().weight(w).ignore_index(ignore_index).label_smoothing(smoothing);
  expect_close(loss_none, F::cross_entropy(x, y, options.reduction(torch::kNone)), tol, "raw: 'none' loss");

  // backward with a random upstream gradient for 'none', against autograd.
  const Tensor g = at::randn({N, K}, gen, f64).to(at::kFloat);
  const Tensor grad =
      xent_ext::cross_entropy_index_backward(g, x, y, w, row_stats, total_weight, ignore_index, smoothing, kNone);
  Tensor x_ref = x.detach().requires_grad_(true);
  torch::autograd::backward({F::cross_entropy(x_ref, y, options.reduction(torch::kNone))}, {g});
  expect_close(grad, x_ref.grad(), tol, "raw: index backward ('none')");

  // forward_with_grad: the same loss as the forward, and the gradient the
  // backward computes for an upstream gradient of 1.
  for (int64_t r : {kNone, kMean, kSum}) {
    auto [loss, stats1, tw] = xent_ext::cross_entropy_index_forward(x, y, w, ignore_index, smoothing, r);
    auto [loss2, stats2, tw2, grad2] =
        xent_ext::cross_entropy_index_forward_with_grad(x, y, w, ignore_index, smoothing, r);
    EXPECT(at::equal(loss, loss2) && at::equal(stats1, stats2) && at::equal(tw, tw2), "raw: forward_with_grad (",
           reduction_name(r), ") differs from forward");
    // 'none': the gradient for an upstream gradient of 1 on every row.
    const Tensor one = at::ones(loss.sizes(), x.options());
    const Tensor grad1 = xent_ext::cross_entropy_index_backward(one, x, y, w, stats1, tw, ignore_index, smoothing, r);
    EXPECT(at::equal(grad2, grad1), "raw: forward_with_grad gradient (", reduction_name(r),
           ") differs from the backward's");
    Tensor xr = x.detach().requires_grad_(true);
    F::cross_entropy(xr, y, options.reduction(torch_reduction(r))).sum().backward();
    expect_close(grad2, xr.grad(), tol, std::string("raw: forward_with_grad vs torch (") + reduction_name(r) + ")");
  }

  // loss_dtype: the loss in the accumulation dtype, the same number before its
  // last rounding; the backward takes grad_loss in either dtype.
  {
    const Tensor xb = x.to(at::kBFloat16);
    auto [lb, sb, twb] = xent_ext::cross_entropy_index_forward(xb, y, w, ignore_index, smoothing, kNone);
    auto [lf, sf, twf] = xent_ext::cross_entropy_index_forward(xb, y, w, ignore_index, smoothing, kNone, at::kFloat);
    EXPECT(lb.scalar_type() == at::kBFloat16 && lf.scalar_type() == at::kFloat, "raw: loss_dtype ", lf.scalar_type());
    EXPECT(at::equal(lf.to(at::kBFloat16), lb) && at::equal(sb, sf), "raw: loss_dtype changes the values");
    const Tensor gb = xent_ext::cross_entropy_index_backward(g.to(at::kBFloat16), xb, y, w, sb, twb, ignore_index,
                                                             smoothing, kNone);
    const Tensor gf = xent_ext::cross_entropy_index_backward(g.to(at::kBFloat16).to(at::kFloat), xb, y, w, sb, twb,
                                                             ignore_index, smoothing, kNone);
    EXPECT(gf.scalar_type() == at::kBFloat16 && at::equal(gb, gf), "raw: grad_loss dtype changes the gradient");
    bool bad_dtype = false;
    try {
      xent_ext::cross_entropy_index_forward(xb, y, w, ignore_index, smoothing, kNone, at::kDouble);
    } catch (const c10::Error&) {
      bad_dtype = true;
    }
    EXPECT(bad_dtype, "raw: loss_dtype float64 accepted for bfloat16 input");
  }

  // Probability targets: gradients only where asked for.
  const Tensor q = at::softmax(at::randn({N, C, K}, gen, f64), 1).to(at::kFloat);
  auto [ploss, pstats, coef_sum] = xent_ext::cross_entropy_prob_forward(x, q, w, smoothing, kMean);
  auto popt = F::CrossEntropyFuncOptions().weight(w).label_smoothing(smoothing);
  Tensor xr = x.detach().requires_grad_(true);
  Tensor qr = q.detach().requires_grad_(true);
  Tensor pref = F::cross_entropy(xr, qr, popt);
  pref.backward();
  expect_close(ploss, pref, tol, "raw: prob forward");
  const Tensor one = at::ones({}, x.options());
  auto [gi, gt] = xent_ext::cross_entropy_prob_backward(one, x, q, w, pstats, coef_sum, smoothing, kMean, true, true);
  expect_close(gi, xr.grad(), tol, "raw: prob backward input");
  expect_close(gt, qr.grad(), tol, "raw: prob backward target");
  auto [gi2, gt2] = xent_ext::cross_entropy_prob_backward(one, x, q, w, pstats, coef_sum, smoothing, kMean, true, false);
  EXPECT(gt2.numel() == 0, "raw: target gradient not asked for, got shape ", gt2.sizes());
  EXPECT(at::equal(gi, gi2), "raw: input gradient depends on target_grad");
  // The probability forward with gradient: the forward's results and the
  // backward's gradients for an upstream gradient of 1, those asked for.
  auto [floss, fstats, fcoef, fgi, fgt] =
      xent_ext::cross_entropy_prob_forward_with_grad(x, q, w, smoothing, kMean, true, false);
  EXPECT(at::equal(floss, ploss) && at::equal(fstats, pstats) && at::equal(fcoef, coef_sum) && at::equal(fgi, gi) &&
             fgt.numel() == 0,
         "raw: prob forward with gradient differs from forward + backward");
}

// Under autocast (at::autocast on the CPU), as torch: a float32 loss from
// bfloat16 logits (read without a float32 copy), the gradient in bfloat16; the
// values those of torch's float32 computation.
void case_autocast() {
  at::Generator gen = make_gen(950);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = 12, C = 257;
  const Tensor x = (at::randn({N, C}, gen, f64) * 3).to(at::kBFloat16);
  const Tensor y = at::randint(0, C, {N}, gen, at::TensorOptions().dtype(at::kLong));
  const Tensor q = at::softmax(at::randn({N, C}, gen, f64), 1).to(at::kBFloat16);
  const Tensor w = (at::rand({C}, gen, f64) + 0.5).to(at::kBFloat16);
  struct AutocastOn {
    bool was = at::autocast::is_autocast_enabled(at::kCPU);
    at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCPU);
    AutocastOn() {
      at::autocast::set_autocast_enabled(at::kCPU, true);
      at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    }
    ~AutocastOn() {
      at::autocast::set_autocast_enabled(at::kCPU, was);
      at::autocast::set_autocast_dtype(at::kCPU, dtype);
      at::autocast::clear_cache();
    }
  };
  for (bool prob : {false, true}) {
    for (int64_t r : {kNone, kMean, kSum}) {
      const std::string what = std::string("autocast ") + (prob ? "prob " : "index ") + reduction_name(r);
      Tensor xo = x.detach().requires_grad_(true);
      Tensor xt = x.detach().requires_grad_(true);
      Tensor loss, ref;
      {
        AutocastOn on;
        loss = xent_ext::cross_entropy(xo, prob ? q : y, w, -100, 0.1, r);
        ref = F::cross_entropy(xt, prob ? q : y,
                               F::CrossEntropyFuncOptions().weight(w).label_smoothing(0.1).reduction(torch_reduction(r)));
      }
      EXPECT(loss.scalar_type() == at::kFloat && ref.scalar_type() == at::kFloat, what, ": loss dtype ",
             loss.scalar_type(), ", torch's ", ref.scalar_type());
      expect_close(loss, ref, tolerance_for(at::kFloat), what + ": loss");
      const Tensor g = at::randn(loss.sizes(), gen, f64).to(at::kFloat);
      torch::autograd::backward({loss}, {g});
      torch::autograd::backward({ref}, {g});
      EXPECT(xo.grad().scalar_type() == at::kBFloat16, what, ": gradient dtype ", xo.grad().scalar_type());
      expect_close(xo.grad(), xt.grad(), {2.0 / 128, 1e-3}, what + ": input gradient");
    }
  }
}

// Logits modified in place after the forward: the first backward does not
// read them (torch's log_softmax keeps its output), so its gradient is
// torch's; a second backward would read them, and autograd throws.
void case_inplace_edit() {
  at::Generator gen = make_gen(960);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = 9, C = 40;
  const Tensor h = at::randn({N, C}, gen, f64).to(at::kFloat);
  const Tensor y = at::randint(0, C, {N}, gen, at::TensorOptions().dtype(at::kLong));
  const Tensor q = at::softmax(at::randn({N, C}, gen, f64), 1).to(at::kFloat);
  for (bool prob : {false, true}) {
    for (int64_t r : {kNone, kMean, kSum}) {
      const std::string what = std::string("inplace ") + (prob ? "prob " : "index ") + reduction_name(r);
      Tensor leaf = h.detach().requires_grad_(true);
      Tensor leaf_ref = h.detach().requires_grad_(true);
      Tensor logits = leaf * 2.0, logits_ref = leaf_ref * 2.0;
      Tensor loss = xent_ext::cross_entropy(logits, prob ? q : y, std::nullopt, -100, 0.1, r);
      Tensor ref = F::cross_entropy(logits_ref, prob ? q : y,
                                    F::CrossEntropyFuncOptions().label_smoothing(0.1).reduction(torch_reduction(r)));
      logits.mul_(3.0);
      logits_ref.mul_(3.0);
      const Tensor g = at::randn(loss.sizes(), gen, f64).to(at::kFloat);
      torch::autograd::backward({loss}, {g}, /*retain_graph=*/true);
      torch::autograd::backward({ref}, {g});
      expect_close(leaf.grad(), leaf_ref.grad(), tolerance_for(at::kFloat), what + ": gradient after the edit");
      bool threw = false;
      try {
        torch::autograd::backward({loss}, {g});
      } catch (const c10::Error& e) {
        threw = std::string(e.what()).find("modified by an inplace operation") != std::string::npos;
      }
      EXPECT(threw, what, ": a second backward after the edit did not throw autograd's in-place error");
    }
  }
}

// Large logits: softmax from the row max and the log-sum kept apart, so
// x = [[M, M, 0]] with target 0 has the gradient [-1/2, 1/2, 0] at any M.
void case_magnitude() {
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    for (double M : {1e4, 1e16, 1e30}) {
      for (int64_t r : {kNone, kMean, kSum}) {
        const Tensor x = at::tensor({M, M, 0.0}, at::TensorOptions().dtype(at::kDouble)).view({1, 3}).to(dtype);
        const Tensor xr = x.detach().requires_grad_(true);
        const Tensor loss = xent_ext::cross_entropy(xr, at::zeros({1}, at::kLong), std::nullopt, -100, 0.0, r);
        loss.sum().backward();
        const Tensor expect = at::tensor({-0.5, 0.5, 0.0}, at::TensorOptions().dtype(at::kDouble)).view({1, 3});
        EXPECT(at::equal(xr.grad().to(at::kDouble), expect), "magnitude ", dtype, " M=", M, " ", reduction_name(r),
               ": gradient ", xr.grad());
      }
    }
  }
}

// A class index outside [0, C) that is not ignore_index: c10::IndexError,
// "Target 5 is out of bounds.", like torch.
void expect_index_error(const std::function<void()>& call, const std::string& what, const std::string& must_contain) {
  try {
    call();
  } catch (const c10::IndexError& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT(message.find("out of bounds") != std::string::npos, what, ": message ", message);
    EXPECT(message.find(must_contain) != std::string::npos, what, ": message ", message, " lacks ", must_contain);
    return;
  } catch (const std::exception& e) {
    throw CheckFailure(what + ": expected c10::IndexError, got another exception: " + e.what());
  }
  throw CheckFailure(what + ": expected c10::IndexError, nothing was thrown");
}

void case_bad_target() {
  at::Generator gen = make_gen(900);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t C = 5;
  const Tensor x = at::randn({4, C}, gen, f64).to(at::kFloat).requires_grad_(true);
  const Tensor good = at::randint(0, C, {4}, gen, at::TensorOptions().dtype(at::kLong));

  for (int64_t bad : {C, int64_t(-1), int64_t(1000)}) {
    Tensor y = good.clone();
    y.index_put_({2}, bad);
    const std::string value = "Target " + std::to_string(bad) + " is out of bounds";
    expect_index_error([&] { xent_ext::cross_entropy(x, y); }, "cross_entropy, target " + std::to_string(bad), value);
    expect_index_error([&] { xent_ext::cross_entropy(x, y, std::nullopt, -100, 0.1, kNone); },
                       "cross_entropy 'none', target " + std::to_string(bad), value);
    expect_index_error(
        [&] { xent_ext::cross_entropy_index_forward(x.detach().unsqueeze(-1), y.unsqueeze(-1), std::nullopt, -100, 0.0, kSum); },
        "index_forward, target " + std::to_string(bad), value);
    // torch says the same.
    expect_index_error([&] { F::cross_entropy(x, y); }, "torch, target " + std::to_string(bad), "out of bounds");
    // The same value as ignore_index is fine.
    const Tensor ok = xent_ext::cross_entropy(x, y, std::nullopt, bad);
    EXPECT(std::isfinite(ok.item<double>()), "ignored bad target gave ", ok.item<double>());
  }
  // The first bad target in row order is named.
  Tensor y = good.clone();
  y.index_put_({1}, 9);
  y.index_put_({3}, 7);
  expect_index_error([&] { xent_ext::cross_entropy(x, y); }, "first bad target", "Target 9 is out of bounds");
}

const std::vector<std::pair<std::string, void (*)()>>& cases() {
  static const std::vector<std::pair<std::string, void (*)()>> all = {
      {"plain", case_plain},
      {"weights_ignore_smoothing", case_weights_ignore_smoothing},
      {"kdim", case_kdim},
      {"prob", case_prob},
      {"bf16", case_bf16},
      {"fp64", case_fp64},
      {"upstream_scale", case_upstream_scale},
      {"raw_ops", case_raw_ops},
      {"autocast", case_autocast},
      {"magnitude", case_magnitude},
      {"inplace_edit", case_inplace_edit},
      {"bad_target", case_bad_target},
  };
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> selected;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list") == 0) {
      for (const auto& c : cases()) {
        std::cout << c.first << "\n";
      }
      return 0;
    }
    selected.emplace_back(argv[i]);
  }
  for (const auto& name : selected) {
    bool known = false;
    for (const auto& c : cases()) {
      known = known || c.first == name;
    }
    if (!known) {
      std::cerr << "unknown case " << name << " (--list shows them)\n";
      return 2;
    }
  }
  const char* isa = std::getenv("ATEN_CPU_CAPABILITY");
  std::cout << "xent_ext C++ test: torch " << TORCH_VERSION << ", ATen CPU capability " << at::get_cpu_capability()
            << (isa ? " (ATEN_CPU_CAPABILITY set)" : "") << ", " << at::get_num_threads() << " threads\n";
  int passed = 0, failed = 0;
  for (const auto& c : cases()) {
    if (!selected.empty() && std::find(selected.begin(), selected.end(), c.first) == selected.end()) {
      continue;
    }
    const int before = g_checks;
    try {
      c.second();
      ++passed;
      std::cout << "[  OK  ] " << c.first << " (" << (g_checks - before) << " checks)\n";
    } catch (const c10::Error& e) {
      ++failed;
      std::cout << "[ FAIL ] " << c.first << ": " << e.what_without_backtrace() << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "[ FAIL ] " << c.first << ": " << e.what() << "\n";
    }
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
