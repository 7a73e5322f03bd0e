"""The state server: one process, one thread, one ``dict`` per namespace.

Message flow::

      State (DEALER) ──[header, body]──▶ ROUTER ┐
                                                │  one request at a time: atomic
      State (DEALER) ◀──[header, reply]─ ROUTER ┤  (validate, then apply)
                                                ▼
      State (SUB)    ◀──[topic, header, event, event, ...]── PUB

The loop drains every request already queued (up to ``MAX_BATCH``), applies them in
arrival order, then publishes the batch's events (one message per namespace) and only then
sends the replies. Every state change gets the next sequence number of its namespace and is
kept in a bounded history so that clients can replay what they missed (``FETCH``). With
``persist=``, the batch's changes are journaled (:mod:`zproc._persist`) before anything is
published or replied, and a server started on the same file continues state, sequence
numbers and history.

A dict operation is first *validated* (its result, change set and the encoded reply and
event are computed without touching the dict), then applied; so a failure leaves the state
as it was, and exactly one reply is sent per request. ``atomic`` functions run on the live
dict with a journal of the keys they touch (see :class:`StateDict`), which is rolled back
if the function raises or its result cannot be encoded.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket as _socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import _protocol as P
from . import _serialization as S
from ._persist import (
    DEFAULT_COMPACT_AFTER,
    HistoryEntry,
    Store,
    check_fsync,
    decode_history,
)
from ._security import Guard, SecretKey, ServerKeys, server_keys, warn_if_exposed
from ._transport import (
    ServerAddress,
    bind_random_tcp,
    get_context,
    make_private_ipc_dir,
    normalize_address,
    remove_ipc_dir,
    remove_ipc_endpoint,
)
from ._version import __version__
from .exceptions import ProtocolError

__all__ = ["Server", "in_server_process", "serve", "start_server"]

log = logging.getLogger("zproc")

#: Requests handled before the queued events are published and the replies sent.
MAX_BATCH = 256
#: Events kept per namespace for replay.
DEFAULT_HISTORY = 10_000
#: Largest accepted request, in bytes.
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
#: On a clean stop, how long the last replies and events may take to leave (ms).
SHUTDOWN_LINGER_MS = 500
#: Most namespaces one server holds (each costs a dict and a history).
DEFAULT_MAX_NAMESPACES = 10_000

_MISSING: Any = object()
_CALL = int(P.Kind.CALL)
_SETITEM = int(P.Method.SETITEM)
_NONE = S.dumps(None)  # the encoded result of every write that returns nothing
_RUNNING_IN: int | None = None  # pid of the process running a server loop


def in_server_process() -> bool:
    """True inside a server process (where a State would deadlock the loop)."""
    return _RUNNING_IN == os.getpid()


def changed(old: Any, new: Any) -> bool:
    """True unless ``new`` is ``old`` or compares equal; a failing comparison counts as a change."""
    if old is new:
        return False
    try:
        return not bool(old == new)
    except Exception:
        return True


# -- the dict with a journal -----------------------------------------------------------


_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None)})


class _Copy:
    """A journaled value, pickled (values of mutable types may change in place)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _restored(before: Any) -> Any:
    return S.loads(before.data) if type(before) is _Copy else before


