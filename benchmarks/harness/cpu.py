"""The CPU backend: machine bandwidth, the in-cache cost that says what bounds xent, the CPU row and run."""

from __future__ import annotations

import argparse
import gc
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import xent_ext

from .common import (
    DTYPES,
    Case,
    ImplResult,
    RotatingInputs,
    Row,
    Step,
    baseline_fns,
    first_line,
    make_step,
    parse_int_list,
    row_notes,
    selection,
    warm_up,
)
from .report import (
    TextTable,
    build_text,
    compile_text,
    fmt,
    fmt_mib,
    fmt_ms,
    machine_info,
    new_report,
    print_header_lines,
    print_notes,
    write_json,
)
from .targets import cpu_target_checks, print_targets
from .timing import (
    TimingConfig,
    blocked_samples,
    interleaved_samples,
    profiled_call,
    sample_order,
    timing_text,
    wall_clock,
)

IMPLS = ("xent", "eager", "compile")
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
DEFAULT_CPU_LLC_BYTES = 16 * 2**20  # last-level cache, when sysfs does not say
CACHE_SLICE_MAX_BYTES = 4 * 2**20  # logits of the larger slice ``measure_in_cache`` times


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


def measure_bandwidth(threads: int, cfg: TimingConfig) -> Bandwidth:
    """Copy and read bandwidth of a 256 MiB fp32 buffer (medians, GB/s)."""
    torch.set_num_threads(threads)
    src = torch.rand(BANDWIDTH_BUFFER_BYTES // 4)
    dst = torch.empty_like(src)
    steps: dict[str, Step] = {"copy": lambda: dst.copy_(src), "sum": src.sum, "amax": src.amax}
    for step in steps.values():  # warm-up (first touch of dst's pages)
        step()
    sampler = wall_clock()
    estimates = {name: sampler(step, 1) for name, step in steps.items()}
    samples, _ = interleaved_samples(steps, estimates, cfg, sampler)
    nbytes = src.numel() * src.element_size()
    med = {name: statistics.median(s) for name, s in samples.items()}
    return Bandwidth(
        threads, 2 * nbytes / med["copy"] / 1e9, nbytes / med["sum"] / 1e9, nbytes / med["amax"] / 1e9
    )


@dataclass
class CacheCost:
    """xent's cost with its inputs in cache (see ``measure_in_cache``)."""

    host_ms: float  # fixed cost per call: Python, dispatch, allocation, the final reduction
    ms_per_byte: float | None  # cost per byte of logits, read from cache: the computation;
    # None when the run's noise hid it (the larger slice did not take longer)
    slice_bytes: int  # logits bytes of the smaller of the two slices timed


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


def measure_in_cache(x: torch.Tensor, target: torch.Tensor, mode: str) -> CacheCost | None:
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
        steps[name] = make_step(xent_ext.cross_entropy, RotatingInputs(xs, ts, clone=False), mode)
        steps[name]()  # warm-up: brings the slice into cache
    sampler = wall_clock()
    estimates = {name: sampler(step, 1) for name, step in steps.items()}
    slice_cfg = TimingConfig(min_time_s=0.1, max_time_s=1.0, min_reps=9, fixed_reps=None)
    samples, _ = interleaved_samples(steps, estimates, slice_cfg, sampler)
    t_k, t_2k = (statistics.median(samples[name]) * 1e3 for name in ("k", "2k"))
    if t_2k <= t_k:
        # Noise hid the difference: no per-byte cost to report (a clamped one
        # would print an impossible in-cache bandwidth); the whole call is host.
        return CacheCost(host_ms=t_k, ms_per_byte=None, slice_bytes=k * unit_bytes)
    per_unit = (t_2k - t_k) / k
    return CacheCost(
        host_ms=max(t_k - per_unit * k, 0.0), ms_per_byte=per_unit / unit_bytes, slice_bytes=k * unit_bytes
    )


@dataclass
class CpuRow(Row):
    threads: int
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
        if self.cache is None or self.cache.ms_per_byte is None:
            return None
        return self.cache.ms_per_byte * self.case.logits_bytes

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
            "impls": {name: r.to_json() | {"skipped": r.skipped} for name, r in self.impls.items()},
        }


