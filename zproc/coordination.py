"""Named locks, semaphores, events and barriers shared by processes, owned by processes.

``state.lock(name)``, ``state.semaphore(name, value)``, ``state.event(name)`` and
``state.barrier(name, parties)`` return handles to primitives
kept by the server, in the State's namespace (apart from the dict's keys). Unlike
``multiprocessing.Manager().Lock()``, a permit has an owner: the process of the handle
that acquired it. When that process dies (SIGKILL included) the server frees what it
held, within a second on the server's host; on any host, a holder that stays silent for
``lease`` seconds (paused, cut off) loses it, and its next ``release()`` raises
:class:`~zproc.LockLostError`. Each grant carries a fencing token that only grows
(``lock.token``). Waiters queue in order (FIFO) and sleep until the server tells them;
setting an event wakes all of its waiters.

:class:`Lock`, :class:`Semaphore`, :class:`Event` and :class:`Barrier` are the handles of
a :class:`~zproc.State`; :class:`AsyncLock`, :class:`AsyncSemaphore`, :class:`AsyncEvent`
and :class:`AsyncBarrier` those of an :class:`~zproc.AsyncState`.
A handle pickles as its State, name and settings: unpickled (in a child process, a
swarm task) it is a fresh handle that holds nothing. After ``fork``, a handle inherited
by the child holds nothing there either.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Protocol, TypeVar

from . import _coordwire as W
from . import _protocol as P
from . import _serialization as S
from ._leases import keeper, next_handle, session
from ._queues import DEFAULT_PREFETCH, AsyncQueue, Queue, confirmed

__all__ = [
    "AsyncBarrier", "AsyncEvent", "AsyncLock", "AsyncQueue", "AsyncSemaphore", "Barrier",
    "Event", "Lock", "Queue", "Semaphore",
]

#: The default lease of a holder, in seconds.
DEFAULT_LEASE = 10.0
#: How much longer than its timeout a waiting acquire waits for the server's answer.
GRACE = 5.0
#: How long giving up a wait (cancel) or releasing at close may take, in seconds.
CANCEL_WAIT = 5.0

_COORD = int(P.Kind.COORD)
_ACQUIRE, _RELEASE, _CANCEL = int(W.CoordOp.ACQUIRE), int(W.CoordOp.RELEASE), int(W.CoordOp.CANCEL)
_DECLARE, _LOCKED = int(W.CoordOp.DECLARE), int(W.CoordOp.LOCKED)
_SET, _CLEAR, _IS_SET = int(W.CoordOp.SET), int(W.CoordOp.CLEAR), int(W.CoordOp.IS_SET)
_ABORT, _BARRIER = int(W.CoordOp.ABORT), int(W.CoordOp.BARRIER)


class _Permits:
    """What sync and async handles share: settings, local bookkeeping, request bodies."""

    _kind = W.LOCK

    def __init__(self, state: Any, name: str, value: int = 1, *,
                 lease: float = DEFAULT_LEASE) -> None:
        self._state = state
        self._name = W.check_name(name)
        self._value = W.check_value(value)
        if self._kind == W.LOCK and value != 1:
            raise ValueError(f"a lock has one permit (value=1), got {value!r}; use a semaphore")
        self._lease = W.check_lease(lease)
        self._pid = -1  # set (with the session) on first use in a process: see _mine
        self._handle = 0
        self._who: tuple[Any, ...] = ()
        self._keeper: Any = None
        self._seq = 0
        self._held: list[tuple[int, int]] = []  # (seq, token) of the grants held, oldest first
        handles = state.__dict__.setdefault("_coord_handles", weakref.WeakSet())
        handles.add(self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def lease(self) -> float:
        return self._lease

    @property
    def token(self) -> int | None:
        """The fencing token of the latest grant this handle holds (None: holds nothing).
        Tokens only grow, also across restarts of a server with ``persist=``."""
        held = self._mine()
        return held[-1][1] if held else None

    def _mine(self) -> list[tuple[int, int]]:
        if self._pid != os.getpid():  # first use, or forked: this process holds nothing
            self._pid, self._held, self._handle = os.getpid(), [], next_handle()
            self._who = tuple(session())  # a plain tuple on the wire
        return self._held

    def _declare_body(self) -> bytes:
        return P.encode(W.DeclareRequest(self._name, self._kind, self._value))

    def _acquire_body(
        self, blocking: bool, timeout: float | None
    ) -> tuple[int, bytes, float | None]:
        """``(seq, body, client-side wait limit)`` of an acquire; bad arguments raise."""
        if blocking:
            limit = W.check_timeout(timeout)
        elif timeout is not None:
            raise ValueError("can't specify a timeout for a non-blocking acquire")
        else:
            limit = 0.0
        self._mine()
        found = self._keeper
        if found is None or not found.alive:
            state = self._state
            self._keeper = keeper(state.server_address, state._keys, state._ns, self._lease)
        self._seq += 1
        body = S.dumps((self._name, self._kind, self._value, self._handle, self._seq, limit,
                        self._lease, self._who))
        return self._seq, body, None if limit is None else limit + GRACE

    def _granted(self, seq: int, reply: Any) -> bool:
        granted, token = reply
        if granted:
            self._held.append((seq, token))
        return bool(granted)

    def _release_body(self) -> bytes:
        held = self._mine()
        if not held:
            if self._kind == W.LOCK:
                raise RuntimeError(
                    f"release of the lock {self._name!r}, which this handle does not hold"
                )
            raise ValueError(
                f"the semaphore {self._name!r} was released more often than this handle "
                f"acquired it"
            )
        seq, _ = held.pop(0)
        return self._grant_body(seq)

    def _grant_body(self, seq: int) -> bytes:
        return S.dumps((self._name, self._handle, seq, self._who[0]))

    def _passed(self, reply: Any) -> int:
        """A barrier's index, from the answer to its wait (BrokenBarrierError: broken)."""
        passed, index = reply
        if not passed:
            raise threading.BrokenBarrierError(
                f"the barrier {self._name!r} is broken: a party timed out, gave up, died or "
                f"called abort(); use another name for a new barrier"
            )
        return int(index)

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self._state, self._name, self._value, self._lease))

    def __repr__(self) -> str:
        value = "" if self._kind == W.LOCK else f", value={self._value}"
        held = "held" if self._held and self._pid == os.getpid() else "not held"
        return f"<zproc.{type(self).__name__} {self._name!r}{value} ({held} by this handle)>"


