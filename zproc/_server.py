"""The state server: one process, one thread, one ``dict`` per namespace.

Message flow::

      State (DEALER) ──[request]──▶ ROUTER ┐
                                           │  one request at a time: atomic
      State (DEALER) ◀──[reply]──── ROUTER ┤  (validate, then apply)
                                           ▼
      State (SUB)    ◀──[topic, header, event, event, ...]── PUB

The loop drains every request already queued (up to ``MAX_BATCH``) and applies them in
arrival order (asking whether more are queued costs system calls: a server whose batches
are lone writes asks only every ``PROBE_EVERY`` batches). A reply leaves as soon as its
request is handled while more requests are queued (on two cores, replies held to the end
of a batch left the clients idle); at the batch's end its events are published (one
message per namespace), then the last reply, so that the watcher of a lone write does not
wait behind the writer's reply. Every state change gets the next sequence number of its
namespace and is kept in a bounded history so that clients can replay what they missed
(``FETCH``). With ``persist=``, the batch's changes are journaled (:mod:`zproc._persist`)
before anything is published or replied (every reply then waits for the end of the
batch), and a server started on the same file continues state, sequence numbers and
history.

A dict operation is first *validated* (its result, change set and the encoded reply and
event are computed without touching the dict), then applied; so a failure leaves the state
as it was, and exactly one reply is sent per request. ``atomic`` functions run on the live
dict with a journal of the keys they touch (see :class:`StateDict`), which is rolled back
if the function raises or its result cannot be encoded.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _socket
import time
from collections.abc import Callable
from typing import Any

import psutil
import zmq

from . import _protocol as P
from . import _serialization as S
from ._protocol import parse_call_request, parse_request, parse_routed
from ._broker import Broker
from ._coordsrv import CoordService
from ._persist import DEFAULT_COMPACT_AFTER, Store
from ._security import (
    Guard,
    ServerKeys,
    exposed_endpoints,
    refuse_exposed,
    warn_exposed,
)
from ._transport import (
    ServerAddress,
    bind_random_tcp,
    get_context,
    make_private_ipc_dir,
    recv_message,
    remove_ipc_dir,
    SUBSCRIPTION_MAX,
    SUBSCRIPTIONS_HWM,
    EVENTS_HWM,
    ROUTER_HWM,
    remove_ipc_endpoint,
    send_frames,
    server_socket,
)
from ._stats import Meter, coordination_figures
from ._store import _OPS, DEFAULT_HISTORY_BYTES, MISSING, Functions, Namespace, changed, run_atomic
from ._utils import mark_server_process
from ._version import __version__
from .exceptions import AddressInUseError, ProtocolError

__all__ = ["DEFAULT_HISTORY_BYTES", "Server"]

log = logging.getLogger("zproc.server")

#: Requests handled before the queued events are published and the replies sent.
MAX_BATCH = 256
#: A server whose batches are lone requests asks whether more are queued after a write
#: only every this many batches (each ask is two system calls); once a batch finds more,
#: it asks after every request until a batch ends alone.
PROBE_EVERY = 4
#: Events kept per namespace for replay.
DEFAULT_HISTORY = 10_000
#: Largest accepted request, in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
#: On a clean stop, how long the last replies and events may take to leave (ms).
SHUTDOWN_LINGER_MS = 500
#: Most namespaces one server holds (each costs a dict and a history).
DEFAULT_MAX_NAMESPACES = 10_000
#: Requests that take longer than this (ms) are logged.
DEFAULT_SLOW_LOG_MS = 100.0

_CALL = int(P.Kind.CALL)
_COORD = int(P.Kind.COORD)
_SETITEM = int(P.Method.SETITEM)
#: The dict methods whose result is a stored value (sent with its big buffers apart).
_VALUE_METHODS = frozenset(int(m) for m in (P.Method.GETITEM, P.Method.GET, P.Method.POP,
                                            P.Method.SETDEFAULT))
_NONE = S.dumps(None)  # the encoded result of every write that returns nothing

# -- the server ------------------------------------------------------------------------


class Server:
    """Owns the sockets and the namespaces; :meth:`serve` runs the loop."""

    def __init__(
        self,
        address: ServerAddress | None,
        *,
        history_size: int = DEFAULT_HISTORY,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_namespaces: int = DEFAULT_MAX_NAMESPACES,
        keys: ServerKeys | None = None,
        persist: str | os.PathLike[str] | None = None,
        fsync: str = "always",
        compact_after: int = DEFAULT_COMPACT_AFTER,
        insecure: bool = False,
        slow_log_ms: float = DEFAULT_SLOW_LOG_MS,
        collect_stats: bool = True,
    ) -> None:
        self._store: Store | None = None
        # refused before any socket exists: nothing listens beyond this machine unguarded
        refuse_exposed(address or (), secure=keys is not None, insecure=insecure)
        #: This run's token, and the runs whose history it continues (see ``_protocol``):
        #: ``(run, {namespace: head it started from})``, oldest first, this one last.
        self.run_token = os.urandom(P.RUN_SIZE)
        self.lineage: list[tuple[bytes, dict[str, int]]] = [(self.run_token, {})]
        self.history_size = history_size
        self.history_bytes = history_bytes
        #: the atomic functions sent by value, by digest (this run only)
        self.functions = Functions()
        self.max_namespaces = max_namespaces
        self.namespaces: dict[str, Namespace] = {}
        self.stats = {"errors": 0, "dropped": 0, "events": 0, "rejected": 0,
                      "replays": 0, "replayed": 0, "resets": 0, "largest_replay": 0}
        self.started = time.time()
        #: the figures of :meth:`report`; counted in the loop unless ``collect_stats=False``
        self.meter = Meter(slow_log_ms / 1000, _log_slow)
        self.collect_stats = collect_stats
        self._ipc_dir: str | None = None
        self._created_ipc: list[str] = []
        self.max_message_size = max_message_size
        self._make_sockets()
        ctx = get_context()
        self._guard: Guard | None = None
        if keys is not None:  # CURVE on both sockets, checked before they bind
            self._guard = Guard(ctx, keys, self.stats)
            try:
                self._guard.start([("requests", self.router), ("events", self.pub)])
            except BaseException:
                self.close()
                raise
        self.address = self._bind(address)
        if persist is not None:
            try:
                self._open_store(persist, fsync, compact_after)
            except BaseException:
                self.close()
                raise
        # fencing tokens grow across the runs of a persist file: each run starts above
        # every token of the runs before it (2**40 grants per run)
        self.coord = CoordService(0 if self._store is None else self._store.run_number << 40)
        if self._store is not None:  # queues and event flags come back; locks come back free
            self.coord.restore(*self._store.load_coord())

    def _make_sockets(self) -> None:
        """The ROUTER (requests) and the PUB (events), with their options."""
        self.router = server_socket(zmq.ROUTER, self.max_message_size, ROUTER_HWM)
        self.pub = server_socket(zmq.PUB, SUBSCRIPTION_MAX, EVENTS_HWM, SUBSCRIPTIONS_HWM)
        # A client that reconnects (after its heartbeats gave up on a cut link) keeps its
        # identity: its new connection replaces the old one, which the server may never
        # see closed.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)

    # binding
    def _bind(self, address: ServerAddress | None) -> ServerAddress:
        try:
            if address is None:
                return self._bind_random()
            _bind_endpoint(self.router, address.req_rep)
            self._created_ipc.append(address.req_rep)
            _bind_endpoint(self.pub, address.pub_sub)
            self._created_ipc.append(address.pub_sub)
            return address
        except BaseException:
            self.close()
            raise

    def _bind_random(self) -> ServerAddress:
        if os.name == "posix":
            folder = make_private_ipc_dir()
            try:
                req, pub = f"ipc://{folder}/rr", f"ipc://{folder}/ps"
                self.router.bind(req)
                self.pub.bind(pub)
                self._ipc_dir = folder
                return ServerAddress(req, pub)
            except zmq.ZMQError:
                remove_ipc_dir(folder)
                if self._guard is not None:  # keep the secured sockets, bind them to tcp
                    for sock, endpoint in ((self.router, req), (self.pub, pub)):
                        try:
                            sock.unbind(endpoint)
                        except zmq.ZMQError:
                            pass
                    return ServerAddress(bind_random_tcp(self.router), bind_random_tcp(self.pub))
                for sock in (self.router, self.pub):
                    sock.close(0)
                self._make_sockets()
        return ServerAddress(bind_random_tcp(self.router), bind_random_tcp(self.pub))

    def close(self, linger: int = 0) -> None:
        """Close the sockets (keeping unsent replies and events up to ``linger`` ms)."""
        broker = getattr(self, "_broker", None)
        if broker is not None:
            broker.close()
        store, self._store = self._store, None
        if store is not None:
            try:
                coord = getattr(self, "coord", None)
                store.close(self.namespaces, None if coord is None else coord.journal)
            except Exception:
                log.exception("zproc: could not save the last changes to %s", store.path)
        for sock in (self.router, self.pub):
            if not sock.closed:
                sock.close(linger)
        for endpoint in self._created_ipc:
            remove_ipc_endpoint(endpoint)
        self._created_ipc.clear()
        if self._ipc_dir:
            remove_ipc_dir(self._ipc_dir)
            self._ipc_dir = None
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.close()
            self._guard = None

    # persistence (persist=...): loaded once; then a hook per event and one per batch
    def _open_store(self, path: str | os.PathLike[str], fsync: str, compact_after: int) -> None:
        store = Store(path, fsync=fsync, compact_after=compact_after, keep=self.history_size)
        self._store = store
        heads: dict[str, int] = {}
        for name, seq, data, history in store.load():
            ns = self.namespace(name)
            dict.update(ns.data, data)
            ns.seq = heads[name] = seq
            for entry in history:
                ns.remember(entry)
        self.lineage = store.begin_run(self.run_token, heads)
        record, append = self._record, store.append

        def record_durably(
            ns: Namespace, encoded: tuple[P.Event, bytes], dirty: list[Namespace]
        ) -> None:
            append(ns.name, *encoded)
            record(ns, encoded, dirty)

        self._record = record_durably  # type: ignore[method-assign]

    # the loop
    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            if len(self.namespaces) >= self.max_namespaces:
                raise ProtocolError(
                    f"this server already holds {self.max_namespaces} namespaces (its "
                    f"max_namespaces); reuse an existing namespace"
                )
            ns = Namespace(name, self.history_size, self.history_bytes)
            self.namespaces[name] = ns
        return ns

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        mark_server_process()
        router, pub = self.router, self.pub
        # pyzmq's own method and plain int flags: the enums cost a microsecond per message
        get, poll_in, events = zmq.backend.Socket.get, int(zmq.POLLIN), int(zmq.EVENTS)
        run = self.run_token
        replies: list[list[bytes]] = []
        syncs: list[list[bytes]] = []
        dirty: list[Namespace] = []
        until = until or (lambda: False)
        store = self._store
        router.rcvtimeo = wake = 200  # wake up now and then to notice signals and idle work
        coord = self.coord
        meter = self.meter
        note = meter.note if self.collect_stats else None
        hold = store is not None  # the replies wait for the batch's commit
        busy, probe = False, 0  # the last batch took more than one request; see below
        while not until():
            try:
                frames = recv_message(router)
            except zmq.Again:
                if store is not None:
                    store.idle(self.namespaces)
                if coord.active:
                    wake = self._coord_step(wake, store)
                meter.begin()
                continue
            if note is not None:
                meter.begin()
            for n in range(1, MAX_BATCH + 1):
                reply = self.handle(frames, dirty, syncs)
                if note is not None:
                    note(frames)
                # the batch goes on while requests are queued and something waits for its
                # end (events, markers, a commit, coordination). Asking costs two system
                # calls: for events alone, a server whose batches are lone requests (one
                # client, or a quiet moment) asks only every PROBE_EVERY batches, and then
                # on every request while its batches find more.
                others = syncs or hold or coord.active  # what waits, besides events
                waiting = dirty or others
                more = False
                if n < MAX_BATCH and waiting:
                    if busy or n > 1 or not probe or others:
                        more = bool(get(router, events) & poll_in)  # type: ignore[operator]
                        probe = PROBE_EVERY
                    else:
                        probe -= 1
                if reply is not None:
                    if hold or (waiting and not more):  # after the batch's end: below
                        replies.append(reply)
                    else:  # its sender waits for nothing else
                        send_frames(router, reply)
                        meter.bytes_out += len(reply[-1])
                if not more:
                    break
                frames = recv_message(router)
            busy = n > 1
            if not waiting:  # a batch of reads: nothing waits for its end
                continue
            # grants first: a hand-off's latency is what a waiter feels; the store commits
            # first: durable before anyone hears of it (fsync="always")
            if coord.active:
                wake = self._coord_step(wake, store)
            elif store is not None:
                store.commit(self.namespaces, coord.journal)
            # events, then the replies held: a lone write's watcher waits for no reply's
            # send (every change is applied, and journaled, before both)
            sent = 0
            for ns in dirty:
                first = ns.seq - len(ns.outbox) + 1
                send_frames(pub, P.events_message(ns.topic, first, ns.seq, run, ns.outbox))
                self.stats["events"] += len(ns.outbox)
                sent += sum(map(P.frame_size, ns.outbox))
                ns.outbox = []
            dirty.clear()
            for reply in replies:
                send_frames(router, reply)
                sent += len(reply[-1])
            replies.clear()
            meter.bytes_out += sent
            for marker in syncs:
                send_frames(pub, marker)
            syncs.clear()

    def handle(
        self, frames: list[bytes], dirty: list[Namespace], syncs: list[list[bytes]]
    ) -> list[bytes] | None:
        """Handle one request; return the reply frames (None: drop the message)."""
        try:
            request, body = parse_routed(frames, parse_request)
        except P.Rejected as rejected:
            self.stats["dropped"] += 1
            if rejected.reply is None:  # else the sender hears why
                log.warning("%s", rejected.args[0])
            else:
                self.stats["errors"] += 1
            return rejected.reply
        identity = frames[0]
        try:
            result = self.dispatch(identity, request, body, dirty, syncs)
        except Exception as exc:
            return self._error(identity, request.request_id, exc)
        if result is None:  # answered later (a waiting acquire)
            return None
        ns = self.namespaces.get(request.namespace)
        head = 0 if ns is None else ns.seq
        return P.reply(identity, P.OK, request.request_id, result, head)

    def _error(self, identity: bytes, rid: int, exc: BaseException) -> list[bytes]:
        self.stats["errors"] += 1
        return P.error_reply(identity, rid, exc)

    def dispatch(
        self,
        identity: bytes,
        request: P.Request,
        body: bytes,
        dirty: list[Namespace],
        syncs: list[list[bytes]],
    ) -> bytes | None:
        """Run one request and return the encoded result (raises on failure; None: the
        reply is sent later)."""
        kind = request.kind
        if kind == _COORD:  # before the namespace: names live apart from the dict
            return self.coord.handle(identity, request, body)
        ns = self.namespace(request.namespace)
        if kind == _CALL:
            args = parse_call_request(body)
            if request.method == _SETITEM and len(args) == 2:
                # the most frequent write, as _op_setitem without the _Prepared round trip
                data, (key, value) = ns.data, args
                before = dict.get(data, key, MISSING)
                if before is MISSING:
                    self._commit(ns, identity, {key: value}, (), {}, dirty)
                elif changed(before, value):
                    self._commit(ns, identity, {key: value}, (), {key: before}, dirty)
                else:
                    return _NONE
                dict.__setitem__(data, key, value)
                return _NONE
            prepared = _OPS[request.method](ns.data, *args)
            if request.method in _VALUE_METHODS:  # a value read: its big buffers apart
                reply = P.encode_buffered(prepared.result)
            else:
                reply = S.dumps(prepared.result)
            if prepared.apply is None:
                return reply
            if not prepared.changes and not prepared.deleted:
                return reply
            self._commit(ns, identity, prepared.changes, prepared.deleted, prepared.old, dirty)
            prepared.apply()
            return reply
        if kind == P.Kind.ATOMIC:
            return self._atomic(ns, identity, request.method, body, dirty)
        if kind == P.Kind.PIPELINE:
            return self._pipeline(ns, identity, body, dirty)
        if kind == P.Kind.HEAD:
            return P.encode(P.HeadReply(ns.seq, self.run_token))
        if kind == P.Kind.FETCH:
            after, want_snapshot, run = P.parse_fetch_request(body)
            if not self.continues(run, after, ns.name):
                fetched = P.FetchReply(ns.seq, None, None, self.run_token, False)
            else:
                events = ns.replay_after(after)
                snapshot = dict(ns.data) if want_snapshot or events is None else None
                fetched = P.FetchReply(ns.seq, snapshot, events, self.run_token, True)
                self._count_replay(ns, identity, after, events, want_snapshot)
            return P.encode_fetch_reply(fetched)
        if kind == P.Kind.SNAPSHOT:
            return P.encode(P.SnapshotReply(ns.seq, dict(ns.data)))
        if kind == P.Kind.SYNC:
            syncs.append([P.sync_topic(identity), bytes(body)])
            return _NONE
        if kind == P.Kind.PING:
            return P.encode(P.PingReply(bytes(body), os.getpid()))
        if kind == P.Kind.TIME:
            return S.dumps(time.time())
        if kind == P.Kind.META:
            return S.dumps(self.meta())
        if kind == P.Kind.STATS:
            return S.dumps(self.report())
        if kind == P.Kind.SWARM:
            return P.encode(self.swarm(P.parse_swarm_settings(body)))
        raise ProtocolError(f"unhandled request kind {kind}")  # pragma: no cover

    def _coord_step(self, wake: int, store: Store | None) -> int:
        """Coordination's timers, the store's commit (when persisting), then coordination's
        replies due; the loop's next sleep (ms)."""
        timeout = self.coord.tick()
        replies = self.coord.take()
        if store is not None:
            store.commit(self.namespaces, self.coord.journal)
        for reply in replies:
            send_frames(self.router, reply)
        if timeout != wake:
            self.router.rcvtimeo = timeout
        return timeout

    def continues(self, run: bytes, seq: int, namespace: str) -> bool:
        """Whether change ``seq`` of ``namespace`` as run ``run`` numbered it is part of
        this server's history (``run`` empty: this run)."""
        if not run or run == self.run_token or seq == 0:
            return True
        lineage = self.lineage
        for index in range(len(lineage) - 2, -1, -1):
            if lineage[index][0] == run:
                # that run's changes reached its successor up to the head it started from
                return seq <= lineage[index + 1][1].get(namespace, 0)
        return False

    def _count_replay(
        self, ns: Namespace, identity: bytes, after: int, events: list[P.Event] | None,
        want_snapshot: bool,
    ) -> None:
        stats = self.stats
        stats["replays"] += 1
        if events:
            stats["replayed"] += len(events)
            stats["largest_replay"] = max(stats["largest_replay"], len(events))
        elif events is None and not want_snapshot:
            stats["resets"] += 1
            log.info(
                "zproc server %d: client %s fell behind in namespace %r by %d changes, more "
                "than the history holds (%d changes, %d bytes; history_size=%d, "
                "history_bytes=%d); it gets the whole namespace as one combined change",
                os.getpid(), identity.hex(), ns.name, ns.seq - after, len(ns.history),
                ns.history_bytes, self.history_size, self.history_bytes,
            )

    def report(self) -> dict[str, Any]:
        """The figures of ``State.stats()`` (their keys: docs/production.rst, "The server's
        figures")."""
        return server_report(self, self._store, getattr(self, "_broker", None))

    def meta(self) -> P.Meta:
        return {
            "version": __version__,
            "protocol": P.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "history_size": self.history_size,
            "namespaces": sorted(self.namespaces),
            "stats": {"requests": self.meter.total, **self.stats},
            "started": self.started,
        }

    def swarm(self, settings: dict[str, Any]) -> P.SwarmReply:
        """Start the swarm broker on first use (:mod:`zproc._broker`); return its endpoints."""
        broker: Broker | None = getattr(self, "_broker", None)
        if broker is None or not broker.alive:
            if broker is not None:
                broker.close()
            guard = getattr(self, "_guard", None)
            broker = Broker(self.address, guard, self._ipc_dir, self.max_message_size)
            self._broker = broker
            exposed = [] if guard is not None else exposed_endpoints(broker.endpoints)
            if exposed:  # only with insecure=True: the constructor refused otherwise
                warn_exposed(exposed, "swarm broker", stacklevel=2)
                log.warning("zproc server %d: the swarm broker listens at %s without a "
                            "secret_key", os.getpid(), ", ".join(exposed))
        broker.configure(settings)
        return P.SwarmReply(*broker.endpoints)

    def _atomic(
        self, ns: Namespace, identity: bytes, form: int, body: bytes, dirty: list[Namespace]
    ) -> bytes:
        fn, args, kwargs = P.parse_atomic_request(form, body)
        if form == P.AtomicForm.DIGEST:
            fn = self.functions.find(fn)
        elif form == P.AtomicForm.DEFINE:
            fn = self.functions.define(fn)
        elif getattr(fn, "__zproc_atomic__", False):  # sent by name: the atomic wrapper
            fn = fn.__wrapped__

        def seal(
            changes: dict[Any, Any], deleted: tuple[Any, ...], old: dict[Any, Any]
        ) -> tuple[P.Event, bytes]:
            return P.new_event(ns.seq + 1, identity, time.time(), changes, deleted, old)

        reply, event = run_atomic(ns.data, fn, args, kwargs, seal)
        if event is not None:
            self._record(ns, event, dirty)
        return reply

    def _pipeline(
        self, ns: Namespace, identity: bytes, body: bytes, dirty: list[Namespace]
    ) -> bytes:
        """Apply a pipeline's operations in order, each on its own (as separate CALLs)."""
        data = ns.data
        ok, error = P.OK, P.ERROR
        out: list[tuple[int, bytes]] = []
        for op in P.parse_pipeline_request(body):
            try:
                method, args = P.parse_pipeline_op(op)
                prepared = _OPS[method](data, *args)
                reply = S.dumps(prepared.result)
                if prepared.apply is not None and (prepared.changes or prepared.deleted):
                    self._commit(
                        ns, identity, prepared.changes, prepared.deleted, prepared.old, dirty
                    )
                    prepared.apply()
                out.append((ok, reply))
            except Exception as exc:
                self.stats["errors"] += 1
                out.append((error, S.dumps_exception(exc)))
        return S.dumps(out)

    def _commit(
        self,
        ns: Namespace,
        identity: bytes,
        changes: dict[Any, Any],
        deleted: tuple[Any, ...],
        old: dict[Any, Any],
        dirty: list[Namespace],
    ) -> None:
        event = P.new_event(ns.seq + 1, identity, time.time(), changes, deleted, old)
        self._record(ns, event, dirty)

    def _record(
        self, ns: Namespace, encoded: tuple[P.Event, bytes], dirty: list[Namespace]
    ) -> None:
        event, data = encoded
        ns.seq = event.seq
        # the event and its size; its frame leaves with the batch
        ns.remember((event, len(data) if type(data) is bytes else P.frame_size(data)))
        if not ns.outbox:
            dirty.append(ns)
        ns.outbox.append(data)


