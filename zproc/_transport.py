"""Addresses, the per-process ZeroMQ context, and socket helpers (raw frame I/O included).

A server address is a :class:`ServerAddress`: two endpoints, requests first, events second.
Each endpoint is ``ipc://<path>`` or ``tcp://<host>:<port>``; the same string is bound by
the server and connected to by clients, so it must be connectable (no wildcard host).
"""

from __future__ import annotations

import os
import re
import shutil
import socket as _socket
import tempfile
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import zmq

__all__ = [
    "PID",
    "ServerAddress",
    "bind_random_tcp",
    "create_ipc_address",
    "get_context",
    "host_id",
    "make_private_ipc_dir",
    "normalize_address",
    "raise_open_files_limit",
    "recv_frames",
    "recv_message",
    "remove_ipc_endpoint",
    "remove_server_files",
    "send_frames",
    "server_socket",
    "validate_endpoint",
]

#: Linux limits a Unix socket path to 107 bytes (sun_path is 108 with the trailing NUL).
IPC_PATH_MAX = 107

_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+|\*):(\d+|\*)$")


class ServerAddress(NamedTuple):
    """The two endpoints of a zproc server: ``(req_rep, pub_sub)``.

    A plain tuple underneath, so it compares equal to ``("ipc://...", "ipc://...")`` and
    unpacks the same way.
    """

    req_rep: str
    pub_sub: str


def validate_endpoint(endpoint: object, *, what: str = "endpoint", bind: bool = False) -> str:
    """Check one endpoint string and return it.

    Raises
    ------
    TypeError
        The endpoint is not a ``str``.
    ValueError
        Malformed, unsupported transport, wildcard host (when connecting), or an ipc path
        that is too long.
    """
    if not isinstance(endpoint, str):
        raise TypeError(f"{what} must be a str like 'tcp://127.0.0.1:5000', got {endpoint!r}")
    transport, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(
            f"{what} {endpoint!r} is not an endpoint; expected 'ipc://<path>' or "
            f"'tcp://<host>:<port>'"
        )
    if transport == "ipc":
        if os.name != "posix":
            raise ValueError(f"{what} {endpoint!r}: ipc endpoints need a POSIX system; use tcp")
        if len(rest.encode()) > IPC_PATH_MAX:
            raise ValueError(
                f"{what} {endpoint!r}: the ipc path is longer than {IPC_PATH_MAX} bytes, the "
                f"limit for a Unix socket; choose a shorter path"
            )
        return endpoint
    if transport == "tcp":
        match = _TCP.match(endpoint)
        if not match:
            raise ValueError(
                f"{what} {endpoint!r} is not a valid tcp endpoint; expected "
                f"'tcp://<host>:<port>', e.g. 'tcp://127.0.0.1:5000'"
            )
        host, port = match.groups()
        if not bind and (host == "*" or port == "*"):
            raise ValueError(
                f"{what} {endpoint!r} has a wildcard; clients connect to the same string the "
                f"server binds, so give a concrete host and port"
            )
        if port != "*" and not 0 <= int(port) <= 65535:
            raise ValueError(f"{what} {endpoint!r}: port out of range")
        return endpoint
    raise ValueError(
        f"{what} {endpoint!r}: unsupported transport {transport!r}; zproc supports 'ipc' "
        f"and 'tcp' (the server is another process)"
    )


def normalize_address(server_address: object) -> ServerAddress:
    """Validate a 2-sequence of endpoints and return it as a :class:`ServerAddress`."""
    if isinstance(server_address, ServerAddress):
        return server_address
    if isinstance(server_address, (str, bytes)) or not isinstance(server_address, Sequence):
        raise ValueError(
            f"server_address must be a 2-tuple (req_rep_endpoint, pub_sub_endpoint), got "
            f"{server_address!r}"
        )
    if len(server_address) != 2:
        raise ValueError(
            f"server_address must have exactly 2 endpoints (req_rep, pub_sub), got "
            f"{len(server_address)}: {server_address!r}"
        )
    req, pub = server_address
    validate_endpoint(req, what="server_address[0] (req_rep)")
    validate_endpoint(pub, what="server_address[1] (pub_sub)")
    if req == pub:
        raise ValueError(f"the two endpoints of server_address must differ, both are {req!r}")
    return ServerAddress(req, pub)


