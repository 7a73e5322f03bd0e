"""Watchers: how long from ``state[k] = v`` in one process to ``get_when_change(k)`` returning.

Run from the repository root::

    python -m benchmarks --only watch

A watcher process blocks in ``other.get_when_change(k)``; this process then stamps
``t0 = clock_gettime(CLOCK_MONOTONIC)`` and does ``state[k] = t0``; the watcher, woken,
stamps ``t1`` and records ``t1 - value`` (the value it got *is* the writer's timestamp, so
nothing else has to travel). The writer waits for the watcher's "ready" and then a short
pause before each write, so the watcher is really blocked; a write the watcher missed
(it was not blocked yet) is simply written again after 0.25 s, and counted.

Rows (samples pooled over several rounds; the kinds of measurement take turns within each
round, so that they share the machine's noise):

* ``watch.wake-up median`` / ``p99``: the zproc latency versus the raw pyzmq figure
  measured in the same run: a PUB/SUB one-way wake-up (publisher here, a blocked
  subscriber in the watcher process, the same pickled key and timestamp) plus one
  DEALER/ROUTER round trip of the raw echo server (the floor of ``bench_ops``, round trips
  back to back). For the median the baseline is the sum of the two medians (the target
  applies to it); for p99 the sum of the two p99s.
* ``watch.wake-up median`` versus the raw relay: the exact raw path of a watched write,
  measured like the zproc latency: a DEALER set to a raw server that applies it,
  publishes ``(key, value)`` on its PUB socket and replies; the watcher process blocks on
  a raw SUB socket. It shows what ZeroMQ itself costs on that path when every thread
  involved wakes from idle; the target is at most 1.15x.
* ``watch.wake-up @10k keys``: median latency on a state of 10,000 keys versus 10 keys.
* ``watch.set @10k keys``: the cost of one set (microseconds, round trip) while a watcher
  process is subscribed (blocked on another key, so it receives and applies every event)
  on a state of 10,000 keys versus 10 keys; and, for reference, the set at 10 keys with
  the watcher subscribed versus with no watcher.

Both states live on the same server, in two namespaces.
"""

from __future__ import annotations

import pickle
import random
import time
from contextlib import ExitStack
from typing import Any

import zmq

import zproc

from ._common import (
    FORK,
    PROTOCOL,
    WAIT,
    Counter,
    RawClient,
    median,
    now,
    percentile,
    private_dir,
    raw_echo,
    raw_relay,
    recv,
    row,
    send_error,
    stop_process,
    time_loop,
    zproc_server,
)

SMALL = 10
BIG = 10_000
KEY = "key00003"
#: Pause between the watcher's "ready" and the write (seconds; a little jitter is added).
PAUSE = 0.003
#: After this long without an answer, the writer assumes its write was missed. Kept away
#: from zproc's 1 s idle check, so that a re-sent write does not coincide with it.
RETRY = 0.25
NAMESPACES = {"small": "bench-watch-small", "big": "bench-watch-big"}


def _keys(count: int) -> list[str]:
    return [f"key{i:05d}" for i in range(count)]


# -- the watcher process ---------------------------------------------------------------


def _watcher_main(address: Any, conn: Any) -> None:
    """Serve commands from the benchmark: watch with zproc, or with a raw SUB socket."""
    states: dict[str, zproc.State] = {}
    ctx: zmq.Context[Any] | None = None
    subs: dict[str, zmq.Socket[Any]] = {}
    try:
        for label, namespace in NAMESPACES.items():
            state = states[label] = zproc.State(address, namespace=namespace)
            try:  # start the event stream now (subscription, snapshot), not in a sample
                state.get_when_change("no such key", timeout=0.05)
            except zproc.TimeoutError:
                pass
        conn.send(("ready",))
        while True:
            if not conn.poll(600):
                break
            command = conn.recv()
            kind = command[0]
            if kind == "stop":
                break
            if kind == "zproc":  # n wake-ups through get_when_change
                _, label, key, n = command
                state = states[label]
                latencies = []
                for _ in range(n):
                    conn.send("ready")
                    value = state.get_when_change(key, timeout=WAIT)
                    t1 = now()
                    latencies.append(t1 - value)
                conn.send(("done", latencies))
            elif kind == "sub-connect":
                _, name, endpoint = command
                ctx = ctx or zmq.Context()
                sub = subs[name] = ctx.socket(zmq.SUB)
                sub.linger = 0
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(endpoint)
                # the publisher sends messages until one arrives (PUB/SUB slow joiner)
                if not sub.poll(int(WAIT * 1000)):
                    raise TimeoutError("raw SUB: no message from the publisher")
                sub.recv()
                conn.send(("synced",))
            elif kind == "raw":  # n one-way wake-ups on a raw SUB socket
                _, name, key, n = command
                sub = subs[name]
                latencies = []
                for _ in range(n):
                    conn.send("ready")
                    while True:
                        if not sub.poll(int(WAIT * 1000)):
                            raise TimeoutError("raw SUB: no message within the timeout")
                        frame = sub.recv()
                        t1 = now()
                        got_key, t0 = pickle.loads(frame)
                        if got_key == key:
                            break
                    latencies.append(t1 - t0)
                conn.send(("done", latencies))
            elif kind == "idle-watch":  # stay subscribed until told to stop
                _, label, key = command
                state = states[label]
                conn.send(("watching",))
                while not conn.poll(0):
                    try:
                        state.get_when_change(key, timeout=0.05)
                    except zproc.TimeoutError:
                        pass
                if conn.recv()[0] != "stop-watch":
                    raise RuntimeError("idle-watch: unexpected command")
                conn.send(("stopped",))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        send_error(conn)
    finally:
        for state in states.values():
            try:
                state.close()
            except Exception:
                pass
        for sub in subs.values():
            sub.close(0)
        if ctx is not None:
            ctx.term()
        conn.close()


