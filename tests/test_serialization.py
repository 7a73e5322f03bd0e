"""Serialization (zproc/_serialization.py): data, code, and exceptions across processes.

No processes, no sockets.
"""

from __future__ import annotations

import pickle
import pickletools
import threading
from typing import Any

import pytest

import zproc
from zproc import _serialization as S
from zproc.exceptions import ProtocolError, RemoteTraceback, ServerError


def _global_pickle(module: str, name: str) -> bytes:
    """Pickle bytes for an instance of ``module.name`` (which need not exist)."""
    # protocol 2 opcodes: GLOBAL 'module name', EMPTY_TUPLE, NEWOBJ, STOP
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)\x81."
    pickletools.dis(data, out=_Null())  # well-formed pickle, whatever it refers to
    return data


class _Null:
    def write(self, _text: str) -> None:
        pass


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -(2**70),
        1.5,
        "text é",
        b"\x00bytes",
        [1, [2, [3]]],
        {"nested": {"dict": (1, 2)}, 3: frozenset({1})},
        {1, 2, 3},
        bytearray(b"abc"),
        complex(1, 2),
    ],
)
def test_data_round_trip(value: Any) -> None:
    assert S.loads(S.dumps(value)) == value
    assert S.loads(memoryview(S.dumps(value))) == value


def test_dumps_uses_pickle_protocol_5() -> None:
    data = S.dumps({"a": 1})
    assert data[:2] == b"\x80\x05"


def test_loads_garbage_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot decode"):
        S.loads(b"\x00\x01not a pickle")
    with pytest.raises(ProtocolError):
        S.loads(b"")


def test_unimportable_module_message() -> None:
    data = _global_pickle("nonexistent_zproc_mod", "Cls")
    with pytest.raises(ProtocolError) as info:
        S.loads(data)
    message = str(info.value)
    assert "nonexistent_zproc_mod" in message
    assert "importable" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_unimportable_class_message_names_the_class() -> None:
    data = _global_pickle(__name__, "NoSuchClassHere")
    with pytest.raises(ProtocolError) as info:
        S.loads(data)
    message = str(info.value)
    assert f"{__name__}.NoSuchClassHere" in message
    assert "importable module" in message
    assert "before the server starts" in message


def test_dumps_code_ships_closures_lambdas_and_defaults() -> None:
    factor = 3

    def scaled(x: int, *, offset: int = 1) -> int:
        return x * factor + offset

    fn = S.loads(S.dumps_code(scaled))
    assert fn(2) == 7
    assert fn(2, offset=0) == 6
    assert S.loads(S.dumps_code(lambda y=4: y + factor))() == 7
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        S.dumps(lambda: 0)  # plain pickle refuses lambdas


# -- exceptions -------------------------------------------------------------------------


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


class TwoArgError(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")  # args do not match __init__: no pickle round trip
        self.a, self.b = a, b


class HoldsLockError(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


@pytest.mark.parametrize(
    "exc",
    [KeyError("missing"), ValueError("bad", 2), TypeError("t"), ZeroDivisionError("z")],
)
def test_exception_rebuilt_with_type_args_and_remote_traceback(exc: BaseException) -> None:
    rebuilt = S.loads_exception(S.dumps_exception(_raised(exc)))
    assert type(rebuilt) is type(exc)
    assert rebuilt.args == exc.args
    cause = rebuilt.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.tb
    assert "_raised" in cause.tb  # the remote frame shows up
    assert type(exc).__name__ in str(cause)


def test_zproc_exceptions_round_trip() -> None:
    exc = zproc.ProcessWaitError("child failed", pid=12, exitcode=-15)
    rebuilt = S.loads_exception(S.dumps_exception(_raised(exc)))
    assert isinstance(rebuilt, zproc.ProcessWaitError)
    assert (rebuilt.pid, rebuilt.exitcode) == (12, -15)
    rebuilt = S.loads_exception(S.dumps_exception(_raised(ProtocolError("p"))))
    assert type(rebuilt) is ProtocolError


@pytest.mark.parametrize("exc", [TwoArgError(1, 2), HoldsLockError()], ids=["bad-init", "lock"])
def test_exception_that_does_not_round_trip_becomes_server_error(exc: BaseException) -> None:
    rebuilt = S.loads_exception(S.dumps_exception(_raised(exc)))
    assert type(rebuilt) is ServerError
    assert rebuilt.remote_type == f"{__name__}.{type(exc).__qualname__}"
    assert str(exc) in str(rebuilt)
    assert rebuilt.remote_traceback is not None and "_raised" in rebuilt.remote_traceback
    assert isinstance(rebuilt.__cause__, RemoteTraceback)


def test_exception_of_unimportable_class_becomes_server_error() -> None:
    # what the client sees when the server raised a class it does not have
    body = _global_pickle("nonexistent_zproc_mod", "RemoteOnlyError")
    data = pickle.dumps((body, "nonexistent_zproc_mod.RemoteOnlyError", "boom", "TB text\n"))
    rebuilt = S.loads_exception(data)
    assert isinstance(rebuilt, ServerError)
    assert rebuilt.remote_type == "nonexistent_zproc_mod.RemoteOnlyError"
    assert "boom" in str(rebuilt)
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert rebuilt.__cause__.tb == "TB text\n"


def test_garbage_error_reply_becomes_protocol_error() -> None:
    rebuilt = S.loads_exception(b"garbage")
    assert isinstance(rebuilt, ProtocolError)


def test_remote_traceback_str_shows_the_text() -> None:
    cause = RemoteTraceback("Traceback (most recent call last):\n  boom\n")
    assert str(cause).startswith("\n\n")
    assert str(cause).rstrip().endswith("boom")


def test_dumps_any_falls_back_to_cloudpickle_and_finds_the_unpicklable_item() -> None:
    assert S.loads(S.dumps_any([1, "a"])) == [1, "a"]
    assert S.loads(S.dumps_any(lambda: 7))() == 7  # plain pickle refuses a lambda
    values = [1, lambda: 2, threading.Lock(), 4]
    with pytest.raises(TypeError):
        S.dumps_any(values)
    index, error = S.first_unpicklable(values)
    assert index == 2 and isinstance(error, TypeError)
