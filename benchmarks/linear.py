"""The linear cross-entropy benchmark: ``python benchmarks/linear.py [--device cuda] ...`` from the repository root.

Times forward + backward of ``cross_entropy(input @ weight.T, target)`` (a
language model's head and its loss, 'mean' reduction, no ignored targets) on
LLM shapes ``N x H x V`` (rows, hidden size, vocabulary), and the peak memory of
each step:

* ``xent-linear``: ``xent_ext.linear_cross_entropy`` (chunked, never the full logits);
* ``mm+xent``: ``x @ W.T`` then ``xent_ext.cross_entropy`` (full logits, fused loss);
* ``torch-ref``: ``torch.nn.functional.linear_cross_entropy`` (its reference path, options=None);
* ``torch-chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions()``
  (torch's own chunked implementation, its automatic policy);
* ``torch-compile``: ``torch.compile`` of the reference path (``--no-compile`` skips it);
* on CUDA, ``liger`` (Liger Kernel's fused linear cross-entropy) and ``cce``
  (Cut Cross-Entropy), when they are installed.

Both ``input`` and ``weight`` are leaves that require grad, so every step makes
both gradients. Times are medians of interleaved samples. Peak memory is the
largest extra allocation during one step above what was allocated before it
(torch's allocator; on the CPU through the profiler); "beyond grads" subtracts
the two gradients every implementation must return. Ratios: time over
``mm+xent``'s (target <= 1.1 for xent-linear), peak over ``torch-ref``'s
(target <= 1/8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the harness package
try:  # installed, or on PYTHONPATH
    import xent_ext
except ModuleNotFoundError:  # built in place: the repository root
    sys.path.insert(0, os.path.dirname(HERE))
    import xent_ext

import torch
import torch.nn.functional as F

from harness.report import fmt_mib, fmt_ms, machine_info  # noqa: E402
from harness.timing import TimingConfig, interleaved_samples, make_sync, profiled_call, wall_clock  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = ("2048x512x32000:fp32", "4096x1024x32000:bf16", "4096x2048x128256:bf16")
CUDA_SHAPES = ("8192x4096x32000:bf16", "8192x4096x128256:bf16", "16384x4096x128256:bf16")
BASELINE, REFERENCE = "mm+xent", "torch-ref"


def implementations(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "xent-linear": lambda x, w, y: xent_ext.linear_cross_entropy(x, w, y),
        BASELINE: lambda x, w, y: xent_ext.cross_entropy(x @ w.t(), y),
        REFERENCE: lambda x, w, y: F.linear_cross_entropy(x, w, y),
        "torch-chunked": lambda x, w, y: F.linear_cross_entropy(
            x, w, y, options=torch.nn.LinearCrossEntropyOptions()),
    }
    if args.compile:
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, w, y: F.linear_cross_entropy(x, w, y), dynamic=False)
        fns["torch-compile"] = compiled
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            pass
        else:
            fns["liger"] = lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y)
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
        except ImportError:
            pass
        else:
            fns["cce"] = lambda x, w, y: cce_linear_cross_entropy(x, w, y)
    return fns


def parse_shape(spec: str) -> tuple[int, int, int, torch.dtype]:
    dims, _, dtype_name = spec.partition(":")
    n, h, v = (int(d) for d in dims.split("x"))
    return n, h, v, DTYPES[dtype_name or "fp32"]


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for the run: MemAvailable on the CPU, free device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_shape(spec: str, args: argparse.Namespace, device: torch.device, cfg: TimingConfig) -> dict[str, Any]:
    n, h, v, dtype = parse_shape(spec)
    row: dict[str, Any] = {"shape": spec, "impls": {}}
    # A step of the full-logits implementations holds a few logits-sized
    # tensors, some in fp32: skip the shape where that may not fit (a CPU out of
    # memory ends the process rather than raising).
    logits_bytes = n * v * 4
    free = available_bytes(device)
    if free is not None and 6 * logits_bytes + 4 * v * h * 4 > free:
        row["skipped"] = f"needs about {fmt_mib(6 * logits_bytes + 4 * v * h * 4)} MiB, {fmt_mib(free)} MiB free"
        return row
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=gen) * h**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(v, (n,), generator=gen).to(device)
    sync = make_sync(device)
    grad_bytes = (x.numel() + w.numel()) * x.element_size()

    def step_of(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x.grad = None
            w.grad = None
            loss = fn(x, w, y)
            loss.backward()
            return loss.detach()
        return step

    steps: dict[str, Callable[[], torch.Tensor]] = {}
    estimates: dict[str, float] = {}
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = [s for s in implementations(args, device) if args.impls is None or s in args.impls.split(",")]
    fns = implementations(args, device)
    for name in names:
        step = step_of(fns[name])
        try:
            loss = float(step())  # warm-up (compiles 'torch-compile')
            seconds, peak = profiled_call(step, device)
        except Exception as exc:  # noqa: BLE001  (report it and keep going)
            row["impls"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        if name in (REFERENCE, "xent-linear"):
            grads[name] = (x.grad.float(), w.grad.float())
        steps[name] = step
        estimates[name] = seconds
        row["impls"][name] = {"loss": loss, "peak_bytes": peak, "peak_beyond_grads_bytes": peak - grad_bytes}
    if len(grads) == 2:
        # How far xent-linear's gradients are from torch's reference path (relative to their largest entry).
        row["grad_rel_diff_vs_torch_ref"] = [
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(grads["xent-linear"], grads[REFERENCE])
        ]
    del grads
    samples, inner = interleaved_samples(steps, estimates, cfg, wall_clock(sync))
    for name, s in samples.items():
        row["impls"][name]["median_ms"] = statistics.median(s) / inner[name] * 1e3
        row["impls"][name]["samples"] = len(s)
    x.grad = w.grad = None
    return row


def table(report: dict[str, Any]) -> list[str]:
    """The results as a Markdown table."""
    lines = [
        "| shape (N x H x V) | impl | ms | peak MiB | beyond grads MiB | time / mm+xent | peak / torch-ref |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['shape']} | (skipped: {row['skipped']}) | | | | | |")
            continue
        base = row["impls"].get(BASELINE, {}).get("median_ms")
        ref_peak = row["impls"].get(REFERENCE, {}).get("peak_bytes")
        for name, r in row["impls"].items():
            if "error" in r:
                lines.append(f"| {row['shape']} | {name} | n/a ({r['error']}) | | | | |")
                continue
            t = f"{r['median_ms'] / base:.2f}x" if base and "median_ms" in r else "n/a"
            p = f"{r['peak_bytes'] / ref_peak:.3f}" if ref_peak else "n/a"
            lines.append(f"| {row['shape']} | {name} | {fmt_ms(r.get('median_ms'))} | {fmt_mib(r['peak_bytes'])} "
                         f"| {fmt_mib(r['peak_beyond_grads_bytes'])} | {t} | {p} |")
    return lines


def load_average() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def markdown(report: dict[str, Any]) -> list[str]:
    """The report as Markdown: how it was run, on what, and the table."""
    info = report["machine"]
    machine = f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, {info['threads']} torch threads"
    if "gpu" in info:
        machine += f", {info['gpu']}"
    lines = [
        "# Linear cross-entropy: forward + backward",
        "",
        f"- command: `python benchmarks/linear.py {' '.join(report['argv'])}`",
        f"- machine: {machine}",
        f"- torch {info['torch_version']}",
        f"- load average (1, 5, 15 min) at start {report.get('load_average_start')}, "
        f"at end {report.get('load_average_end')}",
        "- ms: median of interleaved samples; peak: largest extra allocation during one step (torch's "
        "allocator), 'beyond grads' without the input's and the weight's gradients",
        "",
    ]
    lines += table(report)
    for row in report["rows"]:
        if "grad_rel_diff_vs_torch_ref" in row:
            gx, gw = row["grad_rel_diff_vs_torch_ref"]
            lines.append("")
            lines.append(f"{row['shape']}: xent-linear vs torch-ref gradients, max |diff| / max |ref|: "
                         f"input {gx:.2e}, weight {gw:.2e}")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shapes", default=None, help="comma-separated NxHxV[:fp32|bf16|fp16]")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--max-time", type=float, default=60.0)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the results here as a Markdown report")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes.split(",") if args.shapes else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    cfg = TimingConfig(min_time_s=args.min_time, max_time_s=args.max_time, min_reps=args.min_reps, fixed_reps=None)
    info = machine_info(device)
    info["threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(f"machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, threads {info['threads']}"
          + (f", {info['gpu']}" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}; xent_ext {xent_ext.__version__}; fwd+bwd of input and weight, 'mean'")
    report: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "machine": info, "rows": [],
                              "load_average_start": load_average()}
    for spec in shapes:
        row = run_shape(spec, args, device, cfg)
        report["rows"].append(row)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        print("\n".join(table({"rows": [row]})[2 if len(report["rows"]) > 1 else 0:]), flush=True)
        if "grad_rel_diff_vs_torch_ref" in row:
            gx, gw = row["grad_rel_diff_vs_torch_ref"]
            print(f"  xent-linear vs torch-ref gradients: input {gx:.2e}, weight {gw:.2e} (max |diff| / max |ref|)")
    report["load_average_end"] = load_average()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(markdown(report)) + "\n")


if __name__ == "__main__":
    main()
