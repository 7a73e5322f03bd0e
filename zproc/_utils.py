"""Small helpers that belong to no other module."""

from __future__ import annotations

import collections
import itertools
import os
import stat
from collections.abc import Iterable
from typing import Any

__all__ = ["check_private", "consume", "in_server_process", "mark_server_process"]

#: Mode bits of a file that only its owner may read and write.
OWNER_ONLY = 0o077
#: Mode bits of a file (or directory) that only its owner may change.
NOT_WRITABLE_BY_OTHERS = 0o022

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


def _user_name(uid: int) -> str:
    try:
        import pwd  # POSIX only; imported where used so that Windows can import this module

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private(
    path: str, what: str, forbidden: int, *, allow_root: bool = False
) -> os.stat_result | None:
    """Refuse ``path`` unless the current user owns it and no ``forbidden`` mode bit is set.

    ``forbidden`` is :data:`OWNER_ONLY` (secrets: no access for group or others) or
    :data:`NOT_WRITABLE_BY_OTHERS`; ``allow_root`` also accepts an owner of uid 0 (for
    directories such as ``/var/lib``). Returns the file's status, or None when it does not
    exist (and on systems without Unix owners).

    Raises
    ------
    PermissionError
        Another user owns ``path``, or its mode has a ``forbidden`` bit; the message names
        the file, its owner and mode, and the ``chown``/``chmod`` that fixes it.
    """
    if os.name != "posix":
        return None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    owner_ok = info.st_uid == me or (allow_root and info.st_uid == 0)
    if owner_ok and not mode & forbidden:
        return info
    fixes = []
    if not owner_ok:
        fixes.append(f"chown {_user_name(me)} {path}")
    if mode & forbidden:
        who = "go-rwx" if forbidden == OWNER_ONLY else "go-w"
        fixes.append(f"chmod {who} {path}")
    rule = (
        "readable or writable only by its owner"
        if forbidden == OWNER_ONLY
        else "writable only by its owner"
    )
    raise PermissionError(
        f"refusing {what} {path}: it is owned by {_user_name(info.st_uid)} with mode "
        f"{mode:04o}, but it must be owned by {_user_name(me)} (the user running zproc) "
        f"and {rule}, or another local user could read or replace it. Fix: "
        f"{' and '.join(fixes)}"
    )
