"""Bad input: xent_ext must raise what torch raises (same type, same message).

Every case runs torch first, catches its exception, then requires
`pytest.raises(type(e), match=re.escape(str(e)))` from xent_ext. A few messages name
torch internals (an ATen kernel or autograd function, device strings from the
dispatcher); for those only the exception type and key words are required.
"""

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from conftest import REDUCTIONS, check_against_torch, make_logits, random_weight, same_exception

ours = xent_ext.cross_entropy
L = torch.long


def T(*v, dtype=L):
    return torch.tensor(v, dtype=dtype)


def _x(*shape, dtype=torch.float32):
    return make_logits(shape, dtype)


# ----------------------------------------------------------------------------------
# out-of-range class indices (every dimensionality, reduction and label smoothing)
# ----------------------------------------------------------------------------------


def _oob_target(shape, bad, dtype=L, C=5):
    """A valid target for `shape` with exactly one element replaced by `bad`."""
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, C, tshape, dtype=L)
    flat = t.view(-1)
    flat[torch.randint(0, flat.numel(), ()).item()] = bad
    return t.to(dtype)


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
def test_out_of_range_target(case, reduction, ls, fresh_seed):
    _, shape, bad, tdt, kw = case
    x = _x(*shape)
    t = _oob_target(shape, bad, tdt)
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = random_weight(shape[1])
    kw.update(reduction=reduction, label_smoothing=ls)
    torch_kw = kw
    if tdt == torch.uint8 and len(shape) >= 2 and reduction == "none":
        # torch bug: batched uint8 + 'none' formats the byte as a character ("Target \x05 is
        # out of bounds.", and a UnicodeDecodeError for bytes >= 128). The reference is
        # torch's message for the same input with reduction='mean': "Target 200 is ...".
        torch_kw = dict(kw, reduction="mean")
    te, oe = same_exception(lambda: F.cross_entropy(x, t, **torch_kw), lambda: ours(x, t, **kw))
    assert str(bad) in str(te)


def test_out_of_range_target_requires_grad(fresh_seed):
    # raised by the forward, also when the input requires grad
    x = _x(4, 5).requires_grad_()
    t = T(0, 1, 9, 2)
    same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t))


def test_index_target_zero_classes():
    x = torch.randn(3, 0)
    t = torch.zeros(3, dtype=L)
    same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t))


def test_unbatched_target_of_size_one(fresh_seed):
    # torch >= 2.13 accepts a (1,) target for (C,) input in the forward with
    # label_smoothing=0 (result shape ()); an out-of-range one still raises.
    x = _x(5)
    for red in REDUCTIONS:
        got = ours(x, T(3), reduction=red)
        ref = F.cross_entropy(x, T(3), reduction=red)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    same_exception(lambda: F.cross_entropy(x, T(7)), lambda: ours(x, T(7)))


def _either_torch_error_or_value(torch_fn, ours_fn, ref_fn, ctx):
    """torch fails on a valid-looking input (a torch limitation, not bad input): xent_ext
    may raise exactly torch's exception, or return ref_fn()'s (value, grad)."""
    with pytest.raises(Exception) as ti:
        torch_fn()
    try:
        got = ours_fn()
    except Exception as e:  # noqa: BLE001
        assert type(e) is type(ti.value) and str(ti.value) in str(e), (
            f"{ctx}: xent_ext raised {type(e).__name__}: {e}; torch raised {type(ti.value).__name__}: {ti.value}")
        return
    ref = ref_fn()
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, ctx
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{ctx}: {m}")


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_target_of_size_one_torch_limits(reduction, ls, fresh_seed):
    # torch: with ls > 0 the forward fails ("output with shape [] doesn't match the broadcast
    # shape [1]"); with ls = 0 the backward fails ("size mismatch (got input: [5], target: [1])").
    x = _x(5)

    def fwd_bwd(fn, t):
        xi = x.detach().requires_grad_()
        loss = fn(xi, t, reduction=reduction, label_smoothing=ls)
        (g,) = torch.autograd.grad(loss, xi)
        return loss, g

    _either_torch_error_or_value(lambda: fwd_bwd(F.cross_entropy, T(3)), lambda: fwd_bwd(ours, T(3)),
                                 lambda: fwd_bwd(F.cross_entropy, torch.tensor(3)), f"(5,) with (1,) {reduction} ls={ls}")


# ----------------------------------------------------------------------------------
# target dtype / kind
# ----------------------------------------------------------------------------------

