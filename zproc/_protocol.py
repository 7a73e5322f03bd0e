"""The wire format: every message kind and shape zproc sends, and nothing else.

Requests (client DEALER -> server ROUTER, on ``server_address[0]``), one frame::

    [header + namespace + body]
    header    = struct "<BBBIH" (version, kind, method, request_id, len(namespace))
    namespace = utf-8
    body      = pickled arguments; the shape depends on the kind (see ``Kind``)

The ROUTER sees ``[identity, request]``; the identity is the State's 8-byte id.

Replies (server -> the requesting DEALER), one frame::

    [header + body]
    header = struct "<BBIQ" (version, status, request_id, head)
    body   = pickled result (status OK) or a serialized exception (status ERROR)

One frame each way, because every frame costs a ZeroMQ message part on both sides. A
``CALL`` and its OK reply may carry more frames after that one: the out-of-band buffers
of the body's pickle (``_serialization.dumps_buffers``), one frame each, in order, sent
without copies; a body must use exactly the frames that follow it (:class:`Buffered`).

``head`` is the sequence number of the request's namespace once the request was applied
(0 in error replies). A client that reads from its local replica waits until the replica
has reached the highest head it was told, which gives read-your-writes and monotonic
reads.

Pipelines (``Kind.PIPELINE``): the body is a pickled list of operations, each one
separately pickled ``(method, args)`` (a ``Method`` and its argument tuple). The server
applies them in order, each one on its own (validated, then applied, with its own event,
exactly as a ``CALL``); a failing operation does not stop the others. The reply body is
a pickled list with one ``(status, body)`` pair per operation, the body being the
pickled result (``Status.OK``) or the serialized exception (``Status.ERROR``).

Events (server PUB -> client SUB, on ``server_address[1]``)::

    [topic, header, event, event, ...]
    topic  = b"e" + namespace (utf-8) + b"\\0"     (SUB filters by namespace in ZeroMQ)
    header = struct "<BQQ8s" (version, first_seq, last_seq, run), then, when an event
             has out-of-band buffers, one uint32 per event ("<I"): its number of buffers
    event  = one pickled event tuple per state change, in server order, each followed by
             its out-of-band buffers (big values, as in a CALL), one frame each:
             (seq, origin, timestamp, changes, deleted, old)
             seq       per-namespace sequence number, strictly increasing by one
             origin    identity of the State that caused it (b"" for the server itself)
             changes   {key: new value} for keys added or changed
             deleted   tuple of keys removed
             old       {key: previous value} for changed/removed keys that existed; only
                       in FETCH replies, None on the broadcast

Server runs: every start of a server draws a random 8-byte *run* token. Sequence numbers
count changes of one history; a history is continued by the next run only up to the head
that run started from (all of it with ``fsync="always"``, up to the last commit with
``"every second"``, nothing without ``persist=``). HEAD replies and event headers carry the
run; a client that sees a run other than the one its sequence numbers came from asks with
FETCH (which names that run) whether the server's history continues what it saw, and the
server answers from its *lineage*, the runs recorded in its persist file with the heads
each one started from::

    HEAD   reply: (head, run)
    FETCH  body:  (after_seq, want_snapshot, run of after_seq or b"" for the current run)
           reply: (head, snapshot or None, events or None, run, continued)
           continued is False when ``after_seq`` of that run is not part of this server's
           history: the client must start again from the current state

Sync markers (server PUB, after a SYNC request)::

    [b"s" + identity, token]

A subscriber that sees its marker knows every later event reaches it.

Swarm (``Kind.SWARM``, the ``SwarmKind`` requests to the broker, the ``WorkOp`` frames
between the broker and its workers): the shapes are in :mod:`zproc._swarmwire`.

The frames zproc's own processes exchange outside ZeroMQ (a child's result, the
``process_map`` pool) are defined in :mod:`zproc._pipes`.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict, TypeVar

from . import _serialization as S
from .exceptions import ProtocolError

__all__ = [
    "EVENT_PREFIX",
    "PROTOCOL_VERSION",
    "SYNC_PREFIX",
    "AtomicForm",
    "Buffered",
    "ChunkStatus",
    "Event",
    "FetchReply",
    "Kind",
    "Method",
    "Status",
    "SwarmKind",
    "WorkOp",
]

PROTOCOL_VERSION = 3
#: Length of a server run token.
RUN_SIZE = 8

EVENT_PREFIX = b"e"
SYNC_PREFIX = b"s"

Frame = bytes | memoryview
_R = TypeVar("_R", bound=tuple)  # type: ignore[type-arg]


class Kind(enum.IntEnum):
    """Request kinds. The body of each is described next to it."""

    PING = 1  # body: payload bytes (raw). reply: (payload, server pid)
    META = 2  # body: empty. reply: dict with versions, pid, history size
    HEAD = 3  # body: empty. reply: (current sequence number of the namespace, run)
    SNAPSHOT = 4  # body: empty. reply: (seq, dict)
    CALL = 5  # method: a Method. body: pickled args tuple. reply: the method's result
    ATOMIC = 6  # method: an AtomicForm. body: (fn, args, kwargs) as it says. reply: fn's result
    FETCH = 7  # body: (after_seq, want_snapshot, run). reply: FetchReply (see "runs")
    SYNC = 8  # body: token bytes (raw). reply: None; publishes a sync marker
    TIME = 9  # body: empty. reply: the server's time.time()
    SWARM = 10  # body: settings dict (may be empty). reply: the broker's endpoints
    COORD = 11  # method: a CoordOp. body: its record (zproc._coordwire). reply: there too
    STATS = 12  # body: empty. reply: dict of the server's figures (see State.stats)
    PIPELINE = 16  # body: list of pickled (method, args). reply: [(status, body), ...]


class SwarmKind(enum.IntEnum):
    """Requests to the swarm broker's tasks endpoint (shapes in :mod:`zproc._swarmwire`)."""

    SUBMIT = 32
    RESULTS = 33
    FORGET = 34
    INFO = 35


