"""The client's event-stream core (zproc._stream) without sockets: event frames and FETCH
replies are fed by hand, and the I/O steps of its procedures are answered by a script."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import zproc
from zproc import _protocol as P
from zproc._stream import _Cursor, _Ev, _StreamCore, adrive, drive
from zproc._watch import _watch_item, _watch_start

NS = b"default"
RUN, OTHER_RUN = b"r" * 8, b"s" * 8
ME, YOU = b"me", b"you"


def message(first: int, changes: list[dict[str, Any]], run: bytes = RUN, origin: bytes = YOU
            ) -> list[bytes]:
    """An event message of the server: topic, header, one frame per event."""
    frames = [P.event_topic(NS), P.events_header(first, first + len(changes) - 1, run)]
    for seq, change in enumerate(changes, first):
        frames.append(P.new_event(seq, origin, 1000.0 + seq, change, (), None)[1])
    return frames


def event(seq: int, changes: dict[str, Any], old: dict[str, Any] | None = None) -> P.Event:
    return P.Event(seq, YOU, 1000.0 + seq, changes, (), old or {})


def reply(head: int, events: list[P.Event] | None, snapshot: dict[str, Any] | None = None,
          run: bytes = RUN, continued: bool = True) -> P.FetchReply:
    return P.FetchReply(head, snapshot, events, run, continued)


class Scripted(_StreamCore):
    """A stream whose I/O steps answer from lists (and record what was asked)."""

    def __init__(self, start_seq: int = 0, max_backlog: int = 100) -> None:
        super().__init__(NS, start_seq, max_backlog, RUN, identity=ME, req_rep="tcp://req",
                         pub_sub="tcp://pub", connect_timeout=5)
        self.heads: list[tuple[int, bytes]] = []
        self.fetches: list[P.FetchReply] = []
        self.queued: list[list[bytes]] = []
        self.asked: list[tuple[Any, ...]] = []
        self.lost: list[BaseException] = []

    def _io_head(self) -> Any:
        self.asked.append(("head",))
        return self.heads.pop(0)

    def _io_fetch(self, since: int, full: bool) -> Any:
        self.asked.append(("fetch", since, full))
        return tuple(self.fetches.pop(0))

    def _io_poll(self, seconds: float) -> bool:
        return bool(self.queued)

    def drain(self) -> None:
        while self.queued:
            if self._receive(self.queued.pop(0)):
                self.replay()

    def replay(self) -> None:
        drive(self._replay())

    def catch_up(self) -> int:
        return drive(self._catch_up())

    def _on_lost(self, error: Any) -> None:
        self.lost.append(error)


def test_contiguous_events_are_applied_in_order_with_their_undo_records() -> None:
    s = Scripted()
    assert not s._receive(message(1, [{"a": 1}, {"a": 2, "b": 0}]))
    assert s.seq == 2 and s.replica == {"a": 2, "b": 0}
    assert [ev.seq for ev in s.log] == [1, 2]
    assert s.snapshot_at(0) == {} and s.snapshot_at(1) == {"a": 1}
    assert s.value_at(1, "a") == 1 and s.value_at(0, "a") is None
    assert not s._receive(message(1, [{"a": 1}]))  # stale: ignored
    assert s.seq == 2


def test_a_gap_asks_for_a_replay_which_fetches_the_missing_events() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1}]))
    assert s._receive(message(4, [{"a": 4}]))  # 2 and 3 were dropped on the way
    s.fetches.append(reply(4, [event(2, {"a": 2}, {"a": 1}), event(3, {"a": 3}, {"a": 2}),
                               event(4, {"a": 4}, {"a": 3})]))
    s.replay()
    assert s.asked == [("fetch", 1, False)]
    assert s.seq == 4 and s.replica == {"a": 4}
    assert [ev.seq for ev in s.log] == [1, 2, 3, 4]


def test_a_replay_beyond_the_history_resyncs_as_one_event() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1, "b": 1}]))
    s.fetches.append(reply(9, None, snapshot={"a": 1, "c": 3}))
    s.replay()
    assert s.seq == 9 and s.replica == {"a": 1, "c": 3}
    resync = s.log[-1]
    assert (resync.first, resync.seq, resync.changes, resync.deleted) == (2, 9, {"c": 3},
                                                                           ("b",))
    assert s.snapshot_at(1) == {"a": 1, "b": 1}


def test_a_new_server_run_is_checked_before_its_events_count() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1}]))
    assert s._receive(message(2, [{"a": 2}], run=OTHER_RUN))  # check it by a FETCH
    s.fetches.append(reply(2, [event(2, {"a": 2}, {"a": 1})], run=OTHER_RUN))
    s.replay()
    assert s.run == OTHER_RUN and RUN in s.past_runs and s.seq == 2
    assert not s._receive(message(3, [{"a": 3}]))  # a late event of the old run: stale
    assert s.seq == 2


def test_a_history_that_lacks_what_was_seen_is_lost() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1}, {"a": 2}]))
    s.fetches.append(reply(1, None, snapshot={}, continued=False))
    with pytest.raises(zproc.ServerUnavailableError, match="head is now 1"):
        s.replay()
    assert len(s.lost) == 1


@pytest.mark.parametrize(
    ("head", "run", "verdict"),
    [(5, RUN, 0), (7, RUN, 1), (3, RUN, -1), (1, OTHER_RUN, 1)],
)
def test_head_verdicts(head: int, run: bytes, verdict: int) -> None:
    s = Scripted(start_seq=5)
    assert s._head_verdict(head, run, 5, RUN) == verdict


def test_catch_up_drains_then_replays_up_to_the_head() -> None:
    s = Scripted()
    s.queued.append(message(1, [{"a": 1}]))
    s.heads.append(P.head_reply((3, RUN)))
    s.fetches.append(reply(3, [event(2, {"a": 2}, {"a": 1}), event(3, {"a": 3}, {"a": 2})]))
    assert s.catch_up() == 3
    assert s.asked == [("head",), ("fetch", 1, False)]
    assert s.seq == s.head == 3


def test_catch_up_raises_when_the_head_went_back() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1}, {"a": 2}]))
    s.heads.append((1, RUN))
    with pytest.raises(zproc.ServerUnavailableError):
        s.catch_up()
    assert s.lost


def test_find_waits_for_a_qualifying_event_and_times_out_without_one() -> None:
    s = Scripted()
    s.queued.append(message(1, [{"a": 1}]))
    s.queued.append(message(2, [{"b": 2}], origin=ME))
    cursor = _Cursor(0)

    def qualifies(ev: _Ev, _cursor: _Cursor) -> bool:
        return ev.origin != ME

    found = drive(s._find(qualifies, cursor, time.monotonic() + 1, False, True))
    assert found is not None and found.seq == 1
    s.heads.append((2, RUN))
    assert drive(s._find(qualifies, cursor, time.monotonic(), False, True)) is None
    assert cursor.seq == 2 and cursor not in s.cursors


def test_the_async_driver_awaits_what_the_steps_return() -> None:
    class Async(Scripted):
        async def _io_poll(self, seconds: float) -> bool:  # type: ignore[override]
            return bool(self.queued)

    s = Async()
    s.queued.append(message(1, [{"a": 1}]))
    assert asyncio.run(adrive(s._wait_more(time.monotonic() + 1))) is True


def test_start_loads_the_snapshot_and_the_stashed_events() -> None:
    s = Scripted(start_seq=2)
    token: list[bytes] = []
    steps: dict[str, Callable[..., Any]] = {
        "_io_send_head": lambda: 7,
        "_io_sync": token.append,
        "_io_recv": lambda: (
            [s.marker, token[-1]] if not s.queued else s.queued.pop(0)
        ),
        "_io_head_result": lambda rid: (2, RUN),
    }
    for name, fn in steps.items():
        setattr(s, name, fn)
    s._io_poll = lambda seconds: True  # type: ignore[method-assign]
    s.queued.append(message(4, [{"a": 4}]))  # arrives before the marker
    s.fetches.append(reply(3, [event(3, {"a": 3}, {})], snapshot={"a": 3}))
    drive(s._start(2))
    assert s.seq == 4 and s.replica == {"a": 4}
    assert s.head == 2  # where the call began
    assert [ev.seq for ev in s.log] == [3, 4]


def test_coalescing_bounds_the_log_and_moves_cursors_to_its_start() -> None:
    s = Scripted(max_backlog=4)
    cursor = _Cursor(2)
    s.cursors.add(cursor)
    s.buffer.seq = 0
    for seq in range(1, 7):
        s._receive(message(seq, [{"k": seq, f"x{seq}": seq}]))
    assert len(s.log) <= 4
    merged = s.log[0]
    assert merged.first == 1 and merged.changes["k"] == merged.seq
    assert cursor.seq == 0  # was inside the merged event
    assert s.snapshot_at(0) == {}
    assert s.snapshot_at(s.seq) == s.replica


def test_watch_start_and_items() -> None:
    s = Scripted()
    s._receive(message(1, [{"a": 1}, {"a": 2}]))
    s.head = 2
    assert _watch_start(s, None) == 2
    assert _watch_start(s, 1001.5) == 1  # the first event from that time on is 2
    cursor = _Cursor(2, s.snapshot_at(2))
    update = _watch_item(s.log[1], cursor, raw=True)
    assert update == zproc.StateUpdate({"a": 1}, {"a": 2}, 1002.0, False)
