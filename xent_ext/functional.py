"""``xent_ext.cross_entropy``: torch-identical argument handling in front of the fused ops.

Everything torch accepts is computed by the fused kernels; everything torch
rejects is rejected with torch's exception type and message, in torch's order
of checks (see ``docs/semantics.md``). A few configurations that the
kernels do not cover are handed to torch's own implementation, which gives
exactly torch's result or error (Note [Handing over to torch]).
"""

from __future__ import annotations

import sys as _sys
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _extras, _ops, _torchscript
from ._C import build_info as _build_info
from ._extras import CrossEntropyAux

__all__ = ["cross_entropy", "CrossEntropyAux"]

_KERNEL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# CUDA tensors go to the fused kernels only when this build compiled them.
_KERNEL_DEVICES = ("cpu", "cuda") if _build_info()["cuda_version"] is not None else ("cpu",)

# c10's ScalarType names, which torch's C++ error messages use: the irregular
# ones; the others follow _dtype_name's rule (uint16 -> UInt16, float8_e5m2 ->
# Float8_e5m2, qint8 -> QInt8).
_DTYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_DTYPE_PREFIXES = (("quint", "QUInt"), ("qint", "QInt"), ("uint", "UInt"), ("bcomplex", "BComplex"))


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is not None:
        return name
    name = str(dtype).replace("torch.", "")
    for prefix, c10_prefix in _DTYPE_PREFIXES:
        if name.startswith(prefix):
            return c10_prefix + name[len(prefix):]
    return name[:1].upper() + name[1:]


