"""CURVE security on one machine: keys, admitted and rejected clients, what a rejected peer
can (not) do to the server, certificate files, and the warning for exposed servers.

Real server processes, loopback tcp and ipc.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import multiprocessing
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq
from zmq.utils import z85
from conftest import make_address, stop

import zproc
from zproc import _protocol as P
from zproc import _security
from zproc._client import Connection
from zproc._server import Server
from zproc._transport import ServerAddress

SECRET = "correct horse battery staple, but longer"
WRONG = "a different secret entirely"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def meta(address: ServerAddress, secret_key: Any) -> dict[str, Any]:
    """The server's META reply (versions, stats) over a connection with ``secret_key``."""
    conn = Connection(address, keys=_security.client_keys(secret_key))
    try:
        result: dict[str, Any] = conn.request(P.Kind.META, 0, b"", b"default", 10)
        return result
    finally:
        conn.close()


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(params=["tcp", "ipc"])
def secure_server(request: pytest.FixtureRequest) -> Iterator[ServerAddress]:
    """A server that requires SECRET, on loopback tcp and on ipc."""
    proc, addr = zproc.start_server(make_address(request.param), secret_key=SECRET)
    yield addr
    stop(proc)
    for endpoint in addr:
        if endpoint.startswith("ipc://"):
            folder = os.path.dirname(endpoint[len("ipc://") :])
            if os.path.isdir(folder):
                os.rmdir(folder)


@pytest.fixture
def tcp_secure_server() -> Iterator[ServerAddress]:
    proc, addr = zproc.start_server(make_address("tcp"), secret_key=SECRET)
    yield addr
    stop(proc)


# -- keys ---------------------------------------------------------------------------------


def test_keys_are_derived_deterministically_and_pair_up() -> None:
    server = _security.server_keys(SECRET)
    client = _security.client_keys(SECRET)
    assert server is not None and client is not None
    assert server == _security.server_keys(SECRET.encode())  # str and its utf-8 bytes
    assert client.server_public == server.public
    assert server.client_public == client.public
    assert zmq.curve_public(server.secret) == server.public
    assert zmq.curve_public(client.secret) == client.public
    assert server.secret != client.secret
    other = _security.client_keys(WRONG)
    assert other is not None
    assert other.public != client.public and other.server_public != server.public
    assert _security.server_keys(None) is None and _security.client_keys(None) is None


@pytest.mark.parametrize(
    ("secret_key", "error"),
    [(b"", ValueError), ("", ValueError), (12345, TypeError), (("a",), ValueError)],
)
def test_bad_secret_keys_are_refused_before_anything_starts(secret_key: Any, error: type) -> None:
    children = psutil.Process().children()
    with pytest.raises(error):
        zproc.start_server(secret_key=secret_key)
    with pytest.raises(error):
        zproc.State(make_address("tcp"), secret_key=secret_key)
    with pytest.raises(error):
        zproc.ping(make_address("tcp"), secret_key=secret_key)
    assert psutil.Process().children() == children


def test_a_str_that_is_a_path_is_not_taken_as_a_passphrase(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="pathlib.Path"):
        _security.client_keys(str(tmp_path))