class Method(enum.IntEnum):
    """The fixed allow-list of dict operations a CALL request may name."""

    GETITEM = 1
    SETITEM = 2
    DELITEM = 3
    CONTAINS = 4
    LEN = 5
    KEYS = 6
    EQ = 7
    NE = 8
    CLEAR = 9
    GET = 10
    POP = 11
    POPITEM = 12
    SETDEFAULT = 13
    UPDATE = 14
    FROMKEYS = 15
    COPY = 16
    SET = 17  # replace the whole dict


class AtomicForm(enum.IntEnum):
    """How the function of an ATOMIC request travels (the request's method field)."""

    CALL = 0  # body: pickled (fn, args, kwargs); fn by name, or by value (not kept)
    DEFINE = 1  # body: (cloudpickled fn, args, kwargs); the server keeps fn by its digest
    DIGEST = 2  # body: (digest, args, kwargs): a function a DEFINE sent to this server run


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


#: Plain ints for the hot paths (an enum member lookup costs more than the comparison).
_CALL = int(Kind.CALL)
OK = int(Status.OK)
ERROR = int(Status.ERROR)

_REQUEST = struct.Struct("<BBBIH")
_REPLY = struct.Struct("<BBIQ")
#: The largest namespace, utf-8 encoded (its length is a field of the request header).
MAX_NAMESPACE_BYTES = 0xFFFF
_EVENTS = struct.Struct("<BQQ8s")
_REPLY_SIZE = _REPLY.size
#: The size of a request's fixed header (before its namespace).
REQUEST_SIZE = _REQUEST.size
#: Builds a named tuple from a tuple without its Python-level constructor (hot paths).
_new_tuple = tuple.__new__


class Request(NamedTuple):
    kind: int
    method: int
    request_id: int
    namespace: str


class Event(NamedTuple):
    """One state change, as published by the server."""

    seq: int
    origin: bytes
    timestamp: float
    changes: dict[Any, Any]
    deleted: tuple[Any, ...]
    old: dict[Any, Any] | None


