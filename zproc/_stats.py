"""The state server's figures, counted as it serves (no I/O).

The server's loop calls :meth:`Meter.begin` once per batch of requests and
:meth:`Meter.note` once per request, with the request's frames. A note costs one clock
read, two integer increments, a dict store (the client's last request) and one
comparison: durations are measured from one request's end to the next one's, so each
request reads the clock once. Everything else (rates, the slow log's upkeep, forgetting
idle clients) happens at most once a second, or when the figures are read.

A request's *kind* here is the name of what it asked for: the dict method of a ``CALL``
(``"set"`` for ``state[k] = v``, ``"get"`` for ``state[k]`` and ``state.get(k)`` when
they reach the server, ``"delete"``, ``"update"``...) or the request kind otherwise
(``"atomic"``, ``"pipeline"``, ``"fetch"``, ``"coord"``, ``"stats"``...).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from . import _protocol as P
from ._coord import Coordinator
from ._coordqueue import QueueState

__all__ = [
    "CLIENT_WINDOW",
    "SLOW_LOG_SIZE",
    "SLOW_LOG_WINDOW",
    "Meter",
    "coordination_figures",
    "kind_name",
]

#: A client counts as connected this long after its last request (seconds).
CLIENT_WINDOW = 10.0
#: Entries of the slow log: the slowest requests of the last SLOW_LOG_WINDOW seconds.
SLOW_LOG_SIZE = 16
SLOW_LOG_WINDOW = 60.0
#: The windows of the request rates, in seconds.
RATE_WINDOWS = (1, 10, 60)

_CALL = int(P.Kind.CALL)
_METHOD_NAMES = {
    P.Method.GETITEM: "get",
    P.Method.GET: "get",
    P.Method.SETITEM: "set",
    P.Method.DELITEM: "delete",
    P.Method.SET: "replace",
}
_NAMES: dict[int, str] = {int(kind) << 8: kind.name.lower() for kind in P.Kind}
_NAMES.update(
    {_CALL << 8 | int(m): _METHOD_NAMES.get(m, m.name.lower()) for m in P.Method}
)

#: Called for a request slower than the threshold: (kind, namespace, duration, client).
SlowHook = Callable[[str, str, float, str], None]


def kind_name(key: int) -> str:
    """The name of a request kind counted under ``key`` (``kind << 8 | method``)."""
    kind = key >> 8
    if kind != _CALL:
        key = kind << 8
    return _NAMES.get(key, f"kind {kind}")


class Meter:
    """Counts requests, their clients and the slowest of them.

    ``slow_log_s``: requests that take at least this long are passed to ``on_slow``
    (the server logs them); the slow log keeps the slowest ones whatever their duration.
    """

    def __init__(
        self,
        slow_log_s: float,
        on_slow: SlowHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.slow_log_s = slow_log_s
        self.on_slow = on_slow
        now = clock()
        self.started = now
        self.last = now
        self.total = 0
        self.counts: defaultdict[int, int] = defaultdict(int)
        self.seen: dict[bytes, float] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        #: (duration, when, key, namespace, client), slowest last
        self.slow: list[tuple[float, float, int, str, str]] = []
        self.floor = 0.0  # the slow path is taken above this
        self._next_tick = now + 1.0
        self._marks: deque[tuple[float, int]] = deque([(now, 0)], maxlen=max(RATE_WINDOWS) + 2)

    # -- the loop's calls (the hot path) --------------------------------------------------

    def begin(self) -> None:
        """A batch of requests starts now."""
        now = self.last = self.clock()
        if now >= self._next_tick:
            self.tick(now)

    def note(self, frames: list[Any]) -> None:
        """One request (``[identity, request, *buffers]``) was handled."""
        now = self.clock()
        took = now - self.last
        self.last = now
        self.total += 1
        if len(frames) < 2:
            return
        identity, frame = frames[0], frames[1]
        self.bytes_in += len(frame)
        if len(frames) > 2:  # a body's big buffers
            self.bytes_in += sum(map(len, frames[2:]))
        self.seen[identity] = now
        if len(frame) >= P.REQUEST_SIZE:
            self.counts[frame[1] << 8 | frame[2]] += 1
            if took > self.floor:
                self._slow(took, now, frame, identity)

    # -- the rest -----------------------------------------------------------------------

    def _slow(self, took: float, now: float, frame: bytes, identity: bytes) -> None:
        key, namespace = P.request_key(frame)
        if took >= self.slow_log_s and self.on_slow is not None:
            self.on_slow(kind_name(key), namespace, took, identity.hex())
        slow = self.slow
        bisect.insort(slow, (took, now, key, namespace, identity.hex()))
        if len(slow) > SLOW_LOG_SIZE:
            del slow[0]
        self._set_floor()

    def _set_floor(self) -> None:
        full = len(self.slow) >= SLOW_LOG_SIZE
        self.floor = min(self.slow_log_s, self.slow[0][0] if full else 0.0)

    def tick(self, now: float) -> None:
        """Once a second: a mark for the rates; forget old slow requests and idle clients."""
        self._next_tick = now + 1.0
        self._marks.append((now, self.total))
        old = now - SLOW_LOG_WINDOW
        if self.slow and min(entry[1] for entry in self.slow) < old:
            self.slow = [entry for entry in self.slow if entry[1] >= old]
            self._set_floor()
        if len(self.seen) > 1024:  # bounded: forget clients idle for longer than the window
            idle = now - CLIENT_WINDOW
            self.seen = {c: t for c, t in self.seen.items() if t >= idle}

    def clients(self, now: float | None = None) -> int:
        """How many distinct clients made a request in the last CLIENT_WINDOW seconds."""
        since = (self.clock() if now is None else now) - CLIENT_WINDOW
        return sum(1 for t in list(self.seen.values()) if t >= since)

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Requests per second over the last 1, 10 and 60 seconds (``"1s"``...)."""
        now = self.clock() if now is None else now
        marks = list(self._marks)
        total = self.total
        out: dict[str, float] = {}
        for window in RATE_WINDOWS:
            # the newest mark at least ``window`` s old, else the oldest one (a young server)
            at, count = marks[0]
            for mark in reversed(marks):
                if mark[0] <= now - window:
                    at, count = mark
                    break
            span = now - at
            out[f"{window}s"] = (total - count) / span if span > 0 else 0.0
        return out

    def by_kind(self) -> dict[str, int]:
        """Requests counted per kind name (see the module's docstring)."""
        out: dict[str, int] = {}
        for key, count in list(self.counts.items()):
            name = kind_name(key)
            out[name] = out.get(name, 0) + count
        return dict(sorted(out.items()))

    def slow_log(self, now: float | None = None) -> list[dict[str, Any]]:
        """The slowest requests of the last SLOW_LOG_WINDOW seconds, slowest first."""
        now = self.clock() if now is None else now
        since = now - SLOW_LOG_WINDOW
        return [
            {"kind": kind_name(key), "namespace": namespace, "duration": took,
             "client": client, "ago": now - when}
            for took, when, key, namespace, client in reversed(list(self.slow))
            if when >= since
        ]


def coordination_figures(core: Coordinator) -> dict[str, int]:
    """Locks, semaphores, events, barriers and queues: how many, what is held, who waits."""
    every = [entry for table in list(core.tables.values()) for entry in list(table.values())]
    queues = [entry for entry in every if isinstance(entry, QueueState)]
    permits = [entry for entry in every if not isinstance(entry, QueueState)]
    return {
        "primitives": len(every),
        "held": sum(len(entry.grants) for entry in permits),
        "waiters": sum(len(entry.waiters) for entry in permits)
        + sum(len(queue.waiters) for queue in queues),
        "sessions": len(core.owners),
        "queues": len(queues),
        "queued_items": sum(len(queue.items) for queue in queues),
        "items_in_flight": sum(map(len, (i for q in queues for i in q.inflight.values()))),
    }