def test_missing_certificates_are_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="server.key_secret"):
        zproc.start_server(secret_key=tmp_path)
    with pytest.raises(ValueError, match="server.key or server.key_secret"):
        _security.client_keys(tmp_path)
    (tmp_path / "server.key").write_text(f'curve\n    public-key = "{"0" * 40}"\n')
    with pytest.raises(ValueError, match="client.key_secret"):
        _security.client_keys(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        _security.client_keys(tmp_path / "nothing-here")


# -- the right key ----------------------------------------------------------------------


def _writer(address: Any, secret_key: Any, count: int) -> None:
    with zproc.State(address, secret_key=secret_key) as state:
        for i in range(count):
            state["n"] = i


def test_right_key_state_watchers_and_ping(secure_server: ServerAddress) -> None:
    with zproc.State(secure_server, secret_key=SECRET, request_timeout=20) as state:
        state["a"] = {"x": [1, 2]}
        assert state["a"] == {"x": [1, 2]}
        assert state.copy() == {"a": {"x": [1, 2]}}
        assert state.secret_key == SECRET
        pid = zproc.ping(secure_server, secret_key=SECRET)
        assert isinstance(pid, int) and state.ping() == pid
        assert meta(secure_server, SECRET)["pid"] == pid

        watcher = state.when_change("n", timeout=20)
        child = multiprocessing.get_context("fork").Process(
            target=_writer, args=(secure_server, SECRET, 50)
        )
        child.start()
        try:
            seen = [next(watcher)["n"] for _ in range(50)]
        finally:
            child.join(20)
        assert seen == list(range(50))
        assert child.exitcode == 0
        assert state.get_when_equal("n", 49, timeout=5) == 49


_USE_PICKLED = """
import os, pickle, sys
state = pickle.loads(sys.stdin.buffer.read())
state["from_child"] = os.getpid()
print(state.secret_key, state["from_child"])
state.close()
"""


def test_pickled_and_forked_states_keep_the_key(tcp_secure_server: ServerAddress) -> None:
    with zproc.State(tcp_secure_server, secret_key=SECRET) as state:
        child = subprocess.run(
            [sys.executable, "-c", _USE_PICKLED],
            input=pickle.dumps(state),
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert child.returncode == 0, child.stderr.decode()
        key, pid = child.stdout.decode().rsplit(" ", 1)
        assert key == SECRET
        assert state["from_child"] == int(pid)
        with state.fork(namespace="other") as other:
            other["y"] = 1
            assert other.secret_key == SECRET and other.copy() == {"y": 1}


def _child(state: zproc.State) -> int:
    state["child_key"] = state.secret_key
    return 5


def _nested(ctx: zproc.Context) -> int:
    return int(ctx.process(_child).wait(timeout=30))


def _square(x: int) -> int:
    return x * x


def _stateful_square(state: zproc.State, x: int) -> int:
    return x * x + int(state["offset"])


@pytest.mark.skipif(
    "secret_key" not in inspect.signature(zproc.Context).parameters,
    reason="Context has no secret_key keyword yet",
)
def test_context_hands_the_key_to_everything_it_creates() -> None:
    with zproc.Context(secret_key=SECRET) as ctx:  # type: ignore[call-arg]
        assert ctx.secret_key == SECRET  # type: ignore[attr-defined]
        assert ctx.state.secret_key == SECRET
        assert ctx.ping() == ctx.server_process.pid
        assert ctx.process(_child).wait(timeout=30) == 5
        assert ctx.state["child_key"] == SECRET
        assert ctx.process(_nested, pass_context=True).wait(timeout=60) == 5
        assert list(ctx.process_map(_square, range(6), count=2)) == [x * x for x in range(6)]
        ctx.state["offset"] = 1
        assert list(ctx.process_map(_stateful_square, range(4), count=2, stateful=True)) == [
            x * x + 1 for x in range(4)
        ]
        with ctx.create_state() as extra:
            assert extra.secret_key == SECRET and extra["offset"] == 1
        with pytest.raises(zproc.AuthenticationError):
            zproc.ping(ctx.server_address, timeout=10)  # the server it started has the key


# -- wrong or missing keys ------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret_key", "match"),
    [(WRONG, "secret_key"), (None, "requires a secret_key")],
    ids=["wrong", "missing"],
)
def test_wrong_or_missing_key_is_an_authentication_error(
    secure_server: ServerAddress, secret_key: Any, match: str
) -> None:
    start = time.monotonic()
    with pytest.raises(zproc.AuthenticationError, match=match):
        with zproc.State(secure_server, secret_key=secret_key, request_timeout=10) as state:
            state["never"] = 1
    with pytest.raises(zproc.AuthenticationError, match=match):
        zproc.ping(secure_server, secret_key=secret_key, timeout=10)
    assert time.monotonic() - start < 10  # well before any timeout


def test_short_timeout_names_the_key(tcp_secure_server: ServerAddress) -> None:
    with pytest.raises((zproc.TimeoutError, zproc.AuthenticationError), match="secret_key"):
        zproc.ping(tcp_secure_server, secret_key=WRONG, timeout=0.05)


def test_key_against_a_server_without_one() -> None:
    proc, addr = zproc.start_server(make_address("tcp"))
    try:
        # depending on timing the client sees either the plain greeting ("runs without
        # one") or the server dropping the handshake; both name the key
        with pytest.raises(zproc.AuthenticationError, match="secret_key"):
            zproc.ping(addr, secret_key=SECRET, timeout=10)
    finally:
        stop(proc)


class _Marker:
    """Creates a file when unpickled: proves whether a body was unpickled by the server."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _raw_request(address: ServerAddress, keys: Any, body: bytes) -> None:
    """Send one GET request whose arguments are ``body``, over a raw DEALER."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    _security.configure_client(sock, keys)
    try:
        sock.connect(address.req_rep)
        sock.send(P.request_frame(P.Kind.CALL, P.Method.GET, 1, b"default", body))
        sock.poll(1500)  # a reply (right key) or nothing (rejected)
    finally:
        sock.close(0)


def test_rejected_peers_are_counted_and_nothing_of_theirs_is_unpickled(
    tcp_secure_server: ServerAddress, tmp_path: pathlib.Path
) -> None:
    addr = tcp_secure_server
    probes = []

    def stats() -> dict[str, int]:
        probes.append(1)
        return meta(addr, SECRET)["stats"]  # type: ignore[no-any-return]

    before = stats()
    for name, keys in [
        ("wrong", _security.client_keys(WRONG)),
        ("none", None),
        # the server's public key but a client key of its own: ZAP must refuse it
        ("impostor", _security.ClientKeys(*zmq.curve_keypair(),
                                          _security.client_keys(SECRET).server_public)),  # type: ignore[union-attr]
    ]:
        marker = tmp_path / f"unpickled-{name}"
        _raw_request(addr, keys, pickle.dumps((_Marker(str(marker)),)))
        assert not marker.exists(), f"the server unpickled the body of a {name!r} peer"
    wait_for(lambda: stats()["rejected"] >= before["rejected"] + 3,
             what="the rejected count to grow")
    after = stats()
    # the META requests of this test are the only requests the server saw
    assert after["requests"] == before["requests"] + len(probes) - 1
    assert after["errors"] == before["errors"] and after["dropped"] == before["dropped"]
    # control: the same message with the right key does reach unpickling
    marker = tmp_path / "unpickled-right"
    _raw_request(addr, _security.client_keys(SECRET), pickle.dumps((_Marker(str(marker)),)))
    wait_for(marker.exists, what="the control message to be unpickled")


def test_rejections_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The gatekeeper (run here, in-process) logs a refused client with its key."""
    address = make_address("tcp")
    ctx = zmq.Context()
    keys = _security.server_keys(SECRET)
    assert keys is not None
    stats: dict[str, int] = {}
    server = ctx.socket(zmq.ROUTER)
    guard = _security.Guard(ctx, keys, stats)
    client = ctx.socket(zmq.DEALER)
    try:
        with caplog.at_level(logging.DEBUG, logger="zproc"):
            guard.start([("requests", server)])
            server.bind(address.req_rep)
            impostor = _security.ClientKeys(*zmq.curve_keypair(), keys.public)
            _security.configure_client(client, impostor)
            client.connect(address.req_rep)
            client.send(b"x")
            wait_for(lambda: stats.get("rejected", 0) >= 1, what="a rejection")
            assert not server.poll(100)
        text = caplog.text
        assert "refused a client" in text and impostor.public.decode() in text
        assert "rejected a peer" in text
    finally:
        client.close(0)
        server.close(0)
        guard.close()
        ctx.term()


# -- certificates -----------------------------------------------------------------------


def test_certificate_directory_and_pair(tmp_path: pathlib.Path) -> None:
    keys_dir = tmp_path / "keys"
    server_secret, _client_secret = _security.create_certificates(keys_dir)
    assert os.stat(server_secret).st_mode & 0o077 == 0  # secret files are private
    with pytest.raises(FileExistsError):
        _security.create_certificates(keys_dir)
    proc, addr = zproc.start_server(make_address("tcp"), secret_key=keys_dir)
    try:
        with zproc.State(addr, secret_key=keys_dir) as state:
            state["k"] = "v"
        # the explicit pair: the server's public half and the client's secret half
        pair = (keys_dir / "server.key", keys_dir / "client.key_secret")
        with zproc.State(addr, secret_key=pair) as state:
            assert state["k"] == "v"
        assert zproc.ping(addr, secret_key=pair) == proc.pid
        # a client certificate the server does not know: refused by the ZAP handler
        other_dir = tmp_path / "other"
        _security.create_certificates(other_dir)
        stranger = (keys_dir / "server.key", other_dir / "client.key_secret")
        with pytest.raises(zproc.AuthenticationError, match="rejected this client's CURVE key"):
            zproc.ping(addr, secret_key=stranger, timeout=10)
        with pytest.raises(zproc.AuthenticationError):
            zproc.ping(addr, secret_key=other_dir, timeout=10)
        with pytest.raises(zproc.AuthenticationError):
            zproc.ping(addr, secret_key=SECRET, timeout=10)
    finally:
        stop(proc)
    with pytest.raises(ValueError, match="holds no secret key"):
        _security.client_keys((keys_dir / "server.key", keys_dir / "client.key"))


def test_secure_server_in_process_closes_its_gatekeeper() -> None:
    keys = _security.server_keys(SECRET)
    threads = threading.active_count()
    for _ in range(2):  # the ZAP endpoint is free again after close()
        server = Server(make_address("tcp"), keys=keys)
        assert "rejected" in server.stats
        server.close()
    wait_for(lambda: threading.active_count() <= threads, what="the guard thread to end")


@pytest.mark.parametrize("secure", [True, False], ids=["client-with-key", "client-without"])
def test_handshakes_dropped_without_detail_name_the_key(secure: bool) -> None:
    """A server that only ever drops the handshake (no reason given) points at the keys,
    for a client with a key and for one without (a CURVE server drops plain clients)."""
    no_detail = getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0)
    if not no_detail:
        pytest.skip("this libzmq reports no handshake failures")
    watch = _security.HandshakeWatch("tcp://127.0.0.1:1", secure=secure)
    for _ in range(_security.NO_DETAIL_LIMIT - 1):
        watch.on_event(no_detail, 0)
    assert watch.error() is None
    watch.on_event(no_detail, 0)
    error = watch.error()
    assert isinstance(error, zproc.AuthenticationError)
    expected = "secret_key differs" if secure else "requires a secret_key"
    assert expected in str(error)


# -- the passphrase ------------------------------------------------------------------------


@pytest.mark.parametrize("short", ["fifteen chars!!", b"fifteen bytes!!", "sunshine1"])
def test_passphrases_under_16_characters_are_refused(short: Any) -> None:
    children = psutil.Process().children()
    for attempt in (
        lambda: zproc.start_server(secret_key=short),
        lambda: zproc.State(make_address("tcp"), secret_key=short),
        lambda: zproc.ping(make_address("tcp"), secret_key=short),
    ):
        with pytest.raises(ValueError, match="use 16 or more") as info:
            attempt()
        assert "zproc keygen" in str(info.value)
        text = short.decode() if isinstance(short, bytes) else short
        assert text not in str(info.value)  # the passphrase never lands in a message
    assert psutil.Process().children() == children
    assert _security.server_keys("sixteen chars!!!") is not None
    assert _security.server_keys("é" * 16) is not None  # characters, not utf-8 bytes


def test_the_kdf_is_scrypt_with_n_2_17() -> None:
    """The derivation is what the docs say: guessing costs N = 2**17 per try."""
    assert _security.KDF_N >= 2**17 and _security.KDF_R >= 8
    master = hashlib.scrypt(SECRET.encode(), salt=b"zproc CURVE keys v2", n=2**17, r=8,
                            p=1, dklen=32, maxmem=256 * 1024 * 1024)
    server = hashlib.blake2b(master, digest_size=32, person=b"zproc server").digest()
    keys = _security.server_keys(SECRET)
    assert keys is not None and keys.secret == z85.encode(server)


def test_cli_refuses_a_short_passphrase(tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sunshine1\n")
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "ZPROC_SECRET_KEY"}
    for args, extra in (
        (["--secret-key-file", str(key_file)], {}),
        ([], {"ZPROC_SECRET_KEY": "sunshine1"}),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "zproc", "ping", *make_address("tcp"), *args],
            capture_output=True, text=True, timeout=60, env={**env, **extra}, check=False,
        )
        assert done.returncode == 2 and "zproc keygen" in done.stderr, done
        assert "sunshine1" not in done.stderr
