"""Shared helpers and constants for the xent_ext test suite (fixtures and pytest hooks
live in conftest.py).

Every expected value is computed by torch itself (or by torch evaluated in a wider
dtype) on exactly the same input tensors; nothing is compared against hard-coded
numbers.

The test modules import this file with ``from helpers import ...``: conftest.py sits in
the same folder, so pytest's default ("prepend") import mode puts tests/ on sys.path,
from the source tree as from a copy of tests/ run against an installed wheel. The ISA
subprocess test puts tests/ on sys.path itself and imports it the same way.

Devices
-------
``DEVICES`` is what the ``device`` fixture runs every twin test on: ``"cpu"``, plus
``"cuda"`` wherever ``torch.cuda.is_available()``; ``XENT_TEST_DEVICES=cuda`` (or
``cpu``, or ``cpu,cuda``) picks the devices explicitly. The helpers below draw every
random tensor on the CPU from the seeded CPU generator and then move it to the device,
so a seed gives the same data on every device. torch's own CUDA kernels raise a
device-side assert (which poisons the process' CUDA context) on an out-of-range class
index: tests with such targets compute torch's expected exception on CPU copies
(``on_cpu``).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import xent_ext

# ----------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
REDUCTIONS = ("none", "mean", "sum")
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
SEED_ENV = "XENT_TEST_SEED"
DEVICES_ENV = "XENT_TEST_DEVICES"


def dtype_name(dt):
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------


def _default_devices():
    env = os.environ.get(DEVICES_ENV, "").strip()
    if env:
        return tuple(d.strip() for d in env.split(",") if d.strip())
    return ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())


# The devices the `device` fixture runs every twin test on.
DEVICES = _default_devices()


def is_cuda(device):
    return torch.device(device).type == "cuda"


def cuda_skip_reason():
    """Why the CUDA tests cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    info = xent_ext.build_info() if hasattr(xent_ext, "build_info") else {}
    if info.get("cuda_version") is None:
        return "xent_ext was built without CUDA (build_info()['cuda_version'] is None)"
    return None


def on_cpu(t):
    """A CPU copy of `t` (None stays None); used to get torch's exception for inputs that
    would make torch's CUDA kernels device-assert."""
    return None if t is None else t.cpu()


def assert_cuda_usable(device):
    """After an error on `device`: the CUDA context still runs torch work (no sticky error)."""
    if not is_cuda(device):
        return
    torch.cuda.synchronize(device)
    a = torch.arange(1, 65, dtype=torch.float32, device=device)
    got = (a * a).sum().item()  # integers: exact in any summation order
    want = float((a.cpu() * a.cpu()).sum())
    assert got == want, f"CUDA context unusable after the error: {got} != {want}"
    torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------
# seeds (the fresh_seed fixture in conftest.py)
# ----------------------------------------------------------------------------------


def new_seed():
    env = os.environ.get(SEED_ENV)
    if env:
        return int(env)
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------
# tensor construction
# ----------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "sliced", "sliced_batch", "channels_last", "expanded")


def layouts_for(ndim):
    """Layouts that make sense for an input of `ndim` dims."""
    if ndim == 1:
        return ["contiguous", "sliced"]
    out = ["contiguous", "transposed", "sliced", "sliced_batch", "expanded"]
    if ndim in (4, 5):
        out.append("channels_last")
    return out


def _filler(t):
    # What the never-read holes of a sliced tensor hold: nan for floats (a kernel that
    # reads the wrong strides produces nan), an out-of-range class for integers.
    if t.is_floating_point():
        return float("nan")
    if t.dtype == torch.uint8:
        return 254
    if t.dtype == torch.bool:
        return True
    return -7777


