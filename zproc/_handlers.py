"""The body of a ``call_when_*`` process: wait for a change, call the function, forever.

:meth:`zproc.Context.call_when_change` and its siblings start a Process whose target is
:func:`watch_loop`, bound to the watcher's spec and the decorated function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .state import State

__all__ = ["watch_loop"]


def watch_loop(
    spec: tuple[Any, ...],
    live: bool,
    pass_value: bool,
    stateful: bool,
    fn: Callable[..., Any],
    state: State,
    *args: Any,
    **kwargs: Any,
) -> None:
    """Body of a ``call_when_*`` process: wait, call ``fn``, forever (until ProcessExit)."""

    def call(value: Any) -> None:
        head = ((value,) if pass_value else ()) + ((state,) if stateful else ())
        fn(*head, *args, **kwargs)

    kind = spec[0]
    if kind == "change":
        _, keys, exclude = spec
        while True:
            call(state.get_when_change(*keys, exclude=exclude, live=live))
    test, result = _predicate(spec)
    watcher = state.when(test, live=live)
    current = watcher.current()  # checked once at start: level-triggered, never a spin
    if test(current):
        call(result(current))
    for snapshot in watcher:
        call(result(snapshot))


def _predicate(
    spec: tuple[Any, ...],
) -> tuple[Callable[[dict[Any, Any]], Any], Callable[[dict[Any, Any]], Any]]:
    """(test, result) of a predicate watcher. 0.9.1 rules: a missing key counts as None for
    equal/not_equal; for the newer none/not_none/available a missing key never matches."""
    kind = spec[0]
    if kind == "when":
        return spec[1], lambda snap: snap
    key = spec[1]
    value_of: Callable[[dict[Any, Any]], Any] = lambda snap: snap.get(key)  # noqa: E731
    if kind == "equal":
        return (lambda snap: snap.get(key) == spec[2]), value_of
    if kind == "not_equal":
        return (lambda snap: snap.get(key) != spec[2]), value_of
    if kind == "none":
        return (lambda snap: key in snap and snap[key] is None), value_of
    if kind == "not_none":
        return (lambda snap: snap.get(key) is not None), value_of
    if kind == "available":
        return (lambda snap: key in snap), value_of
    raise ValueError(f"unknown watcher kind {kind!r}")  # pragma: no cover
