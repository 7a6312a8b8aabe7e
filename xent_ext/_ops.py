"""Autograd for the ``torch.ops.xent_ext`` operators.

The operators themselves are defined and implemented in C++ (``csrc/``);
importing ``xent_ext._C`` registers them, their Meta kernels included
(``csrc/ops.cpp``, Note [Meta kernels]), which ``torch.compile`` and
``torch.export`` trace through with fake tensors. Here we add the backward
formulas for training.

Note [Double backward]
The first-order backward runs the fused backward op. When autograd records the
backward itself (``create_graph=True``, e.g. gradgradcheck or gradient
penalties), the gradient is instead formed from differentiable torch ops that
evaluate the same formula (``csrc/common/xent_math.h``), so any order of
derivative is available. That path is slower and is only taken when asked for.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._compat import load_compiled_module

_C = load_compiled_module()  # registers the operators; a build for another torch raises a clear ImportError

_ops = torch.ops.xent_ext

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 logits, fp32 for fp32/bf16/fp16 (Note [Accumulation dtype])."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Composite gradients for double backward (Note [Double backward]).


def _rows_grad(grad_loss: Tensor, reduction: int, n: int, k: int, scale: Tensor | float, acc: torch.dtype) -> Tensor:
    """Upstream gradient per row, (N, K), already multiplied by the mean's 1/denominator."""
    g = grad_loss.to(acc)
    if reduction != REDUCTION_NONE:
        g = g.reshape(()).expand(n, k)
    if reduction == REDUCTION_MEAN:
        g = g * scale
    return g


def _index_grad_composite(grad_loss, input, target, weight, total_weight, ignore_index, label_smoothing, reduction):
    acc = accumulation_dtype(input.dtype)
    n, c, k = input.shape
    p = torch.softmax(input.to(acc), dim=1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w_target = weight.to(acc)[safe_target] if weight is not None else torch.ones_like(safe_target, dtype=acc)
    w_target = torch.where(valid, w_target, torch.zeros_like(w_target))
    g = _rows_grad(grad_loss, reduction, n, k, 1.0 / total_weight.to(acc), acc)
    one_hot = torch.nn.functional.one_hot(safe_target, c).permute(0, 2, 1).to(acc)
    if label_smoothing > 0:
        weight_c = weight.to(acc).view(1, c, 1) if weight is not None else torch.ones((), dtype=acc)
        weight_sum = weight.to(acc).sum() if weight is not None else c
        b = g * (1 - label_smoothing) * w_target
        d = g * (label_smoothing / c) * valid.to(acc)
        a = b + d * weight_sum
        grad = a.unsqueeze(1) * p - d.unsqueeze(1) * weight_c - b.unsqueeze(1) * one_hot
    else:
        b = (g * w_target).unsqueeze(1)
        grad = b * p - b * one_hot
    return grad.to(input.dtype)


def _prob_grads_composite(grad_loss, input, target, weight, label_smoothing, reduction, want_input, want_target):
    acc = accumulation_dtype(input.dtype)
    n, c, k = input.shape
    x = input.to(acc)
    g = _rows_grad(grad_loss, reduction, n, k, 1.0 / max(n * k, 1), acc).unsqueeze(1)
    q_scale = 1 - label_smoothing if label_smoothing > 0 else 1.0
    q = target.to(acc) * q_scale + (label_smoothing / c if label_smoothing > 0 else 0.0)
    weight_c = weight.to(acc).view(1, c, 1) if weight is not None else None
    coef = q * weight_c if weight_c is not None else q
    grad_input = grad_target = None
    if want_input:
        p = torch.softmax(x, dim=1)
        grad_input = (g * (p * coef.sum(1, keepdim=True) - coef)).to(input.dtype)
    if want_target:
        log_p = torch.log_softmax(x, dim=1)
        scaled = -g * q_scale * log_p
        grad_target = (scaled * weight_c if weight_c is not None else scaled).to(target.dtype)
    return grad_input, grad_target


# ---------------------------------------------------------------------------
# Autograd. Its C++ twin, for libtorch programs, is IndexCrossEntropy and
# ProbCrossEntropy in include/xent_ext/xent_ext.h (first order only): the two
# must agree.


def _input_grads(ctx: Any, *grads: Any) -> tuple:
    """`grads` for the op's first inputs, None for the rest (one per input the op was called with)."""
    return grads + (None,) * (ctx.num_inputs - len(grads))


def _index_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    # inputs: the op's arguments; loss_dtype, the last, may be left out by a caller.
    input, target, weight, ignore_index, label_smoothing, reduction = inputs[:6]
    ctx.num_inputs = len(inputs)
    _, row_stats, total_weight = output
    ctx.save_for_backward(input, target, weight, row_stats, total_weight)
    # row_stats and total_weight get no gradient; without this autograd would
    # materialize zero tensors for them (for the fused op: a logits-sized one).
    ctx.set_materialize_grads(False)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing
    ctx.reduction = reduction
    ctx.mark_non_differentiable(row_stats, total_weight)


def _index_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_total_weight: Tensor):
    if grad_loss is None:  # the loss itself got no gradient (grads are not materialized)
        return _input_grads(ctx)
    input, target, weight, row_stats, total_weight = ctx.saved_tensors
    args = (ctx.ignore_index, ctx.label_smoothing, ctx.reduction)
    if torch.is_grad_enabled():
        grad_input = _index_grad_composite(grad_loss, input, target, weight, total_weight, *args)
    else:
        grad_input = _ops.cross_entropy_index_backward(grad_loss, input, target, weight, row_stats, total_weight, *args)
    return _input_grads(ctx, grad_input)


