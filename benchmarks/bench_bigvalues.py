"""Big values: a ``bytes`` value set then read back, next to a raw pyzmq round trip.

Run from the repository root::

    python -m benchmarks --only bigvalues

Rows (medians of several repetitions after a warm-up; in each repetition the two sides
take turns, A B B A, so that they share the machine's noise):

* ``bigvalues.set+get <size>``: milliseconds for ``state[k] = value`` then ``state[k]``
  with a ``bytes`` value of 1 KB, 100 KB, 1 MB and 10 MB (values of 64 KiB and more
  travel as frames of their own, without copies), versus one raw pyzmq DEALER/ROUTER
  round trip of the same bytes: the DEALER sends them, a ROUTER in another process
  receives them and sends them back without copying them. The client side of the raw
  round trip is measured twice: with pyzmq's defaults (``send_multipart`` and
  ``recv_multipart`` copy the bytes) and without copies (``copy=False`` both ways, the
  reply compared through its buffer). The target (10 MB) is at most 1.5x the raw round
  trip without copies. The value is the same at every turn: a set that changes nothing
  makes no event.
* ``bigvalues.change+get <size>``: the same, setting two values by turns, so that every
  set is a change, with its event (broadcast, kept in the replay history), next to the
  same raw round trip without copies. The target holds for it too.

Both sides run over ipc on this machine. What comes back is checked once per size, out of
the timed loops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import zmq

import zproc

from ._common import FORK, median, private_dir, recv, row, send_error, stop_process, zproc_server

SIZES = (("1 KB", 1_000), ("100 KB", 100_000), ("1 MB", 1_000_000), ("10 MB", 10_000_000))
TARGET = "<= 1.5"
TARGET_SIZE = "10 MB"


def _echo_main(endpoint: str, conn: Any) -> None:
    """A ROUTER that sends every message back to its sender, as it came (no copies)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    try:
        sock.bind(endpoint)
        conn.send("ok")
        conn.close()
        while True:
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    except Exception:
        send_error(conn)
    finally:
        sock.close(0)
        ctx.term()


@contextmanager
def _raw_echo() -> Iterator[tuple[Callable[[bytes], bytes], Callable[[bytes], Any]]]:
    """A bytes echo server in its own process; yields ``round_trip(data) -> data`` with
    pyzmq's defaults and without copies (-> a buffer)."""
    with private_dir() as folder:
        endpoint = f"ipc://{folder}/bytes-echo"
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(target=_echo_main, args=(endpoint, sender), daemon=True)
        process.start()
        sender.close()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = 30_000  # a lost reply raises zmq.Again, never hangs
        try:
            if recv(receiver, 30, "raw bytes echo") != "ok":
                raise RuntimeError("raw bytes echo did not start")
            sock.connect(endpoint)

            def round_trip(data: bytes) -> bytes:
                sock.send_multipart([data])
                return sock.recv_multipart()[0]  # type: ignore[no-any-return]

            def zero_copy(data: bytes) -> Any:
                sock.send(data, copy=False)
                return sock.recv(copy=False).buffer

            yield round_trip, zero_copy
        finally:
            sock.close(0)
            ctx.term()
            receiver.close()
            stop_process(process)


def _timed(fn: Callable[[], Any], n: int) -> float:
    """Milliseconds per call of ``fn``, over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1000 / n


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    reps = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        state = stack.enter_context(zproc.State(address))
        round_trip, zero_copy = stack.enter_context(_raw_echo())
        for label, size in SIZES:
            value = os.urandom(size)
            values = [os.urandom(size), value]
            n = max(4, min(300, 20_000_000 // (size * 20))) // 2 * 2  # even: ends on value
            turns = iter(range(1 << 62))

            def zproc_op(value: bytes = value) -> Any:
                state["big"] = value
                return state["big"]

            def zproc_change(values: list[bytes] = values, turns: Iterator[int] = turns) -> Any:
                state["big"] = values[next(turns) & 1]
                return state["big"]

            def raw_op(value: bytes = value) -> Any:
                return round_trip(value)

            def raw_zero_copy(value: bytes = value) -> Any:
                return zero_copy(value)

            times: dict[str, list[float]] = {"zproc": [], "raw": [], "zero": [], "change": []}
            order = [("zproc", zproc_op), ("raw", raw_op), ("zero", raw_zero_copy),
                     ("change", zproc_change)]
            for what, op in order:  # warm-up, and the one check of what comes back
                if what == "change":
                    op()  # the other value; then this one
                if bytes(op()) != value:
                    raise RuntimeError(f"{what}: a {label} value came back different")
            for _ in range(reps):
                for name, op in order + order[::-1]:  # A B C C B A
                    times[name].append(_timed(op, n))
            zs = times["zproc"]
            for name, what in (("zero", "without copies"), ("raw", "pyzmq defaults")):
                ratios = sorted(z / r for z, r in zip(zs, times[name], strict=True))
                rows.append(row(
                    f"bigvalues.set+get {label}", median(zs), "ms",
                    f"raw round trip {label}, {what}", median(times[name]),
                    target=TARGET if label == TARGET_SIZE and name == "zero" else None,
                    note=f"ratio per turn {ratios[0]:.2f}-{ratios[-1]:.2f} (lowest-highest)",
                ))
            changes = times["change"]
            ratios = sorted(c / r for c, r in zip(changes, times["zero"], strict=True))
            rows.append(row(
                f"bigvalues.change+get {label}", median(changes), "ms",
                f"raw round trip {label}, without copies", median(times["zero"]),
                target=TARGET if label == TARGET_SIZE else None,
                note=f"every set a change, with its event; ratio per turn "
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f} (lowest-highest)",
            ))
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
