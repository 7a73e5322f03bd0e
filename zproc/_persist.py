"""Durable state for a server (``start_server(persist=PATH)``): snapshots plus a journal.

One SQLite database (the standard library's :mod:`sqlite3`) in WAL mode holds, per
namespace, a snapshot of the dict at some sequence number and an append-only journal of
the change sets committed after it. Why SQLite in WAL mode rather than files of our own:

* **atomic commits**: the journal rows of a server batch, or a whole compaction (new
  snapshots written, old rows deleted), are one transaction: on disk entirely or not at
  all, with no framing, checksums or rename dance to write and get right;
* **crash safety**: a commit appends to the write-ahead log and (``synchronous=FULL``)
  syncs it once; after a ``kill -9`` or a power loss, the next open recovers exactly the
  committed transactions (log frames carry checksums, a torn tail is ignored);
* **no new dependency**: sqlite3 ships with Python; WAL appends are sequential writes.

Layout::

    meta(key TEXT PRIMARY KEY, value)                             "format" -> FORMAT
    snapshot(namespace TEXT PRIMARY KEY, seq INTEGER, data BLOB)  pickled dict at seq
    journal(namespace TEXT, seq INTEGER, event BLOB, old BLOB)    one row per change
        event  the event frame as broadcast: (seq, origin, timestamp, changes, deleted)
        old    pickled {key: previous value} of the keys it changed or deleted, so that a
               restarted server can replay these events to clients (FETCH) again

Recovery (:meth:`Store.load`): per namespace, the snapshot (or ``{}`` at 0), then every
journal row after the snapshot's sequence number, in order; those rows and the ones kept
before the snapshot seed the replay history. State and sequence numbers continue exactly
where the last commit left them, so watchers resume without losing or repeating events.

Compaction, once ``compact_after`` rows were appended since the last one: a fresh
snapshot of every namespace changed since its last snapshot, and the journal cut down to
the newest ``keep`` rows per namespace (the replay history), in one transaction.

Policies (``fsync=``), per acknowledged write:

==============  ==========================================  ===========================
policy          when a batch is committed                   lost in a crash
==============  ==========================================  ===========================
always          before its events and replies are sent,     nothing (process or OS
                log synced (``synchronous=FULL``)           crash, power loss)
every second    batches share one transaction, committed    about the last second
                (and synced) at most once per second, and   (process or OS crash)
                at shutdown
never           after each batch, no sync                   nothing on a process crash;
                (``synchronous=OFF``: the OS decides)       recent writes on an OS crash
==============  ==========================================  ===========================

With ``every second``, events are published before their commit: after a crash, clients
may have seen changes the restarted server lacks; their watchers then raise
:class:`~zproc.ServerUnavailableError` instead of resuming. A failing disk stops the server
(:meth:`Store.commit` raises): nothing it could not store is acknowledged.

The database holds pickles: load it only from a path you trust, like code. One server at
a time may use a path (the database is locked exclusively while the server runs).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import _protocol as P
from . import _serialization as S
from .exceptions import ServerError

if TYPE_CHECKING:
    import sqlite3

__all__ = ["DEFAULT_COMPACT_AFTER", "FSYNC_POLICIES", "Store", "check_fsync"]

log = logging.getLogger("zproc")

FORMAT = 1
FSYNC_POLICIES = ("always", "every second", "never")
#: Journal rows appended between two compactions, by default.
DEFAULT_COMPACT_AFTER = 10_000
#: With ``fsync="every second"``: the longest a batch waits for its commit, in seconds.
COMMIT_INTERVAL = 1.0

_SYNCHRONOUS = {"always": "FULL", "every second": "FULL", "never": "OFF"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    (
        "CREATE TABLE IF NOT EXISTS snapshot "
        "(namespace TEXT PRIMARY KEY, seq INTEGER NOT NULL, data BLOB NOT NULL)"
    ),
    (
        "CREATE TABLE IF NOT EXISTS journal (namespace TEXT NOT NULL, seq INTEGER NOT NULL, "
        "event BLOB NOT NULL, old BLOB, PRIMARY KEY (namespace, seq)) WITHOUT ROWID"
    ),
)
_INSERT = "INSERT INTO journal (namespace, seq, event, old) VALUES (?, ?, ?, ?)"

#: What :meth:`Store.load` returns per namespace: name, seq, dict, replay history.
Loaded = tuple[str, int, dict[Any, Any], list[tuple[P.Event, bytes]]]


class NamespaceLike(Protocol):
    """What compaction reads of a server namespace."""

    @property
    def seq(self) -> int: ...

    @property
    def data(self) -> dict[Any, Any]: ...


def check_fsync(fsync: object) -> str:
    """Return ``fsync`` if it names a policy; raise :class:`ValueError` otherwise."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(
            f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))}, got {fsync!r}"
        )
    return str(fsync)


