"""Limits before and after authentication: the swarm broker's handshakes are guarded and
counted like the server's, only the worker that holds a chunk completes it, a subscriber
that never reads and the replay history hold a bounded part of the server's memory, and
idle connections neither exhaust the server's descriptors nor lock out real clients."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import zmq
from _netns import Output
from conftest import make_address

import zproc
from zproc import _protocol as P
from zproc import _security, _transport, _worker
from zproc import _serialization as S
from zproc import _swarmwire as W
from zproc._server import Server

SECRET = "limits secret, long enough 7f31a0"

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def _eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _dealer(context: zmq.Context[Any], endpoint: str, keys: Any) -> zmq.Socket[Any]:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    _security.configure_client(sock, keys)
    sock.connect(endpoint)
    return sock


def test_the_brokers_failed_handshakes_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server(make_address("tcp"), keys=_security.server_keys(SECRET))
    context = zmq.Context()
    try:
        endpoints = server.swarm({})
        wrong = _security.client_keys("another secret, long enough 55e0b2")
        for name, endpoint in zip(("swarm tasks", "swarm workers"), endpoints, strict=True):
            before = server.stats["rejected"]
            with caplog.at_level("DEBUG", logger="zproc"):
                sock = _dealer(context, endpoint, wrong)
                try:
                    sock.send_multipart([b"x", b"y"])
                    _eventually(lambda before=before: server.stats["rejected"] > before,
                                f"the rejection at the {name} endpoint to be counted")
                finally:
                    sock.close(0)
            assert any(
                "rejected a peer" in r.getMessage() and f"({name})" in r.getMessage()
                for r in caplog.records
            ), f"the rejection at the {name} endpoint was not logged"
            caplog.clear()
    finally:
        server.close()
        context.term()


def slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x


def test_only_the_worker_that_holds_a_chunk_completes_it() -> None:
    keys = _security.client_keys(SECRET)
    context = zmq.Context()
    with zproc.Context(secret_key=SECRET) as ctx:
        swarm = ctx.create_swarm(1)
        _eventually(lambda: len(swarm.info()["workers"]) == 1, "the worker to join")
        workers_endpoint = _worker.discover(ctx.server_address, keys)[1]
        result = swarm.map_lazy(slow_square, range(4), num_chunks=1)
        task = int(result.task_id, 16)
        _eventually(lambda: any(w["busy"] for w in swarm.info()["workers"]),
                    "the real worker to take the chunk")
        forged = [
            W.work_header(P.WorkOp.RESULT, status=P.ChunkStatus.OK, counter=1, task=task,
                          chunk=0),
            S.dumps(["forged"] * 4),
        ]
        # a key holder that never registered, and one that did but was not sent the chunk
        stranger = _dealer(context, workers_endpoint, keys)
        registered = _dealer(context, workers_endpoint, keys)
        try:
            stranger.send_multipart(forged)
            registered.send_multipart([W.work_header(P.WorkOp.READY),
                                       S.dumps((os.getpid(), "second worker"))])
            _eventually(lambda: len(swarm.info()["workers"]) == 2, "the second worker to join")
            registered.send_multipart(forged)
            figures = _eventually(
                lambda: (f := ctx.state.stats()["swarm"])["refused_results"] == 2 and f,
                "both forged results to be refused",
            )
            assert figures["refused_results"] == 2
            assert result.get(timeout=60) == [0, 1, 4, 9]  # the real result still arrives
            assert swarm.map(abs, [-1, -2]) == [1, 2]  # and the broker goes on
        finally:
            stranger.close(0)
            registered.close(0)
    context.term()


MIB = 1024 * 1024


def test_a_subscriber_that_never_reads_and_the_history_hold_bounded_memory() -> None:
    """3,000 changes of 64 KiB with two subscribers that do not read: the server holds at
    most the history's byte budget and 1,000 messages per subscriber; a watcher that
    fell behind reads on and gets the combined change, and a correct state."""
    proc, address = zproc.start_server(make_address("tcp"), history_bytes=8 * MIB)
    server = psutil.Process(proc.pid)
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)  # a raw subscriber that never reads
    stalled.linger = 0
    stalled.rcvhwm = 1
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(address.pub_sub)
    try:
        with zproc.State(address, rcvhwm=2) as watcher, zproc.State(address) as writer:
            writer["start"] = True
            assert watcher.get_when_equal("start", True, timeout=10)  # subscribed, then idle
            time.sleep(0.5)  # the raw subscriber's subscription reaches the server
            before = server.memory_info().rss
            value = b"v" * (64 * 1024)
            for i in range(3000):
                writer[f"k{i % 8}"] = value + i.to_bytes(4, "big")
            writer["done"] = True
            grown = server.memory_info().rss - before
            # unbounded (the history by count, the subscribers' queues) this was > 500 MiB
            assert grown < 200 * MIB, f"the server grew by {grown / MIB:.0f} MiB"
            snapshot = watcher.get_when(lambda s: s.get("done"), timeout=60)
            assert snapshot == writer.copy()
            assert snapshot["k7"] == value + (2999).to_bytes(4, "big")
            figures = writer.stats()
            assert figures["events"]["resets"] >= 1  # it got the combined change
            (history,) = figures["namespaces"].values()
            assert history["history_bytes"] <= 8 * MIB
            print(f"server grew by {grown / MIB:.1f} MiB; history {history}")
    finally:
        stalled.close(0)
        context.term()
        proc.terminate()
        proc.join(10)


# -- a served process under a lowered descriptor limit ------------------------------------

#: The soft RLIMIT_NOFILE the server is started with: less than the idle peers below.
LOW_NOFILE = 128
#: A ZMTP 3.0 greeting that asks for CURVE, as a client would send it.
CURVE_GREETING = (
    b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00"
    + b"\x00" * 31
)


def _low_nofile() -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (LOW_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.fixture
def served() -> Iterator[tuple[zproc.ServerAddress, psutil.Process]]:
    """``zproc serve`` with a secret key, started with a soft descriptor limit of 128."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * LOW_NOFILE:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves no room to raise")
    address = make_address("tcp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zproc", "serve", *address],
        env={**os.environ, "ZPROC_SECRET_KEY": SECRET}, preexec_fn=_low_nofile,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    err = Output(proc.stderr)
    try:
        err.wait_for("serving at", 30)
        yield address, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            err.close()


