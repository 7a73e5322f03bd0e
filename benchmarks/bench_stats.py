"""The cost of the server's figures (``State.stats()``): the set rate with and without them.

Run from the repository root::

    python -m benchmarks --only stats

Two servers run side by side in one run: one as ``start_server`` makes it (counting every
request for ``stats()``: kinds, clients, durations for the slow log, bytes) and one with
the counting turned off (``collect_stats=False``, a server option kept for this
comparison). One client sets a fresh integer again and again on each, the two taking
turns in chunks within each repetition so that they share the machine's noise; the row is
the median rate of the counting server, with the other as its baseline. The aim: a ratio
of at least 0.97 (the figures cost at most 3% of the single-client set rate). On a busy
machine that ratio wanders by more than 3% either way from run to run, so a second row
times the counting alone (``Meter.begin`` and ``Meter.note`` for one request, in this
process) against one set's round trip.

``ratio = value / baseline_value``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import zproc
from zproc import _protocol as P
from zproc._launch import serve
from zproc._proctree import owner_token
from zproc._stats import Meter

from ._common import FORK, Counter, median, recv, row, stop_process, time_loop

KEYS = [f"key{i}" for i in range(10)]
CHUNK = 50  # sets in a row on one server before the client turns to the other


@contextmanager
def _server(collect_stats: bool) -> Iterator[zproc.ServerAddress]:
    """A server process on a random address, counting or not."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    process = FORK.Process(
        target=serve, args=(None, sender, {"collect_stats": collect_stats}, owner_token()),
        name="zproc-server",
    )
    process.start()
    sender.close()
    try:
        status, address = recv(receiver, 30, "server")
        assert status == "ok", status
        yield zproc.ServerAddress(*address)
    finally:
        receiver.close()
        stop_process(process)


def _setter(state: zproc.State) -> Callable[[int], None]:
    keys, m = KEYS, len(KEYS)

    def op(i: int) -> None:
        state[keys[i % m]] = i

    return op


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The single-client set rate with and without the figures."""
    n, reps, warmup = (800, 3, 200) if quick else (4000, 7, 1000)
    counter = Counter()
    with ExitStack() as stack:
        ops = {
            collect: _setter(stack.enter_context(zproc.State(
                stack.enter_context(_server(collect)))))
            for collect in (True, False)
        }
        for fn in ops.values():
            time_loop(fn, warmup, counter.take(warmup))
        chunk, chunks = CHUNK, max(1, n // CHUNK)
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(reps):
            spent = dict.fromkeys(ops, 0.0)
            for c in range(chunks):
                order = [True, False] if (rep + c) % 2 == 0 else [False, True]
                for collect in order:
                    spent[collect] += time_loop(ops[collect], chunk, counter.take(chunk))
            for collect, seconds in spent.items():
                times[collect].append(seconds)
        n = chunk * chunks
    on, off = median([n / t for t in times[True]]), median([n / t for t in times[False]])
    note = _note_cost()
    return [
        row("stats.set 1 client, figures counted", on, "ops/s", "collect_stats=False", off,
            target=">= 0.97"),
        # the same question without the network's noise: what the loop adds per request
        # (Meter.begin + Meter.note, the batch of a lone client being one request), as a
        # share of one set's round trip
        row("stats.counting per request", note * 1e6, "us", "one set round trip (counted)",
            1e6 / on, target="<= 0.03"),
    ]


def _note_cost(n: int = 200_000) -> float:
    """Seconds the server's loop spends counting one request of a lone client."""
    meter = Meter(0.1)
    frames = [b"\x01" * 8, P.request_frame(int(P.Kind.CALL), int(P.Method.SETITEM), 7,
                                           b"default", b"\x00" * 40)]
    begin, note = meter.begin, meter.note
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            begin()
            note(frames)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


if __name__ == "__main__":
    for result in run():
        print(f"{result['name']}: {result['value']:.3g} {result['unit']} vs "
              f"{result['baseline_value']:.3g} ({result['baseline']}): ratio {result['ratio']:.3f}")
