"""One State shared by threads: each operation keeps its own reply, watchers in several
threads each see every change, a blocked watcher holds up no other thread, the cache and
pipelines stay correct, and a State inherited through fork works in the child's threads."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import zproc

FORK = multiprocessing.get_context("fork")


def run_threads(count: int, target: Callable[[int], None], timeout: float = 120) -> None:
    """Run ``target(i)`` in ``count`` threads; re-raise the first error of any of them."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def mixed_operations(state: zproc.State, me: int, count: int) -> None:
    """``count`` mixed operations on keys of thread ``me`` only, each write read back."""
    rng = random.Random(me)
    key, mine = f"k{me}", {}
    for i in range(count):
        op = rng.randrange(6)
        value = (me, i)
        if op == 0:
            state[key] = value
            mine[key] = value
            assert state[key] == value
        elif op == 1:
            state.update({key: value, f"{key}-b": i})
            mine.update({key: value, f"{key}-b": i})
            assert state.get(f"{key}-b") == i
        elif op == 2:
            assert state.get(key) == mine.get(key)
        elif op == 3:
            assert (key in state) == (key in mine)
        elif op == 4:
            assert state.setdefault(f"{key}-d", me) == me
        else:
            assert state.pop(key, None) == mine.pop(key, None)
            assert key not in state


@pytest.mark.timeout(300)
def test_eight_threads_read_their_own_writes(server: zproc.ServerAddress) -> None:
    """8 threads x 2,000 mixed operations on one State: no reply goes to the wrong thread
    (each checks what it wrote) and none is lost."""
    with zproc.State(server, request_timeout=30) as state:
        run_threads(8, lambda me: mixed_operations(state, me, 2000), timeout=240)
        snapshot = state.copy()
    assert {snapshot[f"k{me}-d"] for me in range(8)} == set(range(8))


def test_cached_state_shared_by_threads(server: zproc.ServerAddress) -> None:
    """With cache=True, each thread reads its own writes, and a write acknowledged in one
    thread is seen by a cached read in another thread that learns of it afterwards."""
    with zproc.State(server, request_timeout=30, cache=True) as state:
        run_threads(4, lambda me: mixed_operations(state, me, 300))
        written = threading.Event()

        def writer(_: int) -> None:
            state["handover"] = "done"
            written.set()

        run_threads(1, writer)
        assert written.is_set()
        assert state["handover"] == "done"


def test_pipelines_in_threads(server: zproc.ServerAddress) -> None:
    with zproc.State(server, request_timeout=30, cache=True) as state:

        def work(me: int) -> None:
            for batch in range(5):
                with state.pipeline(max_ops=7) as p:
                    for i in range(20):
                        p[f"p{me}"] = (batch, i)
                assert state[f"p{me}"] == (batch, 19)

        run_threads(4, work)


def test_iterator_watchers_in_two_threads_each_see_every_change(
    server: zproc.ServerAddress,
) -> None:
    n = 300
    seen: dict[int, list[int]] = {0: [], 1: []}
    ready = threading.Barrier(3, timeout=30)
    with zproc.State(server, request_timeout=30) as watched, zproc.State(
        server, request_timeout=30
    ) as writer:

        def watch(me: int) -> None:
            watcher = watched.when_change("i", timeout=30, count=n)
            ready.wait()
            seen[me].extend(snap["i"] for snap in watcher)

        threads = [threading.Thread(target=watch, args=(me,)) for me in (0, 1)]
        for thread in threads:
            thread.start()
        ready.wait()
        for i in range(n):
            writer["i"] = i
        for thread in threads:
            thread.join(60)
    assert seen == {0: list(range(n)), 1: list(range(n))}


def test_watcher_made_in_one_thread_iterated_in_another(server: zproc.ServerAddress) -> None:
    """A buffered watcher sees every change from its creation on, whichever thread
    iterates it."""
    with zproc.State(server, request_timeout=30) as watched, zproc.State(
        server, request_timeout=30
    ) as writer:
        watcher = watched.when_change("i", timeout=30, count=50)
        for i in range(50):
            writer["i"] = i
        seen: list[int] = []
        run_threads(1, lambda _: seen.extend(snap["i"] for snap in watcher))
    assert seen == list(range(50))


