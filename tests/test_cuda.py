"""CUDA-specific behaviour of xent_ext (the CUDA twins of the CPU tests live beside them).

* out-of-range class indices: an IndexError like the CPU's (target check on), or NaN rows
  (target check off, and always inside CUDA-graph capture) -- never a device-side assert:
  the CUDA context stays usable;
* very large rows (V = 256000) and more than 2**31 logits;
* CUDA-graph capture and replay, torch.compile(fullgraph=True), the current stream;
* bitwise run-to-run determinism;
* bf16/fp16 error against a float64 reference no worse than torch's own CUDA result;
* the op contract on each of the kernels' row walks: row_stats, loss_dtype, the gradient
  computed in the forward ('none' and probability targets included), huge logit
  magnitudes, torch.autocast('cuda'), logits edited in place after the forward.

Every expected value is torch's, on the same CUDA tensors, except where torch's CUDA
kernels cannot be used: with out-of-range class indices they device-assert (which would
poison this process' CUDA context), so there torch's exception comes from CPU copies;
and at huge magnitudes, where torch's bf16/fp16 kernels are the less exact ones, the
reference is float64 math. The contract's cases also compare with the CPU kernels.
"""

import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import (
    ENV_K,
    LOW_PRECISION,
    REDUCTIONS,
    RTOL,
    _compare,
    assert_bitwise_equal,
    assert_cuda_usable,
    check_against_torch,
    class_dim,
    compare_with_torch,
    cuda_skip_reason,
    dtype_name,
    error_envelope,
    index_target_shape,
    make_index_target,
    make_logits,
    make_prob_target,
    random_like_loss,
    random_weight,
    run_ce,
    same_exception,
    same_outcome,
)

_SKIP = cuda_skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

pytestmark = pytest.mark.cuda

DEV = "cuda"
ours = xent_ext.cross_entropy
EPS32 = torch.finfo(torch.float32).eps


@contextlib.contextmanager
def target_check(enabled):
    """xent_ext.set_cuda_target_check(enabled) for the block; the previous setting after."""
    prev = xent_ext.set_cuda_target_check(enabled)
    try:
        yield prev
    finally:
        xent_ext.set_cuda_target_check(prev)


def assert_context_usable():
    """The CUDA context survived: torch work and a valid xent_ext call (vs torch) still run."""
    assert_cuda_usable(DEV)
    x = make_logits((5, 9), torch.float32, device=DEV)
    t = make_index_target((5, 9), device=DEV)
    check_against_torch(ours, x, t, None, reduction="mean", ctx="a valid call after a bad target")
    torch.cuda.synchronize()


def _cpu_kw(kw):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# ----------------------------------------------------------------------------------
# the target-check switch
# ----------------------------------------------------------------------------------


def test_set_cuda_target_check_returns_previous_setting():
    with target_check(True) as original:
        assert isinstance(original, bool)
        assert xent_ext.set_cuda_target_check(False) is True
        assert xent_ext.set_cuda_target_check(False) is False
        if hasattr(xent_ext, "cuda_target_check"):
            assert xent_ext.cuda_target_check() is False
        assert xent_ext.set_cuda_target_check(True) is False
        if hasattr(xent_ext, "cuda_target_check"):
            assert xent_ext.cuda_target_check() is True
    assert xent_ext.set_cuda_target_check(original) is original


# ----------------------------------------------------------------------------------
# out-of-range class indices
# ----------------------------------------------------------------------------------

# (id, input shape, target dtype, bad value, kwargs); uint8 only for 1-D/2-D inputs (torch
# reads uint8 class indices on its nll_loss path only), and never with weight + label
# smoothing + 'mean' (torch's uint8 quirk, test_errors.py).
BAD_CASES = [
    ("i64_C", (6, 7), torch.int64, 7, {}),
    ("i64_minus1_ignore3", (6, 7), torch.int64, -1, {"ignore_index": 3}),
    ("i64_huge_weight_ls", (6, 7), torch.int64, 2**40, {"weight": True, "label_smoothing": 0.1}),
    ("u8_200", (6, 7), torch.uint8, 200, {}),
    ("u8_unbatched", (7,), torch.uint8, 9, {}),
    ("i64_unbatched", (7,), torch.int64, -5, {}),
    ("i64_NCd", (3, 7, 5), torch.int64, 11, {}),
    ("i64_NCHW_ls", (2, 7, 3, 4), torch.int64, -2, {"label_smoothing": 0.2}),
]


def bad_target(shape, bad, dtype):
    """A valid target for `shape` with one element (at a random position) set to `bad`.
    Returns (target on the GPU, bool mask of the bad position on the GPU)."""
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = index_target_shape(shape)
    t = torch.randint(0, C, tshape, dtype=torch.int64)
    mask = torch.zeros(tshape, dtype=torch.bool)
    pos = int(torch.randint(0, max(t.numel(), 1), ()))
    t.view(-1)[pos] = bad
    mask.view(-1)[pos] = True
    return t.to(device=DEV, dtype=dtype), mask.to(DEV)


def _case_kwargs(shape, kw):
    kw = dict(kw)
    if kw.get("weight") is True:
        kw["weight"] = random_weight(shape[0] if len(shape) == 1 else shape[1], device=DEV)
    return kw


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_target_raises_like_cpu(case, reduction, requires_grad, fresh_seed):
    _, shape, tdt, bad, kw = case
    kw = _case_kwargs(shape, kw)
    x = make_logits(shape, torch.float32, device=DEV).requires_grad_(requires_grad)
    t, _ = bad_target(shape, bad, tdt)
    # torch's CPU bug: batched uint8 + 'none' prints the byte as a character; its message
    # for the same input with 'mean' is the reference (as in test_errors.py)
    ref_red = "mean" if (tdt == torch.uint8 and len(shape) >= 2 and reduction == "none") else reduction
    with target_check(True):
        te, _ = same_exception(lambda: F.cross_entropy(x.detach().cpu(), t.cpu(), reduction=ref_red, **_cpu_kw(kw)),
                               lambda: ours(x, t, reduction=reduction, **kw),
                               ctx=f"seed={fresh_seed} {case[0]} {reduction}")
    assert type(te) is IndexError and str(bad) in str(te), te
    assert_context_usable()


def test_bad_target_reports_the_first_bad_index(fresh_seed):
    # two different bad values: the message names the first in target order, as torch's
    # CPU 'sum'/'mean' do (its 'none' is multi-threaded and names either)
    N, C = 257, 11
    x = make_logits((N, C), device=DEV)
    t = torch.randint(0, C, (N,))
    i, j = sorted(torch.randperm(N)[:2].tolist())
    t[i], t[j] = C + 3, -4
    t = t.to(DEV)
    with target_check(True):
        for red in REDUCTIONS:
            same_exception(lambda: F.cross_entropy(x.cpu(), t.cpu(), reduction="sum"),
                           lambda: ours(x, t, reduction=red), ctx=f"seed={fresh_seed} {red} bad at {i} and {j}")
    assert_context_usable()


