"""The state server: start_server, addresses, ping, and surviving any input.

Real server processes and real sockets; garbage is sent from a raw zmq DEALER.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import free_tcp_port
import zmq

import zproc
from zproc import _protocol as P
from zproc import _serialization as S

REQUEST = struct.Struct("<BBBIH")


def _stop(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    proc.join(5)


def _ipc_path(endpoint: str) -> str:
    assert endpoint.startswith("ipc://")
    return endpoint[len("ipc://") :]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def served() -> Iterator[tuple[Any, zproc.ServerAddress]]:
    """A server at a random address, with its process object."""
    proc, addr = zproc.start_server()
    try:
        yield proc, addr
    finally:
        _stop(proc)


# -- start_server ---------------------------------------------------------------------------


def test_random_address_is_private_ipc_and_removed_after_stop(
    capfd: pytest.CaptureFixture[str],
) -> None:
    proc, addr = zproc.start_server()
    try:
        assert type(addr) is zproc.ServerAddress
        assert proc.is_alive()
        assert proc.daemon is False  # non-daemonic, as upstream
        paths = [_ipc_path(endpoint) for endpoint in addr]
        folder = os.path.dirname(paths[0])
        assert os.path.dirname(paths[1]) == folder
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert os.path.basename(folder).startswith("zproc-")
        assert folder.startswith((tempfile.gettempdir() + os.sep, "/tmp/"))
        for path in paths:
            assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert zproc.ping(addr, timeout=5) == proc.pid
    finally:
        proc.terminate()
        proc.join(5)
    assert proc.exitcode == -signal.SIGTERM
    assert not os.path.exists(folder), "ipc directory left behind"
    assert "Traceback" not in capfd.readouterr().err


def test_server_exits_quietly_on_sigint(capfd: pytest.CaptureFixture[str]) -> None:
    proc, addr = zproc.start_server()
    folder = os.path.dirname(_ipc_path(addr.req_rep))
    os.kill(proc.pid, signal.SIGINT)
    proc.join(5)
    assert not proc.is_alive()
    assert proc.exitcode == -signal.SIGINT
    assert not os.path.exists(folder)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_two_random_servers_get_different_addresses() -> None:
    proc1, addr1 = zproc.start_server()
    try:
        proc2, addr2 = zproc.start_server()
        try:
            assert set(addr1).isdisjoint(addr2)
            assert zproc.ping(addr1, timeout=5) == proc1.pid
            assert zproc.ping(addr2, timeout=5) == proc2.pid
        finally:
            _stop(proc2)
    finally:
        _stop(proc1)


def test_explicit_address(address: zproc.ServerAddress) -> None:
    proc, addr = zproc.start_server(list(address))
    try:
        assert type(addr) is zproc.ServerAddress
        assert addr == address
        assert zproc.ping(addr, timeout=5) == proc.pid
        with zproc.State(addr, request_timeout=10) as state:
            state["x"] = 1
            assert state.copy() == {"x": 1}
    finally:
        _stop(proc)
    # the address fixture checks that no ipc file is left


def test_busy_address_raises_address_in_use(address: zproc.ServerAddress) -> None:
    proc, addr = zproc.start_server(address)
    try:
        with zproc.State(addr, request_timeout=10) as state:
            state["kept"] = "yes"
            before = _children()
            with pytest.raises(zproc.AddressInUseError) as info:
                zproc.start_server(address, timeout=10)
            err = info.value
            assert isinstance(err, zproc.ServerError)
            assert isinstance(err, ConnectionError)
            assert address.req_rep in str(err)
            assert "already" in str(err)
            # the failed server process is gone (the fixture also checks at the end)
            time.sleep(0.1)
            assert _children() <= before
            # the first server still owns its address and its data
            assert zproc.ping(addr, timeout=5) == proc.pid
            assert state["kept"] == "yes"
            with zproc.State(addr, request_timeout=10) as other:
                assert other.copy() == {"kept": "yes"}
    finally:
        _stop(proc)


def test_busy_pub_sub_endpoint_only(address: zproc.ServerAddress) -> None:
    """Only the second endpoint is taken: the first is released and its ipc file removed."""
    if address.req_rep.startswith("ipc://"):
        fresh = "ipc://" + os.path.join(os.path.dirname(_ipc_path(address.req_rep)), "rr2")
    else:
        fresh = _free_tcp()
    other = _other_endpoint(address)
    proc, addr = zproc.start_server(address)
    try:
        with pytest.raises(zproc.AddressInUseError) as info:
            zproc.start_server((fresh, address.pub_sub))
        assert address.pub_sub in str(info.value)
        if fresh.startswith("ipc://"):
            assert not os.path.exists(_ipc_path(fresh))
        assert zproc.ping(addr, timeout=5) == proc.pid
        # the fresh endpoint was released: a server can use it now
        proc2, addr2 = zproc.start_server((fresh, other))
        try:
            assert zproc.ping(addr2, timeout=5) == proc2.pid
        finally:
            _stop(proc2)
    finally:
        _stop(proc)
        for endpoint in (fresh, other):  # in case a server was killed before cleaning up
            if endpoint.startswith("ipc://") and os.path.exists(_ipc_path(endpoint)):
                os.unlink(_ipc_path(endpoint))
                pytest.fail(f"ipc file left behind: {endpoint}")


def _other_endpoint(address: zproc.ServerAddress) -> str:
    if address.pub_sub.startswith("ipc://"):
        return "ipc://" + os.path.join(os.path.dirname(_ipc_path(address.pub_sub)), "ps2")
    return _free_tcp()


def _free_tcp() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def test_tcp_port_taken_by_another_program() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(zproc.AddressInUseError, match="in use"):
            zproc.start_server((taken, _free_tcp()))


def test_stale_ipc_file_is_reused(tmp_path: Any) -> None:
    """A socket file left by a dead server does not count as 'in use'."""
    folder = str(tmp_path)
    address = (f"ipc://{folder}/rr", f"ipc://{folder}/ps")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{folder}/rr")  # a socket file nobody listens on
    stale.close()
    proc, addr = zproc.start_server(address)
    try:
        assert zproc.ping(addr, timeout=5) == proc.pid
    finally:
        _stop(proc)
    assert not os.path.exists(f"{folder}/rr") and not os.path.exists(f"{folder}/ps")
    assert os.path.isdir(folder)  # a directory the server did not create is kept


@pytest.mark.parametrize("request_first", [False, True])
def test_sigterm_stops_the_server_promptly(request_first: bool) -> None:
    """terminate() right after a request must stop the server, and remove its files.

    A SIGTERM that arrives while the loop is entering a blocking recv() must not be
    left pending until the next request.
    """
    for _ in range(10):
        proc, addr = zproc.start_server()
        folder = os.path.dirname(_ipc_path(addr.req_rep))
        if request_first:
            assert zproc.ping(addr, timeout=5) == proc.pid
        started = time.monotonic()
        proc.terminate()
        proc.join(2.5)
        stopped = not proc.is_alive()
        _stop(proc)
        assert stopped, (
            f"the server ignored SIGTERM for {time.monotonic() - started:.1f} s after "
            f"{'a request' if request_first else 'starting'}"
        )
        assert proc.exitcode == -signal.SIGTERM
        assert not os.path.exists(folder)


class _NoProcessBackend:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a server process was created for an invalid address")


@pytest.mark.parametrize(
    "bad",
    [
        ("foo", "bar"),
        ("tcp://127.0.0.1:1", "tcp://127.0.0.1:1"),
        ("inproc://a", "tcp://127.0.0.1:2"),
        ("tcp://*:5000", "tcp://127.0.0.1:5001"),
        "tcp://127.0.0.1:5000",
    ],
)
def test_invalid_endpoint_fails_before_any_process_starts(bad: Any) -> None:
    before = _children()
    with pytest.raises(ValueError):
        zproc.start_server(bad, backend=_NoProcessBackend)
    with pytest.raises(ValueError):
        zproc.start_server(bad)
    assert _children() == before


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://192.0.2.1:{port}", "ipc:///nonexistent-zproc-dir/sub/rr"],
    ids=["address-not-local", "ipc-dir-missing"],
)
def test_unbindable_endpoint_raises_with_remote_cause(endpoint: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = _children()
    with pytest.raises((ValueError, zproc.ServerError)) as info:
        # insecure=True: get past the refusal of a public address to the bind itself
        zproc.start_server((endpoint.format(port=port), f"tcp://127.0.0.1:{port}"),
                           insecure=True)
    assert endpoint.format(port=port) in str(info.value)
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    time.sleep(0.1)
    assert _children() <= before


def test_thread_backend_is_rejected() -> None:
    with pytest.raises(TypeError, match="thread"):
        zproc.start_server(backend=threading.Thread)


class _SilentProcess(multiprocessing.Process):
    """Starts, but never runs a server (so it never reports)."""

    def run(self) -> None:
        time.sleep(30)


class _DyingProcess(multiprocessing.Process):
    def run(self) -> None:
        os._exit(3)


def test_start_timeout_terminates_the_half_started_process() -> None:
    before = _children()
    started = time.monotonic()
    with pytest.raises(zproc.TimeoutError, match="did not report"):
        zproc.start_server(backend=_SilentProcess, timeout=0.5)
    assert time.monotonic() - started < 5
    time.sleep(0.1)
    assert _children() <= before


def test_server_dying_during_start_is_a_server_error() -> None:
    with pytest.raises(zproc.ServerError, match="exit code 3"):
        zproc.start_server(backend=_DyingProcess, timeout=10)


# -- ping -------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [None, b"", b"x", os.urandom(56), b"\x00" * 1_000_000])
def test_ping_returns_the_server_pid(served: Any, payload: bytes | None) -> None:
    proc, addr = served
    assert zproc.ping(addr, timeout=10, payload=payload) == proc.pid
    assert zproc.ping(tuple(addr), timeout=10, payload=payload) == proc.pid


def test_ping_with_timeout_zero_raises(served: Any) -> None:
    _, addr = served
    with pytest.raises(zproc.TimeoutError):
        zproc.ping(addr, timeout=0)


def test_ping_arguments_are_checked(served: Any) -> None:
    _, addr = served
    with pytest.raises(TypeError, match="bytes"):
        zproc.ping(addr, payload="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        zproc.ping(addr, timeout=-1)
    with pytest.raises(ValueError):
        zproc.ping(("foo", "bar"))


def test_ping_nobody_serves(address: zproc.ServerAddress) -> None:
    started = time.monotonic()
    with pytest.raises(zproc.TimeoutError) as info:
        zproc.ping(address, timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3
    assert isinstance(info.value, TimeoutError)  # the builtin too
    assert address.req_rep in str(info.value)
    assert "start_server" in str(info.value)


def test_ping_stopped_server() -> None:
    proc, addr = zproc.start_server()
    assert zproc.ping(addr, timeout=5) == proc.pid
    _stop(proc)
    with pytest.raises(zproc.TimeoutError):
        zproc.ping(addr, timeout=0.5)


def test_ping_returns_none_when_the_echo_differs(address: zproc.ServerAddress) -> None:
    """A stub ROUTER that answers pings with other bytes."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    router.bind(address.req_rep)

    def answer() -> None:
        if router.poll(10_000):
            identity, frame = router.recv_multipart()
            rid = P.parse_request(frame)[0].request_id
            router.send_multipart(P.reply(identity, P.Status.OK, rid, S.dumps((b"other", 4321))))

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert zproc.ping(address, timeout=10, payload=b"mine") is None
    finally:
        thread.join(15)
        router.close(0)
        if address.req_rep.startswith("ipc://"):
            os.unlink(_ipc_path(address.req_rep))


