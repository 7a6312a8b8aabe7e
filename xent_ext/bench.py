"""``python -m xent_ext.bench``: how much faster xent_ext is than torch's cross-entropy on this machine.

Times ``xent_ext.cross_entropy`` against ``torch.nn.functional.cross_entropy``
(torch eager) and ``torch.compile(F.cross_entropy)``, forward and
forward + backward, on a few LLM-sized inputs, and prints each one's median
time and the ratios torch time / xent_ext time (higher: xent_ext faster).

    python -m xent_ext.bench --quick                 # about a minute on the CPU
    python -m xent_ext.bench --device cuda --quick
    python -m xent_ext.bench --json out.json --plot ratios.png   # --plot needs matplotlib
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import xent_ext

IMPLS = ("xent", "eager", "compile")
MODES = {"fwd": ("fwd",), "fwdbwd": ("fwd+bwd",), "both": ("fwd", "fwd+bwd")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens x vocabulary) logits, as in a language model's loss.
SHAPES = {
    "cpu": ("4096x32000:fp32", "4096x32000:bf16", "4096x128256:bf16", "8192x50257:fp32", "65536x1000:fp32"),
    "cuda": ("8192x32000:bf16", "8192x128256:bf16", "8192x50257:fp32", "65536x1000:fp32", "4096x256000:bf16"),
}
QUICK_SHAPES = {
    "cpu": ("1024x32000:fp32", "1024x32000:bf16", "512x128256:bf16"),
    "cuda": ("8192x32000:bf16", "8192x128256:bf16", "4096x50257:fp32"),
}
MIN_SAMPLE_S = 5e-3  # faster calls are batched so one timed sample lasts about this long
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


@dataclass
class Timing:
    """One implementation on one row: 'ok' with samples (ms per call), else why not."""

    status: str = "ok"  # ok | off | failed
    reason: str = ""
    samples_ms: list[float] = field(default_factory=list)
    inner: int = 1  # calls per sample; each sample is their mean
    loss: float | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None


@dataclass
class Row:
    shape: tuple[int, ...]
    dtype: str
    mode: str
    impls: dict[str, Timing]

    def ratio(self, name: str) -> float | None:
        """``name``'s median time over xent's (> 1: xent faster)."""
        a, b = self.impls[name].median_ms, self.impls["xent"].median_ms
        return a / b if a and b else None

    def clear(self, name: str) -> bool:
        """Whether the samples tell the two apart: the middle halves of their samples do not overlap.

        Otherwise the ratio is within the run's noise and is printed with a '~'.
        """
        a, b = self.impls[name].samples_ms, self.impls["xent"].samples_ms
        if not a or not b:
            return False
        (a_lo, a_hi), (b_lo, b_hi) = middle_half(a), middle_half(b)
        return a_lo > b_hi or a_hi < b_lo

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "mode": self.mode,
            "ratios": {n: self.ratio(n) for n in IMPLS[1:]},
            "ratio_clear_of_noise": {n: self.clear(n) for n in IMPLS[1:]},
            "impls": {n: {"status": t.status, "reason": t.reason, "median_ms": t.median_ms,
                          "samples_ms": t.samples_ms, "inner": t.inner, "loss": t.loss}
                      for n, t in self.impls.items()},
        }


def middle_half(samples: list[float]) -> tuple[float, float]:
    """First and third quartiles (the one sample, twice, if there is one)."""
    if len(samples) == 1:
        return samples[0], samples[0]
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


def parse_shape(spec: str) -> tuple[tuple[int, ...], str]:
    dims, _, dtype = spec.strip().partition(":")
    dtype = dtype or "fp32"
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if dtype not in DTYPES or len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"bad shape {spec!r}: want NxC[:fp32|bf16|fp16], e.g. 4096x32000:bf16")
    return shape, dtype


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:160]


def time_row(shape: tuple[int, ...], dtype: str, mode: str, fns: dict[str, Callable],
             samples: int, device: torch.device) -> Row:
    """Warm up each implementation in ``fns`` once, then time it in blocks of back-to-back calls.

    Blocks, not interleaved calls: each fwd+bwd call allocates a logits-sized
    gradient, and how long that takes depends on what the previous call
    freed; back to back, every implementation sees what a training loop sees.
    Two rounds in opposite orders keep slow drift from favouring one of them.
    An implementation that raises is marked failed and the others go on.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device).to(DTYPES[dtype]).requires_grad_(mode != "fwd")
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen, device=device)
    impls = {name: Timing() for name in IMPLS}
    steps: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():

        def step(fn: Callable = fn) -> torch.Tensor:
            if mode == "fwd":
                return fn(x.detach(), target)
            x.grad = None  # like optimizer.zero_grad(set_to_none=True)
            loss = fn(x, target)
            loss.backward()
            return loss.detach()

        try:
            impls[name].loss = float(step())  # compiles 'compile'; float() waits for the device
            per_call: list[float] = []  # up to 3 calls; the fastest plans the calls per sample
            while not per_call or (len(per_call) < 3 and sum(per_call) < MIN_SAMPLE_S):
                start = time.perf_counter()
                step()
                sync()
                per_call.append(time.perf_counter() - start)
            impls[name].inner = max(1, math.ceil(MIN_SAMPLE_S / max(min(per_call), 1e-9)))
            steps[name] = step
        except Exception as exc:  # report it in the table and go on
            impls[name].status, impls[name].reason = "failed", first_line(exc)
    for rnd in range(2):
        for name in list(steps) if rnd == 0 else list(steps)[::-1]:
            t = impls[name]
            try:
                steps[name]()  # untimed: the first call after a switch pays for the switch
                for _ in range(samples // 2 + (samples % 2 if rnd == 0 else 0)):
                    sync()
                    start = time.perf_counter()
                    for _ in range(t.inner):
                        steps[name]()
                    sync()
                    t.samples_ms.append((time.perf_counter() - start) * 1e3 / t.inner)
            except Exception as exc:
                t.status, t.reason, t.samples_ms = "failed", first_line(exc), []
                del steps[name]
    return Row(shape, dtype, mode, impls)


def cell_ms(t: Timing) -> str:
    if t.median_ms is None:
        return t.status
    return f"{t.median_ms:.0f}" if t.median_ms >= 100 else f"{t.median_ms:.3g}"


def cell_ratio(row: Row, name: str) -> str:
    r = row.ratio(name)
    if r is None:
        other = row.impls[name]
        return other.status if other.status != "ok" else row.impls["xent"].status
    return f"{r:.2f}" if row.clear(name) else f"~{r:.2f}"


COLUMNS = (("shape", 12), ("dtype", 5), ("mode", 7), ("xent ms", 9), ("eager ms", 9), ("compile ms", 10),
           ("eager/xent", 10), ("compile/xent", 12))


def line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def row_line(row: Row) -> str:
    label = "x".join(map(str, row.shape))
    return line([label, row.dtype, row.mode, *(cell_ms(row.impls[n]) for n in IMPLS),
                 cell_ratio(row, "eager"), cell_ratio(row, "compile")])


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "xent_ext": xent_ext.__version__, "xent_ext_cpu_isa": xent_ext.cpu_capability(),
            "python": platform.python_version(), "device": device.type}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "xent_ext_cuda": xent_ext.build_info().get("cuda_version")}
    return info


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{'x'.join(map(str, r.shape))} {r.dtype} {r.mode}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 2))
    for k, name in enumerate(IMPLS[1:]):
        ys = [i + (k - 0.5) * 0.4 for i in range(len(rows))]
        bars = ax.barh(ys, [r.ratio(name) or 0.0 for r in rows], height=0.4, label=f"{name} time / xent_ext time")
        ax.bar_label(bars, [cell_ratio(r, name) for r in rows], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.margins(x=0.12)  # room for the labels
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("higher: xent_ext faster; '~': within the run's noise")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m xent_ext.bench",
        description="Time xent_ext.cross_entropy against torch eager and torch.compile(F.cross_entropy) "
        "on this machine; ratios are torch time / xent_ext time (higher: xent_ext faster).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="3 shapes, 5 samples: about a minute")
    p.add_argument("--shapes", help="comma-separated NxC[:fp32|bf16|fp16] (default: a set per device)")
    p.add_argument("--mode", choices=tuple(MODES), default="both", help="fwd, fwdbwd or both (default)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--samples", type=int, help="timed samples per implementation (default 10, --quick 5)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile(F.cross_entropy) (default: on)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.cases = [parse_shape(s) for s in (args.shapes.split(",") if args.shapes else
                                               (QUICK_SHAPES if args.quick else SHAPES)[args.device])]
    except ValueError as exc:
        p.error(str(exc))
    if args.samples is None:
        args.samples = 5 if args.quick else 10
    if args.samples < 1 or (args.threads is not None and args.threads < 1):
        p.error("--samples and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device)
    threads = info["threads"]
    where = info.get("gpu") or f"{info['cpu']}, {threads} thread{'s' if threads != 1 else ''}"
    print(f"xent_ext {info['xent_ext']} (CPU kernels: {info['xent_ext_cpu_isa']}) vs torch {info['torch']}"
          f"{' (CUDA ' + str(info['cuda']) + ')' if device.type == 'cuda' else ''} on {where}")
    print(f"median of {args.samples} samples per implementation; ratios: torch time / xent_ext time "
          f"(higher: xent_ext faster; '~': within this run's noise)\n")
    if device.type == "cuda" and not info["xent_ext_cuda"]:
        print("WARNING: this xent_ext was built without CUDA kernels (a CPU-only build)\n")
    print(line([n for n, _ in COLUMNS]))
    print(line(["-" * w for _, w in COLUMNS]))
    fns: dict[str, Callable] = {"xent": xent_ext.cross_entropy, "eager": F.cross_entropy}
    compile_off = None if args.compile else Timing(status="off", reason="--no-compile")
    rows, notes = [], []
    for shape, dtype in args.cases:
        label = f"{'x'.join(map(str, shape))} {dtype}"
        for mode in MODES[args.mode]:
            if compile_off is None:
                torch._dynamo.reset()  # a fresh compile per row: dynamo's recompile limit never kicks in
                try:
                    fns["compile"] = torch.compile(F.cross_entropy, dynamic=False)
                except Exception as exc:
                    notes.append(f"compile failed: {first_line(exc)}")
                    compile_off = Timing(status="failed", reason="see the notes")
            try:
                row = time_row(shape, dtype, mode, fns if compile_off is None else {k: fns[k] for k in IMPLS[:2]},
                               args.samples, device)
            except Exception as exc:  # e.g. out of memory for the inputs: skip the row
                notes.append(f"{label} {mode} not run: {first_line(exc)}")
                continue
            if compile_off is not None:
                row.impls["compile"] = dataclasses.replace(compile_off)
            rows.append(row)
            print(row_line(row), flush=True)
            for name, t in row.impls.items():
                if t.status == "failed" and t.reason != "see the notes":
                    notes.append(f"{name} failed on {label} {mode}: {t.reason}")
                    if name == "compile":  # it would fail again on every row: stop trying
                        compile_off = Timing(status="failed", reason="see the notes")
                ref, loss = row.impls["eager"].loss, t.loss
                if ref is not None and loss is not None and not abs(loss - ref) <= LOSS_RTOL[dtype] * abs(ref):
                    notes.append(f"WARNING {name}'s loss {loss:.6g} on {label} {mode} differs from torch's {ref:.6g}")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "samples": args.samples, "compile": args.compile,
                       "argv": list(sys.argv[1:] if argv is None else argv),
                       "rows": [r.to_json() for r in rows], "notes": notes}, f, indent=2)
    if args.plot:
        plot(rows, args.plot, f"xent_ext {info['xent_ext']} vs torch {info['torch']}, {where}")
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
