"""Durability: write throughput with each ``fsync`` policy, next to no persistence.

Run from the repository root::

    python -m benchmarks --only persist

Four servers run side by side in one run: one without ``persist`` (the baseline) and one
per policy (``always``, ``every second``, ``never``), each with its own SQLite file in a
private temporary directory. Rows (medians of several repetitions, after a warm-up; the
servers take turns within each repetition so that they share the machine's noise):

* ``persist.set 1 client fsync=...``: ``state[k] = v`` per second, one client (every
  request is its own server batch: with ``always``, one commit and one log sync each);
* ``persist.set x4 clients fsync=...``: the aggregate rate of 4 client processes (a
  batch then often carries several writes, sharing one commit);
* ``persist.restart``: seconds for ``start_server`` to come back on the ``always`` file
  (loading its snapshot and replaying its journal), versus starting an empty server.

Every set writes a fresh integer (an unchanged value would be no change at all).
``ratio = value / baseline_value``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import (
    Counter,
    WorkerGroup,
    median,
    private_dir,
    row,
    stop_process,
    time_loop,
    zproc_server,
)

POLICIES = ("always", "every second", "never")
MEMORY = "no persist"
KEYS = [f"key{i}" for i in range(10)]
CLIENTS = 4
CHUNKS = 4


def _file(folder: str, policy: str) -> str:
    return os.path.join(folder, policy.replace(" ", "-") + ".db")


def _setter(state: zproc.State) -> Callable[[int], None]:
    keys, m = KEYS, len(KEYS)

    def op(i: int) -> None:
        state[keys[i % m]] = i

    return op


def bench_single(
    addresses: dict[str, Any], *, n: int, reps: int, warmup: int
) -> list[dict[str, Any]]:
    counter = Counter()
    with ExitStack() as stack:
        ops = {
            name: _setter(stack.enter_context(zproc.State(address)))
            for name, address in addresses.items()
        }
        for fn in ops.values():
            time_loop(fn, warmup, counter.take(warmup))
        names = list(ops)
        chunk = max(1, n // CHUNKS)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps):
            spent = dict.fromkeys(names, 0.0)
            for c in range(CHUNKS):
                shift = (rep + c) % len(names)
                for name in names[shift:] + names[:shift]:
                    spent[name] += time_loop(ops[name], chunk, counter.take(chunk))
            for name, seconds in spent.items():
                times[name].append(seconds)
        n = chunk * CHUNKS

    def rate(name: str) -> float:
        return median([n / t for t in times[name]])

    return [
        row(f"persist.set 1 client fsync={policy}", rate(policy), "ops/s", MEMORY,
            rate(MEMORY))
        for policy in POLICIES
    ]


def _client(address: Any) -> Callable[[int], Any]:
    def factory(index: int) -> Any:
        state = zproc.State(address)
        key = f"client{index}"
        state[key] = 0
        return {"set": lambda i: state.__setitem__(key, i)}, state.close

    return factory


def bench_multi(
    addresses: dict[str, Any], *, n: int, reps: int, warmup: int
) -> list[dict[str, Any]]:
    counter = Counter()
    with ExitStack() as stack:
        groups = {
            name: stack.enter_context(WorkerGroup(_client(address), CLIENTS, f"persist-{name}"))
            for name, address in addresses.items()
        }
        for group in groups.values():
            group.run("set", warmup, counter)
        rates: dict[str, list[float]] = {name: [] for name in groups}
        names = list(groups)
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                rates[name].append(groups[name].run("set", n, counter))
    return [
        row(f"persist.set x{CLIENTS} clients fsync={policy}", median(rates[policy]), "ops/s",
            f"{MEMORY} x{CLIENTS}", median(rates[MEMORY]))
        for policy in POLICIES
    ]


def bench_restart(folder: str, server: Any) -> list[dict[str, Any]]:
    """Stop the ``always`` server, then time a restart on its file against an empty start."""
    stop_process(server)
    path = _file(folder, "always")
    import sqlite3

    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
    db.close()
    restart, empty = [], []
    for _ in range(3):
        for timings, options in ((restart, {"persist": path}), (empty, {})):
            t0 = time.perf_counter()
            process, _ = zproc.start_server(timeout=60, **options)
            timings.append(time.perf_counter() - t0)
            stop_process(process)
    return [
        row("persist.restart", median(restart), "s", "start_server, no persist",
            median(empty), note=f"replays {rows} journal rows")
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    if quick:
        single = {"n": 300, "reps": 3, "warmup": 100}
        multi = {"n": 200, "reps": 3, "warmup": 50}
    else:
        single = {"n": 2000, "reps": 5, "warmup": 300}
        multi = {"n": 1000, "reps": 5, "warmup": 200}
    with ExitStack() as stack:
        folder = stack.enter_context(private_dir())
        addresses = {MEMORY: stack.enter_context(zproc_server())}
        processes: dict[str, Any] = {}
        for policy in POLICIES:
            process, address = zproc.start_server(
                timeout=30, persist=_file(folder, policy), fsync=policy
            )
            stack.callback(stop_process, process)
            processes[policy], addresses[policy] = process, address
        rows = bench_single(addresses, **single)
        rows += bench_multi(addresses, **multi)
        rows += bench_restart(folder, processes["always"])
    return rows


if __name__ == "__main__":
    from ._common import environment

    print(environment())
    for r in run(quick=True):
        print(r)
