"""Big values in events: the broadcast, the replay history, FETCH replies and the persist
journal carry them as buffers of their own.

Real servers, real sockets: a watcher and a cached State get 1 MB ``bytes``, ``bytearray``,
``memoryview`` and NumPy values live, through a replay (FETCH) and after a persisted
server restart; an event message whose frames do not match its header is fetched again;
the history's byte budget counts the buffers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import stop

import zproc
from zproc import _protocol as P
from zproc import _serialization as S

MB = 1_000_000
MIB = 1024 * 1024
FORK = multiprocessing.get_context("fork")


def _values() -> list[tuple[Any, Any]]:
    """(value sent, value expected back), 1 MB each, each with bytes of its own."""
    a, b, c = (os.urandom(MB) for _ in range(3))
    values: list[tuple[Any, Any]] = [(a, a), (bytearray(b), bytearray(b)), (memoryview(c), c)]
    try:
        import numpy as np
    except ImportError:
        return values
    array = np.random.default_rng().random(MB // 8)  # 1 MB of float64, no NaN
    return [*values, (array, array)]


def _same(got: Any, expected: Any) -> bool:
    if type(expected).__module__ == "numpy":
        return (type(got) is type(expected) and got.dtype == expected.dtype
                and got.shape == expected.shape and bool((got == expected).all()))
    return type(got) is type(expected) and got == expected


def _until(read: Callable[[], Any], expected: Any, timeout: float = 10) -> Any:
    """``read()`` once it returns ``expected`` (the last value read, after ``timeout``)."""
    deadline = time.monotonic() + timeout
    got = read()
    while not _same(got, expected) and time.monotonic() < deadline:
        time.sleep(0.01)
        got = read()
    return got


def _replays(state: zproc.State) -> int:
    return int(state.stats()["events"]["replays"])


def test_live_events_carry_big_values_as_buffers(server: zproc.ServerAddress) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.rcvtimeo = 10_000
    sub.setsockopt(zmq.SUBSCRIBE, P.event_topic(b"default"))
    sub.connect(server.pub_sub)
    try:
        with zproc.State(server) as watcher, zproc.State(server, cache=True) as cached, \
                zproc.State(server) as writer:
            writer["start"] = True
            assert watcher.get_when_change("start", live=False, timeout=10) is True
            assert _until(lambda: cached.get("start"), True) is True
            for sent, expected in _values():
                writer["w"] = sent
                got = watcher.get_when_change("w", live=False, timeout=10)
                assert _same(got, expected), type(sent)
                assert _same(_until(lambda: cached.get("w"), expected), expected)
            if type(got).__module__ == "numpy":
                got[0] = 7.0  # the watcher's copy is its own, writable
            # on the wire: the value is a frame of its own, counted in the header
            while True:
                frames = sub.recv_multipart()
                if len(frames) > 3:
                    break
            topic, header, event, *buffers = frames
            assert P.parse_events_header(header)[0] == P.parse_events_header(header)[1]
            assert len(header) == len(P.events_header(1, 1, b"r" * 8)) + 4
            assert len(event) < S.OUT_OF_BAND and sum(map(len, buffers)) >= MB
    finally:
        sub.close(0)


def test_a_watcher_that_fell_behind_replays_big_values(server: zproc.ServerAddress) -> None:
    values = _values()
    with zproc.State(server) as writer, zproc.State(server) as watcher:
        replays = _replays(writer)
        for sent, _ in values:  # the watcher is not listening yet: it replays them
            writer["w"] = sent
        for _, expected in values:
            assert _same(watcher.get_when_change("w", live=False, timeout=10), expected)
        assert _replays(writer) > replays
        with zproc.State(server, cache=True) as cached:  # starts from a FETCH snapshot
            assert _same(cached["w"], values[-1][1])
        # a FETCH reply carries them as buffers of its own
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = 10_000
        sock.connect(server.req_rep)
        try:
            after = writer.stats()["namespaces"]["default"]["seq"] - len(values)
            sock.send(P.request_frame(P.Kind.FETCH, 0, 1, b"default",
                                      P.fetch_request(after, False, b"")))
            status, rid, _, body = P.parse_reply(sock.recv_multipart())
        finally:
            sock.close(0)
        assert (status, rid) == (P.OK, 1)
        buffers = getattr(body, "buffers", [])
        # each new value, and each one but the first as the next one's old value
        assert len(body) < S.OUT_OF_BAND and len(buffers) == 2 * len(values) - 1
        reply = P.fetch_reply(S.loads(body, buffers))
        assert reply.events is not None
        got = [ev.changes["w"] for ev in reply.events]
        assert all(_same(g, e) for g, (_, e) in zip(got, values, strict=True))


def test_big_values_come_back_after_a_persisted_restart(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    path = tmp_path / "state.db"
    values = _values()
    server, _ = zproc.start_server(ipc_address, persist=path)
    try:
        with zproc.State(ipc_address, liveness=10.0) as watcher:
            with zproc.State(ipc_address) as writer:
                for sent, _ in values:
                    writer["w"] = sent
            stop(server)
            server, _ = zproc.start_server(ipc_address, persist=path)
            # the watcher's changes come from the restarted server's history (the journal)
            for _, expected in values:
                assert _same(watcher.get_when_change("w", live=False, timeout=10), expected)
        with zproc.State(ipc_address, cache=True) as cached:
            assert _same(cached["w"], values[-1][1])
    finally:
        stop(server)
    # the journal's rows hold their values in the pickle: readable as before
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT event FROM journal ORDER BY seq").fetchall()
    db.close()
    assert [type(row[0]) for row in rows] == [bytes] * len(values)
    for (frame,), (_, expected) in zip(rows, values, strict=True):
        assert _same(P.decode_event(frame).changes["w"], expected)


def _breaking(how: str) -> Callable[..., list[Any]]:
    """``P.events_message``, with a buffer frame left out or one added."""
    events_message = P.events_message

    def broken(*args: Any) -> list[Any]:
        frames = events_message(*args)
        if len(frames) > 3:  # an event with buffers
            return frames[:-1] if how == "missing" else [*frames, b"stray"]
        return frames

    return broken


@pytest.mark.parametrize("how", ["missing", "extra"])
def test_an_event_message_with_a_wrong_buffer_count_is_fetched_again(
    ipc_address: zproc.ServerAddress, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(P, "events_message", _breaking(how))  # in the forked server only
        server, _ = zproc.start_server(ipc_address, backend=FORK.Process)
    try:
        with zproc.State(ipc_address) as watcher, zproc.State(ipc_address) as writer, \
                caplog.at_level(logging.WARNING, logger="zproc"):
            writer["start"] = True
            assert watcher.get_when_change("start", live=False, timeout=10) is True
            replays = _replays(writer)
            values = _values()
            for sent, expected in values:
                writer["w"] = sent
                assert _same(watcher.get_when_change("w", live=False, timeout=10), expected)
            assert _replays(writer) >= replays + len(values)
        assert "event message of namespace 'default' cannot be read" in caplog.text
        assert "frames after its header" in caplog.text
    finally:
        stop(server)


def test_the_history_byte_budget_counts_big_values_and_evicts_them(
    ipc_address: zproc.ServerAddress,
) -> None:
    server, _ = zproc.start_server(ipc_address, history_bytes=3 * MIB)
    try:
        with zproc.State(ipc_address) as writer, zproc.State(ipc_address) as watcher:
            writer["start"] = True
            for _ in range(6):
                writer["w"] = last = os.urandom(MB)
            (history,) = writer.stats()["namespaces"].values()
            assert 1 <= history["history"] <= 3  # evicted by bytes, not by count
            assert history["history"] * MB <= history["history_bytes"] <= 3 * MIB
            # the watcher fell behind the history: the first change it sees is the state
            # now, as one change (with the whole history, it would be the first value)
            assert watcher.get_when_change("w", live=False, timeout=10) == last
    finally:
        stop(server)


# -- the codec, without sockets ----------------------------------------------------------


def _message(*values: Any) -> list[Any]:
    frames = [P.new_event(seq, b"o", 1.0, {"k": value}, (), None)[1]
              for seq, value in enumerate(values, 1)]
    return P.events_message(P.event_topic(b"default"), 1, len(values), b"r" * 8, frames)


def test_events_with_and_without_buffers_decode_in_one_message() -> None:
    big = os.urandom(MB)
    frames = _message(1, big, bytearray(big), "x")
    assert len(frames) == 2 + 4 + 2
    events = P.decode_events(frames)
    assert [event[3]["k"] for event in events] == [1, big, bytearray(big), "x"]
    assert type(events[2][3]["k"]) is bytearray
    plain = _message(1, 2)
    assert len(plain[1]) == len(P.events_header(1, 2, b"r" * 8))  # no counts without buffers
    assert [event[3] for event in P.decode_events(plain)] == [{"k": 1}, {"k": 2}]


@pytest.fixture
def big_message() -> Iterator[list[Any]]:
    yield _message(os.urandom(MB), 2)


def test_a_message_whose_frames_do_not_match_its_header_is_a_protocol_error(
    big_message: list[Any],
) -> None:
    topic, header, first, buffer, second = big_message
    with pytest.raises(zproc.ProtocolError, match="2 frames after its header, not 3"):
        P.decode_events([topic, header, first, second])  # the buffer left out
    with pytest.raises(zproc.ProtocolError, match="4 frames after its header, not 3"):
        P.decode_events([topic, header, first, buffer, second, b"stray"])
    with pytest.raises(zproc.ProtocolError, match="counts the buffers of 1"):
        P.decode_events([topic, header[:-4], first, buffer, second])
    with pytest.raises(zproc.ProtocolError, match="more out-of-band frames"):
        # the right number of frames, the buffer in the wrong place
        swapped = header[: -8] + header[-4:] + header[-8:-4]
        P.decode_events([topic, swapped, first, buffer, second])
