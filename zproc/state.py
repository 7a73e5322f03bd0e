"""State: a dict-like proxy to the server's dict, with watchers and atomic calls.

Every dict method is one request/reply round trip and atomic on its own. Watchers block
until the state changes in a way the caller cares about. They read the server's event
stream (PUB/SUB), which carries a sequence number and a change set per change; the State
keeps a local replica of the dict and a log of recent events, so that

* a *live* watcher considers every event after the moment it was called,
* a *buffered* watcher (``live=False``) consumes every event since the State was created
  (or since :meth:`State.go_live`), in order,
* events missed on the way (a slow subscriber, a full queue) are fetched again from the
  server's history by sequence number, and a client that fell further behind than that
  history is resynchronised from a snapshot, the difference presented as one event.

A State never wakes its own watchers: events caused by this State instance are applied to
the replica but skipped by its watchers.

Where the parts live: the replica, the event log and the watchers' logic, without I/O, in
:mod:`zproc._stream`; the sockets (request channel and event stream) in
:mod:`zproc._client`; what State and :class:`~zproc.AsyncState` share (settings,
pickling, ``fork``, the ``when_*`` constructors, :func:`ping`) in :mod:`zproc._api`;
:class:`Pipeline` in :mod:`zproc._pipeline`. Every name of ``__all__`` stays importable
from here.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import (
    Callable, Container, Hashable, Iterable, Iterator, Mapping, MutableMapping,
)
from typing import TYPE_CHECKING, Any, TypeVar, overload

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
    _check_namespace,
    _update_argument,
    ping,
    stats,
)
from ._async import AsyncState
from .coordination import CoordinationMethods, release_all
from ._channels import Channels, ThreadChannels
from ._client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS, Stream
from ._pipeline import DEFAULT_PIPELINE_OPS, Pipeline
from ._security import SecretKey
from ._transport import PID
from ._stream import StateUpdate, _copy, _PLAIN, _Cursor, _deadline
from ._utils import in_server_process
from ._watch import (
    _available_test,
    _change_result,
    _change_watch,
    _equal_test,
    _EvTest,
    _fn_snapshot_test,
    _foreign_test,
    _found,
    _get_copy,
    _level_watch,
    _none_test,
    _not_equal_test,
    _not_none_test,
    _SnapTest,
    _update_of,
    _watch_start,
)
from .exceptions import ServerUnavailableError, UnknownFunctionError, ZProcError

__all__ = [
    "Pipeline",
    "State",
    "StateUpdate",
    "StateWatcher",
    "append",
    "atomic",
    "decrease",
    "increase",
    "ping",
    "stats",
]

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

#: How long a new State waits for the server to acknowledge its registration.
REGISTER_WAIT = 1.0
# plain ints for the hot paths (an enum member lookup costs more than the comparison)
_CALL, _GETITEM, _SETITEM = int(P.Kind.CALL), int(P.Method.GETITEM), int(P.Method.SETITEM)
_monotonic = time.monotonic

# -- State -------------------------------------------------------------------------------


class State(ThreadChannels, StateBase, WatchMethods["StateWatcher"], CoordinationMethods):
    """A dict-like proxy to the dict held by a zproc server, registered as a
    :class:`collections.abc.MutableMapping`.

    Parameters
    ----------
    server_address
        ``(req_rep_endpoint, pub_sub_endpoint)``, as returned by :func:`start_server`.
    namespace
        Which of the server's dicts this State works on.
    request_timeout
        Limit in seconds for each request/reply round trip (``None``: no limit while the
        server is alive). Expiry raises :class:`zproc.TimeoutError`.
    connect_timeout
        How long a request waits for a server that never answered at this address before
        raising :class:`zproc.ServerUnavailableError`.
    liveness
        How long a request or watcher waits after the connection to the server was lost
        (the server died, or its host went silent for that long) before raising
        :class:`zproc.ServerUnavailableError`. A server restarted at the same address
        within that time is reconnected to without an error.

        .. versionadded:: 1.0
    secret_key
        The server's ``secret_key`` (passphrase, certificate directory or certificate
        pair): requests and events then run CURVE. A key the server does not admit (or a
        missing one) raises :class:`zproc.AuthenticationError`. A pickled State carries
        it (a passphrase as itself, certificates as their paths) wherever the pickle goes.

        .. versionadded:: 1.0
    cache
        Serve reads (``[]``, ``get``, ``in``, ``len``, iteration, ``copy``, ``==``) from a
        local replica kept current by the event stream, without a round trip; writes
        still go to the server. Reads see this State's own acknowledged writes and never
        go back in time, but may lag other States' latest writes by about a millisecond
        plus the event's delivery time. See :ref:`performance`.

        .. versionadded:: 1.0

    Notes
    -----
    Each dict method is one atomic round trip; two calls are not atomic together
    (``state["n"] += 1`` races: use :func:`atomic`). Values read are copies.
    A State pickles as its address and settings; unpickled (or used after ``fork``) it
    connects anew with a new identity.

    Any number of threads may use one State at once: each thread gets a connection and
    an event stream of its own on first use (see :ref:`threads`).
    """

    #: Seconds ``_register`` waits for the server's head (see there).
    _register_wait = REGISTER_WAIT
    #: Connect in the constructor (False: on first use).
    _connect_eagerly = True

    def __init__(
        self,
        server_address: Iterable[str],
        *,
        namespace: str = "default",
        request_timeout: float | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        rcvhwm: int = DEFAULT_RCVHWM,
        secret_key: SecretKey | None = None,
        liveness: float = DEFAULT_LIVENESS,
        cache: bool = False,
    ) -> None:
        super().__init__(server_address, namespace, request_timeout, connect_timeout,
                         max_backlog, rcvhwm, secret_key, liveness, cache)
        self._channels = channels = Channels()
        self._local = channels.local  # (the hot paths read it directly)
        self._heads = channels.heads
        self._start_seq_value: int | None = None
        self._start_run = b""  # the server run that numbered _start_seq_value
        self._registered_pid = 0  # the process whose registration _start_seq_value is
        if self._connect_eagerly and not in_server_process():
            self._connect()  # in the server process, using a State raises (see _connect)

    # -- plumbing ---------------------------------------------------------------------
    # Each thread works through a Channel of its own (zproc._channels): its connection,
    # its event stream and their bookkeeping. What the threads share (the buffer's start,
    # the identities, the highest head) is kept on the State.

    @property
    def namespace(self) -> str:
        """The namespace this State works on. Setting it resets the buffer (as go_live)."""
        return self._namespace

    @namespace.setter
    def namespace(self, value: str) -> None:
        _check_namespace(value)
        if value == self._namespace:
            return
        self._namespace, self._ns = value, value.encode()
        self._reset_stream()
        for other in self._channels.each():
            other.cache_due = 0.0  # the other threads' streams are replaced on next use
        self._connection().head = 0  # heads of the old namespace mean nothing here
        self._register(self._channel())

    def _request(self, kind: int, method: int, body: bytes) -> Any:
        conn = self._connection()
        return conn.request(kind, method, body, self._ns, self.request_timeout)

    def _call(self, method: int, *args: Any) -> Any:
        try:
            conn = self._local.conn
        except AttributeError:  # this thread's first use
            conn = self._connection()
        conn.busy += 1  # a close() in another thread now leaves the sockets to this call
        try:
            if conn.closed or conn.pid != PID[0]:
                return self._request(_CALL, method, P.encode_buffered(args))
            return conn._result(
                conn._send(_CALL, method, P.encode_buffered(args), self._ns),
                self.request_timeout,
            )
        finally:
            conn._leave()  # closes the sockets if close() was called during the call

    def _replica(self) -> dict[Any, Any]:
        """The local replica, current enough for a cached read (``cache=True``).

        No round trip and no socket call unless the replica lacks a change this State was
        told of (read-your-writes, in any of its threads) or the event queue was last
        looked at ``CACHE_POLL`` seconds ago.
        """
        try:
            channel = self._local.channel
            stream = channel.stream
        except AttributeError:  # this thread's first use
            stream = None
        if (
            stream is None
            or stream.seq < self._heads[0]
            or time.monotonic() >= channel.cache_due
        ):
            stream = self._refresh_replica()
        return stream.replica  # type: ignore[no-any-return]

    def _refresh_replica(self) -> Stream:
        """Apply the queued events, then wait for those of every head a reply reported."""
        try:
            stream = self._watching(catch_up=False)
            channel = self._channel()
            now = time.monotonic()
            check = now >= channel.cache_check_due  # HEAD: replays what a full queue dropped
            stream.refresh(self._heads[0], check, CACHE_WAIT)
            if check:
                channel.cache_check_due = now + CACHE_CHECK
        except ServerUnavailableError:
            if self._stream is None:
                self._heads[0] = 0  # a replaced server: start again from its state
            raise
        channel.cache_due = time.monotonic() + CACHE_POLL
        return stream

    def _watching(self, catch_up: bool = True) -> Stream:
        """The calling thread's event stream, started on first use (and caught up with
        the server's head)."""
        registers = self._registered_pid != os.getpid()  # this call starts the buffer
        channel = self._channel()
        stream = channel.stream
        if stream is not None and stream.namespace != self._ns:
            channel.close_stream()  # another thread changed the namespace
            stream = None
        if stream is None:
            start = self._start_seq()
            stream = Stream(self, channel.conn, start, self._start_run)
            try:
                stream.start(start)
            except BaseException:
                stream.close()
                raise
            channel.set_stream(stream)
            if registers and stream.run == self._start_run:
                stream.head = min(stream.head, start)  # this call began at its registration
        elif catch_up:
            stream.catch_up()
        return stream  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close this State's sockets (those of every thread that used it). Idempotent;
        later use raises :class:`ZProcError`. A call another thread is inside ends with
        :class:`ZProcError` and closes its thread's sockets as it returns (see
        :ref:`threads`)."""
        if self._closed:
            return
        self._closed = True
        mine = self._channels.current()  # (another thread's sockets are not this one's)
        channels = self._channels.take_all()
        release_all(self, None if mine is None else mine.conn)
        for channel in channels:
            channel.close()

    def _watcher(self, test: _EvTest, **options: Any) -> StateWatcher:
        return StateWatcher(self, test, **options)

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if self._left_open("State", "call close() or use 'with State(...)'"):
            try:
                self.close()
            except Exception:
                pass

    # -- dict interface -------------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        if self._cache:
            # the hit, inlined: this thread's replica is current (no socket, no lock)
            try:
                channel = self._local.channel
                stream = channel.stream
                if stream.seq >= self._heads[0] and _monotonic() < channel.cache_due:
                    value = stream.replica[key]
                    return value if type(value) in _PLAIN else _copy(value)
            except AttributeError:  # this thread's first read, or its stream is not open
                pass
            return _copy(self._replica()[key])
        return self._call(_GETITEM, key)

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._call(_SETITEM, key, value)

    def __delitem__(self, key: Hashable) -> None:
        self._call(P.Method.DELITEM, key)

    def __contains__(self, key: object) -> bool:
        if self._cache:
            return key in self._replica()
        return bool(self._call(P.Method.CONTAINS, key))

    def __len__(self) -> int:
        if self._cache:
            return len(self._replica())
        return int(self._call(P.Method.LEN))

    def __iter__(self) -> Iterator[Any]:
        if self._cache:
            return iter(list(self._replica()))
        return iter(self._call(P.Method.KEYS))

    def __eq__(self, other: object) -> bool:
        """Equal to any mapping with the same items (one round trip; none with
        ``cache=True``)."""
        return self._compare(other, P.Method.EQ, dict.__eq__)  # type: ignore[no-any-return]

    def __ne__(self, other: object) -> bool:
        return self._compare(other, P.Method.NE, dict.__ne__)  # type: ignore[no-any-return]

    def _compare(self, other: object, method: int, op: Callable[[Any, Any], Any]) -> Any:
        if isinstance(other, State):
            return op(self.copy(), other.copy())
        if not isinstance(other, Mapping):
            return NotImplemented
        if not isinstance(other, dict):
            other = dict(other)
        result = op(self._replica(), other) if self._cache else self._call(method, other)
        return result if result is NotImplemented else bool(result)

    def __or__(self, other: Any) -> dict[Any, Any]:
        """``state | mapping``: a plain dict of one snapshot of the state, updated with
        ``mapping`` (the state is unchanged)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        merged = self.copy()
        merged.update(other.copy() if isinstance(other, State) else other)
        return merged

    def __ror__(self, other: Any) -> dict[Any, Any]:
        """``mapping | state``: a plain dict of ``mapping`` updated with one snapshot."""
        if not isinstance(other, Mapping):
            return NotImplemented
        merged = dict(other)
        merged.update(self.copy())
        return merged

    def __ior__(self, other: Any) -> State:
        """``state |= other``: :meth:`update` (one atomic round trip, one event)."""
        self.update(other)
        return self

    __hash__ = object.__hash__

    def clear(self) -> None:
        self._call(P.Method.CLEAR)

    def get(self, key: Hashable, default: Any = None) -> Any:
        if self._cache:
            return _copy(self._replica().get(key, default))
        return self._call(P.Method.GET, key, default)

    def pop(self, key: Hashable, *default: Any) -> Any:
        return self._call(P.Method.POP, key, *default)

    def popitem(self) -> tuple[Any, Any]:
        return tuple(self._call(P.Method.POPITEM))

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        return self._call(P.Method.SETDEFAULT, key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update``; a failure part-way leaves the state unchanged."""
        self._call(P.Method.UPDATE, _update_argument(args, kwargs))

    def fromkeys(self, iterable: Iterable[Any], value: Any = None) -> dict[Any, Any]:
        """``dict.fromkeys(iterable, value)``, computed by the server; the state is untouched."""
        return self._call(P.Method.FROMKEYS, list(iterable), value)  # type: ignore[no-any-return]

    def copy(self) -> dict[Any, Any]:
        """A deep copy of the whole state, as a plain dict (one round trip)."""
        if self._cache:
            return S.loads(S.dumps(self._replica()))  # type: ignore[no-any-return]
        return self._call(P.Method.COPY)  # type: ignore[no-any-return]

    def keys(self) -> Any:
        """``dict_keys`` of one snapshot of the state, taken in one round trip (later
        changes do not show in it)."""
        return self.copy().keys()

    def values(self) -> Any:
        """``dict_values`` of one snapshot, taken in one round trip."""
        return self.copy().values()

    def items(self) -> Any:
        """``dict_items`` of one snapshot, taken in one round trip."""
        return self.copy().items()

    def set(self, value: Mapping[Any, Any]) -> None:
        """Replace the whole dict with ``value``, atomically (one event)."""
        self._call(P.Method.SET, dict(value))

    def pipeline(self, max_ops: int = DEFAULT_PIPELINE_OPS) -> Pipeline:
        """Buffer writes and send them in batches, without a round trip per write.

        ``with state.pipeline() as p: p[k] = v; ...`` sends the buffered writes when the
        block ends (and every ``max_ops`` writes on the way) and raises the first error
        there. See :class:`Pipeline`.

        .. versionadded:: 1.0
        """
        return Pipeline(self, max_ops)

    def __repr__(self) -> str:
        try:
            return f"<State value: {self.copy()!r}>"
        except Exception:
            return f"<State server_address={tuple(self._address)!r} (unreachable)>"

    # -- server helpers -------------------------------------------------------------------

    def ping(self, **kwargs: Any) -> int | None:
        """Ping this State's server: see :func:`zproc.ping`."""
        if self._closed:
            raise ZProcError("this State is closed; create a new one")
        kwargs.setdefault("secret_key", self._secret_key)
        return ping(self._address, **kwargs)

    def time(self) -> float:
        """The server's clock (``time.time()`` in the server process)."""
        return float(self._request(P.Kind.TIME, 0, b""))

    def stats(self) -> dict[str, Any]:
        """The server's figures (pid, uptime, requests, slow log...): see :ref:`stats`."""
        return dict(self._request(P.Kind.STATS, 0, b""))

    def _atomic(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        form, body = P.atomic_request(fn, args, kwargs)
        try:
            return self._request(P.Kind.ATOMIC, form, body)  # type: ignore[no-any-return]
        except UnknownFunctionError:  # sent by digest to a server that lacks it: send it
            form, body = P.atomic_request(fn, args, kwargs, define=True)
            return self._request(P.Kind.ATOMIC, form, body)  # type: ignore[no-any-return]

    # -- watchers -------------------------------------------------------------------------

    def go_live(self) -> None:
        """Discard the buffer: buffered watchers see only changes made after this returns."""
        if self._stream is None:
            self._connection()
            self._start_seq_value, self._start_run = P.head_reply(
                self._request(P.Kind.HEAD, 0, b"")
            )
            self._channel().start_rid = None
            return
        stream = self._watching()
        stream.buffer.seq = stream.seq
        stream.buffer.snap = None
        stream._trim()

    def _me(self) -> Container[bytes]:
        return self._channels.ids

    def get_when_change(self, *keys: Hashable, exclude: bool = False, live: bool = True,
                        timeout: float | None = None) -> Any:
        """Block until another State changes the state (or one of ``keys``).

        Returns
        -------
        The whole snapshot after the change (no keys, or ``exclude=True``); the new value
        of the key (one key, ``None`` if it was deleted); or a list of the values of the
        keys, in argument order (several keys).
        """
        deadline = _deadline(timeout, "get_when_change")
        stream = self._watching(catch_up=live)
        qualifies, cursor = _change_watch(stream, stream.head, self._me(), keys, exclude, live)
        ev = _found(stream.find(qualifies, cursor, deadline, fresh=live), "get_when_change",
                    timeout)
        return _change_result(stream, ev, cursor, keys, exclude)

    def _when_snapshot(self, test: _SnapTest, live: bool, timeout: float | None, what: str,
                       result: Callable[[dict[Any, Any]], Any]) -> Any:
        """Level-triggered wait: ``result`` of the first snapshot (now, or after a change
        by another State) that passes ``test``."""
        deadline = _deadline(timeout, what)
        stream = self._watching()
        snap = dict(stream.replica)
        if not test(snap):
            qualifies, cursor = _level_watch(stream, test, live, self._me())
            _found(stream.find(qualifies, cursor, deadline, consume=not live), what, timeout)
            snap = cursor.snap  # type: ignore[assignment]
        return result(snap)

    def get_when(self, test_fn: Callable[[dict[Any, Any]], Any], *, live: bool = True,
                 timeout: float | None = None) -> dict[Any, Any]:
        """Block until ``test_fn(snapshot)`` is true; return that snapshot.

        Checks the current state first (returns at once if the condition holds), then
        every change made by other States after it.
        """
        snap: dict[Any, Any] = self._when_snapshot(_fn_snapshot_test(test_fn), live, timeout,
                                                   "get_when", _copy)
        return snap

    def get_when_equal(self, key: Hashable, value: Any, *, live: bool = True,
                       timeout: float | None = None) -> Any:
        """Block until ``state.get(key) == value``; return the stored value."""
        return self._when_snapshot(_equal_test(key, value), live, timeout, "get_when_equal",
                                   _get_copy(key))

    def get_when_not_equal(self, key: Hashable, value: Any, *, live: bool = True,
                           timeout: float | None = None) -> Any:
        """Block until ``state.get(key) != value``; return the stored value."""
        return self._when_snapshot(_not_equal_test(key, value), live, timeout,
                                   "get_when_not_equal", _get_copy(key))

    def get_when_none(self, key: Hashable, *, live: bool = True,
                      timeout: float | None = None) -> None:
        """Block until ``key`` exists and is ``None``."""
        self._when_snapshot(_none_test(key), live, timeout, "get_when_none", _get_copy(key))

    def get_when_not_none(self, key: Hashable, *, live: bool = True,
                          timeout: float | None = None) -> Any:
        """Block until ``key`` exists and is not ``None``; return its value."""
        return self._when_snapshot(_not_none_test(key), live, timeout, "get_when_not_none",
                                   _get_copy(key))

    def get_when_available(self, key: Hashable, *, live: bool = True,
                           timeout: float | None = None) -> Any:
        """Block until ``key`` exists; return its value."""
        return self._when_snapshot(_available_test(key), live, timeout,
                                   "get_when_available", _get_copy(key))

    def get_raw_update(self, *, live: bool = True, timeout: float | None = None
                       ) -> StateUpdate:
        """Block until another State changes anything; return the before and after dicts."""
        deadline = _deadline(timeout, "get_raw_update")
        stream = self._watching(catch_up=live)
        cursor = _Cursor(stream.head) if live else stream.buffer
        ev = stream.find(_foreign_test(self._me()), cursor, deadline, fresh=live)
        return _update_of(stream, _found(ev, "get_raw_update", timeout))


MutableMapping.register(State)  # (registered: its own methods stay as they are)


class StateWatcher(WatcherBase, Iterator[Any]):
    """An iterator over the changes of a State that pass a test.

    Each ``next()`` blocks until the next qualifying change made by another State and
    returns the snapshot right after it (or a :class:`StateUpdate` for raw watchers). The
    watcher keeps its own position in the event stream: buffered watchers (``live=False``)
    see every change after their creation, in order; live ones only changes after each
    ``next()`` began.
    """

    def __init__(self, state: State, test: _EvTest, *, live: bool = False,
                 timeout: float | None = None, start_time: float | None = None,
                 count: int | None = None, raw: bool = False) -> None:
        super().__init__(test, live, timeout, start_time, count, raw)
        self.state = state
        stream = state._watching()
        self._stream = stream
        self._cursor = _Cursor(_watch_start(stream, start_time))
        stream.cursors.add(self._cursor)

    def __iter__(self) -> StateWatcher:
        return self

    def __next__(self) -> Any:
        if self._exhausted():
            raise StopIteration
        deadline = _deadline(self.timeout, "StateWatcher")
        stream = self.state._watching(catch_up=self.live)
        if stream is not self._stream:  # another thread, or a new stream (fork, namespace)
            self._move_to(self._stream, stream)
            self._stream = stream
        qualifies = self._qualifies(stream, stream.head, self.state._me())
        return self._item(stream.find(qualifies, self._cursor, deadline, fresh=self.live))

    def current(self) -> dict[str, Any]:
        """A copy of the state at this watcher's position (where the next item starts)."""
        return self._current(self._stream)

    def go_live(self) -> None:
        """Skip every change so far: the next item is a change made after this call."""
        stream = self.state._watching()
        self._cursor.seq, self._cursor.snap = stream.seq, None

    def consume(self) -> None:
        """Exhaust the watcher (use with ``count``)."""
        for _ in self:
            pass


class ChildState(State):
    """The State a zproc process hands its target: it connects on first use.

    Its buffer (for watchers with ``live=False``) starts at that first use, and the
    registration does not wait for the server's answer: the request goes out first, so
    every change the target causes, or learns of through the server, comes after it. A
    child cannot be sure to see changes made between its start and its first use of
    the State in any case (it starts asynchronously); a child that never uses its State
    pays for no sockets at all.
    """

    _register_wait = 0.0
    _connect_eagerly = False

    def _public_class(self) -> type[State]:
        return State  # a copy connects at once, as any State


# -- atomic -------------------------------------------------------------------------------


def atomic(fn: Callable[..., T]) -> Callable[..., T]:
    """Make ``fn(dict, *args, **kwargs)`` run on the server, atomically.

    The wrapper is called as ``wrapper(state, *args, **kwargs)``: the server calls ``fn``
    on the live dict of ``state``'s namespace while serving no one else, and the wrapper
    returns ``fn``'s return value. If ``fn`` raises (or its result cannot be pickled) the
    state is restored exactly, no event is published and the same exception is raised
    here with the server's traceback as ``__cause__``. ``fn`` travels with cloudpickle, so
    defaults, closures and globals work as in a local call.

    A function importable by name travels by name. Any other function (defined in
    ``__main__``, a closure, a lambda) is pickled once per process and the server keeps it
    by the digest of that pickle; later calls send the digest and the arguments only. The
    pickle is made again when the function's code, defaults, closure contents or the
    globals it names are rebound, but not when an object they hold is changed in place:
    pass such an object as an argument.

    Called with a :class:`zproc.AsyncState`, the wrapper returns an awaitable instead:
    ``await wrapper(async_state, *args, **kwargs)``.
    """
    if not callable(fn):
        raise TypeError(f"atomic() needs a callable, got {fn!r}")

    @functools.wraps(fn)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> T:
        if not isinstance(state, (State, AsyncState)):
            raise TypeError(
                f"the first argument of an atomic function must be a zproc.State (or a "
                f"zproc.AsyncState), got {type(state).__name__}"
            )
        return state._atomic(fn, args, kwargs)

    wrapper.__zproc_atomic__ = True  # type: ignore[attr-defined]
    return wrapper


def _increase(d: dict[Any, Any], key: Any, step: Any) -> Any:
    d[key] = value = d[key] + step
    return value


def _decrease(d: dict[Any, Any], key: Any, step: Any) -> Any:
    d[key] = value = d[key] - step
    return value


def _append(d: dict[Any, Any], key: Any, item: Any) -> int:
    d[key].append(item)
    return len(d[key])


_atomic_increase = atomic(_increase)
_atomic_decrease = atomic(_decrease)
_atomic_append = atomic(_append)


def increase(state: State | AsyncState, key: Hashable, step: Any = 1) -> Any:
    """``state[key] += step``, atomically; return the new value (``KeyError`` if missing).

    With an :class:`~zproc.AsyncState`, returns an awaitable of the new value.
    """
    return _atomic_increase(state, key, step)


def decrease(state: State | AsyncState, key: Hashable, step: Any = 1) -> Any:
    """``state[key] -= step``, atomically; return the new value (``KeyError`` if missing).

    With an :class:`~zproc.AsyncState`, returns an awaitable of the new value.
    """
    return _atomic_decrease(state, key, step)


@overload
def append(state: State, key: Hashable, item: Any) -> int: ...
@overload
def append(state: AsyncState, key: Hashable, item: Any) -> Awaitable[int]: ...
def append(state: State | AsyncState, key: Hashable, item: Any) -> int | Awaitable[int]:
    """``state[key].append(item)``, atomically; return the new length.

    With an :class:`~zproc.AsyncState`, returns an awaitable of the new length.
    """
    return _atomic_append(state, key, item)
