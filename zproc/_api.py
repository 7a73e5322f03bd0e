"""What :class:`zproc.State` and :class:`zproc.AsyncState` share: their settings and
how they are checked, pickled and forked, the iterator watchers' constructors, and the
free-standing :func:`ping`.

The dict operations and the one-shot watchers stay written in each class (one blocks,
the other awaits); everything they compute lives in :mod:`zproc._stream`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Container, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from . import _protocol as P
from ._client import Connection
from ._security import SecretKey, client_keys
from ._stream import Qualifies, _copy, _Cursor, _Ev, _StreamCore
from ._transport import ServerAddress, normalize_address
from ._watch import (
    _any_test,
    _available_test,
    _check_watcher_args,
    _EvTest,
    _falsy_test,
    _fn_test,
    _found,
    _keys_test,
    _none_test,
    _not_none_test,
    _present_equal_test,
    _present_not_equal_test,
    _snapshot_test,
    _SnapTest,
    _truthy_test,
    _watch_item,
    _watch_qualifies,
)
from .exceptions import TimeoutError

__all__ = ["StateBase", "WatchMethods", "WatcherBase", "ping", "stats"]

#: Events kept in a State's local log before the oldest are coalesced.
DEFAULT_MAX_BACKLOG = 100_000
DEFAULT_RCVHWM = 10_000
#: With ``cache=True``: a read applies the events queued for the replica at most this
#: often (seconds) ...
CACHE_POLL = 0.001
#: ... and confirms with the server (one round trip) at least this often that no event
#: was lost on the way.
CACHE_CHECK = 1.0
#: How long a cached read waits for the events of writes it must see before it fetches
#: them from the server instead.
CACHE_WAIT = 0.05

W = TypeVar("W")
_S = TypeVar("_S", bound="StateBase")


class StateBase:
    """The settings of a State or an AsyncState, checked; pickling and :meth:`fork`."""

    _closed: bool

    def __init__(
        self,
        server_address: Iterable[str],
        namespace: str,
        request_timeout: float | None,
        connect_timeout: float | None,
        max_backlog: int,
        rcvhwm: int,
        secret_key: SecretKey | None,
        liveness: float,
        cache: bool = False,
    ) -> None:
        self._address = normalize_address(server_address)
        #: Reads from the replica (``cache=True``; see :class:`zproc.State`).
        self._cache = bool(cache)
        if not liveness > 0:
            raise ValueError(f"liveness must be > 0 seconds, got {liveness!r}")
        self._liveness = liveness
        self._keys = client_keys(secret_key)
        self._secret_key = secret_key
        _check_namespace(namespace)
        if request_timeout is not None and request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0 or None, got {request_timeout!r}")
        self._namespace = namespace
        self._ns = namespace.encode()
        self.request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._max_backlog = max_backlog
        self._rcvhwm = rcvhwm
        self._start_rid: int | None = None
        self._closed = False

    @property
    def server_address(self) -> ServerAddress:
        """The server's address (read-only)."""
        return self._address

    @property
    def secret_key(self) -> SecretKey | None:
        """The ``secret_key`` this State was given (read-only)."""
        return self._secret_key

    @property
    def closed(self) -> bool:
        return self._closed

    def _left_open(self, kind: str, advice: str) -> bool:
        """Whether this State is collected open in the process that opened it (then warn
        with ``advice``: the caller closes it)."""
        conn = getattr(self, "_conn", None)
        if conn is None or getattr(self, "_closed", True) or conn.pid != os.getpid():
            return False
        warnings.warn(
            f"unclosed {kind} for {self._address}; {advice}", ResourceWarning, stacklevel=3
        )
        return True

    def _settings(self) -> dict[str, Any]:
        """The keyword arguments that make a State like this one (``liveness`` last)."""
        return {
            "namespace": self._namespace,
            "request_timeout": self.request_timeout,
            "connect_timeout": self._connect_timeout,
            "secret_key": self._secret_key,
            "cache": self._cache,
            "liveness": self._liveness,
        }

    def _public_class(self) -> type[StateBase]:
        """The class a copy of this State (pickled or forked) is made of."""
        return type(self)

    def __reduce__(self) -> Any:
        settings = self._settings()
        return (
            _rebuild,
            (self._public_class(), tuple(self._address), tuple(settings), *settings.values()),
        )

    def fork(
        self: _S, server_address: Iterable[str] | None = None, *, namespace: str | None = None
    ) -> _S:
        """A new State (or AsyncState) with the same settings, unless overridden."""
        settings = self._settings()
        if namespace is not None:
            settings["namespace"] = namespace
        address = self._address if server_address is None else server_address
        return self._public_class()(address, **settings)  # type: ignore[return-value]


