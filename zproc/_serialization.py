"""Serialization: the only module that imports pickle and cloudpickle.

Data (keys, values, change sets, results) travels with the standard :mod:`pickle` at
protocol 5, which is the fastest option and keeps user classes importable by reference.
Code (``atomic`` functions, process targets, ``process_map`` callables) travels with
cloudpickle, so that lambdas, closures, default arguments and functions defined in
``__main__`` work in another process. An ``atomic`` function that travels by value is
pickled once (:func:`pickled_function`) and named by the digest of its pickle afterwards.

Big buffers (``bytes``, ``bytearray`` and ``memoryview`` values, and objects that give
pickle protocol 5 out-of-band buffers, such as NumPy arrays) leave the pickle as buffers of
their own with :func:`dumps_buffers`, for the wire to send without copying them.
"""

from __future__ import annotations

import hashlib
import operator
import pickle
import pickletools
import re
import sys
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from .exceptions import ProtocolError, RemoteTraceback, ServerError

__all__ = [
    "PROTOCOL",
    "dumps",
    "dumps_any",
    "dumps_buffers",
    "dumps_changes",
    "dumps_call",
    "dumps_code",
    "dumps_exception",
    "first_unpicklable",
    "function_digest",
    "loads",
    "loads_exception",
    "loads_exception_text",
    "loads_frames",
    "pickled_function",
]

PROTOCOL = 5

#: Errors that mean "this cannot be pickled".
PICKLING_ERRORS = (pickle.PicklingError, TypeError, AttributeError, RecursionError)

_MISSING_CLASS = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def dumps(obj: Any) -> bytes:
    """Serialize data (keys, values, results) with pickle protocol 5."""
    return pickle.dumps(obj, PROTOCOL)


def loads(data: bytes | memoryview, buffers: Sequence[Any] | None = None) -> Any:
    """Deserialize data produced by :func:`dumps`, :func:`dumps_code` or
    :func:`dumps_buffers` (with the ``buffers`` that came with it, each used once).

    A value whose class cannot be imported here raises :class:`ProtocolError` with a
    message naming the class and the usual cause, as do buffers that do not match.
    """
    try:
        if not buffers:
            return pickle.loads(data)
        unused = iter(buffers)
        obj = pickle.loads(data, buffers=unused)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise ProtocolError(_unimportable_message(exc)) from exc
    except pickle.UnpicklingError as exc:
        if "out-of-band" not in str(exc):
            raise ProtocolError(f"cannot decode a message body: {exc!r}") from exc
        raise ProtocolError(
            f"a message body needs more out-of-band frames than the "
            f"{len(buffers or ())} its message has: send each buffer of the body once, "
            f"in order, after it"
        ) from exc
    except Exception as exc:
        raise ProtocolError(f"cannot decode a message body: {exc!r}") from exc
    extra = sum(1 for _ in unused)
    if extra:
        raise ProtocolError(
            f"a message has {extra} out-of-band frame(s) more than its body uses "
            f"({len(buffers)} sent): send each buffer of the body once, after it"
        )
    return obj


#: Buffers of at least this many bytes leave the pickle (:func:`dumps_buffers`).
OUT_OF_BAND = 64 * 1024
#: Types whose values hold no buffer to leave the pickle.
LEAVES = frozenset({int, float, str, bool, complex, type(None)})


