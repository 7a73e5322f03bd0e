"""Named queues shared by processes: :class:`Queue` (``state.queue(name)``) and
:class:`AsyncQueue` (``astate.queue(name)``), as :class:`multiprocessing.Queue` but kept by
the server, in the State's namespace.

Items travel pickled as state values are (cloudpickle for what pickle refuses). A
``get`` takes items by *prefetch*: one request brings up to ``prefetch`` items from the
head, which stay *in flight* (owned by this handle) until ``get`` returns them one by
one, each acknowledged to the server as it is returned. What is in flight goes back to
the head of the queue when the handle's process dies (noticed within a second on the
server's host, after ``lease`` seconds of silence elsewhere), when the handle is closed
with its State, or when a waiting ``get`` is given up (timeout, KeyboardInterrupt,
asyncio cancellation): a ``get`` that does not return an item takes none.

A ``put`` to a queue without bound (``maxsize`` 0) is pipelined: it returns once the
item is on its way, and an error the server found surfaces at the handle's next
``get``, ``qsize`` or ``put`` to a bounded queue; items of one handle arrive in the
order they were put, and ``State.close()`` waits until its handles' items have arrived.
A ``put`` to a bounded queue waits for the server's answer (room, or ``queue.Full``).

Threads: a :class:`Queue` handle shared by threads is, in each thread but the first that
used it, a handle of its own on the same queue (made on that thread's first use): each
thread has its own items in flight, prefetch and acknowledgements, on its own connection
(see :mod:`zproc._channels`), so that every item reaches exactly one ``get`` and the
puts of each thread arrive in the order it made them. Nothing is locked across a round
trip.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing.util
import os
import time
import queue
import threading
import weakref
from collections import deque
from collections.abc import Generator
from typing import Any

from . import _coordwire as W
from . import _protocol as P
from . import _serialization as S
from ._leases import keeper, next_handle, session

__all__ = ["AsyncQueue", "Queue"]

log = logging.getLogger("zproc")

#: The default lease of a consumer's items in flight, in seconds.
DEFAULT_LEASE = 10.0
#: How many items one ``get`` request brings at most (queues without bound).
DEFAULT_PREFETCH = 64
#: How long a process that ends waits for its queue handles' last requests to arrive, in s.
EXIT_WAIT = 5.0
#: How long :func:`flush_pending` waits for the server when the State has no
#: ``request_timeout``, in seconds.
FLUSH_WAIT = 30.0
#: How much longer than its timeout a waiting get or put waits for the server's answer.
GRACE = 5.0

_COORD = int(P.Kind.COORD)
_PUT, _POST, _GET = int(W.CoordOp.PUT), int(W.CoordOp.POST), int(W.CoordOp.GET)
_ACK, _QCANCEL, _QSIZE = int(W.CoordOp.ACK), int(W.CoordOp.QCANCEL), int(W.CoordOp.QSIZE)
_DECLARE = int(W.CoordOp.DECLARE)
#: Held while a thread claims a handle as its own (never across a round trip).
_CLAIM = threading.Lock()


def _limit(block: bool, timeout: float | None) -> float | None:
    """The server-side wait of a get or put (None: no limit); bad arguments raise."""
    if block:
        return W.check_timeout(timeout)
    if timeout is not None:
        raise ValueError("can't specify a timeout for a non-blocking get or put; use "
                         "block=True with the timeout")
    return 0.0


Steps = Generator[tuple[int, int, "float | None"], Any, Any]


def _wait(limit: float | None) -> float | None:
    """How long the client waits for the answer to a wait of ``limit`` seconds."""
    return None if limit is None else limit + GRACE


def _pickled(item: Any) -> bytes:
    try:
        return S.dumps_any(item)
    except Exception as exc:
        raise TypeError(
            f"the queue item {item!r:.80} cannot be pickled ({exc}); the queue is unchanged. "
            f"Put a picklable value (plain data, or an object of an importable class)"
        ) from exc


class _QueueBase:
    """What sync and async handles share: settings, local bookkeeping, request bodies."""

    def __init__(self, state: Any, name: str, maxsize: int = 0, *,
                 prefetch: int = DEFAULT_PREFETCH, lease: float = DEFAULT_LEASE) -> None:
        self._state = state
        self._name = W.check_name(name)
        self._maxsize = W.check_maxsize(maxsize)
        self._prefetch = W.check_value(prefetch, "prefetch")
        self._lease = W.check_lease(lease)
        self._pid = -1  # set (with the session) on first use in a process: see _mine
        self._handle = self._seq = 0
        self._who: tuple[Any, ...] = ()
        self._keeper: Any = None
        #: items in flight to this handle, not yet returned: (seq of the get that took it,
        #: pickled item)
        self._buf: deque[tuple[int, bytes]] = deque()
        self._posted = False  # pipelined puts or acks not yet confirmed by a round trip
        self._acks = (0, b"")  # (seq, body of the acknowledgement of an item it took)
        # State.close() says BYE for the handles of its own that hold something
        state.__dict__.setdefault("_coord_handles", weakref.WeakSet()).add(self)

    @property
    def name(self) -> str:
        """The queue's name in its State's namespace."""
        return self._name

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def _held(self) -> list[Any]:
        """For ``State.close()``: non-empty while items are in flight to this handle or its
        pipelined requests are unconfirmed (it then says BYE, which returns the items)."""
        return [*self._buf, *([None] if self._posted else [])]

    @_held.setter
    def _held(self, value: list[Any]) -> None:
        self._buf.clear()
        self._posted = False
        _busy(self._state).discard(self)

    def _mark(self) -> None:
        """This handle sent a request without waiting for its answer, or has items in
        flight: its State keeps it (a strong reference) until a round trip confirmed the
        request and the items were returned, or until ``close()`` says BYE for it."""
        self._posted = True
        _busy(self._state).add(self)

    def _mine(self) -> deque[tuple[int, bytes]]:
        if self._pid != os.getpid():  # first use, or forked: nothing is in flight here
            self._pid, self._buf, self._handle = os.getpid(), deque(), next_handle()
            self._who = tuple(session())
            self._posted = False
        return self._buf

    def _keep(self) -> None:
        """Start (or revive) this process's lease keeper: items in flight have a lease."""
        found = self._keeper
        if found is None or not found.alive:
            state = self._state
            self._keeper = keeper(state.server_address, state._keys, state._ns, self._lease)

    def _declare_body(self) -> bytes:
        return P.encode(W.DeclareRequest(self._name, W.QUEUE, self._maxsize))

    def _put_body(self, item: Any, limit: float | None) -> tuple[int, bytes, bool]:
        """``(seq, body, pipelined)`` of a put (TypeError: the item does not pickle)."""
        data = _pickled(item)
        self._mine()
        if self._maxsize == 0:
            return 0, S.dumps((self._name, self._handle, data, self._who[0])), True
        self._keep()
        self._seq += 1
        body = S.dumps((self._name, self._maxsize, self._handle, self._seq, data, limit,
                        self._lease, self._who))
        return self._seq, body, False

    def _get_body(self, limit: float | None) -> tuple[int, bytes]:
        self._keep()
        self._seq += 1
        want = 1 if self._maxsize else self._prefetch  # a bounded queue hands one at a time
        return self._seq, S.dumps((self._name, self._maxsize, self._handle, self._seq, want,
                                   limit, self._lease, self._who))

    def _take(self, conn: Any) -> Any:
        """The next item in flight to this handle, acknowledged: this process has it now
        (the acknowledgement leaves without waiting for an answer)."""
        seq, data = self._buf.popleft()
        if self._acks[0] != seq:
            self._acks = (seq, S.dumps((self._name, self._handle, seq.to_bytes(8, "little"),
                                        self._who[0])))
        conn.post(_COORD, _ACK, self._acks[1], self._state._ns)
        if not self._posted:
            self._mark()
        return S.loads(data)

    def _cancel_body(self, seq: int) -> bytes:
        return S.dumps((self._name, self._handle, seq, self._who[0]))

    def _size_body(self) -> bytes:
        self._mine()
        self._posted = False  # the answer confirms what this handle sent before
        return S.dumps((self._name, self._maxsize, self._handle, self._who[0]))

    def _cancel(self, seq: int) -> None:
        """Give up wait ``seq``: the server drops it and puts back at the head what it was
        handed (sent without waiting, so that a second cancellation cannot stop it; the
        connection keeps the order of requests)."""
        self._mark()
        try:
            self._state._connection().post(_COORD, _QCANCEL, self._cancel_body(seq),
                                           self._state._ns)
        except Exception:
            pass  # the server is gone, or the lease returns the items

    def _put_steps(self, item: Any, block: bool, timeout: float | None) -> Steps:
        """A put, written once for both flavours: it yields ``(request id, seq, wait)``
        of the round trip it needs, if any, and is sent the answer."""
        limit = _limit(block, timeout)
        seq, body, pipelined = self._put_body(item, limit)
        conn, ns = self._state._connection(), self._state._ns
        if pipelined:
            conn.post(_COORD, _POST, body, ns)
            self._mark()
            return None
        done = yield conn.send(_COORD, _PUT, body, ns), seq, _wait(limit)
        self._posted = False
        if not done:
            raise queue.Full
        return None

    def _get_steps(self, block: bool, timeout: float | None) -> Steps:
        """A get, as :meth:`_put_steps`: from the items in flight to this handle, else
        with a round trip that brings up to ``prefetch`` of them."""
        limit = _limit(block, timeout)
        buf = self._mine()
        conn, ns = self._state._connection(), self._state._ns
        if not buf:
            seq, body = self._get_body(limit)
            items = yield conn.send(_COORD, _GET, body, ns), seq, _wait(limit)
            self._posted = False
            if not items:
                raise queue.Empty
            buf.extend([(seq, item) for item in items])
        return self._take(conn)

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self._state, self._name, self._maxsize,
                           self._prefetch, self._lease))

    def __repr__(self) -> str:
        bound = f", maxsize={self._maxsize}" if self._maxsize else ""
        return f"<zproc.{type(self).__name__} {self._name!r}{bound}>"


