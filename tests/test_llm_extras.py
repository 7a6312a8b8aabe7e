"""The LLM extras of xent_ext.cross_entropy (logit_scale, softcap, z_loss, return_aux) against
their definition, evaluated in float64 with torch's own ops:

    z    = input * logit_scale
    z    = softcap * tanh(z / softcap)                  (softcap on)
    lse  = logsumexp(z, class_dim)
    keep = target != ignore_index                       (every element for probability targets)
    loss = F.cross_entropy(z, target, ...) + reduce(z_loss * lse**2 * keep)

'mean' divides the z-loss by keep.sum(), not by the class weights. Values, gradients to the
input and to probability targets, the aux result, argument errors, the module, and the
configurations the kernels hand over to torch. inplace_backward: test_inplace_backward.py;
compile, autocast, double backward and the function transforms: test_llm_transforms.py.
"""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import DTYPES, REDUCTIONS, assert_bitwise_equal, dtype_name, restride

# name -> the extras' keyword arguments
EXTRAS = {
    "scale": dict(logit_scale=0.6),
    "softcap": dict(softcap=2.5),
    "z_loss": dict(z_loss=0.05),
    "scale+softcap": dict(logit_scale=1.3, softcap=3.0),
    "scale+z_loss": dict(logit_scale=0.7, z_loss=0.02),
    "softcap+z_loss": dict(softcap=5.0, z_loss=0.03),
    "all": dict(logit_scale=-1.7, softcap=4.0, z_loss=1e-2),
}

