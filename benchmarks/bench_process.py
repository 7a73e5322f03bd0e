"""Process start-up and ``process_map`` against :mod:`multiprocessing`.

Run from the repository root::

    python -m benchmarks.bench_process

Rows (medians of several repetitions, after warm-up):

* ``spawn_join_10``: start 10 processes with ``ctx.process`` and wait for all of them,
  versus ``multiprocessing.Process`` with the ``fork`` start method (start + join).
  Measured with the default ``stateful=True`` (each child connects a State to the server)
  and with ``stateful=False`` (the same work as the baseline).
* ``process_map_10000``: ``list(ctx.process_map(f, range(10_000), count=2))`` on an
  existing pool, versus ``Pool(2).map(f, range(10_000))`` on an existing pool.
* ``process_map_10000_cold``: the same including the start of the workers (a fresh
  Context's first ``process_map``, versus creating the ``Pool``); the server start is not
  counted.

``ratio`` is ``value / baseline_value``: below 1 means zproc is faster.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

import zproc

ITEMS = 10_000
WORKERS = 2
PROCESSES = 10


def _square(x: int) -> int:
    return x * x


def _noop(*_args: Any) -> None:
    return None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(
    fns: list[Callable[[], object]], repeat: int, warmup: int = 3
) -> list[float]:
    """Median time of each function, the repetitions interleaved (fair under noise)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            bucket.append(_timed(fn))
    return [statistics.median(bucket) for bucket in times]


def _row(
    name: str, value: float, baseline: str, baseline_value: float, unit: str = "s"
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": value / baseline_value,
    }


def bench_spawn(ctx: zproc.Context, repeat: int = 15) -> list[dict[str, Any]]:
    fork = multiprocessing.get_context("fork")

    def with_multiprocessing() -> None:
        children = [fork.Process(target=_noop) for _ in range(PROCESSES)]
        for child in children:
            child.start()
        for child in children:
            child.join()

    def with_zproc(stateful: bool) -> Callable[[], None]:
        def run() -> None:
            processes = [ctx.process(_noop, stateful=stateful) for _ in range(PROCESSES)]
            for process in processes:
                process.wait()
            ctx.process_list.clear()

        return run

    baseline, stateful, stateless = _medians(
        [with_multiprocessing, with_zproc(True), with_zproc(False)], repeat
    )
    name = "multiprocessing.Process (fork)"
    return [
        _row(f"spawn_join_{PROCESSES} ctx.process", stateful, name, baseline),
        _row(f"spawn_join_{PROCESSES} ctx.process(stateful=False)", stateless, name, baseline),
    ]


def bench_map(ctx: zproc.Context, repeat: int = 60) -> list[dict[str, Any]]:
    expected = [x * x for x in range(ITEMS)]
    fork = multiprocessing.get_context("fork")
    with fork.Pool(WORKERS) as pool:
        assert list(ctx.process_map(_square, range(ITEMS), count=WORKERS)) == expected
        assert pool.map(_square, range(ITEMS)) == expected
        value, baseline = _medians(
            [
                lambda: list(ctx.process_map(_square, range(ITEMS), count=WORKERS)),
                lambda: pool.map(_square, range(ITEMS)),
            ],
            repeat,
            warmup=20,
        )
    return [_row(f"process_map_{ITEMS}", value, f"Pool({WORKERS}).map", baseline)]


def bench_map_cold(repeat: int = 7) -> list[dict[str, Any]]:
    fork = multiprocessing.get_context("fork")
    times: list[float] = []
    baseline: list[float] = []

    def with_pool() -> None:
        with fork.Pool(WORKERS) as pool:
            pool.map(_square, range(ITEMS))

    for _ in range(repeat):
        with zproc.Context() as ctx:
            times.append(
                _timed(lambda: list(ctx.process_map(_square, range(ITEMS), count=WORKERS)))
            )
        baseline.append(_timed(with_pool))
    return [
        _row(
            f"process_map_{ITEMS}_cold",
            statistics.median(times),
            f"Pool({WORKERS}) + map",
            statistics.median(baseline),
        )
    ]


def run() -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    with zproc.Context() as ctx:
        rows = bench_spawn(ctx)
        rows += bench_map(ctx)
    rows += bench_map_cold()
    return rows


def main() -> None:
    rows = run()
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['value'] * 1e3:8.2f} ms   "
            f"{row['baseline']}: {row['baseline_value'] * 1e3:8.2f} ms   "
            f"ratio {row['ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
