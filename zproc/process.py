"""Process: run a target in a child process and collect what it returns.

Data flow::

    parent                                        child
    ------                                        -----
    Process(addr, target, args=...)
      start() --- fork (or spawn + cloudpickle) --> reset SIGTERM/SIGINT
                                                    State(addr) (unless stateful=False)
                                                    target(state, *args, **kwargs)
                                                      retried per retry_for
      wait() <--- result pipe: one framed message -- value, exception or exit code
            <--- pidfd: the child ended ---------- exit

The result travels over a private pipe made for each Process (never a network socket),
written before the child exits, so a value cannot be lost however fast the target
returns. The parent watches the pipe and the child's exit together (a pidfd where the
system has one, else the multiprocessing sentinel plus a short poll): a child that dies
without writing (SIGKILL, ``os._exit``) is noticed at once. :meth:`Process.stop` ends the
child and then its descendants (nested processes) with psutil.

This module is the parent's side; what the child runs is :mod:`zproc._child`, the result
frame is defined in :mod:`zproc._protocol`, and the signal and process-tree helpers are in
:mod:`zproc._proctree`.
"""

from __future__ import annotations

import enum
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import psutil

from . import _pipes as W
from . import _serialization as S
from ._child import ChildSpec, child_main, target_name
from ._chunks import as_args, as_kwargs
from ._proctree import (
    EXIT_POLL,
    POLLIN,
    clean_process_tree,
    descendants,
    descendants_of,
    end_processes,
    exception_to_signal,
    open_pidfd,
    owner_token,
    poll_fds,
    send_signal,
    signal_name,
    signal_to_exception,
)
from ._transport import ServerAddress, normalize_address
from .exceptions import ProcessWaitError, TimeoutError, ZProcError
from .state import ChildState

__all__ = [
    "Process",
    "ProcessList",
    "clean_process_tree",
    "exception_to_signal",
    "send_signal",
    "signal_to_exception",
]

#: Seconds :meth:`Process.stop` waits after SIGTERM before it sends SIGKILL.
STOP_GRACE = 1.0

RetryItem = type[BaseException] | signal.Signals


# -- the parent side ---------------------------------------------------------------------


