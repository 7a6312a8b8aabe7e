"""The registered operators (torch.library.opcheck), torch.compile, the nn.Module and
build information.

Tests that run the operators take the `device` fixture (conftest.py): CPU, and CUDA where
a GPU is visible."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from helpers import (
    REDUCTION_ENUM,
    REDUCTIONS,
    dtype_name,
    make_index_target,
    make_logits,
    make_prob_target,
    random_like_loss,
    random_weight,
    run_ce,
)

ours = xent_ext.cross_entropy

# ----------------------------------------------------------------------------------
# opcheck on the four operators
# ----------------------------------------------------------------------------------

# (weighted, label_smoothing) samples per (op, dtype, reduction)
SAMPLES = [(False, 0.0), (True, 0.1)]
OP_DTYPES = [torch.float32, torch.float64]


def _ops():
    return torch.ops.xent_ext


def _index_inputs(dtype, weighted, ls, reduction, requires_grad=True, shape=(3, 5, 4), ignore_index=1, device="cpu"):
    x = make_logits(shape, dtype, device=device).requires_grad_(requires_grad)
    t = make_index_target(shape, ignore_index=ignore_index, ignore_frac=0.25, device=device)
    w = random_weight(shape[1], dtype, device) if weighted else None
    return (x, t, w, ignore_index, ls, REDUCTION_ENUM[reduction])


def _prob_inputs(dtype, weighted, ls, reduction, requires_grad=True, shape=(3, 5, 4), device="cpu"):
    x = make_logits(shape, dtype, device=device).requires_grad_(requires_grad)
    t = make_prob_target(shape, dtype, "softmax", device=device).requires_grad_(requires_grad)
    w = random_weight(shape[1], dtype, device) if weighted else None
    return (x, t, w, ls, REDUCTION_ENUM[reduction])


def _check_row_stats(row_stats, x):
    """row_stats[0] is each row's max, exactly; row_stats[1] is log Σ exp(x - max)."""
    x64 = x.to(torch.float64)
    row_max = x64.amax(1)
    assert torch.equal(row_stats[0], row_max)
    torch.testing.assert_close(row_stats[1], torch.log(torch.exp(x64 - row_max.unsqueeze(1)).sum(1)),
                               rtol=1e-6, atol=1e-6)


