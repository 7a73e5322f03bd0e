"""zproc.atomic: runs on the server, exact rollback, cloudpickle transport, helpers."""

from __future__ import annotations

import math
import multiprocessing
from typing import Any

import pytest
from conftest import kill9, stop

import zproc
from zproc import _protocol as P
from zproc import _serialization as S
from zproc._store import Functions

STEP = 3


def add_step(d: dict[str, Any], key: str, step: int = STEP, *, scale: int = 1) -> float:
    d[key] = d.get(key, 0) + step * scale
    return math.sqrt(d[key])


@zproc.atomic
def incr(d: dict[str, Any]) -> int:
    d["n"] += 1
    return int(d["n"])


def hammer(address: Any, helper: bool, count: int) -> None:
    with zproc.State(address) as st:
        for _ in range(count):
            if helper:
                zproc.increase(st, "n")
            else:
                incr(st)


@pytest.mark.parametrize("helper", [False, True], ids=["atomic", "increase"])
def test_concurrent_increments_are_exact(server: zproc.ServerAddress, helper: bool) -> None:
    with zproc.State(server) as st:
        st["n"] = 0
        procs = [
            multiprocessing.Process(target=hammer, args=(server, helper, 500)) for _ in range(4)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        assert st["n"] == 2000


def test_defaults_closures_globals_and_modules(state: zproc.State) -> None:
    state["x"] = 1
    offset = 10

    @zproc.atomic
    def closure(d: dict[str, Any], factor: int = 2, *, extra: int = 1) -> Any:
        d["x"] = d["x"] * factor + offset + extra + STEP
        return (d["x"], math.floor(2.5))

    assert closure(state) == (1 * 2 + 10 + 1 + 3, 2)
    assert closure(state, 1, extra=0) == (16 + 10 + 3, 2)
    assert zproc.atomic(add_step)(state, "y") == math.sqrt(STEP)
    assert zproc.atomic(add_step)(state, "y", scale=2) == 3.0
    assert closure.__name__ == "closure"


def test_returns_a_copy_and_mutates_in_place(state: zproc.State) -> None:
    state["lst"] = [1]

    @zproc.atomic
    def push(d: dict[str, Any], item: int) -> list[int]:
        d["lst"].append(item)
        return d["lst"]  # type: ignore[no-any-return]

    result = push(state, 2)
    result.append(99)
    assert state["lst"] == [1, 2]


def test_failure_rolls_back_exactly_and_publishes_nothing(server: zproc.ServerAddress) -> None:
    big = {f"k{i}": {"nested": [i, {"deep": i}], "s": "x" * (i % 7)} for i in range(2000)}
    with zproc.State(server) as st, zproc.State(server) as watcher:
        st.update(big)
        before = repr(st.copy())  # order-sensitive, complete for these builtin values
        watcher.go_live()

        @zproc.atomic
        def wreck(d: dict[str, Any]) -> None:
            d["k1"]["nested"].append("mutated in place")
            del d["k2"]
            d.pop("k3")
            d["new"] = 1
            d["k4"] = "replaced"
            d.update({"k5": 5, "other": 6})
            d.setdefault("k6", None)
            d["k0"]["nested"][1]["deep"] = "changed"
            raise ValueError("nope")

        with pytest.raises(ValueError, match="nope") as info:
            wreck(st)
        assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
        assert "wreck" in str(info.value.__cause__)
        assert repr(st.copy()) == before
        with pytest.raises(zproc.TimeoutError):
            watcher.get_when_change(live=False, timeout=0.3)


def test_clear_and_popitem_roll_back_in_order(state: zproc.State) -> None:
    state.update({"a": 1, "b": 2, "c": 3})

    @zproc.atomic
    def wipe(d: dict[str, Any]) -> None:
        d.popitem()
        d.clear()
        d["z"] = 0
        raise RuntimeError

    with pytest.raises(RuntimeError):
        wipe(state)
    assert list(state.items()) == [("a", 1), ("b", 2), ("c", 3)]


def test_unpicklable_result_rolls_back(state: zproc.State) -> None:
    state["a"] = 1

    @zproc.atomic
    def bad(d: dict[str, Any]) -> Any:
        d["a"] = 2
        return lambda: None  # a lambda created on the server cannot be pickled back

    with pytest.raises(Exception) as info:
        bad(state)
    assert isinstance(info.value.__cause__, zproc.RemoteTraceback)
    assert state["a"] == 1


def test_unpicklable_stored_value_rolls_back(state: zproc.State) -> None:
    state["a"] = 1

    @zproc.atomic
    def store_lock(d: dict[str, Any]) -> None:
        import threading

        d["a"] = 2
        d["lock"] = threading.Lock()

    with pytest.raises(TypeError):
        store_lock(state)
    assert state.copy() == {"a": 1}


def test_one_event_on_success_attributed_to_caller(server: zproc.ServerAddress) -> None:
    with zproc.State(server) as st, zproc.State(server) as watcher:
        st["a"] = 0
        watcher.go_live()

        @zproc.atomic
        def several(d: dict[str, Any]) -> None:
            d["a"] = 1
            d["b"] = 2
            d["c"] = 3

        several(st)
        update = watcher.get_raw_update(live=False, timeout=5)
        assert update.before == {"a": 0}
        assert update.after == {"a": 1, "b": 2, "c": 3}
        with pytest.raises(zproc.TimeoutError):
            watcher.get_raw_update(live=False, timeout=0.2)


def test_state_inside_atomic_raises_runtime_error(state: zproc.State) -> None:
    inner = state

    @zproc.atomic
    def nested(d: dict[str, Any]) -> Any:
        return inner["x"]

    with pytest.raises(RuntimeError, match="atomic"):
        nested(state)
    state["x"] = 1  # the server is still serving
    assert state["x"] == 1


def test_helpers(state: zproc.State) -> None:
    state.update(n=10, lst=[])
    assert zproc.increase(state, "n") == 11
    assert zproc.increase(state, "n", 4) == 15
    assert zproc.decrease(state, "n", 5) == 10
    assert zproc.append(state, "lst", "a") == 1
    assert zproc.append(state, "lst", "b") == 2
    assert state["lst"] == ["a", "b"]
    with pytest.raises(KeyError):
        zproc.increase(state, "missing")
    assert "missing" not in state


def test_argument_checks(state: zproc.State) -> None:
    with pytest.raises(TypeError):
        zproc.atomic(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="State"):
        incr({"n": 1})  # type: ignore[arg-type]


# -- functions sent by value, named by digest afterwards ------------------------------------


def _by_value(label: str) -> Any:
    """A closure named ``put`` (it travels by value): ``put(d)`` stores ``label``."""

    def put(d: dict[str, Any]) -> str:
        d["who"] = label
        return label

    return put


def test_a_digest_miss_after_a_restart_sends_the_function_again(
    ipc_address: zproc.ServerAddress,
) -> None:
    server, _ = zproc.start_server(ipc_address)
    put = zproc.atomic(_by_value("first"))
    try:
        with zproc.State(ipc_address, liveness=10.0) as state:
            assert put(state) == "first"  # sent whole: the server keeps it by digest
            form, _ = P.atomic_request(put.__wrapped__, (), {})  # type: ignore[attr-defined]
            assert form == P.AtomicForm.DIGEST  # what the next calls send
            assert put(state) == "first"
            kill9(server)
            server, _ = zproc.start_server(ipc_address)
            # the new server run lacks the digest: it answers "unknown function", and the
            # State sends the function itself, without the caller seeing it
            assert put(state) == "first"
            assert state["who"] == "first"
            assert put(state) == "first"
    finally:
        stop(server)


def test_a_raw_digest_call_to_a_server_without_it_is_refused(state: zproc.State) -> None:
    put = _by_value("x")
    digest, _, _ = S.pickled_function(put) or (b"", b"", False)
    body = S.dumps((digest, (), {}))
    with pytest.raises(zproc.UnknownFunctionError, match="send the function itself"):
        state._request(P.Kind.ATOMIC, P.AtomicForm.DIGEST, body)
    assert "who" not in state


def test_functions_with_the_same_name_do_not_collide(state: zproc.State) -> None:
    one, two = zproc.atomic(_by_value("one")), zproc.atomic(_by_value("two"))
    assert one.__qualname__ == two.__qualname__
    for _ in range(3):
        assert one(state) == "one" and state["who"] == "one"
        assert two(state) == "two" and state["who"] == "two"


def test_a_rebound_closure_variable_is_seen(state: zproc.State) -> None:
    step = 1

    @zproc.atomic
    def add(d: dict[str, Any]) -> int:
        d["n"] = d.get("n", 0) + step
        return int(d["n"])

    assert add(state) == 1
    assert add(state) == 2
    step = 10  # a new value in the closure cell: the function is pickled again
    assert add(state) == 12
    assert step == 10


def test_the_server_keeps_a_bounded_number_of_functions() -> None:
    functions = Functions(size=2)
    pickles = [S.dumps_code(_by_value(str(i))) for i in range(3)]
    digests = [S.function_digest(data) for data in pickles]
    assert len(set(digests)) == 3
    functions.define(pickles[0])
    functions.define(pickles[1])
    assert functions.find(digests[0])({}) == "0"  # used last: kept
    functions.define(pickles[2])  # evicts the least recently used, "1"
    assert len(functions) == 2
    assert digests[1] not in functions
    with pytest.raises(zproc.UnknownFunctionError):
        functions.find(digests[1])
    assert functions.find(digests[0])({}) == "0"
    assert functions.find(digests[2])({}) == "2"
    with pytest.raises(ValueError, match="at least one"):
        Functions(size=0)


def test_the_digest_is_of_the_bytes_received() -> None:
    """A pickle is kept under the digest of its own bytes, whatever a client claims."""
    functions = Functions()
    data = S.dumps_code(_by_value("z"))
    functions.define(data)
    assert S.function_digest(data) in functions
    assert functions.find(S.function_digest(data))({}) == "z"
    with pytest.raises(zproc.ProtocolError, match="not a function"):
        functions.define(S.dumps(42))
