"""Reliability with real processes: servers killed with SIGKILL, restarted, and persisted.

* liveness: a request in flight, a blocked watcher and ``Process.wait()`` raise
  ``ServerUnavailableError`` within the configured bound once the server is killed (or
  frozen, found out by heartbeats); a write in flight across a pause says its outcome is
  unknown without claiming a restart; a client started before any server times out with
  a message naming ``start_server``;
* durability (``persist=``): every acknowledged write of a writer process survives a
  ``kill -9`` in the middle of 10,000 writes (``fsync="always"``); compaction keeps the
  state and the sequence numbers exact, and happens across restarts; a start decodes
  only the rows after the snapshot; an extended list or str is journaled as its tail;
  format 1 files are read; each server run is recorded;
* reconnection: a State and a watcher carry on across a restart at the same address,
  the watcher seeing every value once, in order.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import kill9, make_address, stop

import zproc
from zproc import _protocol as P
from zproc import _serialization as S

FORK = multiprocessing.get_context("fork")


# -- helpers -----------------------------------------------------------------------------


def kill_later(process: Any, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, os.kill, (process.pid, signal.SIGKILL))
    timer.start()
    return timer


def head(state: zproc.State) -> int:
    return P.head_reply(state._request(P.Kind.HEAD, 0, b""))[0]


def sleep_on_server(d: dict[str, Any], seconds: float) -> None:
    time.sleep(seconds)
    d["slept"] = True


# -- liveness ----------------------------------------------------------------------------


def test_request_in_flight_raises_when_the_server_is_killed(
    ipc_address: zproc.ServerAddress,
) -> None:
    proc, address = zproc.start_server(ipc_address)
    try:
        with zproc.State(address, liveness=1.0) as state:
            state["x"] = 1
            timer = kill_later(proc, 0.3)
            t0 = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError) as info:
                zproc.atomic(sleep_on_server)(state, 30)
            elapsed = time.monotonic() - t0
            timer.join()
        assert 0.3 < elapsed < 0.3 + 1.0 + 1.5, elapsed
        assert address.req_rep in str(info.value)
        assert "outcome of the request in flight is unknown" in str(info.value)
    finally:
        stop(proc)


def test_blocked_watcher_raises_when_the_server_is_killed(
    ipc_address: zproc.ServerAddress,
) -> None:
    proc, address = zproc.start_server(ipc_address)
    try:
        with zproc.State(address, liveness=1.0) as state:
            state["x"] = 1
            timer = kill_later(proc, 0.5)
            t0 = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError, match="lost the connection"):
                state.get_when_change("x", timeout=None)
            elapsed = time.monotonic() - t0
            timer.join()
        # liveness, plus at most one idle check interval of the watcher, plus slack
        assert 0.5 < elapsed < 0.5 + 1.0 + 1.0 + 1.5, elapsed
    finally:
        stop(proc)


def test_a_frozen_server_is_found_out_by_heartbeats() -> None:
    """SIGSTOP: the sockets stay open but nothing answers (like an unreachable host). The
    heartbeats drop the connection (1 s interval + liveness), then liveness runs out."""
    address = make_address("tcp")
    proc, _ = zproc.start_server(address)
    try:
        with zproc.State(address, liveness=1.0) as state:
            state["x"] = 1
            os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError, match="unreachable"):
                state["x"]
            elapsed = time.monotonic() - t0
            assert 2.0 < elapsed < 1.0 + 2 * 1.0 + 1.5, elapsed
            os.kill(proc.pid, signal.SIGCONT)
            assert state["x"] == 1  # it answers again: so does the State
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


def test_a_write_in_flight_across_a_pause_has_an_unknown_outcome() -> None:
    """A 5 s SIGSTOP: the heartbeats drop the connection (liveness 3 s), the server comes
    back before liveness runs out. The client cannot tell a pause from a restart: the
    message says what it knows."""
    address = make_address("tcp")
    proc, _ = zproc.start_server(address)
    try:
        with zproc.State(address, liveness=3.0) as state:
            state["x"] = 1
            os.kill(proc.pid, signal.SIGSTOP)
            timer = threading.Timer(5.0, os.kill, (proc.pid, signal.SIGCONT))
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError) as info:
                # a write the resumed server may still apply: one that replies late, so
                # that the reconnection is seen first whatever the machine's load
                zproc.atomic(sleep_on_server)(state, 2.0)
            elapsed = time.monotonic() - t0
            timer.join()
            assert state["x"] == 1  # usable again (the write may or may not be applied)
        message = str(info.value)
        assert 5.0 <= elapsed < 5.0 + 3.0, elapsed
        assert "lost while a request was in flight, and it is back" in message, message
        assert "cannot tell a restarted server from one that was paused" in message
        assert "(it restarted)" not in message
        assert "outcome of the request is unknown" in message
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


def watch_until_the_end(state: zproc.State) -> None:
    state["child"] = "ready"
    state.get_when_change("never-set", timeout=None)


def test_process_wait_raises_when_the_server_is_killed(
    ipc_address: zproc.ServerAddress,
) -> None:
    """The child's State fails within its (default, 3 s) liveness; wait() says why."""
    proc, address = zproc.start_server(ipc_address)
    child = None
    try:
        with zproc.State(address) as state:
            child = zproc.Process(address, watch_until_the_end)
            assert state.get_when_equal("child", "ready", timeout=20) == "ready"
            time.sleep(0.2)  # the child blocks in its watcher
            kill9(proc)
            t0 = time.monotonic()
            with pytest.raises(zproc.ProcessWaitError) as info:
                child.wait(timeout=20)
            elapsed = time.monotonic() - t0
        assert elapsed < 3.0 + 1.0 + 2.0, elapsed
        assert isinstance(info.value.__cause__, zproc.ServerUnavailableError)
        assert address.req_rep in str(info.value.__cause__)
        assert info.value.exitcode == 1
    finally:
        if child is not None:
            child.close()
        stop(proc)


