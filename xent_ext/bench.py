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
import contextlib
import functools
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
    order: str = "auto"  # CPU: "interleaved", "blocks", or "auto" (see ``sample_order``)


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
class CacheCost:
    """xent's cost with its inputs in cache (see ``measure_in_cache``)."""

    host_ms: float  # fixed cost per call: Python, dispatch, allocation, the final reduction
    ms_per_byte: float  # cost per byte of logits, read from cache: the computation
    slice_bytes: int  # logits bytes of the smaller of the two slices timed


@dataclass
class Row:
    case: Case
    threads: int
    mode: str
    impls: dict[str, ImplResult]
    bandwidth: Bandwidth
    order: str = "interleaved"  # how the samples were taken (``sample_order``)
    cache: CacheCost | None = None

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

    @property
    def compute_ms(self) -> float | None:
        """xent's time for these logits if they came from cache (host time excluded)."""
        return self.cache.ms_per_byte * self.case.logits_bytes if self.cache else None

    @property
    def cache_gbps(self) -> float | None:
        """``xent_gbps`` with the logits in cache: the compute ceiling, comparable to the bandwidths."""
        t = self.compute_ms
        return self.bytes_moved / (t * 1e-3) / 1e9 if t else None

    @property
    def bound(self) -> str | None:
        """What bounds xent's time: 'memory', 'compute', 'host' or 'other'.

        The largest of three lower bounds: memory (the bandwidth floor),
        compute (the in-cache time scaled to these logits), host (the fixed
        cost per call); 'other' when xent's time exceeds the larger of memory
        and compute plus host by more than the largest bound (page faults on
        the gradient, or a disturbed sample).
        """
        t = self.impls["xent"].median_ms
        if self.cache is None or t is None:
            return None
        costs = {"memory": self.floor_ms, "compute": self.compute_ms or 0.0, "host": self.cache.host_ms}
        largest = max(costs, key=lambda k: costs[k])
        explained = max(costs["memory"], costs["compute"]) + costs["host"]
        return "other" if t - explained > costs[largest] else largest

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
            "order": self.order,
            "cache": asdict(self.cache) if self.cache else None,
            "compute_ms": self.compute_ms,
            "cache_gbps": self.cache_gbps,
            "bound": self.bound,
            "targets": [asdict(t) for t in cpu_target_checks(self)],
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
    steps: dict[str, Step],
    estimates: dict[str, float],
    cfg: TimingConfig,
    sync: Callable[[], None],
    sampler: Callable[[Step, int], float] | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time warmed-up ``steps`` round-robin; returns samples (seconds) and calls per sample.

    ``estimates`` (seconds per call) plan the repetitions.  Each round runs
    every step once, starting one step later than the previous round
    (A B C, B C A, C A B, ...) so no implementation always runs first.
    ``sampler(step, inner)`` times one sample (default: wall clock around
    ``inner`` calls with ``sync`` before and after; the CUDA harness passes
    CUDA events).
    """
    if sampler is None:
        sampler = lambda step, inner: time_sample(step, inner, sync)
    n, inner = plan_repetitions(estimates, cfg)
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(sampler(steps[name], inner[name]))
    return samples, inner


BLOCK_ROUNDS = 2  # blocks per implementation in "blocks" order


def blocked_samples(
    steps: dict[str, Step],
    estimates: dict[str, float],
    cfg: TimingConfig,
    sync: Callable[[], None],
    rounds: int = BLOCK_ROUNDS,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time warmed-up ``steps`` in blocks of back-to-back calls; same results as ``interleaved_samples``.

    Each implementation runs its samples back to back (A A A, B B B, C C C,
    then the next round in reverse order: C C C, B B B, A A A), each block
    after one untimed call.  This is what a training loop sees: every call
    allocates buffers of the same sizes the previous call freed.  Interleaved,
    a call instead first-touches memory another implementation just freed in
    other sizes, which on the VMs these benchmarks were written on costs more
    than the computation (benchmarks/NOTES.md, "Page faults").  Two rounds in
    opposite orders keep slow drift of the machine from favouring one side.
    """
    n, inner = plan_repetitions(estimates, cfg)
    per_block = max(1, math.ceil(n / rounds))
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            steps[name]()  # untimed: the first call after a switch pays the switch
            for _ in range(per_block):
                samples[name].append(time_sample(steps[name], inner[name], sync))
    return samples, inner


def sample_order(cfg: TimingConfig, mode: str) -> str:
    """'interleaved' or 'blocks' for a CPU row: ``auto`` interleaves fwd and blocks fwd+bwd.

    The forward allocates next to nothing, so interleaving (the fairest order
    against drift) costs it nothing; fwd+bwd allocates a logits-sized gradient
    per call, whose first-touch cost depends on what ran just before.
    """
    if cfg.order != "auto":
        return cfg.order
    return "interleaved" if mode == "fwd" else "blocks"


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

    order = sample_order(cfg, mode)
    sampler = interleaved_samples if order == "interleaved" else blocked_samples
    samples, inner = sampler(steps, estimates, cfg, sync)
    for name in steps:
        results[name].samples_ms = [s * 1e3 for s in samples[name]]
        results[name].inner = inner[name]
    x.grad = None
    cache = None
    if "xent" in steps and device.type == "cpu":
        cache = measure_in_cache(x, target, mode)
    return Row(case, torch.get_num_threads(), mode, results, bandwidth, order, cache)


DEFAULT_CPU_LLC_BYTES = 16 * 2**20  # last-level cache, when sysfs does not say
CACHE_SLICE_MAX_BYTES = 4 * 2**20  # logits of the larger slice ``measure_in_cache`` times


def cpu_llc_bytes() -> int:
    """Size of cpu0's last-level cache (Linux sysfs), or ``DEFAULT_CPU_LLC_BYTES``."""
    sizes = []
    for index in range(2, 5):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size", encoding="utf-8") as f:
                text = f.read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CPU_LLC_BYTES)


