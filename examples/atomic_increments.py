"""Atomic increments: why ``state["n"] += 1`` loses updates, and how ``@zproc.atomic`` doesn't.

``state["n"] += 1`` is two requests: a read, then a write of the old value plus one.
When several processes do it at the same time, two of them can read the same value and
both write "value + 1": one increment is lost. Each single request is atomic, but two in
a row are not.

An ``@zproc.atomic`` function is sent to the state server and runs there on the real
dict, with no other request in between, so read-add-write is one step and no increment
is ever lost. (``zproc.increase(state, "n")`` is the ready-made version.)

Both counters get the same work: PROCESSES processes doing INCREMENTS increments each.

Run it with ``python examples/atomic_increments.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import zproc

PROCESSES = 4
INCREMENTS = 300


@zproc.atomic
def increment(d: dict[str, int], key: str) -> int:
    """Runs inside the state server: nobody can change the dict meanwhile."""
    d[key] += 1
    return d[key]


def racy_worker(state: zproc.State, times: int) -> None:
    state.get_when_equal("go", True, timeout=30)  # start together
    for _ in range(times):
        state["racy"] += 1  # read ... (another process may write here) ... write


def atomic_worker(state: zproc.State, times: int) -> None:
    state.get_when_equal("go", True, timeout=30)
    for _ in range(times):
        increment(state, "exact")


def run(ctx: zproc.Context, worker: Callable[..., None]) -> None:
    ctx.state["go"] = False
    workers = ctx.process_factory(worker, count=PROCESSES, args=(INCREMENTS,))
    ctx.state["go"] = True
    for process in workers:
        process.wait(timeout=60)


def main() -> None:
    expected = PROCESSES * INCREMENTS
    with zproc.Context() as ctx:
        ctx.state.update(racy=0, exact=0)
        print(f"{PROCESSES} processes x {INCREMENTS} increments = {expected} expected")

        run(ctx, racy_worker)
        racy = ctx.state["racy"]
        print(f"racy   (state[key] += 1): {racy} ({expected - racy} increments lost)")

        run(ctx, atomic_worker)
        exact = ctx.state["exact"]
        print(f"atomic (@zproc.atomic)  : {exact} ({expected - exact} increments lost)")


if __name__ == "__main__":
    main()
