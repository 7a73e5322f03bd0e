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
  (loading its snapshot and replaying its journal), versus starting an empty server;
* ``persist.restart big journal``: the same on a file whose journal holds about 10,000
  rows of a big value (a list of 600 strings, set again and again; compacted once, so
  the rows before the snapshot are the replay history) (2,000 rows with ``--quick``);
* ``persist.row append``: the journal bytes per ``append`` of one item to a list of
  4,000 items (in an atomic function), next to the bytes of setting a small integer.

Run only the two journal measurements, at full size: ``python -m benchmarks.bench_persist
--journal``.

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


BIG_ITEMS = 600  # strings in the big value: about 6 KB pickled
LIST_ITEMS = 4000


def _big_value(i: int) -> list[str]:
    return [f"{i}:{j:04d}" for j in range(BIG_ITEMS)]


def _journal_size(path: str, after: int = 0) -> tuple[int, int]:
    """Rows and bytes (events and old values) of a persist file's journal after seq ``after``."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        rows, size = db.execute(
            "SELECT COUNT(*), TOTAL(LENGTH(event) + IFNULL(LENGTH(old), 0)) FROM journal "
            "WHERE seq > ?", (after,)
        ).fetchone()
    finally:
        db.close()
    return int(rows), int(size)


def _start_times(path: str, reps: int) -> tuple[float, float]:
    """Median seconds of ``start_server`` on ``path``, and of an empty start."""
    restart, empty = [], []
    for _ in range(reps):
        for timings, options in ((restart, {"persist": path}), (empty, {})):
            t0 = time.perf_counter()
            process, _ = zproc.start_server(timeout=120, **options)
            timings.append(time.perf_counter() - t0)
            stop_process(process)
    return median(restart), median(empty)


def bench_big_journal(folder: str, rows: int, reps: int = 3) -> list[dict[str, Any]]:
    """Start time on a journal of about ``rows`` rows of a big value.

    ``compact_after=rows`` with the default history (10,000 events): one compaction after
    ``rows`` changes keeps them all as the replay history; 1% more follow the snapshot.
    """
    path = os.path.join(folder, "big.db")
    process, address = zproc.start_server(
        timeout=60, persist=path, fsync="never", compact_after=rows
    )
    try:
        with zproc.State(address) as state:
            for i in range(rows + rows // 100):
                state["big"] = _big_value(i)
    finally:
        stop_process(process)
    count, size = _journal_size(path)
    restart, empty = _start_times(path, reps)
    return [
        row("persist.restart big journal", restart, "s", "start_server, no persist", empty,
            note=f"{count} journal rows, {size / 1e6:.0f} MB")
    ]


def _append(d: dict[str, Any], item: int) -> None:
    d["items"].append(item)


def bench_append_rows(folder: str, appends: int = 200) -> list[dict[str, Any]]:
    """Journal bytes per append of one item to a list of 4,000 items."""
    sizes = {}
    for name in ("append", "set"):
        path = os.path.join(folder, f"rows-{name}.db")
        process, address = zproc.start_server(timeout=60, persist=path, fsync="never")
        try:
            with zproc.State(address) as state:
                state["items"] = list(range(LIST_ITEMS))
                append = zproc.atomic(_append)
                for i in range(appends):
                    if name == "append":
                        append(state, i)
                    else:
                        state["n"] = i
        finally:
            stop_process(process)
        count, size = _journal_size(path, after=1)  # not the row that made the list
        sizes[name] = size / count
    return [
        row(f"persist.row append to {LIST_ITEMS} items", sizes["append"], "bytes",
            "persist.row set a small int", sizes["set"])
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
        rows += bench_big_journal(folder, 2_000 if quick else 10_000)
        rows += bench_append_rows(folder)
    return rows


if __name__ == "__main__":
    import sys

    from ._common import environment

    print(environment())
    if "--journal" in sys.argv[1:]:
        with private_dir() as folder:
            results = bench_big_journal(folder, 10_000) + bench_append_rows(folder)
    else:
        results = run(quick=True)
    for r in results:
        print(r)
