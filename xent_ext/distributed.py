"""Vocabulary-parallel cross-entropy on ``torch.distributed``.

With tensor (vocabulary) parallelism each rank of a process group holds a slice
of the classes: rank ``r`` has the logits of classes ``[start_r, start_r + V_r)``
(``local_logits`` of shape ``(N, V_r)``) and the full targets. The functions
here compute, on every rank, exactly what ``xent_ext.cross_entropy`` computes on
the logits of all ranks concatenated along the class dimension (label
smoothing, class weights, ``ignore_index``, every reduction and the LLM extras
included) without gathering the logits: three collectives of O(rows) elements
per call, and no collective in the backward of the logits.

- :func:`vocab_parallel_cross_entropy`: from each rank's slice of the logits;
- :func:`vocab_parallel_linear_cross_entropy`: from each rank's rows of the
  output projection (``local_linear_weight`` of shape ``(V_r, H)``), the input
  replicated; its backward all-reduces the input's gradient (one collective).

Both work with any backend (gloo on the CPU, NCCL on GPUs) and under
``torch.compile``. ``xent_ext.cross_entropy`` on a DTensor sharded on the class
dimension (``Shard(1)`` on a 1-D mesh) comes here too (:func:`dtensor_cross_entropy`).

Note [Vocabulary-parallel cross-entropy]
Per row (the class dimension moved to dim 1 and the trailing dims flattened, as
the kernels view it, (N, V_r, K)), with z = map(x) (Note [LLM extras in Python],
_extras.py), global class count V, class weights w (w = 1 without them) and
their global sum W, smoothing eps:

    L    = log sum_c exp(z_c)                       (over all ranks' classes)
    loss = (1 - eps) w_y (L - z_y) + (eps / V) (W L - sum_c w_c z_c) + z_loss L^2

on counted rows (0 on ignored rows); 'mean' divides the cross-entropy part by
sum_i w_{y_i} and the z-loss part by the number of counted rows (torch's
conventions, docs/semantics.md). Each rank computes its part of every sum:

1. one all_gather of a small int64 vector per rank (rows, V_r, vocab_start,
   a fingerprint of the target, an error code and message): gives V and this
   rank's start, and lets every rank raise the same error (Note [Errors on
   every rank]);
2. the local log-sum-exp lse_r of each row, from the fused kernel's row
   statistics (the forward op with every target ignored: one pass, no loss);
3. all_reduce MAX of lse_r: M; all_reduce SUM of one packed float64 tensor
   [exp(lse_r - M), z_y (0 off this shard), w_y (0 off this shard),
   sum_c w_c z_c (smoothing only), sum_c w_c (smoothing with weights only)];
   L = M + log(sum).

The gradient for the local z, per counted row, is

    (a p_c - b [c == y] - d w_c) * dz/dx,   p = exp(z - L),
    a = s (1 - eps) w_y + s (eps / V) W + t 2 z_loss L,  b = s (1 - eps) w_y,  d = s eps / V

with s, t the reduction's scales of the two parts (1, or 1/sum w_y and
1/count for 'mean'): everything it needs is local once L is known, so the
backward needs no collective. Probability targets: Note [Probability targets,
vocabulary-parallel].

Not covered: a uint8 target with label smoothing where torch's byte-wise
ignore mask differs from the integer comparison (Note [uint8 targets with
smoothing], functional.py: class indices are compared as integers here), and
differentiable class weights or probability targets (refused).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _extras, _ops
from ._extras import CrossEntropyAux

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "dtensor_cross_entropy",
    "is_available",
]

try:
    import torch.distributed as _dist

    _AVAILABLE = bool(_dist.is_available())
except ImportError:  # pragma: no cover - a torch built without distributed
    _dist = None  # type: ignore[assignment]
    _AVAILABLE = False

if _AVAILABLE:
    import torch.distributed._functional_collectives as _funcol
else:  # pragma: no cover
    _funcol = None  # type: ignore[assignment]

_REDUCTIONS = {"none": _extras.REDUCTION_NONE, "mean": _extras.REDUCTION_MEAN, "sum": _extras.REDUCTION_SUM}
_LOGIT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def is_available() -> bool:
    """Whether this torch has ``torch.distributed`` (the functions here need it)."""
    return _AVAILABLE


# ---------------------------------------------------------------------------
# Collectives.
#
# Note [Collectives in eager and compiled code]
# Every collective goes through the two functions below (three calls per loss,
# one more in the linear form's backward). Under torch.compile they are
# torch.distributed._functional_collectives: out-of-place ops that dynamo and
# AOTAutograd trace into the graph. In eager they are the plain c10d calls on a
# copy: the functional ones work there too (gloo and NCCL), but their first
# eager call imports torch._dynamo (seconds, once per process), and they add a
# custom-op dispatch to each call.


def _all_gather(t: Tensor, group: Any) -> Tensor:
    """(world * n,) from each rank's (n,) ``t``, in rank order."""
    if torch.compiler.is_compiling():
        gather = getattr(_funcol, "all_gather_single", None) or _funcol.all_gather_tensor
        return _wait(gather(t, 0, group))
    out = t.new_empty((_dist.get_world_size(group) * t.numel(),))
    gather = getattr(_dist, "all_gather_single", None) or _dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=group)
    return out


def _all_reduce(t: Tensor, op: str, group: Any) -> Tensor:
    """``t`` reduced with ``op`` ('sum', 'max') over the group, out of place."""
    if torch.compiler.is_compiling():
        return _wait(_funcol.all_reduce(t, op, group))
    out = t.clone(memory_format=torch.contiguous_format)
    _dist.all_reduce(out, op=_dist.ReduceOp.SUM if op == "sum" else _dist.ReduceOp.MAX, group=group)
    return out