class HeadReply(NamedTuple):
    head: int
    run: bytes


class FetchReply(NamedTuple):
    """The reply to a FETCH: the server's head and run, and what came after the position
    asked for (``events``, or ``snapshot`` when those left the history)."""

    head: int
    snapshot: dict[Any, Any] | None
    events: list[Event] | None
    run: bytes
    continued: bool


# -- requests --------------------------------------------------------------------------


def request_frame(kind: int, method: int, request_id: int, namespace: bytes,
                  body: bytes) -> bytes:
    """The frame of a request. ``namespace`` is already utf-8 encoded (at most
    :data:`MAX_NAMESPACE_BYTES`); a :class:`Buffered` body's buffers are not in it."""
    return _REQUEST.pack(PROTOCOL_VERSION, kind, method, request_id, len(namespace)) + (
        namespace + body)


def _parse_header(frame: Frame, peer: str) -> tuple[int, int, int, str, int]:
    """``(kind, method, request_id, namespace, offset of the body)`` of a request frame
    for ``peer``."""
    try:
        version, kind, method, request_id, size = _REQUEST.unpack_from(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError(f"malformed request header ({len(frame)} bytes)") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported by this {peer} (it speaks "
            f"{PROTOCOL_VERSION}); use the same zproc version on both sides"
        )
    offset = _REQUEST.size + size
    if len(frame) < offset:
        raise ProtocolError(f"malformed request header ({len(frame)} bytes)")
    try:
        namespace = str(frame[_REQUEST.size : offset], "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("a request's namespace is not utf-8") from exc
    return kind, method, request_id, namespace, offset


def parse_request(frame: bytes) -> tuple[Request, bytes]:
    """Decode a request frame into its header and body; raise :class:`ProtocolError` on
    anything malformed."""
    kind, method, request_id, namespace, offset = _parse_header(frame, "server")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown request kind {kind}")
    if kind == _CALL and method not in _METHODS:
        raise ProtocolError(f"unknown or forbidden dict method code {method}")
    if not namespace:
        raise ProtocolError("empty namespace")
    return _new_tuple(Request, (kind, method, request_id, namespace)), frame[offset:]


def request_id_of(frame: Frame) -> int | None:
    """Best-effort request id of a (possibly malformed) header, for the error reply."""
    try:
        return int(_REQUEST.unpack_from(frame)[3])
    except (struct.error, TypeError):
        return None


def request_key(frame: Frame) -> tuple[int, str]:
    """``(kind << 8 | method, namespace)`` of a request frame that :func:`parse_request`
    accepted (for the server's counters)."""
    _, kind, method, _, size = _REQUEST.unpack_from(frame)
    namespace = str(frame[_REQUEST.size : _REQUEST.size + size], "utf-8", "replace")
    return kind << 8 | method, namespace


class Rejected(ProtocolError):
    """A routed request that cannot be served. ``reply``: the error reply to send to its
    sender, or None when its header names no request id (the message is dropped)."""

    def __init__(self, message: str, reply: list[bytes] | None) -> None:
        super().__init__(message)
        self.reply = reply


def parse_routed(
    frames: list[Any], parse: Callable[[bytes], tuple[Request, bytes]]
) -> tuple[Request, bytes]:
    """The request and body of a message ``[identity, request, *buffers]`` read from a
    ROUTER (a :class:`Buffered` body when buffers follow).

    ``parse`` is :func:`parse_request` (the server) or :func:`parse_swarm_request` (the
    swarm broker). Raise :class:`Rejected` on a wrong frame count or a malformed header,
    with the error reply to send when the header names a request id.
    """
    if len(frames) >= 2:
        try:
            request, body = parse(frames[1])
        except ProtocolError as exc:  # raised from here: no cycle keeps the frames alive
            raise _rejected(frames, exc, f"rejected a malformed request: {exc}") from None
        if len(frames) == 2:
            return request, body
        if request.kind == _CALL:  # a CALL's big buffers follow it, one frame each
            return request, body_frames([body, *frames[2:]], 0)
    error = ProtocolError(f"a request is 1 frame, got {len(frames) - 1}")
    raise _rejected(frames, error, f"dropped a request with {len(frames)} frames (expected 2)")


def _rejected(frames: list[bytes], error: ProtocolError, message: str) -> Rejected:
    rid = request_id_of(frames[1]) if len(frames) >= 2 else None
    return Rejected(message, None if rid is None else error_reply(frames[0], rid, error))


_KINDS = frozenset(int(k) for k in Kind)
_ATOMIC_FORMS = frozenset(int(f) for f in AtomicForm)
_ATOMIC_CALL, _ATOMIC_DEFINE, _ATOMIC_DIGEST = (int(f) for f in AtomicForm)
_METHODS = frozenset(int(m) for m in Method)
_READ_KINDS = frozenset(
    int(k) for k in (Kind.PING, Kind.META, Kind.HEAD, Kind.SNAPSHOT, Kind.FETCH, Kind.SYNC,
                     Kind.TIME, Kind.SWARM, Kind.STATS, SwarmKind.RESULTS, SwarmKind.INFO)
)
_READ_METHODS = frozenset(
    int(m) for m in (Method.GETITEM, Method.CONTAINS, Method.LEN, Method.KEYS, Method.EQ,
                     Method.NE, Method.GET, Method.FROMKEYS, Method.COPY)
)


def is_read_only(kind: int, method: int) -> bool:
    """True for requests that change no state: safe to send again if the first was lost."""
    return kind in _READ_KINDS or (kind == _CALL and method in _READ_METHODS)

# -- replies ---------------------------------------------------------------------------


def reply(identity: bytes, status: int, request_id: int, body: bytes, head: int = 0
          ) -> list[Any]:
    """The frames of a reply to ``identity`` (through a ROUTER); ``head`` is the
    namespace's sequence number after the request."""
    frame = _REPLY.pack(PROTOCOL_VERSION, status, request_id, head) + body
    if type(body) is Buffered:
        return [identity, frame, *body.buffers]
    return [identity, frame]


def error_reply(identity: bytes, request_id: int, exc: BaseException) -> list[bytes]:
    """The frames of an error reply to ``identity`` (through a ROUTER)."""
    return reply(identity, ERROR, request_id, S.dumps_exception(exc))


class Buffered(bytes):
    """A body frame, and in ``buffers`` the out-of-band frames that follow it."""

    buffers: list[Any]


def encode_buffered(obj: Any) -> bytes:
    """``obj`` pickled, as a :class:`Buffered` body when it has big buffers."""
    return _body(*S.dumps_buffers(obj))


def _body(data: bytes, buffers: list[memoryview]) -> bytes:
    """A pickle and its out-of-band buffers as one body (:class:`Buffered` with any)."""
    return body_frames([data, *buffers], 0) if buffers else data


def body_frames(frames: list[Any], first: int) -> bytes:
    """The body at ``frames[first]``, with the frames after it as its buffers."""
    if len(frames) == first + 1:
        return frames[first]  # type: ignore[no-any-return]
    body = Buffered(frames[first])
    body.buffers = frames[first + 1 :]
    return body


def decode_buffered(body: Frame) -> Any:
    """The object of a body from :func:`encode_buffered` or :func:`body_frames`."""
    return S.loads(body, getattr(body, "buffers", None))


def parse_reply(frames: list[Any]) -> tuple[int, int, int, Frame]:
    """``(status, request_id, head, body)`` of the frames of a reply (the frames after
    the first one are the body's buffers); raise :class:`ProtocolError` if malformed."""
    frame = frames[0]
    try:
        version, status, request_id, head = _REPLY.unpack_from(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError(f"malformed reply header ({len(frame)} bytes)") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the server speaks protocol version {version}, this client {PROTOCOL_VERSION}; "
            f"use the same zproc version on both sides"
        )
    # a big body is read in place (a memoryview keeps the frame alive)
    body = frame[_REPLY_SIZE:] if len(frame) < S.OUT_OF_BAND else memoryview(frame)[_REPLY_SIZE:]
    if len(frames) > 1:
        return status, request_id, head, body_frames([bytes(body), *frames[1:]], 0)
    return status, request_id, head, body


# -- events ----------------------------------------------------------------------------


def event_topic(namespace: bytes) -> bytes:
    return EVENT_PREFIX + namespace + b"\0"


def events_header(first_seq: int, last_seq: int, run: bytes) -> bytes:
    return _EVENTS.pack(PROTOCOL_VERSION, first_seq, last_seq, run)


def parse_events_header(frame: Frame) -> tuple[int, int, bytes]:
    """``(first_seq, last_seq, run)`` of an event message."""
    try:
        version, first, last, run = _EVENTS.unpack_from(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError("malformed event header") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"event protocol version {version} != {PROTOCOL_VERSION}")
    return first, last, run


def frame_size(frame: Frame) -> int:
    """The bytes of a body frame and of the buffers that follow it (:class:`Buffered`)."""
    buffers = getattr(frame, "buffers", None)
    return len(frame) + (sum(b.nbytes for b in buffers) if buffers else 0)


def events_message(topic: bytes, first: int, last: int, run: bytes,
                   events: list[bytes]) -> list[Frame]:
    """The frames of one event message: events ``first`` to ``last`` (their frames from
    :func:`new_event`), each followed by its buffers, counted in the header."""
    header = events_header(first, last, run)
    if Buffered not in map(type, events):
        return [topic, header, *events]
    counts = [len(getattr(frame, "buffers", ())) for frame in events]
    frames: list[Frame] = [topic, header + struct.pack(f"<{len(counts)}I", *counts)]
    for frame in events:
        frames.append(frame)
        frames.extend(getattr(frame, "buffers", ()))
    return frames


def decode_events(frames: list[Any]) -> list[tuple[Any, ...]]:
    """The event tuples of an event message ``[topic, header, event, ...]``, each event
    with the buffers its header counts. Raise :class:`ProtocolError` when the frames do
    not match the header (the message is then lost: fetch its events again)."""
    first, last, _ = parse_events_header(frames[1])
    count = last - first + 1
    extra = len(frames[1]) - _EVENTS.size
    if extra:
        if extra != 4 * count:
            raise ProtocolError(
                f"an event message of {count} events counts the buffers of {extra / 4:g}"
            )
        counts: tuple[int, ...] = struct.unpack_from(f"<{count}I", frames[1], _EVENTS.size)
        buffered = sum(counts)
    else:
        counts, buffered = (), 0
    if len(frames) != 2 + count + buffered:
        raise ProtocolError(
            f"an event message of {count} events with {buffered} buffers has "
            f"{len(frames) - 2} frames after its header, not {count + buffered}"
        )
    counts = counts or (0,) * count
    events: list[tuple[Any, ...]] = []
    index = 2
    for buffers in counts:
        body, index = frames[index], index + 1 + buffers
        event = S.loads_frames(body, frames[index - buffers : index]) if buffers else \
            S.loads(body)
        if type(event) is not tuple or len(event) != 6:
            raise ProtocolError(f"malformed event frame ({type(event).__name__})")
        events.append(event)
    return events


# -- heads, fetches and runs -----------------------------------------------------------


def head_reply(reply: Any) -> HeadReply:
    """``(head, run)`` of a decoded HEAD reply; raise :class:`ProtocolError` if malformed."""
    try:
        head, run = reply
        return HeadReply(int(head), bytes(run))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed HEAD reply {reply!r:.80}") from exc


def fetch_request(after_seq: int, want_snapshot: bool, run: bytes) -> bytes:
    """The body of a FETCH for the events after ``after_seq`` of history ``run``."""
    return S.dumps((after_seq, want_snapshot, run))


def parse_fetch_request(body: Frame) -> tuple[int, bool, bytes]:
    """``(after_seq, want_snapshot, run)`` of a FETCH body."""
    try:
        after, want_snapshot, run = S.loads(body)
        if type(after) is not int or after < 0 or not isinstance(run, bytes):
            raise TypeError
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            "a FETCH body must be (after_seq >= 0, want_snapshot, run bytes)"
        ) from exc
    return after, bool(want_snapshot), run


def encode_fetch_reply(reply: FetchReply) -> bytes:
    """The body of a FETCH reply, its big values as buffers (:class:`Buffered`), copied
    when they could change in place before the reply leaves."""
    values = [reply.snapshot.values()] if reply.snapshot else []
    for event in reply.events or ():
        values.append(event.changes.values())
        if event.old:
            values.append(event.old.values())
    return _body(*S.dumps_changes(tuple(reply), itertools.chain.from_iterable(values), 4))


def fetch_reply(reply: Any) -> FetchReply:
    """A decoded FETCH reply as a :class:`FetchReply`."""
    try:
        return FetchReply(*reply)
    except TypeError as exc:
        raise ProtocolError(f"malformed FETCH reply {reply!r:.80}") from exc


# -- the other bodies ------------------------------------------------------------------
#
# A body with several fields is a record below (a named tuple): :func:`encode` writes it
# as a plain tuple (the bytes name no class), :func:`decode` reads it back. A body of one
# value (a float, a dict, a bool, bytes) is that value, pickled.


def encode(record: tuple[Any, ...]) -> bytes:
    """The body of a record, as a plain tuple."""
    return S.dumps(tuple(record))


def decode(cls: type[_R], value: Any) -> _R:
    """A decoded body as the record ``cls``; raise :class:`ProtocolError` if it does not fit."""
    try:
        return cls(*value)
    except TypeError as exc:
        raise ProtocolError(
            f"malformed {cls.__name__} {value!r:.80}; use the same zproc version on both sides"
        ) from exc


class SnapshotReply(NamedTuple):
    seq: int
    data: dict[Any, Any]


class PingReply(NamedTuple):
    """The reply to a PING (whose body is a payload, raw): that payload, the server's pid."""

    payload: bytes
    pid: int


class SwarmReply(NamedTuple):
    """The reply to a SWARM (whose body is a settings dict): the broker's endpoints."""

    tasks: str
    workers: str


class Meta(TypedDict):
    """The reply to a META."""

    version: str
    protocol: int
    pid: int
    history_size: int
    namespaces: list[str]
    stats: dict[str, int]
    started: float


def parse_call_request(body: Frame) -> tuple[Any, ...]:
    """The arguments of a CALL body (empty body: no arguments)."""
    args = S.loads(body, getattr(body, "buffers", None)) if body else ()
    if not isinstance(args, tuple):
        raise ProtocolError("CALL arguments must be a tuple")
    return args


def atomic_request(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], define: bool = False
) -> tuple[int, bytes]:
    """The method (an :class:`AtomicForm`) and body of an ATOMIC request. A function sent
    by value goes whole (DEFINE) when first pickled or with ``define``, else by digest (a
    server without it answers ``UnknownFunctionError``: send it again with ``define``)."""
    pickled = S.pickled_function(fn)
    if pickled is None:
        return _ATOMIC_CALL, S.dumps_call(fn, args, kwargs)
    digest, data, new = pickled
    if new or define:
        return _ATOMIC_DEFINE, S.dumps_any((data, args, kwargs))
    return _ATOMIC_DIGEST, S.dumps_any((digest, args, kwargs))


