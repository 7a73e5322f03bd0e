"""The client's side of coordination leases: who this process is, and a thread that keeps
its leases alive.

A process that holds (or waits for) a lock or semaphore has one :class:`Keeper` per
server: a daemon thread with a DEALER of its own that sends a ``HEARTBEAT`` every third
of the shortest lease of the process's handles. A thread keeps running while the main
thread computes in pure Python or waits in C code that releases the GIL, so a live holder
keeps what it holds; a paused, cut off or dead one falls silent and loses it. At a normal
exit the keeper says ``BYE`` and the server frees everything of this process at once.
After ``fork`` the child is a session of its own, holding nothing.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
from typing import Any

import psutil
import zmq

from . import _coordwire as W
from . import _protocol as P
from . import _serialization as S
from ._security import ClientKeys, configure_client
from ._transport import ServerAddress, get_context, host_id

__all__ = ["Keeper", "keeper", "next_handle", "session"]

_lock = threading.RLock()
_session: tuple[int, W.Session] | None = None
_keepers: dict[tuple[int, str], Keeper] = {}
#: How long a keeper waits for the answer to its BYE at exit, in seconds.
BYE_WAIT = 0.5
_exit_hook: list[int] = []  # the pid that registered it
_handles = itertools.count(1)


def next_handle() -> int:
    """A handle number, unique in this process's session (for every kind of handle)."""
    return next(_handles)


def session() -> W.Session:
    """This process's session (new after ``fork``)."""
    global _session
    pid = os.getpid()
    current = _session
    if current is None or current[0] != pid:
        with _lock:
            if _session is None or _session[0] != pid:
                started = psutil.Process(pid).create_time()
                _session = (pid, W.Session(W.new_session(), pid, started, host_id()))
            current = _session
    return current[1]


def keeper(address: ServerAddress, keys: ClientKeys | None, namespace: bytes,
           lease: float) -> Keeper:
    """This process's keeper for the server at ``address``, started on first use, made to
    beat often enough for ``lease``."""
    pid = os.getpid()
    key = (pid, address.req_rep)
    found = _keepers.get(key)
    if found is None or not found.alive:
        with _lock:
            found = _keepers.get(key)
            if found is None or not found.alive:
                for stale in [k for k in _keepers if k[0] != pid]:
                    del _keepers[stale]  # inherited through fork: their threads are gone
                found = _keepers[key] = Keeper(address, keys, namespace, session().session)
                if _exit_hook != [pid]:
                    # registered now, so that it runs before the exit hooks of the Contexts
                    # made earlier (which stop their servers)
                    _exit_hook[:] = [pid]
                    atexit.register(_say_bye)
    found.need(lease)
    return found


class Keeper:
    """The heartbeat thread of one process for one server (see the module docstring)."""

    def __init__(self, address: ServerAddress, keys: ClientKeys | None, namespace: bytes,
                 session_id: bytes) -> None:
        self.address, self.keys, self.namespace = address, keys, namespace
        self.session = session_id
        self.interval = 3600.0
        self._wake = threading.Event()
        self._stop = False
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="zproc-leases", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive() and not self._stop

    def need(self, lease: float) -> None:
        """Beat at least three times per ``lease`` seconds."""
        if lease / 3 < self.interval:
            self.interval = lease / 3
            self._wake.set()

    def stop(self, wait: float) -> None:
        """Say BYE (the server frees what this process holds) and end the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(wait)

    def _run(self) -> None:
        sock: Any = get_context().socket(zmq.DEALER)
        try:
            sock.linger = 0
            configure_client(sock, self.keys)
            sock.connect(self.address.req_rep)
            rid = 0
            heartbeat = S.dumps(self.session)
            while not self._stop:
                rid += 1
                sock.send(
                    P.request_frame(P.Kind.COORD, W.CoordOp.HEARTBEAT, rid, self.namespace,
                                    heartbeat)
                )
                self._wake.wait(self.interval)
                self._wake.clear()
                while sock.poll(0):
                    sock.recv_multipart()  # the answers say nothing this thread needs
            bye = P.encode(W.ByeRequest(self.session, None))
            sock.send(P.request_frame(P.Kind.COORD, W.CoordOp.BYE, rid + 1, self.namespace, bye))
            deadline = BYE_WAIT * 1000
            while sock.poll(deadline):
                if P.parse_reply(sock.recv_multipart())[1] == rid + 1:
                    break
        except zmq.ZMQError:
            pass  # the context was terminated: the process is ending
        finally:
            sock.close(0)


def _say_bye() -> None:
    pid = os.getpid()
    for (owner, _), found in list(_keepers.items()):
        if owner == pid:
            found.stop(BYE_WAIT + 0.5)