def test_a_client_started_before_any_server_names_start_server(
    ipc_address: zproc.ServerAddress,
) -> None:
    t0 = time.monotonic()
    with zproc.State(ipc_address, connect_timeout=1.0) as state, pytest.raises(
        zproc.ServerUnavailableError
    ) as info:
        state["x"] = 1
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed
    assert "zproc.start_server" in str(info.value)
    assert ipc_address.req_rep in str(info.value)


def test_liveness_is_validated_and_kept_by_copies(ipc_address: zproc.ServerAddress) -> None:
    with pytest.raises(ValueError, match="liveness"):
        zproc.State(ipc_address, liveness=0)
    with zproc.State(ipc_address, liveness=7.5, connect_timeout=1) as state:
        with state.fork() as copy:
            assert copy._liveness == 7.5
        assert state.__reduce__()[1][-1] == 7.5


# -- durability and reconnection -----------------------------------------------------------


def test_persist_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        zproc.start_server(persist=tmp_path / "s.db", fsync="sometimes")
    with pytest.raises(ValueError, match="does not exist"):
        zproc.start_server(persist=tmp_path / "missing" / "s.db")
    with pytest.raises(ValueError, match="compact_after"):
        zproc.start_server(persist=tmp_path / "s.db", compact_after=0)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(zproc.ServerError, match="not a zproc persist file"):
        zproc.start_server(persist=junk)
    proc, _ = zproc.start_server(persist=tmp_path / "s.db")
    try:
        with pytest.raises(zproc.ServerError, match="in use by another zproc server"):
            zproc.start_server(persist=tmp_path / "s.db")
    finally:
        stop(proc)


WRITES = 10_000


def write_many(address: zproc.ServerAddress, acked: Any, count: int) -> None:
    """Write k0..k{count-1}; after each acknowledged write, record its index in ``acked``."""
    with zproc.State(address, liveness=10.0, request_timeout=30) as state:
        i = 0
        while i < count:
            try:
                state[f"k{i}"] = i
            except zproc.ServerUnavailableError:
                continue  # lost in the crash (outcome unknown): write it again
            acked.value = i
            i += 1


