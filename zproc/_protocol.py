"""The wire format: every message kind and shape zproc sends, and nothing else.

Requests (client DEALER -> server ROUTER, on ``server_address[0]``)::

    [header, body]
    header = struct "<BBBI" (version, kind, method, request_id) + namespace (utf-8)
    body   = pickled arguments; the shape depends on the kind (see ``Kind``)

The ROUTER sees ``[identity, header, body]``; the identity is the State's 8-byte id.

Replies (server -> the requesting DEALER)::

    [header, body]
    header = struct "<BBIQ" (version, status, request_id, head)
    body   = pickled result (status OK) or a serialized exception (status ERROR)

``head`` is the sequence number of the request's namespace once the request was applied
(0 in error replies). A client that reads from its local replica waits until the replica
has reached the highest head it was told, which gives read-your-writes and monotonic
reads. A 6-byte header (no head) reads as head 0.

Pipelines (``Kind.PIPELINE``): the body is a pickled list of operations, each one
separately pickled ``(method, args)`` (a ``Method`` and its argument tuple). The server
applies them in order, each one on its own (validated, then applied, with its own event,
exactly as a ``CALL``); a failing operation does not stop the others. The reply body is
a pickled list with one ``(status, body)`` pair per operation, the body being the
pickled result (``Status.OK``) or the serialized exception (``Status.ERROR``).

Events (server PUB -> client SUB, on ``server_address[1]``)::

    [topic, header, body]
    topic  = b"e" + namespace (utf-8) + b"\\0"     (SUB filters by namespace in ZeroMQ)
    header = struct "<BQQ8s" (version, first_seq, last_seq, run)
    body   = pickled list of event tuples, one per state change, in server order:
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

Swarm (see :mod:`zproc._swarm`). A ``SWARM`` request on ``server_address[0]`` starts the
server's broker thread (once) and returns its two endpoints. Clients then send requests
with the header above to the broker's *tasks* endpoint, with a ``SwarmKind`` as kind
(replies as above)::

    SUBMIT   body: (task, length, code, max_attempts, keep, wait,
                   [(start, count, items), ...])
             reply: (workers connected, None), or with wait > 0 (workers connected, the
             reply of RESULTS from chunk 0). keep=False: the broker drops the task once
             a reply carried its last chunk (or a failed one)
    RESULTS  body: (task, first_chunk, wait). reply: (chunk_count, length, chunks)
             chunks = [(index, start, count, ChunkStatus, body), ...], the consecutive
             finished chunks from first_chunk on; empty if none finished within wait s.
             The reply leaves once first_chunk is finished; for a keep=False task, once
             every chunk is finished, one failed, or the finished results fill a reply
             (or when wait ends): a map's caller wants them all, in one reply
    FORGET   body: task. reply: whether the task was known
    INFO     body: empty. reply: dict (workers, idle, queued, tasks, settings)

Workers speak to the broker's *workers* endpoint with their own frames::

    [work_header, *payload]
    work_header = struct "<BBBQQI" (version, WorkOp, status, counter, task, chunk)

    worker -> broker  READY      counter = chunks received so far; payload: [info]
                      RESULT     task, chunk, ChunkStatus; payload: [body]
                      BYE        leaving; the chunk it holds goes back to the queue
                      HEARTBEAT  (from a second socket) payload: [worker identity]
    broker -> worker  CHUNK      counter = its sequence number; task, chunk;
                                 payload: [code or b"" when the worker has it, items]
                      PONG       answer to a HEARTBEAT; status 1: unknown worker

``code`` is ``(pass_state, namespace, call)`` with ``call`` the pickled
``(target, args, kwargs)``; ``items`` is ``(iterables, map_args, map_kwargs, count)`` for
the chunk. A result body is the pickled list of results (``OK``), or ``(results before
the failure, their count, serialized exception, pid, host)`` (``FAILED``), or a message
(``LOST``: the chunk failed on every attempt it was allowed).
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

from . import _serialization as S
from .exceptions import ProtocolError

__all__ = [
    "EVENT_PREFIX",
    "PROTOCOL_VERSION",
    "SYNC_PREFIX",
    "ChunkStatus",
    "Event",
    "FetchReply",
    "Kind",
    "Method",
    "Status",
    "SwarmKind",
    "WorkOp",
]

PROTOCOL_VERSION = 2
#: Length of a server run token.
RUN_SIZE = 8

EVENT_PREFIX = b"e"
SYNC_PREFIX = b"s"

Frame = bytes | memoryview


class Kind(enum.IntEnum):
    """Request kinds. The body of each is described next to it."""

    PING = 1  # body: payload bytes (raw). reply: (payload, server pid)
    META = 2  # body: empty. reply: dict with versions, pid, history size
    HEAD = 3  # body: empty. reply: (current sequence number of the namespace, run)
    SNAPSHOT = 4  # body: empty. reply: (seq, dict)
    CALL = 5  # method: a Method. body: pickled args tuple. reply: the method's result
    ATOMIC = 6  # body: cloudpickled (fn, args, kwargs). reply: fn's result
    FETCH = 7  # body: (after_seq, want_snapshot, run). reply: FetchReply (see "runs")
    SYNC = 8  # body: token bytes (raw). reply: None; publishes a sync marker
    TIME = 9  # body: empty. reply: the server's time.time()
    SWARM = 10  # body: settings dict (may be empty). reply: the broker's endpoints
    PIPELINE = 16  # body: list of pickled (method, args). reply: [(status, body), ...]


class SwarmKind(enum.IntEnum):
    """Requests to the swarm broker's tasks endpoint (shapes in the module docstring)."""

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


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