def _wait(t: Tensor) -> Tensor:
    if isinstance(t, _funcol.AsyncCollectiveTensor):
        return t.wait()
    return t


def _resolve_group(group: Any, fn: str) -> tuple[Any, int, int]:
    """(process group, this rank's index in it, its size)."""
    if not _AVAILABLE:
        raise RuntimeError(f"xent_ext.distributed.{fn}: this torch was built without torch.distributed")
    if not _dist.is_initialized():
        raise RuntimeError(
            f"xent_ext.distributed.{fn}: the default process group is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    pg = _dist.group.WORLD if group is None else group
    return pg, _dist.get_rank(pg), _dist.get_world_size(pg)


# ---------------------------------------------------------------------------
# Arguments.
#
# Note [Errors on every rank]
# An error raised on some ranks only would leave the others waiting in the next
# collective for ever. So every check that can differ between ranks (the local
# shapes, dtypes, vocab_start, the other arguments) runs before the first
# collective and does not raise there: its exception type and message travel in
# the first collective's vector, and afterwards every rank raises the same
# exception (that of the lowest failing rank, its rank named in the message).
# The checks that need every rank's numbers (rows, the shards' tiling, the
# target's fingerprint) run on the gathered vectors, the same everywhere; the
# class-index range check on the target, which is the same everywhere once the
# fingerprints agree, raises the same IndexError on every rank.
# Any exception of the local checks travels (types other than TypeError,
# ValueError and IndexError as RuntimeError). These checks read the gathered
# vector on the host (one sync), in eager only: under torch.compile the local
# checks raise while tracing, on the ranks whose arguments are wrong only (the
# others then wait: check a new configuration in eager first), and the gathered
# numbers are used as tensors, unchecked (a compiled graph does not branch on
# data).

_ERROR_TYPES = {1: TypeError, 2: ValueError, 3: IndexError, 4: RuntimeError}
_ERROR_CODES = {TypeError: 1, ValueError: 2, IndexError: 3, RuntimeError: 4}
_MESSAGE_BYTES = 512  # of the message that travels (truncated beyond)
_HEADER = 7  # [N, rows, V_r, vocab_start or -1, fingerprint, error code, configuration]


class _Args:
    """The validated arguments of one call, in the kernels' (N, V_r, K) view."""

    x: Tensor  # (N, V_r, K)
    y: Tensor  # (N, K) the class indices as given (int64 or uint8); probabilities: (N, V_r, K)
    prob: bool  # probability targets (this rank's slice of them)
    w: Optional[Tensor]  # (V_r,)
    reduction: int
    ignore_index: int
    smoothing: float
    ex: _extras.Extras
    loss_shape: torch.Size
    vocab_start: Optional[int]


def _check_args(fn: str, local_logits: Any, target: Any, weight: Any, vocab_start: Any, ignore_index: Any,
                reduction: Any, label_smoothing: Any, logit_scale: Any, softcap: Any, z_loss: Any,
                return_aux: Any) -> _Args:
    """The local checks (Note [Errors on every rank]); raises TypeError / ValueError / RuntimeError."""
    where = f"xent_ext.distributed.{fn}"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: {reduction} is not a valid value for reduction (expected 'none', 'mean' or 'sum')")
    ex = _extras.parse(logit_scale, softcap, z_loss, return_aux, False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{where}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{where}: label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if label_smoothing > 1.0:
        raise ValueError(f"{where}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing:g}")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        raise TypeError(f"{where}: vocab_start must be None or an int, got {type(vocab_start).__name__}")
    if vocab_start is not None and vocab_start < 0:
        raise ValueError(f"{where}: vocab_start must be >= 0, got {vocab_start}")
    if not isinstance(local_logits, Tensor):
        raise TypeError(f"{where}: local_logits must be a Tensor, got {type(local_logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a Tensor, got {type(target).__name__}")
    if local_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"{where}: local_logits must be float64, float32, bfloat16 or float16, got {local_logits.dtype}"
        )
    if local_logits.dim() == 0:
        raise ValueError(f"{where}: local_logits must have at least one dimension, got a 0-d tensor")
    if target.device != local_logits.device:
        raise RuntimeError(f"{where}: target is on {target.device} but local_logits on {local_logits.device}")
    shape = tuple(local_logits.shape)
    # As torch: probabilities when the target has the logits' shape (and, unlike torch, a
    # floating dtype: (V_r,) logits of one class and a (1,) class index are class indices).
    prob = tuple(target.shape) == shape and target.is_floating_point()
    if prob:
        if target.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{where}: probability targets must be floating point, got {target.dtype}")
        if ignore_index >= 0:
            raise ValueError(f"{where}: ignore_index is not supported for probability targets, got {ignore_index}")
        if target.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{where}: probability targets are not differentiable here; pass target.detach()")
    elif target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            f"{where}: target must hold class indices as int64 (or uint8), or this rank's slice of the class "
            f"probabilities (the logits' shape), got {target.dtype} of shape {list(target.shape)}"
        )
    expected: tuple = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if not prob and len(shape) == 1 and tuple(target.shape) not in ((), (1,)):
        raise ValueError(f"{where}: for 1-D local_logits the target must be 0-d, got shape {list(target.shape)}")
    if not prob and len(shape) > 1 and tuple(target.shape) != expected:
        raise ValueError(
            f"{where}: target of shape {list(target.shape)} does not match local_logits of shape {list(shape)} "
            f"(expected {list(expected)}: the logits' shape without the class dimension 1, or the logits' shape "
            "for probabilities)"
        )
    v_r = shape[0] if len(shape) == 1 else shape[1]
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"{where}: weight must be None or a Tensor, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.numel() != v_r:
            raise ValueError(
                f"{where}: weight must be this rank's slice of the class weights, of shape [{v_r}] (local_logits' "
                f"classes), got {list(weight.shape)}"
            )
        if not prob and weight.dtype != local_logits.dtype:
            raise TypeError(f"{where}: weight must have local_logits' dtype {local_logits.dtype}, got {weight.dtype}")
        if prob and weight.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{where}: weight must be floating point, got {weight.dtype}")
        if weight.device != local_logits.device:
            raise RuntimeError(f"{where}: weight is on {weight.device} but local_logits on {local_logits.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{where}: the class weights are not differentiable; pass weight.detach()")
    a = _Args()
    a.prob = prob
    if len(shape) == 1:
        a.x, a.y = local_logits.reshape(1, v_r, 1), target.reshape(1, v_r, 1) if prob else target.reshape(1, 1)
    elif len(shape) == 2:
        a.x, a.y = local_logits.unsqueeze(-1), target.unsqueeze(-1)
    else:
        a.x, a.y = local_logits.flatten(2), target.flatten(2) if prob else target.flatten(1)
    a.w = weight
    a.reduction = _REDUCTIONS[reduction]
    a.ignore_index = ignore_index
    a.smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    a.ex = ex
    a.loss_shape = torch.Size(expected)
    a.vocab_start = vocab_start
    return a