def dumps_buffers(
    obj: Any, depth: int = 2, copy_writable: bool = False
) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` (protocol 5), leaving out its buffers of :data:`OUT_OF_BAND` bytes
    or more: ``(pickle, buffers)``, for :func:`loads` ``(pickle, buffers)``.

    The buffers are those of objects with protocol 5 out-of-band support (NumPy arrays),
    and ``bytes``, ``bytearray`` and ``memoryview`` objects that are ``obj`` itself or are
    reached from it through at most ``depth`` tuples (named ones too), lists and dict
    values. A ``memoryview`` is read back as ``bytes``. Nothing is copied (the buffers are
    views of ``obj``'s memory), except with ``copy_writable``: a buffer that could change
    in place (a ``bytearray``'s, a NumPy array's) is then copied once, into ``bytes``, for
    a message that may leave after its value changed.
    """
    if type(obj) is tuple:  # the arguments of most calls: nothing big can hide in them
        for item in obj:
            if type(item) not in LEAVES:
                break
        else:
            return pickle.dumps(obj, PROTOCOL), []
    buffers: list[memoryview] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: in the pickle
            return True
        if view.nbytes < OUT_OF_BAND:
            return True
        if copy_writable and not view.readonly:
            view = memoryview(view.tobytes())
        buffers.append(view)
        return False

    return pickle.dumps(_big_buffers(obj, depth), PROTOCOL, buffer_callback=keep), buffers


def dumps_changes(
    record: tuple[Any, ...], values: Iterable[Any], depth: int = 2
) -> tuple[bytes, list[memoryview]]:
    """:func:`dumps_buffers` of ``record`` (``copy_writable``), where ``values`` are the
    values in it that may hold buffers: a plain pickle, fast, when none of them can."""
    for value in values:
        kind = type(value)
        if kind not in LEAVES and (kind is not bytes or len(value) >= OUT_OF_BAND):
            return dumps_buffers(record, depth, True)
    return pickle.dumps(record, PROTOCOL), []


class _Buffer:
    """A ``bytes``, ``bytearray`` or ``memoryview`` pickled as a protocol 5 buffer."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray | memoryview) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Any, ...]:
        obj = self.obj
        if type(obj) is memoryview and not obj.contiguous:
            return bytes, (obj.tobytes(),)
        return (_bytearray if type(obj) is bytearray else bytes), (pickle.PickleBuffer(obj),)


def _bytearray(buffer: Any) -> bytearray:
    """A ``bytearray`` of an out-of-band buffer: the buffer itself when it is one."""
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def loads_frames(data: bytes | memoryview, frames: Sequence[Any]) -> Any:
    """:func:`loads` ``(data, frames)``, for frames that may be read-only (``bytes``): a
    buffer the pickle takes as writable (a ``bytearray``'s, a NumPy array's) is given a
    writable copy of its frame, the others (``bytes`` values) their frame as it is."""
    writable: list[bool] = []
    try:
        for opcode, _, _ in pickletools.genops(bytes(data)):  # small: no buffers in it
            if opcode.name == "NEXT_BUFFER":
                writable.append(True)
            elif opcode.name == "READONLY_BUFFER" and writable:
                writable[-1] = False
    except Exception as exc:
        raise ProtocolError(f"cannot decode a message body: {exc!r}") from exc
    if len(writable) == len(frames):
        frames = [bytearray(frame) if want and type(frame) is bytes else frame
                  for want, frame in zip(writable, frames, strict=True)]
    return loads(data, frames)  # a count that does not match raises there


def _big_buffers(obj: Any, depth: int) -> Any:
    """``obj`` with its big ``bytes``-like parts (see :func:`dumps_buffers`) wrapped."""
    kind = type(obj)
    if kind is memoryview or ((kind is bytes or kind is bytearray) and len(obj) >= OUT_OF_BAND):
        return _Buffer(obj)
    if not depth or kind in LEAVES:
        return obj
    if kind is dict:
        for value in obj.values():
            if type(value) not in LEAVES and _big_buffers(value, depth - 1) is not value:
                return {key: _big_buffers(value, depth - 1) for key, value in obj.items()}
    elif kind is tuple or kind is list or (isinstance(obj, tuple) and hasattr(kind, "_make")):
        for item in obj:
            if type(item) not in LEAVES and _big_buffers(item, depth - 1) is not item:
                items = [_big_buffers(item, depth - 1) for item in obj]
                if kind is list:
                    return items
                return tuple(items) if kind is tuple else kind._make(items)
    return obj


def dumps_code(obj: Any) -> bytes:
    """Serialize functions (and whatever holds them) by value where needed (cloudpickle)."""
    data: bytes = cloudpickle.dumps(obj, PROTOCOL)
    return data


def dumps_any(obj: Any) -> bytes:
    """Plain pickle, or cloudpickle for what it refuses (lambdas, ``__main__`` classes)."""
    try:
        return dumps(obj)
    except PICKLING_ERRORS:
        return dumps_code(obj)


def first_unpicklable(values: Sequence[Any]) -> tuple[int, Exception]:
    """Index and error of the first of ``values`` that :func:`dumps_any` refuses.

    For a list that :func:`dumps_any` refused as a whole (one of its items is the cause).
    """
    for i, value in enumerate(values):
        try:
            dumps_any(value)
        except Exception as exc:
            return i, exc
    raise AssertionError("a list that does not pickle has an item that does not pickle")


def dumps_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Serialize a call ``(fn, args, kwargs)`` for another process.

    A function importable by name from a module other than ``__main__`` travels by
    reference with the plain pickler (what cloudpickle would do too, only faster); any
    other function (lambdas, closures, ``__main__``) travels by value with cloudpickle.
    """
    ref = _reference(fn)
    if ref is not None:
        try:
            return pickle.dumps((ref, args, kwargs), PROTOCOL)
        except PICKLING_ERRORS:
            pass
    return dumps_code((fn, args, kwargs))


#: Functions pickled by value, kept (at most this many, oldest out first) with their pickle.
PICKLED_FUNCTIONS = 256
#: function -> (what its pickle depends on, digest, pickle)
_pickled: dict[Any, tuple[tuple[Any, ...], bytes, bytes]] = {}
#: code object -> the names it (and the code nested in it) may read as globals
_global_names: dict[Any, tuple[str, ...]] = {}
_ABSENT = object()


def function_digest(data: bytes | memoryview) -> bytes:
    """The name of a pickled function: the blake2b digest (32 bytes) of its pickle."""
    return hashlib.blake2b(data, digest_size=32).digest()


def pickled_function(fn: Any) -> tuple[bytes, bytes, bool] | None:
    """``(digest, pickle, new)`` of a plain function that travels by value (cloudpickle),
    or None for any other callable (those travel with :func:`dumps_call`).

    The pickle is made once and re-used while the objects it was made from are the same
    ones: the code, defaults, attributes, closure cells' contents and the globals the code
    names (rebinding any of them pickles the function again; an object changed in place is
    not noticed). ``new``: the pickle was made by this call.
    """
    if type(fn) is not types.FunctionType or _reference(fn) is not None:
        return None
    parts = _pickle_parts(fn)
    entry = _pickled.get(fn)
    if entry is not None:
        kept = entry[0]
        if len(kept) == len(parts) and all(map(operator.is_, kept, parts)):
            return entry[1], entry[2], False
    data = dumps_code(fn)
    digest = function_digest(data)
    _pickled.pop(fn, None)
    while len(_pickled) >= PICKLED_FUNCTIONS:
        del _pickled[next(iter(_pickled))]
    _pickled[fn] = (parts, digest, data)
    return digest, data, True


def _pickle_parts(fn: types.FunctionType) -> tuple[Any, ...]:
    """The objects the pickle of ``fn`` is made from (compared by identity)."""
    code = fn.__code__
    names = _global_names.get(code)
    if names is None:
        if len(_global_names) >= 4 * PICKLED_FUNCTIONS:
            _global_names.clear()
        names = _global_names[code] = tuple(sorted(set(_names_in(code))))
    parts = (code, fn.__defaults__, fn.__kwdefaults__)
    if fn.__closure__:
        parts += tuple(_cell_contents(cell) for cell in fn.__closure__)
    if names:
        namespace = fn.__globals__
        parts += tuple([namespace.get(name, _ABSENT) for name in names])
    if fn.__dict__:
        parts += tuple(fn.__dict__.values())
    return parts


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _ABSENT


def _names_in(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_names_in(const))
    return names


def _reference(fn: Any) -> Any:
    """What to pickle by name for ``fn``: itself, the decorator wrapper bound to its name
    (the receiver unwraps it through ``__wrapped__``), or None (send it by value)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is fn or (callable(obj) and getattr(obj, "__wrapped__", None) is fn):
        return obj
    return None


def _unimportable_message(exc: BaseException) -> str:
    match = _MISSING_CLASS.search(str(exc))
    if match:
        name, module = match.groups()
        return (
            f"cannot load a value of class {module}.{name}: the class is not importable in "
            f"this process. Define the class in an importable module (or before the server "
            f"starts), then send the value again."
        )
    return (
        f"cannot load a value: {exc}. Its class or module is not importable in this "
        f"process; define it in an importable module."
    )


# -- exceptions ------------------------------------------------------------------------


def dumps_exception(exc: BaseException) -> bytes:
    """Serialize an exception with its traceback text, for re-raising in another process.

    Falls back to a description (type name, message, traceback) when the exception itself
    cannot be pickled or would not unpickle.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        body = pickle.dumps(exc, PROTOCOL)
        pickle.loads(body)  # an exception with a custom __init__ may not round-trip
    except Exception:
        body = None
    return pickle.dumps((body, _qualname(type(exc)), str(exc), tb), PROTOCOL)


def loads_exception(data: bytes | memoryview) -> BaseException:
    """Rebuild an exception from :func:`dumps_exception`, with the remote traceback as cause.

    When the original type cannot be rebuilt here, returns a :class:`ServerError` carrying
    the remote type name, message and traceback text.
    """
    return loads_exception_text(data)[0]


def loads_exception_text(data: bytes | memoryview) -> tuple[BaseException, str]:
    """:func:`loads_exception`, and ``str(exc)`` as the sending process had it.

    Some exceptions lose their message in pickling (the one rebuilt here may read
    differently); the message sent alongside is the original one.
    """
    try:
        body, type_name, message, tb = pickle.loads(data)
    except Exception as error:
        rebuilt: BaseException = ProtocolError(f"cannot decode an error reply: {error!r}")
        return rebuilt, str(rebuilt)
    exc: BaseException | None = None
    if body is not None:
        try:
            exc = pickle.loads(body)
        except Exception:
            exc = None
    if exc is None:
        exc = ServerError(f"{type_name}: {message}", remote_type=type_name, remote_traceback=tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc, str(message)


def _qualname(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
