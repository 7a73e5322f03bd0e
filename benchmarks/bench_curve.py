"""CURVE: what ``secret_key=`` costs over tcp, against the same server without it.

Run from the repository root::

    python -m benchmarks --only curve

Two servers run side by side on loopback tcp, one started with ``secret_key`` (every
socket runs CURVE: encryption and authentication) and one without. The measurements of
both take turns within each repetition, so that they share the machine's noise; the
ratio is ``with CURVE / without``, lower is better, and the target is at most 1.3x.

Rows:

* ``curve.set`` / ``curve.get``: microseconds per ``state[k] = v`` / ``state[k]`` round
  trip, one client (medians over many short repetitions of ``n`` operations, after a
  warm-up).
* ``curve.watch median`` / ``p99``: microseconds from ``state[k] = t0`` (``t0`` stamped
  just before the write, in this process) to a buffered watcher in another process
  (``when_change(k)``) returning that value; each sample is the watcher's clock minus the
  value it received (one system-wide monotonic clock).
* ``curve.connect``: milliseconds to create a State and answer its first request (the
  CURVE handshake; the key derivation is done once per process and is not included).
  Information only.
* ``curve.start``: milliseconds for a fresh Python process to import zproc, start a
  server with a passphrase (the scrypt derivation, N = 2**17, included: once in this
  process) and answer the first request, against the same without a key. Target: under
  a second. ``curve.kdf`` is the derivation alone.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import zproc

from ._common import FORK, Counter, median, now, percentile, recv, row, stop_process, time_loop

SECRET = "benchmark secret: 3f1d5c7a9b2e4f60"
MODES = ("plain", "curve")
BASELINE = "same, no CURVE"
TARGET = "<= 1.3"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tcp_address() -> tuple[str, str]:
    return (f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}")


def _key(mode: str) -> str | None:
    return SECRET if mode == "curve" else None


@contextmanager
def _server(mode: str) -> Iterator[Any]:
    process, address = zproc.start_server(_tcp_address(), timeout=30, secret_key=_key(mode))
    try:
        yield address
    finally:
        stop_process(process)


# -- round trips ------------------------------------------------------------------------


def bench_ops(addresses: dict[str, Any], *, n: int, reps: int, warmup: int) -> list[dict[str, Any]]:
    counter = Counter()
    per_op: dict[tuple[str, str], list[float]] = {
        (mode, op): [] for mode in MODES for op in ("set", "get")
    }
    with ExitStack() as stack:
        states = {
            mode: stack.enter_context(zproc.State(addresses[mode], secret_key=_key(mode)))
            for mode in MODES
        }
        ops = {}
        for mode, state in states.items():
            state["k"] = 0
            ops[mode, "set"] = lambda i, s=state: s.__setitem__("k", i)
            ops[mode, "get"] = lambda i, s=state: s["k"]
        for op in ops.values():
            time_loop(op, warmup, counter.take(warmup))
        for rep in range(reps):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in order:
                for name in ("set", "get"):
                    seconds = time_loop(ops[mode, name], n, counter.take(n))
                    per_op[mode, name].append(seconds / n * 1e6)
    return [
        row(f"curve.{name}", median(per_op["curve", name]), "us/op", BASELINE,
            median(per_op["plain", name]), target=TARGET)
        for name in ("set", "get")
    ]


# -- watcher latency --------------------------------------------------------------------


def _watcher_main(address: Any, secret_key: str | None, count: int, conn: Any) -> None:
    try:
        with zproc.State(address, secret_key=secret_key) as state:
            watcher = state.when_change("t", timeout=60)
            conn.send("ready")
            samples = []
            for _ in range(count):
                value = next(watcher)["t"]
                samples.append(now() - value)
        conn.send(samples)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _watch_round(address: Any, mode: str, count: int, pause: float) -> list[float]:
    receiver, sender = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_watcher_main, args=(address, _key(mode), count, sender))
    child.start()
    sender.close()
    try:
        recv(receiver, 60, f"{mode} watcher")
        with zproc.State(address, secret_key=_key(mode)) as state:
            for _ in range(count):
                time.sleep(pause)  # the watcher is blocked again before each write
                state["t"] = now()
            samples: list[float] = recv(receiver, 60, f"{mode} watcher")
        return [s * 1e6 for s in samples]
    finally:
        receiver.close()
        stop_process(child)


def bench_watch(addresses: dict[str, Any], *, count: int, rounds: int) -> list[dict[str, Any]]:
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rnd in range(rounds):
        order = MODES if rnd % 2 == 0 else MODES[::-1]
        for mode in order:
            samples[mode] += _watch_round(addresses[mode], mode, count, pause=0.002)
    return [
        row("curve.watch median", median(samples["curve"]), "us", BASELINE,
            median(samples["plain"]), target=TARGET),
        row("curve.watch p99", percentile(samples["curve"], 99), "us", BASELINE,
            percentile(samples["plain"], 99)),
    ]


# -- connecting ----------------------------------------------------------------------------


def bench_connect(addresses: dict[str, Any], *, reps: int) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:  # derive the key once, as a long-running process would
        zproc.State(addresses[mode], secret_key=_key(mode)).close()
    for rep in range(reps):
        order = MODES if rep % 2 == 0 else MODES[::-1]
        for mode in order:
            start = time.perf_counter()
            with zproc.State(addresses[mode], secret_key=_key(mode)) as state:
                state.get("k")
            times[mode].append((time.perf_counter() - start) * 1000)
    return [
        row("curve.connect", median(times["curve"]), "ms", BASELINE, median(times["plain"]),
            note="State() plus its first request; information only")
    ]


_START = """
import sys, time
start = time.perf_counter()
import zproc
key = sys.argv[1] or None
process, address = zproc.start_server(secret_key=key)
with zproc.State(address, secret_key=key) as state:
    state["k"] = 1
