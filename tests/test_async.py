"""AsyncState: dict operations, errors, timeouts, watchers, cancellation and close.

Every test talks to a real server; writers are a sync State in a worker thread
(``asyncio.to_thread``) or a separate process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

import zproc
from zproc import _client

from conftest import stop

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest_asyncio.fixture
async def astate(server: zproc.ServerAddress) -> AsyncIterator[zproc.AsyncState]:
    async with zproc.AsyncState(server, request_timeout=20) as st:
        yield st


@pytest.fixture
def writer(server: zproc.ServerAddress) -> Iterator[zproc.State]:
    """A sync State for writing from worker threads (one at a time). It is closed only
    once the calls :func:`later` started have ended: closing a State under a thread that
    is inside a call on it aborts the process (ZeroMQ)."""
    with zproc.State(server, request_timeout=20) as st:
        yield st
        for done in _started_later:
            done.wait(20)
        _started_later.clear()


#: One event per call :func:`later` started in a worker thread, set when the call ends
#: (a watcher can see a write's change before the writer sees its reply).
_started_later: list[threading.Event] = []


async def later(delay: float, fn: Callable[..., Any], *args: Any) -> None:
    """Call the blocking ``fn(*args)`` in a worker thread after ``delay``."""
    await asyncio.sleep(delay)
    done = threading.Event()
    _started_later.append(done)

    def call() -> None:
        try:
            fn(*args)
        finally:
            done.set()

    await asyncio.to_thread(call)


def start_later(delay: float, fn: Callable[..., Any], *args: Any) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(later(delay, fn, *args))


def burst(address: Any, count: int) -> None:
    with zproc.State(address) as st:
        for n in range(count):
            st["n"] = n


def spawn(target: Callable[..., None], *args: Any) -> multiprocessing.Process:
    proc = multiprocessing.Process(target=target, args=args)
    proc.start()
    return proc


def slow(d: dict[str, Any], seconds: float) -> str:
    time.sleep(seconds)
    return "slow done"


def fail(d: dict[str, Any]) -> None:
    d["half"] = "written"
    raise ValueError("boom from the server")


@zproc.atomic
def add(d: dict[str, Any], key: str, step: int) -> int:
    d[key] = d.get(key, 0) + step
    return int(d[key])


# -- dict interface ------------------------------------------------------------------------


async def test_dict_operations_round_trip(astate: zproc.AsyncState) -> None:
    s = astate
    assert await s.copy() == {}
    await s.setitem("a", 1)
    await s.update({"b": [1, 2]}, c="three")
    assert await s.getitem("a") == 1
    assert await s.get("missing") is None
    assert await s.get("missing", 7) == 7
    assert await s.contains("b") and not await s.contains("zz")
    assert await s.len() == 3
    assert sorted(await s.keys()) == ["a", "b", "c"]
    assert sorted(map(str, await s.values())) == ["1", "[1, 2]", "three"]
    assert dict(await s.items()) == {"a": 1, "b": [1, 2], "c": "three"}
    assert await s.setdefault("a", 99) == 1
    assert await s.setdefault("d", 4) == 4
    assert await s.pop("d") == 4
    assert await s.pop("d", "gone") == "gone"
    await s.delitem("c")
    assert await s.popitem() == ("b", [1, 2])
    copy = await s.copy()
    copy["a"] = 1000  # a copy: the server is not changed
    assert await s.copy() == {"a": 1}
    await s.set({"x": 1, "y": 2})
    assert await s.copy() == {"x": 1, "y": 2}
    await s.clear()
    assert await s.len() == 0
    assert isinstance(await s.time(), float)
    assert await s.ping() is not None


async def test_concurrent_requests_get_their_own_replies(astate: zproc.AsyncState) -> None:
    await astate.update({f"k{n}": n for n in range(50)})
    values = await asyncio.gather(*(astate.getitem(f"k{n}") for n in range(50)))
    assert values == list(range(50))


async def test_remote_errors_carry_the_server_traceback(astate: zproc.AsyncState) -> None:
    with pytest.raises(KeyError) as info:
        await astate.getitem("missing")
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    with pytest.raises(ValueError, match="boom from the server") as err:
        await astate.atomic(fail)
    assert isinstance(err.value.__cause__, zproc.RemoteTraceback)
    assert "fail" in str(err.value.__cause__)
    assert await astate.copy() == {}  # the failed atomic call was rolled back


async def test_atomic_functions_and_helpers(astate: zproc.AsyncState) -> None:
    assert await add(astate, "n", 2) == 2
    assert await astate.atomic(add, "n", 3) == 5
    assert await zproc.increase(astate, "n") == 6
    assert await astate.atomic(lambda d, k: d.pop(k), "n") == 6
    with pytest.raises(TypeError, match="AsyncState"):
        add({}, "n", 1)


async def test_unpicklable_value_fails_before_sending(astate: zproc.AsyncState) -> None:
    with pytest.raises(Exception, match="pickle|lambda"):
        await astate.setitem("f", lambda: None)
    assert await astate.len() == 0


# -- timeouts --------------------------------------------------------------------------------


async def test_request_timeout_then_late_reply_is_dropped(astate: zproc.AsyncState) -> None:
    await astate.setitem("a", "value")
    astate.request_timeout = 0.3
    started = time.monotonic()
    with pytest.raises(zproc.TimeoutError, match="request_timeout"):
        await astate.atomic(slow, 1.0)
    assert 0.25 < time.monotonic() - started < 0.9
    astate.request_timeout = 20
    # the reply to the abandoned request comes first and must not be taken for this one
    assert await astate.getitem("a") == "value"
    assert await asyncio.gather(astate.len(), astate.get("a")) == [1, "value"]


async def test_watcher_timeout_is_a_deadline(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    async def noise() -> None:  # changes of other keys must not extend the wait
        for n in range(40):
            await asyncio.to_thread(writer.__setitem__, "other", n)
            await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(noise())
    try:
        started = time.monotonic()
        with pytest.raises(zproc.TimeoutError, match="get_when_change"):
            await astate.get_when_change("watched", timeout=0.4)
        assert 0.35 < time.monotonic() - started < 1.2
    finally:
        await task  # its thread uses ``writer``: it ends before the fixture closes it
    with pytest.raises(zproc.TimeoutError):
        await astate.get_when_equal("watched", 1, timeout=0)
    with pytest.raises(ValueError):
        await astate.get_when_change(timeout=-1)
    with pytest.raises(zproc.TimeoutError, match="AsyncStateWatcher"):
        await anext(astate.when_change("watched", timeout=0.2))


# -- one-shot watchers ---------------------------------------------------------------------


async def test_get_when_change_return_shapes(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    s = astate
    start_later(0.1, writer.update, {"a": 1, "b": 2})
    assert await s.get_when_change(timeout=10) == {"a": 1, "b": 2}
    start_later(0.1, writer.update, {"a": 13, "b": 7})
    assert await s.get_when_change("a", "b", timeout=10) == [13, 7]
    start_later(0.1, writer.__setitem__, "a", 14)
    assert await s.get_when_change("a", timeout=10) == 14
    start_later(0.1, writer.__delitem__, "a")
    assert await s.get_when_change("a", timeout=10) is None
    start_later(0.1, writer.__setitem__, "c", 3)
    assert await s.get_when_change("b", exclude=True, timeout=10) == {"b": 7, "c": 3}
    start_later(0.1, writer.__setitem__, "c", 4)
    update = await s.get_raw_update(timeout=10)
    assert isinstance(update, zproc.StateUpdate)
    assert update.before == {"b": 7, "c": 3} and update.after == {"b": 7, "c": 4}


async def test_level_triggered_watchers(astate: zproc.AsyncState, writer: zproc.State) -> None:
    s = astate
    await s.setitem("flag", "off")
    # the current state qualifies: return at once
    assert await s.get_when_equal("flag", "off", timeout=0) == "off"
    assert await s.get_when_equal("missing", None, timeout=0) is None
    assert await s.get_when(lambda d: d["flag"] == "off", timeout=0) == {"flag": "off"}
    start_later(0.1, writer.__setitem__, "flag", "on")
    assert await s.get_when_equal("flag", "on", timeout=10) == "on"
    start_later(0.1, writer.__setitem__, "flag", "again")
    assert await s.get_when_not_equal("flag", "on", timeout=10) == "again"
    start_later(0.1, writer.__setitem__, "x", None)
    assert await s.get_when_none("x", timeout=10) is None
    start_later(0.1, writer.__setitem__, "y", 5)
    assert await s.get_when_not_none("y", timeout=10) == 5
    start_later(0.1, writer.__setitem__, "z", [1])
    assert await s.get_when_available("z", timeout=10) == [1]
    start_later(0.1, writer.__setitem__, "n", 3)
    snap = await s.get_when(lambda d: d.get("n", 0) > 2, timeout=10)
    assert snap["n"] == 3 and snap["flag"] == "again"


async def test_buffered_watchers_see_changes_made_before_the_call(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    await asyncio.to_thread(writer.update, {"a": 1})
    await asyncio.to_thread(writer.update, {"a": 2})
    assert await astate.get_when_change("a", live=False, timeout=10) == 1
    assert await astate.get_when_change("a", live=False, timeout=10) == 2
    await asyncio.to_thread(writer.update, {"a": 3})
    await astate.go_live()
    with pytest.raises(zproc.TimeoutError):
        await astate.get_when_change("a", live=False, timeout=0.3)


# -- identity filtering ----------------------------------------------------------------------


async def test_own_writes_do_not_wake_the_watchers(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    watcher = astate.when_change(timeout=0.4)
    await astate.setitem("a", 1)
    with pytest.raises(zproc.TimeoutError):
        await astate.get_when_change(live=False, timeout=0.4)
    with pytest.raises(zproc.TimeoutError):
        await anext(watcher)
    assert await astate.get_when_equal("a", 1, timeout=0) == 1  # the snapshot has it
    # a second AsyncState is someone else
    async with zproc.AsyncState(astate.server_address) as other:
        start_later(0.1, lambda: None)
        await other.setitem("b", 2)
    assert await astate.get_when_change("b", live=False, timeout=10) == 2
    assert (await anext(watcher))["b"] == 2


# -- iterator watchers ---------------------------------------------------------------------


async def test_iterator_watchers_yield_shapes(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    changes = astate.when_change("k", count=2, timeout=10)
    equal = astate.when_equal("k", 2, timeout=10)
    raw = astate.when_change_raw(count=1, timeout=10)
    await astate.time()  # the watchers' start is fixed once the server answered
    await asyncio.to_thread(writer.__setitem__, "k", 1)
    await asyncio.to_thread(writer.__setitem__, "k", 2)
    assert [snap async for snap in changes] == [{"k": 1}, {"k": 2}]
    assert await anext(equal) == {"k": 2}
    updates = [update async for update in raw]
    assert updates == [zproc.StateUpdate({}, {"k": 1}, updates[0].timestamp, False)]
    assert await astate.when_falsy("k", timeout=0.1).current() == {"k": 2}  # starts now


@pytest.mark.parametrize("rcvhwm", [10_000, 50], ids=["default-hwm", "tiny-hwm"])
async def test_async_for_sees_every_change_of_a_burst_once_in_order(
    server: zproc.ServerAddress, rcvhwm: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny queue and a consumer that pauses, events are dropped on the way and
    fetched again by sequence number: still every one, once, in order."""
    replays = 0
    replay = _client.AsyncStream.replay

    async def counting_replay(self: Any) -> None:
        nonlocal replays
        replays += 1
        await replay(self)

    monkeypatch.setattr(_client.AsyncStream, "replay", counting_replay)
    count = 5000
    async with zproc.AsyncState(server, request_timeout=20, rcvhwm=rcvhwm) as s:
        watcher = s.when_change("n", count=count, timeout=20)
        await s.time()
        proc = spawn(burst, server, count)
        seen = []
        try:
            async for snap in watcher:
                seen.append(snap["n"])
                if rcvhwm < count and len(seen) == 1000:
                    # the rest (one message each) overflows the queue while this waits
                    await asyncio.to_thread(proc.join, 30)
        finally:
            proc.join(30)
            stop(proc)
        assert proc.exitcode == 0
        assert seen == list(range(count))
    if rcvhwm < count:
        assert replays > 0


