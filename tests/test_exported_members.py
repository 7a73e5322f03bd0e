"""zproc's public names: a sorted ``__all__`` that matches what the package exports."""

from __future__ import annotations

import builtins
import types

import zproc

INCLUDED_PRIVATE_MEMBERS = {"__version__"}

# spec 3.0 / 3.7 for the core (Process arrives with the process issues)
CORE_NAMES = {
    "AddressInUseError",
    "Context",
    "ProcessError",
    "ProcessWaitError",
    "ProtocolError",
    "ServerAddress",
    "ServerError",
    "ServerUnavailableError",
    "State",
    "TimeoutError",
    "ZProcError",
    "__version__",
    "atomic",
    "ping",
    "start_server",
}


def test_all_is_sorted() -> None:
    assert zproc.__all__ == sorted(zproc.__all__)
    assert len(set(zproc.__all__)) == len(zproc.__all__)


def test_all_names_exist() -> None:
    for name in zproc.__all__:
        assert hasattr(zproc, name), name


def test_all_public_members_are_exported() -> None:
    public = {
        name
        for name, value in vars(zproc).items()
        if (not name.startswith("_") or name in INCLUDED_PRIVATE_MEMBERS)
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__
    }
    assert public == set(zproc.__all__)


def test_exported_objects_belong_to_zproc() -> None:
    for name in zproc.__all__:
        value = getattr(zproc, name)
        if name == "__version__":
            assert isinstance(value, str) and value
            continue
        assert value.__module__.startswith("zproc"), (name, value.__module__)


def test_core_names_are_exported() -> None:
    assert CORE_NAMES <= set(zproc.__all__)


def test_exception_tree() -> None:
    """Spec 3.7."""
    assert issubclass(zproc.ZProcError, Exception)
    for cls in (zproc.ServerError, zproc.ProtocolError, zproc.TimeoutError, zproc.ProcessError):
        assert issubclass(cls, zproc.ZProcError), cls
    assert issubclass(zproc.AddressInUseError, zproc.ServerError)
    assert issubclass(zproc.AddressInUseError, ConnectionError)
    assert issubclass(zproc.ServerUnavailableError, zproc.ServerError)
    assert issubclass(zproc.ServerUnavailableError, ConnectionError)
    assert issubclass(zproc.TimeoutError, builtins.TimeoutError)
    assert zproc.TimeoutError is not builtins.TimeoutError
    assert issubclass(zproc.ProcessWaitError, zproc.ProcessError)
    assert issubclass(zproc.TaskError, zproc.ZProcError)
    if hasattr(zproc, "ProcessExit"):
        assert issubclass(zproc.ProcessExit, BaseException)
        assert not issubclass(zproc.ProcessExit, Exception)


def test_asyncio_names_are_exported() -> None:
    """The asyncio flavour of State and its iterator watcher."""
    assert {"AsyncState", "AsyncStateWatcher"} <= set(zproc.__all__)
    assert zproc.AsyncState.__module__ == "zproc._async"
