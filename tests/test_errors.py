"""Bad input: xent_ext must raise what torch raises (same type, same message).

Every case runs torch first, catches its exception, then requires
`pytest.raises(type(e), match=re.escape(str(e)))` from xent_ext. A few messages name
torch internals (an ATen kernel or autograd function, device strings from the
dispatcher); for those only the exception type and key words are required.

Each test runs on every device of the `device` fixture. On CUDA the reference is torch on
CUDA, except where a target holds an out-of-range class index: torch's CUDA kernels
answer that with a device-side assert that poisons the process' CUDA context, so there
torch's exception is taken on CPU copies of the same tensors (xent_ext raises the CPU's
exception on every device), and the test then checks that the CUDA context still works.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import (
    REDUCTIONS,
    assert_cuda_usable,
    check_against_torch,
    is_cuda,
    make_logits,
    on_cpu,
    random_weight,
    same_exception,
    same_outcome,
)

ours = xent_ext.cross_entropy
L = torch.long


def T(*v, dtype=L, device="cpu"):
    return torch.tensor(v, dtype=dtype, device=device)


def _x(*shape, dtype=torch.float32, device="cpu"):
    return make_logits(shape, dtype, device=device)


def _cpu_kw(kw):
    """kwargs with every tensor replaced by a CPU copy."""
    return {k: on_cpu(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _torch_on_cpu(x, t, **kw):
    """torch's cross_entropy on CPU copies: the reference for inputs with out-of-range class
    indices, on which torch's CUDA kernels device-assert."""
    return F.cross_entropy(on_cpu(x), on_cpu(t), **_cpu_kw(kw))


# ----------------------------------------------------------------------------------
# out-of-range class indices (every dimensionality, reduction and label smoothing)
# ----------------------------------------------------------------------------------


def _oob_target(shape, bad, dtype=L, C=5, device="cpu"):
    """A valid target for `shape` with exactly one element replaced by `bad`."""
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, C, tshape, dtype=L)
    flat = t.view(-1)
    flat[torch.randint(0, flat.numel(), ()).item()] = bad
    return t.to(device=device, dtype=dtype)


OOB_CASES = [
    # (id, input shape, bad value, target dtype, kwargs)
    ("C", (4, 5), 5, L, {}),
    ("minus1", (4, 5), -1, L, {}),
    ("minus100_other_ignore", (4, 5), -100, L, {"ignore_index": 2}),
    ("minus101", (4, 5), -101, L, {}),
    ("huge", (4, 5), 2**40, L, {}),
    ("u8_200", (4, 5), 200, torch.uint8, {}),
    ("u8_5", (4, 5), 5, torch.uint8, {"ignore_index": 4}),
    ("unbatched_C", (5,), 5, L, {}),
    ("unbatched_minus1", (5,), -1, L, {}),
    ("3d", (2, 5, 3), 7, L, {}),
    ("3d_minus1", (2, 5, 3), -1, L, {"ignore_index": 1}),
    ("4d", (2, 5, 3, 2), 5, L, {}),
    ("5d", (2, 5, 2, 2, 2), -3, L, {}),
    ("weighted", (4, 5), 6, L, {"weight": "w"}),
    ("255_not_ignored", (4, 5), 255, L, {}),
]


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", OOB_CASES, ids=[c[0] for c in OOB_CASES])
def test_out_of_range_target(case, reduction, ls, device, cuda_target_check_on, fresh_seed):
    _, shape, bad, tdt, kw = case
    x = _x(*shape, device=device)
    t = _oob_target(shape, bad, tdt, device=device)
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = random_weight(shape[1], device=device)
    kw.update(reduction=reduction, label_smoothing=ls)
    torch_kw = kw
    if tdt == torch.uint8 and len(shape) >= 2 and reduction == "none":
        # torch bug: batched uint8 + 'none' formats the byte as a character ("Target \x05 is
        # out of bounds.", and a UnicodeDecodeError for bytes >= 128). The reference is
        # torch's message for the same input with reduction='mean': "Target 200 is ...".
        torch_kw = dict(kw, reduction="mean")
    # torch's exception on CPU copies (identical to torch's on CPU; on CUDA, torch would device-assert)
    te, oe = same_exception(lambda: _torch_on_cpu(x, t, **torch_kw), lambda: ours(x, t, **kw))
    assert str(bad) in str(te)
    assert_cuda_usable(device)