class _Channel:
    """The reading end of a child's result pipe; reads without blocking."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.buf = bytearray()
        self.eof = False

    def pump(self) -> bool:
        """Read what is available; True once a whole message (or end of file) is in."""
        while not self.eof and not self.complete():
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
            self.buf += chunk
        return self.eof or self.complete()

    def complete(self) -> bool:
        size = W.child_result_size(self.buf)
        return size is not None and len(self.buf) >= size

    def message(self) -> tuple[bytes, bytes] | None:
        return W.parse_child_result(self.buf)

    def close(self) -> None:
        self.conn.close()


_DEFAULT_BACKEND = multiprocessing.Process
_FORK_BACKEND: Any = (
    multiprocessing.get_context("fork").Process
    if "fork" in multiprocessing.get_all_start_methods()
    else None
)
#: Python 3.12+ warns when a process with threads forks; children here never use the
#: parent's ZeroMQ threads (each process builds its own ZeroMQ context).
_FORK_WARNS = sys.version_info >= (3, 12)


def _resolve_backend(backend: Any) -> Any:
    if backend is _DEFAULT_BACKEND and _FORK_BACKEND is not None:
        return _FORK_BACKEND
    return backend


class ProcessStatus(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    ENDED = "ended"


def _split_retry_for(
    retry_for: Any,
) -> tuple[tuple[type[BaseException], ...], tuple[signal.Signals, ...]]:
    items = (retry_for,) if isinstance(retry_for, (type, signal.Signals)) else tuple(retry_for)
    exceptions: list[type[BaseException]] = []
    signals: list[signal.Signals] = []
    for item in items:
        if isinstance(item, signal.Signals):
            signals.append(item)
        elif isinstance(item, type) and issubclass(item, BaseException):
            exceptions.append(item)
        else:
            raise TypeError(
                f"retry_for items must be exception classes or signal.Signals members "
                f"(e.g. ValueError, signal.SIGTERM), got {item!r}"
            )
    return tuple(exceptions), tuple(signals)


class Process:
    """A target running in a child process, with its own State.

    Parameters
    ----------
    server_address
        The server the child's State connects to (a :class:`Context` fills it in).
    target
        Called in the child as ``target(state, *args, **kwargs)``, or
        ``target(*args, **kwargs)`` with ``stateful=False``.
    args, kwargs
        Positional (any iterable) and keyword (a mapping) arguments for ``target``.
    start
        Start the child at the end of the constructor.
    stateful
        Pass a State created in the child as the first argument. ``pass_state`` is an
        alias.
    retry_for
        Exception classes and/or :class:`signal.Signals` members after which the target
        is called again. Signals are converted into :class:`~zproc.SignalException` in
        the child.
    retry_delay
        Seconds to sleep before each retry.
    max_retries
        Retries after the first attempt (``None``: unlimited); ``N`` allows ``N + 1``
        attempts. During the last one, retried signals have their default action back.
    retry_args, retry_kwargs
        When given, replace ``args``/``kwargs`` for every retry.
    backend
        A :class:`multiprocessing.Process`-compatible class. The default uses the
        ``fork`` start method where available; other start methods ship the target with
        cloudpickle.
    namespace, request_timeout, secret_key
        Settings of the child's State (or Context, with ``pass_context``).
    pass_context
        Pass a new :class:`Context` attached to the server (for nested processes) as the
        first argument, instead of a State. The child closes it when the target ends.

    Raises
    ------
    TypeError
        ``target`` is not callable, bad ``args``/``kwargs``/``retry_for``, a thread backend.
    ValueError
        Negative ``retry_delay`` or ``max_retries``.

    Notes
    -----
    :meth:`wait` returns the target's return value; an exception in the child, a child
    killed by a signal or one that exited without a value raise
    :class:`~zproc.ProcessWaitError` (with the child's exception, and its traceback, as
    ``__cause__``). A large return value stays in the pipe until :meth:`wait` (or
    :attr:`is_alive`) reads it; the child exits only then.
    """

    #: The class a child builds for ``pass_context=True``: :class:`zproc.Context`, set by
    #: :mod:`zproc.context` right after it defines it. That module starts processes, so
    #: this one cannot import it; the class travels to the child in its spec.
    context_class: ClassVar[type | None] = None

    def __init__(
        self,
        server_address: Iterable[str],
        target: Callable[..., Any],
        *,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        start: bool = True,
        stateful: bool = True,
        retry_for: Iterable[RetryItem] = (),
        retry_delay: float = 5,
        max_retries: int | None = None,
        retry_args: Iterable[Any] | None = None,
        retry_kwargs: Mapping[str, Any] | None = None,
        backend: Any = multiprocessing.Process,
        namespace: str = "default",
        request_timeout: float | None = None,
        pass_state: bool | None = None,
        pass_context: bool = False,
        secret_key: Any = None,
    ) -> None:
        if not callable(target):
            raise TypeError(f"target must be callable, got {target!r}")
        if pass_state is not None:
            if stateful is False and pass_state is True:
                raise TypeError("stateful=False and pass_state=True disagree; give only one")
            stateful = pass_state
        if isinstance(backend, type) and issubclass(backend, threading.Thread):
            raise TypeError("Process needs a process backend; threads cannot be stopped")
        if retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0, got {retry_delay!r}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0 or None, got {max_retries!r}")
        self.server_address: ServerAddress = normalize_address(server_address)
        self.target = target
        self.args = as_args(args, "args")
        self.kwargs = as_kwargs(kwargs, "kwargs")
        self.stateful = bool(stateful)
        self.pass_context = bool(pass_context)
        self._retry_exceptions, self._retry_signals = _split_retry_for(retry_for)
        self.retry_for: tuple[RetryItem, ...] = (*self._retry_exceptions, *self._retry_signals)
        self.retry_delay = retry_delay
        self.max_retries = max_retries
        self.retry_args = None if retry_args is None else as_args(retry_args, "retry_args")
        self.retry_kwargs = (
            None if retry_kwargs is None else as_kwargs(retry_kwargs, "retry_kwargs")
        )
        self.namespace = namespace
        self.request_timeout = request_timeout
        self.secret_key = secret_key
        self.backend = _resolve_backend(backend)
        self.child: Any = None
        self._owner = os.getpid()
        self._status = ProcessStatus.CREATED
        self._closed = False
        self._stopped = False
        self._channel: _Channel | None = None
        self._pidfd: int | None = None
        self._pid: int | None = None
        self._exitcode: int | None = None
        self._message: tuple[bytes, bytes] | None = None
        self._value: Any = None
        self._has_value = False
        self._tree: dict[int, psutil.Process] = {}
        if start:
            self.start()

    # -- lifecycle -------------------------------------------------------------------

    def _spec(self) -> ChildSpec:
        if self.pass_context:
            first = self.context_class
            if first is None:
                raise ZProcError("pass_context=True needs zproc.context imported")
        else:
            first = ChildState if self.stateful else None
        return ChildSpec(
            self.server_address,
            self.target,
            self.args,
            self.kwargs,
            first,
            self._retry_exceptions,
            self._retry_signals,
            self.retry_delay,
            self.max_retries,
            self.retry_args,
            self.retry_kwargs,
            self.namespace,
            self.request_timeout,
            self.secret_key,
        )

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise ZProcError(
                f"{self!r} belongs to process {self._owner}; only the process that created "
                f"a Process can start, wait for or stop it"
            )

    def start(self) -> int:
        """Start the child and return its pid.

        Raises
        ------
        AssertionError
            The process was already started.
        """
        self._check_owner()
        if self._status is not ProcessStatus.CREATED:
            raise AssertionError(f"cannot start a process twice: {self!r}")
        if self._closed:
            raise ZProcError(f"{self!r} is closed; create a new Process")
        spec = self._spec()
        forking = getattr(self.backend, "_start_method", None) == "fork"
        payload: Any = spec if forking else S.dumps_code(spec)
        reader, writer = multiprocessing.Pipe(duplex=False)
        try:
            child = self.backend(
                target=child_main,
                args=(payload, writer, owner_token()),
                name=f"zproc:{target_name(self.target)}",
            )
            if forking and _FORK_WARNS:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore",
                        message=r".*fork\(\) may lead to deadlocks",
                        category=DeprecationWarning,
                    )
                    child.start()
            else:
                child.start()
        except BaseException:
            reader.close()
            raise
        finally:
            writer.close()
        self.child = child
        self._channel = _Channel(reader)
        self._pid = child.pid
        self._pidfd = open_pidfd(child.pid)
        self._status = ProcessStatus.RUNNING
        assert self._pid is not None
        return self._pid

    def _finish(self) -> None:
        """Record the outcome of a child that has ended and release its resources."""
        channel = self._channel
        if channel is not None:
            channel.pump()
            self._message = channel.message()
            channel.close()
            self._channel = None
        child = self.child
        self._exitcode = child.exitcode
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        try:
            child.close()
        except (ValueError, AttributeError):
            pass
        self._status = ProcessStatus.ENDED

    def _poll(self) -> bool:
        """Drain the result pipe; True (and the outcome recorded) if the child ended."""
        if self._status is not ProcessStatus.RUNNING:
            return self._status is ProcessStatus.ENDED
        assert self._channel is not None
        self._channel.pump()
        if self.child.exitcode is None:
            return False
        self._finish()
        return True

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the child to end and return the target's return value.

        Parameters
        ----------
        timeout
            Seconds to wait (``None``: no limit). The child keeps running on expiry.

        Raises
        ------
        TimeoutError
            The child is still running at the deadline.
        ProcessWaitError
            The target raised (the exception, with the child's traceback, is the
            ``__cause__``), the child was killed or stopped, or it exited without a value.
        AssertionError
            The process was never started.
        """
        self._check_owner()
        if self._status is ProcessStatus.CREATED:
            raise AssertionError(f"can only wait for a started process: {self!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        if self._status is ProcessStatus.RUNNING:
            self._await_end(None if timeout is None else time.monotonic() + timeout, timeout)
        return self._outcome()

    def _await_end(self, deadline: float | None, timeout: float | None) -> None:
        channel = self._channel
        assert channel is not None
        while True:
            if channel.pump():
                # The child has said its last word; it is exiting.
                if not self._wait_exit(deadline):
                    raise self._timeout(timeout)
                break
            if self.child.exitcode is not None:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._timeout(timeout)
            self._block([channel.fd], remaining)
        self._finish()

    def _block(self, others: list[int], timeout: float | None) -> None:
        """Sleep until one of ``others`` is readable, the child may have exited, or timeout."""
        fds = dict.fromkeys(others, POLLIN)
        if self._pidfd is not None:
            fds[self._pidfd] = POLLIN
        else:
            fds[self.child.sentinel] = POLLIN
            timeout = EXIT_POLL if timeout is None else min(timeout, EXIT_POLL)
        poll_fds(fds, timeout)

    def _wait_exit(self, deadline: float | None) -> bool:
        """Wait until the child exited (True) or ``deadline`` passed (False)."""
        while self.child.exitcode is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._block([], remaining)
        return True

    def _timeout(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"process {self._pid} (target {target_name(self.target)}) is still running "
            f"after {timeout} s; wait longer, or stop() it"
        )

    def _outcome(self) -> Any:
        if self._has_value:
            return self._value
        code = self._exitcode
        message = self._message
        tag, body = message if message is not None else (None, b"")
        name = target_name(self.target)
        if tag == W.CHILD_VALUE and code == 0:
            try:
                value = S.loads(body)
            except ZProcError as exc:
                raise self._error(f"the return value of {name} could not be loaded here") from exc
            self._value, self._has_value = value, True
            return value
        if tag == W.CHILD_EXIT and code == 0:
            self._has_value = True
            return None
        if tag == W.CHILD_ERROR:
            cause, text = S.loads_exception_text(body)  # text: str(exc) in the child
            raise self._error(
                f"process {self._pid} (target {name}) raised "
                f"{type(cause).__name__}: {text} (exit code {code}); its traceback is below"
            ) from cause
        if tag == W.CHILD_EXIT:
            raise self._error(
                f"process {self._pid} (target {name}) exited with code {code} "
                f"(ProcessExit/sys.exit in the target)"
            )
        if code is not None and code < 0:
            how = "was stopped" if self._stopped else "was killed"
            raise self._error(
                f"process {self._pid} (target {name}) {how} by {signal_name(-code)} "
                f"(exit code {code}) before it returned a value"
                + (
                    ""
                    if self._stopped
                    else "; something sent it a signal (a crash, the out-of-memory killer, os.kill)"
                )
            )
        raise self._error(
            f"process {self._pid} (target {name}) exited with code {code} without sending a "
            f"value; the target (or code it calls) probably used os._exit()"
        )

    def _error(self, message: str) -> ProcessWaitError:
        return ProcessWaitError(message, pid=self._pid, exitcode=self._exitcode, process=self)

    # -- stopping --------------------------------------------------------------------

    def _begin_stop(self, tree: list[psutil.Process] | None = None) -> None:
        """Send SIGTERM (first step of :meth:`stop`, shared with ``Context.stop_all``).

        ``tree``: the child's descendants, when the caller already looked them up.
        """
        if self._status is not ProcessStatus.RUNNING:
            return
        self._check_owner()
        if self._poll():
            return
        assert self._pid is not None
        self._stopped = True
        if tree is None:
            tree = descendants(self._pid)
        self._tree.update((p.pid, p) for p in tree)
        try:
            self.child.terminate()
        except OSError:
            pass

    def _finish_stop(self, deadline: float) -> int | None:
        """Wait for a stopped child until ``deadline``, then SIGKILL it and its descendants."""
        if self._status is ProcessStatus.RUNNING:
            if not self._wait_exit(deadline):
                assert self._pid is not None
                self._tree.update((p.pid, p) for p in descendants(self._pid))
                self.child.kill()
                self._wait_exit(time.monotonic() + 5)
            self._finish()
        if self._tree:
            tree, self._tree = list(self._tree.values()), {}
            end_processes(tree)
        return self._exitcode

    def stop(self) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL after a grace period) and its descendants.

        Returns the exit code (``-15`` for a child stopped by SIGTERM), or ``None`` for a
        process never started. Idempotent.
        """
        if self._status is ProcessStatus.CREATED:
            return None
        self._begin_stop()
        return self._finish_stop(time.monotonic() + STOP_GRACE)

    def close(self) -> None:
        """Stop the child if it runs and release the pipe. Idempotent.

        A value received before still comes back from :meth:`wait`.
        """
        if self._closed:
            return
        if self._status is ProcessStatus.RUNNING and os.getpid() == self._owner:
            self.stop()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_status", None) is not ProcessStatus.RUNNING:
            return
        if self._owner != os.getpid():
            return
        try:
            if not self._poll():
                warnings.warn(
                    f"{self!r} was garbage-collected while its child still runs; call "
                    f"stop() or close(), or use 'with Process(...)'",
                    ResourceWarning,
                    stacklevel=2,
                )
                if self._channel is not None:
                    self._channel.close()
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        except Exception:
            pass

    # -- properties ------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """Whether the child is running (reads a result it may be writing)."""
        if self._status is not ProcessStatus.RUNNING or os.getpid() != self._owner:
            return False
        return not self._poll()

    @property
    def pid(self) -> int | None:
        """The child's pid; ``None`` before :meth:`start`."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code; ``None`` before start and while it runs."""
        if self._status is ProcessStatus.RUNNING and os.getpid() == self._owner:
            self._poll()
        return self._exitcode

    @property
    def _sentinel(self) -> int | None:
        """A descriptor readable when the child exits (see :attr:`_sentinel_exact`)."""
        if self._status is not ProcessStatus.RUNNING:
            return None
        return self._pidfd if self._pidfd is not None else int(self.child.sentinel)

    @property
    def _sentinel_exact(self) -> bool:
        """Whether :attr:`_sentinel` fires even while the child's own children run."""
        return self._pidfd is not None

    def __repr__(self) -> str:
        alive = self._status is ProcessStatus.RUNNING
        if alive and os.getpid() == self._owner:
            try:
                alive = self.child.exitcode is None
            except (ValueError, AttributeError):
                pass
        return (
            f"<Process pid={self._pid} target={target_name(self.target)!r} "
            f"alive={alive} exitcode={self._exitcode}>"
        )


