"""Context with real processes: creating, mapping, waiting, stopping, exit and cleanup."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import zproc
from zproc.exceptions import RemoteTraceback

REPO = Path(__file__).resolve().parent.parent


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def run_script(
    tmp_path: Path, source: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def square(x: int) -> int:
    return x * x


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


# -- process, decorators, defaults ----------------------------------------------------------


def test_process_plain_and_decorator_forms(ctx: zproc.Context) -> None:
    plain = ctx.process(lambda state, x: x + 1, args=(1,))

    @ctx.process
    def decorated(state: zproc.State) -> str:
        return "plain decorator"

    @ctx.process(args=(5,), stateful=False)
    def with_kwargs(x: int) -> int:
        return x * 2

    assert isinstance(decorated, zproc.Process) and isinstance(with_kwargs, zproc.Process)
    assert plain.wait(10) == 2
    assert decorated.wait(10) == "plain decorator"
    assert with_kwargs.wait(10) == 10
    assert ctx.process_list == [plain, decorated, with_kwargs]
    assert "decorated" in repr(decorated)
    with pytest.raises(TypeError, match="callable"):
        ctx.process("not callable")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        ctx.process(print, no_such_keyword=1)
    assert "processes=3" in repr(ctx)


def test_per_call_kwargs_override_context_defaults() -> None:
    with zproc.Context(args=(1,), stateful=False) as ctx:
        assert ctx.process_kwargs == {"args": (1,), "stateful": False}
        default = ctx.process(lambda x: x)
        override = ctx.process(lambda x: x, args=(2,))

        @ctx.process(args=(3,))
        def decorated(x: int) -> int:
            return x

        stateful = ctx.process(lambda state, x: (x, state.ping() > 0), stateful=True)
        alias = ctx.process(lambda state, x: x, pass_state=True)
        assert default.wait(10) == 1
        assert override.wait(10) == 2
        assert decorated.wait(10) == 3
        assert stateful.wait(10) == (1, True)
        assert alias.wait(10) == 1


def test_bad_context_keyword_starts_nothing() -> None:
    before = set(psutil.Process().children())
    with pytest.raises(TypeError, match="no_such"):
        zproc.Context(no_such=1)
    with pytest.raises(TypeError):
        zproc.Context(target=print)
    assert set(psutil.Process().children()) == before


def test_process_factory_order(ctx: zproc.Context) -> None:
    def one(state: zproc.State) -> int:
        return 1

    def two(state: zproc.State) -> int:
        return 2

    processes = ctx.process_factory(one, two, count=2)
    assert [p.target for p in processes] == [one, one, two, two]
    assert ctx.process_list == processes
    assert [p.wait(10) for p in processes] == [1, 1, 2, 2]
    assert ctx.process_factory() == []
    assert ctx.process_factory(one, count=0) == []


def test_spawn_map(ctx: zproc.Context) -> None:
    processes = ctx.spawn_map(
        lambda state, x, y, *, z, w: (x, y, z, w, state.ping() > 0),
        [1, 2, 3],
        map_args=[(10,), (20,), (30,)],
        map_kwargs=[{"z": "a"}, {"z": "b"}, {"z": "c"}],
        kwargs={"w": 0},
    )
    assert len(processes) == 3
    assert [p.wait(10) for p in processes] == [
        (1, 10, "a", 0, True),
        (2, 20, "b", 0, True),
        (3, 30, "c", 0, True),
    ]
    plain = ctx.spawn_map(square, range(3), stateful=False)
    assert [p.wait(10) for p in plain] == [0, 1, 4]


# -- wait_all, start_all, stop_all ------------------------------------------------------------


def test_wait_all_excludes_workers(ctx: zproc.Context) -> None:
    assert list(ctx.process_map(square, range(4), count=2)) == [0, 1, 4, 9]
    first = ctx.process(lambda state: "a")
    second = ctx.process(lambda state: "b")
    assert len(ctx.worker_list) == 2
    assert all(w in ctx.process_list for w in ctx.worker_list)
    assert ctx.wait_all(timeout=10) == [(first, "a"), (second, "b")]


def test_wait_all_timeout_and_safe(ctx: zproc.Context) -> None:
    ok = ctx.process(lambda state: 1)
    bad = ctx.process(lambda state: 1 / 0)
    results = ctx.wait_all(timeout=10, safe=True)
    assert results[0] == (ok, 1)
    assert results[1][0] is bad and isinstance(results[1][1], zproc.ProcessWaitError)
    assert isinstance(results[1][1].__cause__, ZeroDivisionError)
    with pytest.raises(zproc.ProcessWaitError):
        ctx.wait_all(timeout=10)
    slow = ctx.process(lambda state: time.sleep(30))
    start = time.monotonic()
    results = ctx.wait_all(timeout=0.2, safe=True)  # one deadline for all of them
    assert [p for p, _ in results] == [ok, bad, slow]
    assert results[0][1] == 1 and isinstance(results[1][1], zproc.ProcessWaitError)
    assert isinstance(results[2][1], zproc.TimeoutError)
    with pytest.raises(zproc.TimeoutError):
        slow.wait(0.2)
    assert time.monotonic() - start < 3


def _up_then_sleep(state: zproc.State, name: str) -> None:
    state[name] = True
    time.sleep(30)


def test_start_all_and_stop_all(ctx: zproc.Context) -> None:
    idle = ctx.process(_up_then_sleep, args=("idle",), start=False)
    never = ctx.process(lambda state: 1, start=False)
    running = ctx.process(_up_then_sleep, args=("running",))
    assert idle.pid is None
    ctx.start_all()
    assert idle.pid is not None and never.pid is not None
    ctx.start_all()  # already started: skipped
    assert never.wait(10) == 1
    # both sleepers run their targets (a signal during a child's start-up is another test)
    ctx.state.get_when(lambda s: "idle" in s and "running" in s, timeout=20)
    start = time.monotonic()
    codes = ctx.stop_all()
    assert time.monotonic() - start < 2  # one grace period for all of them
    assert codes == [-signal.SIGTERM, 0, -signal.SIGTERM]
    assert not running.is_alive and ctx.stop_all() == codes


def test_stop_all_with_unstarted_process(ctx: zproc.Context) -> None:
    ctx.process(lambda state: 1, start=False)
    assert ctx.stop_all() == [None]
    ctx.close()
    ctx.close()


# -- process_map -----------------------------------------------------------------------


def test_process_map_order_10000(ctx: zproc.Context) -> None:
    results = ctx.process_map(square, range(10_000), count=2)
    assert not isinstance(results, list)
    assert list(results) == [x * x for x in range(10_000)]
    assert len(ctx.worker_list) == 2


def test_process_map_error_at_its_position_10000(ctx: zproc.Context) -> None:
    results = ctx.process_map(fail_at, range(10_000), kwargs={"bad": 7777}, count=2)
    seen = []
    with pytest.raises(ValueError, match="bad item 7777") as info:
        for value in results:
            seen.append(value)
    assert seen == list(range(7777))  # every earlier result first
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "item 7777" in cause.tb and "fail_at" in cause.tb
    assert list(results) == []  # the iterator is finished
    # The workers survive and are reused.
    assert list(ctx.process_map(square, range(10), count=2)) == [x * x for x in range(10)]
    assert len(ctx.worker_list) == 2


def test_process_map_argument_combinations(ctx: zproc.Context) -> None:
    def target(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return args, kwargs

    got = list(
        ctx.process_map(
            target,
            [1, 2, 3, 4],
            map_args=[("a",), ("b",), ("c",)],  # the shortest input sets the length
            args=("fixed",),
            map_kwargs=[{"k": 1}, {"k": 2}, {"k": 3}, {"k": 4}],
            kwargs={"z": 0},
            count=2,
        )
    )
    assert got == [
        ((1, "a", "fixed"), {"k": 1, "z": 0}),
        ((2, "b", "fixed"), {"k": 2, "z": 0}),
        ((3, "c", "fixed"), {"k": 3, "z": 0}),
    ]
    assert list(ctx.process_map(target, map_args=[(1, 2), (3, 4)], count=2)) == [
        ((1, 2), {}),
        ((3, 4), {}),
    ]
    assert list(ctx.process_map(target, map_kwargs=[{"a": 1}], count=2)) == [((), {"a": 1})]
    assert list(ctx.process_map(square, (x for x in range(5)), count=2)) == [0, 1, 4, 9, 16]
    assert list(ctx.process_map(square, [], count=2)) == []
    with pytest.raises(ValueError):
        ctx.process_map(square)
    with pytest.raises(ValueError):
        ctx.process_map(square, [1], count=0)
    with pytest.raises(TypeError):
        ctx.process_map("x", [1])  # type: ignore[arg-type]


def test_process_map_lambda_closure_and_state(ctx: zproc.Context) -> None:
    offset = 100
    assert list(ctx.process_map(lambda x: x + offset, range(5), count=2)) == [
        100,
        101,
        102,
        103,
        104,
    ]
    ctx.state["factor"] = 3
    got = list(
        ctx.process_map(lambda state, x: state["factor"] * x, range(4), stateful=True, count=2)
    )
    assert got == [0, 3, 6, 9]


def test_process_map_shrinking_and_growing_count(ctx: zproc.Context) -> None:
    for count in (4, 2, 3, 1, 4):
        assert list(ctx.process_map(square, range(50), count=count)) == [x * x for x in range(50)]
    assert len(ctx.worker_list) == 4  # surplus workers stay, idle
    before = len(ctx.worker_list)
    assert list(ctx.process_map(square, range(6), count=2, new=True)) == [x * x for x in range(6)]
    assert len(ctx.worker_list) == before + 2


def test_interleaved_maps(ctx: zproc.Context) -> None:
    first = ctx.process_map(square, range(1000), count=2)
    second = ctx.process_map(lambda x: -x, range(1000), count=2)
    assert next(first) == 0
    assert list(second) == [-x for x in range(1000)]
    assert list(first) == [x * x for x in range(1, 1000)]


def test_abandoned_results_are_discarded(ctx: zproc.Context) -> None:
    started = ctx.process_map(square, range(100), count=2)
    assert next(started) == 0
    pool = ctx._pool
    assert pool is not None
    never = ctx.process_map(square, range(100), count=2)
    closed = ctx.process_map(square, range(100), count=2)
    assert len(pool._tasks) == 3
    closed.close()  # type: ignore[attr-defined]
    assert list(closed) == []
    del started, never
    gc.collect()
    assert pool._tasks == {}
    assert list(ctx.process_map(square, range(10), count=2)) == [x * x for x in range(10)]


def test_results_stream_back_during_a_chunk(ctx: zproc.Context) -> None:
    results = ctx.process_map(lambda x: time.sleep(0.05) or x, range(40), count=1)
    start = time.monotonic()
    assert next(results) == 0
    assert time.monotonic() - start < 1  # the chunk takes 2 s; its first result comes early
    results.close()  # type: ignore[attr-defined]


def test_context_level_args_do_not_break_workers() -> None:
    with zproc.Context(args=(1,), kwargs={"x": 2}, retry_for=(signal.SIGTERM,)) as ctx:
        assert list(ctx.process_map(square, range(6), count=2)) == [0, 1, 4, 9, 16, 25]
        start = time.monotonic()
        ctx.stop_all()
        assert time.monotonic() - start < 2  # workers do not retry SIGTERM


def test_worker_death_fails_its_chunk(ctx: zproc.Context) -> None:
    def crash(x: int) -> int:
        if x == 7:
            os._exit(3)
        return x

    results = ctx.process_map(crash, range(10), count=2)
    seen = []
    with pytest.raises(zproc.ProcessError) as info:
        for value in results:
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]
    assert info.value.exitcode == 3 and "died" in str(info.value)
    # A replacement worker is started for the next call.
    assert list(ctx.process_map(square, range(4), count=2)) == [0, 1, 4, 9]


def test_stopped_workers_are_replaced(ctx: zproc.Context) -> None:
    assert list(ctx.process_map(square, range(4), count=2)) == [0, 1, 4, 9]
    ctx.stop_all()
    assert list(ctx.process_map(square, range(4), count=2)) == [0, 1, 4, 9]
    assert len(ctx.worker_list) == 4


def test_unpicklable_result(ctx: zproc.Context) -> None:
    with pytest.raises(TypeError, match="item 3"):
        list(ctx.process_map(lambda x: threading.Lock() if x == 3 else x, range(6), count=2))


# -- nesting, cleanup, exit --------------------------------------------------------------


def level(state: zproc.State, depth: int) -> None:
    zproc.append(state, "pids", os.getpid())
    if depth < 3:
        nested = zproc.Context(state.server_address)
        nested.process(level, args=(depth + 1,))
    time.sleep(60)


def test_nested_three_levels_gone_after_close(tmp_path: Path) -> None:
    ctx = zproc.Context()
    try:
        ctx.state["pids"] = []
        ctx.process(level, args=(1,))
        wait_for(lambda: len(ctx.state.get("pids", [])) == 3)
        pids = ctx.state["pids"]
        assert all(not gone(pid) for pid in pids)
    finally:
        start = time.monotonic()
        ctx.close()
    assert time.monotonic() - start < 5
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=3)
    assert not os.path.exists(ctx.server_address.req_rep[len("ipc://") :])


def test_close_leaves_no_file_and_no_process() -> None:
    ctx = zproc.Context()
    assert list(ctx.process_map(square, range(4), count=2)) == [0, 1, 4, 9]
    ctx.process(lambda state: time.sleep(30))
    pool_dir = ctx._pool._dir  # type: ignore[union-attr]
    assert pool_dir is not None and os.path.isdir(pool_dir)
    pids = [p.pid for p in ctx.process_list]
    ctx.close()
    ctx.close()
    assert not os.path.exists(pool_dir)
    assert all(gone(pid) for pid in pids)  # type: ignore[arg-type]
    for endpoint in ctx.server_address:
        assert not os.path.exists(endpoint[len("ipc://") :])
    with pytest.raises(zproc.ZProcError):
        ctx.process(print)
    with pytest.raises(zproc.ZProcError):
        ctx.process_map(square, [1])
    with pytest.raises(zproc.ZProcError):
        ctx.stop_all()


def test_unrelated_popen_child_survives_cleanup() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with zproc.Context() as ctx:
            ctx.process(lambda state: time.sleep(30))
            assert list(ctx.process_map(square, range(2), count=1)) == [0, 1]
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(5)


def report_sigterm_handler(path: Path) -> None:
    path.write_text(str(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL))
    time.sleep(30)


def test_other_forked_children_do_not_inherit_the_sigterm_handler(
    ctx: zproc.Context, tmp_path: Path
) -> None:
    """A multiprocessing child of a program with a Context keeps a plain SIGTERM."""
    import multiprocessing

    path = tmp_path / "handler.txt"
    child = multiprocessing.get_context("fork").Process(target=report_sigterm_handler, args=(path,))
    child.start()
    try:
        wait_for(path.exists)
        wait_for(lambda: path.read_text() != "")
        assert path.read_text() == "True"
        child.terminate()
        child.join(5)
        assert child.exitcode == -signal.SIGTERM
    finally:
        child.kill()
        child.join(5)
    with multiprocessing.get_context("fork").Pool(2) as pool:  # terminate() must not hang
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def test_context_in_a_thread() -> None:
    results: list[Any] = []
    errors: list[BaseException] = []
    handler = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        try:
            with zproc.Context() as ctx:
                p = ctx.process(lambda state: state.ping())
                results.append(p.wait(10) == ctx.server_process.pid)
                results.append(list(ctx.process_map(square, range(3), count=1)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not errors and results == [True, [0, 1, 4]]
    assert signal.getsignal(signal.SIGTERM) == handler


def test_script_exit_status_is_kept(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        import sys, time, zproc
        ctx = zproc.Context()
        ctx.process(lambda state: time.sleep(30))
        print(list(ctx.process_map(abs, [-1, -2], count=1)), flush=True)
        sys.exit(3)
        """,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "[1, 2]\n"
    result = run_script(
        tmp_path,
        """
        import time, zproc
        ctx = zproc.Context()
        ctx.process(lambda state: time.sleep(30))
        raise RuntimeError("uncaught")
        """,
    )
    assert result.returncode == 1
    assert "RuntimeError: uncaught" in result.stderr