def _busy(state: Any) -> set[_QueueBase]:
    busy: set[_QueueBase] | None = state.__dict__.get("_coord_busy")
    if busy is None:
        busy = state.__dict__["_coord_busy"] = set()
        _at_exit()
        _states.add(state)
    return busy


_states: weakref.WeakSet[Any] = weakref.WeakSet()  # States whose queue handles were used
_exit_hook: list[int] = []  # the pid that registered the hooks


def _at_exit() -> None:
    """Make sure a process that ends without closing its States still delivers its
    pipelined puts and gives back its items in flight (atexit; multiprocessing's
    children end through its finalizers instead)."""
    pid = os.getpid()
    if _exit_hook != [pid]:
        _exit_hook[:] = [pid]
        _states.clear()  # inherited through fork: not this process's
        atexit.register(flush_all)
        multiprocessing.util.Finalize(None, flush_all, exitpriority=20)


def flush_all() -> None:
    """Say BYE for the busy queue handles of every State of this process (a round trip:
    the requests sent before it have arrived: pipelined puts, acknowledgements)."""
    pid = os.getpid()
    for state in list(_states):
        busy = [h for h in state.__dict__.get("_coord_busy", ()) if h._pid == pid]
        conn = getattr(state, "_conn", None)
        if not busy or conn is None or conn.closed or conn.pid != pid:
            continue
        if conn.busy:
            # another thread's (a daemon thread's) and it is inside a call: a socket is
            # not for two threads at once; the server's watch on this process returns
            # the handles' items once it has ended
            continue
        if hasattr(conn, "aresult"):
            continue  # an AsyncState's: it needs its event loop, which has ended
        for handle in busy:
            handle._held = []
        body = P.encode(W.ByeRequest(session().session, [h._handle for h in busy]))
        try:
            conn.request(_COORD, int(W.CoordOp.BYE), body, state._ns, EXIT_WAIT)
        except Exception:
            pass  # the server is gone; its watch on this process returns the items