def test_state_ping(state: zproc.State) -> None:
    pid = state.ping(timeout=5)
    assert isinstance(pid, int) and psutil.pid_exists(pid) and pid != os.getpid()


# -- surviving garbage ----------------------------------------------------------------------


def _request(kind: int, method: int = 0, rid: int = 1, ns: bytes = b"default",
             version: int = P.PROTOCOL_VERSION, body: bytes = b"") -> bytes:
    return REQUEST.pack(version, kind, method, rid, len(ns)) + ns + body


# Pickle bytes for an instance of nonexistent_zproc_mod.Cls, made by hand: the server
# cannot import it whatever modules it inherited through fork.
UNIMPORTABLE = b"\x80\x02cnonexistent_zproc_mod\nCls\n)\x81."
# an args tuple (key, <unimportable value>) for SETITEM
UNIMPORTABLE_ARGS = b"\x80\x02X\x01\x00\x00\x00kcnonexistent_zproc_mod\nCls\n)\x81\x86."

GARBAGE: dict[str, tuple[list[bytes], int | None, type[BaseException] | None]] = {
    # name: (frames sent by the DEALER, request id of the expected error reply or None for
    # "no reply", expected exception type)
    "random-1-frame": ([os.urandom(3)], None, None),
    "empty-1-frame": ([b""], None, None),
    "cut-namespace": ([_request(P.Kind.PING, rid=11)[:-2]], 11, zproc.ProtocolError),
    "5-frames": ([_request(P.Kind.PING, rid=12), b"a", b"b", b"c", b"d"], 12,
                 zproc.ProtocolError),
    "random-2-frames": ([os.urandom(2), os.urandom(100)], None, None),
    "bad-version": ([_request(P.Kind.PING, rid=13, version=99, body=b"x")], 13,
                    zproc.ProtocolError),
    "unknown-kind": ([_request(200, rid=14, body=b"")], 14, zproc.ProtocolError),
    "kind-zero": ([_request(0, rid=15, body=b"")], 15, zproc.ProtocolError),
    "unknown-method": ([_request(P.Kind.CALL, 99, rid=16, body=S.dumps(()))], 16,
                       zproc.ProtocolError),
    "bad-utf8-namespace": ([_request(P.Kind.HEAD, rid=17, ns=b"\xff", body=b"")], 17,
                           zproc.ProtocolError),
    "empty-namespace": ([_request(P.Kind.HEAD, rid=18, ns=b"", body=b"")], 18,
                        zproc.ProtocolError),
    "call-garbage-body": ([_request(P.Kind.CALL, P.Method.LEN, rid=19, body=b"\x00junk")], 19,
                          zproc.ProtocolError),
    "call-body-not-tuple": ([_request(P.Kind.CALL, P.Method.LEN, rid=20, body=S.dumps([1]))], 20,
                            zproc.ProtocolError),
    "call-wrong-arity": ([_request(P.Kind.CALL, P.Method.GETITEM, rid=21, body=S.dumps(()))], 21,
                         TypeError),
    "call-unhashable-key": ([_request(P.Kind.CALL, P.Method.SETITEM, rid=22,
                      body=S.dumps(([1], 2)))], 22, TypeError),
    "unimportable-value": ([_request(P.Kind.CALL, P.Method.SETITEM, rid=23,
                                     body=UNIMPORTABLE_ARGS)],
                           23, zproc.ProtocolError),
    "fetch-garbage": ([_request(P.Kind.FETCH, rid=24, body=b"junk")], 24, zproc.ProtocolError),
    "fetch-bad-shape": ([_request(P.Kind.FETCH, rid=25, body=S.dumps("x"))], 25,
                        zproc.ProtocolError),
    "atomic-garbage": ([_request(P.Kind.ATOMIC, rid=26, body=b"junk")], 26, zproc.ProtocolError),
    "atomic-unimportable": ([_request(P.Kind.ATOMIC, rid=27, body=UNIMPORTABLE)], 27,
                            zproc.ProtocolError),
    "atomic-not-callable": ([_request(P.Kind.ATOMIC, rid=28, body=S.dumps((1, (), {})))], 28,
                            TypeError),
    "atomic-unknown-form": ([_request(P.Kind.ATOMIC, 9, rid=29, body=S.dumps((1, (), {})))], 29,
                            zproc.ProtocolError),
    "atomic-unknown-digest": ([_request(P.Kind.ATOMIC, P.AtomicForm.DIGEST, rid=30,
                      body=S.dumps((bytes(32), (), {})))], 30, zproc.UnknownFunctionError),
    "atomic-define-not-bytes": ([_request(P.Kind.ATOMIC, P.AtomicForm.DEFINE, rid=31,
                      body=S.dumps((1, (), {})))], 31, zproc.ProtocolError),
    "atomic-define-garbage": ([_request(P.Kind.ATOMIC, P.AtomicForm.DEFINE, rid=32,
                      body=S.dumps((b"junk", (), {})))], 32, zproc.ProtocolError),
}