def restride(t, layout):
    """Same values as `t`, laid out in memory according to `layout`.

    contiguous    : plain row-major.
    transposed    : memory order fully reversed (2-D: made as (C, N) then .t()).
    sliced        : every other element along dim 0 and dim 1 of a larger tensor, with a
                    storage offset (1-D: every other element).
    sliced_batch  : every other element along dim 0 only (rows at a stride, offset 1).
    channels_last : torch.channels_last (4-D) / channels_last_3d (5-D).
    """
    nd = t.dim()
    if layout == "contiguous" or nd == 0:
        return t.contiguous()
    if layout == "transposed":
        rev = list(reversed(range(nd)))
        out = t.permute(rev).contiguous().permute(rev)
    elif layout in ("sliced", "sliced_batch"):
        shape = list(t.shape)
        shape[0] = 2 * shape[0] + 1
        if layout == "sliced" and nd >= 2:
            shape[1] = 2 * shape[1] + 1
        big = torch.full(shape, _filler(t), dtype=t.dtype, device=t.device)
        if layout == "sliced" and nd >= 2:
            view = big[1::2, 1::2]
        else:
            view = big[1::2]
        view.copy_(t)
        out = view
    elif layout == "channels_last":
        if nd == 4:
            out = t.contiguous(memory_format=torch.channels_last)
        elif nd == 5:
            out = t.contiguous(memory_format=torch.channels_last_3d)
        else:
            raise ValueError(f"channels_last needs a 4-D or 5-D tensor, got {nd}-D")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert out.shape == t.shape
    return out


def make_logits(shape, dtype=torch.float32, layout="contiguous", scale=2.0, device="cpu"):
    """Random logits `randn * scale` (never exactly zero) of `shape` in `layout`, on `device`.

    layout is one of LAYOUTS. 'expanded' makes a (1, C, ...) tensor and expands it along
    the batch dim (stride 0), so every batch entry is identical. The values are drawn on
    the CPU and moved, and the layout is made on `device`.
    """
    shape = tuple(shape)

    def rnd(s):
        t = torch.randn(s, dtype=torch.float64) * scale
        t = torch.where(t == 0, torch.full_like(t, 0.5 * scale), t)
        return t.to(device=device, dtype=dtype)

    if layout == "expanded":
        if len(shape) < 2:
            raise ValueError("expanded needs a batch dim")
        return rnd((1,) + shape[1:]).expand(shape)
    return restride(rnd(shape), layout)


def class_dim(x):
    return 0 if x.dim() == 1 else 1


def index_target_shape(input_shape):
    input_shape = tuple(input_shape)
    if len(input_shape) == 1:
        return ()
    return (input_shape[0],) + input_shape[2:]


def make_index_target(input_shape, dtype=torch.int64, ignore_index=-100, ignore_frac=0.0, device="cpu"):
    """Random class indices for `input_shape` on `device`; a fraction `ignore_frac` of them
    is set to `ignore_index` (when the dtype can hold it)."""
    input_shape = tuple(input_shape)
    C = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    tshape = index_target_shape(input_shape)
    t = torch.randint(0, max(C, 1), tshape, dtype=torch.int64)
    representable = dtype == torch.int64 or (dtype == torch.uint8 and 0 <= ignore_index <= 255)
    if ignore_frac > 0 and representable and t.numel() > 0:
        mask = torch.rand(tshape) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(device=device, dtype=dtype)


def make_prob_target(input_shape, dtype=torch.float32, kind="softmax", device="cpu"):
    """Probability targets of the input's shape on `device`: 'softmax' (rows sum to 1) or
    'randn' (raw normal values, as PyTorch's own tests use; not validated by torch)."""
    input_shape = tuple(input_shape)
    cd = 0 if len(input_shape) == 1 else 1
    raw = torch.randn(input_shape, dtype=torch.float64)
    if kind == "softmax":
        t = torch.softmax(raw * 2.0, dim=cd) if raw.numel() else raw
    elif kind == "randn":
        t = raw
    else:
        raise ValueError(kind)
    return t.to(device=device, dtype=dtype)


def random_weight(C, dtype=torch.float32, device="cpu"):
    return (torch.rand(C, dtype=torch.float64) * 1.9 + 0.1).to(device=device, dtype=dtype)


def random_like_loss(loss):
    """Random upstream gradient with the loss' shape, dtype and device (never zero)."""
    g = torch.randn(loss.shape, dtype=torch.float64)
    g = torch.where(g == 0, torch.full_like(g, 0.5), g)
    return g.to(device=loss.device, dtype=loss.dtype)


# ----------------------------------------------------------------------------------
# running a loss and its gradients
# ----------------------------------------------------------------------------------


