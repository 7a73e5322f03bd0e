"""Two hosts on one machine: a server in network namespace A, clients in namespace B.

The namespaces are joined by a veth pair (see ``_netns.py``); every client reaches the
server over tcp across that link, as from another machine. Covered: State, watchers, the
command line and a Context from host B; CURVE with the right, a wrong and no key; cutting
the link for a while (no event lost); and a capture of the link showing that a stored
value's plaintext is on the wire without CURVE and not with it.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``, a
container without the capability). Everything made is removed afterwards.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _netns import TestBed, created_bed

import zproc

SECRET = "two hosts, one secret: 7d1f0c54e1b2a9"
WRONG = "not the secret at all"

pytestmark = [
    pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE"),
    pytest.mark.timeout(240),
]

_ports = itertools.count(21000, 2)


@pytest.fixture(scope="module")
def bed() -> Iterator[TestBed]:
    with created_bed() as testbed:
        yield testbed


@pytest.fixture
def hosts(bed: TestBed) -> Iterator[TestBed]:
    """The bed, with every process a test started in it stopped at the end of the test."""
    try:
        yield bed
    finally:
        bed.stop_processes()
        bed.set_link(up=True)


@pytest.fixture
def key_file(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return str(path)


class RemoteServer:
    """``zproc serve`` running in host A."""

    def __init__(self, bed: TestBed, key_file: str | None) -> None:
        port = next(_ports)
        self.address = (f"tcp://{bed.a.ip}:{port}", f"tcp://{bed.a.ip}:{port + 1}")
        args = [sys.executable, "-m", "zproc", "serve", *self.address]
        # without a key, a server on host A's network address needs --insecure
        args += ["--secret-key-file", key_file] if key_file else ["--insecure"]
        self.proc, self.out, self.err = bed.a.start(args)
        self.err.wait_for("serving at", timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


def result(completed: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a client script printed last; fails with its stderr otherwise."""
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}); stderr:\n{completed.stderr}"
    return json.loads(lines[-1])


# -- client scripts (argv: req_endpoint pub_endpoint secret_key ...; "" means no key) --

BASIC = """
import json, sys, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3] or None
try:
    with zproc.State((req, pub), secret_key=key, request_timeout=20) as state:
        state["from_b"] = "hello from B"
        print(json.dumps({"copy": state.copy(), "pid": state.ping(timeout=20)}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""

WATCHER = """
import json, sys, threading, time, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3] or None
count = int(sys.argv[4])
errors, polls = [], [0]
finished = threading.Event()

def poll():
    # a second client that keeps asking while the first one watches
    with zproc.State((req, pub), secret_key=key) as other:
        while not finished.is_set():
            try:
                other.get("n")
                polls[0] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

with zproc.State((req, pub), secret_key=key) as state:
    watcher = state.when_change("n", timeout=90)
    poller = threading.Thread(target=poll)
    poller.start()
    print("ready", flush=True)
    seen = []
    try:
        while len(seen) < count:
            seen.append(next(watcher)["n"])
    except Exception as exc:
        errors.append(f"watcher: {type(exc).__name__}: {exc}")
    finished.set()
    poller.join()
print(json.dumps({"seen": seen, "errors": errors, "polls": polls[0]}), flush=True)
"""

WRITER = """
import sys, time, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3] or None
count, interval = int(sys.argv[4]), float(sys.argv[5])
with zproc.State((req, pub), secret_key=key) as state:
    for i in range(count):
        state["n"] = i
        time.sleep(interval)
print("done", flush=True)
"""

CONTEXT = """
import json, sys, inspect, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3] or None

def child(state, value):
    state["child"] = value
    return value * 2

def square(x):
    return x * x

extra = {"secret_key": key} if key else {}
with zproc.Context((req, pub), start_server=False, **extra) as ctx:
    process = ctx.process(child, args=(21,))
    got = ctx.state.get_when_equal("child", 21, timeout=60)
    doubled = process.wait(timeout=60)
    squares = list(ctx.process_map(square, range(10), count=2))
    print(json.dumps({"got": got, "doubled": doubled, "squares": squares}))
"""

POLLER = """
import json, sys, time, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3] or None
duration = float(sys.argv[4])
events = []  # (seconds since start, outcome), one per change of outcome
with zproc.State((req, pub), secret_key=key) as state:
    print("ready", flush=True)
    start = time.monotonic()
    last = None
    while time.monotonic() - start < duration:
        try:
            state.get("n")
            outcome = "ok"
        except Exception as exc:
            outcome = type(exc).__name__
        if outcome != last:
            events.append((round(time.monotonic() - start, 2), outcome))
            last = outcome
        time.sleep(0.05)
