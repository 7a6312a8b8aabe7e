"""The project's benchmark harness (``benchmarks/run.py``, ``benchmarks/harness/``), checked without a GPU.

No test here asserts a time: the harness runs on tiny shapes with two
samples, and only its plumbing is checked: byte counting, input copies,
sample orders, ratios, bandwidth and memory figures, the in-cache model, the
targets' verdicts and wording, table alignment, the CUDA-only lines against
stand-ins for CUDA events, and the JSON of a CPU run and of a dry run of the
CUDA harness on the CPU (``--cuda-harness-on-cpu``).

The harness is not part of the installed package: it is imported from the
``benchmarks/`` folder beside ``tests/``, and these tests skip without it.
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "harness").is_dir():
    pytest.skip(f"no benchmark harness at {BENCHMARKS / 'harness'} (it lives in the source tree)",
                allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))

from harness import cli, cpu, gpu, gpu_report, targets, timing  # noqa: E402
from harness.common import Case, ImplResult, parse_shape  # noqa: E402
from harness.peers import CUDA_IMPLS, Peer  # noqa: E402

MiB = 2**20


# ---- both devices ----


@pytest.mark.parametrize("order", ["interleaved", "blocks"])
def test_sample_orders(order):
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    cfg = timing.TimingConfig(min_time_s=0, max_time_s=1, min_reps=4, fixed_reps=4, order=order)
    sampler = timing.interleaved_samples if order == "interleaved" else timing.blocked_samples
    samples, inner = sampler(steps, {name: 1.0 for name in steps}, cfg, timing.wall_clock())
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    if order == "interleaved":
        assert calls[:6] == list("abcbca")
    else:  # two rounds in opposite orders, each block after one untimed call
        assert "".join(calls) == "aaa" "bbb" "ccc" "ccc" "bbb" "aaa"
    assert timing.sample_order(timing.TimingConfig(0, 1, 1, None), "fwd") == "interleaved"
    assert timing.sample_order(timing.TimingConfig(0, 1, 1, None), "fwd+bwd") == "blocks"


def test_cli_flags():
    args = cli.parse_args([])
    assert (args.device, args.mode, args.order, args.min_time, args.compile) == ("cpu", "both", "auto", 0.3, None)
    with pytest.raises(SystemExit):
        cli.parse_args(["--reps", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--threads", "1,0"])


# ---- CPU ----


def test_cpu_run_writes_every_field(tmp_path, capsys):
    path = tmp_path / "out.json"
    cli.main(["--shapes", "512x10,2x3x8x8:bf16", "--threads", "1", "--reps", "2", "--no-compile",
              "--json", str(path)])
    out = capsys.readouterr().out
    assert "targets" in out and "bound" in out
    report = json.loads(path.read_text())
    assert set(report) == {"date", "argv", "machine", "config", "bandwidth", "rows"}
    rows = report["rows"]
    assert [(r["shape"], r["mode"]) for r in rows] == [
        ([512, 10], "fwd"), ([512, 10], "fwd+bwd"), ([2, 3, 8, 8], "fwd"), ([2, 3, 8, 8], "fwd+bwd")]
    for r in rows:
        assert r["order"] == ("interleaved" if r["mode"] == "fwd" else "blocks")
        assert r["bound"] in ("memory", "compute", "host", "other")
        assert r["cache"]["slice_bytes"] > 0
        # The in-cache cost, unless the run's noise hid it (then no figure at all).
        assert (r["compute_ms"] > 0) if r["cache"]["ms_per_byte"] is not None else r["compute_ms"] is None
        assert len(r["impls"]["xent"]["samples_ms"]) == 2
        assert r["impls"]["compile"]["skipped"]
        assert set(r["impls"]["xent"]) == {"samples_ms", "inner", "loss", "peak_extra_bytes", "skipped", "error",
                                           "median_ms", "min_ms"}
    # fwd+bwd rows carry the three fwd+bwd targets; the small fwd rows none.
    assert [t["name"] for t in rows[1]["targets"]] == ["vs eager", "vs compile", "memory"]
    assert rows[0]["targets"] == []


def _row(shape, mode, xent_ms, eager_ms, compile_ms, peak_bytes):
    case = Case(shape, "fp32")
    impls = {"xent": ImplResult(samples_ms=[xent_ms], peak_extra_bytes=peak_bytes),
             "eager": ImplResult(samples_ms=[eager_ms]), "compile": ImplResult(samples_ms=[compile_ms])}
    bw = cpu.Bandwidth(1, copy_gbps=20.0, read_sum_gbps=20.0, read_amax_gbps=10.0)
    return cpu.CpuRow(case, mode, impls, threads=1, bandwidth=bw, order="blocks",
                      cache=cpu.CacheCost(host_ms=0.01, ms_per_byte=1e-7, slice_bytes=1024))


def test_cpu_target_verdicts():
    llm = (4096, 32000)
    b = 4096 * 32000 * 4
    ok = targets.cpu_target_checks(_row(llm, "fwd+bwd", 100.0, 500.0, 200.0, b))
    assert [c.met for c in ok] == [True, True, True]
    # An LLM shape needs 5x / 2x; 4.9x / 1.9x and a second gradient buffer miss.
    missed = targets.cpu_target_checks(_row(llm, "fwd+bwd", 100.0, 490.0, 190.0, 2 * b))
    assert [c.met for c in missed] == [False, False, False]
    # Other shapes need 3x / 1.5x.
    other = targets.cpu_target_checks(_row((65536, 1000), "fwd+bwd", 100.0, 310.0, 160.0, 65536 * 1000 * 4))
    assert [c.met for c in other] == [True, True, True]
    assert targets.shape_class(Case((8, 256000), "fp32")) == "other"
    assert targets.shape_class(Case((16, 21, 128, 128), "fp32")) == "other"
    # The forward of an LLM shape: within 1.5x of the floor (1 read at 20 GB/s).
    floor_ms = b / 20e9 * 1e3
    fwd_ok, = targets.cpu_target_checks(_row(llm, "fwd", 1.4 * floor_ms, 1.0, 1.0, 0))
    fwd_miss, = targets.cpu_target_checks(_row(llm, "fwd", 1.6 * floor_ms, 1.0, 1.0, 0))
    assert fwd_ok.met and not fwd_miss.met
    line = targets.target_line(_row(llm, "fwd", 1.6 * floor_ms, 1.0, 1.0, 0))
    assert "MISSED" in line and "why: " in line


def test_cpu_bound():
    # _row's cache: 1e-7 ms per byte (524 MB: 52 ms of compute), 0.01 ms per call.
    shape = (4096, 32000)
    compute_ms = 4096 * 32000 * 4 * 1e-7
    assert _row(shape, "fwd", compute_ms * 1.1, 1.0, 1.0, 0).bound == "compute"
    # Far above every bound: something else (page faults, a disturbed sample).
    assert _row(shape, "fwd", compute_ms * 3, 1.0, 1.0, 0).bound == "other"
    fast = _row(shape, "fwd", 30.0, 1.0, 1.0, 0)
    fast.cache = cpu.CacheCost(host_ms=0.01, ms_per_byte=1e-12, slice_bytes=1024)
    assert fast.bound == "memory"  # floor: 524 MB at 20 GB/s = 26 ms
    # An in-cache cost the noise hid: no compute figure, no in-cache bandwidth; bound from the rest.
    fast.cache = cpu.CacheCost(host_ms=0.01, ms_per_byte=None, slice_bytes=1024)
    assert fast.compute_ms is None and fast.cache_gbps is None and fast.bound == "memory"


def test_cpu_row_figures_and_line():
    row = _row((4096, 32000), "fwd+bwd", 100.0, 500.0, 200.0, 4096 * 32000 * 4)
    b = 4096 * 32000 * 4
    assert row.bytes_moved == 3 * b
    assert abs(row.floor_ms - (b / 20e9 + 2 * b / 20e9) * 1e3) < 1e-9  # read bandwidth: the better of sum, amax
    assert abs(row.speedup("eager") - 5.0) < 1e-12 and abs(row.speedup("compile") - 2.0) < 1e-12
    assert abs(row.xent_gbps - 3 * b / 0.1 / 1e9) < 1e-9
    table = cpu.table(len("4096x32000"))
    cells = cpu.row_line(row, table).split()
    assert cells[:6] == ["4096x32000", "fp32", "1", "fwd+bwd", "5.00", "2.00"], cells
    row.impls["compile"].status = "skipped: --no-compile"
    cells = cpu.row_line(row, table).split()
    assert cells[5] == "-" and cells[12] == "-" and cells[15] == "-", cells


def test_in_cache_cost_scales_with_input():
    x = torch.randn(4096, 64)
    target = torch.randint(64, (4096,))
    cost = cpu.measure_in_cache(x, target, "fwd")
    # No time is asserted: when noise hides the difference between the two slices the
    # per-byte cost is None by design (the whole call is counted as host time).
    assert cost is not None and cost.host_ms >= 0
    assert cost.ms_per_byte is None or cost.ms_per_byte > 0
    assert cost.slice_bytes == 2048 * 64 * 4  # half the rows: 1 MiB, under the 4 MiB cap
    assert cpu.measure_in_cache(torch.randn(1, 10), torch.tensor([3]), "fwd") is None


# ---- CUDA (without a GPU) ----


def test_gpu_bytes():
    c = parse_shape("8192x128256:bf16")
    logits = 8192 * 128256 * 2
    assert c.logits_bytes == logits
    assert gpu.min_bytes(c, "fwd") == logits + 8192 * 8
    assert gpu.min_bytes(c, "fwd+bwd") == 3 * logits + 8192 * 8
    seg = parse_shape("16x21x128x128")
    assert seg.target_shape == (16, 128, 128)
    assert gpu.min_bytes(seg, "fwd") == 16 * 21 * 128 * 128 * 4 + 16 * 128 * 128 * 8
    one = parse_shape("1000")  # a (C) input has a 0-d target: one index
    assert gpu.min_bytes(one, "fwd") == 4000 + 8


def test_gpu_input_copies():
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
        got = gpu.input_copies(c.logits_bytes + math.prod(c.target_shape) * 8, l2)
        assert got == n, (spec, got, n)
        if got > 1:
            assert got * (c.logits_bytes + math.prod(c.target_shape) * 8) >= 4 * l2 - 1
    assert gpu.input_copies(10, l2) == gpu.MAX_INPUT_COPIES
    assert gpu.input_copies(2 * l2, l2) == 2  # exactly 2 x L2: still rotated
    assert gpu.input_copies(2 * l2 + 1, l2) == 1


def make_row(times, peaks, statuses):
    impls = {}
    for name in CUDA_IMPLS:
        r = ImplResult()
        t = times.get(name)
        if t is not None:
            r.samples_ms = [t * 1.1, t, t * 0.9]  # median t
            r.inner = 1
        r.peak_extra_bytes = peaks.get(name)
        if name in statuses:
            r.status = statuses[name]
        impls[name] = r
    return gpu.GpuRow(Case((8192, 128256), "bf16"), "fwd+bwd", impls, copy_gbps=3000.0)


def test_gpu_row_targets_and_tables():
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
    v = targets.target_verdict(row)
    assert v["pct_of_copy_met"] is True
    assert v["peers_ran"] == ["eager", "compile", "liger"]
    assert v["faster_than_all_peers"] is True
    assert v["memory_met"] is True  # 1.00003 gradients: within the slack for per-row statistics
    text = targets.format_targets(v)
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
    v = targets.target_verdict(slow)
    assert v["loss_matches_eager"] is False
    assert v["pct_of_copy_met"] is False and v["faster_than_all_peers"] is False and v["memory_met"] is False
    text = targets.format_targets(v)
    assert "(>= 85%: NO)" in text and "every peer that ran: NO" in text and "(<= 1: NO)" in text, text
    assert "loss matches eager: NO" in text, text

    none = make_row({"eager": 1.0}, {}, {"xent": "failed: RuntimeError: x"})
    text = targets.format_targets(targets.target_verdict(none))
    assert "xent did not run (failed: RuntimeError: x)" in text, text

    alone = make_row({"xent": t_xent}, {"xent": logits}, {})
    v = targets.target_verdict(alone)
    assert v["faster_than_all_peers"] is None and "n/a (no peer ran)" in targets.format_targets(v)

    # Tables: fixed-width columns, two spaces between them, on every line.
    detail = gpu_report.detail_table(len("8192x128256"))
    lines = detail.header() + gpu_report.detail_lines(row, detail) + gpu_report.detail_lines(slow, detail)
    gaps, offset = [], 0
    for _, width in detail.columns[:-1]:
        offset += width
        gaps.append(offset)
        offset += 2
    for line in lines:
        for g in gaps:
            assert len(line) <= g or line[g : g + 2] == "  ", (g, line)
    compile_line = next(ln for ln in gpu_report.detail_lines(slow, detail) if ln.split()[0] == "compile")
    assert compile_line.endswith("failed: BackendCompilerFailed: boom"), compile_line
    summary = gpu_report.summary_table(len("8192x128256"))
    head = summary.header()[0]
    sl = gpu_report.summary_line(slow, summary)
    assert len(sl) <= len(head) + 1, (sl, head)
    cells = sl.split()
    # xent us, GB/s, %copy, eager/x, comp/x, liger/x, quack/x, grads x, grads e
    assert cells[6:10] == ["2.00", "n/a", "0.75", "-"], cells


def test_gpu_cuda_branches_mocked(capsys):
    """The few lines that only run on a GPU, against stand-ins for torch.cuda's events and properties."""

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            assert self.t is not None

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # ms, like torch.cuda.Event

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0,
                                  total_memory=80 * 2**30, L2_cache_size=50 * MiB)
    with mock.patch.object(torch.cuda, "Event", FakeEvent):
        sample = gpu.make_event_sampler(torch.device("cuda"))
        per_call = sample(lambda: time.sleep(0.002), 3)
        assert 0.0015 < per_call < 0.05, per_call
    with mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props):
        info = gpu_report.gpu_machine_info(torch.device("cuda"), props.L2_cache_size)
        assert info["gpu"] == props.name and info["sm_count"] == 132 and info["compute_capability"] == "9.0"
        peers = {"liger": Peer("liger", None, status="not installed")}
        cfg = timing.TimingConfig(0.3, 2.0, 10, None)
        gpu_report.print_gpu_header(info, peers, cfg, True)  # must not raise
        json.dumps(info)
    assert "132 SMs, compute capability 9.0" in capsys.readouterr().out


def test_gpu_harness_dry_run_on_cpu(tmp_path, monkeypatch):
    # A small stand-in for the target shape, so the "targets" line is exercised too.
    monkeypatch.setattr(gpu, "TARGET_CASE", Case((512, 1000), "fp32"))
    path = tmp_path / "bench.json"
    cli.main(["--cuda-harness-on-cpu", "--shapes", "512x1000,4x3x8x8,8x3000:bf16", "--no-compile",
              "--min-time", "0.02", "--max-time", "0.2", "--json", str(path)])
    report = json.loads(path.read_text())
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
