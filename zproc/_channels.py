"""The per-thread connections of a :class:`zproc.State`.

A ZeroMQ socket must not be used by two threads at once, so a State shared by threads
gives each thread a :class:`Channel` of its own: a request connection (DEALER), the event
stream of that thread's watchers and cached reads (SUB), and their bookkeeping. Nothing
is locked across a round trip: threads never share a socket, so their requests go out and
their replies come back side by side, each on its own connection.

What the threads share is kept in :class:`Channels`: the identities of every channel (a
State's watchers skip the changes of all its threads), the highest namespace head any
reply reported (a cached read in one thread sees what another thread's acknowledged
write did), and the list of channels, which ``close()`` closes.

``fork``: a channel belongs to the process that made it (its ``pid``). A child that
inherited a State makes new channels on first use in each of its threads and leaves the
parent's sockets alone; the parent's channels keep working in the parent.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _protocol as P
from ._client import Connection
from ._closing import closed_while_busy
from ._security import ClientKeys
from ._transport import ServerAddress
from ._utils import in_server_process
from .exceptions import ServerUnavailableError, TimeoutError, ZProcError

__all__ = ["Channel", "Channels", "ThreadChannels"]


class Channel:
    """One thread's connection and event stream."""

    __slots__ = ("cache_check_due", "cache_due", "conn", "pid", "start_rid", "stream",
                 "thread")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stream: Any = None  # zproc._client.Stream, started on first use
        self.start_rid: int | None = None  # a registration whose reply is not read yet
        self.cache_due = self.cache_check_due = 0.0
        self.pid = os.getpid()
        self.thread = threading.current_thread()

    def close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and self.pid == os.getpid():
            stream.close()

    def set_stream(self, stream: Any) -> None:
        self.stream = stream
        if self.conn.closed:  # by close() in another thread, which may have missed it
            self.close_stream()
            raise closed_while_busy()

    def close(self) -> None:
        """Close the sockets (those of this process only; never another's); those of a
        thread inside a call on them, when its call ends (see ``_closing``)."""
        self.conn.close()  # first: a stream set after this is closed by set_stream
        self.close_stream()


class Channels:
    """The channels of one State, at most one per thread and process."""

    def __init__(self) -> None:
        #: This thread's channel (``channel``) and its connection (``conn``, for the hot
        #: path), unset until the thread's first use; a forked child inherits the forking
        #: thread's, whose ``pid`` is not its own. (A plain ``threading.local``: its
        #: attributes are read faster than those of a subclass.)
        self.local = threading.local()
        self.all: list[Channel] = []
        #: The identities of the channels of this process.
        self.ids: set[bytes] = set()
        #: The highest namespace head the replies of any channel reported (one box shared
        #: by every channel's connection).
        self.heads = [0]
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self.closed = False  # by take_all (the State's close())

    def lock(self) -> threading.Lock:
        """A lock of this process (one inherited through ``fork`` may be held forever by
        a thread that does not exist in the child)."""
        pid = os.getpid()
        if self._lock_pid != pid:
            self._lock, self._lock_pid = threading.Lock(), pid
        return self._lock

    def add(self, channel: Channel) -> None:
        """Make ``channel`` the calling thread's; forget the channels of another process
        (never touching their sockets) and close those of threads that ended."""
        pid = os.getpid()
        with self.lock():
            if self.closed:  # the State was closed since this thread began to connect
                channel.close()
                raise ZProcError("this State is closed; create a new one")
            ended = [c for c in self.all if c.pid == pid and not c.thread.is_alive()]
            if any(c.pid != pid for c in self.all):
                self.ids.clear()  # inherited through fork: the parent's, not ours
            self.all = [c for c in self.all if c.pid == pid and c not in ended]
            self.all.append(channel)
            self.ids.add(channel.conn.identity)
        for old in ended:
            old.close()
        self.local.channel, self.local.conn = channel, channel.conn

    def current(self) -> Channel | None:
        """The calling thread's channel, if it has one in this process."""
        channel: Channel | None = getattr(self.local, "channel", None)
        if channel is None or channel.pid != os.getpid():
            return None
        return channel

    def any_conn(self) -> Connection | None:
        """A connection of this process: the calling thread's, else any (or None)."""
        channel = self.current()
        if channel is not None:
            return channel.conn
        pid = os.getpid()
        return next((c.conn for c in self.all if c.pid == pid), None)

    def take_all(self) -> list[Channel]:
        """Forget every channel; return those of this process (to close them)."""
        pid = os.getpid()
        with self.lock():
            mine = [c for c in self.all if c.pid == pid]
            self.all = []
            self.closed = True
        self.local.__dict__.clear()  # the calling thread's (the others' fail as closed)
        return mine

    def each(self) -> list[Channel]:
        """The channels of this process."""
        pid = os.getpid()
        return [c for c in list(self.all) if c.pid == pid]


