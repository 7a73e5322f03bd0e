"""What outlives what: the server and zproc's processes end with their owner, however it
ends; the ipc files go with them; nothing else is touched.

The owners are real scripts (subprocesses) killed with SIGKILL; their processes are then
orphans of this test, so every test also kills whatever it saw and is still running.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import zproc
from zproc._proctree import exit_with_owner

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and ipc")

#: The issue's bound: everything the owner started is gone this long after its death.
GONE_WITHIN = 2.0

OWNER = """
import json, os, subprocess, sys, threading, time
import zproc

def grandchild(state):
    time.sleep(120)

def child(state, nested):
    if nested:
        p = zproc.Process(state.server_address, grandchild)
        state["grandchild"] = p.pid
    time.sleep(120)

def report(ctx, **extra):
    a = ctx.process(child, args=(True,))
    b = ctx.process(child, args=(False,))
    grand = ctx.state.get_when_available("grandchild", timeout=30)
    print(json.dumps({
        "zproc": [ctx.server_process.pid, a.pid, b.pid, grand],
        "address": list(ctx.server_address), **extra}), flush=True)

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "main":
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        ctx = zproc.Context()
        report(ctx, other=other.pid)
    elif mode == "thread":
        box = []
        maker = threading.Thread(target=lambda: box.append(zproc.Context()))
        maker.start()
        maker.join()  # the thread that started the server is gone
        report(box[0])
    elif mode == "attach":
        ctx = zproc.Context(json.loads(sys.argv[2]))
        p = ctx.process(child, args=(False,))
        print(json.dumps({"zproc": [p.pid]}), flush=True)
    elif mode == "exit-after-server-died":
        ctx = zproc.Context()
        ctx.server_process.kill()
        ctx.server_process.join(10)
        print(json.dumps({"address": list(ctx.server_address),
                          "left": os.path.exists(ctx.server_address[0][6:])}), flush=True)
        sys.exit(0)  # no close(): the interpreter's exit closes the Context
    time.sleep(120)
"""


def running(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for every pid to end; return those still running."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if running(pid)]
    return alive


def ipc_dir(address: list[str]) -> str:
    assert address[0].startswith("ipc://"), address
    return os.path.dirname(address[0][len("ipc://") :])


class Owners:
    """Runs owner scripts; at the end kills every script and every pid they reported."""

    def __init__(self, tmp_path: Any) -> None:
        self.script = tmp_path / "owner.py"
        self.script.write_text(textwrap.dedent(OWNER))
        self.procs: list[subprocess.Popen[str]] = []
        self.pids: list[int] = []

    def start(self, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        proc = subprocess.Popen(
            [sys.executable, str(self.script), *args], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.procs.append(proc)
        line = self._readline(proc, 60)
        info: dict[str, Any] = json.loads(line)
        self.pids += info.get("zproc", []) + ([info["other"]] if "other" in info else [])
        return proc, info

    @staticmethod
    def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"the owner script reported nothing (exit code {proc.returncode})")
        return box[0]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for pid in self.pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        assert not still_running(self.pids, 5)


@pytest.fixture
def owners(tmp_path: Any) -> Iterator[Owners]:
    runner = Owners(tmp_path)
    yield runner
    runner.close()


def kill_owner(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_of_the_owner_ends_server_children_and_grandchild(owners: Owners) -> None:
    proc, info = owners.start("main")
    folder = ipc_dir(info["address"])
    assert os.path.isdir(folder)
    assert all(running(pid) for pid in info["zproc"])
    kill_owner(proc)
    assert still_running(info["zproc"], GONE_WITHIN) == []
    assert not os.path.exists(folder), os.listdir(folder)
    # a process the script started without zproc is none of zproc's business
    assert running(info["other"])


def test_a_context_made_in_a_thread_that_ended_keeps_its_server(owners: Owners) -> None:
    proc, info = owners.start("thread")  # reports after the thread ended, and processes ran
    time.sleep(1.0)  # a death signal tied to that thread would have arrived by now
    assert all(running(pid) for pid in info["zproc"])
    with zproc.State(info["address"], request_timeout=10) as state:
        assert state["grandchild"] == info["zproc"][3]
    # ... and still everything ends with the owner's process (watched, not prctl'd)
    kill_owner(proc)
    assert still_running(info["zproc"], GONE_WITHIN + 0.5) == []
    assert not os.path.exists(ipc_dir(info["address"]))


def test_another_scripts_server_survives_a_client_script(owners: Owners) -> None:
    server, address = zproc.start_server()
    try:
        proc, info = owners.start("attach", json.dumps(list(address)))
        kill_owner(proc)
        assert still_running(info["zproc"], GONE_WITHIN) == []  # its own child ends
        assert server.is_alive()
        assert zproc.ping(address, timeout=10) == server.pid
        assert os.path.exists(address[0][len("ipc://") :])
    finally:
        server.terminate()
        server.join(10)
    assert not os.path.exists(ipc_dir(list(address)))


def test_close_after_the_server_was_killed_removes_the_ipc_directory() -> None:
    ctx = zproc.Context()
    try:
        folder = ipc_dir(list(ctx.server_address))
        ctx.server_process.kill()
        ctx.server_process.join(10)
        assert os.path.isdir(folder)  # a SIGKILLed server removes nothing itself
    finally:
        ctx.close()
    assert not os.path.exists(folder)


def test_exit_after_the_server_was_killed_removes_the_ipc_directory(owners: Owners) -> None:
    proc, info = owners.start("exit-after-server-died")
    assert info["left"]  # the killed server left its socket file
    assert proc.wait(30) == 0
    assert not os.path.exists(ipc_dir(info["address"]))



def _orphan_at_birth(owner_pid: int) -> None:
    exit_with_owner((owner_pid, True), signal.SIGTERM)
    time.sleep(30)


def test_an_owner_that_died_before_the_child_was_set_up_ends_it_at_once() -> None:
    gone = multiprocessing.Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join(10)
    child = multiprocessing.Process(target=_orphan_at_birth, args=(gone.pid,))
    child.start()
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join(10)
    assert child.exitcode == -signal.SIGTERM


def test_an_unclosed_state_of_a_dead_server_is_collected_without_waiting() -> None:
    server, address = zproc.start_server()
    state = zproc.State(address, request_timeout=30)
    state["k"] = 1
    watcher = zproc.State(address, request_timeout=30)
    watcher.get_when_available("k", timeout=10)  # opens its event stream
    server.kill()
    server.join(10)
    try:
        with pytest.warns(ResourceWarning, match=r"unclosed State for .*rr"):
            started = time.monotonic()
            del state, watcher
            gc.collect()
            took = time.monotonic() - started
        assert took < 0.5, f"collecting two unclosed States took {took:.2f} s"
    finally:
        for endpoint in address:
            path = endpoint[len("ipc://") :]
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(os.path.dirname(address[0][len("ipc://") :]))
