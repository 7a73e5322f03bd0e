"""Signals, process trees and descriptor waits: what Process and the pool build on.

Nothing here knows about zproc's processes: these helpers act on pids and file
descriptors (with psutil for the trees), so that every layer above can use them.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterable
from typing import Any

import psutil

from .exceptions import SignalException

__all__ = [
    "EXIT_POLL",
    "POLLERR",
    "POLLIN",
    "POLLOUT",
    "clean_process_tree",
    "descendants",
    "descendants_of",
    "end_processes",
    "exception_to_signal",
    "open_pidfd",
    "poll_fds",
    "send_signal",
    "signal_name",
    "signal_to_exception",
]

#: Seconds a stopped process's descendants get after SIGTERM before SIGKILL.
TREE_GRACE = 0.5


# -- signal helpers ----------------------------------------------------------------------


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise_signal_exception(signum: int, _frame: Any) -> None:
    raise SignalException(signum, f"received {signal_name(signum)} ({signum})")


def signal_to_exception(sig: signal.Signals | int) -> None:
    """Make ``sig`` raise :class:`~zproc.SignalException` in this process.

    Main thread only (Python's rule for signal handlers): elsewhere ``ValueError``.

    .. versionadded:: 1.0
    """
    signal.signal(signal.Signals(sig), _raise_signal_exception)


def exception_to_signal(sig: signal.Signals | SignalException | int) -> None:
    """Give ``sig`` (or the signal of a :class:`~zproc.SignalException`) its default action back.

    .. versionadded:: 1.0
    """
    signum = sig.signum if isinstance(sig, SignalException) else sig
    signal.signal(signal.Signals(signum), signal.SIG_DFL)


def send_signal(sig: signal.Signals | int, pid: int | None = None) -> None:
    """Send ``sig`` to ``pid`` (default: this process).

    .. versionadded:: 1.0
    """
    os.kill(os.getpid() if pid is None else pid, sig)


# -- process trees -----------------------------------------------------------------------


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def descendants_of(pids: list[int]) -> dict[int, list[psutil.Process]]:
    """The descendants of each pid, from one scan of the process table."""
    if len(pids) < 2:
        return {pid: descendants(pid) for pid in pids}
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid is not None:
            children.setdefault(ppid, []).append(proc)
    found: dict[int, list[psutil.Process]] = {}
    for pid in pids:
        tree: list[psutil.Process] = []
        stack = list(children.get(pid, ()))
        while stack:
            proc = stack.pop()
            tree.append(proc)
            stack.extend(children.get(proc.pid, ()))
        found[pid] = tree
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process ended (or is a zombie); return those still running.

    Polls instead of waiting on them, so that no child of this process gets reaped behind
    the back of its :mod:`multiprocessing` object.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
        alive = [p for p in alive if _running(p)]
    return alive


def end_processes(procs: Iterable[psutil.Process], timeout: float = TREE_GRACE) -> None:
    """SIGTERM every running process of ``procs``, wait ``timeout``, SIGKILL the rest."""
    alive = [p for p in procs if _running(p)]
    for proc in alive:
        try:
            proc.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    alive = _wait_gone(alive, timeout)
    for proc in alive:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _wait_gone(alive, 1.0)


def clean_process_tree(pid: int | None = None, timeout: float = 0.5) -> None:
    """Terminate every descendant of ``pid`` (default: this process), then kill survivors.

    Sends SIGTERM to all of them, waits up to ``timeout`` seconds, and sends SIGKILL to
    those still running. Only ever call it on a tree you own: it does not distinguish
    zproc's processes from others.

    .. versionadded:: 1.0
    """
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")
    end_processes(descendants(os.getpid() if pid is None else pid), timeout)


# -- waiting on file descriptors ---------------------------------------------------------


POLLIN: int = getattr(select, "POLLIN", 1)
POLLOUT: int = getattr(select, "POLLOUT", 4)
POLLERR: int = getattr(select, "POLLERR", 8) | getattr(select, "POLLHUP", 16)


def poll_fds(fds: dict[int, int], timeout: float | None) -> list[tuple[int, int]]:
    """``poll(2)`` on ``{fd: events}`` for up to ``timeout`` seconds (``None``: no limit)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd, events in fds.items():
            poller.register(fd, events)
        return poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
    readers = [fd for fd, ev in fds.items() if ev & POLLIN]
    writers = [fd for fd, ev in fds.items() if ev & POLLOUT]
    limit = None if timeout is None else max(0.0, timeout)
    r, w, _ = select.select(readers, writers, [], limit)
    return [(fd, POLLIN) for fd in r] + [(fd, POLLOUT) for fd in w]


def open_pidfd(pid: int) -> int | None:
    """A file descriptor readable once ``pid`` exits (Linux >= 5.3), else ``None``.

    Unlike :attr:`multiprocessing.Process.sentinel` (a pipe inherited by the child's own
    children), it signals the exit of this very process.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:
        return None


#: Without a pidfd, how often waits look at the child's exit status (seconds).
EXIT_POLL = 0.05
