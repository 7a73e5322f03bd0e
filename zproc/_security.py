"""CURVE security: the keys, the sockets that use them, and the server's gatekeeper.

Every zproc endpoint unpickles what it receives, so anyone who can connect to a server can
run code in it. With a ``secret_key``, every socket of the server (ROUTER and PUB) and of
its clients (DEALER and SUB) runs CurveZMQ: encryption plus mutual authentication, checked
before a single message reaches the server loop::

    secret_key ──▶ keys()
                    ├── ServerKeys(public, secret, client_public)  server: ROUTER, PUB
                    └── ClientKeys(public, secret, server_public)  clients: DEALER, SUB

    client ──CURVE handshake──▶ server socket ──ZAP request──▶ Guard thread
                                               ◀──200 / 400──  (admits client_public only)

What a ``secret_key`` may be:

``str`` or ``bytes``
    A shared passphrase of at least 16 characters. Both sides derive from it,
    deterministically, the server's key pair and the one client key pair the server admits
    (scrypt with N = 2**17, then BLAKE2b with one label per key). Use a long random string:
    ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
:class:`os.PathLike` (e.g. :class:`pathlib.Path`)
    A directory of certificates in :mod:`zmq.auth` format, as written by ``zproc keygen``
    (or :func:`zmq.auth.create_certificates` with the names ``server`` and ``client``).
    A server reads ``server.key_secret`` and ``client.key`` (or ``client.key_secret``);
    a client reads ``client.key_secret`` and ``server.key`` (or ``server.key_secret``).
``(server_cert, client_cert)``
    Two certificate files. The server needs the secret part of ``server_cert``, a client
    the secret part of ``client_cert``; of the other one, the public key is enough.

The :class:`Guard` (server side, one thread) answers the ZAP requests of the server's
sockets, admitting only the client key, and watches the sockets' handshake events: every
failed handshake (wrong key, no key, a key where the server has none) is counted in the
server's ``stats["rejected"]`` and logged. :class:`HandshakeWatch` (client side) turns the
same events on a client socket into a :class:`~zproc.AuthenticationError`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from ._transport import is_loopback_endpoint
from ._utils import NOT_WRITABLE_BY_OTHERS, OWNER_ONLY, check_private
from .exceptions import AuthenticationError

__all__ = [
    "ClientKeys",
    "Guard",
    "HandshakeWatch",
    "SecretKey",
    "ServerKeys",
    "client_keys",
    "configure_client",
    "configure_server",
    "create_certificates",
    "server_keys",
    "exposed_endpoints",
    "refuse_exposed",
    "warn_exposed",
]

log = logging.getLogger("zproc.server")

PathArg = Union[str, "os.PathLike[str]"]
#: What ``secret_key=`` accepts (see the module docstring).
SecretKey = Union[str, bytes, "os.PathLike[str]", tuple[PathArg, PathArg]]

#: The ZAP domain of zproc's server sockets.
ZAP_DOMAIN = b"zproc"
#: Where libzmq sends ZAP requests (RFC 27); one handler per ZeroMQ context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

#: The salt of the passphrase KDF: fixed, and versioned with the derivation. A salt of
#: each deployment's own would have to reach a client before it derives the server key it
#: pins, which CURVE's handshake has no room for; the cost below and the minimum length
#: are what stand against guessing instead (see docs/security.rst).
_KDF_SALT = b"zproc CURVE keys v2"
#: scrypt's cost: N = 2**17, r = 8 (128 MiB and about half a second, once per process).
KDF_N = 2**17
KDF_R = 8
#: The shortest passphrase accepted, in characters (bytes for a ``bytes`` passphrase).
MIN_PASSPHRASE = 16
_SERVER_LABEL = b"zproc server"
_CLIENT_LABEL = b"zproc client"

#: Consecutive handshakes the server closed without a word before a client concludes that
#: the keys differ (a wrong server key gives the client nothing more precise).
NO_DETAIL_LIMIT = 3

HANDSHAKE_SUCCEEDED: int = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", 0)
HANDSHAKE_FAILED: int = (
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0)
    | getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0)
    | getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)
)
#: The monitor events a client watches for its handshakes (0 with libzmq < 4.3).
HANDSHAKE_EVENTS = HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED


class ServerKeys(NamedTuple):
    """The server's CURVE key pair and the public key of the client it admits (z85)."""

    public: bytes
    secret: bytes
    client_public: bytes


class ClientKeys(NamedTuple):
    """A client's CURVE key pair and the public key of the server it trusts (z85)."""

    public: bytes
    secret: bytes
    server_public: bytes


