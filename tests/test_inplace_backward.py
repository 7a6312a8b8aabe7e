"""cross_entropy(..., inplace_backward=True): the gradient written into the logits.

When the logits require grad, the forward writes their gradient (for an upstream gradient
of 1) into their own storage and autograd is told (mark_dirty); the backward only scales
it. Checked here: the same loss, aux and gradients as the out-of-place path, bit for bit
(a non-uniform per-row upstream gradient for 'none', a GradScaler factor); the logits
holding the gradient after the forward; one logits-sized buffer less at the peak;
torch's in-place error when another operation saved the logits; the refusals, each
raised before anything is written; and the logits left alone when no gradient is needed.
"""

import pytest
import torch

import xent_ext
from helpers import REDUCTIONS, assert_bitwise_equal, dtype_name, is_cuda
from torch._C._profiler import _EventType

INPLACE_ERROR = "modified by an inplace operation"
EXTRAS = {"plain": {}, "extras": dict(logit_scale=0.8, softcap=4.0, z_loss=1e-2)}
KINDS = ["index", "prob", "prob_target_grad"]


def _head(N, C, H, dtype, device, spatial=0):
    """Leaves of a tiny LM head: h (N[, K], H) and W (C, H)."""
    shape = (N, spatial, H) if spatial else (N, H)
    h = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(C, H, dtype=torch.float64) / H ** 0.5 * 3).to(device=device, dtype=dtype).requires_grad_()
    return h, W


def _logits(h, W):
    """h @ W.T as (N, C) or, for h (N, K, H), as the (N, C, K) view of the (N, K, C) product."""
    out = h @ W.t()
    return out if h.dim() == 2 else out.transpose(1, 2)


def _target(kind, logits, device, ignore_index=-100):
    C = logits.shape[1]
    if kind == "index":
        t = torch.randint(0, C, (logits.shape[0],) + tuple(logits.shape[2:]))
        t[0] = ignore_index
        return t.to(device)
    q = torch.softmax(torch.randn(logits.shape, dtype=torch.float64) * 2, 1).to(device=device, dtype=logits.dtype)
    return q.requires_grad_() if kind == "prob_target_grad" else q


def _step(kind, h, W, t, grad_out, inplace, **kw):
    """Forward and backward; (loss, aux, logits after the forward, gradients)."""
    logits = _logits(h, W)
    loss, aux = xent_ext.cross_entropy(logits, t, return_aux=True, inplace_backward=inplace, **kw)
    after = logits.detach().clone()
    leaves = [h, W] + ([t] if kind == "prob_target_grad" else [])
    grads = torch.autograd.grad(loss, leaves, grad_out)
    return loss.detach(), aux, after, grads


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=dtype_name)
@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("spatial", [0, 3], ids=["2d", "3d_view"])
def test_same_as_out_of_place(spatial, weighted, kind, reduction, extras, dtype, device, fresh_seed):
    h, W = _head(6, 17, 8, dtype, device, spatial)
    t = _target(kind, _logits(h, W), device)
    weight = (torch.rand(17, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype) if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1, **EXTRAS[extras])
    ctx = f"{kind} {reduction} {extras} {dtype_name(dtype)} weight={weighted} spatial={spatial} seed={fresh_seed}"
    probe = xent_ext.cross_entropy(_logits(h, W).detach(), t.detach(), **kw)
    # A non-uniform upstream gradient per row for 'none'; a random factor otherwise.
    grad_out = (torch.rand(probe.shape, dtype=torch.float64) * 3 + 0.25).to(device=device, dtype=probe.dtype)
    ref_loss, ref_aux, logits_before, ref_grads = _step(kind, h, W, t, grad_out, False, **kw)
    loss, aux, logits_after, grads = _step(kind, h, W, t, grad_out, True, **kw)
    assert_bitwise_equal(loss, ref_loss, f"{ctx}: loss")
    assert_bitwise_equal(aux.lse, ref_aux.lse, f"{ctx}: aux.lse")
    assert_bitwise_equal(aux.z_loss, ref_aux.z_loss, f"{ctx}: aux.z_loss")
    for name, g, r in zip(("h", "W", "target"), grads, ref_grads):
        assert_bitwise_equal(g, r, f"{ctx}: grad[{name}]")
    # After the forward the logits hold their gradient for an upstream gradient of 1.
    x = _logits(h, W).detach().requires_grad_()
    (unit,) = torch.autograd.grad(xent_ext.cross_entropy(x, t.detach(), **kw).sum(), x)
    assert_bitwise_equal(logits_after, unit, f"{ctx}: the logits after the forward")
    assert not torch.equal(logits_before, logits_after), ctx


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradscaler_factor(reduction, device, fresh_seed):
    """loss * 1024 (a GradScaler's factor: a power of two that fp16 holds) on fp16 logits:
    the stored gradient is scaled in place, as the out-of-place path scales its own."""
    h, W = _head(8, 33, 16, torch.float16, device)
    t = _target("index", _logits(h, W), device)
    results = []
    for inplace in (False, True):
        loss = xent_ext.cross_entropy(_logits(h, W), t, reduction=reduction, inplace_backward=inplace)
        grads = torch.autograd.grad(loss.sum() * 1024.0, (h, W))
        results.append(grads)
    for a, b in zip(*results):
        assert_bitwise_equal(b, a, f"{reduction}: GradScaler factor")
        assert torch.isfinite(b).all()


