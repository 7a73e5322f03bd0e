"""Small helpers that belong to no other module."""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["consume", "in_server_process", "mark_server_process"]

_SERVER_PID: int | None = None  # pid of the process running a server loop


def consume(iterator: Iterable[Any], n: int | None = None) -> None:
    """Advance ``iterator`` by ``n`` items, or to its end when ``n`` is ``None``.

    The ``itertools`` recipe: handy to run a lazy result (a watcher, a swarm's
    :class:`~zproc.SequenceTaskResult`) for its side effects only.

    .. versionadded:: 1.0
    """
    if n is None:
        collections.deque(iterator, maxlen=0)
    else:
        if n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n!r}")
        next(itertools.islice(iterator, n, n), None)


def mark_server_process() -> None:
    """Called by the server loop: this process serves (a State here would deadlock it)."""
    global _SERVER_PID
    _SERVER_PID = os.getpid()


def in_server_process() -> bool:
    """True inside a server process (where a State would deadlock the loop)."""
    return _SERVER_PID == os.getpid()
