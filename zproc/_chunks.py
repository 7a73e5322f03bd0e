"""The chunk engine shared by ``process_map`` (zproc._pool) and the Swarm (zproc.swarm).

No sockets and no processes: what both do to a map, from the caller's side and from the
worker's::

    caller                                         worker
    ------                                         ------
    map_inputs, map_length: the map's inputs
    layout: cut it into chunks of near-equal size
    dumps_code: the target, once per map  -------> CodeCache: decode it once per worker
    cut: each chunk's items  ---------------------> run_chunk: apply the target in order;
                                                    results (in parts, for the pool), or
                                                    a failure record: the results before
                                                    the failure, the failing item, the
    read_chunk: results, or the rebuilt error <---  exception, pid and host

A rebuilt error has its original type, with the worker's traceback as a
:class:`~zproc.RemoteTraceback` ``__cause__``.
"""

from __future__ import annotations

import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

from . import _serialization as S
from .exceptions import RemoteTraceback

__all__ = [
    "CODE_CACHE",
    "CodeCache",
    "Failure",
    "as_args",
    "as_kwargs",
    "cut",
    "dumps_code",
    "failure",
    "layout",
    "map_inputs",
    "map_length",
    "read_chunk",
    "run_chunk",
]

#: Decoded targets a worker keeps, by default.
CODE_CACHE = 8
#: With a ``send_part``, :func:`run_chunk` sends the results computed so far after this
#: many seconds, then after twice as long, and so on up to PART_INTERVAL_MAX: results of a
#: long chunk stream back (and are used while the rest is computed) with few messages.
PART_INTERVAL = 0.001
PART_INTERVAL_MAX = 0.1

#: ``(map_iter part, map_args part, map_kwargs part, count)``; unused parts are None.
Items = tuple[Any, Any, Any, int]

_BY_VALUE_MODULES = (None, "__main__", "__mp_main__")


# -- the map's inputs ----------------------------------------------------------------------


def as_args(value: Any, what: str) -> tuple[Any, ...]:
    """Positional arguments as a tuple (``None``: none); ``what`` names them in errors."""
    if value is None:
        return ()
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(
            f"{what} must be an iterable of positional arguments, got {value!r}; for one "
            f"argument write {what}=({value!r},)"
        ) from None