def test_linear_layer(device, fresh_seed):
    """The usual head, a Linear's output: parameters get the same gradients."""
    torch.manual_seed(fresh_seed % 2**31)
    lin = torch.nn.Linear(12, 40).to(device)
    h = torch.randn(9, 12, device=device)
    t = torch.randint(40, (9,), device=device)
    grads = []
    for inplace in (False, True):
        lin.zero_grad()
        xent_ext.cross_entropy(lin(h), t, z_loss=1e-3, inplace_backward=inplace).backward()
        grads.append([p.grad.clone() for p in lin.parameters()])
    for a, b in zip(*grads):
        assert_bitwise_equal(b, a, "Linear")


def test_flattened_view_of_3d_logits(device, fresh_seed):
    """(B, T, V) logits viewed as (B*T, V), the usual LM loss: written through their base."""
    h = torch.randn(2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(11, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(11, (10,), device=device)
    want = torch.autograd.grad(xent_ext.cross_entropy((h @ W.t()).view(-1, 11), t, z_loss=1e-2), (h, W))
    logits = h @ W.t()
    loss = xent_ext.cross_entropy(logits.view(-1, 11), t, z_loss=1e-2, inplace_backward=True)
    assert logits._version > 0  # the base was written
    got = torch.autograd.grad(loss, (h, W))
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b, "flattened view")


def test_one_dimensional_input(device):
    h = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor(3, device=device)
    want = torch.autograd.grad(xent_ext.cross_entropy(W @ h, t, softcap=2.0), (h, W))
    got = torch.autograd.grad(xent_ext.cross_entropy(W @ h, t, softcap=2.0, inplace_backward=True), (h, W))
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b, "(C,) logits")


# ---------------------------------------------------------------------------
# no gradient needed: the logits are left alone


@pytest.mark.parametrize("how", ["no_grad", "no_requires_grad", "inference_mode"])
def test_untouched_without_gradient(how, device):
    h, W = _head(4, 9, 5, torch.float32, device)
    t = torch.randint(9, (4,), device=device)
    if how == "no_grad":
        with torch.no_grad():
            logits = h @ W.t()
            before = logits.clone()
            loss = xent_ext.cross_entropy(logits, t, inplace_backward=True, z_loss=0.1)
    elif how == "inference_mode":
        with torch.inference_mode():
            logits = h @ W.t()
            before = logits.clone()
            loss = xent_ext.cross_entropy(logits, t, inplace_backward=True)
    else:
        logits = (h @ W.t()).detach()
        before = logits.clone()
        loss = xent_ext.cross_entropy(logits, t, inplace_backward=True)
    assert_bitwise_equal(logits, before, how)
    assert_bitwise_equal(loss, xent_ext.cross_entropy(before, t, z_loss=0.1 if how == "no_grad" else 0.0), how)


# ---------------------------------------------------------------------------
# someone else saved the logits: torch's in-place error at backward


