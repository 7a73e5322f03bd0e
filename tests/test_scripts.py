"""Two separate scripts share one state (spec 2.6), on tcp and on ipc.

Script A starts the server at ADDRESS (or a Context() with a random address) and waits
for script B, a separate Python process started afterwards, to read what A wrote and to
write back. Every subprocess runs under a timeout and is cleaned up.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import zproc

TIMEOUT = 30

SCRIPT_A = """
import json, os, sys, time
import zproc

ADDRESS = {address}
KIND = {kind!r}

if KIND == "random-context":
    owner = zproc.Context()
    state = owner.state
    address = owner.server_address
    server = owner.server_process
else:
    server, address = zproc.start_server(ADDRESS)  # exactly once, here
    assert tuple(address) == tuple(ADDRESS)
    if KIND == "context":
        owner = zproc.Context(ADDRESS)  # attaches: starts no second server
        assert owner.server_process is None
        state = owner.state
    else:
        owner = None
        state = zproc.State(ADDRESS, request_timeout=10)

state["from_a"] = {{"pid": os.getpid(), "items": [1, 2, 3]}}
state["ready"] = True
print(json.dumps({{"event": "ready", "address": list(address), "server_pid": server.pid}}),
      flush=True)

deadline = time.monotonic() + {timeout}
while state.get("b_done") is not True:
    if time.monotonic() > deadline:
        sys.exit("script B never finished")
    time.sleep(0.02)

result = {{"event": "done", "state": {{k: v for k, v in state.items() if k != "from_a"}},
           "server_pid": server.pid, "ping": zproc.ping(address, timeout=5)}}
if owner is not None:
    owner.close()
else:
    state.close()
if KIND != "random-context":
    server.terminate()
    server.join(10)
    if server.is_alive():
        server.kill()
        sys.exit("the server did not stop on terminate()")
result["server_exitcode"] = server.exitcode
print(json.dumps(result), flush=True)
"""

SCRIPT_B = """
import json, os, sys
import zproc

ADDRESS = tuple(json.loads(sys.argv[1]))
KIND = {kind!r}

if KIND == "context" or KIND == "random-context":
    ctx = zproc.Context(ADDRESS)  # attaches to A's server
    assert ctx.server_process is None
    state = ctx.state
else:
    ctx = None
    state = zproc.State(ADDRESS, request_timeout=10)

assert state["ready"] is True
seen = state["from_a"]
seen["items"].append(4)  # a local copy: the server keeps [1, 2, 3]
state["from_b"] = {{"pid": os.getpid(), "seen_a": seen["pid"], "a_items": state["from_a"]["items"]}}
state.update(b_count=len(state))
state["b_done"] = True
(ctx or state).close()
print(json.dumps({{"event": "b-done"}}), flush=True)
"""


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(zproc.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line on ``proc``'s stdout, within ``timeout`` seconds."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no output from pid {proc.pid} within {timeout} s")
            if selector.select(remaining):
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"pid {proc.pid} closed its stdout (exit {proc.wait(5)})")
                if line.startswith("{"):
                    return json.loads(line)  # type: ignore[no-any-return]
    finally:
        selector.close()


class Scripts:
    """Starts scripts as subprocesses and makes sure they (and their servers) end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []
        self.extra_pids: list[int] = []

    def start(self, name: str, source: str, *args: str) -> subprocess.Popen[str]:
        path = self.folder / name
        path.write_text(textwrap.dedent(source))
        proc = subprocess.Popen(
            [sys.executable, str(path), *args], cwd=self.folder, env=_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str]) -> tuple[str, str]:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{err}"
        assert "Traceback" not in err, err
        return out, err

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for pid in self.extra_pids:  # servers orphaned by a failed script
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[Scripts]:
    runner = Scripts(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


@pytest.mark.parametrize("kind", ["state", "context"])
def test_two_scripts_share_one_state(
    scripts: Scripts, address: zproc.ServerAddress, kind: str
) -> None:
    """A: start_server(ADDRESS) + State/Context(ADDRESS); B: State/Context(ADDRESS)."""
    a = scripts.start(
        "script_a.py",
        SCRIPT_A.format(address=repr(tuple(address)), kind=kind, timeout=TIMEOUT),
    )
    ready = _read_json_line(a, TIMEOUT)
    scripts.extra_pids.append(ready["server_pid"])
    assert ready["event"] == "ready"
    assert tuple(ready["address"]) == address
    # the server is A's child, and reachable from here too
    assert psutil.Process(ready["server_pid"]).ppid() == a.pid
    assert zproc.ping(address, timeout=5) == ready["server_pid"]

    b = scripts.start("script_b.py", SCRIPT_B.format(kind=kind), json.dumps(list(address)))
    out_b, _ = scripts.finish(b)
    assert json.loads(out_b.strip().splitlines()[-1]) == {"event": "b-done"}

    done = _read_json_line(a, TIMEOUT)
    scripts.finish(a)
    shared = done["state"]
    assert shared["ready"] is True and shared["b_done"] is True
    assert shared["from_b"] == {"pid": b.pid, "seen_a": a.pid, "a_items": [1, 2, 3]}
    assert shared["b_count"] == 3  # ready, from_a, from_b
    assert done["ping"] == done["server_pid"]
    assert done["server_exitcode"] == -signal.SIGTERM
    assert not psutil.pid_exists(done["server_pid"]) or (
        psutil.Process(done["server_pid"]).status() == psutil.STATUS_ZOMBIE
    )
    # the address fixture checks that the ipc files are gone


def test_two_scripts_with_a_random_address(scripts: Scripts) -> None:
    """A: Context() owns a server at a random address and hands it to B on the command line."""
    a = scripts.start(
        "script_a.py", SCRIPT_A.format(address="None", kind="random-context", timeout=TIMEOUT)
    )
    ready = _read_json_line(a, TIMEOUT)
    scripts.extra_pids.append(ready["server_pid"])
    address = ready["address"]
    assert all(endpoint.startswith("ipc://") for endpoint in address)
    b = scripts.start(
        "script_b.py", SCRIPT_B.format(kind="random-context"), json.dumps(address)
    )
    scripts.finish(b)
    done = _read_json_line(a, TIMEOUT)
    scripts.finish(a)
    assert done["state"]["from_b"]["seen_a"] == a.pid
    assert done["server_exitcode"] is not None
    # Context.close() stopped its server and removed the private ipc directory
    for endpoint in address:
        assert not os.path.exists(endpoint[len("ipc://"):])
    assert not os.path.exists(os.path.dirname(address[0][len("ipc://"):]))
