"""The wire format: every message kind and shape zproc sends, and nothing else.

Requests (client DEALER -> server ROUTER, on ``server_address[0]``)::

    [header, body]
    header = struct "<BBBI" (version, kind, method, request_id) + namespace (utf-8)
    body   = pickled arguments; the shape depends on the kind (see ``Kind``)

The ROUTER sees ``[identity, header, body]``; the identity is the State's 8-byte id.

Replies (server -> the requesting DEALER)::

    [header, body]
    header = struct "<BBI" (version, status, request_id)
    body   = pickled result (status OK) or a serialized exception (status ERROR)

Events (server PUB -> client SUB, on ``server_address[1]``)::

    [topic, header, body]
    topic  = b"e" + namespace (utf-8) + b"\\0"     (SUB filters by namespace in ZeroMQ)
    header = struct "<BQQ" (version, first_seq, last_seq)
    body   = pickled list of event tuples, one per state change, in server order:
             (seq, origin, timestamp, changes, deleted, old)
             seq       per-namespace sequence number, strictly increasing by one
             origin    identity of the State that caused it (b"" for the server itself)
             changes   {key: new value} for keys added or changed
             deleted   tuple of keys removed
             old       {key: previous value} for changed/removed keys that existed; only
                       in FETCH replies, None on the broadcast

Sync markers (server PUB, after a SYNC request)::

    [b"s" + identity, token]

A subscriber that sees its marker knows every later event reaches it.
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
    "Event",
    "Kind",
    "Method",
    "Status",
]

PROTOCOL_VERSION = 1

EVENT_PREFIX = b"e"
SYNC_PREFIX = b"s"

Frame = bytes | memoryview


class Kind(enum.IntEnum):
    """Request kinds. The body of each is described next to it."""

    PING = 1  # body: payload bytes (raw). reply: (payload, server pid)
    META = 2  # body: empty. reply: dict with versions, pid, history size
    HEAD = 3  # body: empty. reply: current sequence number of the namespace
    SNAPSHOT = 4  # body: empty. reply: (seq, dict)
    CALL = 5  # method: a Method. body: pickled args tuple. reply: the method's result
    ATOMIC = 6  # body: cloudpickled (fn, args, kwargs). reply: fn's result
    FETCH = 7  # body: (after_seq, want_snapshot). reply: (head, snapshot|None, events|None)
    SYNC = 8  # body: token bytes (raw). reply: None; publishes a sync marker
    TIME = 9  # body: empty. reply: the server's time.time()


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


_REQUEST = struct.Struct("<BBBI")
_REPLY = struct.Struct("<BBI")
_EVENTS = struct.Struct("<BQQ")


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


# -- requests --------------------------------------------------------------------------


def request_header(kind: int, method: int, request_id: int, namespace: bytes) -> bytes:
    """Header frame of a request. ``namespace`` is already utf-8 encoded."""
    return _REQUEST.pack(PROTOCOL_VERSION, kind, method, request_id) + namespace


def parse_request(frame: Frame) -> Request:
    """Decode a request header; raise :class:`ProtocolError` on anything malformed."""
    try:
        version, kind, method, request_id = _REQUEST.unpack_from(frame)
        namespace = bytes(frame[_REQUEST.size :]).decode()
    except (struct.error, UnicodeDecodeError, TypeError) as exc:
        raise ProtocolError(f"malformed request header ({len(frame)} bytes)") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported by this server (it speaks "
            f"{PROTOCOL_VERSION}); use the same zproc version on both sides"
        )
    if kind not in _KINDS:
        raise ProtocolError(f"unknown request kind {kind}")
    if kind == Kind.CALL and method not in _METHODS:
        raise ProtocolError(f"unknown or forbidden dict method code {method}")
    if not namespace:
        raise ProtocolError("empty namespace")
    return Request(kind, method, request_id, namespace)


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
                     Kind.TIME)
)
_READ_METHODS = frozenset(
    int(m) for m in (Method.GETITEM, Method.CONTAINS, Method.LEN, Method.KEYS, Method.EQ,
                     Method.NE, Method.GET, Method.FROMKEYS, Method.COPY)
)


def is_read_only(kind: int, method: int) -> bool:
    """True for requests that change no state: safe to send again if the first was lost."""
    return kind in _READ_KINDS or (kind == Kind.CALL and method in _READ_METHODS)

# -- replies ---------------------------------------------------------------------------


def reply_header(status: int, request_id: int) -> bytes:
    return _REPLY.pack(PROTOCOL_VERSION, status, request_id)


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


# -- events ----------------------------------------------------------------------------


def event_topic(namespace: bytes) -> bytes:
    return EVENT_PREFIX + namespace + b"\0"


def events_header(first_seq: int, last_seq: int) -> bytes:
    return _EVENTS.pack(PROTOCOL_VERSION, first_seq, last_seq)


def parse_events_header(frame: Frame) -> tuple[int, int]:
    try:
        version, first, last = _EVENTS.unpack_from(frame)
    except (struct.error, TypeError) as exc:
        raise ProtocolError("malformed event header") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"event protocol version {version} != {PROTOCOL_VERSION}")
    return first, last


def sync_topic(identity: bytes) -> bytes:
    return SYNC_PREFIX + identity


def encode_event(event: Event) -> bytes:
    """One event frame (the broadcast carries no old values)."""
    return S.dumps((event.seq, event.origin, event.timestamp, event.changes, event.deleted, None))


def decode_event(frame: Frame) -> Event:
    """Decode one event frame; raise :class:`ProtocolError` if malformed."""
    try:
        return Event(*S.loads(frame))
    except TypeError as exc:
        raise ProtocolError("malformed event frame") from exc