@pytest.mark.parametrize("op", ["cross_entropy_index_forward", "cross_entropy_index_forward_with_grad"])
def test_op_raises_on_bad_target(op, fresh_seed):
    # the operators themselves raise (one host sync after the forward)
    N, C, K = 4, 9, 3
    x = make_logits((N, C, K), device=DEV)
    y = torch.randint(0, C, (N, K))
    y.view(-1)[int(torch.randint(0, N * K, ()))] = C
    y = y.to(DEV)
    with target_check(True):
        with pytest.raises(IndexError, match=re.escape(f"Target {C} is out of bounds.")):
            getattr(torch.ops.xent_ext, op)(x, y, None, -100, 0.0, 1)
    assert_context_usable()


def _rows(t, cd):
    """(rows, C) view of a logits-shaped tensor (class dim last)."""
    C = t.shape[cd]
    return t.movedim(cd, -1).reshape(-1, C)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_target_without_check_is_nan(case, reduction, fresh_seed):
    # check off: no sync, no exception; the bad row's loss and gradient row are NaN, the
    # other rows are what torch gives for them
    _, shape, tdt, bad, kw = case
    kw = _case_kwargs(shape, kw)
    x = make_logits(shape, torch.float32, device=DEV)
    t, mask = bad_target(shape, bad, tdt)
    cd = class_dim(x)
    ctx = f"seed={fresh_seed} {case[0]} {reduction}"
    with target_check(False):
        xi = x.detach().requires_grad_()
        loss = ours(xi, t, reduction=reduction, **kw)
        g = random_like_loss(loss)
        (grad,) = torch.autograd.grad(loss, xi, g)
        torch.cuda.synchronize()
    assert loss.device == x.device and grad.shape == x.shape
    bad_rows = mask.reshape(-1)
    good_rows = ~bad_rows
    if reduction == "none":
        assert torch.isnan(loss.reshape(-1)[bad_rows]).all(), f"{ctx}: loss of the bad row is not NaN: {loss}"
    else:
        assert torch.isnan(loss), f"{ctx}: {reduction} with a bad target must be NaN, got {loss.item()}"
    assert torch.isnan(_rows(grad, cd)[bad_rows]).all(), f"{ctx}: gradient row of the bad target is not all NaN"

    if reduction in ("none", "sum") and bool(good_rows.any()):
        # rows are independent for 'none' and 'sum': the good ones are torch's for the same
        # target with the bad entry replaced by a valid class
        t_fixed = torch.where(mask, torch.zeros_like(t), t)
        w = kw.get("weight")
        kw2 = {k: v for k, v in kw.items() if k != "weight"}
        r_loss, r_grads = run_ce(F.cross_entropy, x, t_fixed, w, g, ("input",), reduction=reduction, **kw2)
        env = error_envelope(x, t_fixed, w, reduction, kw2.get("ignore_index", -100), kw2.get("label_smoothing", 0.0), g)
        if reduction == "none":
            _compare("loss (good rows)", loss.reshape(-1)[good_rows], r_loss.reshape(-1)[good_rows], RTOL[torch.float32],
                     ENV_K * EPS32 * env["loss"].reshape(-1)[good_rows.cpu()], ctx)
        _compare("grad (good rows)", _rows(grad, cd)[good_rows], _rows(r_grads["input"], cd)[good_rows],
                 RTOL[torch.float32], ENV_K * EPS32 * env["input"], ctx)
    assert_context_usable()


# ----------------------------------------------------------------------------------
# CUDA graphs, streams, devices
# ----------------------------------------------------------------------------------

