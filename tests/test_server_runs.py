"""A watcher or a cached State never carries on silently over a replaced history.

Every start of a server is a new *run*; a client that sees a new run checks (FETCH) that
the run's history continues what it saw, whatever the sequence numbers say. Here the
replacing server's numbering is pushed past what the client saw before the client looks
again, which sequence numbers alone could not tell from a continued history.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import kill9, stop

import zproc
from zproc import _protocol as P
from zproc._server import Server


def _run(state: zproc.State) -> bytes:
    return P.head_reply(state._request(P.Kind.HEAD, 0, b""))[1]


def _lose_and_overtake(
    address: zproc.ServerAddress, options: dict[str, Any], server: Any
) -> tuple[Any, dict[str, Any]]:
    """Kill ``server`` right after 12 writes it did not make durable, restart it, and
    write 30 more there: the new numbering passes what watchers saw."""
    kill9(server)
    server, _ = zproc.start_server(address, **options)
    with zproc.State(address) as state:
        for i in range(30):
            state["x"] = 100 + i
        return server, state.copy()


def _write_seen_values(address: zproc.ServerAddress) -> None:
    """x = 1..11 and a key ``phantom``."""
    with zproc.State(address) as writer:
        for i in range(1, 12):
            writer["x"] = i
        writer["phantom"] = "lost"


def _replace_seen_history(
    tmp_path: Path,
    address: zproc.ServerAddress,
    persist: bool,
    client: Callable[[], zproc.State],
    see: Callable[[zproc.State], None],
    after_loss: Callable[[zproc.State, dict[str, Any]], None],
) -> None:
    """Let ``client`` see 12 changes, lose them with the server (a kill right after them,
    within the second "every second" waits to commit), then check ``after_loss``."""
    options: dict[str, Any] = {}
    if persist:
        options = {"persist": tmp_path / "s.db", "fsync": "every second"}
    for _attempt in range(3):
        server, _ = zproc.start_server(address, **options)
        try:
            with client() as state:
                started = time.monotonic()
                see(state)
                if time.monotonic() - started > 0.5:
                    stop(server)  # the server may have committed them: not a loss
                    (tmp_path / "s.db").unlink(missing_ok=True)
                    continue
                server, current = _lose_and_overtake(address, options, server)
                after_loss(state, current)
            return
        finally:
            stop(server)
    pytest.skip("the machine is too slow to kill the server before its commit")


@pytest.mark.parametrize("persist", [False, True], ids=["no-persist", "every-second"])
def test_a_blocked_watcher_raises_on_a_history_the_server_lost(
    tmp_path: Path, ipc_address: zproc.ServerAddress, persist: bool
) -> None:
    def see(watcher: zproc.State) -> None:
        watcher.go_live()
        _write_seen_values(ipc_address)
        seen = [watcher.get_when_change(live=False, timeout=10) for _ in range(12)]
        assert seen[-1] == {"x": 11, "phantom": "lost"}

    def after_loss(watcher: zproc.State, current: dict[str, Any]) -> None:
        assert current == {"x": 129}
        with pytest.raises(zproc.ServerUnavailableError, match="replaced"):
            watcher.get_when_change(timeout=10)
        # the next call starts from the current state
        assert watcher.copy() == current
        with zproc.State(ipc_address) as writer:
            timer = threading.Timer(0.1, writer.__setitem__, ("x", "after"))
            timer.start()
            assert watcher.get_when_change("x", timeout=10) == "after"
            timer.join()

    client = functools.partial(zproc.State, ipc_address, liveness=10.0)
    _replace_seen_history(tmp_path, ipc_address, persist, client, see, after_loss)


@pytest.mark.parametrize("persist", [False, True], ids=["no-persist", "every-second"])
def test_a_cached_state_raises_instead_of_serving_a_lost_key(
    tmp_path: Path, ipc_address: zproc.ServerAddress, persist: bool
) -> None:
    def see(cached: zproc.State) -> None:
        assert cached.get("phantom") is None
        _write_seen_values(ipc_address)
        deadline = time.monotonic() + 10
        while cached.get("phantom") != "lost":
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def after_loss(cached: zproc.State, current: dict[str, Any]) -> None:
        deadline = time.monotonic() + 10
        with pytest.raises(zproc.ServerUnavailableError, match="replaced"):
            while time.monotonic() < deadline:  # never the lost key
                assert cached.get("phantom") == "lost"
                time.sleep(0.01)
        assert cached.copy() == current  # then the server's state
        assert "phantom" not in cached

    client = functools.partial(zproc.State, ipc_address, cache=True, liveness=10.0)
    _replace_seen_history(tmp_path, ipc_address, persist, client, see, after_loss)


def test_a_watcher_carries_on_when_the_restarted_server_has_every_change(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """fsync="always": the new run continues the old history, so nothing is raised and
    nothing is skipped, even though the run changed."""
    options = {"persist": tmp_path / "s.db", "fsync": "always"}
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address, liveness=10.0) as watcher, \
                zproc.State(ipc_address, cache=True, liveness=10.0) as cached:
            watcher.go_live()
            _write_seen_values(ipc_address)
            seen = [watcher.get_when_change("x", live=False, timeout=10) for _ in range(11)]
            assert seen == list(range(1, 12))
            assert cached["x"] == 11
            before = _run(watcher)
            server, current = _lose_and_overtake(ipc_address, options, server)
            assert current == {"x": 129, "phantom": "lost"}
            assert _run(watcher) != before
            seen = [watcher.get_when_change("x", live=False, timeout=10) for _ in range(30)]
            assert seen == list(range(100, 130))
            deadline = time.monotonic() + 10
            while cached["x"] != 129:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert cached.copy() == current
    finally:
        stop(server)


def test_continues_follows_the_lineage() -> None:
    """A run's changes reach its successors up to the head the next run started from."""
    server = Server(None)
    try:
        a, b, c = b"a" * 8, b"b" * 8, server.run_token
        server.lineage = [(a, {}), (b, {"ns": 40}), (c, {"ns": 60, "other": 5})]
        assert server.continues(c, 75, "ns")  # this run
        assert server.continues(b"", 75, "ns")  # "this run", as a fresh client says
        assert server.continues(b, 60, "ns") and not server.continues(b, 61, "ns")
        assert server.continues(a, 40, "ns") and not server.continues(a, 50, "ns")
        assert not server.continues(a, 1, "other")  # run b started "other" at 0
        assert server.continues(a, 0, "other")  # saw nothing: nothing to lose
        assert not server.continues(b"z" * 8, 3, "ns")  # a run this server never had
    finally:
        server.close()
