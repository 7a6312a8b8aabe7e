"""The LLM extras under torch's transforms: torch.compile (every extra, inplace_backward
included), autocast, double backward (gradcheck / gradgradcheck in float64), forward-mode
AD and torch.func (jvp, vmap, grad, per-sample gradients), TorchScript, and
xent_ext.patch(). Each compares with eager xent_ext or with the float64 definition
(test_llm_extras.definition).
"""

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import xent_ext
from helpers import REDUCTIONS, assert_bitwise_equal, is_cuda
from test_inplace_backward import INPLACE_ERROR, _peak_bytes
from test_llm_extras import definition

# torch.jit.script is deprecated in favour of torch.compile; its warnings say nothing here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

ALL = dict(logit_scale=1.4, softcap=3.0, z_loss=0.03)


def _index_target(shape, C, device, ignore_index=-100):
    t = torch.randint(0, C, shape)
    t.view(-1)[1:][torch.rand(t.numel() - 1) < 0.3] = ignore_index  # the first is never ignored
    return t.to(device)


def _prob_target(shape, dtype, device):
    return torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, 1).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# torch.compile


def _head_loss(inplace):
    def f(h, W, t, q, w):
        logits = h @ W.t()
        li, aux_i = xent_ext.cross_entropy(logits, t, w, label_smoothing=0.1, return_aux=True,
                                           inplace_backward=inplace, **ALL)
        logits = h @ W.t()
        lp, aux_p = xent_ext.cross_entropy(logits, q, reduction="sum", return_aux=True,
                                           inplace_backward=inplace, **ALL)
        return li + lp, aux_i.lse, aux_i.z_loss, aux_p.z_loss
    return f


