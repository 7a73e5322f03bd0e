"""Named locks and semaphores, held by client sessions: the server's core, without sockets.

A namespace holds a table of named primitives; a name is of one kind (a lock is a
semaphore of one permit that is not bounded per holder; the client enforces the rest).
A *grant* is one permit held by ``(session, handle, seq)``; waiting acquires queue in
arrival order and a freed permit goes to the first of them (FIFO: no starvation, one
reply per grant). Every grant carries a *token* from a counter that only grows (started
by the server above every token of the runs before it, see ``Server``).

The core never blocks and never sends: :meth:`Coordinator.acquire` answers now or
returns ``None``, and the answers due later (a grant after a release, a wait that timed
out) collect in :attr:`Coordinator.out` as ``(reply_to, value)`` pairs for the I/O layer
to send. :meth:`Coordinator.tick` ends the waits whose deadline passed and takes away
what silent sessions hold (``now - last heard > lease``); :meth:`Coordinator.drop` does
it at once for sessions known to be dead.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ._coordqueue import Journal, QueueLog, QueueState
from ._coordwire import (
    BARRIER,
    EVENT,
    QUEUE,
    AcquireRequest,
    ByeRequest,
    GetRequest,
    PutRequest,
    ReleaseRequest,
    Session,
)
from .exceptions import LockLostError

__all__ = ["Coordinator"]

#: A session that holds and waits for nothing is forgotten after this long without a word.
IDLE_SESSION = 120.0

Key = tuple[bytes, int, int]  # (session, handle, seq)


class _Grant:
    __slots__ = ("key", "token", "lease")

    def __init__(self, key: Key, token: int, lease: float) -> None:
        self.key, self.token, self.lease = key, token, lease


class _Waiter:
    __slots__ = ("key", "reply_to", "deadline", "lease")

    def __init__(self, key: Key, reply_to: Any, deadline: float | None, lease: float) -> None:
        self.key, self.reply_to, self.deadline, self.lease = key, reply_to, deadline, lease


class Permits:
    """One named lock or semaphore (``value`` permits), an event (``flag``: set; waiters
    wait for it) or a barrier (``value`` parties; ``waiters``: the parties that arrived;
    ``flag``: broken)."""

    __slots__ = ("kind", "value", "grants", "waiters", "flag")

    def __init__(self, kind: str, value: int) -> None:
        self.kind, self.value = kind, value
        self.grants: dict[Key, _Grant] = {}
        self.waiters: deque[_Waiter] = deque()
        self.flag = False

    @property
    def free(self) -> int:
        return self.value - len(self.grants)


class Owner:
    """What the server knows of a session: its process, when it was last heard of, and
    where it holds or waits."""

    __slots__ = ("who", "seen", "places")

    def __init__(self, who: Session, now: float) -> None:
        self.who, self.seen = who, now
        self.places: set[tuple[str, str]] = set()


class Coordinator:
    def __init__(self, token_base: int = 0) -> None:
        self.tables: dict[str, dict[str, Any]] = {}  # Permits, or QueueState
        self.owners: dict[bytes, Owner] = {}
        self.token = token_base
        self.out: list[tuple[Any, Any]] = []
        self.dirty: set[QueueState] = set()  # queues whose waiters :meth:`flush` may serve
        #: with a persist file: what the next commit writes (queues, items, event flags)
        self.journal: Journal | None = None

    # -- requests ---------------------------------------------------------------------

    def declare(self, namespace: str, name: str, kind: str, value: int) -> Any:
        """The primitive ``name``, created if new; ValueError if it is of another kind or
        (a semaphore) has another value. Nothing changes on an error."""
        table = self.tables.setdefault(namespace, {})
        permits: Permits | QueueState | None = table.get(name)
        if permits is None:
            permits = table[name] = QueueState(value) if kind == QUEUE else Permits(kind, value)
            journal = self.journal
            if journal is not None and (kind == QUEUE or kind == EVENT):
                journal.declared[(namespace, name)] = (kind, value, False)
                if isinstance(permits, QueueState):
                    permits.log = QueueLog(journal, namespace, name)
        elif permits.kind != kind:
            raise ValueError(
                f"{name!r} is {_an(permits.kind)} in namespace {namespace!r}; {_an(kind)} "
                f"needs another name"
            )
        elif permits.value != value:
            label = {BARRIER: "parties", QUEUE: "maxsize"}.get(kind, "value")
            raise ValueError(
                f"the {kind} {name!r} has {label} {permits.value}, not {value}: ask for it "
                f"with {label}={permits.value}, or use another name"
            )
        return permits

    def acquire(
        self, namespace: str, req: AcquireRequest, reply_to: Any, now: float
    ) -> tuple[bool, int] | None:
        """``(granted, token)`` now, or None: the answer comes later through :attr:`out`."""
        permits = self.declare(namespace, req.name, req.kind, req.value)
        owner = self._owner(req.who, now)
        key = (req.who.session, req.handle, req.seq)
        if permits.kind == EVENT:  # an event's wait
            if permits.flag:
                return True, 0
        elif permits.kind == BARRIER:  # a party arrives: (True, index) or (False, -1) broken
            if permits.flag:
                return False, -1
            if len(permits.waiters) + 1 == permits.value:  # the last one: the round ends
                self.out.extend(
                    (waiter.reply_to, (True, index)) for index, waiter in enumerate(permits.waiters)
                )
                permits.waiters.clear()
                return True, permits.value - 1
            if req.timeout == 0:
                self.abort(permits)
                return False, -1
        elif key in permits.grants:  # the same acquire twice: it holds already
            return True, permits.grants[key].token
        elif permits.free > 0 and not permits.waiters:
            owner.places.add((namespace, req.name))
            return True, self._grant(permits, key, req.lease)
        if req.timeout == 0:
            return False, 0
        deadline = None if req.timeout is None else now + req.timeout
        permits.waiters.append(_Waiter(key, reply_to, deadline, req.lease))
        owner.places.add((namespace, req.name))
        return None

    def release(self, namespace: str, req: ReleaseRequest, now: float, cancel: bool) -> None:
        """Give back grant ``seq`` of the handle (``cancel``: or stop its wait, and say
        nothing if neither is found). LockLostError when a release finds no such grant."""
        owner = self.owners.get(req.session)
        if owner is not None:
            owner.seen = now
        permits = self.tables.get(namespace, {}).get(req.name)
        key = (req.session, req.handle, req.seq)
        if permits is not None:
            if permits.grants.pop(key, None) is not None:
                self._wake(permits)
                return
            if cancel:
                for waiter in permits.waiters:
                    if waiter.key == key:
                        permits.waiters.remove(waiter)
                        if permits.kind == BARRIER:  # a party gave up: the others too
                            self.abort(permits)
                        return
        if not cancel:
            kind = "lock" if permits is None else permits.kind
            raise LockLostError(
                f"this handle no longer holds the {kind} {req.name!r}: it was silent for "
                f"longer than its lease (paused, cut off, or its heartbeats stopped), or the "
                f"server restarted. Another process may have held it since; fence what you "
                f"wrote with the token"
            )

    def heartbeat(self, session: bytes, now: float) -> bool:
        owner = self.owners.get(session)
        if owner is None:
            return False
        owner.seen = now
        return True

    def bye(self, req: ByeRequest) -> None:
        """Drop the grants and waits of some handles of a session (None: all, and the
        session)."""
        owner = self.owners.get(req.session)
        if owner is None:
            return
        handles = None if req.handles is None else set(req.handles)
        self._clear(owner, lambda key: handles is None or key[1] in handles)
        if handles is None:
            del self.owners[req.session]

    def set_event(self, namespace: str, name: str, flag: bool) -> None:
        """Set (waking every waiter) or clear the event ``name``."""
        event = self.declare(namespace, name, EVENT, 1)
        if self.journal is not None and event.flag != flag:
            self.journal.declared[(namespace, name)] = (EVENT, 1, flag)
        event.flag = flag
        if flag:
            self.out.extend((waiter.reply_to, (True, 0)) for waiter in event.waiters)
            event.waiters.clear()

    def is_set(self, namespace: str, name: str) -> bool:
        return bool(self.declare(namespace, name, EVENT, 1).flag)

    def abort(self, barrier: Permits) -> None:
        """Break a barrier: its waiting parties and all later ones hear (False, -1)."""
        barrier.flag = True
        self.out.extend((waiter.reply_to, (False, -1)) for waiter in barrier.waiters)
        barrier.waiters.clear()

    def barrier_info(self, namespace: str, name: str, parties: int) -> tuple[int, bool]:
        """``(parties waiting, broken)``."""
        barrier = self.declare(namespace, name, BARRIER, parties)
        return len(barrier.waiters), barrier.flag

    def locked(self, namespace: str, name: str) -> bool:
        permits = self.tables.get(namespace, {}).get(name)
        return permits is not None and bool(permits.grants)

    # -- queues -----------------------------------------------------------------------

    def queue(self, namespace: str, name: str, maxsize: int) -> QueueState:
        queue = self.declare(namespace, name, QUEUE, maxsize)
        assert isinstance(queue, QueueState)
        return queue

    def put(self, namespace: str, req: PutRequest, reply_to: Any, now: float) -> bool | None:
        """True: put; False: full (timeout 0); None: the answer comes through :attr:`out`."""
        queue = self.queue(namespace, req.name, req.maxsize)
        owner = self._owner(req.who, now)
        key = (req.who.session, req.handle, req.seq)
        done = queue.put(key, req.item, reply_to, req.timeout, now, req.lease)
        if done is None:
            owner.places.add((namespace, req.name))
        self.dirty.add(queue)
        return done

    def get(self, namespace: str, req: GetRequest, reply_to: Any, now: float
            ) -> list[bytes] | None:
        """Items handed to the handle now (``[]``: none), or None: later through :attr:`out`."""
        queue = self.queue(namespace, req.name, req.maxsize)
        owner = self._owner(req.who, now)
        key = (req.who.session, req.handle, req.seq)
        items = queue.get(key, req.want, reply_to, req.timeout, now, req.lease)
        if items is None or items:
            owner.places.add((namespace, req.name))
        self.dirty.add(queue)
        return items

    def post(self, namespace: str, name: str, item: bytes) -> None:
        """A pipelined put, to a queue without bound."""
        queue = self.queue(namespace, name, 0)
        queue.items.append(item)
        if queue.log is not None:
            queue.log.add(item)
        if queue.getters:
            self.dirty.add(queue)

    def ack(self, namespace: str, name: str, key: tuple[bytes, int, int], now: float) -> None:
        self.heartbeat(key[0], now)
        queue = self.tables.get(namespace, {}).get(name)
        if isinstance(queue, QueueState):
            queue.ack(key)

    def qcancel(self, namespace: str, req: ReleaseRequest, now: float) -> None:
        """A put or get given up: its wait ends, what it was handed goes back."""
        self.heartbeat(req.session, now)
        queue = self.tables.get(namespace, {}).get(req.name)
        if isinstance(queue, QueueState):
            queue.cancel((req.session, req.handle, req.seq))
            self.dirty.add(queue)

    def qsize(self, namespace: str, name: str, maxsize: int) -> int:
        return len(self.queue(namespace, name, maxsize).items)

    def flush(self) -> None:
        """Serve the waiting getters and putters of the queues that changed."""
        dirty, self.dirty = self.dirty, set()
        for queue in dirty:
            if queue.getters or queue.putters:
                queue.feed(self.out)

    def restore(
        self,
        journal: Journal,
        declared: list[tuple[str, str, str, int, bool]],
        items: list[tuple[str, str, int, bytes]],
    ) -> None:
        """Start journaling to ``journal``, from what a persist file kept: the queues and
        events ``(namespace, name, kind, value, flag)`` and the queues' unacknowledged
        items ``(namespace, name, position, item)``, oldest first per queue (what was in
        flight is at the head again)."""
        self.journal = journal
        for namespace, name, kind, value, flag in declared:
            found = self.declare(namespace, name, kind, value)
            if kind == EVENT:
                found.flag = bool(flag)
        journal.clear()  # already in the file
        for namespace, name, position, item in items:
            queue = self.tables.get(namespace, {}).get(name)
            if isinstance(queue, QueueState) and queue.log is not None:
                queue.items.append(item)
                queue.log.restore(position, item)

    # -- time and death ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """End the waits past their deadline (answered ``(False, 0)``), and take away what
        sessions silent for longer than a lease hold or wait for."""
        for session, owner in list(self.owners.items()):
            silent = now - owner.seen
            if not owner.places:
                if silent > IDLE_SESSION:
                    del self.owners[session]
                continue
            self._clear(owner, None, now)

    def drop(self, session: bytes) -> None:
        """The session's process is gone: free what it holds, forget its waits."""
        owner = self.owners.pop(session, None)
        if owner is not None:
            self._clear(owner, lambda key: True)

    def next_deadline(self) -> float | None:
        deadlines = [
            waiter.deadline
            for owner in self.owners.values()
            for ns, name in owner.places
            for waiter in self.tables[ns][name].waiters
            if waiter.deadline is not None
        ]
        return min(deadlines) if deadlines else None

    # -- inside -------------------------------------------------------------------------

    def _owner(self, who: Session, now: float) -> Owner:
        owner = self.owners.get(who.session)
        if owner is None:
            owner = self.owners[who.session] = Owner(who, now)
        else:
            owner.seen = now
        return owner

    def _grant(self, permits: Permits, key: Key, lease: float) -> int:
        self.token += 1
        permits.grants[key] = _Grant(key, self.token, lease)
        return self.token

    def _wake(self, permits: Permits) -> None:
        """Hand free permits to the first waiters, in order."""
        while permits.waiters and permits.free > 0:
            waiter = permits.waiters.popleft()
            token = self._grant(permits, waiter.key, waiter.lease)
            self.out.append((waiter.reply_to, (True, token)))

    def _clear(self, owner: Owner, which: Any, now: float | None = None) -> None:
        """Drop the owner's grants and waits for which ``which(key)`` is true; with
        ``now`` instead: its timed-out waits and those grants and waits whose lease ran
        out."""
        session = owner.who.session
        silent = 0.0 if now is None else now - owner.seen
        for place in list(owner.places):
            permits = self.tables[place[0]][place[1]]
            if isinstance(permits, QueueState):
                if not permits.clear(session, which, now, silent, self.out):
                    owner.places.discard(place)
                self.dirty.add(permits)
                continue
            freed = gone = False
            for key, grant in list(permits.grants.items()):
                if key[0] == session and (
                    grant.lease < silent if which is None else which(key)
                ):
                    del permits.grants[key]
                    freed = True
            for waiter in list(permits.waiters):
                if waiter.key[0] != session:
                    continue
                if which is not None:
                    if which(waiter.key):
                        permits.waiters.remove(waiter)
                        gone = True
                elif waiter.lease < silent:
                    permits.waiters.remove(waiter)
                    gone = True
                elif waiter.deadline is not None and now is not None and now >= waiter.deadline:
                    permits.waiters.remove(waiter)
                    self.out.append((waiter.reply_to, (False, 0)))
                    gone = True
            if freed:
                self._wake(permits)
            if gone and permits.kind == BARRIER:  # a party died or gave up: broken for all
                self.abort(permits)
            if not any(k[0] == session for k in permits.grants) and not any(
                w.key[0] == session for w in permits.waiters
            ):
                owner.places.discard(place)



def _an(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind
