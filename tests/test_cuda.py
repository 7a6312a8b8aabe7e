"""CUDA-specific behaviour of xent_ext (the CUDA twins of the CPU tests live beside them).

* out-of-range class indices: an IndexError like the CPU's (target check on), or NaN rows
  (target check off, and always inside CUDA-graph capture) -- never a device-side assert:
  the CUDA context stays usable;
* very large rows (V = 256000) and more than 2**31 logits;
* CUDA-graph capture and replay, torch.compile(fullgraph=True), the current stream;
* bitwise run-to-run determinism;
* bf16/fp16 error against a float64 reference no worse than torch's own CUDA result.

Every expected value is torch's, on the same CUDA tensors, except where torch's CUDA
kernels cannot be used: with out-of-range class indices they device-assert (which would
poison this process' CUDA context), so there torch's exception comes from CPU copies.
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
