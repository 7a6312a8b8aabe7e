"""The project's performance targets, and the verdict on each row that has them.

CPU (every row): fwd+bwd at least 5x faster than torch eager and 2x faster
than torch.compile on LLM shapes, 3x and 1.5x on the others; peak extra
memory at most one gradient-sized buffer plus O(N).  fwd on LLM shapes:
within 1.5x of the bandwidth floor (one read of the logits at the read
bandwidth).

CUDA (8192 x 128256 bf16 fwd+bwd only): at least 85 % of the device-to-device
copy bandwidth, faster than every peer that ran, peak extra memory at most
one gradient buffer, and the loss matching torch eager's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import Case, loss_mismatches
from .report import fmt, fmt_ms, fmt_us

if TYPE_CHECKING:  # the rows' own modules import this one
    from .cpu import CpuRow
    from .gpu import GpuRow

# ---- CPU ----

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


def cpu_target_checks(row: CpuRow) -> list[TargetCheck]:
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


def target_line(row: CpuRow) -> str | None:
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


def print_targets(rows: list[CpuRow]) -> None:
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


# ---- CUDA ----

TARGET_CASE = Case((8192, 128256), "bf16")
TARGET_MODE = "fwd+bwd"
TARGET_PCT_COPY = 85.0  # achieved bandwidth (2R+1W of the logits) as % of D2D copy
TARGET_MEM_GRADS = 1.0  # peak extra memory, in gradient buffers
# Allowance on top of one gradient for per-row statistics, the loss and
# allocator rounding (8192 rows x 8 B is 0.0000 gradients at the target shape).
MEM_GRADS_SLACK = 0.01


def target_verdict(row: GpuRow) -> dict[str, Any]:
    """The targets on ``row``: % of copy bandwidth, faster than every peer that ran, memory."""
    xent = row.impls["xent"]
    ran = [p for p in row.impls if p != "xent" and row.impls[p].median_ms is not None]
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
            else not any(m.startswith("xent ") for m in loss_mismatches(row))
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
