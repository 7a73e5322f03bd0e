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
"""

from __future__ import annotations

import bisect
import functools
import os
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

import zmq

from . import _protocol as P
from . import _serialization as S
from . import _server
from ._client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_LIVENESS, Connection
from ._security import ClientKeys, SecretKey, client_keys, configure_client
from ._transport import ServerAddress, get_context, normalize_address
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError, ZProcError

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
]

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ._async import AsyncState

T = TypeVar("T")
_Sock = TypeVar("_Sock", bound="zmq.Socket[Any]")
_MISSING: Any = _server._MISSING
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset)

#: While blocked, a watcher asks the server for its head this often (seconds), to notice
#: events dropped by a full queue and a server that died.
IDLE_CHECK = 1.0
#: Events kept in a State's local log before the oldest are coalesced.
DEFAULT_MAX_BACKLOG = 100_000
DEFAULT_RCVHWM = 10_000
#: How long a new State waits for the server to acknowledge its registration.
REGISTER_WAIT = 1.0
#: With ``cache=True``: a read applies the events queued for the replica at most this
#: often (seconds) ...
CACHE_POLL = 0.001
#: ... and confirms with the server (one round trip) at least this often that no event
#: was lost on the way.
CACHE_CHECK = 1.0
#: How long a cached read waits for the events of writes it must see before it fetches
#: them from the server instead.
CACHE_WAIT = 0.05
#: Operations a pipeline buffers before it sends them.
DEFAULT_PIPELINE_OPS = 1000
# plain ints for the hot paths (an enum member lookup costs more than the comparison)
_CALL, _GETITEM, _SETITEM = int(P.Kind.CALL), int(P.Method.GETITEM), int(P.Method.SETITEM)


def _copy(value: Any) -> Any:
    """A deep copy, cheap for immutable values."""
    if isinstance(value, _IMMUTABLE):
        return value
    return S.loads(S.dumps(value))


def _deadline(timeout: float | None, what: str) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"{what}: timeout must be >= 0 or None, got {timeout!r}")
    return time.monotonic() + timeout


def _timeout_error(what: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(
        f"{what} saw no qualifying change within {timeout} s; pass a larger timeout "
        f"(or None to wait indefinitely)"
    )


class StateUpdate(NamedTuple):
    """One change of the state: the dict before and after it, and when it happened."""

    before: dict[Any, Any]
    after: dict[Any, Any]
    timestamp: float
    is_identical: bool


# -- the local event log -----------------------------------------------------------------


class _Ev:
    """A change as the client keeps it: the server's change set plus the undo record."""

    __slots__ = ("seq", "first", "origin", "timestamp", "changes", "deleted", "undo")

    def __init__(
        self,
        seq: int,
        first: int,
        origin: bytes,
        timestamp: float,
        changes: dict[Any, Any],
        deleted: tuple[Any, ...],
        undo: dict[Any, Any],
    ) -> None:
        self.seq = seq
        self.first = first  # first sequence number this event covers (coalesced events)
        self.origin = origin
        self.timestamp = timestamp
        self.changes = changes
        self.deleted = deleted
        self.undo = undo

    def touches(self, key: Any) -> bool:
        return key in self.undo

    def keys(self) -> Iterable[Any]:
        return self.undo.keys()


class _Cursor:
    """A position in the event stream (events with ``seq <= cursor.seq`` are behind it).

    ``snap`` optionally holds a shallow copy of the state at that position, advanced event
    by event, for predicates that look at values.
    """

    __slots__ = ("seq", "snap", "__weakref__")

    def __init__(self, seq: int, snap: dict[Any, Any] | None = None) -> None:
        self.seq = seq
        self.snap = snap

    def advance(self, ev: _Ev) -> None:
        self.seq = ev.seq
        snap = self.snap
        if snap is not None:
            for key in ev.deleted:
                snap.pop(key, None)
            snap.update(ev.changes)