#: Plain ints for the hot paths (an enum member lookup costs more than the comparison).
_CALL = int(Kind.CALL)
OK = int(Status.OK)
ERROR = int(Status.ERROR)

_REQUEST = struct.Struct("<BBBI")
_REPLY = struct.Struct("<BBI")
_REPLY_HEAD = struct.Struct("<BBIQ")
_EVENTS = struct.Struct("<BQQ8s")
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


class FetchReply(NamedTuple):
    """The reply to a FETCH: the server's head and run, and what came after the position
    asked for (``events``, or ``snapshot`` when those left the history)."""

    head: int
    snapshot: dict[Any, Any] | None
    events: list[Event] | None
    run: bytes
    continued: bool


# -- requests --------------------------------------------------------------------------


def request_header(kind: int, method: int, request_id: int, namespace: bytes) -> bytes:
    """Header frame of a request. ``namespace`` is already utf-8 encoded."""
    return _REQUEST.pack(PROTOCOL_VERSION, kind, method, request_id) + namespace


def _parse_header(frame: Frame, peer: str) -> tuple[int, int, int, str]:
    """``(kind, method, request_id, namespace)`` of a request header for ``peer``."""
    try:
        version, kind, method, request_id = _REQUEST.unpack_from(frame)
        namespace = bytes(frame[_REQUEST.size :]).decode()
    except (struct.error, UnicodeDecodeError, TypeError) as exc:
        raise ProtocolError(f"malformed request header ({len(frame)} bytes)") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported by this {peer} (it speaks "
            f"{PROTOCOL_VERSION}); use the same zproc version on both sides"
        )
    return kind, method, request_id, namespace


def parse_request(frame: Frame) -> Request:
    """Decode a request header; raise :class:`ProtocolError` on anything malformed."""
    kind, method, request_id, namespace = _parse_header(frame, "server")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown request kind {kind}")
    if kind == _CALL and method not in _METHODS:
        raise ProtocolError(f"unknown or forbidden dict method code {method}")
    if not namespace:
        raise ProtocolError("empty namespace")
    return _new_tuple(Request, (kind, method, request_id, namespace))


def request_id_of(frame: Frame) -> int | None:
    """Best-effort request id of a (possibly malformed) header, for the error reply."""
    try:
        return int(_REQUEST.unpack_from(frame)[3])
    except (struct.error, TypeError):
        return None


_KINDS = frozenset(int(k) for k in Kind)
_METHODS = frozenset(int(m) for m in Method)
_READ_KINDS = frozenset(
    int(k) for k in (Kind.PING, Kind.META, Kind.HEAD, Kind.SNAPSHOT, Kind.FETCH, Kind.SYNC,
                     Kind.TIME, Kind.SWARM, SwarmKind.RESULTS, SwarmKind.INFO)
)
_READ_METHODS = frozenset(
    int(m) for m in (Method.GETITEM, Method.CONTAINS, Method.LEN, Method.KEYS, Method.EQ,
                     Method.NE, Method.GET, Method.FROMKEYS, Method.COPY)
)


