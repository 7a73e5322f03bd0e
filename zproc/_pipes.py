"""The frames zproc's own processes exchange outside ZeroMQ: a child's result, and
the ``process_map`` pool's messages.

Not ZeroMQ, and never between versions: both ends are started by the same zproc.

A Process's result (child -> parent, on the Process's private pipe), written once,
before the child exits::

    struct "!cQ" (tag, body size) + body
    CHILD_VALUE  body = the pickled return value
    CHILD_ERROR  body = the serialized exception
    CHILD_EXIT   body = the pickled exit code (sys.exit / ProcessExit in the target)

The ``process_map`` pool (Context <-> worker, one stream socket per worker)::

    connect      the worker sends its POOL_TOKEN_SIZE-byte token first
    every message: struct "!Q" (size) + message
    task  (Context -> worker): pickled (task id, chunk index, start, code, items)
              code  = the target, its fixed arguments and ``stateful`` (zproc._chunks)
              items = (map_iter part, map_args part, map_kwargs part, count)
    reply (worker -> Context): struct "!QIB" (task id, chunk index, PoolStatus) + body
              PART and OK: pickled list of results (PART: more follow for that chunk)
              FAILED: a failure record (zproc._chunks)
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from . import _serialization as S

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