def test_script_exit_stops_only_its_own(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        import subprocess, time, zproc
        sleeper = subprocess.Popen(
            ["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ctx = zproc.Context()
        p = ctx.process(lambda state: time.sleep(30))
        print(sleeper.pid, p.pid, ctx.server_process.pid, flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    sleeper, child, server = map(int, result.stdout.split())
    try:
        assert not gone(sleeper)
        assert gone(child) and gone(server)
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_script_sigterm_is_redelivered(tmp_path: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(
        textwrap.dedent(
            """
            import time, zproc
            ctx = zproc.Context()
            p = ctx.process(lambda state: time.sleep(30))
            print(p.pid, flush=True)
            time.sleep(30)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
        wait_for(lambda: gone(child), timeout=3)
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_wait_true_waits_at_exit_and_reports_errors(tmp_path: Path) -> None:
    marker = tmp_path / "done.txt"
    result = run_script(
        tmp_path,
        f"""
        import time, zproc
        ctx = zproc.Context(wait=True)

        def slow(state):
            time.sleep(0.3)
            open({str(marker)!r}, "w").write("done")

        ctx.process(slow)
        ctx.process(lambda state: 1 / 0)
        assert list(ctx.process_map(abs, [-1], count=1)) == [1]
        """,
    )
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "done"
    assert "ZeroDivisionError" in result.stderr and "at exit" in result.stderr
    result = run_script(
        tmp_path,
        """
        import time, zproc
        ctx = zproc.Context(wait=True)
        ctx.process(lambda state: time.sleep(30))
        ctx.close()
        """,
    )
    assert result.returncode == 0 and result.stderr == ""


def test_process_map_return_task_and_pull_results(ctx: zproc.Context) -> None:
    task = ctx.process_map(lambda x: x * 2, range(100), count=2, return_task=True)
    assert isinstance(task, zproc.TaskDetail)
    assert task.chunk_count == 2
    other = ctx.process_map(lambda x: -x, range(5), count=2, return_task=True)
    assert list(ctx.pull_results_for_task(other)) == [0, -1, -2, -3, -4]
    assert list(ctx.pull_results_for_task(task)) == [x * 2 for x in range(100)]
    with pytest.raises(ValueError, match="already pulled"):
        ctx.pull_results_for_task(task)
    empty = ctx.process_map(abs, [], return_task=True)
    assert empty.chunk_count == 0
    assert list(ctx.pull_results_for_task(empty)) == []