# Relative to the largest magnitude of the compared tensor: a few roundings of the
# dtype (the loss and the gradient are stored in it), the accumulation in fp32.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def definition(x, target, weight=None, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
               logit_scale=1.0, softcap=None, z_loss=0.0):
    """(loss, lse, z-loss term) by the definition above, with torch ops (differentiable).
    `keep` compares the class indices as integers, as the kernels do."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=0 if x.dim() == 1 else 1)
    if target.shape != x.shape:
        keep = target.long() != ignore_index
    else:
        keep = torch.ones_like(lse, dtype=torch.bool)
    rows = torch.where(keep.reshape(lse.shape), z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        zl = rows
    elif reduction == "sum":
        zl = rows.sum()
    else:
        zl = rows.sum() / keep.sum()
    return ce + zl, lse, zl


def reference(x, target, weight, grad_out, wrt_target, **kw):
    """The definition in float64 on the CPU: (loss, lse, zl, grad_input, grad_target)."""
    x64 = x.detach().double().cpu().requires_grad_()
    index = target.shape != x.shape
    t64 = target.detach().cpu() if index else target.detach().double().cpu().requires_grad_(wrt_target)
    w64 = None if weight is None else weight.detach().double().cpu()
    loss, lse, zl = definition(x64, t64, w64, **kw)
    leaves = [x64] + ([t64] if wrt_target else [])
    grads = torch.autograd.grad(loss, leaves, grad_out.detach().double().cpu())
    return loss.detach(), lse.detach(), zl.detach(), grads[0], (grads[1] if wrt_target else None)


def assert_close(name, got, ref, dtype, ctx, atol=0.0):
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{ctx}: {name} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    both_nan = torch.isnan(got) & torch.isnan(ref)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{ctx}: {name}: non-finite pattern differs"
    fin = torch.isfinite(ref)
    if not fin.any():
        assert torch.equal(both_nan | (got == ref), torch.ones_like(fin)), f"{ctx}: {name} {got} != {ref}"
        return
    scale = ref[fin].abs().max().item()
    # An absolute floor of two of the dtype's smallest subnormals: tiny gradients (fp16 ones
    # of about 1e-5 are subnormal) are stored on that grid, however exact the math.
    finfo = torch.finfo(dtype)
    tol = max(TOL[dtype] * max(scale, 1e-30), atol, 2 * finfo.tiny * finfo.eps)
    err = (got[fin] - ref[fin]).abs().max().item()
    assert err <= tol, f"{ctx}: {name} off by {err:.3g} (allowed {tol:.3g}, largest |ref| {scale:.3g})"


SHAPES = [(9,), (6, 9), (3, 9, 4), (2, 9, 3, 2)]


def make_case(rng, kind, dtype, device, weighted):
    """Random logits (a random layout), targets and weights, drawn on the CPU."""
    shape = rng.choice(SHAPES)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 3
    layout = rng.choice(["contiguous", "transposed", "sliced"]) if len(shape) > 1 else "contiguous"
    x = restride(x.to(device=device, dtype=dtype), layout)
    ignore_index = rng.choice([-100, 1])
    if kind == "index":
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        t = torch.randint(0, C, tshape)
        if t.dim() > 0:
            t = torch.where(torch.rand(tshape) < 0.25, torch.full_like(t, ignore_index), t)
        elif t.item() == ignore_index:
            # A single ignored target: a 'mean' of 0 / 0, which torch's CUDA kernel makes 0
            # (test_every_row_ignored_mean_is_nan has the nan).
            t = (t + 1) % C
        t = t.to(device)
    else:
        ignore_index = -100
        t = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, dim=0 if len(shape) == 1 else 1)
        t = t.to(device=device, dtype=dtype)
    w = (torch.rand(C, dtype=torch.float64) + 0.2).to(device=device, dtype=dtype) if weighted else None
    return x, t, w, ignore_index, f"shape={shape} layout={layout} ignore_index={ignore_index}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("extras", list(EXTRAS))
def test_against_definition(extras, kind, reduction, weighted, smoothing, dtype, device, rng, fresh_seed):
    x, t, w, ignore_index, case = make_case(rng, kind, dtype, device, weighted)
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing, **EXTRAS[extras])
    ctx = f"{extras} {kind} {reduction} weight={weighted} ls={smoothing} {dtype_name(dtype)} {case} seed={fresh_seed}"
    wrt_target = kind == "prob"
    xi = x.detach().requires_grad_()
    ti = t.detach().requires_grad_() if wrt_target else t
    loss, aux = xent_ext.cross_entropy(xi, ti, w, return_aux=True, **kw)
    grad_out = (torch.randn(loss.shape, dtype=torch.float64) + 0.5).to(device=device, dtype=loss.dtype)
    grads = torch.autograd.grad(loss, [xi] + ([ti] if wrt_target else []), grad_out)
    r_loss, r_lse, r_zl, r_gx, r_gt = reference(x, t, w, grad_out, wrt_target, **kw)

    assert loss.dtype == dtype and loss.device == x.device, ctx
    assert_close("loss", loss, r_loss, dtype, ctx)
    assert_close("grad[input]", grads[0], r_gx, dtype, ctx)
    assert grads[0].dtype == dtype, ctx
    if wrt_target:
        assert_close("grad[target]", grads[1], r_gt, dtype, ctx)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(aux, xent_ext.CrossEntropyAux), ctx
    for name, got, ref in (("aux.lse", aux.lse, r_lse), ("aux.z_loss", aux.z_loss, r_zl)):
        assert got.dtype == acc and got.device == x.device and not got.requires_grad, f"{ctx}: {name}"
        assert_close(name, got, ref, torch.float32 if acc == torch.float32 else acc, ctx)
    # Without return_aux: the same loss, bit for bit.
    plain = xent_ext.cross_entropy(x, t, w, **kw)
    assert_bitwise_equal(plain, loss.detach(), ctx)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_defaults_are_bit_identical(kind, reduction, device, rng, fresh_seed):
    """Every extra at its default, passed explicitly or not (and z_loss=0 with return_aux):
    the loss and gradient of the plain call, bit for bit."""
    x, t, w, ignore_index, case = make_case(rng, kind, torch.float32, device, weighted=True)
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=0.1)

    def run(**extra):
        xi = x.detach().requires_grad_()
        out = xent_ext.cross_entropy(xi, t, w, **kw, **extra)
        loss = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(loss, xi, torch.ones_like(loss))
        return loss.detach(), g

    base = run()
    for extra in (dict(logit_scale=1.0, softcap=None, z_loss=0.0, return_aux=False, inplace_backward=False),
                  dict(logit_scale=1, z_loss=0), dict(return_aux=True), dict(z_loss=0.0, return_aux=True)):
        got = run(**extra)
        assert_bitwise_equal(got[0], base[0], f"{extra} loss {case}")
        assert_bitwise_equal(got[1], base[1], f"{extra} grad {case}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_aux_gives_log_probabilities(reduction, device, fresh_seed):
    """aux.lse is the row's log-sum-exp of z, so z[target] - lse is its log-probability,
    for every row, ignored ones too; the 'none' loss minus the z-loss is -log p."""
    x = (torch.randn(5, 7, 3, dtype=torch.float64) * 4).to(device)
    t = torch.randint(7, (5, 3)).to(device)
    t[0, 1] = -100
    loss, aux = xent_ext.cross_entropy(x, t, reduction=reduction, softcap=3.0, z_loss=0.1, return_aux=True)
    z = 3.0 * torch.tanh(x / 3.0)
    log_p = torch.log_softmax(z, dim=1)
    safe = t.clamp(min=0)
    got = z.gather(1, safe.unsqueeze(1)).squeeze(1) - aux.lse
    assert aux.lse.shape == t.shape
    torch.testing.assert_close(got, log_p.gather(1, safe.unsqueeze(1)).squeeze(1), rtol=1e-12, atol=1e-12)
    if reduction == "none":
        keep = t != -100
        torch.testing.assert_close(loss - aux.z_loss, torch.where(keep, -got, torch.zeros_like(got)),
                                   rtol=1e-12, atol=1e-12)


def test_ignored_rows_stay_zero(device):
    """An ignored row contributes neither cross-entropy nor z-loss, even when its logits
    are not finite (torch selects, it does not multiply by 0)."""
    x = torch.randn(4, 6, dtype=torch.float64).to(device)
    x[2] = float("inf")
    t = torch.tensor([1, 2, -100, 0]).to(device)
    loss, aux = xent_ext.cross_entropy(x, t, reduction="none", z_loss=0.5, softcap=2.0, return_aux=True)
    assert loss[2].item() == 0.0 and aux.z_loss[2].item() == 0.0
    assert torch.isfinite(loss).all()
    mean = xent_ext.cross_entropy(x, t, z_loss=0.5, softcap=2.0)
    ref = definition(x.cpu(), t.cpu(), reduction="mean", softcap=2.0, z_loss=0.5)[0]
    torch.testing.assert_close(mean.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (5,)], ids=["NC", "C"])
def test_every_row_ignored_mean_is_nan(shape, device):
    # The definition's z-loss mean over no counted row is 0/0 = nan, also for a (C,) input
    # on CUDA, whose cross-entropy part torch gives as 0 there. The gradient is 0, as
    # torch's for an all-ignored 'mean' (the definition's literal 0/0 would make it nan):
    # no row counts, so no logit moves the loss (docs/semantics.md, the LLM extras).
    x = torch.randn(shape, dtype=torch.float64).to(device).requires_grad_()
    t = torch.full(shape[:1] if len(shape) > 1 else (), -100).to(device)
    loss, aux = xent_ext.cross_entropy(x, t, z_loss=0.1, softcap=3.0, return_aux=True)
    assert math.isnan(loss.item()) and math.isnan(aux.z_loss.item())
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros_like(g))
    (torch_g,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    assert torch.equal(torch_g, torch.zeros_like(g))
    assert xent_ext.cross_entropy(x, t, z_loss=0.1, reduction="sum").item() == 0.0


def test_fp32_softcap_tanh_accuracy(device):
    """The fp32 tanh of the softcap (Note [Fast tanh] on the CPU), alone: a row of one class
    has lse = z exactly, so aux.lse with softcap=1 is tanh(x) for every logit. Every 1024th
    float of [2^-30, 24] and its negative, within 2 eps of float64 (measured: 1.2); infinities
    give +-1 and nan stays nan."""
    eps = torch.finfo(torch.float32).eps
    lo, hi = (torch.tensor(v, dtype=torch.float32).view(torch.int32).item() for v in (2.0 ** -30, 24.0))
    x = torch.arange(lo, hi, 1024, dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, -x, torch.tensor([0.625, -0.625, 20.0, 1e30, -1e30])])
    specials = torch.tensor([float("inf"), -float("inf"), float("nan")])

    def tanh(v):
        v = v.to(device)
        t = torch.zeros(v.numel(), dtype=torch.long, device=device)
        return xent_ext.cross_entropy(v.view(-1, 1), t, softcap=1.0, reduction="none", return_aux=True)[1].lse.cpu()

    ref = torch.tanh(x.double())
    rel = (tanh(x).double() - ref).abs() / ref.abs()
    assert rel.max().item() <= 2 * eps, (
        f"tanh off by {rel.max().item() / eps:.2f} eps at x = {x[rel.argmax()].item()!r}")
    got = tanh(specials)
    assert got[:2].tolist() == [1.0, -1.0] and math.isnan(got[2].item()), got


def test_softcap_bounds_huge_logits(device):
    """Logits far beyond any exp range: the capped loss is finite and the definition's."""
    x = (torch.randn(6, 11, dtype=torch.float64) * 1e5).to(device=device, dtype=torch.float32)
    t = torch.randint(11, (6,)).to(device)
    xi = x.detach().requires_grad_()
    loss = xent_ext.cross_entropy(xi, t, softcap=30.0, z_loss=1e-4)
    loss.backward()
    r_loss, _, _, r_gx, _ = reference(x, t, None, torch.ones(()), False, softcap=30.0, z_loss=1e-4)
    assert torch.isfinite(loss) and torch.isfinite(xi.grad).all()
    assert_close("loss", loss, r_loss, torch.float32, "softcap 30, logits ~1e5")
    # Saturated: dz/dx = 1 - tanh^2 is 0 in fp32 (~1e-13 in fp64), so the gradient is ~0;
    # allowed an fp32 rounding of the gradient with respect to z (at most 1 / N).
    assert_close("grad", xi.grad, r_gx, torch.float32, "softcap 30, logits ~1e5", atol=1e-7)