def _rebuild(cls: type[StateBase], address: tuple[str, str], names: tuple[str, ...],
             *values: Any) -> StateBase:
    return cls(address, **dict(zip(names, values, strict=True)))


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
    if "\0" in namespace:
        raise ValueError("namespace must not contain NUL characters")
    if len(namespace.encode()) > P.MAX_NAMESPACE_BYTES:
        raise ValueError(
            f"namespace is {len(namespace.encode())} bytes in utf-8; at most "
            f"{P.MAX_NAMESPACE_BYTES} are allowed"
        )


def _update_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The one argument ``update(*args, **kwargs)`` sends to the server (a State given
    is copied; an AsyncState's copy is awaited by the caller first)."""
    if len(args) > 1:
        raise TypeError(f"update expected at most 1 argument, got {len(args)}")
    merged: Any = {}
    if args:
        merged = args[0]
        if isinstance(merged, StateBase):
            merged = merged.copy()  # type: ignore[attr-defined]
        elif not isinstance(merged, dict):
            merged = (
                {key: merged[key] for key in merged.keys()}
                if hasattr(merged, "keys")
                else list(merged)
            )
    if kwargs:
        merged = dict(merged)
        merged.update(kwargs)
    return merged


class WatcherBase:
    """What :class:`~zproc.StateWatcher` and :class:`~zproc.AsyncStateWatcher` share:
    their options, and the steps of one item before and after its wait."""

    _cursor: _Cursor

    def __init__(self, test: _EvTest, live: bool, timeout: float | None,
                 start_time: float | None, count: int | None, raw: bool) -> None:
        _check_watcher_args(timeout, count)
        self.live = live
        self.timeout = timeout
        self.count = count
        self._test = test
        self._raw = raw
        self._start_time = start_time
        self._yielded = 0

    def _exhausted(self) -> bool:
        return self.count is not None and self._yielded >= self.count

    def _qualifies(self, stream: _StreamCore, head: int, me: Container[bytes]) -> Qualifies:
        """Place the cursor for the next item (a live watcher: at ``head``); its test."""
        cursor = self._cursor
        if self.live:
            cursor.seq, cursor.snap = head, None
        if cursor.snap is None:
            cursor.snap = stream.snapshot_at(cursor.seq)
        return _watch_qualifies(stream, self._test, me)

    def _item(self, ev: _Ev | None) -> Any:
        """What the wait that found ``ev`` yields (None: it timed out)."""
        ev = _found(ev, type(self).__name__, self.timeout)
        self._yielded += 1
        return _watch_item(ev, self._cursor, self._raw)

    def _move_to(self, old: _StreamCore, new: _StreamCore) -> None:
        """Place the cursor on ``new``, the stream that replaces ``old`` for this watcher
        (iterated in another thread, or after fork or a namespace change): at the same
        position if ``new`` still holds the events after it, else at ``new``'s end."""
        base = new.log[0].seq - 1 if new.log else new.seq
        seq = self._cursor.seq
        same = old.namespace == new.namespace and old.run == new.run
        self._cursor = _Cursor(seq if same and base <= seq <= new.seq else new.seq)
        new.cursors.add(self._cursor)

    def _current(self, stream: _StreamCore) -> dict[Any, Any]:
        cursor = self._cursor
        if cursor.snap is None:
            cursor.snap = stream.snapshot_at(cursor.seq)
        return _copy(cursor.snap)  # type: ignore[no-any-return]


class WatchMethods(Generic[W]):
    """The iterator watchers' constructors; ``W`` is the watcher class
    (:class:`~zproc.StateWatcher` for a State, iterated with ``for``;
    :class:`~zproc.AsyncStateWatcher` for an AsyncState, iterated with ``async for``)."""

    def _watcher(self, test: _EvTest, **options: Any) -> W:
        raise NotImplementedError

    def when_change(
        self,
        *keys: Hashable,
        exclude: bool = False,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> W:
        """An iterator over the snapshots after each change of ``keys`` (or of anything) by
        another State."""
        return self._watcher(_keys_test(keys, exclude), live=live, timeout=timeout,
                            start_time=start_time, count=count)

    def when(
        self,
        test_fn: Callable[..., Any],
        *,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> W:
        """An iterator over the snapshots after each change for which ``test_fn`` is true."""
        return self._watcher(_fn_test(test_fn, args, kwargs), live=live,
                            timeout=timeout, start_time=start_time, count=count)

    def when_equal(self, key: Hashable, value: Any, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and equals ``value``."""
        return self._when_key(_present_equal_test(key, value), watcher_kwargs)

    def when_not_equal(self, key: Hashable, value: Any, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and differs from ``value``."""
        return self._when_key(_present_not_equal_test(key, value), watcher_kwargs)

    def when_none(self, key: Hashable, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and is ``None``."""
        return self._when_key(_none_test(key), watcher_kwargs)

    def when_not_none(self, key: Hashable, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and is not ``None``."""
        return self._when_key(_not_none_test(key), watcher_kwargs)

    def when_available(self, key: Hashable, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists."""
        return self._when_key(_available_test(key), watcher_kwargs)

    def when_truthy(self, key: Hashable, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and is truthy."""
        return self._when_key(_truthy_test(key), watcher_kwargs)

    def when_falsy(self, key: Hashable, **watcher_kwargs: Any) -> W:
        """Watcher: snapshots after changes where ``key`` exists and is falsy."""
        return self._when_key(_falsy_test(key), watcher_kwargs)

    def _when_key(self, test: _SnapTest, watcher_kwargs: dict[str, Any]) -> W:
        return self._watcher(_snapshot_test(test), **watcher_kwargs)

    def when_change_raw(
        self,
        *,
        live: bool = False,
        timeout: float | None = None,
        start_time: float | None = None,
        count: int | None = None,
    ) -> W:
        """An iterator over :class:`StateUpdate` values, one per change by another State."""
        return self._watcher(_any_test, live=live, timeout=timeout,
                            start_time=start_time, count=count, raw=True)


def ping(
    server_address: Iterable[str],
    *,
    timeout: float | None = 5.0,
    payload: bytes | None = None,
    secret_key: SecretKey | None = None,
) -> int | None:
    """Ask the server at ``server_address`` for its pid.

    Returns the server's pid when it echoes ``payload`` back (``None`` if the echo
    differs). Raises :class:`zproc.TimeoutError` when no server answers within
    ``timeout`` seconds (``None``: wait indefinitely), and
    :class:`zproc.AuthenticationError` when the server rejects ``secret_key`` (a wrong
    one, or none where the server requires one).
    """
    payload = _ping_payload(payload, timeout)
    echoed, pid = _ask(server_address, P.Kind.PING, payload, timeout, secret_key, "a ping")
    return int(pid) if echoed == payload else None


def stats(
    server_address: Iterable[str],
    *,
    timeout: float | None = 5.0,
    secret_key: SecretKey | None = None,
) -> dict[str, Any]:
    """The figures of the server at ``server_address``, as a dict (see :ref:`stats`).

    Any process may ask, also one that holds no State. Raises like :func:`ping`.

    .. versionadded:: 1.0
    """
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    figures = _ask(server_address, P.Kind.STATS, b"", timeout, secret_key, "a stats request")
    return dict(figures)


def _ask(
    server_address: Iterable[str],
    kind: int,
    body: bytes,
    timeout: float | None,
    secret_key: SecretKey | None,
    what: str,
) -> Any:
    """One request on a connection of its own (no State needed); its decoded reply."""
    address = normalize_address(server_address)
    keys = client_keys(secret_key)
    conn = Connection(address, connect_timeout=None, keys=keys)
    try:
        return conn.request(kind, 0, body, b"default", timeout)
    except TimeoutError:
        hint = conn.security_hint() or (
            "" if keys else " A server with a secret_key does not answer without it."
        )
        raise TimeoutError(
            f"no zproc server answered {what} at {address.req_rep} within {timeout} s; "
            f"check that a server was started there (zproc.start_server) and the address "
            f"is right.{hint}"
        ) from None
    finally:
        conn.close()


def _ping_payload(payload: bytes | None, timeout: float | None) -> bytes:
    """The payload of a ping (random unless given), its arguments checked."""
    if payload is None:
        payload = os.urandom(56)
    elif not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    return payload
