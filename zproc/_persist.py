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
        event  the event frame as broadcast, big values in the pickle (not as buffers):
               (seq, origin, timestamp, changes, deleted, None), or, when a list, str,
               bytes or tuple value was extended, (..., marks)
               where marks is {key: previous length} and changes[key] the new tail only
        old    pickled {key: previous value} of the keys it changed or deleted (except
               the marked ones: their previous value is the new one's prefix), so that a
               restarted server can replay these events to clients (FETCH) again
    runs(id INTEGER PRIMARY KEY, token BLOB, heads TEXT)          one row per server run
        token  the run's random token; heads: JSON {namespace: seq} it started from
    coord(namespace TEXT, name TEXT, kind TEXT, value INTEGER, flag INTEGER)
                                                                  named queues and events
        value  a queue's maxsize; flag: whether an event is set
    queue_items(namespace TEXT, name TEXT, position INTEGER, item BLOB)
                                                                  unacknowledged items
        written with the batch that put them, deleted with the one that acknowledged
        them: what was in flight at a crash is at the head of its queue again

Locks, semaphores and barriers are not kept: they come back free (their holders'
grants are unknown to the next run, whose fencing tokens are higher).

Format 1 files (no marks, no runs) are read, and upgraded to format 2 when opened.

Recovery (:meth:`Store.load`): per namespace, the snapshot (or ``{}`` at 0), then every
journal row after the snapshot's sequence number, in order; those rows and the ones kept
before the snapshot seed the replay history, undecoded (:class:`~zproc._store.Raw`): they
are decoded when a client first fetches them (:func:`~zproc._store.decode_history`), so
that the start time depends on the rows after the snapshots, not on the history. State
and sequence numbers continue exactly where the last commit left them, so watchers resume
without losing or repeating events.

Compaction, once the journal holds ``compact_after`` rows after the snapshots (counted
from the file at load, so restarts do not postpone it): a fresh snapshot of every
namespace changed since its last snapshot, and the journal cut down to the newest
``keep`` rows per namespace (the replay history), in one transaction.

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

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import _protocol as P
from . import _serialization as S
from ._store import MISSING, HistoryEntry, Raw
from ._utils import NOT_WRITABLE_BY_OTHERS, check_private
from .exceptions import ServerError

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "DEFAULT_COMPACT_AFTER",
    "FSYNC_POLICIES",
    "Store",
    "check_fsync",
]

log = logging.getLogger("zproc")

FORMAT = 2
#: Formats :class:`Store` opens (older ones are upgraded to ``FORMAT`` on open).
READABLE_FORMATS = (1, 2)
FSYNC_POLICIES = ("always", "every second", "never")
#: Journal rows after the snapshots that trigger a compaction, by default.
DEFAULT_COMPACT_AFTER = 10_000
#: With ``fsync="every second"``: the longest a batch waits for its commit, in seconds.
COMMIT_INTERVAL = 1.0
#: Shortest previous value (items) whose extension is journaled as its tail only.
DELTA_MIN = 64
#: Server runs kept in the ``runs`` table.
MAX_RUNS = 1000

_SYNCHRONOUS = {"always": "FULL", "every second": "FULL", "never": "OFF"}
_SEQUENCES = frozenset({list, str, bytes, tuple})
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
    (
        "CREATE TABLE IF NOT EXISTS runs "
        "(id INTEGER PRIMARY KEY, token BLOB NOT NULL, heads TEXT NOT NULL)"
    ),
    (
        "CREATE TABLE IF NOT EXISTS coord (namespace TEXT NOT NULL, name TEXT NOT NULL, "
        "kind TEXT NOT NULL, value INTEGER NOT NULL, flag INTEGER NOT NULL, "
        "PRIMARY KEY (namespace, name)) WITHOUT ROWID"
    ),
    (
        "CREATE TABLE IF NOT EXISTS queue_items (namespace TEXT NOT NULL, name TEXT NOT NULL, "
        "position INTEGER NOT NULL, item BLOB NOT NULL, "
        "PRIMARY KEY (namespace, name, position)) WITHOUT ROWID"
    ),
)
_INSERT = "INSERT INTO journal (namespace, seq, event, old) VALUES (?, ?, ?, ?)"


#: What :meth:`Store.load` returns per namespace: name, seq, dict, replay history.
Loaded = tuple[str, int, dict[Any, Any], list[HistoryEntry]]
#: A recorded server run: its token and the head of each namespace it started from.
Run = tuple[bytes, dict[str, int]]


