"""The path of a watcher's wake-up: the server publishes a batch's events before the
batch's last reply (a lone write's event before its reply), and the event stream drains
its SUB socket without waiting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zproc import _protocol as P
from zproc import _serialization as S
from zproc import _server, _transport, _utils
from zproc._server import Server

NS = b"wake-up"


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(0)


def _set_request(rid: int, key: str, value: Any) -> bytes:
    return P.request_frame(P.Kind.CALL, P.Method.SETITEM, rid, NS, S.dumps((key, value)))


def _rid(frames: list[Any]) -> int:
    return P.parse_reply(frames[1:])[1]


def _head(frames: list[Any]) -> int:
    return P.parse_reply(frames[1:])[2]


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[Any]]]:
    """What the server's loop sends, as ``(socket type, frames)``, in order."""
    # serve() marks this process as a server's; the mark is undone after the test
    monkeypatch.setattr(_utils, "_SERVER_PID", None)
    sent: list[tuple[int, list[Any]]] = []
    real_send = _server.send_frames

    def recording_send(sock: zmq.Socket[Any], frames: Any) -> None:
        sent.append((sock.type, list(frames)))
        real_send(sock, frames)

    monkeypatch.setattr(_server, "send_frames", recording_send)
    return sent


@pytest.mark.parametrize("queued", [1, 3])
def test_a_batch_publishes_its_events_before_its_last_reply(
    context: zmq.Context[Any], sends: list[tuple[int, list[Any]]], queued: int
) -> None:
    server = Server(None)
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(server.address.req_rep)
        rids = list(range(1, queued + 1))
        for rid in rids:  # queued together: a batch (or a few), one event message each
            dealer.send(_set_request(rid, f"k{rid}", rid))
        deadline = time.monotonic() + 10
        # stop once the reply to the last request has gone out (or give up)
        server.serve(until=lambda: any(
            kind == zmq.ROUTER and _rid(frames) == rids[-1] for kind, frames in sends
        ) or time.monotonic() > deadline)
        kinds = [kind for kind, _frames in sends]
        assert kinds.count(zmq.ROUTER) == queued, kinds
        if queued == 1:
            assert kinds == [zmq.PUB, zmq.ROUTER]  # the lone write's event first
        pub_at = [i for i, kind in enumerate(kinds) if kind == zmq.PUB]
        seqs: list[int] = []
        for i in pub_at:
            topic, header, *events = sends[i][1]
            assert topic == P.event_topic(NS)
            first, last, _run = P.parse_events_header(header)
            assert [P.decode_event(e).seq for e in events] == list(range(first, last + 1))
            seqs += range(first, last + 1)
            # the batch's last reply follows its event message: its head (its change)
            # has been published already
            assert i + 1 < len(sends) and kinds[i + 1] == zmq.ROUTER, kinds
            assert first <= _head(sends[i + 1][1]) <= last
        assert seqs == rids  # every change published once, in order
        # the last reply of all follows the last event message
        assert kinds[-1] == zmq.ROUTER and pub_at[-1] == len(kinds) - 2, kinds
        # and the writer gets its replies, in order
        got = []
        for _ in rids:
            assert dealer.poll(5000), "a reply did not arrive"
            got.append(P.parse_reply(dealer.recv_multipart())[1])
        assert got == rids
    finally:
        dealer.close(0)
        server.close()


def test_recv_queued_takes_a_queued_message_and_never_waits(
    context: zmq.Context[Any]
) -> None:
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.linger = b.linger = 0
    try:
        a.bind("inproc://recv-queued")
        b.connect("inproc://recv-queued")
        b.rcvtimeo = -1  # a blocking socket: recv_queued must still return at once
        assert _transport.recv_queued(b) is None
        a.send_multipart([b"topic", b"", b"x" * 1000])
        a.send(b"second")
        assert b.poll(5000)
        assert _transport.recv_queued(b) == [b"topic", b"", b"x" * 1000]
        assert _transport.recv_queued(b) == [b"second"]
        assert _transport.recv_queued(b) is None
    finally:
        a.close(0)
        b.close(0)


def test_a_server_of_lone_writes_asks_for_more_only_every_few_batches(
    context: zmq.Context[Any], sends: list[tuple[int, list[Any]]]
) -> None:
    """Asking whether more requests are queued costs system calls: after a batch that
    ended alone, the next PROBE_EVERY lone writes publish their events at once; the next
    batch asks, finds the rest queued and publishes them together. Every change is
    published once, in order, before its reply, either way."""
    server = Server(None)
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    burst = list(range(2, _server.PROBE_EVERY + 4))  # PROBE_EVERY alone, then 2 together
    deadline = time.monotonic() + 10

    def until() -> bool:
        replied = {_rid(frames) for kind, frames in sends if kind == zmq.ROUTER}
        if replied == {1} and not queued:  # the lone write is answered: the burst
            for rid in burst:
                dealer.send(_set_request(rid, f"k{rid}", rid))
            time.sleep(0.3)  # every request of the burst is queued at the server
            queued.append(True)
        return burst[-1] in replied or time.monotonic() > deadline

    queued: list[bool] = []
    try:
        dealer.connect(server.address.req_rep)
        dealer.send(_set_request(1, "k1", 1))
        server.serve(until=until)
        assert queued == [True]
        published = [
            [P.decode_event(e).seq for e in frames[2:]]
            for kind, frames in sends if kind == zmq.PUB
        ]
        alone = [[seq] for seq in range(1, _server.PROBE_EVERY + 2)]
        last = _server.PROBE_EVERY + 2
        assert published == [*alone, [last, last + 1]]
        kinds = [kind for kind, _frames in sends]
        # each event message precedes the reply of its batch's last write
        assert kinds == [zmq.PUB, zmq.ROUTER] * (_server.PROBE_EVERY + 1) + [
            zmq.ROUTER, zmq.PUB, zmq.ROUTER
        ], kinds
    finally:
        dealer.close(0)
        server.close()


def test_recv_message_reads_one_frame_or_a_body_and_its_buffers(
    context: zmq.Context[Any]
) -> None:
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    router.linger = dealer.linger = 0
    router.rcvtimeo = dealer.rcvtimeo = 5000
    try:
        router.bind("inproc://recv-routed")
        dealer.connect("inproc://recv-routed")
        big = b"b" * 100_000
        dealer.send(b"one")
        dealer.send_multipart([b"body", big, b"tail"])
        dealer.send(b"after")
        identity, frame = _transport.recv_message(router)
        assert frame == b"one" and type(identity) is bytes and type(frame) is bytes
        got = _transport.recv_message(router)
        assert got[0] == identity and got[1] == b"body"
        assert [type(f) for f in got[2:]] == [memoryview, memoryview]  # not copied
        assert [bytes(f) for f in got[2:]] == [big, b"tail"]
        assert _transport.recv_message(router) == [identity, b"after"]  # framing kept
        router.send_multipart([identity, b"reply"])
        router.send_multipart([identity, b"head", big])
        assert _transport.recv_message(dealer, 1) == [b"reply"]
        head, buffer = _transport.recv_message(dealer, 1)
        assert head == b"head" and type(buffer) is memoryview and bytes(buffer) == big
        with pytest.raises(zmq.Again):  # nothing queued: the socket's timeout applies
            dealer.rcvtimeo = 50
            _transport.recv_message(dealer, 1)
    finally:
        router.close(0)
        dealer.close(0)
