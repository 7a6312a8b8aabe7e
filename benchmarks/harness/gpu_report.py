"""The CUDA harness's output: its header, per-implementation and summary tables, legend."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import torch

import xent_ext

from .peers import CUDA_IMPLS, CUDA_PEERS, Peer, dist_version
from .report import (
    TextTable,
    build_text,
    compile_text,
    fmt,
    fmt_mib,
    fmt_us,
    machine_info,
    print_header_lines,
)
from .targets import TARGET_CASE, TARGET_MODE, format_targets
from .timing import TimingConfig, timing_text

if TYPE_CHECKING:
    from .gpu import GpuRow

SHORT_NAMES = {"xent": "xent", "eager": "eager", "compile": "comp", "liger": "liger", "quack": "quack"}

LEGEND = """\
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


def detail_table(shape_width: int) -> TextTable:
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


def detail_lines(row: GpuRow, table: TextTable) -> list[str]:
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


def summary_table(shape_width: int) -> TextTable:
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


def summary_line(row: GpuRow, table: TextTable) -> str:
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


def print_summary(rows: list[GpuRow], width: int, copy_gbps: float, targets: dict[str, Any] | None) -> None:
    """After the rows: the summary table, the targets line, the legend."""
    print()
    print(f"summary (copy bandwidth {copy_gbps:.1f} GB/s)")
    summary = summary_table(width)
    print("\n".join(summary.header()))
    for row in rows:
        print(summary_line(row, summary))
    if targets is not None:
        print(format_targets(targets))
    else:
        print(f"targets: {TARGET_CASE.label} {TARGET_CASE.dtype} {TARGET_MODE} was not run")
    print()
    print(LEGEND)


def gpu_machine_info(device: torch.device, l2_bytes: int) -> dict[str, Any]:
    info = machine_info(device)
    info |= {
        "cuda_version": torch.version.cuda,
        "l2_bytes": l2_bytes,
        "triton_version": dist_version("triton", "pytorch-triton"),
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
    check = getattr(xent_ext, "cuda_target_check", None)  # on by default: one host sync per forward
    try:
        info["xent_cuda_target_check"] = None if check is None else bool(check())
    except Exception:  # noqa: BLE001
        info["xent_cuda_target_check"] = None
    return info


def print_gpu_header(info: dict[str, Any], peers: dict[str, Peer], cfg: TimingConfig, use_compile: bool) -> None:
    gpu = info["gpu"]
    if "sm_count" in info:
        gpu += (
            f" ({info['sm_count']} SMs, compute capability {info['compute_capability']}, "
            f"{info['gpu_memory_bytes'] / 2**30:.0f} GiB, L2 {info['l2_bytes'] / 2**20:.0f} MiB)"
        )
    peer_text = ", ".join(
        f"{p.name} {p.version or '(version unknown)'}" if p.fn else f"{p.name}: {p.status}" for p in peers.values()
    )
    check = {True: "on", False: "off", None: "n/a"}[info.get("xent_cuda_target_check")]
    print_header_lines(
        [
            ("GPU", gpu),
            ("CPU", f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs)"),
            ("torch", f"{info['torch_version']} (CUDA {info['cuda_version']}), triton {info['triton_version']}"),
            ("xent_ext build", build_text(info)),
            ("xent_ext", f"CUDA target check {check} (xent_ext.cuda_target_check())"),
            ("peers", peer_text),
            ("timing", timing_text(cfg, "CUDA events, ")),
            ("torch.compile", compile_text(use_compile)),
        ]
    )