def test_out_of_range_target_requires_grad(device, cuda_target_check_on, fresh_seed):
    # raised by the forward, also when the input requires grad
    x = _x(4, 5, device=device).requires_grad_()
    t = T(0, 1, 9, 2, device=device)
    same_exception(lambda: _torch_on_cpu(x, t), lambda: ours(x, t))
    assert_cuda_usable(device)


def test_index_target_zero_classes(device, cuda_target_check_on):
    x = torch.randn(3, 0).to(device)
    t = torch.zeros(3, dtype=L, device=device)
    same_exception(lambda: _torch_on_cpu(x, t), lambda: ours(x, t))
    assert_cuda_usable(device)


def test_unbatched_target_of_size_one(device, cuda_target_check_on, fresh_seed):
    # torch >= 2.13 accepts a (1,) target for (C,) input in the forward with
    # label_smoothing=0 (result shape ()); an out-of-range one still raises.
    x = _x(5, device=device)
    for red in REDUCTIONS:
        got = ours(x, T(3, device=device), reduction=red)
        ref = F.cross_entropy(x, T(3, device=device), reduction=red)
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    same_exception(lambda: _torch_on_cpu(x, T(7)), lambda: ours(x, T(7, device=device)))
    assert_cuda_usable(device)


def _either_torch_error_or_value(torch_fn, ours_fn, ref_fn, ctx, device="cpu", cpu_torch_fn=None):
    """torch fails on a valid-looking input (a torch limitation, not bad input): xent_ext
    may raise exactly torch's exception, or return ref_fn()'s (value, grad).

    On CUDA torch's kernels have other limits than on the CPU, so torch is not required to
    fail there; the accepted exceptions are torch's on the device and (cpu_torch_fn) torch's
    on CPU copies, the quirk xent_ext reproduces on every device."""
    errors = []
    if is_cuda(device):
        for fn in (torch_fn, cpu_torch_fn):
            if fn is None:
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
    else:
        with pytest.raises(Exception) as ti:
            torch_fn()
        errors.append(ti.value)
    try:
        got = ours_fn()
    except Exception as e:  # noqa: BLE001
        assert any(type(e) is type(te) and str(te) in str(e) for te in errors), (
            f"{ctx}: xent_ext raised {type(e).__name__}: {e}; torch raised "
            + ("; ".join(f"{type(te).__name__}: {te}" for te in errors) or "nothing"))
        return
    ref = ref_fn()
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, ctx
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{ctx}: {m}")


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_target_of_size_one_torch_limits(reduction, ls, device, fresh_seed):
    # torch: with ls > 0 the forward fails ("output with shape [] doesn't match the broadcast
    # shape [1]"); with ls = 0 the backward fails ("size mismatch (got input: [5], target: [1])").
    x = _x(5, device=device)

    def fwd_bwd(fn, x, t):
        xi = x.detach().requires_grad_()
        loss = fn(xi, t, reduction=reduction, label_smoothing=ls)
        (g,) = torch.autograd.grad(loss, xi)
        return loss, g

    _either_torch_error_or_value(lambda: fwd_bwd(F.cross_entropy, x, T(3, device=device)),
                                 lambda: fwd_bwd(ours, x, T(3, device=device)),
                                 lambda: fwd_bwd(F.cross_entropy, x, torch.tensor(3, device=device)),
                                 f"(5,) with (1,) {reduction} ls={ls} {device}", device=device,
                                 cpu_torch_fn=lambda: fwd_bwd(F.cross_entropy, x.cpu(), T(3)))


# ----------------------------------------------------------------------------------
# target dtype / kind
# ----------------------------------------------------------------------------------

