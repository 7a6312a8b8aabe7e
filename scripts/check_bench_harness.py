"""Self-check of the --device cuda benchmark harness (xent_ext/bench.py), runnable without a GPU.

    python scripts/check_bench_harness.py          # pure-Python checks + a tiny CPU dry run (~20 s)
    python scripts/check_bench_harness.py --fast   # pure-Python checks only

What it checks: byte counting, the number of rotated input copies, ratios,
bandwidth and memory figures, the "targets" verdict and its wording, table
alignment, and (without --fast) one end-to-end run of the CUDA harness on the
CPU (``--cuda-harness-on-cpu``: CUDA events and memory statistics replaced by
the wall clock and the profiler) whose JSON is checked for every key the
device run will be read by. It does not measure anything: timings on the CPU
mean nothing here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

try:  # installed (pip install -e .), or a stand-in on PYTHONPATH
    import xent_ext  # noqa: F401
except ModuleNotFoundError:  # built in place (setup.py build_ext --inplace): the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xent_ext import bench
from xent_ext.bench import (
    CUDA_IMPLS,
    Case,
    GpuImplResult,
    GpuRow,
    format_targets,
    gpu_detail_lines,
    gpu_detail_table,
    gpu_summary_line,
    gpu_summary_table,
    input_copies,
    min_bytes,
    parse_shape,
    target_verdict,
)

MiB = 2**20


def check_bytes() -> None:
    c = parse_shape("8192x128256:bf16")
    logits = 8192 * 128256 * 2
    assert c.logits_bytes == logits
    assert min_bytes(c, "fwd") == logits + 8192 * 8
    assert min_bytes(c, "fwd+bwd") == 3 * logits + 8192 * 8
    seg = parse_shape("16x21x128x128")
    assert seg.target_shape == (16, 128, 128)
    assert min_bytes(seg, "fwd") == 16 * 21 * 128 * 128 * 4 + 16 * 128 * 128 * 8
    one = parse_shape("1000")  # a (C) input has a 0-d target: one index
    assert min_bytes(one, "fwd") == 4000 + 8


def check_copies() -> None:
    l2 = 50 * MiB  # H100
    expect = {
        "8192x128256:bf16": 1,
        "4096x32000:bf16": 1,
        "65536x1000:fp32": 1,
        "1048576x10:fp32": 5,  # 40 MiB + 8 MiB targets: 4 x 50 / 48 -> 5
        "16x21x128x128:fp32": 9,  # 21 MiB + 2 MiB
        "8x256000:fp32": 26,  # 7.8 MiB
    }
    for spec, n in expect.items():
        c = parse_shape(spec)
        got = input_copies(c.logits_bytes + math.prod(c.target_shape) * 8, l2)
        assert got == n, (spec, got, n)
        if got > 1:
            assert got * (c.logits_bytes + math.prod(c.target_shape) * 8) >= 4 * l2 - 1
    assert input_copies(10, l2) == bench.MAX_INPUT_COPIES
    assert input_copies(2 * l2, l2) == 2  # exactly 2 x L2: still rotated
    assert input_copies(2 * l2 + 1, l2) == 1


def make_row(times: dict[str, float | None], peaks: dict[str, int | None], statuses: dict[str, str]) -> GpuRow:
    impls = {}
    for name in CUDA_IMPLS:
        r = GpuImplResult()
        t = times.get(name)
        if t is not None:
            r.samples_ms = [t * 1.1, t, t * 0.9]  # median t
            r.inner = 1
        r.peak_extra_bytes = peaks.get(name)
        if name in statuses:
            r.status = statuses[name]
        impls[name] = r
    return GpuRow(Case((8192, 128256), "bf16"), "fwd+bwd", impls, copy_gbps=3000.0)


def check_row_and_targets() -> None:
    logits = 8192 * 128256 * 2
    moved = 3 * logits + 8192 * 8
    t_xent = moved / (0.9 * 3000e9) * 1e3  # 90 % of copy bandwidth, in ms
    row = make_row(
        {"xent": t_xent, "eager": 4 * t_xent, "compile": 2 * t_xent, "liger": 1.25 * t_xent},
        {"xent": logits + 8192 * 8, "eager": 3 * logits, "compile": logits, "liger": 0},
        {"quack": "not installed"},
    )
    row.impls["xent"].loss, row.impls["eager"].loss = 11.7, 11.71
    assert abs(row.gbps("xent") - 2700.0) < 1e-6
    assert abs(row.pct_copy("xent") - 90.0) < 1e-9
    assert abs(row.ratio("eager", "xent") - 4.0) < 1e-12
    assert abs(row.ratio("compile", "liger") - 1.6) < 1e-12
    assert row.ratio("quack", "xent") is None
    assert abs(row.mem_grads("eager") - 3.0) < 1e-12
    v = target_verdict(row)
    assert v["pct_of_copy_met"] is True
    assert v["peers_ran"] == ["eager", "compile", "liger"]
    assert v["faster_than_all_peers"] is True
    assert v["memory_met"] is True  # 1.00003 gradients: within the slack for per-row statistics
    text = format_targets(v)
    assert "90.0% of copy bandwidth (>= 85%: yes)" in text, text
    assert "faster than every peer that ran: yes" in text and "liger 1.25x" in text, text
    assert "1.000 gradient buffers (<= 1: yes)" in text and "loss matches eager: yes" in text, text
    json.dumps(row.to_json())
    json.dumps(v)

    slow = make_row(
        {"xent": 2 * t_xent, "eager": 4 * t_xent, "liger": 1.5 * t_xent},
        {"xent": 2 * logits},
        {"compile": "failed: BackendCompilerFailed: boom", "quack": "not installed"},
    )
    slow.impls["xent"].loss, slow.impls["eager"].loss = 12.0, 11.7  # 2.6 % off: over bf16's 2e-2
    v = target_verdict(slow)
    assert v["loss_matches_eager"] is False
    assert v["pct_of_copy_met"] is False and v["faster_than_all_peers"] is False and v["memory_met"] is False
    text = format_targets(v)
    assert "(>= 85%: NO)" in text and "every peer that ran: NO" in text and "(<= 1: NO)" in text, text
    assert "loss matches eager: NO" in text, text

    none = make_row({"eager": 1.0}, {}, {"xent": "failed: RuntimeError: x"})
    text = format_targets(target_verdict(none))
    assert "xent did not run (failed: RuntimeError: x)" in text, text

    alone = make_row({"xent": t_xent}, {"xent": logits}, {})
    v = target_verdict(alone)
    assert v["faster_than_all_peers"] is None and "n/a (no peer ran)" in format_targets(v)

    # Tables: fixed-width columns, two spaces between them, on every line.
    detail = gpu_detail_table(len("8192x128256"))
    lines = detail.header() + gpu_detail_lines(row, detail) + gpu_detail_lines(slow, detail)
    gaps, offset = [], 0
    for _, width in detail.columns[:-1]:
        offset += width
        gaps.append(offset)
        offset += 2
    for line in lines:
        for g in gaps:
            assert len(line) <= g or line[g : g + 2] == "  ", (g, line)
    compile_line = next(ln for ln in gpu_detail_lines(slow, detail) if ln.split()[0] == "compile")
    assert compile_line.endswith("failed: BackendCompilerFailed: boom"), compile_line
    summary = gpu_summary_table(len("8192x128256"))
    head = summary.header()[0]
    sl = gpu_summary_line(slow, summary)
    assert len(sl) <= len(head) + 1, (sl, head)
    cells = sl.split()
    # xent us, GB/s, %copy, eager/x, comp/x, liger/x, quack/x, grads x, grads e
    assert cells[6:10] == ["2.00", "n/a", "0.75", "-"], cells


def check_cuda_branches_mocked() -> None:
    """The few lines that only run on a GPU, against stand-ins for torch.cuda's events and properties."""
    import time
    import types
    from unittest import mock

    import torch

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t = None

        def record(self) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            assert self.t is not None

        def elapsed_time(self, end: FakeEvent) -> float:
            return (end.t - self.t) * 1e3  # ms, like torch.cuda.Event

    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        multi_processor_count=132,
        major=9,
        minor=0,
        total_memory=80 * 2**30,
        L2_cache_size=50 * MiB,
    )
    with mock.patch.object(torch.cuda, "Event", FakeEvent):
        sample = bench.make_event_sampler(torch.device("cuda"))
        per_call = sample(lambda: time.sleep(0.002), 3)
        assert 0.0015 < per_call < 0.05, per_call
    with mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props):
        info = bench.gpu_machine_info(torch.device("cuda"), props.L2_cache_size)
        assert info["gpu"] == props.name and info["sm_count"] == 132 and info["compute_capability"] == "9.0"
        peers = {"liger": bench.Peer("liger", None, status="not installed")}
        cfg = bench.TimingConfig(0.3, 2.0, 10, None)
        bench.print_gpu_header(info, peers, cfg, True)  # must not raise
        json.dumps(info)


