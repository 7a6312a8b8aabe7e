"""Autograd for the ``torch.ops.xent_ext`` operators.

The operators themselves are defined and implemented in C++ (``csrc/``);
importing ``xent_ext._C`` registers them, their Meta kernels included
(``csrc/ops.cpp``, Note [Meta kernels]), which ``torch.compile`` and
``torch.export`` trace through with fake tensors. Here we add the backward
formulas for training.

Note [Double backward]
The first-order backward scales the gradient the forward computed (Note
[Gradient in the forward] below) or runs the backward op. When autograd records the
backward itself (``create_graph=True``, e.g. gradgradcheck or gradient
penalties), the gradient is instead formed from differentiable torch ops that
evaluate the same formula (``csrc/common/xent_math.h``), so any order of
derivative is available. That path is slower and is only taken when asked for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _extras, _functorch
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


def _index_grad_composite(grad_loss, input, target, weight, total_weight, ignore_index, label_smoothing, reduction,
                          extras=_extras.DEFAULT_OP_ARGS):
    acc = accumulation_dtype(input.dtype)
    n, c, k = input.shape
    logit_scale, softcap, z_loss = extras
    x = input.to(acc)
    z = _extras.logit_map(x, logit_scale, softcap)  # Note [Extras in the composite formulas]
    p = torch.softmax(z, dim=1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w_target = weight.to(acc)[safe_target] if weight is not None else torch.ones_like(safe_target, dtype=acc)
    w_target = torch.where(valid, w_target, torch.zeros_like(w_target))
    zero = torch.zeros((), dtype=acc, device=input.device)
    g = _rows_grad(grad_loss, reduction, n, k, 1.0 / total_weight.to(acc), acc)
    # Ignored rows get no upstream gradient, as in the kernels (math::index_grad_coefs):
    # with every row ignored the mean's 1/denominator is inf, and inf * 0 would be nan.
    g = torch.where(valid, g, zero)
    # A comparison, not F.one_hot: one_hot reads the largest target to size its
    # result, a data-dependent read that vmap (per-sample gradients) refuses.
    one_hot = (torch.arange(c, device=input.device).view(1, c, 1) == safe_target.unsqueeze(1)).to(acc)
    if label_smoothing > 0:
        weight_c = weight.to(acc).view(1, c, 1) if weight is not None else torch.ones((), dtype=acc)
        weight_sum = weight.to(acc).sum() if weight is not None else c
        b = g * (1 - label_smoothing) * w_target
        d = g * (label_smoothing / c) * valid.to(acc)
        a = b + d * weight_sum
        a = a + _z_loss_coef(grad_loss, reduction, z, valid, z_loss, acc)
        grad = a.unsqueeze(1) * p - d.unsqueeze(1) * weight_c - b.unsqueeze(1) * one_hot
    else:
        b = g * w_target
        a = b + _z_loss_coef(grad_loss, reduction, z, valid, z_loss, acc)
        grad = a.unsqueeze(1) * p - b.unsqueeze(1) * one_hot
    return _times_slope(grad, x, logit_scale, softcap).to(input.dtype)


def _prob_grads_composite(grad_loss, input, target, weight, label_smoothing, reduction, want_input, want_target,
                          extras=_extras.DEFAULT_OP_ARGS):
    acc = accumulation_dtype(input.dtype)
    n, c, k = input.shape
    logit_scale, softcap, z_loss = extras
    x = input.to(acc)
    z = _extras.logit_map(x, logit_scale, softcap)  # Note [Extras in the composite formulas]
    g = _rows_grad(grad_loss, reduction, n, k, 1.0 / max(n * k, 1), acc).unsqueeze(1)
    q_scale = 1 - label_smoothing if label_smoothing > 0 else 1.0
    q = target.to(acc) * q_scale + (label_smoothing / c if label_smoothing > 0 else 0.0)
    weight_c = weight.to(acc).view(1, c, 1) if weight is not None else None
    coef = q * weight_c if weight_c is not None else q
    grad_input = grad_target = None
    if want_input:
        p = torch.softmax(z, dim=1)
        a = g * coef.sum(1, keepdim=True)
        if z_loss != 0.0:
            a = a + _z_loss_coef(grad_loss, reduction, z, None, z_loss, acc).unsqueeze(1)
        grad_z = a * p - g * coef
        grad_input = _times_slope(grad_z, x, logit_scale, softcap).to(input.dtype)
    if want_target:
        log_p = torch.log_softmax(z, dim=1)
        scaled = -g * q_scale * log_p
        grad_target = (scaled * weight_c if weight_c is not None else scaled).to(target.dtype)
    return grad_input, grad_target


# Note [Extras in the composite formulas]
# With the extras (Note [LLM extras in Python], _extras.py) the formulas above
# are those of the plain loss evaluated on z = map(x), the z-loss adds
# 2 * z_loss * lse(z) * (its row's upstream gradient) to the softmax
# coefficient `a` of every counted row (csrc/common/xent_math.h,
# z_loss_softmax_coef), with 'mean' taking 1/(number of counted rows) rather
# than the cross-entropy's 1/(total weight), and the gradient for z is
# multiplied by dz/dx. All of it in differentiable torch ops (lse from
# torch.logsumexp, not the saved row statistics), so a double backward
# differentiates the map and the z-loss as well.


def _z_loss_coef(grad_loss: Tensor, reduction: int, z: Tensor, valid: Tensor | None, z_loss: float,
                 acc: torch.dtype) -> Tensor | float:
    """The z-loss's share of the softmax coefficient per row, (N, K) (0.0 when off;
    Note [Extras in the composite formulas]); ``valid`` the counted rows (None: all)."""
    if z_loss == 0.0:
        return 0.0
    n, _, k = z.shape
    if valid is None:
        count: Tensor | int = max(n * k, 1)
        g = _rows_grad(grad_loss, reduction, n, k, 1.0 / count, acc)
    else:
        g = _rows_grad(grad_loss, reduction, n, k, 1.0 / valid.to(acc).sum(), acc)
        g = torch.where(valid, g, torch.zeros((), dtype=acc, device=g.device))
    return g * (2.0 * z_loss) * torch.logsumexp(z, dim=1)


def _times_slope(grad_z: Tensor, x: Tensor, logit_scale: float, softcap: float | None) -> Tensor:
    """The gradient for x from the gradient for z (Note [Extras in the composite formulas])."""
    if softcap is None and logit_scale == 1.0:
        return grad_z
    return grad_z * _extras.logit_slope(x, logit_scale, softcap)


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
    ctx.extras = inputs[7:]  # the extras, after loss_dtype (maybe left out: _extras.full)
    ctx.mark_non_differentiable(row_stats, total_weight)


def _index_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_total_weight: Tensor):
    if grad_loss is None:  # the loss itself got no gradient (grads are not materialized)
        return _input_grads(ctx)
    input, target, weight, row_stats, total_weight = ctx.saved_tensors
    args = (ctx.ignore_index, ctx.label_smoothing, ctx.reduction)
    if torch.is_grad_enabled():
        grad_input = _index_grad_composite(
            grad_loss, input, target, weight, total_weight, *args, _extras.full(ctx.extras)
        )
    else:
        grad_input = _ops.cross_entropy_index_backward(
            grad_loss, input, target, weight, row_stats, total_weight, *args, *ctx.extras
        )
    return _input_grads(ctx, grad_input)


# Note [Gradient in the forward] (Python side)
# When the logits (or a probability target) require grad, functional.py calls
# the *_forward_with_grad ops, which return the gradients for an upstream
# gradient of 1 (of 1 on every row for 'none') along with the loss. The first
# backward forms its result from them alone: hands them to autograd as they
# are when the upstream gradient is exactly 1 (loss.backward(); for 'none',
# loss.sum().backward()), else scales them in place, row by row for 'none'
# (e.g. by a GradScaler factor). It never reads the logits, so they may be
# modified in place between the forward and the backward, as with torch,
# whose log_softmax keeps its output rather than its input. The buffers are
# plain ctx attributes, not saved tensors, because they are handed out or
# scaled in place. A second backward through the same graph
# (retain_graph=True) and double backward recompute from the logits, saved
# with save_for_backward: if those were modified in place since the forward,
# autograd raises its own error there rather than returning the gradient of
# other logits.
#
# Rounding: scaling a stored fp32/fp64 gradient costs one more rounding of it,
# harmless there. A bf16/fp16 one is rounded twice (when stored, then the
# product, which torch forms in fp32 from a 0-d factor and rounds once):
# within one unit in the last place of the exactly rounded gradient, and
# exact for a power of two (the usual GradScaler factor). A per-row upstream
# gradient of a wider dtype ('none' under autocast: fp32 factors on a
# bf16/fp16 gradient) is applied in its own dtype too, never rounded to the
# gradient's first: a GradScaler factor of 65536 is inf in fp16. CUDA kernels
# widen as they go; torch's CPU kernels would take an fp32 copy of the whole
# gradient for the mixed in-place product, so the CPU widens a bounded block
# of rows at a time (_mul_rows_widened_).


# Rows of the gradient widened at a time by _mul_rows_widened_: a bounded fp32
# temporary (16 MB), whatever the logits' size.
_WIDENED_CHUNK_ELEMENTS = 1 << 22


def _mul_rows_widened_(grad: Tensor, rows: Tensor) -> Tensor:
    """``grad *= rows`` in place for a bf16/fp16 ``grad`` (N, C, K) and wider per-row
    factors ``rows`` (N, 1, K), formed in the factors' dtype and rounded once (Note
    [Gradient in the forward]), a bounded block of rows at a time."""
    n = grad.shape[0]
    step = max(1, _WIDENED_CHUNK_ELEMENTS // max(grad[0].numel(), 1)) if n else 1
    for start in range(0, n, step):
        block = grad[start:start + step]
        block.copy_(block.to(rows.dtype).mul_(rows[start:start + step]))
    return grad


def _is_one(grad_loss: Tensor, on_cuda: bool) -> bool:
    """Whether a 0-d upstream gradient is exactly 1 (one host sync on CUDA, none while
    a CUDA graph is being captured, where it is taken as not 1)."""
    if on_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return float(grad_loss) == 1.0


def _apply_upstream(grads: tuple, grad_loss: Tensor, reduction: int, out_of_place: bool = False) -> tuple:
    """The gradients for the upstream gradient ``grad_loss`` from ``grads`` (each
    computed for an upstream gradient of 1, None where not computed), scaled in
    place (Note [Gradient in the forward]), or out of place while traced."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    # Fake/functional tensors (opcheck, AOTAutograd), or a trace by dynamo.
    traced = out_of_place or type(grad_loss) is not torch.Tensor
    g = grad_loss
    if reduction == REDUCTION_NONE and not traced and g.numel() > 0 and all(s == 0 for s in g.stride()):
        g = g.as_strided((), ())  # one value for every row (loss.sum().backward())
    if g.dim() > 0:
        rows = g.unsqueeze(1)  # (N, 1, K): one factor per row, over the classes

        def scale(t: Tensor) -> Tensor:
            if traced:  # no mutation of a forward output (and no data-dependent branch)
                return (t * rows).to(t.dtype)
            if rows.dtype == t.dtype or t.is_cuda:
                return t.mul_(rows)
            return _mul_rows_widened_(t, rows)

        return tuple(None if t is None else scale(t) for t in grads)
    g = g.reshape(())
    if traced:
        return tuple(None if t is None else t * g for t in grads)
    if _is_one(g, present[0].is_cuda):
        return grads
    return tuple(None if t is None else t.mul_(g) for t in grads)