# The range of torch's `int` arguments (int64_t).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_aux: bool = False,
    inplace_backward: bool = False,
) -> Any:
    r"""Cross-entropy between logits and targets; a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Same arguments in the same positional order, same results (forward and
    gradients), same errors, so ``torch.nn.functional.cross_entropy =
    xent_ext.cross_entropy`` breaks no caller. The loss is computed by fused
    kernels that read each logit once in the forward and once in the backward,
    never materialize log-probabilities, and accumulate in fp32 (fp64 for
    fp64 logits).

    Args:
        input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``;
            float64, float32, bfloat16 or float16; any strides.
        target: class indices of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)``
            (int64 or uint8, each in ``[0, C)`` or equal to ``ignore_index``),
            or class probabilities of the same shape as ``input`` (any floating
            dtype; the result is type-promoted). As in torch, the two are told
            apart by shape alone.
        weight: optional class weights of shape ``(C)``. With class indices it
            must have the input's dtype; the ``'mean'`` divides by the sum of
            the weights of the non-ignored targets.
        size_average: deprecated (see ``reduction``); overrides it when set.
        ignore_index: a class index whose targets contribute neither loss nor
            gradient. Any integer; must be negative with probability targets.
        reduce: deprecated (see ``reduction``); overrides it when set.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        label_smoothing: in ``[0.0, 1.0]``; mixes the target with the uniform
            distribution exactly as torch does (with weights and
            ``ignore_index``).

    Keyword Args:
        (Extras for language-model training, each off at its default, where
        the result is torch's bit for bit.)
        logit_scale: multiplies the logits first (finite, non-zero): the loss
            is computed on ``z = logit_scale * input``.
        softcap: ``None`` (off) or a finite number > 0: the logits are then
            capped smoothly, ``z = softcap * tanh(logit_scale * input / softcap)``.
        z_loss: a coefficient >= 0: adds ``z_loss * logsumexp(z)**2`` for every
            row that counts (not ignored), reduced like the loss, ``'mean'``
            dividing it by the number of counted rows (not by the class
            weights).
        return_aux: return ``(loss, aux)``, ``aux`` a
            :class:`xent_ext.CrossEntropyAux` ``(lse, z_loss)``: the
            log-sum-exp of each row of ``z`` and the z-loss term, detached,
            in float32 (float64 for float64 logits), at no extra pass over
            the logits.
        inplace_backward: when the input requires grad (under grad mode),
            write its gradient into the input itself during the forward,
            which saves a logits-sized buffer. **After the forward the input
            holds the gradient, not the logits.** The backward only scales
            it by the upstream gradient; a second backward and double
            backward are refused. For logits computed in the graph (e.g. a
            Linear's output, or a view of all of it such as
            ``logits.view(-1, V)``); a leaf tensor, a view of part of a
            larger tensor or one autograd forbids to modify in place, an
            input whose elements overlap or whose trailing dimensions cannot
            be viewed as one, and a mix of dtypes that needs a cast copy of
            the logits raise before anything is written. If another operation saved the logits for its own
            backward (``torch.tanh``, a softmax kept for later), backward
            raises torch's in-place modification error. Without a gradient to
            compute the input is left untouched. Not under torch.func
            transforms or forward-mode AD. Under torch.compile the write is
            functionalized (no mark_dirty; a graph input receives the
            gradient on return).

    Returns:
        The loss, in the input's dtype (or the promoted dtype with probability
        targets): a 0-d tensor for ``'mean'``/``'sum'``, the target's shape
        without the class dimension for ``'none'``. With ``return_aux=True``,
        ``(loss, aux)``.

    Example::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(32000, (8,))
        >>> loss = xent_ext.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()

    A DTensor ``input`` sharded on the class dimension of a 1-D device mesh
    is computed by ``xent_ext.distributed`` without gathering the logits
    (Note [DTensor logits], distributed.py).
    """
    if type(input) is not Tensor and _is_dtensor(input):
        from .distributed import dtensor_cross_entropy

        return dtensor_cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
            logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, return_aux=return_aux,
            inplace_backward=inplace_backward,
        )
    # Note [Extras on the hot path]: one chain of comparisons when every extra
    # is at its default; the defaults then take exactly the path they took
    # before the extras existed (ex is None).
    ex = None
    if logit_scale != 1.0 or softcap is not None or z_loss != 0.0 or return_aux is not False or (
        inplace_backward is not False
    ):
        ex = _extras.parse(logit_scale, softcap, z_loss, return_aux, inplace_backward)
    if has_torch_function_variadic(input, target, weight):
        # The extras only when set: a handler that forwards the call to torch's
        # cross_entropy keeps working for the plain call.
        extra_kwargs = {} if ex is None else dict(
            logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, return_aux=return_aux,
            inplace_backward=inplace_backward,
        )
        return handle_torch_function(
            cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
            **extra_kwargs,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _Reduction.get_enum(reduction)  # torch's ValueError / deprecation warning
    # Note [Argument types]: plain ints and floats pass on two type checks.
    if (
        type(ignore_index) is not int
        or not _INT64_MIN <= ignore_index <= _INT64_MAX
        or (type(label_smoothing) is not float and type(label_smoothing) is not int)
    ):
        ignore_index, label_smoothing = _parse_like_torch(
            input, target, weight, reduction_enum, ignore_index, label_smoothing
        )
    try:
        hand_over = _hand_over_to_torch(input, target, weight)
    except AttributeError:
        # Not a tensor (a list, None, a NumPy array): torch's TypeError if its
        # parser rejects the argument, else our own error.
        _parse_like_torch(input, target, weight, reduction_enum, ignore_index, label_smoothing)
        raise
    if hand_over:
        if ex is not None:
            return _reference(input, target, weight, reduction_enum, ignore_index, label_smoothing, ex)
        return torch._C._nn.cross_entropy_loss(input, target, weight, reduction_enum, ignore_index, label_smoothing)
    if input.shape == target.shape:
        # torch tells probability targets from class indices by shape alone.
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {_dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        if _prob_target_needs_torch(target, weight):
            if ex is not None:
                return _reference(input, target, weight, reduction_enum, ignore_index, label_smoothing, ex)
            return torch._C._nn.cross_entropy_loss(input, target, weight, reduction_enum, ignore_index, label_smoothing)
        return _prob_target_loss(input, target, weight, reduction_enum, label_smoothing, ex)
    _check_label_smoothing(label_smoothing)
    return _index_target_loss(input, target, weight, reduction_enum, ignore_index, label_smoothing, ex)


def _is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor; costs a dict lookup (a DTensor exists only once
    torch.distributed.tensor is imported, and xent_ext does not import it)."""
    mod = _sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, getattr(mod, "DTensor", ()))


# Note [Handing over to torch]
# These inputs go to torch's own cross_entropy (the C++ entry point, so a
# caller who replaced F.cross_entropy with ours cannot recurse):
# - dtypes and devices without a fused kernel: torch computes the result, or
#   raises its own error (integer or complex logits, a 0-d input);
# - tensors on different devices: torch raises its own device error;
# - class weights that require grad (with grad enabled) on the index path:
#   torch raises "not differentiable" there. (On the probability path they
#   are differentiable; see _prob_loss_with_weight_grad.)
# - sparse probability targets or weights, and complex weights with
#   probability targets (_prob_target_needs_torch);
# - uint8 targets with smoothing where torch's byte-wise ignore mask differs
#   from ours (Note [uint8 targets with smoothing]).
# With extras on, each of these goes to _reference instead: the definition in
# torch ops, torch's cross_entropy on the mapped logits plus the z-loss (Note
# [The reference for the extras], _extras.py), so torch's checks and
# conventions still decide the cross-entropy part.
def _hand_over_to_torch(input: Tensor, target: Tensor, weight: Optional[Tensor]) -> bool:
    if input.dim() == 0 or input.dtype not in _KERNEL_DTYPES or input.device.type not in _KERNEL_DEVICES:
        return True
    if target.device != input.device or (weight is not None and weight.device != input.device):
        return True
    if _weight_needs_grad(weight) and input.shape != target.shape:
        return True
    # A 0-d class-index target with batched input: torch reads its missing
    # batch dimension; whatever it reports is the contract.
    if target.dim() == 0 and input.dim() != 1:
        return True
    # Probability targets with zero classes: torch's empty-sum conventions.
    return input.shape == target.shape and target.is_floating_point() and input.shape[_class_dim(input)] == 0


def _prob_target_needs_torch(target: Tensor, weight: Optional[Tensor]) -> bool:
    """Probability targets the kernels don't take (Note [Handing over to torch]).

    A sparse target or weight (torch densifies it, or raises its own error with
    smoothing), and a complex weight (torch promotes the loss to complex).
    """
    if target.layout != torch.strided:
        return True
    return weight is not None and (weight.layout != torch.strided or weight.is_complex())


# Note [Argument types]
# torch's C++ argument parser decides which Python objects its cross_entropy_loss
# takes, with rules of its own: ignore_index may be a NumPy integer or an
# integer tensor of one element but not a bool, a float or an int beyond int64;
# label_smoothing may be an int or a 0-d tensor but not a 1-element 1-d one;
# input, target and weight must be tensors. Anything else is its TypeError
# ("argument 'ignore_index' (position 5) must be int, not bool") or ValueError
# ("Overflow when unpacking long long"). Rather than restate those rules, an
# ignore_index or label_smoothing that is not a plain int / float, and a tensor
# argument that turns out not to be a tensor, is put to the parser itself:
# torch's cross_entropy_loss on tiny meta tensors standing in for the real
# ones, which parses every argument in torch's order and computes nothing real.
# The common call pays two type checks and a range check.
_STAND_IN_INPUT = torch.empty(1, 1, device="meta")
_STAND_IN_TARGET = torch.empty(1, dtype=torch.int64, device="meta")
_STAND_IN_WEIGHT = torch.empty(1, device="meta")


def _parse_like_torch(
    input: Any, target: Any, weight: Any, reduction: int, ignore_index: Any, label_smoothing: Any
) -> tuple[int, float]:
    """torch's parser's verdict on the arguments (Note [Argument types]).

    Raises torch's exception for an argument of the wrong type; otherwise
    returns ignore_index and label_smoothing as a Python int and float.
    """
    try:
        torch._C._nn.cross_entropy_loss(
            _STAND_IN_INPUT if isinstance(input, Tensor) else input,
            _STAND_IN_TARGET if isinstance(target, Tensor) else target,
            _STAND_IN_WEIGHT if isinstance(weight, Tensor) else weight,
            reduction,
            ignore_index,
            label_smoothing,
        )
    except RuntimeError as e:
        # Parsed; the stand-ins then fail only on a label_smoothing above 1,
        # which the real inputs report in torch's order.
        if not str(e).startswith("label_smoothing must be between"):
            raise
    return int(ignore_index), float(label_smoothing)


def _weight_needs_grad(weight: Optional[Tensor]) -> bool:
    return weight is not None and weight.requires_grad and torch.is_grad_enabled()


def _check_label_smoothing(label_smoothing: float) -> None:
    # Only values > 1 are rejected; negative and nan act as 0 (torch checks > 0 first).
    if label_smoothing > 0.0 and label_smoothing > 1.0:
        # C++ streams print doubles with 6 significant digits, as %g does.
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _as_ncK(t: Tensor) -> Tensor:
    """View a (C,), (N, C) or (N, C, d1, ...) tensor as (N, C, K); copies only if the strides can't be merged.

    Its C++ twin is ``detail::as_nck`` in include/xent_ext/xent_ext.h: the two must agree.
    """
    if t.dim() == 1:
        return t.unsqueeze(0).unsqueeze(-1)
    if t.dim() == 2:
        return t.unsqueeze(-1)
    return t.flatten(2)


def _prob_target_loss(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, label_smoothing: float,
    ex: Optional[_extras.Extras],
) -> Any:
    num_classes = input.shape[_class_dim(input)]
    if weight is not None and not (weight.dim() == 1 and weight.numel() == num_classes):
        raise RuntimeError(
            f"cross_entropy: weight tensor should be defined either for all {num_classes} classes "
            f"or no classes but got weight tensor of shape: {list(weight.shape)}"
        )
    _check_label_smoothing(label_smoothing)
    # torch multiplies log_softmax(input) * target * weight: the result type is
    # promoted over all three (over their autocast dtypes under autocast).
    device_type = input.device.type
    dtype = torch.promote_types(_autocast_dtype(input.dtype, device_type), _autocast_dtype(target.dtype, device_type))
    if weight is not None:
        dtype = torch.promote_types(dtype, _autocast_dtype(weight.dtype, device_type))
    w = weight.to(dtype) if weight is not None else None
    smoothing = label_smoothing if label_smoothing > 0.0 else 0.0
    # Note [Autocast]: bf16/fp16 logits and a target of the same dtype are read
    # as they are, with an fp32 loss; other mixes are copied to the promoted
    # dtype, as autocast itself copies them.
    loss_dtype = _autocast_loss_dtype(input) if target.dtype == input.dtype and dtype == torch.float32 else None
    if ex is not None:
        if _weight_needs_grad(weight):
            # Learned class weights: the definition in torch ops, differentiable in the
            # weight (ignore_index plays no part with probability targets).
            return _reference(input, target, weight, reduction, -100, label_smoothing, ex)
        return _prob_loss_with_extras(input, target, w, reduction, smoothing, dtype, loss_dtype, ex)
    if _weight_needs_grad(weight):
        loss = _prob_loss_with_weight_grad(_as_ncK(input.to(dtype)), _as_ncK(target.to(dtype)), w, reduction, smoothing)
    else:
        x = _as_ncK(input if loss_dtype is not None else input.to(dtype))
        q = _as_ncK(target if loss_dtype is not None else target.to(dtype))
        if _gradient_in_forward(x, q):
            loss = _ops.fused_prob_loss(x, q, w, smoothing, reduction, _requires_grad(x), _requires_grad(q), loss_dtype)[0]
        elif torch.compiler.is_compiling():
            loss = torch.ops.xent_ext.cross_entropy_prob_forward(x, q, w, smoothing, reduction, loss_dtype)[0]
        else:
            loss = _ops.prob_loss(x, q, w, smoothing, reduction, loss_dtype)[0]
    if reduction == _ops.REDUCTION_NONE:
        loss = loss.reshape(_prob_loss_shape(input))
    return loss


def _prob_loss_shape(input: Tensor) -> torch.Size:
    return input.shape[:_class_dim(input)] + input.shape[_class_dim(input) + 1:]


def _prob_loss_with_extras(
    input: Tensor, target: Tensor, w: Optional[Tensor], reduction: int, smoothing: float, dtype: torch.dtype,
    loss_dtype: Optional[torch.dtype], ex: _extras.Extras,
) -> Any:
    """_prob_target_loss's kernel path with extras on (the same steps, the extras passed on)."""
    into = _gradient_into_input(input) if ex.inplace_backward else None
    if into is not None:
        if loss_dtype is None and dtype != input.dtype:
            why = "under autocast" if torch.is_autocast_enabled(input.device.type) else "by type promotion"
            raise RuntimeError(
                f"xent_ext.cross_entropy(inplace_backward=True): the {input.dtype} logits would be cast to {dtype} "
                f"({why}, with a {target.dtype} target), and the gradient cannot be written into a cast copy. "
                "Give the target the logits' dtype, or call without inplace_backward."
            )
        _check_no_shared_memory(input, target, "target")
        q = _as_ncK(target if loss_dtype is not None else target.to(dtype))
        loss, row_stats = _ops.InplaceProbLoss.apply(
            *into, q, w, smoothing, reduction, q.requires_grad and torch.is_grad_enabled(), loss_dtype, *ex.op_args
        )[:2]
        acc = _ops.accumulation_dtype(input.dtype)
    else:
        x = _as_ncK(input if loss_dtype is not None else input.to(dtype))
        q = _as_ncK(target if loss_dtype is not None else target.to(dtype))
        args = (x, q, w, smoothing, reduction)
        if _gradient_in_forward(x, q):
            outs = _ops.fused_prob_loss(*args, _requires_grad(x), _requires_grad(q), loss_dtype, *ex.op_args)
        elif torch.compiler.is_compiling():
            outs = torch.ops.xent_ext.cross_entropy_prob_forward(*args, loss_dtype, *ex.op_args)
        else:
            outs = _ops.prob_loss(*args, loss_dtype, *ex.op_args)
        loss, row_stats = outs[0], outs[1]
        acc = _ops.accumulation_dtype(x.dtype)
    shape = _prob_loss_shape(input)
    if reduction == _ops.REDUCTION_NONE:
        loss = loss.reshape(shape)
    if not ex.return_aux:
        return loss
    return loss, _extras.aux_from_row_stats(row_stats, None, ex.z_loss, reduction, shape, acc)


def _prob_loss_with_weight_grad(x: Tensor, q: Tensor, w: Tensor, reduction: int, label_smoothing: float) -> Tensor:
    """Probability-target loss that is differentiable w.r.t. the class weights.

    Rare (learned class weights), so it is composed of torch ops rather than
    fused: the same formula as the kernels, in the accumulation dtype, so it is
    as accurate as the fused path (torch's own bf16 path rounds log_softmax).
    """
    acc = _ops.accumulation_dtype(x.dtype)
    num_classes = x.shape[1]
    q = q.to(acc)
    if label_smoothing > 0:
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
    rows = -(torch.log_softmax(x.to(acc), dim=1) * q * w.to(acc).view(1, num_classes, 1)).sum(1)
    if reduction == _ops.REDUCTION_SUM:
        rows = rows.sum()
    elif reduction == _ops.REDUCTION_MEAN:
        rows = rows.sum() / rows.numel()  # 0 / 0 = nan for no rows, as torch
    return rows.to(x.dtype)


def _check_index_target(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int) -> None:
    """torch's checks for class-index targets, in torch's order, with its messages."""
    dim = input.dim()
    if dim != 1:
        if input.shape[0] != target.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
            )
    elif target.dim() == 1 and target.shape[0] != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    num_classes = input.shape[_class_dim(input)]
    if dim <= 2:  # nll_loss
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if weight is not None and not (weight.dim() == 1 and weight.numel() == num_classes):
            raise RuntimeError(
                f"weight tensor should be defined either for all {num_classes} classes "
                f"or no classes but got weight tensor of shape: {list(weight.shape)}"
            )
    else:  # nll_loss2d, after nll_loss_nd reshapes 3-D and >4-D inputs to 4-D
        if dim != 4 and target.shape[1:] != input.shape[2:]:
            expected = [input.shape[0], *input.shape[2:]]
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
        # torch's CUDA nll_loss2d words two of these checks differently.
        cuda = input.is_cuda
        if dim == 4 and target.dim() != 3:
            if cuda:
                raise RuntimeError(
                    f"only batches of spatial targets supported (3D tensors) but got targets of size: : {list(target.shape)}"
                )
            raise RuntimeError(
                f"only batches of spatial targets supported (3D tensors) but got targets of dimension: {target.dim()}"
            )
        if weight is not None and weight.numel() != num_classes:
            raise RuntimeError("weight tensor should be defined either for all or no classes")
        if dim != 4 and num_classes == 0 and target.numel() > 0:
            # nll_loss_nd views logits without elements as (N, C, 0, 0), and the
            # target as (N, 1, K): a mismatch torch reports.
            n = input.shape[0]
            got_input, got_target = [n, 0, 0, 0], [n, 1, target.numel() // n]
            if cuda:
                raise RuntimeError(
                    f"input and target batch or spatial sizes don't match: target {got_target}, input {got_input}"
                )
            raise RuntimeError(f"size mismatch (got input: {got_input} , target: {got_target}")
        if dim == 4 and (input.shape[0], *input.shape[2:]) != tuple(target.shape):
            if cuda:
                raise RuntimeError(
                    f"input and target batch or spatial sizes don't match: target {list(target.shape)}, "
                    f"input {list(input.shape)}"
                )
            raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}")
        if cuda and target.dtype != torch.int64:
            # CUDA's nll_loss2d reads int64 targets only, with no "Long or Byte" check first.
            raise RuntimeError(f"expected scalar type Long but found {_dtype_name(target.dtype)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}")
    if target.dtype == torch.uint8 and dim >= 3 and (reduction == _ops.REDUCTION_NONE or target.numel() > 0):
        # torch's nll_loss2d (every input of 3 or more dims) reads targets as int64
        # only; for 'mean' and 'sum' it returns before reading an empty target.
        raise RuntimeError("expected scalar type Long but found Byte")
    # Under autocast torch compares the dtypes after its casts (Note [Autocast]).
    if weight is not None and _autocast_dtype(weight.dtype, input.device.type) != _autocast_dtype(
        input.dtype, input.device.type
    ):
        raise RuntimeError(
            f"expected scalar type {_dtype_name(_autocast_dtype(input.dtype, input.device.type))} "
            f"but found {_dtype_name(_autocast_dtype(weight.dtype, input.device.type))}"
        )


def _index_target_loss(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int, label_smoothing: float,
    ex: Optional[_extras.Extras],
) -> Any:
    _check_index_target(input, target, weight, reduction)
    x = _as_ncK(input)
    if input.dim() == 1:
        y = target.reshape(1, 1)
    elif input.dim() == 2:
        y = target.unsqueeze(-1)
    else:
        y = target.flatten(1)
    w = weight.reshape(-1) if weight is not None else None
    # torch applies smoothing only for label_smoothing > 0 (negative and nan act as 0).
    smoothing = label_smoothing if label_smoothing > 0.0 else 0.0
    loss_dtype = _autocast_loss_dtype(input)
    if ex is not None:
        return _index_loss_with_extras(
            input, target, x, y, w, weight, reduction, ignore_index, label_smoothing, smoothing, loss_dtype, ex
        )
    # Note [Autograd on the hot path] (_ops.py): eager calls skip torch.library's wrapper.
    if _gradient_in_forward(x):
        loss = _ops.fused_index_loss(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    elif torch.compiler.is_compiling():
        loss = torch.ops.xent_ext.cross_entropy_index_forward(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    else:
        loss = _ops.index_loss(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    if target.dtype == torch.uint8 and smoothing > 0:
        torch_loss = _uint8_smoothing_like_torch(input, target, weight, reduction, ignore_index, label_smoothing)
        if torch_loss is not None:
            return torch_loss
    return _index_loss_like_torch(loss, input, target, y, reduction, ignore_index, smoothing)


def _index_loss_with_extras(
    input: Tensor, target: Tensor, x: Tensor, y: Tensor, w: Optional[Tensor], weight: Optional[Tensor], reduction: int,
    ignore_index: int, label_smoothing: float, smoothing: float, loss_dtype: Optional[torch.dtype], ex: _extras.Extras,
) -> Any:
    """_index_target_loss's steps with extras on: the kernels with the extras passed on,
    or the reference where torch's result would be used (Note [Handing over to torch])."""
    uint8_smoothing = target.dtype == torch.uint8 and smoothing > 0
    args = (y, w, ignore_index, smoothing, reduction, loss_dtype, *ex.op_args)
    into = _gradient_into_input(input) if ex.inplace_backward else None
    if into is not None:
        if uint8_smoothing and _uint8_smoothing_differs(input, target, weight, reduction, ignore_index):
            raise RuntimeError(
                "xent_ext.cross_entropy(inplace_backward=True) does not support uint8 class indices with "
                "label_smoothing where a target equals ignore_index's low byte (torch's own smoothing mask "
                "differs there, and its result is computed from the logits after the forward). Use int64 "
                "targets, or call without inplace_backward."
            )
        _check_no_shared_memory(input, y, "target")
        loss, row_stats = _ops.InplaceIndexLoss.apply(*into, *args)[:2]
    else:
        if _gradient_in_forward(x):
            outs = _ops.fused_index_loss(x, *args)
        elif torch.compiler.is_compiling():
            outs = torch.ops.xent_ext.cross_entropy_index_forward(x, *args)
        else:
            outs = _ops.index_loss(x, *args)
        loss, row_stats = outs[0], outs[1]
        if uint8_smoothing and _uint8_smoothing_differs(input, target, weight, reduction, ignore_index):
            return _reference(input, target, weight, reduction, ignore_index, label_smoothing, ex)
    loss = _index_loss_like_torch(loss, input, target, y, reduction, ignore_index, smoothing, ex.z_loss)
    if not ex.return_aux:
        return loss
    shape = target.shape if input.dim() > 1 else torch.Size()
    keep = _extras.counted_rows(y, ignore_index)
    acc = _ops.accumulation_dtype(input.dtype)
    return loss, _extras.aux_from_row_stats(row_stats, keep, ex.z_loss, reduction, shape, acc)


def _index_loss_like_torch(
    loss: Tensor, input: Tensor, target: Tensor, y: Tensor, reduction: int, ignore_index: int, smoothing: float,
    z_loss: float = 0.0,
) -> Tensor:
    """The kernels' loss with torch's conventions for a single CUDA row and its 'none' shape."""
    if (
        input.dim() == 1
        and input.is_cuda
        and reduction == _ops.REDUCTION_MEAN
        and smoothing == 0
        and z_loss == 0  # the z-loss's mean over no counted row is 0/0 = nan, as the kernels give
        and (target.dtype == torch.int64 or 0 <= ignore_index <= 255)
    ):
        # torch's CUDA kernel for a single (C,) input returns 0, not 0/0 = nan
        # (the CPU's answer), when its one target is ignored. Selected on the
        # device: no host sync. (A uint8 target can equal only an ignore_index
        # in [0, 255]; the tensor comparison would wrap any other.)
        loss = torch.where(y.reshape(()) == ignore_index, torch.zeros_like(loss), loss)
    if reduction == _ops.REDUCTION_NONE:
        if smoothing > 0 and input.shape[_class_dim(input)] == 0:
            # torch's smoothing term is 0 * (eps / C): nan for every row when C = 0.
            loss = loss + float("nan")
        loss = loss.reshape(target.shape if input.dim() > 1 else ())
    return loss


# Note [Autocast]
# cross_entropy is on autocast's fp32 list: under torch.autocast for the
# input's device type, torch casts float32, bfloat16 and float16 arguments
# (logits, probability targets, class weights) to float32, leaves float64
# alone, and computes there, so the loss is float32 and each gradient flows
# back in its argument's own dtype. The kernels read bf16/fp16 logits and
# widen them in registers anyway (Note [Accumulation dtype], csrc), so the
# same numbers come without torch's float32 copy of the logits: the ops are
# called on the logits as they are with loss_dtype=float32 and write the
# loss in float32 (Note [Loss dtype], csrc/ops_common.h); class weights are
# widened by the ops (a (C,) copy). The autocast dtype (bf16 or fp16) plays
# no part: torch ignores it for this op.


def _autocast_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a tensor of ``dtype`` takes part in cross_entropy with on
    ``device_type``: float32 for float32/bfloat16/float16 under autocast
    (Note [Autocast]), else its own."""
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.is_autocast_enabled(device_type):
        return torch.float32
    return dtype


def _autocast_loss_dtype(input: Tensor) -> Optional[torch.dtype]:
    """The ops' loss_dtype for these logits: float32 for bfloat16/float16 logits
    under autocast (Note [Autocast]), else None (the loss in the logits' dtype)."""
    if input.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return None


def _requires_grad(t: Tensor) -> bool:
    """Whether ``t`` requires grad, seen through vmap's batching: a BatchedTensor does not
    say, the tensor it wraps does (and the vmap rule calls the op on that one)."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


def _gradient_in_forward(*tensors: Tensor) -> bool:
    """Whether to compute the gradients inside the forward (Note [Gradient in the forward], _ops.py).

    When they will almost surely be used: one of ``tensors`` (the logits, a
    probability target) requires grad under grad mode, for any reduction. The
    first backward then scales them by the upstream gradient and never reads
    the logits, which may be modified in place after the forward, as with
    torch. Not while torch.compile traces: the compiled graph keeps forward
    and backward as separate ops. Not while a CUDA graph is being captured:
    the backward then recomputes from the logits, and keeps no buffer from
    the forward's capture alive until its own. Not under transforms whose
    backward does not use it.
    """
    return (
        any(_requires_grad(t) for t in tensors)
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())
        # Under grad/jvp transforms or forward-mode AD the backward is the
        # composite one (Note [Transforms and forward-mode AD], _ops.py): a
        # gradient formed here would go unused.
        and not _ops._functorch.gradient_in_forward_unused()
    )


def _reference(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int,
    label_smoothing: float, ex: _extras.Extras,
) -> Any:
    """A configuration handed over to torch (Note [Handing over to torch]) with extras on:
    the definition in torch ops (Note [The reference for the extras], _extras.py), whose
    loss has the dtype torch's own call would give."""
    device_type = input.device.type
    dtype = _autocast_dtype(input.dtype, device_type)
    if input.shape == target.shape:
        # Probability targets: torch promotes over the logits, target and weight (Note [Autocast]).
        dtype = torch.promote_types(dtype, _autocast_dtype(target.dtype, device_type))
        if weight is not None:
            dtype = torch.promote_types(dtype, _autocast_dtype(weight.dtype, device_type))
    result = _extras.reference_loss(input, target, weight, reduction, ignore_index, label_smoothing, ex, dtype)
    if ex.inplace_backward and input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "xent_ext.cross_entropy(inplace_backward=True) is not available for this call: its configuration "
            f"(logits of {input.dtype} on {input.device}, a target of {target.dtype}"
            f"{'' if weight is None else ', class weights'}) is computed by torch operations rather than the "
            "fused kernels, and those keep the logits. Call without inplace_backward."
        )
    return result


# Note [inplace_backward checks]
# inplace_backward=True overwrites the logits with their gradient (Note
# [Gradient written into the logits], _ops.py). Every reason to refuse is
# checked before the kernels write anything, from metadata alone (no host
# sync): a leaf that requires grad (its values are the user's, and torch
# forbids it anyway), a view that torch forbids to modify in place (of such a
# leaf, made under no_grad or inference mode, or one of several views returned
# by one function), elements that may share memory (the kernels need one
# gradient element per logit: refused unless the strides prove them
# distinct, a sufficient rule that every strided layout torch makes passes),
# trailing dimensions that cannot be viewed as one (the kernels would write a
# copy), a view of part of a larger tensor (Note [Gradient written into the
# logits]), a probability target that overlaps the logits, logits that
# retain their gradient, or whose base does (autograd cannot keep the
# gradient of a tensor a Function overwrites: it fails inside torch after the
# write, or drops the base's), and a call under saved-tensor hooks (torch
# reads what such hooks return without its version check, so a node that
# saved the logits would read the gradient silently; non-reentrant
# activation checkpointing is such hooks too: its recomputation writes the
# gradient again into logits another node saved). Under
# torch.compile the view and shared-memory checks are left out (dynamo cannot
# trace them); the leaf check runs when the graph is traced, which dynamo does
# not guard on, so a graph traced for a non-leaf and called with a leaf
# overwrites it.


def _gradient_into_input(input: Tensor) -> Optional[tuple]:
    """Where inplace_backward writes the gradient of ``input``, when it requires grad under
    grad mode: (the tensor the write is declared on, the logits' layout within it or None),
    Note [Gradient written into the logits] (_ops.py); None when no gradient is needed.
    Raises where it cannot write (Note [inplace_backward checks])."""
    transformed = _ops._functorch.gradient_in_forward_unused() or _ops._functorch.forward_ad_level_open()
    if not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active() or transformed):
        if transformed or (input.requires_grad and torch.is_grad_enabled()):
            raise RuntimeError(
                "xent_ext.cross_entropy(inplace_backward=True) is not supported under torch.func transforms "
                "(grad, vjp, jvp, vmap) or forward-mode AD, whose gradients cannot be written into the "
                "logits. Call without inplace_backward there."
            )
        return None
    if not (input.requires_grad and torch.is_grad_enabled()):
        return None
    problem = None
    if not torch.compiler.is_compiling() and _saved_tensor_hooks_hide_writes():
        problem = (
            "is computed under saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, save_on_cpu, "
            "or non-reentrant activation checkpointing), which skip torch's in-place check for the tensors "
            "they save, so an op that saved these logits would read their gradient without an error; leave "
            "the loss out of the hooks' region (or checkpoint with use_reentrant=True)"
        )
    elif input.is_leaf:
        problem = (
            "is a leaf tensor that requires grad (a parameter, or a tensor made with requires_grad=True), "
            "whose values would be replaced by the gradient. inplace_backward is for logits computed in "
            "the graph, e.g. the output of a Linear layer"
        )
    elif not torch.compiler.is_compiling():
        if input.retains_grad:
            problem = (
                "retains its gradient (retain_grad()), which autograd cannot keep for a tensor that this "
                "call overwrites with the gradient; the gradient is what the input holds after the forward"
            )
        elif input._is_view() and input._base.is_leaf and input._base.requires_grad:
            problem = (
                "is a view of a leaf tensor that requires grad, whose values would be replaced by the "
                "gradient. inplace_backward is for logits computed in the graph, e.g. the output of a Linear layer"
            )
        elif input._is_view() and torch._C._autograd._get_creation_meta(input) != _DEFAULT_CREATION:
            problem = (
                "is a view that autograd does not allow to modify in place (made under no_grad or inference "
                "mode, or one of several views returned by one function such as unbind or split); clone it first"
            )
    if problem is None and not _elements_distinct(input):
        problem = (
            "may have elements that share memory (e.g. an expanded tensor), and the gradient needs one "
            "element per logit; make it contiguous first"
        )
    if problem is None and not _viewable_as_ncK(input):
        problem = (
            f"cannot be viewed as (N, C, K) without a copy (shape {list(input.shape)}, strides "
            f"{list(input.stride())}: its dimensions after the class dimension do not merge), so the "
            "gradient could not be written into it; make it contiguous first"
        )
    written, layout = input, None
    if problem is None and not torch.compiler.is_compiling() and input._is_view():
        base = input._base
        if not (input.storage_offset() == base.storage_offset() and input.numel() == base.numel()
                and _dense(input) and _dense(base)):
            problem = (
                "is a view of part of a larger tensor, whose gradient autograd would assemble with "
                "logits-sized copies; make it a tensor of its own first (.clone())"
            )
        elif base.retains_grad:
            problem = (
                "is a view of a tensor that retains its gradient (retain_grad()), which autograd cannot "
                "keep for a tensor that this call overwrites with the gradient"
            )
        written, layout = base, (input.shape, input.stride(), input.storage_offset())
    if problem is not None:
        raise RuntimeError(
            f"xent_ext.cross_entropy(inplace_backward=True): the input {problem}, or call without inplace_backward."
        )
    return written, layout


_DEFAULT_CREATION = torch._C._autograd.CreationMeta.DEFAULT


def _saved_tensor_hooks_hide_writes() -> bool:
    """Whether default saved-tensor hooks are active: torch reads what they saved back
    without its version check (Note [inplace_backward checks])."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _elements_distinct(t: Tensor) -> bool:
    """Whether the strides prove that no two elements of ``t`` share memory: sorted by
    stride, each dimension steps past everything the smaller ones span (Note
    [inplace_backward checks])."""
    if t.numel() <= 1:
        return True
    dims = sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill the storage from its offset on without holes or overlap."""
    if t.numel() <= 1:
        return True
    reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return reach == t.numel() - 1 and _elements_distinct(t)


def _viewable_as_ncK(t: Tensor) -> bool:
    """Whether _as_ncK views ``t`` rather than copying it: its dimensions after the class
    dimension merge (torch's rule for view; dimensions of size 1 take no part)."""
    if t.dim() <= 3 or t.numel() == 0:
        return True
    dims = [(sz, st) for sz, st in zip(t.shape[2:], t.stride()[2:]) if sz != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _check_no_shared_memory(input: Tensor, other: Tensor, name: str) -> None:
    """Refuse a ``name`` tensor whose memory overlaps the logits', which the gradient overwrites."""
    if torch.compiler.is_compiling() or other.device != input.device or other.numel() == 0 or input.numel() == 0:
        return
    if other.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
        return

    def extent(t: Tensor) -> tuple[int, int]:
        lo = hi = t.storage_offset() * t.element_size()
        for size, stride in zip(t.shape, t.stride()):
            reach = (size - 1) * stride * t.element_size()
            lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
        return lo, hi + t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = extent(input), extent(other)
    if a_lo < b_hi and b_lo < a_hi:
        raise RuntimeError(
            f"xent_ext.cross_entropy(inplace_backward=True): the {name} shares memory with the input, which the "
            f"gradient overwrites while the {name} is read. Pass a separate {name}, or call without inplace_backward."
        )


# Note [uint8 targets with smoothing]
# torch's smoothing term masks ignored positions with `target == ignore_index`,
# a tensor comparison that converts ignore_index to the target's dtype: for
# uint8 targets it compares with ignore_index's low byte (-100 becomes 156),
# while its nll term compares the targets as integers. So with uint8 targets a
# class equal to that byte loses its smoothing term (and, for an unweighted
# 'mean', its place in the smoothing term's denominator), and a weighted 'mean'
# gathers the weights with the uint8 targets as indices, which raises. The
# kernels compare as integers. Where that differs (a target holds the wrapped
# byte, a valid class), the result is torch's own, computed by torch after the
# forward above has checked the class indices: rare (uint8 targets, smoothing,
# more than 156 classes for the default ignore_index), exact, and it costs the
# common call one dtype comparison.
def _uint8_smoothing_like_torch(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int, label_smoothing: float
) -> Optional[Tensor]:
    """torch's result where its uint8 smoothing mask differs from ours, else None (raises torch's
    error for a weighted 'mean'); Note [uint8 targets with smoothing]."""
    if not _uint8_smoothing_differs(input, target, weight, reduction, ignore_index):
        return None
    return torch._C._nn.cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing)


def _uint8_smoothing_differs(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int
) -> bool:
    """Whether torch's uint8 smoothing mask differs from ours for these targets (raises
    torch's error for a weighted 'mean'); Note [uint8 targets with smoothing]."""
    wrapped = ignore_index & 0xFF
    if weight is not None and reduction == _ops.REDUCTION_MEAN and bool((target != wrapped).any()):
        raise RuntimeError("gather(): Expected dtype int32/int64 for index")
    num_classes = input.shape[_class_dim(input)]
    if wrapped == ignore_index or wrapped >= num_classes or not bool((target == wrapped).any()):
        return False
    # Every class index is valid (torch's CUDA kernels assert on a bad one): the
    # forward checked them, unless the CUDA check is off. (Compared as a Python
    # int: a uint8 tensor comparison would wrap num_classes too.)
    return int(target.max()) < num_classes


# Note [TorchScript] (_torchscript.py): scripted code that calls cross_entropy
# compiles to the operator xent_ext::cross_entropy, whose kernel is this function.
_torchscript.register(cross_entropy)