def _peer(endpoint: str, greeting: bytes) -> socket.socket:
    host, port = endpoint[len("tcp://") :].rsplit(":", 1)
    peer = socket.create_connection((host, int(port)), timeout=10)
    peer.sendall(greeting)
    return peer


def _established(server: psutil.Process, endpoints: list[str]) -> int:
    ports = {int(e.rsplit(":", 1)[1]) for e in endpoints}
    return sum(1 for c in server.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports)


def test_idle_connections_over_the_soft_limit_do_not_lock_out_clients(
    served: tuple[zproc.ServerAddress, psutil.Process],
) -> None:
    address, server = served
    soft, hard = server.rlimit(psutil.RLIMIT_NOFILE)
    assert soft > LOW_NOFILE and soft == min(hard, soft)  # raised at start
    assert hard == resource.RLIM_INFINITY or soft == hard
    endpoints = list(address)
    # 200 peers that connect and stall: half send nothing, half a partial greeting
    peers = [_peer(endpoints[i % 2], b"" if i % 4 < 2 else CURVE_GREETING[:20])
             for i in range(200)]
    try:
        _eventually(lambda: _established(server, endpoints) >= 200, "the 200 connections")
        with zproc.State(address, secret_key=SECRET, request_timeout=20) as state:
            state["served"] = "while 200 handshakes stall"  # served meanwhile
            assert state.copy() == {"served": "while 200 handshakes stall"}
            # each stalled handshake is dropped after the handshake interval
            _eventually(lambda: _established(server, endpoints) <= 2,
                        "the stalled handshakes to be dropped",
                        timeout=_transport.HANDSHAKE_IVL_MS / 1000 + 20)
            assert state["served"] == "while 200 handshakes stall"
            assert state.stats()["rejected_handshakes"] >= 200
    finally:
        for peer in peers:
            peer.close()


