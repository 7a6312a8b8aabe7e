"""Benchmark ``xent_ext.cross_entropy`` against torch eager and ``torch.compile``.

Run as ``python -m xent_ext.bench`` (``--help`` lists the options;
``benchmarks/README.md`` explains how every number is measured).

All implementations are measured in one process and one run.  Per
(shape, dtype, threads, mode) row the harness reports:

* the median wall time of ``xent_ext.cross_entropy``, ``F.cross_entropy``
  (torch eager) and ``torch.compile(F.cross_entropy, dynamic=False)``;
  their repetitions are interleaved (A, B, C, A, B, C, ...) after warm-up;
* the speedups eager / xent and compile / xent (the headline numbers:
  absolute times drift on noisy machines, ratios much less);
* the bandwidth achieved by xent (logits bytes: 1 read for 'fwd',
  2 reads + 1 write for 'fwd+bwd') and the fraction of the bandwidth floor
  derived from this machine's copy / read bandwidth measured at start;
* the peak extra memory of one call of each implementation.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import DeviceType, ProfilerActivity, profile

import xent_ext

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[], Any]

IMPLS = ("xent", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Shape specs: "N x C [x d1 x d2 ...]" with an optional ":dtype" suffix.
DEFAULT_SHAPES = (
    "4096x32000:fp32",
    "4096x32000:bf16",
    "4096x128256:bf16",
    "8192x50257:fp32",
    "65536x1000:fp32",
    "1048576x10:fp32",
    "16x21x128x128:fp32",  # segmentation: (N, C, H, W) logits, (N, H, W) target
    "8x256000:fp32",
)
QUICK_SHAPES = ("4096x32000:fp32", "4096x32000:bf16", "65536x1000:fp32")

BANDWIDTH_BUFFER_BYTES = 256 * 2**20  # fp32 buffer used to measure bandwidth
MIN_SAMPLE_S = 2e-3  # calls faster than this are batched into one timed sample
# Relative tolerance on the loss value vs torch eager (sanity check only).
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input configuration: logits shape (N, C, d1, ...) and dtype."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def num_classes(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else self.shape[0]

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Class-index target shape, as F.cross_entropy expects it."""
        return (self.shape[0], *self.shape[2:]) if len(self.shape) > 1 else ()

    @property
    def logits_bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class TimingConfig:
    """How many repetitions to run (see ``plan_repetitions``)."""

    min_time_s: float  # each implementation is timed for at least this long ...
    max_time_s: float  # ... unless all implementations together would exceed this
    min_reps: int  # never fewer timed samples than this
    fixed_reps: int | None  # --reps: exact number of samples, no adaptation


@dataclass
class Bandwidth:
    """Memory bandwidth of this machine at one thread count, in GB/s (1e9 B/s)."""

    threads: int
    copy_gbps: float  # dst.copy_(src): bytes read + bytes written
    read_sum_gbps: float  # src.sum(): bytes read
    read_amax_gbps: float  # src.amax(): bytes read

    @property
    def read_gbps(self) -> float:
        """Best read bandwidth of the two read kernels."""
        return max(self.read_sum_gbps, self.read_amax_gbps)


@dataclass
class ImplResult:
    """Measurements of one implementation for one row."""

    samples_ms: list[float] = field(default_factory=list)
    inner: int = 0  # calls per timed sample (each sample is their mean)
    loss: float | None = None
    peak_extra_bytes: int | None = None
    skipped: bool = False  # compile with --no-compile
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None