class StateDict(dict):  # type: ignore[type-arg]
    """The server's dict. Plain dict behaviour, plus a journal while an atomic function runs.

    While journaling, the first access to a key that can expose or change its value
    records a pickled copy of that value, so the call can be rolled back exactly and its
    change set computed, at a cost proportional to the keys the function touches.
    Values reached through C-level shortcuts that bypass the dict's methods
    (``dict(d)``, ``{**d}``) are not journaled: mutate values through ``d[key]``.
    """

    __slots__ = ("_journal", "_order")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._journal: dict[Any, Any] | None = None
        self._order: list[Any] | None = None

    # journal bookkeeping
    def _touch(self, key: Any) -> None:
        journal = self._journal
        if journal is not None and key not in journal:
            value = dict.get(self, key, _MISSING)
            if value is _MISSING or type(value) in _IMMUTABLE:
                journal[key] = value  # nothing can change it in place
            else:
                journal[key] = _Copy(S.dumps(value))

    def _touch_all(self) -> None:
        if self._journal is not None:
            for key in list(dict.keys(self)):
                self._touch(key)

    def _touch_delete(self, key: Any) -> None:
        if self._journal is not None:
            if self._order is None:
                self._order = list(dict.keys(self))
            self._touch(key)

    def begin(self) -> None:
        self._journal = {}
        self._order = None

    def end(self, commit: bool) -> tuple[dict[Any, Any], tuple[Any, ...], dict[Any, Any]]:
        """Stop journaling; roll back unless ``commit``. Returns (changes, deleted, old)."""
        journal, order = self._journal or {}, self._order
        self._journal = self._order = None
        changes: dict[Any, Any] = {}
        deleted: list[Any] = []
        old: dict[Any, Any] = {}
        if commit:
            for key, before in journal.items():
                after = dict.get(self, key, _MISSING)
                if before is _MISSING:
                    if after is not _MISSING:
                        changes[key] = after
                    continue
                before = _restored(before)
                if after is _MISSING:
                    deleted.append(key)
                    old[key] = before
                elif changed(before, after):
                    changes[key] = after
                    old[key] = before
            return changes, tuple(deleted), old
        for key, before in journal.items():
            if before is _MISSING:
                dict.pop(self, key, None)
            else:
                dict.__setitem__(self, key, _restored(before))
        if order is not None:
            items = [(key, dict.__getitem__(self, key)) for key in order]
            dict.clear(self)
            dict.update(self, items)
        return changes, (), old

    # journaled dict methods (plain behaviour when no journal is active)
    def __getitem__(self, key: Any) -> Any:
        self._touch(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._touch(key)
        return dict.get(self, key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._touch(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        self._touch_delete(key)
        dict.__delitem__(self, key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._touch(key)
        return dict.setdefault(self, key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._touch_delete(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[Any, Any]:
        if self._journal is not None and dict.__len__(self):
            self._touch_delete(next(reversed(dict.keys(self))))
        return dict.popitem(self)

    def clear(self) -> None:
        if self._journal is not None:
            self._order = self._order if self._order is not None else list(dict.keys(self))
            self._touch_all()
        dict.clear(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        if self._journal is None:
            dict.update(self, *args, **kwargs)
            return
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> StateDict:
        self.update(other)
        return self

    def values(self) -> Any:
        self._touch_all()
        return dict.values(self)

    def items(self) -> Any:
        self._touch_all()
        return dict.items(self)

    def copy(self) -> dict[Any, Any]:
        self._touch_all()
        return dict(self)

    def __or__(self, other: Any) -> dict[Any, Any]:
        self._touch_all()
        return dict(self) | other  # type: ignore[no-any-return]

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._touch_all()
        return (dict, (dict(self),))


# -- one namespace ---------------------------------------------------------------------


class Namespace:
    """One dict, its sequence counter, its history and the events of the current batch."""

    __slots__ = ("name", "data", "seq", "history", "topic", "outbox")

    def __init__(self, name: str, history_size: int) -> None:
        self.name = name
        self.data = StateDict()
        self.seq = 0
        # the events up to seq, oldest first; those loaded from a persist file stay encoded
        # (Raw, a prefix of the history) until a client fetches them
        self.history: deque[HistoryEntry] = deque(maxlen=history_size)
        self.topic = P.event_topic(name.encode())
        self.outbox: list[bytes] = []

    def replay_after(self, seq: int) -> list[P.Event] | None:
        """Events after ``seq`` with their old values; None when some were evicted."""
        if seq >= self.seq:
            return []
        history = self.history
        first = self.seq - len(history) + 1  # the history is contiguous, up to self.seq
        if not history or first > seq + 1:
            return None
        start = seq + 1 - first
        if type(history[start]) is not tuple and not decode_history(history, start, self.data):
            return None
        return [history[i][0] for i in range(start, len(history))]  # type: ignore[index]


def _flush(timeout: float) -> None:
    """Let ZeroMQ deliver what the closed sockets still hold (bounded: a stray open socket
    must not keep a stopping server alive)."""
    thread = threading.Thread(target=get_context().term, daemon=True)
    thread.start()
    thread.join(timeout)


class _Prepared:
    """A validated dict operation: its result and change set, not applied yet."""

    __slots__ = ("result", "changes", "deleted", "old", "apply")

    def __init__(
        self,
        result: Any = None,
        changes: dict[Any, Any] | None = None,
        deleted: tuple[Any, ...] = (),
        old: dict[Any, Any] | None = None,
        apply: Callable[[], Any] | None = None,
    ) -> None:
        self.result = result
        self.changes = changes or {}
        self.deleted = deleted
        self.old = old or {}
        self.apply = apply


_READ_ONLY = _Prepared()


def _prepare_set(d: StateDict, items: Iterable[tuple[Any, Any]]) -> _Prepared:
    changes: dict[Any, Any] = {}
    old: dict[Any, Any] = {}
    for key, value in items:
        before = dict.get(d, key, _MISSING)
        if before is _MISSING:
            changes[key] = value
            old.pop(key, None)
        elif changed(before, value):
            changes[key] = value
            old[key] = before
        else:
            changes.pop(key, None)
    return _Prepared(None, changes, (), old, lambda: dict.update(d, changes))


def _prepare_delete(d: StateDict, key: Any, result: Any) -> _Prepared:
    before = dict.__getitem__(d, key)
    return _Prepared(result, None, (key,), {key: before}, lambda: dict.__delitem__(d, key))


def _op_getitem(d: StateDict, key: Any) -> _Prepared:
    return _Prepared(dict.__getitem__(d, key))


def _op_setitem(d: StateDict, key: Any, value: Any) -> _Prepared:
    before = dict.get(d, key, _MISSING)
    if before is not _MISSING and not changed(before, value):
        return _READ_ONLY
    return _Prepared(
        None,
        {key: value},
        (),
        None if before is _MISSING else {key: before},
        lambda: dict.__setitem__(d, key, value),
    )


def _op_delitem(d: StateDict, key: Any) -> _Prepared:
    return _prepare_delete(d, key, None)


def _op_contains(d: StateDict, key: Any) -> _Prepared:
    return _Prepared(dict.__contains__(d, key))


def _op_len(d: StateDict) -> _Prepared:
    return _Prepared(dict.__len__(d))


def _op_keys(d: StateDict) -> _Prepared:
    return _Prepared(list(dict.keys(d)))


def _op_eq(d: StateDict, other: Any) -> _Prepared:
    return _Prepared(dict.__eq__(d, other))


def _op_ne(d: StateDict, other: Any) -> _Prepared:
    return _Prepared(dict.__ne__(d, other))


def _op_clear(d: StateDict) -> _Prepared:
    if not dict.__len__(d):
        return _READ_ONLY
    old = dict(d)
    return _Prepared(None, None, tuple(old), old, lambda: dict.clear(d))


def _op_get(d: StateDict, key: Any, default: Any = None) -> _Prepared:
    return _Prepared(dict.get(d, key, default))


def _op_pop(d: StateDict, key: Any, *default: Any) -> _Prepared:
    if len(default) > 1:
        raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
    if not dict.__contains__(d, key):
        if default:
            return _Prepared(default[0])
        raise KeyError(key)
    return _prepare_delete(d, key, dict.__getitem__(d, key))


def _op_popitem(d: StateDict) -> _Prepared:
    if not dict.__len__(d):
        raise KeyError("popitem(): dictionary is empty")
    key = next(reversed(dict.keys(d)))
    return _prepare_delete(d, key, (key, dict.__getitem__(d, key)))


def _op_setdefault(d: StateDict, key: Any, default: Any = None) -> _Prepared:
    if dict.__contains__(d, key):
        return _Prepared(dict.__getitem__(d, key))
    return _Prepared(default, {key: default}, (), None, lambda: dict.__setitem__(d, key, default))


def _op_update(d: StateDict, *args: Any, **kwargs: Any) -> _Prepared:
    if len(args) > 1:
        raise TypeError(f"update expected at most 1 argument, got {len(args)}")
    merged = dict(*args, **kwargs)  # may raise part-way: nothing is applied yet
    return _prepare_set(d, merged.items())


def _op_fromkeys(d: StateDict, iterable: Any, value: Any = None) -> _Prepared:
    return _Prepared(dict.fromkeys(iterable, value))


def _op_copy(d: StateDict) -> _Prepared:
    return _Prepared(dict(d))


def _op_set(d: StateDict, value: Any) -> _Prepared:
    new = dict(value)
    deleted = tuple(key for key in d if key not in new)
    prepared = _prepare_set(d, new.items())
    old = prepared.old
    for key in deleted:
        old[key] = dict.__getitem__(d, key)

    def apply() -> None:
        dict.clear(d)
        dict.update(d, new)

    if not prepared.changes and not deleted and list(d) == list(new):
        return _READ_ONLY
    return _Prepared(None, prepared.changes, deleted, old, apply)


_OPS: dict[int, Callable[..., _Prepared]] = {
    P.Method.GETITEM: _op_getitem,
    P.Method.SETITEM: _op_setitem,
    P.Method.DELITEM: _op_delitem,
    P.Method.CONTAINS: _op_contains,
    P.Method.LEN: _op_len,
    P.Method.KEYS: _op_keys,
    P.Method.EQ: _op_eq,
    P.Method.NE: _op_ne,
    P.Method.CLEAR: _op_clear,
    P.Method.GET: _op_get,
    P.Method.POP: _op_pop,
    P.Method.POPITEM: _op_popitem,
    P.Method.SETDEFAULT: _op_setdefault,
    P.Method.UPDATE: _op_update,
    P.Method.FROMKEYS: _op_fromkeys,
    P.Method.COPY: _op_copy,
    P.Method.SET: _op_set,
}

# -- the server ------------------------------------------------------------------------


class Server:
    """Owns the sockets and the namespaces; :meth:`serve` runs the loop."""

    def __init__(
        self,
        address: ServerAddress | None,
        *,
        history_size: int = DEFAULT_HISTORY,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_namespaces: int = DEFAULT_MAX_NAMESPACES,
        keys: ServerKeys | None = None,
        persist: str | os.PathLike[str] | None = None,
        fsync: str = "always",
        compact_after: int = DEFAULT_COMPACT_AFTER,
    ) -> None:
        self._store: Store | None = None
        #: This run's token, and the runs whose history it continues (see ``_protocol``):
        #: ``(run, {namespace: head it started from})``, oldest first, this one last.
        self.run_token = os.urandom(P.RUN_SIZE)
        self.lineage: list[tuple[bytes, dict[str, int]]] = [(self.run_token, {})]
        self.history_size = history_size
        self.max_namespaces = max_namespaces
        self.namespaces: dict[str, Namespace] = {}
        self.stats = {"requests": 0, "errors": 0, "dropped": 0, "events": 0, "rejected": 0}
        self.started = time.time()
        self._ipc_dir: str | None = None
        self._created_ipc: list[str] = []
        ctx = get_context()
        self.router = ctx.socket(zmq.ROUTER)
        self.pub = ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.linger = 0
        self.router.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        # A client that reconnects (after its heartbeats gave up on a cut link) keeps its
        # identity: its new connection replaces the old one, which the server may never
        # see closed.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.rcvhwm = 0
        self.router.sndhwm = 0
        self.pub.sndhwm = 100_000
        self._guard: Guard | None = None
        if keys is not None:  # CURVE on both sockets, checked before they bind
            self._guard = Guard(ctx, keys, self.stats)
            try:
                self._guard.start([("requests", self.router), ("events", self.pub)])
            except BaseException:
                self.close()
                raise
        self.address = self._bind(address)
        if keys is None:
            warn_if_exposed(self.address)
        if persist is not None:
            try:
                self._open_store(persist, fsync, compact_after)
            except BaseException:
                self.close()
                raise

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
                ctx = get_context()
                self.router, self.pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        return ServerAddress(bind_random_tcp(self.router), bind_random_tcp(self.pub))

    def close(self, linger: int = 0) -> None:
        """Close the sockets (keeping unsent replies and events up to ``linger`` ms)."""
        broker = getattr(self, "_broker", None)
        if broker is not None:
            broker.close()
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close(self.namespaces)
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
            ns.history.extend(history)
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
            ns = self.namespaces[name] = Namespace(name, self.history_size)
        return ns

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        global _RUNNING_IN
        _RUNNING_IN = os.getpid()
        router, pub = self.router, self.pub
        # pyzmq's own methods, without the Python layer over them, and plain int flags:
        # the enums and wrappers cost a few microseconds per message
        base = zmq.backend.Socket
        recv_frame, send_frame, get = base.recv, base.send, base.get
        poll_in, events, sndmore = int(zmq.POLLIN), int(zmq.EVENTS), int(zmq.SNDMORE)
        rcvmore = int(zmq.RCVMORE)

        def recv() -> list[bytes]:
            # a ROUTER message always has a frame after the identity
            frames = [recv_frame(router), recv_frame(router)]
            while get(router, rcvmore):
                frames.append(recv_frame(router))
            return frames

        def publish(frames: list[bytes]) -> None:
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                send_frame(pub, frame, sndmore if i < last else 0)

        run = self.run_token
        replies: list[list[bytes]] = []
        syncs: list[list[bytes]] = []
        dirty: list[Namespace] = []
        until = until or (lambda: False)
        store = self._store
        router.rcvtimeo = 200  # wake up now and then to notice signals and idle work
        while not until():
            try:
                frames = recv()
            except zmq.Again:
                if store is not None:
                    store.idle(self.namespaces)
                continue
            for _ in range(MAX_BATCH):
                reply = self.handle(frames, dirty, syncs)
                if reply is not None:
                    replies.append(reply)
                if not get(router, events) & poll_in:  # type: ignore[operator]
                    break
                frames = recv()
            if store is not None:  # durable before anyone hears of it (fsync="always")
                store.commit(self.namespaces)
            # replies first: a writer hears "done" no later than anyone watching it
            for reply in replies:
                last = len(reply) - 1
                for i, frame in enumerate(reply):
                    send_frame(router, frame, sndmore if i < last else 0)
            replies.clear()
            for ns in dirty:
                first = ns.seq - len(ns.outbox) + 1
                publish([ns.topic, P.events_header(first, ns.seq, run), *ns.outbox])
                self.stats["events"] += len(ns.outbox)
                ns.outbox = []
            dirty.clear()
            for marker in syncs:
                publish(marker)
            syncs.clear()

    def handle(
        self, frames: list[bytes], dirty: list[Namespace], syncs: list[list[bytes]]
    ) -> list[bytes] | None:
        """Handle one request; return the reply frames (None: drop the message)."""
        self.stats["requests"] += 1
        if len(frames) != 3:
            self.stats["dropped"] += 1
            log.warning("dropped a request with %d frames (expected 3)", len(frames))
            if len(frames) >= 2:
                rid = P.request_id_of(frames[1])
                if rid is not None:
                    return self._error(frames[0], rid, ProtocolError(
                        f"a request has 2 frames (header, body), got {len(frames) - 1}"))
            return None
        identity, header, body = frames
        try:
            request = P.parse_request(header)
        except ProtocolError as exc:
            rid = P.request_id_of(header)
            self.stats["dropped"] += 1
            if rid is None:
                log.warning("dropped an undecodable request: %s", exc)
                return None
            return self._error(identity, rid, exc)
        try:
            result = self.dispatch(identity, request, body, dirty, syncs)
        except Exception as exc:
            return self._error(identity, request.request_id, exc)
        ns = self.namespaces.get(request.namespace)
        head = 0 if ns is None else ns.seq
        return [identity, P.reply_header(P.OK, request.request_id, head), result]

    def _error(self, identity: bytes, rid: int, exc: BaseException) -> list[bytes]:
        self.stats["errors"] += 1
        return [identity, P.reply_header(P.Status.ERROR, rid), S.dumps_exception(exc)]

    def dispatch(
        self,
        identity: bytes,
        request: P.Request,
        body: bytes,
        dirty: list[Namespace],
        syncs: list[list[bytes]],
    ) -> bytes:
        """Run one request and return the encoded result (raises on failure)."""
        kind = request.kind
        ns = self.namespace(request.namespace)
        if kind == _CALL:
            args = S.loads(body) if body else ()
            if not isinstance(args, tuple):
                raise ProtocolError("CALL arguments must be a tuple")
            if request.method == _SETITEM and len(args) == 2:
                # the most frequent write, as _op_setitem without the _Prepared round trip
                data, (key, value) = ns.data, args
                before = dict.get(data, key, _MISSING)
                if before is _MISSING:
                    self._commit(ns, identity, {key: value}, (), {}, dirty)
                elif changed(before, value):
                    self._commit(ns, identity, {key: value}, (), {key: before}, dirty)
                else:
                    return _NONE
                dict.__setitem__(data, key, value)
                return _NONE
            prepared = _OPS[request.method](ns.data, *args)
            reply = S.dumps(prepared.result)
            if prepared.apply is None:
                return reply
            if not prepared.changes and not prepared.deleted:
                return reply
            self._commit(ns, identity, prepared.changes, prepared.deleted, prepared.old, dirty)
            prepared.apply()
            return reply
        if kind == P.Kind.ATOMIC:
            return self._atomic(ns, identity, body, dirty)
        if kind == P.Kind.PIPELINE:
            return self._pipeline(ns, identity, body, dirty)
        if kind == P.Kind.HEAD:
            return S.dumps((ns.seq, self.run_token))
        if kind == P.Kind.FETCH:
            after, want_snapshot, run = P.parse_fetch_request(body)
            if not self.continues(run, after, ns.name):
                return S.dumps((ns.seq, None, None, self.run_token, False))
            events = ns.replay_after(after)
            snapshot = dict(ns.data) if want_snapshot or events is None else None
            return S.dumps((ns.seq, snapshot, events, self.run_token, True))
        if kind == P.Kind.SNAPSHOT:
            return S.dumps((ns.seq, dict(ns.data)))
        if kind == P.Kind.SYNC:
            syncs.append([P.sync_topic(identity), bytes(body)])
            return S.dumps(None)
        if kind == P.Kind.PING:
            return S.dumps((bytes(body), os.getpid()))
        if kind == P.Kind.TIME:
            return S.dumps(time.time())
        if kind == P.Kind.META:
            return S.dumps(self.meta())
        if kind == P.Kind.SWARM:
            return S.dumps(self.swarm(S.loads(body) if body else {}))
        raise ProtocolError(f"unhandled request kind {kind}")  # pragma: no cover

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

    def meta(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": P.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "history_size": self.history_size,
            "namespaces": sorted(self.namespaces),
            "stats": dict(self.stats),
            "started": self.started,
        }

    def swarm(self, settings: dict[str, Any]) -> tuple[str, str]:
        """Start the swarm broker on first use (:mod:`zproc._swarm`); return its endpoints."""
        from ._swarm import Broker

        broker: Broker | None = getattr(self, "_broker", None)
        if broker is None or not broker.alive:
            if broker is not None:
                broker.close()
            guard = getattr(self, "_guard", None)
            broker = Broker(self.address, None if guard is None else guard.keys, self._ipc_dir)
            self._broker = broker
        broker.configure(settings)
        return broker.endpoints

    def _atomic(self, ns: Namespace, identity: bytes, body: bytes, dirty: list[Namespace]) -> bytes:
        fn, args, kwargs = S.loads(body)
        if getattr(fn, "__zproc_atomic__", False):  # sent by name: the atomic wrapper
            fn = fn.__wrapped__
        data = ns.data
        changes: dict[Any, Any] = {}
        deleted: tuple[Any, ...] = ()
        old: dict[Any, Any] = {}
        data.begin()
        try:
            result = fn(data, *args, **kwargs)
            reply = S.dumps(result)
        except BaseException:
            data.end(commit=False)
            raise
        try:
            changes, deleted, old = data.end(commit=True)
            if changes or deleted:
                event = P.new_event(ns.seq + 1, identity, time.time(), changes, deleted, old)
        except BaseException:
            # the change set could not be encoded: undo by reapplying the old values
            _restore(data, changes, deleted, old)
            raise
        if changes or deleted:
            self._record(ns, event, dirty)
        return reply

    def _pipeline(
        self, ns: Namespace, identity: bytes, body: bytes, dirty: list[Namespace]
    ) -> bytes:
        """Apply a pipeline's operations in order, each on its own (as separate CALLs)."""
        ops = S.loads(body)
        if not isinstance(ops, list):
            raise ProtocolError("PIPELINE body must be a list of operations")
        data = ns.data
        ok, error = int(P.Status.OK), int(P.Status.ERROR)
        out: list[tuple[int, bytes]] = []
        for op in ops:
            try:
                method, args = S.loads(op)
                fn = _OPS.get(method) if type(method) is int else None
                if fn is None or type(args) is not tuple:
                    raise ProtocolError(
                        f"a pipelined operation must be (dict method code, args tuple), got "
                        f"method {method!r}"
                    )
                prepared = fn(data, *args)
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
        ns.history.append(encoded)
        if not ns.outbox:
            dirty.append(ns)
        ns.outbox.append(data)


def _restore(
    data: StateDict, changes: dict[Any, Any], deleted: tuple[Any, ...], old: dict[Any, Any]
) -> None:
    for key in changes:
        if key in old:
            dict.__setitem__(data, key, old[key])
        else:
            dict.pop(data, key, None)
    for key in deleted:
        dict.__setitem__(data, key, old[key])


def _bind_endpoint(sock: zmq.Socket[Any], endpoint: str) -> None:
    from .exceptions import AddressInUseError

    if endpoint.startswith("ipc://") and _ipc_in_use(endpoint[len("ipc://") :]):
        raise AddressInUseError(
            f"{endpoint} is in use: a server is probably already running there. Use another "
            f"address, or connect to that server with zproc.State / zproc.Context"
        )
    try:
        sock.bind(endpoint)
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


# -- process entry point ---------------------------------------------------------------


def serve(
    address: ServerAddress | None,
    report: Any,
    options: dict[str, Any] | None = None,
) -> None:
    """Entry point of a server process: bind, report through ``report`` (a Connection), serve.

    Exits quietly on SIGINT and SIGTERM after closing its sockets and removing the ipc
    files it created.
    """
    stop: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)  # the loop notices within its poll interval

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server: Server | None = None
    try:
        try:
            server = Server(address, **(options or {}))
        except BaseException as exc:
            report.send(("error", S.dumps_exception(exc)))
            report.close()
            return
        report.send(("ok", tuple(server.address)))
        report.close()
        log.info("zproc server %d serving at %s", os.getpid(), server.address)
        server.serve(until=lambda: bool(stop))
    finally:
        if server is not None:
            server.close(linger=SHUTDOWN_LINGER_MS)
            _flush(SHUTDOWN_LINGER_MS / 1000 + 0.5)
    if stop:
        signal.signal(stop[0], signal.SIG_DFL)
        os.kill(os.getpid(), stop[0])




# -- starting a server -------------------------------------------------------------------


def _persist_options(
    persist: str | os.PathLike[str], fsync: str, compact_after: int
) -> dict[str, Any]:
    """Check the durability options in the caller's process (before any server starts)."""
    path = os.path.abspath(os.fspath(persist))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValueError(f"persist={persist!r}: the directory {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"persist={persist!r} is a directory; give a file path")
    if compact_after < 1:
        raise ValueError(f"compact_after must be >= 1, got {compact_after!r}")
    return {"persist": path, "fsync": check_fsync(fsync), "compact_after": compact_after}


def start_server(
    server_address: Iterable[str] | None = None,
    *,
    backend: Callable[..., Any] = multiprocessing.Process,
    timeout: float | None = 10.0,
    history_size: int = DEFAULT_HISTORY,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_namespaces: int = DEFAULT_MAX_NAMESPACES,
    secret_key: SecretKey | None = None,
    persist: str | os.PathLike[str] | None = None,
    fsync: str = "always",
    compact_after: int = DEFAULT_COMPACT_AFTER,
) -> tuple[Any, ServerAddress]:
    """Start a state server in a new process and return ``(process, address)``.

    Returns only once the server has bound both sockets.

    Parameters
    ----------
    server_address
        ``(req_rep_endpoint, pub_sub_endpoint)``; ``None`` picks random endpoints (ipc in
        a private temporary directory on POSIX, tcp on 127.0.0.1 elsewhere).
    backend
        A :class:`multiprocessing.Process`-compatible class (e.g. from a
        ``multiprocessing.get_context("spawn")``). Threads are not supported.
    timeout
        How long to wait for the server to report that it is listening.
    history_size
        How many events per namespace the server keeps for clients to replay.
    max_message_size
        Largest request accepted, in bytes; a peer sending a larger one is disconnected.
    max_namespaces
        Most namespaces the server creates.
    secret_key
        Run CURVE on both sockets and admit only clients with the same ``secret_key``: a
        passphrase (``str``/``bytes``), a :class:`pathlib.Path` to a certificate
        directory, or a ``(server_cert, client_cert)`` pair (see :ref:`across-machines`).
        ``None``: no encryption, no authentication (fine on ipc and loopback).

        .. versionadded:: 1.0
    persist
        Keep the state in this file (an SQLite database: snapshots plus a journal of
        changes). A server started on an existing file continues its state and its
        sequence numbers exactly, so clients and watchers carry on. ``None``: memory only.

        .. versionadded:: 1.0
    fsync
        With ``persist``: ``"always"`` (every acknowledged write is on disk before its
        reply is sent), ``"every second"`` (commits at most once per second: a crash loses
        about the last second) or ``"never"`` (each batch is handed to the OS unsynced: a
        crash of the server loses nothing, one of the machine may lose recent writes).

        .. versionadded:: 1.0
    compact_after
        With ``persist``: journal rows after the last snapshot (counted in the file, so
        across restarts) that trigger a new snapshot and cut the journal down to
        ``history_size`` rows per namespace. A start decodes the rows after the snapshot:
        lower it when changes are large and start time matters.

        .. versionadded:: 1.0

    Raises
    ------
    AddressInUseError
        An endpoint is taken (a server probably runs there already).
    ValueError
        A malformed or unsupported endpoint, certificates that cannot be read, a bad
        ``fsync`` or ``compact_after``, or a ``persist`` path whose directory does not
        exist (raised before any process starts).
    TimeoutError
        The server did not report within ``timeout``; it is terminated.
    ServerError
        The server failed to start for another reason (its traceback is the cause), e.g.
        the ``persist`` file is used by another server or is not a zproc persist file.
    """
    from .exceptions import ServerError, TimeoutError

    address = None if server_address is None else normalize_address(server_address)
    if isinstance(backend, type) and issubclass(backend, threading.Thread):
        raise TypeError("start_server needs a process backend; threads are not supported")
    if history_size < 1:
        raise ValueError(f"history_size must be >= 1, got {history_size}")
    options = {
        "history_size": history_size,
        "max_message_size": max_message_size,
        "max_namespaces": max_namespaces,
        "keys": server_keys(secret_key),
    }
    if persist is not None:
        options.update(_persist_options(persist, fsync, compact_after))
    receiver, sender = multiprocessing.Pipe(duplex=False)
    factory: Callable[..., Any] = backend
    process: Any = factory(target=serve, args=(address, sender, options), name="zproc-server")
    process.start()
    sender.close()
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if receiver.poll(0.05 if remaining is None else min(0.05, remaining)):
                try:
                    message = receiver.recv()
                except EOFError:
                    message = None
                break
            if not process.is_alive():
                message = None
                break
            if deadline is not None and time.monotonic() >= deadline:
                process.terminate()
                process.join(5)
                raise TimeoutError(
                    f"the server process {process.pid} did not report that it listens at "
                    f"{address or 'a random address'} within {timeout} s; it was terminated"
                )
    finally:
        receiver.close()
    if message is None:
        process.join(5)
        raise ServerError(
            f"the server process {process.pid} exited (exit code {process.exitcode}) before "
            f"it reported its address; see its output on stderr"
        )
    if message[0] == "error":
        process.join(5)
        raise S.loads_exception(message[1])
    return process, ServerAddress(*message[1])
