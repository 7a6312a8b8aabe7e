"""The LLM extras (logit_scale, softcap, z_loss) and the forwards that write the gradient
into the logits, at the op level (torch.ops.xent_ext.*), on every device.

Every value is compared with the float64 definition computed with torch ops on the same
(rounded) inputs:

    z    = input * logit_scale;  z = softcap * tanh(z / softcap)   (softcap on)
    loss = cross_entropy(z, ...) + z_loss * lse(z)^2 on each counted row, reduced like
           the loss ('mean': divided by the number of counted rows)

and every gradient (the fused *_with_grad forwards, the *_backward ops with a random
upstream gradient, the probability target's gradient) with torch.autograd on that
definition. The *_grad_into_ forwards must write exactly the gradient the out-of-place
forwards return, bit for bit, on every layout the kernels walk differently.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import REDUCTION_ENUM, assert_bitwise_equal, dtype_name, make_index_target, make_prob_target, random_weight, restride

ops = torch.ops.xent_ext

IGNORE = -100

# (logit_scale, softcap, z_loss): each extra alone and combined; a negative scale turns
# the row's largest logit into its smallest z.
EXTRAS = {
    "scale": (0.7, None, 0.0),
    "neg_scale": (-1.3, None, 0.0),
    "softcap": (1.0, 3.0, 0.0),
    "z_loss": (1.0, None, 0.05),
    "scale_softcap": (1.6, 2.5, 0.0),
    "all": (0.7, 3.0, 0.05),
    "neg_all": (-0.8, 2.5, 0.02),
}

# name: (input shape, layout). Each one takes a different walk of the CPU kernels:
# rows of contiguous classes, short rows (transposed tiles), class-strided rows
# (column tiles), gathered strided classes, (N, C, d1, d2) in both memory formats, and
# rows of several chunks.
CASES = {
    "rows": ((5, 37), "contiguous"),
    "short_rows": ((70, 10), "contiguous"),
    "transposed": ((13, 37), "transposed"),
    "sliced": ((5, 37), "sliced"),
    "nchw": ((3, 11, 4, 5), "contiguous"),
    "channels_last": ((3, 11, 4, 5), "channels_last"),
    "long_rows": ((2, 2100), "contiguous"),
}

# Relative tolerance against the float64 definition, and the same times the largest
# magnitude as an absolute floor (gradients of 'mean' are small, fp16 ones subnormal).
TOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
LOW = (torch.bfloat16, torch.float16)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def canonical(t):
    """The ops' (N, C, K) view of an input (or probability target) of torch's shape."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.reshape(t.shape[0], t.shape[1], -1)


def canonical_target(t):
    return t.unsqueeze(-1) if t.dim() == 1 else t.reshape(t.shape[0], -1)


def logits(shape, dtype, layout, device, copies=1, scale=2.0):
    """`copies` tensors of the same random values (never 0) and the same layout."""
    src = torch.randn(shape, dtype=torch.float64) * scale
    src = torch.where(src == 0, torch.full_like(src, 0.5), src).to(device=device, dtype=dtype)
    out = [canonical(restride(src, layout)) for _ in range(copies)]
    return out if copies > 1 else out[0]


def mapped(x, scale, softcap):
    z = x * scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def definition(x, target, weight, ls, reduction, extras, prob):
    """(loss, lse, X, Q): the float64 definition on leaves X (and Q, probability targets)."""
    scale, softcap, z_loss = extras
    X = x.detach().double().requires_grad_(True)
    Q = target.detach().double().requires_grad_(True) if prob else target
    W = None if weight is None else weight.double()
    z = mapped(X, scale, softcap)
    ce = F.cross_entropy(z, Q, W, ignore_index=IGNORE, reduction=reduction, label_smoothing=ls)
    lse = torch.logsumexp(z, dim=1)
    keep = torch.ones_like(lse) if prob else (target != IGNORE).double()
    zl = z_loss * lse**2 * keep
    if reduction == "none":
        loss = ce + zl
    elif reduction == "sum":
        loss = ce + zl.sum()
    else:
        loss = ce + zl.sum() / keep.sum()
    return loss, lse.detach(), X, Q


