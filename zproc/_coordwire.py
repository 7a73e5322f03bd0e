"""The coordination requests (``Kind.COORD``): locks and semaphores, by name.

A ``COORD`` request names its operation in the header's method byte (a :class:`CoordOp`)
and carries one record below as its body (written with ``_protocol.encode``). Names live
in the request's namespace, apart from the dict's keys.

Every request comes from a *session*: one per client process and server (16 random
bytes, new after ``fork``), with the process's pid, its start time and its host's id, so
that the server can tell when the process is gone. A handle is a number unique in its
session; a grant is named by the handle and the handle's acquire number (``seq``)::

    DECLARE    DeclareRequest        reply: None (ValueError: another kind or value)
    ACQUIRE    AcquireRequest        reply: (granted, token), sent when granted or when
                                     the wait ends (timeout: None waits without limit,
                                     0 does not wait); token 0 when not granted
    RELEASE    ReleaseRequest        reply: None; LockLostError when the grant is gone
    CANCEL     ReleaseRequest        reply: None; drops the grant or the waiting acquire
                                     ``seq`` (an acquire given up by its caller)
    HEARTBEAT  Session               reply: None; renews the session's leases
    BYE        ByeRequest            reply: None; drops the handles' grants and waits
                                     (every handle of the session when ``handles`` is None)
    LOCKED     name (str)            reply: whether any permit of that name is held
    SET        DeclareRequest        reply: None; sets the event, answers its waiters
    CLEAR      DeclareRequest        reply: None
    IS_SET     DeclareRequest        reply: whether the event is set
    ABORT      DeclareRequest        reply: None; breaks the barrier
    BARRIER    DeclareRequest        reply: (parties waiting, broken)
    PUT        PutRequest            reply: True when put, False when full (timeout 0),
                                     sent when there is room or the wait ends
    POST       PostRequest           no reply (a pipelined put to a queue without bound);
                                     an error is kept and raised by the handle's next
                                     QSIZE or GET
    GET        GetRequest            reply: a list of up to ``want`` pickled items, now
                                     in flight to the handle ([]: empty, the wait ended)
    ACK        PostRequest           no reply; the client has the next item that its get
                                     ``item`` (the seq, 8 bytes little-endian) took
    QCANCEL    ReleaseRequest        reply: None; drops the waiting put or get ``seq`` and
                                     puts back at the head what is in flight to the handle
    QSIZE      SizeRequest           reply: the number of items queued (not in flight)

An event's ``wait`` is an ACQUIRE of the event (granted when it is set: token 0), given up
with CANCEL; an event holds nothing. A barrier's ``wait`` is an ACQUIRE of the barrier
(``value``: its parties), answered ``(True, index)`` when the last party arrives and
``(False, -1)`` when the barrier is broken (a wait timed out or was given up, a waiting
party died or fell silent, ``abort()``); a broken barrier stays broken.
"""

from __future__ import annotations

import enum
import os
from typing import Any, NamedTuple

from . import _serialization as S
from .exceptions import ProtocolError

__all__ = ["CoordOp", "Session"]


class CoordOp(enum.IntEnum):
    DECLARE = 1
    ACQUIRE = 2
    RELEASE = 3
    CANCEL = 4
    HEARTBEAT = 5
    BYE = 6
    LOCKED = 7
    SET = 8
    CLEAR = 9
    IS_SET = 10
    ABORT = 11
    BARRIER = 12
    PUT = 13
    POST = 14
    GET = 15
    ACK = 16
    QCANCEL = 17
    QSIZE = 18


#: The kinds of named primitives (a name is of one kind in its namespace).
LOCK = "lock"
SEMAPHORE = "semaphore"
EVENT = "event"
BARRIER = "barrier"
QUEUE = "queue"
KINDS = (LOCK, SEMAPHORE, EVENT, BARRIER, QUEUE)


class Session(NamedTuple):
    """Who asks: a client process (see the module docstring)."""

    session: bytes
    pid: int
    started: float  # the process's start time (psutil's create_time), against pid reuse
    host: str


