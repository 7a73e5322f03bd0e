"""Threads: 4 threads sharing one ``State`` versus 4 threads with a ``State`` each.

Run from the repository root::

    python -m benchmarks --only threads      (or: python -m benchmarks.bench_threads)

Rows (medians of several repetitions; the two variants take turns in each repetition,
on the same server, so that they share the machine's noise):

* ``threads.shared set`` / ``threads.shared get``: the aggregate rate of 4 threads doing
  ``state[k] = v`` (or ``state[k]``) on ONE State, each on its own key, versus the same
  4 threads each with a State of its own. A shared State gives each thread a connection
  of its own and holds no lock across a round trip, so the target is a ratio >= 0.9.

All the threads of a round start together at a barrier; the aggregate is all operations
over the wall time from that start to the last thread's end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import median, row, zproc_server

THREADS = 4
TARGET = ">= 0.9"


def _aggregate(ops: list[Callable[[int], Any]], n: int) -> float:
    """Operations per second of ``len(ops)`` threads, thread ``i`` calling ``ops[i]`` n times."""
    barrier = threading.Barrier(len(ops) + 1, timeout=60)
    ends: list[float] = []
    errors: list[BaseException] = []

    def work(op: Callable[[int], Any]) -> None:
        try:
            barrier.wait()
            for i in range(n):
                op(i)
            ends.append(time.perf_counter())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(op,)) for op in ops]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    if len(ends) != len(ops):
        raise RuntimeError("a benchmark thread did not finish within 120 s")
    return len(ops) * n / (max(ends) - start)


def _ops(states: list[zproc.State], kind: str) -> list[Callable[[int], Any]]:
    """One operation per thread: thread ``i`` uses ``states[i]`` (maybe one State for all)."""
    ops: list[Callable[[int], Any]] = []
    for index, state in enumerate(states):
        key = f"t{index}"
        state[key] = 0
        if kind == "set":
            ops.append(lambda i, s=state, k=key: s.__setitem__(k, i))
        else:
            ops.append(lambda i, s=state, k=key: s[k])
    return ops


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    n, reps = (300, 3) if quick else (1500, 5)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        shared = stack.enter_context(zproc.State(address))
        own = [stack.enter_context(zproc.State(address)) for _ in range(THREADS)]
        for kind in ("set", "get"):
            variants = {"shared": _ops([shared] * THREADS, kind), "own": _ops(own, kind)}
            for ops in variants.values():
                _aggregate(ops, n // 5)  # warm-up (the shared State connects each thread)
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for rep in range(reps):
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for name in order:
                    rates[name].append(_aggregate(variants[name], n))
            rows.append(row(
                f"threads.shared {kind}", median(rates["shared"]), "ops/s",
                f"{THREADS} threads, a State each", median(rates["own"]), target=TARGET,
                note=f"{THREADS} threads sharing one State",
            ))
    return rows


def main() -> None:
    from .__main__ import print_table

    rows = run()
    print_table(rows)
    for result in rows:
        print(f"{result['name']}: ratio {result['ratio']:.3f} (shared / a State each)")


if __name__ == "__main__":
    main()
