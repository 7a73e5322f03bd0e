"""zproc.Executor: a concurrent.futures.Executor on a Context's workers and on a swarm; and
process_map on any executor (a dask.distributed cluster)."""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import concurrent.futures as cf
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import zproc


def inc(x: int) -> int:
    return x + 1


def fail_at_5(x: int) -> float:
    return 1 / (x - 5)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_once(marker: str) -> int:
    """Kill the worker running it the first time, return its pid the second time."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return os.getpid()
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    return -1


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.01)
    return "released"


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@pytest.fixture
def ex(ctx: zproc.Context) -> Iterator[zproc.Executor]:
    with ctx.executor(max_workers=2) as executor:
        yield executor


def test_submit_is_a_real_future_and_travels_with_cloudpickle(
    ctx: zproc.Context, ex: zproc.Executor
) -> None:
    assert isinstance(ex, zproc.Executor) and isinstance(ex, cf.Executor)
    future = ex.submit(inc, 41)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=30) == 42
    offset = 100
    assert ex.submit(lambda a, *, b: a * b + offset, 3, b=4).result(timeout=30) == 112
    pids = {p.pid for p in ctx.worker_list}
    assert {p.pid for p in ex.worker_list} <= pids and len(ex.worker_list) == 2
    assert ex.submit(os.getpid).result(timeout=30) in pids


def test_exception_has_the_remote_traceback_as_cause(ex: zproc.Executor) -> None:
    future = ex.submit(fail_at_5, 5)
    with pytest.raises(ZeroDivisionError) as info:
        future.result(timeout=30)
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    assert "fail_at_5" in str(info.value.__cause__)
    assert isinstance(future.exception(), ZeroDivisionError)
    assert ex.submit(inc, 1).result(timeout=30) == 2  # still usable


def test_cancel_stops_a_call_that_has_not_started(
    ctx: zproc.Context, tmp_path: pathlib.Path
) -> None:
    gate = str(tmp_path / "gate")
    with ctx.executor(max_workers=1) as ex:
        first = ex.submit(wait_for_file, gate)
        second = ex.submit(inc, 1)
        assert second.cancel() and second.cancelled()
        assert not first.cancel() or first.cancelled()  # running (or never started)
        third = ex.submit(inc, 2)
        pathlib.Path(gate).touch()
        assert third.result(timeout=30) == 3
        if not first.cancelled():
            assert first.result(timeout=30) == "released"
        with pytest.raises(cf.CancelledError):
            second.result(timeout=1)


def test_a_killed_worker_fails_its_call_with_process_error(ex: zproc.Executor) -> None:
    before = {p.pid for p in ex.worker_list}
    future = ex.submit(kill_self)
    with pytest.raises(zproc.ProcessError) as info:
        future.result(timeout=30)
    assert "SIGKILL" in str(info.value) and info.value.exitcode == -signal.SIGKILL
    assert info.value.pid in before
    assert ex.submit(inc, 1).result(timeout=30) == 2  # no BrokenProcessPool
    assert len(ex.worker_list) == 2 and info.value.pid not in {p.pid for p in ex.worker_list}


def test_a_killed_worker_retries_on_another_worker(
    ctx: zproc.Context, tmp_path: pathlib.Path
) -> None:
    with ctx.executor(max_workers=2, max_retries=1) as ex:
        pid = ex.submit(kill_once, str(tmp_path / "marker")).result(timeout=60)
        assert pid in {p.pid for p in ex.worker_list}
        with pytest.raises(zproc.ProcessError, match="SIGKILL.*after 2 attempts"):
            ex.submit(kill_self).result(timeout=60)
        assert ex.submit(inc, 1).result(timeout=30) == 2


def test_as_completed_wait_and_callbacks_over_1000_futures(ex: zproc.Executor) -> None:
    futures = [ex.submit(inc, i) for i in range(1000)]
    done_by_callback: list[int] = []
    futures[0].add_done_callback(lambda f: done_by_callback.append(f.result()))
    seen = {f.result() for f in cf.as_completed(futures, timeout=60)}
    assert seen == set(range(1, 1001))
    done, not_done = cf.wait(futures, timeout=10)
    assert len(done) == 1000 and not not_done
    assert done_by_callback == [1]


def test_run_in_executor_and_wrap_future_from_a_running_loop(ex: zproc.Executor) -> None:
    async def main() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        one = await asyncio.wait_for(loop.run_in_executor(ex, inc, 1), 30)
        many = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(ex.submit(inc, i)) for i in range(20))), 30
        )
        return one, list(many)

    assert asyncio.run(main()) == (2, list(range(1, 21)))


def test_map_with_chunksize_timeout_and_errors(ex: zproc.Executor) -> None:
    assert list(ex.map(inc, range(10_000), chunksize=100)) == list(range(1, 10_001))
    assert list(ex.map(inc, range(5))) == [1, 2, 3, 4, 5]
    assert list(ex.map(pow, [2, 3, 4], [3, 2, 1], [100, 100, 100], chunksize=2)) == [8, 9, 4]
    results = ex.map(fail_at_5, range(10), chunksize=4)
    got = [next(results) for _ in range(5)]
    assert got == [1 / (x - 5) for x in range(5)]
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    with pytest.raises(cf.TimeoutError):
        list(ex.map(sleep_then, [2.0, 2.0], [1, 2], timeout=0.2, chunksize=2))
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(inc, range(3), chunksize=0)


def test_shutdown_cancel_futures(ctx: zproc.Context) -> None:
    ex = ctx.executor(max_workers=1)
    first = ex.submit(sleep_then, 0.5, "first")
    time.sleep(0.1)
    rest = [ex.submit(inc, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=1) == "first"
    assert all(f.cancelled() for f in rest)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(inc, 1)
    assert all(not p.is_alive for p in ex.worker_list + [p for p in ctx.worker_list])


def test_context_close_fails_running_calls(tmp_path: pathlib.Path) -> None:
    ctx = zproc.Context()
    try:
        ex = ctx.executor(max_workers=1)
        running = ex.submit(wait_for_file, str(tmp_path / "never"))
        time.sleep(0.2)
    finally:
        ctx.close()
    with pytest.raises(zproc.ZProcError):
        running.result(timeout=15)


def test_bad_arguments(ctx: zproc.Context, ex: zproc.Executor) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        ctx.executor(max_workers=0)
    with pytest.raises(ValueError, match="max_retries"):
        ctx.executor(max_workers=1, max_retries=-1)
    with pytest.raises(TypeError, match="callable"):
        ex.submit(42)


# -- process_map on any executor --------------------------------------------------------


def add_to(state: zproc.State, x: int) -> int:
    state[f"item{x}"] = x
    return x * 2


def test_process_map_on_other_executors(ctx: zproc.Context) -> None:
    with cf.ThreadPoolExecutor(2) as threads:
        assert list(ctx.process_map(inc, range(50), executor=threads, count=4)) == list(
            range(1, 51)
        )
    with ctx.executor(max_workers=2) as ex:
        results = ctx.process_map(add_to, range(10), executor=ex, stateful=True, count=3)
        assert list(results) == [x * 2 for x in range(10)]
        assert all(ctx.state[f"item{x}"] == x for x in range(10))
        failing = ctx.process_map(fail_at_5, range(8), executor=ex, count=2)
        assert [next(failing) for _ in range(5)] == [1 / (x - 5) for x in range(5)]
        with pytest.raises(ZeroDivisionError):
            next(failing)


DASK_SCRIPT = """
import os, sys
import distributed
import zproc
sys.path.insert(0, {tests!r})
from test_executor import fail_at_5, inc, locked_add

