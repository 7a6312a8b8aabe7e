"""Logits modified in place between the forward and the backward.

torch's cross_entropy keeps log_softmax's output, not its input, so editing the logits
in place after the forward leaves its gradient unchanged. xent_ext computes the
gradient in the forward and its first backward only scales it (Note [Gradient in the
forward], xent_ext/_ops.py): the same gradient, for every reduction and target kind,
also under vmap and for a loss recorded while a forward-AD level was open. A
second backward through the same graph, or a double backward, reads the logits again,
and then raises autograd's own in-place-modification error instead of returning the
gradient of other logits.
"""

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import REDUCTIONS, assert_bitwise_equal, compare_with_torch, dtype_name, random_like_loss

EDITS = {
    "mul_": lambda t: t.mul_(1.5),
    "zero_": lambda t: t.zero_(),
    "add_": lambda t: t.add_(torch.randn(t.shape, dtype=torch.float64).to(device=t.device, dtype=t.dtype)),
}

# (name, kind, kwargs)
TARGETS = [
    ("index", "index", {}),
    ("index_weight_smooth_ignore", "index", {"weight": True, "label_smoothing": 0.1, "ignore_index": 1}),
    ("prob", "prob", {}),
    ("prob_target_grad", "prob", {"target_grad": True}),
    ("prob_weight_smooth_target_grad", "prob", {"weight": True, "label_smoothing": 0.2, "target_grad": True}),
]

SHAPES = [(7, 13), (3, 6, 5)]

INPLACE_ERROR = "modified by an inplace operation"


def _problem(kind, kw, shape, dtype, device):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    w = (torch.rand(C, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype) if kw.get("weight") else None
    if kind == "index":
        t = torch.randint(0, C, (shape[0],) + shape[2:], device=device)
        t = torch.where(torch.rand(t.shape, device=device) < 0.2, torch.full_like(t, 1), t)
    else:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64), 1).to(device=device, dtype=dtype)
    args = dict(label_smoothing=kw.get("label_smoothing", 0.0), ignore_index=kw.get("ignore_index", -100))
    return x, t, w, args


class _Run:
    """One forward of fn on logits derived from a leaf (or the leaf itself), an optional
    in-place edit of those logits, then the first backward."""

    def __init__(self, fn, x, t, w, reduction, args, edit, on_leaf, target_grad, grad_out):
        self.leaf = x.detach().clone().requires_grad_()
        self.logits = self.leaf if on_leaf else self.leaf.clone()  # clone: an exact, non-leaf copy
        self.target = t.detach().clone().requires_grad_() if target_grad else t
        self.loss = fn(self.logits, self.target, weight=w, reduction=reduction, **args)
        if edit is not None:
            with torch.no_grad() if on_leaf else torch.enable_grad():
                edit(self.logits)
        self.g = grad_out(self.loss) if callable(grad_out) else grad_out
        self.wrt = [self.leaf] + ([self.target] if target_grad else [])
        self.grads = torch.autograd.grad(self.loss, self.wrt, self.g, retain_graph=True)

    def again(self, **kw):
        return torch.autograd.grad(self.loss, self.wrt, self.g, **kw)


@pytest.mark.parametrize("on_leaf", [False, True], ids=["non_leaf", "leaf_no_grad"])
@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
@pytest.mark.parametrize("target_case", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_name)
def test_edit_after_forward(dtype, reduction, target_case, edit, on_leaf, device, fresh_seed):
    _, kind, kw = target_case
    shape = SHAPES[fresh_seed % len(SHAPES)]
    x, t, w, args = _problem(kind, kw, shape, dtype, device)
    target_grad = kw.get("target_grad", False)
    ctx = f"{dtype_name(dtype)} {reduction} {target_case[0]} {edit} {'leaf' if on_leaf else 'non-leaf'} seed={fresh_seed}"
    with torch.no_grad():
        g = random_like_loss(xent_ext.cross_entropy(x, t, weight=w, reduction=reduction, **args))

    untouched = _Run(xent_ext.cross_entropy, x, t, w, reduction, args, None, on_leaf, target_grad, g)
    edited = _Run(xent_ext.cross_entropy, x, t, w, reduction, args, EDITS[edit], on_leaf, target_grad, g)
    theirs = _Run(F.cross_entropy, x, t, w, reduction, args, EDITS[edit], on_leaf, target_grad, g)

    # the edit changes nothing: the first backward never reads the logits
    for a, b in zip(edited.grads, untouched.grads):
        assert_bitwise_equal(a, b, ctx + ": first backward after the edit vs without it")
    # and it is torch's gradient, which the edit does not change either
    names = ("input", "target")[: len(edited.grads)]
    compare_with_torch(edited.loss.detach(), dict(zip(names, edited.grads)), x, t, w, reduction=reduction,
                       wrt=names, grad_out=g, ctx=ctx, **args)
    for a, b in zip(theirs.grads, _Run(F.cross_entropy, x, t, w, reduction, args, None, on_leaf, target_grad, g).grads):
        assert torch.equal(a, b), ctx + ": torch's own gradient changed with the edit"

    # a second backward reads the logits again: autograd's error, not another gradient
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        edited.again()
    # without the edit it is the same gradient, up to the rounding of the first one's
    # scaling (bit for bit for an upstream gradient of 1: test_magnitude.py). The second
    # backward multiplies the upstream gradient into the coefficients before the terms
    # a * p - d * w - b cancel at the target; the first scales their rounded difference:
    # a few roundings of the largest term apart, which 2 eps missed for some seeds.
    eps = torch.finfo(dtype).eps
    for a, b in zip(untouched.again(), untouched.grads):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * b.abs().max().item(),
                                   msg=lambda m: f"{ctx}: second backward without an edit: {m}")