@pytest.fixture
def dealer(served: Any) -> Iterator[tuple[zmq.Socket[Any], Any, zproc.ServerAddress]]:
    proc, addr = served
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = b"\x01raw-dealer"
    sock.connect(addr.req_rep)
    try:
        yield sock, proc, addr
    finally:
        sock.close(0)


def _replies(sock: zmq.Socket[Any], wait: float) -> list[list[bytes]]:
    """Every reply that arrives within ``wait`` seconds of the first poll."""
    out = []
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(remaining * 1000):
            return out
        out.append(sock.recv_multipart())


def _replies_until(sock: zmq.Socket[Any], rid: int, wait: float = 10.0) -> list[list[bytes]]:
    """Replies up to and including the one to request ``rid``, then any stray ones.

    The server answers one DEALER's requests in order, so every reply to the requests
    sent before ``rid`` has arrived by then.
    """
    out = []
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and sock.poll(remaining * 1000), f"no reply to request {rid}"
        out.append(sock.recv_multipart())
        if len(out[-1]) == 1 and P.parse_reply(out[-1])[1] == rid:
            return out + _replies(sock, 0.05)


def _ping_raw(sock: zmq.Socket[Any], rid: int) -> tuple[bytes, int]:
    sock.send_multipart([_request(P.Kind.PING, rid=rid, body=b"hello")])
    replies = _replies_until(sock, rid)
    assert len(replies) == 1, replies
    status, got, _, body = P.parse_reply(replies[0])
    assert (status, got) == (P.Status.OK, rid)
    return S.loads(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(GARBAGE))
