"""The client side of the request channel: one DEALER, request ids, timeouts, liveness.

A :class:`Connection` belongs to one process (it reconnects with a new identity after
``fork``) and to one thread. Requests are lock-step, but a request may be *sent* early
and its reply collected later (:meth:`Connection.send` / :meth:`Connection.result`);
replies to abandoned requests (after a timeout) are recognised by their id and dropped.

Liveness: a socket monitor reports when the connection to the server is made and lost.
A request waiting on a server that is not connected raises
:class:`~zproc.ServerUnavailableError` once no server has answered for ``connect_timeout``
seconds, or ``liveness`` seconds after a live connection was lost. ZeroMQ heartbeats turn
an unreachable host into a lost connection.

Reconnection: ZeroMQ reconnects on its own, and a request sent while disconnected waits in
the socket until a server answers again. A request already sent when the connection was
lost (its reply may never come) is sent again once reconnected if it changes nothing
(:func:`~zproc._protocol.is_read_only`); otherwise it raises
:class:`~zproc.ServerUnavailableError` saying that its outcome is unknown.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _protocol as P
from . import _serialization as S
from ._security import (
    HANDSHAKE_EVENTS,
    HANDSHAKE_SUCCEEDED,
    ClientKeys,
    HandshakeWatch,
    configure_client,
)
from ._transport import ServerAddress, get_context
from ._transport import recv_frames, send_frames  # defined there since the server uses them too
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError

__all__ = ["Connection", "new_identity"]

#: How often a waiting request looks at the connection state, in seconds.
SLICE = 0.25
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_LIVENESS = 3.0
HEARTBEAT_IVL_MS = 1000
#: The monitor event that marks a usable connection: the end of the ZMTP handshake (and of
#: the CURVE handshake with a secret_key), or the TCP connect with libzmq < 4.3.
CONNECTED_EVENT = HANDSHAKE_SUCCEEDED or zmq.EVENT_CONNECTED


_send_frame = zmq.backend.Socket.send
_recv_frame = zmq.backend.Socket.recv
_get_option = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)


def new_identity() -> bytes:
    """8 random bytes; ZeroMQ reserves identities that start with a zero byte."""
    ident = os.urandom(8)
    return ident if ident[0] else b"\x01" + ident[1:]


class Connection:
    """A DEALER connected to ``address.req_rep`` with request ids and liveness checks."""

    def __init__(
        self,
        address: ServerAddress,
        *,
        identity: bytes | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        liveness: float = DEFAULT_LIVENESS,
        keys: ClientKeys | None = None,
    ) -> None:
        self.address = address
        self.keys = keys
        self._handshake = HandshakeWatch(address.req_rep, keys is not None)
        self.identity = identity or new_identity()
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.pid = os.getpid()
        self._rid = 0
        self._early: dict[int, tuple[int, bytes]] = {}
        #: request id -> (connections lost before it was sent, frames to resend or None)
        self._expected: dict[int, tuple[int, tuple[bytes, bytes] | None]] = {}
        self._lapsed: tuple[int, tuple[int, tuple[bytes, bytes] | None]] | None = None
        self.drops = 0  # connections lost so far
        #: The highest namespace head any reply has reported (see ``_protocol``).
        self.head = 0
        sock = self._new_socket(zmq.DEALER)
        sock.linger = 0
        # Never block in send: while no server takes them, requests queue here and each
        # one ends by its own timeout or liveness check (a full queue would block the
        # caller, and an event loop, with no time limit).
        sock.sndhwm = 0
        sock.identity = self.identity
        sock.rcvtimeo = int(SLICE * 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(liveness * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(liveness * 1000))
        configure_client(sock, keys)
        self._monitor = sock.get_monitor_socket(
            CONNECTED_EVENT | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED | HANDSHAKE_EVENTS
        )
        self._monitor.linger = 0
        sock.connect(address.req_rep)
        self.sock = sock
        self.connected = False
        self.ever_connected = False
        self.since = time.monotonic()
        self.closed = False

    def _new_socket(self, kind: int) -> Any:
        """A socket of this process's ZeroMQ context (the asyncio flavour makes asyncio
        sockets in the same context)."""
        return get_context().socket(kind)

    # -- requests -----------------------------------------------------------------------

    def send(self, kind: int, method: int, body: bytes, namespace: bytes) -> int:
        """Send a request now; return its id for :meth:`result`."""
        self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
        frames = (P.request_header(kind, method, rid, namespace), body)
        sock = self.sock
        _send_frame(sock, frames[0], _SNDMORE)
        _send_frame(sock, body, 0)
        self._expected[rid] = (self.drops, frames if P.is_read_only(kind, method) else None)
        return rid

    def request(
        self,
        kind: int,
        method: int,
        body: bytes,
        namespace: bytes,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return its decoded result (or raise its error)."""
        return self.result(self.send(kind, method, body, namespace), timeout)

    def result(self, rid: int, timeout: float | None = None) -> Any:
        """Wait for the reply to request ``rid``; decode it or raise the remote error."""
        early = self._early.pop(rid, None)
        if early is not None:
            return _decode(*early)
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.sock
        try:
            while True:
                if deadline is None:
                    try:
                        frames = recv_frames(sock)
                    except zmq.Again:
                        self._check_alive(rid)
                        continue
                elif deadline - time.monotonic() >= SLICE:
                    # no poll (a Poller per call costs microseconds): the socket's
                    # rcvtimeo bounds this wait to SLICE
                    try:
                        frames = recv_frames(sock)
                    except zmq.Again:
                        self._check_alive(rid)
                        continue
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not sock.poll(min(remaining, SLICE) * 1000):
                        if time.monotonic() >= deadline:
                            self._poll_monitor()
                            raise TimeoutError(
                                f"no reply from the server at {self.address.req_rep} within "
                                f"{timeout} s; the request's outcome is unknown (the server "
                                f"may still apply it). Raise request_timeout if the server "
                                f"is busy.{self._handshake.hint()}"
                            )
                        self._check_alive(rid)
                        continue
                    frames = recv_frames(sock)
                if len(frames) != 2:
                    continue
                status, got, head = P.parse_reply_head(frames[0])
                if head > self.head:
                    self.head = head
                if got == rid:
                    self._expected.pop(rid, None)
                    return _decode(status, frames[1])
                if got in self._expected:
                    self._early[got] = (status, frames[1])
        except BaseException:
            entry = self._expected.pop(rid, None)
            if entry is not None:
                self._lapsed = (rid, entry)
            raise

    def expect(self, rid: int) -> None:
        """Keep the reply to ``rid`` when it arrives (after :meth:`result` timed out)."""
        lapsed = self._lapsed
        if lapsed is not None and lapsed[0] == rid:
            self._expected[rid] = lapsed[1]
        else:
            self._expected.setdefault(rid, (self.drops, None))
        self._lapsed = None

    # -- liveness -----------------------------------------------------------------------

    def _poll_monitor(self) -> None:
        mon = self._monitor
        while mon.poll(0):
            try:
                message = parse_monitor_message(mon.recv_multipart())
            except (zmq.ZMQError, ValueError, KeyError):
                return
            event = message["event"]
            self._handshake.on_event(event, message["value"])
            if event == CONNECTED_EVENT:
                self.connected = self.ever_connected = True
                self.since = time.monotonic()
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.since = time.monotonic()
                self.drops += 1

    def security_hint(self) -> str:
        """A sentence about failed security handshakes, for error messages ('' if none)."""
        self._poll_monitor()
        return self._handshake.hint()

    def check_alive(self) -> None:
        """Raise :class:`ServerUnavailableError` if the server is known to be gone."""
        self._check_alive(None)

    def _check_alive(self, rid: int | None) -> None:
        self._poll_monitor()
        if self.connected:
            if rid is not None:
                self._recover(rid)
            return
        error = self._handshake.error()
        if error is not None:
            raise error
        waited = time.monotonic() - self.since
        outcome = (
            " The outcome of the request in flight is unknown." if rid is not None else ""
        )
        if not self.ever_connected:
            if self.connect_timeout is not None and waited >= self.connect_timeout:
                raise ServerUnavailableError(
                    f"no zproc server answered at {self.address.req_rep} for "
                    f"{waited:.1f} s. Check that a server was started at this address "
                    f"(zproc.start_server) and that the address is right; "
                    f"zproc.ping(address, timeout=...) probes it.{outcome}"
                    f"{self._handshake.hint()}"
                )
        elif waited >= self.liveness:
            raise ServerUnavailableError(
                f"lost the connection to the zproc server at {self.address.req_rep} "
                f"{waited:.1f} s ago and it did not come back: the server process died or "
                f"its host is unreachable.{outcome}"
            )

    def _recover(self, rid: int) -> None:
        """Reconnected: resend request ``rid`` if the lost connection carried it and it is
        read-only; if it changes state, raise (its outcome is unknown)."""
        entry = self._expected.get(rid)
        if entry is None or entry[0] == self.drops:
            return
        frames = entry[1]
        if frames is not None:
            self._expected[rid] = (self.drops, frames)
            send_frames(self.sock, frames)
            return
        self._expected.pop(rid, None)
        raise ServerUnavailableError(
            f"the connection to the zproc server at {self.address.req_rep} was lost while a "
            f"request was in flight, and it is back: a server answers there again (this "
            f"client cannot tell a restarted server from one that was paused or unreachable "
            f"for a while). The outcome of the request is unknown: it may or may not have "
            f"been applied. This State can be used again; check the state and retry if needed"
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pid != os.getpid():
            return  # sockets of another process: never touch them
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)


def _decode(status: int, body: bytes) -> Any:
    if status == P.OK:
        return S.loads(body)
    if status == P.ERROR:
        raise S.loads_exception(body)
    raise ProtocolError(f"unknown reply status {status}")
