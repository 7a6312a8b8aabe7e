"""Command line of the benchmark harness (``python benchmarks/run.py``): parse, then run one device's harness."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from .common import parse_int_list


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark xent_ext.cross_entropy vs torch eager and torch.compile "
        "(on CUDA also vs Liger Kernel and QuACK, when installed), and check the project's targets.",
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
        from . import gpu

        gpu.run(args, argv, device)
    else:
        from . import cpu

        cpu.run(args, argv)