@dataclass
class Row:
    case: Case
    threads: int
    mode: str
    impls: dict[str, ImplResult]
    bandwidth: Bandwidth

    @property
    def bytes_moved(self) -> int:
        """Logits-sized traffic: 1 read (fwd) or 2 reads + 1 write (fwd+bwd)."""
        return self.case.logits_bytes * (1 if self.mode == "fwd" else 3)

    @property
    def floor_ms(self) -> float:
        """Bandwidth floor: reads at the read bandwidth, read+write at the copy bandwidth."""
        b = self.case.logits_bytes
        floor_s = b / (self.bandwidth.read_gbps * 1e9)
        if self.mode == "fwd+bwd":
            floor_s += 2 * b / (self.bandwidth.copy_gbps * 1e9)
        return floor_s * 1e3

    def speedup(self, impl: str) -> float | None:
        """Time of ``impl`` divided by the time of xent (> 1: xent is faster)."""
        xent, other = self.impls["xent"].median_ms, self.impls[impl].median_ms
        return other / xent if xent and other else None

    @property
    def xent_gbps(self) -> float | None:
        t = self.impls["xent"].median_ms
        return self.bytes_moved / (t * 1e-3) / 1e9 if t else None

    @property
    def pct_of_floor(self) -> float | None:
        t = self.impls["xent"].median_ms
        return 100.0 * self.floor_ms / t if t else None

    def to_json(self) -> dict[str, Any]:
        impls: dict[str, Any] = {}
        for name, r in self.impls.items():
            impls[name] = asdict(r) | {
                "median_ms": r.median_ms,
                "min_ms": min(r.samples_ms) if r.samples_ms else None,
            }
        return {
            "shape": list(self.case.shape),
            "target_shape": list(self.case.target_shape),
            "dtype": self.case.dtype,
            "threads": self.threads,
            "mode": self.mode,
            "logits_bytes": self.case.logits_bytes,
            "bytes_moved": self.bytes_moved,
            "floor_ms": self.floor_ms,
            "xent_gbps": self.xent_gbps,
            "pct_of_floor": self.pct_of_floor,
            "speedup_vs_eager": self.speedup("eager"),
            "speedup_vs_compile": self.speedup("compile"),
            "impls": impls,
        }


def parse_shape(spec: str) -> Case:
    """Parse ``"4096x32000"`` or ``"4096x32000:bf16"`` (default dtype fp32)."""
    dims, _, dtype = spec.strip().partition(":")
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} in {spec!r}; choose from {sorted(DTYPES)}")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"bad shape {spec!r}")
    return Case(shape, dtype)