def run_ce(fn, x, target, weight=None, grad_out=None, wrt=("input",), **kw):
    """Call fn(x, target, weight=weight, **kw) on detached copies (same strides, same
    storage) and return (loss, {name: grad}) with grads for the names in `wrt`
    ('input', 'target', 'weight'). grad_out is cast to the loss dtype."""
    xi = x.detach()
    ti = target.detach()
    wi = None if weight is None else weight.detach()
    leaves = {}
    if "input" in wrt:
        xi.requires_grad_(True)
        leaves["input"] = xi
    if "target" in wrt:
        ti.requires_grad_(True)
        leaves["target"] = ti
    if "weight" in wrt:
        wi.requires_grad_(True)
        leaves["weight"] = wi
    loss = fn(xi, ti, weight=wi, **kw)
    grads = {}
    if leaves:
        go = torch.ones_like(loss) if grad_out is None else grad_out.to(device=loss.device, dtype=loss.dtype)
        gs = torch.autograd.grad(loss, list(leaves.values()), go)
        grads = dict(zip(leaves.keys(), gs))
    return loss.detach(), grads


def bits(t):
    """A view of `t`'s bits as an integer tensor (for bitwise comparisons)."""
    t = t.contiguous()
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in LOW_PRECISION:
        return t.view(torch.int16)
    return t


def assert_bitwise_equal(a, b, msg=""):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{msg}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.equal(bits(a), bits(b)), f"{msg}: not bitwise identical (max diff {(a.double() - b.double()).abs().max()})"


# ----------------------------------------------------------------------------------
# error envelopes (float64 math from the formulas in docs/semantics.md, section 5)
# ----------------------------------------------------------------------------------


