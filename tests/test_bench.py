"""``python -m xent_ext.bench``, the benchmark users run: it runs end to end and says what it measured.

No test here asserts a time: tiny shapes, two samples; only the plumbing is
checked (the table, the ratios' cells, the JSON, the plot, failures).
"""

import json

import pytest
import torch

from xent_ext import bench

TINY = ["--shapes", "64x100,4x10x3:bf16", "--samples", "2", "--threads", "1"]


def test_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    try:
        rows = bench.main([*TINY, "--no-compile", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "vs torch " + torch.__version__ in out and "1 thread" in out
    assert "eager/xent" in out and "compile/xent" in out and "MISSED" not in out and "target" not in out
    assert len(rows) == 4
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "samples", "compile", "argv", "rows", "notes"}
    assert {"cpu", "threads", "torch", "xent_ext", "device"} <= set(report["machine"])
    assert [(r["shape"], r["dtype"], r["mode"]) for r in report["rows"]] == [
        ([64, 100], "fp32", "fwd"), ([64, 100], "fp32", "fwd+bwd"),
        ([4, 10, 3], "bf16", "fwd"), ([4, 10, 3], "bf16", "fwd+bwd")]
    for r in report["rows"]:
        assert set(r["ratios"]) == {"eager", "compile"} and r["ratios"]["compile"] is None
        assert r["impls"]["compile"]["status"] == "off"
        for name in ("xent", "eager"):
            impl = r["impls"][name]
            assert impl["status"] == "ok" and len(impl["samples_ms"]) == 2 and impl["median_ms"] > 0
            assert impl["inner"] >= 1 and impl["loss"] is not None
        assert r["ratios"]["eager"] == pytest.approx(r["impls"]["eager"]["median_ms"] / r["impls"]["xent"]["median_ms"])
    assert report["notes"] == []


def _row(xent, eager, compile_=None, compile_status="ok"):
    impls = {"xent": bench.Timing(samples_ms=xent), "eager": bench.Timing(samples_ms=eager),
             "compile": bench.Timing(status=compile_status, samples_ms=compile_ or [])}
    return bench.Row((8, 16), "fp32", "fwd", impls)


def test_ratio_cells():
    row = _row([1.0, 1.1], [2.0, 2.2], [1.0, 1.2])
    assert row.ratio("eager") == pytest.approx(2.1 / 1.05)
    assert bench.cell_ratio(row, "eager") == "2.00"  # the middle halves of the samples are apart
    assert bench.cell_ratio(row, "compile") == "~1.05"  # overlapping samples: within noise
    assert not row.clear("compile") and row.clear("eager")
    assert bench.cell_ratio(_row([1.0], [2.0], compile_status="off"), "compile") == "off"
    failed = _row([], [2.0], [1.0])
    failed.impls["xent"].status = "failed"
    assert bench.cell_ratio(failed, "eager") == "failed" and failed.ratio("eager") is None
    cells = bench.row_line(_row([1.0], [2.0], compile_status="failed")).split()
    assert cells == ["8x16", "fp32", "fwd", "1", "2", "failed", "2.00", "failed"]


def test_compile_failure_is_reported_once(monkeypatch, capsys):
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(kwargs)

        def compiled(*args):
            raise RuntimeError("no C compiler\nmore")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    threads = torch.get_num_threads()
    try:
        rows = bench.main(TINY)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert len(calls) == 1  # not tried again on later rows
    assert [r.impls["compile"].status for r in rows] == ["failed"] * 4
    assert "note: compile failed on 64x100 fp32 fwd: RuntimeError: no C compiler" in out
    assert all(line.split()[-1] == "failed" for line in out.splitlines() if line.startswith(("64x100", "4x10x3")))


def test_options():
    quick = bench.parse_args(["--quick"])
    assert quick.compile and quick.samples == 5 and quick.cases == [bench.parse_shape(s) for s in bench.QUICK_SHAPES["cpu"]]
    assert bench.parse_args([]).samples == 10
    for bad in (["--shapes", "64"], ["--shapes", "64x10:int8"], ["--samples", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit):
        bench.parse_args(["--plot", str(tmp_path / "r.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    threads = torch.get_num_threads()
    try:
        bench.main([*TINY, "--no-compile", "--mode", "fwd", "--plot", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_outlier_does_not_hide_a_clear_ratio():
    row = _row([1.0, 1.0, 1.1, 1.0, 9.0], [3.0, 3.1, 2.9, 3.0, 3.2])  # one disturbed xent sample
    assert row.clear("eager") and bench.cell_ratio(row, "eager") == "3.00"
    assert bench.middle_half([5.0]) == (5.0, 5.0)