@pytest.mark.parametrize("target_case", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_after_edit_raises(reduction, target_case, device, fresh_seed):
    # a double backward (create_graph=True) recomputes from the logits: after an in-place
    # edit it raises autograd's error; without one it is torch's
    _, kind, kw = target_case
    x, t, w, args = _problem(kind, kw, SHAPES[0], torch.float64, device)
    target_grad = kw.get("target_grad", False)
    for edited in (True, False):
        leaf = x.detach().clone().requires_grad_()
        logits = leaf.clone()
        tl = t.detach().clone().requires_grad_() if target_grad else t
        loss = xent_ext.cross_entropy(logits, tl, weight=w, reduction=reduction, **args)
        if edited:
            logits.mul_(2)
            with pytest.raises(RuntimeError, match=INPLACE_ERROR):
                torch.autograd.grad(loss.sum(), leaf, create_graph=True)
            continue
        (grad,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        leaf_t = x.detach().clone().requires_grad_()
        ref = F.cross_entropy(leaf_t, t, weight=w, reduction=reduction, **args)
        (ref_grad,) = torch.autograd.grad(ref.sum(), leaf_t, create_graph=True)
        torch.testing.assert_close(grad, ref_grad)
        v = torch.randn_like(grad)
        (gg,) = torch.autograd.grad((grad * v).sum(), leaf)
        (ref_gg,) = torch.autograd.grad((ref_grad * v).sum(), leaf_t)
        torch.testing.assert_close(gg, ref_gg)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_scales_the_stored_gradient(reduction, device, fresh_seed):
    # the first backward for an upstream gradient g is g times the gradient for 1 (row by
    # row for 'none'), scaled in place; loss.sum().backward() on 'none' hands it out as is
    x = torch.randn(6, 9, dtype=torch.float64, device=device)
    t = torch.randint(0, 9, (6,), device=device)
    one = _Run(xent_ext.cross_entropy, x, t, None, reduction, {}, None, False, False, torch.ones_like)
    g = random_like_loss(one.loss.detach())
    scaled = _Run(xent_ext.cross_entropy, x, t, None, reduction, {}, EDITS["zero_"], False, False, g)
    rows = g.reshape(-1, 1) if reduction == "none" else g
    torch.testing.assert_close(scaled.grads[0], one.grads[0] * rows, rtol=1e-15, atol=0)


def _edited_gradients(fn, call, x, t, w, target_grad, g, args):
    """Gradients w.r.t. a leaf (and the target) of ``call(fn, logits, target)`` with the
    logits edited in place after the forward."""
    leaf = x.detach().clone().requires_grad_()
    logits = leaf.clone()
    target = t.detach().clone().requires_grad_() if target_grad else t
    loss = call(fn, logits, target, w, args)
    logits.mul_(-1.5)
    return torch.autograd.grad(loss, [leaf] + ([target] if target_grad else []), g)


def _under_vmap(reduction):
    def call(fn, logits, target, w, args):
        return torch.func.vmap(lambda a, b: fn(a, b, weight=w, reduction=reduction, **args))(logits, target)
    return call


def _sample_by_sample(reduction):
    # vmap's meaning, for torch, whose weighted 'mean' with smoothing vmap cannot batch
    def call(fn, logits, target, w, args):
        return torch.stack([fn(logits[i], target[i], weight=w, reduction=reduction, **args)
                            for i in range(logits.shape[0])])
    return call


def _under_forward_ad(reduction):
    def call(fn, logits, target, w, args):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(logits, torch.randn_like(logits))
            loss = fn(dual, target, weight=w, reduction=reduction, **args)
            tangent = torch.autograd.forward_ad.unpack_dual(loss).tangent
            assert tangent is not None
            return torch.autograd.forward_ad.unpack_dual(loss).primal
    return call


@pytest.mark.parametrize("how", ["vmap", "forward_ad_level"])
@pytest.mark.parametrize("target_case", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edit_after_forward_under_vmap_or_forward_ad(how, reduction, target_case, device, fresh_seed):
    # vmap alone: the folded call forms the gradient in the forward (a BatchedTensor does
    # not say that the logits it wraps require grad; the front end looks through it).
    # Forward AD: the loss recorded while a level was open, backpropagated after it closed.
    # Either way torch's gradient, which the edit does not change.
    _, kind, kw = target_case
    shape = (4, 5, 6)  # vmap over the first dimension: samples of (5, 6) logits
    x, t, w, args = _problem(kind, kw, shape, torch.float64, device)
    if how == "vmap":  # the class dimension of each (5, 6) sample is the last
        if kind == "index":
            t = torch.randint(0, 6, (4, 5), device=device)
            t = torch.where(torch.rand(t.shape, device=device) < 0.2, torch.full_like(t, 1), t)
        else:
            t = torch.softmax(torch.randn(shape, dtype=torch.float64), 2).to(device)
        if w is not None:
            w = (torch.rand(6, dtype=torch.float64) + 0.1).to(device)
    target_grad = kw.get("target_grad", False)
    call = _under_vmap(reduction) if how == "vmap" else _under_forward_ad(reduction)
    torch_call = _sample_by_sample(reduction) if how == "vmap" else call
    with torch.no_grad():
        g = random_like_loss(torch_call(F.cross_entropy, x, t, w, args))
    ours = _edited_gradients(xent_ext.cross_entropy, call, x, t, w, target_grad, g, args)
    theirs = _edited_gradients(F.cross_entropy, torch_call, x, t, w, target_grad, g, args)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
