"""Timing (how many samples, in which order) and the memory of one call, for both devices."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from .common import Step

# Seconds per call of ``inner`` back-to-back calls of a step.
Sampler = Callable[[Step, int], float]

MIN_SAMPLE_S = 2e-3  # calls faster than this are batched into one timed sample
BLOCK_ROUNDS = 2  # blocks per implementation in "blocks" order


@dataclass(frozen=True)
class TimingConfig:
    """How many repetitions to run (see ``plan_repetitions``)."""

    min_time_s: float  # each implementation is timed for at least this long ...
    max_time_s: float  # ... unless all implementations together would exceed this
    min_reps: int  # never fewer timed samples than this
    fixed_reps: int | None  # --reps: exact number of samples, no adaptation
    order: str = "auto"  # CPU: "interleaved", "blocks", or "auto" (see ``sample_order``)


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


def wall_clock(sync: Callable[[], None] = lambda: None) -> Sampler:
    """The wall-clock sampler: ``time_sample`` with ``sync`` before and after."""
    return lambda step, inner: time_sample(step, inner, sync)


def plan_repetitions(estimates: dict[str, float], cfg: TimingConfig) -> tuple[int, dict[str, int]]:
    """Pick the number of samples and the calls per sample.

    Calls shorter than ``MIN_SAMPLE_S`` are batched so one sample lasts about
    that long.  All implementations get the same number of samples ``n``:
    enough for the fastest to run ``min_time_s`` in total, capped so the whole
    row takes at most ``max_time_s``, but never fewer than ``min_reps``.
    """
    inner = {name: max(1, math.ceil(MIN_SAMPLE_S / max(t, 1e-9))) for name, t in estimates.items()}
    if cfg.fixed_reps is not None:
        return cfg.fixed_reps, inner
    sample_s = [inner[name] * t for name, t in estimates.items()]
    n = min(math.ceil(cfg.min_time_s / min(sample_s)), math.floor(cfg.max_time_s / sum(sample_s)))
    return max(cfg.min_reps, n), inner


def interleaved_samples(
    steps: dict[str, Step], estimates: dict[str, float], cfg: TimingConfig, sampler: Sampler
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
            samples[name].append(sampler(steps[name], inner[name]))
    return samples, inner


def blocked_samples(
    steps: dict[str, Step],
    estimates: dict[str, float],
    cfg: TimingConfig,
    sampler: Sampler,
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
                samples[name].append(sampler(steps[name], inner[name]))
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


def timing_text(cfg: TimingConfig, clock: str = "") -> str:
    """The header's timing line (clock: e.g. 'CUDA events, ')."""
    order = {
        "auto": "interleaved samples (fwd), blocks of back-to-back calls (fwd+bwd)",
        "interleaved": "interleaved samples",
        "blocks": "blocks of back-to-back calls",
    }[cfg.order]
    if cfg.fixed_reps is not None:
        return f"{clock}median of {cfg.fixed_reps} samples (--reps), {order}"
    return (f"{clock}median of {order}; >= {cfg.min_time_s:g} s per impl, "
            f"<= {cfg.max_time_s:g} s per row, >= {cfg.min_reps} samples")


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