def grads(loss, leaves, upstream):
    g = torch.autograd.grad(loss, leaves, upstream.double().expand_as(loss), retain_graph=True)
    return g


def close(name, got, want, dtype, ctx):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{ctx}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    same_nonfinite = (got == want) | (torch.isnan(got) & torch.isnan(want))
    fin = torch.isfinite(want)
    assert (same_nonfinite | fin).all(), f"{ctx}: {name}: non-finite mismatch"
    tol = TOL[dtype]
    scale = want[fin].abs().max().item() if fin.any() else 0.0
    err = (got[fin] - want[fin]).abs()
    # a value below the dtype's normal range is stored with the subnormals' spacing
    subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    allowed = tol * want[fin].abs() + tol * scale + subnormal
    bad = err > allowed
    assert not bad.any(), (
        f"{ctx}: {name}: {int(bad.sum())} of {err.numel()} elements off, max error "
        f"{err.max().item():.3g} (largest |value| {scale:.3g}, tolerance {tol:g})")


def index_problem(case, dtype, device, copies=1):
    shape, layout = CASES[case]
    xs = logits(shape, dtype, layout, device, copies=copies)
    t = canonical_target(make_index_target(shape, ignore_index=IGNORE, ignore_frac=0.2, device=device))
    # one row at least counts: with none, 'mean' is 0/0 and the definition's autograd
    # gives the z-loss 0 * inf = nan where the ops (and torch's cross-entropy) give 0
    t[0, 0] = 0
    return xs, t


def prob_problem(case, dtype, device, copies=1):
    shape, layout = CASES[case]
    xs = logits(shape, dtype, layout, device, copies=copies)
    q = canonical(restride(make_prob_target(shape, dtype=dtype, device=device), layout))
    return xs, q


def options(C, dtype, device):
    """(weight, label_smoothing) combinations run by each test."""
    w = random_weight(C, dtype=acc_dtype(dtype), device=device)
    return [(None, 0.0), (w, 0.0), (None, 0.1), (w, 0.15)]


def fresh_copy(x):
    """A tensor with x's values and x's strides in a storage of its own (nan in any
    holes), for the ops that write the gradient into their input."""
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    out = torch.full((span,), float("nan"), dtype=x.dtype, device=x.device).as_strided(x.shape, x.stride())
    return out.copy_(x)


