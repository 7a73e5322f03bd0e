"""What a :class:`~zproc.Process` child runs: build its first argument, call the target
with retries, and write one result frame on its pipe before it exits.

The parent side (starting, waiting, stopping) is in :mod:`zproc.process`; the frame is
defined in :mod:`zproc._protocol`. The child builds the target's first argument from the
class its spec names (a ``ChildState``, or a ``Context`` for ``pass_context``): the spec
carries the class, so that this module needs neither :mod:`zproc.context` (which starts
processes) nor anything else above it.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _pipes as W
from . import _serialization as S
from ._proctree import (
    exception_to_signal,
    exit_with_owner,
    signal_name,
    signal_to_exception,
)
from ._queues import flush_all
from ._transport import ServerAddress
from .exceptions import ProcessExit, SignalException

__all__ = ["ChildSpec", "child_main", "target_name"]

log = logging.getLogger("zproc")


class ChildSpec(NamedTuple):
    """Everything a child needs, sent to it once (as is on fork, else cloudpickled)."""

    server_address: ServerAddress
    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: built in the child as ``first(server_address, namespace=..., request_timeout=...,
    #: secret_key=...)`` and passed first to the target; ``None``: nothing is passed
    first: type | None
    retry_exceptions: tuple[type[BaseException], ...]
    retry_signals: tuple[signal.Signals, ...]
    retry_delay: float
    max_retries: int | None
    retry_args: tuple[Any, ...] | None
    retry_kwargs: dict[str, Any] | None
    namespace: str
    request_timeout: float | None
    secret_key: Any = None


def target_name(target: Any) -> str:
    """``module.qualname`` of a target, for messages."""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def child_main(
    payload: Any,
    writer: multiprocessing.connection.Connection,
    owner: tuple[int, bool] | None = None,
) -> None:
    """Entry point of a child process: run the spec, write the result frame, exit.

    ``owner`` (an :func:`~zproc._proctree.owner_token`): the child is killed when that
    process ends, however it ends.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if owner is not None:
        exit_with_owner(owner, signal.SIGKILL)
    try:
        spec = payload if isinstance(payload, ChildSpec) else S.loads(payload)
    except BaseException as exc:
        _report(f"zproc: process {os.getpid()} could not load its target", exc)
        code, tag, body = 1, W.CHILD_ERROR, S.dumps_exception(exc)
    else:
        code, tag, body = _run_child(spec)
    # what the target sent without waiting (queue puts, acknowledgements) has arrived
    # before its parent hears that it ended
    flush_all()
    try:
        _write_all(writer.fileno(), W.child_result(tag, body))
    except OSError:
        pass  # the parent closed its end: nobody waits for the result
    finally:
        writer.close()
    if code:
        raise SystemExit(code)


def _run_child(spec: ChildSpec) -> tuple[int, bytes, bytes]:
    """Run the target with retries; return ``(exit code, tag, body)`` for the parent."""
    try:
        first: Any = None
        try:
            if spec.first is not None:
                first = spec.first(
                    spec.server_address,
                    namespace=spec.namespace,
                    request_timeout=spec.request_timeout,
                    secret_key=spec.secret_key,
                )
            for sig in spec.retry_signals:
                signal_to_exception(sig)
            value = _attempts(spec, first)
        finally:
            if first is not None:
                first.close()
    except ProcessExit as exc:
        code = exc.exitcode
        return code, W.CHILD_EXIT, S.dumps(code)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
        return code, W.CHILD_EXIT, S.dumps(code)
    except BaseException as exc:
        _report(f"zproc: process {os.getpid()} (target {target_name(spec.target)}) failed", exc)
        return 1, W.CHILD_ERROR, S.dumps_exception(exc)
    try:
        return 0, W.CHILD_VALUE, S.dumps_any(value)
    except Exception as exc:
        error = TypeError(
            f"the return value of {target_name(spec.target)} (a {type(value).__name__}) "
            f"cannot be pickled: {exc}. Return plain data (or an importable class)"
        )
        error.__cause__ = exc
        _report(f"zproc: process {os.getpid()}: {error}", None)
        return 1, W.CHILD_ERROR, S.dumps_exception(error)


def _report(message: str, exc: BaseException | None) -> None:
    """Print a child's failure on its stderr, as multiprocessing does.

    The parent gets the exception from ``wait()`` too; printing it here means a failure
    is never silent when nobody waits.
    """
    try:
        sys.stderr.write(message + "\n")
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _should_retry(exc: BaseException, spec: ChildSpec) -> bool:
    if spec.retry_exceptions and isinstance(exc, spec.retry_exceptions):
        return True
    return isinstance(exc, SignalException) and exc.signum in spec.retry_signals


def _attempts(spec: ChildSpec, first: Any) -> Any:
    prefix = () if first is None else (first,)
    args, kwargs = spec.args, spec.kwargs
    attempt = 1
    while True:
        try:
            return spec.target(*prefix, *args, **kwargs)
        except BaseException as exc:
            if not _should_retry(exc, spec):
                raise
            if spec.max_retries is not None and attempt > spec.max_retries:
                raise
            final = spec.max_retries is not None and attempt == spec.max_retries
            if isinstance(exc, SignalException):
                what, exc_info = f"received {signal_name(exc.signum)}", None
            else:
                what, exc_info = f"raised {type(exc).__name__}: {exc}", exc
            log.warning(
                "zproc: process %d (target %s) attempt %d %s; retry in %s s%s",
                os.getpid(),
                target_name(spec.target),
                attempt,
                what,
                spec.retry_delay,
                " (this is the final retry)" if final else "",
                exc_info=exc_info,
            )
            if final:
                for sig in spec.retry_signals:
                    exception_to_signal(sig)
            del exc
            time.sleep(spec.retry_delay)
            if spec.retry_args is not None:
                args = spec.retry_args
            if spec.retry_kwargs is not None:
                kwargs = spec.retry_kwargs
            attempt += 1
