"""No open door by default: a tcp address other hosts can reach needs a secret_key, or an
explicit ``insecure=True`` (``--insecure``), which then warns naming every endpoint."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import warnings
from typing import Any

import pytest
from conftest import free_tcp_port, make_address, stop

import zproc
from zproc._server import Server
from zproc._transport import ServerAddress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _local_ip() -> str:
    """An address of this machine that is not loopback (skip when there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # nothing is sent: this only picks a route
            ip = str(probe.getsockname()[0])
        except OSError:
            ip = "127.0.0.1"
    if ip.startswith("127.") or ip == "0.0.0.0":
        pytest.skip("this machine has no non-loopback IPv4 address")
    return ip


def _public_address() -> ServerAddress:
    ip = _local_ip()
    return ServerAddress(f"tcp://{ip}:{free_tcp_port(ip)}", f"tcp://{ip}:{free_tcp_port(ip)}")


def _nothing_listens(address: ServerAddress) -> None:
    for endpoint in address:
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        with socket.socket() as sock:
            sock.bind((host, int(port)))  # would fail with EADDRINUSE if a server had bound


def _zproc(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "zproc", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}, check=False,
    )


def test_a_public_bind_without_a_key_is_refused_before_anything_listens() -> None:
    address = _public_address()
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="without a secret_key") as info:
        zproc.start_server(address)
    message = str(info.value)
    assert "secret_key=" in message and "insecure=True" in message
    assert address.req_rep in message and address.pub_sub in message
    assert set(multiprocessing.active_children()) == children  # no server process started
    _nothing_listens(address)
    with pytest.raises(ValueError, match="insecure=True"):
        zproc.Context(address, start_server=True)
    with pytest.raises(ValueError, match="applies to a server this Context starts"):
        zproc.Context(address, start_server=False, insecure=True)
    with pytest.raises(ValueError, match="insecure=True"):
        Server(address)
    _nothing_listens(address)
    # one public endpoint is enough
    mixed = ServerAddress(make_address("tcp").req_rep, address.pub_sub)
    with pytest.raises(ValueError, match=address.pub_sub):
        zproc.start_server(mixed)
    with pytest.raises(TypeError, match="insecure must be True or False"):
        zproc.start_server(address, insecure="yes")  # type: ignore[arg-type]


def test_insecure_true_serves_and_warns_naming_every_endpoint() -> None:
    address = _public_address()
    with pytest.warns(UserWarning, match="without a secret_key") as record:
        proc, got = zproc.start_server(address, insecure=True)
    try:
        assert got == address
        text = " ".join(str(w.message) for w in record)
        assert address.req_rep in text and address.pub_sub in text and "swarm" in text
        assert record[0].filename == __file__  # points at the caller's line
        assert zproc.ping(address, timeout=10) == proc.pid
    finally:
        stop(proc)
    other = _public_address()
    with pytest.warns(UserWarning, match=other.req_rep.replace(".", r"\.")):
        ctx = zproc.Context(other, start_server=True, insecure=True)
    try:
        ctx.state["k"] = 1
        assert ctx.state["k"] == 1
    finally:
        ctx.close()


def test_the_swarm_broker_of_an_insecure_server_warns_with_its_endpoints() -> None:
    server = Server(_public_address(), insecure=True)
    try:
        with pytest.warns(UserWarning, match="swarm broker") as record:
            reply = server.swarm({})
        text = str(record[0].message)
        assert reply[0] in text and reply[1] in text
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_loopback_and_ipc_need_no_key_and_do_not_warn(kind: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc, address = zproc.start_server(make_address(kind))
    try:
        assert zproc.ping(address, timeout=10) == proc.pid
    finally:
        stop(proc)


def test_a_public_bind_with_a_key_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server = Server(_public_address(), keys=zproc._security.server_keys("k" * 20))
    server.close()


def test_cli_serve_refuses_a_public_bind_without_a_key() -> None:
    address = _public_address()
    env = {"ZPROC_SECRET_KEY": ""}
    env_free = {k: v for k, v in os.environ.items() if k != "ZPROC_SECRET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "zproc", "serve", *address], capture_output=True, text=True,
        timeout=60, cwd=ROOT, env=env_free, check=False,
    )
    assert done.returncode != 0
    for part in ("--secret-key-file", "$ZPROC_SECRET_KEY", "--insecure", address.req_rep):
        assert part in done.stderr, done.stderr
    _nothing_listens(address)
    empty = _zproc("serve", *address, env=env)
    assert empty.returncode != 0 and "ZPROC_SECRET_KEY is set but empty" in empty.stderr
    empty = _zproc("ping", *make_address("tcp"), env=env)
    assert empty.returncode != 0 and "ZPROC_SECRET_KEY is set but empty" in empty.stderr


def test_cli_serve_insecure_serves_and_warns() -> None:
    address = _public_address()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zproc", "serve", *address, "--insecure"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert zproc.ping(address, timeout=30) == proc.pid
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "without a secret_key" in err and address.req_rep in err, err