def _index_fused_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _index_setup_context(ctx, inputs, output[:3])
    ctx.fused_grad = output[3]
    ctx.mark_non_differentiable(*output[1:])  # (it replaces, not adds to, what was marked)


def _index_fused_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_tw: Tensor, _grad_grad: Tensor):
    fused, ctx.fused_grad = ctx.fused_grad, None
    if grad_loss is None or fused is None or torch.is_grad_enabled():
        # Not the first backward, or a double backward: from the saved logits.
        return _index_backward(ctx, grad_loss, _grad_row_stats, _grad_tw)
    return _input_grads(ctx, *_apply_upstream((fused,), grad_loss, ctx.reduction))


def _prob_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, target, weight, label_smoothing, reduction = inputs[:5]  # loss_dtype may be left out
    ctx.num_inputs = len(inputs)
    _, row_stats, coef_sum = output
    ctx.save_for_backward(input, target, weight, row_stats, coef_sum)
    ctx.set_materialize_grads(False)
    ctx.label_smoothing = label_smoothing
    ctx.reduction = reduction
    ctx.extras = inputs[6:]  # the extras, after loss_dtype (maybe left out: _extras.full)
    ctx.mark_non_differentiable(row_stats, coef_sum)


def _prob_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_coef_sum: Tensor):
    if grad_loss is None:
        return _input_grads(ctx)
    input, target, weight, row_stats, coef_sum = ctx.saved_tensors
    want_input, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        grad_input, grad_target = _prob_grads_composite(
            grad_loss, input, target, weight, ctx.label_smoothing, ctx.reduction, want_input, want_target,
            _extras.full(ctx.extras),
        )
    else:
        grad_input, grad_target = _ops.cross_entropy_prob_backward(
            grad_loss, input, target, weight, row_stats, coef_sum, ctx.label_smoothing, ctx.reduction, want_input,
            want_target, *ctx.extras
        )
        grad_input = grad_input if want_input else None
        grad_target = grad_target if want_target else None
    return _input_grads(ctx, grad_input, grad_target)