# -- keys -------------------------------------------------------------------------------


def _check_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            f"secret_key needs CURVE support, which this libzmq ({zmq.zmq_version()}) lacks; "
            f"install a pyzmq wheel (it bundles a libzmq with CURVE)"
        )


@functools.lru_cache(maxsize=16)
def _derive(secret: bytes) -> tuple[bytes, bytes]:
    """The server's and the client's CURVE secret keys (z85) for a passphrase.

    scrypt makes guessing a passphrase from captured traffic expensive (each guess costs
    what a start costs: :data:`KDF_N`, :data:`KDF_R`); BLAKE2b with a distinct label then
    gives each key its own 32 bytes. Cached: a process derives once.
    """
    try:
        master = hashlib.scrypt(
            secret, salt=_KDF_SALT, n=KDF_N, r=KDF_R, p=1, dklen=32,
            maxmem=2 * 128 * KDF_R * KDF_N,
        )
    except (AttributeError, ValueError):  # an OpenSSL without scrypt
        master = hashlib.pbkdf2_hmac("sha256", secret, _KDF_SALT, 1_000_000)
    server = hashlib.blake2b(master, digest_size=32, person=_SERVER_LABEL).digest()
    client = hashlib.blake2b(master, digest_size=32, person=_CLIENT_LABEL).digest()
    return z85.encode(server), z85.encode(client)


def _passphrase(secret_key: str | bytes) -> bytes:
    if isinstance(secret_key, str):
        if os.sep in secret_key and os.path.exists(secret_key):
            raise ValueError(
                f"secret_key {secret_key!r} is a path, but a str is used as a passphrase; "
                f"pass pathlib.Path({secret_key!r}) to use the certificates there"
            )
        secret = secret_key.encode("utf-8")
    else:
        secret = bytes(secret_key)
    if not secret:
        raise ValueError("secret_key must not be empty; pass None to run without CURVE")
    length = len(secret_key)
    if length < MIN_PASSPHRASE:
        raise ValueError(
            f"the secret_key passphrase has {length} characters; use {MIN_PASSPHRASE} or "
            f"more, random ones (python -c \"import secrets; "
            f"print(secrets.token_urlsafe(32))\"), or certificate files: 'zproc keygen DIR', "
            f"then secret_key=pathlib.Path(DIR)"
        )
    return secret


def _load(path: PathArg, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot read the {what} certificate {os.fspath(path)!r}: {exc}. Create "
            f"certificates with 'zproc keygen DIR'"
        ) from exc
    return public, secret


def _first(folder: str, names: Sequence[str], what: str) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"the certificate directory {folder!r} has no {' or '.join(names)}, which the "
        f"{what} needs; 'zproc keygen DIR' creates server.key(_secret) and "
        f"client.key(_secret)"
    )


def _cert_paths(secret_key: Any, role: str) -> tuple[PathArg, PathArg]:
    if isinstance(secret_key, tuple):
        if len(secret_key) != 2:
            raise ValueError(
                f"a secret_key tuple must be (server_cert, client_cert), got "
                f"{len(secret_key)} items"
            )
        for item in secret_key:
            if not isinstance(item, (str, os.PathLike)):
                raise TypeError(f"certificate paths must be str or os.PathLike, got {item!r}")
        return secret_key[0], secret_key[1]
    folder = os.fspath(secret_key)
    if not os.path.isdir(folder):
        raise ValueError(
            f"secret_key {folder!r} is not a directory; a path secret_key names a directory "
            f"of certificates ('zproc keygen DIR' creates one)"
        )
    check_private(folder, "the certificate directory", NOT_WRITABLE_BY_OTHERS)
    if role == "server":
        return (
            _first(folder, ["server.key_secret"], "server"),
            _first(folder, ["client.key", "client.key_secret"], "server"),
        )
    return (
        _first(folder, ["server.key", "server.key_secret"], "client"),
        _first(folder, ["client.key_secret"], "client"),
    )


def _validate(secret_key: object) -> None:
    if not isinstance(secret_key, (str, bytes, bytearray, os.PathLike, tuple)):
        raise TypeError(
            f"secret_key must be a str or bytes passphrase, a pathlib.Path to a certificate "
            f"directory, or a (server_cert, client_cert) tuple; got {type(secret_key).__name__}"
        )