def _configuration(a: _Args) -> int:
    """What decides the collectives' sizes and the math, as one integer: compared
    across ranks, so a mismatch raises rather than mixing incompatible tensors."""
    return (int(a.prob) | int(a.w is not None) << 1 | int(a.smoothing > 0.0) << 2 | a.reduction << 3
            | int(a.ex.z_loss != 0.0) << 5 | int(a.ex.softcap is not None) << 6)


def _fingerprint(y: Tensor) -> Tensor:
    """An int64 fingerprint of the class indices (wrapping sum of index * position),
    to detect targets that differ between ranks."""
    flat = y.reshape(-1).to(torch.int64)
    return (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)).sum().reshape(1)


class _Layout:
    """The group's layout of the classes, from the first collective."""

    start: Union[int, Tensor]  # this rank's first class
    num_classes: Union[int, Tensor]  # V


def _exchange(fn: str, a: Optional[_Args], error: Optional[BaseException], device: torch.device, pg: Any,
              rank: int, world: int) -> _Layout:
    """Collective 1 (Note [Vocabulary-parallel cross-entropy]) and the checks on its result
    (Note [Errors on every rank])."""
    where = f"xent_ext.distributed.{fn}"
    compiling = torch.compiler.is_compiling()
    if error is None:
        n, _, k = a.x.shape
        head = torch.tensor([n, n * k, a.x.shape[1], -1 if a.vocab_start is None else a.vocab_start, 0, 0,
                             _configuration(a)], dtype=torch.int64, device=device)
        if not a.prob:  # a probability target is each rank's own slice
            head = torch.cat([head[:4], _fingerprint(a.y).to(device), head[5:]])
        message = torch.zeros(_MESSAGE_BYTES // 8, dtype=torch.int64, device=device)
    else:
        code = _ERROR_CODES.get(type(error), 4)
        head = torch.tensor([0, 0, 0, -1, 0, code, 0], dtype=torch.int64, device=device)
        raw = str(error).encode("utf-8")[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0")
        message = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch.int64).to(device)
    gathered = _all_gather(torch.cat([head, message]), pg).view(world, _HEADER + _MESSAGE_BYTES // 8)
    out = _Layout()
    v_r = gathered[:, 2]
    if compiling:
        starts = torch.cumsum(v_r, 0) - v_r
        out.start = starts[rank] if a.vocab_start is None else a.vocab_start
        out.num_classes = v_r.sum()
        return out
    rows = gathered[:, :_HEADER].cpu().tolist()
    failed = [r for r in range(world) if rows[r][5] != 0]
    if failed:
        r = failed[0]
        text = bytes(gathered[r, _HEADER:].cpu().view(torch.uint8).tolist()).rstrip(b"\0").decode("utf-8", "replace")
        raise _ERROR_TYPES.get(rows[r][5], RuntimeError)(f"{text} [on rank {r} of {world}]")
    ns = [row[0] for row in rows]
    counts = [row[1] for row in rows]
    if len(set(ns)) != 1 or len(set(counts)) != 1:
        raise ValueError(
            f"{where}: local_logits must have the same rows on every rank (the same batch, each rank a slice of "
            f"the classes), got batch sizes {ns} and row counts {counts} on ranks 0..{world - 1}"
        )
    if len({row[6] for row in rows}) != 1:
        raise ValueError(
            f"{where}: the arguments differ between ranks (class indices or probabilities, weight or none, "
            "label_smoothing on or off, the reduction, the extras): every rank must make the same call"
        )
    if len({row[4] for row in rows}) != 1:
        raise ValueError(f"{where}: the target differs between ranks; every rank must pass the same class indices")
    sizes = [row[2] for row in rows]
    given = [row[3] for row in rows]
    total = sum(sizes)
    if all(s == -1 for s in given):
        out.start = sum(sizes[:rank])
    elif any(s == -1 for s in given):
        raise ValueError(
            f"{where}: vocab_start must be given on every rank or on none, got "
            f"{['None' if s == -1 else s for s in given]}"
        )
    else:
        spans = sorted(zip(given, sizes, range(world)))
        end = 0
        for s, size, r in spans:
            if s != end:
                what = "a gap" if s > end else "an overlap"
                raise ValueError(
                    f"{where}: the shards do not tile the classes [0, {total}): {what} at class {min(s, end)} "
                    f"(rank {r} starts at {s}, the shards before it end at {end}); shards (start, size) by rank: "
                    f"{list(zip(given, sizes))}"
                )
            end = s + size
        out.start = given[rank]
    out.num_classes = total
    return out


def _check_target_range(a: _Args, num_classes: int) -> None:
    """torch's IndexError for a class index outside [0, V) (eager; Note [Errors on every rank])."""
    y = a.y.reshape(-1).to(torch.int64)
    bad = _extras.counted_rows(a.y, a.ignore_index).reshape(-1) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        value = int(y[bad.nonzero()[0, 0]])
        raise IndexError(f"Target {value} is out of bounds.")


# ---------------------------------------------------------------------------
# The loss and its gradient.
#
# Note [Row partials in float64]
# The per-row numbers that cross ranks (exp(lse_r - M), z_y, w_y, the smoothing
# sums) and the loss formed from them are float64, whatever the logits' dtype:
# they are O(rows), so this costs nothing measurable, and the sums over ranks
# then add no rounding beyond the kernels' own. The local log-sum-exp comes in
# float64 from the kernel's row statistics. The gradient is formed in the
# accumulation dtype (float32, float64 for float64 logits) and stored in the
# logits' dtype, as the kernels do.
#
# Note [Local log-sum-exp from the kernel]
# The forward op called with every target ignored and reduction 'none' makes one
# pass over the logits (the logit map applied) and returns the row statistics
# (row max, log-sum; their sum is the row's log-sum-exp) and a zero loss: no
# second implementation of a numerically stable log-sum-exp, and no logits-sized
# temporary. A shard of no classes has lse = -inf (exp(-inf - M) = 0).


def _local_lse(a: _Args) -> Tensor:
    """(N, K) float64 log-sum-exp of this rank's z (Note [Local log-sum-exp from the kernel])."""
    n, v_r, k = a.x.shape
    if v_r == 0:
        return torch.full((n, k), float("-inf"), dtype=torch.float64, device=a.x.device)
    all_ignored = torch.full((n, k), a.ignore_index, dtype=torch.int64, device=a.x.device)
    stats = torch.ops.xent_ext.cross_entropy_index_forward(
        a.x, all_ignored, None, a.ignore_index, 0.0, _extras.REDUCTION_NONE, None, *a.ex.op_args[:2], 0.0
    )[1]
    return stats[0] + stats[1]


class _Result:
    loss: Tensor
    grad: Optional[Tensor]  # (N, V_r, K) in the logits' dtype, for an upstream gradient of 1 (per row for 'none')
    aux: Optional[CrossEntropyAux]


def _loss_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a tensor of ``dtype`` gives the loss: its own, or float32 for float32,
    bfloat16 and float16 under autocast for ``device`` (Note [Autocast], functional.py)."""
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.is_autocast_enabled(device.type):
        return torch.float32
    return dtype


def _loss_and_grad(a: _Args, layout: _Layout, pg: Any, want_grad: bool) -> _Result:
    """Collectives 2 and 3, the loss and (``want_grad``) the gradient for the local logits
    (Note [Vocabulary-parallel cross-entropy])."""
    if a.prob:
        return _prob_loss_and_grad(a, layout, pg, want_grad)
    x, y, w = a.x, a.y, a.w
    n, v_r, k = x.shape
    acc = _extras.accumulation_dtype(x.dtype)
    f64 = torch.float64
    eps, V, start = a.smoothing, layout.num_classes, layout.start
    logit_scale, softcap = a.ex.logit_scale, a.ex.softcap
    counted = _extras.counted_rows(y, a.ignore_index)
    local = y.to(torch.int64) - start
    on = counted & (local >= 0) & (local < v_r)
    idx = torch.where(on, local, torch.zeros_like(local)).unsqueeze(1)  # (N, 1, K)
    zero = torch.zeros((), dtype=f64, device=x.device)

    lse_r = _local_lse(a)
    m = _all_reduce(lse_r, "max", pg)
    # The target's logit (one per row), mapped: O(rows).
    if v_r > 0:
        z_y = _extras.logit_map(x.gather(1, idx).squeeze(1).to(acc), logit_scale, softcap).to(f64)
        w_y = w.to(f64)[idx.squeeze(1)] if w is not None else None
    else:  # a shard of no classes holds no target
        z_y = w_y = torch.zeros((n, k), dtype=f64, device=x.device)
    parts = [torch.exp(lse_r - m), torch.where(on, z_y, zero)]
    if w is not None:
        parts.append(torch.where(on, w_y, zero))
    z = None
    if eps > 0.0:
        # sum_c w_c z_c: without a softcap z = logit_scale * x, so a reduction of x itself.
        if softcap is None:
            s = torch.einsum("nck,c->nk", x.to(acc), w.to(acc)) if w is not None else x.sum(1, dtype=acc)
            parts.append(s.to(f64) * logit_scale)
        else:
            z = _extras.logit_map(x.to(acc), logit_scale, softcap)
            s = (z * w.to(acc).view(1, v_r, 1)).sum(1) if w is not None else z.sum(1)
            parts.append(s.to(f64))
    packed = torch.stack(parts).reshape(-1)
    weighted_smoothing = eps > 0.0 and w is not None
    if weighted_smoothing:
        packed = torch.cat([packed, w.to(f64).sum().reshape(1)])
    total = _all_reduce(packed, "sum", pg)
    rows = total[: len(parts) * n * k].view(len(parts), n, k)
    lse = m + torch.log(rows[0])
    z_y = rows[1]
    w_y = rows[2] if w is not None else counted.to(f64)
    w_all = total[-1] if weighted_smoothing else V

    # The loss (Note [Row partials in float64]).
    ce = (1.0 - eps) * w_y * (lse - z_y) if eps < 1.0 else torch.zeros_like(lse)
    if eps > 0.0:
        ce = ce + (eps / V) * (w_all * lse - rows[-1])
    ce = torch.where(counted, ce, zero)
    z_loss = a.ex.z_loss
    zl_rows = torch.where(counted, z_loss * lse * lse, zero)
    count = counted.sum()
    if a.reduction == _extras.REDUCTION_NONE:
        loss = ce
    elif a.reduction == _extras.REDUCTION_SUM:
        loss = ce.sum()
    else:
        denom = torch.where(counted, w_y, zero).sum()
        loss = ce.sum() / denom
    if z_loss != 0.0:
        loss = loss + _extras.reduce_z_loss(zl_rows, a.reduction, count)
    out = _Result()
    out.loss = loss.to(_loss_dtype(x.dtype, x.device))
    out.aux = None
    if a.ex.return_aux:
        out.aux = _extras.aux_from_row_stats(torch.stack([m, lse - m]), counted, z_loss, a.reduction,
                                             a.loss_shape, acc)
    out.grad = None
    if want_grad:
        s_ce: Any = 1.0
        s_zl: Any = 1.0
        if a.reduction == _extras.REDUCTION_MEAN:
            s_ce, s_zl = 1.0 / denom, 1.0 / count.to(f64)
        coef_a = s_ce * ((1.0 - eps) * w_y + (eps / V) * w_all) + s_zl * (2.0 * z_loss) * lse
        coef_b = torch.where(on, s_ce * (1.0 - eps) * w_y, zero)
        coef_d = torch.where(counted, s_ce * (eps / V) + zero, zero)
        coef_a = torch.where(counted, coef_a, zero)
        if z is None:
            z = _extras.logit_map(x.to(acc), logit_scale, softcap)
        # One logits-sized buffer, updated in place.
        g = torch.sub(z, lse.to(acc).unsqueeze(1)).exp_().mul_(coef_a.to(acc).unsqueeze(1))
        if eps > 0.0:
            w_c = w.to(acc).view(1, v_r, 1) if w is not None else torch.ones((), dtype=acc, device=x.device)
            g.sub_(coef_d.to(acc).unsqueeze(1) * w_c)
        if v_r > 0:
            g.scatter_add_(1, idx, -coef_b.to(acc).unsqueeze(1))
        if softcap is not None or logit_scale != 1.0:
            g.mul_(_extras.logit_slope(x.to(acc), logit_scale, softcap))
        out.grad = g.to(x.dtype)
    return out


# Note [Probability targets, vocabulary-parallel]
# With probabilities q (each rank holds its classes' slice) and q' = (1 - eps) q
# + eps / V, a row's loss is sum_c w_c q'_c (L - z_c) = L A - B with A = sum_c
# w_c q'_c and B = sum_c w_c q'_c z_c, both sums of per-rank parts: the third
# collective carries [exp(lse_r - M), A_r, B_r]. Every row counts (no
# ignore_index, as in torch); 'mean' divides by the number of rows, the z-loss
# too. The gradient for z is s (A p_c - w_c q'_c) + s 2 z_loss L p_c. The loss
# has the type torch promotes the logits, target and weight to; the gradient the
# logits' dtype. The target gets no gradient.


def _prob_loss_and_grad(a: _Args, layout: _Layout, pg: Any, want_grad: bool) -> _Result:
    """_loss_and_grad for probability targets (Note [Probability targets, vocabulary-parallel])."""
    x, w = a.x, a.w
    n, v_r, k = x.shape
    acc = _extras.accumulation_dtype(x.dtype)
    f64 = torch.float64
    eps, V = a.smoothing, layout.num_classes
    q = a.y.to(acc)
    if eps > 0.0:
        q = q * (1.0 - eps) + eps / V
    wq = q * w.to(acc).view(1, v_r, 1) if w is not None else q
    z = _extras.logit_map(x.to(acc), a.ex.logit_scale, a.ex.softcap)
    lse_r = _local_lse(a)
    m = _all_reduce(lse_r, "max", pg)
    packed = torch.stack([torch.exp(lse_r - m), wq.sum(1).to(f64), (wq * z).sum(1).to(f64)])
    total = _all_reduce(packed.reshape(-1), "sum", pg).view(3, n, k)
    lse = m + torch.log(total[0])
    coef_sum = total[1]
    rows = lse * coef_sum - total[2]
    z_loss = a.ex.z_loss
    count = n * k
    if a.reduction == _extras.REDUCTION_NONE:
        loss = rows
    else:
        loss = rows.sum() / count if a.reduction == _extras.REDUCTION_MEAN else rows.sum()
    if z_loss != 0.0:
        loss = loss + _extras.reduce_z_loss(z_loss * lse * lse, a.reduction, count)
    dtype = torch.promote_types(_loss_dtype(x.dtype, x.device), _loss_dtype(a.y.dtype, x.device))
    if w is not None:
        dtype = torch.promote_types(dtype, _loss_dtype(w.dtype, x.device))
    out = _Result()
    out.loss = loss.to(dtype)
    out.aux = None
    if a.ex.return_aux:
        out.aux = _extras.aux_from_row_stats(torch.stack([m, lse - m]), None, z_loss, a.reduction, a.loss_shape, acc)
    out.grad = None
    if want_grad:
        scale = 1.0 / count if a.reduction == _extras.REDUCTION_MEAN else 1.0
        coef = (scale * (coef_sum + (2.0 * z_loss) * lse)).to(acc).unsqueeze(1)
        g = torch.sub(z, lse.to(acc).unsqueeze(1)).exp_().mul_(coef).sub_(scale * wq)
        if a.ex.softcap is not None or a.ex.logit_scale != 1.0:
            g.mul_(_extras.logit_slope(x.to(acc), a.ex.logit_scale, a.ex.softcap))
        out.grad = g.to(x.dtype)
    return out


# Note [Gradient attached to the loss]
# The loss and the gradient are computed outside autograd (under no_grad); these
# Functions only attach the gradient to the loss, and their backward scales it by
# the upstream gradient (per row for 'none'): no recomputation, no collective for
# the logits. As for the fused single-process ops (Note [Gradient in the
# forward], _ops.py, whose _apply_upstream does the scaling), the buffer is a
# plain ctx attribute, handed out as it is for an upstream gradient of exactly 1
# and scaled in place otherwise, so the backward allocates nothing logits-sized.
# It is handed out once: a second backward through the same graph
# (retain_graph=True) and a double backward (create_graph=True) raise. Under
# torch.compile it is a saved tensor scaled out of place (a traced graph does not
# mutate its forward's outputs). The forward returns a copy of the loss (O(rows))
# so that its output is a tensor of its own.


def _keep_gradient(ctx: Any, grad: Tensor) -> tuple:
    """Keep the forward's gradient on ``ctx`` (Note [Gradient attached to the loss]);
    returns what to add to save_for_backward."""
    ctx.traced = torch.compiler.is_compiling()
    ctx.grad = None if ctx.traced else grad
    return (grad,) if ctx.traced else ()


def _take_gradient(ctx: Any, grad_loss: Tensor, saved: tuple, name: str) -> Tensor:
    """The kept gradient (N, V_r, K) times the upstream gradient (Note [Gradient attached to the loss])."""
    if ctx.traced:
        grad = saved[0]
    else:
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"xent_ext.distributed.{name}: double backward (create_graph=True) is not supported; the gradient "
                "is computed in the forward"
            )
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                f"xent_ext.distributed.{name}: a second backward through the same call is not supported (its "
                "gradient, computed in the forward, was handed to the first backward); call it again instead"
            )
    n, _, k = grad.shape
    if ctx.reduction == _extras.REDUCTION_NONE:
        grad_loss = grad_loss.reshape(n, k)
    return _ops._apply_upstream((grad,), grad_loss, ctx.reduction, ctx.traced)[0]


class _AttachLogitsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local_logits: Tensor, loss: Tensor, grad: Tensor, reduction: int) -> Tensor:
        ctx.save_for_backward(*_keep_gradient(ctx, grad))
        ctx.reduction = reduction
        ctx.shape = local_logits.shape
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        grad = _take_gradient(ctx, grad_loss, ctx.saved_tensors, "vocab_parallel_cross_entropy")
        return grad.reshape(ctx.shape), None, None, None


class _AttachLinearGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], loss: Tensor,
                grad: Tensor, reduction: int, group: Any) -> Tensor:
        ctx.save_for_backward(input, linear_weight, *_keep_gradient(ctx, grad))
        ctx.reduction = reduction
        ctx.group = group
        ctx.bias_dtype = None if linear_bias is None else linear_bias.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        input, linear_weight, *saved = ctx.saved_tensors
        g = _take_gradient(ctx, grad_loss, tuple(saved), "vocab_parallel_linear_cross_entropy").squeeze(-1)
        h = linear_weight.shape[1]
        flat = input.reshape(-1, h)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Each rank's classes contribute g_r @ W_r; the full gradient is their sum.
            partial = (g.to(linear_weight.dtype) @ linear_weight).to(input.dtype)
            grad_input = _all_reduce(partial, "sum", ctx.group).reshape(input.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t().to(flat.dtype) @ flat).to(linear_weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _run(fn: str, local_logits: Any, target: Any, weight: Any, vocab_start: Any, ignore_index: Any,
         reduction: Any, label_smoothing: Any, logit_scale: Any, softcap: Any, z_loss: Any, return_aux: Any,
         pg: Any, rank: int, world: int, device: torch.device, want_grad: bool) -> tuple[_Args, _Result]:
    """The checks, the three collectives, the loss and the gradient (no autograd)."""
    args = (fn, local_logits, target, weight, vocab_start, ignore_index, reduction, label_smoothing, logit_scale,
            softcap, z_loss, return_aux)
    a: Optional[_Args] = None
    error: Optional[BaseException] = None
    if torch.compiler.is_compiling():
        a = _check_args(*args)
    else:
        try:
            a = _check_args(*args)
        except Exception as e:  # noqa: BLE001 - shared with every rank (Note [Errors on every rank])
            error = e
    layout = _exchange(fn, a, error, device, pg, rank, world)
    if not torch.compiler.is_compiling() and not a.prob:
        _check_target_range(a, int(layout.num_classes))
    with torch.no_grad():
        result = _loss_and_grad(a, layout, pg, want_grad)
    return a, result


def _collective_device(pg: Any, *tensors: Any) -> torch.device:
    for t in tensors:
        if isinstance(t, Tensor):
            return t.device
    if _dist.get_backend(pg) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _finish(a: _Args, result: _Result, loss: Tensor, shape: Optional[torch.Size] = None) -> Any:
    """The loss ('none': in ``shape``, default the target's), with the aux result when asked."""
    shape = a.loss_shape if shape is None else shape
    if a.reduction == _extras.REDUCTION_NONE:
        loss = loss.reshape(shape)
    if not a.ex.return_aux:
        return loss
    lse, zl = result.aux
    return loss, CrossEntropyAux(lse.reshape(shape), zl.reshape(shape) if a.reduction == _extras.REDUCTION_NONE else zl)


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    vocab_start: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_aux: bool = False,
) -> Any:
    r"""Cross-entropy over logits sharded on the class dimension across a process group.

    Every rank of ``group`` calls it with its slice of the logits and the same
    targets; every rank gets the loss that ``xent_ext.cross_entropy`` gives on
    all ranks' logits concatenated along the class dimension (same arguments),
    and the gradient of its own slice. See Note [Vocabulary-parallel
    cross-entropy] for the math: three collectives of O(rows) elements per call
    (an all_gather of a few integers, an all_reduce max, an all_reduce sum), no
    all-gather of the logits, no collective in the backward.

    Args:
        local_logits: this rank's logits, ``(N, V_r)``, ``(V_r,)`` or
            ``(N, V_r, d1, ..., dK)``: the classes ``[vocab_start, vocab_start + V_r)``.
            float64, float32, bfloat16 or float16.
        target: GLOBAL class indices in ``[0, V)`` (or ``ignore_index``), int64 or
            uint8, of shape ``(N)`` (``()`` for 1-D logits, ``(N, d1, ..., dK)``),
            identical on every rank.

    Keyword Args:
        group: the process group (default: the world).
        vocab_start: this rank's first class. ``None`` on every rank: the shards
            follow rank order, each rank's start found from the others' ``V_r``
            (uneven shards need no argument). Given on every rank: the shards,
            sorted by start, must tile ``[0, V)``.
        weight: this rank's ``(V_r,)`` slice of the class weights (the logits' dtype).
        ignore_index, reduction, label_smoothing: as in ``xent_ext.cross_entropy``
            (``'mean'`` with weights divides by the global sum of the targets'
            weights, smoothing uses the global class count).
        logit_scale, softcap, z_loss, return_aux: the LLM extras of
            ``xent_ext.cross_entropy``; ``return_aux`` returns ``(loss,
            xent_ext.CrossEntropyAux)`` with the global log-sum-exp of each row.

    Returns:
        The loss in the logits' dtype (0-d, or the target's shape for
        ``'none'``), the same on every rank; ``(loss, aux)`` with ``return_aux``.

    Raises:
        The same exception on every rank, never a hang (Note [Errors on every
        rank]): ValueError for shards that do not tile ``[0, V)``, row counts or
        targets that differ between ranks; IndexError (torch's ``Target 7 is out
        of bounds.``) for a class index outside ``[0, V)``; TypeError /
        ValueError for wrong dtypes, shapes and arguments.

    Under ``torch.compile`` the argument checks run while tracing and the
    checks on other ranks' numbers (tiling, rows, target range) are skipped:
    a compiled graph does not branch on data. The gradient of the local logits
    is formed in the forward when they require grad under grad mode
    (logits-sized, in their dtype); the backward scales it.
    """
    fn = "vocab_parallel_cross_entropy"
    pg, rank, world = _resolve_group(group, fn)
    device = _collective_device(pg, local_logits, target)
    want_grad = isinstance(local_logits, Tensor) and local_logits.requires_grad and torch.is_grad_enabled()
    a, result = _run(fn, local_logits, target, weight, vocab_start, ignore_index, reduction, label_smoothing,
                     logit_scale, softcap, z_loss, return_aux, pg, rank, world, device, want_grad)
    loss = result.loss
    if want_grad:
        loss = _AttachLogitsGrad.apply(local_logits, loss, result.grad, a.reduction)
    return _finish(a, result, loss)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    vocab_start: Optional[int] = None,
    local_linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_aux: bool = False,
) -> Any:
    r"""Cross-entropy of ``input @ linear_weight.T (+ linear_bias)`` with the projection's rows
    (the classes) sharded across a process group.

    Every rank holds the same ``input`` ``(N, H)`` (or ``(..., H)`` with a target of
    shape ``(...)``) and its rows ``local_linear_weight`` ``(V_r, H)`` (and
    ``local_linear_bias`` ``(V_r,)``) of the full projection; the loss equals
    ``xent_ext.linear_cross_entropy`` with the full projection, on every rank.
    The other arguments are those of :func:`vocab_parallel_cross_entropy`.

    Gradients: ``local_linear_weight.grad`` (and the bias's) are this rank's
    rows of the full gradient. ``input.grad`` is the FULL gradient on every
    rank: the backward all-reduces (sums) the ranks' contributions over the
    group, its one collective, run only when ``input`` requires grad (which
    must then hold on every rank). Do not all-reduce it again.

    This version forms the local logits ``(N, V_r)`` (1/R of the full logits)
    and their gradient in the forward.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    pg, rank, world = _resolve_group(group, fn)
    where = f"xent_ext.distributed.{fn}"
    error: Optional[BaseException] = None
    logits: Any = None
    try:
        if not isinstance(input, Tensor) or not isinstance(local_linear_weight, Tensor):
            raise TypeError(f"{where}: input and local_linear_weight must be Tensors")
        if local_linear_weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != local_linear_weight.shape[1]:
            raise ValueError(
                f"{where}: input of shape {list(input.shape)} and local_linear_weight of shape "
                f"{list(local_linear_weight.shape)} do not match (expected (..., H) and (V_r, H))"
            )
        if input.dtype != local_linear_weight.dtype:
            raise TypeError(f"{where}: input is {input.dtype} but local_linear_weight {local_linear_weight.dtype}")
        rows = local_linear_weight.shape[0]
        if local_linear_bias is not None and (
            not isinstance(local_linear_bias, Tensor) or tuple(local_linear_bias.shape) != (rows,)
        ):
            raise ValueError(f"{where}: local_linear_bias must have shape [{local_linear_weight.shape[0]}]")
        if not isinstance(target, Tensor) or tuple(target.shape) != tuple(input.shape[:-1]):
            raise ValueError(
                f"{where}: target must have input's shape without its last dimension, {list(input.shape[:-1])}, got "
                f"{list(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
            )
        with torch.no_grad():
            flat = input.reshape(-1, input.shape[-1])
            logits = flat @ local_linear_weight.t()
            if local_linear_bias is not None:
                logits = logits + local_linear_bias.to(logits.dtype)
        flat_target = target.reshape(-1)
    except Exception as e:  # noqa: BLE001 - shared with every rank (Note [Errors on every rank])
        if torch.compiler.is_compiling():
            raise
        error = e
    device = _collective_device(pg, input, target)
    if error is not None:
        # Share it (Note [Errors on every rank]).
        _exchange(fn, None, error, device, pg, rank, world)
    tensors = (input, local_linear_weight) + (() if local_linear_bias is None else (local_linear_bias,))
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    a, result = _run(fn, logits, flat_target, weight, vocab_start, ignore_index, reduction, label_smoothing,
                     logit_scale, softcap, z_loss, return_aux, pg, rank, world, device, want_grad)
    loss = result.loss
    if want_grad:
        loss = _AttachLinearGrad.apply(input, local_linear_weight, local_linear_bias, loss, result.grad,
                                       a.reduction, pg)
    return _finish(a, result, loss, target.shape)


# ---------------------------------------------------------------------------
# DTensor.


# Note [DTensor logits]
# xent_ext.cross_entropy on a DTensor sharded on the class dimension of a 1-D
# mesh (Shard(class_dim)) is vocab_parallel_cross_entropy on its local shard,
# with the shard's start from DTensor's own layout (uneven shards included) and
# the mesh's process group; the result is what torch's loss_parallel returns on
# a 1-D mesh: the loss as a replicated DTensor (the aux result too). The target
# must be replicated (a DTensor placed Replicate, or a plain tensor, the same on
# every rank); the class weights are the full (V,) weights, replicated (as
# loss_parallel takes them), of which each rank uses its slice. The gradient
# flows back through from_local / to_local to a DTensor gradient sharded like
# the input. Other layouts (a 2-D mesh, sharding on another dimension) are
# refused with a ValueError rather than redistributed behind the caller's back.


def _dtensor_module() -> Any:
    import torch.distributed.tensor as dtensor

    return dtensor


def dtensor_cross_entropy(input: Any, target: Any, weight: Any = None, size_average: Optional[bool] = None,
                          ignore_index: int = -100, reduce: Optional[bool] = None, reduction: str = "mean",
                          label_smoothing: float = 0.0, *, logit_scale: float = 1.0, softcap: Optional[float] = None,
                          z_loss: float = 0.0, return_aux: bool = False, inplace_backward: bool = False) -> Any:
    """``xent_ext.cross_entropy`` on a DTensor ``input`` sharded on the class dimension
    (Note [DTensor logits]); the arguments are cross_entropy's. Returns a replicated
    DTensor loss (and aux)."""
    dt = _dtensor_module()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    where = "xent_ext.cross_entropy"
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if inplace_backward:
        raise ValueError(f"{where}: inplace_backward is not supported for DTensor logits")
    mesh = input.device_mesh
    class_dim = 0 if input.dim() == 1 else 1
    placements = tuple(input.placements)
    if mesh.ndim != 1 or not (placements[0].is_shard() and placements[0].dim % max(input.dim(), 1) == class_dim):
        raise ValueError(
            f"{where}: DTensor logits must be sharded on the class dimension {class_dim} of a 1-D device mesh "
            f"(placements (Shard({class_dim}),)), got placements {placements} on a {mesh.ndim}-D mesh; "
            "redistribute them first"
        )

    def replicated(t: Any, name: str) -> Any:
        if isinstance(t, dt.DTensor):
            if not all(p.is_replicate() for p in t.placements):
                raise ValueError(f"{where}: the {name} of DTensor logits must be replicated, got {tuple(t.placements)}")
            return t.to_local()
        return t

    target = replicated(target, "target")
    weight = replicated(weight, "weight")
    if isinstance(target, Tensor) and target.shape == input.shape:
        raise ValueError(f"{where}: DTensor logits take class-index targets only (not probabilities)")
    _, offset = compute_local_shape_and_global_offset(input.shape, mesh, placements)
    local = input.to_local()
    start = offset[class_dim]
    size = local.shape[class_dim]
    if isinstance(weight, Tensor) and weight.dim() == 1 and weight.numel() == input.shape[class_dim]:
        weight = weight[start:start + size]
    out = vocab_parallel_cross_entropy(
        local, target, group=mesh.get_group(0), vocab_start=start, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
        z_loss=z_loss, return_aux=return_aux)
    replicate = [dt.Replicate()]

    def wrap(t: Tensor) -> Any:
        return dt.DTensor.from_local(t, mesh, replicate, run_check=False)

    if return_aux:
        loss, aux = out
        return wrap(loss), CrossEntropyAux(wrap(aux.lse), wrap(aux.z_loss))
    return wrap(out)

