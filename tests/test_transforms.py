"""Forward-mode AD and torch.func transforms of xent_ext.cross_entropy, against torch.

torch.nn.functional.cross_entropy supports forward-mode AD (torch.autograd.forward_ad,
torch.func.jvp), vmap, jacfwd, jacrev and hessian; so must the drop-in, with the same
numbers, and it must never hand back a missing (None) tangent. Each test draws its data
from a fresh seed and compares with torch on the same tensors: in the same dtype for
fp64/fp32; for bf16, with torch evaluated in fp64 on the same (bf16-valued) inputs, whose
result is the more exact one.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import xent_ext
from helpers import REDUCTIONS, dtype_name, layouts_for, make_index_target, make_logits, make_prob_target, random_weight

ours = xent_ext.cross_entropy

SHAPE_KINDS = ("C", "NC", "NCd", "NCHW")
OPTIONS = ("plain", "weight", "smoothing", "weight+smoothing")
TOL = {  # (rtol, atol) for values of order 1
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (3e-2, 3e-2),
}


def draw_shape(rng, kind):
    C = rng.choice([2, 3, 5, 7, 11])
    N = rng.randint(1, 4)
    return {
        "C": (C,),
        "NC": (rng.randint(1, 6), C),
        "NCd": (N, C, rng.randint(1, 4)),
        "NCHW": (N, C, rng.randint(1, 3), rng.randint(1, 3)),
    }[kind]


def draw_case(rng, kind, shape, dtype, option, device="cpu", expanded=False):
    """Logits, target and keyword arguments for one configuration, plus a description.

    The logits' memory layout is drawn; "expanded" (stride 0) only where asked for:
    forward AD cannot make a dual tensor of overlapping memory (torch's nor ours).
    """
    C = shape[0] if len(shape) == 1 else shape[1]
    layout = rng.choice([lay for lay in layouts_for(len(shape)) if expanded or lay != "expanded"])
    x = make_logits(shape, dtype, layout, rng.choice([0.5, 2.0]), device=device)
    kw = {}
    if kind == "index":
        kw["ignore_index"] = rng.choice([-100, rng.randrange(C)])
        # The first target is never ignored: an all-ignored 'mean' is 0/0 in both.
        target = make_index_target(shape, torch.int64, kw["ignore_index"], ignore_frac=0.3, device=device)
        flat = target.view(-1)
        if flat[0] == kw["ignore_index"]:
            flat[0] = (kw["ignore_index"] + 1) % C
    else:
        target = make_prob_target(shape, dtype, rng.choice(["softmax", "randn"]), device=device)
    if "weight" in option:
        kw["weight"] = random_weight(C, dtype, device)
    if "smoothing" in option:
        kw["label_smoothing"] = rng.choice([0.1, 0.35, 1.0])
    desc = dict(kind=kind, shape=shape, layout=layout, dtype=dtype_name(dtype), option=option, device=device,
                **{k: v for k, v in kw.items() if k != "weight"})
    return x, target, kw, desc


def ctx_of(seed, **kw):
    return "seed=%d " % seed + " ".join(f"{k}={v}" for k, v in kw.items())


def reference_dtype(dtype):
    return torch.float64 if dtype == torch.bfloat16 else dtype


def up(t, dtype):
    """`t` in the reference dtype (float tensors only; None stays None)."""
    return t.to(reference_dtype(dtype)) if t is not None and t.is_floating_point() else t


def kw_up(kw, dtype):
    return {k: up(v, dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def assert_close(got, want, dtype, ctx, what):
    assert got is not None, f"{what}: a None result (missing tangent) {ctx}"
    rtol, atol = TOL[dtype]
    got, want = got.detach(), want.detach()
    scale = max(1.0, float(want.nan_to_num().abs().max())) if want.numel() else 1.0
    # nan where both are nan: a 'mean' over samples whose targets are all ignored (0 / 0).
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol * scale, equal_nan=True,
                               msg=lambda m: f"{what} {ctx}\n{m}")


def dual_tangent(fn, primals, tangents):
    """fn(*primals) under torch.autograd.forward_ad: (primal, tangent) of the output."""
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) if t is not None else p for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(fn(*duals))
        return out.primal, out.tangent


# ----------------------------------------------------------------------------------
# forward-mode AD
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_name)
def test_forward_ad(dtype, kind, reduction, option, device, rng, fresh_seed):
    """Dual tensors: the loss' tangent for tangents of the logits (and, for probability
    targets, of the target and the weight) is torch's."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, option, device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    weight = kw.pop("weight", None)
    primals = [x, target, weight]
    tangents = [torch.randn_like(x)]
    if kind == "prob":
        tangents.append(torch.randn_like(target))
        tangents.append(torch.randn_like(weight) if weight is not None else None)
    else:
        tangents += [None, None]
    # The reference also sees the tangents rounded to the dtype.
    ref_primals = [up(p, dtype) for p in primals]
    ref_tangents = [up(t, dtype) for t in tangents]

    def ce(fn):
        return lambda a, t, w: fn(a, t, weight=w, reduction=reduction, **kw)

    loss, tangent = dual_tangent(ce(ours), primals, tangents)
    want_loss, want_tangent = dual_tangent(ce(F.cross_entropy), ref_primals, ref_tangents)
    assert_close(loss, want_loss, dtype, ctx, "loss")
    assert tangent is not None, f"forward AD returned no tangent {ctx}"
    assert tangent.dtype == loss.dtype and tangent.shape == loss.shape, ctx
    assert_close(tangent, want_tangent, dtype, ctx, "tangent")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_forward_over_reverse(dtype, kind, reduction, device, rng, fresh_seed):
    """Dual logits that also require grad (the fused path for 'mean'/'sum'): the loss'
    tangent and the tangent of its gradient (a Hessian-vector product) are torch's."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, rng.choice(OPTIONS), device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    v = torch.randn_like(x)
    results = []
    for fn in (ours, F.cross_entropy):
        with fwAD.dual_level():
            a = fwAD.make_dual(x.clone().requires_grad_(), v)
            loss = fn(a, target, reduction=reduction, **kw)
            g = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(fresh_seed))
            g = g.to(device=device, dtype=loss.dtype)
            (da,) = torch.autograd.grad(loss, a, g)
            results.append((fwAD.unpack_dual(loss).tangent, fwAD.unpack_dual(da).primal, fwAD.unpack_dual(da).tangent))
    for what, got, want in zip(("loss tangent", "gradient", "gradient tangent"), *results):
        assert_close(got, want, dtype, ctx, what)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_func_jvp(dtype, kind, reduction, device, rng, fresh_seed):
    """torch.func.jvp with respect to the logits (and, for probability targets, the
    target and the weight at once)."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    option = rng.choice(OPTIONS)
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, option, device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    if kind == "index":
        primals = (x,)

        def make(fn):
            return lambda a: fn(a, target, reduction=reduction, **kw)
    else:
        weight = kw.pop("weight", None)
        if weight is None:
            weight = random_weight(x.shape[0 if x.dim() == 1 else 1], dtype, device)
        primals = (x, target, weight)

        def make(fn):
            return lambda a, t, w: fn(a, t, weight=w, reduction=reduction, **kw)
    tangents = tuple(torch.randn_like(p) for p in primals)
    got = jvp(make(ours), primals, tangents)
    want = jvp(make(F.cross_entropy), primals, tangents)
    assert_close(got[0], want[0], dtype, ctx, "loss")
    assert_close(got[1], want[1], dtype, ctx, "tangent")