# ----------------------------------------------------------------------------------
# class-index targets
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_index_extras(extra, reduction, dtype, case, device, fresh_seed):
    extras = EXTRAS[extra]
    red = REDUCTION_ENUM[reduction]
    (x, x_into), t = index_problem(case, dtype, device, copies=2)
    for weight, ls in options(x.shape[1], dtype, device):
        ctx = f"seed={fresh_seed} {extra} {reduction} {dtype_name(dtype)} {case} weight={weight is not None} ls={ls}"
        ref, lse, X, _ = definition(x, t, weight, ls, reduction, extras, prob=False)
        loss, rs, tw = ops.cross_entropy_index_forward(x, t, weight, IGNORE, ls, red, None, *extras)
        close("loss", loss, ref, dtype, ctx)
        close("lse", rs[0] + rs[1], lse, acc_dtype(dtype) if dtype not in LOW else torch.float32, ctx)

        # fused: the gradient for an upstream gradient of 1 (of 1 on every row for 'none')
        loss2, rs2, tw2, g_fused = ops.cross_entropy_index_forward_with_grad(x, t, weight, IGNORE, ls, red, None, *extras)
        assert_bitwise_equal(loss2, loss, ctx + ": with_grad loss")
        assert_bitwise_equal(rs2, rs, ctx + ": with_grad row_stats")
        (want,) = grads(ref, [X], torch.ones((), device=ref.device))
        close("fused grad", g_fused, want, dtype, ctx)

        # backward with a random upstream gradient
        up = torch.randn(loss.shape, dtype=torch.float64).to(device=device, dtype=loss.dtype)
        g = ops.cross_entropy_index_backward(up, x, t, weight, rs, tw, IGNORE, ls, red, *extras)
        (want,) = grads(ref, [X], up)
        close("backward grad", g, want, dtype, ctx)

        # Note [Recomputed equals fused]: the backward for an upstream gradient of 1
        ones = torch.ones_like(loss)
        g1 = ops.cross_entropy_index_backward(ones, x, t, weight, rs, tw, IGNORE, ls, red, *extras)
        assert_bitwise_equal(g1, g_fused, ctx + ": recomputed vs fused gradient")

        # the gradient written into the logits: the fused one, bit for bit
        xi = fresh_copy(x_into)
        loss3, rs3, tw3 = ops.cross_entropy_index_forward_grad_into_(xi, t, weight, IGNORE, ls, red, None, *extras)
        assert_bitwise_equal(loss3, loss, ctx + ": grad_into_ loss")
        assert_bitwise_equal(rs3, rs, ctx + ": grad_into_ row_stats")
        assert_bitwise_equal(xi, g_fused, ctx + ": grad_into_ gradient")


# ----------------------------------------------------------------------------------
# probability targets
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_prob_extras(extra, reduction, dtype, case, device, fresh_seed):
    extras = EXTRAS[extra]
    red = REDUCTION_ENUM[reduction]
    (x, x_into), q = prob_problem(case, dtype, device, copies=2)
    for weight, ls in options(x.shape[1], dtype, device):
        ctx = f"seed={fresh_seed} {extra} {reduction} {dtype_name(dtype)} {case} weight={weight is not None} ls={ls}"
        ref, lse, X, Q = definition(x, q, weight, ls, reduction, extras, prob=True)
        loss, rs, cs = ops.cross_entropy_prob_forward(x, q, weight, ls, red, None, *extras)
        close("loss", loss, ref, dtype, ctx)
        close("lse", rs[0] + rs[1], lse, acc_dtype(dtype) if dtype not in LOW else torch.float32, ctx)

        loss2, rs2, cs2, gx_fused, gq_fused = ops.cross_entropy_prob_forward_with_grad(
            x, q, weight, ls, red, True, True, None, *extras)
        assert_bitwise_equal(loss2, loss, ctx + ": with_grad loss")
        want_x, want_q = grads(ref, [X, Q], torch.ones((), device=ref.device))
        close("fused input grad", gx_fused, want_x, dtype, ctx)
        close("fused target grad", gq_fused, want_q, dtype, ctx)

        up = torch.randn(loss.shape, dtype=torch.float64).to(device=device, dtype=loss.dtype)
        gx, gq = ops.cross_entropy_prob_backward(up, x, q, weight, rs, cs, ls, red, True, True, *extras)
        want_x, want_q = grads(ref, [X, Q], up)
        close("backward input grad", gx, want_x, dtype, ctx)
        close("backward target grad", gq, want_q, dtype, ctx)

        xi = fresh_copy(x_into)
        loss3, rs3, cs3, gq3 = ops.cross_entropy_prob_forward_grad_into_(xi, q, weight, ls, red, True, None, *extras)
        assert_bitwise_equal(loss3, loss, ctx + ": grad_into_ loss")
        assert_bitwise_equal(rs3, rs, ctx + ": grad_into_ row_stats")
        assert_bitwise_equal(xi, gx_fused, ctx + ": grad_into_ input gradient")
        assert_bitwise_equal(gq3, gq_fused, ctx + ": grad_into_ target gradient")