def _own_keys(secret_key: SecretKey, role: str) -> tuple[bytes, bytes, bytes]:
    """``(public, secret, peer_public)`` of ``role`` ("server" or "client")."""
    _validate(secret_key)
    _check_curve()
    peer = "client" if role == "server" else "server"
    if isinstance(secret_key, (str, bytes, bytearray)):
        secrets = dict(zip(("server", "client"), _derive(_passphrase(secret_key)), strict=True))
        own = secrets[role]
        return zmq.curve_public(own), own, zmq.curve_public(secrets[peer])
    certs = dict(zip(("server", "client"), _cert_paths(secret_key, role), strict=True))
    # another local user must not read our secret key, nor swap the peer's public key
    check_private(os.fspath(certs[role]), f"the {role}'s secret key file", OWNER_ONLY)
    check_private(os.fspath(certs[peer]), f"the {peer}'s key file", NOT_WRITABLE_BY_OTHERS)
    public, secret = _load(certs[role], role)
    if secret is None:
        raise ValueError(
            f"the {role} certificate {os.fspath(certs[role])!r} holds no secret key; a "
            f"{role} needs {role}.key_secret"
        )
    return public, secret, _load(certs[peer], peer)[0]


def server_keys(secret_key: SecretKey | None) -> ServerKeys | None:
    """The server's keys for ``secret_key`` (None without one).

    Raises
    ------
    TypeError, ValueError
        An unsupported ``secret_key``, or certificates that are missing or lack the
        server's secret key.
    PermissionError
        A certificate directory or key file that another user owns or may write, or a
        secret key file that group or others may read.
    """
    return None if secret_key is None else ServerKeys(*_own_keys(secret_key, "server"))


def client_keys(secret_key: SecretKey | None) -> ClientKeys | None:
    """A client's keys for ``secret_key`` (None without one).

    Raises
    ------
    TypeError, ValueError
        An unsupported ``secret_key``, or certificates that are missing or lack the
        client's secret key.
    PermissionError
        A certificate directory or key file that another user owns or may write, or a
        secret key file that group or others may read.
    """
    return None if secret_key is None else ClientKeys(*_own_keys(secret_key, "client"))


def create_certificates(folder: PathArg) -> tuple[str, str]:
    """Write a new server and client certificate pair into ``folder`` (created, 0700).

    Raises
    ------
    FileExistsError
        A key file exists already (keys are never overwritten).
    PermissionError
        ``folder`` exists, and another user owns it or group or others may write it.

    Returns
    -------
    tuple
        The paths of ``server.key_secret`` and ``client.key_secret``. The public halves
        are written next to them as ``server.key`` and ``client.key``.
    """
    _check_curve()
    path = os.fspath(folder)
    # an existing directory must be ours and closed to others: they could swap the keys
    check_private(path, "the key directory", NOT_WRITABLE_BY_OTHERS)
    os.makedirs(path, mode=0o700, exist_ok=True)
    written = []
    for name in ("server", "client"):
        for suffix in (".key", ".key_secret"):
            if os.path.exists(os.path.join(path, name + suffix)):
                raise FileExistsError(
                    f"{os.path.join(path, name + suffix)} exists; keygen never overwrites keys"
                )
    old_umask = os.umask(0o077)
    try:
        for name in ("server", "client"):
            _public, secret = zmq.auth.create_certificates(path, name)
            written.append(secret)
    finally:
        os.umask(old_umask)
    return written[0], written[1]


# -- sockets ----------------------------------------------------------------------------


