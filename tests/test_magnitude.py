"""Exact losses and gradients at any logit magnitude.

The backward forms softmax as torch does, exp((x - max) - log_sum), from the row max
and the log-sum kept apart (row_stats); folding them into one log-sum-exp loses the
log-sum once the max is large against it (x = [[M, M, 0]] with target 0 then gets the
gradient [0, 1, 0] instead of [-1/2, 1/2, 0]). Every case compares with torch's
float64 math on the very same (exactly representable) values, with tolerances in
units of the dtype's epsilon that an error of that kind exceeds by orders of
magnitude, through every path that forms softmax: the gradient computed in the
forward, the recomputing backward ops, and a second backward.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import REDUCTION_ENUM, REDUCTIONS, assert_bitwise_equal, dtype_name

DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# (name, shape): rows of few classes (column tiles), long rows of several chunks (the
# rows walk, chunks merged), and a class dim that is not innermost ((N, C, K) columns).
SHAPES = [("short", (9, 7)), ("long", (3, 5000)), ("nck", (2, 6, 5, 3))]

# (name, kind, kwargs) of the loss
TARGETS = [
    ("index", "index", {}),
    ("index_weight_smooth_ignore", "index", {"weight": True, "label_smoothing": 0.1, "ignore_index": 2}),
    ("prob", "prob", {}),
    ("prob_weight_smooth", "prob", {"weight": True, "label_smoothing": 0.2}),
]


def _ops():
    return torch.ops.xent_ext


def _eps(dtype):
    return torch.finfo(dtype).eps


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ulp(t, dtype):
    """The spacing of `dtype` at |t| (float64 tensor)."""
    e = torch.floor(torch.log2(t.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e) * _eps(dtype)


def _offset_rows(shape, dtype, smoothing=False):
    """Logits whose rows sit at random offsets, from 1 up to a quarter of the dtype's max,
    of either sign: spread by a few units (a non-trivial softmax where the dtype resolves
    them) and by a few of the offset's ulps (ties and near-ties where it does not).

    With label smoothing the offsets stay below max / (64 C eps): the smoothing term sums
    w_c (max - x_c) over the classes before scaling by eps / C, in torch as here, and that
    sum of C spreads of a few ulps each must not overflow the accumulation dtype."""
    cd = 1
    row_shape = list(shape)
    row_shape[cd] = 1
    limit = torch.finfo(dtype).max / 4
    if smoothing:
        limit = min(limit, torch.finfo(dtype).max / (64 * shape[cd] * _eps(dtype)))
    top = math.log10(limit)
    offset = torch.pow(10.0, torch.rand(row_shape, dtype=torch.float64) * top)
    offset = offset * torch.where(torch.rand(row_shape) < 0.3, -1.0, 1.0).double()
    steps = torch.randint(-3, 2, shape).double()
    x = offset + 2 * torch.randn(shape, dtype=torch.float64) + steps * _ulp(offset, dtype)
    return x.to(dtype)


def _mm0(M, dtype):
    """x = [[M, M, 0]] (the max tied, a third class far below)."""
    return torch.tensor([[M, M, 0.0]], dtype=torch.float64).to(dtype)


def _problem(kind, kw, x):
    """(target, weight, ignore_index, label_smoothing) for logits x."""
    C = x.shape[1]
    weight = (torch.rand(C, dtype=torch.float64) * 1.9 + 0.1).to(x.dtype) if kw.get("weight") else None
    ls = kw.get("label_smoothing", 0.0)
    ii = kw.get("ignore_index", -100)
    if kind == "index":
        t = torch.randint(0, C, (x.shape[0],) + tuple(x.shape[2:]))
        if ii >= 0:
            t = torch.where(torch.rand(t.shape) < 0.25, torch.full_like(t, ii), t)
    else:
        t = torch.softmax(torch.randn(x.shape, dtype=torch.float64) * 2, 1).to(x.dtype)
    return t, weight, ii, ls


def _reference(x, target, weight, ii, ls, reduction, grad_out, want_target):
    """torch's float64 loss and gradients on the same values, on the CPU."""
    x64 = x.detach().cpu().double().requires_grad_()
    prob = target.is_floating_point()
    t64 = target.detach().cpu().double().requires_grad_(want_target) if prob else target.cpu()
    w64 = None if weight is None else weight.cpu().double()
    loss = F.cross_entropy(x64, t64, weight=w64, ignore_index=ii, label_smoothing=ls, reduction=reduction)
    wrt = [x64] + ([t64] if want_target else [])
    grads = torch.autograd.grad(loss, wrt, grad_out.cpu().double())
    return loss.detach(), grads