def test_stalled_oversized_handshakes_leave_no_memory_behind(
    served: tuple[zproc.ServerAddress, psutil.Process],
) -> None:
    """Peers on every endpoint announce a frame just under the limit (256 MiB, 1 MiB for
    events), send 4 MiB of it and stall: dropped within the handshake interval, and the
    server's memory goes back to where it was."""
    address, server = served
    tasks, workers = _worker.discover(address, _security.client_keys(SECRET))
    endpoints = {"requests": address.req_rep, "events": address.pub_sub,
                 "swarm tasks": tasks, "swarm workers": workers}
    before = server.memory_info().rss
    peers: dict[str, list[socket.socket]] = {}
    for name, endpoint in endpoints.items():
        limit = _transport.SUBSCRIPTION_MAX if name == "events" else 256 * MIB
        sent = min(4 * MIB, limit // 2)
        header = b"\x06" + struct.pack(">Q", limit - 1)  # a command frame, long size
        peers[name] = [_peer(endpoint, CURVE_GREETING + header + b"h" * sent) for _ in range(4)]
    try:
        peak = server.memory_info().rss
        for name, group in peers.items():
            for peer in group:
                peer.settimeout(_transport.HANDSHAKE_IVL_MS / 1000 + 20)
                try:
                    while peer.recv(65536):  # the server's greeting, then the close
                        pass
                except ConnectionResetError:
                    pass
                except TimeoutError:
                    pytest.fail(f"{name}: a stalled handshake was kept open")
        after = server.memory_info().rss
        print(f"rss before {before / MIB:.1f} MiB, with the peers {peak / MIB:.1f} MiB, "
              f"after {after / MIB:.1f} MiB")
        assert after - before < 32 * MIB, (before, peak, after)
    finally:
        for group in peers.values():
            for peer in group:
                peer.close()


@pytest.mark.parametrize("keys", [None, SECRET], ids=["plain", "curve"])
def test_every_listening_socket_has_the_limits(keys: str | None) -> None:
    server = Server(None, keys=None if keys is None else _security.server_keys(keys),
                    max_message_size=8 * MIB)
    try:
        server.swarm({})
        broker = server._broker  # type: ignore[attr-defined]
        routers = (_transport.ROUTER_HWM, _transport.ROUTER_HWM)
        sockets = {"requests": (server.router, 8 * MIB, routers),
                   "events": (server.pub, _transport.SUBSCRIPTION_MAX,
                              (_transport.EVENTS_HWM, _transport.SUBSCRIPTIONS_HWM)),
                   "swarm tasks": (broker.tasks_sock, 8 * MIB, routers),
                   "swarm workers": (broker.workers_sock, 8 * MIB, routers)}
        for name, (sock, size, hwms) in sockets.items():
            assert sock.getsockopt(zmq.HANDSHAKE_IVL) == _transport.HANDSHAKE_IVL_MS, name
            assert sock.getsockopt(zmq.MAXMSGSIZE) == size, name
            assert (sock.sndhwm, sock.rcvhwm) == hwms, name
            assert sock.linger == 0, name
            assert all(0 < hwm <= 10_000 for hwm in hwms)
    finally:
        server.close()


def test_a_server_socket_needs_a_finite_high_water_mark() -> None:
    with pytest.raises(ValueError, match="0 would mean no limit"):
        _transport.server_socket(zmq.ROUTER, MIB, 0)


def test_history_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="history_bytes must be >= 1"):
        zproc.start_server(history_bytes=0)
