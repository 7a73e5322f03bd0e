"""Named queues: the core without sockets, then real processes: a killed consumer
(SIGKILL with items in flight) losing and duplicating nothing, timeouts and asyncio
cancellation taking nothing, maxsize, bad input, kind clashes, pickled handles."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import zproc
from zproc._coordqueue import QueueState
from zproc._queues import flush_pending

from conftest import stop

pytestmark = pytest.mark.timeout(120)

S1, S2 = b"s" * 16, b"t" * 16


# -- the core, without sockets ----------------------------------------------------------


def test_core_in_flight_items_go_back_to_the_head_in_order() -> None:
    q = QueueState(0)
    for item in (b"a", b"b", b"c", b"d"):
        assert q.put((S1, 1, 0), item, None, None, 0.0, 10.0) is True
    assert q.get((S2, 7, 1), 2, None, 0, 0.0, 10.0) == [b"a", b"b"]
    assert q.get((S2, 7, 2), 1, None, 0, 0.0, 10.0) == [b"c"]  # a second get at once
    q.ack((S2, 7, 2))  # the consumer has "c", then "a"
    q.ack((S2, 7, 1))
    assert list(q.items) == [b"d"]
    assert q.clear(S2, lambda key: True, None, 0.0, []) is False  # it died
    assert list(q.items) == [b"b", b"d"] and not q.inflight  # "b" back ahead of "d"


def test_core_waiting_getters_and_putters_are_served_in_order() -> None:
    out: list[tuple[Any, Any]] = []
    q = QueueState(1)
    assert q.get((S1, 1, 1), 1, "g1", None, 0.0, 10.0) is None
    assert q.get((S2, 2, 1), 1, "g2", None, 0.0, 10.0) is None
    assert q.put((S1, 3, 1), b"x", "p1", None, 0.0, 10.0) is True
    assert q.put((S1, 3, 2), b"y", "p2", None, 0.0, 10.0) is None  # full: waits
    assert q.put((S1, 3, 3), b"z", "p3", 0, 0.0, 10.0) is False  # full, no wait
    q.feed(out)
    assert out == [("g1", [b"x"]), ("p2", True), ("g2", [b"y"])]
    assert not q.items and not q.getters and not q.putters


def test_core_a_cancelled_or_timed_out_get_takes_nothing() -> None:
    out: list[tuple[Any, Any]] = []
    q = QueueState(0)
    assert q.get((S1, 1, 1), 5, "g", 1.0, 0.0, 10.0) is None
    q.clear(S1, None, 2.0, 0.0, out)  # past its deadline
    assert out == [("g", [])] and not q.getters
    q.put((S2, 2, 0), b"a", None, None, 0.0, 10.0)
    q.put((S2, 2, 0), b"b", None, None, 0.0, 10.0)
    assert q.get((S1, 1, 2), 1, "g", None, 0.0, 10.0) == [b"a"]
    assert q.get((S1, 1, 3), 1, "g", None, 0.0, 10.0) == [b"b"]
    q.cancel((S1, 1, 2))  # its answer never reached the caller: only its item is back
    assert list(q.items) == [b"a"] and list(q.inflight) == [(S1, 1, 3)]


def test_core_a_silent_consumer_loses_its_items_by_lease() -> None:
    q = QueueState(0)
    q.put((S2, 2, 0), b"a", None, None, 0.0, 10.0)
    assert q.get((S1, 1, 1), 5, None, None, 0.0, 3.0) == [b"a"]
    assert q.clear(S1, None, 2.0, 2.0, [])  # silent 2 s < lease 3 s: still its own
    assert not q.clear(S1, None, 4.0, 4.0, [])
    assert list(q.items) == [b"a"]


# -- real processes ----------------------------------------------------------------------


@pytest.fixture
def state(server: zproc.ServerAddress) -> Iterator[zproc.State]:
    with zproc.State(server, request_timeout=20) as st:
        yield st


def test_queue_basics(state: zproc.State) -> None:
    q = state.queue("q")
    assert isinstance(q, zproc.Queue) and q.empty() and not q.full()
    for i in range(5):
        q.put(i)
    q.put_nowait({"x": [1, 2]})
    assert q.qsize() == 6
    assert [q.get() for _ in range(5)] == list(range(5))
    assert q.get_nowait() == {"x": [1, 2]}
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert "q" not in state and state.copy() == {}  # names are not keys


def test_a_get_that_times_out_takes_nothing(state: zproc.State) -> None:
    q = state.queue("t")
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - started >= 0.29
    other = state.queue("t")
    other.put("late")
    assert other.qsize() == 1  # the timed-out get did not take it
    assert q.get(timeout=5) == "late"


def test_maxsize_blocks_put_and_raises_full(state: zproc.State, server: Any) -> None:
    q = state.queue("m", maxsize=2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    with zproc.State(server) as st2:
        taker = st2.queue("m", maxsize=2)
        done = threading.Event()

        def put_third() -> None:
            q.put(3, timeout=10)
            done.set()

        thread = threading.Thread(target=put_third)
        thread.start()
        assert not done.wait(0.3)  # blocked while full
        assert taker.get(timeout=5) == 1
        assert done.wait(10)
        thread.join(10)
        assert [taker.get(timeout=5), taker.get(timeout=5)] == [2, 3]


def test_unpicklable_item_raises_at_put_and_changes_nothing(state: zproc.State) -> None:
    q = state.queue("u")
    with pytest.raises(TypeError, match="cannot be pickled"):
        q.put(threading.Lock())
    assert q.qsize() == 0
    q.put(lambda x: x + 1)  # cloudpickle for what pickle refuses
    assert q.get(timeout=5)(1) == 2


def test_bad_input_and_kind_clash_change_nothing(state: zproc.State) -> None:
    with pytest.raises(ValueError, match="empty"):
        state.queue("")
    with pytest.raises(TypeError, match="str"):
        state.queue(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize must be >= 0"):
        state.queue("b", maxsize=-1)
    q = state.queue("b")  # not made by the failed call with maxsize -1
    with pytest.raises(ValueError, match="-1"):
        q.get(timeout=-2)
    with pytest.raises(ValueError, match="-1"):
        q.put(1, timeout=-5)
    with pytest.raises(ValueError, match="non-blocking"):
        q.get(block=False, timeout=1)
    assert q.qsize() == 0
    state.lock("taken")
    with pytest.raises(ValueError, match="is a lock"):
        state.queue("taken")
    with pytest.raises(ValueError, match="is a queue"):
        state.event("b")
    with pytest.raises(ValueError, match="maxsize 0, not 3"):
        state.queue("b", maxsize=3)


def _consume_slowly(address: zproc.ServerAddress, name: str, path: str, pause_at: int) -> None:
    """Record each item got (one line each); after ``pause_at`` items say 'paused' and
    sleep with items in flight, to be killed."""
    with zproc.State(address) as st:
        q = st.queue(name, prefetch=50)
        with open(path, "a") as out:
            for n in range(10**6):
                item = q.get(timeout=30)
                out.write(f"{item}\n")
                out.flush()
                if n + 1 == pause_at:
                    out.write("paused\n")
                    out.flush()
                    time.sleep(60)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_a_killed_consumer_loses_and_duplicates_nothing(
    state: zproc.State, server: zproc.ServerAddress, tmp_path: Any
) -> None:
    n = 10_000
    q = state.queue("work")
    for i in range(n):
        q.put(i)
    path = str(tmp_path / "got")
    proc = multiprocessing.Process(target=_consume_slowly, args=(server, "work", path, 3010),
                                   daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(path) and "paused" in _read(path):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the consumer did not get 3010 items")
        assert q.qsize() == n - 3050  # it has items in flight (its prefetch)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        first = [int(line) for line in _read(path).split() if line != "paused"]
        assert first == list(range(3010))
        killed = time.monotonic()
        while q.qsize() != n - 3010 and time.monotonic() - killed < 10:
            time.sleep(0.02)
        assert time.monotonic() - killed < 1.5  # its 40 items in flight are back, soon
        rest = [q.get(timeout=10) for _ in range(n - 3010)]
        assert rest == list(range(3010, n))
        with pytest.raises(queue.Empty):
            q.get(timeout=0.5)
    finally:
        stop(proc)


def _take_one(state: zproc.State, q: zproc.Queue) -> Any:
    return q.get(timeout=10)


def test_a_handle_passed_to_a_process(ctx: zproc.Context) -> None:
    q = ctx.queue("jobs")
    q.put("job")
    proc = ctx.process(_take_one, args=(q,))
    assert proc.wait(timeout=30) == "job"
    copy = pickle.loads(pickle.dumps(q))
    try:
        assert copy.name == "jobs" and copy is not q
    finally:
        copy._state.close()
    assert q.qsize() == 0


def _put_many(state: zproc.State, q: zproc.Queue, n: int) -> int:
    for i in range(n):
        q.put(i)  # pipelined: no round trip each
    return n


def test_what_a_child_sent_without_waiting_has_arrived_when_it_ends(
    ctx: zproc.Context,
) -> None:
    """Pipelined puts and the acknowledgement of a get reach the server before the
    parent hears the child's result."""
    q = ctx.queue("sent")
    for n in (1, 2000):
        proc = ctx.process(_put_many, args=(q, n))
        assert proc.wait(timeout=30) == n
        assert q.qsize() == n  # at once: no wait for stragglers
        assert [q.get(timeout=10) for _ in range(n)] == list(range(n))
        q.put("job")
        proc = ctx.process(_take_one, args=(q,))
        assert proc.wait(timeout=30) == "job"
        assert q.qsize() == 0
        assert ctx.state.stats()["coordination"]["items_in_flight"] == 0


