"""The worker swarm against :mod:`multiprocessing`, and how it scales with its workers.

Run from the repository root::

    python -m benchmarks --only swarm [--quick]

Rows (medians; a row and its baseline take turns by blocks of repetitions, so drifts in
the machine's load affect both alike):

* ``swarm_map_trivial``: ``swarm.map(f, range(10_000))`` with ``f(x) = x * x`` on 2
  running local workers, versus ``Pool(2).map`` on a running pool (default chunksize).
  Target: at least as fast (ratio <= 1).
* ``swarm_map_1ms``: the same with a function that computes for 1 ms per item (a busy
  loop, so the two workers really need the two CPUs). Target: ratio <= 1.
* ``swarm_scaling``: items per second of the 1 ms map with 2 workers, versus 1 worker
  (``ratio`` is the speed-up; 2 would be perfect, the caller and the broker share the
  machine's CPUs with the workers).

Everything goes through the broker in the server process, as in a multi-host swarm (the
workers here are local only to keep the comparison with ``Pool`` fair).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zproc

from ._common import row

TRIVIAL_ITEMS = 10_000
WORKERS = 2
BUSY = 0.001

FORK = multiprocessing.get_context("fork")


def _square(x: int) -> int:
    return x * x


def _busy(x: int) -> int:
    end = time.perf_counter() + BUSY
    while time.perf_counter() < end:
        pass
    return x


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(fns: list[Callable[[], object]], repeat: int, block: int) -> list[float]:
    """Median seconds of each function over ``repeat`` calls, taking turns by blocks."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeat:
        for fn, bucket in zip(fns, times, strict=True):
            fn()
            bucket.extend(_timed(fn) for _ in range(block))
    return [statistics.median(bucket) for bucket in times]


def bench_vs_pool(swarm: zproc.Swarm, quick: bool) -> list[dict[str, Any]]:
    busy_items = 200 if quick else 1000
    rows = []
    with FORK.Pool(WORKERS) as pool:
        for name, fn, items, repeat, block in [
            ("swarm_map_trivial", _square, TRIVIAL_ITEMS, 20 if quick else 100, 10),
            ("swarm_map_1ms", _busy, busy_items, 6 if quick else 20, 3),
        ]:
            expected = [fn(x) for x in range(min(items, 100))]
            assert swarm.map(fn, range(items))[:100] == expected
            inputs = range(items)
            value, baseline = _medians(
                [partial(swarm.map, fn, inputs), partial(pool.map, fn, inputs)], repeat, block
            )
            rows.append(row(
                f"{name}_{items}", value * 1e3, "ms", f"Pool({WORKERS}).map", baseline * 1e3,
                target="<= 1.0",
            ))
    return rows


def bench_scaling(quick: bool) -> list[dict[str, Any]]:
    """The 1 ms map on a swarm of 1 worker and on one of 2, taking turns (two servers:
    every worker of a server serves every task sent to it)."""
    items = 200 if quick else 1000
    repeat = 6 if quick else 16
    with zproc.Context() as one, zproc.Context() as two:
        single, double = one.create_swarm(1), two.create_swarm(2)
        seconds = _medians(
            [partial(single.map, _busy, range(items)), partial(double.map, _busy, range(items))],
            repeat,
            2,
        )
    rates = {1: items / seconds[0], 2: items / seconds[1]}
    return [
        row(
            f"swarm_scaling_1ms_{items}", rates[2], "items/s", "the same map, 1 worker",
            rates[1], target=">= 1.5",
            note=f"1 worker: {rates[1]:.0f} items/s, 2 workers: {rates[2]:.0f} items/s "
                 f"(ideal: {1 / BUSY:.0f} per worker); the caller and the broker share the "
                 f"CPUs with the workers",
        )
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    with zproc.Context() as ctx:
        rows = bench_vs_pool(ctx.create_swarm(WORKERS), quick)
    return rows + bench_scaling(quick)


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
