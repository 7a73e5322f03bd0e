"""Limits before authentication: every listening socket of a server and of its swarm
broker drops a peer that stalls in its handshake (``HANDSHAKE_IVL``) and one that
announces a frame over the socket's size limit, before anything is buffered for it."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
import zmq
from conftest import make_address

from zproc import _security, _transport
from zproc._server import Server

SECRET = "handshake secret, long enough 2c9d"

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")

#: A ZMTP 3.0 greeting that asks for CURVE, as a client would send it.
CURVE_GREETING = (
    b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00"
    + b"\x00" * 31
)
LIMIT = 1024 * 1024


@pytest.fixture
def endpoints() -> Iterator[dict[str, str]]:
    """The four listening endpoints of a CURVE server (tcp loopback) and its broker."""
    server = Server(make_address("tcp"), keys=_security.server_keys(SECRET),
                    max_message_size=LIMIT)
    try:
        tasks, workers = server.swarm({})
        yield {"requests": server.address.req_rep, "events": server.address.pub_sub,
               "swarm tasks": tasks, "swarm workers": workers}
    finally:
        server.close()


def _connect(endpoint: str) -> socket.socket:
    host, port = endpoint[len("tcp://") :].rsplit(":", 1)
    peer = socket.create_connection((host, int(port)), timeout=5)
    peer.sendall(CURVE_GREETING)
    return peer


def _closed_after(peer: socket.socket, limit: float) -> float | None:
    """Seconds until the server closed the connection (None: still open after ``limit``);
    what it sends meanwhile (its greeting) is read and ignored."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        peer.settimeout(max(0.05, limit - (time.monotonic() - start)))
        try:
            if not peer.recv(4096):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


def test_a_peer_that_stalls_in_the_curve_handshake_is_dropped(
    endpoints: dict[str, str],
) -> None:
    interval = _transport.HANDSHAKE_IVL_MS / 1000
    assert interval <= 10  # libzmq's default is 30 s
    peers = {name: _connect(endpoint) for name, endpoint in endpoints.items()}
    try:
        # a generous bound: under load the timer fires late, but long before 30 s
        for name, peer in peers.items():
            took = _closed_after(peer, interval + 10)
            assert took is not None, f"{name}: a stalled handshake was kept open"
    finally:
        for peer in peers.values():
            peer.close()


@pytest.mark.parametrize("name", ["requests", "swarm tasks", "swarm workers", "events"])
def test_a_peer_that_announces_an_oversized_frame_is_dropped_at_once(
    endpoints: dict[str, str], name: str
) -> None:
    limit = _transport.SUBSCRIPTION_MAX if name == "events" else LIMIT
    peer = _connect(endpoints[name])
    try:
        # a command frame (flags: command, long size) declaring one byte over the limit,
        # and none of its body: the server must not wait for (and buffer) it
        peer.sendall(b"\x06" + struct.pack(">Q", limit + 1))
        took = _closed_after(peer, _transport.HANDSHAKE_IVL_MS / 1000 / 2)
        assert took is not None, f"{name}: an oversized frame was waited for"
    finally:
        peer.close()
    # a frame within the limit is waited for (then dropped by the handshake timer only)
    peer = _connect(endpoints[name])
    try:
        peer.sendall(b"\x06" + struct.pack(">Q", 1024))
        assert _closed_after(peer, 1.0) is None
    finally:
        peer.close()