# ----------------------------------------------------------------------------------
# defaults, exactness, extremes
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["rows", "short_rows", "nchw", "long_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_defaults_are_the_calls_without_extras(dtype, case, device, fresh_seed):
    """logit_scale=1, softcap=None, z_loss=0 passed explicitly: every output bit for bit
    what the call without the extras' arguments gives."""
    (x, _), t = index_problem(case, dtype, device, copies=2)
    _, q = prob_problem(case, dtype, device)
    off = (1.0, None, 0.0)
    w = random_weight(x.shape[1], dtype=acc_dtype(dtype), device=device)
    for reduction in ("none", "mean"):
        red = REDUCTION_ENUM[reduction]
        ctx = f"seed={fresh_seed} {reduction}"
        a = ops.cross_entropy_index_forward_with_grad(x, t, w, IGNORE, 0.1, red)
        b = ops.cross_entropy_index_forward_with_grad(x, t, w, IGNORE, 0.1, red, None, *off)
        for u, v in zip(a, b):
            assert_bitwise_equal(u, v, ctx)
        up = torch.rand_like(a[0])
        assert_bitwise_equal(ops.cross_entropy_index_backward(up, x, t, w, a[1], a[2], IGNORE, 0.1, red),
                             ops.cross_entropy_index_backward(up, x, t, w, a[1], a[2], IGNORE, 0.1, red, *off), ctx)
        a = ops.cross_entropy_prob_forward_with_grad(x, q, w, 0.1, red, True, True)
        b = ops.cross_entropy_prob_forward_with_grad(x, q, w, 0.1, red, True, True, None, *off)
        for u, v in zip(a, b):
            assert_bitwise_equal(u, v, ctx)
        up = torch.rand_like(a[0])
        for u, v in zip(ops.cross_entropy_prob_backward(up, x, q, w, a[1], a[2], 0.1, red, True, True),
                        ops.cross_entropy_prob_backward(up, x, q, w, a[1], a[2], 0.1, red, True, True, *off)):
            assert_bitwise_equal(u, v, ctx)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_name)
def test_power_of_two_scale_is_exact(dtype, case, device, fresh_seed):
    """logit_scale = 2 multiplies every logit exactly, so the mapped kernels must give the
    default kernels' numbers for the input 2x: the same loss and row statistics, and
    twice their gradient (also exact). Any difference in how the mapped walks form z,
    softmax or the gradient shows here bit by bit."""
    (x, _), t = index_problem(case, dtype, device, copies=2)
    x2 = x * 2
    w = random_weight(x.shape[1], dtype=acc_dtype(dtype), device=device)
    for reduction in ("none", "mean"):
        red = REDUCTION_ENUM[reduction]
        ctx = f"seed={fresh_seed} {reduction}"
        mapped_ = ops.cross_entropy_index_forward_with_grad(x, t, w, IGNORE, 0.1, red, None, 2.0, None, 0.0)
        plain = ops.cross_entropy_index_forward_with_grad(x2, t, w, IGNORE, 0.1, red)
        for name, u, v in zip(("loss", "row_stats", "total_weight"), mapped_[:3], plain[:3]):
            assert_bitwise_equal(u, v, f"{ctx}: {name}")
        assert_bitwise_equal(mapped_[3], plain[3] * 2, f"{ctx}: gradient")
        q = canonical(restride(make_prob_target(CASES[case][0], dtype=dtype, device=device), CASES[case][1]))
        mapped_ = ops.cross_entropy_prob_forward_with_grad(x, q, w, 0.1, red, True, True, None, 2.0, None, 0.0)
        plain = ops.cross_entropy_prob_forward_with_grad(x2, q, w, 0.1, red, True, True)
        for name, u, v in zip(("loss", "row_stats", "coef_sum", "target grad"), mapped_[:3] + mapped_[4:],
                              plain[:3] + plain[4:]):
            assert_bitwise_equal(u, v, f"{ctx}: prob {name}")
        assert_bitwise_equal(mapped_[3], plain[3] * 2, f"{ctx}: prob gradient")


