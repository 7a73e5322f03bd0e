"""Signals, process trees and descriptor waits: what Process and the pool build on.

Nothing here knows about zproc's processes: these helpers act on pids and file
descriptors (with psutil for the trees), so that every layer above can use them.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
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
    "exit_with_owner",
    "open_pidfd",
    "owner_token",
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


# -- ending with the owner ---------------------------------------------------------------


#: Without ``PR_SET_PDEATHSIG``, how often a child looks whether its owner still runs (s).
OWNER_POLL = 0.5
_PR_SET_PDEATHSIG = 1


def owner_token() -> tuple[int, bool]:
    """What a child started now needs to end with this process: ``(pid, from_main)``.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the
    process; so only a child started from the main thread may rely on it, the others watch
    the owner's pid instead.
    """
    return os.getpid(), threading.current_thread() is threading.main_thread()


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_owner(owner: psutil.Process, sig: int) -> None:
    while _running(owner):
        time.sleep(OWNER_POLL)
    os.kill(os.getpid(), sig)


def exit_with_owner(owner: tuple[int, bool], sig: signal.Signals | int) -> None:
    """Have ``sig`` sent to this process once its owner (from :func:`owner_token`) ends.

    On Linux, for a child its owner started from the main thread, the kernel sends it
    (``PR_SET_PDEATHSIG``); elsewhere a daemon thread polls the owner every
    :data:`OWNER_POLL` seconds. An owner that is gone already (it died before this was
    set up) gets ``sig`` sent at once.
    """
    pid, from_main = owner
    if from_main and _set_pdeathsig(int(sig)) and os.getppid() == pid:
        return  # the parent is still there after prctl: the kernel takes it from here
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        os.kill(os.getpid(), sig)
        return
    if not _running(process):
        os.kill(os.getpid(), sig)
        return
    threading.Thread(
        target=_watch_owner, args=(process, int(sig)), name="zproc-owner", daemon=True
    ).start()
