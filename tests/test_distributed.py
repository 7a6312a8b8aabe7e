"""xent_ext.distributed: vocabulary-parallel cross-entropy against the single-process loss.

Each test runs ranks that form one gloo process group on the CPU (NCCL on GPUs for the
CUDA twin), started from a forkserver. Every rank builds the FULL logits (or the full
projection, or the full probabilities) from the test's seed, computes
xent_ext.cross_entropy on them in one process, and compares that with what
vocab_parallel_cross_entropy / vocab_parallel_linear_cross_entropy compute from its slice:
the loss, the aux result, and its slice of the gradient (the linear form: its rows of the
projection's gradient, the full input gradient). The two-rank scenarios (every argument
combination, errors, collective counts, torch.compile, DTensor, autocast) share one spawn
(the module fixture ``two_ranks``); the three-rank parity has its own. Each rank writes
what failed to a file that the parent reads, so pytest shows it; a rank that hangs is
killed at the timeout (a hang is a failure).
"""

import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch

import xent_ext
from helpers import SEED_ENV, dtype_name, new_seed

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

V = 1000
# Uneven shards: world size -> classes per rank (a 1-class shard with two ranks).
SHARDS = {2: [999, 1], 3: [400, 350, 250]}
# Relative to the largest magnitude of the compared tensor.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}
EXTRAS = {
    "off": {},
    "all": dict(logit_scale=0.7, softcap=3.0, z_loss=0.01, return_aux=True),
    "scale_z": dict(logit_scale=1.3, z_loss=0.05, return_aux=True),
}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
SPAWN_TIMEOUT = 90.0


# ----------------------------------------------------------------------------------
# spawning
# ----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """A forkserver (a fresh single-threaded process that imports torch and xent_ext once,
    then forks each rank: safe, unlike forking the test process whose OpenMP threads may
    have run, and seconds faster per rank than spawn on a loaded machine); spawn where
    there is no forkserver."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "xent_ext", "xent_ext.distributed", __name__])
    return ctx


def _worker(rank, world, port, out_dir, scenarios, seed, device):
    """One rank: joins the group, runs each scenario (its failures kept apart), writes them."""
    result = {"failures": []}
    try:
        torch.set_num_threads(1)
        if device == "cuda":
            torch.cuda.set_device(rank)
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        for name in scenarios:
            res = result[name] = {"failures": []}
            began = time.monotonic()
            try:
                SCENARIOS[name](rank, world, seed, device, res)
            except BaseException:  # noqa: BLE001 - reported to the parent
                res["failures"].append(f"rank {rank}: {traceback.format_exc()}")
            res["seconds"] = time.monotonic() - began
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result["failures"].append(f"rank {rank}: {traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)


def _launch(out_dir, world, scenarios, seed, device="cpu", timeout=SPAWN_TIMEOUT):
    """Run the named SCENARIOS on `world` ranks in one process group; returns
    {scenario: [each rank's result]} after checking that no rank hung or failed outside
    the scenarios."""
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out_dir), scenarios, seed, device))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = out_dir / f"{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"failures": [f"rank {r} wrote nothing"]})
    everything = [f for res in results for v in res.values() for f in (v if isinstance(v, list) else v["failures"])]
    assert not hung, f"seed={seed}: ranks {hung} of {world} hung (killed after {timeout} s); {everything[:10]}"
    outside = [f for res in results for f in res["failures"]]
    assert not outside, f"seed={seed}: " + "\n".join(outside)
    return {name: [res.get(name, {"failures": [f"{name} did not run"]}) for res in results] for name in scenarios}


def _check(per_rank, seed):
    """Fail with what the ranks reported for one scenario."""
    failures = [f for res in per_rank for f in res["failures"]]
    assert not failures, f"seed={seed}: {len(failures)} failure(s):\n" + "\n".join(failures[:30])


# ----------------------------------------------------------------------------------
# the cases (run inside the ranks)
# ----------------------------------------------------------------------------------