DTYPE_CASES = [
    ("int32", lambda d: (_x(3, 5, device=d), T(0, 1, 2, dtype=torch.int32, device=d))),
    ("int16", lambda d: (_x(3, 5, device=d), T(0, 1, 2, dtype=torch.int16, device=d))),
    ("int8", lambda d: (_x(3, 5, device=d), T(0, 1, 2, dtype=torch.int8, device=d))),
    ("bool", lambda d: (_x(3, 5, device=d), T(0, 1, 1, dtype=torch.bool, device=d))),
    ("float_diff_shape", lambda d: (_x(3, 5, device=d), T(0, 1, 2, dtype=torch.float32, device=d))),
    ("double_diff_shape", lambda d: (_x(3, 5, device=d), T(0, 1, 2, dtype=torch.float64, device=d))),
    ("int32_3d", lambda d: (_x(2, 5, 3, device=d), torch.zeros(2, 3, dtype=torch.int32, device=d))),
    ("same_shape_long", lambda d: (_x(3, 5, device=d), torch.zeros(3, 5, dtype=L, device=d))),
    ("same_shape_int", lambda d: (_x(3, 5, device=d), torch.zeros(3, 5, dtype=torch.int32, device=d))),
    ("same_shape_bool", lambda d: (_x(3, 5, device=d), torch.zeros(3, 5, dtype=torch.bool, device=d))),
    ("same_shape_u8", lambda d: (_x(3, 5, device=d), torch.zeros(3, 5, dtype=torch.uint8, device=d))),
    ("same_shape_long_1d", lambda d: (_x(5, device=d), torch.zeros(5, dtype=L, device=d))),
    ("same_shape_long_0d", lambda d: (torch.randn(()).to(d), torch.tensor(1, device=d))),
    ("same_shape_int_3d", lambda d: (_x(3, 5, 2, device=d), torch.zeros(3, 5, 2, dtype=torch.int32, device=d))),
    ("float_0d_pair", lambda d: (torch.randn(()).to(d), torch.tensor(0.5, device=d))),
]


@pytest.mark.parametrize("case", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_bad_target_dtype(case, device, fresh_seed):
    x, t = case[1](device)
    same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t))


# torch accepts uint8 class indices only on its nll_loss path: input of <= 2 dims, and not
# with weight + label_smoothing > 0 + 'mean' (a gather() on the weight needs int64). These
# are torch limitations rather than bad input, so xent_ext may either raise exactly what
# torch raises, or return what torch returns for the same target as int64.
UINT8_QUIRKS = [
    ("3d", (2, 5, 3), {}),
    ("4d", (2, 5, 2, 3), {"reduction": "sum"}),
    ("5d", (2, 5, 2, 2, 2), {"reduction": "none"}),
    ("3d_ls", (2, 5, 3), {"label_smoothing": 0.1}),
    ("2d_weight_ls_mean", (4, 5), {"weight": "w", "label_smoothing": 0.1, "reduction": "mean"}),
    ("1d_weight_ls_mean", (5,), {"weight": "w", "label_smoothing": 0.1, "reduction": "mean"}),
]


@pytest.mark.parametrize("case", UINT8_QUIRKS, ids=[c[0] for c in UINT8_QUIRKS])
def test_uint8_where_torch_fails(case, device, fresh_seed):
    _, shape, kw = case
    x = _x(*shape, device=device)
    t = _oob_target(shape, 1, torch.uint8, device=device)  # every class index valid
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = random_weight(5, device=device)
    _either_torch_error_or_value(lambda: (F.cross_entropy(x, t, **kw),), lambda: (ours(x, t, **kw),),
                                 lambda: (F.cross_entropy(x, t.long(), **kw),), f"uint8 {case[0]} {device}",
                                 device=device, cpu_torch_fn=lambda: (_torch_on_cpu(x, t, **kw),))


# ----------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------

SHAPE_CASES = [
    ("batch_mismatch", lambda d: (_x(10, 3, device=d), torch.zeros(3, dtype=L, device=d))),
    ("multi_target", lambda d: (_x(10, 3, device=d), torch.zeros(10, 2, dtype=L, device=d))),
    ("3d_wrong_spatial", lambda d: (_x(2, 3, 5, device=d), torch.zeros(2, 4, dtype=L, device=d))),
    ("5d_wrong_spatial", lambda d: (_x(2, 3, 5, 6, 7, device=d), torch.zeros(2, 5, 6, 8, dtype=L, device=d))),
    ("5d_missing_dim", lambda d: (_x(2, 3, 5, 6, 7, device=d), torch.zeros(2, 5, 6, dtype=L, device=d))),
    ("4d_size_mismatch", lambda d: (_x(2, 3, 5, 6, device=d), torch.zeros(2, 5, 7, dtype=L, device=d))),
    ("4d_target_2d", lambda d: (_x(2, 3, 5, 6, device=d), torch.zeros(2, 5, dtype=L, device=d))),
    ("prob_wrong_shape", lambda d: (_x(3, 5, device=d), torch.rand(3, 6).to(d))),
    ("prob_wrong_shape_3d", lambda d: (_x(3, 5, 2, device=d), torch.rand(3, 5, 3).to(d))),
    ("1d_input_target_2", lambda d: (_x(5, device=d), torch.zeros(2, dtype=L, device=d))),
    ("2d_input_0d_target", lambda d: (_x(3, 5, device=d), torch.tensor(1, device=d))),
    ("3d_batch_mismatch", lambda d: (_x(2, 3, 5, device=d), torch.zeros(3, 5, dtype=L, device=d))),
]


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_bad_shapes(case, ls, device, fresh_seed):
    x, t = case[1](device)
    same_exception(lambda: F.cross_entropy(x, t, label_smoothing=ls), lambda: ours(x, t, label_smoothing=ls))


