"""zproc.Process with real child processes: values, errors, deaths, retries, stopping."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import zproc
from zproc.exceptions import RemoteTraceback


@pytest.fixture(scope="module")
def server() -> Iterator[zproc.ServerAddress]:
    """One server for the module (overrides conftest's), owned by a Context.

    The Context also installs its SIGTERM handler here, which children must not inherit.
    """
    with zproc.Context() as ctx:
        yield ctx.server_address


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """A file children append lines to (survives their death, unlike the state)."""
    return tmp_path / "record.txt"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def append_line(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(f"{text}\n")


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def zproc_log(tmp_path: Path) -> Iterator[Path]:
    """Records of the "zproc" logger, also from forked children."""
    path = tmp_path / "zproc.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("zproc")
    logger.addHandler(handler)
    yield path
    logger.removeHandler(handler)
    handler.close()


# -- values and errors -------------------------------------------------------------------


def test_instant_return_values_all_arrive(server: zproc.ServerAddress) -> None:
    processes = [zproc.Process(server, lambda state, i=i: i * 10) for i in range(100)]
    try:
        assert [p.wait(timeout=30) for p in processes] == [i * 10 for i in range(100)]
        assert all(p.exitcode == 0 for p in processes)
    finally:
        for p in processes:
            p.close()


def test_stateless_target_and_arguments(server: zproc.ServerAddress) -> None:
    with zproc.Process(
        server, lambda a, b, *, c: (a, b, c), args=(1, 2), kwargs={"c": 3}, stateful=False
    ) as p:
        assert p.wait(timeout=10) == (1, 2, 3)
        assert p.wait() == (1, 2, 3)  # cached


def test_child_state_is_its_own(server: zproc.ServerAddress, state: zproc.State) -> None:
    def target(child_state: zproc.State) -> bytes:
        child_state["from_child"] = os.getpid()
        return child_state.identity

    with zproc.Process(server, target) as p:
        identity = p.wait(timeout=10)
        assert state.pop("from_child") == p.pid
        assert identity != state.identity


def test_returns_none(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda state: None) as p:
        assert p.wait(timeout=10) is None


def test_large_return_value(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda: b"x" * (5 << 20), stateful=False) as p:
        assert p.wait(timeout=20) == b"x" * (5 << 20)


def boom(state: zproc.State) -> None:
    raise ValueError("boom in the child")


def test_exception_reraised_with_remote_traceback(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, boom) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=10)
        err = info.value
        assert err.pid == p.pid and err.exitcode == 1 and err.process is p
        assert str(p.pid) in str(err) and "ValueError" in str(err)
        cause = err.__cause__
        assert isinstance(cause, ValueError) and str(cause) == "boom in the child"
        assert isinstance(cause.__cause__, RemoteTraceback)
        assert "boom in the child" in cause.__cause__.tb and "in boom" in cause.__cause__.tb
        with pytest.raises(zproc.ProcessWaitError):
            p.wait()  # the same outcome again


class LossyError(Exception):
    """Loses its message in pickling (as urllib3's MaxRetryError loses its pool)."""

    def __init__(self, host: str | None, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.reason = reason

    def __reduce__(self) -> Any:
        return (type(self), (None, self.reason))


def lossy(state: zproc.State) -> None:
    raise LossyError("db.example.org", "max retries exceeded")


def test_wait_error_message_is_the_childs_own_text(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lossy) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=10)
    message = str(info.value)
    assert "LossyError: db.example.org: max retries exceeded" in message, message
    cause = info.value.__cause__
    assert isinstance(cause, LossyError) and str(cause) == "None: max retries exceeded"
    assert isinstance(cause.__cause__, RemoteTraceback)
    assert "db.example.org" in cause.__cause__.tb  # the remote traceback, as before


def test_unpicklable_return_value(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda: threading.Lock(), stateful=False) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=10)
        assert isinstance(info.value.__cause__, TypeError)
        assert "cannot be pickled" in str(info.value.__cause__)


def test_sigkilled_child_raises_promptly(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda: time.sleep(30), stateful=False) as p:
        time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        start = time.monotonic()
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=20)
        assert time.monotonic() - start < 2
        assert info.value.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(info.value)