class ThreadChannels:
    """The connection plumbing of :class:`zproc.State`: the calling thread's channel,
    made on first use, and the registration of the State's buffer (once per process)."""

    _address: ServerAddress
    _connect_timeout: float | None
    _keys: ClientKeys | None
    _liveness: float
    _ns: bytes
    _closed: bool
    request_timeout: float | None
    #: Seconds ``_register`` waits for the server's head.
    _register_wait: float
    _channels: Channels
    _local: threading.local
    _heads: list[int]
    _start_seq_value: int | None
    _start_run: bytes
    _registered_pid: int

    def _request(self, kind: int, method: int, body: bytes) -> Any:
        raise NotImplementedError

    @property
    def identity(self) -> bytes:
        """The identity the calling thread's changes carry (new after fork or unpickling;
        each thread using a State has its own)."""
        return self._connection().identity

    @property
    def _conn(self) -> Connection | None:
        """The calling thread's connection (else any of this process, or None)."""
        return self._channels.any_conn()

    @property
    def _stream(self) -> Any:
        """The calling thread's event stream, if started."""
        channel = self._channels.current()
        return None if channel is None else channel.stream

    def _connect(self) -> Connection:
        """A new connection for the calling thread (the first of this process registers
        the start of the State's buffer)."""
        if in_server_process():
            raise RuntimeError(
                "a State cannot be used inside an atomic function or elsewhere in the server "
                "process: the server is busy running it and would wait for itself. Work on "
                "the dict the atomic function receives instead"
            )
        if self._closed:
            raise ZProcError("this State is closed; create a new one")
        conn = Connection(
            self._address,
            connect_timeout=self._connect_timeout,
            keys=self._keys,
            liveness=self._liveness,
            heads=self._heads,
        )
        channel = Channel(conn)
        try:
            pid = os.getpid()
            if self._registered_pid != pid:
                with self._channels.lock():
                    if self._registered_pid != pid:
                        self._register(channel)
                        self._registered_pid = pid
        except BaseException:
            conn.close()
            raise
        self._channels.add(channel)
        return conn

    def _spare_connection(self) -> Connection:
        """A connection of no thread (for a request of ``close()`` in a thread that has
        none; the caller closes it)."""
        return Connection(self._address, connect_timeout=self._connect_timeout,
                          keys=self._keys, liveness=self._liveness, heads=self._heads)

    def _register(self, channel: Channel) -> None:
        """Mark the start of this State's buffer: the server's head sequence number now.

        Waits briefly for the answer, so that a change made by anyone right after this
        returns is in the buffer; a server that is not up yet answers later.
        """
        conn = channel.conn
        rid = conn.send(P.Kind.HEAD, 0, b"", self._ns)
        if self._register_wait > 0:
            try:
                self._start_seq_value, self._start_run = P.head_reply(
                    conn.result(rid, self._register_wait)
                )
                channel.start_rid = None
                return
            except (TimeoutError, ServerUnavailableError):
                pass
        self._start_seq_value = None
        channel.start_rid = rid
        conn.expect(rid)

    def _connection(self) -> Connection:
        if self._closed:
            raise ZProcError("this State is closed; create a new one")
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn
        return self._connect()

    def _channel(self) -> Channel:
        """The calling thread's channel (connected on first use)."""
        self._connection()
        return self._local.channel  # type: ignore[no-any-return]

    def _stream_lost(self, stream: Any, error: BaseException) -> None:
        """The server's history lacks what ``stream`` saw: start again on the next call."""
        self._reset_stream()
        self._start_seq_value = None
        channel = self._channels.current()
        if channel is not None:
            channel.start_rid = None

    def _reset_stream(self) -> None:
        channel = self._channels.current()
        if channel is not None:
            channel.close_stream()

    def _start_seq(self) -> int:
        channel = self._channel()
        conn = channel.conn
        if self._start_seq_value is not None:
            return self._start_seq_value
        rid, channel.start_rid = channel.start_rid, None
        if rid is None:
            head, self._start_run = P.head_reply(self._request(P.Kind.HEAD, 0, b""))
            return head
        try:
            self._start_seq_value, self._start_run = P.head_reply(
                conn.result(rid, self.request_timeout)
            )
        except TimeoutError:
            # keep the registration: the buffer still starts where the State was made
            channel.start_rid = rid
            conn.expect(rid)
            raise
        return self._start_seq_value