def test_a_blocked_watcher_holds_up_no_other_thread(server: zproc.ServerAddress) -> None:
    with zproc.State(server, request_timeout=30) as state, zproc.State(
        server, request_timeout=30
    ) as other:
        got: list[Any] = []
        waiting = threading.Event()

        def watch() -> None:
            state.go_live()
            waiting.set()
            got.append(state.get_when_change("wake", timeout=60))

        thread = threading.Thread(target=watch)
        thread.start()
        assert waiting.wait(30)
        # the watcher thread is blocked: this thread's requests go through regardless
        for i in range(200):
            state[f"n{i % 5}"] = i
            assert state[f"n{i % 5}"] == i
        assert thread.is_alive() and got == []
        other["wake"] = "up"
        thread.join(60)
    assert got == ["up"]


def test_no_thread_wakes_its_own_states_watchers(server: zproc.ServerAddress) -> None:
    """The changes of every thread of a State are its own: its watchers skip them."""
    with zproc.State(server, request_timeout=30) as state, zproc.State(
        server, request_timeout=30
    ) as other:
        watcher = state.when_change(timeout=30)
        run_threads(1, lambda _: state.__setitem__("mine", 1))
        other["theirs"] = 2
        assert next(watcher) == {"mine": 1, "theirs": 2}
        assert len(state._me()) == 2  # the main thread's identity and the other one's


def child_in_threads(state: zproc.State, conn: Any) -> None:
    try:
        run_threads(3, lambda me: mixed_operations(state, 100 + me, 200))
        state["child"] = "done"
        conn.send(state["child"])
    except BaseException as exc:
        conn.send(repr(exc))
        raise
    finally:
        conn.close()


def test_state_inherited_through_fork_works_in_the_childs_threads(
    server: zproc.ServerAddress,
) -> None:
    with zproc.State(server, request_timeout=30, cache=True) as state:
        state["before"] = 1
        run_threads(2, lambda me: mixed_operations(state, me, 50))  # parent channels exist
        parent_end, child_end = FORK.Pipe()
        proc = FORK.Process(target=child_in_threads, args=(state, child_end))
        proc.start()
        child_end.close()
        try:
            mixed_operations(state, 50, 500)  # the parent keeps using it meanwhile
            assert parent_end.poll(120)
            assert parent_end.recv() == "done"
        finally:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        assert proc.exitcode == 0
        assert state["child"] == "done"
        run_threads(2, lambda me: mixed_operations(state, me, 50))


def test_close_closes_every_threads_connection(server: zproc.ServerAddress) -> None:
    state = zproc.State(server, request_timeout=30)
    run_threads(3, lambda me: state.__setitem__(f"t{me}", me))
    channels = state._channels.each()
    assert len(channels) >= 2  # threads that ended are closed when the next one connects
    state.close()
    assert all(channel.conn.closed for channel in channels)
    with pytest.raises(zproc.ZProcError, match="closed"):
        run_threads(1, lambda _: state["t0"])


def test_async_state_refuses_another_event_loop(server: zproc.ServerAddress) -> None:
    loop = asyncio.new_event_loop()

    async def make() -> zproc.AsyncState:
        astate = zproc.AsyncState(server, request_timeout=10)
        await astate.setitem("a", 1)
        return astate

    astate = loop.run_until_complete(make())
    try:

        async def elsewhere() -> Any:
            return await astate.getitem("a")

        with pytest.raises(zproc.ZProcError, match="another event loop"):
            asyncio.run(elsewhere())  # a second loop, while the first one is open
        assert loop.run_until_complete(astate.getitem("a")) == 1
    finally:
        loop.run_until_complete(astate.close())
        loop.close()


# -- close() while other threads are inside a call ------------------------------------------


@zproc.atomic
def slow(d: dict[str, Any], seconds: float) -> float:
    """Keep the server busy for ``seconds``."""
    time.sleep(seconds)
    d["slow"] = seconds
    return seconds