print(json.dumps(events), flush=True)
"""

SNIFFER = """
import signal, socket, sys
device, path = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.bind((device, 0))
with open(path, "wb") as out:
    print("listening", flush=True)
    while True:
        out.write(sock.recv(65536))
        out.flush()
"""


def _args(server: RemoteServer, key: str | None) -> list[str]:
    return [*server.address, key or ""]


# -- state, watchers, the command line -------------------------------------------------


def test_state_watcher_and_cli_from_host_b(hosts: TestBed) -> None:
    server = RemoteServer(hosts, key_file=None)
    # bound to a non-loopback address without a key (--insecure): the server warns, once
    assert sum("without a secret_key" in line for line in server.err.lines) == 1

    watcher, out, err = hosts.b.start_python(WATCHER, *_args(server, None), "20")
    out.wait_for("ready", timeout=60)
    writer = hosts.a.python(WRITER, *_args(server, None), "20", "0.01")
    assert writer.returncode == 0, writer.stderr
    assert watcher.wait(60) == 0, err.text()
    report = json.loads(out.wait_for("seen", timeout=5))
    assert report["seen"] == list(range(20)) and not report["errors"]

    basic = result(hosts.b.python(BASIC, *_args(server, None)))
    assert basic["copy"] == {"n": 19, "from_b": "hello from B"}

    ping = hosts.b.run([sys.executable, "-m", "zproc", "ping", *server.address])
    assert ping.returncode == 0 and f"zproc server {basic['pid']}" in ping.stdout, ping.stderr
    dump = hosts.b.run([sys.executable, "-m", "zproc", "dump", *server.address, "--json"])
    assert dump.returncode == 0, dump.stderr
    assert json.loads(dump.stdout) == {"n": 19, "from_b": "hello from B"}
    watch, watch_out, watch_err = hosts.b.start(
        [sys.executable, "-m", "zproc", "watch", *server.address, "n", "--count", "3"]
    )
    watch_err.wait_for("watching", timeout=60)
    assert hosts.a.python(WRITER, *_args(server, None), "3", "0.01").returncode == 0
    assert watch.wait(60) == 0, watch_err.text()
    assert [line.split(" ", 1)[1] for line in watch_out.text().splitlines()] == [
        "'n' = 0", "'n' = 1", "'n' = 2"
    ]
    assert server.stop() in (0, -signal.SIGTERM)


def test_context_in_host_b_uses_the_server_in_host_a(hosts: TestBed) -> None:
    server = RemoteServer(hosts, key_file=None)
    report = result(hosts.b.python(CONTEXT, *_args(server, None), timeout=120))
    assert report == {"got": 21, "doubled": 42, "squares": [x * x for x in range(10)]}


def test_context_in_host_b_with_curve(hosts: TestBed, key_file: str) -> None:
    if "secret_key" not in inspect.signature(zproc.Context).parameters:
        pytest.skip("Context has no secret_key keyword yet")
    server = RemoteServer(hosts, key_file=key_file)
    report = result(hosts.b.python(CONTEXT, *_args(server, SECRET), timeout=120))
    assert report == {"got": 21, "doubled": 42, "squares": [x * x for x in range(10)]}


# -- CURVE across the link ---------------------------------------------------------------


def test_curve_with_the_right_and_wrong_keys(hosts: TestBed, key_file: str, tmp_path: Any) -> None:
    server = RemoteServer(hosts, key_file=key_file)
    assert not any("without a secret_key" in line for line in server.err.lines)

    good = result(hosts.b.python(BASIC, *_args(server, SECRET)))
    assert good["copy"] == {"from_b": "hello from B"}, good

    watcher, out, err = hosts.b.start_python(WATCHER, *_args(server, SECRET), "10")
    out.wait_for("ready", timeout=60)
    assert hosts.a.python(WRITER, *_args(server, SECRET), "10", "0.01").returncode == 0
    assert watcher.wait(60) == 0, err.text()
    assert json.loads(out.wait_for("seen", timeout=5))["seen"] == list(range(10))

    for key, match in [(WRONG, "secret_key"), (None, "requires a secret_key")]:
        bad = result(hosts.b.python(BASIC, *_args(server, key)))
        assert bad["error"] == "AuthenticationError" and match in bad["message"], bad

    wrong_file = tmp_path / "wrong"
    wrong_file.write_text(WRONG)
    wrong_file.chmod(0o600)
    ping = hosts.b.run([sys.executable, "-m", "zproc", "ping", *server.address,
                        "--secret-key-file", str(wrong_file), "--timeout", "10"])
    assert ping.returncode == 1 and "secret_key" in ping.stderr, ping
    ping = hosts.b.run([sys.executable, "-m", "zproc", "ping", *server.address,
                        "--secret-key-file", key_file])
    assert ping.returncode == 0, ping.stderr
    dump = hosts.b.run([sys.executable, "-m", "zproc", "dump", *server.address,
                        "--secret-key-file", key_file])
    assert dump.returncode == 0 and "'from_b': 'hello from B'" in dump.stdout, dump.stderr

    server.err.wait_for("rejected a peer", timeout=10)  # the server logged the rejections
    assert server.stop() in (0, -signal.SIGTERM)


# -- the link cut -----------------------------------------------------------------------


def test_link_cut_loses_no_event(hosts: TestBed, key_file: str) -> None:
    """Writes in A go on while the link is down for 2 s; the watcher in B sees them all."""
    server = RemoteServer(hosts, key_file=key_file)
    count, interval = 200, 0.02  # 4 s of writes
    watcher, out, err = hosts.b.start_python(WATCHER, *_args(server, SECRET), str(count))
    out.wait_for("ready", timeout=60)
    writer, _writer_out, writer_err = hosts.a.start_python(
        WRITER, *_args(server, SECRET), str(count), str(interval)
    )
    time.sleep(0.8)
    hosts.set_link(up=False)
    try:
        time.sleep(2.0)
    finally:
        hosts.set_link(up=True)
    assert writer.wait(60) == 0, writer_err.text()
    try:
        watcher.wait(90)
    except subprocess.TimeoutExpired:
        watcher.send_signal(signal.SIGINT)  # a traceback on stderr says where it waits
        watcher.wait(10)
        pytest.fail(f"the watcher in B did not finish:\n{out.text()}\n{err.text()}")
    assert watcher.returncode == 0, err.text()
    report = json.loads(out.wait_for("seen", timeout=5))
    assert report["seen"] == list(range(count))
    assert not report["errors"], report["errors"]  # shorter than the liveness bound: no error
    assert report["polls"] > 0


def test_link_cut_beyond_the_liveness_bound_is_reported_then_recovered(
    hosts: TestBed, key_file: str
) -> None:
    """A 10 s cut: a client in B reports ServerUnavailableError, and works once it ends."""
    server = RemoteServer(hosts, key_file=key_file)
    poller, out, err = hosts.b.start_python(POLLER, *_args(server, SECRET), "30")
    out.wait_for("ready", timeout=60)
    time.sleep(1.0)
    hosts.set_link(up=False)
    try:
        time.sleep(10.0)
    finally:
        hosts.set_link(up=True)
    assert poller.wait(60) == 0, err.text()
    events = json.loads(out.wait_for("[", timeout=5))
    outcomes = [outcome for _, outcome in events]
    assert outcomes[0] == "ok" and outcomes[-1] == "ok", events
    assert "ServerUnavailableError" in outcomes, events
    first_error = next(t for t, outcome in events if outcome != "ok")
    assert first_error >= 1.0 + 3.0, f"unavailability reported too early: {events}"


# -- what is on the wire ----------------------------------------------------------------


def _capture(hosts: TestBed, tool: str, path: str) -> tuple[subprocess.Popen[str], Any]:
    if tool == "tcpdump":
        proc, _out, err = hosts.a.start(
            ["tcpdump", "-i", hosts.a.device, "-n", "-U", "--immediate-mode", "-s", "0",
             "-w", path, "tcp"]
        )
        err.wait_for("listening on", timeout=30)
        return proc, err
    proc, out, err = hosts.a.start_python(SNIFFER, hosts.a.device, path)
    out.wait_for("listening", timeout=30)
    return proc, err


@pytest.mark.parametrize("tool", ["tcpdump", "af_packet"])
def test_capture_shows_plaintext_only_without_curve(
    hosts: TestBed, key_file: str, tmp_path: pathlib.Path, tool: str
) -> None:
    if tool == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (apt-get install tcpdump); af_packet covers it")
    for secure in (False, True):
        server = RemoteServer(hosts, key_file=key_file if secure else None)
        marker = f"PLAINTEXT-{os.urandom(8).hex()}"
        path = str(tmp_path / f"{tool}-{secure}.cap")
        capture, capture_err = _capture(hosts, tool, path)
        code = BASIC.replace('"hello from B"', repr(marker))
        got = result(hosts.b.python(code, *_args(server, SECRET if secure else None)))
        assert got["copy"] == {"from_b": marker}, got
        time.sleep(0.3)  # let the last packets reach the capture
        capture.send_signal(signal.SIGTERM)
        capture.wait(15)
        data = pathlib.Path(path).read_bytes()
        assert len(data) > 500, f"the capture saw almost nothing: {capture_err.text()}"
        if secure:
            assert marker.encode() not in data, "plaintext on the wire with CURVE on"
        else:
            assert marker.encode() in data, "the capture missed the plaintext request"
        server.stop()