def is_read_only(kind: int, method: int) -> bool:
    """True for requests that change no state: safe to send again if the first was lost."""
    return kind in _READ_KINDS or (kind == _CALL and method in _READ_METHODS)

# -- replies ---------------------------------------------------------------------------


def reply_header(status: int, request_id: int, head: int = 0) -> bytes:
    """Header frame of a reply; ``head`` is the namespace's sequence number after it."""
    return _REPLY_HEAD.pack(PROTOCOL_VERSION, status, request_id, head)


def parse_reply(frame: Frame) -> tuple[int, int]:
    """Return ``(status, request_id)``; raise :class:`ProtocolError` if malformed."""
    try:
        version, status, request_id = _REPLY.unpack_from(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError("malformed reply header") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the server speaks protocol version {version}, this client {PROTOCOL_VERSION}; "
            f"use the same zproc version on both sides"
        )
    return status, request_id


def parse_reply_head(frame: Frame) -> tuple[int, int, int]:
    """Return ``(status, request_id, head)``; raise :class:`ProtocolError` if malformed."""
    if len(frame) >= _REPLY_HEAD.size:
        version, status, request_id, head = _REPLY_HEAD.unpack_from(frame)
        if version == PROTOCOL_VERSION:
            return status, request_id, head
    status, request_id = parse_reply(frame)
    return status, request_id, 0


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


# -- heads, fetches and runs -----------------------------------------------------------


def head_reply(reply: Any) -> tuple[int, bytes]:
    """``(head, run)`` of a decoded HEAD reply; raise :class:`ProtocolError` if malformed."""
    try:
        head, run = reply
        return int(head), bytes(run)
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


def fetch_reply(reply: Any) -> FetchReply:
    """A decoded FETCH reply as a :class:`FetchReply`."""
    try:
        return FetchReply(*reply)
    except TypeError as exc:
        raise ProtocolError(f"malformed FETCH reply {reply!r:.80}") from exc


def sync_topic(identity: bytes) -> bytes:
    return SYNC_PREFIX + identity


def encode_event(event: Event) -> bytes:
    """One event frame (the broadcast carries no old values)."""
    return S.dumps((event.seq, event.origin, event.timestamp, event.changes, event.deleted, None))


def new_event(
    seq: int,
    origin: bytes,
    timestamp: float,
    changes: dict[Any, Any],
    deleted: tuple[Any, ...],
    old: dict[Any, Any] | None,
) -> tuple[Event, bytes]:
    """An event and its frame (as :func:`encode_event`), built for the server's hot path:
    no named tuple constructor, no attribute reads."""
    return (
        _new_tuple(Event, (seq, origin, timestamp, changes, deleted, old)),
        S.dumps((seq, origin, timestamp, changes, deleted, None)),
    )


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


_WORK = struct.Struct("<BBBQQI")
_SWARM_KINDS = frozenset(int(k) for k in SwarmKind)


class WorkHeader(NamedTuple):
    op: int
    status: int
    counter: int
    task: int
    chunk: int


def work_header(op: int, *, status: int = 0, counter: int = 0, task: int = 0,
                chunk: int = 0) -> bytes:
    return _WORK.pack(PROTOCOL_VERSION, op, status, counter, task, chunk)


def parse_work(frame: Frame) -> WorkHeader:
    """Decode a worker/broker frame header; raise :class:`ProtocolError` if malformed."""
    try:
        version, op, status, counter, task, chunk = _WORK.unpack(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError(f"malformed swarm frame header ({len(frame)} bytes)") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"swarm protocol version {version} != {PROTOCOL_VERSION}; use the same zproc "
            f"version on the workers and the server"
        )
    return WorkHeader(op, status, counter, task, chunk)


def parse_swarm_request(frame: Frame) -> Request:
    """Decode the header of a request to the swarm broker (a ``SwarmKind``)."""
    kind, method, request_id, namespace = _parse_header(frame, "broker")
    if kind not in _SWARM_KINDS:
        raise ProtocolError(f"unknown swarm request kind {kind}")
    return Request(kind, method, request_id, namespace)


