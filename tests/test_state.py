"""State's dict API against a plain dict, errors, copies, lifecycle, pickling and fork.

Real server processes and real sockets.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zproc

with warnings.catch_warnings():
    # hypothesis imports this (and libcst) to report a failing example; under
    # filterwarnings=error a deprecation warning from libcst's dependencies would turn the
    # report of a failure into a pytest INTERNALERROR.
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

# -- the dict API against a plain dict (hypothesis) --------------------------------------

KEYS = st.one_of(
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(0, 3),
    st.just(("t", 1)),
    st.just(frozenset({1})),
)
UNHASHABLE = st.sampled_from([[1], {"x": 1}, {1}])
ANY_KEY = st.one_of(KEYS, KEYS, KEYS, UNHASHABLE)  # mostly hashable
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
              st.text(max_size=4), st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=2), inner, max_size=3),
                            st.tuples(inner, inner)),
    max_leaves=5,
)
PAIRS = st.lists(st.tuples(KEYS, VALUES), max_size=4)
BAD_PAIRS = st.one_of(
    # a good pair first, then a broken one: nothing may be applied
    st.tuples(st.tuples(KEYS, VALUES), st.sampled_from([(1,), (1, 2, 3), 5, "abc", ([1], 2)]))
    .map(lambda t: [t[0], t[1]]),
    st.just([("x", 1), "z"]),
)
OTHER = st.one_of(st.dictionaries(KEYS, VALUES, max_size=4), st.integers(), st.none(),
                  st.lists(st.integers(), max_size=2))

OPERATIONS = st.one_of(
    st.tuples(st.just("getitem"), ANY_KEY),
    st.tuples(st.just("setitem"), ANY_KEY, VALUES),
    st.tuples(st.just("setitem"), KEYS, VALUES),
    st.tuples(st.just("setitem"), KEYS, VALUES),
    st.tuples(st.just("delitem"), ANY_KEY),
    st.tuples(st.just("contains"), ANY_KEY),
    st.tuples(st.just("len")),
    st.tuples(st.just("iter")),
    st.tuples(st.just("bool")),
    st.tuples(st.just("eq"), OTHER),
    st.tuples(st.just("ne"), OTHER),
    st.tuples(st.just("eq_self")),
    st.tuples(st.just("clear")),
    st.tuples(st.just("get"), ANY_KEY),
    st.tuples(st.just("get_default"), KEYS, VALUES),
    st.tuples(st.just("pop"), ANY_KEY),
    st.tuples(st.just("pop_default"), KEYS, VALUES),
    st.tuples(st.just("popitem")),
    st.tuples(st.just("popitem")),
    st.tuples(st.just("setdefault"), ANY_KEY),
    st.tuples(st.just("setdefault_value"), KEYS, VALUES),
    st.tuples(st.just("update_mapping"), st.dictionaries(KEYS, VALUES, max_size=4)),
    st.tuples(st.just("update_pairs"), PAIRS),
    st.tuples(st.just("update_kwargs"), st.dictionaries(st.sampled_from(["a", "b", "k"]),
                                                        VALUES, max_size=3)),
    st.tuples(st.just("update_both"), PAIRS, st.dictionaries(st.sampled_from(["a", "z"]),
                                                             VALUES, max_size=2)),
    st.tuples(st.just("update_bad"), BAD_PAIRS),
    st.tuples(st.just("update_unhashable"), st.lists(st.tuples(UNHASHABLE, VALUES),
                                                     min_size=1, max_size=2)),
    st.tuples(st.just("fromkeys"), st.lists(KEYS, max_size=4), VALUES),
    st.tuples(st.just("fromkeys_unhashable"), st.lists(UNHASHABLE, min_size=1, max_size=2)),
    st.tuples(st.just("copy")),
    st.tuples(st.just("keys")),
    st.tuples(st.just("values")),
    st.tuples(st.just("items")),
    st.tuples(st.just("repr")),
)


def apply(target: Any, op: tuple[Any, ...], *, is_state: bool) -> Any:
    """Apply ``op`` to a State or to the model dict and return a comparable result."""
    name, *args = op
    if name == "getitem":
        return target[args[0]]
    if name == "setitem":
        target[args[0]] = args[1]
        return None
    if name == "delitem":
        del target[args[0]]
        return None
    if name == "contains":
        return args[0] in target
    if name == "len":
        return len(target)
    if name == "iter":
        return list(iter(target))
    if name == "bool":
        return bool(target)
    if name == "eq":
        return target == args[0]
    if name == "ne":
        return target != args[0]
    if name == "eq_self":
        return target == target  # noqa: PLR0124
    if name == "clear":
        return target.clear()
    if name == "get":
        return target.get(args[0])
    if name == "get_default":
        return target.get(args[0], args[1])
    if name == "pop":
        if not is_state:
            hash(args[0])  # CPython's {}.pop([1]) skips hashing when empty: KeyError
        return target.pop(args[0])
    if name == "pop_default":
        return target.pop(args[0], args[1])
    if name == "popitem":
        return target.popitem()
    if name == "setdefault":
        return target.setdefault(args[0])
    if name == "setdefault_value":
        return target.setdefault(args[0], args[1])
    if name in ("update_mapping", "update_pairs", "update_bad", "update_unhashable"):
        if is_state:
            return target.update(args[0])
        return target.update(dict(args[0]))  # the spec: all or nothing
    if name == "update_kwargs":
        return target.update(**args[0])
    if name == "update_both":
        if is_state:
            return target.update(args[0], **args[1])
        return target.update(dict(args[0], **args[1]))
    if name == "fromkeys" or name == "fromkeys_unhashable":
        return target.fromkeys(args[0], *args[1:])
    if name == "copy":
        return target.copy()
    if name in ("keys", "values", "items"):
        view = getattr(target, name)()
        return type(view).__name__, list(view)
    if name == "repr":
        return repr(target) if is_state else f"<State value: {target!r}>"
    raise AssertionError(name)


def run_against_dict(state: zproc.State, ops: list[tuple[Any, ...]]) -> None:
    state.clear()
    model: dict[Any, Any] = {}
    for op in ops:
        try:
            expected: Any = ("ok", apply(model, op, is_state=False))
        except Exception as exc:
            expected = ("raise", type(exc))
        try:
            got: Any = ("ok", apply(state, op, is_state=True))
        except Exception as exc:
            got = ("raise", type(exc))
            if expected[0] == "raise" and isinstance(exc, expected[1]):
                # raised by the server: the original type, with the remote traceback
                assert isinstance(exc.__cause__, zproc.RemoteTraceback), (op, exc)
        assert got == expected, f"{op}: State gave {got}, dict gave {expected}"
        if got[0] == "ok" and isinstance(got[1], bool):
            assert type(got[1]) is bool
    assert state.copy() == model
    assert list(state) == list(model)  # same insertion order (popitem depends on it)
    assert len(state) == len(model)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPERATIONS, max_size=25))
def test_dict_api_matches_a_plain_dict(state: zproc.State, ops: list[tuple[Any, ...]]) -> None:
    run_against_dict(state, ops)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(start=st.dictionaries(KEYS, VALUES, max_size=6),
       ops=st.lists(st.one_of(
           st.tuples(st.just("popitem")), st.tuples(st.just("delitem"), KEYS),
           st.tuples(st.just("setitem"), KEYS, VALUES), st.tuples(st.just("iter")),
           st.tuples(st.just("update_pairs"), PAIRS), st.tuples(st.just("items"))),
           max_size=20))
def test_insertion_order_matches_a_plain_dict(
    state: zproc.State, start: dict[Any, Any], ops: list[tuple[Any, ...]]
) -> None:
    run_against_dict(state, [("update_mapping", start), *ops])


# -- errors ---------------------------------------------------------------------------------


def _remote(exc: BaseException) -> str:
    cause = exc.__cause__
    assert isinstance(cause, zproc.RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.tb
    return cause.tb


def test_missing_key(state: zproc.State) -> None:
    with pytest.raises(KeyError) as info:
        state["missing"]
    assert info.value.args == ("missing",)
    assert "KeyError" in _remote(info.value)
    with pytest.raises(KeyError):
        del state["missing"]
    with pytest.raises(KeyError):
        state.pop("missing")
    assert state.pop("missing", 5) == 5
    assert state.pop("missing", None) is None


def test_pop_and_popitem_on_empty(state: zproc.State) -> None:
    with pytest.raises(KeyError) as info:
        state.pop("a")
    _remote(info.value)
    with pytest.raises(KeyError) as info:
        state.popitem()
    assert "empty" in str(info.value)
    _remote(info.value)
    state.update(a=1, b=2)
    assert state.popitem() == ("b", 2)
    assert isinstance(state.popitem(), tuple)
    assert state.copy() == {}


def test_bad_arguments_are_type_errors(state: zproc.State) -> None:
    with pytest.raises(TypeError):
        state[[1]] = 1
    with pytest.raises(TypeError):
        state.pop("a", 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        state.update({}, {})  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        state.update(5)  # type: ignore[call-overload]
    assert state.copy() == {}


@pytest.mark.parametrize(
    "bad",
    [[("x", 1), ("y",)], [("x", 1), "abc"], [("x", 1), 5], [("x", 1), ([1], 2)],
     [("x", 1), (1, 2, 3)]],
    ids=["short-pair", "str-pair", "int", "unhashable", "long-pair"],
)
def test_failed_update_leaves_the_state_unchanged(state: zproc.State, bad: Any) -> None:
    state.update({"a": 1, "x": 0})
    with zproc.State(state.server_address, request_timeout=10) as other:
        other.go_live()
        with pytest.raises((ValueError, TypeError)) as info:
            state.update(bad)
        _remote(info.value)
        assert state.copy() == {"a": 1, "x": 0}
        with pytest.raises((ValueError, TypeError)):
            state.update(bad, extra=1)
        assert state.copy() == {"a": 1, "x": 0}
        # no event was published for the failed updates
        with pytest.raises(zproc.TimeoutError):
            other.get_when_change(live=False, timeout=0.2)


def test_update_forms(state: zproc.State) -> None:
    state.update({"a": 1})
    state.update([("b", 2), ("b", 3)])
    state.update(c=4)
    state.update({"d": 5}, e=6, a=0)
    state.update((("f", 7),))
    state.update(iter([("g", 8)]))
    state.update()
    with zproc.State(state.server_address) as other:
        other.update(state)  # a State is a mapping too
        assert other.copy() == {"a": 0, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7, "g": 8}


# -- values are copies; views come from one snapshot ---------------------------------------


def test_values_read_are_copies(state: zproc.State) -> None:
    state["lst"] = [1, 2]
    state["nested"] = {"inner": [1]}
    state["lst"].append(3)
    state.get("lst").append(4)
    state.copy()["nested"]["inner"].append(2)
    state.setdefault("lst", []).append(5)
    list(state.values())[0].append(6)
    dict(state.items())["nested"]["inner"].append(3)
    assert state.copy() == {"lst": [1, 2], "nested": {"inner": [1]}}
    local = [9]
    state["local"] = local
    local.append(10)  # the server stored a copy
    assert state["local"] == [9]


def test_views_are_snapshots(state: zproc.State) -> None:
    state.update(a=1, b=2)
    keys, values, items = state.keys(), state.values(), state.items()
    assert type(keys) is type({}.keys())
    assert type(values) is type({}.values())
    assert type(items) is type({}.items())
    iterator = iter(state)
    state["c"] = 3
    del state["a"]
    assert list(keys) == ["a", "b"]
    assert list(values) == [1, 2]
    assert list(items) == [("a", 1), ("b", 2)]
    assert list(iterator) == ["a", "b"]
    assert "a" in keys and ("b", 2) in items


def test_items_come_from_one_snapshot(state: zproc.State) -> None:
    """A concurrent writer keeps a + b == 0; every view must see that invariant."""
    state.update(a=0, b=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with zproc.State(state.server_address, request_timeout=10) as other:
                i = 0
                while not stop.is_set():
                    i += 1
                    other.update(a=i, b=-i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        seen = set()
        while time.monotonic() < deadline:
            snap = dict(state.items())
            assert snap["a"] + snap["b"] == 0, snap
            values = list(state.values())
            assert values[0] + values[1] == 0, values
            seen.add(snap["a"])
    finally:
        stop.set()
        thread.join(15)
    assert not errors, errors
    assert len(seen) > 1  # the writer did run concurrently


def test_fromkeys_does_not_touch_the_state(state: zproc.State) -> None:
    state["a"] = 1
    assert state.fromkeys(["x", "y"]) == {"x": None, "y": None}
    assert state.fromkeys("ab", 0) == {"a": 0, "b": 0}
    assert state.fromkeys(iter([1, 2]), [3]) == {1: [3], 2: [3]}
    assert state.copy() == {"a": 1}


def test_repr(state: zproc.State) -> None:
    assert repr(state) == "<State value: {}>"
    state.update({"a": 1, 2: [3]})
    assert repr(state) == "<State value: {'a': 1, 2: [3]}>"
    assert str(state) == repr(state)


def test_repr_of_an_unreachable_server() -> None:
    proc, addr = zproc.start_server()
    try:
        with zproc.State(addr, request_timeout=0.5) as state:
            state["a"] = 1
            proc.kill()
            proc.join(5)
            text = repr(state)
            assert "unreachable" in text and addr.req_rep in text
    finally:
        proc.join(5)
        zproc._transport.remove_ipc_dir(os.path.dirname(addr.req_rep[len("ipc://"):]))


def test_equality(state: zproc.State) -> None:
    state.update(a=1, b=[2])
    assert state == {"a": 1, "b": [2]}
    assert state == {"b": [2], "a": 1}  # order does not matter, as for dicts
    assert not (state != {"a": 1, "b": [2]})
    assert state != {"a": 1}
    assert {"a": 1, "b": [2]} == state
    assert state != 5 and not (state == 5)
    assert state != None  # noqa: E711
    assert state != [("a", 1), ("b", [2])]
    with zproc.State(state.server_address) as other:
        assert state == other
        assert not (state != other)
        other["c"] = 3
        assert state == other  # the same server dict
    proc, addr = zproc.start_server()
    try:
        with zproc.State(addr) as elsewhere:
            assert state != elsewhere
            elsewhere.update(state.copy())
            assert state == elsewhere
    finally:
        proc.terminate()
        proc.join(5)


def test_hashable_by_identity(state: zproc.State) -> None:
    assert hash(state) == hash(state)
    assert {state: 1}[state] == 1


def test_bool_and_len(state: zproc.State) -> None:
    assert not state and len(state) == 0
    state["a"] = None
    assert state and len(state) == 1


def test_server_address_is_read_only(state: zproc.State, server: zproc.ServerAddress) -> None:
    assert state.server_address == server
    assert type(state.server_address) is zproc.ServerAddress
    with pytest.raises(AttributeError):
        state.server_address = server  # type: ignore[misc]


# -- lifecycle --------------------------------------------------------------------------


def test_close_is_idempotent_and_later_use_raises(server: zproc.ServerAddress) -> None:
    state = zproc.State(server)
    state["a"] = 1
    state.close()
    state.close()
    assert state.closed
    for use in (
        lambda: state["a"],
        lambda: state.__setitem__("a", 2),
        lambda: len(state),
        lambda: "a" in state,
        lambda: state.copy(),
        lambda: state.keys(),
        lambda: state.update(b=1),
        lambda: state.ping(timeout=1),
        lambda: state == {},
    ):
        with pytest.raises(zproc.ZProcError, match="closed"):
            use()
    with zproc.State(server) as fresh:
        assert fresh.copy() == {"a": 1}


def test_context_manager_closes(server: zproc.ServerAddress) -> None:
    with zproc.State(server) as state:
        state["a"] = 1
    assert state.closed
    with pytest.raises(zproc.ZProcError):
        state["a"]


def test_unclosed_state_warns(server: zproc.ServerAddress) -> None:
    state = zproc.State(server)
    state["a"] = 1
    with pytest.warns(ResourceWarning):
        del state
        gc.collect()


# -- pickling and fork --------------------------------------------------------------------


def test_pickled_state_is_a_fresh_connection(state: zproc.State) -> None:
    state["a"] = 1
    data = pickle.dumps(state)
    assert len(data) < 500  # an address and a few settings, no socket
    clone = pickle.loads(data)
    try:
        assert isinstance(clone, zproc.State)
        assert clone.server_address == state.server_address
        assert clone.request_timeout == state.request_timeout
        assert clone.identity != state.identity
        assert clone["a"] == 1
        clone["b"] = 2
        assert state["b"] == 2
    finally:
        clone.close()


def _use_pickled_state(conn: Any) -> None:
    state = conn.recv()  # unpickled here
    try:
        state["child"] = os.getpid()
        conn.send((state.identity, state.copy()))
    finally:
        state.close()
        conn.close()


def test_state_sent_to_another_process(state: zproc.State) -> None:
    state["parent"] = os.getpid()
    ours, theirs = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_use_pickled_state, args=(theirs,))
    proc.start()
    try:
        ours.send(state)  # pickled through the pipe
        assert ours.poll(20)
        identity, seen = ours.recv()
    finally:
        proc.join(10)
        ours.close()
        theirs.close()
    assert proc.exitcode == 0
    assert identity != state.identity
    assert seen == {"parent": os.getpid(), "child": proc.pid}
    assert state["child"] == proc.pid


def test_state_unpickled_in_a_fresh_interpreter(state: zproc.State) -> None:
    """Like the spawn start method, without its resource tracker process."""
    code = (
        "import os, pickle, sys\n"
        "state = pickle.loads(sys.stdin.buffer.read())\n"
        "with state:\n"
        "    state['spawned'] = os.getpid()\n"
        "    sys.stdout.write(state.identity.hex())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(state), capture_output=True,
        timeout=30, env=_env_with_zproc(),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert bytes.fromhex(result.stdout.decode()) != state.identity
    assert isinstance(state["spawned"], int) and state["spawned"] != os.getpid()


def _env_with_zproc() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(zproc.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _use_inherited_state(state: zproc.State, conn: Any) -> None:
    try:
        state["forked"] = os.getpid()
        conn.send((state.identity, state["parent"]))
    finally:
        state.close()
        conn.close()


def test_state_used_after_fork_reconnects(state: zproc.State) -> None:
    state["parent"] = "p"
    parent_identity = state.identity
    ours, theirs = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(
        target=_use_inherited_state, args=(state, theirs)
    )
    proc.start()
    try:
        assert ours.poll(20)
        identity, value = ours.recv()
    finally:
        proc.join(10)
        ours.close()
        theirs.close()
    assert proc.exitcode == 0
    assert value == "p"
    assert identity != parent_identity
    # the parent's State is unaffected by the child's use (and close) of its copy
    assert state.identity == parent_identity
    assert state["forked"] == proc.pid
    state["after"] = 1
    assert state.copy() == {"parent": "p", "forked": proc.pid, "after": 1}


# -- timeouts and unavailable servers ------------------------------------------------------


def _sleep_in_server(_d: dict[Any, Any], seconds: float) -> None:
    time.sleep(seconds)


def test_request_timeout(server: zproc.ServerAddress) -> None:
    """A busy server: TimeoutError, then the next request gets its own reply (B20)."""
    with zproc.State(server, request_timeout=10) as state:
        state.update(x="x", y="y")
        busy = threading.Thread(
            target=lambda: _run_atomic_sleep(server, 1.0), name="busy-server"
        )
        busy.start()
        try:
            time.sleep(0.2)  # the atomic sleep is running on the server
            state.request_timeout = 0.2
            started = time.monotonic()
            with pytest.raises(zproc.TimeoutError) as info:
                state["x"]
            assert 0.15 < time.monotonic() - started < 2.0
            assert isinstance(info.value, TimeoutError)
            assert "unknown" in str(info.value)
            state.request_timeout = 10
            # the late reply to "x" must be dropped: this is the answer for "y"
            assert state["y"] == "y"
            assert state.get("x") == "x"
            assert len(state) == 2
        finally:
            busy.join(15)


def _run_atomic_sleep(address: zproc.ServerAddress, seconds: float) -> None:
    with zproc.State(address, request_timeout=10) as other:
        zproc.atomic(_sleep_in_server)(other, seconds)


def test_request_timeout_is_validated(server: zproc.ServerAddress) -> None:
    with pytest.raises(ValueError):
        zproc.State(server, request_timeout=-1)


def test_state_before_any_server_is_unavailable(address: zproc.ServerAddress) -> None:
    started = time.monotonic()
    with zproc.State(address, connect_timeout=1.5) as state:
        with pytest.raises(zproc.ServerUnavailableError) as info:
            state["a"] = 1
        elapsed = time.monotonic() - started
        assert 1.4 < elapsed < 5
        err = info.value
        assert isinstance(err, zproc.ServerError) and isinstance(err, ConnectionError)
        assert address.req_rep in str(err)
        assert "start_server" in str(err)


def test_state_construction_does_not_need_a_server(address: zproc.ServerAddress) -> None:
    """Constructing a State contacts no server, whatever connect_timeout is (spec 3.4.1)."""
    error = None
    try:
        state = zproc.State(address, connect_timeout=0.3)
    except zproc.ServerUnavailableError as exc:
        error = str(exc)
        # release the half-built State's sockets, or their leftover monitor endpoint
        # breaks a later socket that reuses the file descriptor number
        tb = exc.__traceback__
        while tb is not None:
            half_built = tb.tb_frame.f_locals.get("self")
            if isinstance(half_built, zproc.State):
                half_built.close()
                break
            tb = tb.tb_next
        del exc, tb, half_built
    if error is not None:
        pytest.fail(f"State() raised with no server running: {error}")
    with state:
        with pytest.raises(zproc.ServerUnavailableError):
            len(state)


def test_state_created_before_its_server_works_once_it_is_up(
    address: zproc.ServerAddress,
) -> None:
    with zproc.State(address, connect_timeout=10, request_timeout=10) as state:
        proc, _ = zproc.start_server(address)
        try:
            state["a"] = 1
            assert state.copy() == {"a": 1}
        finally:
            proc.terminate()
            proc.join(5)


def test_server_stopped_under_a_state(server: zproc.ServerAddress) -> None:
    proc, addr = zproc.start_server()
    try:
        with zproc.State(addr) as state:
            state["a"] = 1
            proc.terminate()
            proc.join(5)
            started = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError) as info:
                state["a"]
            assert time.monotonic() - started < 10
            assert addr.req_rep in str(info.value)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


# -- Context at the level of the core ------------------------------------------------------


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_context_attaches_without_starting_a_server(address: zproc.ServerAddress) -> None:
    proc, addr = zproc.start_server(address)
    try:
        before = _children()
        with zproc.Context(address) as ctx:
            assert _children() == before
            assert ctx.server_process is None
            assert ctx.server_address == address
            assert type(ctx.server_address) is zproc.ServerAddress
            assert ctx.ping(timeout=5) == proc.pid
            ctx.state["from_ctx"] = 1
            with zproc.State(address) as state:
                assert state["from_ctx"] == 1
        assert ctx.state.closed
        # closing an attached Context leaves the server running
        assert proc.is_alive()
        assert zproc.ping(address, timeout=5) == proc.pid
        with zproc.State(address) as state:
            assert state.copy() == {"from_ctx": 1}
    finally:
        proc.terminate()
        proc.join(5)


def test_context_owns_and_stops_its_server() -> None:
    ctx = zproc.Context()
    try:
        proc = ctx.server_process
        assert proc is not None and proc.is_alive()
        assert ctx.ping(timeout=5) == proc.pid
        paths = [endpoint[len("ipc://"):] for endpoint in ctx.server_address]
        assert all(os.path.exists(path) for path in paths)
        ctx.state["a"] = 1
        assert ctx.state.copy() == {"a": 1}
    finally:
        ctx.close()
    assert not proc.is_alive()
    assert proc.exitcode is not None
    assert not any(os.path.exists(path) for path in paths)
    assert not os.path.exists(os.path.dirname(paths[0]))
    ctx.close()  # idempotent
    assert ctx.closed
    with pytest.raises(zproc.ZProcError):
        ctx.state["a"]


def test_context_fixture(ctx: zproc.Context) -> None:
    ctx.state["a"] = [1]
    with zproc.State(ctx.server_address) as state:
        assert state == ctx.state
        assert state["a"] == [1]


@pytest.fixture
def two_states(server: zproc.ServerAddress) -> Iterator[tuple[zproc.State, zproc.State]]:
    with zproc.State(server) as a, zproc.State(server) as b:
        yield a, b


def test_two_states_share_one_dict(two_states: tuple[zproc.State, zproc.State]) -> None:
    a, b = two_states
    assert a.identity != b.identity
    a["x"] = 1
    assert b["x"] == 1
    b.update(y=2)
    assert a.copy() == {"x": 1, "y": 2}
    del b["x"]
    assert "x" not in a
