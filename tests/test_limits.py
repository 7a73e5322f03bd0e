"""Limits before and after authentication: the swarm broker's handshakes are guarded and
counted like the server's, only the worker that holds a chunk completes it, a subscriber
that never reads and the replay history hold a bounded part of the server's memory, and
idle connections neither exhaust the server's descriptors nor lock out real clients."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import zmq
from conftest import make_address

import zproc
from zproc import _protocol as P
from zproc import _security, _worker
from zproc import _serialization as S
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
            P.work_header(P.WorkOp.RESULT, status=P.ChunkStatus.OK, counter=1, task=task,
                          chunk=0),
            S.dumps(["forged"] * 4),
        ]
        # a key holder that never registered, and one that did but was not sent the chunk
        stranger = _dealer(context, workers_endpoint, keys)
        registered = _dealer(context, workers_endpoint, keys)
        try:
            stranger.send_multipart(forged)
            registered.send_multipart([P.work_header(P.WorkOp.READY),
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
    """200 MiB of events with two subscribers that do not read: the server holds at most
    the history's byte budget and a few dozen messages per subscriber; a watcher that
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
            value = b"v" * MIB
            for i in range(200):
                writer[f"k{i % 8}"] = value + i.to_bytes(4, "big")
            writer["done"] = True
            grown = server.memory_info().rss - before
            # unbounded (the history by count, the subscribers' queues) this was > 400 MiB
            assert grown < 120 * MIB, f"the server grew by {grown / MIB:.0f} MiB"
            snapshot = watcher.get_when(lambda s: s.get("done"), timeout=60)
            assert snapshot == writer.copy()
            assert snapshot["k7"] == value + (199).to_bytes(4, "big")
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
