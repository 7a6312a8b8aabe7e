"""Forward-mode AD and vmap for the xent_ext operators.

``_ops._eager_function`` gives each operator a second autograd.Function for
function transforms and forward-mode AD (``torch.autograd.forward_ad``,
``torch.func.jvp``/``vmap``/``jacfwd``/``jacrev``/``hessian``). This module
holds its pieces:

- ``index_jvp``/``prob_jvp``: the ``jvp`` staticmethods (Note [Tangents]);
- ``save_for_forward``: what ``setup_context`` keeps for them;
- ``vmap_rule``: the ``vmap`` staticmethod (Note [vmap of the ops]).

Everything here is written with torch operators, so a transform stacked on
top (``jacfwd`` of a ``jvp``, ``hessian``) differentiates or batches these
formulas in turn.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._C._functorch import TransformType

# _ops imports this module while it is itself being imported; its names are
# read at call time.
from . import _extras, _ops


# ---------------------------------------------------------------------------
# Note [Tangents]
# The loss is linear in the tangents, and its coefficients need only the
# softmax of the row: with p = softmax(x), q' = (1 - eps) q + eps / C the
# (smoothed) target distribution, w the class weights (1 without) and
# S = sum_c w_c q'_c,
#   d loss_row = S * sum_c p_c dx_c - sum_c w_c q'_c dx_c
#              - (1 - eps) * sum_c w_c log p_c dq_c        (probability targets)
#              - sum_c q'_c log p_c dw_c                   (probability targets)
# and for class indices q' is the smoothed one-hot of the target, masked to
# 0 for ignored targets. 'sum' sums the rows; 'mean' divides by the same
# denominator as the loss: the valid targets' weight sum (class indices, the
# op's total_weight) or the number of rows (probabilities).
#
# p and log p are recomputed from the logits with torch.softmax/log_softmax
# rather than taken from the op's saved row statistics: those are outputs
# marked non-differentiable, and a transform stacked on this formula (jacfwd
# of jvp, hessian) must see p depend on x.
# Temporaries: torch has no fused multiply-and-reduce over a dimension
# (vecdot and einsum form the product, or permute and copy for a batched
# matrix product), so each sum_c a_c b_c of two logits-sized tensors costs
# one logits-sized product; a sum weighted by a per-class vector alone is a
# matrix-vector product (torch.matmul(w, t): no temporary). For a logits
# tangent that is the softmax and one product (plus one more with
# probability targets, for sum_c w_c q_c dx_c); a target or weight tangent
# adds log_softmax and one product each; bf16/fp16 add their fp32 copies.
# In-place variants would save the products but break the differentiation
# of these formulas that stacked transforms rely on.
#
# The formulas compute in the accumulation dtype by explicit casts, with
# autocast off: a jvp runs inside the caller's autocast region, where
# torch.matmul would otherwise round its products to bf16/fp16.
#
# Extras (Note [LLM extras in Python], _extras.py): the formulas hold for z =
# map(x) with the tangent dz = dz/dx * dx, and the z-loss adds
#   d (z_loss * lse^2) = 2 * z_loss * lse * sum_c p_c dz_c
# on every counted row, reduced like the loss but with 'mean' dividing by the
# number of counted rows rather than the total weight.
#
# Class weights: torch's index-target loss is not differentiable with respect
# to the weight (its reverse mode raises, and its forward mode gives a
# partial or missing tangent), so a weight tangent there raises a clear
# error; with probability targets the weight tangent is computed.


def forward_ad_level_open() -> bool:
    """Whether a ``torch.autograd.forward_ad`` level is open (one attribute read)."""
    return _forward_ad._current_level >= 0


def gradient_in_forward_unused() -> bool:
    """Whether a gradient computed in the forward would go unused: under a
    differentiating transform (grad, vjp, jvp; not vmap alone) the loss is
    recorded by the transform Function, whose backward is then the composite
    one (Note [Transforms and forward-mode AD] in _ops). Under vmap alone the
    folded call is recorded by ordinary autograd, which does use it; with a
    forward-AD level open, a backward run after the level closes uses it.
    """
    if not torch._C._are_functorch_transforms_active():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() != TransformType.Vmap for level in stack)


def save_for_forward(ctx: Any, inputs: tuple, output: tuple) -> None:
    """setup_context's extra step on the transform path: keep what the jvp reads.

    ``inputs`` are the op's arguments: (input, target, weight, ...); the jvp
    also reads the index ops' 'mean' denominator (output 2) and the loss dtype.
    """
    ctx.save_for_forward(inputs[0], inputs[1], inputs[2], output[2])
    ctx.xent_args = inputs[3:]
    ctx.xent_loss_dtype = output[0].dtype
    ctx.xent_num_outputs = len(output)
    ctx.xent_device_type = inputs[0].device.type


def _autocast_off(jvp: Callable[..., tuple]) -> Callable[..., tuple]:
    """Runs ``jvp`` with autocast off for the logits' device (Note [Tangents])."""

    @functools.wraps(jvp)
    def wrapper(ctx: Any, *tangents: Any) -> tuple:
        with torch.autocast(ctx.xent_device_type, enabled=False):
            return jvp(ctx, *tangents)

    return wrapper


