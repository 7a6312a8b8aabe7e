"""The LLM extras of ``xent_ext.cross_entropy``: their arguments, their math in torch ops, the aux result.

Note [LLM extras in Python]
``logit_scale``, ``softcap`` and ``z_loss`` change the loss (Note [Logit scale,
softcap and z-loss] in csrc/common/xent_math.h, which the kernels evaluate):

    z    = softcap * tanh(logit_scale * x / softcap)   (softcap on)
    z    = logit_scale * x                             (softcap off)
    loss = cross_entropy(z, ...) + z_loss * lse(z)^2 on every row that counts

with the z-loss term reduced like the loss, 'mean' dividing it by the number of
counted rows (not by the class weights). ``return_aux`` adds a
:class:`CrossEntropyAux` to the result and ``inplace_backward`` writes the
gradient into the logits (functional.py, _ops.py). This module holds the pieces
the Python side needs in one place each:

- ``parse``: the keyword arguments, validated, as an :class:`Extras`; the front
  end calls it only when one of them differs from its default, so the default
  call pays one chain of comparisons and nothing else;
- ``logit_map`` / ``logit_slope``: z and dz/dx in differentiable torch ops, for
  the composite gradients (double backward), the tangents and the reference;
- ``reference_loss``: the definition itself, composed of torch's own
  cross_entropy on z plus the z-loss, for the configurations the kernels do not
  take (Note [Handing over to torch], functional.py);
- ``aux_from_row_stats``: the aux result from the ops' row statistics, O(rows).

Nothing here imports the rest of xent_ext, so every module can use it.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = ["CrossEntropyAux"]

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


class CrossEntropyAux(NamedTuple):
    """What ``xent_ext.cross_entropy(..., return_aux=True)`` returns beside the loss.

    Both are detached (no gradient flows through them), in float32 (float64
    for float64 logits), computed from the row statistics the forward keeps
    anyway (O(rows), no second pass over the logits).

    Attributes:
        lse: log-sum-exp of each row of the (mapped) logits ``z``, shaped like the
            loss with ``reduction='none'`` (the target's shape for class indices).
            Ignored rows have theirs too.
        z_loss: the z-loss term that is part of the loss, reduced like it: per
            element for ``'none'`` (0 on ignored rows), the sum, or the sum over the
            number of counted rows for ``'mean'`` (nan when none counts, as the loss).
            Zero when ``z_loss=0``, but for that nan.
    """

    lse: Tensor
    z_loss: Tensor


class Extras(NamedTuple):
    """The validated extras of one call (``parse``)."""

    logit_scale: float
    softcap: Optional[float]
    z_loss: float
    return_aux: bool
    inplace_backward: bool
    op_args: tuple  # (logit_scale, softcap, z_loss): the ops' trailing arguments


DEFAULT_OP_ARGS = (1.0, None, 0.0)


# Note [Extras under torch.compile]
# A float argument of a compiled function that changes between calls becomes
# symbolic (a SymFloat) when dynamo recompiles it as dynamic. The checks below
# are therefore comparisons and arithmetic, which dynamo records as guards,
# rather than math.isfinite or float(), which it cannot trace: x - x == 0
# holds exactly for finite x (inf - inf and nan - nan are nan).


def _real(name: str, value: Any) -> Any:
    if type(value) is float or isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt)):
        raise TypeError(f"xent_ext.cross_entropy: {name} must be a real number, got {type(value).__name__}")
    return float(value) if not isinstance(value, torch.SymInt) else value * 1.0


def _finite(value: Any) -> bool:
    return value - value == 0.0  # Note [Extras under torch.compile]


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"xent_ext.cross_entropy: {name} must be True or False, got {type(value).__name__}")
    return value


def _got(value: Any) -> str:
    """The value for an error message, left out while dynamo traces: it cannot format a
    symbolic float, and would report that failure instead of the ValueError (which
    torch.compile(fullgraph=True) shows as the exception it observed)."""
    return "" if torch.compiler.is_compiling() else f", got {value}"


def parse(logit_scale: Any, softcap: Any, z_loss: Any, return_aux: Any, inplace_backward: Any) -> Extras:
    """The keyword arguments as an :class:`Extras`; TypeError for a wrong type,
    ValueError for a value with no meaning (the ops repeat the value checks for
    their direct callers, ops_common.h make_extras)."""
    logit_scale = _real("logit_scale", logit_scale)
    if not _finite(logit_scale) or logit_scale == 0.0:
        raise ValueError("xent_ext.cross_entropy: logit_scale must be finite and non-zero" + _got(logit_scale))
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if not (_finite(softcap) and softcap > 0.0):
            raise ValueError(
                "xent_ext.cross_entropy: softcap must be None (off) or a finite number > 0" + _got(softcap)
            )
    z_loss = _real("z_loss", z_loss)
    if not (_finite(z_loss) and z_loss >= 0.0):
        raise ValueError("xent_ext.cross_entropy: z_loss must be a finite number >= 0" + _got(z_loss))
    return_aux = _flag("return_aux", return_aux)
    inplace_backward = _flag("inplace_backward", inplace_backward)
    return Extras(logit_scale, softcap, z_loss, return_aux, inplace_backward, (logit_scale, softcap, z_loss))


def full(extras: tuple) -> tuple:
    """(logit_scale, softcap, z_loss) from the extras an op was called with, which a
    caller may leave out from the right (the ops' defaults then)."""
    return tuple(extras) + DEFAULT_OP_ARGS[len(extras):]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 logits, fp32 for the others (Note [Accumulation dtype])."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Note [Logit map in torch ops]
# The composite formulas (double backward, tangents, the reference) evaluate
# the kernels' LogitMap (csrc/common/xent_math.h) with torch ops on the logits
# already widened to the accumulation dtype, in the kernels' order of
# operations: z = softcap * tanh(x * (logit_scale / softcap)), the quotient
# formed once in double and rounded with the product's scalar, and
# dz/dx = logit_scale * (1 - t^2) with the same t. Both are differentiable, so
# a gradient formed from them can be differentiated again. Without a map they
# return x itself and the Python float 1.0, so the formulas cost nothing then.


def logit_map(x: Tensor, logit_scale: float, softcap: Optional[float]) -> Tensor:
    """z = map(x) (Note [Logit map in torch ops])."""
    if softcap is not None:
        return softcap * torch.tanh(x * (logit_scale / softcap))
    return x * logit_scale if logit_scale != 1.0 else x


def logit_slope(x: Tensor, logit_scale: float, softcap: Optional[float]) -> Union[Tensor, float]:
    """dz/dx at x (Note [Logit map in torch ops]): a tensor with softcap, else the scale."""
    if softcap is None:
        return logit_scale
    t = torch.tanh(x * (logit_scale / softcap))
    return logit_scale * (1.0 - t * t)


def counted_rows(target: Tensor, ignore_index: int) -> Tensor:
    """The rows that count (class-index targets): target != ignore_index, compared as
    integers (a uint8 tensor comparison would wrap ignore_index to its low byte, where
    the kernels compare integers; Note [uint8 targets with smoothing], functional.py)."""
    if target.dtype == torch.uint8 and not 0 <= ignore_index <= 255:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def reduce_z_loss(rows: Tensor, reduction: int, count: Union[Tensor, int]) -> Tensor:
    """The z-loss term reduced like the loss: rows, their sum, or their sum over the
    counted rows ('mean'; 0 / 0 = nan when none counts, as the loss)."""
    if reduction == REDUCTION_NONE:
        return rows
    total = rows.sum()
    return total / count if reduction == REDUCTION_MEAN else total


def aux_from_row_stats(row_stats: Tensor, keep: Optional[Tensor], z_loss: float, reduction: int,
                       shape: Any, acc: torch.dtype) -> CrossEntropyAux:
    """The aux result from the ops' row statistics ((2, N, K) float64: z's max and
    log-sum) and the counted rows ``keep`` ((N, K) bool; None: every row, as for
    probability targets). The z-loss term is formed in float64 from them, as the
    kernels form it (Note [Z-loss], csrc/common/xent_math.h), and rounded once."""
    lse64 = (row_stats[0] + row_stats[1]).detach()
    lse = lse64.to(acc).reshape(shape)
    # With z_loss = 0 too, so that a 'mean' over no counted rows is 0 / 0 = nan, as the loss.
    rows = z_loss * lse64 * lse64
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        count: Union[Tensor, int] = keep.sum()
    else:
        count = rows.numel()
    zl = reduce_z_loss(rows, reduction, count).to(acc)
    return CrossEntropyAux(lse, zl.reshape(shape) if reduction == REDUCTION_NONE else zl)


# ---------------------------------------------------------------------------
# Note [The reference for the extras]
# Where the kernels do not compute a configuration, functional.py hands it to
# torch's own cross_entropy (Note [Handing over to torch]); with extras on, it
# goes to reference_loss instead: the definition composed of torch ops, torch's
# cross_entropy applied to z (so torch's checks, errors and conventions hold
# for the cross-entropy part) plus the z-loss from torch.logsumexp. z is formed
# in the accumulation dtype (a bf16/fp16 z would be rounded before the
# softmax, where the kernels keep it in fp32) and the loss is returned in the
# dtype torch gives for the same arguments without extras. Real floating
# logits only: for others torch's own call reports its error.


def reference_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int,
                   label_smoothing: float, extras: Extras, loss_dtype: torch.dtype) -> Any:
    """The loss with extras by the definition, in torch ops (Note [The reference for the
    extras]); ``loss_dtype``: the dtype torch's call without extras would return. Returns
    the loss, or (loss, CrossEntropyAux) for return_aux."""
    if input.dim() == 0 or not input.is_floating_point():
        # torch's own error (a 0-d input, integer or complex logits).
        loss = torch._C._nn.cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing)
        raise TypeError(
            f"xent_ext.cross_entropy: logit_scale, softcap and z_loss need real floating-point logits of "
            f"at least one dimension, got {input.dtype} of shape {list(input.shape)} (torch's loss: {loss.dtype})"
        )
    widen = input.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    acc = accumulation_dtype(input.dtype) if widen else input.dtype
    z = logit_map(input.to(acc), extras.logit_scale, extras.softcap)
    w = weight
    if w is not None and w.dtype == input.dtype and w.is_floating_point():
        w = w.to(acc)  # torch wants the weight in the logits' dtype, which z's now is
    ce = torch._C._nn.cross_entropy_loss(z, target, w, reduction, ignore_index, label_smoothing)
    class_dim = 0 if input.dim() == 1 else 1
    if extras.z_loss == 0.0 and not extras.return_aux:
        return ce.to(loss_dtype)
    lse = torch.logsumexp(z, dim=class_dim)
    index_targets = target.shape != input.shape
    keep = counted_rows(target, ignore_index) if index_targets else None
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    rows = extras.z_loss * lse * lse
    if keep is not None:
        rows = torch.where(keep.reshape(rows.shape), rows, zero)
    zl = reduce_z_loss(rows, reduction, keep.sum() if keep is not None else rows.numel())
    # In the wider of the two dtypes; without a z-loss the cross-entropy is torch's alone.
    loss = (ce + zl).to(loss_dtype) if extras.z_loss != 0.0 else ce.to(loss_dtype)
    if not extras.return_aux:
        return loss
    aux_dtype = accumulation_dtype(input.dtype)
    return loss, CrossEntropyAux(lse.detach().to(aux_dtype), zl.detach().to(aux_dtype))