def parse_int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def select_cases(shapes: Sequence[str], dtypes: Sequence[str] | None) -> list[Case]:
    """Cases in order; ``dtypes`` (if given) replaces each shape's own dtype."""
    cases: list[Case] = []
    for spec in shapes:
        case = parse_shape(spec)
        for dtype in dtypes or [case.dtype]:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
            candidate = Case(case.shape, dtype)
            if candidate not in cases:
                cases.append(candidate)
    return cases


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def make_sync(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work (a no-op on CPU, where ops are synchronous)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_sample(step: Step, inner: int, sync: Callable[[], None]) -> float:
    """Mean wall time in seconds of ``inner`` back-to-back calls of ``step``."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        step()
    sync()
    return (time.perf_counter() - start) / inner


def plan_repetitions(estimates: dict[str, float], cfg: TimingConfig) -> tuple[int, dict[str, int]]:
    """Pick the number of interleaved samples and the calls per sample.

    Calls shorter than ``MIN_SAMPLE_S`` are batched so one sample lasts about
    that long.  All implementations get the same number of samples ``n``
    (strict interleaving): enough for the fastest to run ``min_time_s`` in
    total, capped so the whole row takes at most ``max_time_s``, but never
    fewer than ``min_reps``.
    """
    inner = {name: max(1, math.ceil(MIN_SAMPLE_S / max(t, 1e-9))) for name, t in estimates.items()}
    if cfg.fixed_reps is not None:
        return cfg.fixed_reps, inner
    sample_s = [inner[name] * t for name, t in estimates.items()]
    n = min(math.ceil(cfg.min_time_s / min(sample_s)), math.floor(cfg.max_time_s / sum(sample_s)))
    return max(cfg.min_reps, n), inner


def interleaved_samples(
    steps: dict[str, Step], estimates: dict[str, float], cfg: TimingConfig, sync: Callable[[], None]
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time warmed-up ``steps`` round-robin; returns samples (seconds) and calls per sample.

    ``estimates`` (seconds per call) plan the repetitions.  Each round runs
    every step once, starting one step later than the previous round
    (A B C, B C A, C A B, ...) so no implementation always runs first.
    """
    n, inner = plan_repetitions(estimates, cfg)
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(time_sample(steps[name], inner[name], sync))
    return samples, inner


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def profiled_call(step: Step, device: torch.device) -> tuple[float, int]:
    """Run ``step`` once; return its duration (s) and peak extra bytes allocated.

    Peak extra bytes: the peak of memory allocated during the call on top of
    what was allocated before it.  CUDA: ``torch.cuda.max_memory_allocated()``
    minus ``memory_allocated()`` before the call.  CPU: torch keeps no CPU
    allocator statistics, so the call runs under ``torch.profiler`` with
    ``profile_memory=True``, which records every allocation and free of
    torch's CPU allocator; the peak of their running sum is returned.  Memory
    obtained outside torch's allocator (plain malloc, OpenMP or oneDNN
    scratch) is not seen.  The duration (which on CPU includes the profiler's
    small per-op overhead) only serves to plan repetitions.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        elapsed = time_sample(step, 1, torch.cuda.synchronize)
        return elapsed, torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        elapsed = time_sample(step, 1, lambda: None)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()  # negative for frees
        peak = max(peak, current)
    return elapsed, peak


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def measure_bandwidth(device: torch.device, threads: int, cfg: TimingConfig) -> Bandwidth:
    """Copy and read bandwidth of a 256 MiB fp32 buffer (medians, GB/s)."""
    torch.set_num_threads(threads)
    sync = make_sync(device)
    src = torch.rand(BANDWIDTH_BUFFER_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    steps: dict[str, Step] = {
        "copy": lambda: dst.copy_(src),
        "sum": src.sum,
        "amax": src.amax,
    }
    for step in steps.values():  # warm-up (first touch of dst's pages)
        step()
    estimates = {name: time_sample(step, 1, sync) for name, step in steps.items()}
    samples, _ = interleaved_samples(steps, estimates, cfg, sync)
    nbytes = src.numel() * src.element_size()
    med = {name: statistics.median(s) for name, s in samples.items()}
    return Bandwidth(
        threads, 2 * nbytes / med["copy"] / 1e9, nbytes / med["sum"] / 1e9, nbytes / med["amax"] / 1e9
    )


def make_step(fn: LossFn, x: torch.Tensor, target: torch.Tensor, mode: str) -> Step:
    """A callable running one forward ('fwd') or forward+backward ('fwd+bwd')."""
    if mode == "fwd":
        x_fwd = x.detach()
        return lambda: fn(x_fwd, target)

    def step() -> torch.Tensor:
        x.grad = None  # like optimizer.zero_grad(set_to_none=True)
        loss = fn(x, target)
        loss.backward()
        return loss.detach()

    return step


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:200]


def bench_row(
    case: Case,
    x: torch.Tensor,
    target: torch.Tensor,
    mode: str,
    bandwidth: Bandwidth,
    use_compile: bool,
    cfg: TimingConfig,
    device: torch.device,
) -> Row:
    """Warm up, check, measure memory of and time all implementations for one row."""
    sync = make_sync(device)
    results = {name: ImplResult() for name in IMPLS}
    fns: dict[str, LossFn] = {"xent": xent_ext.cross_entropy, "eager": F.cross_entropy}
    if use_compile:
        # Fresh compile per row: avoids hitting dynamo's recompile limit and
        # lets inductor specialise on this row's thread count.
        torch._dynamo.reset()
        try:
            fns["compile"] = torch.compile(F.cross_entropy, dynamic=False)
        except Exception as exc:  # compile support varies by machine
            results["compile"].error = first_line(exc)
    else:
        results["compile"].skipped = True

    steps: dict[str, Step] = {}
    for name, fn in fns.items():
        step = make_step(fn, x, target, mode)
        try:
            results[name].loss = float(step())  # warm-up (compiles for 'compile')
        except Exception as exc:  # report n/a and keep going
            results[name].error = first_line(exc)
            continue
        steps[name] = step
    if not steps:
        return Row(case, torch.get_num_threads(), mode, results, bandwidth)

    estimates = {}
    for name, step in steps.items():
        x.grad = None
        try:
            estimates[name], results[name].peak_extra_bytes = profiled_call(step, device)
        except Exception as exc:  # memory stats are best effort
            results[name].error = f"memory measurement failed: {first_line(exc)}"
            estimates[name] = time_sample(step, 1, sync)

    samples, inner = interleaved_samples(steps, estimates, cfg, sync)
    for name in steps:
        results[name].samples_ms = [s * 1e3 for s in samples[name]]
        results[name].inner = inner[name]
    x.grad = None
    return Row(case, torch.get_num_threads(), mode, results, bandwidth)


def loss_mismatches(row: Row) -> list[str]:
    """Implementations whose loss differs from torch eager beyond the tolerance."""
    ref = row.impls["eager"].loss
    if ref is None:
        return []
    out = []
    for name in ("xent", "compile"):
        loss = row.impls[name].loss
        if loss is None:
            continue
        rel = abs(loss - ref) / max(abs(ref), 1e-12)
        if not rel <= LOSS_RTOL[row.case.dtype]:  # also catches NaN
            out.append(f"{name} loss {loss:.6g} vs eager {ref:.6g} (rel diff {rel:.2e})")
    return out


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: Sequence[int]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": list(threads),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    for key, getter in (
        ("xent_cpu_capability", xent_ext.cpu_capability),
        ("xent_build_info", lambda: xent_ext._C.build_info()),
    ):
        try:
            info[key] = getter()
        except Exception as exc:  # still benchmark without it
            info[key] = f"unavailable ({first_line(exc)})"
    return info


def print_header(info: dict[str, Any], cfg: TimingConfig, use_compile: bool) -> None:
    build = info["xent_build_info"]
    if isinstance(build, dict):
        build = ", ".join(f"{k}={v}" for k, v in build.items())
    lines = [
        ("CPU", f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs)"),
        ("GPU", info.get("gpu")),
        ("ISA", f"xent_ext {info['xent_cpu_capability']}, torch {info['torch_cpu_capability']}"),
        ("threads", ", ".join(str(t) for t in info["threads"])),
        ("torch", info["torch_version"] + (f" (CUDA {info['cuda_version']})" if "gpu" in info else "")),
        ("xent_ext build", build),
        (
            "timing",
            f"median of interleaved samples; >= {cfg.min_time_s:g} s per impl, "
            f"<= {cfg.max_time_s:g} s per row, >= {cfg.min_reps} samples"
            if cfg.fixed_reps is None
            else f"median of {cfg.fixed_reps} interleaved samples (--reps)",
        ),
        ("torch.compile", "on (dynamic=False)" if use_compile else "off"),
    ]
    for key, value in lines:
        if value is not None:
            print(f"{key + ':':<16}{value}")


def print_bandwidth(bw: Bandwidth, device: torch.device) -> None:
    copy = "D2D copy" if device.type == "cuda" else "copy"
    print(
        f"bandwidth @ {bw.threads} thread(s): {copy} {bw.copy_gbps:.1f} GB/s (read+write), "
        f"read {bw.read_gbps:.1f} GB/s (sum {bw.read_sum_gbps:.1f}, amax {bw.read_amax_gbps:.1f})"
    )


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def fmt_mib(n: int | None) -> str:
    if n is None:
        return "n/a"
    mib = n / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"


class Table:
    """Fixed-width table printed row by row (results appear as they come).

    "n/a": the implementation failed (see the notes); "-": compile skipped.
    """

    def __init__(self, shape_width: int) -> None:
        self.columns = [
            ("shape", max(shape_width, 5)),
            ("dtype", 5),
            ("thr", 3),
            ("mode", 7),
            ("eager/xent", 10),
            ("comp/xent", 9),
            ("xent GB/s", 9),
            ("%floor", 6),
            ("xent ms", 8),
            ("eager ms", 8),
            ("comp ms", 8),
            ("MiB xent", 8),
            ("MiB eager", 9),
            ("MiB comp", 8),
        ]
        self.left_aligned = 4  # the key columns

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < self.left_aligned else cell.rjust(width)
            for i, (cell, (_, width)) in enumerate(zip(cells, self.columns, strict=True))
        )

    def print_header(self) -> None:
        print(self._line([name for name, _ in self.columns]))
        print(self._line(["-" * width for _, width in self.columns]))

    def print_row(self, row: Row) -> None:
        xent, eager, comp = (row.impls[name] for name in IMPLS)
        skip = comp.skipped
        cells = [
            row.case.label,
            row.case.dtype,
            str(row.threads),
            row.mode,
            fmt(row.speedup("eager"), ".2f"),
            "-" if skip else fmt(row.speedup("compile"), ".2f"),
            fmt(row.xent_gbps, ".1f"),
            fmt(row.pct_of_floor, ".0f"),
            fmt_ms(xent.median_ms),
            fmt_ms(eager.median_ms),
            "-" if skip else fmt_ms(comp.median_ms),
            fmt_mib(xent.peak_extra_bytes),
            fmt_mib(eager.peak_extra_bytes),
            "-" if skip else fmt_mib(comp.peak_extra_bytes),
        ]
        print(self._line(cells), flush=True)


LEGEND = """\
eager/xent, comp/xent: median time of torch eager / torch.compile divided by xent's (> 1: xent faster)
xent GB/s: logits bytes moved by xent (fwd: 1 read; fwd+bwd: 2 reads + 1 write) / xent median time
%floor:    bandwidth-floor time / xent median time (floor: 1 read at the read bandwidth,
           plus 1 read + 1 write at the copy bandwidth for fwd+bwd)
MiB:       peak extra memory of one call (fwd+bwd includes the logits-sized gradient)"""


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m xent_ext.bench",
        description="Benchmark xent_ext.cross_entropy vs torch eager and torch.compile.",
    )
    p.add_argument(
        "--shapes",
        help='comma-separated logits shapes, e.g. "4096x32000,16x21x128x128:bf16" '
        "(NxC or NxCxd1x...; optional :fp32|:bf16|:fp16; default: the built-in set)",
    )
    p.add_argument(
        "--dtype",
        help="comma-separated dtypes (fp32,bf16,fp16); runs every shape at each, "
        "overriding the per-shape dtype",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads",
        help="comma-separated torch.set_num_threads values (default: 1 and all; --quick, cuda: all)",
    )
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile(F.cross_entropy) (default: on, off with --quick)",
    )
    p.add_argument(
        "--reps", type=int, help="exact number of timed samples per implementation (default: adaptive)"
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.3,
        help="adaptive: time each implementation at least this many seconds (default 0.3)",
    )
    p.add_argument(
        "--max-time", type=float, help="adaptive: cap on seconds per row and mode (default 10, --quick 4)"
    )
    p.add_argument("--json", metavar="PATH", help="also write all results (with raw samples) as JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small subset (4096x32000 fp32/bf16, 65536x1000 fp32; all threads; no compile unless --compile)",
    )
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.threads and any(t < 1 for t in parse_int_list(args.threads)):
        p.error("--threads values must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Silence the log lines kineto prints at every start/stop of the memory profiler.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    cases = select_cases(
        args.shapes.split(",") if args.shapes else QUICK_SHAPES if args.quick else DEFAULT_SHAPES,
        args.dtype.split(",") if args.dtype else None,
    )
    all_threads = torch.get_num_threads()
    if args.threads:
        threads = parse_int_list(args.threads)
    elif args.quick or device.type == "cuda":
        threads = [all_threads]
    else:
        threads = sorted({1, all_threads})
    modes = {"fwd": ["fwd"], "fwdbwd": ["fwd+bwd"], "both": list(MODES)}[args.mode]
    use_compile = args.compile if args.compile is not None else not args.quick
    cfg = TimingConfig(
        min_time_s=args.min_time,
        max_time_s=args.max_time if args.max_time is not None else 4.0 if args.quick else 10.0,
        min_reps=3 if args.quick else 5,
        fixed_reps=args.reps,
    )

    info = machine_info(device, threads)
    print_header(info, cfg, use_compile)
    bandwidths = {t: measure_bandwidth(device, t, cfg) for t in threads}
    for bw in bandwidths.values():
        print_bandwidth(bw, device)
    print()

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "machine": info,
        "config": {"timing": asdict(cfg), "compile": use_compile, "modes": modes},
        "bandwidth": [asdict(bw) | {"read_gbps": bw.read_gbps} for bw in bandwidths.values()],
        "rows": [],
    }
    table = Table(max(len(c.label) for c in cases))
    table.print_header()
    notes: list[str] = []
    generator = torch.Generator(device=device).manual_seed(0)
    for case in cases:
        x = torch.randn(case.shape, dtype=DTYPES[case.dtype], device=device, generator=generator)
        x.requires_grad_(True)
        target = torch.randint(0, case.num_classes, case.target_shape, device=device, generator=generator)
        for t in threads:
            torch.set_num_threads(t)
            for mode in modes:
                row = bench_row(case, x, target, mode, bandwidths[t], use_compile, cfg, device)
                table.print_row(row)
                where = f"{case.label} {case.dtype} thr={t} {mode}"
                notes += [f"{where}: {name}: {r.error}" for name, r in row.impls.items() if r.error]
                notes += [f"{where}: WARNING {m}" for m in loss_mismatches(row)]
                report["rows"].append(row.to_json())
                if args.json:
                    with open(args.json, "w", encoding="utf-8") as f:
                        json.dump(report, f, indent=2)
        del x, target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.set_num_threads(all_threads)

    print()
    print(LEGEND)
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")


if __name__ == "__main__":
    main()
