"""The "zproc" logger: silent unless the application configures logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zproc

REPO = Path(__file__).resolve().parent.parent

# A server that receives a malformed request, and a process that is retried once.
SCRIPT = """
import logging, sys, zmq, zproc

if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

def flaky(state, attempts=[0]):
    attempts[0] += 1
    if attempts[0] == 1:
        raise ValueError("first attempt fails")
    return "ok"

proc, address = zproc.start_server()
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.connect(address[0])
sock.send_multipart([b"x", b"y", b"z"])  # no request header: dropped
print("pid", zproc.ping(address, timeout=10))
p = zproc.Process(address, flaky, retry_for=[ValueError], retry_delay=0)
print(p.wait(timeout=20))
sock.close(0)
proc.terminate()
proc.join(5)
"""


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True, text=True, timeout=50, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_the_zproc_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("zproc").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_nothing_is_logged_by_default(tmp_path: Path) -> None:
    result = run(tmp_path, "default")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok"
    assert result.stderr == ""


def test_server_events_and_retries_reach_a_configured_logger(tmp_path: Path) -> None:
    result = run(tmp_path, "configured")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok"
    err = result.stderr
    assert "serving at" in err  # start and bind
    assert "rejected a malformed request" in err  # a rejected request
    assert "attempt 1 raised ValueError: first attempt fails" in err  # a retry


def test_a_failing_child_prints_its_traceback(
    server: zproc.ServerAddress, capfd: pytest.CaptureFixture[str]
) -> None:
    def boom(state: zproc.State) -> None:
        raise KeyError("nobody waits for me")

    process = zproc.Process(server, boom)
    with pytest.raises(zproc.ProcessWaitError):
        process.wait(timeout=20)
    err = capfd.readouterr().err
    assert "KeyError: 'nobody waits for me'" in err
    assert f"zproc: process {process.pid}" in err