class ProcessList(list[Process]):
    """A list of :class:`Process` with group operations."""

    def start(self) -> None:
        """Start every process not started yet."""
        for process in self:
            if process._status is ProcessStatus.CREATED and not process.closed:
                process.start()

    def stop(self) -> list[int | None]:
        """Stop them all at once; return their exit codes (``None`` if never started)."""
        return stop_processes(self)

    def wait(self, timeout: float | None = None, safe: bool = False) -> list[Any]:
        """Wait for every started process, with one deadline; return their values in order.

        With ``safe=True`` an exception takes the place of the value instead of being
        raised.
        """
        return [value for _, value in wait_processes(self, timeout, safe)]


def stop_processes(processes: Iterable[Process]) -> list[int | None]:
    """Stop several processes: SIGTERM them all, then wait one grace period for all."""
    processes = list(processes)
    running = []
    for process in processes:
        if process._status is ProcessStatus.RUNNING:
            process._check_owner()
            if not process._poll():
                running.append(process)
    trees = descendants_of([p._pid for p in running if p._pid is not None])
    for process in running:
        process._begin_stop(trees.get(process._pid or 0))
    deadline = time.monotonic() + STOP_GRACE
    return [process._finish_stop(deadline) for process in processes]


def wait_processes(
    processes: Iterable[Process], timeout: float | None = None, safe: bool = False
) -> list[tuple[Process, Any]]:
    """``[(process, value), ...]`` for every started process, with one deadline."""
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    results: list[tuple[Process, Any]] = []
    for process in processes:
        if process._status is ProcessStatus.CREATED:
            continue
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            value = process.wait(remaining)
        except Exception as exc:
            if not safe:
                raise
            value = exc
        results.append((process, value))
    return results
