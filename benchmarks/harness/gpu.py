"""The CUDA backend (--device cuda): CUDA-event timing, L2-proof inputs, copy bandwidth, peers, the run.

On a GPU the harness differs from the CPU one in what it compares and how it
times:

* peers: xent, torch eager, torch.compile, and, when importable, Liger
  Kernel's and QuACK's cross-entropy (a missing peer is "not installed", a
  peer that raises is "failed: <reason>", and the run goes on);
* time: CUDA events around a batch of calls (median over interleaved
  samples); inputs small enough to stay in L2 are rotated through several
  identical copies so that no call reads its logits from L2;
* bandwidth: the minimum bytes (fwd: logits + targets once; fwd+bwd: 2 reads
  + 1 write of the logits + targets once) over the time, as a % of a
  device-to-device copy measured at start (bytes read + written);
* memory: peak extra bytes of one call, also in units of one gradient
  buffer (= the logits' bytes).

``--cuda-harness-on-cpu`` runs all of it on the CPU (wall clock, profiler) to
test the harness where there is no GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .common import (
    DTYPES,
    Case,
    ImplResult,
    RotatingInputs,
    Row,
    Step,
    baseline_fns,
    first_line,
    row_notes,
    selection,
    warm_up,
)
from .gpu_report import detail_lines, detail_table, gpu_machine_info, print_gpu_header, print_summary
from .peers import CUDA_IMPLS, PEERS_2D_ONLY, PEERS_GRAD_IN_PLACE, Peer, load_peers
from .report import new_report, print_notes, write_json
from .targets import TARGET_CASE, TARGET_MODE, format_targets, target_verdict
from .timing import Sampler, TimingConfig, interleaved_samples, profiled_call, wall_clock

DEFAULT_SHAPES = (
    "8192x128256:bf16",  # LLaMA-3 vocabulary: the shape the performance targets are set on
    "4096x32000:bf16",
    "4096x32000:fp32",
    "8192x50257:fp32",
    "65536x1000:fp32",
    "1048576x10:fp32",
    "16x21x128x128:fp32",
    "8x256000:fp32",
)
QUICK_SHAPES = ("8192x128256:bf16", "4096x32000:fp32", "65536x1000:fp32")

COPY_BUFFER_BYTES = 2**30  # D2D copy bandwidth: 1 GiB -> 1 GiB (2 GiB counted)
COPY_SAMPLES = 20
DEFAULT_L2_BYTES = 64 * 2**20  # when the device does not report its L2 size
MAX_INPUT_COPIES = 64
WARM_S = 0.02  # per implementation, before its repetitions are planned


def min_bytes(case: Case, mode: str) -> int:
    """Fewest bytes one call must move through device memory.

    fwd: one read of the logits and of the targets.  fwd+bwd: two reads of the
    logits and one write of the gradient (exact autograd semantics: forward,
    then backward), plus one read of the targets.
    """
    return case.logits_bytes * (1 if mode == "fwd" else 3) + case.target_bytes


def input_copies(set_bytes: int, l2_bytes: int) -> int:
    """Identical copies of (logits, targets) to cycle through, so no call finds its inputs in L2.

    One copy when the inputs are over twice the L2; otherwise enough copies to
    span four times the L2 (at least 2, at most ``MAX_INPUT_COPIES``).
    """
    if set_bytes > 2 * l2_bytes:
        return 1
    return min(MAX_INPUT_COPIES, max(2, math.ceil(4 * l2_bytes / max(set_bytes, 1))))


def make_event_sampler(device: torch.device) -> Sampler:
    """Seconds per call of ``inner`` back-to-back calls: CUDA events on a GPU, wall clock otherwise."""
    if device.type != "cuda":
        return wall_clock()

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


def measure_copy_gbps(device: torch.device, sampler: Sampler, nbytes: int = COPY_BUFFER_BYTES) -> tuple[float, list[float]]:
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
class GpuRow(Row):
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

    def mem_grads(self, name: str) -> float | None:
        """Peak extra memory in gradient buffers (one gradient = the logits' bytes)."""
        peak = self.impls[name].peak_extra_bytes
        return peak / self.case.logits_bytes if peak is not None else None

    def to_json(self) -> dict[str, Any]:
        impls = {
            name: {"status": r.status}
            | r.to_json()
            | {
                "gbps": self.gbps(name),
                "pct_of_copy": self.pct_copy(name),
                "speedup_vs_eager": self.ratio("eager", name),
                "speedup_vs_compile": self.ratio("compile", name),
                "peak_extra_gradients": self.mem_grads(name),
            }
            for name, r in self.impls.items()
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
    results = {name: ImplResult() for name in CUDA_IMPLS}
    fns = baseline_fns(use_compile, results)
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

    steps = warm_up(fns, inputs_of, mode, results, settle)
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
            samples, inner = interleaved_samples(guarded_steps, estimates, cfg, sampler)
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


def _free_cuda(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def run(args: argparse.Namespace, argv: Sequence[str] | None, device: torch.device) -> None:
    """``--device cuda``: every implementation side by side, one process, one run."""
    t0 = time.perf_counter()
    cases, modes, use_compile = selection(args, QUICK_SHAPES, DEFAULT_SHAPES)
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
    peers = load_peers()
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

    report = new_report(argv, info, cfg, use_compile, modes)
    report["config"]["budget_s"] = args.budget
    report |= {
        "bandwidth": {"copy_gbps": copy_gbps, "copy_bytes_counted": 2 * copy_nbytes, "samples_ms": copy_samples},
        "rows": [],
        "targets": None,
        "skipped": [],
    }

    def over_budget() -> bool:
        return args.budget is not None and time.perf_counter() - t0 > args.budget

    width = max(len(c.label) for c in cases)
    detail = detail_table(width)
    print("\n".join(detail.header()), flush=True)
    rows: list[GpuRow] = []
    notes: list[str] = []
    generator = torch.Generator(device=device).manual_seed(0)
    for case in cases:
        if over_budget():
            report["skipped"] += [f"{case.label} {case.dtype} {m}" for m in modes]
            continue
        try:
            x = torch.randn(case.shape, dtype=DTYPES[case.dtype], device=device, generator=generator)
            target = torch.randint(0, case.num_classes, case.target_shape, device=device, generator=generator)
            copies = input_copies(case.logits_bytes + case.target_bytes, l2_bytes)
            inputs = RotatingInputs(x, target, copies)
            private = None
            if any(peers[p].fn is not None for p in PEERS_GRAD_IN_PLACE) and len(case.shape) == 2:
                private = RotatingInputs(x, target, copies)
            del x
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory: skip the shape)
            notes.append(f"{case.label} {case.dtype}: could not allocate inputs: {first_line(exc)}")
            report["skipped"] += [f"{case.label} {case.dtype} {m}" for m in modes]
            _free_cuda(device)
            continue
        for mode in modes:
            where = f"{case.label} {case.dtype} {mode}"
            if over_budget():
                report["skipped"].append(where)
                continue
            try:
                row = gpu_bench_row(case, mode, inputs, private, peers, copy_gbps, use_compile, cfg, device)
            except Exception as exc:  # noqa: BLE001  (e.g. a broken CUDA context: note it, go on)
                notes.append(f"{where}: row failed: {first_line(exc)}")
                report["skipped"].append(where)
                write_json(args.json, report)
                continue
            rows.append(row)
            print("\n".join(detail_lines(row, detail)), flush=True)
            notes += row_notes(row, where)
            report["rows"].append(row.to_json())
            if case == TARGET_CASE and mode == TARGET_MODE:
                report["targets"] = target_verdict(row)
                print(format_targets(report["targets"]), flush=True)
            write_json(args.json, report)
        del inputs, private, target
        _free_cuda(device)

    print_summary(rows, width, copy_gbps, report["targets"])
    for p in peers.values():
        if p.fn is None and p.status != "not installed":
            notes.append(f"{p.name}: {p.status}")
    if report["skipped"]:
        why = f"--budget {args.budget:g} s reached, or failed above" if args.budget is not None else "failed above"
        notes.append(f"not run ({why}): {', '.join(report['skipped'])}")
    print_notes(notes)
    report["notes"] = notes
    report["elapsed_s"] = time.perf_counter() - t0
    write_json(args.json, report)
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")