# ----------------------------------------------------------------------------------
# weight
# ----------------------------------------------------------------------------------


def _idx(device="cpu"):
    return _x(3, 5, device=device), T(0, 2, 4, device=device)


def _prob(device="cpu"):
    return _x(3, 5, device=device), torch.softmax(torch.randn(3, 5), 1).to(device)


WEIGHT_CASES = [
    ("index_size4", _idx, lambda: torch.rand(4)),
    ("index_size6", _idx, lambda: torch.rand(6)),
    ("index_2d", _idx, lambda: torch.rand(1, 5)),
    ("index_0d", _idx, lambda: torch.tensor(1.0)),
    ("index_f64", _idx, lambda: torch.rand(5, dtype=torch.float64)),
    ("index_f16", _idx, lambda: torch.rand(5, dtype=torch.float16)),
    ("index_long", _idx, lambda: torch.ones(5, dtype=L)),
    ("prob_size4", _prob, lambda: torch.rand(4)),
    ("prob_2d", _prob, lambda: torch.rand(1, 5)),
    ("index_3d_size4", lambda d: (_x(2, 5, 3, device=d), torch.zeros(2, 3, dtype=L, device=d)), lambda: torch.rand(4)),
    ("index_3d_f64", lambda d: (_x(2, 5, 3, device=d), torch.zeros(2, 3, dtype=L, device=d)),
     lambda: torch.rand(5, dtype=torch.float64)),
]


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weight(case, ls, device, fresh_seed):
    x, t = case[1](device)
    w = case[2]().to(device)
    same_exception(lambda: F.cross_entropy(x, t, weight=w, label_smoothing=ls),
                   lambda: ours(x, t, weight=w, label_smoothing=ls))


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 3), (5,)], ids=str)
def test_weight_requires_grad_on_index_path(shape, ls, device, fresh_seed):
    x = _x(*shape, device=device)
    t = _oob_target(shape, 1, device=device)  # every class index valid
    w = random_weight(5, device=device).requires_grad_()
    # torch names its internal autograd function ('nll_loss_forward' / 'nll_loss2d_forward');
    # require the type and the actionable part of the message.
    same_exception(lambda: F.cross_entropy(x, t, weight=w, label_smoothing=ls),
                   lambda: ours(x, t, weight=w, label_smoothing=ls),
                   exact=False, keywords=("not differentiable with respect to argument 'weight'",
                                          "This input cannot have requires_grad True."))


def test_weight_long_on_prob_path_is_promoted(device, fresh_seed):
    # not an error in torch: the probability path type-promotes the weight
    x, t = _prob(device)
    w = torch.randint(1, 4, (5,)).to(device)
    check_against_torch(ours, x, t, w, wrt=("input", "target"), ctx="long weight, prob path")


# ----------------------------------------------------------------------------------
# reduction, label_smoothing, ignore_index with probabilities
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["avg", None, "MEAN", "", "elementwise_sum", 1])
def test_unknown_reduction(reduction, kind, device, fresh_seed):
    x, t = _idx(device) if kind == "index" else _prob(device)
    same_exception(lambda: F.cross_entropy(x, t, reduction=reduction), lambda: ours(x, t, reduction=reduction))