def _prob_fused_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, target, weight, label_smoothing, reduction, input_grad, target_grad = inputs[:7]
    _prob_setup_context(ctx, (input, target, weight, label_smoothing, reduction), output[:3])
    ctx.num_inputs = len(inputs)
    ctx.extras = inputs[8:]  # the extras, after loss_dtype (maybe left out: _extras.full)
    ctx.fused_grads = (output[3] if input_grad else None, output[4] if target_grad else None)
    ctx.mark_non_differentiable(*output[1:])


def _prob_fused_backward(ctx: Any, grad_loss: Tensor, _grad_row_stats: Tensor, _grad_coef_sum: Tensor,
                         _grad_gi: Tensor, _grad_gt: Tensor):
    fused, ctx.fused_grads = ctx.fused_grads, None
    want = ctx.needs_input_grad[:2]
    if (grad_loss is None or fused is None or torch.is_grad_enabled()
            or any(w and f is None for w, f in zip(want, fused))):
        # Not the first backward, a double backward, or a gradient the forward
        # was not asked for: from the saved logits.
        return _prob_backward(ctx, grad_loss, _grad_row_stats, _grad_coef_sum)
    wanted = tuple(f if w else None for w, f in zip(want, fused))
    return _input_grads(ctx, *_apply_upstream(wanted, grad_loss, ctx.reduction))


