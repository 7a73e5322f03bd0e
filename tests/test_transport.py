"""Addresses (zproc/_transport.py, spec 2.1-2.3 and 2.7). No processes, no sockets."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Any

import pytest

import zproc
from zproc import _transport as T

GOOD_TCP = ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001")
GOOD_IPC = ("ipc:///tmp/zproc-x/rr", "ipc:///tmp/zproc-x/ps")


# -- ServerAddress ------------------------------------------------------------------------


def test_server_address_is_a_tuple() -> None:
    addr = zproc.ServerAddress(*GOOD_TCP)
    assert addr == GOOD_TCP
    assert isinstance(addr, tuple)
    req, pub = addr
    assert (req, pub) == (addr.req_rep, addr.pub_sub) == GOOD_TCP
    assert hash(addr) == hash(GOOD_TCP)


@pytest.mark.parametrize(
    "value",
    [GOOD_TCP, list(GOOD_TCP), GOOD_IPC, ("ipc:///tmp/a", "tcp://localhost:9"),
     ("tcp://[::1]:5000", "tcp://host-name.example:65535")],
)
def test_normalize_accepts_any_2_sequence_of_endpoints(value: Any) -> None:
    addr = T.normalize_address(value)
    assert type(addr) is zproc.ServerAddress
    assert addr == tuple(value)


def test_normalize_keeps_a_server_address() -> None:
    addr = zproc.ServerAddress(*GOOD_IPC)
    assert T.normalize_address(addr) is addr


# -- spec 2.7: errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "tcp://127.0.0.1:5000",
        b"tcp://127.0.0.1:5000",
        ("tcp://127.0.0.1:5000",),
        GOOD_TCP + ("tcp://127.0.0.1:5002",),
        (),
        None,
        5000,
        {"tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"},
        iter(GOOD_TCP),
    ],
    ids=["str", "bytes", "1-tuple", "3-tuple", "empty", "None", "int", "set", "iterator"],
)
def test_not_a_2_sequence_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="2"):
        T.normalize_address(value)


@pytest.mark.parametrize(
    "value",
    [
        (b"tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"),
        ("tcp://127.0.0.1:5000", 5001),
        (None, "tcp://127.0.0.1:5001"),
    ],
)
def test_non_str_endpoint_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="str"):
        T.normalize_address(value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "foo",
        "",
        "tcp://",
        "tcp:/127.0.0.1:5000",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://127.0.0.1:port",
        "tcp://127.0.0.1:70000",
        "tcp://127.0.0.1:5000/path",
        "tcp://bad host:5000",
        "ipc://",
        "127.0.0.1:5000",
    ],
)
def test_malformed_endpoint_is_a_value_error(endpoint: str) -> None:
    with pytest.raises(ValueError):
        T.normalize_address((endpoint, "tcp://127.0.0.1:5001"))
    with pytest.raises(ValueError):
        T.normalize_address(("tcp://127.0.0.1:5001", endpoint))


@pytest.mark.parametrize(
    "endpoint",
    ["inproc://name", "pgm://eth0;239.192.1.1:5555", "epgm://eth0;239.192.1.1:5555",
     "ws://127.0.0.1:5000", "udp://127.0.0.1:5000", "vmci://1:2"],
)
def test_unsupported_transport_is_a_value_error(endpoint: str) -> None:
    with pytest.raises(ValueError, match="unsupported transport|not an endpoint"):
        T.normalize_address((endpoint, "tcp://127.0.0.1:5001"))


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5000", "ipc:///tmp/zproc-same"])
def test_identical_endpoints_are_a_value_error(endpoint: str) -> None:
    with pytest.raises(ValueError, match="differ"):
        T.normalize_address((endpoint, endpoint))


@pytest.mark.parametrize("endpoint", ["tcp://*:5000", "tcp://127.0.0.1:*", "tcp://*:*"])
def test_wildcard_tcp_is_rejected_when_connecting(endpoint: str) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        T.normalize_address((endpoint, "tcp://127.0.0.1:5001"))
    # ... but is a valid endpoint to bind
    assert T.validate_endpoint(endpoint, bind=True) == endpoint


def test_ipc_path_length_limit() -> None:
    base = "/tmp/"
    longest = "ipc://" + base + "x" * (T.IPC_PATH_MAX - len(base))
    assert len(longest) - len("ipc://") == T.IPC_PATH_MAX
    assert T.validate_endpoint(longest) == longest
    with pytest.raises(ValueError, match="too long|longer"):
        T.normalize_address((longest + "y", "tcp://127.0.0.1:5001"))
    # the limit is in bytes, not characters
    with pytest.raises(ValueError, match="longer"):
        T.validate_endpoint("ipc://" + base + "é" * (T.IPC_PATH_MAX // 2))


def test_error_messages_name_the_endpoint_and_the_expected_form() -> None:
    with pytest.raises(ValueError) as info:
        T.normalize_address(("foo", "tcp://127.0.0.1:5001"))
    message = str(info.value)
    assert "'foo'" in message and "tcp://" in message and "ipc://" in message


# -- validation in every entry point, before anything is created ---------------------


class _NoProcessBackend:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a process was created for an invalid address")


@pytest.mark.parametrize(
    "bad,error",
    [
        ("tcp://127.0.0.1:5000", ValueError),
        (("foo", "tcp://127.0.0.1:5001"), ValueError),
        (("inproc://a", "inproc://b"), ValueError),
        (("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5000"), ValueError),
        (("tcp://*:5000", "tcp://127.0.0.1:5001"), ValueError),
        ((1, 2), TypeError),
    ],
)
def test_entry_points_validate_first(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        zproc.start_server(bad, backend=_NoProcessBackend)
    with pytest.raises(error):
        zproc.State(bad)
    with pytest.raises(error):
        zproc.ping(bad, timeout=0)
    with pytest.raises(error):
        zproc.Context(bad, server_backend=_NoProcessBackend)


# -- ipc directories and the zmq context ----------------------------------------------


def test_private_ipc_dir_is_0700_and_short() -> None:
    folder = T.make_private_ipc_dir()
    try:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        assert mode == 0o700
        assert os.path.basename(folder).startswith("zproc-")
        assert len(folder) + len("/rr") <= T.IPC_PATH_MAX
        assert folder.startswith((tempfile.gettempdir() + os.sep, "/tmp/"))
    finally:
        os.rmdir(folder)


def test_create_ipc_address() -> None:
    endpoint = zproc.create_ipc_address("mysock")
    try:
        assert endpoint.startswith("ipc://") and endpoint.endswith("/mysock")
        folder = os.path.dirname(endpoint[len("ipc://") :])
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    finally:
        T.remove_ipc_endpoint(endpoint)
    assert not os.path.exists(folder)
    for bad in ("", "a/b"):
        with pytest.raises(ValueError):
            zproc.create_ipc_address(bad)


def test_remove_ipc_endpoint_leaves_foreign_directories() -> None:
    folder = tempfile.mkdtemp(prefix="other-")
    try:
        path = os.path.join(folder, "rr")
        open(path, "w").close()
        T.remove_ipc_endpoint("ipc://" + path)
        assert not os.path.exists(path)
        assert os.path.isdir(folder)  # not ours: kept
        T.remove_ipc_endpoint("tcp://127.0.0.1:5000")  # not ipc: ignored
    finally:
        os.rmdir(folder)


def test_context_is_one_per_process() -> None:
    assert T.get_context() is T.get_context()
    assert not T.get_context().closed


def test_loopback_detection() -> None:
    assert T.is_loopback_endpoint("ipc:///tmp/x")
    assert T.is_loopback_endpoint("tcp://127.0.0.1:5000")
    assert T.is_loopback_endpoint("tcp://[::1]:5000")
    assert T.is_loopback_endpoint("tcp://localhost:5000")
    assert not T.is_loopback_endpoint("tcp://192.0.2.1:5000")