class CoordJournal(Protocol):
    """What a commit writes of the coordination tables (``zproc._coordqueue.Journal``)."""

    declared: dict[tuple[str, str], tuple[str, int, bool]]
    added: list[tuple[str, str, int, bytes]]
    removed: list[tuple[str, str, int]]

    @property
    def pending(self) -> bool: ...

    def clear(self) -> None: ...


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


def _extensions(changes: dict[Any, Any], old: dict[Any, Any]) -> dict[Any, int] | None:
    """{key: previous length} of the values in ``changes`` that extend their ``old`` one.

    A new value extends the previous one when it has the same type, is longer and starts
    with the previous value: exactly (a list or tuple whose items compare equal but
    differ, ``1`` and ``1.0`` say, must be journaled whole, so their pickles are compared).
    """
    marks: dict[Any, int] | None = None
    for key, before in old.items():
        kind = type(before)
        if kind not in _SEQUENCES or len(before) < DELTA_MIN:
            continue
        after = changes.get(key, MISSING)
        if type(after) is not kind or len(after) <= len(before):
            continue
        try:
            if kind is str or kind is bytes:
                extends = after.startswith(before)
            else:
                prefix = after[: len(before)]
                extends = bool(prefix == before) and S.dumps(prefix) == S.dumps(before)
        except Exception:  # an item whose comparison fails: store the whole value
            extends = False
        if extends:
            if marks is None:
                marks = {}
            marks[key] = len(before)
    return marks


def _inconsistent(path: str, name: str, seq: int, what: str) -> ServerError:
    return ServerError(
        f"the persist file {path} is inconsistent: namespace {name!r}, change {seq}: {what}"
    )


def _apply(data: dict[Any, Any], event: P.Event, path: str, name: str) -> None:
    """Apply one journal row to ``data`` (recovery, oldest row first)."""
    for key in event.deleted:
        data.pop(key, None)
    marks = event.old
    if not marks:
        data.update(event.changes)
        return
    changes = dict(event.changes)
    for key, length in marks.items():
        before = data.get(key, MISSING)
        tail = changes[key]
        if type(before) is not type(tail) or len(before) != length:
            raise _inconsistent(path, name, event.seq, f"{key!r} does not have {length} items")
        changes[key] = before + tail
    data.update(changes)


#: The files SQLite keeps next to the database.
_COMPANIONS = ("", "-wal", "-shm", "-journal")


