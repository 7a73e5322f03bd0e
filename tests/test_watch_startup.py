"""A live watcher sees every change made after its call began, also on a fresh State.

A fresh State's first watcher call starts its event stream (subscription handshake, then
a FETCH of the backlog). Changes that land during that handshake came after the call
began, so a live watcher must consider them. Each round here uses a fresh watching State;
a writer in another thread changes the state 0 to 2 ms after the watcher sent its first
request of the call. The oracle: a change whose sequence number is above the head the
call started from must be seen; one at or below it was made before the call (the writer
raced ahead) and is not counted.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import zproc
from zproc import _client
from zproc.state import ChildState

DELAYS = (0.0, 0.0005, 0.001, 0.002)
ROUNDS = 3
WAIT = 2.0  # a watcher's timeout; only a miss (or a write that raced ahead) waits it out

_values = itertools.count(1)


def _pause(seconds: float) -> None:
    """Sleep with sub-millisecond precision."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Writer:
    """Writes ``k`` from a thread, ``delay`` s after ``trigger`` is set; remembers the
    write's sequence number."""

    def __init__(
        self, writer: zproc.State, trigger: threading.Event, delay: float, value: int
    ) -> None:
        self.value = value
        self.seq = 0
        self._writer, self._trigger, self._delay = writer, trigger, delay
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._trigger.wait(10), "the watcher never sent a request"
        _pause(self._delay)
        self._writer["k"] = self.value
        self.seq = self._writer._conn.head  # type: ignore[union-attr]

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def first_send(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], threading.Event]]:
    """Arm an Event that is set right after the next request any State sends (or the
    one after that, with ``skip=1``)."""
    armed: list[list[Any]] = []
    original = _client.Connection._send  # every request's (send, request, State calls)

    def send(self: _client.Connection, *args: Any) -> int:
        rid = original(self, *args)
        for entry in list(armed):
            if entry[1] == 0:
                entry[0].set()
                armed.remove(entry)
            entry[1] -= 1
        return rid

    monkeypatch.setattr(_client.Connection, "_send", send)

    def arm(skip: int = 0) -> threading.Event:
        event = threading.Event()
        armed.append([event, skip])
        return event

    yield arm


# Each live watcher kind, prepared for value ``v`` (the one written this round): the
# returned callable is the watcher call. An iterator watcher is created first (that
# starts its State's stream); its live wait starts with each next().
Prepare = Callable[[Any, int], Callable[[], Any]]


def _first(iterator: Any) -> Callable[[], Any]:
    return lambda: next(iterator)


def _afirst(iterator: Any) -> Callable[[], Any]:
    return lambda: anext(iterator)


def _kinds(first: Callable[[Any], Callable[[], Any]]) -> dict[str, Prepare]:
    """The kinds, with ``first`` turning an iterator watcher into its first step."""
    return {
        "get_when_change": lambda w, v: lambda: w.get_when_change(timeout=WAIT),
        "get_when_change(key)": lambda w, v: lambda: w.get_when_change("k", timeout=WAIT),
        "get_when": lambda w, v: lambda: w.get_when(lambda s: s.get("k") == v, timeout=WAIT),
        "get_when_equal": lambda w, v: lambda: w.get_when_equal("k", v, timeout=WAIT),
        "when_change": lambda w, v: first(w.when_change(live=True, timeout=WAIT)),
        "when_change(key)": lambda w, v: first(w.when_change("k", live=True, timeout=WAIT)),
        "when": lambda w, v: first(w.when(lambda s: s.get("k") == v, live=True, timeout=WAIT)),
        "when_equal": lambda w, v: first(w.when_equal("k", v, live=True, timeout=WAIT)),
    }


SYNC_KINDS = _kinds(_first)


def _outcome(watcher: Any, write: _Writer, got: Any) -> tuple[int, int, Any, int]:
    """(the write's seq, the head the watcher's call started from, what it got, what
    was written) once the write is done."""
    write.join()
    head = watcher._stream.head
    return write.seq, head, got.get("k") if isinstance(got, dict) else got, write.value