@pytest.mark.parametrize("code", [0, 4])
def test_os_exit_without_value(server: zproc.ServerAddress, code: int) -> None:
    with zproc.Process(server, lambda: os._exit(code), stateful=False) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=10)
        assert info.value.exitcode == code
        assert "without sending a value" in str(info.value)


def test_process_exit_and_sys_exit(server: zproc.ServerAddress) -> None:
    def exits(code: int) -> None:
        raise zproc.ProcessExit(code)

    ok = zproc.Process(server, exits, args=(0,), stateful=False)
    bad = zproc.Process(server, exits, args=(3,), stateful=False)
    sysexit = zproc.Process(server, lambda: exit(5), stateful=False)
    try:
        assert ok.wait(timeout=10) is None and ok.exitcode == 0
        with pytest.raises(zproc.ProcessWaitError) as info:
            bad.wait(timeout=10)
        assert info.value.exitcode == 3
        with pytest.raises(zproc.ProcessWaitError):
            sysexit.wait(timeout=10)
        assert sysexit.exitcode == 5
    finally:
        for p in (ok, bad, sysexit):
            p.close()


def test_wait_timeout_then_stop(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda: time.sleep(30), stateful=False) as p:
        with pytest.raises(zproc.TimeoutError):
            p.wait(timeout=0.1)
        with pytest.raises(TimeoutError):  # the builtin too
            p.wait(timeout=0)
        assert p.is_alive and p.exitcode is None
        with pytest.raises(ValueError):
            p.wait(timeout=-1)
        start = time.monotonic()
        assert p.stop() == -signal.SIGTERM
        assert time.monotonic() - start < 1
        assert p.stop() == -signal.SIGTERM  # idempotent
        assert not p.is_alive and p.exitcode == -signal.SIGTERM
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=1)
        assert "stopped" in str(info.value)


def test_stop_under_context_sigterm_handler(ctx: zproc.Context) -> None:
    # The Context installed a SIGTERM handler here; children must not inherit it.
    p = ctx.process(lambda state: time.sleep(30))
    wait_for(lambda: p.is_alive)
    assert p.stop() == -signal.SIGTERM


def test_stop_kills_a_child_ignoring_sigterm(server: zproc.ServerAddress) -> None:
    def stubborn() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(30)

    with zproc.Process(server, stubborn, stateful=False) as p:
        time.sleep(0.2)
        assert p.stop() == -signal.SIGKILL


def test_lifecycle_edges(server: zproc.ServerAddress) -> None:
    p = zproc.Process(server, lambda: 1, stateful=False, start=False)
    assert p.pid is None and p.exitcode is None and not p.is_alive
    assert p.stop() is None
    with pytest.raises(AssertionError):
        p.wait()
    assert "pid=None" in repr(p)
    pid = p.start()
    assert pid == p.pid
    with pytest.raises(AssertionError):
        p.start()
    assert p.wait(timeout=10) == 1
    assert "exitcode=0" in repr(p) and "alive=False" in repr(p)
    p.close()
    p.close()
    assert p.wait() == 1  # outcome kept after close
    never = zproc.Process(server, lambda: 1, start=False)
    never.close()
    with pytest.raises(zproc.ZProcError):
        never.start()


