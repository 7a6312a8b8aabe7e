"""Output for both devices: number formats, the text table, the header, machine info, notes, JSON."""

from __future__ import annotations

import json
import os
import sys
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

import xent_ext

from .common import first_line
from .timing import TimingConfig


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def fmt_us(ms: float | None) -> str:
    """A time given in ms, shown in microseconds with 3-4 significant digits."""
    if ms is None:
        return "n/a"
    us = ms * 1e3
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def fmt_mib(n: int | None) -> str:
    if n is None:
        return "n/a"
    mib = n / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"


class TextTable:
    """Fixed-width columns, two spaces apart; the first ``left`` columns are left-aligned, the last may overflow."""

    def __init__(self, columns: Sequence[tuple[str, int]], left: int) -> None:
        self.columns = list(columns)
        self.left = left

    def line(self, cells: Sequence[str]) -> str:
        out = []
        for i, (cell, (_, width)) in enumerate(zip(cells, self.columns, strict=True)):
            out.append(cell.ljust(width) if i < self.left else cell.rjust(width))
        return "  ".join(out).rstrip()

    def header(self) -> list[str]:
        return [self.line([n for n, _ in self.columns]), self.line(["-" * w for _, w in self.columns])]


def print_header_lines(lines: list[tuple[str, Any]]) -> None:
    """Prints 'key: value' header lines, aligned, skipping values of None."""
    for key, value in lines:
        if value is not None:
            print(f"{key + ':':<16}{value}")


def compile_text(use_compile: bool) -> str:
    return "on (dynamic=False)" if use_compile else "off"


def build_text(info: dict[str, Any]) -> str:
    build = info["xent_build_info"]
    return ", ".join(f"{k}={v}" for k, v in build.items()) if isinstance(build, dict) else str(build)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What both devices record about the machine; each backend adds its own fields."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "device": str(device),
    }
    try:
        info["xent_build_info"] = xent_ext.build_info()
    except Exception as exc:  # noqa: BLE001  (still benchmark without it)
        info["xent_build_info"] = f"unavailable ({first_line(exc)})"
    return info


def new_report(
    argv: Sequence[str] | None, info: dict[str, Any], cfg: TimingConfig, use_compile: bool, modes: list[str]
) -> dict[str, Any]:
    """The JSON report's common fields; each device adds ``bandwidth`` and the rest."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "machine": info,
        "config": {"timing": asdict(cfg), "compile": use_compile, "modes": modes},
    }


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """(Re)writes the report: called after every row, so an interrupted run keeps what it measured."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


def print_notes(notes: Sequence[str]) -> None:
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")
