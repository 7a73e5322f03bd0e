"""Run every benchmark of zproc and print one table.

Usage (from the repository root)::

    python -m benchmarks [--quick] [--json FILE] [--only NAME ...] [--upstream-python PATH]

Each benchmark module exports ``run(...) -> list[dict]``; a row is
``{"name", "value", "unit", "baseline", "baseline_value", "ratio"}`` and optionally
``"target"`` (``">= X"`` or ``"<= X"``, applied to the ratio), ``"met"`` and ``"note"``.
Every baseline is measured in the same run, side by side with the figure it is compared
to, so the ratios are meaningful even though absolute numbers drift between machines and
runs. ``ratio = value / baseline_value``; the target says which direction is better.

Modules: every ``benchmarks/bench_*.py``, e.g. ``ops`` (dict round trips), ``watch``
(watcher wake-up latency), ``atomic`` (atomic functions), ``process`` (process start-up
and ``process_map``), ``scaling`` (1 to 8 clients and 10 to 1,000,000 keys, drawn into
``docs/_static/scaling.png`` when matplotlib is installed) and ``upstream`` (zproc 0.9.1
in another environment, only with ``--upstream-python``). A module is any
``bench_NAME.py`` with a ``run()`` function; the runner passes ``quick`` and
``upstream_python`` to it when its signature takes them.

The exit status is 0 when every module ran (missed targets are reported, not fatal), 1 if
a module failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

#: Modules run first, in this order; any other ``bench_*.py`` of the package follows,
#: alphabetically (``upstream``, which needs ``--upstream-python``, always comes last).
PREFERRED = ["ops", "watch", "atomic", "process"]


def _discover() -> list[str]:
    """Short names of every ``bench_*`` module in this package."""
    import pkgutil

    found = sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))])
        if info.name.startswith("bench_")
    )
    ordered = [name for name in PREFERRED if name in found]
    ordered += [name for name in found if name not in ordered and name != "upstream"]
    if "upstream" in found:
        ordered.append("upstream")
    return ordered


MODULES = _discover()
#: Per-module time limit in seconds (full run, quick run): a safety net against hangs.
LIMITS = {"full": 420, "quick": 150}

COLUMNS = ("name", "value", "unit", "baseline", "baseline value", "ratio", "target", "met?")


class BenchmarkTimeout(Exception):
    """A module ran past its time limit (raised in the main thread by SIGALRM)."""


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise BenchmarkTimeout("benchmark module exceeded its time limit")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        str(r.get("name", "?")),
        _fmt(r.get("value")),
        str(r.get("unit", "")),
        str(r.get("baseline", "")),
        _fmt(r.get("baseline_value")),
        f"{r['ratio']:.2f}" if isinstance(r.get("ratio"), (int, float)) else "-",
        str(r.get("target") or "-"),
        _fmt(_met(r)),
    ]


def _met(r: dict[str, Any]) -> bool | None:
    """Whether the row meets its target (None: no target)."""
    if "met" in r:
        return r["met"]  # type: ignore[no-any-return]
    target, ratio = r.get("target"), r.get("ratio")
    if not target or not isinstance(ratio, (int, float)):
        return None
    from ._common import target_met

    return target_met(str(target), float(ratio))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table (numbers right-aligned), with notes below."""
    body = [_cells(r) for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    right = {1, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(cells) for cells in body]
    notes = [f"  {r['name']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(format_table(rows), flush=True)


def _loadavg() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews the figures)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _normalize(name: str) -> str:
    name = name.strip().lower()
    return name.removeprefix("bench_")


def _call_run(module: Any, quick: bool, upstream_python: str | None) -> list[dict[str, Any]]:
    """Call ``module.run`` with the arguments its signature accepts."""
    params = inspect.signature(module.run).parameters
    kwargs: dict[str, Any] = {}
    if "quick" in params:
        kwargs["quick"] = quick
    if "upstream_python" in params:
        kwargs["upstream_python"] = upstream_python
    rows = module.run(**kwargs)
    return [dict(r, module=module.__name__.rsplit(".", 1)[-1]) for r in rows]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run zproc's benchmarks and print one table."
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter repetitions (about a minute in all)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run only these modules ({', '.join(MODULES)})")
    parser.add_argument("--upstream-python", metavar="PATH",
                        help="a python whose environment has zproc==0.9.1, for a baseline")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [_normalize(n) for n in args.only]
        unknown = [n for n in wanted if n not in MODULES]
        if unknown:
            parser.error(f"unknown module(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(MODULES)}")
        args.only = wanted
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from ._common import environment

    selected = args.only or MODULES
    limit = LIMITS["quick" if args.quick else "full"]
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    durations: dict[str, float] = {}
    started = time.monotonic()
    load_before = _loadavg()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for name in MODULES:
            if name not in selected:
                continue
            if name == "upstream" and not args.upstream_python:
                skipped.append((name, "no --upstream-python given"))
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            signal.alarm(limit)
            try:
                module = importlib.import_module(f"benchmarks.bench_{name}")
                module_rows = _call_run(module, args.quick, args.upstream_python)
                rows += module_rows
                skipped += [(name, r["skipped"]) for r in module_rows if r.get("skipped")]
            except Exception:  # a failing module is reported, the others still run
                failures.append((name, traceback.format_exc()))
            finally:
                signal.alarm(0)
                durations[name] = time.monotonic() - t0
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = time.monotonic() - started
    shown = [r for r in rows if not r.get("skipped")]

    print()
    print(format_table(shown))
    for r in shown:
        r["met"] = _met(r)
    missed = [r for r in shown if r["met"] is False]
    print()
    print(f"targets: {sum(1 for r in shown if r.get('met') is True)} met, {len(missed)} missed"
          + (": " + "; ".join(f"{r['name']} vs {r['baseline']} ({r['ratio']:.2f}, "
                                f"target {r['target']})" for r in missed) if missed else ""))
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    for name, text in failures:
        print(f"FAILED {name}:\n{text}")
    load_after = _loadavg()
    print("time: " + "".join(f"{k} {v:.0f} s, " for k, v in durations.items())
          + f"total {total:.0f} s" + (" (--quick)" if args.quick else "")
          + f"; load average {load_before} before, {load_after} after", flush=True)

    if args.json:
        document = {
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None
                                                          else argv),
            "quick": args.quick,
            "environment": environment(),
            "durations_s": durations,
            "load_average": {"before": load_before, "after": load_after},
            "rows": shown,
            "skipped": [{"module": n, "reason": r} for n, r in skipped],
            "failures": [{"module": n, "traceback": t} for n, t in failures],
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2, default=str)
            f.write("\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
