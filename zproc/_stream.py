"""The client's event-stream bookkeeping, without I/O: replica, event log, cursors.

A State (and an AsyncState) keeps a local replica of the server's dict and a log of
recent events, fed by the server's PUB socket and, for what got lost on the way, by FETCH
requests. :class:`_StreamCore` holds that replica and log and decides everything about
them: what a FETCH reply or an event message does to the log, when a HEAD reply calls
for a replay, when the history was lost, how a watcher call starts, waits and finds the
next qualifying event. It never touches a socket: its multi-step procedures
(``_start``, ``_catch_up``, ``_wait_more``, ``_find``) are generators that *yield* the
I/O they need as ``(function, args)`` steps, and a driver runs them, calling each
function plainly (:class:`zproc._client.Stream`) or awaiting it
(:class:`zproc._client.AsyncStream`). So the sync and the asyncio clients run one copy of
the logic, h11 style.

The watcher logic both clients share (the tests behind ``get_when_*``/``when_*``, their
starting cursors and what they return) is in :mod:`zproc._watch`.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import os
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

from . import _protocol as P
from . import _serialization as S
from ._store import MISSING as _MISSING
from ._store import changed
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError

T = TypeVar("T")
log = logging.getLogger("zproc")

#: While blocked, a watcher asks the server for its head this often (seconds), to notice
#: events dropped by a full queue and a server that died.
IDLE_CHECK = 1.0
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset)
_PLAIN = frozenset(_IMMUTABLE)  # the exact types (a subclass may be mutable)

_bisect_right = bisect.bisect_right
_SEQ = attrgetter("seq")  # the key of the log's order (faster than a lambda)

#: One I/O step a procedure of :class:`_StreamCore` asks its driver for: a function and
#: its arguments (the driver calls it, or awaits what it returns).
_Op = tuple[Callable[..., Any], tuple[Any, ...]]
_Steps = Generator[_Op, Any, T]
#: What :func:`resume` returns once a procedure is done: ``(DONE, its result)``.
DONE: Any = object()


def resume(steps: _Steps[Any], value: Any) -> _Op:
    """Send ``value`` (the result of the last I/O step) into ``steps``; return the next
    I/O step, or ``(DONE, result)`` when the procedure returned ``result``."""
    try:
        return steps.send(value)
    except StopIteration as stop:
        return DONE, stop.value


def drive(steps: _Steps[T]) -> T:
    """Run a procedure of :class:`_StreamCore`, calling each I/O step (the sync driver)."""
    fn, args = resume(steps, None)
    while fn is not DONE:
        try:
            value = fn(*args)
        except BaseException:
            steps.close()  # its ``finally`` clauses run now
            raise
        fn, args = resume(steps, value)
    return args  # type: ignore[return-value]


async def adrive(steps: _Steps[T]) -> T:
    """Run a procedure of :class:`_StreamCore`, awaiting each I/O step that returns an
    awaitable (asyncio)."""
    fn, args = resume(steps, None)
    while fn is not DONE:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            steps.close()
            raise
        fn, args = resume(steps, result)
    return args  # type: ignore[return-value]


def _copy(value: Any) -> Any:
    """A deep copy, cheap for immutable values and tuples of them (not nested)."""
    flat = type(value) is tuple and _PLAIN.issuperset(map(type, value))
    return value if flat or isinstance(value, _IMMUTABLE) else S.loads(S.dumps(value))


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


#: A watcher's event test: does this event (seen from this cursor) wake the watcher?
Qualifies = Callable[[_Ev, _Cursor], bool]


class _StreamCore:
    """The event-stream logic without I/O: replica, event log, cursors.

    It turns event messages and FETCH replies into log entries, answers questions about
    the log, and runs the procedures of a watcher call (see the module docstring). A
    driver subclass provides the I/O steps: ``_io_send_head``, ``_io_head_result``,
    ``_io_head``, ``_io_fetch``, ``_io_sync``, ``_io_poll``, ``_io_recv``, ``drain`` and
    ``replay`` (each returns its result, or an awaitable of it), and ``_on_lost``.
    """

    def __init__(
        self,
        namespace: bytes,
        start_seq: int,
        max_backlog: int,
        start_run: bytes,
        *,
        identity: bytes = b"",
        req_rep: str = "",
        pub_sub: str = "",
        secure: bool = False,
        connect_timeout: float | None = None,
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
        self.marker = P.sync_topic(identity)
        self.req_rep, self.pub_sub, self.secure = req_rep, pub_sub, secure
        self.connect_timeout = connect_timeout

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
        try:
            events = P.decode_events(frames)
        except ProtocolError as exc:  # its events are fetched again, like a gap
            log.warning("zproc: an event message of namespace %r cannot be read (%s); its "
                        "changes are fetched again", self.namespace.decode(), exc)
            return True
        for seq, origin, timestamp, changes, deleted, _old in events:
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

    def _head_verdict(self, head: int, run: bytes, sent_at: int, sent_run: bytes) -> int:
        """What a HEAD reply ``(head, run)`` to a request sent at ``(sent_at, sent_run)``
        asks of the stream: 0 nothing, 1 a replay (events to fetch, or a new server run
        to check), -1 the history was lost. (``seq`` may have moved on meanwhile.)"""
        if run != sent_run:
            return 1
        if head < sent_at:
            return -1
        return 1 if head > self.seq else 0

    def _resync(self, head: int, snapshot: dict[Any, Any]) -> None:
        """Fell behind the server's history: present the difference as one event."""
        replica = self.replica
        changes = {
            key: value
            for key, value in snapshot.items()
            if key not in replica or changed(replica[key], value)
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
        if not log or log[-1].seq <= seq:  # nothing new: no search
            return
        index = _bisect_right(log, seq, key=_SEQ)
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
        log = self.log
        if not log or log[-1].seq <= cursor.seq:
            return None
        index = _bisect_right(log, cursor.seq, key=_SEQ)
        buffer = self.buffer
        while index < len(log):
            ev = log[index]
            index += 1
            cursor.advance(ev)
            if consume:
                buffer.seq = ev.seq
                buffer.snap = None
            if qualifies(ev, cursor):
                return ev
        return None

    # -- procedures: generators of I/O steps, run by a driver ----------------------------

    def _lost(self, head: int) -> None:
        """The server's head went back: a server that lost changes replaced the one seen."""
        error = _lost_error(self.req_rep, head, self.seq)
        self._on_lost(error)
        raise error

    def _on_lost(self, error: ServerUnavailableError) -> None:
        """Called by :meth:`_lost` before it raises ``error``: the owner drops this stream."""

    def _start(self, start_seq: int) -> _Steps[None]:
        """Make sure the subscription is live, then load the snapshot and the backlog.

        The head this call starts from (what a live watcher waits after) is asked for
        first, in the same send: changes made while the subscription starts count.
        """
        head_rid = yield self._io_send_head, ()
        token = os.urandom(8)
        stash: list[list[bytes]] = []
        wait = 0.002
        connect_deadline = time.monotonic() + (self.connect_timeout or 3600.0)
        synced = False
        while not synced:
            yield self._io_sync, (token,)
            end = time.monotonic() + wait
            while not synced:
                remaining = end - time.monotonic()
                if remaining <= 0 or not (yield self._io_poll, (remaining,)):
                    break
                frames = yield self._io_recv, ()
                if frames[0] == self.marker:
                    synced = frames[1] == token
                else:
                    stash.append(frames)
            wait = min(wait * 2, 0.1)
            if time.monotonic() > connect_deadline:
                raise _no_events_error(self.pub_sub, self.secure)
        reply = P.fetch_reply((yield self._io_fetch, (start_seq, True)))
        call_head, call_run = P.head_reply((yield self._io_head_result, (head_rid,)))
        if not self._load(start_seq, reply):
            self._lost(reply.head)
        if call_run == self.run:
            self.head = min(call_head, self.head)
        for frames in stash:
            if self._receive(frames):
                yield self.replay, ()

    def _replay(self) -> _Steps[None]:
        """Fetch the events after ``seq`` from the server's history (or resync).

        A reply older than what was applied meanwhile (asyncio: another coroutine's
        replay) is ignored rather than taken for a lost server.
        """
        sent_at = self.seq
        reply = P.fetch_reply((yield self._io_fetch, (sent_at, False)))
        if not self._replayed(sent_at, reply):
            self._lost(reply.head)

    def _catch_up(self) -> _Steps[int]:
        """Bring the replica at least to the server's current head; return that head."""
        sent_at, sent_run = self.seq, self.run
        head, run = P.head_reply((yield self._io_head, ()))
        if self._head_verdict(head, run, sent_at, sent_run) < 0:
            self._lost(head)
        if run != sent_run:
            yield self.replay, ()  # raises if this run does not continue what was seen
        self.head = max(self.head, head) if run == sent_run else head
        yield self.drain, ()
        if self.seq < head:
            yield self.replay, ()
        return head

    def _refresh(self, seen: int, check: bool, wait: float) -> _Steps[None]:
        """Make the replica current for a cached read: apply the queued events (``check``:
        after asking the server's head, which replays what was dropped), then wait up to
        ``wait`` s for those up to head ``seen``, else fetch them."""
        if check:
            yield from self._catch_up()
        else:
            yield self.drain, ()
        deadline = time.monotonic() + wait
        while self.seq < seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not (yield self._io_poll, (remaining,)):
                head = yield from self._catch_up()  # slow events: fetch them instead
                if self.seq < seen:  # the server lacks changes it acknowledged
                    self._lost(head)
                return
            yield self.drain, ()

    def _wait_more(self, deadline: float | None) -> _Steps[bool]:
        """Wait until new events are in the log (True) or the deadline passes (False)."""
        before = self.seq
        while True:
            yield self.drain, ()
            if self.seq != before:  # new events, drained now or replayed below
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = IDLE_CHECK if deadline is None else min(IDLE_CHECK, deadline - now)
            if (yield self._io_poll, (wait,)):
                continue
            # idle: make sure nothing was dropped on the way and the server is alive
            sent_at, sent_run = self.seq, self.run
            head, run = P.head_reply((yield self._io_head, ()))
            verdict = self._head_verdict(head, run, sent_at, sent_run)
            if verdict > 0:
                yield self.replay, ()
            elif verdict < 0:
                self._lost(head)

    def _find(
        self, qualifies: Qualifies, cursor: _Cursor, deadline: float | None, consume: bool,
        fresh: bool,
    ) -> _Steps[_Ev | None]:
        """Advance ``cursor`` to the next event that qualifies, waiting for new events.

        ``consume`` moves the buffer cursor along. Unless ``fresh`` (the stream was just
        caught up with the server's head), catch up once before waiting, so that every
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
                    yield self.catch_up, ()
                    fresh = True
                    continue
                if not (yield from self._wait_more(deadline)):
                    return None
        finally:
            if not registered:
                self.cursors.discard(cursor)

    # The I/O steps a driver provides; each returns its result, or an awaitable of it.
    _io_send_head: Callable[[], Any]  # send a HEAD request: its id
    _io_head_result: Callable[[int], Any]  # the reply to that HEAD request
    _io_head: Callable[[], Any]  # a HEAD round trip: the reply body
    _io_fetch: Callable[[int, bool], Any]  # a FETCH round trip (since, full): the body
    _io_sync: Callable[[bytes], Any]  # a SYNC round trip: the token comes as a marker
    _io_poll: Callable[[float], Any]  # whether a SUB message is queued within seconds
    _io_recv: Callable[[], Any]  # the next queued SUB message
    drain: Callable[[], Any]  # apply every queued message (replaying gaps)
    replay: Callable[[], Any]  # run _replay()
    catch_up: Callable[[], Any]  # run _catch_up()

    # -- memory bounds -------------------------------------------------------------------

    def _trim(self) -> None:
        low = min([self.buffer.seq, *(c.seq for c in self.cursors)])
        log = self.log
        if log and log[0].seq <= low:
            index = _bisect_right(log, low, key=_SEQ)
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



def _no_events_error(pub_sub: str, secure: bool) -> TimeoutError:
    """The error when requests are answered but the sync marker never arrives."""
    return TimeoutError(
        f"could not subscribe to the events at {pub_sub}: "
        f"the server answers requests but its events never arrive. Check that "
        f"both endpoints of the address belong to the same server"
        + (" and that it runs with this secret_key" if secure else "")
    )


def _lost_error(req_rep: str, head: int, seen: int) -> ServerUnavailableError:
    """The error when the server's history no longer holds what a stream already saw."""
    return ServerUnavailableError(
        f"the zproc server at {req_rep} was replaced by one whose history lacks "
        f"changes this State saw (this State saw change {seen} of the history before; "
        f"the server's head is now {head}): it restarted without persist=, or lost its "
        f"last writes in a crash (fsync='every second'). The next watcher call starts "
        f"from the current state"
    )
