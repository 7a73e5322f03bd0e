"""The server's state core (zproc/_store.py): dict operations, change sets, atomic
rollback and the replay history. No processes, no sockets."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from zproc import _protocol as P
from zproc import _serialization as S
from zproc import _store
from zproc._store import (
    _OPS,
    MISSING,
    Namespace,
    Raw,
    StateDict,
    changed,
    entry_size,
    run_atomic,
)


def _call(d: StateDict, method: P.Method, *args: Any) -> _store._Prepared:
    return _OPS[method](d, *args)


def test_changed() -> None:
    assert not changed(1, 1)
    assert not changed(1, 1.0)
    assert changed(1, 2)
    assert changed(MISSING, 1)

    class Odd:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparison")

    assert changed(Odd(), Odd())  # a failing comparison counts as a change


def test_every_method_has_an_operation() -> None:
    assert set(_OPS) == {int(m) for m in P.Method}


def test_an_operation_is_validated_before_it_is_applied() -> None:
    d = StateDict(a=1, b=2)
    prepared = _call(d, P.Method.SETITEM, "a", 10)
    assert prepared.changes == {"a": 10} and prepared.old == {"a": 1}
    assert d == {"a": 1, "b": 2}  # nothing applied yet
    assert prepared.apply is not None
    prepared.apply()
    assert d == {"a": 10, "b": 2}


def test_an_unchanged_write_is_read_only() -> None:
    d = StateDict(a=1)
    assert _call(d, P.Method.SETITEM, "a", 1).apply is None
    assert _call(d, P.Method.UPDATE, {"a": 1}).changes == {}
    assert _call(StateDict(), P.Method.CLEAR).apply is None


def test_delete_pop_popitem_change_sets() -> None:
    d = StateDict(a=1, b=2)
    pop = _call(d, P.Method.POP, "a")
    assert (pop.result, pop.deleted, pop.old) == (1, ("a",), {"a": 1})
    assert _call(d, P.Method.POP, "zz", 5).result == 5
    with pytest.raises(KeyError):
        _call(d, P.Method.POP, "zz")
    popitem = _call(d, P.Method.POPITEM)
    assert popitem.result == ("b", 2) and popitem.deleted == ("b",)
    with pytest.raises(KeyError):
        _call(StateDict(), P.Method.POPITEM)


def test_set_replaces_the_whole_dict() -> None:
    d = StateDict(a=1, b=2)
    prepared = _call(d, P.Method.SET, {"b": 3, "c": 4})
    assert prepared.changes == {"b": 3, "c": 4}
    assert prepared.deleted == ("a",)
    assert prepared.old == {"a": 1, "b": 2}
    assert prepared.apply is not None
    prepared.apply()
    assert d == {"b": 3, "c": 4}


def test_a_failing_update_applies_nothing() -> None:
    d = StateDict(a=1)
    with pytest.raises(TypeError):
        _call(d, P.Method.UPDATE, {"a": 2}, {"b": 3})  # two positional arguments
    assert d == {"a": 1}


def _seal(changes: dict[Any, Any], deleted: tuple[Any, ...], old: dict[Any, Any]) -> Any:
    return changes, deleted, old


def test_atomic_change_set() -> None:
    d = StateDict(a=[1], b=2, c=3)

    def fn(state: StateDict, n: int) -> str:
        state["a"].append(n)  # in place, through d[key]
        del state["b"]
        state["new"] = n
        state["c"] = 3  # unchanged
        return "done"

    reply, sealed = run_atomic(d, fn, (5,), {}, _seal)
    assert S.loads(reply) == "done"
    assert sealed == ({"a": [1, 5], "new": 5}, ("b",), {"a": [1], "b": 2})
    assert d == {"a": [1, 5], "c": 3, "new": 5}


def test_atomic_without_changes_seals_nothing() -> None:
    d = StateDict(a=1)
    reply, sealed = run_atomic(d, lambda state: state["a"], (), {}, _seal)
    assert S.loads(reply) == 1 and sealed is None


@pytest.mark.parametrize("failure", ["raises", "unpicklable result", "seal fails"])
def test_atomic_rollback(failure: str) -> None:
    d = StateDict(a=[1], b=2, c=3)
    before = S.loads(S.dumps(list(d.items())))

    def fn(state: StateDict) -> Any:
        state["a"].append(2)
        state.pop("b")
        state.clear()
        state["z"] = 1
        if failure == "raises":
            raise ValueError("boom")
        return (lambda: None) if failure == "unpicklable result" else None

    def seal(*_: Any) -> Any:
        raise RuntimeError("cannot encode")

    with pytest.raises((ValueError, RuntimeError, TypeError, AttributeError, pickle.PicklingError)):
        run_atomic(d, fn, (), {}, seal)
    assert list(d.items()) == before  # values and order
    assert d._journal is None


def _frame(seq: int, changes: dict[Any, Any]) -> bytes:
    return P.new_event(seq, b"", 0.0, changes, (), {})[1]


def _event(seq: int, changes: dict[Any, Any], old: dict[Any, Any]) -> tuple[P.Event, int]:
    """A history entry: the event and the size of its frame."""
    event, frame = P.new_event(seq, b"", 0.0, changes, (), old)
    return event, P.frame_size(frame)


def test_replay_after() -> None:
    ns = Namespace("default", history_size=3)
    for seq in range(1, 6):
        ns.history.append(_event(seq, {"k": seq}, {"k": seq - 1}))
        ns.seq = seq
    dict.update(ns.data, k=5)
    assert ns.replay_after(5) == []
    assert [e.seq for e in ns.replay_after(3) or []] == [4, 5]
    assert [e.seq for e in ns.replay_after(2) or []] == [3, 4, 5]
    assert ns.replay_after(1) is None  # evicted from the bounded history


def test_replay_after_decodes_raw_entries() -> None:
    ns = Namespace("default", history_size=10)
    for seq in (1, 2):
        ns.history.append(Raw(_frame(seq, {"k": seq}), S.dumps({} if seq == 1 else {"k": 1})))
    ns.seq = 2
    dict.update(ns.data, k=2)
    events = ns.replay_after(0)
    assert events is not None
    assert [(e.seq, e.changes, e.old) for e in events] == [(1, {"k": 1}, {}),
                                                           (2, {"k": 2}, {"k": 1})]
    assert all(type(entry) is tuple for entry in ns.history)  # decoded in place


def test_the_history_keeps_at_most_its_byte_budget() -> None:
    ns = Namespace("default", history_size=100, history_bytes=10_000)
    for seq in range(1, 21):
        entry = _event(seq, {"k": "x" * 1000}, {})
        ns.remember(entry)
        ns.seq = seq
    sizes = [size for _, size in ns.history]  # type: ignore[misc]
    assert ns.history_bytes == sum(sizes) <= 10_000
    assert 5 <= len(ns.history) < 20  # the oldest were dropped, the newest kept
    assert [e.seq for e in ns.replay_after(20 - len(ns.history)) or []] == list(
        range(21 - len(ns.history), 21))
    assert ns.replay_after(1) is None  # dropped: the client gets the combined change
    big = _event(21, {"k": "y" * 50_000}, {})  # alone over the budget: still kept
    ns.remember(big)
    assert list(ns.history) == [big] and ns.history_bytes == big[1]


def test_the_byte_count_follows_the_count_limit_and_decoding() -> None:
    ns = Namespace("default", history_size=3)
    for seq in (1, 2):
        ns.remember(Raw(_frame(seq, {"k": seq}), S.dumps({} if seq == 1 else {"k": 1})))
    ns.seq = 2
    dict.update(ns.data, k=2)
    for seq in (3, 4):
        ns.remember(_event(seq, {"k": seq}, {"k": seq - 1}))
        ns.seq = seq
    dict.update(ns.data, k=4)
    assert len(ns.history) == 3  # the count limit dropped the first
    assert ns.replay_after(1) is not None  # decodes the Raw entry in place
    assert ns.history_bytes == sum(entry_size(entry) for entry in ns.history)