def test_index_weight_tangent_raises(fresh_seed):
    """torch's class-index loss is not differentiable w.r.t. the weight: a tangent for it
    is an error, not a silently missing or partial tangent."""
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(5, (4,))
    w = random_weight(5, torch.float64)
    with pytest.raises(RuntimeError, match="not differentiable with respect to `weight`"):
        dual_tangent(lambda ww: ours(x, y, weight=ww), [w], [torch.randn_like(w)])
    with pytest.raises(RuntimeError, match="not differentiable with respect to `weight`"):
        jvp(lambda ww: ours(x, y, weight=ww, label_smoothing=0.1), (w,), (torch.randn_like(w),))


@pytest.mark.parametrize("caller", sorted(xent_ext._functorch.CALLERS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_every_caller_has_a_tangent(caller, requires_grad, fresh_seed):
    """Each autograd caller in _ops, called directly with a dual input, gives the loss a
    tangent (the no-grad shortcut must not drop it) and the other outputs none."""
    fn = getattr(xent_ext._ops, caller, None)
    if fn is None:
        pytest.skip(f"no caller {caller} in this build")
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    v = torch.randn_like(x)
    if caller.endswith("index_loss"):
        target = torch.randint(4, (3, 2))
    else:
        target = torch.softmax(torch.randn(3, 4, 2, dtype=torch.float64), 1)
    with fwAD.dual_level():
        a = fwAD.make_dual(x.clone().requires_grad_(requires_grad), v)
        tangents = [fwAD.unpack_dual(o).tangent for o in fn(*_caller_args(caller, a, target, None, 1))]
    assert tangents[0] is not None, f"{caller}: no tangent for the loss"
    assert all(t is None for t in tangents[1:]), f"{caller}: a tangent for a non-differentiable output"
    _, want = dual_tangent(lambda a: F.cross_entropy(a, target, label_smoothing=0.25), [x], [v])
    assert_close(tangents[0], want, torch.float64, ctx_of(fresh_seed, caller=caller), "tangent")


def test_reverse_path_unchanged_outside_forward_ad(fresh_seed):
    """Outside forward AD and transforms the loss is recorded by the reverse-only Function
    (Note [Transforms and forward-mode AD]); inside a dual level, by the transform one."""
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.randint(5, (4,))

    def recorded(loss):
        return type(loss.grad_fn).__name__

    assert not recorded(ours(x, y)).endswith("_transformableBackward")
    with fwAD.dual_level():
        assert recorded(ours(x, y)).endswith("_transformableBackward")


# ----------------------------------------------------------------------------------
# vmap
# ----------------------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    """Counts the xent_ext forward operators that run."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "xent_ext" and "forward" in func.__name__:
            self.calls += 1
        return func(*args, **(kwargs or {}))


# (input's batch dim, target's batch dim, weight's batch dim); the input's dim is where
# the vmapped dimension sits in the tensor handed to vmap.
IN_DIMS = {
    "input": (0, None, None),
    "input_and_target": (0, 0, None),
    "target": (None, 0, None),
    "input_dim1_and_target": (1, 0, None),
    "per_sample_weight": (0, 0, 0),
}


def _batched(t, batch, bdim, fill):
    """A batch of `batch` tensors like `t`, stacked at `bdim` (None: `t` itself)."""
    if bdim is None:
        return t, [t] * batch
    samples = [t] + [fill(t) for _ in range(batch - 1)]
    return torch.stack(samples, dim=bdim), samples


@pytest.mark.parametrize(
    "in_dims,option",
    [(d, o) for d in IN_DIMS for o in OPTIONS if d != "per_sample_weight" or "weight" in o],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_vmap(dtype, kind, in_dims, reduction, option, device, rng, fresh_seed):
    """vmap over logits/targets/weights equals torch's loss per sample; the op runs once
    for the whole batch unless the weights differ per sample."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, option, device, expanded=True)
    ctx = ctx_of(fresh_seed, reduction=reduction, in_dims=in_dims, **desc)
    batch = rng.randint(1, 4)
    xd, td, wd = IN_DIMS[in_dims]
    C = x.shape[0 if x.dim() == 1 else 1]
    xb, xs = _batched(x, batch, xd, torch.randn_like)
    if kind == "index":
        tb, ts = _batched(target, batch, td,
                          lambda t: make_index_target(shape, torch.int64, kw["ignore_index"], 0.3, device))
    else:
        tb, ts = _batched(target, batch, td, lambda t: make_prob_target(shape, dtype, "randn", device))
    weight = kw.pop("weight", None)
    wb, ws = (_batched(weight, batch, wd, lambda w: random_weight(C, dtype, device)) if weight is not None
              else (None, [None] * batch))

    def f(a, t, w):
        return ours(a, t, weight=w, reduction=reduction, **kw)

    counter = CountOps()
    with counter:
        got = vmap(f, in_dims=(xd, td, wd))(xb, tb, wb)
    want = torch.stack([F.cross_entropy(a, t, weight=w, reduction=reduction, **kw) for a, t, w in zip(xs, ts, ws)])
    assert_close(got, want, dtype, ctx, "vmapped loss")
    assert counter.calls == (batch if wd is not None else 1), f"{counter.calls} op calls {ctx}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_vmap_bf16(kind, reduction, rng, fresh_seed):
    """bf16 under vmap: per sample, torch's loss evaluated in fp64 on the same values."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, torch.bfloat16, rng.choice(OPTIONS))
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    xb = torch.stack([x, torch.randn_like(x)])
    got = vmap(lambda a: ours(a, target, reduction=reduction, **kw))(xb)
    want = torch.stack([F.cross_entropy(up(a, torch.bfloat16), up(target, torch.bfloat16), reduction=reduction,
                                        **kw_up(kw, torch.bfloat16)) for a in xb])
    assert got.dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16, ctx, "vmapped bf16 loss")


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_nested_vmap_and_jvp_of_vmap(kind, rng, fresh_seed):
    """vmap of vmap folds twice; jvp of a vmapped loss differentiates the folded call."""
    shape = draw_shape(rng, rng.choice(["NC", "NCd"]))
    x, target, kw, desc = draw_case(rng, kind, shape, torch.float64, rng.choice(OPTIONS))
    ctx = ctx_of(fresh_seed, **desc)
    xb = torch.randn(2, 3, *x.shape, dtype=torch.float64)
    got = vmap(vmap(lambda a: ours(a, target, reduction="sum", **kw)))(xb)
    want = vmap(vmap(lambda a: F.cross_entropy(a, target, reduction="sum", **kw)))(xb)
    assert_close(got, want, torch.float64, ctx, "vmap(vmap)")
    v = torch.randn_like(xb[0])
    got = jvp(vmap(lambda a: ours(a, target, **kw)), (xb[0],), (v,))
    want = jvp(vmap(lambda a: F.cross_entropy(a, target, **kw)), (xb[0],), (v,))
    assert_close(got[1], want[1], torch.float64, ctx, "jvp(vmap)")


# ----------------------------------------------------------------------------------
# jacobians, hessians, per-sample gradients
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_jacobians_and_hessian(dtype, kind, reduction, option, device, rng, fresh_seed):
    """jacfwd, jacrev (w.r.t. the logits; for probability targets also the target) and
    hessian (of the summed loss) equal torch's."""
    shape = draw_shape(rng, rng.choice(["C", "NC", "NCd"]))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, option, device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    argnums = (0, 1) if kind == "prob" else 0

    def make(fn):
        return lambda a, t: fn(a, t, reduction=reduction, **kw)

    for name, transform in (("jacfwd", jacfwd), ("jacrev", jacrev)):
        got = transform(make(ours), argnums=argnums)(x, target)
        want = transform(make(F.cross_entropy), argnums=argnums)(x, target)
        for g, w in zip(got if kind == "prob" else (got,), want if kind == "prob" else (want,)):
            assert_close(g, w, dtype, ctx, name)

    def summed(fn):
        return lambda a, t: fn(a, t, reduction=reduction, **kw).sum()

    got = hessian(summed(ours), argnums=argnums)(x, target)
    want = hessian(summed(F.cross_entropy), argnums=argnums)(x, target)
    flat_got = [h for row in got for h in row] if kind == "prob" else [got]
    flat_want = [h for row in want for h in row] if kind == "prob" else [want]
    for g, w in zip(flat_got, flat_want):
        assert_close(g, w, dtype, ctx, "hessian")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_per_sample_gradients(dtype, kind, reduction, device, rng, fresh_seed):
    """vmap(grad(loss)): per-sample gradients equal torch's autograd, one sample at a time."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, rng.choice(OPTIONS), device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    batch = rng.randint(1, 4)
    xb = torch.stack([x] + [torch.randn_like(x) for _ in range(batch - 1)])
    if kind == "index":
        tb = torch.stack([target] + [make_index_target(shape, torch.int64, kw["ignore_index"], 0.3, device)
                                     for _ in range(batch - 1)])
    else:
        tb = torch.stack([target] + [make_prob_target(shape, dtype, device=device) for _ in range(batch - 1)])
    argnums = (0, 1) if kind == "prob" else 0

    def loss(fn):
        return lambda a, t: fn(a, t, reduction=reduction, **kw)

    got = vmap(grad(loss(ours), argnums=argnums))(xb, tb)
    got = got if kind == "prob" else (got,)
    for b in range(batch):
        a = xb[b].clone().requires_grad_()
        t = tb[b].clone().requires_grad_() if kind == "prob" else tb[b]
        want = torch.autograd.grad(F.cross_entropy(a, t, reduction=reduction, **kw), [a, t] if kind == "prob" else [a])
        for g, w in zip(got, want):
            assert_close(g[b], w, dtype, ctx + f" sample={b}", "per-sample gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_name)
def test_vmap_then_backward(dtype, kind, reduction, device, rng, fresh_seed):
    """A vmapped loss of logits that require grad, differentiated by ordinary autograd
    (the folded call is recorded, for 'mean'/'sum' with its gradient from the forward):
    the logits' gradient equals torch's, sample by sample."""
    shape = draw_shape(rng, rng.choice(SHAPE_KINDS))
    x, target, kw, desc = draw_case(rng, kind, shape, dtype, rng.choice(OPTIONS), device)
    ctx = ctx_of(fresh_seed, reduction=reduction, **desc)
    batch = rng.randint(1, 4)
    xb = torch.stack([x] + [torch.randn_like(x) for _ in range(batch - 1)]).requires_grad_()
    loss = vmap(lambda a: ours(a, target, reduction=reduction, **kw))(xb)
    g = torch.randn(loss.shape, dtype=torch.float64).to(device=device, dtype=loss.dtype)
    loss.backward(g)
    for b in range(batch):
        a = xb[b].detach().clone().requires_grad_()
        want_loss = F.cross_entropy(a, target, reduction=reduction, **kw)
        want_loss.backward(g[b])
        assert_close(loss[b], want_loss, dtype, ctx + f" sample={b}", "loss")
        assert_close(xb.grad[b], a.grad, dtype, ctx + f" sample={b}", "gradient")


def _caller_args(caller, x, target, weight, reduction):
    if caller.endswith("index_loss"):
        return (x, target, weight, -100, 0.25, reduction)
    if caller == "prob_loss":
        return (x, target, weight, 0.25, reduction)
    return (x, target, weight, 0.25, reduction, True, True)  # the gradients of the probability loss


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("caller", sorted(xent_ext._functorch.CALLERS))
def test_vmap_of_each_caller(caller, reduction, device, rng, fresh_seed):
    """Every output of every caller in _ops under vmap (loss, row statistics, the
    'mean' denominator, gradients computed in the forward) equals the caller's outputs
    sample by sample: the re-batching table is right for each op."""
    fn = getattr(xent_ext._ops, caller, None)
    if fn is None:
        pytest.skip(f"no caller {caller} in this build")
    B, N, C, K = rng.randint(1, 3), rng.randint(1, 4), rng.choice([3, 5]), rng.randint(1, 3)
    x = torch.randn(B, N, C, K, dtype=torch.float64).to(device)
    if caller.endswith("index_loss"):
        target = torch.randint(C, (B, N, K)).to(device)
        target[:, 0, 0] = torch.where(torch.rand(B, device=device) < 0.5, -100, target[:, 0, 0])
    else:
        target = torch.softmax(torch.randn(B, N, C, K, dtype=torch.float64), 2).to(device)
    weight = random_weight(C, torch.float64, device) if rng.random() < 0.5 else None
    ctx = ctx_of(fresh_seed, caller=caller, reduction=reduction, shape=(B, N, C, K), weighted=weight is not None)
    got = vmap(lambda a, t: fn(*_caller_args(caller, a, t, weight, reduction)))(x, target)
    per_sample = [fn(*_caller_args(caller, x[b], target[b], weight, reduction)) for b in range(B)]
    assert len(got) == len(per_sample[0]) == len(xent_ext._functorch.CALLERS[caller].outputs), ctx
    for i, (g, outs) in enumerate(zip(got, zip(*per_sample))):
        assert_close(g, torch.stack(outs), torch.float64, ctx, f"output {i}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_autocast(kind, reduction, rng, fresh_seed):
    """Under CPU autocast (bf16) the loss is fp32, and so is its tangent: jvp equals
    torch's; vmap equals torch's autocast loss sample by sample. (torch's own vmap of
    cross_entropy under autocast returns the bf16 loss of the uncast op: the per-sample
    result is the one a drop-in keeps.)"""
    shape = draw_shape(rng, rng.choice(["NC", "NCd"]))
    x, target, kw, desc = draw_case(rng, kind, shape, torch.bfloat16, rng.choice(OPTIONS))
    ctx = ctx_of(fresh_seed, reduction=reduction, autocast="cpu-bf16", **desc)
    v = torch.randn_like(x)
    xb = torch.stack([x, v])
    with torch.autocast("cpu", torch.bfloat16):
        got = jvp(lambda a: ours(a, target, reduction=reduction, **kw), (x,), (v,))
        want = jvp(lambda a: F.cross_entropy(a, target, reduction=reduction, **kw), (x,), (v,))
        got_vmap = vmap(lambda a: ours(a, target, reduction=reduction, **kw))(xb)
        want_vmap = torch.stack([F.cross_entropy(a, target, reduction=reduction, **kw) for a in xb])
    for what, g, w in (("loss", got[0], want[0]), ("tangent", got[1], want[1]), ("vmapped loss", got_vmap, want_vmap)):
        assert g.dtype == w.dtype == torch.float32, f"{what}: {g.dtype} {w.dtype} {ctx}"
        assert_close(g, w, torch.float32, ctx, what)
