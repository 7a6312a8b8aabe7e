"""Draw a recorded benchmark run as ``python -m xent_ext.bench --plot`` draws a live one.

    python benchmarks/plot_recorded.py benchmarks/ratios-cpu-epyc-zen4.png --threads 2 \
        benchmarks/results-cpu-epyc-zen4.json benchmarks/results-cpu-epyc-zen4-rerun.json
    python benchmarks/plot_recorded.py benchmarks/ratios-gpu-h200.png benchmarks/results-gpu-h200-2026-12-04.json

Reads the JSON that ``benchmarks/run.py --json`` writes (CPU or GPU), keeps
xent_ext, torch eager and torch.compile (the peers the user-facing benchmark
times), and plots their time ratios (a later file's row replaces an earlier
one of the same shape, dtype, mode and threads: a rerun of some shapes) with the user-facing benchmark's own
plotting code, so the README's pictures and a user's ``--plot`` look alike.
Needs an installed xent_ext and matplotlib.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from xent_ext import bench


def timing(impl: dict[str, Any]) -> bench.Timing:
    samples = impl.get("samples_ms") or []
    failed = impl.get("skipped") or impl.get("error") or impl.get("status") not in (None, "ok")
    if failed or not samples:
        return bench.Timing(status="failed", reason=str(impl.get("error") or "not run"))
    return bench.Timing(samples_ms=list(samples), inner=impl.get("inner", 1), loss=impl.get("loss"))


def rows_of(reports: list[dict[str, Any]], threads: int | None) -> list[bench.Row]:
    rows: dict[tuple, bench.Row] = {}
    for report in reports:
        for r in report["rows"]:
            if threads is not None and r.get("threads") not in (None, threads):
                continue
            impls = {name: timing(r["impls"][name]) for name in bench.IMPLS if name in r["impls"]}
            key = (tuple(r["shape"]), r["dtype"], r["mode"], r.get("threads"))
            rows[key] = bench.Row(tuple(r["shape"]), r["dtype"], r["mode"], impls)
    return list(rows.values())


def title_of(report: dict[str, Any], threads: int | None) -> str:
    m = report.get("machine", {})
    where = m.get("gpu") or m.get("cpu_model") or m.get("cpu") or "unknown machine"
    parts = [str(where), f"torch {m.get('torch') or m.get('torch_version') or '?'}"]
    if threads is not None:
        parts.append(f"{threads} threads")
    parts.append(str(report.get("date", ""))[:10])
    return "xent_ext vs torch (recorded): " + ", ".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("png", help="the picture to write")
    p.add_argument("json", nargs="+", help="results JSON written by benchmarks/run.py; later ones replace rows")
    p.add_argument("--threads", type=int, help="CPU runs: the thread count to draw")
    args = p.parse_args(argv)
    reports = []
    for path in args.json:
        with open(path) as f:
            reports.append(json.load(f))
    rows = rows_of(reports, args.threads)
    if not rows:
        raise SystemExit(f"{args.json}: no rows" + (f" at {args.threads} threads" if args.threads else ""))
    bench.plot(rows, args.png, title_of(reports[0], args.threads))
    print(f"wrote {args.png} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
