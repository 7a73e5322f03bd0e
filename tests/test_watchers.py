"""State watchers: return shapes, identity filtering, live vs buffered, deadlines, no loss."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import zproc

pytestmark = pytest.mark.timeout(120)


_threads: list[threading.Thread] = []


@pytest.fixture
def pair(server: zproc.ServerAddress) -> Iterator[tuple[zproc.State, zproc.State]]:
    """Two States on one server: a watcher and a writer."""
    with zproc.State(server, request_timeout=20) as a, zproc.State(
        server, request_timeout=20
    ) as b:
        try:
            yield a, b
        finally:

            while _threads:
                _threads.pop().join(10)



def later(delay: float, fn: Any, *args: Any) -> threading.Thread:
    """Call ``fn(*args)`` in a thread after ``delay`` (joined before the States close)."""
    thread = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
    thread.start()
    _threads.append(thread)
    return thread


def writer_process(address: Any, updates: list[tuple[str, Any]], delay: float = 0.0) -> None:
    with zproc.State(address) as st:
        time.sleep(delay)
        for key, value in updates:
            st[key] = value


def spawn_writer(address: Any, updates: list[tuple[str, Any]], delay: float = 0.0) -> Any:
    proc = multiprocessing.Process(target=writer_process, args=(address, updates, delay))
    proc.start()
    return proc


# -- return shapes (spec 3.4.4-3.4.6) ------------------------------------------------------


def test_get_when_change_shapes(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    later(0.1, writer.update, {"a": 13, "b": 7})
    assert watcher.get_when_change("a", "b", timeout=5) == [13, 7]
    later(0.1, writer.__setitem__, "a", 14)
    assert watcher.get_when_change("a", timeout=5) == 14
    later(0.1, writer.__setitem__, "c", 1)
    assert watcher.get_when_change(timeout=5) == {"a": 14, "b": 7, "c": 1}
    later(0.1, writer.__setitem__, "c", 2)
    assert watcher.get_when_change("a", exclude=True, timeout=5) == {"a": 14, "b": 7, "c": 2}
    later(0.1, writer.__delitem__, "a")
    assert watcher.get_when_change("a", timeout=5) is None


def test_exclude_ignores_listed_keys(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    writer["a"] = 0

    def write() -> None:
        writer["a"] = 1
        writer["z"] = 1

    later(0.1, write)
    assert watcher.get_when_change("a", exclude=True, timeout=5)["z"] == 1


def test_no_op_write_publishes_nothing(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    writer["a"] = 1
    watcher.go_live()
    writer["a"] = 1
    with pytest.raises(zproc.TimeoutError):
        watcher.get_when_change("a", live=False, timeout=0.3)


def test_get_when_returns_snapshot_and_checks_first(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    watcher["n"] = 5  # own write: visible to the initial check
    assert watcher.get_when(lambda s: s.get("n") == 5, timeout=1) == {"n": 5}
    later(0.1, writer.__setitem__, "n", 6)
    snap = watcher.get_when(lambda s: s["n"] > 5, timeout=5)
    assert snap == {"n": 6}


def test_get_when_equal_shapes(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    assert watcher.get_when_equal("missing", None, timeout=0) is None
    assert watcher.get_when_not_equal("missing", 5, timeout=0) is None
    later(0.1, writer.__setitem__, "x", 1.0)
    assert watcher.get_when_equal("x", 1, timeout=5) == 1.0
    later(0.1, writer.__setitem__, "x", 2)
    assert watcher.get_when_not_equal("x", 1, timeout=5) == 2


def test_predicate_errors_propagate(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, _ = pair

    def broken(snap: dict[str, Any]) -> bool:
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        watcher.get_when(broken, timeout=1)


# -- identity filtering (spec 1.6) ---------------------------------------------------------


def test_own_writes_never_wake_own_watchers(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    watcher["a"] = 1
    with pytest.raises(zproc.TimeoutError):
        watcher.get_when_change(live=False, timeout=0.5)
    # a second State in the same process does see them
    later(0.1, watcher.__setitem__, "a", 3)
    assert writer.get_when_change("a", timeout=5) == 3


def test_atomic_events_are_attributed_to_the_caller(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    watcher["n"] = 0
    writer.go_live()
    zproc.increase(watcher, "n")
    with pytest.raises(zproc.TimeoutError):
        watcher.get_when_change("n", live=False, timeout=0.3)
    assert writer.get_when_change("n", live=False, timeout=5) == 1


# -- live vs buffered ------------------------------------------------------------------------


def test_buffered_sees_every_change_in_order(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    for i in range(5):
        writer["y"] = i
    assert [watcher.get_when_change("y", live=False, timeout=5) for _ in range(5)] == list(
        range(5)
    )


def test_live_ignores_the_past(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    for i in range(3):
        writer["y"] = i
    later(0.2, writer.__setitem__, "y", 99)
    assert watcher.get_when_change("y", timeout=5) == 99
    # the buffer was left untouched by the live call
    assert watcher.get_when_change("y", live=False, timeout=5) == 0


def test_buffer_starts_at_construction(server: zproc.ServerAddress) -> None:
    """R2: a State created just before another process writes sees that write (x100)."""
    with zproc.State(server) as writer:
        for i in range(100):
            with zproc.State(server) as watcher:
                writer["v"] = i
                assert watcher.get_when_change("v", live=False, timeout=5) == i


def hold(d: dict[str, Any], started: str, release: str) -> None:
    """Keep the server busy until ``release`` exists (at most 20 s)."""
    open(started, "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_buffer_start_survives_a_timed_out_first_watcher(
    server: zproc.ServerAddress, tmp_path: Any
) -> None:
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with zproc.State(server, request_timeout=30) as blocker, zproc.State(server) as w:
        holder = threading.Thread(target=zproc.atomic(hold), args=(blocker, started, release))
        holder.start()
        try:
            for _ in range(1000):
                if os.path.exists(started):
                    break
                time.sleep(0.01)
            with zproc.State(server, request_timeout=0.2) as s:  # registers, unanswered
                with pytest.raises(zproc.TimeoutError):
                    s.get_when_change("x", live=False)  # the server is still busy
                open(release, "w").close()
                holder.join(30)
                s.request_timeout = 30
                len(s)  # the registration has been answered by now
                w["x"] = 1  # made after s registered: it is in s's buffer
                assert s.get_when_change("x", live=False, timeout=5) == 1
        finally:
            open(release, "w").close()
            holder.join(30)


def test_live_watcher_sees_an_update_right_after_the_call(server: zproc.ServerAddress) -> None:
    """R1: an update issued right after the call starts is never missed (x100)."""
    with zproc.State(server) as watcher, zproc.State(server) as writer:
        for i in range(100):
            # 50 ms: long enough for the call to have started, even on a busy machine
            thread = later(0.05, writer.__setitem__, "v", i)
            value = watcher.get_when_change("v", timeout=5)
            thread.join()
            assert value == i


def test_buffered_predicate_never_returns_a_stale_value(
    pair: tuple[zproc.State, zproc.State],
) -> None:
    """B11: buffered events older than the initial snapshot are not evaluated."""
    watcher, writer = pair
    watcher.go_live()
    writer["y"] = "on"
    writer["y"] = "off"
    with pytest.raises(zproc.TimeoutError):
        watcher.get_when_equal("y", "on", live=False, timeout=0.3)


def test_go_live_discards_backlog_and_loses_nothing_after(
    pair: tuple[zproc.State, zproc.State],
) -> None:
    watcher, writer = pair
    for i in range(10):
        writer["k"] = i
    watcher.go_live()
    writer["k"] = 100
    assert watcher.get_when_change("k", live=False, timeout=5) == 100


def test_hybrid_walkthrough(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    for i in range(3):
        writer["p"] = i
    assert watcher.get_when_change("p", live=False, timeout=5) == 0
    watcher.go_live()
    later(0.1, writer.__setitem__, "p", 10)
    assert watcher.get_when_change("p", live=False, timeout=5) == 10


# -- timeouts ------------------------------------------------------------------------------


def test_timeout_is_a_deadline_despite_other_events(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    stop = threading.Event()

    def noise() -> None:
        with zproc.State(writer.server_address) as st:
            i = 0
            while not stop.is_set():
                st["noise"] = i
                i += 1
                time.sleep(0.01)

    thread = threading.Thread(target=noise)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(zproc.TimeoutError, match="get_when_change"):
            watcher.get_when_change("quiet", timeout=0.5)
        assert time.monotonic() - start < 1.5
    finally:
        stop.set()
        thread.join()


def test_timeout_zero_polls_and_negative_is_rejected(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    writer["a"] = 1
    assert watcher.get_when_change("a", live=False, timeout=0) == 1
    with pytest.raises(zproc.TimeoutError):
        watcher.get_when_change("a", live=False, timeout=0)
    with pytest.raises(ValueError):
        watcher.get_when_change(timeout=-1)
    assert isinstance(zproc.TimeoutError("x"), TimeoutError)


# -- zero loss -----------------------------------------------------------------------------


def test_buffered_watcher_loses_nothing_while_asleep(server: zproc.ServerAddress) -> None:
    """5,000 updates while a buffered watcher is not reading: all seen, in order."""
    with zproc.State(server) as watcher:
        watcher.go_live()
        proc = spawn_writer(server, [("i", i) for i in range(5000)])
        proc.join(60)
        assert proc.exitcode == 0
        seen = [watcher.get_when_change("i", live=False, timeout=10) for _ in range(5000)]
        assert seen == list(range(5000))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("rcvhwm", "n"), [(2, 100_000), (10_000, 20_000)])
def test_no_event_lost_under_a_flood(server: zproc.ServerAddress, rcvhwm: int, n: int) -> None:
    """A writer process floods; a buffered watcher and an iterator watcher (reading at the
    same time) see each change exactly once and in order, even with a tiny receive queue
    that drops most messages (they are replayed from the server's history)."""
    seen_it: list[int] = []
    with zproc.State(server, rcvhwm=rcvhwm) as watcher, zproc.State(
        server, rcvhwm=rcvhwm
    ) as it_state:
        watcher.go_live()
        # the timeouts only guard against a hang: on a machine loaded many times over, two
        # watchers replaying a 100,000-change flood can wait long for the server
        iterator = it_state.when_change("i", timeout=120)

        def consume() -> None:
            seen_it.extend(snap["i"] for snap in itertools.islice(iterator, n))

        thread = threading.Thread(target=consume)
        thread.start()
        proc = spawn_writer(server, [("i", i) for i in range(n)])
        try:
            seen = [watcher.get_when_change("i", live=False, timeout=120) for _ in range(n)]
            assert seen == list(range(n))
        finally:
            thread.join(130)
            proc.join(60)
        assert seen_it == list(range(n))
        assert proc.exitcode == 0


def test_fell_behind_history_gets_one_coalesced_change() -> None:
    """R3: a client further behind than the server keeps is resynchronised, not hung."""
    proc, addr = zproc.start_server(history_size=10)
    try:
        with zproc.State(addr) as watcher, zproc.State(addr) as writer:
            writer["other"] = "x"
            watcher.go_live()
            for i in range(100):
                writer["k"] = i
            assert watcher.get_when_change("k", live=False, timeout=5) == 99
            with pytest.raises(zproc.TimeoutError):
                watcher.get_when_change("k", live=False, timeout=0.2)
    finally:
        proc.terminate()
        proc.join(5)


def test_client_backlog_is_bounded_and_coalesced(server: zproc.ServerAddress) -> None:
    with zproc.State(server, max_backlog=50) as watcher, zproc.State(server) as writer:
        watcher.go_live()
        watcher.get_when_change("warmup", timeout=0) if False else None
        for i in range(300):
            writer["k"] = i
        seen = []
        while True:
            try:
                seen.append(watcher.get_when_change("k", live=False, timeout=0.5))
            except zproc.TimeoutError:
                break
        assert seen[-1] == 299
        assert seen == sorted(seen)
        assert len(watcher._stream.log) <= 50  # type: ignore[union-attr]


# -- iterator watchers and raw updates -----------------------------------------------------


def test_iterator_watchers(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    changes = watcher.when_change("a", count=3)
    equal = watcher.when_equal("a", 2)
    truthy = watcher.when_truthy("flag", timeout=5)
    for i in range(1, 4):
        writer["a"] = i
    writer["flag"] = 0
    writer["flag"] = 1
    assert [snap["a"] for snap in changes] == [1, 2, 3]
    assert next(equal)["a"] == 2
    assert next(truthy)["flag"] == 1
    with pytest.raises(StopIteration):
        next(changes)


def test_iterator_watcher_timeout_and_go_live(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    it = watcher.when_change(timeout=0.2)
    with pytest.raises(zproc.TimeoutError):
        next(it)
    writer["a"] = 1
    it.go_live()
    writer["a"] = 2
    assert next(it) == {"a": 2}


def test_raw_updates(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    writer["a"] = 1
    watcher.go_live()
    later(0.1, writer.update, {"a": 2, "b": 3})
    update = watcher.get_raw_update(timeout=5)
    assert isinstance(update, zproc.StateUpdate)
    assert update.before == {"a": 1}
    assert update.after == {"a": 2, "b": 3}
    assert update.is_identical is False
    assert abs(update.timestamp - watcher.time()) < 5
    raw = watcher.when_change_raw(count=1)
    writer["a"] = 3
    (item,) = list(raw)
    assert (item.before["a"], item.after["a"]) == (2, 3)


def test_start_time_replays_retained_history(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    writer["a"] = 1
    t = watcher.time()
    time.sleep(0.05)
    writer["a"] = 2
    writer["a"] = 3
    it = watcher.when_change("a", start_time=t, count=2)
    assert [s["a"] for s in it] == [2, 3]


def test_extra_one_shot_watchers(pair: tuple[zproc.State, zproc.State]) -> None:
    watcher, writer = pair
    later(0.1, writer.__setitem__, "k", None)
    assert watcher.get_when_none("k", timeout=5) is None
    later(0.1, writer.__setitem__, "k", 4)
    assert watcher.get_when_not_none("k", timeout=5) == 4
    later(0.1, writer.__setitem__, "j", [1])
    assert watcher.get_when_available("j", timeout=5) == [1]


# -- namespaces ----------------------------------------------------------------------------


def test_namespaces_are_independent(server: zproc.ServerAddress) -> None:
    with zproc.State(server, namespace="one") as one, zproc.State(
        server, namespace="two"
    ) as two, zproc.State(server, namespace="two") as two_b:
        one["a"] = 1
        two["a"] = 2
        assert one.copy() == {"a": 1}
        assert two.copy() == {"a": 2}
        later(0.1, one.__setitem__, "a", 10)
        with pytest.raises(zproc.TimeoutError):
            two_b.get_when_change("a", timeout=0.5)
        later(0.1, two.__setitem__, "a", 20)
        assert two_b.get_when_change("a", timeout=5) == 20
        forked = one.fork(namespace="two")
        try:
            assert forked["a"] == 20
        finally:
            forked.close()
        two_b.namespace = "one"
        assert two_b["a"] == 10