def _row_view(t):
    """(N, C, K) -> (rows, C)."""
    t = t if t.dim() == 3 else t.unsqueeze(-1)
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _rows(t):
    """Per-row values (N,) or (N, K) -> (rows,)."""
    return t.reshape(-1) if t.dim() <= 1 else t.reshape(-1)


def _tolerances(x, target, weight, ii, ls, reduction, grad_out):
    """Absolute tolerances for the loss and the input and target gradients, from float64
    math: a few epsilons of the accumulation dtype times each row's coefficients and
    the size of its log_softmax terms, plus the rounding to the output dtype."""
    x, target, weight, grad_out = (None if t is None else t.cpu() for t in (x, target, weight, grad_out))
    dtype = x.dtype
    acc_eps = _eps(_acc(dtype))
    out_eps = _eps(dtype)
    X = _row_view(x.double())
    R, C = X.shape
    m = X.amax(1, keepdim=True)
    log_sum = torch.log(torch.exp(X - m).sum(1, keepdim=True))
    size = (X - m).abs() + log_sum.abs() + 1  # |log_softmax| and its parts
    size = torch.where(torch.isfinite(size), size, torch.zeros_like(size))  # -inf logits: no term
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    if target.is_floating_point():
        q = _row_view(target.double())
        q = q * (1 - ls) + ls / C if ls > 0 else q
        coef = q.abs() * w
        denom = R
    else:
        y = _rows(target)
        valid = (y != ii).double()
        yy = torch.where(y != ii, y, torch.zeros_like(y))
        coef = torch.zeros(R, C, dtype=torch.float64)
        coef[torch.arange(R), yy] = (1 - ls) * w[yy] * valid
        coef = coef + (ls / C) * w * valid[:, None]
        denom = float((w[yy] * valid).sum())
    g = grad_out.double().reshape(-1).abs()
    g = g.expand(R) if g.numel() == 1 else g
    if reduction == "mean":
        g = g / abs(denom) if denom else g
    row_coef = coef.sum(1)
    row_loss = (coef * size).sum(1)
    loss_tol = 8 * acc_eps * row_loss * math.sqrt(C)
    loss_tol = loss_tol if reduction == "none" else loss_tol.sum() * (1 / abs(denom) if reduction == "mean" and denom else 1)
    grad_tol = (g * row_coef)[:, None] * (16 * acc_eps * (1 + log_sum.abs()) + 2 * out_eps)
    target_tol = g[:, None] * w * (1 - ls if ls > 0 else 1) * (8 * acc_eps * size + 2 * out_eps * size)
    return loss_tol, grad_tol, target_tol


def _assert_close(name, ours, ref, atol, rtol, ctx):
    o = ours.detach().double().cpu()
    r = ref.detach().double().cpu()
    assert o.shape == r.shape, f"{ctx}: {name} shape {tuple(o.shape)} vs {tuple(r.shape)}"
    same_nonfinite = (o == r) | (torch.isnan(o) & torch.isnan(r))
    fin = torch.isfinite(o) & torch.isfinite(r)
    assert (fin | same_nonfinite).all(), f"{ctx}: {name}: non-finite mismatch"
    atol = atol.expand_as(r) if isinstance(atol, torch.Tensor) else torch.full_like(r, atol)
    diff = torch.where(fin, (o - r).abs(), torch.zeros_like(r))
    allowed = atol + rtol * r.abs()
    bad = diff > allowed
    if bad.any():
        i = int(torch.argmax((diff - allowed).masked_fill(~bad, -1).reshape(-1)))
        raise AssertionError(
            f"{ctx}: {name}: {int(bad.sum())}/{bad.numel()} off; worst at {i}: ours={o.reshape(-1)[i].item()!r} "
            f"float64={r.reshape(-1)[i].item()!r} allowed={allowed.reshape(-1)[i].item():.3g}")