def as_kwargs(value: Any, what: str) -> dict[str, Any]:
    """Keyword arguments as a dict (``None``: none); ``what`` names them in errors."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of keyword arguments, got {value!r}")
    return dict(value)


def map_inputs(map_iter: Any, map_args: Any, map_kwargs: Any) -> tuple[Any, Any, Any]:
    """The ``map_*`` inputs as sequences (``None`` stays ``None``)."""
    if map_iter is None and map_args is None and map_kwargs is None:
        raise ValueError("give at least one of map_iter, map_args or map_kwargs")

    def seq(values: Any) -> Any:
        if values is None or isinstance(values, (list, tuple, range)):
            return values
        return list(values)

    return seq(map_iter), seq(map_args), seq(map_kwargs)


def map_length(*inputs: Any) -> int:
    """The length of a map: that of the shortest of its (non-None) inputs."""
    return min(len(seq) for seq in inputs if seq is not None)


def layout(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """``(start, count)`` of ``min(num_chunks, length)`` consecutive chunks of near-equal
    size (the first ones one item larger where it does not divide; none empty)."""
    n = min(num_chunks, length)
    if n <= 0:
        return []
    base, extra = divmod(length, n)
    out, start = [], 0
    for i in range(n):
        count = base + (i < extra)
        out.append((start, count))
        start += count
    return out


def cut(inputs: tuple[Any, Any, Any], start: int, count: int) -> Items:
    """The items of one chunk, as :func:`run_chunk` takes them."""
    items, margs, mkwargs = inputs
    end = start + count
    return (
        None if items is None else items[start:end],
        None if margs is None else [tuple(a) for a in margs[start:end]],
        None if mkwargs is None else [dict(k) for k in mkwargs[start:end]],
        count,
    )


# -- the code ------------------------------------------------------------------------------


def dumps_code(
    message: tuple[Any, ...], target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bytes:
    """``message``, a tuple holding ``target`` and its fixed ``args`` and ``kwargs``.

    Plain pickle (by reference) for a bare function importable by name; cloudpickle
    otherwise, so that fixed arguments defined in ``__main__`` travel by value too.
    """
    if not args and not kwargs and getattr(target, "__module__", None) not in _BY_VALUE_MODULES:
        try:
            return S.dumps(message)
        except S.PICKLING_ERRORS:
            pass
    return S.dumps_code(message)


class CodeCache:
    """The decoded code of the last ``size`` tasks a worker ran (least recent out first)."""

    def __init__(self, size: int = CODE_CACHE) -> None:
        self.size = size
        self._codes: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        """The code kept for ``key`` (now the most recent), or ``None``."""
        code = self._codes.get(key)
        if code is not None:
            self._codes.move_to_end(key)
        return code

    def put(self, key: Hashable, code: Any) -> Any:
        """Keep ``code`` for ``key``, dropping the least recent beyond ``size``."""
        self._codes[key] = code
        self._codes.move_to_end(key)
        if len(self._codes) > self.size:
            self._codes.popitem(last=False)
        return code

    def load(self, data: bytes) -> Any:
        """The code pickled in ``data``, decoded once while it stays in the cache."""
        code = self.get(data)
        return self.put(data, S.loads(data)) if code is None else code

    def __contains__(self, key: Hashable) -> bool:
        return key in self._codes

    def __len__(self) -> int:
        return len(self._codes)


# -- running a chunk -----------------------------------------------------------------------


def run_chunk(
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    state: Any,
    items: Items,
    *,
    start: int | None = None,
    send_part: Callable[[bytes], None] | None = None,
    reraise: tuple[type[BaseException], ...] = (),
) -> tuple[bool, bytes]:
    """Apply ``target`` to each item of a chunk, in order: ``(True, pickled results)``, or
    ``(False, failure record)`` at the first failure.

    ``call`` is ``(target, fixed args, fixed kwargs)``; ``state`` (unless ``None``) comes
    first in every call. ``start``: the chunk's first item in the map, for messages. With
    ``send_part``, the results computed so far go out after :data:`PART_INTERVAL` seconds,
    then at doubling intervals (the return value holds only those not sent yet). Items are
    computed in blocks whose size adapts to the target's speed, without a clock read per
    item. Exceptions of the ``reraise`` classes are not the target's failure: they
    propagate.
    """
    count = items[3]
    results: list[Any] = []
    sent = 0  # items already sent in parts
    done = 0  # items computed
    block = 1 if send_part is not None else count
    interval = PART_INTERVAL
    part_start = block_start = time.perf_counter()
    while done < count:
        end = min(done + block, count)
        try:
            _compute(call, state, items, done, end, results)
        except reraise:
            raise
        except BaseException as exc:  # the target's failure is this item's result
            ok, body = _dump(results, sent, start)
            return False, failure(results, sent + len(results), exc, body) if ok else body
        done = end
        if send_part is None:
            break
        now = time.perf_counter()
        if now - block_start < interval / 8:
            block = min(block * 2, 1 << 16)
        elif now - block_start > interval / 2 and block > 1:
            block //= 2
        block_start = now
        if done < count and now - part_start >= interval:
            ok, body = _dump(results, sent, start)
            if not ok:
                return False, body
            send_part(body)
            sent += len(results)
            results = []
            part_start = now
            interval = min(interval * 2, PART_INTERVAL_MAX)
    return _dump(results, sent, start)


def _compute(
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    state: Any,
    items: Items,
    low: int,
    high: int,
    results: list[Any],
) -> None:
    """Append the results of items ``low`` to ``high`` (keeps those before a failure)."""
    target, args, kwargs = call
    iters, margs, mkwargs, _ = items
    if iters is not None and margs is None and mkwargs is None and not (
        state is not None or args or kwargs
    ):
        results.extend(map(target, iters[low:high]))
        return
    prefix = () if state is None else (state,)
    append = results.append
    for j in range(low, high):
        head = prefix if iters is None else (*prefix, iters[j])
        if margs is not None:
            head = (*head, *margs[j])
        if mkwargs is not None:
            append(target(*head, *args, **mkwargs[j], **kwargs))
        else:
            append(target(*head, *args, **kwargs))


def _dump(results: list[Any], sent: int, start: int | None) -> tuple[bool, bytes]:
    """``(True, pickled results)``, or ``(False, failure record)`` for the first result
    that does not pickle."""
    try:
        return True, S.dumps_any(results)
    except Exception:
        pass
    i, exc = S.first_unpicklable(results)
    item = "" if start is None else f" for item {start + sent + i}"
    unpicklable = TypeError(
        f"the result{item} (a {type(results[i]).__name__}) cannot be pickled: {exc}. "
        f"Return plain data (or an importable class)"
    )
    return False, failure(results[:i], sent + i, unpicklable)


# -- failures ------------------------------------------------------------------------------


class Failure(NamedTuple):
    """A failure record: where and how a chunk failed."""

    results: bytes  # pickled results before the failure (those not sent in parts)
    offset: int  # the failing item's position in its chunk
    error: bytes  # the serialized exception
    pid: int
    host: str

    def rebuild(self, index: int, what: str) -> BaseException:
        """The exception, raised anew here for item ``index`` of ``what`` (e.g. a task).

        Its ``__cause__`` is a :class:`~zproc.RemoteTraceback` with the worker's traceback
        and where it ran; a note says the same where exceptions take notes.
        """
        exc = S.loads_exception(self.error)
        cause = exc.__cause__
        tb = cause.tb if isinstance(cause, RemoteTraceback) else ""
        where = f"in worker process {self.pid} on {self.host}"
        exc.__cause__ = RemoteTraceback(f"{what} item {index} failed {where}:\n{tb}")
        add_note = getattr(exc, "add_note", None)
        if add_note is not None:
            try:
                add_note(f"(raised by {what} for item {index}, {where})")
            except Exception:
                pass
        return exc


def failure(
    results: Sequence[Any], offset: int, error: BaseException, body: bytes | None = None
) -> bytes:
    """The failure record of a chunk whose item ``offset`` raised ``error``.

    ``results``: those computed before it and not sent yet (``body``: already pickled).
    """
    if body is None:
        try:
            body = S.dumps_any(list(results))
        except Exception:
            body = S.dumps([])
    record = (body, offset, S.dumps_exception(error), os.getpid(), platform.node())
    return S.dumps(record)


def read_chunk(
    ok: bool, body: bytes | memoryview, start: int, what: str
) -> tuple[list[Any], BaseException | None]:
    """``(results, error)`` of a chunk's reply that starts at item ``start`` of ``what``:
    the results and ``None`` (``ok``), or those before the failure and the rebuilt error."""
    if ok:
        return S.loads(body), None
    record = Failure(*S.loads(body))
    return S.loads(record.results), record.rebuild(start + record.offset, what)
