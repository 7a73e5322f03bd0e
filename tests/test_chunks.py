"""The chunk engine of process_map and the Swarm, and the pool's and child's frames,
without processes or sockets."""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any

import pytest

from zproc import _pipes as W
from zproc import _serialization as S
from zproc._chunks import (
    CodeCache,
    Failure,
    cut,
    dumps_code,
    failure,
    layout,
    map_inputs,
    map_length,
    read_chunk,
    run_chunk,
)
from zproc.exceptions import RemoteTraceback


def fail_at_3(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x * 10


def add(state: Any, x: int, y: int, *, z: int = 0) -> tuple[Any, int]:
    return state, x + y + z


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling here")


@pytest.mark.parametrize(
    ("length", "chunks", "expected"),
    [
        (10, 4, [(0, 3), (3, 3), (6, 2), (8, 2)]),
        (9, 3, [(0, 3), (3, 3), (6, 3)]),
        (3, 8, [(0, 1), (1, 1), (2, 1)]),  # never an empty chunk
        (1, 1, [(0, 1)]),
        (0, 4, []),
    ],
)
def test_layout(length: int, chunks: int, expected: list[tuple[int, int]]) -> None:
    assert layout(length, chunks) == expected


def test_layout_covers_every_item_once() -> None:
    for length in range(0, 60):
        for chunks in range(1, 12):
            parts = layout(length, chunks)
            assert len(parts) == min(length, chunks)
            assert [i for start, count in parts for i in range(start, start + count)] == list(
                range(length)
            )
            sizes = [count for _, count in parts]
            assert not sizes or max(sizes) - min(sizes) <= 1


def test_inputs_and_cut() -> None:
    items, margs, mkwargs = map_inputs(iter(range(5)), None, ({"z": i} for i in range(4)))
    assert items == [0, 1, 2, 3, 4] and margs is None and mkwargs == [{"z": i} for i in range(4)]
    assert map_length(items, margs, mkwargs) == 4
    assert cut((items, [[1, 2]] * 5, mkwargs), 1, 2) == ([1, 2], [(1, 2), (1, 2)], mkwargs[1:3], 2)
    with pytest.raises(ValueError, match="at least one"):
        map_inputs(None, None, None)


def test_run_chunk_calls_with_state_and_arguments() -> None:
    items = cut(([1, 2, 3], [(10,)] * 3, [{"z": 100}] * 3), 0, 3)
    ok, body = run_chunk((add, (), {}), "st", items)
    assert ok and pickle.loads(body) == [("st", 111), ("st", 112), ("st", 113)]


def test_a_chunk_failing_half_way_keeps_the_results_before_it() -> None:
    ok, body = run_chunk((fail_at_3, (), {}), None, cut((list(range(6)), None, None), 0, 6))
    assert not ok
    record = Failure(*S.loads(body))
    assert record.offset == 3 and S.loads(record.results) == [0, 10, 20]
    assert record.pid == os.getpid() and record.host == socket.gethostname()
    results, error = read_chunk(ok, body, 100, "process_map")
    assert results == [0, 10, 20]
    assert isinstance(error, ValueError) and str(error) == "bad item 3"
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "process_map item 103 failed" in cause.tb and "fail_at_3" in cause.tb


def test_parts_stream_and_the_rest_comes_last() -> None:
    parts: list[list[int]] = []
    count = 200_000
    ok, body = run_chunk(
        (abs, (), {}), None, cut((range(count), None, None), 0, count),
        send_part=lambda part: parts.append(pickle.loads(part)),
    )
    assert ok
    assert [x for part in [*parts, pickle.loads(body)] for x in part] == list(range(count))


def test_an_unpicklable_result_fails_its_item() -> None:
    values = [1, 2, Unpicklable(), 4]
    ok, body = run_chunk(
        (values.__getitem__, (), {}), None, cut((range(4), None, None), 0, 4), start=40
    )
    results, error = read_chunk(ok, body, 40, "swarm task 1")
    assert not ok and results == [1, 2]
    assert isinstance(error, TypeError) and "item 42" in str(error)
    assert "cannot be pickled" in str(error)


def test_reraised_exceptions_propagate() -> None:
    def interrupt(x: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_chunk((interrupt, (), {}), None, cut(([1], None, None), 0, 1),
                  reraise=(KeyboardInterrupt,))
    ok, _ = run_chunk((interrupt, (), {}), None, cut(([1], None, None), 0, 1))
    assert not ok  # otherwise it is the item's failure


def test_failure_of_results_that_do_not_pickle() -> None:
    record = Failure(*S.loads(failure([Unpicklable()], 0, ValueError("x"))))
    assert S.loads(record.results) == []


def test_dumps_code_by_reference_or_by_value() -> None:
    by_ref = dumps_code((fail_at_3, (), {}, False), fail_at_3, (), {})
    assert by_ref == pickle.dumps((fail_at_3, (), {}, False), S.PROTOCOL)
    square = lambda x: x * x  # noqa: E731
    target, *_ = S.loads(dumps_code((square, (), {}, False), square, (), {}))
    assert target(3) == 9
    # fixed arguments always travel by value: __main__ objects in them load anywhere
    with_args = dumps_code((fail_at_3, (1,), {}, False), fail_at_3, (1,), {})
    assert S.loads(with_args)[1] == (1,)


def test_code_cache_decodes_once_and_evicts_the_least_recent() -> None:
    cache = CodeCache(size=2)
    a, b, c = (S.dumps((name,)) for name in "abc")
    first = cache.load(a)
    assert cache.load(a) is first  # decoded once
    cache.load(b)
    cache.load(a)  # a is now the most recent
    cache.load(c)
    assert a in cache and c in cache and b not in cache and len(cache) == 2
    cache.put(1, "code")
    assert cache.get(1) == "code" and cache.get(2) is None and a not in cache


def test_pool_and_child_frames_round_trip() -> None:
    buf = bytearray(W.pool_frame(b"first") + W.pool_frame(b"") + W.pool_frame(b"third")[:-2])
    assert W.split_pool_frames(buf) == [b"first", b""]
    assert bytes(buf) == W.pool_frame(b"third")[:-2]  # the incomplete one waits
    task = W.pool_task(7, 2, 40, b"code", ([1, 2], None, None, 2))
    assert W.parse_pool_task(task) == (7, 2, 40, b"code", ([1, 2], None, None, 2))
    reply = W.pool_reply(7, 2, W.PoolStatus.PART, b"body")
    size = W.pool_frame_size(reply[: W.POOL_SIZE_BYTES])
    task_id, index, status, body = W.parse_pool_reply(reply[W.POOL_SIZE_BYTES :])
    assert size == len(reply) - W.POOL_SIZE_BYTES
    assert (task_id, index, status, bytes(body)) == (7, 2, W.PoolStatus.PART, b"body")
    frame = W.child_result(W.CHILD_VALUE, b"value")
    assert W.parse_child_result(frame[:-1]) is None and W.child_result_size(frame[:3]) is None
    assert W.child_result_size(frame) == len(frame)
    assert W.parse_child_result(frame) == (W.CHILD_VALUE, b"value")