def configure_client(sock: zmq.Socket[Any], keys: ClientKeys | None) -> None:
    """Make ``sock`` (DEALER or SUB, not connected yet) a CURVE client; no-op without keys."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def configure_server(sock: zmq.Socket[Any], keys: ServerKeys | None) -> None:
    """Make ``sock`` (ROUTER or PUB, not bound yet) a CURVE server checked by ZAP."""
    if keys is None:
        return
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = ZAP_DOMAIN
    # Refuse every handshake when no ZAP handler answers, instead of admitting all.
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        try:
            sock.setsockopt(enforce, 1)
        except zmq.ZMQError:
            pass


#: How to fix a refused public bind, from Python.
API_FIX = (
    "Pass secret_key= to the server and to its clients (a passphrase of 16 characters or "
    "more, or pathlib.Path('keys') after 'zproc keygen keys'); or insecure=True to serve "
    "without authentication on a network you trust; or bind 127.0.0.1 or ipc:// instead"
)
#: How to fix a refused public bind, on the command line.
CLI_FIX = (
    "Give --secret-key-file F (a passphrase file, or a directory made by 'zproc keygen') "
    "or set $ZPROC_SECRET_KEY; or pass --insecure to serve without authentication on a "
    "network you trust; or bind 127.0.0.1 or ipc:// instead"
)


def exposed_endpoints(address: Sequence[str]) -> list[str]:
    """The tcp endpoints of ``address`` that other hosts can reach (not loopback)."""
    return [
        endpoint
        for endpoint in address
        if endpoint.startswith("tcp://") and not is_loopback_endpoint(endpoint)
    ]


def refuse_exposed(
    address: Sequence[str], *, secure: bool, insecure: bool, fix: str = API_FIX
) -> list[str]:
    """Refuse to serve beyond this machine without a key, unless ``insecure``.

    Returns the endpoints a server without a key exposes (empty with a key, or when every
    endpoint is loopback or ipc).

    Raises
    ------
    ValueError
        ``address`` has a tcp endpoint that is not loopback, there is no key, and
        ``insecure`` is false. Raised before anything listens; ``fix`` says what to add.
    """
    if not isinstance(insecure, bool):
        raise TypeError(f"insecure must be True or False, got {insecure!r}")
    if secure:
        return []
    exposed = exposed_endpoints(address)
    if exposed and not insecure:
        raise ValueError(
            f"refusing to serve {', '.join(exposed)} without a secret_key: other hosts can "
            f"reach it, and anyone who connects can run code in the server. {fix}"
        )
    return exposed


def warn_exposed(
    exposed: Sequence[str], what: str, stacklevel: int = 3, extra: str = ""
) -> None:
    """Warn (:func:`warnings.warn`, shown by default) that ``what`` serves ``exposed``
    without authentication."""
    warnings.warn(
        f"the zproc {what} listens at {', '.join(exposed)} without a secret_key "
        f"(insecure=True): anyone who can reach it can read and change the state and run "
        f"code in the server process{extra}",
        UserWarning,
        stacklevel=stacklevel,
    )


# -- the server's gatekeeper ------------------------------------------------------------


def _zmtp_error_name(value: int) -> str:
    for name in dir(zmq):
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name[len("PROTOCOL_ERROR_") :].lower()
    return f"protocol error {value:#x}"


def _failure_reason(event: int, value: int) -> str:
    if event == getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", -1):
        return f"key not admitted (ZAP status {value})"
    if event == getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", -1):
        if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1):
            return "the peer does not use CURVE (no secret_key)"
        if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", -1):
            return "cryptographic error: the peer uses another secret_key"
        return _zmtp_error_name(value)
    return "the peer closed the connection during the handshake"


#: A refused peer is logged as a warning at most once in this many seconds.
PEER_LOG_INTERVAL = 60.0


def _noteworthy(count: int) -> bool:
    """True for the 1st, 10th, 100th... occurrence: those are logged as warnings."""
    while count % 10 == 0:
        count //= 10
    return count == 1


def _bind_zap(zap: zmq.Socket[Any], stop: threading.Event, patience: float = 2.0) -> None:
    """Bind the ZAP endpoint, waiting briefly for a handler closed just before to let go."""
    deadline = time.monotonic() + patience
    while True:
        try:
            zap.bind(ZAP_ENDPOINT)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline or stop.is_set():
                raise
            time.sleep(0.02)


class Guard:
    """Admits only the client key at a server's sockets; counts and logs every rejection.

    One thread answers ZAP requests (RFC 27) and reads the sockets' handshake events.
    :meth:`start` configures the sockets for CURVE and must run before they bind;
    :meth:`close` stops the thread. ``stats["rejected"]`` counts failed handshakes (wrong
    key, no key); no message of a rejected peer ever reaches the server loop.

    Parameters
    ----------
    context
        The ZeroMQ context of the sockets (a context has room for one ZAP handler).
    keys
        The server's keys.
    stats
        The server's counters; ``"rejected"`` is added and incremented here.
    """

    def __init__(
        self, context: zmq.Context[Any], keys: ServerKeys, stats: dict[str, int]
    ) -> None:
        self.context = context
        self.keys = keys
        self.stats = stats
        stats.setdefault("rejected", 0)
        self._client_key = z85.decode(keys.client_public)
        self._warned: dict[bytes, float] = {}  # peer -> when its refusal was last a warning
        self._monitors: list[tuple[str, str]] = []
        self._sockets: list[zmq.Socket[Any]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._denied: dict[bytes, int] = {}
        #: sockets added by :meth:`watch` while the thread runs: (name, monitor endpoint,
        #: set once the thread reads it)
        self._added: list[tuple[str, str, threading.Event]] = []
        self._lock = threading.Lock()

    def start(self, sockets: Sequence[tuple[str, zmq.Socket[Any]]]) -> None:
        """Configure ``sockets`` (name, socket) for CURVE and start answering handshakes.

        Raises
        ------
        RuntimeError
            Another ZAP handler already runs in this process's ZeroMQ context.
        """
        tag = os.urandom(6).hex()
        for name, sock in sockets:
            configure_server(sock, self.keys)
            endpoint = f"inproc://zproc-guard-{tag}-{name}"
            sock.monitor(endpoint, HANDSHAKE_FAILED)
            self._monitors.append((name, endpoint))
            self._sockets.append(sock)
        self._thread = threading.Thread(target=self._run, name="zproc-guard", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self.close()
            raise RuntimeError(
                f"cannot start the CURVE gatekeeper: {self._error}. One process runs at most "
                f"one secure zproc server"
            ) from self._error

    def watch(self, sockets: Sequence[tuple[str, zmq.Socket[Any]]]) -> None:
        """Count and log the failed handshakes of more sockets (the swarm broker's), which
        are already configured for CURVE: the ZAP handler of this context answers theirs
        too. Call before another thread uses them; returns once they are watched. They
        stay watched until :meth:`close` (a monitor stopped by its socket's close, whose
        peer is gone, can block libzmq: the peers are closed last)."""
        added = []
        for name, sock in sockets:
            endpoint = f"inproc://zproc-guard-{os.urandom(6).hex()}-{name.replace(' ', '-')}"
            sock.monitor(endpoint, HANDSHAKE_FAILED)
            added.append((name, endpoint, threading.Event()))
            self._sockets.append(sock)
        with self._lock:
            self._added.extend(added)
        for _, _, done in added:
            done.wait(5)

    def close(self) -> None:
        """Stop the thread (idempotent). Call after the sockets are closed."""
        for sock in self._sockets:
            if not sock.closed:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
        self._sockets.clear()
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._thread = None

    # the thread
    def _run(self) -> None:
        zap = self.context.socket(zmq.REP)
        zap.linger = 0
        monitors: dict[zmq.Socket[Any], str] = {}
        try:
            try:
                _bind_zap(zap, self._stop)
                for name, endpoint in self._monitors:
                    mon = self.context.socket(zmq.PAIR)
                    mon.linger = 0
                    mon.connect(endpoint)
                    monitors[mon] = name
            except zmq.ZMQError as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            poller = zmq.Poller()
            poller.register(zap, zmq.POLLIN)
            for mon in monitors:
                poller.register(mon, zmq.POLLIN)
            while not self._stop.is_set():
                if self._added:
                    self._connect_added(monitors, poller)
                for sock, _ in poller.poll(100):
                    try:
                        if sock is zap:
                            self._answer(zap)
                        else:
                            self._on_monitor(sock, monitors[sock])
                    except zmq.ContextTerminated:
                        raise
                    except Exception:  # keep guarding: a dead handler refuses everyone
                        log.exception("zproc server %d: CURVE gatekeeper error", os.getpid())
        except zmq.ContextTerminated:
            pass
        finally:
            for mon in monitors:
                mon.close(0)
            zap.close(0)

    def _connect_added(
        self, monitors: dict[zmq.Socket[Any], str], poller: zmq.Poller
    ) -> None:
        with self._lock:
            added, self._added = self._added, []
        for name, endpoint, done in added:
            mon = self.context.socket(zmq.PAIR)
            mon.linger = 0
            mon.connect(endpoint)
            monitors[mon] = name
            poller.register(mon, zmq.POLLIN)
            done.set()

    def _answer(self, zap: zmq.Socket[Any]) -> None:
        """Answer one ZAP request: 200 for the client key over CURVE, 400 otherwise."""
        frames = zap.recv_multipart()
        request_id = frames[1] if len(frames) > 1 else b""
        admitted = False
        address = b"?"
        key = b""
        try:
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            credentials = frames[6:]
            if version == b"1.0" and mechanism == b"CURVE" and len(credentials) == 1:
                key = credentials[0]
                admitted = len(key) == 32 and hmac.compare_digest(key, self._client_key)
        except (ValueError, IndexError):
            admitted = False
        if admitted:
            zap.send_multipart([b"1.0", request_id, b"200", b"OK", b"zproc", b""])
            return
        zap.send_multipart([b"1.0", request_id, b"400", b"key not admitted", b"", b""])
        count = self._denied[key] = self._denied.get(key, 0) + 1
        if len(self._denied) > 1024:
            self._denied.clear()
        printable = z85.encode(key).decode() if len(key) == 32 else "malformed"
        (log.warning if self._loud(address) else log.debug)(
            "zproc server %d: refused a client from %s with CURVE key %s (attempt %d): its "
            "secret_key differs from the server's",
            os.getpid(),
            address.decode(errors="replace"),
            printable,
            count,
        )

    def _loud(self, peer: bytes) -> bool:
        """True once per peer (its IP address) per PEER_LOG_INTERVAL: logged as a warning;
        the other refusals go to the debug level (``zproc serve -v``)."""
        now = time.monotonic()
        warned = self._warned
        if now - warned.get(peer, -PEER_LOG_INTERVAL) < PEER_LOG_INTERVAL:
            return False
        if len(warned) > 1024:
            warned.clear()
        warned[peer] = now
        return True

    def _on_monitor(self, mon: zmq.Socket[Any], name: str) -> None:
        try:
            message = parse_monitor_message(mon.recv_multipart())
        except (zmq.ZMQError, ValueError, KeyError):
            return
        event = message["event"]
        if not event & HANDSHAKE_FAILED:
            return
        self.stats["rejected"] = count = self.stats.get("rejected", 0) + 1
        raw = message.get("endpoint", b"")
        endpoint = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        (log.warning if _noteworthy(count) else log.debug)(
            "zproc server %d: rejected a peer at %s (%s): %s; %d rejected so far",
            os.getpid(),
            endpoint,
            name,
            _failure_reason(event, message["value"]),
            count,
        )


# -- the client's view ------------------------------------------------------------------


class HandshakeWatch:
    """Reads a client socket's handshake events and says when the keys are the problem.

    Parameters
    ----------
    endpoint
        The endpoint the socket connects to (for messages).
    secure
        Whether this client runs CURVE (has a ``secret_key``).
    """

    def __init__(self, endpoint: str, secure: bool) -> None:
        self.endpoint = endpoint
        self.secure = secure
        self.failures = 0
        self._error: AuthenticationError | None = None

    def on_event(self, event: int, value: int) -> None:
        """Record one monitor event (other events are ignored)."""
        if event == HANDSHAKE_SUCCEEDED:
            self.failures = 0
            self._error = None
            return
        if not event & HANDSHAKE_FAILED:
            return
        self.failures += 1
        if event == getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", -1):
            self._error = AuthenticationError(
                f"the zproc server at {self.endpoint} rejected this client's CURVE key "
                f"(status {value}): the secret_key differs from the server's. Use the "
                f"server's secret_key"
            )
        elif event == getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", -1):
            if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1):
                if self.secure:
                    detail = (
                        "this client has a secret_key but the server runs without one. "
                        "Start the server with the same secret_key, or drop it here"
                    )
                else:
                    detail = (
                        "the server requires a secret_key (CURVE) and this client has none. "
                        "Pass the server's secret_key"
                    )
            else:
                detail = (
                    f"{_zmtp_error_name(value)}: most likely the secret_key differs from the "
                    f"server's"
                )
            self._error = AuthenticationError(
                f"the security handshake with the zproc server at {self.endpoint} failed: "
                f"{detail}"
            )
        elif self.failures >= NO_DETAIL_LIMIT:
            if self.secure:
                self._error = AuthenticationError(
                    f"the server at {self.endpoint} closed the connection during the CURVE "
                    f"handshake {self.failures} times in a row: most likely its secret_key "
                    f"differs from this client's (or it is not a zproc server)"
                )
            else:
                # a CURVE server often drops a plain client without naming the mismatch
                self._error = AuthenticationError(
                    f"the server at {self.endpoint} closed the connection during the "
                    f"security handshake {self.failures} times in a row: most likely it "
                    f"requires a secret_key (CURVE) and this client has none. Pass the "
                    f"server's secret_key (or it is not a zproc server)"
                )

    def error(self) -> AuthenticationError | None:
        """The error to raise, when the handshakes show that the keys do not match."""
        return self._error

    def hint(self) -> str:
        """A sentence for timeout messages (empty when nothing points at the keys)."""
        if self._error is not None:
            return f" {self._error}"
        if self.failures:
            return (
                f" {self.failures} security handshake(s) with the server failed: check "
                f"that the secret_key is the server's."
            )
        if self.secure:
            return " If the server runs with another secret_key, it never answers."
        return ""