def close_while_busy(server: zproc.ServerAddress, mode: str, pipe: Any) -> None:
    """In a forked child (an abort ends the child, not the test run): start threads that
    are inside a call on one State, close it from this thread, report how each call ended
    and whether every socket of the State was closed afterwards."""
    report: dict[str, Any] = {"outcomes": {}}
    try:
        with zproc.State(server, request_timeout=60) as other:
            state = zproc.State(server, request_timeout=60, cache=mode == "loops")
            calls: dict[str, Callable[[], Any]] = {
                "item": lambda: state["k"],  # waits behind `other`'s slow atomic call
                "atomic": lambda: slow(state, 3.0),
                "watch": lambda: state.get_when_change("k"),  # nobody writes "k"
                "lock": lambda: state.lock("L").acquire(),  # `other` holds it
                "queue": lambda: state.queue("q").get(),  # nobody puts
            }
            held = other.lock("L")
            assert held.acquire()

            def run(name: str, call: Callable[[], Any]) -> None:
                try:
                    while True:  # one call, or ("loops") calls until the State closes
                        outcome = ("value", call())
                        if mode != "loops":
                            break
                except zproc.ZProcError as exc:
                    outcome = ("error", str(exc))
                except Exception as exc:  # e.g. a ZMQError: the socket closed under it
                    outcome = ("other", repr(exc))
                report["outcomes"][name] = (*outcome, time.monotonic())

            if mode == "loops":  # writes and cached reads, in and out of their sockets
                threads = [threading.Thread(target=run, args=(
                    f"loop{i}", lambda i=i: state.__setitem__(i, state.get(i, 0) + 1)
                )) for i in range(4)]
            else:
                threads = [threading.Thread(target=run, args=(mode, calls[mode]))]
            busy = threading.Thread(target=run, args=("slow", lambda: slow(other, 3.0)))
            if mode in ("item", "atomic"):  # the server answers after busy's call
                busy.start()
                time.sleep(0.3)  # the server is inside the slow call now
            for thread in threads:
                thread.start()
            time.sleep(0.6)  # each thread is inside its call (or its loop of calls)
            channels = state._channels.each()
            streams = [channel.stream for channel in channels if channel.stream is not None]
            state.close()
            report["closed_at"] = time.monotonic()
            for thread in threads:
                thread.join(20)
            report["alive"] = [thread.name for thread in threads if thread.is_alive()]
            report["open"] = [
                sock for sock in [
                    *(c.conn.sock for c in channels), *(c.conn._monitor for c in channels),
                    *(s.sub for s in streams),
                ] if not sock.closed
            ]
            report["channels"] = len(channels)
            if mode in ("item", "atomic"):
                busy.join(20)
    except BaseException as exc:
        report["failed"] = repr(exc)
    finally:
        pipe.send({**report, "open": len(report.get("open", []))})
        pipe.close()


def run_close_while_busy(server: zproc.ServerAddress, mode: str) -> dict[str, Any]:
    parent_end, child_end = FORK.Pipe()
    proc = FORK.Process(target=close_while_busy, args=(server, mode, child_end))
    proc.start()
    child_end.close()
    try:
        report = parent_end.recv() if parent_end.poll(60) else None
    except EOFError:
        report = None  # the child died before reporting
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    assert proc.exitcode == 0, f"the child ended with {proc.exitcode} (an abort is -6)"
    assert report is not None and "failed" not in report, report
    assert report["alive"] == [], report
    assert report["open"] == 0, report  # every socket closed, by close() or its thread
    return report


@pytest.mark.parametrize("mode", ["item", "atomic"])
def test_close_while_another_thread_waits_for_a_reply(
    server: zproc.ServerAddress, mode: str
) -> None:
    """A thread waiting for a slow reply when another thread closes the State: the process
    goes on, and the call ends with ZProcError before the reply would have come."""
    report = run_close_while_busy(server, mode)
    kind, message, ended = report["outcomes"][mode]
    assert (kind, message[:25]) == ("error", "this State was closed whi"), message
    assert report["closed_at"] <= ended < report["outcomes"]["slow"][2]


