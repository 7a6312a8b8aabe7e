"""``xent_ext.cross_entropy``: torch-identical argument handling in front of the fused ops.

Everything torch accepts is computed by the fused kernels; everything torch
rejects is rejected with torch's exception type and message, in torch's order
of checks (see ``docs/semantics.md``). A few configurations that the
kernels do not cover are handed to torch's own implementation, which gives
exactly torch's result or error (Note [Handing over to torch]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _ops
from ._C import build_info as _build_info

__all__ = ["cross_entropy"]

_KERNEL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# CUDA tensors go to the fused kernels only when this build compiled them.
_KERNEL_DEVICES = ("cpu", "cuda") if _build_info()["cuda_version"] is not None else ("cpu",)

# c10's ScalarType names, which torch's C++ error messages use.
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
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
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

    Returns:
        The loss, in the input's dtype (or the promoted dtype with probability
        targets): a 0-d tensor for ``'mean'``/``'sum'``, the target's shape
        without the class dimension for ``'none'``.

    Example::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(32000, (8,))
        >>> loss = xent_ext.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    if has_torch_function_variadic(input, target, weight):
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
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _Reduction.get_enum(reduction)  # torch's ValueError / deprecation warning
    if _hand_over_to_torch(input, target, weight):
        return torch._C._nn.cross_entropy_loss(input, target, weight, reduction_enum, ignore_index, label_smoothing)
    if input.shape == target.shape:
        # torch tells probability targets from class indices by shape alone.
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {_dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        return _prob_target_loss(input, target, weight, reduction_enum, label_smoothing)
    _check_label_smoothing(label_smoothing)
    return _index_target_loss(input, target, weight, reduction_enum, ignore_index, label_smoothing)


# Note [Handing over to torch]
# These inputs go to torch's own cross_entropy (the C++ entry point, so a
# caller who replaced F.cross_entropy with ours cannot recurse):
# - dtypes and devices without a fused kernel: torch computes the result, or
#   raises its own error (integer or complex logits, a 0-d input);
# - tensors on different devices: torch raises its own device error;
# - class weights that require grad (with grad enabled) on the index path:
#   torch raises "not differentiable" there. (On the probability path they
#   are differentiable; see _prob_loss_with_weight_grad.)
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


def _prob_target_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, label_smoothing: float) -> Tensor:
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
    if _weight_needs_grad(weight):
        loss = _prob_loss_with_weight_grad(_as_ncK(input.to(dtype)), _as_ncK(target.to(dtype)), w, reduction, smoothing)
    else:
        x = _as_ncK(input if loss_dtype is not None else input.to(dtype))
        q = _as_ncK(target if loss_dtype is not None else target.to(dtype))
        if _gradient_in_forward(x, q):
            loss = _ops.fused_prob_loss(x, q, w, smoothing, reduction, x.requires_grad, q.requires_grad, loss_dtype)[0]
        elif torch.compiler.is_compiling():
            loss = torch.ops.xent_ext.cross_entropy_prob_forward(x, q, w, smoothing, reduction, loss_dtype)[0]
        else:
            loss = _ops.prob_loss(x, q, w, smoothing, reduction, loss_dtype)[0]
    if reduction == _ops.REDUCTION_NONE:
        out_shape = input.shape[:_class_dim(input)] + input.shape[_class_dim(input) + 1:]
        loss = loss.reshape(out_shape)
    return loss


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


def _check_index_target(input: Tensor, target: Tensor, weight: Optional[Tensor]) -> None:
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
    if target.dtype == torch.uint8 and dim >= 3:
        # torch's nll_loss2d (every input of 3 or more dims) reads targets as int64 only.
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
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int, label_smoothing: float
) -> Tensor:
    _check_index_target(input, target, weight)
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
    # Note [Autograd on the hot path] (_ops.py): eager calls skip torch.library's wrapper.
    if _gradient_in_forward(x):
        loss = _ops.fused_index_loss(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    elif torch.compiler.is_compiling():
        loss = torch.ops.xent_ext.cross_entropy_index_forward(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    else:
        loss = _ops.index_loss(x, y, w, ignore_index, smoothing, reduction, loss_dtype)[0]
    if target.dtype == torch.uint8 and w is not None and smoothing > 0 and reduction == _ops.REDUCTION_MEAN:
        _raise_like_torch_uint8_smoothing(input, target, ignore_index)
    if input.dim() == 1 and input.is_cuda and reduction == _ops.REDUCTION_MEAN and smoothing == 0:
        # torch's CUDA kernel for a single (C,) input returns 0, not 0/0 = nan
        # (the CPU's answer), when its one target is ignored. Selected on the
        # device: no host sync.
        loss = torch.where(y.reshape(()) == ignore_index, torch.zeros_like(loss), loss)
    if reduction == _ops.REDUCTION_NONE:
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


def _gradient_in_forward(*tensors: Tensor) -> bool:
    """Whether to compute the gradients inside the forward (Note [Gradient in the forward], _ops.py).

    When they will almost surely be used: one of ``tensors`` (the logits, a
    probability target) requires grad under grad mode, for any reduction. The
    first backward then scales them by the upstream gradient and never reads
    the logits, which may be modified in place after the forward, as with
    torch. Not while torch.compile traces: the compiled graph keeps forward
    and backward as separate ops. Not while a CUDA graph is being captured:
    the backward then recomputes from the logits, and keeps no buffer from
    the forward's capture alive until its own.
    """
    return (
        any(t.requires_grad for t in tensors)
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _raise_like_torch_uint8_smoothing(input: Tensor, target: Tensor, ignore_index: int) -> None:
    """torch cannot do a weighted 'mean' with label smoothing and uint8 targets.

    Its denominator gathers the weights with the uint8 targets as indices, which
    raises once any target is not ignored. We raise the same error (after the
    same range check) rather than return a number torch does not give. (Inputs
    of 3 or more dims reject uint8 targets earlier, in _check_index_target.)
    """
    if bool((target != ignore_index).any()):
        raise RuntimeError("gather(): Expected dtype int32/int64 for index")
