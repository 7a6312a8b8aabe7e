"""How fast torch's matmuls are on this machine, per dtype and layout: ``python benchmarks/matmul_dtypes.py``.

A linear cross-entropy's time is mostly three products: the logits
``x @ W.T``, the input's gradient ``dlogits @ W`` and the weight's gradient
``dlogits.T @ x``. Every implementation in ``benchmarks/linear.py`` (ours,
torch's reference and chunked paths, ``x @ W.T`` + ``cross_entropy``) calls
torch's matmuls for them, so their speed in a dtype bounds what the linear
benchmark can show in that dtype. This script times each product (and the
other layouts the same product can be written in) for fp32 and bf16, and says
whether torch's oneDNN bf16 matmul is available on this CPU: where it is not,
torch falls back to a generic kernel whose speed depends on the operands'
layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the harness package
try:  # installed, or on PYTHONPATH (the harness reports its build)
    import xent_ext  # noqa: F401
except ModuleNotFoundError:  # built in place: the repository root
    sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from harness.report import machine_info  # noqa: E402


def gflops(fn: Callable[[], torch.Tensor], flops: float, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256x1024x32000", help="N x H x V (rows, hidden size, vocabulary)")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    n, h, v = (int(d) for d in args.shape.split("x"))
    info = machine_info(torch.device("cpu"))
    mkldnn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}; oneDNN bf16 matmul supported on this CPU: {mkldnn_bf16}")
    print(f"N x H x V = {n} x {h} x {v}; best of {args.reps}; GFLOP/s (2·N·H·V flops per product)")
    flops = 2.0 * n * h * v
    gen = torch.Generator().manual_seed(0)
    print("| product | written as | fp32 | bf16 |")
    print("|---|---|---:|---:|")
    base = {name: torch.randn(shape, generator=gen) for name, shape in (("x", (n, h)), ("w", (v, h)), ("g", (n, v)))}
    for product, forms in (
        ("logits", {"x @ W.T": lambda t: t["x"] @ t["w"].t()}),
        ("input grad", {"g @ W": lambda t: t["g"] @ t["w"], "g @ (W.T contiguous).T": lambda t: t["g"] @ t["wt"].t()}),
        ("weight grad", {"g.T @ x": lambda t: t["g"].t() @ t["x"]}),
    ):
        for form, fn in forms.items():
            row = []
            for dtype in (torch.float32, torch.bfloat16):
                t = {k: a.to(dtype) for k, a in base.items()}
                t["wt"] = t["w"].t().contiguous()
                row.append(f"{gflops(lambda: fn(t), flops, args.reps):.1f}")
            print(f"| {product} | `{form}` | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
