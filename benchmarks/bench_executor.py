"""Executors: ``ctx.executor(2)`` versus ``concurrent.futures.ProcessPoolExecutor(2)``.

Run from the repository root::

    python -m benchmarks --only executor      (or: python -m benchmarks.bench_executor)

Rows (medians of several repetitions; the two executors take turns in each repetition,
both made once and warmed up, so that they share the machine's noise):

* ``executor.submit10k``: 10,000 ``submit(inc, i)`` and then every result (calls/s).
* ``executor.map100k``: ``sum(ex.map(inc, range(100000), chunksize=1000))`` (items/s).
* ``executor.round trip``: one ``submit(inc, i).result()`` on an idle executor (a 3 ms
  pause before each), the median over 200 (round trips/s, the inverse of the median).

Targets: each ratio (zproc / ProcessPoolExecutor) >= 1.0.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any

import zproc

from ._common import median, row

WORKERS = 2
TARGET = ">= 1.0"


def inc(x: int) -> int:
    return x + 1


def _submit10k(ex: concurrent.futures.Executor, n: int) -> float:
    start = time.perf_counter()
    futures = [ex.submit(inc, i) for i in range(n)]
    total = sum(f.result(timeout=120) for f in futures)
    elapsed = time.perf_counter() - start
    assert total == n * (n + 1) // 2, total
    return n / elapsed


def _map(ex: concurrent.futures.Executor, n: int) -> float:
    start = time.perf_counter()
    total = sum(ex.map(inc, range(n), chunksize=1000))
    elapsed = time.perf_counter() - start
    assert total == n * (n + 1) // 2, total
    return n / elapsed


def _round_trips(executors: dict[str, concurrent.futures.Executor], n: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in executors}
    order = list(executors)
    for i in range(n):
        for name in order if i % 2 == 0 else reversed(order):
            time.sleep(0.003)
            start = time.perf_counter()
            executors[name].submit(inc, i).result(timeout=30)
            samples[name].append(time.perf_counter() - start)
    return {name: 1 / median(values) for name, values in samples.items()}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    submits, items, reps, trips = (2000, 20_000, 3, 50) if quick else (10_000, 100_000, 5, 200)
    rows: list[dict[str, Any]] = []
    ppe = concurrent.futures.ProcessPoolExecutor(
        WORKERS, mp_context=multiprocessing.get_context("fork")
    )
    with ppe, zproc.Context() as ctx, ctx.executor(max_workers=WORKERS) as zex:
        executors: dict[str, concurrent.futures.Executor] = {"zproc": zex, "ppe": ppe}
        for ex in executors.values():  # warm-up: every worker started and used
            list(ex.map(inc, range(100)))
        for name, measure, size in (("submit10k", _submit10k, submits), ("map100k", _map, items)):
            rates: dict[str, list[float]] = {key: [] for key in executors}
            for rep in range(reps):
                order = list(executors) if rep % 2 == 0 else list(reversed(executors))
                for key in order:
                    rates[key].append(measure(executors[key], size))
            unit = "calls/s" if name == "submit10k" else "items/s"
            rows.append(row(
                f"executor.{name}", median(rates["zproc"]), unit,
                f"ProcessPoolExecutor({WORKERS})", median(rates["ppe"]), target=TARGET,
                note=f"ctx.executor(max_workers={WORKERS})",
            ))
        trip = _round_trips(executors, trips)
        rows.append(row(
            "executor.round trip", trip["zproc"], "1/s", f"ProcessPoolExecutor({WORKERS})",
            trip["ppe"], target=TARGET, note="idle executor, median of single round trips",
        ))
    return rows


def main() -> None:
    from .__main__ import print_table

    rows = run()
    print_table(rows)
    for result in rows:
        print(f"{result['name']}: ratio {result['ratio']:.3f} (zproc / ProcessPoolExecutor)")


if __name__ == "__main__":
    main()