# (id, kind, shape, reduction, kwargs)
GRAPH_CASES = [
    ("index_mean", "index", (64, 1000), "mean", {}),
    ("index_sum_weight_ls_ignore", "index", (64, 1000), "sum", {"weight": True, "label_smoothing": 0.1, "ignore_index": 2}),
    ("index_none", "index", (64, 1000), "none", {}),
    ("index_nchw_mean", "index", (2, 21, 8, 8), "mean", {"label_smoothing": 0.1}),
    ("prob_mean", "prob", (64, 1000), "mean", {"label_smoothing": 0.1}),
    ("prob_none_nchw", "prob", (2, 21, 8, 8), "none", {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_cuda_graph_capture_and_replay(case, dtype, fresh_seed):
    """Forward + backward captured in a CUDA graph (with the target check on: capture must
    neither sync nor raise), replayed on new data copied into the static tensors, equal to
    torch eager on that data; a bad target during replay gives NaN instead of an error."""
    name, kind, shape, reduction, kw = case
    kw = dict(kw)
    C = shape[1]
    w = random_weight(C, dtype, DEV) if kw.pop("weight", False) else None
    ii = kw.pop("ignore_index", -100)
    wrt = ("input",) if kind == "index" else ("input", "target")

    def new_data():
        x = make_logits(shape, dtype, device=DEV)
        if kind == "index":
            t = make_index_target(shape, ignore_index=ii, ignore_frac=0.1, device=DEV)
        else:
            t = make_prob_target(shape, dtype, device=DEV)
        g = random_like_loss(torch.empty(index_target_shape(shape) if reduction == "none" else (), dtype=dtype, device=DEV))
        return x, t, g

    x0, t0, g0 = new_data()
    static_x = x0.clone().requires_grad_()
    static_t = t0.clone().requires_grad_(kind == "prob")
    static_g = g0.clone()

    def step():
        loss = ours(static_x, static_t, weight=w, reduction=reduction, ignore_index=ii, **kw)
        if reduction == "none":
            loss.backward(static_g)
        else:
            loss.backward()
        return loss

    def clear_grads():
        static_x.grad = None
        static_t.grad = None

    # warm up on a side stream, as torch.cuda.graph's documentation asks
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            clear_grads()
            step()
    torch.cuda.current_stream().wait_stream(s)

    graph = torch.cuda.CUDAGraph()
    clear_grads()
    with target_check(True):
        with torch.cuda.graph(graph):
            static_loss = step()
    assert static_x.grad is not None

    for it in range(3):
        x, t, g = new_data()
        with torch.no_grad():
            static_x.copy_(x)
            static_t.copy_(t)
            static_g.copy_(g)
        graph.replay()
        grads = {"input": static_x.grad.detach().clone()}
        if kind == "prob":
            grads["target"] = static_t.grad.detach().clone()
        compare_with_torch(static_loss.detach().clone(), grads, x, t, w, reduction=reduction, ignore_index=ii,
                           wrt=wrt, grad_out=g if reduction == "none" else None,
                           ctx=f"seed={fresh_seed} graph {name} {dtype_name(dtype)} replay {it}", **kw)

    if kind == "index":
        # a bad class index during replay: no exception (the check was skipped at capture), NaN row
        with torch.no_grad():
            bad = static_t.clone()
            bad.view(-1)[0] = C + 5
            static_t.copy_(bad)
        graph.replay()
        torch.cuda.synchronize()
        loss = static_loss.detach()
        if reduction == "none":
            assert torch.isnan(loss.reshape(-1)[0]), f"{name}: loss of the bad row is {loss.reshape(-1)[0].item()}"
        else:
            assert torch.isnan(loss), f"{name}: {reduction} with a bad target is {loss.item()}"
        first_row = static_x.grad.detach().movedim(1, -1).reshape(-1, C)[0]
        assert torch.isnan(first_row).all(), f"{name}: gradient row of the bad target is not all NaN"
    del graph
    assert_context_usable()


def test_runs_on_the_current_stream(fresh_seed):
    # The input is written on a side stream behind a long sleep; the loss and gradient are
    # computed on that stream. A kernel launched on another stream would read the logits
    # before they are written.
    shape = (2048, 4096)
    src = make_logits(shape, device=DEV)
    t = make_index_target(shape, device=DEV)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on s
        x = torch.empty_like(src)
        x.copy_(src)
        xi = x.requires_grad_()
        loss = ours(xi, t, reduction="mean", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, xi)
        loss_none = ours(x.detach(), t, reduction="none")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    compare_with_torch(loss.detach(), {"input": grad}, src, t, reduction="mean", label_smoothing=0.1,
                       ctx=f"seed={fresh_seed} side stream")
    ref_none = F.cross_entropy(src, t, reduction="none")
    torch.testing.assert_close(loss_none, ref_none, rtol=1e-5, atol=1e-5)


MIXED_CASES = [
    ("target_cpu", lambda x, t, w: (x, t.cpu(), None)),
    ("input_cpu", lambda x, t, w: (x.cpu(), t, None)),
    ("weight_cpu", lambda x, t, w: (x, t, w.cpu())),
]


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_cpu_and_cuda_tensors_mixed(case, kind, fresh_seed):
    # handed to torch: torch's own exception (or result)
    x = make_logits((3, 5), device=DEV)
    t = make_index_target((3, 5), device=DEV) if kind == "index" else make_prob_target((3, 5), device=DEV)
    x, t, w = case[1](x, t, random_weight(5, device=DEV))
    same_outcome(lambda: F.cross_entropy(x, t, weight=w), lambda: ours(x, t, weight=w), ctx=f"{case[0]} {kind}")
    assert_cuda_usable(DEV)


def test_second_device(fresh_seed):
    # tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = "cuda:1"
    with torch.cuda.device(0):
        x = make_logits((33, 517), torch.bfloat16, device=dev)
        t = make_index_target((33, 517), device=dev)
        loss, grads = check_against_torch(ours, x, t, None, reduction="mean", label_smoothing=0.1,
                                          ctx=f"seed={fresh_seed} cuda:1")
    assert loss.device == torch.device(dev) and grads["input"].device == torch.device(dev)


# ----------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------

DET_SHAPES = [("vocab", (512, 128256)), ("small_C", (65536, 10)), ("nchw", (4, 21, 64, 64))]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("case", DET_SHAPES, ids=[c[0] for c in DET_SHAPES])
def test_bitwise_deterministic(case, dtype, kind, reduction, rng, fresh_seed):
    _, shape = case
    C = shape[1]
    x = make_logits(shape, dtype, device=DEV)
    w = random_weight(C, dtype, DEV) if rng.random() < 0.5 else None
    ls = rng.choice([0.0, 0.1])
    if kind == "index":
        ii = rng.randrange(C)
        t = make_index_target(shape, ignore_index=ii, ignore_frac=0.1, device=DEV)
        kw = dict(ignore_index=ii, label_smoothing=ls, reduction=reduction)
        wrt = ("input",)
    else:
        t = make_prob_target(shape, dtype, device=DEV)
        kw = dict(label_smoothing=ls, reduction=reduction)
        wrt = ("input", "target")
    g = random_like_loss(torch.empty(index_target_shape(shape) if reduction == "none" else (), dtype=dtype, device=DEV))
    runs = []
    for i in range(3):
        # other allocations in between, so the buffers land at other addresses
        junk = torch.empty(int(torch.randint(1, 1 << 20, ())), device=DEV)
        runs.append(run_ce(ours, x, t, w, g, wrt, **kw))
        del junk
    base_loss, base_grads = runs[0]
    for i, (loss, grads) in enumerate(runs[1:], 1):
        ctx = f"seed={fresh_seed} {case[0]} {dtype_name(dtype)} {kind} {reduction} ls={ls} weighted={w is not None} run {i}"
        assert_bitwise_equal(loss, base_loss, ctx + " loss")
        for n in wrt:
            assert_bitwise_equal(grads[n], base_grads[n], ctx + f" grad[{n}]")


# ----------------------------------------------------------------------------------
# low-precision accuracy against torch's own CUDA result
# ----------------------------------------------------------------------------------

ACC_SHAPES = [(256, 32000), (4096, 1000), (8, 21, 32, 32)]


def _err(a, ref):
    """2-norm of a - ref over the elements where ref is finite (float64); inf when `a` is
    not finite there (torch's fp16 label smoothing overflows: its smooth term sums C
    log-probabilities in fp16)."""
    a = a.double()
    ref = ref.double()
    fin = torch.isfinite(ref)
    if not torch.isfinite(a[fin]).all():
        return math.inf
    return (a[fin] - ref[fin]).norm().item()


@pytest.mark.parametrize("variant", ["plain", "weight_ls"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("shape", ACC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_low_precision_error_not_worse_than_torch(shape, dtype, variant, fresh_seed):
    C = shape[1]
    x = make_logits(shape, dtype, device=DEV)
    t = make_index_target(shape, ignore_index=0, ignore_frac=0.05, device=DEV)
    w = random_weight(C, dtype, DEV) if variant == "weight_ls" else None
    ls = 0.1 if variant == "weight_ls" else 0.0
    eps = torch.finfo(dtype).eps
    for reduction in ("none", "mean"):
        g = random_like_loss(torch.empty(index_target_shape(shape) if reduction == "none" else (), dtype=dtype, device=DEV))
        kw = dict(ignore_index=0, label_smoothing=ls, reduction=reduction)
        o_loss, o_grads = run_ce(ours, x, t, w, g, ("input",), **kw)
        t_loss, t_grads = run_ce(F.cross_entropy, x, t, w, g, ("input",), **kw)
        r_loss, r_grads = run_ce(F.cross_entropy, x.double(), t, None if w is None else w.double(), g.double(),
                                 ("input",), **kw)
        for name, o, tt, r in (("loss", o_loss, t_loss, r_loss), ("grad", o_grads["input"], t_grads["input"], r_grads["input"])):
            assert o.dtype == tt.dtype == dtype and o.shape == tt.shape
            e_ours, e_torch = _err(o, r), _err(tt, r)
            assert e_ours < math.inf, f"seed={fresh_seed} {shape} {variant} {reduction} {name}: non-finite where float64 is finite"
            # ties allowed; slack: two ulps of the largest value (one element rounded the other way)
            slack = 2 * eps * r.double().abs().max().item()
            assert e_ours <= e_torch + slack, (
                f"seed={fresh_seed} {shape} {dtype_name(dtype)} {variant} {reduction} {name}: our error norm "
                f"{e_ours:.4g} > torch's {e_torch:.4g} + {slack:.3g} (vs float64)")


# ----------------------------------------------------------------------------------
# row_stats, the loss dtype, the gradient in the forward, in-place edits
# ----------------------------------------------------------------------------------

xops = torch.ops.xent_ext
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Class counts that take each row walk of the kernels (Note [Row walks on the GPU],
# csrc/cuda/row_walk.cuh): a thread, a warp or a block per row.
WALK_C = [("thread", 7), ("warp", 300), ("block", 5000)]

# (N, C, K) logits in the memory layouts the kernels tell apart: class stride 1 with
# 16-byte-aligned rows ('nkc', rows of an (N, K, C) tensor), class stride 1 with rows one
# element off (so the walk starts with a scalar head and the gradient's alignment
# differs), and class stride K ('nck', contiguous (N, C, K): always a thread per row).
LAYOUTS3 = ("nkc", "nkc_offset", "nck")


def logits3(N, C, K, dtype, layout, scale=2.0):
    if layout == "nkc":
        return make_logits((N, K, C), dtype, scale=scale, device=DEV).permute(0, 2, 1)
    if layout == "nkc_offset":
        return make_logits((N, K, C + 1), dtype, scale=scale, device=DEV)[..., 1:].permute(0, 2, 1)
    if layout == "nck":
        return make_logits((N, C, K), dtype, scale=scale, device=DEV)
    raise ValueError(layout)


def index_target3(N, C, K, ignore_index):
    """(N, K) class indices on the device, about a tenth of them ignore_index."""
    t = torch.randint(0, C, (N, K))
    t = torch.where(torch.rand(N, K) < 0.1, torch.full_like(t, ignore_index), t)
    return t.to(DEV)


def prob_target3(x):
    """Rows of probabilities (softmax over the class dim) in x's dtype and layout."""
    raw = torch.randn(x.shape, dtype=torch.float64) * 2.0
    q = torch.empty_like(x)
    q.copy_(torch.softmax(raw, dim=1).to(x.dtype))
    return q


def unit_upstream(loss):
    """The upstream gradient the *_with_grad forwards assume: ones, the loss's shape and dtype."""
    return torch.ones_like(loss)


def close_to_cpu(name, ours, cpu, dtype, ctx):
    """A CUDA result against the CPU kernels' on the same data: both exact to their
    dtype, summed in different orders, so a few roundings apart at most."""
    assert ours.dtype == cpu.dtype and ours.shape == cpu.shape, (
        f"{ctx}: {name} {ours.dtype}{tuple(ours.shape)} vs CPU {cpu.dtype}{tuple(cpu.shape)}")
    if ours.numel() == 0:
        return
    eps = max(torch.finfo(ours.dtype).eps, torch.finfo(acc_dtype(dtype)).eps)
    c = cpu.double()
    fin = torch.isfinite(c)
    scale = c[fin].abs().max().item() if bool(fin.any()) else 0.0
    _compare(name + " (vs the CPU kernels)", ours.cpu(), cpu, 4 * eps, 8 * eps * scale, ctx)


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("variant", ["plain", "weight_ls_ignore"])
@pytest.mark.parametrize("layout", LAYOUTS3)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("walk,C", WALK_C, ids=[w for w, _ in WALK_C])
def test_index_gradient_in_forward_equals_backward(walk, C, dtype, layout, variant, reduction, fresh_seed):
    """cross_entropy_index_forward_with_grad, 'none' included: the loss, row_stats and
    total weight of the plain forward, bit for bit, and a gradient equal to the backward
    op's for an upstream gradient of 1 (ones per row for 'none'), bit for bit (the two
    kernels form it from the same row_stats); against torch and the CPU kernels."""
    N, K = 5, 3
    x = logits3(N, C, K, dtype, layout)
    ii = 1 if variant != "plain" else -100
    y = index_target3(N, C, K, ii)
    w = random_weight(C, dtype, DEV) if variant != "plain" else None
    ls = 0.1 if variant != "plain" else 0.0
    ctx = f"seed={fresh_seed} {walk} {dtype_name(dtype)} {layout} {variant} reduction={reduction}"

    loss_f, rs_f, tw_f, grad_f = xops.cross_entropy_index_forward_with_grad(x, y, w, ii, ls, reduction)
    loss, rs, tw = xops.cross_entropy_index_forward(x, y, w, ii, ls, reduction)
    assert rs.shape == (2, N, K) and rs.dtype == torch.float64 and rs.is_contiguous(), ctx
    for name, a, b in (("loss", loss_f, loss), ("row_stats", rs_f, rs), ("total_weight", tw_f, tw)):
        assert_bitwise_equal(a, b, f"{ctx}: {name} of the forward with gradient vs the plain forward")
    grad_b = xops.cross_entropy_index_backward(unit_upstream(loss), x, y, w, rs, tw, ii, ls, reduction)
    assert grad_f.shape == x.shape and grad_f.dtype == dtype
    assert_bitwise_equal(grad_f, grad_b, f"{ctx}: gradient of the forward vs the backward op for an upstream 1")

    red = ("none", "mean", "sum")[reduction]
    compare_with_torch(loss_f, {"input": grad_f}, x, y, w, reduction=red, ignore_index=ii, label_smoothing=ls,
                       grad_out=None, ctx=ctx)
    c = xops.cross_entropy_index_forward_with_grad(x.cpu(), y.cpu(), None if w is None else w.cpu(), ii, ls, reduction)
    for name, ours, cpu in (("loss", loss_f, c[0]), ("row_stats", rs_f, c[1]), ("grad", grad_f, c[3])):
        close_to_cpu(name, ours, cpu, dtype, ctx)
    # the row max is a logit, exact in any accumulation type
    xm = x.detach().to(acc_dtype(dtype)).amax(dim=1).double()
    assert_bitwise_equal(rs[0], xm, f"{ctx}: row_stats[0] is not the row max")


PROB_GRADS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("grads", PROB_GRADS, ids=["both", "input", "target", "neither"])
@pytest.mark.parametrize("variant", ["plain", "weight_ls"])
@pytest.mark.parametrize("layout", LAYOUTS3)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("walk,C", WALK_C, ids=[w for w, _ in WALK_C])
def test_prob_gradient_in_forward_equals_backward(walk, C, dtype, layout, variant, grads, reduction, fresh_seed):
    """cross_entropy_prob_forward_with_grad: the plain forward's outputs bit for bit, the
    gradients asked for equal to the backward op's for an upstream gradient of 1 (bit for
    bit), empty tensors for those not asked for; against torch and the CPU kernels."""
    N, K = 5, 3
    input_grad, target_grad = grads
    x = logits3(N, C, K, dtype, layout)
    q = prob_target3(x)
    w = random_weight(C, dtype, DEV) if variant != "plain" else None
    ls = 0.1 if variant != "plain" else 0.0
    ctx = f"seed={fresh_seed} {walk} {dtype_name(dtype)} {layout} {variant} grads={grads} reduction={reduction}"

    loss_f, rs_f, cs_f, gi_f, gt_f = xops.cross_entropy_prob_forward_with_grad(x, q, w, ls, reduction, input_grad,
                                                                               target_grad)
    loss, rs, cs = xops.cross_entropy_prob_forward(x, q, w, ls, reduction)
    for name, a, b in (("loss", loss_f, loss), ("row_stats", rs_f, rs), ("coef_sum", cs_f, cs)):
        assert_bitwise_equal(a, b, f"{ctx}: {name} of the forward with gradients vs the plain forward")
    gi_b, gt_b = xops.cross_entropy_prob_backward(unit_upstream(loss), x, q, w, rs, cs, ls, reduction, input_grad,
                                                  target_grad)
    for name, want, f, b, like in (("input", input_grad, gi_f, gi_b, x), ("target", target_grad, gt_f, gt_b, q)):
        if not want:
            assert f.numel() == 0, f"{ctx}: a {name} gradient that was not asked for is not empty: {tuple(f.shape)}"
            continue
        assert f.shape == like.shape and f.dtype == dtype, f"{ctx}: grad[{name}] {f.dtype}{tuple(f.shape)}"
        assert_bitwise_equal(f, b, f"{ctx}: grad[{name}] of the forward vs the backward op for an upstream 1")

    red = ("none", "mean", "sum")[reduction]
    wrt = tuple(n for n, want in (("input", input_grad), ("target", target_grad)) if want)
    compare_with_torch(loss_f, {"input": gi_f, "target": gt_f}, x, q, w, reduction=red, label_smoothing=ls,
                       wrt=wrt, grad_out=None, ctx=ctx)
    c = xops.cross_entropy_prob_forward_with_grad(x.cpu(), q.cpu(), None if w is None else w.cpu(), ls, reduction,
                                                  input_grad, target_grad)
    for name, ours, cpu in (("loss", loss_f, c[0]), ("row_stats", rs_f, c[1]), ("grad[input]", gi_f, c[3]),
                            ("grad[target]", gt_f, c[4])):
        close_to_cpu(name, ours, cpu, dtype, ctx)


@pytest.mark.parametrize("kind", ["index", "index_with_grad", "prob", "prob_with_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("walk,C", WALK_C, ids=[w for w, _ in WALK_C])
def test_loss_dtype_and_accumulation_dtype_upstream(walk, C, dtype, kind, fresh_seed):
    """loss_dtype = the accumulation dtype (autocast): the loss in fp32 for bf16/fp16 logits,
    the very value the input-dtype loss is that value rounded (one rounding), every other
    output unchanged; the backward ops take an upstream gradient in either dtype."""
    N, K = 4, 2
    acc = acc_dtype(dtype)
    x = logits3(N, C, K, dtype, "nkc")
    w = random_weight(C, dtype, DEV)
    if kind.startswith("index"):
        y = index_target3(N, C, K, 2)
        args = (x, y, w, 2, 0.1)
        fwd = xops.cross_entropy_index_forward_with_grad if kind.endswith("with_grad") else xops.cross_entropy_index_forward
    else:
        y = prob_target3(x)
        args = (x, y, w, 0.1)
        fwd = xops.cross_entropy_prob_forward_with_grad if kind.endswith("with_grad") else xops.cross_entropy_prob_forward
    for reduction in (0, 1, 2):
        ctx = f"seed={fresh_seed} {walk} {dtype_name(dtype)} {kind} reduction={reduction}"
        extra = (True, True) if kind == "prob_with_grad" else ()
        out_in = fwd(*args, reduction, *extra)
        out_acc = fwd(*args, reduction, *extra, loss_dtype=acc)
        assert out_in[0].dtype == dtype and out_acc[0].dtype == acc, ctx
        assert out_acc[0].shape == out_in[0].shape, ctx
        assert_bitwise_equal(out_acc[0].to(dtype), out_in[0], f"{ctx}: the input-dtype loss is not the fp32 loss rounded")
        for i in range(1, len(out_in)):
            assert_bitwise_equal(out_acc[i], out_in[i], f"{ctx}: output {i} depends on loss_dtype")
        # an upstream gradient in the accumulation dtype, with values the input dtype holds
        # exactly: the same gradient as from the input-dtype one
        g = random_like_loss(out_in[0])
        rs, aux = out_in[1], out_in[2]
        if kind.startswith("index"):
            back = lambda gl: xops.cross_entropy_index_backward(gl, x, y, w, rs, aux, 2, 0.1, reduction)  # noqa: E731
        else:
            back = lambda gl: xops.cross_entropy_prob_backward(gl, x, y, w, rs, aux, 0.1, reduction, True, True)  # noqa: E731
        b_in, b_acc = back(g), back(g.to(acc))
        for i, (a, b) in enumerate(zip(b_in if isinstance(b_in, tuple) else (b_in,),
                                       b_acc if isinstance(b_acc, tuple) else (b_acc,))):
            assert a.dtype == dtype, ctx
            assert_bitwise_equal(b, a, f"{ctx}: backward output {i} with an fp32 upstream gradient")
    if dtype in LOW_PRECISION:
        other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
        for bad in (other, torch.float64):
            with pytest.raises(RuntimeError, match="loss_dtype"):
                fwd(*args, 1, *((True, True) if kind == "prob_with_grad" else ()), loss_dtype=bad)


# Magnitudes where one lse = max + log_sum keeps nothing of log_sum (1e16 against
# log 2 in fp32 and fp64), and ones it keeps; fp16 holds at most 65504.
HUGE = {
    torch.float64: (1e4, 1e16, -1e16, 1e300),
    torch.float32: (1e4, 1e8, 1e16, -1e16),
    torch.bfloat16: (1e8, 1e16, -1e16),
    torch.float16: (2e4, -2e4),
}


def huge_rows(N, C, M, dtype):
    """(N, C) logits on the device: M at two or three random classes of each row, far
    below M elsewhere (small random values for M > 0, 2M for M < 0), so the row's softmax
    is 1/2 or 1/3 there and 0 elsewhere; and a target that is one of those classes in
    even rows, another class in odd rows."""
    x = torch.randn(N, C, dtype=torch.float64) * 2.0 if M > 0 else torch.full((N, C), 2.0 * M, dtype=torch.float64)
    y = torch.empty(N, dtype=torch.int64)
    for r in range(N):
        top = torch.randperm(C)[: 2 + r % 2]
        x[r, top] = M
        others = [c for c in range(C) if c not in set(top.tolist())]
        y[r] = top[0] if r % 2 == 0 else others[int(torch.randint(0, len(others), ()))]
    return x.to(device=DEV, dtype=dtype), y.to(DEV)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "index_ls", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("walk,C", WALK_C, ids=[w for w, _ in WALK_C])
def test_huge_magnitude_gradient(walk, C, dtype, kind, reduction, fresh_seed):
    """Rows [M, M, small...] for |M| up to 1e16 (1e300 in fp64): the gradient is softmax
    from the row max and log-sum kept apart, [-1/2, 1/2, 0...] - and so on - at any M,
    as torch's; one saved lse swallowed log 2 and gave [0, 1, 0...]. The reference is
    float64 math on the same values (torch's bf16/fp16 kernels round their log_softmax
    to the input dtype, so they are the less exact ones); also the CPU kernels."""
    N = 6
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(acc_dtype(dtype)).eps
    for M in HUGE[dtype]:
        ctx = f"seed={fresh_seed} {walk} {dtype_name(dtype)} {kind} {reduction} M={M:g}"
        x, y = huge_rows(N, C, M, dtype)
        ls = 0.1 if kind == "index_ls" else 0.0
        w = random_weight(C, dtype, DEV) if kind == "index_ls" else None
        t = make_prob_target((N, C), dtype, device=DEV) if kind == "prob" else y
        wrt = ("input", "target") if kind == "prob" else ("input",)
        g = random_like_loss(torch.empty((N,) if reduction == "none" else (), dtype=dtype))
        kw = dict(reduction=reduction, label_smoothing=ls)
        o_loss, o_grads = run_ce(ours, x, t, w, g.to(DEV), wrt, **kw)

        def up(v):
            return None if v is None else v.detach().cpu().double()

        r_loss, r_grads = run_ce(F.cross_entropy, up(x), up(t) if kind == "prob" else t.cpu(), up(w), up(g), wrt, **kw)
        wmax = 1.0 if w is None else float(w.double().abs().max())
        gmax = float(g.double().abs().max())
        den = 1.0
        if reduction == "mean":
            den = float(N) if (w is None or kind == "prob") else float(w.double().cpu()[y.cpu()].sum())
        scale = gmax * wmax / den  # the largest per-row coefficient of the gradient
        rtol = max(RTOL[acc_dtype(dtype)], 1.01 * eps_out)
        tiny = torch.finfo(dtype).smallest_normal  # below it, the dtype's absolute resolution
        _compare("loss", o_loss.cpu(), r_loss.to(dtype), rtol, 8 * eps_acc * wmax * (1 + math.log(C)) + tiny, ctx)
        _compare("grad[input]", o_grads["input"].cpu(), r_grads["input"].to(dtype), rtol,
                 16 * eps_acc * scale + tiny, ctx)
        if kind == "prob":
            # -(1 - eps) w log_softmax: as large as M itself where the softmax is 0
            _compare("grad[target]", o_grads["target"].cpu(), r_grads["target"].to(dtype), rtol,
                     8 * eps_acc * scale * (1 + math.log(C)) + tiny, ctx)
        c_loss, c_grads = run_ce(ours, x.cpu(), t.cpu(), None if w is None else w.cpu(), g, wrt, **kw)
        close_to_cpu("loss", o_loss, c_loss, dtype, ctx)
        for n in wrt:
            close_to_cpu(f"grad[{n}]", o_grads[n], c_grads[n], dtype, ctx)


def test_huge_magnitude_plain_values():
    """The plain case, no reference needed: x = [[M, M, 0]], target 0, M = 1e16, fp32:
    loss log 2 and gradient [-1/2, 1/2, 0] (to the exp's last bits), through the forward
    with gradient and through the recomputing backward op; row_stats = [M, log 2]."""
    M = 1e16
    x = torch.tensor([[M, M, 0.0]], device=DEV)
    y = torch.tensor([0], device=DEV)
    want = torch.tensor([[-0.5, 0.5, 0.0]], device=DEV)
    xi = x.clone().requires_grad_()
    loss = ours(xi, y, reduction="sum")
    loss.backward()
    assert abs(loss.item() - math.log(2)) <= 4 * EPS32, loss
    torch.testing.assert_close(xi.grad, want, rtol=0, atol=4 * EPS32)
    loss, rs, tw = xops.cross_entropy_index_forward(x[..., None], y[:, None], None, -100, 0.0, 2)
    assert rs[0, 0, 0].item() == float(torch.tensor(M)), rs  # the fp32 logit, exactly
    assert abs(rs[1, 0, 0].item() - math.log(2)) <= 4 * EPS32, rs
    grad = xops.cross_entropy_index_backward(torch.ones((), device=DEV), x[..., None], y[:, None], None, rs, tw,
                                             -100, 0.0, 2)
    torch.testing.assert_close(grad[..., 0], want, rtol=0, atol=4 * EPS32)


AUTOCAST_SHAPES = [(37, 300), (3, 7, 2, 5), (4, 5000)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("wdtype", [None, torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: "noweight" if d is None else "w_" + dtype_name(d))
@pytest.mark.parametrize("xdtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16], ids=lambda d: "autocast_" + dtype_name(d))
def test_autocast_matches_torch(ac, xdtype, wdtype, kind, reduction, rng, fresh_seed):
    """Under torch.autocast on the GPU, as torch: bf16/fp16/fp32 logits give an fp32 loss
    (from the logits as they are: no fp32 copy), class weights of any float dtype, fp64
    untouched; the gradients come back in the logits' (and target's) dtype. Values
    against torch under the same autocast."""
    shape = rng.choice(AUTOCAST_SHAPES)
    C = shape[1]
    ls = rng.choice([0.0, 0.1])
    x = make_logits(shape, xdtype, device=DEV)
    w = random_weight(C, wdtype, DEV) if wdtype is not None else None
    if kind == "index":
        t = make_index_target(shape, ignore_index=1, ignore_frac=0.1, device=DEV)
        kw = dict(reduction=reduction, ignore_index=1, label_smoothing=ls)
        wrt = ("input",)
    else:
        t = make_prob_target(shape, xdtype, device=DEV)
        kw = dict(reduction=reduction, label_smoothing=ls)
        wrt = ("input", "target")
    ctx = (f"seed={fresh_seed} autocast {dtype_name(ac)} {kind} {shape} {dtype_name(xdtype)} weight "
           f"{wdtype and dtype_name(wdtype)} ls={ls} {reduction}")
    device_type = torch.device(DEV).type

    def under_autocast(fn, g=None):
        with torch.autocast(device_type, dtype=ac):
            return run_ce(fn, x, t, w, g, wrt, **kw)

    try:
        t_loss, _ = under_autocast(F.cross_entropy)
    except Exception as te:  # noqa: BLE001  (fp64 logits with a weight autocast made fp32)
        with pytest.raises(type(te)):
            under_autocast(ours)
        return
    g = random_like_loss(t_loss)
    t_loss, t_grads = under_autocast(F.cross_entropy, g)
    o_loss, o_grads = under_autocast(ours, g)
    want = torch.float64 if xdtype == torch.float64 else torch.float32
    assert t_loss.dtype == want, f"{ctx}: torch's own loss dtype is {t_loss.dtype}"
    assert o_loss.dtype == want and o_loss.shape == t_loss.shape and o_loss.device == t_loss.device, (
        f"{ctx}: loss {o_loss.dtype}{tuple(o_loss.shape)} on {o_loss.device}, torch's {t_loss.dtype}"
        f"{tuple(t_loss.shape)}")
    for n in wrt:
        assert o_grads[n].dtype == t_grads[n].dtype == xdtype, f"{ctx}: grad[{n}] {o_grads[n].dtype}"
        assert o_grads[n].shape == t_grads[n].shape, ctx
    # torch computed in fp32 (fp64) on upcast copies: both are exact to the compute dtype
    ceps = torch.finfo(want).eps
    up = (lambda v: None if v is None else v.to(want)) if want == torch.float32 else (lambda v: v)
    env = error_envelope(up(x), up(t) if kind == "prob" else t, up(w), reduction, kw.get("ignore_index", -100), ls, g)
    _compare("loss", o_loss, t_loss, RTOL[want], ENV_K * ceps * env["loss"].to(DEV), ctx)
    for n in wrt:
        # a bf16/fp16 gradient may be rounded twice: the unit gradient the forward wrote,
        # then that scaled by the upstream gradient
        rtol = max(RTOL[want], 2.02 * torch.finfo(xdtype).eps if xdtype in LOW_PRECISION else 0.0)
        _compare(f"grad[{n}]", o_grads[n], t_grads[n], rtol, ENV_K * ceps * env[n] + torch.finfo(xdtype).smallest_normal,
                 ctx)


def test_autocast_reads_low_precision_logits_without_a_copy(fresh_seed):
    """Under autocast, bf16 logits are read as they are: the forward's peak memory is the
    gradient it writes (bf16, the logits' size) and per-row buffers, never an fp32 copy of
    the logits (twice their size), which is what torch itself allocates."""
    N, C = 512, 32000
    x = make_logits((N, C), torch.bfloat16, device=DEV)
    t = make_index_target((N, C), device=DEV)
    logits_bytes = x.numel() * x.element_size()
    for requires_grad in (False, True):
        xi = x.detach().requires_grad_(requires_grad)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ours(xi, t, label_smoothing=0.1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert loss.dtype == torch.float32
        allowed = (logits_bytes if requires_grad else 0) + logits_bytes // 4
        assert peak <= allowed, (f"seed={fresh_seed} requires_grad={requires_grad}: the forward allocated "
                                 f"{peak / 2**20:.1f} MiB at its peak (bf16 logits {logits_bytes / 2**20:.1f} MiB, "
                                 f"allowed {allowed / 2**20:.1f} MiB): an fp32 copy of the logits?")
        if requires_grad:
            loss.backward()
            assert xi.grad.dtype == torch.bfloat16
        del loss, xi


def _edit(h, how):
    with torch.no_grad():
        if how == "add":
            h.add_(torch.randn(h.shape, dtype=torch.float64).to(device=h.device, dtype=h.dtype))
        elif how == "zero":
            h.zero_()
        else:
            h.fill_(float("nan"))


@pytest.mark.parametrize("edit", ["add", "zero", "nan"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "index_weight_ls", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_name)
@pytest.mark.parametrize("shape", [(33, 300), (2, 5, 4, 3), (4, 5000)], ids=lambda s: "x".join(map(str, s)))
def test_inplace_edit_after_forward(shape, dtype, kind, reduction, edit, fresh_seed):
    """Logits edited in place between the forward and the backward (an activation reused in
    place): the first backward gives the gradient at the values the forward saw, as torch's
    (which saves only log_softmax), for every reduction and for probability targets, with an
    upstream gradient that is not 1."""
    C = shape[1]
    x = make_logits(shape, dtype, device=DEV)
    w = random_weight(C, dtype, DEV) if kind == "index_weight_ls" else None
    ls = 0.1 if kind == "index_weight_ls" else 0.0
    t = make_prob_target(shape, dtype, device=DEV) if kind == "prob" else make_index_target(shape, device=DEV)
    ctx = f"seed={fresh_seed} {shape} {dtype_name(dtype)} {kind} {reduction} edit={edit}"
    g = random_like_loss(torch.empty(index_target_shape(shape) if reduction == "none" else (), dtype=dtype, device=DEV))

    def run(fn):
        leaf = x.detach().clone().requires_grad_()
        h = leaf * 1  # a non-leaf, as an activation would be
        loss = fn(h, t, weight=w, reduction=reduction, label_smoothing=ls)
        _edit(h, edit)
        (grad,) = torch.autograd.grad(loss, leaf, g)
        return loss.detach(), grad

    t_loss, t_grad = run(F.cross_entropy)  # torch itself allows the edit
    o_loss, o_grad = run(ours)
    compare_with_torch(o_loss, {"input": o_grad}, x, t, w, reduction=reduction, label_smoothing=ls, grad_out=g,
                       ctx=ctx)
    # the reference: torch's gradient after the edit is its gradient without it
    torch.testing.assert_close(t_grad, run_ce(F.cross_entropy, x, t, w, g, ("input",), reduction=reduction,
                                              label_smoothing=ls)[1]["input"])


# ----------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------


# (N, kind): the probability path at N=8 only
VOCAB_CASES = [(8, "index"), (64, "index"), (8, "prob")]


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("N,kind", VOCAB_CASES, ids=[f"N{n}-{k}" for n, k in VOCAB_CASES])
def test_vocab_256000(N, kind, dtype, reduction, rng, fresh_seed):
    V = 256000
    ls = rng.choice([0.0, 0.1])
    w = random_weight(V, dtype, DEV) if rng.random() < 0.5 else None
    x = make_logits((N, V), dtype, rng.choice(["contiguous", "sliced_batch"]), rng.choice([1.0, 4.0]), device=DEV)
    if kind == "index":
        ii = rng.randrange(V)
        t = make_index_target((N, V), ignore_index=ii, ignore_frac=0.1, device=DEV)
        wrt = ("input",)
    else:
        ii = -100
        t = make_prob_target((N, V), dtype, device=DEV)
        wrt = ("input", "target")
    check_against_torch(ours, x, t, w, reduction=reduction, ignore_index=ii, label_smoothing=ls, wrt=wrt,
                        ctx=f"seed={fresh_seed} V=256000 N={N} {dtype_name(dtype)} {reduction} {kind} ls={ls} "
                            f"weighted={w is not None}")


@pytest.mark.slow
def test_more_than_2pow31_logits_bf16(fresh_seed):
    """N x V > 2**31 bf16 logits (4.3 GB, and as much again for the gradient): every row's
    loss against torch in fp32 (in chunks), the 'sum', and the gradient rows at the start,
    at the end and around element 2**31, against torch on just those rows."""
    N, V = 16800, 128256
    numel = N * V
    assert numel > 2**31
    r = 2**31 // V  # the row that holds element 2**31
    assert r * V < 2**31 < (r + 1) * V, "row r must straddle element 2**31"
    bytes_bf16 = numel * 2
    need = 2 * bytes_bf16 + 3 * 2**30  # logits + gradient + reference chunks and slack
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    ctx = f"seed={fresh_seed} N={N} V={V} bf16"
    gen = torch.Generator(device=DEV).manual_seed(fresh_seed)
    # too big to draw on the CPU and copy: drawn on the GPU from a generator seeded by fresh_seed
    x = torch.randn((N, V), dtype=torch.bfloat16, device=DEV, generator=gen).mul_(2.0)
    t = torch.randint(0, V, (N,), device=DEV, generator=gen)
    rows = sorted({0, 1, 2, r - 1, r, r + 1, N - 3, N - 2, N - 1})
    rows_t = torch.tensor(rows, device=DEV)

    # 1. 'none', no grad: every row against torch in fp32, 1024 rows at a time
    loss_none = ours(x, t, reduction="none")
    assert loss_none.shape == (N,) and loss_none.dtype == torch.bfloat16
    ref = torch.empty(N, dtype=torch.float64, device=DEV)
    env = torch.empty(N, dtype=torch.float64, device=DEV)
    for i in range(0, N, 1024):
        xc = x[i:i + 1024].float()
        tc = t[i:i + 1024]
        ref[i:i + 1024] = F.cross_entropy(xc, tc, reduction="none").double()
        # error_envelope's per-row term for a plain class-index row: |x_t| + |lse| + 1 + sqrt(C)
        env[i:i + 1024] = (xc.gather(1, tc[:, None]).squeeze(1).abs() + torch.logsumexp(xc, 1).abs()
                           + 1 + math.sqrt(V)).double()
        del xc
    bf = torch.finfo(torch.bfloat16)
    rtol = max(RTOL[torch.float32], 1.01 * bf.eps)
    _compare("loss 'none' (all rows)", loss_none, ref.to(torch.bfloat16), rtol,
             ENV_K * EPS32 * env + bf.smallest_normal, ctx)

    # 2. 'sum' with the logits requiring grad (the gradient computed in the forward)
    xa = x.detach().requires_grad_()
    loss_sum = ours(xa, t, reduction="sum")
    (grad_sum,) = torch.autograd.grad(loss_sum, xa)
    ref_sum = ref.sum().item()
    err = abs(loss_sum.double().item() - ref_sum)
    allowed = 1.01 * bf.eps * abs(ref_sum) + ENV_K * EPS32 * env.sum().item()
    assert err <= allowed, f"{ctx}: 'sum' {loss_sum.item()} vs {ref_sum} (err {err:.4g} > {allowed:.4g})"
    assert grad_sum.shape == x.shape and grad_sum.dtype == x.dtype
    # the 'sum' gradient row is the 'none' gradient row for an upstream gradient of 1
    xs, ts = x[rows_t], t[rows_t]
    compare_with_torch(loss_none[rows_t], {"input": grad_sum[rows_t]}, xs, ts, reduction="none",
                       grad_out=None, ctx=ctx + f" 'sum' gradient rows {rows}")
    del grad_sum, loss_sum, xa

    # 3. 'none' with a random upstream gradient (the separate backward)
    xb = x.detach().requires_grad_()
    loss_b = ours(xb, t, reduction="none")
    assert_bitwise_equal(loss_b.detach(), loss_none, ctx + " 'none' loss, second run")
    g = torch.randn(N, device=DEV, generator=gen).to(torch.bfloat16)
    (grad_b,) = torch.autograd.grad(loss_b, xb, g)
    compare_with_torch(loss_b[rows_t], {"input": grad_b[rows_t]}, xs, ts, reduction="none",
                       grad_out=g[rows_t], ctx=ctx + f" 'none' gradient rows {rows}")
    del grad_b, loss_b, xb, x
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------
# the environment switch (a subprocess) and torch.compile (inductor), slowest last
# ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_target_check_environment_variable():
    # default on; XENT_EXT_CUDA_TARGET_CHECK=0 at import turns it off
    code = "import xent_ext; print('XENT-CHECK', xent_ext.set_cuda_target_check(True))"
    for value, expected in ((None, True), ("0", False)):
        env = dict(os.environ)
        env.pop("XENT_EXT_CUDA_TARGET_CHECK", None)
        if value is not None:
            env["XENT_EXT_CUDA_TARGET_CHECK"] = value
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"XENT-CHECK {expected}" in proc.stdout, (value, proc.stdout, proc.stderr[-3000:])


# inductor compiles take seconds each: both target kinds and both reduction kinds in two cases
COMPILE_CASES = [
    ("index", "mean", (64, 1000), torch.float32),
    ("prob", "none", (4, 21, 16, 16), torch.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,reduction,shape,dtype", COMPILE_CASES,
                         ids=[f"{k}-{r}-{'x'.join(map(str, s))}-{dtype_name(d)}" for k, r, s, d in COMPILE_CASES])
def test_compile_fullgraph_inductor(kind, reduction, shape, dtype, fresh_seed):
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("inductor on CUDA needs triton, which is not installed")
    torch._dynamo.reset()
    C = shape[1]
    w = random_weight(C, dtype, DEV)
    x = make_logits(shape, dtype, device=DEV)
    if kind == "index":
        t = make_index_target(shape, ignore_index=1, ignore_frac=0.1, device=DEV)
        kw = dict(ignore_index=1, label_smoothing=0.1, reduction=reduction)
        wrt = ("input",)
    else:
        t = make_prob_target(shape, dtype, device=DEV)
        kw = dict(label_smoothing=0.1, reduction=reduction)
        wrt = ("input", "target")

    def loss_fn(x, t, weight=None, **kw):
        return xent_ext.cross_entropy(x, t, weight=weight, **kw)

    cfn = torch.compile(loss_fn, fullgraph=True)
    g = random_like_loss(torch.empty(index_target_shape(shape) if reduction == "none" else (), dtype=dtype, device=DEV))
    c_loss, c_grads = run_ce(cfn, x, t, w, g, wrt, **kw)
    compare_with_torch(c_loss, c_grads, x, t, w, wrt=wrt, grad_out=g,
                       ctx=f"seed={fresh_seed} compiled {kind} {reduction} {shape} {dtype_name(dtype)}", **kw)
