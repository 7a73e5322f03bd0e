"""Sockets that one thread uses and another thread may close.

A ZeroMQ socket must not be used by two threads at once: closing it while its thread is
inside a call on it (a receive, a poll, a send) makes libzmq abort the whole process. A
:class:`zproc.State` gives each thread sockets of its own, and ``State.close()`` closes
those of every thread, so each owner of sockets (a connection, an event stream) keeps
two flags:

* ``busy``: how deep its thread is inside calls that use the sockets (set by that thread
  only, before it touches them);
* ``closed``: no call may start on the sockets any more (set by whoever closes).

The owner's thread raises ``busy``, then looks at ``closed``; the closing thread sets
``closed``, then looks at ``busy``. Python runs one of these steps at a time, in order, so
at least one side sees the other's flag: either the call sees ``closed`` and touches
nothing, or the closer sees ``busy`` and leaves the sockets alone. The busy thread closes
them itself when its call ends (its waits look at ``closed`` every slice and end with
:func:`closed_while_busy`). An idle owner is closed at once by the closing thread, so
nothing is left to the garbage collector. No lock on the way of a call: the one lock
here makes sure that only one of the two threads closes the sockets when both see that
they are due.
"""

from __future__ import annotations

import threading

from .exceptions import ZProcError

__all__ = ["OwnedSockets", "closed_while_busy"]

_CLAIM = threading.Lock()


def closed_while_busy() -> ZProcError:
    """The error of a call whose State was closed (by another thread) under it."""
    return ZProcError(
        "this State was closed while this call was using it (State.close() in another "
        "thread), so the call was abandoned (a request it had sent may still be applied). "
        "Close a State once the calls of its other threads have ended, or expect this error "
        "in them"
    )


class OwnedSockets:
    """The ``busy`` / ``closed`` handshake of one thread's sockets (see the module)."""

    busy: int
    closed: bool
    _open: bool

    def _init_owned(self) -> None:
        self.busy = 0
        self.closed = False
        self._open = True

    def _enter(self) -> None:
        """Before the owner's thread uses the sockets: raise if they are closed."""
        self.busy += 1
        if self.closed:
            self._leave()
            raise closed_while_busy()

    def _leave(self) -> None:
        """After that use: close the sockets if close() was called meanwhile."""
        self.busy -= 1
        if self.closed and not self.busy:
            self.close()

    def close(self) -> None:
        """Close the sockets now, or, while the owner's thread is inside a call on them,
        when that call ends (it ends soon, raising :func:`closed_while_busy`)."""
        self.closed = True
        if self.busy:
            return
        with _CLAIM:  # the closer and the owner's thread may both get here
            was_open, self._open = self._open, False
        if was_open:
            self._close_sockets()

    def _close_sockets(self) -> None:
        raise NotImplementedError
