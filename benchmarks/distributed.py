"""The vocabulary-parallel benchmark: ``python benchmarks/distributed.py [--world 2] ...`` from the repository root.

Spawns ``--world`` processes (ranks) on this machine, joined by a gloo process
group, and gives each rank its slice of the classes: rank r holds its
``torch.chunk`` of the columns of ``N x V`` logits (as DTensor's ``Shard(1)``
splits them: ceil(V / R) each, the last ranks fewer), a leaf that requires
grad, and the same ``N`` targets. Per shape it times forward + backward
('mean' reduction, no ignored targets) of:

* ``xent-vp``: ``xent_ext.distributed.vocab_parallel_cross_entropy`` on the
  local slice (three O(N) collectives, no logits gathered);
* ``gather+torch``: all-gather the logits into the full ``N x V`` on every
  rank, then ``torch.nn.functional.cross_entropy``; its backward takes this
  rank's columns of the full gradient (every rank computes the same loss, so
  no collective is needed there);
* ``gather+xent`` (with ``--impls``): the same with ``xent_ext.cross_entropy`` on
  the gathered logits (how much of ``gather+torch`` is the gather);
* ``loss_parallel``: torch's own, ``F.cross_entropy`` inside
  ``torch.distributed.tensor.parallel.loss_parallel()`` on a DTensor sharded
  on the class dimension (``Shard(1)``);
* ``xent-dtensor`` (with ``--impls``): ``xent_ext.cross_entropy`` on that same
  DTensor (which computes ``xent-vp`` on its local shard and returns a
  replicated DTensor, as ``loss_parallel`` does).

Each rank runs ``--threads`` torch threads (default: the logical CPUs divided
by the ranks). A sample is the slowest rank's time: the ranks meet at a
barrier, run the step ``inner`` times, and take the maximum of their times.
Times are medians of samples taken in blocks of back-to-back calls (as a
training loop runs, and as the harness times fwd+bwd on the CPU); the ratios
are each implementation's time over ``xent-vp``'s, measured in the same run.

Bytes communicated are measured, not derived from the shapes: during one
untimed call, the Python entry points of ``torch.distributed``'s collectives and of its
functional collectives (which DTensor uses) are wrapped, and each collective
adds the size of its buffer: an all-reduce (or broadcast) its tensor, an
all-gather its gathered output, a reduce-scatter its input. That is what one
rank puts into or takes out of the collective; the bytes a ring algorithm
moves over the wire per rank are about 2 (R - 1) / R of an all-reduce's
buffer and (R - 1) / R of an all-gather's. The same call runs under torch's
profiler, which sees every collective the process group runs; if it counts
more than the wrappers saw, the row says so (``uncounted``).

The loss and this rank's slice of the gradient are compared with torch's
fp32 cross-entropy of the full logits (max over ranks of max |diff| / max |ref|).
Peak memory is the largest extra allocation during one step on any rank
(torch's allocator, through the profiler). CPU and gloo only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the harness package
try:  # installed, or on PYTHONPATH
    import xent_ext
except ModuleNotFoundError:  # built in place: the repository root
    sys.path.insert(0, os.path.dirname(HERE))
    import xent_ext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness.report import fmt_mib, fmt_ms, machine_info  # noqa: E402
from harness.timing import TimingConfig, blocked_samples, interleaved_samples  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = ("4096x32000:fp32", "4096x32000:bf16", "2048x128256:fp32", "2048x128256:bf16")
IMPLS = ("xent-vp", "gather+torch", "gather+xent", "loss_parallel", "xent-dtensor")
DEFAULT_IMPLS = ("xent-vp", "gather+torch", "loss_parallel")  # the others on request: it keeps the run short
BASELINE = "xent-vp"


# --- counting the bytes of collectives --------------------------------------------------------------

class CollectiveCounter:
    """Wraps the collectives' Python entry points while active; records (name, bytes) per call.

    Only the outermost wrapped call counts, so an entry point that calls
    another (a functional all-gather built on another) is counted once.
    """

    # (module, function name, how its buffer is sized): "in" = the first tensor argument,
    # "out" = the gathered output (an output argument, or the result).
    C10D = (("all_reduce", "in"), ("broadcast", "in"), ("all_gather", "out"), ("all_gather_into_tensor", "out"),
            ("all_gather_single", "out"), ("reduce_scatter", "in"), ("reduce_scatter_tensor", "in"),
            ("all_to_all_single", "in"), ("all_to_all", "in"), ("reduce", "in"))
    FUNCOL = (("all_reduce", "in"), ("broadcast", "in"), ("all_gather_tensor", "out"), ("all_gather_single", "out"),
              ("all_gather_tensor_autograd", "out"), ("all_gather_single_autograd", "out"),
              ("reduce_scatter_tensor", "in"), ("reduce_scatter_single", "in"),
              ("reduce_scatter_tensor_autograd", "in"), ("reduce_scatter_single_autograd", "in"),
              ("all_to_all_single", "in"), ("all_to_all_single_autograd", "in"), ("all_reduce_coalesced", "in"),
              ("all_gather_into_tensor_coalesced", "out"), ("reduce_scatter_tensor_coalesced", "in"))

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._depth = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    @staticmethod
    def _tensors(obj: Any) -> list[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [t for o in obj for t in CollectiveCounter._tensors(o)]
        return []

    @staticmethod
    def _nbytes(ts: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    def _wrap(self, name: str, sizing: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self._depth.n = depth
            if depth == 0:
                if sizing == "out":
                    # c10d's gathers take the output first (a list or a tensor); the functional ones return it.
                    outs = self._tensors(result) or self._tensors(args[0] if args else kwargs.get("tensor_list"))
                else:
                    first = args[0] if args else next(iter(kwargs.values()), None)
                    outs = self._tensors(first)
                    if name in ("reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "all_to_all") \
                            and len(args) > 1:
                        outs = self._tensors(args[1])  # c10d: (output, input): the input is the buffer
                self.calls.append((name, self._nbytes(outs)))
            return result
        return wrapper

    @contextlib.contextmanager
    def active(self):  # noqa: ANN201
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        targets = [(dist, self.C10D), (c10d, self.C10D), (funcol, self.FUNCOL)]
        wrapped: dict[int, Callable[..., Any]] = {}  # one wrapper per function object, shared by its modules
        for module, table in targets:
            for name, sizing in table:
                fn = getattr(module, name, None)
                if fn is None:
                    continue
                if id(fn) not in wrapped:
                    wrapped[id(fn)] = self._wrap(name, sizing, fn)
                self._saved.append((module, name, fn))
                setattr(module, name, wrapped[id(fn)])
        try:
            yield self
        finally:
            for module, name, fn in reversed(self._saved):
                setattr(module, name, fn)
            self._saved.clear()


def measured_call(step: Callable[[], Any]) -> tuple[float, int, list[tuple[str, int]], int]:
    """Run ``step`` once, watched: its duration (s), peak extra bytes allocated, the collectives the
    wrappers saw (name, bytes) and the number of collectives torch's profiler saw (its c10d ops).

    Peak extra bytes as the harness's ``profiled_call``: the peak of the running sum of the
    allocations and frees torch's CPU allocator made during the call.
    """
    from torch.profiler import DeviceType, ProfilerActivity, profile

    gc.collect()
    counter = CollectiveCounter()
    with counter.active(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    current = peak = 0
    memory = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    for event in sorted(memory, key=lambda e: e.start_ns()):
        current += event.nbytes()  # negative for frees
        peak = max(peak, current)
    skip = ("barrier", "wait", "monitored_barrier")
    seen = sum(1 for e in prof.events() if e.name.startswith("c10d::") and not any(k in e.name for k in skip))
    return seconds, peak, counter.calls, seen


# --- the implementations ----------------------------------------------------------------------------

class GatherLogits(torch.autograd.Function):
    """All-gather the class slices into the full logits; backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, start: int, widths: list[int]) -> torch.Tensor:  # noqa: ANN401
        # gloo gathers equal sizes only: pad an uneven shard to the widest, then cut each part back.
        widest = max(widths)
        padded = F.pad(local, (0, widest - local.shape[1])) if local.shape[1] < widest else local.contiguous()
        parts = [padded.new_empty(local.shape[0], widest) for _ in widths]
        dist.all_gather(parts, padded)
        ctx.start, ctx.width = start, local.shape[1]
        return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:  # noqa: ANN401
        # Every rank computed the same loss from the same full logits, so the
        # gradient of that one loss w.r.t. this rank's columns is its slice.
        return grad[:, ctx.start:ctx.start + ctx.width], None, None


