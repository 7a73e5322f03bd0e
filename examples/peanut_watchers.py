"""Live, buffered and hybrid watchers, with a peanut producer and slow peanut eaters.

A producer process makes a new peanut (``state["peanut"] = n``) every PACE seconds. A
consumer in the main process takes peanuts with ``get_when_change("peanut")`` and needs
EAT seconds to eat each one, so it is slower than the producer. Three consumers, each
with its own State, show the three ways of watching:

live (``live=True``, the default)
    Each call waits for the *next* change after the call starts. Peanuts made while the
    consumer was eating are skipped: you always get a fresh one.

buffered (``live=False``)
    The State keeps every change made since it was created in a buffer, and each call
    takes the oldest one. Nothing is skipped, in order, but the consumer falls further
    and further behind the producer.

hybrid (``live=False``, plus ``go_live()`` now and then)
    Buffered, but when the backlog gets too long the consumer calls ``state.go_live()``,
    which drops what piled up; the next call gets the first peanut made after that.

Run it with ``python examples/peanut_watchers.py``.
"""

from __future__ import annotations

import time

import zproc

PACE = 0.05  # the producer makes a peanut this often (seconds)
EAT = 0.2  # a consumer needs this long to eat one
TAKE = 5  # peanuts each consumer eats
MAX_BACKLOG = 3  # the hybrid consumer catches up when it is further behind than this


def producer(state: zproc.State, count: int) -> int:
    for n in range(1, count + 1):
        state["peanut"] = n
        time.sleep(PACE)
    return count


def skipped(got: list[int]) -> int:
    return sum(b - a - 1 for a, b in zip(got, got[1:], strict=False))


def live(state: zproc.State) -> list[int]:
    got = []
    for _ in range(TAKE):
        got.append(state.get_when_change("peanut", timeout=10))
        time.sleep(EAT)
    return got


def buffered(state: zproc.State) -> list[int]:
    got = []
    for _ in range(TAKE):
        got.append(state.get_when_change("peanut", live=False, timeout=10))
        time.sleep(EAT)
    return got


def hybrid(state: zproc.State) -> tuple[list[int], int]:
    got, catch_ups = [], 0
    for _ in range(TAKE):
        got.append(state.get_when_change("peanut", live=False, timeout=10))
        time.sleep(EAT)
        if state["peanut"] - got[-1] > MAX_BACKLOG:
            state.go_live()  # forget the backlog; carry on from now
            catch_ups += 1
    return got, catch_ups


def main() -> None:
    with zproc.Context() as ctx:
        print(f"one peanut every {PACE * 1000:.0f} ms; eating one takes {EAT * 1000:.0f} ms")
        ctx.process(producer, args=(1000,))
        ctx.state.get_when_available("peanut", timeout=10)  # the producer is running

        with ctx.create_state() as state:
            got = live(state)
        print(f"live:     {got} -> skipped {skipped(got)} peanuts made while eating")

        with ctx.create_state() as state:
            got = buffered(state)
            behind = state["peanut"] - got[-1]
        print(f"buffered: {got} -> none skipped: {skipped(got) == 0}; now {behind} peanuts behind")

        with ctx.create_state() as state:
            got, catch_ups = hybrid(state)
        print(
            f"hybrid:   {got} -> in order, except {catch_ups} go_live() catch-ups "
            f"that skipped {skipped(got)}"
        )


if __name__ == "__main__":
    main()