def _finite_or_zero(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def error_envelope(x, target, weight, reduction, ignore_index, label_smoothing, grad_out):
    """Scale of the rounding error one may expect, per unit of machine epsilon.

    Returns {'loss': tensor (loss shape), 'input': float, 'target': float, 'weight': float}.
    Each is roughly sum |term| * |magnitude of the operands| along the computation, so
    `k * eps * envelope` is a principled absolute tolerance even for losses that cancel
    (raw randn probability targets) or for rows that are nearly certain (p ~ 1).
    """
    # float64 bookkeeping on the CPU, whatever the device of the inputs
    x, target, weight, grad_out = (None if t is None else t.detach().cpu() for t in (x, target, weight, grad_out))
    cd = class_dim(x)
    C = x.shape[cd]
    index = target.shape != x.shape
    out_shape = index_target_shape(x.shape) if index else tuple(s for i, s in enumerate(x.shape) if i != cd)
    zero = {"loss": torch.zeros(out_shape if reduction == "none" else (), dtype=torch.float64),
            "input": 0.0, "target": 0.0, "weight": 0.0}
    if x.numel() == 0:
        return zero
    X = _finite_or_zero(x.detach().double())
    X = X.movedim(cd, -1).reshape(-1, C) if x.dim() > 1 else X.reshape(1, C)
    M = X.shape[0]
    ls = label_smoothing if (label_smoothing == label_smoothing and label_smoothing > 0) else 0.0
    w = torch.ones(C, dtype=torch.float64) if weight is None else _finite_or_zero(weight.detach().double())
    if index:
        t = target.detach().reshape(-1).long()
        valid = t != ignore_index
        tt = torch.where(valid, t, torch.zeros_like(t)).clamp(0, C - 1)
        vf = valid.double()
        coef = torch.zeros(M, C, dtype=torch.float64)
        coef[torch.arange(M), tt] = (1 - ls) * w[tt] * vf
        coef = coef + (ls / C) * w[None, :] * vf[:, None]
        denom = float((w[tt] * vf).sum())
        q = None
    else:
        Q = _finite_or_zero(target.detach().double())
        Q = Q.movedim(cd, -1).reshape(-1, C) if x.dim() > 1 else Q.reshape(1, C)
        q = Q * (1 - ls) + ls / C if ls > 0 else Q
        coef = q * w[None, :]
        denom = float(M)
    lse = torch.logsumexp(X, dim=-1)
    mag = X.abs() + lse.abs()[:, None] + 1.0 + math.sqrt(C)
    rows = (coef.abs() * mag).sum(-1)
    scale = (1.0 / abs(denom) if denom != 0 else 0.0) if reduction == "mean" else 1.0
    if grad_out is None:
        g = torch.ones(M, dtype=torch.float64)
    else:
        g = _finite_or_zero(grad_out.detach().double()).reshape(-1)
        g = g.expand(M) if g.numel() == 1 else g
    g = g.abs()
    if reduction == "none":
        loss_env = rows.reshape(out_shape)
    else:
        loss_env = rows.sum() * scale
    rowmag = mag.amax(-1)
    env_in = (g * scale * coef.abs().sum(-1) * rowmag).max().item()
    env_t = (g * scale * w.abs().max() * rowmag).max().item()
    env_w = (g[:, None] * scale * (q.abs() if q is not None else coef.abs()) * mag).sum(0).max().item()
    return {"loss": loss_env, "input": env_in, "target": env_t, "weight": env_w}


# ----------------------------------------------------------------------------------
# the comparison helper
# ----------------------------------------------------------------------------------

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ENV_K = 16.0  # multiples of eps * envelope allowed


def _compare(name, ours, ref, rtol, atol, ctx):
    """ours vs ref: identical non-finite pattern, then |o - r| <= atol + rtol * |r|."""
    assert ours.shape == ref.shape, f"{ctx}: {name} shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.device == ref.device, f"{ctx}: {name} on {ours.device}, the reference on {ref.device}"
    o = ours.detach().double().cpu()
    r = ref.detach().double().cpu()
    if o.numel() == 0:
        return
    rfin = torch.isfinite(r)
    ofin = torch.isfinite(o)
    bad_nonfinite = (~rfin | ~ofin) & ~((o == r) | (torch.isnan(o) & torch.isnan(r)))
    if bad_nonfinite.any():
        idx = bad_nonfinite.nonzero()[0].tolist()
        raise AssertionError(
            f"{ctx}: {name}: non-finite mismatch at {idx}: ours={o[tuple(idx)].item()} "
            f"torch={r[tuple(idx)].item()} ({int(bad_nonfinite.sum())} elements)")
    fin = rfin & ofin
    if isinstance(atol, torch.Tensor):
        atol = atol.double().cpu().expand_as(r)
        atol_f = atol[fin]
    else:
        atol_f = atol
    diff = (o[fin] - r[fin]).abs()
    allowed = atol_f + rtol * r[fin].abs()
    if (diff > allowed).any():
        bad = diff > allowed
        i = int(torch.argmax((diff - allowed) * bad))
        where = fin.nonzero()[i].tolist()
        raise AssertionError(
            f"{ctx}: {name} mismatch: {int(bad.sum())}/{diff.numel()} elements off; worst at {where}: "
            f"ours={o[tuple(where)].item()!r} ref={r[tuple(where)].item()!r} diff={diff[i].item():.3g} "
            f"allowed={allowed[i].item():.3g} (rtol={rtol:.2g})")


def _max_err(a, ref):
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    d = (a[fin] - ref[fin]).abs()
    return float("inf") if not torch.isfinite(d).all() else d.max().item()


def result_dtype(x, target, weight):
    """torch's output dtype: the input dtype for class indices; type promotion of input,
    target and weight for probabilities."""
    if target.shape != x.shape or not target.is_floating_point():
        return x.dtype
    dt = torch.promote_types(x.dtype, target.dtype)
    if weight is not None:
        dt = torch.promote_types(dt, weight.dtype)
    return dt


def check_against_torch(fn, x, target, weight=None, *, reduction="mean", ignore_index=-100,
                        label_smoothing=0.0, wrt=("input",), grad_out="random", ctx="", **extra):
    """Run `fn` (xent_ext's cross_entropy or a wrapper with the same signature) and
    torch.nn.functional.cross_entropy on the very same tensors and compare loss value,
    dtype, shape and the gradients w.r.t. `wrt`.

    The reference is torch evaluated on the same inputs, upcast to the reference dtype
    (float64 when the result is float64, float32 otherwise):
    * all floating inputs already in that dtype (plain float32 / float64): this *is*
      torch's own result, compared with rtol 1e-5 / 1e-10 plus an absolute tolerance of
      16 * eps * error_envelope;
    * otherwise (bfloat16/float16 anywhere, or mixed dtypes): torch's result on the
      upcast inputs, cast to the output dtype (one rounding step allowed), and our error
      against the float64 evaluation must be no worse than torch's own error (on the
      unconverted inputs) plus one ulp. torch rounds intermediates (log_softmax, the
      smoothed target) to the low-precision dtype; we are not required to.
    Non-finite outputs must match exactly (nan <-> nan, +inf <-> +inf).
    Also checks that `fn` does not modify its inputs.
    Returns (our_loss, our_grads).
    """
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, **extra)
    ctx = ctx or "check_against_torch"
    if isinstance(grad_out, str) and grad_out == "random":
        with torch.no_grad():
            t_loss, _ = run_ce(F.cross_entropy, x, target, weight, None, (), **kw)
        grad_out = random_like_loss(t_loss)
    present = [(n, t) for n, t in (("input", x), ("target", target), ("weight", weight)) if t is not None]
    snapshots = [bits(t).clone() for _, t in present]
    o_loss, o_grads = run_ce(fn, x, target, weight, grad_out, wrt, **kw)
    for (n, t), snap in zip(present, snapshots):
        assert torch.equal(bits(t), snap), f"{ctx}: the {n} tensor was modified by the call"
    compare_with_torch(o_loss, o_grads, x, target, weight, reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, wrt=wrt, grad_out=grad_out, ctx=ctx, **extra)
    return o_loss, o_grads