DTYPE_CASES = [
    ("int32", lambda: (_x(3, 5), T(0, 1, 2, dtype=torch.int32))),
    ("int16", lambda: (_x(3, 5), T(0, 1, 2, dtype=torch.int16))),
    ("int8", lambda: (_x(3, 5), T(0, 1, 2, dtype=torch.int8))),
    ("bool", lambda: (_x(3, 5), T(0, 1, 1, dtype=torch.bool))),
    ("float_diff_shape", lambda: (_x(3, 5), T(0, 1, 2, dtype=torch.float32))),
    ("double_diff_shape", lambda: (_x(3, 5), T(0, 1, 2, dtype=torch.float64))),
    ("int32_3d", lambda: (_x(2, 5, 3), torch.zeros(2, 3, dtype=torch.int32))),
    ("same_shape_long", lambda: (_x(3, 5), torch.zeros(3, 5, dtype=L))),
    ("same_shape_int", lambda: (_x(3, 5), torch.zeros(3, 5, dtype=torch.int32))),
    ("same_shape_bool", lambda: (_x(3, 5), torch.zeros(3, 5, dtype=torch.bool))),
    ("same_shape_u8", lambda: (_x(3, 5), torch.zeros(3, 5, dtype=torch.uint8))),
    ("same_shape_long_1d", lambda: (_x(5), torch.zeros(5, dtype=L))),
    ("same_shape_long_0d", lambda: (torch.randn(()), torch.tensor(1))),
    ("same_shape_int_3d", lambda: (_x(3, 5, 2), torch.zeros(3, 5, 2, dtype=torch.int32))),
    ("float_0d_pair", lambda: (torch.randn(()), torch.tensor(0.5))),
]


@pytest.mark.parametrize("case", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_bad_target_dtype(case, fresh_seed):
    x, t = case[1]()
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
def test_uint8_where_torch_fails(case, fresh_seed):
    _, shape, kw = case
    x = _x(*shape)
    t = _oob_target(shape, 1, torch.uint8)
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = random_weight(5)
    _either_torch_error_or_value(lambda: (F.cross_entropy(x, t, **kw),), lambda: (ours(x, t, **kw),),
                                 lambda: (F.cross_entropy(x, t.long(), **kw),), f"uint8 {case[0]}")


# ----------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------

SHAPE_CASES = [
    ("batch_mismatch", lambda: (_x(10, 3), torch.zeros(3, dtype=L))),
    ("multi_target", lambda: (_x(10, 3), torch.zeros(10, 2, dtype=L))),
    ("3d_wrong_spatial", lambda: (_x(2, 3, 5), torch.zeros(2, 4, dtype=L))),
    ("5d_wrong_spatial", lambda: (_x(2, 3, 5, 6, 7), torch.zeros(2, 5, 6, 8, dtype=L))),
    ("5d_missing_dim", lambda: (_x(2, 3, 5, 6, 7), torch.zeros(2, 5, 6, dtype=L))),
    ("4d_size_mismatch", lambda: (_x(2, 3, 5, 6), torch.zeros(2, 5, 7, dtype=L))),
    ("4d_target_2d", lambda: (_x(2, 3, 5, 6), torch.zeros(2, 5, dtype=L))),
    ("prob_wrong_shape", lambda: (_x(3, 5), torch.rand(3, 6))),
    ("prob_wrong_shape_3d", lambda: (_x(3, 5, 2), torch.rand(3, 5, 3))),
    ("1d_input_target_2", lambda: (_x(5), torch.zeros(2, dtype=L))),
    ("2d_input_0d_target", lambda: (_x(3, 5), torch.tensor(1))),
    ("3d_batch_mismatch", lambda: (_x(2, 3, 5), torch.zeros(3, 5, dtype=L))),
]


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_bad_shapes(case, ls, fresh_seed):
    x, t = case[1]()
    same_exception(lambda: F.cross_entropy(x, t, label_smoothing=ls), lambda: ours(x, t, label_smoothing=ls))


# ----------------------------------------------------------------------------------
# weight
# ----------------------------------------------------------------------------------


def _idx():
    return _x(3, 5), T(0, 2, 4)


def _prob():
    return _x(3, 5), torch.softmax(torch.randn(3, 5), 1)


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
    ("index_3d_size4", lambda: (_x(2, 5, 3), torch.zeros(2, 3, dtype=L)), lambda: torch.rand(4)),
    ("index_3d_f64", lambda: (_x(2, 5, 3), torch.zeros(2, 3, dtype=L)), lambda: torch.rand(5, dtype=torch.float64)),
]


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weight(case, ls, fresh_seed):
    x, t = case[1]()
    w = case[2]()
    same_exception(lambda: F.cross_entropy(x, t, weight=w, label_smoothing=ls),
                   lambda: ours(x, t, weight=w, label_smoothing=ls))


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 3), (5,)], ids=str)
def test_weight_requires_grad_on_index_path(shape, ls, fresh_seed):
    x = _x(*shape)
    t = _oob_target(shape, 1)
    w = random_weight(5).requires_grad_()
    # torch names its internal autograd function ('nll_loss_forward' / 'nll_loss2d_forward');
    # require the type and the actionable part of the message.
    same_exception(lambda: F.cross_entropy(x, t, weight=w, label_smoothing=ls),
                   lambda: ours(x, t, weight=w, label_smoothing=ls),
                   exact=False, keywords=("not differentiable with respect to argument 'weight'",
                                          "This input cannot have requires_grad True."))