def _rebuild(cls: type[_Permits], state: Any, name: str, value: int, lease: float) -> Any:
    return cls(state, name, value, lease=lease)


def _held_handles(state: Any) -> list[int]:
    """The handles of ``state`` that hold something in this process."""
    handles = state.__dict__.get("_coord_handles", ())
    return [h._handle for h in list(handles) if h._pid == os.getpid() and h._held]


def _bye_body(state: Any) -> bytes | None:
    """The BYE that frees what the handles of ``state`` hold (None: they hold nothing)."""
    handles = _held_handles(state)
    if not handles:
        return None
    for handle in list(state.__dict__.get("_coord_handles", ())):
        handle._held = []
    return P.encode(W.ByeRequest(session().session, handles))


def release_all(state: Any, conn: Any) -> None:
    """At ``state.close()``: free at once what its handles hold (best effort: the lease and
    the server's watch on this process do it otherwise), through ``conn``, the closing
    thread's connection (None: it has none, and never uses another thread's: one is made
    for this request)."""
    body = _bye_body(state)
    if body is None:
        return
    spare = None
    try:
        if conn is None:
            conn = spare = state._spare_connection()
        if conn.pid == os.getpid():
            conn.request(_COORD, int(W.CoordOp.BYE), body, state._ns, CANCEL_WAIT)
    except Exception:
        pass
    finally:
        if spare is not None:
            spare.close()


async def arelease_all(state: Any, conn: Any) -> None:
    """:func:`release_all` for an AsyncState."""
    body = _bye_body(state)
    if body is not None and conn is not None and conn.pid == os.getpid():
        try:
            await conn.arequest(_COORD, int(W.CoordOp.BYE), body, state._ns, CANCEL_WAIT)
        except Exception:
            pass