# -- pool and child processes ------------------------------------------------------------
#
# Not ZeroMQ, and never between versions: both ends are started by the same zproc.
#
# A Process's result (child -> parent, on the Process's private pipe), written once,
# before the child exits::
#
#     struct "!cQ" (tag, body size) + body
#     CHILD_VALUE  body = the pickled return value
#     CHILD_ERROR  body = the serialized exception
#     CHILD_EXIT   body = the pickled exit code (sys.exit / ProcessExit in the target)
#
# The ``process_map`` pool (Context <-> worker, one stream socket per worker)::
#
#     connect      the worker sends its POOL_TOKEN_SIZE-byte token first
#     every message: struct "!Q" (size) + message
#     task  (Context -> worker): pickled (task id, chunk index, start, code, items)
#               code  = the target, its fixed arguments and ``stateful`` (zproc._chunks)
#               items = (map_iter part, map_args part, map_kwargs part, count)
#     reply (worker -> Context): struct "!QIB" (task id, chunk index, PoolStatus) + body
#               PART and OK: pickled list of results (PART: more follow for that chunk)
#               FAILED: a failure record (zproc._chunks)

_CHILD_RESULT = struct.Struct("!cQ")
CHILD_VALUE, CHILD_ERROR, CHILD_EXIT = b"V", b"E", b"X"


def child_result(tag: bytes, body: bytes) -> bytes:
    """The frame a child writes on its result pipe."""
    return _CHILD_RESULT.pack(tag, len(body)) + body


def child_result_size(buf: bytes | bytearray) -> int | None:
    """Size of the whole result frame starting ``buf``; ``None`` until its header is in."""
    if len(buf) < _CHILD_RESULT.size:
        return None
    return _CHILD_RESULT.size + int(_CHILD_RESULT.unpack_from(buf)[1])


def parse_child_result(buf: bytes | bytearray) -> tuple[bytes, bytes] | None:
    """``(tag, body)`` of the result frame in ``buf``; ``None`` while it is incomplete."""
    size = child_result_size(buf)
    if size is None or len(buf) < size:
        return None
    tag: bytes = _CHILD_RESULT.unpack_from(buf)[0]
    return tag, bytes(buf[_CHILD_RESULT.size : size])


class PoolStatus(enum.IntEnum):
    """Status of a pool reply."""

    OK = 0  # the chunk's last results
    FAILED = 1  # the target raised, or a result did not pickle: a failure record
    DEAD = 2  # never sent: the Context's mark for a chunk whose worker died
    PART = 3  # results so far; more follow


POOL_TOKEN_SIZE = 16
_POOL_SIZE = struct.Struct("!Q")
POOL_SIZE_BYTES = _POOL_SIZE.size
_POOL_REPLY = struct.Struct("!QIB")


def pool_frame(message: bytes) -> bytes:
    """``message`` with its size in front, as it goes on a pool socket."""
    return _POOL_SIZE.pack(len(message)) + message


def pool_frame_size(prefix: bytes | bytearray) -> int:
    """The message size that a frame's ``POOL_SIZE_BYTES`` first bytes announce."""
    return int(_POOL_SIZE.unpack(prefix)[0])


def split_pool_frames(buf: bytearray) -> list[bytes]:
    """Take the complete messages off the front of ``buf`` (the rest stays in it)."""
    messages = []
    pos = 0
    head = _POOL_SIZE.size
    with memoryview(buf) as view:
        while len(buf) - pos >= head:
            (size,) = _POOL_SIZE.unpack_from(buf, pos)
            end = pos + head + size
            if len(buf) < end:
                break
            messages.append(bytes(view[pos + head : end]))
            pos = end
    if pos:
        del buf[:pos]
    return messages


def pool_task(task_id: int, index: int, start: int, code: bytes, items: Any) -> bytes:
    """The message sending chunk ``index`` of a map to a worker."""
    return S.dumps_any((task_id, index, start, code, items))


def parse_pool_task(message: bytes | memoryview) -> tuple[int, int, int, bytes, Any]:
    """``(task id, chunk index, start, code, items)`` of a pool task message."""
    task_id, index, start, code, items = S.loads(message)
    return task_id, index, start, code, items


def pool_reply(task_id: int, index: int, status: int, body: bytes) -> bytes:
    """A worker's whole reply frame (size prefix included)."""
    head = _POOL_REPLY.pack(task_id, index, status)
    return _POOL_SIZE.pack(len(head) + len(body)) + head + body


def parse_pool_reply(message: bytes) -> tuple[int, int, int, memoryview]:
    """``(task id, chunk index, status, body)`` of a pool reply message."""
    task_id, index, status = _POOL_REPLY.unpack_from(message)
    return task_id, index, status, memoryview(message)[_POOL_REPLY.size :]
