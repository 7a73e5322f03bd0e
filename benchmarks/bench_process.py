"""Process start-up and ``process_map`` against :mod:`multiprocessing`.

Run from the repository root::

    python -m benchmarks.bench_process

Rows (medians of several repetitions; a row and its baseline take turns by blocks of
repetitions, so slow changes in the machine's load affect both alike):

* ``spawn_join_10``: start 10 processes with ``ctx.process`` and wait for all of them,
  versus ``multiprocessing.Process`` with the ``fork`` start method (start + join).
  Measured with the default ``stateful=True`` (each child gets a State, which connects
  on first use), with ``stateful=False`` (the same work as the baseline), and with a
  child that reads one key (it connects to the server and makes one round trip, which
  the baseline does not do). Target: within 1.5x.
* ``process_map_10000``: ``list(ctx.process_map(f, range(10_000), count=2))`` on running
  workers, versus ``Pool(2).map(f, range(10_000))`` on a running pool (default
  chunksize). Target: at most half the time.
* ``process_map_10000_cold``: the same, including the start of the workers (a new
  Context's first ``process_map``, the server start not counted, versus creating the
  ``Pool`` and closing it).

``ratio`` is ``value / baseline_value``: below 1 means zproc is faster.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

import zproc

from ._common import row

ITEMS = 10_000
WORKERS = 2
PROCESSES = 10

FORK = multiprocessing.get_context("fork")


def _square(x: int) -> int:
    return x * x


def _noop(*_args: Any) -> None:
    return None


def _read_one(state: zproc.State) -> Any:
    return state.get("x")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(
    fns: list[Callable[[], object]], repeat: int, warmup: int, block: int = 10
) -> list[float]:
    """Median seconds of each function over ``repeat`` calls.

    The functions take turns by blocks of ``block`` calls (each block after a short
    warm-up), so that slow drift in the machine's load hits all of them alike while each
    is measured in its own steady state (a pool that just ran keeps its CPU placement).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeat:
        for fn, bucket in zip(fns, times, strict=True):
            for _ in range(2):
                fn()
            bucket.extend(_timed(fn) for _ in range(block))
    return [statistics.median(bucket) for bucket in times]


def bench_spawn(ctx: zproc.Context, repeat: int) -> list[dict[str, Any]]:
    def with_multiprocessing() -> None:
        children = [FORK.Process(target=_noop) for _ in range(PROCESSES)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)

    def with_zproc(stateful: bool, target: Callable[..., Any] = _noop) -> Callable[[], None]:
        def run() -> None:
            processes = [ctx.process(target, stateful=stateful) for _ in range(PROCESSES)]
            for process in processes:
                process.wait(60)
            ctx.process_list.clear()

        return run

    baseline, stateful, stateless, reading = _medians(
        [with_multiprocessing, with_zproc(True), with_zproc(False), with_zproc(True, _read_one)],
        repeat,
        warmup=2,
        block=5,
    )
    name = "multiprocessing.Process (fork)"
    return [
        row(
            f"spawn_join_{PROCESSES} ctx.process",
            stateful * 1e3,
            "ms",
            name,
            baseline * 1e3,
            target="<= 1.5",
            note="default stateful=True: each child gets a State (it connects on first use)",
        ),
        row(
            f"spawn_join_{PROCESSES} ctx.process(stateful=False)",
            stateless * 1e3,
            "ms",
            name,
            baseline * 1e3,
            target="<= 1.5",
        ),
        row(
            f"spawn_join_{PROCESSES} ctx.process, child reads a key",
            reading * 1e3,
            "ms",
            name,
            baseline * 1e3,
            note="each child connects to the server and makes one request; the baseline "
            "does neither",
        ),
    ]


def bench_map(ctx: zproc.Context, repeat: int) -> list[dict[str, Any]]:
    expected = [x * x for x in range(ITEMS)]
    with FORK.Pool(WORKERS) as pool:
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
    return [
        row(
            f"process_map_{ITEMS}",
            value * 1e3,
            "ms",
            f"Pool({WORKERS}).map",
            baseline * 1e3,
            target="<= 0.5",
        )
    ]


def bench_map_cold(repeat: int) -> list[dict[str, Any]]:
    times: list[float] = []
    baseline: list[float] = []

    def with_pool() -> None:
        with FORK.Pool(WORKERS) as pool:
            pool.map(_square, range(ITEMS))

    for _ in range(repeat):
        with zproc.Context() as ctx:
            times.append(
                _timed(lambda: list(ctx.process_map(_square, range(ITEMS), count=WORKERS)))
            )
        baseline.append(_timed(with_pool))
    return [
        row(
            f"process_map_{ITEMS}_cold",
            statistics.median(times) * 1e3,
            "ms",
            f"Pool({WORKERS}) + map",
            statistics.median(baseline) * 1e3,
            note="includes starting (and, for the Pool, closing) the workers",
        )
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    with zproc.Context() as ctx:
        rows = bench_spawn(ctx, repeat=5 if quick else 20)
        rows += bench_map(ctx, repeat=20 if quick else 100)
    rows += bench_map_cold(repeat=3 if quick else 7)
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