def _check(loss, grad_x, grad_t, x, target, weight, ii, ls, reduction, grad_out, ctx):
    want_t = grad_t is not None
    ref_loss, ref_grads = _reference(x, target, weight, ii, ls, reduction, grad_out, want_t)
    loss_tol, grad_tol, target_tol = _tolerances(x, target, weight, ii, ls, reduction, grad_out)
    out_eps = _eps(x.dtype)
    _assert_close("loss", loss, ref_loss, loss_tol.reshape(ref_loss.shape), out_eps, ctx)
    _assert_close("grad_input", _row_view(grad_x), _row_view(ref_grads[0]), grad_tol, out_eps, ctx)
    if want_t:
        _assert_close("grad_target", _row_view(grad_t), _row_view(ref_grads[1]), target_tol, out_eps, ctx)


def _grad_out(loss_shape, dtype):
    g = torch.randn(loss_shape, dtype=torch.float64)
    return torch.where(g == 0, torch.full_like(g, 0.5), g).to(dtype)


def _canonical(x):
    return x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)


def _canonical_target(t):
    return t.unsqueeze(-1) if t.dim() == 1 else t.flatten(1)


# ----------------------------------------------------------------------------------
# x = [[M, M, 0]]
# ----------------------------------------------------------------------------------


def _magnitudes(dtype):
    big = [1e4, 1e8, 2.0**53, 1e16, 1e30, torch.finfo(dtype).max]
    return [M for M in big if M <= torch.finfo(dtype).max]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_tied_max_far_above(dtype, reduction, device):
    # softmax([M, M, 0]) = [1/2, 1/2, 0] exactly in every dtype, at every M: the gradient
    # for target 0 is [-1/2, 1/2, 0] and the loss log 2, rounded once to the dtype
    for M in _magnitudes(dtype):
        for target, expect in ((0, [-0.5, 0.5, 0.0]), (2, [0.5, 0.5, -1.0])):
            x = _mm0(M, dtype).to(device).requires_grad_()
            t = torch.tensor([target], device=device)
            loss = xent_ext.cross_entropy(x, t, reduction=reduction)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            ctx = f"M={M:g} target={target} {dtype_name(dtype)} {reduction}"
            assert grad.tolist() == [expect], f"{ctx}: gradient {grad.tolist()}"
            want_loss = math.log(2) if target == 0 else float(x.detach().max()) + math.log(2)
            torch.testing.assert_close(loss.detach().cpu().reshape(()).double(), torch.tensor(want_loss, dtype=torch.float64),
                                       rtol=_eps(dtype), atol=2 * _eps(_acc(dtype)), msg=ctx)
            # and torch agrees
            x_t = _mm0(M, dtype).double().requires_grad_()
            (g_t,) = torch.autograd.grad(F.cross_entropy(x_t, t.cpu(), reduction=reduction).sum(), x_t)
            assert g_t.tolist() == [expect], f"{ctx}: torch's gradient {g_t.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_tied_max_far_above_ops(dtype, device):
    # the same through the ops: the recomputing backward, and the forward with gradient
    for M in _magnitudes(dtype):
        x = _mm0(M, dtype).unsqueeze(-1).to(device)
        t = torch.tensor([[0]], device=device)
        one = torch.ones((), dtype=dtype, device=device)
        for red in ("mean", "sum"):
            loss, row_stats, tw = _ops().cross_entropy_index_forward(x, t, None, -100, 0.0, REDUCTION_ENUM[red])
            assert row_stats[0, 0, 0].item() == float(x.max()), row_stats
            assert abs(row_stats[1, 0, 0].item() - math.log(2)) <= _eps(_acc(dtype)), row_stats
            g = _ops().cross_entropy_index_backward(one, x, t, None, row_stats, tw, -100, 0.0, REDUCTION_ENUM[red])
            assert g.reshape(-1).tolist() == [-0.5, 0.5, 0.0], f"M={M:g}: backward {g.reshape(-1).tolist()}"
            fused = _ops().cross_entropy_index_forward_with_grad(x, t, None, -100, 0.0, REDUCTION_ENUM[red])[3]
            assert_bitwise_equal(fused, g, f"M={M:g}: fused vs recomputed")
        fused = _ops().cross_entropy_index_forward_with_grad(x, t, None, -100, 0.0, 0)[3]
        assert fused.reshape(-1).tolist() == [-0.5, 0.5, 0.0], f"M={M:g}: forward with gradient, 'none'"
        q = torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype, device=device).unsqueeze(-1)
        loss, row_stats, coef_sum = _ops().cross_entropy_prob_forward(x, q, None, 0.0, 2)
        gi, gt = _ops().cross_entropy_prob_backward(one, x, q, None, row_stats, coef_sum, 0.0, 2, True, True)
        assert gi.reshape(-1).tolist() == [-0.5, 0.5, 0.0], f"M={M:g}: prob backward {gi.reshape(-1).tolist()}"
        for red in (0, 2):
            fused = _ops().cross_entropy_prob_forward_with_grad(x, q, None, 0.0, red, True, True)
            assert_bitwise_equal(fused[3], gi, f"M={M:g}: prob forward with gradient, input")
            assert_bitwise_equal(fused[4], gt, f"M={M:g}: prob forward with gradient, target")
        log_p = torch.tensor([-math.log(2), -math.log(2), -float(x.max()) - math.log(2)], dtype=torch.float64)
        torch.testing.assert_close(gt.cpu().reshape(-1).double(), -log_p, rtol=_eps(dtype), atol=2 * _eps(_acc(dtype)),
                                   msg=f"M={M:g}: grad_target")


