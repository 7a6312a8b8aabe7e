"""xent_ext.cross_entropy under torch.autocast behaves as torch's.

cross_entropy is on autocast's fp32 list: float32, bfloat16 and float16 arguments
(logits, probability targets, class weights) take part as float32, float64 is left
alone, so the loss is float32 (float64 with any float64 argument) and the gradients
come back in each argument's own dtype. xent_ext must give the same dtypes, values
and errors, without the float32 copy of the logits that autocast makes: its peak
memory under autocast is no higher than outside it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType

import xent_ext
from helpers import REDUCTIONS, _compare as compare_values, dtype_name, error_envelope, is_cuda

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
WEIGHT_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float64)
SHAPES = ((6, 11), (3, 7, 4))


def _name(d):
    return "none" if d is None else dtype_name(d)


def _run(fn, device, autocast_dtype, x, target, weight, grad_out, want_target, **kw):
    """fn under autocast on fresh leaves: (loss, grads) or the exception it raised."""
    xl = x.detach().clone().requires_grad_()
    tl = target.detach().clone().requires_grad_() if want_target else target
    try:
        with torch.autocast(device, dtype=autocast_dtype):
            loss = fn(xl, tl, weight=weight, **kw)
        g = grad_out(loss) if callable(grad_out) else grad_out
        grads = torch.autograd.grad(loss, [xl] + ([tl] if want_target else []), g)
    except (RuntimeError, ValueError) as e:
        return e
    return loss.detach(), grads


def _upstream(seed_tensor):
    """A random upstream gradient maker: the same values for torch and for us."""
    def make(loss):
        g = seed_tensor[: loss.numel()].reshape(loss.shape)
        return g.to(device=loss.device, dtype=loss.dtype)
    return make


def _compare(ours, theirs, x, target, weight, reduction, ignore_index, label_smoothing, ctx):
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"{ctx}: torch raised {theirs!r}, xent_ext did not"
        assert type(ours) is type(theirs) and str(ours) == str(theirs), f"{ctx}: {ours!r} vs torch's {theirs!r}"
        return
    assert not isinstance(ours, Exception), f"{ctx}: xent_ext raised {ours!r}, torch did not"
    (o_loss, o_grads), (t_loss, t_grads) = ours, theirs
    assert o_loss.dtype == t_loss.dtype and o_loss.shape == t_loss.shape, (
        f"{ctx}: loss {o_loss.dtype} {tuple(o_loss.shape)} vs torch's {t_loss.dtype} {tuple(t_loss.shape)}")
    # Both compute from the same values, torch each step in its operands' autocast dtype
    # (log_softmax, the smoothed target: float32 unless float64) even where another
    # float64 argument makes the loss float64; we then compute in float64 throughout.
    floats = [t for t in (x, target, weight) if t is not None and t.is_floating_point()]
    all64 = all(t.dtype == torch.float64 for t in floats)
    eps = torch.finfo(torch.float64 if all64 else torch.float32).eps
    env = error_envelope(x.double(), target.double() if target.is_floating_point() else target,
                         None if weight is None else weight.double(), reduction, ignore_index, label_smoothing, None)
    compare_values("loss", o_loss, t_loss, 16 * eps, 16 * eps * env["loss"] + 1e-30, ctx)
    for name, o, t in zip(("input", "target"), o_grads, t_grads):
        assert o.dtype == t.dtype and o.shape == t.shape, f"{ctx}: grad {name} {o.dtype} vs torch's {t.dtype}"
        # each rounds a float32 (float64) value to the argument's dtype: a few ulps of it
        g_eps = torch.finfo(o.dtype).eps
        compare_values(f"grad[{name}]", o, t, 2 * g_eps, 16 * eps * env[name] + torch.finfo(o.dtype).tiny, ctx)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=_name)
@pytest.mark.parametrize("logit_dtype", LOGIT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=dtype_name)
def test_index_targets_as_torch(autocast_dtype, logit_dtype, weight_dtype, shape, device, fresh_seed):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=logit_dtype)
    t = torch.randint(0, C, (shape[0],) + shape[2:], device=device)
    t = torch.where(torch.rand(t.shape, device=device) < 0.2, torch.full_like(t, 1), t)
    w = None if weight_dtype is None else (torch.rand(C, dtype=torch.float64) + 0.1).to(device=device, dtype=weight_dtype)
    g = _upstream(torch.randn(x.numel(), dtype=torch.float64))
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.15):
            kw = dict(reduction=reduction, label_smoothing=ls, ignore_index=1)
            ours = _run(xent_ext.cross_entropy, device, autocast_dtype, x, t, w, g, False, **kw)
            theirs = _run(F.cross_entropy, device, autocast_dtype, x, t, w, g, False, **kw)
            ctx = (f"autocast {dtype_name(autocast_dtype)} logits {dtype_name(logit_dtype)} weight "
                   f"{_name(weight_dtype)} {shape} {reduction} ls={ls} seed={fresh_seed}")
            _compare(ours, theirs, x, t, w, reduction, 1, ls, ctx)


@pytest.mark.parametrize("weight_dtype", (None, torch.bfloat16, torch.float32, torch.float64), ids=_name)
@pytest.mark.parametrize("target_dtype", LOGIT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("logit_dtype", LOGIT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=dtype_name)
def test_prob_targets_as_torch(autocast_dtype, logit_dtype, target_dtype, weight_dtype, device, fresh_seed):
    shape = SHAPES[fresh_seed % 2]
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=logit_dtype)
    q = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, 1).to(device=device, dtype=target_dtype)
    w = None if weight_dtype is None else (torch.rand(C, dtype=torch.float64) + 0.1).to(device=device, dtype=weight_dtype)
    g = _upstream(torch.randn(x.numel(), dtype=torch.float64))
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.15):
            kw = dict(reduction=reduction, label_smoothing=ls)
            ours = _run(xent_ext.cross_entropy, device, autocast_dtype, x, q, w, g, True, **kw)
            theirs = _run(F.cross_entropy, device, autocast_dtype, x, q, w, g, True, **kw)
            ctx = (f"autocast {dtype_name(autocast_dtype)} logits {dtype_name(logit_dtype)} target "
                   f"{dtype_name(target_dtype)} weight {_name(weight_dtype)} {shape} {reduction} ls={ls} seed={fresh_seed}")
            _compare(ours, theirs, x, q, w, reduction, -100, ls, ctx)


@pytest.mark.parametrize("block_elements", (None, 7), ids=("one_block", "several_blocks"))
@pytest.mark.parametrize("shape", ((16,), (5, 13), (4, 6, 3, 2)), ids=str)
@pytest.mark.parametrize("logit_dtype", (torch.float16, torch.bfloat16), ids=dtype_name)
def test_large_per_row_upstream_gradient(logit_dtype, shape, block_elements, device, fresh_seed, monkeypatch):
    """'none' under autocast: the loss is fp32, so a per-row upstream gradient may be a
    GradScaler factor (65536) that bf16 holds but fp16 does not. It must scale the
    stored gradient in its own dtype, as torch's fp32 product does, never as fp16 inf
    (Note [Gradient in the forward]); several_blocks makes the CPU widen a few rows at
    a time."""
    if block_elements is not None:
        monkeypatch.setattr(xent_ext._ops, "_WIDENED_CHUNK_ELEMENTS", block_elements)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2).to(device=device, dtype=logit_dtype)
    t = torch.randint(0, C, shape[:0] if len(shape) == 1 else (shape[0],) + shape[2:], device=device)
    scale = torch.rand(max(t.numel(), 1), dtype=torch.float64) * 65536 + 32768
    g = lambda loss: scale[: loss.numel()].reshape(loss.shape).to(device=loss.device, dtype=loss.dtype)
    for ls in (0.0, 0.1):
        kw = dict(reduction="none", label_smoothing=ls)
        ours = _run(xent_ext.cross_entropy, device, torch.bfloat16, x, t, None, g, False, **kw)
        theirs = _run(F.cross_entropy, device, torch.bfloat16, x, t, None, g, False, **kw)
        ctx = f"{dtype_name(logit_dtype)} {shape} ls={ls} seed={fresh_seed}"
        torch.testing.assert_close(ours[0], theirs[0], msg=lambda m: f"{ctx}: loss: {m}")
        got, want = ours[1][0].double(), theirs[1][0].double()
        # Where the product leaves fp16's range, either side may round to the largest
        # finite value or to inf; everywhere else both are finite.
        edge = torch.finfo(logit_dtype).max * (1 - 2 * torch.finfo(logit_dtype).eps)
        both = torch.isfinite(got) & torch.isfinite(want)
        assert (both | (torch.where(torch.isfinite(got), got, want).abs() >= edge)).all(), (
            f"{ctx}: non-finite gradient where torch's is finite: {got[~both]} vs {want[~both]}")
        # Two roundings of the stored gradient and its product against torch's one
        # (Note [Gradient in the forward]): a few units in the last place, and, where the
        # gradient for an upstream gradient of 1 is below fp16's smallest normal value,
        # the subnormal spacing of its storage times the factor (loss scaling cannot
        # protect a gradient stored before the factor is known).
        atol = float(scale.max()) * torch.finfo(logit_dtype).smallest_normal * torch.finfo(logit_dtype).eps
        torch.testing.assert_close(got[both], want[both], rtol=4 * torch.finfo(logit_dtype).eps, atol=atol,
                                   msg=lambda m: f"{ctx}: grad: {m}")


def test_weight_dtype_errors_name_the_autocast_dtypes(device):
    # torch compares the weight's dtype with the logits' after its casts: a float64 weight
    # with float32-computing logits, and the reverse, are errors that name those dtypes
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    cases = [(torch.bfloat16, torch.float64), (torch.float32, torch.float64), (torch.float64, torch.bfloat16),
             (torch.float64, torch.float32)]
    for xd, wd in cases:
        w = torch.rand(5, device=device, dtype=wd)
        msgs = []
        for fn in (F.cross_entropy, xent_ext.cross_entropy):
            with torch.autocast(device, dtype=torch.bfloat16), pytest.raises(RuntimeError) as info:
                fn(x.to(xd), t, weight=w)
            msgs.append(str(info.value))
        assert msgs[0] == msgs[1], f"logits {xd}, weight {wd}: {msgs}"


# ----------------------------------------------------------------------------------
# no float32 copy of the logits
# ----------------------------------------------------------------------------------


def _peak_bytes(fn):
    """The peak of bytes held by torch's CPU allocator while fn runs, above the start:
    every allocation and free the profiler records (profile_memory)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    assert events, "the profiler recorded no allocation"
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def _step(fn, x, target, autocast, reduction, want_target=False):
    def run():
        xl = x.detach().requires_grad_()
        tl = target.detach().requires_grad_() if want_target else target
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(xl, tl, reduction=reduction)
        loss.sum().backward()
    return run