def _shard(world, rank, explicit):
    """(start, size) of this rank: rank order, or (explicit) reversed rank order, so the
    starts given as vocab_start do not follow the ranks."""
    sizes = SHARDS[world]
    order = list(reversed(range(world))) if explicit else list(range(world))
    start = sum(sizes[r] for r in order[: order.index(rank)])
    return start, sizes[rank]


def _close(name, ours, ref, dtype, ctx, failures):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        failures.append(f"{ctx}: {name} shape {list(ours.shape)} != {list(ref.shape)}")
        return
    scale = max(ref.nan_to_num(0.0).abs().max().item() if ref.numel() else 0.0, 1.0)
    both_nan = torch.isnan(ours) & torch.isnan(ref)
    err = torch.where(both_nan, torch.zeros_like(ours), (ours - ref).abs().nan_to_num(float("inf")))
    worst = err.max().item() if err.numel() else 0.0
    if not worst <= TOL[dtype] * scale:  # nan-safe
        failures.append(f"{ctx}: {name} max error {worst:.3g} > {TOL[dtype] * scale:.3g}")


def _case(rank, world, seed, device, i, form, dtype, reduction, weighted, smoothing, extras, ignore, ndim, explicit):
    """One case; returns its failures."""
    failures = []
    ctx = (f"case {i} rank {rank}/{world}: form={form} {dtype_name(dtype)} {reduction} weighted={weighted} "
           f"smoothing={smoothing} extras={extras} ignore={ignore} ndim={ndim} explicit_start={explicit}")
    g = torch.Generator().manual_seed((seed * 1000 + i) % (1 << 63))
    n, h, k = 5, 16, 3
    start, size = _shard(world, rank, explicit)
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=-100, **EXTRAS[extras])
    shape = {1: (), 2: (n,), 3: (n, k)}[ndim]
    target = torch.randint(0, V, shape, generator=g)
    if ignore and ndim > 1:
        target.view(-1)[:: 3] = -100
    elif ignore:
        target = torch.tensor(-100)
    weight = (torch.rand(V, generator=g, dtype=torch.float64) * 1.9 + 0.1).to(dtype) if weighted else None

    def randn(*s):
        t = torch.randn(tuple(s), generator=g, dtype=torch.float64)
        return torch.where(t == 0, torch.full_like(t, 0.5), t)

    if form in ("logits", "prob"):
        # (N, V) / (V,) / (N, V, K): the class dim 1 (0 for 1-D)
        full_shape = {1: (V,), 2: (n, V), 3: (n, V, k)}[ndim]
        full = (randn(*full_shape) * 2).to(dtype)
        cd = 0 if ndim == 1 else 1
        local_target = target
        if form == "prob":  # probabilities: each rank passes its classes' slice
            target = torch.softmax(randn(*full_shape) * 2, dim=cd).to(dtype)
            local_target = target.narrow(cd, start, size)
        ref_x = full.clone().to(device).requires_grad_()
        ref = xent_ext.cross_entropy(ref_x, target.to(device), None if weight is None else weight.to(device), **kw)
        local = full.narrow(cd, start, size).clone().to(device).requires_grad_()
        ours = xent_ext.distributed.vocab_parallel_cross_entropy(
            local, local_target.to(device), weight=None if weight is None else weight[start:start + size].to(device),
            vocab_start=start if explicit else None, **kw)
    else:
        in_shape = {1: (h,), 2: (n, h), 3: (n, k, h)}[ndim]
        inp = (randn(*in_shape)).to(dtype)
        lin_w = (randn(V, h) * 0.5).to(dtype)
        lin_b = (randn(V) * 0.5).to(dtype)
        ref_in = inp.clone().to(device).requires_grad_()
        ref_w = lin_w.clone().to(device).requires_grad_()
        ref_b = lin_b.clone().to(device).requires_grad_()
        logits = (ref_in @ ref_w.t() + ref_b).reshape(-1, V)
        ref = xent_ext.cross_entropy(logits, target.reshape(-1).to(device),
                                     None if weight is None else weight.to(device), **kw)
        if reduction == "none":
            ref = (ref[0].reshape(shape), ref[1]) if isinstance(ref, tuple) else ref.reshape(shape)
        if isinstance(ref, tuple):
            lse, zl = ref[1]
            zl = zl.reshape(shape) if reduction == "none" else zl
            ref = (ref[0], xent_ext.CrossEntropyAux(lse.reshape(shape), zl))
        local_in = inp.clone().to(device).requires_grad_()
        local_w = lin_w[start:start + size].clone().to(device).requires_grad_()
        local_b = lin_b[start:start + size].clone().to(device).requires_grad_()
        ours = xent_ext.distributed.vocab_parallel_linear_cross_entropy(
            local_in, local_w, target.to(device), local_linear_bias=local_b,
            weight=None if weight is None else weight[start:start + size].to(device),
            vocab_start=start if explicit else None, **kw)
    if EXTRAS[extras].get("return_aux"):
        (ref, ref_aux), (ours, our_aux) = ref, ours
        _close("aux.lse", our_aux.lse, ref_aux.lse, dtype, ctx, failures)
        _close("aux.z_loss", our_aux.z_loss, ref_aux.z_loss, dtype, ctx, failures)
        if our_aux.lse.dtype != ref_aux.lse.dtype:
            failures.append(f"{ctx}: aux dtype {our_aux.lse.dtype} != {ref_aux.lse.dtype}")
    _close("loss", ours, ref, dtype, ctx, failures)
    if ours.dtype != ref.dtype:
        failures.append(f"{ctx}: loss dtype {ours.dtype} != {ref.dtype}")
    upstream = randn(*ref.shape).to(ref.dtype).to(device)
    ref.backward(upstream)
    ours.backward(upstream)
    if form != "linear":
        _close("grad", local.grad, ref_x.grad.narrow(cd, start, size), dtype, ctx, failures)
    else:
        _close("input.grad", local_in.grad, ref_in.grad, dtype, ctx, failures)
        _close("linear_weight.grad", local_w.grad, ref_w.grad[start:start + size], dtype, ctx, failures)
        _close("linear_bias.grad", local_b.grad, ref_b.grad[start:start + size], dtype, ctx, failures)
    return failures