def _check_compiled(f, backend, device, dtype=torch.float32):
    torch._dynamo.reset()
    N, C, H = 6, 13, 5
    h = torch.randn(N, H, dtype=dtype, device=device, requires_grad=True)
    W = torch.randn(C, H, dtype=dtype, device=device, requires_grad=True)
    t = _index_target((N,), C, device)
    q = _prob_target((N, C), dtype, device).requires_grad_()
    w = (torch.rand(C, dtype=dtype, device=device) + 0.5)
    eager = f(h, W, t, q, w)
    e_grads = torch.autograd.grad(eager[0], (h, W, q))
    compiled = torch.compile(f, fullgraph=True, backend=backend)(h, W, t, q, w)
    c_grads = torch.autograd.grad(compiled[0], (h, W, q))
    for a, b in zip(compiled + c_grads, eager + e_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    r_loss = definition(h.double() @ W.double().t(), t, w.double(), label_smoothing=0.1, **ALL)[0] + definition(
        h.double() @ W.double().t(), q.double(), reduction="sum", **ALL)[0]
    torch.testing.assert_close(compiled[0].double(), r_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace_backward"])
def test_compile_fullgraph_every_extra(inplace, device, fresh_seed):
    _check_compiled(_head_loss(inplace), "aot_eager", device)


@pytest.mark.slow
def test_compile_inductor_inplace_backward(device, fresh_seed):
    """inductor, fullgraph, inplace_backward with every extra: the eager gradients, and a
    peak of about one logits-sized buffer for the step (inductor writes the gradient into
    the logits' buffer; without inplace_backward the step holds two)."""
    if is_cuda(device):
        from torch.utils._triton import has_triton

        if not has_triton():
            pytest.skip("inductor on CUDA needs triton")
    torch._dynamo.reset()
    N, C, H = 64, 4096, 2
    h = torch.randn(N, H, device=device, requires_grad=True)
    W = torch.randn(C, H, device=device, requires_grad=True)
    t = _index_target((N,), C, device)

    def step(h, W, t, inplace):
        return xent_ext.cross_entropy(h @ W.t(), t, inplace_backward=inplace, **ALL)

    want = torch.autograd.grad(step(h, W, t, False), (h, W))
    compiled = torch.compile(functools.partial(step, inplace=True), fullgraph=True, backend="inductor")
    got = torch.autograd.grad(compiled(h, W, t), (h, W))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    peak = _peak_bytes(lambda: compiled(h, W, t).backward(), device)
    assert peak < 1.5 * N * C * 4, f"peak {peak} bytes, logits {N * C * 4}"


def test_compile_extras_as_changing_arguments(device, fresh_seed):
    """Extras passed as arguments that change between calls: dynamo recompiles them as
    symbolic floats, which the front end's checks must trace (Note [Extras under
    torch.compile])."""
    torch._dynamo.reset()
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    t = _index_target((5,), 7, device)

    def f(x, t, softcap, z_loss, logit_scale):
        loss, aux = xent_ext.cross_entropy(x, t, softcap=softcap, z_loss=z_loss, logit_scale=logit_scale,
                                           return_aux=True)
        return loss, aux.z_loss

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for args in ((2.0, 0.1, 1.5), (3.0, 0.2, 0.5), (4.5, 0.05, -2.0)):
        got, want = cf(x, t, *args), f(x, t, *args)
        for a, b in zip(got + torch.autograd.grad(got[0], x), want + torch.autograd.grad(want[0], x)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_compile_inplace_backward_writes_a_graph_input(device):
    """Logits passed into the compiled function: the gradient is written back into them,
    as in eager mode (functionalization's write-back, no mark_dirty), and the gradients
    reach their producer."""
    torch._dynamo.reset()
    h = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = _index_target((5,), 7, device)

    def f(logits, t):
        return xent_ext.cross_entropy(logits, t, inplace_backward=True, **ALL)

    want = torch.autograd.grad(xent_ext.cross_entropy(h @ W.t(), t, **ALL), (h, W))
    logits = h @ W.t()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, t)
    x = (h @ W.t()).detach().requires_grad_()
    (unit,) = torch.autograd.grad(xent_ext.cross_entropy(x, t, **ALL), x)
    torch.testing.assert_close(logits.detach(), unit, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(loss, (h, W)), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("producer", ["tanh", "softmax", "pow_regularizer"])
def test_compile_saved_logits_raise_torchs_error(producer, device):
    """A node of the compiled graph that saved the logits (tanh and softmax keep their
    output, pow its input): compiling the graph fails with torch's in-place error, as it
    does for torch's own in-place ops on a saved tensor, instead of giving that node the
    gradient in place of its logits (Note [Gradient written into the logits])."""
    torch._dynamo.reset()
    h = torch.randn(4, 5, device=device, requires_grad=True)
    W = torch.randn(9, 5, device=device, requires_grad=True)
    t = _index_target((4,), 9, device)

    def step(h, W, t):
        logits = h @ W.t()
        extra = 0
        if producer == "tanh":
            logits = torch.tanh(logits)
        elif producer == "softmax":
            logits = torch.softmax(logits, dim=1)
        else:
            extra = (logits ** 2).mean()
        return xent_ext.cross_entropy(logits, t, inplace_backward=True, **ALL) + extra

    with pytest.raises(Exception, match=INPLACE_ERROR):
        torch.compile(step, fullgraph=True, backend="aot_eager")(h, W, t).backward()


def test_compile_refuses_a_leaf(device):
    torch._dynamo.reset()
    x = torch.randn(4, 6, device=device, requires_grad=True)
    f = torch.compile(lambda x, t: xent_ext.cross_entropy(x, t, inplace_backward=True), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(Exception, match="leaf tensor that requires grad"):
        f(x, torch.randint(6, (4,), device=device))


# ---------------------------------------------------------------------------
# autocast


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace_backward"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_autocast(kind, inplace, device, fresh_seed):
    """bf16 logits under autocast: an fp32 loss and aux, the logits' gradient in bf16, the
    definition's numbers (on the bf16 values)."""
    dev = torch.device(device).type
    h = torch.randn(6, 5, dtype=torch.float64, device=device).to(torch.bfloat16).requires_grad_()
    W = torch.randn(11, 5, dtype=torch.float64, device=device).to(torch.bfloat16).requires_grad_()
    target = _index_target((6,), 11, device) if kind == "index" else _prob_target((6, 11), torch.bfloat16, device)
    with torch.autocast(dev, dtype=torch.bfloat16):
        logits = h @ W.t()
        assert logits.dtype == torch.bfloat16
        loss, aux = xent_ext.cross_entropy(logits, target, reduction="none", return_aux=True,
                                           inplace_backward=inplace, **ALL)
    assert loss.dtype == torch.float32 and aux.lse.dtype == torch.float32
    g = torch.rand(loss.shape, device=device) + 0.5
    gh, gW = torch.autograd.grad(loss, (h, W), g)
    assert gh.dtype == torch.bfloat16
    x64 = (h @ W.t()).detach().double().requires_grad_()
    r_loss = definition(x64, target.double() if kind == "prob" else target, reduction="none", **ALL)[0]
    (r_gx,) = torch.autograd.grad(r_loss, x64, g.double())
    torch.testing.assert_close(loss.double(), r_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), r_gx @ W.double(), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------
# double backward: gradcheck and gradgradcheck in float64 (the composite formulas)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_gradgradcheck(kind, reduction, device, fresh_seed):
    C = 4
    x = (torch.randn(2, C, 2, dtype=torch.float64) * 2).to(device).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64) + 0.3).to(device)
    if kind == "index":
        t = torch.tensor([[0, 3], [-100, 2]], device=device)
        inputs = (x,)

        def f(x):
            return xent_ext.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.2, **ALL)
    else:
        q = _prob_target((2, C, 2), torch.float64, device).requires_grad_()
        inputs = (x, q)

        def f(x, q):
            return xent_ext.cross_entropy(x, q, w, reduction=reduction, label_smoothing=0.2, **ALL)
    # The first-order gradient with create_graph (the composite formulas, Note [Double
    # backward]) is the definition's: gradgradcheck alone would accept a wrong formula
    # that it differentiates consistently.
    loss = f(*inputs)
    g = torch.rand(loss.shape, dtype=torch.float64, device=device) + 0.5
    got = torch.autograd.grad(loss, inputs, g, create_graph=True)
    leaves = [t.detach().requires_grad_() for t in inputs]
    want_loss = definition(leaves[0], leaves[1] if kind == "prob" else t, w, reduction=reduction,
                           label_smoothing=0.2, **ALL)[0]
    want = torch.autograd.grad(want_loss, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# ---------------------------------------------------------------------------
# forward-mode AD and torch.func


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_jvp_and_forward_ad(kind, reduction, device, fresh_seed):
    C = 7
    x = (torch.randn(4, C, 3, dtype=torch.float64) * 2).to(device)
    w = (torch.rand(C, dtype=torch.float64) + 0.3).to(device)
    t = _index_target((4, 3), C, device) if kind == "index" else _prob_target((4, C, 3), torch.float64, device)
    kw = dict(reduction=reduction, label_smoothing=0.1, **ALL)
    dx = torch.randn_like(x)
    tangents = (dx,) if kind == "index" else (dx, torch.randn_like(t))
    primals = (x,) if kind == "index" else (x, t)

    def ours(x, t=t):
        return xent_ext.cross_entropy(x, t, w, **kw)

    def ref(x, t=t):
        return definition(x, t, w, **kw)[0]

    got = jvp(ours, primals, tangents)
    want = jvp(ref, primals, tangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, d) for p, d in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(ours(*duals)).tangent
    torch.testing.assert_close(tangent, want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_vmap_and_per_sample_grad(kind, reduction, weighted, device, fresh_seed):
    """vmap of the loss and of its gradient over a batch of samples equals the loop over
    them (a weighted 'mean' with z-loss runs per sample: its two parts have different
    denominators)."""
    B, N, C = 3, 4, 6
    x = (torch.randn(B, N, C, dtype=torch.float64) * 2).to(device)
    w = (torch.rand(C, dtype=torch.float64) + 0.3).to(device) if weighted else None
    t = _index_target((B, N), C, device) if kind == "index" else _prob_target((B, N, C), torch.float64, device)
    if kind == "index":
        t[:, 0] = torch.randint(0, C, (B,), device=device)  # every sample counts a row: an all-ignored
        t[1] = -100                                          # 'mean' is nan, which is not the question here
        t[1, 0] = 2
    kw = dict(reduction=reduction, label_smoothing=0.1, **ALL)

    def loss(x, t):
        out = xent_ext.cross_entropy(x, t, w, **kw)
        return out.sum() if reduction == "none" else out

    got = vmap(loss)(x, t)
    got_grad = vmap(grad(loss))(x, t)
    got_aux = vmap(lambda x, t: xent_ext.cross_entropy(x, t, w, return_aux=True, **kw)[1])(x, t)
    for b in range(B):
        xb = x[b].clone().requires_grad_()
        want, lse, zl = definition(xb, t[b], w, **kw)
        want = want.sum() if reduction == "none" else want
        (want_grad,) = torch.autograd.grad(want, xb)
        torch.testing.assert_close(got[b], want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_grad[b], want_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_aux.lse[b], lse.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_aux.z_loss[b], zl.detach(), rtol=1e-12, atol=1e-12)


def test_grad_with_aux(device, fresh_seed):
    """torch.func.grad through return_aux: the aux is detached, the gradient the definition's."""
    x = torch.randn(5, 8, dtype=torch.float64, device=device)
    t = _index_target((5,), 8, device)

    def f(x):
        loss, aux = xent_ext.cross_entropy(x, t, return_aux=True, **ALL)
        return loss, aux.lse

    g, lse = grad(f, has_aux=True)(x)
    xr = x.clone().requires_grad_()
    r_loss, r_lse, _ = definition(xr, t, **ALL)
    torch.testing.assert_close(g, torch.autograd.grad(r_loss, xr)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, r_lse.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# TorchScript


def test_torchscript(device, fresh_seed):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    t = _index_target((4,), 9, device)

    @torch.jit.script
    def scripted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return xent_ext.cross_entropy(x, t, label_smoothing=0.1, logit_scale=1.4, softcap=3.0, z_loss=0.03)

    want = xent_ext.cross_entropy(x, t, label_smoothing=0.1, **ALL)
    assert_bitwise_equal(scripted(x, t), want, "scripted function")
    module = torch.jit.script(xent_ext.CrossEntropyLoss(label_smoothing=0.1, **ALL))
    assert_bitwise_equal(module(x, t), want, "scripted module")
    assert_bitwise_equal(torch.ops.xent_ext.cross_entropy(x, t, label_smoothing=0.1, **ALL), want, "operator")
    # inplace_backward in scripted code: the gradient reaches the producer of the logits.
    h = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(9, 3, dtype=torch.float64, device=device, requires_grad=True)

    @torch.jit.script
    def head(h: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return xent_ext.cross_entropy(h @ W.t(), t, z_loss=0.03, inplace_backward=True)

    got = torch.autograd.grad(head(h, W, t), (h, W))
    ref = torch.autograd.grad(xent_ext.cross_entropy(h @ W.t(), t, z_loss=0.03), (h, W))
    for a, b in zip(got, ref):
        assert_bitwise_equal(a, b, "scripted inplace_backward")


def test_torchscript_refuses_return_aux():
    x, t = torch.randn(3, 4), torch.randint(4, (3,))

    @torch.jit.script
    def scripted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return xent_ext.cross_entropy(x, t, return_aux=True)

    with pytest.raises(Exception, match="return_aux=True is not available in TorchScript"):
        scripted(x, t)
    module = torch.jit.script(xent_ext.CrossEntropyLoss(return_aux=True))
    with pytest.raises(Exception, match="return_aux=True is not available in TorchScript"):
        module(x, t)


# ---------------------------------------------------------------------------
# xent_ext.patch()


def test_patch_keeps_working(device, fresh_seed):
    """torch's signature has no extras: patched calls and modules work as before, and the
    extras reach xent_ext through the patched function when given."""
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    t = _index_target((5,), 6, device)
    plain = xent_ext.cross_entropy(x, t)
    with xent_ext.patched():
        assert_bitwise_equal(F.cross_entropy(x, t), plain, "patched F.cross_entropy")
        assert_bitwise_equal(torch.nn.CrossEntropyLoss()(x, t), plain, "patched torch.nn.CrossEntropyLoss")
        assert_bitwise_equal(F.cross_entropy(x, t, softcap=3.0), xent_ext.cross_entropy(x, t, softcap=3.0),
                             "patched F.cross_entropy with an extra")
    assert F.cross_entropy is not xent_ext.cross_entropy