# -- ipc paths -------------------------------------------------------------------------


def make_private_ipc_dir() -> str:
    """Create a private (0700) directory for one server's ipc sockets and return it."""
    return tempfile.mkdtemp(prefix="zproc-", dir=_short_tempdir())


def _short_tempdir() -> str:
    base = tempfile.gettempdir()
    # Keep room for "/zproc-xxxxxxxx/rr"; fall back to /tmp for deep temp directories.
    if len(base) > IPC_PATH_MAX - 32 and os.path.isdir("/tmp"):
        return "/tmp"
    return base


def create_ipc_address(name: str) -> str:
    """Return an ``ipc://`` endpoint named ``name`` in a new private directory."""
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty file name, got {name!r}")
    return validate_endpoint("ipc://" + os.path.join(make_private_ipc_dir(), name))


def remove_ipc_endpoint(endpoint: str) -> None:
    """Remove an ipc socket file, and its directory when it is one of ours and now empty."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    try:
        os.unlink(path)
    except OSError:
        pass
    folder = os.path.dirname(path)
    if os.path.basename(folder).startswith("zproc-"):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def remove_ipc_dir(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def bind_random_tcp(sock: zmq.Socket[Any], host: str = "127.0.0.1") -> str:
    """Bind ``sock`` to a random port on ``host`` and return the connectable endpoint."""
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


def is_loopback_endpoint(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    match = _TCP.match(endpoint)
    if not match:
        return False
    host = match.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(_socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


# -- the per-process context -----------------------------------------------------------

#: ``[this process's id]``, kept current across ``os.fork``: the hot paths read it
#: instead of calling ``os.getpid()`` (a system call) to notice that they run in a child.
PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: PID.__setitem__(0, os.getpid()))

_lock = threading.Lock()
_context: zmq.Context[Any] | None = None
_context_pid: int = -1


def get_context() -> zmq.Context[Any]:
    """The ZeroMQ context of this process, created on first use and again after ``fork``."""
    global _context, _context_pid
    pid = os.getpid()
    if _context is not None and _context_pid == pid and not _context.closed:
        return _context
    with _lock:
        if _context is None or _context_pid != pid or _context.closed:
            _context = zmq.Context()
            _context_pid = pid
        return _context


# -- listening sockets -----------------------------------------------------------------

#: How long a peer may take over its handshake (ZMTP greeting, CURVE) before a listening
#: socket drops it, in ms; libzmq's default is 30 s, during which a stalled peer holds
#: what it made the socket buffer.
HANDSHAKE_IVL_MS = 5_000
#: Largest message a PUB socket takes in (subscriptions: a topic), in bytes.
SUBSCRIPTION_MAX = 1024 * 1024
#: Messages queued per peer, each way, on a ROUTER socket (requests, swarm): a peer that
#: sends more without reading its replies is no longer read from; replies past it are
#: dropped (the peer times out), not held.
ROUTER_HWM = 10_000
#: Messages (batches of events of one namespace) queued for one subscriber: past it, the
#: server drops that subscriber's events instead of holding them; the subscriber sees a
#: gap in the sequence numbers and fetches what it missed.
EVENTS_HWM = 1000
#: Subscriptions queued per subscriber on the way in: the PUB socket reads them only
#: when it sends, and a subscription that waits behind a full queue misses events (each
#: watcher subscribes and unsubscribes as it goes).
SUBSCRIPTIONS_HWM = 1000


def server_socket(
    kind: int, max_message_size: int, hwm: int, rcvhwm: int | None = None
) -> zmq.Socket[Any]:
    """A socket that listens for peers: every server and broker socket is made here.

    It drops a peer whose handshake takes longer than :data:`HANDSHAKE_IVL_MS`, and one
    that announces a message over ``max_message_size`` bytes (libzmq checks the size
    declared in a frame's header, also during the handshake, before buffering it). At
    most ``hwm`` messages are queued per peer on the way out, and ``rcvhwm`` (default:
    ``hwm``) on the way in. Unsent messages are dropped on close (``linger`` 0); the
    caller sets the rest.
    """
    if rcvhwm is None:
        rcvhwm = hwm
    if hwm < 1 or rcvhwm < 1:
        raise ValueError(
            f"hwm and rcvhwm must be >= 1 (0 would mean no limit), got {hwm} and {rcvhwm}"
        )
    sock: zmq.Socket[Any] = get_context().socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    sock.sndhwm = hwm
    sock.rcvhwm = rcvhwm
    return sock


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open descriptors to its hard limit (a server
    holds one per connection: the default soft limit, often 1024, is what idle
    connections would exhaust first); return ``(soft, hard)`` as they are after."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


# -- raw frames ------------------------------------------------------------------------

#: pyzmq's own methods, without the Python layer over them, and plain int flags: the
#: enums and wrappers cost a few microseconds per message (hot paths of both sides).
_send_frame = zmq.backend.Socket.send
_recv_frame = zmq.backend.Socket.recv
_SNDMORE = int(zmq.SNDMORE)
_get_option = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket[Any], frames: tuple[Any, ...] | list[Any]) -> None:
    """``sock.send_multipart(frames)`` without pyzmq's Python layer (a few us less).

    A ``memoryview`` frame (a big buffer) is sent without a copy: its memory must not
    change until the message has left.
    """
    last = len(frames) - 1
    if last == 1 and type(frames[0]) is bytes and type(frames[1]) is bytes:  # most replies
        _send_frame(sock, frames[0], _SNDMORE)
        _send_frame(sock, frames[1], 0)
        return
    for i, frame in enumerate(frames):
        if type(frame) is memoryview:
            _send_frame(sock, frame, _SNDMORE if i < last else 0, False)
        else:
            _send_frame(sock, frame, _SNDMORE if i < last else 0)


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """``sock.recv_multipart()`` without pyzmq's Python layer, every frame copied
    (``zmq.Again`` on timeout, or at once with ``flags`` NOBLOCK when nothing is queued).
    For requests and replies, :func:`recv_message` is cheaper."""
    # a Frame says whether more follow: cheaper than asking the socket (RCVMORE) per frame
    frame = _recv_frame(sock, flags, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv_frame(sock, 0, False)
        frames.append(frame.bytes)
    return frames


def recv_message(sock: zmq.Socket[Any], copied: int = 2) -> list[Any]:
    """:func:`recv_frames` for a request or a reply, almost always one body frame: read
    from a ROUTER (``copied=2``: the peer's identity, then the body) or a DEALER
    (``copied=1``).

    The first ``copied`` frames are read as ``bytes`` and the socket is asked once
    whether more follow: cheaper than a :class:`zmq.Frame` per frame. The rest come as
    ``memoryview`` objects over ZeroMQ's messages (the big buffers after a body).
    """
    frames: list[Any] = [_recv_frame(sock, 0, True)]
    if copied == 2:  # a ROUTER's identity is always followed by the message
        frames.append(_recv_frame(sock, 0, True))
    if _get_option(sock, _RCVMORE):
        while True:
            frame = _recv_frame(sock, 0, False)
            frames.append(frame.buffer)
            if not frame.more:
                break
    return frames


def recv_queued(sock: zmq.Socket[Any]) -> list[bytes] | None:
    """The next message already queued on ``sock`` (its frames, copied), or None.

    Never waits, and an empty queue costs one option read, not a ``zmq.Again`` raised
    and caught (several microseconds on a watcher's wake-up).
    """
    if not _get_option(sock, _EVENTS) & _POLLIN:  # type: ignore[operator]
        return None
    try:
        return recv_frames(sock, _NOBLOCK)
    except zmq.Again:
        return None


def host_id() -> str:
    """This host's id: its name and, on Linux, its boot id (a reboot reuses pids)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{_socket.gethostname()}/{boot}"


def remove_server_files(address: ServerAddress, *, whole_dir: bool) -> None:
    """Remove the ipc files of an ended server at ``address`` (a killed server leaves
    them); ``whole_dir``: the server made the directory of its ipc endpoints itself."""
    for endpoint in address:
        if whole_dir and endpoint.startswith("ipc://"):
            remove_ipc_dir(os.path.dirname(endpoint[len("ipc://") :]))
        else:
            remove_ipc_endpoint(endpoint)