def cache_slice(x: torch.Tensor, target: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``units`` rows (N x C) or spatial positions of image 0 (N x C x d1...), copied.

    Keeps the layout kind: a 2-D slice is rows of contiguous classes, a
    spatial slice (1, C, units) has classes strided, as in the full input.
    """
    x = x.detach()
    if x.dim() == 2:
        return x[:units].clone(), target[:units].clone()
    c = x.shape[1]
    return (
        x[:1].reshape(1, c, -1)[:, :, :units].contiguous(),
        target[:1].reshape(1, -1)[:, :units].contiguous(),
    )


def measure_in_cache(
    x: torch.Tensor, target: torch.Tensor, mode: str
) -> CacheCost | None:
    """xent's per-call and per-byte cost on a slice of the input small enough to stay in cache.

    Times ``k`` and ``2k`` rows (or spatial positions), each called over and
    over so that it stays in cache (the larger slice holds at most 4 MiB of
    logits and a quarter of the last-level cache): the difference is the
    cost of ``k`` rows without DRAM traffic, the rest of the smaller call's
    time the fixed cost per call.  Slices of a few rows would not do: their
    difference drowns in the per-call noise.  Scaled to the full
    input, the first says what xent would take if memory were free, which is
    how the harness tells a compute-bound row from a memory-bound one.
    Returns None for 1-D logits (one row: nothing to slice).
    """
    if x.dim() < 2:
        return None
    unit_bytes = x.shape[1] * x.element_size()
    units_max = x.shape[0] if x.dim() == 2 else math.prod(x.shape[2:])
    k = min(units_max // 2, min(CACHE_SLICE_MAX_BYTES, cpu_llc_bytes() // 4) // 2 // unit_bytes)
    k = max(k, 1)
    if 2 * k > units_max:
        return None
    steps: dict[str, Step] = {}
    for name, units in (("k", k), ("2k", 2 * k)):
        xs, ts = cache_slice(x, target, units)
        if mode != "fwd":
            xs.requires_grad_(True)
        steps[name] = make_step(xent_ext.cross_entropy, xs, ts, mode)
        steps[name]()  # warm-up: brings the slice into cache
    sync = make_sync(x.device)
    estimates = {name: time_sample(step, 1, sync) for name, step in steps.items()}
    slice_cfg = TimingConfig(min_time_s=0.1, max_time_s=1.0, min_reps=9, fixed_reps=None)
    samples, _ = interleaved_samples(steps, estimates, slice_cfg, sync)
    t_k, t_2k = (statistics.median(samples[name]) * 1e3 for name in ("k", "2k"))
    per_unit = max(t_2k - t_k, 1e-9) / k  # noise can make the difference <= 0
    return CacheCost(
        host_ms=max(t_k - per_unit * k, 0.0), ms_per_byte=per_unit / unit_bytes, slice_bytes=k * unit_bytes
    )


# --------------------------------------------------------------------------
# Targets (issue 4, CPU)
# --------------------------------------------------------------------------
#
# fwd+bwd: >= 5x faster than torch eager and >= 2x faster than torch.compile
# on LLM shapes, >= 3x and >= 1.5x on the others; peak extra memory at most
# one gradient-sized buffer plus O(N).  fwd on LLM shapes: within 1.5x of the
# bandwidth floor (one read of the logits at the read bandwidth).

LLM_MIN_CLASSES = 32000
LLM_MIN_ROWS = 1024  # a batch of tokens; 8 x 256000 is "few, long rows", not an LLM batch
TARGET_EAGER = {"llm": 5.0, "other": 3.0}
TARGET_COMPILE = {"llm": 2.0, "other": 1.5}
TARGET_FLOOR_FACTOR = 1.5
# O(N) allowance on top of one gradient: per-row statistics and targets, plus allocator slack.
MEM_BYTES_PER_ROW = 64
MEM_SLACK_BYTES = 2**20


@dataclass
class TargetCheck:
    name: str  # "vs eager", "vs compile", "memory", "floor"
    value: float | None  # measured: a speedup, gradients of memory, or floor time / xent time
    goal: float
    at_least: bool  # True: value >= goal is met; False: value <= goal is met

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.at_least else self.value <= self.goal

    def text(self) -> str:
        sign = ">=" if self.at_least else "<="
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        verdict = {True: "ok", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.name} {value} ({sign} {self.goal:.4g}) {verdict}"


def shape_class(case: Case) -> str:
    """'llm' for an LLM batch (2-D, C >= 32000, N >= 1024), else 'other'."""
    n_rows = case.shape[0] if len(case.shape) == 2 else 0
    return "llm" if n_rows >= LLM_MIN_ROWS and case.num_classes >= LLM_MIN_CLASSES else "other"


def cpu_target_checks(row: Row) -> list[TargetCheck]:
    """The targets that apply to this row, each with its measured value."""
    kind = shape_class(row.case)
    if row.mode == "fwd":
        if kind != "llm":
            return []
        pct = row.pct_of_floor
        return [TargetCheck("floor", None if pct is None else pct / 100, 1 / TARGET_FLOOR_FACTOR, True)]
    checks = [
        TargetCheck("vs eager", row.speedup("eager"), TARGET_EAGER[kind], True),
        TargetCheck("vs compile", row.speedup("compile"), TARGET_COMPILE[kind], True),
    ]
    peak = row.impls["xent"].peak_extra_bytes
    b = row.case.logits_bytes
    rows = math.prod(row.case.target_shape)
    allowance = (b + MEM_BYTES_PER_ROW * rows + MEM_SLACK_BYTES) / b
    checks.append(TargetCheck("memory", None if peak is None else peak / b, allowance, False))
    return checks


def target_line(row: Row) -> str | None:
    """One line of the targets summary, with the measured reason when one is missed."""
    checks = cpu_target_checks(row)
    if not checks:
        return None
    where = f"{row.case.label} {row.case.dtype} thr={row.threads} {row.mode}"
    line = f"{where}: " + "; ".join(c.text() for c in checks)
    if any(c.met is False for c in checks) and row.cache is not None:
        xent_ms = row.impls["xent"].median_ms or float("nan")
        line += (
            f"\n    why: {row.bound}-bound. xent {fmt_ms(xent_ms)} ms; memory floor {fmt_ms(row.floor_ms)} ms, "
            f"in-cache compute {fmt_ms(row.compute_ms)} ms ({fmt(row.cache_gbps, '.1f')} GB/s), "
            f"host {fmt_us(row.cache.host_ms)} us per call"
        )
    return line


def print_targets(rows: Sequence[Row]) -> None:
    """The targets section: one line per row that has targets, then how many were met."""
    lines = [line for line in map(target_line, rows) if line]
    if not lines:
        return
    checks = [c for row in rows for c in cpu_target_checks(row)]
    met = sum(c.met is True for c in checks)
    print(f"\ntargets (fwd+bwd: >= {TARGET_EAGER['llm']:g}x eager and >= {TARGET_COMPILE['llm']:g}x "
          f"compile on LLM shapes, >= {TARGET_EAGER['other']:g}x and >= {TARGET_COMPILE['other']:g}x on "
          f"others, memory <= 1 gradient + O(N); fwd on LLM shapes: >= 1/{TARGET_FLOOR_FACTOR:g} of the "
          f"floor's speed): {met} of {len(checks)} met")
    for line in lines:
        print(f"  {line}")


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
        ("timing", _timing_text(cfg)),
        ("torch.compile", "on (dynamic=False)" if use_compile else "off"),
    ]
    _print_header_lines(lines)


def _timing_text(cfg: TimingConfig, clock: str = "") -> str:
    """The header's timing line, for both harnesses (clock: e.g. 'CUDA events, ')."""
    order = {
        "auto": "interleaved samples (fwd), blocks of back-to-back calls (fwd+bwd)",
        "interleaved": "interleaved samples",
        "blocks": "blocks of back-to-back calls",
    }[cfg.order]
    if cfg.fixed_reps is not None:
        return f"{clock}median of {cfg.fixed_reps} samples (--reps), {order}"
    return (f"{clock}median of {order}; >= {cfg.min_time_s:g} s per impl, "
            f"<= {cfg.max_time_s:g} s per row, >= {cfg.min_reps} samples")


def _print_header_lines(lines: list[tuple[str, Any]]) -> None:
    """Prints 'key: value' header lines, aligned, skipping values of None."""
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
            ("cache GB/s", 10),
            ("bound", 7),
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
            fmt(row.cache_gbps, ".1f"),
            row.bound or "n/a",
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
cache GB/s: xent GB/s if the logits came from cache: bytes moved / (in-cache time per byte x bytes),
           timed on slices of the input that stay in cache; xent's compute ceiling
bound:     largest of xent's three lower bounds: memory (the floor), compute (the in-cache time),
           host (the fixed cost per call); other: xent took over twice what they explain
           (page faults, a disturbed sample)
MiB:       peak extra memory of one call (fwd+bwd includes the logits-sized gradient)
timing:    fwd rows interleave the implementations' samples; fwd+bwd rows time each in blocks of
           back-to-back calls (--order; benchmarks/README.md says why)"""


# --------------------------------------------------------------------------
# CUDA harness (--device cuda)
# --------------------------------------------------------------------------
#
# On a GPU the harness differs from the CPU one above in what it compares and
# how it times, so it has its own row type and tables:
#
# * peers: xent, torch eager, torch.compile, and, when importable, Liger
#   Kernel's and QuACK's cross-entropy (a missing peer is "not installed", a
#   peer that raises is "failed: <reason>", and the run goes on);
# * time: CUDA events around a batch of calls (median over interleaved
#   samples); inputs small enough to stay in L2 are rotated through several
#   identical copies so that no call reads its logits from L2;
# * bandwidth: the minimum bytes (fwd: logits + targets once; fwd+bwd: 2 reads
#   + 1 write of the logits + targets once) over the time, as a % of a
#   device-to-device copy measured at start (bytes read + written);
# * memory: peak extra bytes of one call, also in units of one gradient
#   buffer (= the logits' bytes).

CUDA_IMPLS = ("xent", "eager", "compile", "liger", "quack")
CUDA_PEERS = CUDA_IMPLS[1:]
CUDA_DEFAULT_SHAPES = (
    "8192x128256:bf16",  # LLaMA-3 vocabulary: the shape the performance targets are set on
    "4096x32000:bf16",
    "4096x32000:fp32",
    "8192x50257:fp32",
    "65536x1000:fp32",
    "1048576x10:fp32",
    "16x21x128x128:fp32",
    "8x256000:fp32",
)
CUDA_QUICK_SHAPES = ("8192x128256:bf16", "4096x32000:fp32", "65536x1000:fp32")

# Targets, checked on TARGET_CASE fwd+bwd and printed as the "targets" line.
TARGET_CASE = Case((8192, 128256), "bf16")
TARGET_MODE = "fwd+bwd"
TARGET_PCT_COPY = 85.0  # achieved bandwidth (2R+1W of the logits) as % of D2D copy
TARGET_MEM_GRADS = 1.0  # peak extra memory, in gradient buffers
# Allowance on top of one gradient for per-row statistics, the loss and
# allocator rounding (8192 rows x 8 B is 0.0000 gradients at the target shape).
MEM_GRADS_SLACK = 0.01

COPY_BUFFER_BYTES = 2**30  # D2D copy bandwidth: 1 GiB -> 1 GiB (2 GiB counted)
COPY_SAMPLES = 20
DEFAULT_L2_BYTES = 64 * 2**20  # when the device does not report its L2 size
MAX_INPUT_COPIES = 64
WARM_S = 0.02  # per implementation, before its repetitions are planned
TARGET_INDEX_BYTES = 8  # int64 class indices

# Peers that take only (N, C) logits and class-index targets (N,).
PEERS_2D_ONLY = ("liger", "quack")
# Peers that write the gradient into the logits (they get their own copies).
PEERS_GRAD_IN_PLACE = ("liger",)


def min_bytes(case: Case, mode: str) -> int:
    """Fewest bytes one call must move through device memory.

    fwd: one read of the logits and of the targets.  fwd+bwd: two reads of the
    logits and one write of the gradient (exact autograd semantics: forward,
    then backward), plus one read of the targets.
    """
    target = math.prod(case.target_shape) * TARGET_INDEX_BYTES
    return case.logits_bytes * (1 if mode == "fwd" else 3) + target


def input_copies(set_bytes: int, l2_bytes: int) -> int:
    """Identical copies of (logits, targets) to cycle through, so no call finds its inputs in L2.

    One copy when the inputs are over twice the L2; otherwise enough copies to
    span four times the L2 (at least 2, at most ``MAX_INPUT_COPIES``).
    """
    if set_bytes > 2 * l2_bytes:
        return 1
    return min(MAX_INPUT_COPIES, max(2, math.ceil(4 * l2_bytes / max(set_bytes, 1))))


def fmt_us(ms: float | None) -> str:
    """A time given in ms, shown in microseconds with 3-4 significant digits."""
    if ms is None:
        return "n/a"
    us = ms * 1e3
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def short_reason(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Peer:
    """An optional third-party implementation: its loss function, or why it is missing."""

    name: str
    fn: LossFn | None
    version: str | None = None
    status: str = "ok"  # "not installed" or "failed: import: ..." when fn is None


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _missing(exc: BaseException, module: str) -> str:
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module:
        return "not installed"
    return f"failed: import: {first_line(exc)}"


def load_liger() -> Peer:
    """Liger Kernel's Triton cross-entropy (``liger_cross_entropy``, F.cross_entropy's signature).

    It computes the gradient inside the forward and stores it in the logits'
    own memory (when they require grad); the backward hands that tensor to
    autograd.  So its fwd+bwd allocates no gradient but overwrites its input.
    """
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as exc:  # noqa: BLE001  (any import failure: report and go on)
        return Peer("liger", None, status=_missing(exc, "liger_kernel"))
    return Peer("liger", lambda x, t: liger_cross_entropy(x, t), _dist_version("liger-kernel", "liger_kernel"))


def load_quack() -> Peer:
    """QuACK's CuTe-DSL cross-entropy (``quack.cross_entropy.cross_entropy(x, target, ..., reduction)``)."""
    try:
        from quack.cross_entropy import cross_entropy as quack_ce
    except Exception as exc:  # noqa: BLE001
        return Peer("quack", None, status=_missing(exc, "quack"))
    import inspect

    try:
        takes_reduction = "reduction" in inspect.signature(quack_ce).parameters
    except (TypeError, ValueError):
        takes_reduction = True
    if takes_reduction:
        fn: LossFn = lambda x, t: quack_ce(x, t, reduction="mean")
    else:  # older releases return the per-row losses
        fn = lambda x, t: quack_ce(x, t).mean()
    return Peer("quack", fn, _dist_version("quack-kernels", "quack_kernels", "quack"))


