"""The swarm's messages: the requests to its broker and the frames of its workers (see
:mod:`zproc._broker`, :mod:`zproc._swarm`; the kinds are defined in :mod:`zproc._protocol`).

A ``SWARM`` request on ``server_address[0]`` starts the server's broker thread (once) and
returns its two endpoints. Clients then send requests with the header of
:mod:`zproc._protocol` to the broker's *tasks* endpoint, with a ``SwarmKind`` as kind
(replies as there)::

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
    INFO     body: None. reply: dict (workers, idle, queued, tasks, settings)

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

import struct
from typing import Any, NamedTuple

from . import _serialization as S
from ._protocol import PROTOCOL_VERSION, Frame, WorkOp
from .exceptions import ProtocolError

_WORK = struct.Struct("<BBBQQI")


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


# swarm bodies (a FORGET's is the task id, its reply a bool; an INFO's reply is a dict)

#: A finished chunk in a RESULTS reply: (index, start, count, ChunkStatus, body).
ChunkResult = tuple[int, int, int, int, bytes]


class SubmitRequest(NamedTuple):
    task: int
    length: int
    code: bytes
    max_attempts: int
    keep: bool
    wait: float
    chunks: list[tuple[int, int, bytes]]  # (start, count, items)


class ResultsRequest(NamedTuple):
    task: int
    first: int
    wait: float


class ResultsReply(NamedTuple):
    chunk_count: int
    length: int
    chunks: list[ChunkResult]


class SubmitReply(NamedTuple):
    workers: int
    results: ResultsReply | None  # a plain tuple on the wire: decode it in turn


class WorkerInfo(NamedTuple):
    """The payload of a READY."""

    pid: int
    host: str


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def parse_submit_request(body: Frame) -> SubmitRequest:
    """A SUBMIT body, checked: fields that would fail later, in the broker's loop, fail here."""
    try:
        task, length, code, max_attempts, keep, wait, layout = S.loads(body)
        problem = _submit_problem(task, length, code, max_attempts, layout)
        wait = float(wait)
    except (TypeError, ValueError):
        problem = "not (task, length, code, max_attempts, keep, wait, chunks)"
    if problem:
        raise ProtocolError(
            f"malformed swarm SUBMIT: {problem}; use the same zproc version on both sides"
        )
    return SubmitRequest(task, length, code, max_attempts, bool(keep), wait, list(layout))


def _submit_problem(task: Any, length: Any, code: Any, max_attempts: Any, layout: Any) -> str:
    if not _is_int(task, 1, 2**64 - 1):
        return f"task id {task!r} is not an int in [1, 2**64)"
    if not _is_int(length, 0, 2**63) or not _is_int(max_attempts, -(2**63), 2**63):
        return f"length {length!r} or max_attempts {max_attempts!r} is not an int"
    if type(code) is not bytes:
        return f"the code is a {type(code).__name__}, not bytes"
    if not isinstance(layout, (list, tuple)) or len(layout) >= 2**32:
        return "the chunks are not a list"
    for part in layout:
        if not (
            isinstance(part, tuple) and len(part) == 3 and _is_int(part[0], 0, 2**63)
            and _is_int(part[1], 0, 2**63) and type(part[2]) is bytes
        ):
            return f"a chunk is not (start, count, items bytes): {part!r:.80}"
    return ""


def encode_results_reply(
    chunk_count: int, length: int, chunks: list[ChunkResult], workers: int | None = None
) -> bytes:
    """A RESULTS reply; with ``workers``, the reply (a SubmitReply) to a SUBMIT that waited."""
    payload = (chunk_count, length, chunks)
    return S.dumps(payload if workers is None else (workers, payload))


def chunk_message(counter: int, task: int, chunk: int, code: bytes, items: bytes) -> list[bytes]:
    """A CHUNK to a worker: its code (``b""`` when the worker has it) and its items."""
    return [work_header(WorkOp.CHUNK, counter=counter, task=task, chunk=chunk), code, items]


def pong_message(unknown: bool) -> list[bytes]:
    """The answer to a HEARTBEAT; ``unknown``: the broker does not know that worker."""
    return [work_header(WorkOp.PONG, status=unknown)]


def parse_work_message(frames: list[bytes]) -> tuple[WorkHeader, bytes | None]:
    """The header and the payload frame (None if absent) of a worker's message."""
    return parse_work(frames[0]), frames[1] if len(frames) > 1 else None
