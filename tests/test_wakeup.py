"""The path of a watcher's wake-up: the server publishes a batch's events before it sends
the batch's replies, and the event stream drains its SUB socket without waiting."""

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


def _set_request(rid: int, key: str, value: Any) -> list[bytes]:
    return [P.request_header(P.Kind.CALL, P.Method.SETITEM, rid, NS), S.dumps((key, value))]


def test_a_batch_publishes_its_events_before_its_replies(
    context: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve() marks this process as a server's; the mark is undone after the test
    monkeypatch.setattr(_utils, "_SERVER_PID", None)
    sends: list[tuple[int, list[Any]]] = []
    real_send = _server.send_frames

    def recording_send(sock: zmq.Socket[Any], frames: Any) -> None:
        sends.append((sock.type, list(frames)))
        real_send(sock, frames)

    monkeypatch.setattr(_server, "send_frames", recording_send)
    server = Server(None)
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(server.address.req_rep)
        for rid in (1, 2, 3):  # queued together: one batch, one event message
            dealer.send_multipart(_set_request(rid, f"k{rid}", rid))
        deadline = time.monotonic() + 10
        # stop once the reply to the last request has gone out (or give up)
        server.serve(until=lambda: any(
            kind == zmq.ROUTER and P.parse_reply_head(frames[1])[1] == 3
            for kind, frames in sends) or time.monotonic() > deadline)
        kinds = [kind for kind, _frames in sends]
        assert kinds.count(zmq.ROUTER) == 3, kinds
        # whatever the batches were, each one's event message precedes its replies
        pub_at = [i for i, kind in enumerate(kinds) if kind == zmq.PUB]
        assert pub_at and pub_at[0] == 0, kinds
        seqs: list[int] = []
        for i in pub_at:
            topic, header, *events = sends[i][1]
            assert topic == P.event_topic(NS)
            first, last, _run = P.parse_events_header(header)
            assert [P.decode_event(e).seq for e in events] == list(range(first, last + 1))
            seqs += range(first, last + 1)
            # the replies right after it answer the requests its events came from: the
            # head each one carries (its change) has been published already
            heads = []
            for kind, frames in sends[i + 1:]:
                if kind != zmq.ROUTER:
                    break
                heads.append(P.parse_reply_head(frames[1])[2])
            assert heads and all(first <= head <= last for head in heads), (heads, first, last)
        assert seqs == [1, 2, 3]  # every change published once, in order
        # and the writer gets its three replies, in order
        got = []
        for _ in range(3):
            assert dealer.poll(5000), "a reply did not arrive"
            got.append(P.parse_reply_head(dealer.recv_multipart()[0])[1])
        assert got == [1, 2, 3]
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