# -- State's handles -----------------------------------------------------------------------


class _SyncHandle(_Permits):
    def _request(self, op: int, body: bytes, timeout: float | None = None) -> Any:
        return self._state._connection().request(_COORD, op, body, self._state._ns, timeout)

    def _wait(self, blocking: bool, timeout: float | None) -> tuple[int, Any]:
        """Send an ACQUIRE and wait for its answer: ``(seq, (granted, token))``."""
        seq, body, limit = self._acquire_body(blocking, timeout)
        conn = self._state._connection()
        rid = conn.send(_COORD, _ACQUIRE, body, self._state._ns)
        try:
            return seq, conn.result(rid, limit)
        except BaseException:  # given up (KeyboardInterrupt...): the permit must not stay
            try:
                self._request(_CANCEL, self._grant_body(seq), CANCEL_WAIT)
            except Exception:
                pass  # the server is gone, or the lease frees it
            raise


class _SyncPermits(_SyncHandle):
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a permit; wait for one (at most ``timeout`` seconds; None or -1: no limit)
        unless ``blocking`` is False. Return whether it was taken."""
        return self._granted(*self._wait(blocking, timeout))

    def release(self) -> None:
        """Give back a permit this handle holds (LockLostError: it was taken away)."""
        self._request(_RELEASE, self._release_body(), self._state.request_timeout)

    def __enter__(self) -> Any:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class Lock(_SyncPermits):
    """A named lock of a :class:`~zproc.State` (``state.lock(name)``): see
    :mod:`zproc.coordination`. Not reentrant."""

    def locked(self) -> bool:
        """Whether any handle (of any process) holds the lock now."""
        return bool(self._request(_LOCKED, S.dumps(self._name), self._state.request_timeout))


class Semaphore(_SyncPermits):
    """A named semaphore of ``value`` permits (``state.semaphore(name, value)``), bounded
    per handle: a handle releases at most what it acquired."""

    _kind = W.SEMAPHORE

    @property
    def value(self) -> int:
        return self._value


class Event(_SyncHandle):
    """A named event (``state.event(name)``), as :class:`threading.Event`: a flag that
    processes set, clear and wait for."""

    _kind = W.EVENT

    def set(self) -> None:
        """Set the flag: every waiter wakes up."""
        self._request(_SET, self._declare_body(), self._state.request_timeout)

    def clear(self) -> None:
        self._request(_CLEAR, self._declare_body(), self._state.request_timeout)

    def is_set(self) -> bool:
        return bool(self._request(_IS_SET, self._declare_body(), self._state.request_timeout))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set (at most ``timeout`` seconds; None or -1: no limit);
        return whether it is."""
        return bool(self._wait(True, timeout)[1][0])


class Barrier(_SyncHandle):
    """A named barrier for ``parties`` processes (``state.barrier(name, parties)``), as
    :class:`threading.Barrier`; a party that dies, falls silent or gives up breaks it."""

    _kind = W.BARRIER

    @property
    def parties(self) -> int:
        return self._value

    def wait(self, timeout: float | None = None) -> int:
        """Wait until ``parties`` handles wait; return this one's index (0 .. parties-1,
        distinct in a round). A timeout breaks the barrier: BrokenBarrierError, here and
        in every other waiter."""
        return self._passed(self._wait(True, timeout)[1])

    def abort(self) -> None:
        """Break the barrier: every waiter, and every later wait, gets BrokenBarrierError."""
        self._request(_ABORT, self._declare_body(), self._state.request_timeout)

    @property
    def n_waiting(self) -> int:
        """How many parties wait now."""
        return int(self._request(_BARRIER, self._declare_body(), self._state.request_timeout)[0])

    @property
    def broken(self) -> bool:
        return bool(self._request(_BARRIER, self._declare_body(), self._state.request_timeout)[1])