# ---------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(z_loss=float("inf")), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(return_aux=1), TypeError, "return_aux"),
    (dict(return_aux="yes"), TypeError, "return_aux"),
    (dict(inplace_backward=None), TypeError, "inplace_backward"),
    (dict(logit_scale="2"), TypeError, "logit_scale"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(z_loss=torch.tensor(0.1)), TypeError, "z_loss"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_invalid_extras(kwargs, error, words):
    x, t = torch.randn(3, 4), torch.randint(4, (3,))
    with pytest.raises(error, match=words):
        xent_ext.cross_entropy(x, t, **kwargs)
    with pytest.raises(error, match=words):
        xent_ext.CrossEntropyLoss(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(softcap=-1.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=float("nan")), "logit_scale"),
    (dict(z_loss=-1e-4), "z_loss"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_invalid_extras_at_the_ops(kwargs, words):
    # The ops repeat the value checks for callers that skip the front end.
    x, t = torch.randn(3, 4, 1), torch.randint(4, (3, 1))
    extras = dict(logit_scale=1.0, softcap=None, z_loss=0.0)
    extras.update(kwargs)
    args = (extras["logit_scale"], extras["softcap"], extras["z_loss"])
    with pytest.raises(ValueError, match=words):
        torch.ops.xent_ext.cross_entropy_index_forward(x, t, None, -100, 0.0, 1, None, *args)
    with pytest.raises(ValueError, match=words):
        torch.ops.xent_ext.cross_entropy_prob_forward(x, torch.softmax(x, 1), None, 0.0, 1, None, *args)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_invalid_extras_under_compile(fullgraph):
    # A value known only as a symbolic float (the second value of an argument recompiles
    # it as one): the ValueError still comes, or with fullgraph=True dynamo's report of
    # the ValueError it observed, with the message (not a failure to format it).
    torch._dynamo.reset()
    x, t = torch.randn(3, 4), torch.randint(4, (3,))
    f = torch.compile(lambda x, t, s: xent_ext.cross_entropy(x, t, softcap=s), fullgraph=fullgraph,
                      backend="aot_eager")
    f(x, t, 2.0)
    f(x, t, 3.0)
    words = "softcap must be None \\(off\\) or a finite number > 0"
    if fullgraph:  # not the source line dynamo quotes, but the exception it observed
        words = "raised exception ValueError\\('xent_ext.cross_entropy: " + words
    with pytest.raises(ValueError if not fullgraph else Exception, match=words):
        f(x, t, -1.0)


def test_extras_are_keyword_only():
    x, t = torch.randn(3, 4), torch.randint(4, (3,))
    with pytest.raises(TypeError):
        xent_ext.cross_entropy(x, t, None, None, -100, None, "mean", 0.0, 2.0)


# ---------------------------------------------------------------------------
# the module


def test_module(device, fresh_seed):
    x = torch.randn(5, 8, dtype=torch.float64).to(device)
    t = torch.randint(8, (5,)).to(device)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).to(device)
    kw = dict(logit_scale=0.5, softcap=6.0, z_loss=1e-3)
    m = xent_ext.CrossEntropyLoss(w, reduction="sum", label_smoothing=0.1, **kw)
    assert isinstance(m, torch.nn.CrossEntropyLoss)
    assert (m.logit_scale, m.softcap, m.z_loss, m.return_aux, m.inplace_backward) == (0.5, 6.0, 1e-3, False, False)
    assert "softcap=6.0" in repr(m) and "z_loss=0.001" in repr(m) and "return_aux" not in repr(m)
    assert repr(xent_ext.CrossEntropyLoss()) == "CrossEntropyLoss()"
    assert list(m.state_dict()) == list(torch.nn.CrossEntropyLoss(w).state_dict())
    want = xent_ext.cross_entropy(x, t, w, reduction="sum", label_smoothing=0.1, **kw)
    assert_bitwise_equal(m(x, t), want, "module")
    loss, aux = xent_ext.CrossEntropyLoss(return_aux=True, z_loss=0.1)(x, t)
    want, want_aux = xent_ext.cross_entropy(x, t, return_aux=True, z_loss=0.1)
    assert_bitwise_equal(loss, want, "module return_aux")
    assert_bitwise_equal(aux.lse, want_aux.lse, "module aux")
    # Attributes set after construction take effect, as torch's own do; pickles keep them,
    # and a module pickled before the extras existed gets their defaults.
    m = xent_ext.CrossEntropyLoss()
    m.softcap = 2.0
    assert_bitwise_equal(m(x, t), xent_ext.cross_entropy(x, t, softcap=2.0), "softcap set later")
    assert_bitwise_equal(pickle.loads(pickle.dumps(m))(x, t), m(x, t), "pickled")
    state = {k: v for k, v in m.__dict__.items() if k not in ("logit_scale", "softcap", "z_loss", "return_aux",
                                                             "inplace_backward", "_plain")}
    old = xent_ext.CrossEntropyLoss.__new__(xent_ext.CrossEntropyLoss)
    old.__setstate__(state)
    assert_bitwise_equal(old(x, t), xent_ext.cross_entropy(x, t), "old pickle")


def test_exported():
    assert "CrossEntropyAux" in xent_ext.__all__
    assert xent_ext.CrossEntropyAux._fields == ("lse", "z_loss")


# ---------------------------------------------------------------------------
# Configurations handed over to torch: with extras, the definition composed of torch ops.


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_learned_weights_with_probability_targets(reduction, device, fresh_seed):
    """Class weights that require grad (probability targets): the definition, gradients to
    the weights too."""
    kw = dict(reduction=reduction, label_smoothing=0.1, logit_scale=1.3, softcap=3.0, z_loss=0.02)
    x = torch.randn(4, 6, 2, dtype=torch.float64).to(device).requires_grad_()
    q = torch.softmax(torch.randn(4, 6, 2, dtype=torch.float64), 1).to(device).requires_grad_()
    w = (torch.rand(6, dtype=torch.float64) + 0.2).to(device).requires_grad_()
    loss, aux = xent_ext.cross_entropy(x, q, w, return_aux=True, **kw)
    g = torch.randn(loss.shape, dtype=torch.float64).to(device)
    got = torch.autograd.grad(loss, (x, q, w), g)
    leaves = [t.detach().cpu().requires_grad_() for t in (x, q, w)]
    r_loss, r_lse, r_zl = definition(*leaves, **kw)
    want = torch.autograd.grad(r_loss, leaves, g.cpu())
    torch.testing.assert_close(loss.detach().cpu(), r_loss.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux.lse.cpu(), r_lse.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux.z_loss.cpu(), r_zl.detach(), rtol=1e-12, atol=1e-12)


def test_uint8_targets_with_smoothing_where_torch_masks_a_class(fresh_seed):
    """uint8 targets that hold ignore_index's low byte (156 for -100) as a class, with
    smoothing: torch's own byte-wise mask decides the cross-entropy part (handed over), and
    the z-loss counts the row (the targets compared as integers)."""
    C = 160
    x = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([156, 3, 156, 100, 7], dtype=torch.uint8)
    kw = dict(label_smoothing=0.2, softcap=5.0, z_loss=0.05)
    for reduction in REDUCTIONS:
        loss = xent_ext.cross_entropy(x, t, reduction=reduction, **kw)
        z = 5.0 * torch.tanh(x / 5.0)
        ce = F.cross_entropy(z, t, reduction=reduction, label_smoothing=0.2)
        rows = 0.05 * torch.logsumexp(z, 1) ** 2
        want = ce + (rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean())
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0],
                                   rtol=1e-12, atol=1e-12)