def _huge_inputs(dtype, device, kind):
    shape = (6, 40)
    base = torch.randn(shape, dtype=torch.float64)
    if kind == "scale":
        # |x| ~ 1e4 (inside fp16's range), logit_scale 1e-3: z of order 10
        x = (base * 1e4).clamp(-6e4, 6e4)
        extras = (1e-3, None, 0.01)
    else:
        # softcap on logits far beyond it: tanh saturates, its slope is 0 there
        big = 6e4 if dtype == torch.float16 else 1e30
        x = base * big
        if dtype != torch.float16:
            x[0, 3] = float("inf")
            x[1, 5] = float("-inf")
        extras = (1.0, 4.0, 0.01)
    return x.to(device=device, dtype=dtype).unsqueeze(-1), extras


@pytest.mark.parametrize("kind", ["scale", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
def test_large_logits(kind, dtype, device, fresh_seed):
    x, extras = _huge_inputs(dtype, device, kind)
    t = canonical_target(make_index_target((6, 40), ignore_index=IGNORE, ignore_frac=0.2, device=device))
    q = make_prob_target((6, 40), dtype=dtype, device=device).unsqueeze(-1)
    for reduction in ("none", "mean"):
        red = REDUCTION_ENUM[reduction]
        ctx = f"seed={fresh_seed} {kind} {reduction}"
        ref, _, X, _ = definition(x, t, None, 0.1, reduction, extras, prob=False)
        loss, rs, tw, g = ops.cross_entropy_index_forward_with_grad(x, t, None, IGNORE, 0.1, red, None, *extras)
        (want,) = grads(ref, [X], torch.ones((), device=ref.device))
        close("index loss", loss, ref, dtype, ctx)
        close("index grad", g, want, dtype, ctx)
        assert torch.isfinite(g).all(), ctx
        ref, _, X, Q = definition(x, q, None, 0.1, reduction, extras, prob=True)
        loss, rs, cs, gx, gq = ops.cross_entropy_prob_forward_with_grad(x, q, None, 0.1, red, True, True, None, *extras)
        want_x, want_q = grads(ref, [X, Q], torch.ones((), device=ref.device))
        close("prob loss", loss, ref, dtype, ctx)
        close("prob input grad", gx, want_x, dtype, ctx)
        close("prob target grad", gq, want_q, dtype, ctx)


def test_z_loss_mean_counts_rows_not_weights(device, fresh_seed):
    """'mean' divides the z-loss by the number of rows not ignored, with or without a
    class weight; an ignored row's 'none' loss stays exactly 0 (nan logits too)."""
    x = torch.randn(9, 7, 1, dtype=torch.float64, device=device)
    t = torch.randint(0, 7, (9, 1), device=device)
    t[2, 0] = IGNORE
    t[5, 0] = IGNORE
    x[5, 3, 0] = float("nan")
    w = torch.rand(7, dtype=torch.float64, device=device) + 0.5
    z_loss = 0.1
    keep = t[:, 0] != IGNORE
    lse = torch.logsumexp(x[:, :, 0], dim=1)
    z_term = (z_loss * lse[keep] ** 2).sum() / keep.sum()
    plain = ops.cross_entropy_index_forward(x, t, w, IGNORE, 0.0, 1)[0]
    with_z = ops.cross_entropy_index_forward(x, t, w, IGNORE, 0.0, 1, None, 1.0, None, z_loss)[0]
    torch.testing.assert_close(with_z - plain, z_term, rtol=1e-12, atol=0)
    none = ops.cross_entropy_index_forward(x, t, w, IGNORE, 0.0, 0, None, 1.0, None, z_loss)[0]
    assert none[2, 0].item() == 0.0 and none[5, 0].item() == 0.0
    assert not math.copysign(1.0, none[5, 0].item()) < 0


# ----------------------------------------------------------------------------------
# the gradient written into the logits, on every walk, with threads
# ----------------------------------------------------------------------------------

# (input shape, layout): long rows split across threads (with and without kept exps),
# many rows, short rows, class-strided rows with and without kept column exps, transposed,
# channels-last, strided classes, rows at a stride.
INPLACE_CASES = {
    "split_long_rows": ((3, 100_003), "contiguous"),
    "split_rows_past_kept": ((2, 270_001), "contiguous"),
    "many_rows": ((40, 3000), "contiguous"),
    "short_rows": ((300, 10), "contiguous"),
    "nchw_kept": ((3, 20, 7, 6), "contiguous"),
    "nchw_wide": ((2, 700, 5, 7), "contiguous"),
    "transposed": ((45, 50), "transposed"),
    "channels_last": ((2, 40, 3, 5), "channels_last"),
    "sliced": ((5, 300), "sliced"),
    "sliced_batch": ((70, 12), "sliced_batch"),
}

INPLACE_EXTRAS = {"off": (1.0, None, 0.0), "scale_z": (0.5, None, 0.03), "softcap_z": (1.3, 2.0, 0.03)}


@contextlib.contextmanager
def num_threads(n):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("extra", list(INPLACE_EXTRAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("case", list(INPLACE_CASES))
def test_grad_into_equals_out_of_place(case, dtype, extra, device, fresh_seed):
    """Note [Read before write]: the gradient written into the logits is the out-of-place
    one, bit for bit, whatever the walk and the thread count (out of place on one thread,
    in place on two)."""
    shape, layout = INPLACE_CASES[case]
    extras = INPLACE_EXTRAS[extra]
    src = torch.randn(shape, dtype=torch.float64) * 2
    x = canonical(restride(src.to(device=device, dtype=dtype), layout))
    t = canonical_target(make_index_target(shape, ignore_index=IGNORE, ignore_frac=0.1, device=device))
    q = canonical(restride(make_prob_target(shape, dtype=dtype, device=device), layout))
    w = random_weight(shape[1], dtype=acc_dtype(dtype), device=device)
    for weight, ls, reduction in ((None, 0.0, "mean"), (w, 0.1, "none")):
        red = REDUCTION_ENUM[reduction]
        ctx = f"seed={fresh_seed} weight={weight is not None} {reduction}"
        with num_threads(1):
            loss, rs, tw, g = ops.cross_entropy_index_forward_with_grad(x, t, weight, IGNORE, ls, red, None, *extras)
            ploss, prs, pcs, pg, pgq = ops.cross_entropy_prob_forward_with_grad(
                x, q, weight, ls, red, True, True, None, *extras)
        with num_threads(2):
            xi = fresh_copy(x)
            out = ops.cross_entropy_index_forward_grad_into_(xi, t, weight, IGNORE, ls, red, None, *extras)
            assert_bitwise_equal(xi, g, ctx + ": index gradient")
            for name, u, v in zip(("loss", "row_stats", "total_weight"), out, (loss, rs, tw)):
                assert_bitwise_equal(u, v, f"{ctx}: index {name}")
            xi = fresh_copy(x)
            out = ops.cross_entropy_prob_forward_grad_into_(xi, q, weight, ls, red, True, None, *extras)
            assert_bitwise_equal(xi, pg, ctx + ": prob gradient")
            for name, u, v in zip(("loss", "row_stats", "coef_sum", "target grad"), out, (ploss, prs, pcs, pgq)):
                assert_bitwise_equal(u, v, f"{ctx}: prob {name}")


def test_grad_into_rejects_overlapping_input(device):
    x = torch.randn(1, 5, 1, device=device).expand(4, 5, 1)
    t = torch.zeros(4, 1, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.cross_entropy_index_forward_grad_into_(x, t, None, IGNORE, 0.0, 1)
