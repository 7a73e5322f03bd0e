"""The server's state, without sockets: the dicts, their change sets and their histories.

* :class:`StateDict`: the dict of one namespace; while an atomic function runs it keeps a
  journal of the keys the function touches, to roll back or to compute the change set.
* the dict operations a ``CALL`` may name (``_OPS``): each one is *validated* first (its
  result and change set computed without touching the dict, :class:`_Prepared`), then
  applied, so a failure leaves the dict as it was.
* :func:`run_atomic`: an atomic function applied with its journal, rolled back if it
  raises, if its result cannot be encoded, or if its change set cannot be sealed.
* :class:`Functions`: the atomic functions clients sent by value, by the digest of their
  pickle, so that later calls name them by digest.
* :class:`Namespace`: one dict, its sequence number and its bounded replay history
  (:meth:`Namespace.replay_after`), whose entries loaded from a persist file stay encoded
  (:class:`Raw`) until a client fetches them (:func:`decode_history`).

The server (:mod:`zproc._server`) owns the sockets and the order of things; this module
owns what a request does to the state.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from typing import Any, TypeVar

from . import _protocol as P
from . import _serialization as S
from .exceptions import ProtocolError, ServerError, UnknownFunctionError

__all__ = [
    "DEFAULT_HISTORY_BYTES",
    "MISSING",
    "Functions",
    "HistoryEntry",
    "Namespace",
    "Raw",
    "StateDict",
    "changed",
    "decode_history",
    "entry_size",
    "run_atomic",
]

log = logging.getLogger("zproc")

#: The value of an absent key (never a value of the dict).
MISSING: Any = object()
_T = TypeVar("_T")


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
            value = dict.get(self, key, MISSING)
            if value is MISSING or type(value) in _IMMUTABLE:
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
                after = dict.get(self, key, MISSING)
                if before is MISSING:
                    if after is not MISSING:
                        changes[key] = after
                    continue
                before = _restored(before)
                if after is MISSING:
                    deleted.append(key)
                    old[key] = before
                elif changed(before, after):
                    changes[key] = after
                    old[key] = before
            return changes, tuple(deleted), old
        for key, before in journal.items():
            if before is MISSING:
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
        before = dict.get(d, key, MISSING)
        if before is MISSING:
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
    before = dict.get(d, key, MISSING)
    if before is not MISSING and not changed(before, value):
        return _READ_ONLY
    return _Prepared(
        None,
        {key: value},
        (),
        None if before is MISSING else {key: before},
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


def run_atomic(
    data: StateDict,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seal: Callable[[dict[Any, Any], tuple[Any, ...], dict[Any, Any]], _T],
) -> tuple[bytes, _T | None]:
    """Run ``fn(data, *args, **kwargs)`` with the dict's journal on.

    Returns the encoded result and ``seal(changes, deleted, old)`` (None when nothing
    changed). The dict is rolled back, and the exception raised, when ``fn`` raises, its
    result cannot be encoded or ``seal`` raises (a change set that cannot be encoded).
    """
    data.begin()
    try:
        reply = S.dumps(fn(data, *args, **kwargs))
    except BaseException:
        data.end(commit=False)
        raise
    changes: dict[Any, Any] = {}
    deleted: tuple[Any, ...] = ()
    old: dict[Any, Any] = {}
    try:
        changes, deleted, old = data.end(commit=True)
        return reply, (seal(changes, deleted, old) if changes or deleted else None)
    except BaseException:
        # undo by reapplying the old values
        _restore(data, changes, deleted, old)
        raise


#: Atomic functions a server keeps by digest (the least recently used one goes first).
DEFAULT_FUNCTIONS = 1024


class Functions:
    """The atomic functions clients sent by value, by the digest of their pickle.

    The digest is computed here from the bytes received, so a client can only call by
    digest a function whose pickle some client (authenticated, when the server has keys)
    sent to this server run.
    """

    def __init__(self, size: int = DEFAULT_FUNCTIONS) -> None:
        if size < 1:
            raise ValueError(f"Functions needs room for at least one function, got {size}")
        self.size = size
        self._by_digest: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def __contains__(self, digest: object) -> bool:
        return digest in self._by_digest

    def define(self, data: bytes | memoryview) -> Callable[..., Any]:
        """The function pickled in ``data``, kept by its digest (unpickled only once)."""
        digest = S.function_digest(data)
        fn = self._by_digest.get(digest)
        if fn is not None:
            self._by_digest.move_to_end(digest)
            return fn
        loaded = S.loads(data)
        if getattr(loaded, "__zproc_atomic__", False):
            loaded = loaded.__wrapped__
        if not callable(loaded):
            raise ProtocolError(f"an atomic call sent {type(loaded).__name__}, not a function")
        self._by_digest[digest] = loaded
        if len(self._by_digest) > self.size:
            self._by_digest.popitem(last=False)
        return self._by_digest[digest]

    def find(self, digest: bytes) -> Callable[..., Any]:
        """The function kept under ``digest``; :class:`UnknownFunctionError` if none is."""
        try:
            fn = self._by_digest[digest]
        except KeyError:
            raise UnknownFunctionError(
                f"this server holds no atomic function with digest {digest.hex()[:16]}... "
                f"(it restarted, or let the function go): send the function itself"
            ) from None
        self._by_digest.move_to_end(digest)
        return fn


# -- history ---------------------------------------------------------------------------


class Raw:
    """A journal row in the replay history, still encoded (decoded when first fetched)."""

    __slots__ = ("frame", "old")

    def __init__(self, frame: bytes, old: bytes) -> None:
        self.frame = frame
        self.old = old


#: An entry of a namespace's replay history: an event and the size of its frame and
#: buffers (:func:`zproc._protocol.frame_size`; the frame itself is not kept), or a
#: :class:`Raw`.
HistoryEntry = tuple[P.Event, int] | Raw
def _decode_row(entry: Raw, after: dict[Any, Any], data: Mapping[Any, Any]) -> P.Event:
    """The event of a journal row, with its whole new values and its old values."""
    event = P.decode_event(entry.frame)
    old = dict(S.loads(entry.old))
    marks = event.old
    if not marks:
        return event._replace(old=old)
    changes = dict(event.changes)
    for key, length in marks.items():
        value = after[key] if key in after else data.get(key, MISSING)
        tail = changes[key]
        if type(value) is not type(tail) or len(value) != length + len(tail):
            raise ServerError(f"the journal row of change {event.seq} does not match {key!r}")
        changes[key] = value[:]
        old[key] = value[:length]
    return event._replace(changes=changes, old=old)


def decode_history(
    history: MutableSequence[HistoryEntry], start: int, data: Mapping[Any, Any]
) -> bool:
    """Decode the :class:`Raw` entries of ``history[start:]`` in place; False if one fails.

    ``history`` ends at the state ``data``. The entries are walked newest first, keeping
    each key's value after the entry at hand: a row that stored only the tail of an
    extended value takes its new value from there, and its old value is that value's
    prefix. An entry that cannot be decoded is dropped with every older one.
    """
    after: dict[Any, Any] = {}  # key -> its value after the entry at hand (else: data)
    for index in range(len(history) - 1, start - 1, -1):
        entry = history[index]
        if type(entry) is Raw:
            try:
                event = _decode_row(entry, after, data)
            except Exception as exc:
                log.warning("zproc: journaled changes up to this one cannot be replayed: %s",
                            exc)
                for _ in range(index + 1):
                    del history[0]
                return False
            history[index] = (event, len(entry.frame))  # the same size, for the byte budget
        else:
            event = entry[0]  # type: ignore[index]
        old = event.old or {}
        for key in event.changes:
            after[key] = old.get(key, MISSING)
        for key in event.deleted:
            after[key] = old.get(key, MISSING)
    return True


# -- one namespace ---------------------------------------------------------------------


#: Most bytes of encoded events one namespace's history keeps, by default.
DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024


def entry_size(entry: HistoryEntry) -> int:
    """What a history entry counts against the byte budget: its encoded event's size,
    out-of-band buffers included."""
    return len(entry.frame) if type(entry) is Raw else entry[1]  # type: ignore[index]


class Namespace:
    """One dict, its sequence counter, its history and the events of the current batch.

    The history keeps at most ``history_size`` events and, of their encoded sizes, at most
    ``history_bytes`` (the newest event always stays); older ones are dropped, and a
    client that missed them gets the whole namespace as one change.
    """

    __slots__ = ("name", "data", "seq", "history", "history_bytes", "budget", "topic",
                 "outbox")

    def __init__(
        self, name: str, history_size: int, history_bytes: int = DEFAULT_HISTORY_BYTES
    ) -> None:
        self.name = name
        self.data = StateDict()
        self.seq = 0
        # the events up to seq, oldest first; those loaded from a persist file stay encoded
        # (Raw, a prefix of the history) until a client fetches them
        self.history: deque[HistoryEntry] = deque(maxlen=history_size)
        self.history_bytes = 0  # the sum of entry_size over the history
        self.budget = history_bytes
        self.topic = P.event_topic(name.encode())
        self.outbox: list[bytes] = []

    def remember(self, entry: HistoryEntry) -> None:
        """Append ``entry`` (the newest event) to the history, within its two limits."""
        history = self.history
        if len(history) == history.maxlen:
            self.history_bytes -= entry_size(history[0])  # the deque drops it
        history.append(entry)
        self.history_bytes += entry_size(entry)
        while self.history_bytes > self.budget and len(history) > 1:
            self.history_bytes -= entry_size(history.popleft())

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
            self.history_bytes = sum(map(entry_size, history))  # some were dropped
            return None
        return [history[i][0] for i in range(start, len(history))]  # type: ignore[index]
