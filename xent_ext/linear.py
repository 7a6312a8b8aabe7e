"""``xent_ext.linear_cross_entropy``: a linear layer and the cross-entropy fused, without the logits.

A drop-in for :func:`torch.nn.functional.linear_cross_entropy` and
:class:`torch.nn.LinearCrossEntropyLoss` (the loss of ``cross_entropy(linear(
input, linear_weight, linear_bias), target, ...)``) that never materializes the
(N, C) logits: the rows of ``input`` go through in chunks, and each chunk's
logits live in one reusable buffer just long enough for the fused kernels to
turn them into the chunk's loss and, in place, the chunk's logit gradient,
which two matmuls fold into the input's and the weight's gradients at once.

Note [Chunked linear cross-entropy]
Per chunk of rows [s, e), with x = input[s:e]:

    buf   = x @ W.T (+ b)                                  one torch.mm / addmm
    loss += fused op on buf (reduction 'sum'), which also writes into buf
            d(loss)/d(logits) for an upstream gradient of 1
    grad_input[s:e] = buf @ W;  grad_W += buf.T @ x;  grad_b += buf.sum(0)

all inside the forward when a gradient is needed ('mean' and 'sum'), so the
backward only scales the finished gradients by the upstream gradient (in
place, as the fused cross-entropy does: Note [Gradient in the forward],
_ops.py). 'none' cannot be scaled afterwards (each row has its own upstream
gradient, inside the sums over rows of grad_W), so its forward computes the
losses alone and its backward goes through the chunks again, the fused
backward op applying each row's upstream gradient as it forms the logit
gradient (one more x @ W.T per chunk than 'mean'/'sum'). So does a second
backward through the same graph (retain_graph=True), the first having handed
its gradients to autograd. The chunk loop is one operator for torch.compile
(``xent_ext::linear_cross_entropy_forward``, and ``..._backward``), with fake
implementations and a registered autograd formula.

Everything the fused path does not take goes to the composite: torch's own
``linear`` followed by :func:`xent_ext.cross_entropy` on the full logits,
exactly torch's reference path, so results and errors are torch's (Note
[Handing over to the composite]).
"""

import math
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _extras, _ops
from . import functional as _functional
from ._C import build_info as _build_info

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = _ops.REDUCTION_NONE, _ops.REDUCTION_MEAN, _ops.REDUCTION_SUM
_REDUCTIONS = {"none": REDUCTION_NONE, "mean": REDUCTION_MEAN, "sum": REDUCTION_SUM}
_KERNEL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DEVICES = ("cpu", "cuda") if _build_info()["cuda_version"] is not None else ("cpu",)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_xops = torch.ops.xent_ext

# ---------------------------------------------------------------------------
# Note [Chunk size]
# The rows per chunk follow from the shapes alone (so a run is deterministic
# and repeatable): a chunk's logits take at most 1/16 of the full logits and
# at most 256 MiB, but a chunk has at least 128 rows where the byte cap
# allows (below that the matmuls lose much of their speed, and logits of so
# few rows are small anyway). The rows are then spread evenly over the chunks
# that gives, so the last chunk is not a sliver. 1/16 rather than 1/8: the
# step's peak is the chunk plus the gradients of the input and the weight,
# and for a head as small as 512 x 32000 the weight's gradient is already a
# tenth of what the unfused path peaks at, so an eighth of the logits on top
# of it would pass 1/8 of that peak. Smaller chunks cost time instead: each
# one reads and writes the whole weight gradient once (its addmm), which is
# why the rows stop at 128. ``options.batch_chunk_size`` (torch's
# LinearCrossEntropyOptions) overrides it.
_CHUNK_FRACTION = 16
_CHUNK_MAX_BYTES = 256 << 20
_CHUNK_MIN_ROWS = 128


