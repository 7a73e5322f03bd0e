"""Named queues of pickled items: the server's core, without sockets.

A queue holds its items (bytes, pickled by the client) in order. A ``get`` hands up to
``want`` items from the head to the asking handle at once (its prefetch); they are then
*in flight*, owned by that get (``(session, handle, seq)``: a handle may have several
gets answered at once, as coroutines of an event loop do), until the client
acknowledges them one by one, in order (``ack``), as its ``get`` calls return them.
What is in flight goes back to the head of the queue, in its order, when its owner gives
up a wait (cancel), closes the handle (bye), dies or falls silent for longer than its
lease: an item is never lost, and never handed out again once acknowledged.

Waiting getters and putters (a ``maxsize`` queue that is full) queue in arrival order
(FIFO). The core never sends: :meth:`QueueState.feed` hands the items that arrived to the
waiting getters and room to the waiting putters, appending the answers to ``out`` as
``(reply_to, value)`` pairs; the coordinator calls it once per batch of requests, so
that items put in one batch reach a waiting consumer in one answer.

With a persist file, a queue has a :class:`QueueLog`: each item gets a position as it
enters the queue, and :class:`Journal` collects what the next commit writes (an item
added, an acknowledged one removed, a queue or event declared or an event's flag). What
is in flight stays in the file until acknowledged: after a restart it is at the head
again, in the order it was put. Without a persist file, ``log`` is None and nothing of
this runs.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ._coordwire import QUEUE

__all__ = ["Journal", "QueueLog", "QueueState"]

Key = tuple[bytes, int, int]  # (session, handle, seq)


class Journal:
    """What the coordination tables changed since the last commit, for the persist file:
    ``declared`` {(namespace, name): (kind, value, flag)} (queues and events), ``added``
    [(namespace, name, position, item)] and ``removed`` [(namespace, name, position)]."""

    __slots__ = ("declared", "added", "removed")

    def __init__(self) -> None:
        self.declared: dict[tuple[str, str], tuple[str, int, bool]] = {}
        self.added: list[tuple[str, str, int, bytes]] = []
        self.removed: list[tuple[str, str, int]] = []

    @property
    def pending(self) -> bool:
        return bool(self.declared or self.added or self.removed)

    def clear(self) -> None:
        self.declared = {}
        self.added = []
        self.removed = []


class QueueLog:
    """The positions of a queue's unacknowledged items (by the item's identity: the
    queue keeps each item object until it is acknowledged), for its :class:`Journal`."""

    __slots__ = ("journal", "namespace", "name", "next", "positions")

    def __init__(self, journal: Journal, namespace: str, name: str) -> None:
        self.journal, self.namespace, self.name = journal, namespace, name
        self.next = 0
        self.positions: dict[int, int] = {}

    def add(self, item: bytes) -> None:
        """``item`` entered the queue at its tail."""
        position = self.next
        self.next = position + 1
        self.positions[id(item)] = position
        self.journal.added.append((self.namespace, self.name, position, item))

    def restore(self, position: int, item: bytes) -> None:
        """``item`` was in the file at ``position`` (loading, oldest first)."""
        self.positions[id(item)] = position
        self.next = position + 1

    def done(self, item: bytes) -> None:
        """``item`` was acknowledged: it leaves the file."""
        position = self.positions.pop(id(item), None)
        if position is not None:
            self.journal.removed.append((self.namespace, self.name, position))


class _QWaiter:
    """A waiting get (``item`` None, ``want`` items at most) or put (``item``)."""

    __slots__ = ("key", "reply_to", "deadline", "lease", "want", "item")

    def __init__(self, key: Key, reply_to: Any, deadline: float | None, lease: float,
                 want: int, item: bytes | None) -> None:
        self.key, self.reply_to, self.deadline, self.lease = key, reply_to, deadline, lease
        self.want, self.item = want, item


class QueueState:
    """One named queue (see the module docstring). ``value`` is its maxsize (0: no bound)."""

    __slots__ = ("value", "items", "inflight", "leases", "getters", "putters", "log")
    kind = QUEUE

    def __init__(self, maxsize: int) -> None:
        self.value = maxsize
        self.items: deque[bytes] = deque()
        self.inflight: dict[Key, deque[bytes]] = {}  # by the get that took them
        self.leases: dict[Key, float] = {}
        self.getters: deque[_QWaiter] = deque()
        self.putters: deque[_QWaiter] = deque()
        self.log: QueueLog | None = None  # with a persist file

    @property
    def waiters(self) -> list[_QWaiter]:
        return [*self.getters, *self.putters]

    def room(self) -> bool:
        return self.value == 0 or len(self.items) < self.value

    # -- requests ---------------------------------------------------------------------

    def put(self, key: Key, item: bytes, reply_to: Any, timeout: float | None, now: float,
            lease: float) -> bool | None:
        """True: put; False: full (``timeout`` 0); None: waits (answered by :meth:`feed`)."""
        if self.room() and not self.putters:
            self.items.append(item)
            if self.log is not None:
                self.log.add(item)
            return True
        if timeout == 0:
            return False
        deadline = None if timeout is None else now + timeout
        self.putters.append(_QWaiter(key, reply_to, deadline, lease, 0, item))
        return None

    def get(self, key: Key, want: int, reply_to: Any, timeout: float | None, now: float,
            lease: float) -> list[bytes] | None:
        """Up to ``want`` items now (``[]``: empty and ``timeout`` 0), or None: waits."""
        if self.items and not self.getters:
            return self._hand(key, want, lease)
        if timeout == 0:
            return []
        deadline = None if timeout is None else now + timeout
        self.getters.append(_QWaiter(key, reply_to, deadline, lease, want, None))
        return None

    def ack(self, key: Key) -> None:
        """The client has the next of the items get ``key`` took."""
        flying = self.inflight.get(key)
        if flying is None:
            return
        item = flying.popleft()
        if self.log is not None:
            self.log.done(item)
        if not flying:
            del self.inflight[key]
            del self.leases[key]

    def cancel(self, key: Key) -> None:
        """A wait given up by its caller: drop it, and put back what it was handed."""
        for waiters in (self.getters, self.putters):
            for waiter in waiters:
                if waiter.key == key:
                    waiters.remove(waiter)
                    return
        self.back([key])

    def back(self, keys: list[Key]) -> None:
        """Put the items in flight to the gets ``keys`` back at the head, in their order
        (those of the earlier gets of a handle first)."""
        for key in sorted(keys, key=lambda k: k[2], reverse=True):
            flying = self.inflight.pop(key, None)
            self.leases.pop(key, None)
            if flying:
                self.items.extendleft(reversed(flying))

    def feed(self, out: list[tuple[Any, Any]]) -> None:
        """Answer the waiting getters that items can serve and the putters that have room,
        first come first served."""
        while True:
            moved = False
            while self.getters and self.items:
                waiter = self.getters.popleft()
                out.append((waiter.reply_to, self._hand(waiter.key, waiter.want,
                                                        waiter.lease)))
                moved = True
            while self.putters and self.room():
                waiter = self.putters.popleft()
                assert waiter.item is not None
                self.items.append(waiter.item)
                if self.log is not None:
                    self.log.add(waiter.item)
                out.append((waiter.reply_to, True))
                moved = True
            if not moved:
                return

    def clear(self, session: bytes, which: Any, now: float | None, silent: float,
              out: list[tuple[Any, Any]]) -> bool:
        """For a session: put back what is in flight to its handles and drop their waits,
        for those ``which((session, handle, seq))`` selects; with ``which`` None, what its
        silence (``silent`` seconds) lost by lease, and the waits past their deadline
        (answered: ``[]`` for a get, False for a put). Return whether it still has any."""
        self.back([
            key for key in self.inflight if key[0] == session
            and (which(key) if which is not None else self.leases[key] < silent)
        ])
        for waiters, timed_out in ((self.getters, []), (self.putters, False)):
            for waiter in [w for w in waiters if w.key[0] == session]:
                if which is not None:
                    if which(waiter.key):
                        waiters.remove(waiter)
                elif waiter.lease < silent:
                    waiters.remove(waiter)
                elif waiter.deadline is not None and now is not None and now >= waiter.deadline:
                    waiters.remove(waiter)
                    out.append((waiter.reply_to, timed_out))
        return any(k[0] == session for k in self.inflight) or any(
            w.key[0] == session for w in self.waiters
        )

    # -- inside -------------------------------------------------------------------------

    def _hand(self, key: Key, want: int, lease: float) -> list[bytes]:
        items = self.items
        taken = [items.popleft() for _ in range(min(want, len(items)))]
        self.inflight[key] = deque(taken)
        self.leases[key] = lease
        return taken