def test_server_survives_garbage(dealer: Any, name: str) -> None:
    sock, proc, addr = dealer
    frames, rid, error = GARBAGE[name]
    with zproc.State(addr, request_timeout=10) as state:
        state["before"] = [1, 2]
        sock.send_multipart(frames)
        sock.send_multipart([_request(P.Kind.PING, rid=1000, body=b"hello")])
        *replies, last = _replies_until(sock, 1000)
        status, got, _, body = P.parse_reply(last)
        assert (status, got) == (P.Status.OK, 1000)
        assert S.loads(body) == (b"hello", proc.pid)
        if rid is None:
            # undecodable: no reply can be addressed; at most an error with a junk id
            for reply in replies:
                assert P.parse_reply(reply)[0] == P.Status.ERROR
            assert len(replies) <= 1
        else:
            assert len(replies) == 1, f"expected exactly one reply, got {replies}"
            status, got, _, body = P.parse_reply(replies[0])
            assert (status, got) == (P.Status.ERROR, rid)
            exc = S.loads_exception(body)
            assert type(exc) is error, exc
            assert isinstance(exc.__cause__, zproc.RemoteTraceback)
        assert proc.is_alive()
        # the raw socket is still in step
        assert _ping_raw(sock, 1001) == (b"hello", proc.pid)
        # and a normal State is answered correctly, with no reply shift
        state["after"] = {"k": "v"}
        assert state["before"] == [1, 2]
        assert state.copy() == {"before": [1, 2], "after": {"k": "v"}}
        assert len(state) == 2
        assert state.ping(timeout=5) == proc.pid