@pytest.mark.parametrize("kind", ["index", "prob", "index_3d"])
@pytest.mark.parametrize("ls", [1.5, float("inf"), 1.0000001, 2.0])
def test_label_smoothing_too_large(ls, kind, device, fresh_seed):
    if kind == "index_3d":
        x, t = _x(2, 5, 3, device=device), torch.zeros(2, 3, dtype=L, device=device)
    else:
        x, t = _idx(device) if kind == "index" else _prob(device)
    same_exception(lambda: F.cross_entropy(x, t, label_smoothing=ls), lambda: ours(x, t, label_smoothing=ls))


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [0, 3, 255, 10**6])
def test_ignore_index_with_prob_target(ignore_index, ls, device, fresh_seed):
    x, t = _prob(device)
    same_exception(lambda: F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=ls),
                   lambda: ours(x, t, ignore_index=ignore_index, label_smoothing=ls))


# several problems at once: the first one torch reports must be the one we report
# (cases with an out-of-range class index take torch's exception on CPU copies: the checks
# that come first are device independent, and torch's CUDA kernels device-assert)
ORDER_CASES = [
    ("ls_before_oob", lambda d: (_x(3, 5, device=d), T(0, 9, 1, device=d)), {"label_smoothing": 2.0}),
    ("ignore_before_ls_prob", lambda d: _prob(d), {"ignore_index": 3, "label_smoothing": 2.0}),
    ("reduction_before_oob", lambda d: (_x(3, 5, device=d), T(0, 9, 1, device=d)), {"reduction": "avg"}),
    ("reduction_before_ls", lambda d: _idx(d), {"reduction": "avg", "label_smoothing": 2.0}),
    ("weight_size_before_oob", lambda d: (_x(3, 5, device=d), T(0, 9, 1, device=d)), {"weight": torch.rand(4)}),
    ("dtype_before_oob", lambda d: (_x(3, 5, device=d), T(0, 9, 1, dtype=torch.int32, device=d)), {}),
    ("batch_before_oob", lambda d: (_x(3, 5, device=d), T(0, 9, device=d)), {}),
    ("prob_long_before_ignore", lambda d: (_x(3, 5, device=d), torch.zeros(3, 5, dtype=L, device=d)), {"ignore_index": 2}),
]


@pytest.mark.parametrize("case", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_error_precedence(case, device, cuda_target_check_on, fresh_seed):
    x, t = case[1](device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case[2].items()}
    if "oob" in case[0]:
        same_exception(lambda: _torch_on_cpu(x, t, **kw), lambda: ours(x, t, **kw))
    else:
        same_exception(lambda: F.cross_entropy(x, t, **kw), lambda: ours(x, t, **kw))
    assert_cuda_usable(device)


# ----------------------------------------------------------------------------------
# input dtype, devices
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.int64, "Long"), (torch.int32, "Int"), (torch.complex64, "ComplexFloat")],
                         ids=["long", "int", "cfloat"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_non_floating_input(dtype, name, kind, device):
    x = (torch.randn(3, 5) * 3).to(device=device, dtype=dtype)
    t = T(0, 2, 4, device=device) if kind == "index" else torch.rand(3, 5).to(device)
    # torch's message names an ATen kernel ("log_softmax_lastdim_kernel_impl"); require the
    # type and "not implemented for '<dtype>'". (xent_ext hands these dtypes to torch; on
    # CUDA, whatever torch's CUDA kernels do is the contract.)
    if is_cuda(device):
        same_outcome(lambda: F.cross_entropy(x, t), lambda: ours(x, t), ctx=f"{name} {kind}")
        return
    same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t), exact=False,
                   keywords=(f"not implemented for '{name}'",))