class DeclareRequest(NamedTuple):
    name: str
    kind: str
    value: int


class AcquireRequest(NamedTuple):
    name: str
    kind: str
    value: int
    handle: int
    seq: int
    timeout: float | None
    lease: float
    who: Session


class ReleaseRequest(NamedTuple):
    name: str
    handle: int
    seq: int
    session: bytes


class PutRequest(NamedTuple):
    name: str
    maxsize: int
    handle: int
    seq: int
    item: bytes
    timeout: float | None
    lease: float
    who: Session


class GetRequest(NamedTuple):
    name: str
    maxsize: int
    handle: int
    seq: int
    want: int
    timeout: float | None
    lease: float
    who: Session


class PostRequest(NamedTuple):
    name: str
    handle: int
    item: bytes
    session: bytes


class SizeRequest(NamedTuple):
    name: str
    maxsize: int
    handle: int
    session: bytes


class ByeRequest(NamedTuple):
    session: bytes
    handles: list[int] | None


def new_session() -> bytes:
    return os.urandom(16)


def check_name(name: object) -> str:
    """A primitive's name: a non-empty str (TypeError / ValueError otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"a name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("a name must not be empty; give the lock (or other) a name")
    return name


def _check_int(value: object, what: str, least: int, meaning: str = "") -> int:
    if type(value) is not int:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{what} must be >= {least}{meaning}, got {value}")
    return value


def check_value(value: object, what: str = "value") -> int:
    return _check_int(value, what, 1)


def check_maxsize(maxsize: object) -> int:
    return _check_int(maxsize, "maxsize", 0, " (0: no bound)")


def check_lease(lease: object) -> float:
    if isinstance(lease, bool) or not isinstance(lease, (int, float)):
        raise TypeError(f"lease must be a number of seconds, got {type(lease).__name__}")
    if not lease > 0:
        raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
    return float(lease)


def check_timeout(timeout: object) -> float | None:
    """A wait's limit: None or -1 (no limit, as in ``threading``) or seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__}"
        )
    if timeout == -1:
        return None
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0, or -1 / None for no limit; got {timeout!r}")
    return float(timeout)


def parse(cls: type[Any], body: Any) -> Any:
    """A COORD body as the record ``cls``, its fields checked where a wrong type would
    fail later in the server's loop."""
    try:
        value = S.loads(body)
        record = cls(*value) if cls is not str else value
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"malformed coordination request {cls.__name__}; use the same zproc version on "
            f"both sides"
        ) from exc
    if cls is str:
        return check_name(record)
    if cls is AcquireRequest:
        check_name(record.name)
        if record.kind not in KINDS:
            raise ProtocolError(f"unknown kind of primitive {record.kind!r}")
        check_value(record.value)
        check_timeout(record.timeout)
        check_lease(record.lease)
        return record._replace(who=Session(*record.who))
    if cls is DeclareRequest:
        check_name(record.name)
        if record.kind not in KINDS:
            raise ProtocolError(f"unknown kind of primitive {record.kind!r}")
        if record.kind == QUEUE:
            check_maxsize(record.value)
        else:
            check_value(record.value)
    if cls is PutRequest or cls is GetRequest:
        check_name(record.name)
        check_maxsize(record.maxsize)
        check_timeout(record.timeout)
        check_lease(record.lease)
        if cls is GetRequest:
            check_value(record.want, "want")
        elif not isinstance(record.item, bytes):
            raise ProtocolError("a queue's item must travel pickled, as bytes")
        return record._replace(who=Session(*record.who))
    if cls is SizeRequest:
        check_name(record.name)
    return record


def parse_post(body: Any) -> PostRequest:
    """A POST or ACK body (the hot path of queues: fewer checks than :func:`parse`)."""
    try:
        name, handle, item, session = S.loads(body)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("malformed queue request; use the same zproc version on both "
                            "sides") from exc
    if type(name) is not str or not name or type(item) is not bytes:
        raise ProtocolError("malformed queue request; use the same zproc version on both "
                            "sides")
    return PostRequest(name, handle, item, session)