def parse_atomic_request(method: int, body: Frame) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(head, args, kwargs)`` of an ATOMIC request: ``head`` is the function (CALL), its
    pickle (DEFINE) or its digest (DIGEST)."""
    if method not in _ATOMIC_FORMS:
        raise ProtocolError(f"unknown ATOMIC form {method}")
    try:
        head, args, kwargs = S.loads(body)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("an ATOMIC body must be (function, args, kwargs)") from exc
    if method != _ATOMIC_CALL and type(head) is not bytes:
        raise ProtocolError(f"an ATOMIC body of form {method} must start with bytes (the "
                            f"function's pickle or digest)")
    if type(args) is not tuple or type(kwargs) is not dict:
        raise ProtocolError("an ATOMIC body's arguments must be a tuple and a dict")
    return head, args, kwargs


def parse_swarm_settings(body: Frame) -> dict[str, Any]:
    settings = S.loads(body) if body else {}
    if not isinstance(settings, dict):
        raise ProtocolError(f"malformed SWARM settings {settings!r:.80}")
    return settings


def pipeline_op(method: int, args: tuple[Any, ...]) -> bytes:
    """One operation of a PIPELINE (whose body is the pickled list of them)."""
    return S.dumps((int(method), args))


def parse_pipeline_request(body: Frame) -> list[bytes]:
    ops = S.loads(body)
    if not isinstance(ops, list):
        raise ProtocolError("PIPELINE body must be a list of operations")
    return ops


def parse_pipeline_op(op: Frame) -> tuple[int, tuple[Any, ...]]:
    """``(method, args)`` of one pipelined operation; only an allowed dict method."""
    method, args = S.loads(op)
    if type(method) is not int or method not in _METHODS or type(args) is not tuple:
        raise ProtocolError(
            f"a pipelined operation must be (dict method code, args tuple), got method "
            f"{method!r}"
        )
    return method, args


def pipeline_reply(reply: Any, count: int) -> list[tuple[int, bytes]]:
    """The ``(status, body)`` pairs of a decoded reply to a pipeline of ``count`` ops."""
    if not isinstance(reply, list) or len(reply) != count:
        raise ProtocolError(
            f"the server answered a pipeline of {count} operations with "
            f"{len(reply) if isinstance(reply, list) else 'no'} results; use the "
            f"same zproc version on both sides"
        )
    return reply


def sync_topic(identity: bytes) -> bytes:
    return SYNC_PREFIX + identity


def encode_event(event: Event) -> bytes:
    """One event frame, its values in the pickle (the broadcast carries no old values)."""
    return S.dumps((event.seq, event.origin, event.timestamp, event.changes, event.deleted, None))


def new_event(
    seq: int,
    origin: bytes,
    timestamp: float,
    changes: dict[Any, Any],
    deleted: tuple[Any, ...],
    old: dict[Any, Any] | None,
) -> tuple[Event, bytes]:
    """An event and its frame, built for the server's hot path: no named tuple
    constructor, no attribute reads. The frame is :func:`encode_event`'s, except that
    big values leave it as buffers (a :class:`Buffered` frame, see :func:`events_message`):
    ``bytes`` without a copy, those that could change in place copied once."""
    record = (seq, origin, timestamp, changes, deleted, None)
    frame = _body(*S.dumps_changes(record, changes.values()))
    return _new_tuple(Event, (seq, origin, timestamp, changes, deleted, old)), frame


def decode_event(frame: Frame) -> Event:
    """Decode one event frame; raise :class:`ProtocolError` if malformed."""
    try:
        return Event(*S.loads(frame))
    except TypeError as exc:
        raise ProtocolError("malformed event frame") from exc


# -- swarm -----------------------------------------------------------------------------


class WorkOp(enum.IntEnum):
    """Operations of the frames between the swarm broker and its workers."""

    READY = 1
    RESULT = 2
    BYE = 3
    HEARTBEAT = 4
    CHUNK = 5
    PONG = 6


class ChunkStatus(enum.IntEnum):
    OK = 0
    FAILED = 1  # the target raised (or a result did not pickle)
    LOST = 2  # every attempt ended with its worker gone
    NEED_CODE = 3  # the worker lacks the task's code: send the chunk again with it


_SWARM_KINDS = frozenset(int(k) for k in SwarmKind)


def parse_swarm_request(frame: bytes) -> tuple[Request, bytes]:
    """Decode a request frame to the swarm broker (a ``SwarmKind``) into its header and
    body."""
    kind, method, request_id, namespace, offset = _parse_header(frame, "broker")
    if kind not in _SWARM_KINDS:
        raise ProtocolError(f"unknown swarm request kind {kind}")
    return Request(kind, method, request_id, namespace), frame[offset:]