def compare_with_torch(o_loss, o_grads, x, target, weight=None, *, reduction="mean", ignore_index=-100,
                       label_smoothing=0.0, wrt=("input",), grad_out=None, ctx="", **extra):
    """The comparison half of check_against_torch, for a loss and gradients computed
    elsewhere (a CUDA graph replay, a compiled function): `o_loss` and `o_grads`
    ({name: grad} for the names in `wrt`) must be what cross_entropy(x, target, weight,
    ...) gives, with `grad_out` (None: ones) as the upstream gradient, up to the same
    tolerances. torch runs on the tensors' own device."""
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, **extra)
    ctx = ctx or "compare_with_torch"
    out_dt = result_dtype(x, target, weight)
    ref_dt = torch.float64 if out_dt == torch.float64 else torch.float32
    compute_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    ceps = torch.finfo(compute_dt).eps
    floats = [t for t in (x, target, weight) if t is not None and t.is_floating_point()]
    upcast = any(t.dtype != ref_dt for t in floats)

    # torch on exactly our inputs: output dtype/shape, and for the plain case the values
    t_loss, t_grads = run_ce(F.cross_entropy, x, target, weight, grad_out, wrt, **kw)

    assert o_loss.dtype == t_loss.dtype, f"{ctx}: loss dtype {o_loss.dtype} != torch's {t_loss.dtype}"
    assert o_loss.shape == t_loss.shape, f"{ctx}: loss shape {tuple(o_loss.shape)} != torch's {tuple(t_loss.shape)}"
    assert o_loss.device == t_loss.device, f"{ctx}: loss on {o_loss.device}, torch's on {t_loss.device}"
    for n in wrt:
        assert o_grads[n].dtype == t_grads[n].dtype, f"{ctx}: grad {n} dtype {o_grads[n].dtype} != {t_grads[n].dtype}"
        assert o_grads[n].shape == t_grads[n].shape, f"{ctx}: grad {n} shape {tuple(o_grads[n].shape)} != {tuple(t_grads[n].shape)}"
        assert o_grads[n].device == t_grads[n].device, f"{ctx}: grad {n} on {o_grads[n].device}, torch's on {t_grads[n].device}"

    eff_reduction = reduction if not extra else _legacy_reduction(reduction, extra)
    env = error_envelope(x, target, weight, eff_reduction, ignore_index, label_smoothing, grad_out)
    rtol_c = RTOL[compute_dt]
    if not upcast:
        _compare("loss", o_loss, t_loss, rtol_c, ENV_K * ceps * env["loss"], ctx)
        for n in wrt:
            _compare(f"grad[{n}]", o_grads[n], t_grads[n], rtol_c, ENV_K * ceps * env[n], ctx)
        return o_loss, o_grads

    def up(t, dt):
        return t if t is None or not t.is_floating_point() else t.to(dt)

    r_loss, r_grads = run_ce(F.cross_entropy, up(x, ref_dt), up(target, ref_dt), up(weight, ref_dt),
                             up(grad_out, ref_dt), wrt, **kw)
    if ref_dt == torch.float64:
        r64_loss, r64_grads = r_loss, r_grads
    else:
        r64_loss, r64_grads = run_ce(F.cross_entropy, up(x, torch.float64), up(target, torch.float64),
                                     up(weight, torch.float64), up(grad_out, torch.float64), wrt, **kw)
    pairs = [("loss", o_loss, t_loss, r_loss, r64_loss, env["loss"])]
    for n in wrt:
        pairs.append((f"grad[{n}]", o_grads[n], t_grads[n], r_grads[n], r64_grads[n], env[n]))
    for name, o, t, r, r64, e in pairs:
        finfo = torch.finfo(o.dtype)
        ref = r.to(o.dtype)
        rounding = 1.01 * finfo.eps if (o.dtype in LOW_PRECISION or o.dtype != r.dtype) else 0.0
        atol = ENV_K * ceps * e
        atol = atol + finfo.smallest_normal
        # one rounding step to the output dtype + the compute dtype's error
        _compare(name + f" (vs torch in {dtype_name(ref_dt)} on upcast inputs)", o, ref, max(rtol_c, rounding), atol, ctx)
        err_ours = _max_err(o, r64)
        err_torch = _max_err(t, r64)
        emax = e.max().item() if isinstance(e, torch.Tensor) and e.numel() else (e if not isinstance(e, torch.Tensor) else 0.0)
        r64d = r64.detach().double().cpu()
        r64fin = r64d[torch.isfinite(r64d)]
        margin = (finfo.eps * (r64fin.abs().max().item() if r64fin.numel() else 0.0) + ENV_K * ceps * emax
                  + finfo.smallest_normal)
        assert err_ours <= err_torch + margin, (
            f"{ctx}: {name}: our error vs the float64 reference ({err_ours:.3g}) is worse than torch's "
            f"own error on these dtypes ({err_torch:.3g}) + margin {margin:.3g}")
    return o_loss, o_grads


