"""Big values: bytes-like values and out-of-band pickle buffers travel as frames of their own.

Real servers, real sockets; small values (in the pickle) and big ones (frames after it)
round-trip through set/get, an AsyncState, and an event to a watcher; a request whose
frames do not match its body is refused with a ProtocolError and the server goes on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import zproc
from zproc import _protocol as P
from zproc import _serialization as S

BIG = S.OUT_OF_BAND + 1  # the first size that leaves the pickle
SIZES = [10, BIG, 3 * 1024 * 1024]


def _values(size: int) -> list[tuple[Any, Any]]:
    """(value sent, value expected back), each with bytes of its own (a value equal to
    the one stored is no change: the stored one stays, whatever its type)."""
    a, b, c, d = (os.urandom(size) for _ in range(4))
    return [
        (a, a),
        (bytearray(b), bytearray(b)),
        (memoryview(c), c),  # a memoryview comes back as bytes
        (memoryview(bytearray(d))[1:], d[1:]),
    ]


def _same(got: Any, expected: Any) -> bool:
    return type(got) is type(expected) and got == expected


@pytest.mark.parametrize("size", SIZES)
def test_bytes_like_values_round_trip(state: zproc.State, size: int) -> None:
    for sent, expected in _values(size):
        state["k"] = sent
        assert _same(state["k"], expected), (type(sent), size)
        assert _same(state.get("k"), expected)
        state.update({"u": sent})
        assert _same(state["u"], expected)
    assert _same(state.pop("u"), expected)
    assert _same(state.setdefault("k", b""), expected)


def test_a_big_value_in_a_container_round_trips(state: zproc.State) -> None:
    data = os.urandom(BIG)
    state["t"] = (data, [data], {"x": bytearray(data)})
    assert state["t"] == (data, [data], {"x": bytearray(data)})


def test_numpy_arrays_round_trip_and_stay_writable(state: zproc.State) -> None:
    np = pytest.importorskip("numpy")
    for array in (np.arange(10.0), np.arange(BIG, dtype=np.uint8),
                  np.arange(600_000, dtype=np.float64).reshape(1000, 600),
                  np.arange(600_000, dtype=np.int32)[::2]):  # not contiguous: in the pickle
        state["a"] = array
        got = state["a"]
        assert got.dtype == array.dtype and got.shape == array.shape
        assert (got == array).all()
        got[0] = 7  # a copy of its own, writable
        assert (state["a"] == array).all()


def test_big_values_reach_a_watcher_and_a_cached_state(server: zproc.ServerAddress) -> None:
    data = os.urandom(BIG)
    with zproc.State(server) as watcher, zproc.State(server, cache=True) as cached, \
            zproc.State(server) as writer:
        assert cached.get("w") is None
        for sent, expected in _values(BIG):
            writer["w"] = sent
            assert _same(watcher.get_when_change("w", live=False, timeout=10), expected)
        writer["w"] = data
        deadline = time.monotonic() + 10
        while cached.get("w") != data and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _same(cached.get("w"), data)


def test_an_async_state_round_trips_big_values(server: zproc.ServerAddress) -> None:
    async def main() -> None:
        async with zproc.AsyncState(server) as state:
            for sent, expected in _values(BIG):
                await state.setitem("k", sent)
                assert _same(await state.getitem("k"), expected)
                await state.update({"u": sent})
                assert _same(await state.get("u"), expected)

    asyncio.run(main())


# -- frames that do not match their body --------------------------------------------------

@pytest.fixture
def dealer(server: zproc.ServerAddress) -> Iterator[zmq.Socket[Any]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    sock.connect(server.req_rep)
    try:
        yield sock
    finally:
        sock.close(0)


def _call(sock: zmq.Socket[Any], rid: int, method: int, body: bytes, *extra: Any) -> Any:
    sock.send_multipart([P.request_frame(P.Kind.CALL, method, rid, b"default", body), *extra])
    reply, *buffers = sock.recv_multipart()
    status, got, _, reply_body = P.parse_reply([reply])
    assert got == rid
    if status == P.ERROR:
        raise S.loads_exception(reply_body)
    return S.loads(reply_body, buffers)


def test_a_wrong_frame_count_is_refused_and_the_server_goes_on(
    dealer: zmq.Socket[Any], state: zproc.State
) -> None:
    data = os.urandom(BIG)
    body, buffers = S.dumps_buffers(("k", data))
    assert len(buffers) == 1
    with pytest.raises(zproc.ProtocolError, match="more out-of-band frames than the 0"):
        _call(dealer, 1, P.Method.SETITEM, body)  # its buffer left out
    with pytest.raises(zproc.ProtocolError, match="1 out-of-band frame"):
        _call(dealer, 2, P.Method.SETITEM, body, bytes(buffers[0]), b"extra")
    with pytest.raises(zproc.ProtocolError, match="1 out-of-band frame"):
        _call(dealer, 3, P.Method.SETITEM, S.dumps(("k", 1)), b"stray")
    assert "k" not in state
    # a well-formed one, by hand and through a State: the server serves on
    assert _call(dealer, 4, P.Method.SETITEM, body, bytes(buffers[0])) is None
    assert state["k"] == data
    assert _call(dealer, 5, P.Method.GETITEM, S.dumps(("k",))) == data


def test_extra_frames_after_a_body_other_than_a_call_are_refused(
    dealer: zmq.Socket[Any]
) -> None:
    frame = P.request_frame(P.Kind.PING, 0, 7, b"default", b"x")
    dealer.send_multipart([frame, os.urandom(BIG)])
    status, rid, _, reply_body = P.parse_reply(dealer.recv_multipart())
    assert (status, rid) == (P.ERROR, 7)
    error = S.loads_exception(reply_body)
    assert isinstance(error, zproc.ProtocolError) and "a request is 1 frame" in str(error)