def test_weight_long_on_prob_path_is_promoted(fresh_seed):
    # not an error in torch: the probability path type-promotes the weight
    x, t = _prob()
    w = torch.randint(1, 4, (5,))
    check_against_torch(ours, x, t, w, wrt=("input", "target"), ctx="long weight, prob path")


# ----------------------------------------------------------------------------------
# reduction, label_smoothing, ignore_index with probabilities
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["avg", None, "MEAN", "", "elementwise_sum", 1])
def test_unknown_reduction(reduction, kind, fresh_seed):
    x, t = _idx() if kind == "index" else _prob()
    same_exception(lambda: F.cross_entropy(x, t, reduction=reduction), lambda: ours(x, t, reduction=reduction))


@pytest.mark.parametrize("kind", ["index", "prob", "index_3d"])
@pytest.mark.parametrize("ls", [1.5, float("inf"), 1.0000001, 2.0])
def test_label_smoothing_too_large(ls, kind, fresh_seed):
    if kind == "index_3d":
        x, t = _x(2, 5, 3), torch.zeros(2, 3, dtype=L)
    else:
        x, t = _idx() if kind == "index" else _prob()
    same_exception(lambda: F.cross_entropy(x, t, label_smoothing=ls), lambda: ours(x, t, label_smoothing=ls))


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [0, 3, 255, 10**6])
def test_ignore_index_with_prob_target(ignore_index, ls, fresh_seed):
    x, t = _prob()
    same_exception(lambda: F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=ls),
                   lambda: ours(x, t, ignore_index=ignore_index, label_smoothing=ls))


# several problems at once: the first one torch reports must be the one we report
ORDER_CASES = [
    ("ls_before_oob", lambda: (_x(3, 5), T(0, 9, 1)), {"label_smoothing": 2.0}),
    ("ignore_before_ls_prob", lambda: _prob(), {"ignore_index": 3, "label_smoothing": 2.0}),
    ("reduction_before_oob", lambda: (_x(3, 5), T(0, 9, 1)), {"reduction": "avg"}),
    ("reduction_before_ls", lambda: _idx(), {"reduction": "avg", "label_smoothing": 2.0}),
    ("weight_size_before_oob", lambda: (_x(3, 5), T(0, 9, 1)), {"weight": torch.rand(4)}),
    ("dtype_before_oob", lambda: (_x(3, 5), T(0, 9, 1, dtype=torch.int32)), {}),
    ("batch_before_oob", lambda: (_x(3, 5), T(0, 9)), {}),
    ("prob_long_before_ignore", lambda: (_x(3, 5), torch.zeros(3, 5, dtype=L)), {"ignore_index": 2}),
]


@pytest.mark.parametrize("case", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_error_precedence(case, fresh_seed):
    x, t = case[1]()
    kw = case[2]
    same_exception(lambda: F.cross_entropy(x, t, **kw), lambda: ours(x, t, **kw))


# ----------------------------------------------------------------------------------
# input dtype, devices
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.int64, "Long"), (torch.int32, "Int"), (torch.complex64, "ComplexFloat")],
                         ids=["long", "int", "cfloat"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_non_floating_input(dtype, name, kind):
    x = (torch.randn(3, 5) * 3).to(dtype)
    t = T(0, 2, 4) if kind == "index" else torch.rand(3, 5)
    # torch's message names an ATen kernel ("log_softmax_lastdim_kernel_impl"); require the
    # type and "not implemented for '<dtype>'".
    same_exception(lambda: F.cross_entropy(x, t), lambda: ours(x, t), exact=False,
                   keywords=(f"not implemented for '{name}'",))


DEVICE_CASES = [
    ("target_meta", lambda x, t, w: (x, t.to("meta"), None)),
    ("input_meta", lambda x, t, w: (x.to("meta"), t, None)),
    ("weight_meta", lambda x, t, w: (x, t, w.to("meta"))),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_mismatched_devices(case, kind, fresh_seed):
    x, t = _idx() if kind == "index" else _prob()
    x, t, w = case[1](x, t, random_weight(5))
    # torch: "Tensor on device cpu is not on the expected device meta!" (dispatcher wording);
    # require RuntimeError naming both devices.
    same_exception(lambda: F.cross_entropy(x, t, weight=w), lambda: ours(x, t, weight=w), exact=False,
                   keywords=("device", "cpu", "meta"))


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
def test_module_invalid_args_raise_in_forward(case, fresh_seed):
    _, kw, kind = case
    ref_m = torch.nn.CrossEntropyLoss(**kw)
    m = xent_ext.CrossEntropyLoss(**kw)  # must not raise
    x, t = _idx() if kind == "index" else _prob()
    same_exception(lambda: ref_m(x, t), lambda: m(x, t))

