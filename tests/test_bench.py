"""The benchmark harness (``python -m xent_ext.bench``) runs end to end and judges targets right.

No test here asserts a time: the harness is run on tiny shapes with two
samples, and only its plumbing (orders, the in-cache model, target verdicts,
the JSON) is checked.
"""

import json

import pytest
import torch

from xent_ext import bench


def test_cli_runs_and_writes_every_field(tmp_path, capsys):
    path = tmp_path / "out.json"
    bench.main(["--shapes", "512x10,2x3x8x8:bf16", "--threads", "1", "--reps", "2", "--no-compile",
                "--json", str(path)])
    out = capsys.readouterr().out
    assert "targets" in out and "bound" in out
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert [(r["shape"], r["mode"]) for r in rows] == [
        ([512, 10], "fwd"), ([512, 10], "fwd+bwd"), ([2, 3, 8, 8], "fwd"), ([2, 3, 8, 8], "fwd+bwd")]
    for r in rows:
        assert r["order"] == ("interleaved" if r["mode"] == "fwd" else "blocks")
        assert r["bound"] in ("memory", "compute", "host", "other")
        assert r["cache"]["slice_bytes"] > 0 and r["compute_ms"] > 0
        assert len(r["impls"]["xent"]["samples_ms"]) == 2
        assert r["impls"]["compile"]["skipped"]
    # fwd+bwd rows carry the three fwd+bwd targets; the small fwd rows none.
    assert [t["name"] for t in rows[1]["targets"]] == ["vs eager", "vs compile", "memory"]
    assert rows[0]["targets"] == []


@pytest.mark.parametrize("order", ["interleaved", "blocks"])
def test_sample_orders(order):
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    cfg = bench.TimingConfig(min_time_s=0, max_time_s=1, min_reps=4, fixed_reps=4, order=order)
    sampler = bench.interleaved_samples if order == "interleaved" else bench.blocked_samples
    samples, inner = sampler(steps, {name: 1.0 for name in steps}, cfg, lambda: None)
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    if order == "interleaved":
        assert calls[:6] == list("abcbca")
    else:  # two rounds in opposite orders, each block after one untimed call
        assert "".join(calls) == "aaa" "bbb" "ccc" "ccc" "bbb" "aaa"
    assert bench.sample_order(bench.TimingConfig(0, 1, 1, None), "fwd") == "interleaved"
    assert bench.sample_order(bench.TimingConfig(0, 1, 1, None), "fwd+bwd") == "blocks"


def _row(shape, mode, xent_ms, eager_ms, compile_ms, peak_bytes):
    case = bench.Case(shape, "fp32")
    impls = {"xent": bench.ImplResult([xent_ms], peak_extra_bytes=peak_bytes),
             "eager": bench.ImplResult([eager_ms]), "compile": bench.ImplResult([compile_ms])}
    bw = bench.Bandwidth(1, copy_gbps=20.0, read_sum_gbps=20.0, read_amax_gbps=10.0)
    return bench.Row(case, 1, mode, impls, bw, "blocks",
                     bench.CacheCost(host_ms=0.01, ms_per_byte=1e-7, slice_bytes=1024))


def test_target_verdicts():
    llm = (4096, 32000)
    b = 4096 * 32000 * 4
    ok = bench.cpu_target_checks(_row(llm, "fwd+bwd", 100.0, 500.0, 200.0, b))
    assert [c.met for c in ok] == [True, True, True]
    # An LLM shape needs 5x / 2x; 4.9x / 1.9x and a second gradient buffer miss.
    missed = bench.cpu_target_checks(_row(llm, "fwd+bwd", 100.0, 490.0, 190.0, 2 * b))
    assert [c.met for c in missed] == [False, False, False]
    # Other shapes need 3x / 1.5x.
    other = bench.cpu_target_checks(_row((65536, 1000), "fwd+bwd", 100.0, 310.0, 160.0, 65536 * 1000 * 4))
    assert [c.met for c in other] == [True, True, True]
    assert bench.shape_class(bench.Case((8, 256000), "fp32")) == "other"
    assert bench.shape_class(bench.Case((16, 21, 128, 128), "fp32")) == "other"
    # The forward of an LLM shape: within 1.5x of the floor (1 read at 20 GB/s).
    floor_ms = b / 20e9 * 1e3
    fwd_ok, = bench.cpu_target_checks(_row(llm, "fwd", 1.4 * floor_ms, 1.0, 1.0, 0))
    fwd_miss, = bench.cpu_target_checks(_row(llm, "fwd", 1.6 * floor_ms, 1.0, 1.0, 0))
    assert fwd_ok.met and not fwd_miss.met
    line = bench.target_line(_row(llm, "fwd", 1.6 * floor_ms, 1.0, 1.0, 0))
    assert "MISSED" in line and "why: " in line


def test_bound():
    # _row's cache: 1e-7 ms per byte (524 MB: 52 ms of compute), 0.01 ms per call.
    shape = (4096, 32000)
    compute_ms = 4096 * 32000 * 4 * 1e-7
    assert _row(shape, "fwd", compute_ms * 1.1, 1.0, 1.0, 0).bound == "compute"
    # Far above every bound: something else (page faults, a disturbed sample).
    assert _row(shape, "fwd", compute_ms * 3, 1.0, 1.0, 0).bound == "other"
    fast = _row(shape, "fwd", 30.0, 1.0, 1.0, 0)
    fast.cache = bench.CacheCost(host_ms=0.01, ms_per_byte=1e-12, slice_bytes=1024)
    assert fast.bound == "memory"  # floor: 524 MB at 20 GB/s = 26 ms


def test_in_cache_cost_scales_with_input():
    x = torch.randn(4096, 64)
    target = torch.randint(64, (4096,))
    cost = bench.measure_in_cache(x, target, "fwd")
    assert cost is not None and cost.ms_per_byte > 0 and cost.host_ms >= 0
    assert cost.slice_bytes == 2048 * 64 * 4  # half the rows: 1 MiB, under the 4 MiB cap
    assert bench.measure_in_cache(torch.randn(1, 10), torch.tensor([3]), "fwd") is None