# Note [Gradient in the forward] (Python side)
# cross_entropy_index_forward_with_grad returns the input gradient for an
# upstream gradient of 1 along with the loss. The first backward hands that
# buffer to autograd as it is when the upstream gradient is exactly 1 (the
# usual loss.backward()), or scales it in place otherwise (e.g. a GradScaler
# factor): no second read of the logits. The buffer is kept as a plain ctx
# attribute, not a saved tensor, because it is handed out or scaled in place;
# a second backward through the same graph (retain_graph=True) and double
# backward take the ordinary paths from the saved logits and row statistics.


def _index_fused_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _index_setup_context(ctx, inputs, output[:3])
    ctx.fused_grad = output[3]
    ctx.mark_non_differentiable(output[3])


def _index_fused_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_tw: Tensor, _grad_grad: Tensor):
    fused, ctx.fused_grad = ctx.fused_grad, None
    if grad_loss is None or fused is None or torch.is_grad_enabled():
        return _index_backward(ctx, grad_loss, _grad_row_stats, _grad_tw)
    if type(grad_loss) is not torch.Tensor:
        # Traced (fake/functional tensors, e.g. opcheck or AOTAutograd): no
        # data-dependent branch and no mutation of a forward output.
        return _input_grads(ctx, fused * grad_loss)
    if fused.is_cuda and torch.cuda.is_current_stream_capturing():
        # Reading g would be a host sync, illegal while a CUDA graph is being
        # captured: recompute from the saved logits (exact, one more read).
        return _index_backward(ctx, grad_loss, _grad_row_stats, _grad_tw)
    g = float(grad_loss)  # on CUDA, one host sync (Note [Gradient in the forward])
    if g == 1.0:
        return _input_grads(ctx, fused)
    # Scaling the stored gradient rounds twice. Exact for a power of two (the
    # usual GradScaler factor), harmless in fp32/fp64; for bf16/fp16 with any
    # other factor, recompute with one rounding instead.
    if math.frexp(g)[0] in (0.5, -0.5) or fused.dtype in (torch.float32, torch.float64):
        return _input_grads(ctx, fused.mul_(grad_loss))
    return _index_backward(ctx, grad_loss, _grad_row_stats, _grad_tw)