def test_validation(server: zproc.ServerAddress) -> None:
    with pytest.raises(TypeError):
        zproc.Process(server, "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        zproc.Process(server, print, args=2, start=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        zproc.Process(server, print, kwargs=[1], start=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_for"):
        zproc.Process(server, print, retry_for=(ValueError, "SIGTERM"), start=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry_for"):
        zproc.Process(server, print, retry_for=(15,), start=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        zproc.Process(server, print, retry_delay=-1, start=False)
    with pytest.raises(ValueError):
        zproc.Process(server, print, max_retries=-1, start=False)
    with pytest.raises(TypeError):
        zproc.Process(server, print, stateful=False, pass_state=True, start=False)
    with pytest.raises(TypeError):
        zproc.Process(server, print, backend=threading.Thread, start=False)
    with pytest.raises(ValueError):
        zproc.Process(("tcp://*:1", "tcp://*:2"), print, start=False)


def test_pass_state_alias(server: zproc.ServerAddress) -> None:
    with zproc.Process(server, lambda *a: len(a), pass_state=False) as p:
        assert p.wait(timeout=10) == 0


# -- retries ---------------------------------------------------------------------------


def fail_and_record(path: Path, label: str) -> None:
    append_line(path, label)
    raise ValueError(f"attempt with {label}")


def test_retry_on_exception(server: zproc.ServerAddress, record: Path, zproc_log: Path) -> None:
    with zproc.Process(
        server,
        fail_and_record,
        args=(record, "first"),
        retry_for=(ValueError,),
        retry_delay=0,
        max_retries=2,
        retry_args=(record, "retry"),
        stateful=False,
    ) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=20)
        assert isinstance(info.value.__cause__, ValueError)
        assert str(info.value.__cause__) == "attempt with retry"
    assert lines(record) == ["first", "retry", "retry"]  # max_retries=2 -> 3 attempts
    log = zproc_log.read_text()
    assert f"process {p.pid}" in log
    assert "attempt 1 raised ValueError" in log and "attempt 2 raised ValueError" in log
    assert log.count("final retry") == 1
    assert "attempt 3" not in log.split("failed")[0]  # the 3rd attempt is not retried


def test_retry_then_success(server: zproc.ServerAddress, record: Path) -> None:
    def flaky(path: Path) -> int:
        append_line(path, "x")
        if len(lines(path)) < 3:
            raise OSError("not yet")
        return len(lines(path))

    with zproc.Process(
        server, flaky, args=(record,), retry_for=OSError, retry_delay=0, stateful=False
    ) as p:
        assert p.wait(timeout=20) == 3


def test_other_exceptions_are_not_retried(server: zproc.ServerAddress, record: Path) -> None:
    with zproc.Process(
        server,
        fail_and_record,
        args=(record, "once"),
        retry_for=(KeyError,),
        retry_delay=0,
        stateful=False,
    ) as p:
        with pytest.raises(zproc.ProcessWaitError):
            p.wait(timeout=10)
    assert lines(record) == ["once"]


def signal_self(path: Path, label: str) -> None:
    append_line(path, label)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(10)


def test_retry_on_signal(server: zproc.ServerAddress, record: Path, zproc_log: Path) -> None:
    with zproc.Process(
        server,
        signal_self,
        args=(record, "first"),
        retry_for=(signal.SIGUSR1,),
        retry_delay=0,
        max_retries=1,
        retry_args=(record, "second"),
        stateful=False,
    ) as p:
        with pytest.raises(zproc.ProcessWaitError) as info:
            p.wait(timeout=20)
        # The final attempt runs with the signal's default action: it is fatal.
        assert info.value.exitcode == -signal.SIGUSR1
    assert lines(record) == ["first", "second"]
    assert "attempt 1 received SIGUSR1" in zproc_log.read_text()


def test_sigterm_retry_still_stoppable(server: zproc.ServerAddress) -> None:
    with zproc.Process(
        server,
        lambda: time.sleep(30),
        retry_for=(signal.SIGTERM,),
        retry_delay=0,
        stateful=False,
    ) as p:
        time.sleep(0.2)
        assert p.stop() == -signal.SIGKILL  # SIGTERM is retried; SIGKILL after the grace


# -- trees, backends, helpers -------------------------------------------------------------


def spawn_grandchild(path: Path) -> None:
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    append_line(path, str(child.pid))
    time.sleep(30)


def test_stop_kills_descendants(server: zproc.ServerAddress, record: Path) -> None:
    with zproc.Process(server, spawn_grandchild, args=(record,), stateful=False) as p:
        wait_for(lambda: len(lines(record)) == 1)
        grandchild = int(lines(record)[0])
        assert not gone(grandchild)
        p.stop()
        wait_for(lambda: gone(grandchild), timeout=3)


def test_clean_process_tree(server: zproc.ServerAddress, record: Path) -> None:
    with zproc.Process(server, spawn_grandchild, args=(record,), stateful=False) as p:
        wait_for(lambda: len(lines(record)) == 1)
        grandchild = int(lines(record)[0])
        zproc.clean_process_tree(p.pid, timeout=1)
        wait_for(lambda: gone(grandchild), timeout=3)
        assert p.is_alive


@pytest.fixture(scope="module")
def resource_tracker() -> None:
    """The "spawn" start method's helper process lives as long as the test session."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.mark.usefixtures("resource_tracker")
def test_spawn_backend_ships_a_lambda(server: zproc.ServerAddress) -> None:
    spawn = multiprocessing.get_context("spawn").Process
    offset = 5
    with zproc.Process(
        server, lambda state, x: (x + offset, state.ping()), args=(1,), backend=spawn
    ) as p:
        assert p.wait(timeout=50) == (6, zproc.ping(server))


def test_pass_context_for_nested_processes(server: zproc.ServerAddress) -> None:
    def outer(ctx: zproc.Context) -> tuple[int, int]:
        inner = ctx.process(lambda state: os.getppid())
        return inner.wait(timeout=10), os.getpid()

    with zproc.Process(server, outer, pass_context=True) as p:
        inner_parent, outer_pid = p.wait(timeout=20)
        assert inner_parent == outer_pid == p.pid


def test_process_from_a_thread(server: zproc.ServerAddress) -> None:
    results: list[Any] = []

    def run() -> None:
        with zproc.Process(server, lambda state: os.getpid()) as p:
            results.append((p.wait(timeout=10), p.pid))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(20)
    assert len(results) == 1 and results[0][0] == results[0][1]


def test_garbage_collected_running_process_warns(server: zproc.ServerAddress) -> None:
    p = zproc.Process(server, lambda: time.sleep(30), stateful=False)
    pid = p.pid
    child = p.child
    try:
        with pytest.warns(ResourceWarning, match="garbage-collected"):
            p.__del__()
    finally:
        child.kill()
        child.join(5)
        p._poll()
    assert gone(pid)  # type: ignore[arg-type]


def test_signal_helpers() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        zproc.signal_to_exception(signal.SIGUSR2)
        with pytest.raises(zproc.SignalException) as info:
            zproc.send_signal(signal.SIGUSR2)
            time.sleep(5)
        assert info.value.signum == signal.SIGUSR2 and "SIGUSR2" in str(info.value)
        zproc.exception_to_signal(info.value)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            zproc.signal_to_exception(signal.SIGUSR2)
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(5)
    assert len(errors) == 1


def test_nested_context_cleaned_up_when_child_ends(server: zproc.ServerAddress) -> None:
    def outer(ctx: zproc.Context) -> int:
        return ctx.process(lambda state: time.sleep(30)).pid  # type: ignore[return-value]

    def outer_own_context(state: zproc.State) -> int:
        nested = zproc.Context(state.server_address)  # never closed by the target
        return nested.process(lambda state: time.sleep(30)).pid  # type: ignore[return-value]

    for target, kwargs in ((outer, {"pass_context": True}), (outer_own_context, {})):
        with zproc.Process(server, target, **kwargs) as p:
            start = time.monotonic()
            nested_pid = p.wait(timeout=20)
            assert time.monotonic() - start < 5
            assert gone(nested_pid)