class _StreamCore:
    """The event-stream logic without I/O: replica, event log, cursors.

    It turns event messages and FETCH replies into log entries and answers questions
    about the log; it never touches a socket. :class:`_Stream` (for :class:`State`) and
    the asyncio flavour in :mod:`zproc._async` add the sockets and decide when to
    receive, fetch and wait.
    """

    def __init__(
        self, namespace: bytes, start_seq: int, max_backlog: int, start_run: bytes
    ) -> None:
        self.namespace = namespace
        self.replica: dict[Any, Any] = {}
        self.seq = start_seq
        #: The server run whose numbering ``seq`` follows (see "runs" in ``_protocol``),
        #: and the runs this stream has seen it continue (their late events are stale).
        self.run = start_run
        self.past_runs: set[bytes] = set()
        #: The server's head when the current watcher call began (its last catch_up()).
        self.head = start_seq
        self.log: list[_Ev] = []
        self.buffer = _Cursor(start_seq)
        self.cursors: weakref.WeakSet[_Cursor] = weakref.WeakSet()
        self.max_backlog = max_backlog
        self.topic = P.event_topic(namespace)

    def _load(self, start_seq: int, reply: P.FetchReply) -> bool:
        """Start from a FETCH reply: the state at its head and the events after
        ``start_seq`` (or, when those are gone, the whole snapshot as one change).

        False if the server's history does not continue the one ``start_seq`` was
        taken from (nothing is loaded then).
        """
        if not reply.continued or reply.head < start_seq:
            return False
        head, snapshot, events = reply.head, reply.snapshot or {}, reply.events
        self.replica = snapshot
        self._new_run(reply.run)
        self.seq = self.head = head
        if events is None:
            if snapshot:
                undo = dict.fromkeys(snapshot, _MISSING)
                self.log.append(
                    _Ev(head, start_seq + 1, b"", time.time(), dict(snapshot), (), undo)
                )
        else:
            for ev in events:
                undo = {key: (ev.old or {}).get(key, _MISSING) for key in ev.changes}
                for key in ev.deleted:
                    undo[key] = (ev.old or {})[key]
                self.log.append(
                    _Ev(ev.seq, ev.seq, ev.origin, ev.timestamp, ev.changes, ev.deleted, undo)
                )
        return True

    def _new_run(self, run: bytes) -> None:
        """Follow the numbering of server run ``run`` (checked to continue this history)."""
        if run != self.run:
            self.past_runs.add(self.run)
            self.run = run

    def _apply(self, seq: int, origin: bytes, timestamp: float, changes: dict[Any, Any],
               deleted: tuple[Any, ...]) -> None:
        replica = self.replica
        undo: dict[Any, Any] = {}
        for key in deleted:
            undo[key] = replica.pop(key, _MISSING)
        for key, value in changes.items():
            undo[key] = replica.get(key, _MISSING)
            replica[key] = value
        self.log.append(_Ev(seq, seq, origin, timestamp, changes, deleted, undo))
        self.seq = seq

    def _receive(self, frames: list[bytes]) -> bool:
        """Apply one message from the SUB socket; True if it shows a gap to replay, or a
        server run that must first be checked to continue this history (by a FETCH)."""
        if frames[0] != self.topic or len(frames) < 3:
            return False
        first, last, run = P.parse_events_header(frames[1])
        if run != self.run:
            return run not in self.past_runs
        if last <= self.seq:
            return False
        if first > self.seq + 1:
            return True
        for frame in frames[2:]:
            seq, origin, timestamp, changes, deleted, _old = P.decode_event(frame)
            if seq == self.seq + 1:
                self._apply(seq, origin, timestamp, changes, deleted)
        self._bound_backlog()
        return False

    def _replayed(self, sent_at: int, reply: P.FetchReply) -> bool:
        """Apply a FETCH reply for the events after ``sent_at`` (resync if they are gone).

        False if the server's history lacks changes this stream saw (nothing applied).
        """
        if not reply.continued or reply.head < sent_at:
            return False
        self._new_run(reply.run)
        head, events = reply.head, reply.events
        if events is None:
            if head > self.seq:
                self._resync(head, reply.snapshot or {})
            return True
        for ev in events:
            if ev.seq == self.seq + 1:
                self._apply(ev.seq, ev.origin, ev.timestamp, ev.changes, ev.deleted)
        self._bound_backlog()
        return True

    def _checks_head(self, head: int, run: bytes) -> int:
        """What a HEAD reply ``(head, run)`` asks of the stream: 0 nothing, 1 a replay
        (events to fetch, or a new server run to check), -1 the history was lost."""
        if run != self.run:
            return 1
        if head < self.seq:
            return -1
        return 1 if head > self.seq else 0

    def _resync(self, head: int, snapshot: dict[Any, Any]) -> None:
        """Fell behind the server's history: present the difference as one event."""
        replica = self.replica
        changes = {
            key: value
            for key, value in snapshot.items()
            if key not in replica or _server.changed(replica[key], value)
        }
        deleted = tuple(key for key in replica if key not in snapshot)
        undo = {key: replica.get(key, _MISSING) for key in changes}
        for key in deleted:
            undo[key] = replica[key]
        first = self.seq + 1
        self.replica = snapshot
        self.seq = head
        if changes or deleted:
            self.log.append(_Ev(head, first, b"", time.time(), changes, deleted, undo))

    # -- reading the log ----------------------------------------------------------------

    def after(self, seq: int) -> Iterator[_Ev]:
        """Events in the log with a sequence number above ``seq``, oldest first."""
        log = self.log
        index = bisect.bisect_right(log, seq, key=lambda ev: ev.seq)
        while index < len(log):
            yield log[index]
            index += 1

    def snapshot_at(self, seq: int) -> dict[Any, Any]:
        """A shallow copy of the state as it was right after event ``seq``."""
        snap = dict(self.replica)
        for ev in reversed(self.log):
            if ev.seq <= seq:
                break
            for key, before in ev.undo.items():
                if before is _MISSING:
                    snap.pop(key, None)
                else:
                    snap[key] = before
        return snap

    def value_at(self, seq: int, key: Any) -> Any:
        """The value of ``key`` right after event ``seq`` (None if absent)."""
        for ev in self.after(seq):
            if key in ev.undo:
                before = ev.undo[key]
                return None if before is _MISSING else before
        return self.replica.get(key)

    def scan(
        self, qualifies: Callable[[_Ev, _Cursor], bool], cursor: _Cursor, consume: bool
    ) -> _Ev | None:
        """Advance ``cursor`` over the logged events up to the first one that qualifies.

        ``consume`` moves the buffer cursor along. Returns None at the end of the log.
        """
        for ev in self.after(cursor.seq):
            cursor.advance(ev)
            if consume:
                self.buffer.seq = ev.seq
                self.buffer.snap = None
            if qualifies(ev, cursor):
                return ev
        return None

    # -- memory bounds -------------------------------------------------------------------

    def _trim(self) -> None:
        low = min([self.buffer.seq, *(c.seq for c in self.cursors)])
        log = self.log
        if log and log[0].seq <= low:
            index = bisect.bisect_right(log, low, key=lambda ev: ev.seq)
            del log[:index]

    def _bound_backlog(self) -> None:
        if len(self.log) <= self.max_backlog:
            return
        self._trim()
        if len(self.log) > self.max_backlog:
            self._coalesce(len(self.log) - self.max_backlog // 2)

    def _coalesce(self, count: int) -> None:
        """Merge the ``count`` oldest events into one (cursors inside move to its start)."""
        events = self.log[:count]
        changes: dict[Any, Any] = {}
        deleted: dict[Any, None] = {}
        undo: dict[Any, Any] = {}
        for ev in events:
            for key, before in ev.undo.items():
                undo.setdefault(key, before)
            for key in ev.deleted:
                changes.pop(key, None)
                deleted[key] = None
            for key, value in ev.changes.items():
                deleted.pop(key, None)
                changes[key] = value
        for key in [k for k in deleted if undo.get(k) is _MISSING]:
            del deleted[key]
            del undo[key]
        origins = {ev.origin for ev in events}
        origin = origins.pop() if len(origins) == 1 else b""
        merged = _Ev(events[-1].seq, events[0].first, origin, events[-1].timestamp, changes,
                     tuple(deleted), undo)
        self.log[:count] = [merged]
        start = events[0].first - 1
        for cursor in [self.buffer, *self.cursors]:
            if start < cursor.seq < merged.seq:
                cursor.seq = start
                cursor.snap = None


def _open_subscriber(
    sub: _Sock, address: ServerAddress, topic: bytes, marker: bytes, rcvhwm: int,
    keys: ClientKeys | None,
) -> _Sock:
    """Set up and connect a new SUB socket for a stream's events and its sync markers."""
    sub.linger = 0
    sub.rcvhwm = rcvhwm
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.SUBSCRIBE, marker)
    configure_client(sub, keys)
    sub.connect(address.pub_sub)
    return sub


