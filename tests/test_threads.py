"""One State shared by threads: each operation keeps its own reply, watchers in several
threads each see every change, a blocked watcher holds up no other thread, the cache and
pipelines stay correct, and a State inherited through fork works in the child's threads."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
from collections.abc import Callable
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