def _class_sum(t: Tensor, weight: Optional[Tensor]) -> Tensor:
    """sum_c w_c t_c per row ((N, C, K) -> (N, K)), w = 1 without weights: a
    matrix-vector product, no logits-sized temporary (Note [Tangents])."""
    return t.sum(1) if weight is None else torch.matmul(weight, t)


def _reduce(rows: Tensor, reduction: int, denominator: Optional[Tensor]) -> Tensor:
    if reduction == _ops.REDUCTION_NONE:
        return rows
    total = rows.sum()
    if reduction == _ops.REDUCTION_MEAN:
        # denominator None: the number of rows (0 / 0 = nan for no rows, as the loss).
        return total / (denominator if denominator is not None else rows.numel())
    return total


def _output_tangents(ctx: Any, loss_tangent: Tensor) -> tuple:
    # Only the loss is differentiable; the other outputs get no tangent.
    return (loss_tangent.to(ctx.xent_loss_dtype),) + (None,) * (ctx.xent_num_outputs - 1)


@_autocast_off
def index_jvp(ctx: Any, dx: Optional[Tensor], _dtarget: Any, dweight: Optional[Tensor], *_rest: Any) -> tuple:
    """Tangent of the class-index loss for a tangent of the logits (Note [Tangents])."""
    x, target, weight, total_weight = ctx.saved_tensors
    ignore_index, label_smoothing, reduction = ctx.xent_args[:3]
    if dweight is not None:
        raise RuntimeError(
            "xent_ext.cross_entropy: the loss with class-index targets is not differentiable with respect "
            "to `weight` (as in torch); got a forward-mode tangent for the weight. Differentiate with respect "
            "to the input, or use probability targets."
        )
    acc = _ops.accumulation_dtype(x.dtype)
    n, c, k = x.shape
    if dx is None:  # no tangent reached the loss (none for the logits, none possible for the target)
        shape = (n, k) if reduction == _ops.REDUCTION_NONE else ()
        return _output_tangents(ctx, torch.zeros(shape, dtype=acc, device=x.device))
    z, dx = _mapped(ctx, x.to(acc), dx.to(acc))  # dx is dz from here on
    w = weight.to(acc) if weight is not None else None
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w_target = w[safe_target] if w is not None else torch.ones_like(safe_target, dtype=acc)
    b = torch.where(valid, w_target, torch.zeros_like(w_target)) * (1.0 - label_smoothing)
    p = torch.softmax(z, dim=1)
    p_dx = (p * dx).sum(1)
    dx_target = dx.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    rows = b * (p_dx - dx_target)
    if label_smoothing > 0:
        d = valid.to(acc) * (label_smoothing / c)
        weight_sum = w.sum() if w is not None else c
        rows = rows + d * (weight_sum * p_dx - _class_sum(dx, w))
    tangent = _reduce(rows, reduction, total_weight.to(acc))
    z_rows = _z_loss_rows(ctx, z, p_dx, valid)
    if z_rows is not None:
        tangent = tangent + _reduce(z_rows, reduction, valid.to(acc).sum())
    return _output_tangents(ctx, tangent)