DEVICE_CASES = [
    ("target_meta", lambda x, t, w: (x, t.to("meta"), None)),
    ("input_meta", lambda x, t, w: (x.to("meta"), t, None)),
    ("weight_meta", lambda x, t, w: (x, t, w.to("meta"))),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_mismatched_devices(case, kind, device, fresh_seed):
    # (CPU and CUDA tensors mixed: test_cuda.py::test_cpu_and_cuda_tensors_mixed)
    x, t = _idx(device) if kind == "index" else _prob(device)
    x, t, w = case[1](x, t, random_weight(5, device=device))
    # torch: "Tensor on device cpu is not on the expected device meta!" (dispatcher wording);
    # xent_ext hands mixed devices to torch, so the exception is torch's own.
    if is_cuda(device):
        same_outcome(lambda: F.cross_entropy(x, t, weight=w), lambda: ours(x, t, weight=w), ctx=f"{case[0]} {kind}")
    else:
        same_exception(lambda: F.cross_entropy(x, t, weight=w), lambda: ours(x, t, weight=w), exact=True)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_all_meta_tensors(kind):
    # not an error: every tensor on 'meta' gives a meta result of torch's shape and dtype
    x, t = _idx() if kind == "index" else _prob()
    for red in REDUCTIONS:
        ref = F.cross_entropy(x.to("meta"), t.to("meta"), reduction=red)
        got = ours(x.to("meta"), t.to("meta"), reduction=red)
        assert got.device.type == "meta"
        assert got.shape == ref.shape and got.dtype == ref.dtype


# ----------------------------------------------------------------------------------
# nn.Module: the constructor accepts anything, forward raises like torch's module
# ----------------------------------------------------------------------------------

MODULE_CASES = [
    ("bad_reduction", {"reduction": "avg"}, "index"),
    ("none_reduction", {"reduction": None}, "index"),
    ("bad_ls", {"label_smoothing": 1.5}, "index"),
    ("bad_ls_prob", {"label_smoothing": 1.5}, "prob"),
    ("bad_weight_size", {"weight": torch.rand(4)}, "index"),
    ("bad_weight_size_prob", {"weight": torch.rand(4)}, "prob"),
    ("ignore_index_prob", {"ignore_index": 1}, "prob"),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_invalid_args_raise_in_forward(case, device, fresh_seed):
    _, kw, kind = case
    ref_m = torch.nn.CrossEntropyLoss(**kw).to(device)
    m = xent_ext.CrossEntropyLoss(**kw).to(device)  # must not raise
    x, t = _idx(device) if kind == "index" else _prob(device)
    same_exception(lambda: ref_m(x, t), lambda: m(x, t))



# ----------------------------------------------------------------------------------
# argument types: torch's argument parser decides (Note [Argument types])
# ----------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("ignore_index_true", {"ignore_index": True}),
    ("ignore_index_false", {"ignore_index": False}),
    ("ignore_index_float", {"ignore_index": 1.0}),
    ("ignore_index_none", {"ignore_index": None}),
    ("ignore_index_str", {"ignore_index": "a"}),
    ("ignore_index_2pow63", {"ignore_index": 2**63}),
    ("ignore_index_below_int64", {"ignore_index": -(2**63) - 1}),
    ("ignore_index_np_float", {"ignore_index": np.float64(2.0)}),
    ("ignore_index_np_bool", {"ignore_index": np.bool_(True)}),
    ("ignore_index_float_tensor", {"ignore_index": torch.tensor(2.0)}),
    ("label_smoothing_str", {"label_smoothing": "a"}),
    ("label_smoothing_none", {"label_smoothing": None}),
    ("label_smoothing_complex", {"label_smoothing": 1j}),
    ("label_smoothing_1d_tensor", {"label_smoothing": torch.tensor([0.1])}),
    ("both_bad", {"ignore_index": 1.5, "label_smoothing": "a"}),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_types(case, kind, device, fresh_seed):
    x, t = _idx(device) if kind == "index" else _prob(device)
    kw = case[1]
    same_exception(lambda: F.cross_entropy(x, t, **kw), lambda: ours(x, t, **kw))
    # the module takes the same values (its constructor accepts anything)
    same_exception(lambda: torch.nn.CrossEntropyLoss(**kw)(x, t), lambda: xent_ext.CrossEntropyLoss(**kw)(x, t))


# What the parser accepts beyond plain ints and floats is computed, with torch's numbers.
GOOD_ARGUMENTS = [
    ("ignore_index_np_int64", {"ignore_index": np.int64(2)}),
    ("ignore_index_np_int32", {"ignore_index": np.int32(2)}),
    ("ignore_index_tensor", {"ignore_index": torch.tensor(2)}),
    ("ignore_index_1elem_tensor", {"ignore_index": torch.tensor([2])}),
    ("ignore_index_int64_max", {"ignore_index": 2**63 - 1}),
    ("ignore_index_int64_min", {"ignore_index": -(2**63)}),
    ("label_smoothing_int", {"label_smoothing": 1}),
    ("label_smoothing_bool", {"label_smoothing": True}),
    ("label_smoothing_np_float32", {"label_smoothing": np.float32(0.1)}),
    ("label_smoothing_tensor", {"label_smoothing": torch.tensor(0.1)}),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", GOOD_ARGUMENTS, ids=[c[0] for c in GOOD_ARGUMENTS])
def test_argument_types_torch_accepts(case, kind, device, fresh_seed):
    x, t = _idx(device) if kind == "index" else _prob(device)
    kw = case[1]
    try:
        ref = F.cross_entropy(x, t, **kw)
    except Exception:  # noqa: BLE001  (e.g. ignore_index >= 0 with probabilities)
        same_exception(lambda: F.cross_entropy(x, t, **kw), lambda: ours(x, t, **kw))
        return
    torch.testing.assert_close(ours(x, t, **kw), ref)


NOT_TENSORS = [
    ("input_list", lambda x, t, w: (x.tolist(), t, None)),
    ("input_none", lambda x, t, w: (None, t, None)),
    ("input_numpy", lambda x, t, w: (x.cpu().numpy(), t, None)),
    ("input_int", lambda x, t, w: (3, t, None)),
    ("target_list", lambda x, t, w: (x, t.tolist(), None)),
    ("target_none", lambda x, t, w: (x, None, None)),
    ("target_numpy", lambda x, t, w: (x, t.cpu().numpy(), None)),
    ("target_int", lambda x, t, w: (x, 1, None)),
    ("weight_list", lambda x, t, w: (x, t, w.tolist())),
    ("weight_numpy", lambda x, t, w: (x, t, w.cpu().numpy())),
    ("both_lists", lambda x, t, w: (x.tolist(), t.tolist(), None)),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", NOT_TENSORS, ids=[c[0] for c in NOT_TENSORS])
def test_arguments_that_are_not_tensors(case, kind, device, fresh_seed):
    x, t = _idx(device) if kind == "index" else _prob(device)
    x, t, w = case[1](x, t, random_weight(5, device=device))
    same_exception(lambda: F.cross_entropy(x, t, weight=w), lambda: ours(x, t, weight=w))
    # a bad reduction is reported first, as torch does
    same_exception(lambda: F.cross_entropy(x, t, weight=w, reduction="avg"),
                   lambda: ours(x, t, weight=w, reduction="avg"))


def _all_dtypes():
    found = []
    for name in dir(torch):
        dt = getattr(torch, name)
        if isinstance(dt, torch.dtype) and dt not in found:
            found.append(dt)
    return sorted(found, key=str)


def test_every_dtype_is_named_as_torch_names_it():
    # c10's names in the messages: Long, Byte, UInt16, Float8_e4m3fn, QInt8, ComplexHalf, ...
    x = _x(3, 5)
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecated dtypes warn when created
        for dt in _all_dtypes():
            try:
                t = torch.empty(3, dtype=dt)
                t_same_shape = torch.empty(3, 5, dtype=dt)
                w = torch.empty(5, dtype=dt)
            except Exception:  # noqa: BLE001  (a dtype this torch cannot allocate)
                continue
            if dt not in (torch.int64, torch.uint8):
                same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t), ctx=str(dt))
            if not dt.is_floating_point:
                same_exception(lambda: F.cross_entropy(x, t_same_shape), lambda: ours(x, t_same_shape), ctx=str(dt))
            if dt != torch.float32 and not w.is_quantized:  # (a quantized weight is another backend)
                same_exception(lambda: F.cross_entropy(x, T(0, 1, 2), weight=w), lambda: ours(x, T(0, 1, 2), weight=w),
                               ctx=str(dt))
            checked += 1
    assert checked >= 30


# ----------------------------------------------------------------------------------
# no classes with 3 or more dims
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 0, 1, 1, 1), (3, 0, 2, 2, 2)], ids=str)
def test_zero_classes_3d_size_mismatch(shape, reduction, ls, device):
    # torch views logits without elements as (N, C, 0, 0) and the target as (N, 1, K): a
    # size mismatch, for every target (all ignored, or a class, int64 or uint8)
    x = torch.randn(shape).to(device)
    tshape = (shape[0],) + shape[2:]
    for t in (torch.full(tshape, -100), torch.zeros(tshape, dtype=L), torch.zeros(tshape, dtype=torch.uint8)):
        t = t.to(device)
        kw = dict(reduction=reduction, label_smoothing=ls)
        same_exception(lambda: F.cross_entropy(x, t, **kw), lambda: ours(x, t, **kw), ctx=f"{t.dtype}")