def flush_pending() -> None:
    """Wait until the server has what the calling thread's queue handles (of every State
    of this process) sent without waiting: pipelined puts, acknowledgements of gets.

    For a long-lived worker, after each task and before its result leaves, so that whoever
    gets the result finds the task's items in the queue. Unlike :func:`flush_all` it gives
    back no prefetched item and ends nothing: one round trip per State that has something
    unconfirmed on this thread's connection (requests of one connection arrive in order),
    none when nothing is. An error of a pipelined put is left for the handle's next call.

    A wait that fails (no answer within the State's ``request_timeout``, else
    :data:`FLUSH_WAIT` seconds; the server gone) is logged, not raised: the task has run
    and its result is valid, the requests stay on their way, and an error here would fail
    (or retry) a task whose puts may well arrive."""
    if not _states:
        return
    pid, tid = os.getpid(), threading.get_ident()
    for state in list(_states):
        pending = [h for h in list(state.__dict__.get("_coord_busy", ()))
                   if h._posted and h._pid == pid and getattr(h, "_tid", 0) == tid]
        if not pending or state._closed:
            continue  # (async handles have no _tid: their connection needs their loop)
        timeout = state.request_timeout or FLUSH_WAIT
        try:
            state._connection().request(_COORD, int(W.CoordOp.HEARTBEAT),
                                        S.dumps(session().session), state._ns, timeout)
        except Exception as exc:
            log.warning("zproc: the server did not confirm the queue puts and "
                        "acknowledgements of process %d (%s); its task's result is sent "
                        "anyway, they may arrive after it", pid, exc)
            continue
        busy = _busy(state)
        for handle in pending:
            handle._posted = False
            if not handle._buf:  # else kept, for the BYE that returns its items at close
                busy.discard(handle)