print((time.perf_counter() - start) * 1000)
process.terminate()
process.join(5)
"""


def _start_once(key: str) -> float:
    done = subprocess.run([sys.executable, "-c", _START, key], capture_output=True,
                          text=True, timeout=60, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def bench_start(*, reps: int) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    kdf: list[float] = []
    for rep in range(reps):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            times[mode].append(_start_once(_key(mode) or ""))
        begin = time.perf_counter()
        hashlib.scrypt(f"{SECRET}{rep}".encode(), salt=b"bench", n=2**17, r=8, p=1,
                       dklen=32, maxmem=256 * 1024 * 1024)
        kdf.append((time.perf_counter() - begin) * 1000)
    return [
        row("curve.start", median(times["curve"]), "ms", BASELINE, median(times["plain"]),
            note="fresh process: import, start_server, first request; target < 1000 ms"),
        row("curve.kdf", median(kdf), "ms", "scrypt N=2**17 r=8", median(kdf),
            note="one derivation; information only"),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run the CURVE benchmarks and return one row per measurement."""
    # many short repetitions, the two modes alternating: a burst of load elsewhere on the
    # machine hits both alike, and the medians leave it out
    if quick:
        ops = {"n": 200, "reps": 12, "warmup": 200}
        watch = {"count": 100, "rounds": 4}
        connect = {"reps": 6}
        start = {"reps": 2}
    else:
        ops = {"n": 300, "reps": 40, "warmup": 1000}
        watch = {"count": 150, "rounds": 12}
        connect = {"reps": 20}
        start = {"reps": 6}
    with ExitStack() as stack:
        addresses = {mode: stack.enter_context(_server(mode)) for mode in MODES}
        rows = bench_ops(addresses, **ops)
        rows += bench_watch(addresses, **watch)
        rows += bench_connect(addresses, **connect)
    rows += bench_start(**start)
    return rows