def test_async_queue_and_a_cancelled_get_takes_nothing(server: zproc.ServerAddress) -> None:
    async def main() -> None:
        async with zproc.AsyncState(server) as ast:
            aq = ast.queue("aq")
            assert isinstance(aq, zproc.AsyncQueue)
            waiting = asyncio.ensure_future(aq.get())
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await aq.put("a")
            await aq.put("b")
            assert await aq.qsize() == 2  # the cancelled get took nothing
            assert [await aq.get(timeout=5), await aq.get(timeout=5)] == ["a", "b"]
            with pytest.raises(queue.Empty):
                await aq.get_nowait()
            for i in range(30):
                await aq.put(i)
            shared = ast.queue("aq", prefetch=4)
            got = await asyncio.gather(*(shared.get(timeout=5) for _ in range(30)))
            assert sorted(got) == list(range(30))  # 30 coroutines on one handle
            assert await aq.qsize() == 0
            bounded = ast.queue("ab", maxsize=1)
            await bounded.put(1)
            with pytest.raises(queue.Full):
                await bounded.put_nowait(2)
            assert await bounded.full()

    asyncio.run(main())


class _Interrupted(Exception):
    pass


def test_a_get_interrupted_by_a_signal_takes_nothing(state: zproc.State) -> None:
    q = state.queue("sig")

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupted):
            q.get(timeout=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    q.put("kept")
    assert q.qsize() == 1  # the given-up get is not served
    assert q.get(timeout=5) == "kept"


def test_closing_a_consumer_puts_its_prefetched_items_back(
    state: zproc.State, server: zproc.ServerAddress
) -> None:
    q = state.queue("pre")
    for i in range(10):
        q.put(i)
    with zproc.State(server) as st2:
        consumer = st2.queue("pre", prefetch=5)
        assert consumer.get(timeout=5) == 0
        assert q.qsize() == 5  # 1..4 are in flight to the consumer
    assert q.qsize() == 9  # closed: back at the head, in order
    assert [q.get(timeout=5) for _ in range(9)] == list(range(1, 10))


def test_an_error_of_a_pipelined_put_surfaces_at_the_next_call(state: zproc.State) -> None:
    state.lock("lk")
    q = zproc.Queue(state, "lk")  # made without the server's check of the name
    q.put(1)  # pipelined: returns at once
    with pytest.raises(ValueError, match="is a lock"):
        q.qsize()
    assert not state.lock("lk").locked()


def _produce_and_end(address: zproc.ServerAddress, n: int) -> None:
    state = zproc.State(address)  # never closed: the process just ends
    q = state.queue("ends")
    for i in range(n):
        q.put(i)


def _produce_in_a_task(state: zproc.State, n: int) -> None:
    q = state.queue("task")  # dropped when the target returns
    for i in range(n):
        q.put(i)


def test_pipelined_puts_arrive_when_a_producer_ends_without_close(
    ctx: zproc.Context
) -> None:
    n = 3000
    proc = multiprocessing.get_context("fork").Process(
        target=_produce_and_end, args=(ctx.server_address, n)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert ctx.queue("ends").qsize() == n
    ctx.process(_produce_in_a_task, args=(n,)).wait(timeout=30)
    q = ctx.queue("task")
    assert q.qsize() == n
    assert [q.get(timeout=5) for _ in range(n)] == list(range(n))


THREAD_ITEMS = 4000


def test_threads_sharing_one_handle_get_every_item_exactly_once(state: zproc.State) -> None:
    """4 consumer threads and 2 producer threads on one handle: every item reaches
    exactly one get, and each consumer sees each producer's items in the order put."""
    q = state.queue("threads")
    got: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    done = threading.Event()

    def produce(producer: int) -> None:
        try:
            for i in range(THREAD_ITEMS // 2):
                q.put((producer, i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def consume(index: int) -> None:
        try:
            while not done.is_set():
                try:
                    got[index].append(q.get(timeout=0.2))
                except queue.Empty:
                    continue
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=produce, args=(p,)) for p in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, got)) < THREAD_ITEMS and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        done.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    items = [item for mine in got for item in mine]
    assert sorted(items) == [(p, i) for p in range(2) for i in range(THREAD_ITEMS // 2)]
    assert sum(1 for mine in got if mine) >= 2  # the threads did share the work
    for mine in got:
        for producer in range(2):
            order = [i for p, i in mine if p == producer]
            assert order == sorted(order)
    assert q.qsize() == 0


def test_flush_pending_confirms_once_keeps_prefetched_items_and_is_free_when_idle(
    state: zproc.State,
) -> None:
    q = state.queue("pending", prefetch=5)
    conn = state._connection()
    for i in range(10):
        q.put(i)  # pipelined
    sent = conn._rid  # the number of the connection's last request
    flush_pending()
    flush_pending()  # nothing pending any more: nothing sent
    assert conn._rid == sent + 1  # one round trip for the ten puts
    assert state.stats()["coordination"]["queued_items"] == 10
    assert q.get(timeout=5) == 0  # brings 0..4, acknowledges 0
    sent = conn._rid
    flush_pending()
    flush_pending()
    assert conn._rid == sent + 1
    assert q.qsize() == 5 and state.stats()["coordination"]["items_in_flight"] == 4
    q.put(10)
    sent = conn._rid
    other = threading.Thread(target=flush_pending)  # its handles and connection are its own
    other.start()
    other.join(10)
    assert conn._rid == sent
    assert [q.get(timeout=5) for _ in range(10)] == list(range(1, 11))  # none twice


def test_flush_pending_logs_when_the_server_does_not_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proc, address = zproc.start_server()
    state = zproc.State(address, request_timeout=0.5)
    try:
        q = state.queue("lost")
        q.put(1)
        stop(proc)
        with caplog.at_level("WARNING", logger="zproc"):
            flush_pending()  # does not raise: the task's result still goes out
        assert "did not confirm the queue puts" in caplog.text
        assert q._posted  # still unconfirmed
    finally:
        stop(proc)
        state.close()


# -- long-lived workers: what a task sent without waiting arrives before its result -----

#: A task's last put is big: without the flush after each task, it is often still on its
#: way to the server when the parent has the task's result (and then asks the server).
BIG = 16 << 20
_kept: dict[tuple[int, str], Any] = {}  # a worker's State and queue handles, across tasks


def _kept_state(address: zproc.ServerAddress) -> zproc.State:
    """A State that the worker process keeps across its tasks (it ends with the process)."""
    key = (os.getpid(), str(address))
    if key not in _kept:
        _kept[key] = zproc.State(address, request_timeout=20)
    return _kept[key]  # type: ignore[no-any-return]


def _burst(state: zproc.State, n: int, name: str) -> int:
    q = state.queue(name)
    for i in range(n):
        q.put(i)  # pipelined
    q.put(b"x" * BIG)
    return n


def _burst_on_kept_state(address: zproc.ServerAddress, name: str, n: int) -> int:
    return _burst(_kept_state(address), n, name)


def _read_now(q: zproc.Queue, n: int) -> list[Any]:
    """``n`` items without waiting for any: queue.Empty if one has not arrived yet."""
    return [q.get_nowait() for _ in range(n)]


def _check_burst(q: zproc.Queue, n: int) -> None:
    got = _read_now(q, n + 1)
    assert got[:n] == list(range(n)) and got[n] == b"x" * BIG


def test_what_a_process_map_task_put_has_arrived_with_its_result(ctx: zproc.Context) -> None:
    q = ctx.queue("mapped")
    for _ in range(5):
        for n in ctx.process_map(_burst, [100], args=("mapped",), count=1, stateful=True):
            _check_burst(q, n)
    assert q.qsize() == 0


def test_what_an_executor_call_put_has_arrived_with_its_result(ctx: zproc.Context) -> None:
    q = ctx.queue("submitted")
    with ctx.executor(max_workers=1) as ex:
        for _ in range(5):
            n = ex.submit(_burst_on_kept_state, ctx.server_address, "submitted", 100)
            _check_burst(q, n.result(timeout=60))
    assert q.qsize() == 0


def _burst_from_map(n: int, address: zproc.ServerAddress, name: str) -> int:
    return _burst(_kept_state(address), n, name)


def test_what_a_task_put_has_arrived_with_its_result_on_any_executor(
    ctx: zproc.Context,
) -> None:
    """``process_map(..., executor=)`` on a concurrent.futures pool: the task's State is
    the worker's own, kept across tasks."""
    q = ctx.queue("elsewhere")
    forked = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=forked) as pool:
        for _ in range(5):
            for n in ctx.process_map(_burst_from_map, [100], args=(ctx.server_address,
                                     "elsewhere"), count=1, executor=pool):
                _check_burst(q, n)
    assert q.qsize() == 0


def test_what_a_swarm_task_put_has_arrived_with_its_result(ctx: zproc.Context) -> None:
    q = ctx.queue("swarmed")
    swarm = ctx.create_swarm(1)
    for _ in range(5):
        _check_burst(q, swarm.run(_burst, (100, "swarmed"), pass_state=True))
    assert q.qsize() == 0


def _take_kept(address: zproc.ServerAddress) -> Any:
    """One item through the handle the worker keeps across its tasks (prefetch 5)."""
    key = (os.getpid(), "pre")
    if key not in _kept:
        _kept[key] = _kept_state(address).queue("kept", prefetch=5)
    return _kept[key].get(timeout=10)


def test_the_flush_after_a_task_keeps_the_workers_prefetched_items(
    ctx: zproc.Context,
) -> None:
    """The items a worker's handle prefetched stay its own from one task to the next:
    none goes back to the queue (nobody else gets it), none is handed out twice, and
    the acknowledgement of each one returned has reached the server with the result."""
    q = ctx.queue("kept")
    for i in range(10):
        q.put(i)
    coordination = ctx.state.stats
    with ctx.executor(max_workers=1) as ex:
        assert ex.submit(_take_kept, ctx.server_address).result(timeout=60) == 0
        assert q.qsize() == 5  # 1..4 are in flight to the worker
        assert coordination()["coordination"]["items_in_flight"] == 4  # 0 acknowledged
        assert ex.submit(_take_kept, ctx.server_address).result(timeout=60) == 1
        assert coordination()["coordination"]["items_in_flight"] == 3
        assert _read_now(q, 5) == [5, 6, 7, 8, 9]
        assert ex.submit(_take_kept, ctx.server_address).result(timeout=60) == 2
        with pytest.raises(queue.Empty):
            q.get_nowait()