# ----------------------------------------------------------------------------------
# rows at random offsets, every path
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target_case", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("shape_case", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_offset_rows_public_api(dtype, reduction, shape_case, target_case, device, fresh_seed):
    # xent_ext.cross_entropy with grad: the gradient computed in the forward (scaled by the
    # upstream gradient), then a second backward through the same graph, which recomputes
    _, shape = shape_case
    _, kind, kw = target_case
    x = _offset_rows(shape, dtype, smoothing=kind == "index" and kw.get("label_smoothing", 0) > 0)
    target, weight, ii, ls = _problem(kind, kw, x)
    x, target, weight = (None if t is None else t.to(device) for t in (x, target, weight))
    xl = x.clone().requires_grad_()
    tl = target.clone().requires_grad_() if kind == "prob" else target
    loss = xent_ext.cross_entropy(xl, tl, weight=weight, ignore_index=ii, label_smoothing=ls, reduction=reduction)
    g = _grad_out(loss.shape, loss.dtype).to(device)
    wrt = [xl] + ([tl] if kind == "prob" else [])
    first = torch.autograd.grad(loss, wrt, g, retain_graph=True)
    second = torch.autograd.grad(loss, wrt, g)
    ctx = f"{dtype_name(dtype)} {reduction} {shape} {target_case[0]} seed={fresh_seed}"
    _check(loss, first[0], first[1] if kind == "prob" else None, x, target, weight, ii, ls, reduction, g, ctx)
    _check(loss, second[0], second[1] if kind == "prob" else None, x, target, weight, ii, ls, reduction, g,
           ctx + " (second backward)")
    # the loss without grad is the same number
    with torch.no_grad():
        plain = xent_ext.cross_entropy(x, target, weight=weight, ignore_index=ii, label_smoothing=ls, reduction=reduction)
    assert_bitwise_equal(plain, loss.detach(), ctx + ": loss with and without grad")