# -- cancellation and close ------------------------------------------------------------------


async def test_cancelled_awaits_keep_the_state_usable(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    await astate.setitem("a", "kept")
    waiting = asyncio.get_running_loop().create_task(astate.get_when_change("b"))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(astate.atomic(slow, 0.6), 0.1)
    # the reply to the cancelled request arrives later and is dropped by its id
    assert await asyncio.gather(*(astate.get("a") for _ in range(5))) == ["kept"] * 5
    start_later(0.1, writer.__setitem__, "b", 1)
    assert await astate.get_when_change("b", timeout=10) == 1


def hold(d: dict[str, Any], started: str, release: str) -> None:
    """Keep the server busy until ``release`` exists (at most 20 s)."""
    open(started, "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


@contextlib.asynccontextmanager
async def server_held(server: zproc.ServerAddress, tmp_path: Any) -> AsyncIterator[None]:
    """Keep the server busy in an atomic function (:func:`hold`) while the block runs."""
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with zproc.State(server, request_timeout=30) as blocker:
        holding = asyncio.get_running_loop().create_task(
            asyncio.to_thread(zproc.atomic(hold), blocker, started, release)
        )
        try:
            for _ in range(1000):
                if os.path.exists(started):
                    break
                await asyncio.sleep(0.01)
            yield
        finally:
            open(release, "w").close()
            await holding


@pytest.mark.parametrize("cancelled_in", ["registration", "subscription"])
async def test_a_cancelled_first_watcher_keeps_the_buffer_start(
    server: zproc.ServerAddress, writer: zproc.State, tmp_path: Any, cancelled_in: str
) -> None:
    states: list[zproc.AsyncState] = []
    if cancelled_in == "subscription":
        states.append(zproc.AsyncState(server, request_timeout=30))
        await states[0].len()  # registered; starting the stream will wait
    try:
        async with server_held(server, tmp_path):
            if not states:
                states.append(zproc.AsyncState(server, request_timeout=30))  # registers
            # the server is busy: the first watcher's round trips cannot end in time
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(states[0].get_when_change("x", live=False), 0.2)
        s = states[0]
        await s.len()  # every request sent before has been answered by now
        await asyncio.to_thread(writer.__setitem__, "x", 1)
        # made after the State registered: it is in the buffer
        assert await s.get_when_change("x", live=False, timeout=5) == 1
    finally:
        for st in states:
            await st.close()


async def test_a_cancelled_first_step_keeps_an_iterator_watchers_start(
    server: zproc.ServerAddress, writer: zproc.State, tmp_path: Any
) -> None:
    async with zproc.AsyncState(server, request_timeout=30) as s:
        assert await s.get_when(lambda d: True, timeout=10) == {}  # the event stream runs
        async with server_held(server, tmp_path):
            watcher = s.when_change("x", timeout=5)  # starts here (the server's head)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(watcher.__anext__(), 0.2)  # the server is busy
        await s.len()  # every request sent before has been answered by now
        await asyncio.to_thread(writer.__setitem__, "x", 1)
        await s.go_live()  # the stream moves past the change
        assert (await watcher.__anext__())["x"] == 1


async def test_go_live_keeps_the_changes_an_unstarted_iterator_watcher_waits_for(
    astate: zproc.AsyncState, writer: zproc.State
) -> None:
    await astate.len()
    watcher = astate.when_change("x", timeout=5)  # buffered: from here on
    await asyncio.to_thread(writer.__setitem__, "x", 1)
    await astate.go_live()  # the State's buffer, not the watcher's position
    assert (await watcher.__anext__())["x"] == 1


async def test_close(server: zproc.ServerAddress) -> None:
    s = zproc.AsyncState(server, request_timeout=20)
    await s.setitem("a", 1)
    waiting = asyncio.get_running_loop().create_task(s.get_when_change("a", timeout=30))
    pending = asyncio.get_running_loop().create_task(s.atomic(slow, 0.5))
    await asyncio.sleep(0.2)
    await s.close()
    await s.close()  # idempotent
    assert s.closed
    with pytest.raises(zproc.ZProcError, match="closed"):
        await waiting
    with pytest.raises(zproc.ZProcError, match="closed"):
        await pending
    with pytest.raises(zproc.ZProcError, match="closed"):
        await s.getitem("a")
    with pytest.raises(zproc.ZProcError, match="closed"):
        s.when_change()
    async with zproc.AsyncState(server) as t:
        assert await t.getitem("a") == 1
    assert t.closed


async def test_a_waiting_watcher_notices_that_the_server_died() -> None:
    proc, addr = zproc.start_server()
    try:
        async with zproc.AsyncState(addr, liveness=1.0) as s:
            waiting = asyncio.get_running_loop().create_task(s.get_when_change("a"))
            await asyncio.sleep(0.2)
            proc.kill()
            started = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError, match="lost the connection"):
                await waiting
            assert time.monotonic() - started < 10
    finally:
        stop(proc)
        for endpoint in addr:
            zproc._transport.remove_ipc_endpoint(endpoint)


MANY_REQUESTS_NO_SERVER = """
import asyncio, sys, zproc
async def main():
    address = (f"ipc://{sys.argv[1]}/rr", f"ipc://{sys.argv[1]}/ps")
    async with zproc.AsyncState(address, request_timeout=1, connect_timeout=1) as s:
        results = await asyncio.gather(*(s.setitem(i, i) for i in range(1500)),
                                       return_exceptions=True)
    print(sorted({type(r).__name__ for r in results}))
asyncio.run(main())
"""


async def test_many_requests_to_a_missing_server_time_out(tmp_path: Any) -> None:
    # More requests than a socket queues by default: sending must not block the loop.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", MANY_REQUESTS_NO_SERVER, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] in ("['TimeoutError']", "['ServerUnavailableError']")


async def test_unclosed_state_warns(server: zproc.ServerAddress) -> None:
    s = zproc.AsyncState(server)
    assert await s.len() == 0
    with pytest.warns(ResourceWarning, match="unclosed AsyncState"):
        del s
        gc.collect()


# -- settings ------------------------------------------------------------------------------


async def test_namespaces_and_pickling(server: zproc.ServerAddress) -> None:
    async with zproc.AsyncState(server, namespace="one") as one:
        async with one.fork(namespace="two") as two:
            await one.setitem("k", 1)
            await two.setitem("k", 2)
            assert (await one.getitem("k"), await two.getitem("k")) == (1, 2)
            copy = pickle.loads(pickle.dumps(two))
            try:
                assert copy.namespace == "two" and copy.identity != two.identity
                assert await copy.getitem("k") == 2
            finally:
                await copy.close()


async def test_secret_key(address: zproc.ServerAddress) -> None:
    key = "async secret, 16+ characters"
    proc, addr = zproc.start_server(address, secret_key=key)
    try:
        async with zproc.AsyncState(addr, secret_key=key, request_timeout=20) as s:
            watcher = s.when_change("k", count=1, timeout=10)
            await s.time()
            with zproc.State(addr, secret_key=key) as other:
                await asyncio.to_thread(other.__setitem__, "k", "v")
            assert [snap async for snap in watcher] == [{"k": "v"}]
    finally:
        stop(proc)