def _bind_endpoint(sock: zmq.Socket[Any], endpoint: str) -> None:
    if endpoint.startswith("ipc://") and _ipc_in_use(endpoint[len("ipc://") :]):
        raise AddressInUseError(
            f"{endpoint} is in use: a server is probably already running there. Use another "
            f"address, or connect to that server with zproc.State / zproc.Context"
        )
    ipc = endpoint.startswith("ipc://")
    try:
        # not the umask's mode: only this user may connect (the umask covers the moment
        # between bind and chmod)
        umask = os.umask(0o077) if ipc else None
        try:
            sock.bind(endpoint)
        finally:
            if umask is not None:
                os.umask(umask)
        if ipc:
            os.chmod(endpoint[len("ipc://") :], 0o600)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"{endpoint} is in use: a server (or another program) is probably already "
                f"listening there. Use another address, or connect to that server with "
                f"zproc.State / zproc.Context"
            ) from exc
        raise ValueError(f"cannot bind {endpoint}: {exc}") from exc


def _ipc_in_use(path: str) -> bool:
    """True if something accepts connections on the Unix socket at ``path``.

    ZeroMQ replaces an existing ipc socket file on bind, which would silently steal the
    address from a running server; so check first.
    """
    if not os.path.exists(path):
        return False
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _log_slow(kind: str, namespace: str, duration: float, client: str) -> None:
    log.warning(
        "zproc server %d: slow request: %s in namespace %r took %.1f ms (client %s)",
        os.getpid(), kind, namespace, duration * 1000, client,
    )