@pytest.mark.parametrize("target_case", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("shape_case", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_offset_rows_ops(dtype, reduction, shape_case, target_case, device, fresh_seed):
    # the ops on the canonical view: forward + backward (recomputed softmax) against
    # float64 math, and the forward with gradient bit for bit equal to the backward's
    _, shape = shape_case
    _, kind, kw = target_case
    x = _offset_rows(shape, dtype, smoothing=kind == "index" and kw.get("label_smoothing", 0) > 0)
    target, weight, ii, ls = _problem(kind, kw, x)
    x, target, weight = (None if t is None else t.to(device) for t in (x, target, weight))
    red = REDUCTION_ENUM[reduction]
    xc = _canonical(x)
    ctx = f"{dtype_name(dtype)} {reduction} {shape} {target_case[0]} seed={fresh_seed}"
    if kind == "index":
        yc = _canonical_target(target)
        loss, row_stats, tw = _ops().cross_entropy_index_forward(xc, yc, weight, ii, ls, red)
        g = _grad_out(loss.shape, dtype).to(device)
        grad = _ops().cross_entropy_index_backward(g, xc, yc, weight, row_stats, tw, ii, ls, red)
        _check(loss.reshape(_reference_loss_shape(x, reduction)), grad.reshape(x.shape), None, x, target, weight,
               ii, ls, reduction, g.reshape(_reference_loss_shape(x, reduction)), ctx)
        one = torch.ones(loss.shape, dtype=dtype, device=device)
        fused = _ops().cross_entropy_index_forward_with_grad(xc, yc, weight, ii, ls, red)
        assert_bitwise_equal(fused[0], loss, ctx + ": loss of the forward with gradient")
        assert_bitwise_equal(fused[1], row_stats, ctx + ": row_stats of the forward with gradient")
        recomputed = _ops().cross_entropy_index_backward(one, xc, yc, weight, row_stats, tw, ii, ls, red)
        assert_bitwise_equal(fused[3], recomputed, ctx + ": gradient in the forward vs the backward's")
    else:
        qc = _canonical(target)
        loss, row_stats, coef_sum = _ops().cross_entropy_prob_forward(xc, qc, weight, ls, red)
        g = _grad_out(loss.shape, dtype).to(device)
        gi, gt = _ops().cross_entropy_prob_backward(g, xc, qc, weight, row_stats, coef_sum, ls, red, True, True)
        _check(loss.reshape(_reference_loss_shape(x, reduction)), gi.reshape(x.shape), gt.reshape(x.shape), x, target,
               weight, ii, ls, reduction, g.reshape(_reference_loss_shape(x, reduction)), ctx)
        one = torch.ones(loss.shape, dtype=dtype, device=device)
        fused = _ops().cross_entropy_prob_forward_with_grad(xc, qc, weight, ls, red, True, True)
        for i, name in enumerate(("loss", "row_stats", "coef_sum")):
            assert_bitwise_equal(fused[i], (loss, row_stats, coef_sum)[i], f"{ctx}: {name} of the forward with gradient")
        gi, gt = _ops().cross_entropy_prob_backward(one, xc, qc, weight, row_stats, coef_sum, ls, red, True, True)
        assert_bitwise_equal(fused[3], gi, ctx + ": input gradient in the forward vs the backward's")
        assert_bitwise_equal(fused[4], gt, ctx + ": target gradient in the forward vs the backward's")
    # row_stats: the row max exactly, and log Σ exp(x - max)
    X = xc.cpu().double()
    m = X.amax(1)
    row_stats = row_stats.cpu()
    assert torch.equal(row_stats[0], m), ctx + ": row_stats[0] is not the row max"
    log_sum = torch.log(torch.exp(X - m.unsqueeze(1)).sum(1))
    torch.testing.assert_close(row_stats[1], log_sum, rtol=0, atol=4 * _eps(_acc(dtype)) * (1 + log_sum.abs().max().item()))


def _reference_loss_shape(x, reduction):
    if reduction != "none":
        return ()
    return (x.shape[0],) + tuple(x.shape[2:])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
def test_chunk_of_minus_inf_below_very_negative_rows(dtype, device, fresh_seed):
    # long rows: a whole chunk of -inf (no probability mass) beside logits far below 0, so
    # that exp(-max - log_sum) would overflow: its gradient is 0, not 0 * inf
    C = 5000
    x = (-1e30 + 2 * torch.randn(4, C, dtype=torch.float64)).to(dtype)
    x[:, :2048] = float("-inf")
    t = torch.randint(2048, C, (4,))
    x, t = x.to(device), t.to(device)
    for reduction in REDUCTIONS:
        xl = x.clone().requires_grad_()
        loss = xent_ext.cross_entropy(xl, t, reduction=reduction, label_smoothing=0.0)
        g = _grad_out(loss.shape, dtype).to(device)
        first = torch.autograd.grad(loss, xl, g, retain_graph=True)[0]
        second = torch.autograd.grad(loss, xl, g)[0]
        ctx = f"{dtype_name(dtype)} {reduction} seed={fresh_seed}"
        for name, grad in (("first", first), ("second", second)):
            assert torch.isfinite(grad).all(), f"{ctx}: {name} backward has non-finite values"
            assert (grad[:, :2048] == 0).all(), f"{ctx}: {name} backward: the -inf chunk's gradient is not 0"
        _check(loss, first, None, x, t, None, -100, 0.0, reduction, g, ctx)
