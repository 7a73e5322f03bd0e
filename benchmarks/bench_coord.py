"""Locks: an uncontended ``with lock:`` and a hand-off between processes, next to plain
sets and ``multiprocessing.Manager().Lock()`` measured in the same run.

Run from the repository root::

    python -m benchmarks --only coord

Rows (medians of several repetitions after a warm-up; the variants take turns within each
repetition):

* ``coord.with lock: (1 handle)``: microseconds per ``with lock:`` (acquire and release:
  two round trips), the handle made once; baseline: one ``state[k] = v`` round trip. The
  issue's target is at most 2.2x.
* ``coord.Manager().Lock()``: the same cycle on a ``multiprocessing`` Manager lock, for
  reference (no target: it has no owner, no lease and no fencing).
* ``coord.hand-off``: from ``release()`` in this process to ``acquire()`` returning in a
  process blocked on it (median microseconds, one clock for both processes); baseline:
  one set round trip.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import (
    FORK, Counter, manager_dict, median, now, recv, row, send_error, stop_process, time_loop,
    zproc_server,
)

HANDOFFS = 200


def _cycle(lock: Any) -> Any:
    def once(i: int) -> None:
        with lock:
            pass

    return once


def _waiter(address: Any, conn: Any) -> None:
    """Acquire when told, report when acquire() returned, release; until told to stop."""
    try:
        with zproc.State(address) as state:
            lock = state.lock("bench-handoff")
            conn.send("ready")
            while conn.recv() == "go":
                conn.send("waiting")
                lock.acquire()
                conn.send(now())
                lock.release()
    except Exception:
        send_error(conn)


def run(quick: bool = False) -> list[dict[str, Any]]:
    n, reps, warmup = (300, 3, 100) if quick else (1500, 5, 300)
    handoffs = 50 if quick else HANDOFFS
    counter = Counter()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        mdict = stack.enter_context(manager_dict())
        mlock = mdict._manager.Lock() if hasattr(mdict, "_manager") else None
        address = stack.enter_context(zproc_server())
        state = stack.enter_context(zproc.State(address))
        lock = state.lock("bench-handoff")
        ops = {
            "set": lambda i: state.__setitem__("k", i),
            "lock": _cycle(lock),
        }
        if mlock is not None:
            ops["manager"] = _cycle(mlock)
        names = list(ops)
        for op in names:
            time_loop(ops[op], warmup, counter.take(warmup))
        us: dict[str, list[float]] = {op: [] for op in names}
        for rep in range(reps):
            for op in names[rep % len(names):] + names[:rep % len(names)]:
                us[op].append(time_loop(ops[op], n, counter.take(n)) / n * 1e6)
        set_us = median(us["set"])
        rows.append(row("coord.with lock: (1 handle)", median(us["lock"]), "us",
                        "state[k] = v round trip", set_us, target="<= 2.2"))
        if mlock is not None:
            rows.append(row("coord.Manager().Lock() with", median(us["manager"]), "us",
                            "state[k] = v round trip", set_us))

        here, there = FORK.Pipe()
        waiter = FORK.Process(target=_waiter, args=(address, there), daemon=True)
        waiter.start()
        stack.callback(stop_process, waiter)
        recv(here, 30, "hand-off waiter")
        samples = []
        for i in range(handoffs + 10):
            lock.acquire()
            here.send("go")
            recv(here, 30, "hand-off waiter")
            time.sleep(0.002)  # the waiter's acquire is queued at the server
            t0 = now()
            lock.release()
            t1 = recv(here, 30, "hand-off waiter")
            if i >= 10:
                samples.append((t1 - t0) * 1e6)
        here.send("stop")
        rows.append(row("coord.hand-off (median)", median(samples), "us",
                        "state[k] = v round trip", set_us))
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