class Store:
    """The database of one server: :meth:`load` once, then :meth:`append` and :meth:`commit`.

    Parameters
    ----------
    path
        The database file (created if missing; its directory must exist).
    fsync
        ``"always"``, ``"every second"`` or ``"never"`` (see the module docstring).
    compact_after
        Journal rows appended before the next compaction.
    keep
        Journal rows kept per namespace by a compaction (the replay history).

    Raises
    ------
    ServerError
        The file is not a zproc database, is used by another server, or cannot be opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str = "always",
        compact_after: int = DEFAULT_COMPACT_AFTER,
        keep: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.fsync = check_fsync(fsync)
        if compact_after < 1:
            raise ValueError(f"compact_after must be >= 1, got {compact_after!r}")
        self.compact_after = compact_after
        self.keep = max(0, keep)
        self._pending: list[tuple[str, int, bytes, bytes | None]] = []
        self._open_since: float | None = None  # monotonic time the open transaction began
        self._appended = 0  # rows since the last compaction
        self._snapshots: dict[str, int] = {}  # namespace -> seq of its snapshot
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        import sqlite3  # only servers with persist= pay for the import

        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=0,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise ServerError(f"cannot open the persist file {self.path}: {exc}") from exc
        try:
            # exclusive before WAL: the lock is held until close and no shared memory is used
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ServerError(f"the persist file {self.path} cannot use WAL mode ({mode})")
            db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
            db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif row[0] != FORMAT:
                raise ServerError(
                    f"the persist file {self.path} has format {row[0]}; this zproc reads "
                    f"format {FORMAT}. Use the zproc version that wrote it"
                )
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise ServerError(
                    f"the persist file {self.path} is in use by another zproc server; one "
                    f"server at a time may use it. Stop that server or choose another path"
                ) from exc
            raise ServerError(f"cannot use the persist file {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ServerError(
                f"{self.path} is not a zproc persist file (or it is damaged): {exc}"
            ) from exc
        except BaseException:
            db.close()
            raise
        return db

    # -- recovery ------------------------------------------------------------------------

    def load(self) -> list[Loaded]:
        """Every namespace on disk: ``(name, seq, dict, history)``, history oldest first.

        Raises
        ------
        ServerError
            A journal with a gap after its snapshot (the file was altered).
        ProtocolError
            A stored value whose class cannot be imported in this process.
        """
        db = self._db
        snapshots = {
            name: (int(seq), data)
            for name, seq, data in db.execute("SELECT namespace, seq, data FROM snapshot")
        }
        names = set(snapshots)
        names.update(name for (name,) in db.execute("SELECT DISTINCT namespace FROM journal"))
        loaded: list[Loaded] = []
        for name in sorted(names):
            seq, blob = snapshots.get(name, (0, None))
            data: dict[Any, Any] = {} if blob is None else dict(S.loads(blob))
            self._snapshots[name] = seq
            rows = db.execute(
                "SELECT seq, event, old FROM journal WHERE namespace = ? ORDER BY seq", (name,)
            ).fetchall()
            first_kept = len(rows) - self.keep  # the rows that may seed the history
            history: list[tuple[P.Event, bytes]] = []
            head = seq
            for index, (row_seq, frame, old) in enumerate(rows):
                kept = index >= first_kept and old is not None
                if row_seq <= seq and not kept:
                    continue  # already in the snapshot
                event = P.decode_event(frame)
                if row_seq > seq:
                    if row_seq != head + 1:
                        raise ServerError(
                            f"the persist file {self.path} is inconsistent: namespace "
                            f"{name!r} jumps from {head} to {row_seq}"
                        )
                    for key in event.deleted:
                        data.pop(key, None)
                    data.update(event.changes)
                    head = row_seq
                if not kept:
                    history.clear()  # a change without previous values cannot be replayed
                    continue
                if history and history[-1][0].seq + 1 != row_seq:
                    history.clear()  # only a contiguous run can be replayed
                history.append((event._replace(old=S.loads(old)), bytes(frame)))
            if history and history[-1][0].seq != head:
                history.clear()  # kept rows that do not reach the snapshot
            loaded.append((name, head, data, history))
        return loaded

    # -- writing -------------------------------------------------------------------------

    def append(self, namespace: str, event: P.Event, frame: bytes) -> None:
        """Queue one committed change (``event.old`` holds the previous values)."""
        try:
            old: bytes | None = S.dumps(event.old or {})
        except S.PICKLING_ERRORS:  # values encoded once do not fail here; be safe anyway
            old = None
        self._pending.append((namespace, event.seq, frame, old))

    def commit(self, namespaces: Mapping[str, NamespaceLike]) -> None:
        """End of a server batch: write the queued rows, commit as the policy says, compact.

        Raises
        ------
        sqlite3.Error
            The disk failed; the server must stop (nothing of this batch was acknowledged).
        """
        pending = self._pending
        if pending:
            db = self._db
            if self._open_since is None:
                db.execute("BEGIN")
                self._open_since = time.monotonic()
            db.executemany(_INSERT, pending)
            self._appended += len(pending)
            pending.clear()
        if self._open_since is not None and (
            self.fsync != "every second"
            or time.monotonic() - self._open_since >= COMMIT_INTERVAL
        ):
            self._commit()
        if self._appended >= self.compact_after:
            self.compact(namespaces)

    def idle(self) -> None:
        """Called while the server waits: commit a transaction that is due."""
        if self._open_since is not None and (
            time.monotonic() - self._open_since >= COMMIT_INTERVAL
        ):
            self._commit()

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._open_since = None

    def compact(self, namespaces: Mapping[str, NamespaceLike]) -> None:
        """Snapshot every namespace changed since its snapshot; keep ``keep`` rows of each."""
        self._appended = 0
        snapshots: list[tuple[str, int, bytes]] = []
        try:
            for name, ns in namespaces.items():
                if ns.seq and self._snapshots.get(name) != ns.seq:
                    snapshots.append((name, ns.seq, S.dumps(dict(ns.data))))
        except Exception:
            log.exception("zproc: compaction of %s skipped: a value cannot be pickled", self.path)
            return
        if not snapshots:
            return
        db = self._db
        if self._open_since is None:
            db.execute("BEGIN")
            self._open_since = time.monotonic()
        db.executemany(
            "INSERT OR REPLACE INTO snapshot (namespace, seq, data) VALUES (?, ?, ?)", snapshots
        )
        db.executemany(
            "DELETE FROM journal WHERE namespace = ? AND seq <= ?",
            [(name, seq - self.keep) for name, seq, _ in snapshots],
        )
        self._commit()
        for name, seq, _ in snapshots:
            self._snapshots[name] = seq

    def close(self, namespaces: Mapping[str, NamespaceLike] | None = None) -> None:
        """Commit what is queued and close the database. Idempotent."""
        db = self._db
        if db is None:
            return
        try:
            if self._pending or self._open_since is not None:
                self.fsync = "always"  # commit now, whatever the policy
                self.commit(namespaces or {})
        finally:
            self._db = None  # type: ignore[assignment]
            db.close()