@pytest.mark.parametrize("producer", ["tanh", "softmax", "pow_regularizer"])
def test_saved_logits_raise_torchs_error(producer, device):
    h, W = _head(4, 9, 5, torch.float32, device)
    t = torch.randint(9, (4,), device=device)
    extra = 0
    if producer == "tanh":
        logits = torch.tanh(h @ W.t())  # tanh saves its output
    elif producer == "softmax":
        logits = torch.softmax(h @ W.t(), dim=1)  # and so does softmax
    else:
        logits = h @ W.t()
        extra = (logits ** 2).mean()  # pow saves its input
    loss = xent_ext.cross_entropy(logits, t, inplace_backward=True) + extra
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_logits_modified_after_forward_raise(device):
    h, W = _head(4, 9, 5, torch.float32, device)
    logits = h @ W.t()
    loss = xent_ext.cross_entropy(logits, torch.randint(9, (4,), device=device), inplace_backward=True)
    logits.mul_(2)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


# ---------------------------------------------------------------------------
# refusals, before anything is written


def _refused(logits, target, match, **kw):
    before = logits.detach().clone()
    with pytest.raises(RuntimeError, match=match):
        xent_ext.cross_entropy(logits, target, inplace_backward=True, **kw)
    assert_bitwise_equal(logits.detach(), before, f"{match}: the logits were written")


