"""xent_ext.linear_cross_entropy and xent_ext.LinearCrossEntropyLoss against torch.

The expected values are float64 math: the definition (torch's linear, the logit
map of the extras, torch's cross_entropy, the z-loss) evaluated by torch on
float64 copies of the very same tensors, differentiated by autograd. Without
extras that definition is torch.nn.functional.linear_cross_entropy's reference
path, which the tests also call directly for errors and module parity.

Every case runs with a small batch_chunk_size (options), so the rows go
through several chunks, the last of them shorter.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import xent_ext
import xent_ext.linear as xlinear
from helpers import is_cuda

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"),
                                reason=f"torch {torch.__version__} has no linear_cross_entropy to compare with")

REDUCTIONS = ("none", "mean", "sum")
# Largest error allowed, relative to the largest magnitude of the float64 value
# (Note [Sum, then scale] in xent_ext/linear.py: bf16 logits and logit
# gradients are rounded once each, the matmuls accumulate in fp32).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def chunks(rows):
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)


def lce(*args, **kwargs):
    return xent_ext.linear_cross_entropy(*args, **kwargs)


def reference(x, w, target, *, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
              label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0):
    """The definition in torch ops (torch's reference path of linear_cross_entropy, plus the extras)."""
    num_batches, h = x.shape[:-1], x.shape[-1]
    logits_shape = (*num_batches, *w.shape[:-1])
    logits = F.linear(x, w.reshape(-1, h), None if linear_bias is None else linear_bias.reshape(-1))
    z = logits.reshape(logits_shape) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = target.shape == z.shape
    ii = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(z, target, weight, ignore_index=ii, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z, dim=0 if z.dim() == 1 else 1)
        keep = torch.ones_like(lse, dtype=torch.bool) if prob else target != ii
        zl = z_loss * lse.square() * keep
        loss = loss + (zl if reduction == "none" else zl.sum() if reduction == "sum" else zl.sum() / keep.sum())
    return loss


def wide(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def check(got, want, dtype, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    err = (got.detach().to(torch.float64) - want.detach()).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-3), f"{what}: error {err:.3g} at scale {scale:.3g} ({dtype})"


def run_both(args, kwargs, upstream_seed=None):
    """Loss and gradients (w.r.t. every argument that requires grad) of xent_ext and of the
    float64 definition, for one random upstream gradient."""
    got = lce(*args, **kwargs)
    wide_args = [wide(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    wide_kwargs = {k: wide(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in kwargs.items() if k not in ("options", "return_aux")}
    want = reference(*wide_args, **wide_kwargs)
    upstream = torch.rand(want.shape, dtype=torch.float64) + 0.5  # non-uniform per row for 'none'
    leaves = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    wide_leaves = [a for a in wide_args + list(wide_kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    g_got = torch.autograd.grad(got, leaves, upstream.to(got.dtype).to(got.device)) if leaves else ()
    g_want = torch.autograd.grad(want, wide_leaves, upstream) if leaves else ()
    return got, want, g_got, g_want


def make_case(device, dtype, n=13, h=8, c=11, out_features=(), prob=False, bias=False, weighted=False,
              ignored=(2, 7), requires_grad=True):
    gen = torch.Generator().manual_seed(torch.randint(1 << 62, ()).item())

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(n, h).requires_grad_(requires_grad)
    w = rnd(c, *out_features, h, scale=0.7).requires_grad_(requires_grad)
    b = rnd(c, *out_features).requires_grad_(requires_grad) if bias else None
    wt = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.25).to(device=device, dtype=dtype) if weighted else None
    if prob:
        t = torch.rand((n, c, *out_features), generator=gen, dtype=torch.float64).softmax(1)
        t = t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    else:
        t = torch.randint(c, (n, *out_features), generator=gen).to(device)
        flat = t.view(-1)
        for i in ignored:
            if i < flat.numel():
                flat[i] = -100
    return x, w, b, wt, t


EXTRAS = {
    "plain": {},
    "extras": {"logit_scale": 0.8, "softcap": 4.0, "z_loss": 1e-2},
}


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("smoothing", (0.0, 0.15))
@pytest.mark.parametrize("weighted", (False, True), ids=("noweight", "weight"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", (False, True), ids=("index", "prob"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_matches_float64_definition(device, fresh_seed, dtype, prob, reduction, weighted, smoothing, extras):
    bias = bool(fresh_seed & 1)  # half the cases with a bias, picked by the seed
    x, w, b, wt, t = make_case(device, dtype, prob=prob, bias=bias, weighted=weighted)
    kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, label_smoothing=smoothing, options=chunks(4),
                  **EXTRAS[extras])
    got, want, g_got, g_want = run_both((x, w, t), kwargs)
    assert got.dtype == dtype
    check(got, want, dtype, "loss")
    names = ["input", "linear_weight"] + (["linear_bias"] if bias else []) + (["target"] if prob else [])
    assert len(g_got) == len(names)
    for name, a, e in zip(names, g_got, g_want):
        assert a.dtype == dtype
        check(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("rows", (4, 64), ids=("chunks", "one-chunk"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("native", (True, False), ids=("native-matmul", "widened-matmul"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision_matmul_routes(monkeypatch, fresh_seed, dtype, native, reduction, rows):
    """Note [Widened matmuls on the CPU]: bf16/fp16 products run in torch's own matmul where the
    CPU has a native one, else widened to fp32 a block of W's rows at a time; both routes (each
    forced here, whatever this CPU has) give the float64 definition's values and gradients."""
    monkeypatch.setitem(xlinear._NATIVE_MATMUL, dtype, native)
    monkeypatch.setattr(xlinear, "_WIDEN_ROWS_ELEMENTS", 3 * 8)  # blocks of 3 of W's 11 rows (h = 8)
    calls = []
    real = xlinear._WidenedWeight.blocks
    monkeypatch.setattr(xlinear._WidenedWeight, "blocks", lambda self: calls.append(1) or real(self))
    x, w, b, wt, t = make_case("cpu", dtype, bias=True, weighted=True)
    kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, label_smoothing=0.1, options=chunks(rows))
    got, want, g_got, g_want = run_both((x, w, t), kwargs)
    assert bool(calls) == (not native)
    check(got, want, dtype, "loss")
    for name, a, e in zip(("input", "linear_weight", "linear_bias"), g_got, g_want):
        assert a.dtype == dtype
        check(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", (False, True), ids=("index", "prob"))
def test_k_dimensional(device, fresh_seed, prob, reduction):
    x, w, b, wt, t = make_case(device, torch.float32, n=7, out_features=(2, 3), prob=prob, bias=True,
                               weighted=not prob, ignored=(1, 9, 10, 11, 12, 13, 14))
    kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, label_smoothing=0.1, options=chunks(3))
    got, want, g_got, g_want = run_both((x, w, t), kwargs)
    check(got, want, torch.float32, "loss")
    for a, e in zip(g_got, g_want):
        check(a, e, torch.float32, "grad")


@pytest.mark.parametrize("prob", (False, True), ids=("index", "prob"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_many_classes(device, fresh_seed, dtype, prob):
    # Rows of logits longer than the kernels' blocks (the gradient is written over the
    # logits in place: every logit must be read before its gradient is written).
    x, w, b, wt, t = make_case(device, dtype, n=9, h=16, c=777, prob=prob, bias=True, weighted=True)
    for reduction in ("mean", "none"):
        got, want, g_got, g_want = run_both((x, w, t), dict(linear_bias=b, weight=wt, reduction=reduction,
                                                            label_smoothing=0.05, options=chunks(4)))
        check(got, want, dtype, "loss")
        for a, e in zip(g_got, g_want):
            check(a, e, dtype, "grad")


@pytest.mark.parametrize("rows", (1, 4, 13, 64, None), ids=lambda r: f"chunk{r}")
def test_chunk_boundaries(device, fresh_seed, rows):
    # 13 rows: chunks of 1, of 4 (the last one short), exactly one chunk, a chunk
    # larger than the batch, and the automatic size; rows 4..7 (a whole chunk of 4)
    # are all ignored.
    x, w, b, wt, t = make_case(device, torch.float32, bias=True, weighted=True, ignored=(4, 5, 6, 7, 11))
    for reduction in REDUCTIONS:
        kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, options=chunks(rows) if rows else None,
                      z_loss=1e-2)
        got, want, g_got, g_want = run_both((x, w, t), kwargs)
        check(got, want, torch.float32, "loss")
        for a, e in zip(g_got, g_want):
            check(a, e, torch.float32, "grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(device, reduction):
    x, w, b, _, t = make_case(device, torch.float32, bias=True, ignored=range(13))
    got = lce(x, w, t, linear_bias=b, reduction=reduction, options=chunks(4))
    want = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)  # 'mean': 0 / 0 = nan
    grads = torch.autograd.grad(got.sum(), (x, w, b))
    for g, e in zip(grads, torch.autograd.grad(want.sum(), (x, w, b))):
        torch.testing.assert_close(g, e)  # zeros, not nan
        assert not g.any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", (False, True), ids=("index", "prob"))
def test_empty_batch(device, reduction, prob):
    x, w, b, wt, t = make_case(device, torch.float32, n=0, bias=True, weighted=True, prob=prob)
    got = lce(x, w, t, linear_bias=b, weight=wt, reduction=reduction)
    want = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=wt, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


def test_zero_total_weight_is_not_finite_as_in_torch(device):
    x, w, _, wt, t = make_case(device, torch.float32, weighted=True, ignored=(3,))
    wt.zero_()
    got = lce(x, w, t, weight=wt, options=chunks(4))
    want = F.linear_cross_entropy(x, w, t, weight=wt)
    assert got.isnan() and want.isnan()
    g = torch.autograd.grad(got, (x, w))
    e = torch.autograd.grad(want, (x, w))
    for a, b in zip(g, e):
        assert torch.equal(a.isfinite(), b.isfinite())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_upstream_gradient_scaling_and_second_backward(device, fresh_seed, dtype):
    # loss.backward() (upstream exactly 1: gradients handed over as they are),
    # then, through the same graph, a second backward (recomputed), then a
    # scaled one on a fresh graph (scaled in place).
    x, w, b, wt, t = make_case(device, dtype, bias=True, weighted=True)
    kwargs = dict(linear_bias=b, weight=wt, label_smoothing=0.1, options=chunks(5))
    loss = lce(x, w, t, **kwargs)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in (x, w, b)]
    loss.backward()
    for p, g in zip((x, w, b), first):
        check(p.grad, 2 * wide(g), dtype, "second backward")
        p.grad = None
    (lce(x, w, t, **kwargs) * 0.375).backward()
    for p, g in zip((x, w, b), first):
        check(p.grad, 0.375 * wide(g), dtype, "scaled backward")


def test_double_backward(device, fresh_seed):
    # create_graph=True differentiates the composite (Note [Linear cross-entropy backward]).
    x, w, b, wt, t = make_case(device, torch.float64, bias=True, weighted=True)
    for reduction in ("mean", "none"):
        kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
        results = []
        for fn in (lambda *a, **k: lce(*a, options=chunks(4), **k), reference):
            loss = fn(x, w, t, **kwargs).sum()
            gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
            results.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w, b)))
        for a, e in zip(*results):
            torch.testing.assert_close(a, e)


def test_no_grad_and_inference(device, fresh_seed):
    x, w, b, wt, t = make_case(device, torch.float32, bias=True, weighted=True)
    want = reference(wide(x), wide(w), t, linear_bias=wide(b), weight=wide(wt))
    with torch.no_grad():
        check(lce(x, w, t, linear_bias=b, weight=wt, options=chunks(4)), want, torch.float32, "no_grad")
    with torch.inference_mode():
        check(lce(x, w, t, linear_bias=b, weight=wt, options=chunks(4)), want, torch.float32, "inference")


def test_fp16_and_strided_operands(device, fresh_seed):
    x, w, b, wt, t = make_case(device, torch.float16, bias=True, weighted=True)
    got, want, g_got, g_want = run_both((x, w, t), dict(linear_bias=b, weight=wt, options=chunks(4)))
    check(got, want, torch.float16, "loss")
    for a, e in zip(g_got, g_want):
        check(a, e, torch.float16, "grad")
    # Non-contiguous input and weight (a transposed weight, every other row of the input).
    x2 = torch.cat([x.detach(), x.detach()], 1)[:, ::2].float().requires_grad_()
    w2 = w.detach().float().t().contiguous().t().requires_grad_()
    got, want, g_got, g_want = run_both((x2, w2, t), dict(weight=wt.float(), options=chunks(4)))
    for a, e in zip((got,) + g_got, (want,) + g_want):
        check(a, e, torch.float32, "strided")


@pytest.mark.parametrize("prob", (False, True), ids=("index", "prob"))
def test_unbatched_input(device, fresh_seed, prob):
    x, w, b, _, t = make_case(device, torch.float64, n=1, bias=True, prob=prob, ignored=())
    x1, t1 = x[0], t[0]
    for reduction in REDUCTIONS:
        got, want, g_got, g_want = run_both((x1, w, t1), dict(linear_bias=b, reduction=reduction))
        assert got.shape == want.shape == ()
        for a, e in zip((got,) + g_got, (want,) + g_want):
            check(a, e, torch.float64, "unbatched")


def test_autocast_matches_torch(device, fresh_seed):
    if not is_cuda(device):
        pytest.importorskip("torch")  # CPU autocast (bf16) is always there
    x, w, b, wt, t = make_case(device, torch.float32, bias=True, weighted=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        got = lce(x, w, t, linear_bias=b, weight=wt, options=chunks(4))
        want = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=wt)
    assert got.dtype == want.dtype == torch.float32
    g_got = torch.autograd.grad(got, (x, w, b))
    g_want = torch.autograd.grad(want, (x, w, b))
    for a, e in zip((got,) + g_got, (want,) + g_want):
        assert a.dtype == e.dtype
        check(a, wide(e), torch.bfloat16, "autocast")


def test_return_aux(device, fresh_seed):
    x, w, b, wt, t = make_case(device, torch.float32, bias=True, weighted=True)
    for reduction in REDUCTIONS:
        kwargs = dict(linear_bias=b, weight=wt, reduction=reduction, softcap=5.0, z_loss=1e-3)
        loss, aux = lce(x, w, t, return_aux=True, options=chunks(4), **kwargs)
        logits = F.linear(wide(x), wide(w), wide(b))
        z = 5.0 * torch.tanh(logits / 5.0)
        lse = torch.logsumexp(z, 1)
        keep = t != -100
        zl = 1e-3 * lse.square() * keep
        want_zl = zl if reduction == "none" else zl.sum() if reduction == "sum" else zl.sum() / keep.sum()
        assert aux.lse.dtype == torch.float32 and not aux.lse.requires_grad
        check(aux.lse, lse, torch.float32, "aux.lse")
        check(aux.z_loss, want_zl, torch.float32, "aux.z_loss")
        check(loss, reference(wide(x), wide(w), t, **{**kwargs, "linear_bias": wide(b), "weight": wide(wt)}),
              torch.float32, "loss")


def test_z_loss_mean_with_negative_class_weights(device, fresh_seed):
    # Note [Z-loss 'mean' with class weights]: a negative total weight.
    x, w, _, wt, t = make_case(device, torch.float64, weighted=True)
    wt = -wt
    got, want, g_got, g_want = run_both((x, w, t), dict(weight=wt, z_loss=0.05, options=chunks(4)))
    for a, e in zip((got,) + g_got, (want,) + g_want):
        check(a, e, torch.float64, "negative weights")


def test_composite_hand_overs(device, fresh_seed):
    # Class weights that require grad (probability targets: differentiable in torch),
    # probability targets of another dtype, and uint8 class indices.
    x, w, _, wt, t = make_case(device, torch.float64, prob=True, weighted=True)
    wt.requires_grad_()
    got, want, g_got, g_want = run_both((x, w, t), dict(weight=wt))
    assert len(g_got) == 4
    for a, e in zip((got,) + g_got, (want,) + g_want):
        check(a, e, torch.float64, "weight grad")
    got = lce(x.float(), w.float(), t)
    torch.testing.assert_close(got, F.linear_cross_entropy(x.float(), w.float(), t))
    x, w, _, _, t = make_case(device, torch.float32, ignored=())
    torch.testing.assert_close(lce(x, w, t.to(torch.uint8)), F.linear_cross_entropy(x, w, t.to(torch.uint8)))


def _peak_bytes(fn):
    """Peak of the bytes torch's CPU allocator holds during fn() above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def test_never_materializes_the_logits(fresh_seed):
    n, h, c = 2048, 16, 1000
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(c, h, requires_grad=True)
    t = torch.randint(c, (n,))
    logits_bytes = n * c * 4

    def step(fn):
        x.grad = w.grad = None
        fn().backward()

    step(lambda: lce(x, w, t))  # warm-up
    ours = _peak_bytes(lambda: step(lambda: lce(x, w, t)))
    theirs = _peak_bytes(lambda: step(lambda: F.linear_cross_entropy(x, w, t)))
    chunk = xlinear._chunk_rows(n, c * 4, None) * c * 4
    assert chunk == logits_bytes // 16
    grads = (n * h + c * h) * 4
    assert ours <= chunk + grads + (64 << 10), (ours, chunk, grads)
    assert theirs >= 2 * logits_bytes


def test_chunk_size_rule():
    # Note [Chunk size]: 1/16 of the logits, at most 256 MiB, at least 128 rows, spread evenly.
    assert xlinear._chunk_rows(8192, 128256 * 2, None) == 512
    assert xlinear._chunk_rows(65536, 128256 * 2, None) * 128256 * 2 <= 256 << 20
    assert xlinear._chunk_rows(100, 4 * 32000, None) == 100
    assert xlinear._chunk_rows(1000, 4 * 32000, None) == 125  # 8 chunks of 125, not 7 x 128 + 104
    assert xlinear._chunk_rows(2048, 4 * 32000, None) == 128
    assert xlinear._chunk_rows(1000, 4 * 32000, 7) == 7  # options.batch_chunk_size


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_recomputes_only_for_none(monkeypatch, reduction):
    # 'mean' and 'sum': the gradients come from the forward; 'none': one pass through the chunks.
    calls = []
    real = xlinear._backward_op
    monkeypatch.setattr(xlinear, "_backward_op", lambda *a: calls.append(1) or real(*a))
    x, w, _, _, t = make_case("cpu", torch.float32)
    lce(x, w, t, reduction=reduction, options=chunks(4)).sum().backward()
    assert len(calls) == (reduction == "none")


# ----------------------------------------------------------------------------------
# errors: torch's type and message
# ----------------------------------------------------------------------------------


def _error_cases():
    x = torch.randn(4, 3)
    w = torch.randn(5, 3)
    t = torch.tensor([0, 1, 4, 2])
    p = torch.rand(4, 5)
    return {
        "input 3-D": ((x.unsqueeze(0), w, t), {}),
        "weight 1-D": ((x, w[0], t), {}),
        "in_features": ((x, w[:, :2], t), {}),
        "bias shape": ((x, w, t), {"linear_bias": torch.randn(4)}),
        "k-dim unbatched": ((x[0], w.view(5, 1, 3), t[0]), {}),
        "prob with ignore_index": ((x, w, p), {"ignore_index": -100}),
        "target out of range": ((x, w, torch.tensor([0, 1, 5, 2])), {}),
        "target negative": ((x, w, torch.tensor([0, -1, 3, 2])), {"reduction": "sum"}),
        "target batch": ((x, w, t[:3]), {}),
        "target dtype": ((x, w, t.float()), {}),
        "target 2-D": ((x, w, t.view(2, 2)), {}),
        "prob int target": ((x, w, p.long()), {}),
        "weight shape": ((x, w, t), {"weight": torch.ones(4)}),
        "weight dtype": ((x, w, t), {"weight": torch.ones(5, dtype=torch.float64)}),
        "label_smoothing": ((x, w, t), {"label_smoothing": 1.5}),
        "reduction": ((x, w, t), {"reduction": "bogus"}),
        "linear dtypes": ((x, w.double(), t), {}),
        "ignore_index type": ((x, w, t), {"ignore_index": 1.5}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_match_torch(case):
    args, kwargs = _error_cases()[case]
    with pytest.raises(Exception) as want:
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(want.type) as got:
        lce(*args, **kwargs)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("bad", [dict(logit_scale=0.0), dict(logit_scale=math.inf), dict(softcap=0.0),
                                 dict(softcap=-1.0), dict(softcap=math.nan), dict(z_loss=-1e-4),
                                 dict(z_loss=math.inf)], ids=str)
def test_invalid_extras_raise_value_error(bad):
    x, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 4, 2])
    with pytest.raises(ValueError, match="must be"):
        lce(x, w, t, **bad)


# ----------------------------------------------------------------------------------
# the module, torch.compile, the patch
# ----------------------------------------------------------------------------------


def test_module_mirrors_torch(fresh_seed):
    kwargs = dict(out_features=(2,), bias=True, weight=torch.rand(6) + 0.5, ignore_index=3, label_smoothing=0.1,
                  reduction="sum")
    ours = xent_ext.LinearCrossEntropyLoss(4, 6, z_loss=0.0, **kwargs)
    theirs = torch.nn.LinearCrossEntropyLoss(4, 6, **kwargs)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 4)
    t = torch.randint(6, (5, 2))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    ours.z_loss = 1e-2
    assert "z_loss=0.01" in repr(ours)
    with pytest.raises(RuntimeError) as want:
        torch.nn.LinearCrossEntropyLoss(4, 6, label_smoothing=2.0)
    with pytest.raises(RuntimeError, match="label_smoothing") as got:
        xent_ext.LinearCrossEntropyLoss(4, 6, label_smoothing=2.0)
    assert str(got.value) == str(want.value)


def test_torch_compile_fullgraph(fresh_seed):
    x, w, b, wt, t = make_case("cpu", torch.float32, bias=True, weighted=True)

    def fn(x, w, b, t, wt):
        mean = lce(x, w, t, linear_bias=b, weight=wt, options=chunks(4), z_loss=1e-2)
        rows = lce(x, w, t, linear_bias=b, reduction="none", options=chunks(4), softcap=4.0)
        return mean + (rows * torch.linspace(0.5, 1.5, rows.numel())).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(x, w, b, t, wt)
    want = fn(x, w, b, t, wt)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, (x, w, b)), torch.autograd.grad(want, (x, w, b))):
        torch.testing.assert_close(a, e)


def test_patch_routes_torch_linear_cross_entropy(fresh_seed):
    x, w, _, _, t = make_case("cpu", torch.float32)
    calls = []
    real = xlinear.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs.get("reduction", "mean"))
        return real(*args, **kwargs)

    original = F.linear_cross_entropy
    with xent_ext.patched():
        xent_ext.functional.linear_cross_entropy, saved = counting, xent_ext.functional.linear_cross_entropy
        try:
            F.linear_cross_entropy(x, w, t, reduction="sum")
            module = torch.nn.LinearCrossEntropyLoss(8, 11)
            module(x, t)
        finally:
            xent_ext.functional.linear_cross_entropy = saved
    assert calls == ["sum", "mean"]
    assert F.linear_cross_entropy is original