torch.library.register_autograd(
    "xent_ext::cross_entropy_index_forward", _index_backward, setup_context=_index_setup_context
)
torch.library.register_autograd(
    "xent_ext::cross_entropy_index_forward_with_grad", _index_fused_backward, setup_context=_index_fused_setup_context
)
torch.library.register_autograd(
    "xent_ext::cross_entropy_prob_forward", _prob_backward, setup_context=_prob_setup_context
)
torch.library.register_autograd(
    "xent_ext::cross_entropy_prob_forward_with_grad", _prob_fused_backward, setup_context=_prob_fused_setup_context
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
#
# Note [Transforms and forward-mode AD]
# Each caller has a second autograd.Function for torch.func transforms and
# forward-mode AD: the same forward, setup_context and backward, plus a jvp
# and a vmap staticmethod (xent_ext/_functorch.py), and a backward that
# always takes the composite path (Note [Double backward]): under a
# transform the saved tensors may be batched or carry tangents, which the
# fused backward ops would neither batch nor differentiate. The hot path
# keeps the reverse-only Function, whose setup_context saves nothing extra.
# A dual tensor does not require grad, so the no-grad shortcut would drop its
# tangent: while a forward-AD level is open (torch.autograd.forward_ad keeps
# its count in a module global, one attribute read) every call goes through
# the transform Function, whose apply gives each dual input's tangent to the
# jvp. Its backward is the composite one only while a transform is active or a
# level is open (forward-over-reverse: the gradient then carries a tangent);
# a backward run after the level has closed is the ordinary one, which uses a
# gradient formed in the forward, so the logits may be edited in place after
# the forward there too, as with torch.


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
    autograd directly (the dispatcher handles dead wrappers there), unless a
    forward-AD level is open (Note [Transforms and forward-mode AD]).
    """

    def forward(*args: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })

    def transform_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        setup_context(ctx, inputs, output)
        # Only the loss is differentiable. (One call: each mark_non_differentiable
        # replaces the previous set.)
        ctx.mark_non_differentiable(*output[1:])
        _functorch.save_for_forward(ctx, inputs, output)

    def composite_backward(ctx: Any, *grads: Any) -> Any:
        if not (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0):
            # The loss was recorded while a forward-AD level was open, and the level
            # has closed: no tangent can flow through this backward, so it is the
            # ordinary one, which uses a gradient formed in the forward.
            return backward(ctx, *grads)
        # Grad mode on selects the composite formulas (Note [Double backward]).
        with torch.enable_grad():
            return backward(ctx, *grads)

    transform_function = type(name + "_transformable", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(transform_setup_context),
        "backward": staticmethod(composite_backward),
        "jvp": staticmethod(_functorch.CALLERS[name].jvp),
    })
    apply_in_cpp = super(torch.autograd.Function, function).apply
    apply_transformable_in_cpp = super(torch.autograd.Function, transform_function).apply
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead

    def call(*args: Any) -> Any:
        if torch._C._are_functorch_transforms_active():
            return transform_function.apply(*args)
        if _forward_ad._current_level >= 0:
            return apply_transformable_in_cpp(*[unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return apply_in_cpp(*[unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])
        # Nothing to differentiate: no graph node, no setup_context (half the cost).
        return forward(*args)

    transform_function.vmap = staticmethod(_functorch.vmap_rule(name, call))
    call.__name__ = call.__qualname__ = name
    return call


# Each returns its op's outputs; the loss is the first.
index_loss = _eager_function(_ops.cross_entropy_index_forward, _index_setup_context, _index_backward, "index_loss")
fused_index_loss = _eager_function(
    _ops.cross_entropy_index_forward_with_grad, _index_fused_setup_context, _index_fused_backward, "fused_index_loss"
)
prob_loss = _eager_function(_ops.cross_entropy_prob_forward, _prob_setup_context, _prob_backward, "prob_loss")
fused_prob_loss = _eager_function(
    _ops.cross_entropy_prob_forward_with_grad, _prob_fused_setup_context, _prob_fused_backward, "fused_prob_loss"
)


# ---------------------------------------------------------------------------
# Note [Gradient written into the logits]
# inplace_backward=True (functional.py) calls the *_grad_into_ forwards, which
# write the gradient for an upstream gradient of 1 into the logits themselves
# while computing the loss: no logits-sized buffer is allocated, by the
# forward or the backward. Autograd learns of the write through an
# autograd.Function that calls mark_dirty on the logits and returns them as
# an extra output (the front end drops it): the logits' version counter moves,
# so any other node that saved them for its backward (torch.tanh and softmax
# keep their output) raises torch's in-place error when its backward runs,
# and the logits are rebased onto this node, so their producer (a Linear:
# h @ W.T saves h and W, not its output) gets the gradient as usual. The
# backward scales the stored gradient by the upstream gradient in place
# (_apply_upstream, as the fused path) and hands the logits' own memory on as
# the gradient. Because it consumes the stored gradient, a second backward
# and a double backward are refused, as is an upstream gradient for the
# returned logits (they hold the gradient, not a function of the input).
# Logits that are a view (logits.view(-1, V) of a (B, T, V) product) are
# written through their base: autograd lets a Function that modifies a view
# return that view alone, and would rebuild the base's gradient through
# CopySlices, with logits-sized copies. When the view covers every element of
# its base (a reshape or permutation of a dense tensor, checked by the front
# end), the base is the Function's input and is marked dirty, and the logits'
# layout within it is passed along; a view of part of a larger tensor is
# refused.
# Under torch.compile the Function is traced without mark_dirty: the op's
# declared write (Tensor(a!)) is functionalized, which also writes the
# gradient back into logits that are a graph input (mark_dirty there cut the
# loss's graph), the backward scales out of place (the traced branch of
# _apply_upstream), and where the buffers go is the compiler's memory
# planning (inductor reinplaces the write where nothing else reads the
# logits). Without mark_dirty nothing would tell autograd of the write while
# the graph is traced, and a node that saved the logits (torch.tanh) would
# read the gradient in the compiled backward: the traced forward bumps the
# logits' version counter itself (increment_version), so compiling such a
# graph fails with torch's in-place error, as it does for torch's own
# in-place ops on a saved tensor. The guards of the eager path that read autograd's metadata (second
# and double backward, the returned logits' gradient) do not apply there: the
# compiled backward reads the stored gradient without changing it.


def canonical_view(input: Tensor, layout: Any = None) -> Tensor:
    """``input`` viewed as (N, C, K), never copied (the caller checked that it can be viewed);
    ``layout``: (shape, strides, offset) of the logits within ``input``, when ``input`` is
    the base of a view that covers it (Note [Gradient written into the logits])."""
    if layout is not None:
        input = input.as_strided(*layout)
    if input.dim() == 1:
        return input.unsqueeze(0).unsqueeze(-1)
    if input.dim() == 2:
        return input.unsqueeze(-1)
    k = 1
    for size in input.shape[2:]:
        k *= size
    return input.view(input.shape[0], input.shape[1], k)


def _into_logits_setup(ctx: Any, input: Tensor, reduction: int, layout: Any) -> tuple:
    """Tell autograd about the write into ``input``; returns the extra outputs (the logits, eager only)."""
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.layout = layout
    ctx.consumed = False
    if torch.compiler.is_compiling():
        # Functionalization tracks the op's declared write (Tensor(a!)) itself, and
        # writes the result back into a graph input; mark_dirty would cut the
        # loss's graph there. The version counter still moves, so a node of the
        # traced graph that saved the logits raises torch's in-place error when
        # the graph is compiled (Note [Gradient written into the logits]).
        torch.autograd.graph.increment_version(input)
        ctx.save_for_backward(input)
        return ()
    ctx.mark_dirty(input)
    ctx.save_for_backward(input)  # an output now: autograd checks its version when it is read
    return (input,)


def _gradient_from_logits(ctx: Any, grad_loss: Any, grad_logits: tuple, grad_target: Any) -> tuple:
    """(grad_input, grad_target) from the gradient stored in the logits (Note [Gradient
    written into the logits]); grad_logits: the upstream gradient of the returned logits
    (eager) or (); grad_target: the target's stored unit gradient or None."""
    if torch.compiler.is_compiling():
        # Traced: the compiled backward scales out of place, so running it twice is
        # right, and there is no returned logits' gradient.
        (input,) = ctx.saved_tensors
        grad_input, grad_target = _apply_upstream(
            (canonical_view(input, ctx.layout), grad_target), grad_loss, ctx.reduction, out_of_place=True
        )
        return grad_input.reshape(input.shape), grad_target
    if grad_logits and grad_logits[0] is not None:
        raise RuntimeError(
            "xent_ext.cross_entropy(inplace_backward=True): after the forward the input holds the loss's "
            "gradient, not logits, so it cannot be used in the computation being differentiated. Use its "
            "values before the loss is computed, or call without inplace_backward."
        )
    if torch.is_grad_enabled():
        raise RuntimeError(
            "xent_ext.cross_entropy(inplace_backward=True) does not support double backward "
            "(create_graph=True): the forward overwrote the logits with their gradient, so there is nothing "
            "to differentiate the gradient from. Call without inplace_backward."
        )
    if ctx.consumed:
        raise RuntimeError(
            "xent_ext.cross_entropy(inplace_backward=True): the loss was already backpropagated once; the "
            "gradient stored in the input was used then (and scaled in place), so a second backward through "
            "the same graph cannot be computed. Call without inplace_backward to backpropagate twice."
        )
    ctx.consumed = True
    if grad_loss is None:
        return None, None
    (input,) = ctx.saved_tensors  # torch's error if the input was modified in place since
    stored = input.detach()
    _apply_upstream((canonical_view(stored, ctx.layout), grad_target), grad_loss, ctx.reduction)
    return stored, grad_target


class InplaceIndexLoss(torch.autograd.Function):
    """The class-index loss with its gradient written into the logits (Note [Gradient
    written into the logits]). Outputs: loss, row_stats, total_weight, and in eager mode
    the logits (dirty), which the caller drops."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, layout: Any, target: Tensor, weight: Any, ignore_index: int,
                label_smoothing: float, reduction: int, loss_dtype: Any, logit_scale: float, softcap: Any,
                z_loss: float) -> tuple:
        loss, row_stats, total_weight = _ops.cross_entropy_index_forward_grad_into_(
            canonical_view(input, layout), target, weight, ignore_index, label_smoothing, reduction, loss_dtype,
            logit_scale, softcap, z_loss,
        )
        logits = _into_logits_setup(ctx, input, reduction, layout)
        ctx.mark_non_differentiable(row_stats, total_weight)
        return (loss, row_stats, total_weight) + logits

    @staticmethod
    def backward(ctx: Any, grad_loss: Any, _grad_row_stats: Any, _grad_total_weight: Any, *grad_logits: Any) -> tuple:
        grad_input, _unused = _gradient_from_logits(ctx, grad_loss, grad_logits, None)
        return (grad_input,) + (None,) * 10


class InplaceProbLoss(torch.autograd.Function):
    """The probability-target loss with the logits' gradient written into them (Note
    [Gradient written into the logits]); the target's, when it requires grad, is kept
    aside. Outputs: loss, row_stats, coef_sum, and in eager mode the logits (dirty),
    which the caller drops."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, layout: Any, target: Tensor, weight: Any, label_smoothing: float,
                reduction: int, target_grad: bool, loss_dtype: Any, logit_scale: float, softcap: Any,
                z_loss: float) -> tuple:
        loss, row_stats, coef_sum, grad_target = _ops.cross_entropy_prob_forward_grad_into_(
            canonical_view(input, layout), target, weight, label_smoothing, reduction, target_grad, loss_dtype,
            logit_scale, softcap, z_loss,
        )
        logits = _into_logits_setup(ctx, input, reduction, layout)
        ctx.grad_target = grad_target if target_grad else None
        ctx.mark_non_differentiable(row_stats, coef_sum)
        return (loss, row_stats, coef_sum) + logits

    @staticmethod
    def backward(ctx: Any, grad_loss: Any, _grad_row_stats: Any, _grad_coef_sum: Any, *grad_logits: Any) -> tuple:
        stored, ctx.grad_target = ctx.grad_target, None
        grad_input, grad_target = _gradient_from_logits(ctx, grad_loss, grad_logits, stored)
        return (grad_input, None, grad_target) + (None,) * 8
