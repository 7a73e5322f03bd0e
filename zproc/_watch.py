"""The watchers' logic without I/O, shared by State (zproc.state, zproc._api) and
AsyncState (zproc._async): the tests behind ``get_when_*``/``when_*``, their starting
cursors and what they return, over the replica and event log of
:class:`zproc._stream._StreamCore`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable, Mapping
from typing import Any

from ._store import MISSING as _MISSING
from ._stream import Qualifies, StateUpdate, _copy, _Cursor, _Ev, _StreamCore, _timeout_error


def _update_of(stream: _StreamCore, ev: _Ev) -> StateUpdate:
    return StateUpdate(
        _copy(stream.snapshot_at(ev.first - 1)),
        _copy(stream.snapshot_at(ev.seq)),
        ev.timestamp,
        False,
    )

_SnapTest = Callable[[dict[Any, Any]], Any]
_EvTest = Callable[[_Ev, dict[Any, Any]], Any]


def _foreign_test(me: Container[bytes]) -> Qualifies:
    """Qualifies every event not caused by the State whose identities are ``me`` (one
    per thread that used it)."""
    return lambda ev, _cursor: ev.origin not in me


def _change_watch(
    stream: _StreamCore, head: int, me: Container[bytes], keys: tuple[Hashable, ...],
    exclude: bool,
    live: bool,
) -> tuple[Qualifies, _Cursor]:
    """The event test and the starting cursor of ``get_when_change``."""
    keyset = frozenset(keys)
    whole = not keys or exclude

    def qualifies(ev: _Ev, _cursor: _Cursor) -> bool:
        if ev.origin in me:
            return False
        if not keyset:
            return True
        # set operations in C: a key of ``keys`` changed (exclude: a key outside them)
        if exclude:
            return not keyset.issuperset(ev.undo)
        return not keyset.isdisjoint(ev.undo)

    if live:
        # from the head the call saw: later events already drained still count
        cursor = _Cursor(head, stream.snapshot_at(head) if whole else None)
    else:
        cursor = stream.buffer
        if whole and cursor.snap is None:
            cursor.snap = stream.snapshot_at(cursor.seq)
    return qualifies, cursor


def _change_result(
    stream: _StreamCore, ev: _Ev, cursor: _Cursor, keys: tuple[Hashable, ...], exclude: bool
) -> Any:
    """What ``get_when_change`` returns for the event that woke it."""
    if not keys or exclude:
        return _copy(cursor.snap)
    if len(keys) == 1:
        return _copy(stream.value_at(ev.seq, keys[0]))
    return [_copy(stream.value_at(ev.seq, key)) for key in keys]


def _level_watch(
    stream: _StreamCore, test: _SnapTest, live: bool, me: Container[bytes]
) -> tuple[Qualifies, _Cursor]:
    """The event test and cursor of a level-triggered wait whose first check failed."""
    cursor = _Cursor(stream.seq, dict(stream.replica))
    if not live:
        # buffered events older than the snapshot are consumed without evaluation
        stream.buffer.seq = max(stream.buffer.seq, stream.seq)

    def qualifies(ev: _Ev, cur: _Cursor) -> bool:
        return ev.origin not in me and bool(test(cur.snap))  # type: ignore[arg-type]

    return qualifies, cursor


def _found(ev: _Ev | None, what: str, timeout: float | None) -> _Ev:
    """The event a watcher call waited for (a find that returned None timed out)."""
    if ev is None:
        raise _timeout_error(what, timeout)
    return ev


def _get_copy(key: Hashable) -> Callable[[dict[Any, Any]], Any]:
    """What a one-shot watcher on ``key`` returns: a copy of its value in the snapshot."""
    return lambda snap: _copy(snap.get(key))


def _fn_snapshot_test(test_fn: Callable[[dict[Any, Any]], Any]) -> _SnapTest:
    """The test of ``get_when``: ``test_fn`` on a copy of the snapshot's dict."""
    return lambda snap: test_fn(dict(snap))


# Tests of the one-shot watchers: 0.9.1 rules, a missing key counts as None.
def _equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: s.get(key) == value


def _not_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: s.get(key) != value


# Tests that the one-shot and the iterator watchers share: a missing key never matches.
def _none_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and s[key] is None


def _not_none_test(key: Hashable) -> _SnapTest:
    return lambda s: s.get(key) is not None


def _available_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s


# Tests of the iterator watchers only.
def _present_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: key in s and s[key] == value


def _present_not_equal_test(key: Hashable, value: Any) -> _SnapTest:
    return lambda s: key in s and s[key] != value


def _truthy_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and bool(s[key])


def _falsy_test(key: Hashable) -> _SnapTest:
    return lambda s: key in s and not s[key]


def _snapshot_test(test: _SnapTest) -> _EvTest:
    """An iterator watcher's test from a test of the snapshot."""
    return lambda _ev, snap: test(snap)


def _keys_test(keys: tuple[Hashable, ...], exclude: bool) -> _EvTest:
    """The test of ``when_change``: any change, or a change of (or outside) ``keys``."""
    keyset = frozenset(keys)
    return lambda ev, _snap: not keyset or any((key in keyset) != exclude for key in ev.keys())


def _fn_test(
    test_fn: Callable[..., Any], args: Iterable[Any] | None, kwargs: Mapping[str, Any] | None
) -> _EvTest:
    """The test of ``when``: ``test_fn(snapshot_copy, *args, **kwargs)``."""
    a, kw = tuple(args or ()), dict(kwargs or {})
    return lambda _ev, snap: test_fn(dict(snap), *a, **kw)


def _any_test(_ev: _Ev, _snap: dict[Any, Any]) -> bool:
    return True


def _check_watcher_args(timeout: float | None, count: int | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count!r}")


def _watch_start(stream: _StreamCore, start_time: float | None) -> int:
    """Where a new iterator watcher starts: the server's head when the call began, or at
    the first logged event from ``start_time`` (server clock) on."""
    start = stream.head
    if start_time is not None:
        start = stream.buffer.seq
        for ev in stream.log:
            if ev.timestamp >= start_time:
                break
            start = ev.seq
    return start


def _watch_qualifies(stream: _StreamCore, test: _EvTest, me: Container[bytes]) -> Qualifies:
    """An iterator watcher's event test: another State's change that passes ``test``."""

    def qualifies(ev: _Ev, cur: _Cursor) -> bool:
        if ev.origin in me:
            return False
        if cur.snap is None:  # invalidated by coalescing
            cur.snap = stream.snapshot_at(cur.seq)
        return bool(test(ev, cur.snap))

    return qualifies


def _watch_item(ev: _Ev, cursor: _Cursor, raw: bool) -> Any:
    """What an iterator watcher yields for ``ev``: the snapshot, or a StateUpdate."""
    after = _copy(cursor.snap)
    if not raw:
        return after
    before = dict(after)
    for key, old in ev.undo.items():
        if old is _MISSING:
            before.pop(key, None)
        else:
            before[key] = _copy(old)
    return StateUpdate(before, after, ev.timestamp, False)