class CoordinationMethods:
    """The factories of :class:`~zproc.State` (mixed in)."""

    def lock(self, name: str, *, lease: float = DEFAULT_LEASE) -> Lock:
        """The named lock ``name`` of this namespace (created on first use).

        ``lease``: seconds a holder may stay silent before it loses the lock (a live
        process renews it on its own). ValueError if ``name`` is of another kind."""
        return _declared(Lock(self, name, lease=lease))

    def semaphore(self, name: str, value: int = 1, *, lease: float = DEFAULT_LEASE) -> Semaphore:
        """The named semaphore ``name`` with ``value`` permits (created on first use).
        ValueError if it exists with another value or ``name`` is of another kind."""
        return _declared(Semaphore(self, name, value, lease=lease))

    def event(self, name: str, *, lease: float = DEFAULT_LEASE) -> Event:
        """The named event ``name`` of this namespace (created on first use, not set).
        ValueError if ``name`` is of another kind."""
        return _declared(Event(self, name, lease=lease))

    def barrier(self, name: str, parties: int, *, lease: float = DEFAULT_LEASE) -> Barrier:
        """The named barrier ``name`` for ``parties`` processes (created on first use).
        ValueError if it exists with other parties or ``name`` is of another kind."""
        return _declared(Barrier(self, name, W.check_value(parties, "parties"), lease=lease))

    def queue(self, name: str, maxsize: int = 0, *, prefetch: int = DEFAULT_PREFETCH,
              lease: float = DEFAULT_LEASE) -> Queue:
        """The named queue ``name`` (created on first use; ``maxsize`` 0: no bound).

        ``prefetch``: how many items one request of a consumer brings at most (they stay
        owned by it until ``get`` returns them). ValueError if it exists with another
        maxsize or ``name`` is of another kind."""
        handle = Queue(self, name, maxsize, prefetch=prefetch, lease=lease)
        handle._state._connection().request(_COORD, _DECLARE, handle._declare_body(),
                                            handle._state._ns, handle._state.request_timeout)
        confirmed(self)
        return handle


class _HasState(Protocol):
    @property
    def state(self) -> CoordinationMethods: ...


class ContextCoordination:
    """The factories of :class:`~zproc.Context` (mixed in): ``ctx.lock(...)`` is
    ``ctx.state.lock(...)``, and so on."""

    def lock(self: _HasState, name: str, **kwargs: Any) -> Lock:
        """``ctx.state.lock(name, ...)``: see :meth:`State.lock`."""
        return self.state.lock(name, **kwargs)

    def semaphore(self: _HasState, name: str, value: int = 1, **kwargs: Any) -> Semaphore:
        """``ctx.state.semaphore(name, value, ...)``: see :meth:`State.semaphore`."""
        return self.state.semaphore(name, value, **kwargs)

    def event(self: _HasState, name: str, **kwargs: Any) -> Event:
        """``ctx.state.event(name, ...)``: see :meth:`State.event`."""
        return self.state.event(name, **kwargs)

    def barrier(self: _HasState, name: str, parties: int, **kwargs: Any) -> Barrier:
        """``ctx.state.barrier(name, parties, ...)``: see :meth:`State.barrier`."""
        return self.state.barrier(name, parties, **kwargs)

    def queue(self: _HasState, name: str, maxsize: int = 0, **kwargs: Any) -> Queue:
        """``ctx.state.queue(name, maxsize, ...)``: see :meth:`State.queue`."""
        return self.state.queue(name, maxsize, **kwargs)


_H = TypeVar("_H", bound=_SyncHandle)


def _declared(handle: _H) -> _H:
    """``handle`` once the server has its primitive (created, or checked: kind, value)."""
    handle._request(_DECLARE, handle._declare_body(), handle._state.request_timeout)
    return handle


# -- AsyncState's handles ------------------------------------------------------------------


class _AsyncHandle(_Permits):
    async def _request(self, op: int, body: bytes, timeout: float | None = None) -> Any:
        conn = self._state._connection()
        return await conn.arequest(_COORD, op, body, self._state._ns, timeout)

    async def _wait(self, blocking: bool, timeout: float | None) -> tuple[int, Any]:
        """As the sync ``_wait``; a cancelled wait takes nothing."""
        seq, body, limit = self._acquire_body(blocking, timeout)
        conn = self._state._connection()
        rid = conn.send(_COORD, _ACQUIRE, body, self._state._ns)
        try:
            return seq, await conn.aresult(rid, limit)
        except BaseException:
            try:
                await self._request(_CANCEL, self._grant_body(seq), CANCEL_WAIT)
            except Exception:
                pass
            raise