# -- the writer side -------------------------------------------------------------------


def _setter(state: zproc.State, keys: list[str]) -> Any:
    m = len(keys)
    return lambda i: state.__setitem__(keys[i % m], float(i))


def _drive(conn: Any, write: Any, n: int, what: str) -> tuple[list[float], int]:
    """Answer each "ready" of the watcher with a pause and a write; return its latencies."""
    misses = 0
    deadline = time.monotonic() + WAIT + n * 0.05
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the watcher did not finish in time")
        if not conn.poll(RETRY):
            misses += 1  # the watcher was not blocked yet when we wrote: write again
            if misses > max(10, n // 10):
                raise TimeoutError(f"{what}: the watcher keeps missing writes ({misses})")
            write(now())
            continue
        message = conn.recv()
        if message == "ready":
            time.sleep(PAUSE * (1.0 + 0.5 * random.random()))
            write(now())
            continue
        if isinstance(message, tuple) and message[0] == "done":
            return message[1], misses
        if isinstance(message, tuple) and message[0] == "error":
            raise RuntimeError(f"{what}: the watcher failed:\n{message[1]}")
        raise RuntimeError(f"{what}: unexpected message {message!r}")


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    rounds, samples, warm = (3, 40, 5) if quick else (5, 100, 10)
    set_n, set_reps = (500, 3) if quick else (2000, 5)
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        endpoint = stack.enter_context(raw_echo())
        relay_endpoint, relay_pub = stack.enter_context(raw_relay())
        folder = stack.enter_context(private_dir())
        writers = {
            label: stack.enter_context(zproc.State(address, namespace=namespace))
            for label, namespace in NAMESPACES.items()
        }
        keys = {"small": _keys(SMALL), "big": _keys(BIG)}
        for label, state in writers.items():
            state.update(dict.fromkeys(keys[label], 0.0))

        # the raw side: a publisher here, the floor echo server for the round trip
        zctx = zmq.Context()
        stack.callback(zctx.term)
        pub = zctx.socket(zmq.PUB)
        pub.linger = 0
        stack.callback(pub.close, 0)
        pub_endpoint = f"ipc://{folder}/pub"
        pub.bind(pub_endpoint)
        raw = RawClient(endpoint)
        stack.callback(raw.close)
        relay = RawClient(relay_endpoint)
        stack.callback(relay.close)

        parent, child = FORK.Pipe()
        stack.callback(parent.close)
        watcher = FORK.Process(target=_watcher_main, args=(address, child), name="watcher",
                               daemon=True)
        watcher.start()
        stack.callback(stop_process, watcher)
        child.close()

        def stop_watcher() -> None:
            try:
                parent.send(("stop",))
            except Exception:
                pass
            watcher.join(2)

        stack.callback(stop_watcher)
        recv(parent, WAIT, "watcher start")

        def sync(name: str, endpoint: str, send: Any) -> None:
            parent.send(("sub-connect", name, endpoint))
            end = time.monotonic() + WAIT
            while not parent.poll(0.005):
                if time.monotonic() > end:
                    raise TimeoutError(f"raw SUB ({name}) never received a message")
                send()
            recv(parent, WAIT, f"raw subscribe ({name})")

        sync("pub", pub_endpoint, lambda: pub.send(pickle.dumps(("sync", 0), PROTOCOL)))
        sync("relay", relay_pub, lambda: relay.set("sync", 0))

        def raw_write(t0: float) -> None:
            pub.send(pickle.dumps((KEY, t0), PROTOCOL))

        def relay_write(t0: float) -> None:
            relay.set(KEY, t0)

        def zproc_write(label: str) -> Any:
            state = writers[label]
            return lambda t0: state.__setitem__(KEY, t0)

        def round_trips(count: int) -> list[float]:
            times = []
            for i in range(count):
                t0 = time.perf_counter()
                raw.set(KEY, i)
                times.append(time.perf_counter() - t0)
            return times

        latency: dict[str, list[float]] = {"raw-sub": [], "raw-rtt": [], "relay": [],
                                           "small": [], "big": []}
        misses = {"small": 0, "big": 0}
        # warm-up (discarded): every path once
        parent.send(("raw", "pub", KEY, warm))
        _drive(parent, raw_write, warm, "raw warm-up")
        parent.send(("raw", "relay", KEY, warm))
        _drive(parent, relay_write, warm, "relay warm-up")
        round_trips(warm * 4)
        for label in ("small", "big"):
            parent.send(("zproc", label, KEY, warm))
            _drive(parent, zproc_write(label), warm, f"zproc {label} warm-up")

        for r in range(rounds):
            steps = ["raw-sub", "raw-rtt", "relay", "small", "big"]
            steps = steps[r % 5:] + steps[:r % 5]
            for step in steps:
                if step == "raw-sub":
                    parent.send(("raw", "pub", KEY, samples))
                    got, _ = _drive(parent, raw_write, samples, "raw PUB/SUB")
                elif step == "relay":
                    parent.send(("raw", "relay", KEY, samples))
                    got, _ = _drive(parent, relay_write, samples, "raw relay")
                elif step == "raw-rtt":
                    got = round_trips(samples)
                else:
                    parent.send(("zproc", step, KEY, samples))
                    got, missed = _drive(parent, zproc_write(step), samples, f"zproc {step}")
                    misses[step] += missed
                latency[step] += got

        # the cost of a set with a subscribed watcher, 10 vs 10,000 keys (and, for
        # reference, at 10 keys with no watcher subscribed)
        counter = Counter()
        set_times: dict[str, list[float]] = {"small": [], "big": [], "alone": []}
        cases = ["small", "big", "alone"]
        for rep in range(set_reps + 1):
            for case in cases[rep % 3:] + cases[:rep % 3]:
                label = "small" if case == "alone" else case
                state, ks = writers[label], keys[label]
                if case != "alone":
                    parent.send(("idle-watch", label, "never set"))
                    recv(parent, WAIT, "idle watch")
                n = set_n if rep else set_n // 4  # the first repetition is a warm-up
                elapsed = time_loop(_setter(state, ks), n, counter.take(n))
                if case != "alone":
                    parent.send(("stop-watch",))
                    recv(parent, WAIT, "idle watch stop")
                if rep:
                    set_times[case].append(elapsed / n * 1e6)

    us = 1e6
    med = {k: median(v) * us for k, v in latency.items()}
    p99 = {k: percentile(v, 99) * us for k, v in latency.items()}
    raw_name = "raw PUB/SUB + DEALER/ROUTER RTT"
    note = (f"{len(latency['small'])} samples per figure; raw PUB/SUB one-way median "
            f"{med['raw-sub']:.0f} us, raw RTT median {med['raw-rtt']:.0f} us"
            + (f"; writes re-sent because the watcher missed them (it returned only for "
               f"the next write): {misses['small']} of {len(latency['small'])} at {SMALL} "
               f"keys, {misses['big']} of {len(latency['big'])} at {BIG} keys"
               if any(misses.values()) else ""))
    return [
        row("watch.wake-up median", med["small"], "us", raw_name,
            med["raw-sub"] + med["raw-rtt"], target="<= 1.5", note=note),
        row("watch.wake-up median", med["small"], "us", "raw relay DEALER>ROUTER>PUB>SUB",
            med["relay"], target="<= 1.15",
            note="the relay is the echo server that also publishes each set: the same "
            "path as a watched zproc write (writer DEALER > ROUTER > PUB > the watcher "
            "process's SUB, one relay process), with nothing else"),
        row("watch.wake-up p99", p99["small"], "us", raw_name,
            p99["raw-sub"] + p99["raw-rtt"]),
        row(f"watch.wake-up @{BIG // 1000}k keys", med["big"], "us",
            f"watch.wake-up @{SMALL} keys", med["small"], target="<= 1.2"),
        row(f"watch.set @{BIG // 1000}k keys", median(set_times["big"]), "us/op",
            f"watch.set @{SMALL} keys", median(set_times["small"]), target="<= 1.2",
            note="a set round trip while a watcher process is subscribed (it is blocked "
                 "on another key, so it receives and applies every event)"),
        row(f"watch.set @{SMALL} keys, watched", median(set_times["small"]), "us/op",
            "same, no watcher subscribed", median(set_times["alone"])),
    ]


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