def server_report(server: Server, store: Store | None, broker: Broker | None) -> dict[str, Any]:
    """The figures of ``State.stats()``; read from the loop's thread or another one (the
    metrics endpoint), so every collection is copied before it is walked."""
    meter, stats = server.meter, dict(server.stats)
    now = meter.clock()
    return {
        "pid": os.getpid(),
        "version": __version__,
        "protocol": P.PROTOCOL_VERSION,
        "address": tuple(server.address),
        "started": server.started,
        "uptime": now - meter.started,
        "clients": meter.clients(now),
        "requests": {
            "total": meter.total,
            "by_kind": meter.by_kind(),
            "per_second": meter.rates(now),
            "errors": stats["errors"],
            "dropped": stats["dropped"],
        },
        "namespaces": {
            name: {"keys": len(ns.data), "seq": ns.seq, "history": len(ns.history),
                   "history_bytes": ns.history_bytes}
            for name, ns in sorted(list(server.namespaces.items()))
        },
        "slow_log": meter.slow_log(now),
        "events": {
            "published": stats["events"],
            "replays": stats["replays"],
            "replayed": stats["replayed"],
            "largest_replay": stats["largest_replay"],
            "resets": stats["resets"],
        },
        "bytes": {"in": meter.bytes_in, "out": meter.bytes_out},
        "memory": {"rss": psutil.Process().memory_info().rss},
        "rejected_handshakes": stats["rejected"],
        "persistence": None if store is None else _persistence(store),
        "swarm": None if broker is None else _swarm_figures(broker),
        "coordination": coordination_figures(server.coord.core),
    }


def _persistence(store: Store) -> dict[str, Any]:
    size = 0
    for path in (store.path, store.path + "-wal"):
        try:
            size += os.path.getsize(path)
        except OSError:
            pass
    return {
        "path": store.path,
        "fsync": store.fsync,
        "file_bytes": size,
        "journal_rows": store.journal_rows,
        "last_snapshot": store.last_snapshot,
    }


def _swarm_figures(broker: Broker) -> dict[str, int]:
    """Read from the server's thread while the broker's thread runs: copies, and a retry
    if a collection changed under the copy."""
    for _ in range(5):
        try:
            workers = list(broker.workers.values())
            queue = list(broker.queue)
            tasks = len(broker.tasks)
            break
        except RuntimeError:  # changed size during the copy
            continue
    else:
        workers, queue, tasks = [], [], 0
    return {
        "workers": len(workers),
        "running": sum(1 for w in workers if w.held),
        "queued": sum(1 for _, chunk in queue if chunk.status is None),
        "tasks": tasks,
        "refused_results": broker.refused_results,
    }