def _no_events_error(address: ServerAddress, secure: bool) -> TimeoutError:
    """The error when requests are answered but the sync marker never arrives."""
    return TimeoutError(
        f"could not subscribe to the events at {address.pub_sub}: "
        f"the server answers requests but its events never arrive. Check that "
        f"both endpoints of the address belong to the same server"
        + (" and that it runs with this secret_key" if secure else "")
    )


def _lost_error(address: ServerAddress, head: int, seen: int) -> ServerUnavailableError:
    """The error when the server's history no longer holds what a stream already saw."""
    return ServerUnavailableError(
        f"the zproc server at {address.req_rep} was replaced by one whose history lacks "
        f"changes this State saw (this State saw change {seen} of the history before; "
        f"the server's head is now {head}): it restarted without persist=, or lost its "
        f"last writes in a crash (fsync='every second'). The next watcher call starts "
        f"from the current state"
    )


class _Stream(_StreamCore):
    """The event side of a State: the SUB socket and the round trips, over
    :class:`_StreamCore`."""

    def __init__(self, state: State, start_seq: int, start_run: bytes) -> None:
        super().__init__(state._ns, start_seq, state._max_backlog, start_run)
        self.state = state
        self.conn = state._conn
        assert self.conn is not None
        self.marker = P.sync_topic(self.conn.identity)
        self.sub = _open_subscriber(
            get_context().socket(zmq.SUB), state.server_address, self.topic, self.marker,
            state._rcvhwm, state._keys,
        )
        self._sync_and_load(start_seq)

    def close(self) -> None:
        if not self.sub.closed:
            self.sub.close(0)

    # -- start-up: subscribe, then load what came before --------------------------------

    def _sync_and_load(self, start_seq: int) -> None:
        """Make sure the subscription is live, then load the snapshot and the backlog.

        The head this call starts from (what a live watcher waits after) is asked for
        first, in the same send: changes made while the subscription starts count.
        """
        conn = self.conn
        assert conn is not None
        head_rid = conn.send(P.Kind.HEAD, 0, b"", self.state._ns)
        token = os.urandom(8)
        stash: list[list[bytes]] = []
        wait = 0.002
        connect_deadline = time.monotonic() + (self.state._connect_timeout or 3600.0)
        synced = False
        while not synced:
            self.state._request(P.Kind.SYNC, 0, token)
            end = time.monotonic() + wait
            while not synced:
                remaining = end - time.monotonic()
                if remaining <= 0 or not self.sub.poll(remaining * 1000):
                    break
                frames = self.sub.recv_multipart()
                if frames[0] == self.marker:
                    synced = frames[1] == token
                else:
                    stash.append(frames)
            wait = min(wait * 2, 0.1)
            if time.monotonic() > connect_deadline:
                raise _no_events_error(self.state.server_address, self.state._keys is not None)
        reply = P.fetch_reply(
            self.state._request(P.Kind.FETCH, 0, P.fetch_request(start_seq, True, self.run))
        )
        call_head, call_run = P.head_reply(conn.result(head_rid, self.state.request_timeout))
        if not self._load(start_seq, reply):
            self._lost(reply.head)
        if call_run == self.run:
            self.head = min(call_head, self.head)
        for frames in stash:
            self._on_message(frames)

    # -- receiving ----------------------------------------------------------------------

    def _on_message(self, frames: list[bytes]) -> None:
        if self._receive(frames):
            self.replay()

    def drain(self) -> bool:
        """Apply every message already queued on the SUB socket; True if any arrived."""
        before = self.seq
        sub = self.sub
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.seq != before
            self._on_message(frames)

    def replay(self) -> None:
        """Fetch the events after ``self.seq`` from the server's history (or resync)."""
        sent_at = self.seq
        reply = P.fetch_reply(
            self.state._request(P.Kind.FETCH, 0, P.fetch_request(sent_at, False, self.run))
        )
        if not self._replayed(sent_at, reply):
            self._lost(reply.head)

    def _lost(self, head: int) -> None:
        """The server's head went back: a server that lost changes replaced the one seen."""
        state = self.state
        seen = self.seq
        state._reset_stream()
        state._start_seq_value = state._start_rid = None
        raise _lost_error(state.server_address, head, seen)

    def catch_up(self) -> int:
        """Bring the replica at least to the server's current head; return that head."""
        head, run = P.head_reply(self.state._request(P.Kind.HEAD, 0, b""))
        check = self._checks_head(head, run)
        if check < 0:
            self._lost(head)
        if check and run != self.run:
            self.replay()  # raises if this run does not continue what the stream saw
        self.head = head
        self.drain()
        if self.seq < head:
            self.replay()
        return head

    def wait_more(self, deadline: float | None) -> bool:
        """Block until new events are in the log (True) or the deadline passes (False)."""
        before = self.seq
        sub = self.sub
        while True:
            self.drain()
            if self.seq != before:  # new events, drained now or replayed below
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = IDLE_CHECK if deadline is None else min(IDLE_CHECK, deadline - now)
            if sub.poll(wait * 1000):
                continue
            # idle: make sure nothing was dropped on the way and the server is alive
            head, run = P.head_reply(self.state._request(P.Kind.HEAD, 0, b""))
            check = self._checks_head(head, run)
            if check > 0:
                self.replay()
            elif check < 0:
                self._lost(head)

    def find(
        self,
        qualifies: Callable[[_Ev, _Cursor], bool],
        cursor: _Cursor,
        deadline: float | None,
        consume: bool = False,
        fresh: bool = True,
    ) -> _Ev | None:
        """Advance ``cursor`` to the next event that qualifies, blocking for new events.

        ``consume`` moves the buffer cursor along. Unless ``fresh`` (the stream was just
        caught up with the server's head), catch up once before blocking, so that every
        change acknowledged before this call is considered.
        """
        self._trim()  # what earlier calls consumed (kept until now for their results)
        registered = cursor in self.cursors
        if cursor is not self.buffer:
            self.cursors.add(cursor)
        try:
            while True:
                ev = self.scan(qualifies, cursor, consume)
                if ev is not None:
                    return ev
                if not fresh:
                    self.catch_up()
                    fresh = True
                    continue
                if not self.wait_more(deadline):
                    return None
        finally:
            if not registered:
                self.cursors.discard(cursor)