def check_dry_run() -> None:
    # A small stand-in for the target shape, so the "targets" line is exercised too.
    saved, bench.TARGET_CASE = bench.TARGET_CASE, Case((512, 1000), "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        bench.main(
            [
                "--cuda-harness-on-cpu",
                "--shapes",
                "512x1000,4x3x8x8,8x3000:bf16",
                "--no-compile",
                "--min-time",
                "0.02",
                "--max-time",
                "0.2",
                "--json",
                path,
            ]
        )
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    bench.TARGET_CASE = saved
    assert {"date", "argv", "machine", "config", "bandwidth", "rows", "targets", "skipped", "notes"} <= set(report)
    assert report["bandwidth"]["copy_gbps"] > 0
    assert len(report["rows"]) == 6
    for row in report["rows"]:
        assert set(row["impls"]) == set(CUDA_IMPLS)
        xent = row["impls"]["xent"]
        assert xent["status"] == "ok" and xent["median_ms"] > 0 and xent["samples_ms"], row
        assert xent["pct_of_copy"] > 0 and xent["peak_extra_gradients"] is not None
        assert row["impls"]["compile"]["status"] == "skipped: --no-compile"
        if len(row["shape"]) != 2:
            for peer in ("liger", "quack"):
                st = row["impls"][peer]["status"]
                assert st == "skipped: takes (N, C) logits only" or st == "not installed" or st.startswith(
                    "failed: import"
                ), st
    t = report["targets"]
    assert t["shape"] == [512, 1000] and t["mode"] == "fwd+bwd" and t["pct_of_copy"] > 0, t
    assert t["peers_ran"] == ["eager"] and t["memory_met"] in (True, False), t


def main() -> None:
    check_bytes()
    check_copies()
    check_row_and_targets()
    check_cuda_branches_mocked()
    print("pure-Python checks: ok")
    if "--fast" not in sys.argv:
        check_dry_run()
        print("CPU dry run of the CUDA harness: ok")


if __name__ == "__main__":
    main()