class RotatingInputs:
    """``copies`` identical (logits, targets) pairs; each call takes the next pair.

    For fwd+bwd, taking a pair first drops the gradient of the pair used by
    the previous call (``zero_grad(set_to_none=True)`` of the previous step),
    so at most one gradient is alive at a time, as with a single input.
    """

    def __init__(self, x: torch.Tensor, target: torch.Tensor, copies: int) -> None:
        base = x.detach()
        self.xs = [base.clone().requires_grad_(True) for _ in range(copies)]
        self.detached = [t.detach() for t in self.xs]
        self.targets = [target.clone() for _ in range(copies)]
        self._next = 0
        self._last = 0

    def __len__(self) -> int:
        return len(self.xs)

    def take(self, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._next
        self._next = (i + 1) % len(self.xs)
        if with_grad:
            self.xs[self._last].grad = None
            self.xs[i].grad = None
        self._last = i
        return (self.xs[i] if with_grad else self.detached[i]), self.targets[i]

    def clear_grads(self) -> None:
        for x in self.xs:
            x.grad = None


def make_gpu_step(fn: LossFn, inputs: RotatingInputs, mode: str) -> Step:
    """One forward ('fwd') or ``loss = f(x, y); loss.backward()`` ('fwd+bwd') on the next input pair."""
    if mode == "fwd":

        def fwd() -> torch.Tensor:
            x, target = inputs.take(with_grad=False)
            return fn(x, target)

        return fwd

    def fwd_bwd() -> torch.Tensor:
        x, target = inputs.take(with_grad=True)
        loss = fn(x, target)
        loss.backward()
        return loss.detach()

    return fwd_bwd


def make_event_sampler(device: torch.device) -> Callable[[Step, int], float]:
    """Seconds per call of ``inner`` back-to-back calls: CUDA events on a GPU, wall clock otherwise."""
    if device.type != "cuda":
        return lambda step, inner: time_sample(step, inner, lambda: None)

    def sample(step: Step, inner: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / inner

    return sample


def measure_copy_gbps(
    device: torch.device, sampler: Callable[[Step, int], float], nbytes: int = COPY_BUFFER_BYTES
) -> tuple[float, list[float]]:
    """Device-to-device copy bandwidth, GB/s counting bytes read + written; also the samples (ms)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    step: Step = functools.partial(dst.copy_, src)
    sampler(step, 5)  # warm-up (and clocks up)
    samples = [sampler(step, 2) for _ in range(COPY_SAMPLES)]
    del step, src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(samples) / 1e9, [s * 1e3 for s in samples]


@dataclass
class GpuImplResult:
    """Measurements of one implementation for one (shape, dtype, mode) row of the CUDA harness."""

    status: str = "ok"  # ok | not installed | failed: <reason> | skipped: <reason>
    error: str | None = None  # the exception's first line, when failed
    samples_ms: list[float] = field(default_factory=list)
    inner: int = 0
    loss: float | None = None
    peak_extra_bytes: int | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    def fail(self, exc: BaseException | str, where: str = "") -> None:
        text = exc if isinstance(exc, str) else first_line(exc)
        self.error = f"{where}{text}"
        self.status = "failed: " + short_reason(self.error)


@dataclass
class GpuRow:
    case: Case
    mode: str
    impls: dict[str, GpuImplResult]
    copy_gbps: float
    copies: int = 1  # input copies rotated through (L2)

    @property
    def min_bytes(self) -> int:
        return min_bytes(self.case, self.mode)

    def gbps(self, name: str) -> float | None:
        t = self.impls[name].median_ms
        return self.min_bytes / (t * 1e-3) / 1e9 if t else None

    def pct_copy(self, name: str) -> float | None:
        g = self.gbps(name)
        return 100.0 * g / self.copy_gbps if g is not None and self.copy_gbps > 0 else None

    def ratio(self, slower: str, faster: str) -> float | None:
        """Median time of ``slower`` over median time of ``faster`` (> 1: ``faster`` is faster)."""
        a, b = self.impls[slower].median_ms, self.impls[faster].median_ms
        return a / b if a and b else None

    def mem_grads(self, name: str) -> float | None:
        """Peak extra memory in gradient buffers (one gradient = the logits' bytes)."""
        peak = self.impls[name].peak_extra_bytes
        return peak / self.case.logits_bytes if peak is not None else None

    def to_json(self) -> dict[str, Any]:
        impls: dict[str, Any] = {}
        for name, r in self.impls.items():
            impls[name] = asdict(r) | {
                "median_ms": r.median_ms,
                "min_ms": min(r.samples_ms) if r.samples_ms else None,
                "gbps": self.gbps(name),
                "pct_of_copy": self.pct_copy(name),
                "speedup_vs_eager": self.ratio("eager", name),
                "speedup_vs_compile": self.ratio("compile", name),
                "peak_extra_gradients": self.mem_grads(name),
            }
        return {
            "shape": list(self.case.shape),
            "target_shape": list(self.case.target_shape),
            "dtype": self.case.dtype,
            "mode": self.mode,
            "logits_bytes": self.case.logits_bytes,
            "min_bytes": self.min_bytes,
            "input_copies": self.copies,
            "copy_gbps": self.copy_gbps,
            "impls": impls,
        }


def gpu_loss_mismatches(row: GpuRow) -> list[str]:
    """Implementations whose warm-up loss differs from torch eager's beyond the tolerance."""
    ref = row.impls["eager"].loss
    if ref is None:
        return []
    out = []
    for name in CUDA_IMPLS[2:] + ("xent",):
        loss = row.impls[name].loss
        if loss is None:
            continue
        rel = abs(loss - ref) / max(abs(ref), 1e-12)
        if not rel <= LOSS_RTOL[row.case.dtype]:  # also catches NaN
            out.append(f"{name} loss {loss:.6g} vs eager {ref:.6g} (rel diff {rel:.2e})")
    return out


def target_verdict(row: GpuRow) -> dict[str, Any]:
    """The targets on ``row``: % of copy bandwidth, faster than every peer that ran, memory."""
    xent = row.impls["xent"]
    ran = [p for p in CUDA_PEERS if row.impls[p].median_ms is not None]
    pct = row.pct_copy("xent")
    mem = row.mem_grads("xent")
    speedups = {p: row.ratio(p, "xent") for p in ran}
    return {
        "shape": list(row.case.shape),
        "dtype": row.case.dtype,
        "mode": row.mode,
        "xent_status": xent.status,
        "pct_of_copy": pct,
        "pct_of_copy_target": TARGET_PCT_COPY,
        "pct_of_copy_met": None if pct is None else pct >= TARGET_PCT_COPY,
        "peers_ran": ran,
        "speedup_vs_peers": speedups,
        "faster_than_all_peers": (
            None if xent.median_ms is None or not ran else all(s is not None and s > 1 for s in speedups.values())
        ),
        "peak_extra_gradients": mem,
        "peak_extra_gradients_target": TARGET_MEM_GRADS,
        "memory_met": None if mem is None else mem <= TARGET_MEM_GRADS + MEM_GRADS_SLACK,
        "loss_matches_eager": (
            None
            if xent.loss is None or row.impls["eager"].loss is None
            else not any(m.startswith("xent ") for m in gpu_loss_mismatches(row))
        ),
    }


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else "yes" if flag else "NO"


def format_targets(v: dict[str, Any]) -> str:
    where = f"{'x'.join(map(str, v['shape']))} {v['dtype']} {v['mode']}"
    if v["pct_of_copy"] is None:
        return f"targets ({where}): xent did not run ({v['xent_status']})"
    if v["peers_ran"]:
        ratios = ", ".join(f"{p} {fmt(s, '.2f')}x" for p, s in v["speedup_vs_peers"].items())
        faster = f"{_yes_no(v['faster_than_all_peers'])} (peer time / xent time: {ratios})"
    else:
        faster = "n/a (no peer ran)"
    return (
        f"targets ({where}): "
        f"{v['pct_of_copy']:.1f}% of copy bandwidth (>= {v['pct_of_copy_target']:g}%: {_yes_no(v['pct_of_copy_met'])}); "
        f"faster than every peer that ran: {faster}; "
        f"peak extra memory {fmt(v['peak_extra_gradients'], '.3f')} gradient buffers "
        f"(<= {v['peak_extra_gradients_target']:g}: {_yes_no(v['memory_met'])}); "
        f"loss matches eager: {_yes_no(v['loss_matches_eager'])}"
    )


class TextTable:
    """Fixed-width columns; the first ``left`` columns are left-aligned, the last may overflow."""

    def __init__(self, columns: Sequence[tuple[str, int]], left: int) -> None:
        self.columns = list(columns)
        self.left = left

    def line(self, cells: Sequence[str]) -> str:
        out = []
        for i, (cell, (_, width)) in enumerate(zip(cells, self.columns, strict=True)):
            out.append(cell.ljust(width) if i < self.left else cell.rjust(width))
        return "  ".join(out).rstrip()

    def header(self) -> list[str]:
        return [self.line([n for n, _ in self.columns]), self.line(["-" * w for _, w in self.columns])]


def gpu_detail_table(shape_width: int) -> TextTable:
    return TextTable(
        [
            ("shape", max(shape_width, 5)),
            ("dtype", 5),
            ("mode", 7),
            ("impl", 7),
            ("us", 8),
            ("GB/s", 7),
            ("%copy", 5),
            ("eager/t", 7),
            ("comp/t", 6),
            ("peak MiB", 8),
            ("grads", 5),
            ("status", 0),
        ],
        left=4,
    )


def ratio_cell(row: GpuRow, slower: str, faster: str) -> str:
    """``slower``'s time over ``faster``'s; "-" if ``slower`` did not run, "n/a" if it failed."""
    r = row.impls[slower]
    if r.median_ms is None:
        return "n/a" if r.status.startswith("failed") else "-"
    return fmt(row.ratio(slower, faster), ".2f")


SHORT_NAMES = {"xent": "xent", "eager": "eager", "compile": "comp", "liger": "liger", "quack": "quack"}


def gpu_detail_lines(row: GpuRow, table: TextTable) -> list[str]:
    """One line per implementation (times, bandwidth, ratios, memory, status)."""
    lines = []
    for i, name in enumerate(CUDA_IMPLS):
        r = row.impls[name]
        ran = r.median_ms is not None
        key = [row.case.label, row.case.dtype, row.mode] if i == 0 else ["", "", ""]
        cells = [
            *key,
            name,
            fmt_us(r.median_ms) if ran else "-",
            fmt(row.gbps(name), ".0f") if ran else "-",
            fmt(row.pct_copy(name), ".0f") if ran else "-",
            ratio_cell(row, "eager", name) if ran else "-",
            ratio_cell(row, "compile", name) if ran else "-",
            fmt_mib(r.peak_extra_bytes) if r.peak_extra_bytes is not None else "-",
            fmt(row.mem_grads(name), ".2f") if r.peak_extra_bytes is not None else "-",
            "" if r.status == "ok" else r.status,
        ]
        lines.append(table.line(cells))
    return lines


def gpu_summary_table(shape_width: int) -> TextTable:
    return TextTable(
        [
            ("shape", max(shape_width, 5)),
            ("dtype", 5),
            ("mode", 7),
            ("xent us", 8),
            ("GB/s", 6),
            ("%copy", 5),
            *[(f"{SHORT_NAMES[p]}/x", 7) for p in CUDA_PEERS],
            ("grads x", 7),
            ("grads e", 7),
        ],
        left=3,
    )


def gpu_summary_line(row: GpuRow, table: TextTable) -> str:
    """xent's time and bandwidth, each peer's time over xent's, memory of xent and eager in gradients.

    A peer ratio is "-" when the peer did not run (not installed, skipped,
    compile off) and "n/a" when it failed.
    """

    return table.line(
        [
            row.case.label,
            row.case.dtype,
            row.mode,
            fmt_us(row.impls["xent"].median_ms),
            fmt(row.gbps("xent"), ".0f"),
            fmt(row.pct_copy("xent"), ".0f"),
            *[ratio_cell(row, p, "xent") for p in CUDA_PEERS],
            fmt(row.mem_grads("xent"), ".2f"),
            fmt(row.mem_grads("eager"), ".2f"),
        ]
    )


GPU_LEGEND = """\
us:        median time per call in microseconds (CUDA events around batches of calls; samples interleaved across impls)
GB/s:      minimum bytes / time; fwd: logits + targets read once; fwd+bwd: 2 reads + 1 write of the
           logits (the forward, then the backward) + targets once
%copy:     GB/s as % of the device-to-device copy bandwidth measured at start (read + write bytes)
eager/t, comp/t: torch eager's (torch.compile's) median time / this impl's (> 1: faster than it)
X/x:       peer X's median time / xent's (> 1: xent faster); '-' did not run, 'n/a' failed
peak MiB:  peak extra memory of one call (max_memory_allocated after a reset, minus the memory held
           before it: inputs); grads: the same in gradient buffers (= logits bytes); fwd+bwd includes
           the gradient itself
liger:     writes its gradient into the logits (in place), so its fwd+bwd allocates no gradient and
           destroys its input; it runs on its own copies of the logits"""


def gpu_machine_info(device: torch.device, l2_bytes: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": str(device),
        "l2_bytes": l2_bytes,
        "triton_version": _dist_version("triton", "pytorch-triton"),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": props.total_memory,
        }
    else:
        info["gpu"] = "none: CUDA harness dry run on the CPU (timings mean nothing)"
    try:
        info["xent_build_info"] = xent_ext.build_info()
    except Exception as exc:  # noqa: BLE001  (still benchmark without it)
        info["xent_build_info"] = f"unavailable ({first_line(exc)})"
    check = getattr(xent_ext, "cuda_target_check", None)  # on by default: one host sync per forward
    try:
        info["xent_cuda_target_check"] = None if check is None else bool(check())
    except Exception:  # noqa: BLE001
        info["xent_cuda_target_check"] = None
    return info


def print_gpu_header(info: dict[str, Any], peers: dict[str, Peer], cfg: TimingConfig, use_compile: bool) -> None:
    build = info["xent_build_info"]
    if isinstance(build, dict):
        build = ", ".join(f"{k}={v}" for k, v in build.items())
    gpu = info["gpu"]
    if "sm_count" in info:
        gpu += (
            f" ({info['sm_count']} SMs, compute capability {info['compute_capability']}, "
            f"{info['gpu_memory_bytes'] / 2**30:.0f} GiB, L2 {info['l2_bytes'] / 2**20:.0f} MiB)"
        )
    peer_text = ", ".join(
        f"{p.name} {p.version or '(version unknown)'}" if p.fn else f"{p.name}: {p.status}" for p in peers.values()
    )
    lines = [
        ("GPU", gpu),
        ("CPU", f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs)"),
        ("torch", f"{info['torch_version']} (CUDA {info['cuda_version']}), triton {info['triton_version']}"),
        ("xent_ext build", build),
        (
            "xent_ext",
            "CUDA target check "
            + {True: "on", False: "off", None: "n/a"}[info.get("xent_cuda_target_check")]
            + " (xent_ext.cuda_target_check())",
        ),
        ("peers", peer_text),
        ("timing", _timing_text(cfg, "CUDA events, ")),
        ("torch.compile", "on (dynamic=False)" if use_compile else "off"),
    ]
    _print_header_lines(lines)


def gpu_bench_row(
    case: Case,
    mode: str,
    inputs: RotatingInputs,
    private_inputs: RotatingInputs | None,
    peers: dict[str, Peer],
    copy_gbps: float,
    use_compile: bool,
    cfg: TimingConfig,
    device: torch.device,
) -> GpuRow:
    """Warm up, check, measure memory of and time every implementation for one row."""
    sampler = make_event_sampler(device)
    sync = make_sync(device)
    results = {name: GpuImplResult() for name in CUDA_IMPLS}
    fns: dict[str, LossFn] = {"xent": xent_ext.cross_entropy, "eager": F.cross_entropy}
    if use_compile:
        torch._dynamo.reset()  # a fresh compile per row (see the CPU harness)
        try:
            fns["compile"] = torch.compile(F.cross_entropy, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            results["compile"].fail(exc)
    else:
        results["compile"].status = "skipped: --no-compile"
    for name, peer in peers.items():
        if peer.fn is None:
            results[name].status = peer.status
        elif name in PEERS_2D_ONLY and len(case.shape) != 2:
            results[name].status = "skipped: takes (N, C) logits only"
        else:
            fns[name] = peer.fn

    def inputs_of(name: str) -> RotatingInputs:
        return private_inputs if name in PEERS_GRAD_IN_PLACE and private_inputs is not None else inputs

    all_inputs = [inputs] + ([private_inputs] if private_inputs is not None else [])

    def settle() -> None:
        """Drop gradients and cached blocks (after a failure, e.g. out of memory)."""
        for inp in all_inputs:
            inp.clear_grads()
        gc.collect()
        if device.type == "cuda":
            # A broken CUDA context raises here too: the calls themselves report it.
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    steps: dict[str, Step] = {}
    for name, fn in fns.items():
        step = make_gpu_step(fn, inputs_of(name), mode)
        try:
            results[name].loss = float(step())  # warm-up (compiles for 'compile'); float() syncs
        except Exception as exc:  # noqa: BLE001  (report and keep going)
            results[name].fail(exc)
            settle()
            continue
        steps[name] = step
    settle()

    estimates: dict[str, float] = {}
    for name, step in list(steps.items()):
        try:
            for inp in all_inputs:
                inp.clear_grads()
            _, results[name].peak_extra_bytes = profiled_call(step, device)
            # Warm (clocks, caches, allocator) for about WARM_S, then estimate the time per call.
            t1 = sampler(step, 1)
            estimates[name] = sampler(step, max(1, min(200, math.ceil(WARM_S / max(t1, 1e-6)))))
        except Exception as exc:  # noqa: BLE001
            results[name].fail(exc, "measuring: ")
            del steps[name]
            settle()

    # Timed samples.  An implementation that raises now is marked failed and
    # the others are timed again without it.
    failed: dict[str, BaseException] = {}

    def guarded(name: str, step: Step) -> Step:
        def call() -> Any:
            try:
                return step()
            except Exception as exc:
                failed[name] = exc
                raise

        return call

    while steps:
        try:
            guarded_steps = {name: guarded(name, step) for name, step in steps.items()}
            samples, inner = interleaved_samples(guarded_steps, estimates, cfg, sync, sampler)
        except Exception as exc:  # noqa: BLE001
            culprits = [name for name in failed if name in steps] or list(steps)
            for name in culprits:
                results[name].fail(failed.get(name, exc), "timing: ")
                del steps[name]
                estimates.pop(name, None)
            settle()
            continue
        for name in steps:
            results[name].samples_ms = [s * 1e3 for s in samples[name]]
            results[name].inner = inner[name]
        break
    settle()
    return GpuRow(case, mode, results, copy_gbps, len(inputs))


def gpu_main(args: argparse.Namespace, argv: Sequence[str] | None, device: torch.device) -> None:
    """``--device cuda``: every implementation side by side, one process, one run."""
    t0 = time.perf_counter()
    cases = select_cases(
        args.shapes.split(",") if args.shapes else CUDA_QUICK_SHAPES if args.quick else CUDA_DEFAULT_SHAPES,
        args.dtype.split(",") if args.dtype else None,
    )
    modes = {"fwd": ["fwd"], "fwdbwd": ["fwd+bwd"], "both": list(MODES)}[args.mode]
    use_compile = args.compile if args.compile is not None else not args.quick
    cfg = TimingConfig(
        min_time_s=args.min_time,
        max_time_s=args.max_time if args.max_time is not None else 1.0 if args.quick else 2.0,
        min_reps=5 if args.quick else 10,
        fixed_reps=args.reps,
        order="interleaved",  # CUDA events, no page faults: --order is for the CPU harness
    )
    l2_bytes = DEFAULT_L2_BYTES
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    peers = {"liger": load_liger(), "quack": load_quack()}
    info = gpu_machine_info(device, l2_bytes)
    info["peers"] = {p.name: {"version": p.version, "status": p.status} for p in peers.values()}
    print_gpu_header(info, peers, cfg, use_compile)
    build = info["xent_build_info"]
    if device.type == "cuda" and isinstance(build, dict) and build.get("cuda_version") is None:
        print("WARNING: xent_ext was built without CUDA: on CUDA tensors 'xent' runs torch's own kernels")

    sampler = make_event_sampler(device)
    copy_nbytes = COPY_BUFFER_BYTES if device.type == "cuda" else 64 * 2**20
    copy_gbps, copy_samples = measure_copy_gbps(device, sampler, copy_nbytes)
    print(f"{'copy:':<16}device-to-device {copy_gbps:.1f} GB/s (read + write bytes; median of {COPY_SAMPLES})")
    print()

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "machine": info,
        "config": {"timing": asdict(cfg), "compile": use_compile, "modes": modes, "budget_s": args.budget},
        "bandwidth": {"copy_gbps": copy_gbps, "copy_bytes_counted": 2 * copy_nbytes, "samples_ms": copy_samples},
        "rows": [],
        "targets": None,
        "skipped": [],
    }

    def write_json() -> None:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)

    width = max(len(c.label) for c in cases)
    detail = gpu_detail_table(width)
    print("\n".join(detail.header()), flush=True)
    rows: list[GpuRow] = []
    notes: list[str] = []
    generator = torch.Generator(device=device).manual_seed(0)
    for case in cases:
        pending = list(modes)
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            report["skipped"] += [f"{case.label} {case.dtype} {m}" for m in pending]
            continue
        try:
            x = torch.randn(case.shape, dtype=DTYPES[case.dtype], device=device, generator=generator)
            target = torch.randint(0, case.num_classes, case.target_shape, device=device, generator=generator)
            copies = input_copies(case.logits_bytes + math.prod(case.target_shape) * TARGET_INDEX_BYTES, l2_bytes)
            inputs = RotatingInputs(x, target, copies)
            private = None
            if any(peers[p].fn is not None for p in PEERS_GRAD_IN_PLACE) and len(case.shape) == 2:
                private = RotatingInputs(x, target, copies)
            del x
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory: skip the shape)
            notes.append(f"{case.label} {case.dtype}: could not allocate inputs: {first_line(exc)}")
            report["skipped"] += [f"{case.label} {case.dtype} {m}" for m in pending]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for mode in modes:
            if args.budget is not None and time.perf_counter() - t0 > args.budget:
                report["skipped"].append(f"{case.label} {case.dtype} {mode}")
                continue
            try:
                row = gpu_bench_row(case, mode, inputs, private, peers, copy_gbps, use_compile, cfg, device)
            except Exception as exc:  # noqa: BLE001  (e.g. a broken CUDA context: note it, go on)
                notes.append(f"{case.label} {case.dtype} {mode}: row failed: {first_line(exc)}")
                report["skipped"].append(f"{case.label} {case.dtype} {mode}")
                write_json()
                continue
            rows.append(row)
            print("\n".join(gpu_detail_lines(row, detail)), flush=True)
            where = f"{case.label} {case.dtype} {mode}"
            notes += [f"{where}: {name}: {r.error}" for name, r in row.impls.items() if r.error]
            notes += [f"{where}: WARNING {m}" for m in gpu_loss_mismatches(row)]
            report["rows"].append(row.to_json())
            if case == TARGET_CASE and mode == TARGET_MODE:
                report["targets"] = target_verdict(row)
                print(format_targets(report["targets"]), flush=True)
            write_json()
        del inputs, private, target
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    print()
    print(f"summary (copy bandwidth {copy_gbps:.1f} GB/s)")
    summary = gpu_summary_table(width)
    print("\n".join(summary.header()))
    for row in rows:
        print(gpu_summary_line(row, summary))
    if report["targets"] is not None:
        print(format_targets(report["targets"]))
    else:
        print(f"targets: {TARGET_CASE.label} {TARGET_CASE.dtype} {TARGET_MODE} was not run")
    print()
    print(GPU_LEGEND)
    for p in peers.values():
        if p.fn is None and p.status != "not installed":
            notes.append(f"{p.name}: {p.status}")
    if report["skipped"]:
        why = f"--budget {args.budget:g} s reached, or failed above" if args.budget is not None else "failed above"
        notes.append(f"not run ({why}): {', '.join(report['skipped'])}")
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")
    report["notes"] = notes
    report["elapsed_s"] = time.perf_counter() - t0
    write_json()
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m xent_ext.bench",
        description="Benchmark xent_ext.cross_entropy vs torch eager and torch.compile "
        "(on CUDA also vs Liger Kernel and QuACK, when installed).",
    )
    p.add_argument(
        "--shapes",
        help='comma-separated logits shapes, e.g. "4096x32000,16x21x128x128:bf16" '
        "(NxC or NxCxd1x...; optional :fp32|:bf16|:fp16; default: the built-in set, "
        "which differs between cpu and cuda)",
    )
    p.add_argument(
        "--dtype",
        help="comma-separated dtypes (fp32,bf16,fp16); runs every shape at each, "
        "overriding the per-shape dtype",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads",
        help="comma-separated torch.set_num_threads values (default: 1 and all; --quick: all; "
        "ignored with cuda)",
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
        "--max-time",
        type=float,
        help="adaptive: cap on seconds per row and mode (default 10, --quick 4; cuda: 2, --quick 1)",
    )
    p.add_argument(
        "--order",
        choices=("auto", "interleaved", "blocks"),
        default="auto",
        help="cpu: how samples are taken: round-robin across implementations, or each in blocks of "
        "back-to-back calls, as a training loop runs (default auto: fwd interleaved, fwd+bwd blocks)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all results (with raw samples) as JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small subset (4096x32000 fp32/bf16, 65536x1000 fp32; all threads; no compile unless "
        "--compile; cuda: 8192x128256 bf16, 4096x32000 fp32, 65536x1000 fp32)",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="cuda: start no new row after this many seconds (rows left are listed as not run)",
    )
    # Runs the --device cuda harness on the CPU, to test the harness itself
    # where there is no GPU (timings and the copy bandwidth mean nothing there).
    p.add_argument("--cuda-harness-on-cpu", action="store_true", help=argparse.SUPPRESS)
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
    if device.type == "cuda" or args.cuda_harness_on_cpu:
        gpu_main(args, argv, device)
        return

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
        order=args.order,
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
    rows: list[Row] = []
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
                rows.append(row)
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
    print_targets(rows)
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")


if __name__ == "__main__":
    main()