def test_server_survives_all_garbage_in_one_burst(dealer: Any) -> None:
    sock, proc, addr = dealer
    expected = []
    for frames, rid, _error in GARBAGE.values():
        sock.send_multipart(frames)
        if rid is not None:
            expected.append(rid)
    sock.send_multipart([_request(P.Kind.PING, rid=999, body=b"end")])
    replies = _replies_until(sock, 999)
    answered = [P.parse_reply(r)[:2] for r in replies]
    ids = [rid for _status, rid in answered]
    for rid in expected + [999]:
        assert ids.count(rid) == 1, f"request {rid}: {ids.count(rid)} replies"
    assert (P.Status.OK, 999) in answered
    with zproc.State(addr, request_timeout=10) as state:
        state["x"] = 1
        assert state["x"] == 1


def test_unimportable_value_error_names_the_module(dealer: Any) -> None:
    sock, _proc, _addr = dealer
    sock.send_multipart([_request(P.Kind.CALL, P.Method.SETITEM, rid=5, body=UNIMPORTABLE_ARGS)])
    [reply] = _replies_until(sock, 5)
    exc = S.loads_exception(P.parse_reply(reply)[3])
    assert isinstance(exc, zproc.ProtocolError)
    assert "nonexistent_zproc_mod" in str(exc) and "importable" in str(exc)