def test_refuses_leaf(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    _refused(x, torch.randint(6, (4,), device=device), "leaf tensor that requires grad")
    _refused(x[:, :5], torch.randint(5, (4,), device=device), "view of a leaf")


def test_refuses_views_autograd_forbids(device):
    h, W = _head(4, 9, 5, torch.float32, device)
    first, _ = torch.stack([h @ W.t(), h @ W.t()]).unbind(0)  # one of several views of one op
    _refused(first, torch.randint(9, (4,), device=device), "does not allow to modify in place")


def test_refuses_a_view_of_part(device):
    h, W = _head(6, 9, 5, torch.float32, device)
    _refused((h @ W.t())[:4], torch.randint(9, (4,), device=device), "part of a larger tensor")


def test_refuses_overlapping_elements(device):
    h, W = _head(1, 9, 5, torch.float32, device)
    logits = (h @ W.t()).expand(4, 9)
    _refused(logits, torch.randint(9, (4,), device=device), "share memory")


def test_refuses_trailing_dims_that_do_not_merge(device):
    h, W = _head(2, 6, 5, torch.float32, device)
    logits = (h @ W.t()).reshape(2, 6, 1, 1).expand(2, 6, 3, 4).contiguous().transpose(2, 3)
    _refused(logits, torch.randint(6, (2, 4, 3), device=device), "cannot be viewed as")


def test_refuses_a_cast_copy(device):
    h, W = _head(4, 9, 5, torch.float32, device)
    q = torch.softmax(torch.randn(4, 9, dtype=torch.float64, device=device), 1)
    _refused(h @ W.t(), q, "would be cast")  # promoted to float64: a copy of the logits
    hb, Wb = _head(4, 9, 5, torch.bfloat16, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        _refused(hb @ Wb.t(), q.float(), "under autocast")


def test_refuses_target_sharing_memory(device):
    h, W = _head(4, 9, 5, torch.float32, device)
    logits = torch.softmax(h @ W.t(), 1) * 1.0
    _refused(logits, logits.detach(), "shares memory")


def test_refuses_configuration_handed_to_torch(device):
    h, W = _head(4, 9, 5, torch.float64, device)
    q = torch.softmax(torch.randn(4, 9, dtype=torch.float64, device=device), 1)
    w = torch.rand(9, dtype=torch.float64, device=device, requires_grad=True)  # learned class weights
    with pytest.raises(RuntimeError, match="torch operations rather than the fused kernels"):
        xent_ext.cross_entropy(h @ W.t(), q, w, inplace_backward=True)


def test_refuses_uint8_targets_torch_masks():
    h, W = _head(3, 160, 5, torch.float32, "cpu")
    t = torch.tensor([156, 2, 3], dtype=torch.uint8)
    _refused(h @ W.t(), t, "uint8 class indices", label_smoothing=0.1)
    # Without the wrapped byte among the targets there is nothing to refuse.
    loss = xent_ext.cross_entropy(h @ W.t(), t.clamp(max=150), label_smoothing=0.1, inplace_backward=True)
    loss.backward()


def test_refuses_transforms(device):
    h, W = _head(4, 9, 5, torch.float32, device)
    t = torch.randint(9, (4,), device=device)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda x: xent_ext.cross_entropy(x * 1.0, t, inplace_backward=True))(h @ W.t())


def test_refuses_double_and_second_backward(device):
    h, W = _head(4, 9, 5, torch.float64, device)
    t = torch.randint(9, (4,), device=device)
    loss = xent_ext.cross_entropy(h @ W.t(), t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    loss = xent_ext.cross_entropy(h @ W.t(), t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_refuses_logits_that_retain_grad(device):
    # autograd cannot keep the gradient of a tensor a Function overwrites (it fails inside
    # torch, after the write), so the call refuses first.
    h, W = _head(4, 9, 5, torch.float32, device)
    logits = h @ W.t()
    logits.retain_grad()
    _refused(logits, torch.randint(9, (4,), device=device), r"retains its gradient \(retain_grad\(\)\)")


@pytest.mark.parametrize("hooks", ["save_on_cpu", "identity"])
def test_refuses_saved_tensor_hooks(hooks, device):
    # Tensors saved through hooks are read back without torch's version check: tanh's
    # saved output would silently be the gradient, so the call refuses.
    h, W = _head(4, 9, 5, torch.float32, device)
    if hooks == "save_on_cpu":
        region = torch.autograd.graph.save_on_cpu()
    else:
        region = torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)
    with region:
        logits = torch.tanh(h @ W.t())
        _refused(logits, torch.randint(9, (4,), device=device), "under saved-tensor hooks")


def test_refuses_a_view_whose_base_retains_grad(device):
    # The write goes through the base of a full view, whose retained gradient autograd would drop.
    h, W = _head(4, 6, 5, torch.float32, device)
    base = (h @ W.t()).reshape(2, 2, 6).clone()
    base.retain_grad()
    _refused(base.view(-1, 6), torch.randint(6, (4,), device=device), "view of a tensor that retains its gradient")


def test_activation_checkpointing(device, fresh_seed):
    # Non-reentrant checkpointing is saved-tensor hooks: its recomputation would write the
    # gradient again into logits that another node (pow) saved, silently, so it is refused.
    # Reentrant checkpointing runs the forward under no_grad and again in the backward with
    # ordinary autograd: torch's in-place error where a node saved the logits, the
    # out-of-place gradients where none did.
    from torch.utils.checkpoint import checkpoint

    h, W = _head(6, 11, 5, torch.float64, device)
    t = torch.randint(11, (6,), device=device)

    def block(h, W, inplace, regularized):
        logits = h @ W.t() if regularized else torch.tanh(h @ W.t()) * 3
        extra = 0.01 * logits.pow(2).sum() if regularized else 0
        return xent_ext.cross_entropy(logits, t, z_loss=0.1, inplace_backward=inplace) + extra

    with pytest.raises(RuntimeError, match="under saved-tensor hooks"):
        checkpoint(block, h, W, True, True, use_reentrant=False)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        checkpoint(block, h, W, True, True, use_reentrant=True).backward()
    want = torch.autograd.grad(block(h, W, False, False), (h, W))
    h.grad = W.grad = None
    checkpoint(block, h, W, True, False, use_reentrant=True).backward()  # reentrant: no autograd.grad
    for a, b in zip((h.grad, W.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_refuses_logits_used_after_forward(device):
    h, W = _head(4, 9, 5, torch.float64, device)
    logits = h @ W.t()
    loss = xent_ext.cross_entropy(logits, torch.randint(9, (4,), device=device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="holds the loss's gradient"):
        (loss + logits.sum()).backward()


# ---------------------------------------------------------------------------
# memory: one logits-sized buffer less


def _peak_bytes(fn, device):
    """Peak of bytes held by the allocator of `device` while fn runs, above the start."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_peak_memory_one_logits_lower(kind, device, fresh_seed):
    # The peak with inplace_backward comes later, in the backward, with W's gradient
    # (C * H elements) beside the logits: a narrow H keeps that small.
    N, C, H = 64, 4096, 2
    h, W = _head(N, C, H, torch.float32, device)
    t = _target(kind, _logits(h, W).detach(), device)
    logits_bytes = N * C * 4

    def step(inplace):
        def run():
            loss = xent_ext.cross_entropy(h @ W.t(), t, softcap=30.0, z_loss=1e-4, inplace_backward=inplace)
            loss.backward()
        return run

    plain = _peak_bytes(step(False), device)
    inplace = _peak_bytes(step(True), device)
    assert plain - inplace >= 0.9 * logits_bytes, (
        f"{kind}: peak {inplace} bytes with inplace_backward, {plain} without (logits: {logits_bytes})")
