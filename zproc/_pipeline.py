"""Pipeline: a State's writes, buffered and sent many to a request."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol

from . import _protocol as P
from . import _serialization as S
from ._api import _update_argument
from .exceptions import ProtocolError

__all__ = ["AsyncPipeline", "Pipeline"]

#: Operations a pipeline buffers before it sends them.
DEFAULT_PIPELINE_OPS = 1000


class Requester(Protocol):
    """What a pipeline sends its batches through (a :class:`zproc.State`)."""

    def _request(self, kind: int, method: int, body: bytes) -> Any: ...


class EarlySender(Protocol):
    """What an asyncio pipeline sends its batches through (a :class:`zproc.AsyncState`)."""

    request_timeout: float | None

    def _send_early(self, kind: int, body: bytes) -> tuple[Any, int]:
        """Send a request now; return its connection and request id."""


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

    def _take(self) -> tuple[list[bytes], list[str]]:
        """The buffered operations and their names; the buffer starts again empty."""
        ops, names = self._ops, self._names
        self._ops, self._names = [], []
        return ops, names

    def _send(self) -> None:
        ops, names = self._take()
        if ops:
            self._collect(names, self.state._request(P.Kind.PIPELINE, 0, S.dumps(ops)))

    def _collect(self, names: list[str], replies: Any) -> None:
        """Record the results of one batch (the operations ``names``), and its first
        failure if it is the pipeline's first."""
        if not isinstance(replies, list) or len(replies) != len(names):
            raise ProtocolError(
                f"the server answered a pipeline of {len(names)} operations with "
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
            outcome = self._outcome()
        return outcome()

    def _outcome(self) -> Callable[[], list[Any]]:
        """End a flush: forget its results; return what returns them or raises its first
        failure."""
        results, error, failed = self._results, self._error, self._failed
        self._results, self._error, self._failed = [], None, 0

        def outcome() -> list[Any]:
            if error is not None:
                index, name, exc = error
                others = f"; {failed - 1} later one(s) failed too" if failed > 1 else ""
                exc.add_note(
                    f"raised by operation #{index} ({name}) of a pipeline of {len(results)}"
                    f"{others}; the other operations were applied"
                )
                raise exc
            return results

        return outcome

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


class AsyncPipeline(Pipeline):
    """A :class:`Pipeline` of an :class:`~zproc.AsyncState`: ``async with
    astate.pipeline() as p: p[k] = v; ...``, and ``await p.flush()``.

    The writes are buffered and pickled as in a Pipeline, with the same guarantees (each
    operation atomic and published on its own, in order; the first failure raised by
    :meth:`flush` with the operation's index; a block that raises discards what was not
    sent; afterwards, cached reads of the AsyncState see every write). Every
    ``max_ops``-th write sends its batch at once, without waiting for the reply:
    :meth:`flush` awaits the replies of every batch, in order.

    .. versionadded:: 1.0
    """

    state: EarlySender  # type: ignore[assignment]

    def __init__(self, state: EarlySender, max_ops: int = DEFAULT_PIPELINE_OPS) -> None:
        super().__init__(state, max_ops)  # type: ignore[arg-type]
        #: Batches sent and not answered yet: (connection, request id, operation names).
        self._sent: list[tuple[Any, int, list[str]]] = []

    def _send(self) -> None:
        ops, names = self._take()
        if ops:
            conn, rid = self.state._send_early(P.Kind.PIPELINE, S.dumps(ops))
            self._sent.append((conn, rid, names))

    async def flush(self) -> list[Any]:  # type: ignore[override]
        """Send the buffered writes and await the replies of every batch; return the
        result of every write since the last flush (or raise the first failure)."""
        try:
            self._send()
            while self._sent:
                conn, rid, names = self._sent.pop(0)
                self._collect(names, await conn.aresult(rid, self.state.request_timeout))
        finally:
            for conn, rid, _ in self._sent:  # (cancelled, or failed: nobody awaits these)
                conn.forget(rid)
            self._sent = []
            outcome = self._outcome()
        return outcome()

    def discard(self) -> None:
        """Drop the writes not sent yet (the batches already sent stay applied)."""
        super().discard()
        for conn, rid, _ in self._sent:
            conn.forget(rid)
        self._sent = []

    def __enter__(self) -> Pipeline:
        raise TypeError("an AsyncState's pipeline is used with 'async with', not 'with'")

    async def __aenter__(self) -> AsyncPipeline:
        return self

    async def __aexit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is None:
            await self.flush()
        else:
            self.discard()
