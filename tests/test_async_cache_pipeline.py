"""``AsyncState(..., cache=True)`` and ``async with astate.pipeline() as p``: the tests of
tests/test_cache_pipeline.py, awaited."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

import zproc
from test_cache_pipeline import counting_writer, finish, one_write, run
from test_cache_pipeline import FORK

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest_asyncio.fixture
async def cached(server: zproc.ServerAddress) -> AsyncIterator[zproc.AsyncState]:
    async with zproc.AsyncState(server, request_timeout=20, cache=True) as st:
        yield st


@pytest_asyncio.fixture
async def astate(server: zproc.ServerAddress) -> AsyncIterator[zproc.AsyncState]:
    async with zproc.AsyncState(server, request_timeout=20) as st:
        yield st


async def wait_for(fn: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.001)


# -- replica reads ---------------------------------------------------------------------------


async def test_read_your_writes_through_every_write_method(cached: zproc.AsyncState) -> None:
    for i in range(200):
        await cached.setitem("n", i)
        assert await cached.getitem("n") == i
    await cached.update({"a": 1}, b=2)
    assert (await cached.getitem("a"), await cached.get("b")) == (1, 2)
    await cached.delitem("a")
    assert not await cached.contains("a")
    assert await cached.pop("b") == 2
    assert await cached.get("b", "gone") == "gone"
    await cached.setdefault("c", [1])
    assert await cached.getitem("c") == [1]
    await zproc.append(cached, "c", 2)
    assert await cached.getitem("c") == [1, 2]
    await cached.set({"x": 1})
    assert await cached.copy() == {"x": 1} and await cached.len() == 1
    assert list(await cached.keys()) == ["x"]
    await cached.clear()
    assert await cached.len() == 0 and await cached.copy() == {}


async def test_cached_read_sees_writes_of_another_state_in_the_same_process(
    server: zproc.ServerAddress, cached: zproc.AsyncState
) -> None:
    async with zproc.AsyncState(server, request_timeout=20) as other:
        await other.setitem("k", "v")

        async def seen() -> bool:
            return await cached.get("k") == "v"

        assert await wait_for(seen)


async def test_reads_are_monotonic_while_another_process_writes(
    server: zproc.ServerAddress, cached: zproc.AsyncState
) -> None:
    await cached.setitem("n", 0)
    count = 3000
    proc = run(counting_writer, server, "n", count)
    try:
        last = 0
        seen = set()
        deadline = time.monotonic() + 30
        while last < count and time.monotonic() < deadline:
            value = await cached.getitem("n")
            assert value >= last, f"read {value} after {last}"
            last = value
            seen.add(value)
            await asyncio.sleep(0)
        assert last == count
        assert len(seen) > 1  # the reads were served while the writes went on
    finally:
        await asyncio.to_thread(finish, proc)


async def test_own_write_makes_every_earlier_change_visible(
    server: zproc.ServerAddress, cached: zproc.AsyncState
) -> None:
    assert await cached.get("other") is None  # the replica exists before the write
    receiver, sender = FORK.Pipe(duplex=False)
    proc = run(one_write, server, "other", 42, sender)
    try:
        sender.close()
        assert await asyncio.to_thread(receiver.poll, 30)
        assert receiver.recv() == "written"
        # the reply to this write reports a head past the other write: the next read
        # waits for the replica to get there
        await cached.setitem("mine", 1)
        assert await cached.getitem("other") == 42
    finally:
        receiver.close()
        await asyncio.to_thread(finish, proc)


async def test_cached_reads_are_copies_and_errors_match(cached: zproc.AsyncState) -> None:
    await cached.setitem("lst", [1, 2])
    got = await cached.getitem("lst")
    got.append(3)
    assert await cached.getitem("lst") == [1, 2]
    snapshot = await cached.copy()
    snapshot["lst"].append(4)
    assert await cached.getitem("lst") == [1, 2]
    with pytest.raises(KeyError):
        await cached.getitem("missing")


async def test_cache_survives_pickling_and_fork(cached: zproc.AsyncState) -> None:
    async with pickle.loads(pickle.dumps(cached)) as copy, cached.fork() as forked:
        for st in (copy, forked):
            assert st._cache
            await st.setitem("p", id(st))
            assert await st.getitem("p") == id(st)


async def test_watchers_work_on_a_cached_state(
    server: zproc.ServerAddress, cached: zproc.AsyncState
) -> None:
    await cached.setitem("own", 1)  # own writes never wake own watchers
    async with zproc.AsyncState(server, request_timeout=20) as other:
        await other.setitem("theirs", 2)
        assert await cached.get_when_change("theirs", live=False, timeout=10) == 2
    assert await cached.getitem("own") == 1


# -- pipelines -------------------------------------------------------------------------------


async def test_pipeline_applies_in_order_with_one_event_each(
    server: zproc.ServerAddress, astate: zproc.AsyncState
) -> None:
    async with zproc.AsyncState(server, request_timeout=20) as watcher_state:
        changes = watcher_state.when_change_raw(live=False, timeout=10)
        assert await changes.current() == {}  # its start is fixed: the writes come after
        async with astate.pipeline() as p:
            p["a"] = 1
            p["a"] = 2
            del p["a"]
            p.update(a=3, b=4)
            p.setdefault("b", 5)  # no change: no event
            p.pop("b")
        assert await astate.copy() == {"a": 3}
        afters = [(await anext(changes)).after for _ in range(5)]
        assert afters == [{"a": 1}, {"a": 2}, {}, {"a": 3, "b": 4}, {"a": 3}]
        changes.timeout = 0.3
        with pytest.raises(zproc.TimeoutError):
            await anext(changes)  # five changes, five events: the setdefault changed nothing


async def test_pipeline_results_and_auto_send(astate: zproc.AsyncState) -> None:
    p = astate.pipeline(max_ops=3)
    for i in range(10):
        p["k"] = i
    assert len(p._sent) == 3  # three batches of three went out without waiting
    assert await astate.getitem("k") == 8  # sent before this request: applied before it
    p.setdefault("k", -1)
    p.pop("k")
    p.pop("k", "default")
    results = await p.flush()
    assert results == [None] * 10 + [9, 9, "default"]
    assert not await astate.contains("k")
    assert await p.flush() == []


async def test_pipeline_reports_the_first_error_after_applying_the_rest(
    astate: zproc.AsyncState,
) -> None:
    with pytest.raises(KeyError) as info:
        async with astate.pipeline(max_ops=2) as p:
            p["a"] = 1
            del p["missing"]
            p["b"] = 2
            p.pop("also missing")
            p["c"] = 3
    assert await astate.copy() == {"a": 1, "b": 2, "c": 3}
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    note = " ".join(info.value.__notes__)
    assert "#1 (delitem)" in note and "1 later one(s) failed too" in note


async def test_pipeline_error_index_counts_across_batches(astate: zproc.AsyncState) -> None:
    p = astate.pipeline(max_ops=2)
    for i in range(5):
        p[i] = i
    p.popitem()
    await astate.clear()  # the popitem is still buffered: it will find the dict empty
    p.popitem()
    with pytest.raises(KeyError) as info:
        await p.flush()
    assert "#6 (popitem)" in " ".join(info.value.__notes__)


async def test_unpicklable_value_fails_at_once(astate: zproc.AsyncState) -> None:
    p = astate.pipeline()
    p["ok"] = 1
    with pytest.raises(Exception, match="pickle|lambda"):
        p["bad"] = lambda: None
    assert await p.flush() == [None]
    assert await astate.copy() == {"ok": 1}


async def test_exception_in_the_block_discards_unsent_writes(astate: zproc.AsyncState) -> None:
    with pytest.raises(RuntimeError):
        async with astate.pipeline() as p:
            p["never"] = 1
            raise RuntimeError("stop")
    assert not await astate.contains("never")
    with pytest.raises(TypeError, match="async with"):
        with astate.pipeline():
            pass


async def test_pipeline_then_cached_read(cached: zproc.AsyncState) -> None:
    async with cached.pipeline() as p:
        for i in range(500):
            p[f"k{i}"] = i
    assert await cached.len() == 500 and await cached.getitem("k499") == 499


async def test_max_ops_is_checked(astate: zproc.AsyncState) -> None:
    with pytest.raises(ValueError):
        astate.pipeline(max_ops=0)