def _tally(outcomes: list[tuple[int, int, Any, int]]) -> None:
    """Assert no change made after a call began was missed, and that most rounds did
    test that (their change came after the call's start)."""
    counted = [(seq, head, got, value) for seq, head, got, value in outcomes if seq > head]
    missed = [o for o in counted if o[2] != o[3]]
    assert not missed, f"missed {len(missed)} of {len(counted)} changes: {missed}"
    assert len(counted) >= len(outcomes) * 3 // 4, (
        f"only {len(counted)} of {len(outcomes)} rounds wrote after the call began"
    )


@pytest.mark.parametrize("lazy", [False, True], ids=["State", "ChildState"])
@pytest.mark.parametrize("kind", list(SYNC_KINDS))
def test_a_fresh_states_first_live_watcher_sees_changes_made_during_its_start(
    server: zproc.ServerAddress, first_send: Callable[[int], threading.Event],
    kind: str, lazy: bool,
) -> None:
    prepare = SYNC_KINDS[kind]
    outcomes = []
    with zproc.State(server) as writer:
        for delay in DELAYS:
            for _ in range(ROUNDS):
                # ChildState (what zproc processes and call_when_* handlers get) registers
                # on its first use, which is then this call's first request; it is sent
                # while the connection is still being made, so the server may take a
                # write sent right after it first: start writing after the next request
                with (ChildState if lazy else zproc.State)(server) as watcher:
                    value = next(_values)
                    call = prepare(watcher, value)
                    skip = 1 if lazy and not kind.startswith("when") else 0
                    write = _Writer(writer, first_send(skip), delay, value)
                    try:
                        got = call()
                    except zproc.TimeoutError:
                        got = None
                    outcomes.append(_outcome(watcher, write, got))
    _tally(outcomes)


ASYNC_KINDS = _kinds(_afirst)


@pytest.mark.parametrize("kind", list(ASYNC_KINDS))
def test_a_fresh_async_states_first_live_watcher_sees_changes_made_during_its_start(
    server: zproc.ServerAddress, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    prepare = ASYNC_KINDS[kind]
    armed: list[threading.Event] = []
    original = _client.AsyncConnection.send

    def send(self: _client.AsyncConnection, *args: Any) -> int:
        rid = original(self, *args)
        while armed:
            armed.pop().set()
        return rid

    monkeypatch.setattr(_client.AsyncConnection, "send", send)

    async def main(writer: zproc.State) -> list[tuple[int, int, Any, int]]:
        outcomes = []
        for delay in DELAYS:
            for _ in range(ROUNDS):
                async with zproc.AsyncState(server) as watcher:
                    value = next(_values)
                    call = prepare(watcher, value)
                    trigger = threading.Event()
                    armed.append(trigger)
                    write = _Writer(writer, trigger, delay, value)
                    try:
                        got = await call()
                    except zproc.TimeoutError:
                        got = None
                    outcomes.append(await asyncio.to_thread(_outcome, watcher, write, got))
        return outcomes

    with zproc.State(server) as writer:
        _tally(asyncio.run(main(writer)))


def test_the_reduced_report_misses_nothing(server: zproc.ServerAddress) -> None:
    """The reproduction from the report: a timer 0.5 or 1 ms after a fresh State's
    first get_when_change (upstream 0.9.1 misses none of these). On a loaded machine the
    timer may fire before the call's first request is out: such a write came before the
    call, and the oracle does not count it."""
    outcomes = []
    with zproc.State(server) as writer:
        for delay in [0.0005, 0.001] * 10:
            with zproc.State(server) as watcher:
                value, seq = next(_values), []

                def write(value: int = value, seq: list[int] = seq) -> None:
                    writer["k"] = value
                    seq.append(writer._conn.head)  # type: ignore[union-attr]

                timer = threading.Timer(delay, write)
                timer.start()
                try:
                    got = watcher.get_when_change("k", timeout=WAIT)
                except zproc.TimeoutError:
                    got = None
                timer.join(10)
                head = watcher._stream.head  # type: ignore[union-attr]
                outcomes.append((seq[0], head, got, value))
    _tally(outcomes)