def _opcheck(op, args):
    # raise_exception=True (the default) makes any failing sub-test raise with its reason
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_index_forward(dtype, reduction, device, fresh_seed):
    for weighted, ls in SAMPLES:
        args = _index_inputs(dtype, weighted, ls, reduction, device=device)
        _opcheck(_ops().cross_entropy_index_forward.default, args)
        # and the loss it returns is torch's for the same (N, C, K) problem
        loss, row_stats, total_weight = _ops().cross_entropy_index_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        x, t, w = args[0].detach(), args[1], args[2]
        ref = F.cross_entropy(x, t, weight=w, ignore_index=args[3], label_smoothing=ls, reduction=reduction)
        assert loss.shape == ref.shape and loss.dtype == ref.dtype and loss.device == ref.device
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        # the saved statistics: float64 (row max, log-sum) per (n, k), a 0-d total weight in
        # the accumulation dtype, all on the input's device
        n, _, k = x.shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert (row_stats.shape, row_stats.dtype, row_stats.device) == ((2, n, k), torch.float64, x.device)
        _check_row_stats(row_stats, x.detach())
        assert (total_weight.shape, total_weight.dtype, total_weight.device) == ((), acc, x.device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_index_forward_with_grad(dtype, reduction, device, fresh_seed):
    for weighted, ls in SAMPLES:
        args = _index_inputs(dtype, weighted, ls, reduction, device=device)
        _opcheck(_ops().cross_entropy_index_forward_with_grad.default, args)
        # the loss is torch's, and the gradient is torch's for an upstream gradient of 1
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        loss, _, _, grad = _ops().cross_entropy_index_forward_with_grad(*plain)
        x = plain[0].clone().requires_grad_()
        ref = F.cross_entropy(x, plain[1], weight=plain[2], ignore_index=args[3], label_smoothing=ls,
                              reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)  # 'none': an upstream gradient of 1 on every row
        assert loss.device == ref.device and grad.device == ref_grad.device
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_prob_forward_with_grad(dtype, reduction, device, fresh_seed):
    for (weighted, ls), flags in zip(SAMPLES + SAMPLES[:1], [(True, True), (True, False), (False, True)]):
        x, t, w, ls_, red = _prob_inputs(dtype, weighted, ls, reduction, device=device)
        args = (x, t, w, ls_, red, *flags)
        _opcheck(_ops().cross_entropy_prob_forward_with_grad.default, args)
        # the forward's results, and the gradients asked for an upstream gradient of 1
        xd, td = x.detach(), t.detach()
        loss, row_stats, coef_sum, gi, gt = _ops().cross_entropy_prob_forward_with_grad(xd, td, w, ls_, red, *flags)
        for a, b in zip((loss, row_stats, coef_sum), _ops().cross_entropy_prob_forward(xd, td, w, ls_, red)):
            assert torch.equal(a, b)
        wrt = tuple(n for n, f in zip(("input", "target"), flags) if f)
        ref_loss, ref = run_ce(F.cross_entropy, xd, td, w, None, wrt, label_smoothing=ls, reduction=reduction)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, flag, got in (("input", flags[0], gi), ("target", flags[1], gt)):
            if flag:
                assert got.dtype == ref[name].dtype and got.device == ref[name].device
                torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-6)
            else:
                assert got.numel() == 0, f"not requested grad_{name} must be an empty tensor, got {tuple(got.shape)}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_index_backward(dtype, reduction, device, fresh_seed):
    for weighted, ls in SAMPLES:
        x, t, w, ii, ls_, red = _index_inputs(dtype, weighted, ls, reduction, requires_grad=False, device=device)
        loss, row_stats, total_weight = _ops().cross_entropy_index_forward(x, t, w, ii, ls_, red)
        g = random_like_loss(loss)
        args = (g, x, t, w, row_stats, total_weight, ii, ls_, red)
        _opcheck(_ops().cross_entropy_index_backward.default, args)
        grad = _ops().cross_entropy_index_backward(*args)
        _, ref = run_ce(F.cross_entropy, x, t, w, g, ("input",), ignore_index=ii, label_smoothing=ls, reduction=reduction)
        assert grad.shape == x.shape and grad.dtype == x.dtype and grad.device == x.device
        torch.testing.assert_close(grad, ref["input"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_prob_forward(dtype, reduction, device, fresh_seed):
    for weighted, ls in SAMPLES:
        args = _prob_inputs(dtype, weighted, ls, reduction, device=device)
        _opcheck(_ops().cross_entropy_prob_forward.default, args)
        loss, row_stats, coef_sum = _ops().cross_entropy_prob_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        ref = F.cross_entropy(args[0].detach(), args[1].detach(), weight=args[2], label_smoothing=ls, reduction=reduction)
        assert loss.shape == ref.shape and loss.dtype == ref.dtype and loss.device == ref.device
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        n, _, k = args[0].shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert (row_stats.shape, row_stats.dtype, row_stats.device) == ((2, n, k), torch.float64, loss.device)
        _check_row_stats(row_stats, args[0].detach())
        assert (coef_sum.shape, coef_sum.dtype, coef_sum.device) == ((n, k), acc, loss.device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=dtype_name)
def test_opcheck_prob_backward(dtype, reduction, device, fresh_seed):
    for (weighted, ls), flags in zip(SAMPLES + SAMPLES[:1], [(True, True), (True, False), (False, True)]):
        x, t, w, ls_, red = _prob_inputs(dtype, weighted, ls, reduction, requires_grad=False, device=device)
        loss, row_stats, coef_sum = _ops().cross_entropy_prob_forward(x, t, w, ls_, red)
        g = random_like_loss(loss)
        args = (g, x, t, w, row_stats, coef_sum, ls_, red, *flags)
        _opcheck(_ops().cross_entropy_prob_backward.default, args)
        gi, gt = _ops().cross_entropy_prob_backward(*args)
        wrt = tuple(n for n, f in zip(("input", "target"), flags) if f)
        _, ref = run_ce(F.cross_entropy, x, t, w, g, wrt, label_smoothing=ls, reduction=reduction)
        for name, flag, got in (("input", flags[0], gi), ("target", flags[1], gt)):
            if flag:
                assert got.shape == ref[name].shape and got.dtype == ref[name].dtype and got.device == ref[name].device
                torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-6)
            else:
                assert got.numel() == 0, f"not requested grad_{name} must be an empty tensor, got {tuple(got.shape)}"


EXTRAS = ["logit_scale", "softcap", "z_loss"]


def test_ops_registered_with_expected_schemas():
    ops = _ops()
    index_args = ["input", "target", "weight", "ignore_index", "label_smoothing", "reduction", "loss_dtype"]
    expect = {
        "cross_entropy_index_forward": index_args + EXTRAS,
        "cross_entropy_index_forward_with_grad": index_args + EXTRAS,
        "cross_entropy_index_forward_grad_into_": index_args + EXTRAS,
        "cross_entropy_index_backward": ["grad_loss", "input", "target", "weight", "row_stats", "total_weight",
                                         "ignore_index", "label_smoothing", "reduction"] + EXTRAS,
        "cross_entropy_prob_forward": ["input", "target", "weight", "label_smoothing", "reduction", "loss_dtype"]
        + EXTRAS,
        "cross_entropy_prob_forward_with_grad": ["input", "target", "weight", "label_smoothing", "reduction",
                                                 "input_grad", "target_grad", "loss_dtype"] + EXTRAS,
        "cross_entropy_prob_forward_grad_into_": ["input", "target", "weight", "label_smoothing", "reduction",
                                                  "target_grad", "loss_dtype"] + EXTRAS,
        "cross_entropy_prob_backward": ["grad_loss", "input", "target", "weight", "row_stats", "coef_sum",
                                        "label_smoothing", "reduction", "input_grad", "target_grad"] + EXTRAS,
    }
    for name, argnames in expect.items():
        schema = getattr(ops, name).default._schema
        assert [a.name for a in schema.arguments] == argnames, f"{name}: {schema}"
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        # Only the *_grad_into_ forwards write, and only into the logits.
        assert written == (["input"] if name.endswith("_grad_into_") else []), f"{name} mutates {written}"
    n_out = {"cross_entropy_index_forward": 3, "cross_entropy_prob_forward": 3,
             "cross_entropy_index_forward_with_grad": 4, "cross_entropy_prob_forward_with_grad": 5,
             "cross_entropy_index_forward_grad_into_": 3, "cross_entropy_prob_forward_grad_into_": 4,
             "cross_entropy_index_backward": 1, "cross_entropy_prob_backward": 2}
    for name, n in n_out.items():
        assert len(getattr(ops, name).default._schema.returns) == n, name


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).replace("torch.ops.", ""))
        return func(*args, **(kwargs or {}))


