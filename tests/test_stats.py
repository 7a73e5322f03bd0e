"""A server you can watch: ``stats()``, the slow log, ``zproc stats``, metrics and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _netns import Output
from conftest import free_tcp_port, make_address, stop

import zproc
from zproc import _metrics, _security
from zproc import _protocol as P
from zproc import _serialization as S
from zproc._cli import EXIT_FAILURE, main
from zproc._client import Connection
from zproc._stats import SLOW_LOG_SIZE, Meter, kind_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sets(address: zproc.ServerAddress, namespace: str, count: int) -> None:
    with zproc.State(address, namespace=namespace, request_timeout=20) as state:
        for i in range(count):
            state[f"w{i % 7}"] = i


def _nap(_d: dict[Any, Any], seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def _by_kind(figures: dict[str, Any], kind: str) -> int:
    return int(figures["requests"]["by_kind"].get(kind, 0))


# -- stats() ----------------------------------------------------------------------------


def test_the_documented_keys_and_their_types(state: zproc.State) -> None:
    figures = state.stats()
    for key in ("pid", "version", "uptime", "clients", "requests", "namespaces", "slow_log",
                "events", "bytes", "memory", "persistence", "swarm", "coordination"):
        assert key in figures, key
    assert figures["pid"] == state.ping()
    assert figures["version"] == zproc.__version__
    assert isinstance(figures["uptime"], float) and figures["uptime"] >= 0
    assert set(figures["requests"]["per_second"]) == {"1s", "10s", "60s"}
    assert figures["memory"]["rss"] > 1_000_000
    assert figures["persistence"] is None and figures["swarm"] is None
    assert figures["coordination"] == {"primitives": 0, "held": 0, "waiters": 0,
                                       "sessions": 0, "queues": 0, "queued_items": 0,
                                       "items_in_flight": 0}


def test_counters_move_with_a_known_load(server: zproc.ServerAddress) -> None:
    n = 300
    with zproc.State(server, namespace="load", request_timeout=20) as state:
        state["seed"] = -1
        before = state.stats()
        writer = multiprocessing.Process(target=_sets, args=(server, "load", n))
        writer.start()
        try:
            writer.join(60)
            assert writer.exitcode == 0
        finally:
            stop(writer)
        for i in range(n):
            state[f"m{i % 5}"] = i
        for i in range(50):
            assert state.get(f"m{i % 5}") is not None
        after = zproc.stats(server)
    assert _by_kind(after, "set") - _by_kind(before, "set") == 2 * n
    assert _by_kind(after, "get") - _by_kind(before, "get") == 50
    assert after["requests"]["total"] - before["requests"]["total"] >= 2 * n + 50
    assert after["events"]["published"] - before["events"]["published"] == 2 * n
    assert after["namespaces"]["load"]["keys"] == 1 + 7 + 5
    assert after["namespaces"]["load"]["seq"] == 1 + 2 * n
    assert after["bytes"]["in"] > before["bytes"]["in"] + 2 * n * 10
    assert after["bytes"]["out"] > before["bytes"]["out"]
    # this State and the writer's made requests in the last 10 s (and the stats call)
    assert after["clients"] >= 2
    assert after["requests"]["per_second"]["60s"] > 0


def test_the_slow_log_catches_a_slow_atomic_call(server: zproc.ServerAddress) -> None:
    with zproc.State(server, namespace="sleepy", request_timeout=20) as state:
        for i in range(3 * SLOW_LOG_SIZE):  # fill the log with fast requests first
            state["x"] = i
        assert zproc.atomic(_nap)(state, 0.3) == "rested"
        log = state.stats()["slow_log"]
    assert len(log) == SLOW_LOG_SIZE
    slowest = log[0]
    assert slowest["kind"] == "atomic" and slowest["namespace"] == "sleepy"
    assert slowest["duration"] >= 0.3
    assert isinstance(slowest["client"], str) and len(slowest["client"]) == 16
    durations = [entry["duration"] for entry in log]
    assert durations == sorted(durations, reverse=True)


def test_async_stats(server: zproc.ServerAddress) -> None:
    async def main() -> dict[str, Any]:
        async with zproc.AsyncState(server, namespace="aio", request_timeout=20) as st:
            await st.set({"a": 1, "b": 2})
            return await st.stats()

    figures = asyncio.run(main())
    assert figures["namespaces"]["aio"]["keys"] == 2
    assert _by_kind(figures, "replace") == 1


def test_stats_arguments_are_checked(server: zproc.ServerAddress) -> None:
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        zproc.stats(server, timeout=-1)
    with pytest.raises(ValueError, match="slow_log_ms must be a number"):
        zproc.start_server(slow_log_ms=0)


def test_stats_of_no_server_times_out() -> None:
    with pytest.raises(zproc.TimeoutError, match="no zproc server answered a stats request"):
        zproc.stats(make_address("tcp"), timeout=0.3)


# -- the meter, alone -------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _frames(kind: int, method: int, namespace: str = "ns") -> list[bytes]:
    return [b"client01", P.request_frame(kind, method, 1, namespace.encode(), b"body")]


def test_meter_rates_slow_log_window_and_clients() -> None:
    clock, slow = _Clock(), []
    meter = Meter(0.05, lambda *entry: slow.append(entry), clock=clock)
    for second in range(20):  # 10 requests a second for 20 s
        clock.now = 1000.0 + second
        meter.begin()
        for _ in range(10):
            meter.note(_frames(int(P.Kind.CALL), int(P.Method.SETITEM)))
    meter.begin()
    clock.now += 0.2  # a slow request
    meter.note(_frames(int(P.Kind.ATOMIC), 0, "slowns"))
    assert meter.by_kind() == {"atomic": 1, "set": 200}
    rates = meter.rates()
    assert rates["10s"] == pytest.approx(10, rel=0.15)
    assert rates["60s"] == pytest.approx(201 / 19.2, rel=0.01)  # a young server: since start
    assert slow == [("atomic", "slowns", pytest.approx(0.2), b"client01".hex())]
    assert meter.slow_log()[0]["kind"] == "atomic"
    assert meter.clients() == 1
    clock.now += 61
    meter.begin()  # a minute later: the slow log and the clients are forgotten
    assert meter.slow_log() == [] and meter.clients() == 0
    assert kind_name(int(P.Kind.CALL) << 8 | int(P.Method.GETITEM)) == "get"
    assert kind_name(int(P.Kind.STATS) << 8) == "stats"


# -- the command line, metrics and logs -------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[zproc.ServerAddress, str, subprocess.Popen[str], Output]]:
    """``zproc serve -v --metrics`` on loopback, with a short history and slow log."""
    address = make_address("tcp")
    listen = f"127.0.0.1:{free_tcp_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zproc", "serve", *address, "--metrics", listen, "-v",
         "--slow-log-ms", "50", "--history-size", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    err, out = Output(proc.stderr), Output(proc.stdout)
    try:
        err.wait_for("metrics at", timeout=30)
        yield address, listen, proc, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        err.close()
        out.close()


def test_zproc_stats_json_and_table(
    served: tuple[zproc.ServerAddress, str, subprocess.Popen[str], Output],
) -> None:
    address = served[0]
    _sets(address, "cli", 40)
    run = subprocess.run(
        [sys.executable, "-m", "zproc", "stats", *address, "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert figures["pid"] == served[2].pid
    assert _by_kind(figures, "set") == 40
    assert figures["namespaces"]["cli"]["keys"] == 7
    watched = subprocess.run(
        [sys.executable, "-m", "zproc", "stats", *address, "--json", "--watch", "0.1",
         "--count", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert watched.returncode == 0, watched.stderr
    readings = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(readings) == 2 and readings[1]["uptime"] > readings[0]["uptime"]
    table = subprocess.run(
        [sys.executable, "-m", "zproc", "stats", *address],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )
    assert table.returncode == 0, table.stderr
    assert f"zproc server {served[2].pid}" in table.stdout
    assert "'cli'" in table.stdout and "slow log" in table.stdout
    assert "set 40" in table.stdout


def test_metrics_endpoint_and_server_logs(
    served: tuple[zproc.ServerAddress, str, subprocess.Popen[str], Output],
) -> None:
    address, listen, proc, err = served
    assert f"serving at {address.req_rep} {address.pub_sub}" in err.wait_for("INFO", 10)
    with zproc.State(address, namespace="m", request_timeout=20) as state:
        for i in range(20):
            state["k"] = i
        def nap(_d: dict[Any, Any], seconds: float) -> None:  # by value: serve can't import us
            time.sleep(seconds)

        zproc.atomic(nap)(state, 0.1)
        # a client far behind the 5-event history gets the whole namespace in one change
        conn = Connection(address)
        try:
            fetched = conn.request(int(P.Kind.FETCH), 0, S.dumps((1, False, b"")), b"m", 20)
        finally:
            conn.close()
        assert fetched[1] == {"k": 19}  # the snapshot, no events
        assert state.stats()["events"]["resets"] == 1
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=20) as response:
        assert response.status == 200
        text = response.read().decode()
    for name in ('zproc_requests_total{kind="set"} 20.0', 'zproc_requests_total{kind="atomic"}',
                 "zproc_clients ", 'zproc_namespace_keys{namespace="m"} 1.0',
                 "zproc_resident_memory_bytes ", "zproc_uptime_seconds ",
                 'zproc_requests_per_second{window="10s"}', "zproc_slowest_request_seconds ",
                 "zproc_events_published_total 20.0", "zproc_coord_waiters "):
        assert name in text, name
    assert "slow request: atomic in namespace 'm'" in err.wait_for("slow request", 10)
    assert "fell behind in namespace 'm' by 19 changes" in err.wait_for("fell behind", 10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM
    assert f"zproc server {proc.pid} stopped by signal {int(signal.SIGTERM)}" in err.wait_for(
        "stopped", 10)


def test_a_port_in_use_for_metrics_is_reported() -> None:
    address = make_address("tcp")
    port = free_tcp_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-m", "zproc", "serve", *address, "--metrics",
             f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        )
    assert run.returncode == EXIT_FAILURE
    assert "could not start" in run.stderr and "in use" in run.stderr.lower()


def test_metrics_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    with pytest.raises(ImportError, match=r'pip install "zproc\[metrics\]"'):
        _metrics.load_prometheus()
    address = make_address("tcp")
    assert main(["serve", *address, "--metrics", "127.0.0.1:9150"]) == EXIT_FAILURE
    assert 'pip install "zproc[metrics]"' in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["9150", "host:", ":9150", "127.0.0.1:0", "a.b:99999"])
def test_a_bad_metrics_address_is_a_usage_error(bad: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *make_address("tcp"), "--metrics", bad])
    assert exit_info.value.code == 2


def test_refused_clients_are_warned_once_a_minute_per_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = make_address("tcp")
    ctx = zmq.Context()
    keys = _security.server_keys("the right key 4b1d")
    assert keys is not None
    stats: dict[str, int] = {}
    server = ctx.socket(zmq.ROUTER)
    guard = _security.Guard(ctx, keys, stats)
    clients = []
    try:
        with caplog.at_level(logging.DEBUG, logger="zproc.server"):
            guard.start([("requests", server)])
            server.bind(address.req_rep)
            impostor = _security.ClientKeys(*zmq.curve_keypair(), keys.public)
            for _ in range(3):
                client = ctx.socket(zmq.DEALER)
                clients.append(client)
                _security.configure_client(client, impostor)
                client.connect(address.req_rep)
                client.send(b"x")
            deadline = time.monotonic() + 20
            while sum("refused a client" in r.message for r in caplog.records) < 3:
                assert time.monotonic() < deadline, "three refusals were not logged"
                time.sleep(0.05)
        refusals = [r for r in caplog.records if "refused a client" in r.message]
        assert all(r.name == "zproc.server" for r in refusals)
        assert [r.levelno for r in refusals].count(logging.WARNING) == 1
    finally:
        for client in clients:
            client.close(0)
        server.close(0)
        guard.close()
        ctx.term()


def _eventually(read: Any, check: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"{what}: last {value!r}"
        time.sleep(0.05)


def test_persistence_and_coordination_figures(tmp_path: Any) -> None:
    path = tmp_path / "state.db"
    process, address = zproc.start_server(persist=path, compact_after=10)
    try:
        with zproc.State(address, request_timeout=20) as state:
            for i in range(25):
                state["p"] = i
            figures = _eventually(state.stats, lambda f: f["persistence"]["last_snapshot"],
                                  "a snapshot after 25 changes with compact_after=10")
            persistence = figures["persistence"]
            assert persistence["path"] == str(path) and persistence["fsync"] == "always"
            assert persistence["file_bytes"] > 0
            assert 0 <= persistence["journal_rows"] < 25
            assert time.time() - 60 < persistence["last_snapshot"] <= time.time()
            lock = state.lock("job")
            assert lock.acquire(timeout=10)
            try:
                coord = state.stats()["coordination"]
                assert coord["primitives"] == 1 and coord["held"] == 1
                assert coord["waiters"] == 0 and coord["sessions"] == 1
            finally:
                lock.release()
            assert state.stats()["coordination"]["held"] == 0
            queue = state.queue("jobs", maxsize=10)
            for i in range(3):
                queue.put(i)
            coord = state.stats()["coordination"]
            assert coord["queues"] == 1 and coord["queued_items"] == 3
            assert coord["primitives"] == 2
    finally:
        stop(process)


def test_swarm_figures(ctx: zproc.Context) -> None:
    assert ctx.state.stats()["swarm"] is None
    swarm = ctx.create_swarm(2)
    assert swarm.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]
    figures = _eventually(ctx.state.stats, lambda f: f["swarm"] and f["swarm"]["workers"] == 2,
                          "two swarm workers")
    assert figures["swarm"]["queued"] == 0 and figures["swarm"]["running"] == 0
