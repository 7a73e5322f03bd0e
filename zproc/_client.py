"""The client's sockets: the request channel (one DEALER, request ids, timeouts,
liveness) and the event streams (one SUB), sync and asyncio.

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

:class:`AsyncConnection` is the same channel over an asyncio socket, one reader task
handing each reply to its request. :class:`Stream` and :class:`AsyncStream` are the I/O
under :class:`zproc._stream._StreamCore`: they own the SUB socket and run the core's
procedures, calling or awaiting the I/O steps it asks for.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import _protocol as P
from . import _serialization as S
from ._closing import OwnedSockets, closed_while_busy
from ._security import (
    HANDSHAKE_EVENTS,
    HANDSHAKE_SUCCEEDED,
    ClientKeys,
    HandshakeWatch,
    configure_client,
)
from ._stream import Qualifies, _Cursor, _Ev, _StreamCore, adrive, drive
from ._transport import ServerAddress, get_context
from ._transport import recv_frames, recv_queued, recv_message, send_frames
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError, ZProcError

__all__ = ["AsyncConnection", "AsyncStream", "Connection", "Stream", "new_identity"]

#: How often a waiting request looks at the connection state, in seconds.
SLICE = 0.25
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_LIVENESS = 3.0
HEARTBEAT_IVL_MS = 1000
#: The monitor event that marks a usable connection: the end of the ZMTP handshake (and of
#: the CURVE handshake with a secret_key), or the TCP connect with libzmq < 4.3.
CONNECTED_EVENT = HANDSHAKE_SUCCEEDED or zmq.EVENT_CONNECTED


_send_frame = zmq.backend.Socket.send


def new_identity() -> bytes:
    """8 random bytes; ZeroMQ reserves identities that start with a zero byte."""
    ident = os.urandom(8)
    return ident if ident[0] else b"\x01" + ident[1:]


class Connection(OwnedSockets):
    """A DEALER connected to ``address.req_rep`` with request ids and liveness checks.

    One thread uses it; another may close it (see ``_closing``): :meth:`send`,
    :meth:`result` and :meth:`request` mark it busy while they run.
    """

    def __init__(
        self,
        address: ServerAddress,
        *,
        identity: bytes | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        liveness: float = DEFAULT_LIVENESS,
        keys: ClientKeys | None = None,
        heads: list[int] | None = None,
    ) -> None:
        self.address = address
        self.keys = keys
        self._handshake = HandshakeWatch(address.req_rep, keys is not None)
        self.identity = identity or new_identity()
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.pid = os.getpid()
        self._rid = 0
        self._early: dict[int, tuple[int, P.Frame]] = {}
        #: request id -> (connections lost before it was sent, frames to resend or None)
        #: (a request without buffers is its one frame)
        self._expected: dict[int, tuple[int, Any]] = {}
        self._lapsed: tuple[int, tuple[int, Any]] | None = None
        self.drops = 0  # connections lost so far
        #: ``[the highest namespace head any reply has reported]`` (see ``_protocol``),
        #: a box that the connections of one State's threads share.
        self.heads = [0] if heads is None else heads
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
        self._init_owned()

    @property
    def head(self) -> int:
        """The highest namespace head any reply has reported."""
        return self.heads[0]

    @head.setter
    def head(self, value: int) -> None:
        self.heads[0] = value

    def _new_socket(self, kind: int) -> Any:
        """A socket of this process's ZeroMQ context (the asyncio flavour makes asyncio
        sockets in the same context)."""
        return get_context().socket(kind)

    # -- requests -----------------------------------------------------------------------

    def send(self, kind: int, method: int, body: bytes, namespace: bytes) -> int:
        """Send a request now; return its id for :meth:`result`."""
        self._enter()
        try:
            return self._send(kind, method, body, namespace)
        finally:
            self._leave()

    def _send(self, kind: int, method: int, body: bytes, namespace: bytes) -> int:
        """:meth:`send`, for a caller that marked this connection busy."""
        self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
        frame = P.request_frame(kind, method, rid, namespace, body)
        if type(body) is P.Buffered:  # its big buffers follow it, each a frame, not copied
            frames: Any = (frame, *body.buffers)
            send_frames(self.sock, frames)
        else:
            _send_frame(self.sock, frame, 0)
            frames = frame
        self._expected[rid] = (self.drops, frames if P.is_read_only(kind, method) else None)
        return rid

    def post(self, kind: int, method: int, body: bytes, namespace: bytes) -> None:
        """Send a request that the server answers with no reply."""
        self._expected.pop(self.send(kind, method, body, namespace), None)

    def request(
        self,
        kind: int,
        method: int,
        body: bytes,
        namespace: bytes,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return its decoded result (or raise its error)."""
        self._enter()
        try:
            return self._result(self._send(kind, method, body, namespace), timeout)
        finally:
            self._leave()

    def result(self, rid: int, timeout: float | None = None) -> Any:
        """Wait for the reply to request ``rid``; decode it or raise the remote error."""
        self._enter()
        try:
            return self._result(rid, timeout)
        finally:
            self._leave()

    def _result(self, rid: int, timeout: float | None = None) -> Any:
        """:meth:`result`, for a caller that marked this connection busy (the wait ends
        with :func:`~zproc._closing.closed_while_busy` within ``SLICE`` of a close())."""
        early = self._early.pop(rid, None)
        if early is not None:
            return _decode(*early)
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.sock
        try:
            while True:
                if deadline is None:
                    try:
                        frames = recv_message(sock, 1)
                    except zmq.Again:
                        self._check_alive(rid)
                        continue
                elif deadline - time.monotonic() >= SLICE:
                    # no poll (a Poller per call costs microseconds): the socket's
                    # rcvtimeo bounds this wait to SLICE
                    try:
                        frames = recv_message(sock, 1)
                    except zmq.Again:
                        self._check_alive(rid)
                        continue
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not sock.poll(min(remaining, SLICE) * 1000):
                        if time.monotonic() >= deadline:
                            raise self._no_reply(timeout)
                        self._check_alive(rid)
                        continue
                    frames = recv_message(sock, 1)
                status, got, head, body = P.parse_reply(frames)
                heads = self.heads
                if head > heads[0]:
                    heads[0] = head
                if got == rid:
                    self._expected.pop(rid, None)
                    return _decode(status, body)
                if got in self._expected:
                    self._early[got] = (status, body)
        except BaseException:
            self._lapse(rid)
            raise

    def _no_reply(self, timeout: float | None) -> TimeoutError:
        """The error of a request whose reply did not come within ``timeout``."""
        self._poll_monitor()
        return TimeoutError(
            f"no reply from the server at {self.address.req_rep} within {timeout} s; the "
            f"request's outcome is unknown (the server may still apply it). Raise "
            f"request_timeout if the server is busy.{self._handshake.hint()}"
        )

    def _lapse(self, rid: int) -> None:
        """The wait for ``rid`` ended without its reply: :meth:`expect` may revive it."""
        entry = self._expected.pop(rid, None)
        if entry is not None:
            self._lapsed = (rid, entry)

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
        if self.closed:  # by another thread, while this one waits
            raise closed_while_busy()
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
            send_frames(self.sock, (frames,) if type(frames) is bytes else frames)
            return
        self._expected.pop(rid, None)
        raise ServerUnavailableError(
            f"the connection to the zproc server at {self.address.req_rep} was lost while a "
            f"request was in flight, and it is back: a server answers there again (this "
            f"client cannot tell a restarted server from one that was paused or unreachable "
            f"for a while). The outcome of the request is unknown: it may or may not have "
            f"been applied. This State can be used again; check the state and retry if needed"
        )

    def _close_sockets(self) -> None:
        if self.pid != os.getpid():
            return  # sockets of another process: never touch them
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)