def test_class_defined_after_the_server_started(served: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a class defined in __main__ after start_server: the server cannot load it."""
    proc, addr = served
    late_class = type("LateClass", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "LateClass", late_class, raising=False)
    with zproc.State(addr, request_timeout=10) as state:
        state["ok"] = 1
        with pytest.raises(zproc.ProtocolError) as info:
            state["late"] = late_class()
        message = str(info.value)
        assert "__main__.LateClass" in message
        assert "importable module" in message and "before the server starts" in message
        assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
        assert proc.is_alive()
        assert state.copy() == {"ok": 1}
        assert "late" not in state


class EqRaises:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("this value cannot be compared")

    __hash__ = None  # type: ignore[assignment]


class Ambiguous:
    def __bool__(self) -> bool:
        raise ValueError("The truth value of an array with more than one element is ambiguous")


class NumpyLike:
    """Mimics a NumPy array: == returns something without a truth value (B20)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        return Ambiguous()

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("cls", [EqRaises, NumpyLike])
def test_misbehaving_eq_counts_as_changed_and_never_shifts_replies(served: Any, cls: Any) -> None:
    proc, addr = served
    with zproc.State(addr, request_timeout=10) as state, \
            zproc.State(addr, request_timeout=10) as other:
        state["n"] = 1
        state["v"] = cls(1)
        state["v"] = cls(2)  # comparing old and new fails: treated as a change
        assert state["v"].value == 2
        assert state["n"] == 1
        assert state.get("n") == 1
        assert state.get("v").value == 2
        assert len(state) == 2
        assert "v" in state
        assert other["v"].value == 2
        # a comparison that fails on the server is an error reply, once
        with pytest.raises((RuntimeError, ValueError)) as info:
            state == {"n": 1, "v": 0}  # noqa: B015
        assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
        assert state["n"] == 1
        assert len(state) == 2
        assert sorted(state) == ["n", "v"]
        state.update({"v": cls(3), "n": 2})
        assert (state["n"], state["v"].value) == (2, 3)
        assert proc.is_alive()


def test_unpicklable_value_fails_in_the_client(state: zproc.State) -> None:
    state["a"] = 1
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        state["f"] = lambda: 0
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        state["lock"] = threading.Lock()
    assert state.copy() == {"a": 1}


# -- importing zproc touches no file --------------------------------------------------------


def test_import_creates_no_file(tmp_path: Any) -> None:
    home, tmp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for folder in (home, tmp, cwd):
        folder.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(zproc.__file__)), env.get("PYTHONPATH", "")]
    )
    code = (
        "import zproc, zproc.state, zproc.context, zproc._server, zproc._client, "
        "zproc._transport, zproc._protocol, zproc._serialization\n"
        "import tempfile; print(tempfile.gettempdir())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp)
    for folder in (home, tmp, cwd):
        assert list(folder.iterdir()) == [], f"import created files in {folder}"


def test_a_burst_longer_than_one_batch_loses_no_request(state: zproc.State) -> None:
    """More requests queued than one batch of the loop holds: each one is answered (the
    message that ends a full batch was once received and dropped)."""
    conn = state._connection()
    n = 3 * 256 + 5
    rids = [
        conn.send(int(P.Kind.CALL), int(P.Method.SETITEM), S.dumps((f"k{i}", i)), state._ns)
        for i in range(n)
    ]
    for rid in rids:
        assert conn.result(rid, 10) is None
    assert len(state) == n


def _burst(state: zproc.State, key: str, n: int) -> list[int]:
    """Send ``n`` sets of ``key`` without waiting, then read the replies: their heads."""
    conn = state._connection()
    rids = [conn.send(int(P.Kind.CALL), int(P.Method.SETITEM), S.dumps((key, i)), state._ns)
            for i in range(n)]
    heads = []
    for rid in rids:
        assert conn.result(rid, 30) is None
        heads.append(conn.head)
    return heads


def test_batches_of_many_clients_keep_each_clients_order_and_every_sequence_number(
    ctx: zproc.Context,
) -> None:
    """Four processes write at once, so the server's batches mix their requests: each
    client's writes apply in the order sent, each reply reports a head no lower than the
    one before, and the events number every change once, without a gap."""
    n, keys = 500, [f"c{i}" for i in range(4)]
    procs = [ctx.process(_burst, args=(key, n)) for key in keys]
    for proc in procs:
        heads = proc.wait(timeout=60)
        assert heads == sorted(heads) and heads[-1] <= 4 * n
    conn = ctx.state._connection()
    fetched = P.fetch_reply(conn.request(int(P.Kind.FETCH), 0, P.fetch_request(0, False, b""),
                                         ctx.state._ns, 30))
    events = fetched.events
    assert events is not None and fetched.head == 4 * n
    assert [event.seq for event in events] == list(range(1, 4 * n + 1))
    for key in keys:
        values = [event.changes[key] for event in events if key in event.changes]
        assert values == list(range(n))
        assert ctx.state[key] == n - 1
