"""Run every side-by-side benchmark and print one table.

Each ``benchmarks/bench_*.py`` exposes ``main(quick: bool = False) -> list[dict]`` with rows
{workload, xdl, baseline, ratio, target, met}; ratio is xdl ÷ baseline (lower is better),
met is computed from the figures, and None for a row that only reports (target "report").
A module that fails to import or run is a row marked ERROR, not the end of the table.

    python benchmarks/run_all.py [--quick] [--only train,attacks]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("workload", "xdl", "baseline", "ratio", "target", "met")


def modules(only: list[str] | None = None) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    return [n for n in names if not only or n.removeprefix("bench_") in only]


def collect(name: str, quick: bool) -> list[dict]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
        if not callable(getattr(module, "main", None)):
            raise AttributeError(f"{name} has no main(quick) function")
        rows = list(module.main(quick=quick))
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc(file=sys.stderr)
        return [{"workload": f"{name}: ERROR {type(exc).__name__}: {exc}", "met": None}]
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return [{**r, "workload": f"{name.removeprefix('bench_')}: {r.get('workload', '?')}"} for r in rows]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def reports(row: dict) -> bool:
    """A row with no bar: it shows a figure (target "report...") and has met None."""
    return row.get("met") is None and str(row.get("target", "")).startswith("report")


def met_blank(row: dict) -> str:
    return "report" if reports(row) else "ERROR"


def table(rows: list[dict]) -> str:
    cells = [[_cell(r.get(c)) if not (c == "met" and r.get(c) is None) else met_blank(r) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    met = sum(r.get("met") is True for r in rows)
    bars = sum(not reports(r) for r in rows)
    lines.append(f"\n{met} of {bars} bars met ({len(rows) - bars} rows only report)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass quick=True: smaller data, fewer repeats")
    parser.add_argument("--only", help="comma list of benchmark names, e.g. train,attacks")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    rows = [r for name in modules(only) for r in collect(name, args.quick)]
    print(table(rows))
    return 0 if rows and all(r.get("met") is True or reports(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