def check_files(path: str) -> None:
    """Refuse a persist file (or its WAL, or its directory) that another local user owns or
    may write: its rows are unpickled by the server, as the server's user.

    Raises
    ------
    PermissionError
        Which file, its owner and mode, and the ``chown``/``chmod`` that fixes it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    check_private(folder, "the directory of the persist file", NOT_WRITABLE_BY_OTHERS,
                  allow_root=True)
    for suffix in _COMPANIONS:
        check_private(path + suffix, "the persist file", NOT_WRITABLE_BY_OTHERS)


class Store:
    """The database of one server: :meth:`load` once, then :meth:`append` and :meth:`commit`.

    Parameters
    ----------
    path
        The database file (created if missing; its directory must exist).
    fsync
        ``"always"``, ``"every second"`` or ``"never"`` (see the module docstring).
    compact_after
        Journal rows after the snapshots (whatever the server runs that wrote them) that
        trigger a compaction.
    keep
        Journal rows kept per namespace by a compaction (the replay history).

    Raises
    ------
    ServerError
        The file is not a zproc database, is used by another server, or cannot be opened.
    PermissionError
        The file, its WAL or its directory is owned by another user or writable by group
        or others (see :func:`check_files`).
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
        self._unsnapshotted = 0  # journal rows after the snapshots, in the file and queued
        self.last_snapshot: float | None = None  # time.time() of this run's last snapshot
        self._snapshots: dict[str, int] = {}  # namespace -> seq of its snapshot
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        import sqlite3  # only servers with persist= pay for the import

        check_files(self.path)
        if os.name == "posix":
            # SQLite creates the WAL with the mode of the database file: 0600 for both
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600)
                os.close(fd)
            except FileExistsError:
                os.chmod(self.path, 0o600)  # ours (checked): nobody else reads the state

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
            row = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if row is not None:
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is not None and row[0] not in READABLE_FORMATS:
                raise ServerError(
                    f"the persist file {self.path} has format {row[0]}; this zproc reads "
                    f"formats {', '.join(map(str, READABLE_FORMATS))}. Use the zproc "
                    f"version that wrote it"
                )
            for statement in _SCHEMA:
                db.execute(statement)
            # a format 1 reader would misread the rows written from now on: upgrade
            db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (FORMAT,))
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

        Only the rows after each snapshot are decoded; the history holds :class:`~zproc._store.Raw`
        entries (see :func:`~zproc._store.decode_history`).

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
        lasts = dict(db.execute("SELECT namespace, MAX(seq) FROM journal GROUP BY namespace"))
        names = set(snapshots) | set(lasts)
        loaded: list[Loaded] = []
        unsnapshotted = 0
        for name in sorted(names):
            seq, blob = snapshots.get(name, (0, None))
            data: dict[Any, Any] = {} if blob is None else dict(S.loads(blob))
            self._snapshots[name] = seq
            # the rows to replay, and the rows before them that may seed the history
            first = min(seq, int(lasts.get(name) or 0) - self.keep)
            rows = db.execute(
                "SELECT seq, event, old FROM journal WHERE namespace = ? AND seq > ? "
                "ORDER BY seq",
                (name, first),
            ).fetchall()
            history: list[HistoryEntry] = []
            head = last_kept = seq
            for row_seq, frame, old in rows:
                if row_seq > seq:
                    if row_seq != head + 1:
                        raise _inconsistent(self.path, name, row_seq, f"it follows {head}")
                    _apply(data, P.decode_event(frame), self.path, name)
                    head = row_seq
                    unsnapshotted += 1
                if old is None:
                    history.clear()  # a change without previous values cannot be replayed
                    continue
                if history and last_kept + 1 != row_seq:
                    history.clear()  # only a contiguous run can be replayed
                history.append(Raw(bytes(frame), bytes(old)))
                last_kept = row_seq
            if history and last_kept != head:
                history.clear()  # kept rows that do not reach the snapshot
            if len(history) > self.keep:
                del history[: len(history) - self.keep]
            loaded.append((name, head, data, history))
        self._unsnapshotted = unsnapshotted
        return loaded

    def load_coord(
        self,
    ) -> tuple[list[tuple[str, str, str, int, bool]], list[tuple[str, str, int, bytes]]]:
        """The queues and events kept, ``(namespace, name, kind, value, flag)``, and the
        queues' items ``(namespace, name, position, item)``, in order per queue."""
        db = self._db
        declared = [
            (str(ns), str(name), str(kind), int(value), bool(flag))
            for ns, name, kind, value, flag in db.execute(
                "SELECT namespace, name, kind, value, flag FROM coord"
            )
        ]
        items = [
            (str(ns), str(name), int(position), bytes(item))
            for ns, name, position, item in db.execute(
                "SELECT namespace, name, position, item FROM queue_items "
                "ORDER BY namespace, name, position"
            )
        ]
        return declared, items

    def begin_run(self, token: bytes, heads: Mapping[str, int]) -> list[Run]:
        """Record a new server run, durably; return every recorded run, oldest first.

        Parameters
        ----------
        token
            The run's random token.
        heads
            The head sequence number of every loaded namespace.

        Returns
        -------
        list of (token, heads)
            The lineage: the last :data:`MAX_RUNS` runs, the new one last.
        """
        if not isinstance(token, bytes):
            raise TypeError(f"token must be bytes, got {type(token).__name__}")
        db = self._db
        if self._open_since is not None:
            self._commit()
        record = json.dumps({str(name): int(seq) for name, seq in heads.items()})
        relaxed = _SYNCHRONOUS[self.fsync] != "FULL"
        if relaxed:  # this commit is synced whatever the policy
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN")
            db.execute("INSERT INTO runs (token, heads) VALUES (?, ?)", (token, record))
            db.execute("DELETE FROM runs WHERE id <= (SELECT MAX(id) FROM runs) - ?", (MAX_RUNS,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            if relaxed:
                db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
        #: This run's number in the file: grows by one per run (the newest row is never
        #: deleted, so SQLite never reuses an id).
        self.run_number = int(db.execute("SELECT MAX(id) FROM runs").fetchone()[0])
        return [
            (bytes(run_token), {str(k): int(v) for k, v in json.loads(run_heads).items()})
            for run_token, run_heads in db.execute("SELECT token, heads FROM runs ORDER BY id")
        ]

    # -- writing -------------------------------------------------------------------------

    def append(self, namespace: str, event: P.Event, frame: bytes) -> None:
        """Queue one committed change (``event.old`` holds the previous values).

        A value that extends its previous one (a list, str, bytes or tuple of at least
        :data:`DELTA_MIN` items) is journaled as its tail and the previous length.
        """
        old = event.old or {}
        marks = _extensions(event.changes, old) if old else None
        if marks is not None:
            changes = dict(event.changes)
            old = dict(old)
            for key, length in marks.items():
                changes[key] = changes[key][length:]
                del old[key]
            frame = S.dumps(
                (event.seq, event.origin, event.timestamp, changes, event.deleted, marks)
            )
        elif type(frame) is not bytes:  # big values as buffers: the row holds them in-band
            frame = P.encode_event(event)
        try:
            blob: bytes | None = S.dumps(old)
        except S.PICKLING_ERRORS:  # values encoded once do not fail here; be safe anyway
            blob = None
        self._pending.append((namespace, event.seq, frame, blob))

    def commit(
        self, namespaces: Mapping[str, NamespaceLike], coord: CoordJournal | None = None
    ) -> None:
        """End of a server batch: write the queued rows (and what ``coord`` collected),
        commit as the policy says, compact.

        Raises
        ------
        sqlite3.Error
            The disk failed; the server must stop (nothing of this batch was acknowledged).
        """
        pending = self._pending
        if pending or (coord is not None and coord.pending):
            db = self._db
            if self._open_since is None:
                db.execute("BEGIN")
                self._open_since = time.monotonic()
            if pending:
                db.executemany(_INSERT, pending)
                self._unsnapshotted += len(pending)
                pending.clear()
            if coord is not None and coord.pending:
                self._write_coord(coord)
        if self._open_since is not None and (
            self.fsync != "every second"
            or time.monotonic() - self._open_since >= COMMIT_INTERVAL
        ):
            self._commit()
        if self._unsnapshotted >= self.compact_after:
            self.compact(namespaces)

    def _write_coord(self, coord: CoordJournal) -> None:
        db = self._db
        if coord.declared:
            db.executemany(
                "INSERT OR REPLACE INTO coord (namespace, name, kind, value, flag) "
                "VALUES (?, ?, ?, ?, ?)",
                [(ns, name, kind, value, int(flag))
                 for (ns, name), (kind, value, flag) in coord.declared.items()],
            )
        if coord.added:
            db.executemany(
                "INSERT INTO queue_items (namespace, name, position, item) VALUES (?, ?, ?, ?)",
                coord.added,
            )
        if coord.removed:
            db.executemany(
                "DELETE FROM queue_items WHERE namespace = ? AND name = ? AND position = ?",
                coord.removed,
            )
        coord.clear()

    def idle(self, namespaces: Mapping[str, NamespaceLike]) -> None:
        """Called while the server waits: commit a transaction that is due; compact if due
        (e.g. a file loaded with ``compact_after`` rows after its snapshots)."""
        if self._open_since is not None and (
            time.monotonic() - self._open_since >= COMMIT_INTERVAL
        ):
            self._commit()
        if self._unsnapshotted >= self.compact_after:
            self.compact(namespaces)

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._open_since = None

    def compact(self, namespaces: Mapping[str, NamespaceLike]) -> None:
        """Snapshot every namespace changed since its snapshot; keep ``keep`` rows of each."""
        self._unsnapshotted = 0
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
        self.last_snapshot = time.time()
        for name, seq, _ in snapshots:
            self._snapshots[name] = seq

    @property
    def journal_rows(self) -> int:
        """Journal rows after the last snapshot (a start decodes them)."""
        return self._unsnapshotted

    def close(
        self,
        namespaces: Mapping[str, NamespaceLike] | None = None,
        coord: CoordJournal | None = None,
    ) -> None:
        """Commit what is queued and close the database. Idempotent."""
        db = self._db
        if db is None:
            return
        try:
            if (self._pending or self._open_since is not None
                    or (coord is not None and coord.pending)):
                self.fsync = "always"  # commit now, whatever the policy
                self.commit(namespaces or {}, coord)
        finally:
            self._db = None  # type: ignore[assignment]
            db.close()