def confirmed(state: Any) -> None:
    """A round trip on the connection of ``state`` just ended: the requests its queue
    handles sent before without waiting are confirmed; keep only those with items."""
    for handle in list(_busy(state)):
        if not handle._buf:
            handle._posted = False
            _busy(state).discard(handle)


def _rebuild(cls: type[_QueueBase], state: Any, name: str, maxsize: int, prefetch: int,
             lease: float) -> Any:
    return cls(state, name, maxsize, prefetch=prefetch, lease=lease)


def _finish(steps: Steps, answer: Any) -> Any:
    """The result of ``steps``, sent the answer to its round trip."""
    try:
        steps.send(answer)
    except StopIteration as done:
        return done.value
    raise AssertionError("a queue operation makes one round trip at most")


class Queue(_QueueBase):
    """A named queue of a :class:`~zproc.State` (``state.queue(name, maxsize)``), as
    :class:`multiprocessing.Queue`; see :mod:`zproc.coordination`. Threads may share a
    handle (see the module docstring)."""

    _tid = 0  # the thread that uses this handle itself: the first one that used it
    _local: threading.local | None = None  # the handles of the other threads

    def _here(self) -> Queue:
        """The handle of the calling thread: this one, or one of the thread's own."""
        tid = threading.get_ident()
        if self._tid == tid:
            return self
        with _CLAIM:
            if self._tid == 0:
                self._tid = tid
                return self
            if self._local is None:
                self._local = threading.local()
        mine: Queue | None = getattr(self._local, "handle", None)
        if mine is None:
            mine = type(self)(self._state, self._name, self._maxsize,
                              prefetch=self._prefetch, lease=self._lease)
            mine._tid = tid
            self._local.handle = mine
        return mine

    def _run(self, steps: Steps) -> Any:
        try:
            rid, seq, wait = next(steps)
        except StopIteration as done:
            return done.value
        try:
            answer = self._state._connection().result(rid, wait)
        except BaseException:  # given up (timeout, KeyboardInterrupt): nothing is taken
            self._cancel(seq)
            raise
        return _finish(steps, answer)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; on a full bounded queue wait for room (at most ``timeout``
        seconds; None or -1: no limit) unless ``block`` is False: ``queue.Full``."""
        if self._tid != threading.get_ident():
            self._here()._put(item, block, timeout)
        else:
            self._put(item, block, timeout)

    def _put(self, item: Any, block: bool, timeout: float | None) -> None:
        if not self._maxsize and block and timeout is None and self._pid == os.getpid():
            state = self._state
            body = S.dumps((self._name, self._handle, _pickled(item), self._who[0]))
            state._connection().post(_COORD, _POST, body, state._ns)
            if not self._posted:
                self._mark()
            return
        self._run(self._put_steps(item, block, timeout))

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the item at the head; wait for one (at most ``timeout``
        seconds; None or -1: no limit) unless ``block`` is False: ``queue.Empty``. A get
        that raises takes no item."""
        if self._tid != threading.get_ident():
            return self._here()._get(block, timeout)
        return self._get(block, timeout)

    def _get(self, block: bool, timeout: float | None) -> Any:
        if self._buf and block and timeout is None and self._pid == os.getpid():
            return self._take(self._state._connection())  # the hot path: no round trip
        return self._run(self._get_steps(block, timeout))

    def get_nowait(self) -> Any:
        return self.get(False)

    def qsize(self) -> int:
        """The number of items in the queue (not counting those in flight to consumers)."""
        here = self._here()
        state = here._state
        return int(state._connection().request(_COORD, _QSIZE, here._size_body(), state._ns,
                                               state.request_timeout))

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize


class AsyncQueue(_QueueBase):
    """The :class:`Queue` of an :class:`~zproc.AsyncState` (``astate.queue(name)``):
    ``await q.put(x)``, ``await q.get()``; a cancelled get takes no item."""

    _turn: tuple[Any, asyncio.Lock] | None = None  # (event loop, lock of the gets' turns)

    async def _run(self, steps: Steps) -> Any:
        try:
            rid, seq, wait = next(steps)
        except StopIteration as done:
            return done.value
        try:
            answer = await self._state._connection().aresult(rid, wait)
        except BaseException:  # cancelled, timed out: nothing is taken
            self._cancel(seq)
            raise
        return _finish(steps, answer)

    async def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        await self._run(self._put_steps(item, block, timeout))

    async def put_nowait(self, item: Any) -> None:
        await self.put(item, False)

    async def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """As :meth:`Queue.get`. Coroutines that share the handle take turns to ask the
        server, each first taking from what the one before brought."""
        limit = _limit(block, timeout)
        if self._buf and self._pid == os.getpid():
            return self._take(self._state._connection())
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn[0] is not loop:
            self._turn = (loop, asyncio.Lock())
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._turn[1].acquire(), limit)
        except asyncio.TimeoutError:
            raise queue.Empty from None
        try:
            if limit is not None:
                limit = max(0.0, limit - (time.monotonic() - started))
            return await self._run(self._get_steps(True, limit) if block
                                   else self._get_steps(False, None))
        finally:
            self._turn[1].release()

    async def get_nowait(self) -> Any:
        return await self.get(False)

    async def qsize(self) -> int:
        state = self._state
        return int(await state._connection().arequest(_COORD, _QSIZE, self._size_body(),
                                                      state._ns, state.request_timeout))

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def full(self) -> bool:
        return self._maxsize > 0 and await self.qsize() >= self._maxsize