@pytest.mark.parametrize("mode", ["watch", "lock", "queue"])
def test_close_while_another_thread_waits_with_no_timeout(
    server: zproc.ServerAddress, mode: str
) -> None:
    """A thread blocked in get_when_change, a lock's acquire or a queue's get (no timeout)
    when the State is closed."""
    report = run_close_while_busy(server, mode)
    kind, message, ended = report["outcomes"][mode]
    assert (kind, message[:25]) == ("error", "this State was closed whi"), message
    assert ended >= report["closed_at"]


def test_close_while_threads_call_in_loops(server: zproc.ServerAddress) -> None:
    """Four threads writing and reading through the cache, one call after another, when
    the State is closed: each ends with ZProcError, wherever its call was."""
    report = run_close_while_busy(server, "loops")
    assert report["channels"] == 5
    for i in range(4):
        kind, message, ended = report["outcomes"][f"loop{i}"]
        assert (kind, message[:11]) == ("error", "this State "), message
        assert ended >= report["closed_at"]


@pytest.mark.parametrize("pool_kind", ["executor", "to_thread"])
def test_close_closes_the_sockets_of_idle_threads(
    server: zproc.ServerAddress, pool_kind: str
) -> None:
    """Threads of a pool (a ThreadPoolExecutor, asyncio's default executor) that used the
    State and now idle (alive, in no call): close() closes their sockets itself; nothing
    is left to the garbage collector."""
    state = zproc.State(server, request_timeout=30)
    together = threading.Barrier(3, timeout=30)

    def use(i: int) -> None:
        together.wait()  # three different threads
        state[f"t{i}"] = i
        state.when_change("never")  # starts the thread's event stream

    pool = ThreadPoolExecutor(3)
    loop = asyncio.new_event_loop()

    async def in_threads() -> None:
        await asyncio.gather(*(asyncio.to_thread(use, i) for i in range(3)))

    try:
        if pool_kind == "executor":
            list(pool.map(use, range(3)))
        else:
            loop.run_until_complete(in_threads())
        channels = state._channels.each()
        streams = [channel.stream for channel in channels if channel.stream is not None]
        assert len(channels) == 4 and len(streams) == 3
        state.close()  # the pool's threads are alive and idle
        socks = [*(c.conn.sock for c in channels), *(c.conn._monitor for c in channels),
                 *(s.sub for s in streams)]
        assert all(sock.closed for sock in socks)
        with pytest.raises(zproc.ZProcError, match="this State is closed"):
            pool.submit(state.__getitem__, "t0").result(30)
    finally:
        pool.shutdown()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_close_in_a_thread_that_never_used_the_state_releases_at_once(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    """close() says BYE for the State's held locks through a connection of its own when
    the closing thread has none (never through another thread's)."""
    other = zproc.State(server, request_timeout=30)
    held = other.lock("c")
    assert held.acquire()
    closer = threading.Thread(target=other.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive() and other._closed
    lock = state.lock("c")
    assert lock.acquire(blocking=False)
    lock.release()


EXIT_WITH_A_BLOCKED_DAEMON = """
import sys, threading, time, zproc
state = zproc.State(tuple(sys.argv[1:3]))
q = state.queue("exit-with-a-blocked-daemon")
def consume():
    for item in range(3):
        q.put(item)
    q.get()  # and the two others come with it: items to give back at exit
    state.queue("empty").get()  # nobody puts: blocked here when the interpreter exits
threading.Thread(target=consume, daemon=True).start()
time.sleep(1.0)
print("exiting", flush=True)
"""


def test_exit_while_a_daemon_thread_waits_in_a_queue_get(
    server: zproc.ServerAddress
) -> None:
    """At exit, the queue handles' last requests are flushed through the exiting thread's
    connection, never through one that another thread is inside a call on (libzmq would
    abort the process)."""
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_BLOCKED_DAEMON, *server],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "exiting"
    # the two items its handle held come back to the queue (nothing lost)
    with zproc.State(server) as state:
        q = state.queue("exit-with-a-blocked-daemon")
        deadline = time.monotonic() + 60
        while q.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(q.get(timeout=5) for _ in range(2)) == [1, 2]
