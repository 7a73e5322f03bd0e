"""Queues and events with ``persist=``: what survives a server killed with SIGKILL
(queue items, in flight ones back at the head; maxsize; event flags) and what comes back
free (locks: their old holder hears LockLostError); the journal's core without sockets."""

from __future__ import annotations

import multiprocessing
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import zproc
from zproc._coord import Coordinator
from zproc._coordqueue import Journal, QueueState
from zproc._coordwire import EVENT, QUEUE

from conftest import kill9, stop

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")
S1 = b"s" * 16


# -- the core, without sockets ----------------------------------------------------------


def test_core_journals_puts_and_acknowledgements_only() -> None:
    core = Coordinator()
    journal = Journal()
    core.restore(journal, [], [])
    core.post("ns", "q", b"a")
    core.post("ns", "q", b"b")
    core.set_event("ns", "e", True)
    assert journal.declared == {("ns", "q"): (QUEUE, 0, False), ("ns", "e"): (EVENT, 1, True)}
    assert [(name, pos, item) for _, name, pos, item in journal.added] == [
        ("q", 0, b"a"), ("q", 1, b"b")
    ]
    journal.clear()
    queue = core.tables["ns"]["q"]
    assert isinstance(queue, QueueState)
    assert queue.get((S1, 1, 1), 2, None, 0, 0.0, 10.0) == [b"a", b"b"]
    assert not journal.pending  # in flight: still in the file
    queue.ack((S1, 1, 1))
    assert journal.removed == [("ns", "q", 0)]
    core.set_event("ns", "e", True)  # no change: nothing to write
    assert not journal.declared


def test_core_restore_puts_what_was_in_flight_at_the_head() -> None:
    core = Coordinator()
    core.restore(
        Journal(),
        [("ns", "q", QUEUE, 3, False), ("ns", "e", EVENT, 1, True)],
        [("ns", "q", 4, b"c"), ("ns", "q", 7, b"d")],
    )
    queue = core.queue("ns", "q", 3)
    assert list(queue.items) == [b"c", b"d"] and core.is_set("ns", "e")
    with pytest.raises(ValueError, match="maxsize 3"):
        core.queue("ns", "q", 0)
    queue.put((S1, 1, 1), b"e", None, None, 0.0, 10.0)
    assert core.journal is not None and core.journal.added[-1][2:] == (8, b"e")


def test_core_without_persistence_journals_nothing() -> None:
    core = Coordinator()
    core.post("ns", "q", b"a")
    assert core.journal is None and core.queue("ns", "q", 0).log is None


# -- real servers, killed ---------------------------------------------------------------


def consume(address: zproc.ServerAddress, count: int, got: Any) -> None:
    """Take ``count`` items (the rest of the prefetch stays in flight), then wait."""
    state = zproc.State(address)
    q = state.queue("jobs")
    for _ in range(count):
        got.put(q.get(timeout=10))
    q.qsize()  # a round trip: the acknowledgements have arrived
    got.put("done")
    time.sleep(60)


def test_items_survive_kill9_and_those_in_flight_come_back_at_the_head(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    options: dict[str, Any] = {"persist": tmp_path / "s.db", "fsync": "always"}
    server, _ = zproc.start_server(ipc_address, **options)
    got = FORK.Queue()
    consumer = FORK.Process(target=consume, args=(ipc_address, 3, got))
    try:
        with zproc.State(ipc_address) as state:
            q = state.queue("jobs")
            for i in range(100):
                q.put(i)
            assert q.qsize() == 100  # a round trip: every put has arrived, durably
            consumer.start()
            taken = [got.get(timeout=30) for _ in range(4)]
            assert taken == [0, 1, 2, "done"]
            assert q.qsize() == 100 - 64  # the consumer's prefetch is in flight
            kill9(server)
            kill9(consumer)
            server, _ = zproc.start_server(ipc_address, **options)
        with zproc.State(ipc_address) as state:
            q = state.queue("jobs")
            assert q.qsize() == 97
            assert [q.get(timeout=10) for _ in range(97)] == list(range(3, 100))
            with pytest.raises(queue.Empty):
                q.get_nowait()
    finally:
        stop(consumer)
        stop(server)


def test_events_queues_with_maxsize_survive_and_locks_come_back_free(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    options: dict[str, Any] = {"persist": tmp_path / "s.db", "fsync": "always"}
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state:
            state.event("go").set()
            state.event("stay").set()
            state.event("stay").clear()
            bounded = state.queue("bounded", maxsize=2)
            bounded.put("a")
            bounded.put("b")
            assert bounded.full()
            lock = state.lock("l")
            assert lock.acquire(timeout=5)
            before = lock.token
            kill9(server)
            server, _ = zproc.start_server(ipc_address, **options)
            with zproc.State(ipc_address) as other:
                assert other.event("go").is_set()
                assert not other.event("stay").is_set()
                with pytest.raises(ValueError, match="maxsize 2"):
                    other.queue("bounded", maxsize=3)
                again = other.queue("bounded", maxsize=2)
                assert again.full()
                with pytest.raises(queue.Full):
                    again.put_nowait("c")
                assert [again.get(timeout=5), again.get(timeout=5)] == ["a", "b"]
                taker = other.lock("l")
                assert taker.acquire(timeout=5)  # free after the restart
                assert taker.token > before
                with pytest.raises(zproc.LockLostError):
                    lock.release()
                taker.release()
    finally:
        stop(server)


def test_a_clean_stop_keeps_pipelined_items_with_every_second(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    path = tmp_path / "s.db"
    options: dict[str, Any] = {"persist": path, "fsync": "every second"}
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state:
            q = state.queue("jobs")
            for i in range(50):
                q.put(i)
            assert q.get(timeout=5) == 0
            assert q.qsize() == 0  # the rest is in flight to this handle
        stop(server)  # SIGTERM: the last transaction is committed
        db = sqlite3.connect(path)
        try:
            rows = db.execute("SELECT COUNT(*) FROM queue_items").fetchone()[0]
        finally:
            db.close()
        assert rows == 49
        server, _ = zproc.start_server(ipc_address, **options)
        with zproc.State(ipc_address) as state:
            q = state.queue("jobs")
            assert [q.get(timeout=5) for _ in range(49)] == list(range(1, 50))
    finally:
        stop(server)


def test_a_put_that_waited_for_room_is_durable_when_it_returns(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """A put to a full bounded queue gets room when a get takes the head; its answer
    leaves after the commit that holds its item (fsync="always")."""
    options: dict[str, Any] = {"persist": tmp_path / "s.db", "fsync": "always"}
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state, zproc.State(ipc_address) as other:
            q = state.queue("one", maxsize=1)
            q.put("a")
            done = threading.Event()

            def put_b() -> None:
                other.queue("one", maxsize=1).put("b", timeout=20)
                done.set()

            putter = threading.Thread(target=put_b)
            putter.start()
            time.sleep(0.2)  # the put waits at the server
            assert not done.is_set()
            assert q.get(timeout=5) == "a"
            assert done.wait(20)
            kill9(server)  # at once: nothing else reaches the server
            putter.join(10)
            server, _ = zproc.start_server(ipc_address, **options)
        with zproc.State(ipc_address) as state:
            q = state.queue("one", maxsize=1)
            got = [q.get(timeout=5)]
            while got[-1] != "b":
                got.append(q.get(timeout=5))
            # "a" comes back too when its acknowledgement had not arrived at the kill
            assert got in (["b"], ["a", "b"])
    finally:
        stop(server)
