"""A parallel map with ``ctx.process_map``: lazy results, always in input order.

``ctx.process_map(fn, items, count=N)`` cuts the items into N consecutive chunks and
sends one chunk to each of N worker processes. It returns at once with a lazy iterator;
the work has already started. Iterating yields the results in the order of the input,
each as soon as it (and everything before it) is ready.

The function may be a lambda or a closure: it travels to the workers with cloudpickle.
Here the *first* items are made the slowest, so the second chunk finishes long before
the first one: the results still come back in order, and the first one appears only when
it is ready. The workers stay around and are reused by the next ``process_map`` call.

Run it with ``python examples/process_map.py``.
"""

from __future__ import annotations

import time

import zproc


def slowly(x: int) -> int:
    """Return ``x`` after a pause, the longer the smaller ``x`` is."""
    time.sleep(0.03 * (10 - x))
    return x


def main() -> None:
    with zproc.Context() as ctx:
        start = time.monotonic()
        # items 0..4 go to the first worker, 5..9 to the second; early items are slow
        results = ctx.process_map(lambda x: slowly(x) ** 2, range(10), count=2)
        print(f"process_map returned a lazy iterator after {time.monotonic() - start:.2f} s")
        for x, square in zip(range(10), results, strict=True):
            print(f"  {x}^2 = {square:2d}  at {time.monotonic() - start:.2f} s")

        # the same two workers again, with an extra fixed argument and keyword
        powers = ctx.process_map(
            lambda x, n, *, plus: x**n + plus, range(6), args=(3,), kwargs={"plus": 1}, count=2
        )
        print(f"x**3 + 1 for x in 0..5: {list(powers)}")
        print(f"workers: {len(ctx.worker_list)}")


if __name__ == "__main__":
    main()