def _parity(rank, world, seed, device, result):
    """Every reduction x weight x smoothing x extras x dtype for class indices (logits and
    linear forms), with ignored rows, 1-D/2-D/K-dim inputs and explicit/derived vocab_start
    cycled through them; probability targets with the dtype cycled too."""
    i = 0
    # bfloat16 on two ranks only (the suite's time budget); float16 is float32's path
    # with another rounding (covered by the single-process suites).
    dtypes = DTYPES if world == 2 else DTYPES[:2]
    for form, form_dtypes in (("logits", dtypes), ("linear", dtypes), ("prob", [None])):
        for dtype in form_dtypes:
            for reduction in ("none", "mean", "sum"):
                for weighted in (False, True):
                    for smoothing in (0.0, 0.1):
                        for extras in EXTRAS:
                            ignore = i % 2 == 1
                            ndim = (1, 2, 3)[(i // 2) % 3]
                            explicit = (i // 3) % 2 == 1
                            dt = dtype if dtype is not None else dtypes[(i // 3) % len(dtypes)]
                            result["failures"] += _case(rank, world, seed, device, i, form, dt, reduction,
                                                        weighted, smoothing, extras, ignore, ndim, explicit)
                            i += 1
    result["cases"] = i


# ----------------------------------------------------------------------------------
# errors and collective counts (run inside the ranks)
# ----------------------------------------------------------------------------------


def _outcome(fn):
    try:
        fn()
        return ["ok", ""]
    except Exception as e:  # noqa: BLE001 - compared across ranks by the parent
        return [type(e).__name__, str(e)]


def _errors(rank, world, seed, device, result):
    """Each bad call raises on every rank (the parent compares them), and the group still
    works afterwards (a desync would hang or fail the next call)."""
    D = xent_ext.distributed
    g = torch.Generator().manual_seed(seed)
    sizes = [600, 400]
    start, size = sum(sizes[:rank]), sizes[rank]
    y = torch.randint(0, V, (4,), generator=g).to(device)
    x = torch.randn(4, size, generator=g).to(device)
    cases = {
        "overlap": lambda: D.vocab_parallel_cross_entropy(x, y, vocab_start=[0, 500][rank]),
        "gap": lambda: D.vocab_parallel_cross_entropy(x, y, vocab_start=[0, 700][rank]),
        "mixed_start": lambda: D.vocab_parallel_cross_entropy(x, y, vocab_start=[0, None][rank]),
        "target_range": lambda: D.vocab_parallel_cross_entropy(x, torch.tensor([1, V, 2, -100], device=device)),
        "negative_target": lambda: D.vocab_parallel_cross_entropy(x, torch.tensor([1, 3, -5, 2], device=device)),
        "rows": lambda: D.vocab_parallel_cross_entropy(x[: 3 + rank], y[: 3 + rank]),
        "target_differs": lambda: D.vocab_parallel_cross_entropy(x, y + rank),
        "weight_one_rank": lambda: D.vocab_parallel_cross_entropy(
            x, y, weight=torch.ones(size + rank, device=device)),
        "dtype_one_rank": lambda: D.vocab_parallel_cross_entropy(
            x.double() if rank else x, y, weight=torch.ones(size, device=device)),
        "target_shape": lambda: D.vocab_parallel_cross_entropy(x, y[:3]),
        "reduction": lambda: D.vocab_parallel_cross_entropy(x, y, reduction="avg"),
        "linear_hidden_one_rank": lambda: D.vocab_parallel_linear_cross_entropy(
            torch.randn(4, 8, device=device), torch.randn(size, 8 + rank, device=device), y),
        "calls_differ": lambda: D.vocab_parallel_cross_entropy(x, y, label_smoothing=0.1 * rank),
        "prob_ignore_index": lambda: D.vocab_parallel_cross_entropy(x, torch.softmax(x, 1), ignore_index=0),
        "not_a_tensor": lambda: D.vocab_parallel_cross_entropy(x.tolist() if rank else x, y),
        "good_after": lambda: D.vocab_parallel_cross_entropy(x, y, label_smoothing=0.1),
        "empty_shard": lambda: _empty_shard(rank, seed, device),
        "second_backward": lambda: _second_backward(x, y),
    }
    result["outcomes"] = [[name] + _outcome(fn) for name, fn in cases.items()]


def _empty_shard(rank, seed, device):
    """A rank that holds no classes: the loss and gradient of the one that holds them all."""
    full = torch.randn(4, V, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.tensor([3, -100, V - 1, 0], device=device)
    local = (full if rank == 0 else full[:, :0]).clone().requires_grad_()
    ref_x = full.clone().requires_grad_()
    ref = xent_ext.cross_entropy(ref_x, y, label_smoothing=0.1, z_loss=0.01)
    ours = xent_ext.distributed.vocab_parallel_cross_entropy(local, y, label_smoothing=0.1, z_loss=0.01)
    ref.backward()
    ours.backward()
    failures = []
    _close("loss", ours, ref, torch.float32, "empty shard", failures)
    if rank == 0:
        _close("grad", local.grad, ref_x.grad, torch.float32, "empty shard", failures)
    assert not failures, failures


def _second_backward(x, y):
    """The gradient is computed in the forward and handed to the first backward."""
    loss = xent_ext.distributed.vocab_parallel_cross_entropy(x.clone().requires_grad_(), y)
    loss.backward(retain_graph=True)
    loss.backward()


def _counting(calls):
    """Count every collective: xent_ext.distributed sends each through _all_gather or
    _all_reduce (Note [Collectives in eager and compiled code]); returns the undo."""
    D = xent_ext.distributed
    real_gather, real_reduce = D._all_gather, D._all_reduce

    def gather(t, group):
        calls.append(("all_gather", t.numel()))
        return real_gather(t, group)

    def reduce(t, op, group):
        calls.append(("all_reduce", t.numel()))
        return real_reduce(t, op, group)

    D._all_gather, D._all_reduce = gather, reduce

    def restore():
        D._all_gather, D._all_reduce = real_gather, real_reduce

    return restore


def _collectives(rank, world, seed, device, result):
    """How many collectives each call makes, and of how many elements."""
    D = xent_ext.distributed
    sizes = [600, 400]
    start, size = sum(sizes[:rank]), sizes[rank]
    n = 7
    y = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    x = torch.randn(n, size, device=device, requires_grad=True)
    w = torch.rand(size, device=device) + 0.1
    counts = {}
    calls = []
    restore = _counting(calls)
    try:
        loss = D.vocab_parallel_cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=0.01, return_aux=True)[0]
        counts["logits_forward"], calls[:] = list(calls), []
        loss.backward()
        counts["logits_backward"], calls[:] = list(calls), []
        loss = D.vocab_parallel_cross_entropy(x, y, reduction="none")
        counts["logits_none_forward"], calls[:] = list(calls), []
        loss.sum().backward()
        counts["logits_none_backward"], calls[:] = list(calls), []
        inp = torch.randn(n, 8, device=device, requires_grad=True)
        lw = torch.randn(size, 8, device=device, requires_grad=True)
        loss = D.vocab_parallel_linear_cross_entropy(inp, lw, y, weight=w, label_smoothing=0.1)
        counts["linear_forward"], calls[:] = list(calls), []
        loss.backward()
        counts["linear_backward"], calls[:] = list(calls), []
    finally:
        restore()
    result["counts"] = counts
    result["n"] = n


def _compiled(rank, world, seed, device, result):
    """Under torch.compile(fullgraph=True) (aot_eager: dynamo and AOTAutograd trace the
    functional collectives, the linear form's backward one too) loss and gradients match
    the single-process ones."""
    D = xent_ext.distributed
    g = torch.Generator().manual_seed(seed)
    sizes = [600, 400]
    start, size = sum(sizes[:rank]), sizes[rank]
    full = torch.randn(6, V, generator=g)
    y = torch.randint(0, V, (6,), generator=g)
    y[2] = -100
    w = torch.rand(V, generator=g) + 0.1
    kw = dict(label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    failures = []

    ref_x = full.clone().requires_grad_()
    ref = xent_ext.cross_entropy(ref_x, y, w, **kw)
    ref.backward()
    local = full[:, start:start + size].clone().requires_grad_()
    f = torch.compile(lambda x, t, wl: D.vocab_parallel_cross_entropy(x, t, weight=wl, **kw), backend="aot_eager",
                      fullgraph=True)
    loss = f(local, y, w[start:start + size])
    loss.backward()
    _close("compiled loss", loss, ref, torch.float32, f"rank {rank}", failures)
    _close("compiled grad", local.grad, ref_x.grad[:, start:start + size], torch.float32, f"rank {rank}", failures)

    inp = torch.randn(6, 16, generator=g)
    lin_w = torch.randn(V, 16, generator=g) * 0.3
    ref_in, ref_w = inp.clone().requires_grad_(), lin_w.clone().requires_grad_()
    ref = xent_ext.cross_entropy(ref_in @ ref_w.t(), y, reduction="sum", label_smoothing=0.1)
    ref.backward()
    local_in, local_w = inp.clone().requires_grad_(), lin_w[start:start + size].clone().requires_grad_()
    f = torch.compile(lambda i, lw, t: D.vocab_parallel_linear_cross_entropy(i, lw, t, reduction="sum",
                                                                             label_smoothing=0.1),
                      backend="aot_eager", fullgraph=True)
    loss = f(local_in, local_w, y)
    loss.backward()
    _close("compiled linear loss", loss, ref, torch.float32, f"rank {rank}", failures)
    _close("compiled input.grad", local_in.grad, ref_in.grad, torch.float32, f"rank {rank}", failures)
    _close("compiled linear_weight.grad", local_w.grad, ref_w.grad[start:start + size], torch.float32,
           f"rank {rank}", failures)
    result["failures"] += failures


def _dtensor(rank, world, seed, device, result):
    """xent_ext.cross_entropy on a DTensor sharded on the class dimension (uneven: 999
    classes on two ranks, 500/499): the single-process loss and gradient, in the layout
    torch's loss_parallel returns (a replicated loss, a gradient sharded like the input)."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh(device, (world,))
    g = torch.Generator().manual_seed(seed)
    n, k, classes = 5, 2, 999
    failures = result["failures"]
    cases = [
        dict(reduction="mean"),
        dict(reduction="sum", weighted=True),
        dict(reduction="none", label_smoothing=0.1, weighted=True, z_loss=0.01),
        dict(reduction="mean", label_smoothing=0.1, softcap=4.0, return_aux=True, kdim=True),
        dict(reduction="mean", weighted=True, target_dtensor=True),
    ]
    for i, case in enumerate(cases):
        case = dict(case)
        weighted, kdim = case.pop("weighted", False), case.pop("kdim", False)
        target_dtensor = case.pop("target_dtensor", False)
        ctx = f"dtensor case {i} rank {rank}: {case} weighted={weighted} kdim={kdim}"
        shape = (n, classes, k) if kdim else (n, classes)
        full = torch.randn(shape, generator=g)
        y = torch.randint(0, classes, (n, k) if kdim else (n,), generator=g)
        y.view(-1)[1] = -100
        w = torch.rand(classes, generator=g) + 0.1 if weighted else None
        ref_x = full.clone().requires_grad_()
        ref = xent_ext.cross_entropy(ref_x, y, w, **case)
        dx = distribute_tensor(full.clone().to(device), mesh, [Shard(1)]).requires_grad_()
        dy = distribute_tensor(y.to(device), mesh, [Replicate()]) if target_dtensor else y.to(device)
        dw = None if w is None else distribute_tensor(w.to(device), mesh, [Replicate()])
        out = xent_ext.cross_entropy(dx, dy, dw, **case)
        if case.get("return_aux"):
            (ref, ref_aux), (out, out_aux) = ref, out
            _close("aux.lse", out_aux.lse.full_tensor(), ref_aux.lse, torch.float32, ctx, failures)
        if not isinstance(out, DTensor) or tuple(out.placements) != (Replicate(),):
            failures.append(f"{ctx}: expected a replicated DTensor, got {type(out).__name__} "
                            f"{getattr(out, 'placements', None)}")
            continue
        _close("loss", out.full_tensor(), ref, torch.float32, ctx, failures)
        upstream = torch.randn(ref.shape, generator=g)
        ref.backward(upstream)
        out.backward(DTensor.from_local(upstream.to(device), mesh, [Replicate()]))
        if tuple(dx.grad.placements) != (Shard(1),):
            failures.append(f"{ctx}: gradient placements {dx.grad.placements}")
        _close("grad", dx.grad.full_tensor(), ref_x.grad, torch.float32, ctx, failures)
        if not case.get("label_smoothing") and not case.get("return_aux"):
            # torch's own loss_parallel (no smoothing, no extras) gives the same numbers and layout.
            tx = distribute_tensor(full.clone().to(device), mesh, [Shard(1)])
            with loss_parallel():
                theirs = F.cross_entropy(tx, dy, dw, reduction=case["reduction"])
            if tuple(theirs.placements) != tuple(out.placements):
                failures.append(f"{ctx}: loss_parallel's placements {theirs.placements} != ours {out.placements}")
            _close("loss vs loss_parallel", out.full_tensor(), theirs.full_tensor(), torch.float32, ctx, failures)
            result["compared_with_loss_parallel"] = result.get("compared_with_loss_parallel", 0) + 1
    result["cases"] = len(cases)
    # Another layout is refused on every rank (not redistributed behind the caller's back).
    replicated = distribute_tensor(torch.randn(n, classes, generator=g).to(device), mesh, [Replicate()])
    try:
        xent_ext.cross_entropy(replicated, torch.zeros(n, dtype=torch.int64, device=device))
        failures.append(f"rank {rank}: a replicated DTensor was not refused")
    except ValueError as e:
        if "sharded on the class dimension" not in str(e):
            failures.append(f"rank {rank}: unexpected error {e}")


def _autocast(rank, world, seed, device, result):
    """Under autocast the loss has the dtype xent_ext.cross_entropy gives there (float32
    for bfloat16 logits), with the same numbers."""
    D = xent_ext.distributed
    g = torch.Generator().manual_seed(seed)
    sizes = [600, 400]
    start, size = sum(sizes[:rank]), sizes[rank]
    full = torch.randn(6, V, generator=g).to(torch.bfloat16).to(device)
    y = torch.randint(0, V, (6,), generator=g).to(device)
    probs = torch.softmax(torch.randn(6, V, generator=g), 1).to(torch.bfloat16).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        for name, target, local_target in (("index", y, y), ("prob", probs, probs[:, start:start + size])):
            ref = xent_ext.cross_entropy(full, target, label_smoothing=0.1)
            ours = D.vocab_parallel_cross_entropy(full[:, start:start + size], local_target, label_smoothing=0.1)
            if ours.dtype != ref.dtype:
                result["failures"].append(f"rank {rank} {name}: autocast loss dtype {ours.dtype} != {ref.dtype}")
            _close(f"autocast {name} loss", ours, ref, torch.float32, f"rank {rank}", result["failures"])


SCENARIOS = {"parity": _parity, "errors": _errors, "collectives": _collectives, "compiled": _compiled,
             "dtensor": _dtensor, "autocast": _autocast}


# ----------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of two gloo ranks for every two-rank scenario (the processes' start-up,
    seconds each, paid once): (seed, {scenario: [rank results]})."""
    seed = new_seed()
    print(f"xent_ext test seed for the two-rank spawn: {seed}   reproduce: {SEED_ENV}={seed}")
    out_dir = tmp_path_factory.mktemp("two_ranks")
    return seed, _launch(out_dir, 2, ["parity", "errors", "collectives", "compiled", "dtensor", "autocast"], seed,
                         timeout=150)


def test_matches_single_process_two_ranks(two_ranks):
    """Loss, aux and gradients equal xent_ext.cross_entropy on the concatenated logits
    (uneven shards 999/1: one rank holds a single class)."""
    seed, results = two_ranks
    _check(results["parity"], seed)
    assert results["parity"][0]["cases"] == 252


def test_matches_single_process_three_ranks(tmp_path, fresh_seed):
    """The same on three ranks, shards 400/350/250."""
    results = _launch(tmp_path, 3, ["parity"], fresh_seed)
    _check(results["parity"], fresh_seed)


def test_errors_raise_on_every_rank(two_ranks):
    """A bad call raises the same exception on every rank (never a hang), also when only
    one rank's arguments are wrong; the group keeps working afterwards."""
    seed, results = two_ranks
    _check(results["errors"], seed)
    per_rank = [{name: (kind, msg) for name, kind, msg in res["outcomes"]} for res in results["errors"]]
    expected = {
        "overlap": ("ValueError", "overlap"),
        "gap": ("ValueError", "gap"),
        "mixed_start": ("ValueError", "on every rank or on none"),
        "target_range": ("IndexError", f"Target {V} is out of bounds."),
        "negative_target": ("IndexError", "Target -5 is out of bounds."),
        "rows": ("ValueError", "same rows on every rank"),
        "target_differs": ("ValueError", "target differs between ranks"),
        "weight_one_rank": ("ValueError", "[on rank 1 of 2]"),
        "dtype_one_rank": ("TypeError", "[on rank 1 of 2]"),
        "target_shape": ("ValueError", "does not match local_logits"),
        "reduction": ("ValueError", "not a valid value for reduction"),
        "linear_hidden_one_rank": ("ValueError", "[on rank 1 of 2]"),
        "calls_differ": ("ValueError", "the arguments differ between ranks"),
        "prob_ignore_index": ("ValueError", "ignore_index is not supported for probability targets"),
        "not_a_tensor": ("TypeError", "local_logits must be a Tensor, got list [on rank 1 of 2]"),
        "good_after": ("ok", ""),
        "empty_shard": ("ok", ""),
        "second_backward": ("RuntimeError", "a second backward through the same call is not supported"),
    }
    for name, (kind, words) in expected.items():
        outcomes = [r[name] for r in per_rank]
        assert all(o == outcomes[0] for o in outcomes), f"{name}: ranks differ: {outcomes}"
        assert outcomes[0][0] == kind and words in outcomes[0][1], f"{name}: {outcomes[0]}"


def test_collective_counts(two_ranks):
    """At most three collectives per call, each of O(rows) elements (no logits-sized
    all-gather); none in the backward of the logits; one in the linear form's backward
    (the input's gradient)."""
    seed, results = two_ranks
    _check(results["collectives"], seed)
    counts = results["collectives"][0]["counts"]
    n = 7
    for name in ("logits_forward", "logits_none_forward", "linear_forward"):
        kinds = [kind for kind, _ in counts[name]]
        assert kinds == ["all_gather", "all_reduce", "all_reduce"], (name, counts[name])
        assert all(numel <= 5 * n + 1 or kind == "all_gather" and numel <= 100 for kind, numel in counts[name]), (
            name, counts[name])
    assert counts["logits_backward"] == [] and counts["logits_none_backward"] == [], counts
    assert [kind for kind, _ in counts["linear_backward"]] == ["all_reduce"], counts
    assert counts["linear_backward"][0][1] == n * 8, counts


def test_under_torch_compile(two_ranks):
    """torch.compile traces the functional collectives; loss and gradient as in eager."""
    seed, results = two_ranks
    _check(results["compiled"], seed)


def test_dtensor_sharded_on_classes(two_ranks):
    """xent_ext.cross_entropy on a DTensor sharded on the class dimension: the
    single-process numbers, torch loss_parallel's layout."""
    seed, results = two_ranks
    _check(results["dtensor"], seed)
    assert results["dtensor"][0]["cases"] == 5 and results["dtensor"][0]["compared_with_loss_parallel"] == 3


def test_import_without_torch_distributed(tmp_path):
    """Where torch.distributed is unavailable xent_ext still imports, and the functions
    say what is missing."""
    import subprocess
    import sys

    code = (
        "import torch.distributed as d; d.is_available = lambda: False\n"
        "import xent_ext, xent_ext.distributed as D\n"
        "assert not D.is_available()\n"
        "try:\n"
        "    D.vocab_parallel_cross_entropy(None, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'without torch.distributed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr


def test_autocast_loss_dtype(two_ranks):
    """Under autocast, the loss dtype and value of xent_ext.cross_entropy there."""
    seed, results = two_ranks
    _check(results["autocast"], seed)


@pytest.mark.cuda
def test_nccl_matches_single_process(tmp_path, fresh_seed):
    """The CUDA twin: two GPUs, NCCL."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    results = _launch(tmp_path, 2, ["parity", "errors", "collectives"], fresh_seed, device="cuda", timeout=300)
    for name in ("parity", "errors", "collectives"):
        _check(results[name], fresh_seed)