def _chunk_rows(n: int, row_bytes: int, requested: Optional[int]) -> int:
    """Rows per chunk for ``n`` rows of ``row_bytes`` bytes of logits each (Note [Chunk size])."""
    if n <= 0:
        return 1
    if requested is not None:
        return max(1, min(int(requested), n))
    rows = max(-(-n // _CHUNK_FRACTION), _CHUNK_MIN_ROWS)
    rows = min(rows, max(1, _CHUNK_MAX_BYTES // max(row_bytes, 1)), n)
    chunks = -(-n // rows)
    return -(-n // chunks)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Note [Sum, then scale]
# Every chunk runs the fused op with reduction 'sum' (losses summed in the
# accumulation dtype: fp32, fp64 for fp64), and 'mean' divides once at the
# end by the global denominator: for class indices the total weight
# Σ w[y] over the rows not ignored (the count of those rows without a
# weight), computed up front from the targets (O(N)); for probabilities the
# number of rows. A chunk's own 'mean' would divide by its own weight. The
# gradients are scaled the same way after the matmuls, in the accumulation
# dtype, which also keeps the bf16/fp16 logit gradient at the scale of the
# softmax (p - onehot) rather than p / N, where fp16 would flush it to zero.
# Where the denominator is 0, torch's gradient is 0 on ignored rows and
# non-finite on the others (0 * inf): the factor is applied per row for the
# input gradient (0 on rows with nothing counted), and the weight's and
# bias's factor is 0 when no row counts at all.
#
# Note [Z-loss 'mean' with class weights]
# The z-loss 'mean' divides by the number of counted rows, the cross-entropy
# 'mean' by their total weight W; the chunks are summed and divided once by
# W. Passing the op z_loss * W / count instead of z_loss makes that one
# division right for both terms: (Σ ce + z_loss (W / count) Σ lse²) / W =
# Σ ce / W + z_loss Σ lse² / count. W / count is read on the host (one sync on
# CUDA, only with a weight, a z-loss and 'mean'; without a weight W is the
# count and nothing changes). The op takes z_loss >= 0 only, so a negative W
# (negative class weights) is handled by negating the class weights, which
# negates Σ ce and W and leaves the 'mean' unchanged. The factor is formed in
# float64 and rounded once with z_loss.
#
# Note [Weight gradient accumulation]
# grad_W is a sum over every chunk. For fp32/fp64 weights it accumulates in
# place (addmm_). For bf16/fp16 weights with more than one chunk, each
# chunk's product buf.T @ x is formed by the matmul (fp32 accumulation
# inside, one rounding to the weights' dtype, into the final gradient's own
# storage) and added to an fp32 accumulator, which is scaled and rounded to
# the weights' dtype once at the end: the rounding error stays that of one
# product, not one per chunk as accumulating in bf16 would make it. The cost
# is the fp32 accumulator (4 bytes per weight) for the duration of the
# forward, and one pass over it per chunk. With one chunk the product is the
# gradient (no accumulator). The bias gradient accumulates the same way
# (per-chunk sums, fp32 accumulator). torch's CPU kernels would widen a whole
# bf16 operand into a fresh fp32 tensor for a mixed-dtype add (twice the
# memory traffic, and page faults on every call), so the CPU widens a block
# of rows at a time into one small reused buffer.

_WIDEN_BLOCK_ELEMENTS = 1 << 20  # 4 MiB of fp32: the widened block stays in cache


def _add_widened_(acc: Tensor, part: Tensor, block: Optional[Tensor]) -> None:
    """``acc += part`` for an fp32 ``acc`` and a bf16/fp16 ``part`` of the same 2-D shape.
    On the CPU a block of rows at a time is widened into ``block`` (a reused fp32 buffer),
    never the whole of ``part`` (Note [Weight gradient accumulation])."""
    if block is None:
        acc.add_(part)
        return
    n = acc.shape[0]
    step = max(1, block.numel() // max(acc.shape[1], 1))
    for start in range(0, n, step):
        dst = acc[start:start + step]
        wide = block[: dst.numel()].view(dst.shape)
        wide.copy_(part[start:start + step])
        dst.add_(wide)


def _scale_rows_(grad: Tensor, rows: Tensor) -> None:
    """``grad *= rows[:, None]`` in place for a 2-D ``grad`` and per-row factors of the
    accumulation dtype, formed in that dtype and rounded once."""
    if grad.dtype == rows.dtype or grad.is_cuda:
        grad.mul_(rows.unsqueeze(1))
    else:
        _ops._mul_rows_widened_(grad.unsqueeze(-1), rows.view(-1, 1, 1))


# Note [Widened matmuls on the CPU]
# Where torch has no native bf16 (fp16) matmul for this CPU (oneDNN's needs
# AVX512-BF16 or AMX; `torch.ops.mkldnn._is_mkldnn_bf16_supported()`), its
# bf16 products fall back to a generic kernel that is several times slower
# than its fp32 matmul, and for the input's gradient's layout (dlogits @ W)
# tens of times slower (benchmarks/matmul_dtypes.py). There the chunk's three
# products run in fp32 instead, a block of rows of W at a time: the block is
# widened into one reused fp32 buffer (never the whole of W, which would cost
# 4 bytes per weight for the whole call), multiplied with the chunk's widened
# rows, and the result rounded once to the logits' dtype (the logits) or
# added into the fp32 accumulators (the gradients). Each product is then one
# rounding from the exact one, as a native matmul with fp32 accumulation is;
# the cost is widening W twice per chunk, small beside the products.
_WIDEN_ROWS_ELEMENTS = 1 << 20  # 4 MiB of fp32 per block of W's rows


def _native_low_precision_matmul(dtype: torch.dtype) -> bool:
    """Whether torch has a native (oneDNN) CPU matmul for ``dtype`` on this machine."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True  # no way to tell: torch's own matmul, as everywhere else


_NATIVE_MATMUL: dict = {}


def _widen_matmuls(dtype: torch.dtype, device: torch.device) -> bool:
    """Note [Widened matmuls on the CPU]: whether the chunk's products run widened to fp32."""
    if device.type != "cpu" or dtype not in _LOW_PRECISION:
        return False
    if dtype not in _NATIVE_MATMUL:
        _NATIVE_MATMUL[dtype] = _native_low_precision_matmul(dtype)
    return not _NATIVE_MATMUL[dtype]


class _WidenedWeight:
    """The blocks of W's rows, widened to fp32 one at a time into a reused buffer, and the
    fp32 products of a chunk with them (Note [Widened matmuls on the CPU])."""

    def __init__(self, linear_weight: Tensor, linear_bias: Optional[Tensor], max_rows: int) -> None:
        v, h = linear_weight.shape
        self.weight, self.bias = linear_weight, linear_bias
        self.step = max(1, min(v, _WIDEN_ROWS_ELEMENTS // max(h, 1)))
        self.block = torch.empty((self.step, h), dtype=torch.float32)
        self.part = torch.empty(max_rows * self.step, dtype=torch.float32)

    def _part(self, rows: int, cols: int) -> Tensor:
        return self.part[: rows * cols].view(rows, cols)

    def blocks(self):
        """(start, end, W[start:end] in fp32) for each block of W's rows."""
        v = self.weight.shape[0]
        for start in range(0, v, self.step):
            end = min(start + self.step, v)
            wide = self.block[: end - start]
            wide.copy_(self.weight[start:end])
            yield start, end, wide

    def logits(self, x: Tensor, out: Tensor) -> None:
        """out = x @ W.T (+ b), each block's product in fp32 rounded once into ``out``."""
        xw = x.float()
        for start, end, wide in self.blocks():
            part = self._part(x.shape[0], end - start)
            if self.bias is None:
                torch.mm(xw, wide.t(), out=part)
            else:
                torch.addmm(self.bias[start:end].float(), xw, wide.t(), out=part)
            out[:, start:end].copy_(part)

    def gradients(self, dl: Tensor, x: Tensor, gi: Optional[Tensor], gw_acc: Optional[Tensor], first: bool) -> None:
        """gi = dl @ W (rounded once into ``gi``) and gw_acc (+)= dl.T @ x, in fp32."""
        xw = x.float() if gw_acc is not None else None
        gi_acc = torch.zeros(gi.shape, dtype=torch.float32) if gi is not None else None
        for start, end, wide in self.blocks():
            dlw = self._part(dl.shape[0], end - start)
            dlw.copy_(dl[:, start:end])
            if gi_acc is not None:
                gi_acc.addmm_(dlw, wide)
            if gw_acc is not None:
                if first:
                    torch.mm(dlw.t(), xw, out=gw_acc[start:end])
                else:
                    gw_acc[start:end].addmm_(dlw.t(), xw)
        if gi is not None:
            gi.copy_(gi_acc)


class _GradientSink:
    """The gradients of one pass over the chunks: each chunk's logit gradient ``dl``
    (rows, V) is folded into the input's, the weight's and the bias's (and a
    probability target's is stored) as it comes; ``finish`` scales and returns them."""

    def __init__(self, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                 chunks: int, wants: tuple, widened: Optional[_WidenedWeight] = None) -> None:
        want_gi, want_gw, want_gb, want_gt = wants
        self.weight = linear_weight
        self.widened = widened
        acc = _accumulation_dtype(input.dtype)
        self.gi = torch.empty_like(input, memory_format=torch.contiguous_format) if want_gi else None
        self.gw = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if want_gw else None
        if self.gw is not None and chunks == 0:
            self.gw.zero_()
        # Note [Weight gradient accumulation]; widened products always go
        # through the fp32 accumulator (Note [Widened matmuls on the CPU]).
        self.gw_acc = (torch.empty(linear_weight.shape, dtype=acc, device=linear_weight.device)
                       if want_gw and linear_weight.dtype in _LOW_PRECISION and (chunks > 1 or widened is not None)
                       else None)
        # torch's CPU kernels would widen the whole bf16 operand of a mixed-dtype add.
        self.widen_block = (torch.empty(min(_WIDEN_BLOCK_ELEMENTS, linear_weight.numel()), dtype=acc)
                            if self.gw_acc is not None and not linear_weight.is_cuda and widened is None else None)
        self.gb_acc = (torch.zeros(linear_bias.shape, dtype=acc, device=linear_bias.device)
                       if want_gb and linear_bias is not None else None)
        self.bias_dtype = linear_bias.dtype if linear_bias is not None else None
        self.gt = torch.empty_like(target) if want_gt else None
        self.first = True

    def add(self, dl: Tensor, s: int, e: int, x: Tensor, gt: Optional[Tensor]) -> None:
        if self.widened is not None:
            self.widened.gradients(dl, x, self.gi[s:e] if self.gi is not None else None, self.gw_acc, self.first)
            self._add_rest(dl, s, e, gt)
            return
        if self.gi is not None:
            torch.mm(dl, self.weight, out=self.gi[s:e])
        if self.gw is not None:
            if self.gw_acc is not None:
                torch.mm(dl.t(), x, out=self.gw)
                if self.first:
                    self.gw_acc.copy_(self.gw)
                else:
                    _add_widened_(self.gw_acc, self.gw, self.widen_block)
            elif self.first:
                torch.mm(dl.t(), x, out=self.gw)
            else:
                self.gw.addmm_(dl.t(), x)
        self._add_rest(dl, s, e, gt)

    def _add_rest(self, dl: Tensor, s: int, e: int, gt: Optional[Tensor]) -> None:
        if self.gb_acc is not None:
            # A reduction in the logits' dtype (the CPU and CUDA sums accumulate
            # bf16/fp16 in fp32 and round the (V,) result once); asking sum for
            # an fp32 result would widen the whole chunk first.
            self.gb_acc.add_(dl.sum(0))
        if self.gt is not None and gt is not None:
            self.gt[s:e].copy_(gt)
        self.first = False

    def finish(self, row_scale: Any, scale: Any) -> tuple:
        """The gradients, each multiplied by ``scale`` (the input's by ``row_scale``, per
        row): None for no scaling, a Python float or a 0-d / (N,) accumulation-dtype tensor."""
        if self.gi is not None and row_scale is not None:
            if isinstance(row_scale, Tensor):
                _scale_rows_(self.gi, row_scale)
            else:
                self.gi.mul_(row_scale)
        if self.gw is not None:
            if self.gw_acc is not None:
                if scale is not None:
                    self.gw_acc.mul_(scale)
                self.gw.copy_(self.gw_acc)
                self.gw_acc = self.widen_block = None
            elif scale is not None:
                self.gw.mul_(scale)
        gb = None
        if self.gb_acc is not None:
            if scale is not None:
                self.gb_acc.mul_(scale)
            gb = self.gb_acc.to(self.bias_dtype)
        if self.gt is not None and scale is not None:
            self.gt.mul_(scale)
        return self.gi, self.gw, gb, self.gt


class _Problem:
    """One call of the chunked op, in canonical form: ``input`` (N, H), ``linear_weight``
    (V, H) with V = C * K, ``linear_bias`` (V,) or None, ``target`` (N, K) int64 class
    indices or (N, C, K) probabilities of the logits' dtype, ``weight`` (C,) or None."""

    def __init__(self, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                 weight: Optional[Tensor], num_classes: int, ignore_index: int, label_smoothing: float,
                 reduction: int, logit_scale: float, softcap: Optional[float], z_loss: float,
                 chunk_rows: int) -> None:
        self.input, self.linear_weight, self.linear_bias = input, linear_weight, linear_bias
        self.target, self.weight = target, weight
        self.n = input.shape[0]
        self.v = linear_weight.shape[0]
        self.c = num_classes
        self.k = self.v // num_classes
        self.prob = target.dim() == 3
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.logit_scale, self.softcap, self.z_loss = logit_scale, softcap, z_loss
        self.rows = max(1, chunk_rows)
        self.acc = _accumulation_dtype(input.dtype)
        self.widened = (_WidenedWeight(linear_weight, linear_bias, min(self.rows, self.n))
                        if self.n and _widen_matmuls(input.dtype, input.device) else None)
        # The op's weight and z-loss: the z-loss 'mean' with class weights is
        # folded into the one division by the total weight (Note [Z-loss 'mean'
        # with class weights]).
        self.op_weight, self.op_z_loss = weight, z_loss
        self.valid = None if self.prob else target != ignore_index
        # Class indices, 'mean': the denominator (Note [Sum, then scale]); the
        # backward op also takes it for 'sum' and 'none', where it is unused.
        self.total_weight = torch.zeros((), dtype=self.acc, device=input.device)
        if self.prob or reduction != REDUCTION_MEAN:
            return
        if weight is None:
            self.total_weight = self.valid.sum(dtype=self.acc)
        else:
            # Out-of-range targets are clamped here and reported by the op.
            safe = target.masked_fill(~self.valid, 0).clamp_(0, num_classes - 1)
            w = weight.to(self.acc)[safe]
            self.total_weight = torch.where(self.valid, w, torch.zeros((), dtype=self.acc, device=w.device)).sum()
            if z_loss > 0.0:
                total, count = float(self.total_weight), float(self.valid.sum())
                if total < 0.0:
                    self.op_weight, self.total_weight, total = -weight, -self.total_weight, -total
                if total > 0.0 and count > 0.0:
                    self.op_z_loss = z_loss * (total / count)

    def chunks(self):
        return range(0, self.n, self.rows)

    def num_chunks(self) -> int:
        return -(-self.n // self.rows)

    def logits(self, buf: Tensor, s: int, e: int) -> Tensor:
        """The chunk's logits x @ W.T (+ b), written into ``buf`` (rows, V)."""
        out = buf[: e - s]
        x = self.input[s:e]
        if self.widened is not None:
            self.widened.logits(x, out)
        elif self.linear_bias is None:
            torch.mm(x, self.linear_weight.t(), out=out)
        else:
            torch.addmm(self.linear_bias, x, self.linear_weight.t(), out=out)
        return out

    def new_buffer(self) -> Tensor:
        return torch.empty((min(self.rows, self.n), self.v), dtype=self.input.dtype, device=self.input.device)

    def extras(self) -> tuple:
        return (self.logit_scale, self.softcap, self.op_z_loss)

    def mean_scales(self) -> tuple:
        """(row_scale, scale) of ``_GradientSink.finish`` for 'mean' (Note [Sum, then scale])."""
        if self.prob:
            s = 1.0 / (self.n * self.k) if self.n * self.k else 0.0  # no rows: nothing to scale
            return s, s
        s = 1.0 / self.total_weight
        zero = torch.zeros((), dtype=self.acc, device=s.device)
        row_counted = self.valid.any(1) if self.k != 1 else self.valid[:, 0]
        counted = self.valid.any()
        return torch.where(row_counted, s, zero), torch.where(counted, s, zero)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _forward_impl(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                  weight: Optional[Tensor], num_classes: int, ignore_index: int, label_smoothing: float,
                  reduction: int, logit_scale: float, softcap: Optional[float], z_loss: float, chunk_rows: int,
                  loss_dtype: torch.dtype, input_grad: bool, weight_grad: bool, bias_grad: bool,
                  target_grad: bool) -> tuple:
    with_grad = reduction != REDUCTION_NONE and (input_grad or weight_grad or bias_grad or target_grad)
    p = _Problem(input, linear_weight, linear_bias, target, weight, num_classes, ignore_index, label_smoothing,
                 reduction, logit_scale, softcap, z_loss, chunk_rows)
    acc, n, k = p.acc, p.n, p.k
    row_stats = torch.empty((2, n, k), dtype=torch.float64, device=input.device)
    coef_sum = torch.empty((n, k), dtype=acc, device=input.device) if p.prob else input.new_empty((0,), dtype=acc)
    if reduction == REDUCTION_NONE:
        loss = torch.empty((n, k), dtype=loss_dtype, device=input.device)
        op_reduction, op_loss_dtype = REDUCTION_NONE, loss_dtype
    else:
        loss = torch.zeros((), dtype=acc, device=input.device)
        op_reduction, op_loss_dtype = REDUCTION_SUM, acc
    sink = (_GradientSink(input, linear_weight, linear_bias, target, p.num_chunks(),
                          (input_grad, weight_grad, bias_grad and linear_bias is not None, target_grad and p.prob),
                          p.widened)
            if with_grad else None)
    buf = p.new_buffer() if n else None
    extras = p.extras()
    for s in p.chunks():
        e = min(s + p.rows, n)
        logits = p.logits(buf, s, e)
        z = logits.view(e - s, p.c, k)
        grad_target = None
        if p.prob:
            if with_grad:
                part, stats, coefs, grad_target = _xops.cross_entropy_prob_forward_grad_into_(
                    z, target[s:e], p.op_weight, label_smoothing, op_reduction, target_grad, op_loss_dtype, *extras)
            else:
                part, stats, coefs = _xops.cross_entropy_prob_forward(
                    z, target[s:e], p.op_weight, label_smoothing, op_reduction, op_loss_dtype, *extras)
            coef_sum[s:e] = coefs
        elif with_grad:
            part, stats, _ = _xops.cross_entropy_index_forward_grad_into_(
                z, target[s:e], p.op_weight, ignore_index, label_smoothing, op_reduction, op_loss_dtype, *extras)
        else:
            part, stats, _ = _xops.cross_entropy_index_forward(
                z, target[s:e], p.op_weight, ignore_index, label_smoothing, op_reduction, op_loss_dtype, *extras)
        row_stats[:, s:e] = stats
        if reduction == REDUCTION_NONE:
            loss[s:e] = part
        else:
            loss += part
        if sink is not None:
            sink.add(logits, s, e, input[s:e], grad_target)  # the op left the logit gradient in the buffer
    del buf
    if reduction == REDUCTION_MEAN:
        loss = loss / (p.total_weight if not p.prob else n * k)
    loss = loss.to(loss_dtype)
    if sink is None:
        gi = gw = gb = gt = None
    else:
        row_scale, scale = p.mean_scales() if reduction == REDUCTION_MEAN else (None, None)
        gi, gw, gb, gt = sink.finish(row_scale, scale)
    return (loss, row_stats, coef_sum,
            gi if gi is not None else _empty(input),
            gw if gw is not None else _empty(linear_weight),
            gb if gb is not None else _empty(input),
            gt if gt is not None else _empty(input))


def _backward_impl(grad_loss: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                   target: Tensor, weight: Optional[Tensor], row_stats: Tensor, coef_sum: Tensor, num_classes: int,
                   ignore_index: int, label_smoothing: float, reduction: int, logit_scale: float,
                   softcap: Optional[float], z_loss: float, chunk_rows: int, input_grad: bool, weight_grad: bool,
                   bias_grad: bool, target_grad: bool) -> tuple:
    """The gradients for the upstream gradient ``grad_loss`` ((N, K) for 'none', else 0-d),
    recomputing each chunk's logits (Note [Chunked linear cross-entropy])."""
    p = _Problem(input, linear_weight, linear_bias, target, weight, num_classes, ignore_index, label_smoothing,
                 reduction, logit_scale, softcap, z_loss, chunk_rows)
    n, k = p.n, p.k
    target_grad = target_grad and p.prob
    sink = _GradientSink(input, linear_weight, linear_bias, target, p.num_chunks(),
                         (input_grad, weight_grad, bias_grad and linear_bias is not None, target_grad), p.widened)
    op_reduction = REDUCTION_NONE if reduction == REDUCTION_NONE else REDUCTION_SUM
    g = grad_loss if reduction == REDUCTION_NONE else grad_loss.reshape(())
    buf = p.new_buffer() if n else None
    extras = p.extras()
    for s in p.chunks():
        e = min(s + p.rows, n)
        z = p.logits(buf, s, e).view(e - s, p.c, k)
        g_c = g[s:e] if reduction == REDUCTION_NONE else g
        grad_target = None
        if p.prob:
            dl, grad_target = _xops.cross_entropy_prob_backward(
                g_c, z, target[s:e], p.op_weight, row_stats[:, s:e], coef_sum[s:e], label_smoothing, op_reduction,
                True, target_grad, *extras)
        else:
            dl = _xops.cross_entropy_index_backward(
                g_c, z, target[s:e], p.op_weight, row_stats[:, s:e], p.total_weight, ignore_index, label_smoothing,
                op_reduction, *extras)
        sink.add(dl.reshape(e - s, p.v), s, e, input[s:e], grad_target if target_grad else None)
    del buf
    row_scale, scale = p.mean_scales() if reduction == REDUCTION_MEAN else (None, None)
    gi, gw, gb, gt = sink.finish(row_scale, scale)
    return (gi if gi is not None else _empty(input),
            gw if gw is not None else _empty(linear_weight),
            gb if gb is not None else _empty(input),
            gt if gt is not None else _empty(input))


# ---------------------------------------------------------------------------
# The operators (torch.library.custom_op): opaque to torch.compile, which
# traces them with the fake implementations below.

_forward_op = torch.library.custom_op(
    "xent_ext::linear_cross_entropy_forward", _forward_impl, mutates_args=(),
    schema="(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
           "int num_classes, int ignore_index, float label_smoothing, int reduction, float logit_scale, "
           "float? softcap, float z_loss, int chunk_rows, ScalarType loss_dtype, bool input_grad, "
           "bool weight_grad, bool bias_grad, bool target_grad) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

_backward_op = torch.library.custom_op(
    "xent_ext::linear_cross_entropy_backward", _backward_impl, mutates_args=(),
    schema="(Tensor grad_loss, Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
           "Tensor? weight, Tensor row_stats, Tensor coef_sum, int num_classes, int ignore_index, "
           "float label_smoothing, int reduction, float logit_scale, float? softcap, float z_loss, "
           "int chunk_rows, bool input_grad, bool weight_grad, bool bias_grad, bool target_grad) "
           "-> (Tensor, Tensor, Tensor, Tensor)")


def _fake_grads(input, linear_weight, linear_bias, target, wants, prob):
    want_gi, want_gw, want_gb, want_gt = wants
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if want_gi else _empty(input),
            torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if want_gw else _empty(linear_weight),
            torch.empty_like(linear_bias) if want_gb and linear_bias is not None else _empty(input),
            torch.empty_like(target) if want_gt and prob else _empty(input))


@_forward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, num_classes, ignore_index, label_smoothing, reduction,
      logit_scale, softcap, z_loss, chunk_rows, loss_dtype, input_grad, weight_grad, bias_grad, target_grad):
    n, k = input.shape[0], linear_weight.shape[0] // num_classes
    acc = _accumulation_dtype(input.dtype)
    prob = target.dim() == 3
    loss = input.new_empty((n, k) if reduction == REDUCTION_NONE else (), dtype=loss_dtype)
    row_stats = input.new_empty((2, n, k), dtype=torch.float64)
    coef_sum = input.new_empty((n, k) if prob else (0,), dtype=acc)
    wants = (input_grad, weight_grad, bias_grad, target_grad) if reduction != REDUCTION_NONE else (False,) * 4
    return (loss, row_stats, coef_sum) + _fake_grads(input, linear_weight, linear_bias, target, wants, prob)


@_backward_op.register_fake
def _(grad_loss, input, linear_weight, linear_bias, target, weight, row_stats, coef_sum, num_classes, ignore_index,
      label_smoothing, reduction, logit_scale, softcap, z_loss, chunk_rows, input_grad, weight_grad, bias_grad,
      target_grad):
    return _fake_grads(input, linear_weight, linear_bias, target, (input_grad, weight_grad, bias_grad, target_grad),
                       target.dim() == 3)


# ---------------------------------------------------------------------------
# Autograd.
#
# Note [Linear cross-entropy backward]
# 'mean' and 'sum': the forward computed the gradients for an upstream
# gradient of 1; the first backward hands them to autograd, scaled in place
# by the upstream gradient unless it is exactly 1 (Note [Gradient in the
# forward], _ops.py: rounding, and the one host sync on CUDA), and drops its
# references so autograd can take the tensors over without a copy. While
# torch.compile traces, they are scaled out of place (a traced graph must not
# mutate a forward output, and may run its backward more than once). Any
# other backward (reduction 'none', a second backward through the same graph)
# recomputes through the chunks (the backward operator). A double backward
# (create_graph=True) differentiates the composite (torch's linear and
# xent_ext.cross_entropy on the full logits): correct to any order, and as
# costly in memory as torch's reference path, only when asked for.

_NUM_FORWARD_INPUTS = 18


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    (input, linear_weight, linear_bias, target, weight, num_classes, ignore_index, label_smoothing, reduction,
     logit_scale, softcap, z_loss, chunk_rows, loss_dtype, input_grad, weight_grad, bias_grad, target_grad) = inputs
    _, row_stats, coef_sum, gi, gw, gb, gt = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, row_stats, coef_sum)
    ctx.args = (num_classes, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, chunk_rows)
    ctx.set_materialize_grads(False)
    if reduction != REDUCTION_NONE:
        # Detached: a forward output keeps its grad_fn, which holds ctx (a cycle).
        ctx.fused = tuple(t.detach() if w else None
                          for t, w in zip((gi, gw, gb, gt), (input_grad, weight_grad, bias_grad, target_grad)))
    else:
        ctx.fused = None
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx: Any, grad_loss: Optional[Tensor], *_unused: Any) -> tuple:
    nothing = (None,) * _NUM_FORWARD_INPUTS
    fused, traced = ctx.fused, grad_loss is not None and type(grad_loss) is not torch.Tensor
    if not traced:
        ctx.fused = None  # the first backward takes them (Note [Linear cross-entropy backward])
    if grad_loss is None:
        return nothing
    want = tuple(ctx.needs_input_grad[:4])
    input, linear_weight, linear_bias, target, weight, row_stats, coef_sum = ctx.saved_tensors
    num_classes, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, chunk_rows = ctx.args
    want = (want[0], want[1], want[2] and linear_bias is not None, want[3] and target.dim() == 3)
    if torch.is_grad_enabled() and not traced:
        grads = _composite_grads(grad_loss, input, linear_weight, linear_bias, target, weight, want, ctx.args)
    elif fused is not None and all(f is not None for f, w in zip(fused, want) if w):
        g = grad_loss.reshape(())
        if traced:
            grads = tuple((f * g).to(f.dtype) if w else None for f, w in zip(fused, want))
        else:
            present = [f for f, w in zip(fused, want) if w]
            if present and not _ops._is_one(g, present[0].is_cuda):
                for f in present:
                    f.mul_(g)
            grads = tuple(f if w else None for f, w in zip(fused, want))
    else:
        out = _backward_op(grad_loss, input, linear_weight, linear_bias, target, weight, row_stats, coef_sum,
                           num_classes, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss,
                           chunk_rows, *want)
        grads = tuple(t if w else None for t, w in zip(out, want))
    return grads + (None,) * (_NUM_FORWARD_INPUTS - 4)


torch.library.register_autograd("xent_ext::linear_cross_entropy_forward", _backward, setup_context=_setup_context)


def _composite_grads(grad_loss, input, linear_weight, linear_bias, target, weight, want, args) -> tuple:
    """The gradients by differentiating the composite on the full logits (double backward)."""
    num_classes, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, _ = args
    n, v = input.shape[0], linear_weight.shape[0]
    logits = torch._C._nn.linear(input, linear_weight, linear_bias).reshape(n, num_classes, v // num_classes)
    loss = _functional.cross_entropy(logits, target, weight, ignore_index=ignore_index,
                                     reduction=_REDUCTION_NAMES[reduction], label_smoothing=label_smoothing,
                                     **_extras_kwargs(logit_scale, softcap, z_loss))
    inputs = [t for t, w in zip((input, linear_weight, linear_bias, target), want) if w]
    got = iter(torch.autograd.grad(loss, inputs, grad_loss.reshape(loss.shape), create_graph=True,
                                   allow_unused=True))
    return tuple(next(got) if w else None for w in want)


_REDUCTION_NAMES = {v: k for k, v in _REDUCTIONS.items()}


def _extras_kwargs(logit_scale: float, softcap: Optional[float], z_loss: float) -> dict:
    """The extras as keyword arguments of xent_ext.cross_entropy, only those that are not the defaults."""
    out: dict = {}
    if logit_scale != 1.0:
        out["logit_scale"] = logit_scale
    if softcap is not None:
        out["softcap"] = softcap
    if z_loss != 0.0:
        out["z_loss"] = z_loss
    return out


# ---------------------------------------------------------------------------
# The front end.


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    return_aux: bool = False,
) -> Any:
    r"""``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    A drop-in for :func:`torch.nn.functional.linear_cross_entropy`: the same
    arguments, shapes, results (forward and gradients) and errors, computed a
    chunk of rows at a time so that the full ``(N, C)`` logits never exist
    (the working set is one chunk of logits, at most 1/16 of them and at most
    256 MiB). The gradients with respect to ``input``, ``linear_weight``,
    ``linear_bias`` (and probability targets) are formed during the forward
    for ``'mean'`` and ``'sum'``; the backward scales them.

    Args:
        input: ``(in_features)`` or ``(N, in_features)``.
        linear_weight: ``(C, in_features)``, or ``(C, d1, ..., dK, in_features)``
            for a K-dimensional loss (batched input only).
        target: class indices of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)``,
            or class probabilities of the logits' shape.
        linear_bias: ``(C)`` or ``(C, d1, ..., dK)``, added to the logits.
        weight: class weights ``(C)``, as in :func:`torch.nn.functional.cross_entropy`.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        ignore_index: ``None`` means -100 for class indices; must stay ``None``
            with probability targets (torch's error otherwise).
        label_smoothing: in ``[0, 1]``.
        options: a :class:`torch.nn.LinearCrossEntropyOptions`; only its
            ``batch_chunk_size`` is used (the rows per chunk). Its other fields
            choose among torch's chunked implementations and are ignored here,
            as is ``None`` versus an instance: the computation is always chunked.
        logit_scale, softcap, z_loss: the LLM extras of
            :func:`xent_ext.cross_entropy`, applied to the logits.
        return_aux: also return :class:`xent_ext.CrossEntropyAux` ``(lse, z_loss)``.

    Returns:
        The loss (``'none'``: the target's shape without the class dimension),
        or ``(loss, aux)`` with ``return_aux=True``.

    Configurations the fused path does not take (mismatched dtypes or
    devices, class weights that require grad, uint8 targets, probability
    targets of another dtype, torch.func transforms, forward-mode AD, invalid
    arguments) are computed by the composite ``linear`` + :func:`xent_ext.cross_entropy`,
    which is torch's reference path: torch's results and torch's errors.

    Example::

        >>> hidden = torch.randn(4096, 1024, requires_grad=True)
        >>> head = torch.randn(32000, 1024, requires_grad=True)
        >>> labels = torch.randint(32000, (4096,))
        >>> loss = xent_ext.linear_cross_entropy(hidden, head, labels, z_loss=1e-4)
        >>> loss.backward()
    """
    if has_torch_function_variadic(input, linear_weight, target, linear_bias, weight):
        return handle_torch_function(
            linear_cross_entropy,
            (input, linear_weight, target, linear_bias, weight),
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
            logit_scale=logit_scale,
            softcap=softcap,
            z_loss=z_loss,
            return_aux=return_aux,
        )
    # torch's checks, in torch's order and words.
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    num_batches = tuple(input.shape[:-1])
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if len(out_features) > 0 and len(num_batches) == 0:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched"
            f" input with shape {tuple(input.shape)}"
        )
    logits_shape = (*num_batches, num_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = ignore_index if ignore_index is not None else -100
    extras = _parse_extras(logit_scale, softcap, z_loss, return_aux)
    compute_dtype = _fused_dtype(input, linear_weight, linear_bias, target, weight, reduction, ignore_index,
                                 label_smoothing, probabilities, num_batches, out_features)
    if compute_dtype is None:
        return _composite(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, logits_shape, extras)
    logit_scale, softcap, z_loss, return_aux = extras

    # The canonical problem: input (N, H), weight (V, H), bias (V,), targets
    # (N, K) or (N, C, K).
    x = input if input.dim() == 2 else input.unsqueeze(0)
    n = x.shape[0]
    k = math.prod(out_features)
    v = num_classes * k
    w2 = linear_weight.reshape(v, in_features) if out_features else linear_weight
    b2 = linear_bias.reshape(v) if linear_bias is not None and out_features else linear_bias
    loss_dtype = compute_dtype
    if _autocasting(input, x.device.type):
        # Autocast: torch's linear runs in the autocast dtype and its
        # cross_entropy in float32 (Note [Autocast], functional.py).
        x, w2 = x.to(compute_dtype), w2.to(compute_dtype)
        b2 = b2.to(compute_dtype) if b2 is not None else None
        loss_dtype = torch.float32
    t = target.reshape(n, num_classes, k) if probabilities else target.reshape(n, k)
    reduction_enum = _REDUCTIONS[reduction]
    requested = getattr(options, "batch_chunk_size", None) if options is not None else None
    rows = _chunk_rows(n, v * x.element_size(), requested)
    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and x.requires_grad,
        grad_on and w2.requires_grad,
        grad_on and b2 is not None and b2.requires_grad,
        grad_on and probabilities and t.requires_grad,
    )
    loss, row_stats, _, *_grads = _forward_op(
        x, w2, b2, t, weight, num_classes, ignore_index, float(label_smoothing), reduction_enum, logit_scale,
        softcap, z_loss, rows, loss_dtype, *wants)
    out_shape = (*num_batches, *out_features)
    if reduction_enum == REDUCTION_NONE:
        loss = loss.reshape(out_shape)
    if not return_aux:
        return loss
    keep = None if probabilities else (t != ignore_index)
    return loss, _aux(row_stats, keep, z_loss, reduction_enum, out_shape, _accumulation_dtype(x.dtype))


def _autocasting(input: Tensor, device_type: str) -> bool:
    return input.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device_type)


# Note [Handing over to the composite]
# The fused path takes: floating logits of a kernel dtype on a device with
# kernels (input, weights, bias of one dtype, or any of fp32/bf16/fp16 under
# autocast), all tensors on that device and strided; int64 class indices of
# the loss's shape, or probabilities of the logits' shape and dtype (not
# under autocast); class weights (C,) of the logits' dtype that need no
# gradient; a valid reduction, an int ignore_index, label_smoothing in
# [0, 1]; at least one class; no torch.func transform or forward-mode AD
# (whose rules the chunked operator does not have). Everything else, valid or
# not, goes to the composite, which computes torch's result or raises torch's
# error.
def _fused_dtype(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                 weight: Optional[Tensor], reduction: Any, ignore_index: Any, label_smoothing: Any,
                 probabilities: bool, num_batches: tuple, out_features: tuple) -> Optional[torch.dtype]:
    """The dtype the fused path computes the logits in, or None for the composite
    (Note [Handing over to the composite])."""
    device = input.device
    if device.type not in _KERNEL_DEVICES or not isinstance(target, Tensor):
        return None
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        return None
    if type(ignore_index) is not int or not _INT64_MIN <= ignore_index <= _INT64_MAX:
        return None
    if type(label_smoothing) not in (float, int) or not 0.0 <= label_smoothing <= 1.0:
        return None
    tensors = [input, linear_weight, target] + [t for t in (linear_bias, weight) if t is not None]
    if any(t.device != device or t.layout != torch.strided for t in tensors):
        return None
    if linear_weight.shape[0] == 0:
        return None
    if not torch.compiler.is_compiling() and (
            torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0):
        return None
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != linear_weight.shape[0]:
            return None
        if weight.requires_grad and torch.is_grad_enabled():
            return None
    if _autocasting(input, device.type):
        if probabilities:
            return None
        dtype = torch.get_autocast_dtype(device.type)
        if dtype not in _KERNEL_DTYPES:
            return None
        floats = [linear_weight] + [t for t in (linear_bias, weight) if t is not None]
        if any(t.dtype not in _AUTOCAST_ELIGIBLE for t in floats):
            return None
    else:
        dtype = input.dtype
        if dtype not in _KERNEL_DTYPES or linear_weight.dtype != dtype:
            return None
        if (linear_bias is not None and linear_bias.dtype != dtype) or (weight is not None and weight.dtype != dtype):
            return None
    if probabilities:
        return dtype if target.dtype == dtype else None
    if target.dtype != torch.int64 or tuple(target.shape) != (*num_batches, *out_features):
        return None
    return dtype


def _composite(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
               weight: Optional[Tensor], reduction: Any, ignore_index: Any, label_smoothing: Any,
               logits_shape: tuple, extras: tuple) -> Any:
    """torch's reference path: ``linear`` on the full logits, then :func:`xent_ext.cross_entropy`."""
    logit_scale, softcap, z_loss, return_aux = extras
    num_classes, in_features = linear_weight.shape[0], linear_weight.shape[-1]
    if len(logits_shape) > len(input.shape[:-1]) + 1:  # out_features
        linear_weight = linear_weight.reshape((math.prod(logits_shape[len(input.shape[:-1]):]), in_features))
        if linear_bias is not None:
            linear_bias = linear_bias.reshape(linear_weight.shape[0])
    logits = torch._C._nn.linear(input, linear_weight, linear_bias).reshape(logits_shape)
    kwargs = _extras_kwargs(logit_scale, softcap, z_loss)
    if return_aux:
        kwargs["return_aux"] = True
    return _functional.cross_entropy(logits, target, weight=weight, reduction=reduction, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, **kwargs)


def _parse_extras(logit_scale: Any, softcap: Any, z_loss: Any, return_aux: Any) -> tuple:
    """(logit_scale, softcap, z_loss, return_aux), validated as xent_ext.cross_entropy
    validates them (TypeError for a wrong type, ValueError for a value with no meaning)."""
    if logit_scale == 1.0 and softcap is None and z_loss == 0.0 and return_aux is False:
        return 1.0, None, 0.0, False
    try:
        e = _extras.parse(logit_scale, softcap, z_loss, return_aux, False)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("xent_ext.cross_entropy:", "xent_ext.linear_cross_entropy:")) from None
    return e.logit_scale, e.softcap, e.z_loss, e.return_aux


def _aux(row_stats: Tensor, keep: Optional[Tensor], z_loss: float, reduction: int, shape: tuple,
         acc: torch.dtype) -> Any:
    return _extras.aux_from_row_stats(row_stats, keep, z_loss, reduction, shape, acc)


# ---------------------------------------------------------------------------
# The module.


class _TorchLinearCrossEntropyLoss(torch.nn.Module):
    """Stands in for torch.nn.LinearCrossEntropyLoss on a torch that has none (before 2.13)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"xent_ext.LinearCrossEntropyLoss needs torch.nn.LinearCrossEntropyLoss (torch 2.13 or later); "
            f"this is torch {torch.__version__}. xent_ext.linear_cross_entropy works with it."
        )


class LinearCrossEntropyLoss(getattr(torch.nn, "LinearCrossEntropyLoss", _TorchLinearCrossEntropyLoss)):
    r"""Drop-in for :class:`torch.nn.LinearCrossEntropyLoss`, backed by :func:`xent_ext.linear_cross_entropy`.

    It *is* a ``torch.nn.LinearCrossEntropyLoss`` (a subclass): the same
    constructor ``(in_features, num_classes, *, out_features=(), bias=False,
    device=None, dtype=None, reduction='mean', weight=None, ignore_index=None,
    label_smoothing=0.0, options=None)`` with torch's checks, the same
    parameters (``linear.weight``, ``linear.bias``) and ``weight`` buffer, so
    its ``state_dict`` loads into torch's module and back. It adds the
    keyword-only LLM extras ``logit_scale``, ``softcap``, ``z_loss`` and
    ``return_aux`` (plain attributes, not in the state_dict). Unlike torch's
    module with ``options=None``, it does not script with ``torch.jit.script``
    (its forward calls Python); ``torch.compile`` traces it.

    Example::

        >>> head = xent_ext.LinearCrossEntropyLoss(1024, 32000, z_loss=1e-4)
        >>> loss = head(torch.randn(8, 1024), torch.randint(32000, (8,)))
    """

    def __init__(self, in_features: int, num_classes: int, *, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, z_loss: float = 0.0, return_aux: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(in_features, num_classes, **kwargs)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_aux = return_aux

    def forward(self, input: Tensor, target: Tensor) -> Any:
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (
            self.linear.bias.reshape((self.num_classes, *self.out_features)) if self.linear.bias is not None else None
        )
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_aux=self.return_aux,
        )

    def extra_repr(self) -> str:
        extras = []
        if self.logit_scale != 1.0:
            extras.append(f"logit_scale={self.logit_scale}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.z_loss != 0.0:
            extras.append(f"z_loss={self.z_loss}")
        if self.return_aux:
            extras.append("return_aux=True")
        return ", ".join([super().extra_repr()] + extras)
