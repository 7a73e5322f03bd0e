"""Shared fixtures: servers, addresses, and a check that no test leaves a process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import zproc


_HANDED_OUT: set[tuple[str, int]] = set()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host``, never the same one twice in a test run (two
    calls in a row may otherwise get the same port: an address would then use it twice)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


def make_address(kind: str) -> zproc.ServerAddress:
    """A fresh explicit address of the given kind ("tcp" or "ipc")."""
    if kind == "tcp":
        return zproc.ServerAddress(
            f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
        )
    folder = tempfile.mkdtemp(prefix="zproc-test-")
    return zproc.ServerAddress(f"ipc://{folder}/rr", f"ipc://{folder}/ps")


@pytest.fixture(params=["ipc", "tcp"])
def address(request: pytest.FixtureRequest) -> Iterator[zproc.ServerAddress]:
    """An explicit, unused address, on ipc and on tcp."""
    addr = make_address(request.param)
    yield addr
    for endpoint in addr:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            assert not os.path.exists(path), f"ipc file left behind: {path}"
            folder = os.path.dirname(path)
            if os.path.isdir(folder):
                os.rmdir(folder)


def stop(process: object) -> None:
    proc = process  # a multiprocessing.Process
    if proc.is_alive():  # type: ignore[attr-defined]
        proc.terminate()  # type: ignore[attr-defined]
        proc.join(5)  # type: ignore[attr-defined]
        if proc.is_alive():  # type: ignore[attr-defined]
            proc.kill()  # type: ignore[attr-defined]
    proc.join(5)  # type: ignore[attr-defined]


def kill9(process: Any) -> None:
    """SIGKILL a multiprocessing.Process and reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.join(5)
    assert process.exitcode == -signal.SIGKILL


@pytest.fixture
def ipc_address() -> Iterator[zproc.ServerAddress]:
    """A fixed ipc address (a killed server leaves its socket files: removed here)."""
    folder = tempfile.mkdtemp(prefix="zrel-")
    yield zproc.ServerAddress(f"ipc://{folder}/rr", f"ipc://{folder}/ps")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[zproc.ServerAddress]:
    """A running server at a random address, stopped after the test."""
    proc, addr = zproc.start_server()
    yield addr
    stop(proc)


@pytest.fixture
def state(server: zproc.ServerAddress) -> Iterator[zproc.State]:
    with zproc.State(server, request_timeout=20) as st:
        yield st


@pytest.fixture
def ctx() -> Iterator[zproc.Context]:
    context = zproc.Context()
    yield context
    context.close()


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must end every process it started."""
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    yield
    deadline = 5.0
    gone, alive = psutil.wait_procs(
        [c for c in me.children(recursive=True) if c.pid not in before], timeout=deadline
    )
    leftover = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in leftover:
        proc.kill()
    assert not leftover, f"processes left running: {[(p.pid, p.name()) for p in leftover]}"
