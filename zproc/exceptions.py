"""Exceptions raised by zproc.

The hierarchy::

    ZProcError                      root of everything zproc raises itself
    ├── ServerError                 the server failed to start, died, or sent a failure
    │   │                           that cannot be rebuilt here
    │   ├── AddressInUseError       (also ConnectionError) an endpoint is already taken
    │   └── ServerUnavailableError  (also ConnectionError) no live server at the address
    ├── AuthenticationError         keys rejected (wrong or missing secret_key)
    ├── ProtocolError               malformed or unknown message, version mismatch
    │   └── UnknownFunctionError    an atomic call's function digest is not known (the
    │                               client sends the function again, transparently)
    ├── TimeoutError                (also builtins.TimeoutError) a timeout expired
    ├── ProcessError                a child process failed (carries pid and exit code)
    │   └── ProcessWaitError        wait() on a child that failed, died or was stopped
    ├── TaskError                   a swarm task's chunk was lost on every attempt, or its
    │                               results are gone (forgotten, expired)
    ├── LockLostError               a lock or semaphore permit was taken away from its
    │                               holder (lease expired, server restarted) before release
    └── SignalException             a signal converted into an exception (``signum``)
    ProcessExit (BaseException)     raise in a child to exit with ``exitcode``

Exceptions raised by the server-side ``dict`` call or by an ``atomic`` function keep
their original type (``KeyError``, ``ValueError``...) and carry the server's traceback
as ``__cause__`` (a :class:`RemoteTraceback`).
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "AddressInUseError",
    "AuthenticationError",
    "LockLostError",
    "ProcessError",
    "ProcessExit",
    "ProcessWaitError",
    "ProtocolError",
    "RemoteTraceback",
    "ServerError",
    "ServerUnavailableError",
    "SignalException",
    "TaskError",
    "TimeoutError",
    "UnknownFunctionError",
    "ZProcError",
]


class ZProcError(Exception):
    """Root of every exception zproc raises itself."""


class ServerError(ZProcError):
    """The server failed to start, died, or sent a failure that cannot be rebuilt.

    ``remote_type`` and ``remote_traceback`` hold the server-side type name and traceback
    text when the failure came from the server.
    """

    def __init__(
        self, message: str, *, remote_type: str | None = None, remote_traceback: str | None = None
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class AddressInUseError(ServerError, ConnectionError):
    """An endpoint of the server address is already taken (by another server, probably)."""


class ServerUnavailableError(ServerError, ConnectionError):
    """No live server answers at the address (never started, stopped, or unreachable)."""


class AuthenticationError(ZProcError):
    """The server rejected this client's keys (wrong or missing ``secret_key``)."""


class LockLostError(ZProcError):
    """A lock or semaphore permit this handle held was taken away before ``release()``.

    The holder fell silent for longer than its lease (it was paused, cut off from the
    server, or too busy to renew it), or the server restarted. Another process may have
    held it since: whatever the holder wrote while it believed it held the lock must be
    checked, e.g. against the fencing token (``lock.token``).
    """


class ProtocolError(ZProcError):
    """A message could not be decoded, has an unknown kind, or a mismatched version."""


class UnknownFunctionError(ProtocolError):
    """An atomic call named its function by a digest this server does not hold (it
    restarted, or let the function go). zproc's clients send the whole function again
    when they get it; another client must do the same."""


class TimeoutError(ZProcError, builtins.TimeoutError):
    """A timeout expired. Also an instance of the builtin :class:`TimeoutError`."""


class ProcessError(ZProcError):
    """A child process failed. ``pid`` and ``exitcode`` say which and how."""

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        process: Any = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.process = process

    def __reduce__(self) -> Any:
        return (
            _rebuild_process_error,
            (type(self), self.args, self.pid, self.exitcode),
        )


class ProcessWaitError(ProcessError):
    """``wait()`` was called on a child that raised, died, was stopped or sent no value."""


class TaskError(ZProcError):
    """A swarm task failed outside its function, or its results no longer exist.

    ``task_id`` names the task; ``chunk`` and ``items`` (a :class:`range` of item indexes)
    say which part failed, when one did. An exception raised by the task's function is
    raised as itself instead (see :meth:`zproc.Swarm.map`).
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        chunk: int | None = None,
        items: range | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.chunk = chunk
        self.items = items

    def __reduce__(self) -> Any:
        return (_rebuild_task_error, (self.args[0], self.task_id, self.chunk, self.items))


def _rebuild_task_error(
    message: str, task_id: str | None, chunk: int | None, items: range | None
) -> TaskError:
    return TaskError(message, task_id=task_id, chunk=chunk, items=items)


class SignalException(ZProcError):
    """A signal delivered to this process, converted into an exception."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"received signal {signum}")
        self.signum = signum

    def __reduce__(self) -> Any:
        return (type(self), (self.signum, self.args[0] if self.args else None))


class ProcessExit(BaseException):
    """Raise inside a child process to end it (or its ``call_when_*`` loop) with ``exitcode``.

    Derives from :class:`BaseException`, like :class:`SystemExit`, so that
    ``except Exception`` and ``retry_for=(Exception,)`` do not swallow it.
    """

    def __init__(self, exitcode: int = 0) -> None:
        super().__init__(exitcode)
        self.exitcode = exitcode


class RemoteTraceback(Exception):
    """Carries the text of a traceback from another process; set as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip("\n")


def _rebuild_process_error(
    cls: type[ProcessError], args: tuple[Any, ...], pid: int | None, exitcode: int | None
) -> ProcessError:
    return cls(*args, pid=pid, exitcode=exitcode)
