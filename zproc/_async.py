"""AsyncState: the State API for asyncio programs, over ``zmq.asyncio`` sockets.

Data flow of one AsyncState::

    coroutines --await--> AsyncConnection.arequest --DEALER (asyncio)--> server ROUTER
                               ^ one reader task hands each reply to its request id
    watchers   --await--> AsyncStream: replica, log, cursors (the _StreamCore of State)
                               ^ SUB (asyncio) <-- server PUB: events, sync markers

Only the API is written here. The sockets are in :mod:`zproc._client`
(:class:`~zproc._client.AsyncConnection`, :class:`~zproc._client.AsyncStream`); the
replica, the event log, gap detection, resynchronisation and the watchers' tests,
starting cursors and return values in :mod:`zproc._stream`, shared with
:class:`~zproc.State`. So an AsyncState behaves like a State, one ``await`` at a time.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from . import _protocol as P
from . import _serialization as S
from ._api import (
    CACHE_CHECK,
    CACHE_POLL,
    CACHE_WAIT,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_RCVHWM,
    StateBase,
    WatcherBase,
    WatchMethods,
    _ping_payload,
    _update_argument,
)
from ._pipeline import DEFAULT_PIPELINE_OPS, AsyncPipeline
from ._client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LIVENESS,
    AsyncConnection,
    AsyncStream,
    closed_error,
    running,
)
from ._security import SecretKey
from ._stream import StateUpdate, _copy, _Cursor, _deadline
from ._utils import in_server_process
from ._watch import _available_test, _equal_test, _EvTest, _found, _none_test, _not_equal_test
from ._watch import _change_result, _change_watch, _fn_snapshot_test, _foreign_test
from ._watch import _get_copy, _level_watch, _not_none_test, _SnapTest, _update_of, _watch_start
from .coordination import AsyncCoordinationMethods, arelease_all
from .exceptions import ServerUnavailableError, TimeoutError, UnknownFunctionError

__all__ = ["AsyncState", "AsyncStateWatcher"]

T = TypeVar("T")


class AsyncState(StateBase, WatchMethods["AsyncStateWatcher"], AsyncCoordinationMethods):
    """A :class:`State` for asyncio: every dict operation and watcher is awaited.

    The parameters are those of :class:`State`. Create it inside a coroutine (it
    registers with the server right away, without waiting for the answer, so its
    buffer starts at construction); use it from that event loop only. Each method is a
    coroutine; the dict operators are spelt as methods (``await s.getitem(k)``,
    ``await s.setitem(k, v)``, ``await s.contains(k)``, ``await s.len()``).

    Several coroutines may share one AsyncState: requests go out as they are made, and
    replies are matched by request id, so cancelling one await (``asyncio.wait_for``,
    task cancellation) leaves the others in step. ``namespace`` is fixed: use
    :meth:`fork` for another one.

    ``cache=True`` serves ``getitem``, ``get``, ``contains``, ``len``, ``copy``, ``keys``,
    ``values`` and ``items`` from the local replica, with the guarantees of a State's
    cache; :meth:`pipeline` buffers writes as :meth:`State.pipeline` does.

    .. versionadded:: 1.0
    """

    def __init__(
        self, server_address: Iterable[str], *, namespace: str = "default",
        request_timeout: float | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        max_backlog: int = DEFAULT_MAX_BACKLOG, rcvhwm: int = DEFAULT_RCVHWM,
        secret_key: SecretKey | None = None, liveness: float = DEFAULT_LIVENESS,
        cache: bool = False,
    ) -> None:
        super().__init__(server_address, namespace, request_timeout, connect_timeout,
                         max_backlog, rcvhwm, secret_key, liveness, cache)
        self._cache_due = self._cache_check_due = 0.0
        self._conn: AsyncConnection | None = None
        self._stream: AsyncStream | None = None
        self._stream_lock = asyncio.Lock()
        self._pending: list[_Cursor] = []  # watcher cursors waiting for the stream
        self._epoch = 0  # bumped whenever the stream is dropped
        self._start_seq_value: tuple[int, bytes] | None = None  # (head, its server run)
        if running():
            self._connection()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The namespace this AsyncState works on (read-only)."""
        return self._namespace

    @property
    def identity(self) -> bytes:
        """The identity this AsyncState's changes carry."""
        return self._connection().identity

    def _connection(self) -> AsyncConnection:
        if self._closed:
            raise closed_error()
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        if in_server_process():
            raise RuntimeError(
                "an AsyncState cannot be used in the server process (inside an atomic "
                "function): work on the dict the atomic function receives instead"
            )
        self._drop_stream(self._stream, None)
        self._conn = conn = AsyncConnection(
            self._address,
            connect_timeout=self._connect_timeout,
            keys=self._keys,
            liveness=self._liveness,
        )
        # Register without waiting: the buffer starts at the server's head as of this
        # request, whose reply is read when the event stream starts.
        self._start_rid = conn.send(P.Kind.HEAD, 0, b"", self._ns)
        self._start_seq_value = None
        return conn

    def _stream_lost(self, stream: AsyncStream, error: BaseException) -> None:
        self._drop_stream(stream, error)

    def _drop_stream(self, stream: AsyncStream | None, error: BaseException | None) -> None:
        """Forget the event stream (closed, lost or left behind by ``fork``)."""
        if stream is None or stream is not self._stream:
            return
        self._stream = None
        self._pending.clear()
        self._epoch += 1
        self._start_seq_value = self._start_rid = None
        if self._conn is not None and self._conn.pid == os.getpid():
            stream.close(error)

    async def _request(self, kind: int, method: int, body: bytes) -> Any:
        conn = self._connection()
        return await conn.arequest(kind, method, body, self._ns, self.request_timeout)

    async def _call(self, method: int, *args: Any) -> Any:
        return await self._request(P.Kind.CALL, method, P.encode_buffered(args))

    def _send_early(self, kind: int, body: bytes) -> tuple[AsyncConnection, int]:
        """Send a request now (its reply is awaited later, with ``aresult``)."""
        conn = self._connection()
        return conn, conn.send(kind, 0, body, self._ns)

    async def _replica(self) -> dict[Any, Any]:
        """The local replica, current enough for a cached read (``cache=True``): as
        ``State._replica``, awaiting the event stream when it must."""
        stream, conn = self._stream, self._conn
        if (
            stream is None
            or conn is None
            or stream.seq < conn.head
            or time.monotonic() >= self._cache_due
        ):
            try:
                stream, _ = await self._watching(catch_up=False)
                now = time.monotonic()
                check = now >= self._cache_check_due
                await stream.refresh(self._connection().head, check, CACHE_WAIT)
                if check:
                    self._cache_check_due = now + CACHE_CHECK
            except ServerUnavailableError:
                if self._stream is None and self._conn is not None:
                    self._conn.head = 0  # a replaced server: start again from its state
                raise
            self._cache_due = time.monotonic() + CACHE_POLL
        return stream.replica

    async def _start_seq(self, conn: AsyncConnection) -> tuple[int, bytes]:
        """Where the buffer starts: the registration's head and the run that numbered it."""
        if self._start_seq_value is not None:
            return self._start_seq_value
        rid, self._start_rid = self._start_rid, None
        if rid is None:
            return P.head_reply(await self._request(P.Kind.HEAD, 0, b""))
        try:
            start = P.head_reply(await conn.aresult(rid, self.request_timeout))
        except (asyncio.CancelledError, TimeoutError):
            # keep the registration: the buffer still starts where the State was made
            if self._conn is conn and not conn.closed and self._start_rid is None:
                self._start_rid = rid
                conn.expect(rid)
            raise
        if self._conn is conn and self._start_rid is None:
            self._start_seq_value = start  # kept if starting the stream fails
        return start

    async def _watching(self, catch_up: bool = True) -> tuple[AsyncStream, int]:
        """The event stream, started on first use, and the server's head (current when
        ``catch_up``, else as last seen)."""
        registers = self._conn is None or self._conn.pid != os.getpid()
        conn = self._connection()  # (registers the buffer's start on first use)
        stream = self._stream
        if stream is None:
            async with self._stream_lock:
                stream = self._stream
                if stream is None:
                    start_seq, start_run = await self._start_seq(conn)
                    stream = AsyncStream(self, conn, start_seq, start_run)
                    try:
                        await stream.start(start_seq)
                    except BaseException:
                        stream.close()
                        raise
                    if registers and stream.run == start_run:
                        stream.head = min(stream.head, start_seq)  # the call's first request
                    self._stream = stream
                    stream.cursors.update(self._pending)
                    self._pending.clear()
                    return stream, stream.head
        if catch_up:
            return stream, await stream.catch_up()
        return stream, stream.head

    def _me(self) -> tuple[bytes]:
        return (self._connection().identity,)

    async def close(self) -> None:
        """Close the sockets. Idempotent; later use raises :class:`ZProcError`, and
        coroutines still waiting on this AsyncState raise it too."""
        if self._closed:
            return
        self._closed = True
        self._drop_stream(self._stream, closed_error())
        conn, self._conn = self._conn, None
        await arelease_all(self, conn)
        if conn is not None:
            await conn.aclose()

    def _watcher(self, test: _EvTest, **options: Any) -> AsyncStateWatcher:
        return AsyncStateWatcher(self, test, **options)

    async def __aenter__(self) -> AsyncState:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __del__(self) -> None:
        conn = self._conn if self._left_open(
            "AsyncState", "await close() or use 'async with AsyncState(...)'"
        ) else None
        if conn is not None:
            self._closed = True
            try:
                if self._stream is not None:
                    self._stream.close()
                conn.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<AsyncState server_address={tuple(self._address)!r} namespace={self._namespace!r}>"

    # -- dict interface -------------------------------------------------------------------

    async def getitem(self, key: Hashable) -> Any:
        """``state[key]``: the value (a copy); ``KeyError`` if missing."""
        if self._cache:
            return _copy((await self._replica())[key])
        return await self._call(P.Method.GETITEM, key)

    async def setitem(self, key: Hashable, value: Any) -> None:
        """``state[key] = value``."""
        await self._call(P.Method.SETITEM, key, value)

    async def delitem(self, key: Hashable) -> None:
        """``del state[key]``; ``KeyError`` if missing."""
        await self._call(P.Method.DELITEM, key)

    async def contains(self, key: Hashable) -> bool:
        """``key in state``."""
        if self._cache:
            return key in await self._replica()
        return bool(await self._call(P.Method.CONTAINS, key))

    async def len(self) -> int:
        """``len(state)``."""
        if self._cache:
            return len(await self._replica())
        return int(await self._call(P.Method.LEN))

    async def get(self, key: Hashable, default: Any = None) -> Any:
        if self._cache:
            return _copy((await self._replica()).get(key, default))
        return await self._call(P.Method.GET, key, default)

    async def pop(self, key: Hashable, *default: Any) -> Any:
        return await self._call(P.Method.POP, key, *default)

    async def popitem(self) -> tuple[Any, Any]:
        return tuple(await self._call(P.Method.POPITEM))

    async def setdefault(self, key: Hashable, default: Any = None) -> Any:
        return await self._call(P.Method.SETDEFAULT, key, default)

    async def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``; a failure part-way leaves the state unchanged."""
        if args and isinstance(args[0], AsyncState):
            args = (await args[0].copy(), *args[1:])
        await self._call(P.Method.UPDATE, _update_argument(args, kwargs))

    async def clear(self) -> None:
        await self._call(P.Method.CLEAR)

    async def copy(self) -> dict[Any, Any]:
        """A deep copy of the whole state, as a plain dict (one round trip)."""
        if self._cache:
            return S.loads(S.dumps(await self._replica()))  # type: ignore[no-any-return]
        return await self._call(P.Method.COPY)  # type: ignore[no-any-return]

    async def keys(self) -> Any:
        """``dict_keys`` of one snapshot."""
        return (await self.copy()).keys()

    async def values(self) -> Any:
        """``dict_values`` of one snapshot."""
        return (await self.copy()).values()

    async def items(self) -> Any:
        """``dict_items`` of one snapshot."""
        return (await self.copy()).items()

    async def set(self, value: Mapping[Any, Any]) -> None:
        """Replace the whole dict with ``value``, atomically (one event)."""
        await self._call(P.Method.SET, dict(value))

    def pipeline(self, max_ops: int = DEFAULT_PIPELINE_OPS) -> AsyncPipeline:
        """Buffer writes and send them in batches: ``async with state.pipeline() as p:
        p[k] = v; ...`` (see :class:`AsyncPipeline`)."""
        return AsyncPipeline(self, max_ops)

    # -- server helpers -------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = 5.0, payload: bytes | None = None
                   ) -> int | None:
        """The server's pid if it echoes ``payload`` (see :func:`zproc.ping`)."""
        payload = _ping_payload(payload, timeout)
        conn = self._connection()
        echoed, pid = await conn.arequest(P.Kind.PING, 0, payload, self._ns, timeout)
        return int(pid) if echoed == payload else None

    async def time(self) -> float:
        """The server's clock (``time.time()`` in the server process)."""
        return float(await self._request(P.Kind.TIME, 0, b""))

    async def stats(self) -> dict[str, Any]:
        """The server's figures (pid, uptime, requests, slow log...): see :ref:`stats`."""
        return dict(await self._request(P.Kind.STATS, 0, b""))

    async def atomic(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(dict, *args, **kwargs)`` on the server, atomically (see
        :func:`zproc.atomic`); ``fn`` may be plain or already wrapped by it."""
        if getattr(fn, "__zproc_atomic__", False):
            fn = fn.__wrapped__  # type: ignore[attr-defined]
        return await self._atomic(fn, args, kwargs)

    async def _atomic(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        form, body = P.atomic_request(fn, args, kwargs)
        try:
            return await self._request(P.Kind.ATOMIC, form, body)  # type: ignore[no-any-return]
        except UnknownFunctionError:  # sent by digest to a server that lacks it: send it
            form, body = P.atomic_request(fn, args, kwargs, define=True)
            return await self._request(P.Kind.ATOMIC, form, body)  # type: ignore[no-any-return]

    # -- one-shot watchers ----------------------------------------------------------------

    async def go_live(self) -> None:
        """Discard the buffer: buffered watchers see only changes made after this returns."""
        # (without a stream, just move its start; not while an iterator watcher waits
        # for it, whose changes since its creation must stay in the log)
        if self._stream is None and not self._pending:
            conn = self._connection()
            head = P.head_reply(
                await conn.arequest(P.Kind.HEAD, 0, b"", self._ns, self.request_timeout)
            )
            if self._stream is None and not self._pending:
                self._start_seq_value, self._start_rid = head, None
                return
        stream, _ = await self._watching()
        stream.buffer.seq = stream.seq
        stream.buffer.snap = None
        stream._trim()

    async def get_when_change(
        self, *keys: Hashable, exclude: bool = False, live: bool = True,
        timeout: float | None = None
    ) -> Any:
        """Wait until another State changes the state (or one of ``keys``); returns as
        :meth:`State.get_when_change`."""
        deadline = _deadline(timeout, "get_when_change")
        stream, head = await self._watching(catch_up=live)
        qualifies, cursor = _change_watch(stream, head, self._me(), keys, exclude, live)
        ev = await stream.find(qualifies, cursor, deadline, fresh=live)
        return _change_result(stream, _found(ev, "get_when_change", timeout), cursor, keys,
                              exclude)

    async def _when_snapshot(
        self, test: _SnapTest, live: bool, timeout: float | None, what: str,
        result: Callable[[dict[Any, Any]], Any],
    ) -> Any:
        """Level-triggered wait: ``result`` of the first snapshot (now, or after a change
        by another State) that passes ``test``; as ``State._when_snapshot``."""
        deadline = _deadline(timeout, what)
        stream, _ = await self._watching()
        snap = dict(stream.replica)
        if not test(snap):
            qualifies, cursor = _level_watch(stream, test, live, self._me())
            ev = await stream.find(qualifies, cursor, deadline, consume=not live)
            _found(ev, what, timeout)
            snap = cursor.snap  # type: ignore[assignment]
        return result(snap)

    async def get_when(
        self, test_fn: Callable[[dict[Any, Any]], Any], *, live: bool = True,
        timeout: float | None = None
    ) -> dict[Any, Any]:
        """Wait until ``test_fn(snapshot)`` is true (checked now, then after each change
        by another State); return that snapshot."""
        snap: dict[Any, Any] = await self._when_snapshot(
            _fn_snapshot_test(test_fn), live, timeout, "get_when", _copy
        )
        return snap

    async def get_when_equal(
        self, key: Hashable, value: Any, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Wait until ``state.get(key) == value``; return the stored value."""
        return await self._when_snapshot(
            _equal_test(key, value), live, timeout, "get_when_equal", _get_copy(key)
        )

    async def get_when_not_equal(
        self, key: Hashable, value: Any, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Wait until ``state.get(key) != value``; return the stored value."""
        return await self._when_snapshot(
            _not_equal_test(key, value), live, timeout, "get_when_not_equal", _get_copy(key)
        )

    async def get_when_none(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> None:
        """Wait until ``key`` exists and is ``None``."""
        await self._when_snapshot(_none_test(key), live, timeout, "get_when_none",
                                  _get_copy(key))

    async def get_when_not_none(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Wait until ``key`` exists and is not ``None``; return its value."""
        return await self._when_snapshot(
            _not_none_test(key), live, timeout, "get_when_not_none", _get_copy(key)
        )

    async def get_when_available(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Wait until ``key`` exists; return its value."""
        return await self._when_snapshot(
            _available_test(key), live, timeout, "get_when_available", _get_copy(key)
        )

    async def get_raw_update(
        self, *, live: bool = True, timeout: float | None = None
    ) -> StateUpdate:
        """Wait until another State changes anything; return the before and after dicts."""
        deadline = _deadline(timeout, "get_raw_update")
        stream, head = await self._watching(catch_up=live)
        cursor = _Cursor(head) if live else stream.buffer
        ev = await stream.find(_foreign_test(self._me()), cursor, deadline, fresh=live)
        return _update_of(stream, _found(ev, "get_raw_update", timeout))


class AsyncStateWatcher(WatcherBase, AsyncIterator[Any]):
    """An asynchronous iterator over the changes of an AsyncState that pass a test.

    The asyncio twin of :class:`StateWatcher`: each ``await anext(watcher)`` (or each
    round of ``async for``) waits for the next qualifying change made by another State
    and returns the snapshot right after it (a :class:`StateUpdate` for
    :meth:`AsyncState.when_change_raw`). A buffered watcher (``live=False``) starts at
    the server's head when it was created and sees every later change exactly once, in
    order; a live one sees only changes after each wait began.

    .. versionadded:: 1.0
    """

    def __init__(self, state: AsyncState, test: _EvTest, *, live: bool = False,
                 timeout: float | None = None, start_time: float | None = None,
                 count: int | None = None, raw: bool = False) -> None:
        super().__init__(test, live, timeout, start_time, count, raw)
        self.state = state
        conn = state._connection()
        stream = state._stream
        # Hold the events from here on in the log until the start is known.
        self._cursor = _Cursor(stream.seq if stream is not None else 0)
        if stream is not None:
            stream.cursors.add(self._cursor)
        else:
            state._pending.append(self._cursor)
        self._stream: AsyncStream | None = None
        self._epoch = state._epoch
        self._head_rid: int | None = None
        if not live and start_time is None:
            # the start: the server's head when it answers this request
            self._head_rid = rid = conn.send(P.Kind.HEAD, 0, b"", state._ns)
            weakref.finalize(self, conn.forget, rid)

    def __aiter__(self) -> AsyncStateWatcher:
        return self

    async def _attach(self, stream: AsyncStream) -> None:
        """Fix this watcher's position on ``stream`` (on first use, or after the
        AsyncState's stream was replaced)."""
        state = self.state
        rid, self._head_rid = self._head_rid, None
        if rid is not None and self._epoch == state._epoch and self._stream is None:
            conn = state._connection()
            try:
                start, run = P.head_reply(await conn.aresult(rid, state.request_timeout))
            except (asyncio.CancelledError, TimeoutError):
                if self._head_rid is None and conn is state._conn and not conn.closed:
                    self._head_rid = rid  # keep this watcher's start for the next call
                    conn.expect(rid)
                raise
            if run != stream.run:  # another server run: check it, then start there
                start = await stream.catch_up()
            elif start > stream.seq:
                await stream.catch_up()
        else:
            start = _watch_start(stream, self._start_time if self._stream is None else None)
        cursor = self._cursor
        cursor.seq, cursor.snap = start, None
        stream.cursors.add(cursor)
        self._stream = stream

    async def __anext__(self) -> Any:
        if self._exhausted():
            raise StopAsyncIteration
        deadline = _deadline(self.timeout, "AsyncStateWatcher")
        stream, head = await self.state._watching(catch_up=self.live)
        if stream is not self._stream:  # first use, or the stream was replaced
            await self._attach(stream)
        qualifies = self._qualifies(stream, head, self.state._me())
        return self._item(await stream.find(qualifies, self._cursor, deadline,
                                            fresh=self.live))

    async def current(self) -> dict[Any, Any]:
        """A copy of the state at this watcher's position (where the next item starts)."""
        stream, _ = await self.state._watching(catch_up=False)
        if stream is not self._stream:
            await self._attach(stream)
        return self._current(stream)

    async def go_live(self) -> None:
        """Skip every change so far: the next item is a change made after this call."""
        self._head_rid = None
        stream, _ = await self.state._watching()
        if stream is not self._stream:
            await self._attach(stream)
        self._cursor.seq, self._cursor.snap = stream.seq, None

    async def consume(self) -> None:
        """Exhaust the watcher (use with ``count``)."""
        async for _ in self:
            pass
