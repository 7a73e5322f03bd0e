"""Atomic functions: increments per second, next to plain sets measured in the same run.

Run from the repository root::

    python -m benchmarks --only atomic

Rows (medians of several repetitions after a warm-up; the three operations take turns
within each repetition):

* ``atomic.@atomic incr``: a ``@zproc.atomic`` function defined in this module
  (``d[key] = d.get(key, 0) + 1``, returning the new value), called as users call it.
* ``atomic.by value incr``: the same increment as a closure (like a function defined in
  ``__main__``, it travels by value: pickled once, then named by its digest).
* ``atomic.zproc.increase``: the ready-made helper.
* Both with 1 client (this process) and with 4 client processes (aggregate rate, each on
  its own key, started together at a barrier); the baseline is ``state[key] = i`` round
  trips, measured the same way in the same run.

The target says an atomic call costs at most 1.2x a plain set; on rates that is
``ratio >= 1/1.2 = 0.83``. At the end the counters are checked: every increment counted.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import Counter, WorkerGroup, median, row, time_loop, zproc_server

CLIENTS = 4
TARGET = ">= 0.83"
NOTE = "target: an atomic call costs at most 1.2x a set, i.e. rate ratio >= 1/1.2"


@zproc.atomic
def bump(d: dict[str, Any], key: str) -> int:
    d[key] = d.get(key, 0) + 1
    return d[key]  # type: ignore[no-any-return]


def _by_value() -> Callable[..., int]:
    """The increment of :func:`bump` as a closure: pickled by value, not by name."""

    def bump_closure(d: dict[str, Any], key: str) -> int:
        d[key] = d.get(key, 0) + 1
        return d[key]  # type: ignore[no-any-return]

    return zproc.atomic(bump_closure)


def _ops(state: zproc.State, index: int) -> dict[str, Callable[[int], Any]]:
    set_key, bump_key, inc_key = f"set{index}", f"bump{index}", f"inc{index}"
    val_key = f"val{index}"
    state.update({set_key: 0, bump_key: 0, inc_key: 0, val_key: 0})
    by_value = _by_value()
    return {
        "set": lambda i: state.__setitem__(set_key, i),
        "atomic": lambda i: bump(state, bump_key),
        "byvalue": lambda i: by_value(state, val_key),
        "increase": lambda i: zproc.increase(state, inc_key),
    }


def _client(address: Any) -> Callable[[int], Any]:
    def factory(index: int) -> Any:
        state = zproc.State(address)
        return _ops(state, index), state.close

    return factory


OPS = ("set", "atomic", "byvalue", "increase")
NAMES = {"atomic": "atomic.@atomic incr", "byvalue": "atomic.by value incr",
         "increase": "atomic.zproc.increase"}
VARIANTS = ("atomic", "byvalue", "increase")


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    n, reps, warmup = (500, 3, 100) if quick else (2000, 5, 300)
    multi_n = n // 2
    counter = Counter()
    calls: dict[str, int] = {}  # increments made per key, to check the result

    def count(key: str, amount: int) -> None:
        calls[key] = calls.get(key, 0) + amount

    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        state = stack.enter_context(zproc.State(address))
        ops = _ops(state, 99)
        prefixes = {"atomic": "bump", "byvalue": "val", "increase": "inc"}
        keys = {op: f"{prefix}99" for op, prefix in prefixes.items()}

        # one client
        for op in OPS:
            time_loop(ops[op], warmup, counter.take(warmup))
            if op in keys:
                count(keys[op], warmup)
        times: dict[str, list[float]] = {op: [] for op in OPS}
        for rep in range(reps):
            for op in OPS[rep % len(OPS):] + OPS[:rep % len(OPS)]:
                times[op].append(n / time_loop(ops[op], n, counter.take(n)))
                if op in keys:
                    count(keys[op], n)
        for op in VARIANTS:
            rows.append(row(f"{NAMES[op]} 1 client", median(times[op]), "ops/s",
                            "state[k] = v, 1 client", median(times["set"]), target=TARGET,
                            note=NOTE if op != "increase" else None))

        # four clients
        group = stack.enter_context(WorkerGroup(_client(address), CLIENTS, "atomic"))
        for op in OPS:
            group.run(op, warmup, counter)
        for index in range(CLIENTS):
            for prefix in prefixes.values():
                count(f"{prefix}{index}", warmup)
        rates: dict[str, list[float]] = {op: [] for op in OPS}
        for rep in range(reps):
            for op in OPS[rep % len(OPS):] + OPS[:rep % len(OPS)]:
                rates[op].append(group.run(op, multi_n, counter))
                if op in prefixes:
                    for index in range(CLIENTS):
                        count(f"{prefixes[op]}{index}", multi_n)
        for op in VARIANTS:
            rows.append(row(f"{NAMES[op]} x{CLIENTS} clients", median(rates[op]), "ops/s",
                            f"state[k] = v, x{CLIENTS} clients", median(rates["set"]),
                            target=TARGET))

        # every increment must have landed
        final = state.copy()
        wrong = {key: (final.get(key), expected) for key, expected in calls.items()
                 if final.get(key) != expected}
        if wrong:
            raise RuntimeError(f"atomic increments lost or duplicated: {wrong}")
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
