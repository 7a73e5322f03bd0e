"""State is a collections.abc.MutableMapping: isinstance, the ``|`` operators, ``==``
against any mapping, snapshot views."""

from __future__ import annotations

import collections
import types
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import pytest

import zproc


class Plain(Mapping[str, Any]):
    """A mapping that is no dict."""

    def __init__(self, **items: Any) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@pytest.fixture(params=[False, True], ids=["direct", "cached"])
def st(server: zproc.ServerAddress, request: pytest.FixtureRequest) -> Iterator[zproc.State]:
    with zproc.State(server, request_timeout=20, cache=request.param) as state:
        yield state


def test_a_state_is_a_mutable_mapping(st: zproc.State) -> None:
    assert isinstance(st, MutableMapping)
    assert isinstance(st, Mapping)
    assert issubclass(zproc.State, MutableMapping)

    def takes_mapping(m: Mapping[Any, Any]) -> dict[Any, Any]:
        if not isinstance(m, Mapping):
            raise TypeError("not a mapping")
        return {key: m[key] for key in m}

    st.update(a=1, b=2)
    assert takes_mapping(st) == {"a": 1, "b": 2}
    assert dict(collections.ChainMap({"c": 3}, st)) == {"a": 1, "b": 2, "c": 3}


def test_or_returns_a_plain_dict(st: zproc.State, server: zproc.ServerAddress) -> None:
    st.update(a=1, b=2)
    merged = st | {"b": 20, "c": 3}
    assert type(merged) is dict and merged == {"a": 1, "b": 20, "c": 3}
    assert st.copy() == {"a": 1, "b": 2}  # unchanged
    left = {"b": 20, "z": 0} | st
    assert type(left) is dict and left == {"b": 2, "z": 0, "a": 1}
    assert st | Plain(d=4) == {"a": 1, "b": 2, "d": 4}
    with zproc.State(server, namespace="other") as other:
        other["o"] = 1
        assert st | other == {"a": 1, "b": 2, "o": 1}
    with pytest.raises(TypeError):
        st | 5  # type: ignore[operator]
    with pytest.raises(TypeError):
        [("x", 1)] | st  # type: ignore[operator]


def test_ior_is_one_atomic_update(st: zproc.State, server: zproc.ServerAddress) -> None:
    with zproc.State(server, request_timeout=20) as watcher:
        updates = watcher.when_change_raw(timeout=10)
        before = st
        st |= {"a": 1, "b": 2}
        assert st is before
        update = next(updates)  # one change with both keys: one update
        assert update.after == {"a": 1, "b": 2} and update.before == {}
        st |= [("c", 3)]  # like dict |=, pairs too
        assert next(updates).after == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(TypeError):
        st |= 5  # type: ignore[arg-type]


def test_equal_to_any_mapping(st: zproc.State) -> None:
    st.update(a=1, b=2)
    assert st == {"a": 1, "b": 2}
    assert st == collections.OrderedDict(b=2, a=1)
    assert st == types.MappingProxyType({"a": 1, "b": 2})
    assert st == Plain(a=1, b=2)
    assert st != Plain(a=1)
    assert not st != Plain(a=1, b=2)
    assert st != {"a": 1}
    assert st != [("a", 1), ("b", 2)]  # not a mapping
    assert not st == 5  # noqa: SIM201


def test_views_are_snapshots(st: zproc.State) -> None:
    st.update(a=1, b=2)
    keys, values, items = st.keys(), st.values(), st.items()
    st["c"] = 3
    assert set(keys) == {"a", "b"}
    assert sorted(values) == [1, 2]
    assert dict(items) == {"a": 1, "b": 2}
    assert set(st.keys()) == {"a", "b", "c"}
