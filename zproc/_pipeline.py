"""Pipeline: a State's writes, buffered and sent many to a request."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Protocol

from . import _protocol as P
from . import _serialization as S
from ._api import _update_argument
from .exceptions import ProtocolError

__all__ = ["Pipeline"]

#: Operations a pipeline buffers before it sends them.
DEFAULT_PIPELINE_OPS = 1000


class Requester(Protocol):
    """What a pipeline sends its batches through (a :class:`zproc.State`)."""

    def _request(self, kind: int, method: int, body: bytes) -> Any: ...


class Pipeline:
    """Writes to a :class:`State`, buffered and sent many to a request.

    Made by :meth:`State.pipeline`. Each write is pickled when it is made (so a value
    that cannot be pickled fails at once, and later changes to the value are not sent)
    and buffered; :meth:`flush` (or the end of a ``with`` block) sends the buffer as one
    request, and so does every ``max_ops``-th write.

    The server applies the operations in order, each one on its own, exactly as if they
    had been sent one by one: each is atomic, publishes its own event (watchers see every
    change, with consecutive sequence numbers) and, if it fails, leaves the state as it
    was and does not stop the operations after it. Operations of other States may run
    between two batches, not inside one. The first failure is raised by :meth:`flush`:
    the original exception type, the server's traceback as ``__cause__`` and a note
    naming the operation's index. A ``with`` block that raises discards the writes not
    sent yet (those already sent stay applied).

    Afterwards, this State's reads with ``cache=True`` see every write of the pipeline.

    .. versionadded:: 1.0
    """

    def __init__(self, state: Requester, max_ops: int = DEFAULT_PIPELINE_OPS) -> None:
        if not isinstance(max_ops, int) or max_ops < 1:
            raise ValueError(f"max_ops must be an int >= 1, got {max_ops!r}")
        self.state = state
        self.max_ops = max_ops
        self._ops: list[bytes] = []
        self._names: list[str] = []
        self._results: list[Any] = []
        self._failed = 0
        self._error: tuple[int, str, BaseException] | None = None

    def _add(self, name: str, method: int, args: tuple[Any, ...]) -> None:
        self._ops.append(S.dumps((int(method), args)))
        self._names.append(name)
        if len(self._ops) >= self.max_ops:
            self._send()

    def _send(self) -> None:
        ops, names = self._ops, self._names
        if not ops:
            return
        self._ops, self._names = [], []
        replies = self.state._request(P.Kind.PIPELINE, 0, S.dumps(ops))
        if not isinstance(replies, list) or len(replies) != len(ops):
            raise ProtocolError(
                f"the server answered a pipeline of {len(ops)} operations with "
                f"{len(replies) if isinstance(replies, list) else 'no'} results; use the "
                f"same zproc version on both sides"
            )
        ok = P.Status.OK
        for name, (status, body) in zip(names, replies, strict=True):
            index = len(self._results)
            try:
                if status != ok:
                    raise S.loads_exception(body)
                self._results.append(S.loads(body))
            except Exception as exc:
                self._results.append(None)
                self._failed += 1
                if self._error is None:
                    self._error = (index, name, exc)

    def flush(self) -> list[Any]:
        """Send the buffered writes; return the result of every write since the last flush.

        Raises the first failure among them (see the class documentation); the others
        were applied regardless.
        """
        try:
            self._send()
        finally:
            results, error, failed = self._results, self._error, self._failed
            self._results, self._error, self._failed = [], None, 0
        if error is not None:
            index, name, exc = error
            others = f"; {failed - 1} later one(s) failed too" if failed > 1 else ""
            exc.add_note(
                f"raised by operation #{index} ({name}) of a pipeline of {len(results)}"
                f"{others}; the other operations were applied"
            )
            raise exc
        return results

    def discard(self) -> None:
        """Drop the writes not sent yet."""
        self._ops, self._names = [], []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.discard()

    # writes
    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._add("setitem", P.Method.SETITEM, (key, value))

    def __delitem__(self, key: Hashable) -> None:
        self._add("delitem", P.Method.DELITEM, (key,))

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update`` (one operation: all of it applies, or none)."""
        self._add("update", P.Method.UPDATE, (_update_argument(args, kwargs),))

    def pop(self, key: Hashable, *default: Any) -> None:
        """Pop ``key`` (its value is in :meth:`flush`'s results)."""
        self._add("pop", P.Method.POP, (key, *default))

    def popitem(self) -> None:
        """Remove the last inserted item (it is in :meth:`flush`'s results)."""
        self._add("popitem", P.Method.POPITEM, ())

    def setdefault(self, key: Hashable, default: Any = None) -> None:
        """Set ``key`` to ``default`` if it is missing (the value is in the results)."""
        self._add("setdefault", P.Method.SETDEFAULT, (key, default))

    def clear(self) -> None:
        """Remove every key."""
        self._add("clear", P.Method.CLEAR, ())

    def set(self, value: Mapping[Any, Any]) -> None:
        """Replace the whole dict with ``value`` (one event)."""
        self._add("set", P.Method.SET, (dict(value),))