def make_mesh(names: list[str], world: int) -> Any:
    """The 1-D device mesh over all ranks that loss_parallel's DTensors live on (None if not needed)."""
    if "loss_parallel" not in names and "xent-dtensor" not in names:
        return None
    try:
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError:
        return None
    return init_device_mesh("cpu", (world,))


def shard_widths(vocab: int, world: int) -> list[int]:
    """Each rank's number of classes: ``torch.chunk``'s split, as DTensor's ``Shard(1)`` makes it."""
    chunk = -(-vocab // world)
    return [max(0, min(chunk, vocab - r * chunk)) for r in range(world)]


def implementations(names: list[str], world: int, vocab: int, mesh: Any) -> tuple[dict[str, Callable[..., Any]],
                                                                                  dict[str, str]]:
    """The steps' loss functions ``fn(local_logits, target, start)``, and why any is missing.

    A function may carry ``context``: a context manager that its forward and backward both run in.
    """
    widths = shard_widths(vocab, world)
    fns: dict[str, Callable[..., Any]] = {}
    missing: dict[str, str] = {}
    if "xent-vp" in names:
        try:
            from xent_ext.distributed import vocab_parallel_cross_entropy
        except ImportError as exc:
            missing["xent-vp"] = f"not importable: {exc}"
        else:
            fns["xent-vp"] = lambda x, y, start: vocab_parallel_cross_entropy(x, y)
    if "gather+torch" in names:
        fns["gather+torch"] = lambda x, y, start: F.cross_entropy(GatherLogits.apply(x, start, widths), y)
    if "gather+xent" in names:
        fns["gather+xent"] = lambda x, y, start: xent_ext.cross_entropy(GatherLogits.apply(x, start, widths), y)
    if "loss_parallel" in names or "xent-dtensor" in names:
        try:
            from torch.distributed.tensor import DTensor, Shard
            from torch.distributed.tensor.parallel import loss_parallel
        except ImportError as exc:
            for name in ("loss_parallel", "xent-dtensor"):
                if name in names:
                    missing[name] = f"not importable: {exc}"
        else:
            def sharded(x: torch.Tensor) -> Any:
                return DTensor.from_local(x, mesh, [Shard(1)], run_check=False, shape=(x.shape[0], vocab),
                                          stride=(vocab, 1))

            def lp(x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
                return F.cross_entropy(sharded(x), y)
            lp.context = loss_parallel  # type: ignore[attr-defined]  (its backward must run inside it too)
            if "loss_parallel" in names:
                fns["loss_parallel"] = lp
            if "xent-dtensor" in names:
                fns["xent-dtensor"] = lambda x, y, start: xent_ext.cross_entropy(sharded(x), y)
    return fns, missing


def local_loss(loss: Any) -> torch.Tensor:
    """The loss as a plain tensor (loss_parallel returns a replicated DTensor)."""
    to_local = getattr(loss, "to_local", None)
    return to_local() if to_local is not None else loss


# --- one shape --------------------------------------------------------------------------------------

def parse_shape(spec: str) -> tuple[int, int, torch.dtype]:
    dims, _, dtype_name = spec.partition(":")
    n, v = (int(d) for d in dims.split("x"))
    return n, v, DTYPES[dtype_name or "fp32"]


def available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def all_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_agree(ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def run_shape(spec: str, args: argparse.Namespace, rank: int, world: int, mesh: Any,
              cfg: TimingConfig) -> dict[str, Any]:
    n, v, dtype = parse_shape(spec)
    row: dict[str, Any] = {"shape": spec, "impls": {}}
    fns, row["missing"] = implementations(args.impl_names, world, v, mesh)
    for name, why in row["missing"].items():
        row["impls"][name] = {"error": why}
    full_bytes = n * v * 4
    free = available_bytes()
    # Per rank, a gather step holds the full logits, torch's log-softmax and the full gradient (fp32 in the
    # reference); all ranks share this machine's memory. Every rank must take the same decision.
    need = world * 5 * full_bytes
    if not all_agree(free is None or need <= free):
        row["skipped"] = f"needs about {fmt_mib(need)} MiB"
        return row
    widths = shard_widths(v, world)
    start, width = sum(widths[:rank]), widths[rank]
    gen = torch.Generator().manual_seed(args.seed)
    full = torch.randn(n, v, generator=gen).to(dtype)
    target = torch.randint(v, (n,), generator=gen)
    # The reference: torch's fp32 loss of the full logits, and this rank's columns of its gradient.
    ref_in = full.to(torch.float32, copy=True).requires_grad_(True)
    ref_loss = F.cross_entropy(ref_in, target)
    ref_loss.backward()
    ref_grad = ref_in.grad[:, start:start + width].clone()
    ref_loss = float(ref_loss.detach())
    del ref_in
    local = full[:, start:start + width].clone().requires_grad_(True)
    del full

    def step_of(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        context = getattr(fn, "context", contextlib.nullcontext)

        def step() -> torch.Tensor:
            local.grad = None
            with context():
                loss = fn(local, target, start)
                loss.backward()
            return local_loss(loss).detach()
        return step

    steps: dict[str, Callable[[], torch.Tensor]] = {}
    estimates: dict[str, float] = {}
    for name, fn in fns.items():
        step = step_of(fn)
        error = None
        try:
            loss = float(step())  # warm-up
            grad_diff = float((local.grad.float() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
            seconds, peak, calls, seen = measured_call(step)
        except Exception as exc:  # noqa: BLE001  (report it and keep going, on every rank)
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if args.verbose:
                traceback.print_exc()
        if not all_agree(error is None):
            row["impls"][name] = {"error": error or "failed on another rank"}
            continue
        sent = sum(b for _, b in calls)
        row["impls"][name] = {
            "loss": loss,
            "loss_rel_diff_vs_ref": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel_diff_vs_ref": all_max(grad_diff),
            "peak_bytes": int(all_max(peak)),
            "collectives": [list(c) for c in calls],
            "comm_bytes": int(all_max(sent)),
            "uncounted_collectives": int(all_max(seen - len(calls))),
            "profiler_collectives": seen,
        }
        steps[name] = step
        estimates[name] = all_max(seconds)  # every rank must plan the same repetitions

    def sampler(step: Callable[[], Any], inner: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        return all_max((time.perf_counter() - t0) / inner)  # a step takes as long as its slowest rank

    if steps:
        order = blocked_samples if args.order == "blocks" else interleaved_samples
        samples, inner = order(steps, estimates, cfg, sampler)
        for name, s in samples.items():
            row["impls"][name]["median_ms"] = statistics.median(s) / inner[name] * 1e3
            row["impls"][name]["samples"] = len(s)
    local.grad = None
    row["reference_loss"] = ref_loss
    return row


# --- output -----------------------------------------------------------------------------------------

COLUMNS = ("shape", "impl", "ms", "peak MiB", "colls", "comm KiB", "time / xent-vp", "comm / xent-vp",
           "loss diff", "grad diff")


def table(rows: list[dict[str, Any]], header: bool = True) -> list[str]:
    """The results as a Markdown table (one line per implementation)."""
    lines = []
    if header:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['shape']} | (skipped: {row['skipped']}) |" + " |" * (len(COLUMNS) - 2))
            continue
        base = row["impls"].get(BASELINE, {})
        for name, r in row["impls"].items():
            if "error" in r:
                lines.append(f"| {row['shape']} | {name} | n/a ({r['error']}) |" + " |" * (len(COLUMNS) - 3))
                continue
            t = f"{r['median_ms'] / base['median_ms']:.2f}x" if "median_ms" in base and "median_ms" in r else "n/a"
            c = "n/a"
            if base.get("comm_bytes"):
                ratio = r["comm_bytes"] / base["comm_bytes"]
                c = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
            colls = str(len(r["collectives"]))
            if r["uncounted_collectives"] > 0:
                colls += f" (+{r['uncounted_collectives']} uncounted)"
            lines.append(f"| {row['shape']} | {name} | {fmt_ms(r.get('median_ms'))} | {fmt_mib(r['peak_bytes'])} "
                         f"| {colls} | {r['comm_bytes'] / 1024:.1f} | {t} | {c} "
                         f"| {r['loss_rel_diff_vs_ref']:.1e} | {r['grad_rel_diff_vs_ref']:.1e} |")
    return lines


def load_average() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        mesh = make_mesh(args.impl_names, world)
        cfg = TimingConfig(min_time_s=args.min_time, max_time_s=args.max_time, min_reps=args.min_reps,
                           fixed_reps=None)
        shapes = args.shapes.split(",") if args.shapes else list(CPU_SHAPES)
        report: dict[str, Any] = {"argv": args.argv, "rows": []}
        if rank == 0:
            info = machine_info(torch.device("cpu"))
            info.update(ranks=world, threads_per_rank=torch.get_num_threads(), backend="gloo")
            report["machine"] = info
            report["load_average_start"] = load_average()
            print(f"machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs; {world} ranks (gloo) of "
                  f"{info['threads_per_rank']} threads each")
            print(f"torch {torch.__version__}; xent_ext {xent_ext.__version__}; fwd+bwd, 'mean', no ignored "
                  f"targets; times: slowest rank, median of {args.order}")
            print("comm: bytes per rank per call, measured by wrapping the collectives (all-reduce: its tensor, "
                  "all-gather: the gathered output)")
            print("\n".join(table([], header=True)), flush=True)
        for spec in shapes:
            row = run_shape(spec, args, rank, world, mesh, cfg)
            if rank == 0:
                report["rows"].append(row)
                print("\n".join(table([row], header=False)), flush=True)
                if args.json:
                    with open(args.json, "w", encoding="utf-8") as f:
                        json.dump(report, f, indent=1)
        if rank == 0:
            report["load_average_end"] = load_average()
            print("loss diff, grad diff: against torch's fp32 cross-entropy of the full logits "
                  "(|loss - ref| / |ref|; max |grad - ref| / max |ref| over this rank's columns, max over ranks)")
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
            if args.markdown:
                with open(args.markdown, "w", encoding="utf-8") as f:
                    f.write("\n".join(markdown(report)) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def markdown(report: dict[str, Any]) -> list[str]:
    info = report["machine"]
    return [
        "# Vocabulary-parallel cross-entropy: forward + backward",
        "",
        f"- command: `python benchmarks/distributed.py {' '.join(report['argv'])}`",
        f"- machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs; {info['ranks']} ranks (gloo), "
        f"{info['threads_per_rank']} torch threads each",
        f"- torch {info['torch_version']}; xent_ext build: {info.get('xent_build_info')}",
        f"- load average (1, 5, 15 min) at start {report.get('load_average_start')}, "
        f"at end {report.get('load_average_end')}",
        "- ms: the slowest rank's time per call, median of samples; peak: largest extra allocation during one "
        "step on any rank; comm: bytes per rank per call, measured by wrapping the collectives",
        "",
    ] + table(report["rows"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (processes) to spawn")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: CPUs / ranks)")
    p.add_argument("--shapes", default=None, help="comma-separated NxV[:fp32|bf16|fp16] (the full logits)")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated, of {','.join(IMPLS)} (default {','.join(DEFAULT_IMPLS)})")
    p.add_argument("--order", default="blocks", choices=("blocks", "interleaved"))
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--max-time", type=float, default=10.0)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits in a collective")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the results here as a Markdown report")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing implementation")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.impl_names = args.impls.split(",") if args.impls else list(DEFAULT_IMPLS)
    unknown = set(args.impl_names) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementations: {', '.join(sorted(unknown))}")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines, as in the harness
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    torch.multiprocessing.spawn(worker, args=(args.world, free_port(), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