if __name__ == "__main__":
    with zproc.Context() as ctx, distributed.LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as client:
        executor = client.get_executor()
        lock = ctx.lock("dask-total")
        pids = list(ctx.process_map(
            locked_add, range(100), args=(lock,), stateful=True, executor=executor, count=8
        ))
        assert ctx.state["total"] == sum(range(100)), ctx.state["total"]
        assert os.getpid() not in pids and len(pids) == 100, pids
        assert list(ctx.process_map(inc, range(20), executor=executor, count=4)) == list(
            range(1, 21)
        )
        try:
            list(ctx.process_map(fail_at_5, range(8), executor=executor, count=2))
        except ZeroDivisionError as exc:
            assert isinstance(exc.__cause__, zproc.RemoteTraceback), exc.__cause__
        else:
            raise AssertionError("no ZeroDivisionError")
    print("dask ok")
"""


def locked_add(state: zproc.State, x: int, lock: Any) -> int:
    with lock:
        state["total"] = state.get("total", 0) + x
    return os.getpid()


@pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None, reason="needs distributed (dask)"
)
def test_process_map_on_a_dask_cluster(tmp_path: pathlib.Path) -> None:
    # In a process of its own: importing distributed changes how every exception pickles
    # (it installs tblib's reducers), which must not leak into the other tests.
    script = tmp_path / "dask_map.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(DASK_SCRIPT.format(tests=tests))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "dask ok" in done.stdout, done.stderr[-3000:]


# -- on a swarm ---------------------------------------------------------------------------


def test_swarm_executor_with_two_workers(ctx: zproc.Context) -> None:
    with ctx.create_swarm(2) as swarm, swarm.executor() as ex:
        assert isinstance(ex, zproc.Executor)
        futures = [ex.submit(inc, i) for i in range(40)]
        assert sorted(f.result(timeout=60) for f in cf.as_completed(futures, timeout=60)) == list(
            range(1, 41)
        )
        pids = {ex.submit(os.getpid).result(timeout=30) for _ in range(10)}
        assert pids <= {p.pid for p in swarm.worker_list}
        with pytest.raises(ZeroDivisionError) as info:
            ex.submit(fail_at_5, 5).result(timeout=30)
        assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
        assert list(ex.map(inc, range(30), chunksize=7)) == list(range(1, 31))
        assert ex.submit(lambda: "closure").result(timeout=30) == "closure"


def test_swarm_executor_fails_a_call_whose_worker_died(ctx: zproc.Context) -> None:
    with ctx.create_swarm(2) as swarm, swarm.executor() as ex:
        with pytest.raises(zproc.TaskError):
            ex.submit(kill_self).result(timeout=60)
        assert ex.submit(inc, 1).result(timeout=30) == 2  # the other worker goes on


def submit_in_child(ex: zproc.Executor, conn: Any) -> None:
    try:
        ex.submit(inc, 1)
    except zproc.ZProcError as exc:
        conn.send(str(exc))
    else:
        conn.send("accepted")


def test_a_forked_copy_refuses_calls(ex: zproc.Executor) -> None:
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=submit_in_child, args=(ex, child))
    process.start()
    try:
        assert parent.poll(30)
        assert "belongs to process" in parent.recv()
    finally:
        process.join(10)
    assert ex.submit(inc, 1).result(timeout=30) == 2