def _legacy_reduction(reduction, extra):
    from torch.nn import _reduction as _R
    sa, rd = extra.get("size_average"), extra.get("reduce")
    if sa is None and rd is None:
        return reduction
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _R.legacy_get_string(sa, rd)


def same_exception(fn_torch, fn_ours, *, exact=True, keywords=(), ctx=""):
    """Run fn_torch (must raise); fn_ours must raise the same type; with exact=True
    its message must contain torch's message verbatim, otherwise it must contain all
    `keywords`. Returns (torch_exc, our_exc)."""
    import re

    with pytest.raises(Exception) as ti:
        fn_torch()
    te = ti.value
    if exact:
        with pytest.raises(type(te), match=re.escape(str(te))) as oi:
            fn_ours()
    else:
        with pytest.raises(type(te)) as oi:
            fn_ours()
        msg = str(oi.value)
        for k in keywords:
            assert k in msg, f"{ctx}: expected {k!r} in our message {msg!r} (torch said {str(te)!r})"
    assert type(oi.value) is type(te), f"{ctx}: exception type {type(oi.value).__name__} != torch's {type(te).__name__}"
    return te, oi.value


def same_outcome(torch_fn, ours_fn, ctx=""):
    """For inputs xent_ext hands to torch where torch's behaviour may depend on the
    device: torch's exception (same type and message), or torch's result (shape, dtype,
    device; values unless on 'meta')."""
    try:
        ref = torch_fn()
    except Exception as te:  # noqa: BLE001
        with pytest.raises(type(te)) as oi:
            ours_fn()
        assert type(oi.value) is type(te) and str(oi.value) == str(te), f"{ctx}: {oi.value!r} != torch's {te!r}"
        return
    got = ours_fn()
    assert (got.shape, got.dtype, got.device) == (ref.shape, ref.dtype, ref.device), ctx
    if got.device.type != "meta":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