DISPATCH_CASES = [
    ("index_2d_f32", (8, 33), torch.float32, "index", {}),
    ("index_4d_bf16", (2, 9, 3, 4), torch.bfloat16, "index", {"label_smoothing": 0.1}),
    ("index_weight_ignore", (8, 17), torch.float32, "index", {"weight": True, "ignore_index": 3}),
    ("index_unbatched", (40,), torch.float64, "index", {}),
    ("prob_2d_f32", (8, 33), torch.float32, "prob", {}),
    ("prob_3d_f16_ls", (3, 9, 5), torch.float16, "prob", {"label_smoothing": 0.2, "weight": True}),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", DISPATCH_CASES, ids=[c[0] for c in DISPATCH_CASES])
def test_public_api_runs_the_fused_ops(case, reduction, device, fresh_seed):
    # the common configurations must reach the xent_ext operators (forward and backward)
    # rather than torch's log_softmax + nll_loss
    _, shape, dtype, kind, kw = case
    kw = dict(kw)
    C = shape[0] if len(shape) == 1 else shape[1]
    if kw.get("weight"):
        kw["weight"] = random_weight(C, dtype, device)
    x = make_logits(shape, dtype, device=device).requires_grad_()
    t = make_index_target(shape, ignore_index=kw.get("ignore_index", -100), ignore_frac=0.1, device=device) \
        if kind == "index" else make_prob_target(shape, dtype, device=device)
    rec = _OpRecorder()
    with rec:
        loss = ours(x, t, reduction=reduction, **kw)
        loss.backward(random_like_loss(loss))
    fwd = f"xent_ext.cross_entropy_{kind}_forward"
    bwd = f"xent_ext.cross_entropy_{kind}_backward"
    fused = f"xent_ext.cross_entropy_{kind}_forward_with_grad"
    # Note [Gradient in the forward]: one op computes the loss and the gradient, for
    # every reduction and target kind, and the backward reads nothing else.
    assert fused in rec.ops and fwd not in rec.ops and bwd not in rec.ops, f"ops seen: {sorted(set(rec.ops))}"
    for banned in ("aten._log_softmax", "aten.nll_loss_forward", "aten.nll_loss2d_forward"):
        assert banned not in rec.ops, f"{banned} called; ops seen: {sorted(set(rec.ops))}"


# ----------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------


def _compiled_vs_eager(fn, backend, dynamic, cases):
    if backend == "inductor" and cases and cases[0][0].is_cuda:
        from torch.utils._triton import has_triton

        if not has_triton():
            pytest.skip("inductor on CUDA needs triton, which is not installed")
    """cases: list of (x, t, w, kwargs, wrt). Compares compiled(fn) with eager fn, value
    and grads, bitwise-close."""
    torch._dynamo.reset()
    cfn = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    for x, t, w, kw, wrt in cases:
        e_loss, e_grads = run_ce(fn, x, t, w, None, wrt, **kw)
        g = random_like_loss(e_loss)
        e_loss, e_grads = run_ce(fn, x, t, w, g, wrt, **kw)
        c_loss, c_grads = run_ce(cfn, x, t, w, g, wrt, **kw)
        assert c_loss.shape == e_loss.shape and c_loss.dtype == e_loss.dtype and c_loss.device == x.device
        torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=1e-7, equal_nan=True)
        for n in wrt:
            torch.testing.assert_close(c_grads[n], e_grads[n], rtol=1e-6, atol=1e-7, equal_nan=True)