def test_sparse_probability_target(fresh_seed):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    kw = dict(logit_scale=2.0, z_loss=0.1)
    loss = xent_ext.cross_entropy(x, q.to_sparse(), **kw)
    torch.testing.assert_close(loss, definition(x, q, **kw)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: (torch.tensor(1.5), torch.tensor(0)),                     # 0-d logits
    lambda: (torch.randint(5, (3, 5)), torch.randint(5, (3,))),       # integer logits
    lambda: (torch.randn(3, 5, dtype=torch.complex64), torch.randint(5, (3,))),
], ids=["0-d", "int64", "complex64"])
def test_torch_errors_kept(make):
    """Inputs torch rejects: its exception, with the extras as without."""
    x, t = make()
    with pytest.raises(Exception) as plain:
        F.cross_entropy(x, t)
    with pytest.raises(type(plain.value)) as ours:
        xent_ext.cross_entropy(x, t, softcap=2.0, z_loss=1e-3)
    assert str(ours.value) == str(plain.value)


def test_torch_function_subclass_receives_extras():
    """__torch_function__ handlers get the extras as keyword arguments (only when set)."""
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is xent_ext.cross_entropy:
                seen.append(sorted(k for k in (kwargs or {}) if k in ("softcap", "z_loss", "return_aux")))
            return super().__torch_function__(func, types, args, kwargs)

    x = torch.randn(3, 4).as_subclass(Logged)
    t = torch.randint(4, (3,))
    xent_ext.cross_entropy(x, t)
    xent_ext.cross_entropy(x, t, softcap=2.0)
    assert seen == [[], ["return_aux", "softcap", "z_loss"]]