# -- State -------------------------------------------------------------------------------


class State:
    """A dict-like proxy to the dict held by a zproc server.

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
        missing one) raises :class:`zproc.AuthenticationError`.

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
        self._address = normalize_address(server_address)
        self._cache = bool(cache)
        self._cache_due = self._cache_check_due = 0.0
        if not liveness > 0:
            raise ValueError(f"liveness must be > 0 seconds, got {liveness!r}")
        self._liveness = liveness
        self._keys = client_keys(secret_key)
        self._secret_key = secret_key
        _check_namespace(namespace)
        if request_timeout is not None and request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0 or None, got {request_timeout!r}")
        self._namespace = namespace
        self._ns = namespace.encode()
        self.request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._max_backlog = max_backlog
        self._rcvhwm = rcvhwm
        self._conn: Connection | None = None
        self._stream: _Stream | None = None
        self._start_rid: int | None = None
        self._start_seq_value: int | None = None
        self._start_run = b""  # the server run that numbered _start_seq_value
        self._closed = False
        if self._connect_eagerly and not _server.in_server_process():
            self._connect()  # in the server process, using a State raises (see _connect)

    # -- plumbing ---------------------------------------------------------------------

    @property
    def server_address(self) -> ServerAddress:
        """The server's address (read-only)."""
        return self._address

    @property
    def secret_key(self) -> SecretKey | None:
        """The ``secret_key`` this State was given (read-only)."""
        return self._secret_key

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
        self._connection().head = 0  # heads of the old namespace mean nothing here
        self._register()

    @property
    def identity(self) -> bytes:
        """The identity this State's changes carry (new after fork or unpickling)."""
        return self._connection().identity

    def _connect(self) -> Connection:
        if _server.in_server_process():
            raise RuntimeError(
                "a State cannot be used inside an atomic function or elsewhere in the server "
                "process: the server is busy running it and would wait for itself. Work on "
                "the dict the atomic function receives instead"
            )
        self._reset_stream()
        self._conn = conn = Connection(
            self._address,
            connect_timeout=self._connect_timeout,
            keys=self._keys,
            liveness=self._liveness,
        )
        try:
            self._register()
        except BaseException:
            conn.close()
            self._conn = None
            raise
        return conn

    def _register(self) -> None:
        """Mark the start of this State's buffer: the server's head sequence number now.

        Waits briefly for the answer, so that a change made by anyone right after this
        returns is in the buffer; a server that is not up yet answers later.
        """
        conn = self._conn
        assert conn is not None
        rid = conn.send(P.Kind.HEAD, 0, b"", self._ns)
        if self._register_wait > 0:
            try:
                self._start_seq_value, self._start_run = P.head_reply(
                    conn.result(rid, self._register_wait)
                )
                self._start_rid = None
                return
            except (TimeoutError, ServerUnavailableError):
                pass
        self._start_seq_value = None
        self._start_rid = rid
        conn.expect(rid)

    def _connection(self) -> Connection:
        if self._closed:
            raise ZProcError("this State is closed; create a new one")
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        return self._connect()

    def _reset_stream(self) -> None:
        if self._stream is not None:
            if self._conn is not None and self._conn.pid == os.getpid():
                self._stream.close()
            self._stream = None

    def _request(self, kind: int, method: int, body: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.pid != os.getpid():
            conn = self._connection()
        return conn.request(kind, method, body, self._ns, self.request_timeout)

    def _call(self, method: int, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.pid != os.getpid():
            conn = self._connection()
        return conn.result(
            conn.send(_CALL, method, S.dumps(args), self._ns), self.request_timeout
        )

    def _replica(self) -> dict[Any, Any]:
        """The local replica, current enough for a cached read (``cache=True``).

        No round trip and no socket call unless the replica lacks a change this State was
        told of (read-your-writes) or the event queue was last looked at ``CACHE_POLL``
        seconds ago.
        """
        stream = self._stream
        if (
            stream is None
            or stream.seq < self._conn.head  # type: ignore[union-attr]
            or time.monotonic() >= self._cache_due
        ):
            stream = self._refresh_replica()
        return stream.replica

    def _refresh_replica(self) -> _Stream:
        """Apply the queued events, then wait for those of every head a reply reported."""
        try:
            stream = self._watching(catch_up=False)
            conn = self._conn
            assert conn is not None
            now = time.monotonic()
            if now >= self._cache_check_due:  # HEAD: replays what a full queue dropped
                stream.catch_up()
                self._cache_check_due = now + CACHE_CHECK
            else:
                stream.drain()
            seen = conn.head
            deadline = time.monotonic() + CACHE_WAIT
            while stream.seq < seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not stream.sub.poll(remaining * 1000):
                    head = stream.catch_up()  # slow events: fetch them instead
                    if stream.seq < seen:  # the server lacks changes it acknowledged
                        stream._lost(head)
                    break
                stream.drain()
        except ServerUnavailableError:
            if self._stream is None and self._conn is not None:
                self._conn.head = 0  # a replaced server: start again from its state
            raise
        self._cache_due = time.monotonic() + CACHE_POLL
        return stream

    def _start_seq(self) -> int:
        conn = self._connection()
        if self._start_seq_value is not None:
            return self._start_seq_value
        rid, self._start_rid = self._start_rid, None
        if rid is None:
            head, self._start_run = P.head_reply(self._request(P.Kind.HEAD, 0, b""))
            return head
        try:
            self._start_seq_value, self._start_run = P.head_reply(
                conn.result(rid, self.request_timeout)
            )
        except TimeoutError:
            # keep the registration: the buffer still starts where the State was made
            self._start_rid = rid
            conn.expect(rid)
            raise
        return self._start_seq_value

    def _watching(self, catch_up: bool = True) -> _Stream:
        """The event stream, started on first use (and caught up with the server's head)."""
        conn = self._conn
        registers = conn is None or conn.pid != os.getpid()  # this call starts the buffer
        self._connection()
        stream = self._stream
        if stream is None:
            start = self._start_seq()
            stream = self._stream = _Stream(self, start, self._start_run)
            if registers and stream.run == self._start_run:
                stream.head = min(stream.head, start)  # this call began at its registration
        elif catch_up:
            stream.catch_up()
        return stream

    def close(self) -> None:
        """Close this State's sockets. Idempotent; later use raises :class:`ZProcError`."""
        if self._closed:
            return
        self._closed = True
        self._reset_stream()
        if self._conn is not None:
            self._conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None and not self._closed and conn.pid == os.getpid():
            warnings.warn(
                f"unclosed {self!s:.0}State for {self._address}; call close() or use "
                f"'with State(...)'",
                ResourceWarning,
                stacklevel=2,
            )
            try:
                self.close()
            except Exception:
                pass

    def __reduce__(self) -> Any:
        return (
            _rebuild_state,
            (
                tuple(self._address),
                self._namespace,
                self.request_timeout,
                self._connect_timeout,
                self._secret_key,
                self._cache,
                self._liveness,
            ),
        )

    def fork(
        self, server_address: Iterable[str] | None = None, *, namespace: str | None = None
    ) -> State:
        """A new State with the same settings, unless overridden."""
        return State(
            self._address if server_address is None else server_address,
            namespace=self._namespace if namespace is None else namespace,
            request_timeout=self.request_timeout,
            connect_timeout=self._connect_timeout,
            secret_key=self._secret_key,
            liveness=self._liveness,
            cache=self._cache,
        )

    # -- dict interface -------------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        if self._cache:
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
        if isinstance(other, State):
            return self.copy() == other.copy()
        if self._cache:
            result: Any = dict.__eq__(self._replica(), other)
        else:
            result = self._call(P.Method.EQ, other)
        return result if result is NotImplemented else bool(result)

    def __ne__(self, other: object) -> bool:
        if isinstance(other, State):
            return self.copy() != other.copy()
        if self._cache:
            result: Any = dict.__ne__(self._replica(), other)
        else:
            result = self._call(P.Method.NE, other)
        return result if result is NotImplemented else bool(result)

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
        """``dict_keys`` of one snapshot."""
        return self.copy().keys()

    def values(self) -> Any:
        """``dict_values`` of one snapshot."""
        return self.copy().values()

    def items(self) -> Any:
        """``dict_items`` of one snapshot."""
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

    def _atomic(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        return self._request(P.Kind.ATOMIC, 0, S.dumps_call(fn, args, kwargs))  # type: ignore[no-any-return]

    # -- watchers -------------------------------------------------------------------------

    def go_live(self) -> None:
        """Discard the buffer: buffered watchers see only changes made after this returns."""
        if self._stream is None:
            self._connection()
            self._start_seq_value, self._start_run = P.head_reply(
                self._request(P.Kind.HEAD, 0, b"")
            )
            self._start_rid = None
            return
        stream = self._watching()
        stream.buffer.seq = stream.seq
        stream.buffer.snap = None
        stream._trim()

    def _foreign(self, ev: _Ev) -> bool:
        return ev.origin != self._conn.identity  # type: ignore[union-attr]

    def get_when_change(
        self,
        *keys: Hashable,
        exclude: bool = False,
        live: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """Block until another State changes the state (or one of ``keys``).

        Returns
        -------
        The whole snapshot after the change (no keys, or ``exclude=True``); the new value
        of the key (one key, ``None`` if it was deleted); or a list of the values of the
        keys, in argument order (several keys).
        """
        deadline = _deadline(timeout, "get_when_change")
        stream = self._watching(catch_up=live)
        me = self._conn.identity  # type: ignore[union-attr]
        qualifies, cursor = _change_watch(stream, stream.head, me, keys, exclude, live)
        ev = stream.find(qualifies, cursor, deadline, fresh=live)
        if ev is None:
            raise _timeout_error("get_when_change", timeout)
        return _change_result(stream, ev, cursor, keys, exclude)

    def _when_snapshot(
        self,
        test: Callable[[dict[Any, Any]], Any],
        live: bool,
        deadline: float | None,
        what: str,
        timeout: float | None,
    ) -> dict[Any, Any]:
        """Level-triggered wait: the first snapshot (now, or after a change) passing ``test``.

        Returns the shallow snapshot; callers copy what they return.
        """
        stream = self._watching()
        snap = dict(stream.replica)
        if test(snap):
            return snap
        me = self._conn.identity  # type: ignore[union-attr]
        qualifies, cursor = _level_watch(stream, test, live, me)
        ev = stream.find(qualifies, cursor, deadline, consume=not live)
        if ev is None:
            raise _timeout_error(what, timeout)
        return cursor.snap  # type: ignore[return-value]

    def get_when(
        self,
        test_fn: Callable[[dict[Any, Any]], Any],
        *,
        live: bool = True,
        timeout: float | None = None,
    ) -> dict[Any, Any]:
        """Block until ``test_fn(snapshot)`` is true; return that snapshot.

        Checks the current state first (returns at once if the condition holds), then
        every change made by other States after it.
        """
        deadline = _deadline(timeout, "get_when")
        snap = self._when_snapshot(lambda s: test_fn(dict(s)), live, deadline, "get_when",
                                   timeout)
        return _copy(snap)  # type: ignore[no-any-return]

    def get_when_equal(
        self, key: Hashable, value: Any, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Block until ``state.get(key) == value``; return the stored value."""
        deadline = _deadline(timeout, "get_when_equal")
        snap = self._when_snapshot(
            _equal_test(key, value), live, deadline, "get_when_equal", timeout
        )
        return _copy(snap.get(key))

    def get_when_not_equal(
        self, key: Hashable, value: Any, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Block until ``state.get(key) != value``; return the stored value."""
        deadline = _deadline(timeout, "get_when_not_equal")
        snap = self._when_snapshot(
            _not_equal_test(key, value), live, deadline, "get_when_not_equal", timeout
        )
        return _copy(snap.get(key))

    def get_when_none(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> None:
        """Block until ``key`` exists and is ``None``."""
        deadline = _deadline(timeout, "get_when_none")
        self._when_snapshot(
            _none_test(key), live, deadline, "get_when_none", timeout
        )

    def get_when_not_none(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Block until ``key`` exists and is not ``None``; return its value."""
        deadline = _deadline(timeout, "get_when_not_none")
        snap = self._when_snapshot(
            _not_none_test(key), live, deadline, "get_when_not_none", timeout
        )
        return _copy(snap[key])

    def get_when_available(
        self, key: Hashable, *, live: bool = True, timeout: float | None = None
    ) -> Any:
        """Block until ``key`` exists; return its value."""
        deadline = _deadline(timeout, "get_when_available")
        snap = self._when_snapshot(
            _available_test(key), live, deadline, "get_when_available", timeout
        )
        return _copy(snap[key])

    def get_raw_update(
        self, *, live: bool = True, timeout: float | None = None
    ) -> StateUpdate:
        """Block until another State changes anything; return the before and after dicts."""
        deadline = _deadline(timeout, "get_raw_update")
        stream = self._watching(catch_up=live)
        cursor = _Cursor(stream.head) if live else stream.buffer
        ev = stream.find(lambda ev, _c: self._foreign(ev), cursor, deadline, fresh=live)
        if ev is None:
            raise _timeout_error("get_raw_update", timeout)
        return _update_of(stream, ev)

    # -- iterator watchers ------------------------------------------------------------------

    def when_change(
        self,
        *keys: Hashable,
        exclude: bool = False,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> StateWatcher:
        """An iterator over the snapshots after each change of ``keys`` (or of anything)."""
        return StateWatcher(self, _keys_test(keys, exclude), live=live, timeout=timeout,
                            start_time=start_time, count=count)

    def when(
        self,
        test_fn: Callable[..., Any],
        *,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> StateWatcher:
        """An iterator over the snapshots after each change for which ``test_fn`` is true."""
        return StateWatcher(self, _fn_test(test_fn, args, kwargs), live=live,
                            timeout=timeout, start_time=start_time, count=count)

    def when_equal(self, key: Hashable, value: Any, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and equals ``value``."""
        return self._when_key(_present_equal_test(key, value), watcher_kwargs)

    def when_not_equal(self, key: Hashable, value: Any, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and differs from ``value``."""
        return self._when_key(_present_not_equal_test(key, value), watcher_kwargs)

    def when_none(self, key: Hashable, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and is ``None``."""
        return self._when_key(_none_test(key), watcher_kwargs)

    def when_not_none(self, key: Hashable, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and is not ``None``."""
        return self._when_key(_not_none_test(key), watcher_kwargs)

    def when_available(self, key: Hashable, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists."""
        return self._when_key(_available_test(key), watcher_kwargs)

    def when_truthy(self, key: Hashable, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and is truthy."""
        return self._when_key(_truthy_test(key), watcher_kwargs)

    def when_falsy(self, key: Hashable, **watcher_kwargs: Any) -> StateWatcher:
        """Iterator: snapshots after changes where ``key`` exists and is falsy."""
        return self._when_key(_falsy_test(key), watcher_kwargs)

    def _when_key(
        self, test: Callable[[dict[Any, Any]], bool], watcher_kwargs: dict[str, Any]
    ) -> StateWatcher:
        return StateWatcher(self, _snapshot_test(test), **watcher_kwargs)

    def when_change_raw(
        self,
        *,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> StateWatcher:
        """An iterator over :class:`StateUpdate` values, one per change by another State."""
        return StateWatcher(self, _any_test, live=live, timeout=timeout,
                            start_time=start_time, count=count, raw=True)


def _update_of(stream: _StreamCore, ev: _Ev) -> StateUpdate:
    return StateUpdate(
        _copy(stream.snapshot_at(ev.first - 1)),
        _copy(stream.snapshot_at(ev.seq)),
        ev.timestamp,
        False,
    )


# -- watcher logic without I/O, shared with the asyncio flavour (zproc._async) ------------

_Qualifies = Callable[[_Ev, _Cursor], bool]
_SnapTest = Callable[[dict[Any, Any]], Any]
_EvTest = Callable[[_Ev, dict[Any, Any]], Any]


def _foreign_test(me: bytes) -> _Qualifies:
    """Qualifies every event not caused by the State with identity ``me``."""
    return lambda ev, _cursor: ev.origin != me


def _change_watch(
    stream: _StreamCore, head: int, me: bytes, keys: tuple[Hashable, ...], exclude: bool,
    live: bool,
) -> tuple[_Qualifies, _Cursor]:
    """The event test and the starting cursor of ``get_when_change``."""
    keyset = frozenset(keys)
    whole = not keys or exclude

    def qualifies(ev: _Ev, _cursor: _Cursor) -> bool:
        if ev.origin == me:
            return False
        if not keyset:
            return True
        return any((key in keyset) != exclude for key in ev.keys())

    if live:
        # from the head the call saw: later events already drained still count
        cursor = _Cursor(head, stream.snapshot_at(head) if whole else None)
    else:
        cursor = stream.buffer
        if whole and cursor.snap is None:
            cursor.snap = stream.snapshot_at(cursor.seq)
    return qualifies, cursor


def _change_result(
    stream: _StreamCore, ev: _Ev, cursor: _Cursor, keys: tuple[Hashable, ...], exclude: bool
) -> Any:
    """What ``get_when_change`` returns for the event that woke it."""
    if not keys or exclude:
        return _copy(cursor.snap)
    if len(keys) == 1:
        return _copy(stream.value_at(ev.seq, keys[0]))
    return [_copy(stream.value_at(ev.seq, key)) for key in keys]


def _level_watch(
    stream: _StreamCore, test: _SnapTest, live: bool, me: bytes
) -> tuple[_Qualifies, _Cursor]:
    """The event test and cursor of a level-triggered wait whose first check failed."""
    cursor = _Cursor(stream.seq, dict(stream.replica))
    if not live:
        # buffered events older than the snapshot are consumed without evaluation
        stream.buffer.seq = max(stream.buffer.seq, stream.seq)

    def qualifies(ev: _Ev, cur: _Cursor) -> bool:
        return ev.origin != me and bool(test(cur.snap))  # type: ignore[arg-type]

    return qualifies, cursor


# Tests of the one-shot watchers: 0.9.1 rules, a missing key counts as None.
def _equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: s.get(key) == value


def _not_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: s.get(key) != value


# Tests that the one-shot and the iterator watchers share: a missing key never matches.
def _none_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and s[key] is None


def _not_none_test(key: Hashable) -> _SnapTest:
    return lambda s: s.get(key) is not None


def _available_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s


# Tests of the iterator watchers only.
def _present_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: key in s and s[key] == value


def _present_not_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: key in s and s[key] != value


def _truthy_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and bool(s[key])


def _falsy_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and not s[key]


def _snapshot_test(test: _SnapTest) -> _EvTest:
    """An iterator watcher's test from a test of the snapshot."""
    return lambda _ev, snap: test(snap)


def _keys_test(keys: tuple[Hashable, ...], exclude: bool) -> _EvTest:
    """The test of ``when_change``: any change, or a change of (or outside) ``keys``."""
    keyset = frozenset(keys)
    return lambda ev, _snap: not keyset or any((key in keyset) != exclude for key in ev.keys())


def _fn_test(
    test_fn: Callable[..., Any], args: Iterable[Any] | None, kwargs: Mapping[str, Any] | None
) -> _EvTest:
    """The test of ``when``: ``test_fn(snapshot_copy, *args, **kwargs)``."""
    a, kw = tuple(args or ()), dict(kwargs or {})
    return lambda _ev, snap: test_fn(dict(snap), *a, **kw)


def _any_test(_ev: _Ev, _snap: dict[Any, Any]) -> bool:
    return True


def _check_watcher_args(timeout: float | None, count: int | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count!r}")


def _watch_start(stream: _StreamCore, start_time: float | None) -> int:
    """Where a new iterator watcher starts: the server's head when the call began, or at
    the first logged event from ``start_time`` (server clock) on."""
    start = stream.head
    if start_time is not None:
        start = stream.buffer.seq
        for ev in stream.log:
            if ev.timestamp >= start_time:
                break
            start = ev.seq
    return start


def _watch_qualifies(stream: _StreamCore, test: _EvTest, me: bytes) -> _Qualifies:
    """An iterator watcher's event test: another State's change that passes ``test``."""

    def qualifies(ev: _Ev, cur: _Cursor) -> bool:
        if ev.origin == me:
            return False
        if cur.snap is None:  # invalidated by coalescing
            cur.snap = stream.snapshot_at(cur.seq)
        return bool(test(ev, cur.snap))

    return qualifies


def _watch_item(ev: _Ev, cursor: _Cursor, raw: bool) -> Any:
    """What an iterator watcher yields for ``ev``: the snapshot, or a StateUpdate."""
    after = _copy(cursor.snap)
    if not raw:
        return after
    before = dict(after)
    for key, old in ev.undo.items():
        if old is _MISSING:
            before.pop(key, None)
        else:
            before[key] = _copy(old)
    return StateUpdate(before, after, ev.timestamp, False)


class StateWatcher(Iterator[Any]):
    """An iterator over the changes of a State that pass a test.

    Each ``next()`` blocks until the next qualifying change made by another State and
    returns the snapshot right after it (or a :class:`StateUpdate` for raw watchers). The
    watcher keeps its own position in the event stream: buffered watchers (``live=False``)
    see every change after their creation, in order; live ones only changes after each
    ``next()`` began.
    """

    def __init__(
        self,
        state: State,
        test: Callable[[_Ev, dict[Any, Any]], Any],
        *,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
        raw: bool = False,
    ) -> None:
        _check_watcher_args(timeout, count)
        self.state = state
        self.live = live
        self.timeout = timeout
        self.count = count
        self._test = test
        self._raw = raw
        self._yielded = 0
        stream = state._watching()
        self._stream = stream
        self._cursor = _Cursor(_watch_start(stream, start_time))
        stream.cursors.add(self._cursor)

    def __iter__(self) -> StateWatcher:
        return self

    def __next__(self) -> Any:
        if self.count is not None and self._yielded >= self.count:
            raise StopIteration
        deadline = _deadline(self.timeout, "StateWatcher")
        state = self.state
        stream = state._watching(catch_up=self.live)
        if stream is not self._stream:  # the State reconnected (fork, namespace change)
            self._stream = stream
            self._cursor = _Cursor(stream.seq)
            stream.cursors.add(self._cursor)
        cursor = self._cursor
        if self.live:
            cursor.seq, cursor.snap = stream.head, None
        if cursor.snap is None:
            cursor.snap = stream.snapshot_at(cursor.seq)
        me = state._conn.identity  # type: ignore[union-attr]
        qualifies = _watch_qualifies(stream, self._test, me)
        ev = stream.find(qualifies, cursor, deadline, fresh=self.live)
        if ev is None:
            raise _timeout_error("StateWatcher", self.timeout)
        self._yielded += 1
        return _watch_item(ev, cursor, self._raw)

    def current(self) -> dict[str, Any]:
        """A copy of the state at this watcher's position (where the next item starts)."""
        cursor = self._cursor
        if cursor.snap is None:
            cursor.snap = self._stream.snapshot_at(cursor.seq)
        return _copy(cursor.snap)  # type: ignore[no-any-return]

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


def _rebuild_state(
    address: tuple[str, str],
    namespace: str,
    request_timeout: float | None,
    connect_timeout: float | None,
    secret_key: SecretKey | None = None,
    cache: bool = False,
    liveness: float = DEFAULT_LIVENESS,
) -> State:
    return State(
        address,
        namespace=namespace,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        secret_key=secret_key,
        liveness=liveness,
        cache=cache,
    )


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
    if "\0" in namespace:
        raise ValueError("namespace must not contain NUL characters")


def _update_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The one argument ``update(*args, **kwargs)`` sends to the server."""
    if len(args) > 1:
        raise TypeError(f"update expected at most 1 argument, got {len(args)}")
    merged: Any = {}
    if args:
        merged = args[0]
        if isinstance(merged, State):
            merged = merged.copy()
        elif not isinstance(merged, dict):
            merged = (
                {key: merged[key] for key in merged.keys()}
                if hasattr(merged, "keys")
                else list(merged)
            )
    if kwargs:
        merged = dict(merged)
        merged.update(kwargs)
    return merged


# -- pipelines ----------------------------------------------------------------------------


class Pipeline:
    """Writes to a :class:`State`, buffered and sent many to a request.

    Made by :meth:`State.pipeline`. Each write is pickled when it is made (so a value
    that cannot be pickled fails at once, and later changes to the value are not sent)
    and buffered; :meth:`flush` (or the end of a ``with`` block) sends the buffer as one
    request, and so does every ``max_ops``-th write.

    The server applies the operations in order, each one on its own, exactly as if they
    had been sent one by one: each is atomic, publishes its own event (watchers see every
    change, with consecutive sequence numbers) and, if it fails, leaves the state as it
    was and does not stop the operations after it. Operations of other States may run
    between two batches, not inside one. The first failure is raised by :meth:`flush`:
    the original exception type, the server's traceback as ``__cause__`` and a note
    naming the operation's index. A ``with`` block that raises discards the writes not
    sent yet (those already sent stay applied).

    Afterwards, this State's reads with ``cache=True`` see every write of the pipeline.

    .. versionadded:: 1.0
    """

    def __init__(self, state: State, max_ops: int = DEFAULT_PIPELINE_OPS) -> None:
        if not isinstance(max_ops, int) or max_ops < 1:
            raise ValueError(f"max_ops must be an int >= 1, got {max_ops!r}")
        self.state = state
        self.max_ops = max_ops
        self._ops: list[bytes] = []
        self._names: list[str] = []
        self._results: list[Any] = []
        self._failed = 0
        self._error: tuple[int, str, BaseException] | None = None

    def _add(self, name: str, method: int, args: tuple[Any, ...]) -> None:
        self._ops.append(S.dumps((int(method), args)))
        self._names.append(name)
        if len(self._ops) >= self.max_ops:
            self._send()

    def _send(self) -> None:
        ops, names = self._ops, self._names
        if not ops:
            return
        self._ops, self._names = [], []
        replies = self.state._request(P.Kind.PIPELINE, 0, S.dumps(ops))
        if not isinstance(replies, list) or len(replies) != len(ops):
            raise ProtocolError(
                f"the server answered a pipeline of {len(ops)} operations with "
                f"{len(replies) if isinstance(replies, list) else 'no'} results; use the "
                f"same zproc version on both sides"
            )
        ok = P.Status.OK
        for name, (status, body) in zip(names, replies, strict=True):
            index = len(self._results)
            try:
                if status != ok:
                    raise S.loads_exception(body)
                self._results.append(S.loads(body))
            except Exception as exc:
                self._results.append(None)
                self._failed += 1
                if self._error is None:
                    self._error = (index, name, exc)

    def flush(self) -> list[Any]:
        """Send the buffered writes; return the result of every write since the last flush.

        Raises the first failure among them (see the class documentation); the others
        were applied regardless.
        """
        try:
            self._send()
        finally:
            results, error, failed = self._results, self._error, self._failed
            self._results, self._error, self._failed = [], None, 0
        if error is not None:
            index, name, exc = error
            others = f"; {failed - 1} later one(s) failed too" if failed > 1 else ""
            exc.add_note(
                f"raised by operation #{index} ({name}) of a pipeline of {len(results)}"
                f"{others}; the other operations were applied"
            )
            raise exc
        return results

    def discard(self) -> None:
        """Drop the writes not sent yet."""
        self._ops, self._names = [], []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.discard()

    # writes
    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._add("setitem", P.Method.SETITEM, (key, value))

    def __delitem__(self, key: Hashable) -> None:
        self._add("delitem", P.Method.DELITEM, (key,))

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update`` (one operation: all of it applies, or none)."""
        self._add("update", P.Method.UPDATE, (_update_argument(args, kwargs),))

    def pop(self, key: Hashable, *default: Any) -> None:
        """Pop ``key`` (its value is in :meth:`flush`'s results)."""
        self._add("pop", P.Method.POP, (key, *default))

    def popitem(self) -> None:
        """Remove the last inserted item (it is in :meth:`flush`'s results)."""
        self._add("popitem", P.Method.POPITEM, ())

    def setdefault(self, key: Hashable, default: Any = None) -> None:
        """Set ``key`` to ``default`` if it is missing (the value is in the results)."""
        self._add("setdefault", P.Method.SETDEFAULT, (key, default))

    def clear(self) -> None:
        """Remove every key."""
        self._add("clear", P.Method.CLEAR, ())

    def set(self, value: Mapping[Any, Any]) -> None:
        """Replace the whole dict with ``value`` (one event)."""
        self._add("set", P.Method.SET, (dict(value),))


# -- atomic -------------------------------------------------------------------------------


def atomic(fn: Callable[..., T]) -> Callable[..., T]:
    """Make ``fn(dict, *args, **kwargs)`` run on the server, atomically.

    The wrapper is called as ``wrapper(state, *args, **kwargs)``: the server calls ``fn``
    on the live dict of ``state``'s namespace while serving no one else, and the wrapper
    returns ``fn``'s return value. If ``fn`` raises (or its result cannot be pickled) the
    state is restored exactly, no event is published and the same exception is raised
    here with the server's traceback as ``__cause__``. ``fn`` travels with cloudpickle, so
    defaults, closures and globals work as in a local call.

    Called with a :class:`zproc.AsyncState`, the wrapper returns an awaitable instead:
    ``await wrapper(async_state, *args, **kwargs)``.
    """
    if not callable(fn):
        raise TypeError(f"atomic() needs a callable, got {fn!r}")

    @functools.wraps(fn)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> T:
        if not isinstance(state, State):
            from ._async import AsyncState

            if isinstance(state, AsyncState):
                return state._atomic(fn, args, kwargs)
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


# -- ping -----------------------------------------------------------------------------------


def ping(
    server_address: Iterable[str],
    *,
    timeout: float | None = 5.0,
    payload: bytes | None = None,
    secret_key: SecretKey | None = None,
) -> int | None:
    """Ask the server at ``server_address`` for its pid.

    Returns the server's pid when it echoes ``payload`` back (``None`` if the echo
    differs). Raises :class:`zproc.TimeoutError` when no server answers within
    ``timeout`` seconds (``None``: wait indefinitely), and
    :class:`zproc.AuthenticationError` when the server rejects ``secret_key`` (a wrong
    one, or none where the server requires one).
    """
    address = normalize_address(server_address)
    keys = client_keys(secret_key)
    if payload is None:
        payload = os.urandom(56)
    elif not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    conn = Connection(address, connect_timeout=None, keys=keys)
    try:
        echoed, pid = conn.request(P.Kind.PING, 0, payload, b"default", timeout)
    except TimeoutError:
        hint = conn.security_hint() or (
            "" if keys else " A server with a secret_key does not answer without it."
        )
        raise TimeoutError(
            f"no zproc server answered a ping at {address.req_rep} within {timeout} s; check "
            f"that a server was started there (zproc.start_server) and the address is "
            f"right.{hint}"
        ) from None
    finally:
        conn.close()
    return int(pid) if echoed == payload else None

