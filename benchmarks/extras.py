"""The LLM extras benchmark: ``python benchmarks/extras.py [--device cuda] ...`` from the repository root.

Times forward + backward of the loss with the LLM extras on (by default a
z-loss and a logit softcap) on LLM shapes, and the peak memory of each step:

* ``xent``: ``xent_ext.cross_entropy(..., z_loss=, softcap=, logit_scale=)``;
* ``xent-inplace``: the same with ``inplace_backward=True`` (the gradient is
  written into the logits' storage);
* ``eager``: the same definition written with torch ops (what a training
  script without a fused kernel runs: the map, ``F.cross_entropy``, a
  ``logsumexp`` for the z-loss);
* ``compile``: ``torch.compile`` of that definition (``--no-compile`` skips it);
* on CUDA, ``liger``: Liger Kernel's cross-entropy with the same options, when
  it is installed.

Every step starts from logits produced by an autograd op (``x.clone()`` of a
leaf that requires grad), as the output of a language model's head is: the
in-place gradient needs logits that are not a leaf, and every implementation
pays the same copy. Times are medians of interleaved samples; the ratios are
``eager`` (and ``compile``) time over ``xent`` time, measured in the same run.
Peak memory is the largest extra allocation during one step above what was
allocated before it (torch's allocator; on the CPU through the profiler).
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
CPU_SHAPES = ("4096x32000:fp32", "4096x32000:bf16", "4096x128256:bf16")
CUDA_SHAPES = ("8192x32000:bf16", "8192x128256:bf16", "16384x128256:bf16")


def definition(x: torch.Tensor, target: torch.Tensor, logit_scale: float, softcap: Optional[float],
               z_loss: float) -> torch.Tensor:
    """The extras' definition in torch ops ('mean' reduction, no ignored targets), in fp32."""
    z = x.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, dim=1).square().mean()
    return loss


def implementations(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    extras = {"logit_scale": args.logit_scale, "softcap": args.softcap, "z_loss": args.z_loss}
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "xent": lambda x, y: xent_ext.cross_entropy(x, y, **extras),
        "xent-inplace": lambda x, y: xent_ext.cross_entropy(x, y, inplace_backward=True, **extras),
        "eager": lambda x, y: definition(x, y, args.logit_scale, args.softcap, args.z_loss),
    }
    if args.compile:
        torch._dynamo.reset()
        compiled = torch.compile(definition, dynamic=False)
        fns["compile"] = lambda x, y: compiled(x, y, args.logit_scale, args.softcap, args.z_loss)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except ImportError:
            pass
        else:
            fns["liger"] = lambda x, y: liger_cross_entropy(
                x, y, lse_square_scale=args.z_loss, softcap=args.softcap)
    return fns


def run_shape(spec: str, args: argparse.Namespace, device: torch.device, cfg: TimingConfig) -> dict[str, Any]:
    dims, _, dtype_name = spec.partition(":")
    n, c = (int(v) for v in dims.split("x"))
    dtype = DTYPES[dtype_name or "fp32"]
    gen = torch.Generator().manual_seed(args.seed)
    leaf = (torch.randn(n, c, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(c, (n,), generator=gen).to(device)
    sync = make_sync(device)

    def step_of(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            leaf.grad = None
            loss = fn(leaf.clone(), target)
            loss.backward()
            return loss.detach()
        return step

    row: dict[str, Any] = {"shape": spec, "impls": {}}
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    estimates: dict[str, float] = {}
    for name, fn in implementations(args, device).items():
        step = step_of(fn)
        try:
            loss = float(step())  # warm-up (compiles 'compile')
            seconds, peak = profiled_call(step, device)
        except Exception as exc:  # noqa: BLE001  (report it and keep going)
            row["impls"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        steps[name] = step
        estimates[name] = seconds
        row["impls"][name] = {"loss": loss, "peak_bytes": peak}
    samples, inner = interleaved_samples(steps, estimates, cfg, wall_clock(sync))
    for name, s in samples.items():
        row["impls"][name]["median_ms"] = statistics.median(s) / inner[name] * 1e3
    leaf.grad = None
    return row


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shapes", default=None, help="comma-separated NxC[:fp32|bf16|fp16]")
    p.add_argument("--z-loss", type=float, default=1e-4)
    p.add_argument("--softcap", type=float, default=30.0, help="0 for none")
    p.add_argument("--logit-scale", type=float, default=1.0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--max-time", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.softcap = args.softcap or None
    device = torch.device(args.device)
    shapes = args.shapes.split(",") if args.shapes else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    cfg = TimingConfig(min_time_s=args.min_time, max_time_s=args.max_time, min_reps=5, fixed_reps=None)
    info = machine_info(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(f"machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, threads {torch.get_num_threads()}"
          + (f", {info['gpu']}" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}; xent_ext {xent_ext.__version__}; extras: z_loss={args.z_loss} "
          f"softcap={args.softcap} logit_scale={args.logit_scale}; fwd+bwd, 'mean'")
    report: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "machine": info, "rows": []}
    header = f"{'shape':<18} {'impl':<13} {'ms':>9} {'peak MiB':>9} {'time / xent':>12}"
    print(header)
    for spec in shapes:
        row = run_shape(spec, args, device, cfg)
        report["rows"].append(row)
        base = row["impls"].get("xent", {}).get("median_ms")
        for name, r in row["impls"].items():
            if "error" in r:
                print(f"{spec:<18} {name:<13} n/a ({r['error']})")
                continue
            ratio = f"{r['median_ms'] / base:.2f}x" if base else "n/a"
            print(f"{spec:<18} {name:<13} {fmt_ms(r['median_ms']):>9} {fmt_mib(r['peak_bytes']):>9} {ratio:>12}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
