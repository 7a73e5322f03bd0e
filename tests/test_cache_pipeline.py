"""Replica reads (``State(..., cache=True)``) and pipelined writes (``State.pipeline()``)."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest

import zproc
from zproc import _protocol as P
from zproc import _serialization as S

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def cached(server: zproc.ServerAddress) -> Iterator[zproc.State]:
    with zproc.State(server, request_timeout=20, cache=True) as st:
        yield st


def counting_writer(address: Any, key: str, count: int) -> None:
    with zproc.State(address, request_timeout=20) as st:
        for i in range(1, count + 1):
            st[key] = i


def one_write(address: Any, key: str, value: Any, conn: Any) -> None:
    with zproc.State(address, request_timeout=20) as st:
        st[key] = value
    conn.send("written")
    conn.close()


def run(target: Any, *args: Any) -> Any:
    proc = FORK.Process(target=target, args=args)
    proc.start()
    return proc


def finish(proc: Any) -> None:
    proc.join(30)
    assert proc.exitcode == 0, f"writer process exited with {proc.exitcode}"


def wait_for(fn: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.001)


# -- replica reads ---------------------------------------------------------------------------


def test_read_your_writes_through_every_write_method(cached: zproc.State) -> None:
    for i in range(200):
        cached["n"] = i
        assert cached["n"] == i
    cached.update({"a": 1}, b=2)
    assert (cached["a"], cached.get("b")) == (1, 2)
    del cached["a"]
    assert "a" not in cached
    assert cached.pop("b") == 2
    assert cached.get("b", "gone") == "gone"
    cached.setdefault("c", [1])
    assert cached["c"] == [1]
    zproc.append(cached, "c", 2)
    assert cached["c"] == [1, 2]
    cached.set({"x": 1})
    assert cached.copy() == {"x": 1} and len(cached) == 1 and list(cached) == ["x"]
    cached.clear()
    assert len(cached) == 0 and cached == {}


def test_cached_read_sees_writes_of_another_state_in_the_same_process(
    server: zproc.ServerAddress, cached: zproc.State
) -> None:
    with zproc.State(server, request_timeout=20) as other:
        other["k"] = "v"
        assert wait_for(lambda: cached.get("k") == "v")


def test_reads_are_monotonic_while_another_process_writes(
    server: zproc.ServerAddress, cached: zproc.State
) -> None:
    cached["n"] = 0
    count = 3000
    proc = run(counting_writer, server, "n", count)
    try:
        last = 0
        seen = set()
        deadline = time.monotonic() + 30
        while last < count and time.monotonic() < deadline:
            value = cached["n"]
            assert value >= last, f"read {value} after {last}"
            last = value
            seen.add(value)
        assert last == count
        assert len(seen) > 1  # the reads were served while the writes went on
    finally:
        finish(proc)


def test_coherent_after_another_process_writes(
    server: zproc.ServerAddress, cached: zproc.State
) -> None:
    assert cached.get("flag") is None  # the replica exists before the write
    receiver, sender = FORK.Pipe(duplex=False)
    proc = run(one_write, server, "flag", "up", sender)
    try:
        sender.close()
        assert receiver.poll(30) and receiver.recv() == "written"
        assert wait_for(lambda: cached.get("flag") == "up")
    finally:
        receiver.close()
        finish(proc)


def test_own_write_makes_every_earlier_change_visible(
    server: zproc.ServerAddress, cached: zproc.State
) -> None:
    assert cached.get("other") is None
    receiver, sender = FORK.Pipe(duplex=False)
    proc = run(one_write, server, "other", 42, sender)
    try:
        sender.close()
        assert receiver.poll(30) and receiver.recv() == "written"
        # the reply to this write reports a head past the other write: the next read
        # waits for the replica to get there
        cached["mine"] = 1
        assert cached["other"] == 42
    finally:
        receiver.close()
        finish(proc)


def test_cached_reads_are_copies_and_errors_match(cached: zproc.State) -> None:
    cached["lst"] = [1, 2]
    got = cached["lst"]
    got.append(3)
    assert cached["lst"] == [1, 2]
    snapshot = cached.copy()
    snapshot["lst"].append(4)
    assert cached["lst"] == [1, 2]
    with pytest.raises(KeyError):
        cached["missing"]
    assert cached != {"lst": [1, 2, 3]}


class Tagged(int):
    """An int subclass: it may carry mutable attributes, so reads copy it."""


def test_cached_reads_copy_only_what_may_change(cached: zproc.State) -> None:
    cached.update({"flat": (1, "a", b"b", None, 2.5), "deep": (1, [2]), "n": 7,
                   "sub": Tagged(3)})
    assert cached["flat"] is cached["flat"]  # a tuple of immutable values: shared
    deep = cached["deep"]
    deep[1].append(3)
    assert cached["deep"] == (1, [2])  # a tuple holding a list: copied
    assert cached["n"] == 7 and cached["sub"] == 3 and type(cached["sub"]) is Tagged
    with pytest.raises(KeyError):
        cached["missing"]
    cached["n"] = 8  # read-your-writes on the inlined hit path
    assert cached["n"] == 8
    with pytest.raises(TypeError):
        cached[["unhashable"]]  # type: ignore[index]  # as a dict says


def test_cache_survives_pickling_and_fork(cached: zproc.State) -> None:
    with pickle.loads(pickle.dumps(cached)) as copy, cached.fork() as forked:
        for st in (copy, forked):
            assert st._cache
            st["p"] = id(st)
            assert st["p"] == id(st)


def test_watchers_work_on_a_cached_state(
    server: zproc.ServerAddress, cached: zproc.State
) -> None:
    cached["own"] = 1  # own writes never wake own watchers
    with zproc.State(server, request_timeout=20) as other:
        other["theirs"] = 2
        assert cached.get_when_change("theirs", live=False, timeout=10) == 2
    assert cached["own"] == 1


# -- pipelines -------------------------------------------------------------------------------


def test_pipeline_applies_in_order_with_one_event_each(
    server: zproc.ServerAddress, state: zproc.State
) -> None:
    with zproc.State(server, request_timeout=20) as watcher_state:
        changes = watcher_state.when_change_raw(live=False, timeout=10)
        with state.pipeline() as p:
            p["a"] = 1
            p["a"] = 2
            del p["a"]
            p.update(a=3, b=4)
            p.setdefault("b", 5)  # no change: no event
            p.pop("b")
        assert state.copy() == {"a": 3}
        afters = [next(changes).after for _ in range(5)]
        assert afters == [{"a": 1}, {"a": 2}, {}, {"a": 3, "b": 4}, {"a": 3}]
        changes.timeout = 0.3
        with pytest.raises(zproc.TimeoutError):
            next(changes)  # five changes, five events: the setdefault changed nothing


def test_pipeline_results_and_auto_flush(state: zproc.State) -> None:
    p = state.pipeline(max_ops=3)
    for i in range(10):
        p["k"] = i
    assert state["k"] == 8  # three batches of three went out on the way
    p.setdefault("k", -1)
    p.pop("k")
    p.pop("k", "default")
    results = p.flush()
    assert results == [None] * 10 + [9, 9, "default"]
    assert "k" not in state
    assert p.flush() == []


def test_pipeline_reports_the_first_error_after_applying_the_rest(state: zproc.State) -> None:
    with pytest.raises(KeyError) as info:
        with state.pipeline() as p:
            p["a"] = 1
            del p["missing"]
            p["b"] = 2
            p.pop("also missing")
            p["c"] = 3
    assert state.copy() == {"a": 1, "b": 2, "c": 3}
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    note = " ".join(info.value.__notes__)
    assert "#1 (delitem)" in note and "1 later one(s) failed too" in note


def test_pipeline_error_index_counts_across_batches(state: zproc.State) -> None:
    p = state.pipeline(max_ops=2)
    for i in range(5):
        p[i] = i
    p.popitem()
    state.clear()  # the popitem is still buffered: it will find the dict empty
    p.popitem()
    with pytest.raises(KeyError) as info:
        p.flush()
    assert "#6 (popitem)" in " ".join(info.value.__notes__)


def test_unpicklable_value_fails_at_once(state: zproc.State) -> None:
    p = state.pipeline()
    p["ok"] = 1
    with pytest.raises(Exception, match="pickle|lambda"):
        p["bad"] = lambda: None
    assert p.flush() == [None]
    assert state.copy() == {"ok": 1}


def test_exception_in_the_block_discards_unsent_writes(state: zproc.State) -> None:
    with pytest.raises(RuntimeError):
        with state.pipeline() as p:
            p["never"] = 1
            raise RuntimeError("stop")
    assert "never" not in state


def test_pipeline_then_cached_read(cached: zproc.State) -> None:
    with cached.pipeline() as p:
        for i in range(500):
            p[f"k{i}"] = i
    assert len(cached) == 500 and cached["k499"] == 499


def test_server_rejects_bad_pipelined_operations_one_by_one(state: zproc.State) -> None:
    ops = [
        S.dumps((999, ())),
        S.dumps((int(P.Method.SETITEM), ["not", "a tuple"])),
        b"not a pickle",
        S.dumps((int(P.Method.SETITEM), ("k", 1))),
    ]
    replies = state._request(P.Kind.PIPELINE, 0, S.dumps(ops))
    assert [status for status, _ in replies] == [P.Status.ERROR] * 3 + [P.Status.OK]
    assert isinstance(S.loads_exception(replies[0][1]), zproc.ProtocolError)
    assert state["k"] == 1
    with pytest.raises(zproc.ProtocolError):
        state._request(P.Kind.PIPELINE, 0, S.dumps("not a list"))
    assert state["k"] == 1


def test_max_ops_is_checked(state: zproc.State) -> None:
    with pytest.raises(ValueError):
        state.pipeline(max_ops=0)