def bench_row(
    case: Case, inputs: RotatingInputs, mode: str, bandwidth: Bandwidth, use_compile: bool, cfg: TimingConfig
) -> CpuRow:
    """Warm up, check, measure memory of and time all implementations for one row."""
    results = {name: ImplResult() for name in IMPLS}
    threads = torch.get_num_threads()
    fns = baseline_fns(use_compile, results)
    steps = warm_up(fns, lambda _: inputs, mode, results)
    if not steps:
        return CpuRow(case, mode, results, threads, bandwidth)

    estimates = {}
    sampler = wall_clock()
    for name, step in steps.items():
        inputs.clear_grads()
        try:
            estimates[name], results[name].peak_extra_bytes = profiled_call(step, torch.device("cpu"))
        except Exception as exc:  # noqa: BLE001  (memory stats are best effort)
            results[name].error = f"memory measurement failed: {first_line(exc)}"
            estimates[name] = sampler(step, 1)

    order = sample_order(cfg, mode)
    timed = interleaved_samples if order == "interleaved" else blocked_samples
    samples, inner = timed(steps, estimates, cfg, sampler)
    for name in steps:
        results[name].samples_ms = [s * 1e3 for s in samples[name]]
        results[name].inner = inner[name]
    inputs.clear_grads()
    cache = measure_in_cache(inputs.xs[0], inputs.targets[0], mode) if "xent" in steps else None
    return CpuRow(case, mode, results, threads, bandwidth, order, cache)


def table(shape_width: int) -> TextTable:
    return TextTable(
        [
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
        ],
        left=4,
    )


def row_line(row: CpuRow, table: TextTable) -> str:
    """'n/a': the implementation failed (see the notes); '-': compile skipped."""
    xent, eager, comp = (row.impls[name] for name in IMPLS)
    skip = comp.skipped
    return table.line(
        [
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
    )


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


def cpu_machine_info(threads: Sequence[int]) -> dict[str, Any]:
    info = machine_info(torch.device("cpu"))
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = list(threads)
    try:
        info["xent_cpu_capability"] = xent_ext.cpu_capability()
    except Exception as exc:  # noqa: BLE001  (still benchmark without it)
        info["xent_cpu_capability"] = f"unavailable ({first_line(exc)})"
    return info


def print_header(info: dict[str, Any], cfg: TimingConfig, use_compile: bool) -> None:
    print_header_lines(
        [
            ("CPU", f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs)"),
            ("ISA", f"xent_ext {info['xent_cpu_capability']}, torch {info['torch_cpu_capability']}"),
            ("threads", ", ".join(str(t) for t in info["threads"])),
            ("torch", info["torch_version"]),
            ("xent_ext build", build_text(info)),
            ("timing", timing_text(cfg)),
            ("torch.compile", compile_text(use_compile)),
        ]
    )


def print_bandwidth(bw: Bandwidth) -> None:
    print(
        f"bandwidth @ {bw.threads} thread(s): copy {bw.copy_gbps:.1f} GB/s (read+write), "
        f"read {bw.read_gbps:.1f} GB/s (sum {bw.read_sum_gbps:.1f}, amax {bw.read_amax_gbps:.1f})"
    )


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """The CPU harness: every shape at every thread count and mode, one process, one run."""
    cases, modes, use_compile = selection(args, QUICK_SHAPES, DEFAULT_SHAPES)
    all_threads = torch.get_num_threads()
    if args.threads:
        threads = parse_int_list(args.threads)
    elif args.quick:
        threads = [all_threads]
    else:
        threads = sorted({1, all_threads})
    cfg = TimingConfig(
        min_time_s=args.min_time,
        max_time_s=args.max_time if args.max_time is not None else 4.0 if args.quick else 10.0,
        min_reps=3 if args.quick else 5,
        fixed_reps=args.reps,
        order=args.order,
    )

    info = cpu_machine_info(threads)
    print_header(info, cfg, use_compile)
    bandwidths = {t: measure_bandwidth(t, cfg) for t in threads}
    for bw in bandwidths.values():
        print_bandwidth(bw)
    print()

    report = new_report(argv, info, cfg, use_compile, modes)
    report["bandwidth"] = [asdict(bw) | {"read_gbps": bw.read_gbps} for bw in bandwidths.values()]
    report["rows"] = []
    tab = table(max(len(c.label) for c in cases))
    print("\n".join(tab.header()))
    notes: list[str] = []
    rows: list[CpuRow] = []
    generator = torch.Generator().manual_seed(0)
    for case in cases:
        x = torch.randn(case.shape, dtype=DTYPES[case.dtype], generator=generator)
        target = torch.randint(0, case.num_classes, case.target_shape, generator=generator)
        inputs = RotatingInputs(x, target, clone=False)
        for t in threads:
            torch.set_num_threads(t)
            for mode in modes:
                row = bench_row(case, inputs, mode, bandwidths[t], use_compile, cfg)
                print(row_line(row, tab), flush=True)
                notes += row_notes(row, f"{case.label} {case.dtype} thr={t} {mode}")
                report["rows"].append(row.to_json())
                rows.append(row)
                write_json(args.json, report)
        del x, target, inputs
        gc.collect()
    torch.set_num_threads(all_threads)

    print()
    print(LEGEND)
    print_targets(rows)
    print_notes(notes)