@pytest.mark.timeout(120)
def test_every_acknowledged_write_survives_kill9(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    path = tmp_path / "state.db"
    server, _ = zproc.start_server(ipc_address, persist=path, fsync="always")
    acked = FORK.Value("q", -1, lock=False)
    writer = FORK.Process(target=write_many, args=(ipc_address, acked, WRITES))
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while acked.value < WRITES // 3 and time.monotonic() < deadline:
            assert writer.exitcode is None, "the writer failed"
            time.sleep(0.005)
        kill9(server)
        last = acked.value  # nothing is acknowledged by a dead server
        assert WRITES // 3 <= last < WRITES - 1
        server, _ = zproc.start_server(ipc_address, persist=path, fsync="always")
        with zproc.State(ipc_address) as state:
            got = state.copy()
            missing = [i for i in range(last + 1) if got.get(f"k{i}") != i]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
            writer.join(60)  # the writer reconnects and finishes
            assert writer.exitcode == 0
            final = state.copy()
            assert final == {f"k{i}": i for i in range(WRITES)}
            assert head(state) >= WRITES  # one event per write (a retried one: one more)
    finally:
        stop(writer)
        stop(server)


PAD = "x" * 4096  # 200 such events overflow every queue between a server and a client


def watch_values(address: zproc.ServerAddress, conn: Any, last: int) -> None:
    """Send every value of "n" seen by a buffered watcher, until ``last``.

    Slow until the first half is written, with a tiny receive queue: it misses most of the
    events the killed server published and must fetch them from the restarted one.
    """
    with zproc.State(address, liveness=10.0, rcvhwm=4) as state:
        watcher = state.when_change("n")
        conn.send("ready")
        for snapshot in watcher:
            n = snapshot["n"][0]
            conn.send((n, watcher._cursor.seq))
            if n == last:
                break
            if n < last // 2:
                time.sleep(0.005)
    conn.close()


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_a_watcher_resumes_across_a_restart(
    tmp_path: Path, ipc_address: zproc.ServerAddress, fsync: str
) -> None:
    path = tmp_path / "state.db"
    # compactions at 100 and 200: the restarted server replays from journal rows kept
    # before its snapshot; the history (1000) holds every event, so a watcher slowed down
    # by a busy machine is never far enough behind to be resynchronised
    options: dict[str, Any] = {
        "persist": path, "fsync": fsync, "compact_after": 100, "history_size": 1000
    }
    server, _ = zproc.start_server(ipc_address, **options)
    receiver, sender = FORK.Pipe(duplex=False)
    watcher = FORK.Process(target=watch_values, args=(ipc_address, sender, 400))
    watcher.start()
    sender.close()
    try:
        assert receiver.poll(20) and receiver.recv() == "ready"
        with zproc.State(ipc_address, liveness=10.0) as state:
            for n in range(1, 201):
                state["n"] = (n, PAD)
            kill9(server)
            server, _ = zproc.start_server(ipc_address, **options)
            for n in range(201, 401):
                state["n"] = (n, PAD)
                if n == 300:
                    state["other"] = "a change the watcher does not report"
        seen: list[tuple[int, int]] = []
        while not seen or seen[-1][0] != 400:
            assert receiver.poll(20), f"the watcher stopped after {seen[-3:]}"
            seen.append(receiver.recv())
        assert [n for n, _ in seen] == list(range(1, 401))
        seqs = [seq for _, seq in seen]
        assert seqs == sorted(set(seqs))  # each sequence number once, in order
        assert seqs[-1] == 401  # 400 writes of n and one of "other", numbered on
        watcher.join(10)
        assert watcher.exitcode == 0
    finally:
        receiver.close()
        stop(watcher)
        stop(server)


def apply_ops(d: dict[str, Any], ops: list[tuple[str, Any, Any]]) -> int:
    for op, key, value in ops:
        if op == "set":
            d[key] = value
        elif op == "del":
            d.pop(key, None)
        elif op == "append":
            d.setdefault(key, []).append(value)
    return len(d)


def test_compaction_keeps_the_state_exact(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    path = tmp_path / "state.db"
    options: dict[str, Any] = {"persist": path, "compact_after": 50, "history_size": 20}
    server, _ = zproc.start_server(ipc_address, **options)
    rng = random.Random(7)
    model: dict[str, dict[str, Any]] = {"default": {}, "other": {}}
    heads: dict[str, int] = {}
    try:
        states = {name: zproc.State(ipc_address, namespace=name) for name in model}
        try:
            for step in range(600):
                name = rng.choice(["default", "default", "other"])
                state, expected = states[name], model[name]
                key = f"k{rng.randrange(30)}"
                roll = rng.random()
                if roll < 0.5:
                    state[key] = expected[key] = rng.random()
                elif roll < 0.65:
                    state.pop(key, None)
                    expected.pop(key, None)
                elif roll < 0.8:
                    batch = {f"u{rng.randrange(10)}": step, key: [step]}
                    state.update(batch)
                    expected.update(batch)
                elif roll < 0.97:
                    ops = [("append", f"l{rng.randrange(3)}", step), ("del", key, None)]
                    zproc.atomic(apply_ops)(state, ops)
                    apply_ops(expected, ops)
                else:
                    state.clear()
                    expected.clear()
            for name, state in states.items():
                assert state.copy() == model[name]
                heads[name] = head(state)
        finally:
            for state in states.values():
                state.close()
        kill9(server)
        with sqlite3.connect(path) as db:  # the killed server left its log: recovered here
            rows = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
            snapshots = dict(db.execute("SELECT namespace, seq FROM snapshot").fetchall())
        db.close()
        assert rows <= 2 * 20 + 50 + 2, rows  # kept history per namespace + one interval
        assert snapshots and all(0 < seq <= heads[name] for name, seq in snapshots.items())
        server, _ = zproc.start_server(ipc_address, **options)
        for name, expected in model.items():
            with zproc.State(ipc_address, namespace=name) as state:
                assert state.copy() == expected
                assert head(state) == heads[name]
                # the replay history came back too: the last events can be fetched again
                body = P.fetch_request(heads[name] - 5, False, b"")
                latest, _, events, _, _ = state._request(P.Kind.FETCH, 0, body)
                assert latest == heads[name]
                assert [ev.seq for ev in events] == list(range(heads[name] - 4, heads[name] + 1))
    finally:
        stop(server)


def journal_counts(path: Path) -> tuple[int, int, int]:
    """(snapshot seq of "default", journal rows, rows after that snapshot) of a stopped
    server's file."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT seq FROM snapshot WHERE namespace = 'default'").fetchone()
        snapshot = 0 if row is None else row[0]
        rows = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        after = db.execute("SELECT COUNT(*) FROM journal WHERE seq > ?", (snapshot,)).fetchone()
    db.close()
    return snapshot, rows, after[0]


@pytest.mark.timeout(120)
def test_compaction_counts_rows_across_restarts(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """Six runs of 60 changes with compact_after=100, ended by SIGKILL or SIGTERM: the
    rows after the snapshot are counted from the file, so compaction happens anyway."""
    path = tmp_path / "state.db"
    options: dict[str, Any] = {"persist": path, "compact_after": 100, "history_size": 20}
    expected: dict[str, int] = {}
    n = 0
    for run in range(6):
        server, _ = zproc.start_server(ipc_address, **options)
        try:
            with zproc.State(ipc_address, liveness=10.0) as state:
                for _ in range(60):
                    n += 1
                    state[f"k{n % 7}"] = expected[f"k{n % 7}"] = n
                assert head(state) == n
        finally:
            if run % 2:
                stop(server)  # SIGTERM: the server commits and closes the file
            else:
                kill9(server)
        snapshot, rows, after = journal_counts(path)
        assert after == n - snapshot < 100, (run, snapshot, rows)
        assert rows <= 20 + 100, (run, rows)
    assert snapshot == 300  # compacted at 100, 200 and 300 rows, across runs
    # 60 rows after the snapshot reach a lower compact_after: the first batch compacts
    server, _ = zproc.start_server(ipc_address, **{**options, "compact_after": 50})
    try:
        with zproc.State(ipc_address) as state:
            assert state.copy() == expected
            assert head(state) == 360
            body = P.fetch_request(340, False, b"")
            latest, _, events, _, _ = state._request(P.Kind.FETCH, 0, body)
            assert latest == 360 and [ev.seq for ev in events] == list(range(341, 361))
            assert all(ev.changes == {f"k{ev.seq % 7}": ev.seq} for ev in events)
            assert all(ev.old == {f"k{ev.seq % 7}": ev.seq - 7} for ev in events)
    finally:
        kill9(server)
    assert journal_counts(path) == (360, 20, 0)


def test_a_start_decodes_only_the_rows_after_the_snapshot(
    tmp_path: Path, ipc_address: zproc.ServerAddress, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay history (rows before and after the snapshot) stays encoded at start;
    only the rows after the snapshot (fewer than compact_after) are decoded."""
    from zproc._persist import Store
    from zproc._store import Raw, decode_history

    path = tmp_path / "state.db"
    server, _ = zproc.start_server(ipc_address, persist=path, compact_after=50,
                                   history_size=100)
    try:
        with zproc.State(ipc_address) as state:
            for i in range(1, 231):
                state["big"] = [f"{i}:{j}" for j in range(200)]
    finally:
        kill9(server)
    assert journal_counts(path) == (200, 130, 30)  # compacted at 200, history of 100
    decoded: list[int] = []
    decode_event = P.decode_event

    def counting(frame: Any) -> P.Event:
        event = decode_event(frame)
        decoded.append(event.seq)
        return event

    monkeypatch.setattr(P, "decode_event", counting)
    store = Store(path, compact_after=50, keep=100)
    try:
        ((name, seq, data, history),) = store.load()
        assert decoded == list(range(201, 231))
        assert (name, seq) == ("default", 230) and data == {"big": [f"230:{j}" for j in range(200)]}
        assert len(history) == 100 and all(type(entry) is Raw for entry in history)
        # decoded on demand: the last 10 entries only
        assert decode_history(history, 90, data)
        assert decoded[30:] == list(range(230, 220, -1))
        events = [entry[0] for entry in history[90:]]  # type: ignore[index]
        assert [ev.seq for ev in events] == list(range(221, 231))
        assert all(ev.old == {"big": [f"{ev.seq - 1}:{j}" for j in range(200)]} for ev in events)
        assert all(type(entry) is Raw for entry in history[:90])
    finally:
        store.close()


def append_item(d: dict[str, Any], key: str, item: Any) -> None:
    d[key].append(item)


@pytest.mark.timeout(120)
def test_equal_items_of_another_type_are_journaled_whole(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """[1, 1, ...] replaced by [1.0, 1.0, ..., 2] compares equal on its prefix, but is not
    an extension: recovery gives back the floats (and True stays True)."""
    options: dict[str, Any] = {"persist": tmp_path / "state.db"}
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state:
            state["l"] = [1] * 100
            state["l"] = [1.0] * 100 + [2]
            state["t"] = (0,) * 100
            state["t"] = (False,) * 100 + (True,)
    finally:
        kill9(server)
    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state:
            assert [type(x) for x in state["l"]] == [float] * 100 + [int]
            assert [type(x) for x in state["t"]] == [bool] * 101
    finally:
        stop(server)


def test_an_extended_value_is_journaled_as_its_tail(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """Appends to a 4,000-item list (atomic, or a client's whole new list) and to a str
    write rows of about the appended size; recovery and the replay history rebuild the
    exact values, including around changes stored whole and across a compaction."""
    path = tmp_path / "state.db"
    options: dict[str, Any] = {"persist": path, "compact_after": 40, "history_size": 100}
    server, _ = zproc.start_server(ipc_address, **options)
    model: dict[str, Any] = {}
    timeline: dict[int, dict[str, Any]] = {0: {}}  # seq -> the model after it
    kinds: dict[int, str] = {}
    append = zproc.atomic(append_item)

    def step(kind: str) -> None:
        seq = len(timeline)
        timeline[seq] = {key: value[:] for key, value in model.items()}
        kinds[seq] = kind

    try:
        with zproc.State(ipc_address, liveness=10.0) as state:
            state["items"] = model["items"] = list(range(4000))
            step("whole")
            state["text"] = model["text"] = "t" * 100
            step("small")
            for i in range(70):
                if i == 30:
                    state["items"] = model["items"] = model["items"][:-5]  # shorter: whole
                    step("whole")
                elif i % 10 == 9:
                    state["items"] = model["items"] = state["items"] + [("tuple", i), None]
                    step("set tail")
                elif i % 7 == 3:
                    state["text"] = model["text"] = model["text"] + f"+{i}"
                    step("str tail")
                else:
                    append(state, "items", {"i": i})
                    model["items"].append({"i": i})
                    step("append")
            assert head(state) == len(timeline) - 1
            assert state.copy() == model
    finally:
        kill9(server)
    with sqlite3.connect(path) as db:
        sizes = dict(db.execute("SELECT seq, LENGTH(event) + LENGTH(old) FROM journal"))
        (snapshot,) = db.execute("SELECT seq FROM snapshot").fetchone()
    db.close()
    assert snapshot == 40 and len(sizes) == len(timeline) - 1  # compacted, nothing cut
    for seq, size in sizes.items():
        if kinds[seq] == "whole":
            assert size > 10_000, (seq, size)
        else:
            assert size < 1000, (seq, kinds[seq], size)

    server, _ = zproc.start_server(ipc_address, **options)
    try:
        with zproc.State(ipc_address) as state:
            assert state.copy() == model
            items = state["items"]
            assert type(items) is list and items == model["items"]
            assert items[-2] == ("tuple", 69) and type(items[-2]) is tuple
            last = len(timeline) - 1
            # a change in memory after the restart: the replay walks through it too
            append(state, "items", "after restart")
            model["items"].append("after restart")
            step("append")
            for _ in range(2):  # decoded on the first fetch, kept decoded for the second
                body = P.fetch_request(last - 60, False, b"")
                latest, _, events, _, _ = state._request(P.Kind.FETCH, 0, body)
                assert latest == last + 1
                assert [ev.seq for ev in events] == list(range(last - 59, last + 2))
                for ev in events:
                    after, before = timeline[ev.seq], timeline[ev.seq - 1]
                    assert ev.changes == {key: after[key] for key in ev.changes}, ev.seq
                    assert ev.old == {key: before[key] for key in ev.changes if key in before}
                    assert all(type(v) is type(after[k]) for k, v in ev.changes.items())
    finally:
        stop(server)


def test_a_format_1_file_is_read_and_upgraded(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
        db.execute("CREATE TABLE snapshot (namespace TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
                   "data BLOB NOT NULL)")
        db.execute("CREATE TABLE journal (namespace TEXT NOT NULL, seq INTEGER NOT NULL, "
                   "event BLOB NOT NULL, old BLOB, PRIMARY KEY (namespace, seq)) WITHOUT ROWID")
        db.execute("INSERT INTO meta VALUES ('format', 1)")
        db.execute("INSERT INTO snapshot VALUES ('default', 2, ?)",
                   (S.dumps({"a": 1, "b": list(range(100))}),))
        changes = [({"a": 1}, {}), ({"b": list(range(100))}, {}), ({"b": list(range(101))},
                   {"b": list(range(100))})]
        for seq, (change, old) in enumerate(changes, 1):
            _, frame = P.new_event(seq, b"", 0.0, change, (), old)
            db.execute("INSERT INTO journal VALUES ('default', ?, ?, ?)",
                       (seq, frame, S.dumps(old)))
    db.close()
    server, _ = zproc.start_server(ipc_address, persist=path)
    try:
        with zproc.State(ipc_address) as state:
            assert state.copy() == {"a": 1, "b": list(range(101))}
            body = P.fetch_request(0, False, b"")
            latest, _, events, _, _ = state._request(P.Kind.FETCH, 0, body)
            assert latest == 3 and [ev.changes for ev in events] == [c for c, _ in changes]
            assert [ev.old for ev in events] == [o for _, o in changes]
            state["b"] = list(range(102))  # journaled as a tail: format 2 from now on
    finally:
        stop(server)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() == (2,)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
    db.close()


def test_each_server_run_is_recorded_with_the_heads_it_started_from(
    tmp_path: Path, ipc_address: zproc.ServerAddress, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zproc import _persist
    from zproc._server import Server

    path = tmp_path / "state.db"
    server, _ = zproc.start_server(ipc_address, persist=path, fsync="never")
    try:
        with zproc.State(ipc_address) as state:
            state["x"] = 1
            with zproc.State(ipc_address, namespace="other") as other:
                other.update({"y": 1, "z": 2})
    finally:
        kill9(server)  # the run was recorded durably at start, whatever fsync says
    server, _ = zproc.start_server(ipc_address, persist=path, fsync="never")
    stop(server)

    live = Server(None, persist=path, fsync="never")
    try:
        assert type(live.run_token) is bytes and len(live.run_token) == 8
        lineage = live.lineage
        assert len(lineage) == 3 and lineage[-1] == (live.run_token, {"default": 1, "other": 1})
        assert [heads for _, heads in lineage[:2]] == [{}, {"default": 1, "other": 1}]
        assert len({token for token, _ in lineage}) == 3
        assert all(type(token) is bytes and len(token) == 8 for token, _ in lineage)
    finally:
        live.close()
    memory = Server(None)
    try:
        assert memory.lineage == [(memory.run_token, {})]
    finally:
        memory.close()

    monkeypatch.setattr(_persist, "MAX_RUNS", 4)
    store = _persist.Store(path)
    try:
        heads = {name: seq for name, seq, _, _ in store.load()}
        tokens = [bytes([i]) * 8 for i in range(3)]
        for token in tokens:
            lineage = store.begin_run(token, heads)
        assert len(lineage) == 4 and [token for token, _ in lineage[1:]] == tokens
        assert lineage[-1] == (tokens[-1], {"default": 1, "other": 1})
    finally:
        store.close()


def test_a_read_in_flight_is_resent_after_a_quick_restart(
    tmp_path: Path, ipc_address: zproc.ServerAddress
) -> None:
    """A read queued behind a long atomic call is answered by the restarted server; the
    atomic call itself (a write) reports that its outcome is unknown."""
    path = tmp_path / "state.db"
    server, _ = zproc.start_server(ipc_address, persist=path)
    errors: list[BaseException] = []

    def busy() -> None:
        with zproc.State(ipc_address, liveness=10.0) as other:
            try:
                zproc.atomic(sleep_on_server)(other, 30)
            except zproc.ZProcError as exc:
                errors.append(exc)

    try:
        with zproc.State(ipc_address, liveness=10.0) as state:
            state["k"] = "kept"
            thread = threading.Thread(target=busy)
            thread.start()
            time.sleep(0.3)  # the server sleeps in the atomic call

            def restart() -> None:
                nonlocal server
                kill9(server)
                server, _ = zproc.start_server(ipc_address, persist=path)

            timer = threading.Timer(0.3, restart)
            timer.start()
            t0 = time.monotonic()
            assert state["k"] == "kept"  # sent to the old server, answered by the new one
            assert time.monotonic() - t0 < 8
            timer.join()
            thread.join(15)
            assert len(errors) == 1 and isinstance(errors[0], zproc.ServerUnavailableError)
            assert "outcome of the request is unknown" in str(errors[0])
            assert "slept" not in state
    finally:
        stop(server)


def test_every_second_commits_while_idle(tmp_path: Path, ipc_address: zproc.ServerAddress) -> None:
    path = tmp_path / "state.db"
    server, _ = zproc.start_server(ipc_address, persist=path, fsync="every second")
    try:
        with zproc.State(ipc_address, liveness=10.0) as state:
            state.update({f"k{i}": i for i in range(10)})
            state["last"] = "written"
            time.sleep(1.6)  # no request arrives: the idle server commits within ~1.2 s
            kill9(server)
            server, _ = zproc.start_server(ipc_address, persist=path, fsync="every second")
            assert state["last"] == "written"
            assert len(state) == 11
            assert head(state) == 2
            state["at exit"] = True
            stop(server)  # SIGTERM at once: the server commits on its way out
            server, _ = zproc.start_server(ipc_address, persist=path, fsync="every second")
            assert state["at exit"] is True
            assert head(state) == 3
    finally:
        stop(server)


def test_a_watcher_whose_server_lost_its_state_raises_then_starts_again(
    ipc_address: zproc.ServerAddress,
) -> None:
    """No persist: the restarted server numbers from 0 again. A blocked watcher says so
    instead of ignoring the new server's changes; its next call works."""
    server, _ = zproc.start_server(ipc_address)
    try:
        with zproc.State(ipc_address, liveness=10.0) as state:
            for i in range(5):
                state["x"] = i

            def restart() -> None:
                nonlocal server
                kill9(server)
                server, _ = zproc.start_server(ipc_address)

            timer = threading.Timer(0.3, restart)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(zproc.ServerUnavailableError, match="without persist"):
                state.get_when_change("x", timeout=20)
            assert time.monotonic() - t0 < 5
            timer.join()
            with zproc.State(ipc_address) as writer:
                later = threading.Timer(0.3, writer.__setitem__, ("x", "new"))
                later.start()
                assert state.get_when_change("x", timeout=10) == "new"
                later.join()
    finally:
        stop(server)
