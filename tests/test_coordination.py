"""Named locks and semaphores across real processes: owner death (SIGKILL), lost leases
(SIGSTOP), FIFO hand-offs, fencing tokens (also across a persist= restart), pickled
handles, close(), bad input, and the asyncio counterparts."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import zproc

from conftest import stop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def state(server: zproc.ServerAddress) -> Iterator[zproc.State]:
    with zproc.State(server, request_timeout=20) as st:
        yield st


def spawn(target: Any, *args: Any) -> multiprocessing.Process:
    proc = multiprocessing.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def hold(address: zproc.ServerAddress, name: str, lease: float, conn: Any) -> None:
    """Take the lock, say so, then do what the test says: 'release' or nothing (exit)."""
    with zproc.State(address) as st:
        lock = st.lock(name, lease=lease)
        assert lock.acquire(timeout=10)
        conn.send(("held", lock.token))
        if conn.poll(60) and conn.recv() == "release":
            try:
                lock.release()
                conn.send("released")
            except zproc.LockLostError as exc:
                conn.send(f"lost: {exc}")


def start_holder(address: zproc.ServerAddress, name: str, lease: float = 10.0
                 ) -> tuple[multiprocessing.Process, Any, int]:
    here, there = multiprocessing.Pipe()
    proc = spawn(hold, address, name, lease, there)
    assert here.poll(20), "the holder did not take the lock"
    what, token = here.recv()
    assert what == "held"
    return proc, here, token


# -- the basics ------------------------------------------------------------------------


def test_lock_basics(state: zproc.State) -> None:
    lock = state.lock("a")
    assert isinstance(lock, zproc.Lock) and lock.token is None
    assert lock.acquire() is True
    first = lock.token
    assert isinstance(first, int) and lock.locked()
    assert lock.acquire(blocking=False) is False  # not reentrant
    assert lock.acquire(timeout=0.2) is False
    lock.release()
    assert not lock.locked() and lock.token is None
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    with lock as same:
        assert same is lock and lock.token > first  # type: ignore[operator]
    assert lock.acquire(timeout=-1)
    lock.release()
    # names are not keys of the dict
    assert "a" not in state and state.copy() == {}


def test_semaphore_basics(state: zproc.State) -> None:
    sem = state.semaphore("s", 2)
    other = state.semaphore("s", value=2)
    assert sem.acquire() and sem.acquire()
    assert not other.acquire(blocking=False)
    sem.release()
    assert other.acquire(timeout=5)
    with pytest.raises(ValueError, match="value 2, not 3"):
        state.semaphore("s", 3)
    sem.release()
    with pytest.raises(ValueError, match="more often"):
        sem.release()  # bounded per handle
    other.release()


def test_bad_input_changes_nothing(state: zproc.State) -> None:
    with pytest.raises(ValueError, match="empty"):
        state.lock("")
    with pytest.raises(TypeError, match="str"):
        state.lock(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        state.semaphore("x", 0)
    with pytest.raises(ValueError, match="lease"):
        state.lock("x", lease=0)
    lock = state.lock("x")  # "x" was not created as a semaphore by the failed call
    with pytest.raises(ValueError, match="-1"):
        lock.acquire(timeout=-2)
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(blocking=False, timeout=1)
    assert not lock.locked()
    with pytest.raises(ValueError, match="is a lock"):
        state.semaphore("x", 1)
    with pytest.raises(ValueError, match="is a semaphore"):
        state.semaphore("y", 2) and state.lock("y")
    assert lock.acquire(blocking=False)
    lock.release()


# -- owner death and leases ------------------------------------------------------------


def test_a_killed_holder_frees_the_lock_without_waiting_for_its_lease(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    proc, conn, token = start_holder(server, "k", lease=60.0)
    lock = state.lock("k")
    try:
        assert not lock.acquire(blocking=False)
        os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: a zombie counts as dead
        assert lock.acquire(timeout=5), "the dead holder's lock was not freed"
        assert lock.token > token  # type: ignore[operator]
        lock.release()
    finally:
        stop(proc)


def test_a_paused_holder_loses_its_lease_and_hears_of_it(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    proc, conn, token = start_holder(server, "p", lease=1.0)
    lock = state.lock("p")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        assert lock.acquire(timeout=10), "the silent holder kept the lock"
        assert lock.token > token  # type: ignore[operator]
        os.kill(proc.pid, signal.SIGCONT)
        conn.send("release")
        assert conn.poll(20)
        answer = conn.recv()
        assert answer.startswith("lost:") and "lease" in answer
        assert lock.locked()  # the lost release took nothing from the new holder
        lock.release()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


def test_a_live_holder_keeps_its_lock_past_its_lease(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    proc, conn, token = start_holder(server, "live", lease=1.5)
    lock = state.lock("live")
    try:
        assert not lock.acquire(timeout=4.5)  # three leases: the heartbeats renew it
        conn.send("release")
        assert conn.poll(20) and conn.recv() == "released"
        assert lock.acquire(timeout=5)
        lock.release()
    finally:
        stop(proc)


def test_close_releases_at_once(server: zproc.ServerAddress, state: zproc.State) -> None:
    other = zproc.State(server)
    held = other.lock("c")
    assert held.acquire()
    lock = state.lock("c")
    assert not lock.acquire(blocking=False)
    other.close()
    assert lock.acquire(blocking=False)
    lock.release()


# -- order and tokens ------------------------------------------------------------------


def wait_turn(address: zproc.ServerAddress, n: int, conn: Any) -> None:
    async def main() -> None:
        async with zproc.AsyncState(address) as st:
            lock = st.lock("fifo")
            acquired = asyncio.ensure_future(lock.acquire(timeout=60))
            await asyncio.sleep(0)  # the acquire request is on its way
            conn.send("waiting")
            assert await acquired
            await zproc.append(st, "order", (n, lock.token))
            await lock.release()

    asyncio.run(main())


def test_waiters_get_the_lock_in_arrival_order(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    lock = state.lock("fifo")
    assert lock.acquire()
    state["order"] = []
    procs = []
    try:
        for n in range(4):
            here, there = multiprocessing.Pipe()
            procs.append(spawn(wait_turn, server, n, there))
            assert here.poll(20) and here.recv() == "waiting"
            time.sleep(0.1)  # its acquire reaches the server before the next one's
        lock.release()
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
        order = state["order"]
        assert [n for n, _ in order] == [0, 1, 2, 3]
        tokens = [token for _, token in order]
        assert tokens == sorted(tokens) and len(set(tokens)) == 4
    finally:
        for proc in procs:
            stop(proc)


def test_tokens_grow_across_a_persist_restart(tmp_path: Any, ipc_address: Any) -> None:
    path = str(tmp_path / "state.db")
    proc, address = zproc.start_server(ipc_address, persist=path)
    try:
        st = zproc.State(address)
        lock = st.lock("t")
        assert lock.acquire()
        before = lock.token
        stop(proc)
        proc, _ = zproc.start_server(ipc_address, persist=path)
        fresh = zproc.State(address)
        again = fresh.lock("t")
        assert again.acquire(timeout=10)  # locks come back free
        assert again.token > before  # type: ignore[operator]
        again.release()
        with pytest.raises(zproc.LockLostError):
            lock.release()  # held before the restart
        fresh.close()
        st.close()
    finally:
        stop(proc)


# -- pickled handles -------------------------------------------------------------------


def use_pickled(lock: zproc.Lock | bytes, conn: Any) -> None:
    if isinstance(lock, bytes):
        lock = pickle.loads(lock)
    assert isinstance(lock, zproc.Lock)
    assert lock.token is None  # a fresh handle: holds nothing
    try:
        lock.release()
    except RuntimeError:
        pass
    else:
        raise AssertionError("released a lock it did not hold")
    assert lock.acquire(timeout=20)
    conn.send(lock.token)
    lock.release()


@pytest.mark.parametrize("how", ["pickled", "inherited"])
def test_a_handle_in_a_child_is_a_fresh_handle(state: zproc.State, how: str) -> None:
    lock = state.lock("pk", lease=5.0)
    assert lock.acquire()
    copy = pickle.loads(pickle.dumps(lock))
    assert copy.name == "pk" and copy.lease == 5.0 and copy.token is None
    assert not copy.acquire(blocking=False)
    here, there = multiprocessing.Pipe()
    # pickled: unpickled in the child; inherited: the parent's object, through fork
    proc = spawn(use_pickled, pickle.dumps(lock) if how == "pickled" else lock, there)
    try:
        time.sleep(0.3)
        token = lock.token
        lock.release()
        assert here.poll(20)
        assert here.recv() > token
        proc.join(20)
        assert proc.exitcode == 0
    finally:
        stop(proc)
        copy._state.close()


def test_context_shorthands(server: zproc.ServerAddress) -> None:
    ctx = zproc.Context(server, start_server=False)
    try:
        with ctx.lock("ctx") as lock:
            assert ctx.state.lock("ctx").locked() and lock.token
        sem = ctx.semaphore("ctx-s", 3)
        assert isinstance(sem, zproc.Semaphore) and sem.value == 3
    finally:
        ctx.close()


# -- asyncio ---------------------------------------------------------------------------


def test_async_lock_and_a_cancelled_wait(server: zproc.ServerAddress, state: zproc.State) -> None:
    held = state.lock("as")
    assert held.acquire()

    async def main() -> None:
        async with zproc.AsyncState(server) as ast:
            lock = ast.lock("as")
            assert isinstance(lock, zproc.AsyncLock)
            assert not await lock.acquire(timeout=0.2)
            waiting = asyncio.ensure_future(lock.acquire())
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.to_thread(held.release)
            assert not await lock.locked()  # the cancelled wait took nothing
            async with lock:
                assert await lock.locked() and lock.token
            sem = ast.semaphore("as-s", 2)
            assert await sem.acquire() and await sem.acquire()
            assert not await sem.acquire(blocking=False)
            await sem.release()
            with pytest.raises(ValueError, match="is a lock"):
                await ast.semaphore("as", 1).acquire()
            assert await sem.acquire(blocking=False)
        # close() gave back what the AsyncState's handles held
        assert state.semaphore("as-s", 2).acquire(blocking=False)

    asyncio.run(main())


# -- events ----------------------------------------------------------------------------


def wait_event(address: zproc.ServerAddress, conn: Any) -> None:
    with zproc.State(address) as st:
        event = st.event("go")
        conn.send("waiting")
        conn.send(event.wait(timeout=30))


def test_an_event_wakes_waiters_in_other_processes(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    event = state.event("go")
    assert isinstance(event, zproc.Event) and not event.is_set()
    assert event.wait(timeout=0.2) is False
    pipes, procs = [], []
    try:
        for _ in range(3):
            here, there = multiprocessing.Pipe()
            procs.append(spawn(wait_event, server, there))
            pipes.append(here)
        for here in pipes:
            assert here.poll(20) and here.recv() == "waiting"
        time.sleep(0.3)
        assert not any(here.poll(0) for here in pipes)  # they wait
        event.set()
        for here in pipes:
            assert here.poll(20) and here.recv() is True
        assert event.is_set() and event.wait(timeout=-1)
        event.clear()
        assert not event.is_set()
        assert "go" not in state
        with pytest.raises(ValueError, match="is an event"):
            state.lock("go")
    finally:
        for proc in procs:
            stop(proc)


def test_context_event_and_async_event(server: zproc.ServerAddress) -> None:
    ctx = zproc.Context(server, start_server=False)
    try:
        event = ctx.event("ae")

        async def main() -> None:
            async with zproc.AsyncState(server) as ast:
                aev = ast.event("ae")
                assert isinstance(aev, zproc.AsyncEvent) and not await aev.is_set()
                assert not await aev.wait(timeout=0.1)
                waiting = asyncio.ensure_future(aev.wait())
                await asyncio.sleep(0.2)
                waiting.cancel()  # a cancelled wait is forgotten by the server
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                waiter = asyncio.ensure_future(aev.wait(timeout=20))
                await asyncio.sleep(0.2)
                await asyncio.to_thread(event.set)
                assert await waiter is True
                await aev.clear()
                assert not event.is_set()

        asyncio.run(main())
    finally:
        ctx.close()


# -- barriers --------------------------------------------------------------------------


def party(address: zproc.ServerAddress, conn: Any) -> None:
    with zproc.State(address) as st:
        barrier = st.barrier("round", 3)
        conn.send("ready")
        try:
            conn.send(barrier.wait(timeout=30))
        except threading.BrokenBarrierError:
            conn.send("broken")


def test_a_barrier_across_processes_and_a_dead_party(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    barrier = state.barrier("round", 3)
    assert isinstance(barrier, zproc.Barrier) and barrier.parties == 3
    procs, pipes = [], []
    try:
        for _ in range(2):
            here, there = multiprocessing.Pipe()
            procs.append(spawn(party, server, there))
            pipes.append(here)
            assert here.poll(20) and here.recv() == "ready"
        index = barrier.wait(timeout=30)
        got = [here.recv() for here in pipes if here.poll(20)]
        assert sorted([index, *got]) == [0, 1, 2]
        # a second round: one party is killed while the others wait
        for n in range(2):
            procs[n].join(20)
            here, there = multiprocessing.Pipe()
            procs[n] = spawn(party, server, there)
            pipes[n] = here
            assert here.poll(20) and here.recv() == "ready"
        deadline = time.monotonic() + 20
        while barrier.n_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert barrier.n_waiting == 2 and not barrier.broken
        os.kill(procs[0].pid, signal.SIGKILL)
        assert pipes[1].poll(10) and pipes[1].recv() == "broken"
        assert barrier.broken
        with pytest.raises(threading.BrokenBarrierError):
            barrier.wait(timeout=5)
    finally:
        for proc in procs:
            stop(proc)


def test_barrier_timeout_abort_and_bad_parties(server: zproc.ServerAddress,
                                               state: zproc.State) -> None:
    with pytest.raises(ValueError, match="parties must be >= 1"):
        state.barrier("b0", 0)
    b = state.barrier("b1", 2)
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=0.2)  # the other party never came: broken
    with pytest.raises(ValueError, match="parties 2, not 3"):
        state.barrier("b1", 3)
    c = state.barrier("b2", 2)
    c.abort()
    assert c.broken
    with pytest.raises(threading.BrokenBarrierError):
        c.wait()

    async def main() -> None:
        async with zproc.AsyncState(server) as ast:
            ab = ast.barrier("b3", 2)
            assert isinstance(ab, zproc.AsyncBarrier) and ab.parties == 2
            other = state.barrier("b3", 2)
            got = await asyncio.gather(ab.wait(timeout=20), asyncio.to_thread(other.wait, 20))
            assert sorted(got) == [0, 1]
            assert await ab.n_waiting() == 0 and not await ab.broken()
            await ab.abort()
            assert await ab.broken()

    asyncio.run(main())