def _prob_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, target, weight, label_smoothing, reduction = inputs[:5]  # loss_dtype may be left out
    ctx.num_inputs = len(inputs)
    _, row_stats, coef_sum = output
    ctx.save_for_backward(input, target, weight, row_stats, coef_sum)
    ctx.set_materialize_grads(False)
    ctx.label_smoothing = label_smoothing
    ctx.reduction = reduction
    ctx.mark_non_differentiable(row_stats, coef_sum)


def _prob_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_coef_sum: Tensor):
    if grad_loss is None:
        return _input_grads(ctx)
    input, target, weight, row_stats, coef_sum = ctx.saved_tensors
    want_input, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        grad_input, grad_target = _prob_grads_composite(
            grad_loss, input, target, weight, ctx.label_smoothing, ctx.reduction, want_input, want_target
        )
    else:
        grad_input, grad_target = _ops.cross_entropy_prob_backward(
            grad_loss, input, target, weight, row_stats, coef_sum, ctx.label_smoothing, ctx.reduction, want_input, want_target
        )
        grad_input = grad_input if want_input else None
        grad_target = grad_target if want_target else None
    return _input_grads(ctx, grad_input, grad_target)


torch.library.register_autograd(
    "xent_ext::cross_entropy_index_forward", _index_backward, setup_context=_index_setup_context
)
torch.library.register_autograd(
    "xent_ext::cross_entropy_index_forward_with_grad", _index_fused_backward, setup_context=_index_fused_setup_context
)
torch.library.register_autograd(
    "xent_ext::cross_entropy_prob_forward", _prob_backward, setup_context=_prob_setup_context
)


# ---------------------------------------------------------------------------
# Note [Autograd on the hot path]
# torch.library's autograd wrapper costs tens of microseconds of Python per
# call (argument defaults, keyset checks, a generated Function): measured on
# 8 x 10 CPU logits, a forward that requires grad took 85 µs against 6 µs for
# torch's own cross_entropy. For small and mid-size inputs that host time is
# the step time, and on a GPU whose target check syncs every forward it adds
# to every step (benchmarks/NOTES.md). Eager calls (xent_ext/functional.py)
# go around it through the callers below: the same operators, the same
# setup_context and backward as the registered formulas above, which stay
# for torch.compile and export (traced calls use the ops), opcheck and
# direct callers of torch.ops.xent_ext. The wrapper also cannot run under
# torch.func transforms; these can.


def _eager_function(op: Any, setup_context: Any, backward: Any, name: str) -> Any:
    """A caller of ``op`` with its registered autograd formula, minus
    torch.library's wrapper (which also fails under torch.func transforms,
    having no ``setup_context``): an autograd.Function whose forward runs the
    op below autograd, with the same setup_context and backward.

    ``Function.apply``'s Python layer binds default arguments through
    inspect.signature on every call (~40 µs) because setup_context is
    defined. Callers pass every argument positionally, so binding is a no-op:
    outside torch.func transforms the caller goes to the C++ apply underneath,
    as Function.apply itself then does, after the same unwrapping of dead
    functorch wrappers; under transforms, through Function.apply. When no
    argument requires grad (or grad mode is off) it calls the op below
    autograd directly (the dispatcher handles dead wrappers there).
    """

    def forward(*args: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })
    apply_in_cpp = super(torch.autograd.Function, function).apply
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead

    def call(*args: Any) -> Any:
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return apply_in_cpp(*[unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])
        # Nothing to differentiate: no graph node, no setup_context (half the cost).
        return forward(*args)

    call.__name__ = call.__qualname__ = name
    return call


# Each returns its op's outputs; the loss is the first.
index_loss = _eager_function(_ops.cross_entropy_index_forward, _index_setup_context, _index_backward, "index_loss")
fused_index_loss = _eager_function(
    _ops.cross_entropy_index_forward_with_grad, _index_fused_setup_context, _index_fused_backward, "fused_index_loss"
)
prob_loss = _eager_function(_ops.cross_entropy_prob_forward, _prob_setup_context, _prob_backward, "prob_loss")