def _decode(status: int, body: P.Frame) -> Any:
    if status == P.OK:
        return P.decode_buffered(body)
    if status == P.ERROR:
        raise S.loads_exception(body)
    raise ProtocolError(f"unknown reply status {status}")


# -- asyncio ------------------------------------------------------------------------------


def closed_error(what: str = "AsyncState") -> ZProcError:
    """The error of a closed State (or AsyncState)."""
    return ZProcError(f"this {what} is closed; create a new one")


def running() -> bool:
    """Whether an asyncio event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AsyncConnection(Connection):
    """A :class:`Connection` whose DEALER is an asyncio socket.

    Any number of coroutines may wait for replies at once: one reader task receives
    every reply and hands it to the request with that id. A wait that is cancelled or
    times out forgets its id, so its late reply is recognised and dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._waiters: dict[int, asyncio.Future[tuple[int, P.Frame]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(*args, **kwargs)
        self.sock.rcvtimeo = -1  # the reader waits on the event loop, not in recv

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind this connection to ``loop`` on first use; refuse any other loop."""
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
            return
        raise ZProcError(
            "this AsyncState is used by another event loop than the one it first ran in "
            "(an asyncio socket belongs to one loop, and so does an AsyncState): create "
            "an AsyncState in each event loop, or use a zproc.State, which any thread may "
            "share"
        )

    def _new_socket(self, kind: int) -> Any:
        # Same context as the sync sockets, so the monitor socket stays a sync one.
        return zmq.asyncio.Socket(get_context(), kind)

    def send(self, kind: int, method: int, body: bytes, namespace: bytes) -> int:
        rid = super().send(kind, method, body, namespace)
        self._kick()
        return rid

    def _kick(self) -> None:
        """After a send that bypassed the asyncio layer, let it look for readable replies
        (ZeroMQ's notification is edge-triggered and the send may have consumed it)."""
        if running():
            self.sock.get(zmq.EVENTS)

    async def arequest(
        self, kind: int, method: int, body: bytes, namespace: bytes, timeout: float | None
    ) -> Any:
        """Send a request and await its decoded result (or its error)."""
        return await self.aresult(self.send(kind, method, body, namespace), timeout)

    async def aresult(self, rid: int, timeout: float | None = None) -> Any:
        """Await the reply to request ``rid``; decode it or raise the remote error."""
        early = self._early.pop(rid, None)
        if early is not None:
            self._expected.pop(rid, None)
            return _decode(*early)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._check_loop(loop)
        waiter: asyncio.Future[tuple[int, P.Frame]] = loop.create_future()
        self._waiters[rid] = waiter
        self._start_reader()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
                if wait > 0:
                    await asyncio.wait((waiter,), timeout=wait)
                if waiter.done():
                    self._expected.pop(rid, None)
                    return _decode(*waiter.result())
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._no_reply(timeout)
                self._check_alive(rid)
                self._kick()
                self._start_reader()
        except BaseException:
            self._waiters.pop(rid, None)
            self._lapse(rid)
            raise

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """Receive replies for as long as the connection is open."""
        sock = self.sock
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    status, got, head, body = P.parse_reply(frames)
                except ProtocolError as exc:
                    self._fail_waiters(exc)
                    continue
                heads = self.heads
                if head > heads[0]:
                    heads[0] = head
                waiter = self._waiters.pop(got, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result((status, body))
                elif got in self._expected:
                    self._early[got] = (status, body)
        except asyncio.CancelledError:
            if not self.closed:
                raise
        except Exception as exc:  # the socket failed: the waiting requests fail with it
            if not self.closed:
                self._fail_waiters(exc)

    def _fail_waiters(self, error: BaseException) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()

    async def aclose(self) -> None:
        """Stop the reader task and close the sockets; waiting requests raise."""
        reader, self._reader = self._reader, None
        self.close()
        if reader is not None and reader is not asyncio.current_task():
            await asyncio.wait((reader,))

    def forget(self, rid: int) -> None:
        """Drop the reply to ``rid`` whenever it comes (nobody will ask for it)."""
        self._expected.pop(rid, None)
        self._early.pop(rid, None)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._fail_waiters(closed_error())
            if self._reader is not None:
                self._reader.cancel()
        except RuntimeError:  # the event loop is closed already: nothing waits
            pass
        self._reader = None
        super().close()


# -- event streams: the I/O under zproc._stream._StreamCore ---------------------------------


class StreamOwner(Protocol):
    """What an event stream needs of its State (or AsyncState)."""

    request_timeout: float | None
    _ns: bytes
    _max_backlog: int
    _rcvhwm: int
    _keys: ClientKeys | None
    _connect_timeout: float | None

    @property
    def server_address(self) -> ServerAddress: ...

    def _request(self, kind: int, method: int, body: bytes) -> Any:
        """A round trip (an awaitable of it, for an AsyncState)."""

    def _stream_lost(self, stream: Any, error: BaseException) -> None:
        """Drop ``stream``: the server's history no longer holds what it saw."""


class _StreamIO(_StreamCore):
    """The I/O steps both event streams take alike: the SUB socket's set-up and the
    round trips through the owner (whose ``_request`` is a coroutine for asyncio, which
    the driver awaits)."""

    def __init__(self, owner: StreamOwner, conn: Connection, start_seq: int, start_run: bytes,
                 sub: Any) -> None:
        address = owner.server_address
        super().__init__(
            owner._ns, start_seq, owner._max_backlog, start_run, identity=conn.identity,
            req_rep=address.req_rep, pub_sub=address.pub_sub, secure=owner._keys is not None,
            connect_timeout=owner._connect_timeout,
        )
        self.owner = owner
        self.conn = conn
        sub.linger = 0
        sub.rcvhwm = owner._rcvhwm
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.setsockopt(zmq.SUBSCRIBE, self.marker)
        configure_client(sub, owner._keys)
        sub.connect(address.pub_sub)
        self.sub = sub

    def _on_lost(self, error: ServerUnavailableError) -> None:
        self.owner._stream_lost(self, error)

    def _io_send_head(self) -> int:
        return self.conn.send(P.Kind.HEAD, 0, b"", self.namespace)

    def _io_head(self) -> Any:
        return self.owner._request(P.Kind.HEAD, 0, b"")

    def _io_fetch(self, since: int, full: bool) -> Any:
        return self.owner._request(P.Kind.FETCH, 0, P.fetch_request(since, full, self.run))

    def _io_sync(self, token: bytes) -> Any:
        return self.owner._request(P.Kind.SYNC, 0, token)


class Stream(_StreamIO, OwnedSockets):
    """The event side of a State: a SUB socket, driving :class:`_StreamCore` in step.

    One thread uses it; another may close it (see ``_closing``): the steps that touch the
    SUB socket mark it busy, and a wait ends within ``SLICE`` of a close().
    """

    def __init__(self, owner: StreamOwner, conn: Connection, start_seq: int, start_run: bytes
                 ) -> None:
        super().__init__(owner, conn, start_seq, start_run, get_context().socket(zmq.SUB))
        self._pollitems = [(self.sub, _POLLIN)]
        self._init_owned()

    def _close_sockets(self) -> None:
        if not self.sub.closed:
            self.sub.close(0)

    def start(self, start_seq: int) -> None:
        """Subscribe, then load what came before (see ``_StreamCore._start``)."""
        drive(self._start(start_seq))

    def _io_head_result(self, rid: int) -> Any:
        return self.conn.result(rid, self.owner.request_timeout)

    def _io_poll(self, seconds: float) -> bool:
        # zmq_poll on a list kept for it: no Poller built per wait, nothing to undo after
        self._enter()
        try:
            end = time.monotonic() + seconds
            while not _zmq_poll(self._pollitems, _ms(min(seconds, SLICE))):
                if self.closed:  # by another thread
                    raise closed_while_busy()
                seconds = end - time.monotonic()
                if seconds <= 0:
                    return False
            return True
        finally:
            self._leave()

    def _io_recv(self) -> list[bytes]:
        self._enter()
        try:
            return recv_frames(self.sub)
        finally:
            self._leave()

    def drain(self) -> None:
        """Apply every message already queued on the SUB socket."""
        sub = self.sub
        self._enter()
        try:
            while (frames := recv_queued(sub)) is not None:
                if self._receive(frames):
                    self.replay()
        finally:
            self._leave()

    def replay(self) -> None:
        """Fetch the events after ``seq`` from the server's history (or resync)."""
        drive(self._replay())

    def catch_up(self) -> int:
        """Bring the replica at least to the server's current head; return that head."""
        return drive(self._catch_up())

    def refresh(self, seen: int, check: bool, wait: float) -> None:
        """Make the replica current for a cached read (see ``_StreamCore._refresh``)."""
        drive(self._refresh(seen, check, wait))

    def find(self, qualifies: Qualifies, cursor: _Cursor, deadline: float | None,
             consume: bool = False, fresh: bool = True) -> _Ev | None:
        """Advance ``cursor`` to the next event that qualifies, blocking for new events
        (see ``_StreamCore._find``)."""
        return drive(self._find(qualifies, cursor, deadline, consume, fresh))


_zmq_poll = zmq.zmq_poll
_POLLIN = int(zmq.POLLIN)


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


class AsyncStream(_StreamIO):
    """The event side of an AsyncState: an asyncio SUB socket, driving
    :class:`_StreamCore` with ``await``.

    Several coroutines may use it at once. Applying events is guarded by sequence
    numbers, so concurrent drains and replays are safe.
    """

    conn: AsyncConnection

    def __init__(self, owner: StreamOwner, conn: AsyncConnection, start_seq: int,
                 start_run: bytes) -> None:
        super().__init__(owner, conn, start_seq, start_run,
                         zmq.asyncio.Socket(get_context(), zmq.SUB))
        self.failure: BaseException | None = None
        self._stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def close(self, error: BaseException | None = None) -> None:
        """Close the socket; coroutines waiting on this stream raise ``error``."""
        if self.failure is None:
            self.failure = error or closed_error()
        try:
            if not self._stopped.done():
                self._stopped.set_result(None)
        except RuntimeError:  # the event loop is closed already: nothing waits
            pass
        if not self.sub.closed:
            self.sub.close(0)

    def _check_open(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def start(self, start_seq: int) -> None:
        """Subscribe, then load what came before (see ``_StreamCore._start``)."""
        await adrive(self._start(start_seq))

    def _io_head_result(self, rid: int) -> Any:
        return self.conn.aresult(rid, self.owner.request_timeout)

    async def _io_poll(self, seconds: float) -> bool:
        """Wait until a message is queued on the SUB socket (True) or ``seconds`` pass."""
        self._check_open()
        poll = cast("asyncio.Future[int]", self.sub.poll(_ms(seconds)))
        try:
            await asyncio.wait((poll, self._stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not poll.done():
                poll.cancel()
        self._check_open()
        return bool(poll.result())

    def _io_recv(self) -> Any:
        return self.sub.recv_multipart(zmq.NOBLOCK)

    async def drain(self) -> None:
        """Apply every message already queued on the SUB socket."""
        self._check_open()
        sub = self.sub
        while True:
            try:
                frames = await sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._receive(frames):
                await self.replay()

    async def replay(self) -> None:
        """Fetch the events after ``seq`` from the server's history (or resync)."""
        await adrive(self._replay())

    async def catch_up(self) -> int:
        """Bring the replica at least to the server's current head; return that head."""
        return await adrive(self._catch_up())

    async def refresh(self, seen: int, check: bool, wait: float) -> None:
        """Make the replica current for a cached read (see ``_StreamCore._refresh``)."""
        await adrive(self._refresh(seen, check, wait))

    async def find(self, qualifies: Qualifies, cursor: _Cursor, deadline: float | None,
                   consume: bool = False, fresh: bool = True) -> _Ev | None:
        """Advance ``cursor`` to the next event that qualifies, waiting for new events
        (see ``_StreamCore._find``)."""
        return await adrive(self._find(qualifies, cursor, deadline, consume, fresh))