class _AsyncPermits(_AsyncHandle):
    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As :meth:`Lock.acquire`; a cancelled wait takes no permit."""
        return self._granted(*await self._wait(blocking, timeout))

    async def release(self) -> None:
        await self._request(_RELEASE, self._release_body(), self._state.request_timeout)

    async def __aenter__(self) -> Any:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.release()


class AsyncLock(_AsyncPermits):
    """The :class:`Lock` of an :class:`~zproc.AsyncState` (``astate.lock(name)``):
    ``await lock.acquire()``, ``async with lock:``."""

    async def locked(self) -> bool:
        return bool(await self._request(_LOCKED, S.dumps(self._name),
                                        self._state.request_timeout))


class AsyncSemaphore(_AsyncPermits):
    """The :class:`Semaphore` of an :class:`~zproc.AsyncState`."""

    _kind = W.SEMAPHORE

    @property
    def value(self) -> int:
        return self._value


class AsyncEvent(_AsyncHandle):
    """The :class:`Event` of an :class:`~zproc.AsyncState`: ``await ev.wait()``."""

    _kind = W.EVENT

    async def set(self) -> None:
        await self._request(_SET, self._declare_body(), self._state.request_timeout)

    async def clear(self) -> None:
        await self._request(_CLEAR, self._declare_body(), self._state.request_timeout)

    async def is_set(self) -> bool:
        return bool(await self._request(_IS_SET, self._declare_body(),
                                        self._state.request_timeout))

    async def wait(self, timeout: float | None = None) -> bool:
        return bool((await self._wait(True, timeout))[1][0])


class AsyncBarrier(_AsyncHandle):
    """The :class:`Barrier` of an :class:`~zproc.AsyncState`: ``await b.wait()``; the
    state's queries are coroutines: ``await b.n_waiting()``, ``await b.broken()``."""

    _kind = W.BARRIER

    @property
    def parties(self) -> int:
        return self._value

    async def wait(self, timeout: float | None = None) -> int:
        return self._passed((await self._wait(True, timeout))[1])

    async def abort(self) -> None:
        await self._request(_ABORT, self._declare_body(), self._state.request_timeout)

    async def n_waiting(self) -> int:
        info = await self._request(_BARRIER, self._declare_body(), self._state.request_timeout)
        return int(info[0])

    async def broken(self) -> bool:
        info = await self._request(_BARRIER, self._declare_body(), self._state.request_timeout)
        return bool(info[1])


class AsyncCoordinationMethods:
    """The factories of :class:`~zproc.AsyncState` (mixed in). They make no round trip:
    a name of another kind (or another value) raises at the first use."""

    def lock(self, name: str, *, lease: float = DEFAULT_LEASE) -> AsyncLock:
        """The named lock ``name`` of this namespace, as ``State.lock``."""
        return AsyncLock(self, name, lease=lease)

    def semaphore(self, name: str, value: int = 1, *,
                  lease: float = DEFAULT_LEASE) -> AsyncSemaphore:
        """The named semaphore ``name``, as ``State.semaphore``."""
        return AsyncSemaphore(self, name, value, lease=lease)

    def event(self, name: str, *, lease: float = DEFAULT_LEASE) -> AsyncEvent:
        """The named event ``name``, as ``State.event``."""
        return AsyncEvent(self, name, lease=lease)

    def barrier(self, name: str, parties: int, *,
                lease: float = DEFAULT_LEASE) -> AsyncBarrier:
        """The named barrier ``name``, as ``State.barrier``."""
        return AsyncBarrier(self, name, W.check_value(parties, "parties"), lease=lease)

    def queue(self, name: str, maxsize: int = 0, *, prefetch: int = DEFAULT_PREFETCH,
              lease: float = DEFAULT_LEASE) -> AsyncQueue:
        """The named queue ``name``, as ``State.queue``."""
        return AsyncQueue(self, name, maxsize, prefetch=prefetch, lease=lease)
