"""The server survives hostile input: 10,000+ malformed frames, then still answers right."""

from __future__ import annotations

import pickle
import random
import struct
import time
from typing import Any

import psutil
import pytest
import zmq

import zproc
from zproc import _protocol as P

from conftest import stop

pytestmark = pytest.mark.timeout(180)


def unimportable_pickle() -> bytes:
    """A pickle that references a class no process can import."""
    return (
        b"\x80\x05\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x0cnowhere_mod_\x94"
        b"\x8c\x03Cls\x94\x93\x94)\x81\x94."
    )


def hostile_messages(rng: random.Random, count: int) -> list[list[bytes]]:
    """A mix of random bytes, truncated and corrupted headers and nasty bodies.

    They work on the namespace "fuzz", so the test can check "default" afterwards.
    """
    kinds = [int(k) for k in P.Kind]
    methods = [int(m) for m in P.Method]
    messages: list[list[bytes]] = []
    for i in range(count):
        choice = i % 8
        rid = rng.getrandbits(32)
        if choice == 0:  # random frames
            messages.append([rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 5))])
        elif choice == 1:  # truncated header
            frame = P.request_frame(rng.choice(kinds), rng.choice(methods), rid, b"fuzz", b"")
            messages.append([frame[: rng.randint(0, 12)]])
        elif choice == 2:  # valid header, random body
            messages.append([P.request_frame(P.Kind.CALL, rng.choice(methods), rid, b"fuzz",
                                             rng.randbytes(rng.randint(0, 128)))])
        elif choice == 3:  # unimportable class as an argument
            messages.append([P.request_frame(P.Kind.CALL, P.Method.SETITEM, rid, b"fuzz",
                                             unimportable_pickle())])
        elif choice == 4:  # wrong argument shapes
            body = pickle.dumps(rng.choice([(), (1, 2, 3, 4, 5), [1], {"a": 1}, None, ("k",)]))
            messages.append([P.request_frame(P.Kind.CALL, rng.choice(methods), rid, b"fuzz",
                                             body)])
        elif choice == 5:  # bad version, unknown kind/method codes
            header = struct.pack("<BBBIH", rng.choice([0, 2, 255]), rng.randint(0, 255),
                                 rng.randint(0, 255), rid, rng.choice([4, 0, 0xFFFF])) + b"fuzz"
            messages.append([header, *([b""] * rng.randint(0, 2))])
        elif choice == 6:  # bad bodies for other kinds
            kind = rng.choice([P.Kind.FETCH, P.Kind.ATOMIC, P.Kind.SNAPSHOT, P.Kind.PING])
            messages.append([P.request_frame(kind, 0, rid, b"fuzz", rng.choice(
                [b"", b"\x80", pickle.dumps("x"), pickle.dumps((1,))]))])
        else:  # invalid utf-8 or empty namespace
            messages.append([P.request_frame(P.Kind.HEAD, 0, rid, rng.choice([b"", b"\xff\xfe"]),
                                             b"")])
    return messages


def test_server_survives_hostile_frames() -> None:
    proc, address = zproc.start_server(max_message_size=1 << 20)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address.req_rep)
    try:
        rng = random.Random(1234)
        server = psutil.Process(proc.pid)
        with zproc.State(address) as state:
            state["before"] = 1
            for frames in hostile_messages(rng, 2000):  # warm up allocator and caches
                sock.send_multipart(frames)
            assert state["before"] == 1
            rss_before = server.memory_info().rss
            for frames in hostile_messages(rng, 10_000):
                sock.send_multipart(frames)
                while sock.poll(0):
                    sock.recv_multipart()  # drain error replies so nothing piles up here
            # a ping on the same connection answers after everything sent before it
            sock.send(P.request_frame(P.Kind.PING, 0, 7, b"fuzz", b"done"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert sock.poll(10_000), "the server stopped answering"
                reply = sock.recv_multipart()
                if P.parse_reply(reply)[:2] == (P.Status.OK, 7):
                    break
            # a frame above the size limit: the server drops that peer, nobody else
            big = ctx.socket(zmq.DEALER)
            big.linger = 0
            big.connect(address.req_rep)
            big.send(P.request_frame(P.Kind.CALL, P.Method.SETITEM, 1, b"fuzz", b"x" * (2 << 20)))
            big.close()
            # still serving, correctly, with no reply shift
            for i in range(50):
                state[f"k{i}"] = i
                assert state[f"k{i}"] == i
            assert state["before"] == 1
            assert len(state) == 51
            assert zproc.ping(address, timeout=5) == proc.pid
            time.sleep(0.2)
            rss_after = server.memory_info().rss
            assert rss_after - rss_before < 32 * 1024 * 1024, (rss_before, rss_after)
    finally:
        sock.close()
        ctx.term()
        stop(proc)


def test_namespace_count_is_capped() -> None:
    proc, address = zproc.start_server(max_namespaces=3)
    try:
        states: list[Any] = []
        try:
            for name in ["default", "a", "b"]:
                states.append(zproc.State(address, namespace=name))
                states[-1]["x"] = 1
            with pytest.raises(zproc.ProtocolError, match="namespaces"):
                extra = zproc.State(address, namespace="c", connect_timeout=2)
                states.append(extra)
                extra["x"] = 1
        finally:
            for st in states:
                st.close()
    finally:
        stop(proc)