def _mapped(ctx: Any, x: Tensor, dx: Optional[Tensor]) -> tuple:
    """(z, dz) for logits x and their tangent dx, both in the accumulation dtype (Note [Tangents])."""
    logit_scale, softcap, _ = _extras.full(ctx.extras)
    if softcap is None and logit_scale == 1.0:
        return x, dx
    z = _extras.logit_map(x, logit_scale, softcap)
    return z, (None if dx is None else dx * _extras.logit_slope(x, logit_scale, softcap))


def _z_loss_rows(ctx: Any, z: Tensor, p_dz: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    """The z-loss's tangent per row, 2 z_loss lse(z) sum_c p_c dz_c, 0 on rows that do not
    count (``valid``; None: all count); None when the z-loss is off (Note [Tangents])."""
    z_loss = _extras.full(ctx.extras)[2]
    if z_loss == 0.0:
        return None
    rows = (2.0 * z_loss) * torch.logsumexp(z, dim=1) * p_dz
    return rows if valid is None else torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


@_autocast_off
def prob_jvp(ctx: Any, dx: Optional[Tensor], dq: Optional[Tensor], dweight: Optional[Tensor], *_rest: Any) -> tuple:
    """Tangent of the probability-target loss for tangents of the logits, target and weight (Note [Tangents])."""
    x, q, weight, _ = ctx.saved_tensors
    label_smoothing, reduction = ctx.xent_args[:2]
    acc = _ops.accumulation_dtype(x.dtype)
    n, c, k = x.shape
    xa, dx = _mapped(ctx, x.to(acc), None if dx is None else dx.to(acc))  # z and dz from here on
    q = q.to(acc)
    w = weight.to(acc) if weight is not None else None
    keep = 1.0 - label_smoothing
    uniform = label_smoothing / c
    rows = torch.zeros((n, k), dtype=acc, device=x.device)
    if dx is not None:
        p = torch.softmax(xa, dim=1)
        weight_sum = w.sum() if w is not None else c
        coef_sum = keep * _class_sum(q, w) + uniform * weight_sum
        p_dx = (p * dx).sum(1)
        rows = rows + coef_sum * p_dx - keep * _class_sum(q * dx, w)
        if label_smoothing > 0:
            rows = rows - uniform * _class_sum(dx, w)
        z_rows = _z_loss_rows(ctx, xa, p_dx, None)
        if z_rows is not None:
            rows = rows + z_rows  # 'mean' divides both by the number of rows
    if dq is not None or dweight is not None:
        log_p = torch.log_softmax(xa, dim=1)
        if dq is not None:
            dq = dq.to(acc)
            rows = rows - keep * _class_sum(log_p * dq, w)
        if dweight is not None:
            dw = dweight.to(acc)
            rows = rows - keep * _class_sum(q * log_p, dw)
            if label_smoothing > 0:
                rows = rows - uniform * _class_sum(log_p, dw)
    return _output_tangents(ctx, _reduce(rows, reduction, None))


# ---------------------------------------------------------------------------
# Note [vmap of the ops]
# vmap of an op folds the vmapped dimension into the rows: logits (B, N, C, K)
# become (B*N, C, K), batch-major, and the op runs once, with reduction
# 'none', so the fused kernels compute every sample's loss (and gradient) in
# one call. The per-sample reductions are then rebuilt from O(B*N*K) data
# with torch operators: 'sum' sums each sample's rows, 'mean' divides that by
# the sample's own denominator (its valid targets' weight sum, or its number
# of rows). Outputs are re-batched by kind (CALLERS): per-row statistics
# are unflattened where their rows are, the 'mean' denominator is rebuilt per
# sample, logits-sized gradients are unflattened and, for 'mean', divided by
# the sample's denominator (one more pass over them, only when the fused op
# runs under vmap).
# Folding copies only what cannot be viewed: an unbatched target against
# batched logits is expanded (O(B*N*K) for class indices; logits-sized for
# probabilities), unbatched logits against batched targets likewise, and
# logits whose vmapped and row dimensions cannot be merged are copied by
# reshape. Batched class weights (a different weight per sample) cannot be
# folded: those run the op once per sample, still through the kernels.
# With z-loss the folded rows carry its term, and a sample's 'mean' divides it
# by the sample's denominator, which is also the z-loss's (its counted rows)
# except with class weights on class-index targets: those run per sample too.

LOSS, ROW_STATS, DENOMINATOR, GRADIENT = "loss", "row_stats", "denominator", "gradient"


class Caller(NamedTuple):
    """What the transforms need to know about one caller in _ops (one operator)."""

    jvp: Callable[..., tuple]
    outputs: tuple  # the kind of each of the op's outputs, in order
    reduction_arg: int  # position of the `reduction` argument
    loss_dtype_arg: int  # position of the trailing `loss_dtype` argument (callers may leave it out)
    index_targets: bool


CALLERS = {
    "index_loss": Caller(index_jvp, (LOSS, ROW_STATS, DENOMINATOR), 5, 6, True),
    "fused_index_loss": Caller(index_jvp, (LOSS, ROW_STATS, DENOMINATOR, GRADIENT), 5, 6, True),
    "prob_loss": Caller(prob_jvp, (LOSS, ROW_STATS, ROW_STATS), 4, 5, False),
    "fused_prob_loss": Caller(prob_jvp, (LOSS, ROW_STATS, ROW_STATS, GRADIENT, GRADIENT), 4, 7, False),
}


def _fold(t: Tensor, bdim: Optional[int], batch: int) -> Tensor:
    """(B, N, ...) at bdim (None: the same for every sample) -> (B*N, ...)."""
    if bdim is None:
        t = t.unsqueeze(0).expand(batch, *t.shape)
    else:
        t = t.movedim(bdim, 0)
    return t.reshape(batch * t.shape[1], *t.shape[2:])


def _sample_rows(t: Tensor, batch: int, n: int, row_dim: int) -> Tensor:
    return t.unflatten(row_dim, (batch, n))


def vmap_rule(name: str, call: Callable[..., tuple]) -> Callable[..., Any]:
    """The ``vmap`` staticmethod for the autograd.Function of the caller ``name`` (Note [vmap of the ops]).

    ``call`` is that caller: the folded op goes through it again, so the
    transforms and autograd below this vmap level see an ordinary call.
    """
    caller = CALLERS[name]
    kinds, reduction_arg, loss_dtype_arg, is_index = (
        caller.outputs, caller.reduction_arg, caller.loss_dtype_arg, caller.index_targets
    )

    def vmap(info: Any, in_dims: Sequence[Optional[int]], *args: Any) -> tuple:
        batch = info.batch_size
        input, target, weight = args[0], args[1], args[2]
        reduction = args[reduction_arg]
        z_loss = _extras.full(args[loss_dtype_arg + 1:])[2]
        if in_dims[2] is not None or (is_index and weight is not None and z_loss != 0.0
                                      and reduction == _ops.REDUCTION_MEAN):
            # A weight per sample; or a weighted 'mean' with z-loss, whose two parts
            # have different per-sample denominators, which no scaling of the folded
            # rows (or of their gradients) reproduces.
            return _per_sample(call, batch, in_dims, args)
        x_dim, t_dim = in_dims[0], in_dims[1]
        n = input.shape[0] if x_dim is None else input.movedim(x_dim, 0).shape[1]
        k = input.shape[-1]
        folded = list(args)
        folded[0], folded[1] = _fold(input, x_dim, batch), _fold(target, t_dim, batch)
        folded[reduction_arg] = _ops.REDUCTION_NONE
        has_loss_dtype = len(args) > loss_dtype_arg
        loss_dtype = (args[loss_dtype_arg] if has_loss_dtype else None) or input.dtype
        if reduction != _ops.REDUCTION_NONE and has_loss_dtype:
            # The rows in the accumulation dtype, so each sample's sum is of the
            # unrounded rows, as the op's own reduction is.
            folded[loss_dtype_arg] = _ops.accumulation_dtype(input.dtype)
        outputs = call(*folded)
        if is_index:
            ignore_index = args[3]
            target_b = folded[1].view(batch, n, k)
            valid = target_b != ignore_index
            acc = outputs[2].dtype
            if weight is None:
                per_sample = valid.to(acc).sum((1, 2))
            else:
                w_target = weight.to(acc)[torch.where(valid, target_b, torch.zeros_like(target_b))]
                per_sample = torch.where(valid, w_target, torch.zeros_like(w_target)).sum((1, 2))
            denominator = per_sample
        else:
            denominator = None  # the number of rows, n * k
        result, out_dims = [], []
        for kind, out in zip(kinds, outputs):
            if kind == LOSS:
                rows = out.view(batch, n, k)
                if reduction == _ops.REDUCTION_NONE:
                    out = rows
                else:
                    acc = _ops.accumulation_dtype(out.dtype)
                    out = rows.to(acc).sum((1, 2))
                    if reduction == _ops.REDUCTION_MEAN:
                        out = out / (denominator.to(acc) if denominator is not None else n * k)
                    out = out.to(loss_dtype)
                result.append(out)
                out_dims.append(0)
            elif kind == ROW_STATS:
                row_dim = out.dim() - 2  # (..., N, K): lse (N, K), row_stats (2, N, K)
                result.append(_sample_rows(out, batch, n, row_dim))
                out_dims.append(row_dim)
            elif kind == DENOMINATOR:
                result.append(denominator.to(out.dtype))
                out_dims.append(0)
            elif kind == GRADIENT:
                if out.numel() == 0 and out.dim() == 1:  # a gradient not asked for
                    result.append(out)
                    out_dims.append(None)
                    continue
                out = _sample_rows(out, batch, n, 0)
                if reduction == _ops.REDUCTION_MEAN:
                    acc = _ops.accumulation_dtype(out.dtype)
                    if denominator is not None:
                        # Per row: ignored rows keep their zero (an all-ignored sample's
                        # 1/denominator is inf), as the op's own 'mean' gives them none.
                        inverse = (1.0 / denominator.to(acc)).view(-1, 1, 1)
                        scale: Any = torch.where(valid, inverse, torch.ones((), dtype=acc, device=inverse.device))
                        scale = scale.view(batch, n, *([1] * (out.dim() - 3)), k)
                    else:
                        scale = 1.0 / (n * k)
                    out = (out.to(acc) * scale).to(out.dtype)
                result.append(out)
                out_dims.append(0)
        return tuple(result), tuple(out_dims)

    return vmap


def _per_sample(call: Callable[..., tuple], batch: int, in_dims: Sequence[Optional[int]], args: tuple) -> tuple:
    """Batched class weights: the op once per sample, results stacked (Note [vmap of the ops])."""
    per_sample = []
    for b in range(batch):
        sample_args = [
            a.select(d, b) if d is not None and isinstance(a, Tensor) else a for a, d in zip(args, in_dims)
        ]
        per_sample.append(call(*sample_args))
    result, out_dims = [], []
    for outs in zip(*per_sample):
        if all(o.dim() == 1 and o.numel() == 0 for o in outs):  # a gradient not asked for
            result.append(outs[0])
            out_dims.append(None)
        else:
            result.append(torch.stack(outs))
            out_dims.append(0)
    return tuple(result), tuple(out_dims)