@pytest.mark.parametrize("kind", ["index", "prob", "prob_target_grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logit_dtype", (torch.bfloat16, torch.float16), ids=dtype_name)
def test_autocast_peak_memory_is_not_higher(logit_dtype, reduction, kind, fresh_seed):
    # bf16/fp16 logits (and a probability target of the same dtype) are read as they are:
    # no float32 copy, so autocast costs no memory beyond the float32 loss
    N, C = 64, 4096
    x = torch.randn(N, C, dtype=torch.float64).to(logit_dtype)
    if kind == "index":
        target = torch.randint(0, C, (N,))
    else:
        target = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(logit_dtype)
    want_target = kind == "prob_target_grad"
    slack = 4096 + 16 * N  # the float32 loss and upstream gradient
    plain = _peak_bytes(_step(xent_ext.cross_entropy, x, target, False, reduction, want_target))
    autocast = _peak_bytes(_step(xent_ext.cross_entropy, x, target, True, reduction, want_target))
    assert autocast <= plain + slack, (
        f"{dtype_name(logit_dtype)} {reduction} {kind}: peak {autocast} bytes under autocast, {plain} outside")
    # the measurement sees a float32 copy of the logits: torch's own autocast makes one
    t_plain = _peak_bytes(_step(F.cross_entropy, x, target, False, reduction, want_target))
    t_autocast = _peak_bytes(_step(F.cross_entropy, x, target, True, reduction, want_target))
    assert t_autocast >= t_plain + N * C * 4 // 2, (t_plain, t_autocast)


# ----------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------


def _compiled_case(device, kind, autocast_inside, backend):
    torch._dynamo.reset()
    x = torch.randn(8, 33, dtype=torch.float64).to(device=device, dtype=torch.bfloat16)
    if kind == "index":
        target = torch.randint(0, 33, (8,), device=device)
    else:
        target = torch.softmax(torch.randn(8, 33, dtype=torch.float64), 1).to(device=device, dtype=torch.bfloat16)
    w = (torch.rand(33, dtype=torch.float64) + 0.1).to(device=device, dtype=torch.float32)

    def loss_fn(fn, x, target):
        if autocast_inside:
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn(x, target, weight=w, label_smoothing=0.1)
        return fn(x, target, weight=w, label_smoothing=0.1)

    compiled = torch.compile(lambda x, t: loss_fn(xent_ext.cross_entropy, x, t), fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, lambda x, t: loss_fn(F.cross_entropy, x, t)):
        xl = x.detach().clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not autocast_inside):
            loss = fn(xl, target)
        (grad,) = torch.autograd.grad(loss * 3.0, xl)
        results.append((loss.detach(), grad))
    (o_loss, o_grad), (t_loss, t_grad) = results
    assert o_loss.dtype == t_loss.dtype == torch.float32 and o_grad.dtype == t_grad.dtype == torch.bfloat16
    torch.testing.assert_close(o_loss, t_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_grad.double(), t_grad.double(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-4)


@pytest.mark.parametrize("autocast_inside", [True, False], ids=["inside", "outside"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_compile_fullgraph_under_autocast(kind, autocast_inside, device, fresh_seed):
    _compiled_case(device, kind, autocast_inside, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_compile_inductor_under_autocast(kind, device, fresh_seed):
    _compiled_case(device, kind, True, "inductor")


# ----------------------------------------------------------------------------------
# the ops' loss_dtype
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=dtype_name)
def test_ops_loss_dtype(dtype, device, fresh_seed):
    # the loss in the accumulation dtype is the same number as the input-dtype loss before
    # its last rounding; any other loss_dtype is an error that says what is allowed
    ops = torch.ops.xent_ext
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(5, 9, 3, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, 9, (5, 3), device=device)
    q = torch.softmax(torch.randn(5, 9, 3, dtype=torch.float64), 1).to(device=device, dtype=dtype)
    for red in (0, 1, 2):
        calls = [lambda ld: ops.cross_entropy_index_forward(x, y, None, -100, 0.1, red, ld),
                 lambda ld: ops.cross_entropy_index_forward_with_grad(x, y, None, -100, 0.1, red, ld),
                 lambda ld: ops.cross_entropy_prob_forward(x, q, None, 0.1, red, ld),
                 lambda ld: ops.cross_entropy_prob_forward_with_grad(x, q, None, 0.1, red, True, True, ld)]
        for call in calls:
            base = call(None)
            wide = call(acc)
            same = call(dtype)
            assert base[0].dtype == same[0].dtype == dtype and wide[0].dtype == acc
            assert torch.equal(wide[0].to(dtype), base[0]), "the acc-dtype loss rounds to the input-dtype loss"
            for a, b in zip(base[1:], wide[1:]):
                assert torch.equal(a, b), "only the loss depends on loss_dtype"
            bad = torch.float64 if dtype != torch.float64 else torch.float32
            if dtype == torch.float32:
                bad = torch.float16
            with pytest.raises(RuntimeError, match="loss_dtype must be None, the input's dtype"):
                call(bad)
    # the backward ops take grad_loss in either dtype, with the same result
    loss, row_stats, tw = ops.cross_entropy_index_forward(x, y, None, -100, 0.0, 0, acc)
    g = torch.randn(loss.shape, dtype=torch.float64, device=device).to(dtype)
    a = ops.cross_entropy_index_backward(g, x, y, None, row_stats, tw, -100, 0.0, 0)
    b = ops.cross_entropy_index_backward(g.to(acc), x, y, None, row_stats, tw, -100, 0.0, 0)
    assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    loss, row_stats, coef_sum = ops.cross_entropy_prob_forward(x, q, None, 0.0, 0, acc)
    a = ops.cross_entropy_prob_backward(g, x, q, None, row_stats, coef_sum, 0.0, 0, True, True)
    b = ops.cross_entropy_prob_backward(g.to(acc), x, q, None, row_stats, coef_sum, 0.0, 0, True, True)
    assert all(u.dtype == v.dtype == dtype and torch.equal(u, v) for u, v in zip(a, b))
    if dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(RuntimeError, match="expected grad_loss of the input's dtype"):
            ops.cross_entropy_prob_backward(g.double(), x, q, None, row_stats, coef_sum, 0.0, 0, True, True)
    assert is_cuda(device) == (x.device.type == "cuda")