def _loss_fn(x, t, weight=None, **kw):
    return ours(x, t, weight=weight, **kw)


def _compile_cases(kind, reduction, device="cpu"):
    cases = []
    for shape in [(6, 7), (3, 7, 4)]:
        x = make_logits(shape, torch.float32, device=device)
        if kind == "index":
            t = make_index_target(shape, ignore_index=2, ignore_frac=0.2, device=device)
            kw = dict(ignore_index=2, label_smoothing=0.1, reduction=reduction)
            cases.append((x, t, random_weight(7, device=device), kw, ("input",)))
        else:
            t = make_prob_target(shape, device=device)
            kw = dict(label_smoothing=0.1, reduction=reduction)
            cases.append((x, t, random_weight(7, device=device), kw, ("input", "target")))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_compile_inductor_fullgraph(kind, device, fresh_seed):
    _compiled_vs_eager(_loss_fn, "inductor", False, _compile_cases(kind, "mean", device)[:1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_compile_aot_eager_dynamic(kind, reduction, device, fresh_seed):
    # two shapes through one dynamic compile: the fake kernels must handle symbolic sizes
    _compiled_vs_eager(_loss_fn, "aot_eager", True, _compile_cases(kind, reduction, device))


@pytest.mark.slow
def test_compile_module_in_model(device, fresh_seed):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 5)).to(device)
    crit = xent_ext.CrossEntropyLoss(weight=random_weight(5, device=device), label_smoothing=0.1, ignore_index=0)
    x = torch.randn(16, 8).to(device)
    t = make_index_target((16, 5), ignore_index=0, ignore_frac=0.2, device=device)

    def step(x, t):
        return crit(model(x), t)

    c = torch.compile(step, fullgraph=True, backend="aot_eager")
    e_loss = step(x, t)
    e_grads = torch.autograd.grad(e_loss, list(model.parameters()))
    c_loss = c(x, t)
    c_grads = torch.autograd.grad(c_loss, list(model.parameters()))
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(c_grads, e_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------
# nn.Module
# ----------------------------------------------------------------------------------


def test_module_weight_is_buffer_in_state_dict(fresh_seed):
    w = random_weight(5)
    m = xent_ext.CrossEntropyLoss(weight=w)
    r = torch.nn.CrossEntropyLoss(weight=w)
    assert list(m.state_dict().keys()) == list(r.state_dict().keys()) == ["weight"]
    assert torch.equal(m.state_dict()["weight"], w)
    assert [n for n, _ in m.named_buffers()] == ["weight"]
    assert list(m.parameters()) == []
    assert isinstance(m, torch.nn.Module)


def test_module_without_weight_has_empty_state_dict():
    m = xent_ext.CrossEntropyLoss()
    assert m.weight is None
    assert list(m.state_dict().keys()) == []
    assert list(m.buffers()) == []
    assert list(m.parameters()) == []


def test_module_attributes_and_defaults():
    m = xent_ext.CrossEntropyLoss()
    r = torch.nn.CrossEntropyLoss()
    for a in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(m, a) == getattr(r, a), a
    m2 = xent_ext.CrossEntropyLoss(ignore_index=3, reduction="sum", label_smoothing=0.25)
    assert (m2.ignore_index, m2.reduction, m2.label_smoothing) == (3, "sum", 0.25)


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True)])
def test_module_legacy_args(size_average, reduce, device, fresh_seed):
    import warnings

    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        m = xent_ext.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as wr:
        warnings.simplefilter("always")
        r = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert [(w.category, str(w.message)) for w in wo] == [(w.category, str(w.message)) for w in wr]
    assert m.reduction == r.reduction
    x = make_logits((4, 5), device=device)
    t = make_index_target((4, 5), device=device)
    torch.testing.assert_close(m(x, t), r(x, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=dtype_name)
def test_module_follows_to_dtype(dtype, device, fresh_seed):
    w = random_weight(5)
    m = xent_ext.CrossEntropyLoss(weight=w, label_smoothing=0.1).to(device=device, dtype=dtype)
    r = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1).to(device=device, dtype=dtype)
    assert m.weight.dtype == dtype and m.weight.device.type == torch.device(device).type
    assert torch.equal(m.weight, r.weight)
    x = make_logits((6, 5), dtype, device=device)
    t = make_index_target((6, 5), device=device)
    got = m(x, t)
    assert got.dtype == dtype and got.device == x.device
    up = torch.float64 if dtype == torch.float64 else torch.float32
    ref = F.cross_entropy(x.to(up), t, weight=r.weight.to(up), label_smoothing=0.1).to(dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    torch.testing.assert_close(got, ref, **tol)


def test_module_state_dict_interchangeable_with_torch(fresh_seed):
    w = random_weight(5)
    r = torch.nn.CrossEntropyLoss(weight=w)
    m = xent_ext.CrossEntropyLoss(weight=torch.ones(5))
    m.load_state_dict(r.state_dict())
    assert torch.equal(m.weight, w)
    r2 = torch.nn.CrossEntropyLoss(weight=torch.ones(5))
    r2.load_state_dict(m.state_dict())
    assert torch.equal(r2.weight, w)


def test_module_deepcopy_and_weight_is_used(device, fresh_seed):
    w = random_weight(5, device=device)
    m = xent_ext.CrossEntropyLoss(weight=w, reduction="sum")
    m2 = copy.deepcopy(m)
    x = make_logits((4, 5), device=device)
    t = make_index_target((4, 5), device=device)
    torch.testing.assert_close(m2(x, t), F.cross_entropy(x, t, weight=w, reduction="sum"), rtol=1e-5, atol=1e-6)
    # changing the buffer changes the result like torch's module
    m2.weight.mul_(2)
    torch.testing.assert_close(m2(x, t), F.cross_entropy(x, t, weight=2 * w, reduction="sum"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# build info and ISA report
# ----------------------------------------------------------------------------------

ISAS = {"default", "avx2", "avx512"}


def test_build_info():
    info = xent_ext._C.build_info()
    assert isinstance(info, dict)
    for k in ("torch_version", "cuda_version", "cpu_isas", "openmp"):
        assert k in info, f"build_info() lacks {k!r}: {info}"
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], info["torch_version"]
    if torch.version.cuda is None:
        assert info["cuda_version"] is None
    elif info["cuda_version"] is not None:
        # A CPU-only build against a CUDA torch (XENT_EXT_CPU_ONLY=1) reports None.
        assert isinstance(info["cuda_version"], str) and info["cuda_version"]
    isas = info["cpu_isas"]
    assert isinstance(isas, list) and all(isinstance(s, str) for s in isas)
    assert "default" in isas and set(isas) <= ISAS, isas
    assert isinstance(info["openmp"], bool)
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[1].splitlines()[0]:
        assert info["openmp"] is True, "torch uses OpenMP but the extension was built without it"


def test_build_info_public_alias():
    if hasattr(xent_ext, "build_info"):
        assert xent_ext.build_info() == xent_ext._C.build_info()


def test_cpu_capability_reports_torch_choice():
    cap = xent_ext.cpu_capability()
    assert cap in ISAS
    torch_cap = torch.backends.cpu.get_cpu_capability().lower()
    isas = xent_ext._C.build_info()["cpu_isas"]
    assert cap in isas
    if torch_cap in isas:
        assert cap == torch_cap, f"torch uses {torch_cap}, the extension {cap} (built: {isas})"


# Note [Gradient in the forward]: the gradient computed inside the forward is
# handed out once; scaled upstream gradients, a second backward through the
# same graph, and autograd.grad must all still match torch. (A bf16 gradient
# scaled by a factor other than a power of two is rounded twice: within one
# ulp, inside the bf16 tolerance.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_in_forward_reuse_and_scaling(dtype, reduction, device):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = (torch.randn(37, 300, generator=gen) * 2).to(device=device, dtype=dtype)
    y = torch.randint(300, (37,), generator=gen).to(device)
    scale = float(torch.rand((), generator=gen)) * 4 + 0.5

    # 'none': a different upstream gradient per row
    rows = (torch.rand(37, generator=gen) * 4 + 0.5).to(device=device, dtype=dtype)

    def grads(fn):
        xr = x.clone().requires_grad_()
        loss = fn(xr, y, reduction=reduction, label_smoothing=0.1)
        one = torch.ones_like(loss)
        (loss * scale).backward(rows if reduction == "none" else None, retain_graph=True)  # upstream != 1
        first = xr.grad.clone()
        # second backward through the same graph, upstream 1 (taken on its own: a
        # difference of accumulated bf16 .grad values would carry the rounding of their sum)
        (second,) = torch.autograd.grad(loss, xr, one, retain_graph=True)
        (third,) = torch.autograd.grad(loss, xr, one)
        return first.double(), second.double(), third.double()

    ours = grads(xent_ext.cross_entropy)
    ref = grads(lambda a, b, **kw: F.cross_entropy(a.double(), b, **kw).to(a.dtype))
    assert all(g.device == x.device for g in ours)
    tol = dict(rtol=2e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, **tol)


# Note [Autograd on the hot path]: the eager training and evaluation calls skip
# torch.library's autograd wrapper; torch.func transforms take the full
# autograd.Function path, which torch.library's wrapper could not run.
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_transforms(reduction, device):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(9, 17, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(17, (9,), generator=gen).to(device)

    def loss_of(fn):
        return lambda a: fn(a, y, reduction=reduction, label_smoothing=0.2).sum()

    torch.testing.assert_close(torch.func.grad(loss_of(xent_ext.cross_entropy))(x),
                               torch.func.grad(loss_of(F.cross_entropy))(x))
    # The fused forward+backward inside a no-grad region and outside it, in one process.
    xr = x.clone().requires_grad_()
    loss_of(xent_ext.cross_entropy)(xr).backward()
    with torch.no_grad():
        torch.testing.assert_close(xent_ext.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2),
                                   F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2))
    torch.testing.assert_close(xr.grad, torch.func.grad(loss_of(F.cross_entropy))(x))
