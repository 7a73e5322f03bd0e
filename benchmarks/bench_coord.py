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
* ``coord.queue items/s``: one producer (this process) puts ``N`` ints and then None,
  one consumer process gets until None; items per second from the first put to the last
  get; baseline: the same through ``multiprocessing.Manager().Queue()``. The issue's
  target is at least 2x.
* ``coord.queue items/s, persist fsync=...``: the same on a server with ``persist=``
  (queue items journaled in its SQLite file, removed as they are acknowledged), for
  ``fsync="always"`` and ``"every second"``, next to the server without persistence.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import (
    FORK, Counter, manager_dict, median, now, private_dir, recv, row, send_error, stop_process,
    time_loop, zproc_server,
)

HANDOFFS = 200
QUEUE_N = 20000
PERSIST_POLICIES = ("always", "every second")


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


def _consumer(queue: Any, address: Any, conn: Any) -> None:
    """Get until None each time told to (from the queue, or ``state.queue(queue)``); report
    the time of the last item and how many came in order."""
    try:
        with ExitStack() as stack:
            if address is not None:
                queue = stack.enter_context(zproc.State(address)).queue(queue)
            conn.send("ready")
            while conn.recv() == "go":
                expect = 0
                for item in iter(queue.get, None):
                    expect += item == expect
                conn.send((now(), expect))
    except Exception:
        send_error(conn)


def _queue_rate(queue: Any, here: Any, n: int) -> float:
    here.send("go")
    t0 = now()
    for i in range(n):
        queue.put(i)
    queue.put(None)
    t1, in_order = recv(here, 60, "queue consumer")
    if in_order != n:
        raise AssertionError(f"the consumer got {in_order} of {n} items in order")
    return n / (t1 - t0)


def queue_rows(quick: bool, stack: ExitStack, address: Any, mqueue: Any) -> list[dict[str, Any]]:
    """One producer and one consumer process: zproc's queue next to the Manager's, and on
    servers that persist it."""
    n, reps = (5000, 2) if quick else (QUEUE_N, 3)
    folder = stack.enter_context(private_dir())
    addresses = {"zproc": address}
    for fsync in PERSIST_POLICIES:
        addresses[fsync] = stack.enter_context(
            zproc_server(persist=f"{folder}/{fsync.replace(' ', '-')}.db", fsync=fsync)
        )
    queues: dict[str, Any] = {
        kind: stack.enter_context(zproc.State(where)).queue("bench-queue")
        for kind, where in addresses.items()
    }
    queues["manager"] = mqueue
    pipes = {}
    for kind, queue in queues.items():
        here, there = FORK.Pipe()
        args = (queue, None, there) if kind == "manager" else (
            "bench-queue", addresses[kind], there)
        consumer = FORK.Process(target=_consumer, args=args, daemon=True)
        consumer.start()
        stack.callback(stop_process, consumer)
        recv(here, 30, "queue consumer")
        pipes[kind] = here
    rates: dict[str, list[float]] = {kind: [] for kind in queues}
    kinds = list(queues)
    for rep in range(reps):
        for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
            rates[kind].append(_queue_rate(queues[kind], pipes[kind], n))
    for here in pipes.values():
        here.send("stop")
    plain = median(rates["zproc"])
    return [row("coord.queue items/s (1 producer, 1 consumer)", plain,
                "items/s", "Manager().Queue()", median(rates["manager"]), target=">= 2")] + [
        row(f"coord.queue items/s, persist fsync={fsync!r}", median(rates[fsync]), "items/s",
            "the queue without persist=", plain)
        for fsync in PERSIST_POLICIES
    ]


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
        if hasattr(mdict, "_manager"):
            rows += queue_rows(quick, stack, address, mdict._manager.Queue())
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
