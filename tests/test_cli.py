"""The ``zproc`` command line: serve, ping, dump, watch, keygen; exit statuses and messages."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from _netns import Output
from conftest import make_address, stop

import zproc
from zproc._cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "command line secret 58c1e0"


def zproc_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "zproc", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}, check=False,
    )


@pytest.fixture
def key_file(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "key"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def served(key_file: str) -> Iterator[tuple[zproc.ServerAddress, subprocess.Popen[str], Output]]:
    """``zproc serve`` on loopback tcp with the key file."""
    address = make_address("tcp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zproc", "serve", *address, "--secret-key-file", key_file],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    err, out = Output(proc.stderr), Output(proc.stdout)
    try:
        err.wait_for("serving at", timeout=30)
        yield address, proc, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        err.close()
        out.close()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert main(["ping", "tcp://127.0.0.1:5000"]) == 2
    assert "expected two endpoints" in capsys.readouterr().err
    assert main(["dump", "tcp://127.0.0.1:5000", "nonsense"]) == 2
    assert "not an endpoint" in capsys.readouterr().err
    assert main(["ping", *make_address("tcp"), "--secret-key-file", "/nonexistent/key"]) == 2
    assert "cannot read the secret key file" in capsys.readouterr().err
    assert main(["serve", *make_address("tcp"), "--history-size", "0"]) == 2
    assert main(["serve", *make_address("tcp"), "--history-bytes", "0"]) == 2
    assert main(["serve", *make_address("tcp"), "--fsync", "never"]) == 2
    assert "--fsync needs --persist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", *make_address("tcp"), "--persist", "s.db", "--fsync", "sometimes"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_ping_without_a_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", *make_address("tcp"), "--timeout", "0.3"]) == 1
    assert "no zproc server answered" in capsys.readouterr().err


def test_serve_ping_dump_watch(served: Any, key_file: str) -> None:
    address, proc, err = served
    ping = zproc_cmd("ping", *address, "--secret-key-file", key_file)
    assert ping.returncode == 0, ping.stderr
    assert f"zproc server {proc.pid}" in ping.stdout  # serve runs in the foreground
    # the key from the environment
    assert zproc_cmd("ping", *address, env={"ZPROC_SECRET_KEY": SECRET}).returncode == 0

    with zproc.State(address, secret_key=SECRET) as state:
        state.update({"a": 1, "b": [1, 2]})
        dump = zproc_cmd("dump", *address, "--secret-key-file", key_file)
        assert dump.returncode == 0, dump.stderr
        assert ast.literal_eval(dump.stdout) == {"a": 1, "b": [1, 2]}
        dump = zproc_cmd("dump", *address, "--secret-key-file", key_file, "--json")
        assert json.loads(dump.stdout) == {"a": 1, "b": [1, 2]}

        watch = subprocess.Popen(
            [sys.executable, "-m", "zproc", "watch", *address, "a", "--count", "2",
             "--secret-key-file", key_file],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        out, werr = Output(watch.stdout), Output(watch.stderr)
        try:
            werr.wait_for("watching 'a'", timeout=30)
            state["b"] = "not watched"
            state["a"] = 2
            del state["a"]
            assert watch.wait(30) == 0, werr.text()
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(5)
            out.close()
            werr.close()
        lines = [line.split(" ", 1)[1] for line in out.lines]
        assert lines == ["'a' = 2", "'a' deleted"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM  # ended by the signal, after closing cleanly
    assert "Traceback" not in err.text()


def test_wrong_or_missing_key_exits_1(served: Any, tmp_path: pathlib.Path) -> None:
    address, _proc, err = served
    wrong = tmp_path / "wrong"
    wrong.write_text("not the server's passphrase")
    wrong.chmod(0o600)
    result = zproc_cmd("ping", *address, "--secret-key-file", str(wrong), "--timeout", "10")
    assert result.returncode == 1 and "secret_key" in result.stderr, result
    result = zproc_cmd("dump", *address, "--timeout", "10")
    assert result.returncode == 1 and "requires a secret_key" in result.stderr, result
    err.wait_for("rejected a peer", timeout=10)


def test_serve_reports_an_address_in_use(key_file: str) -> None:
    proc, address = zproc.start_server(make_address("tcp"))
    try:
        result = zproc_cmd("serve", *address, "--secret-key-file", key_file)
        assert result.returncode == 1 and "in use" in result.stderr, result
    finally:
        stop(proc)


def test_keygen_and_certificate_directory(tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys"
    result = zproc_cmd("keygen", str(keys))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(keys)) == [
        "client.key", "client.key_secret", "server.key", "server.key_secret"
    ]
    again = zproc_cmd("keygen", str(keys))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    proc, address = zproc.start_server(make_address("tcp"), secret_key=keys)
    try:
        result = zproc_cmd("ping", *address, "--secret-key-file", str(keys))
        assert result.returncode == 0, result.stderr
    finally:
        stop(proc)


@pytest.mark.parametrize("policy", ["every-second", "never"])
def test_serve_persist_with_fsync(tmp_path: pathlib.Path, policy: str) -> None:
    path = tmp_path / "state.db"
    address = make_address("tcp")
    for run in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "zproc", "serve", *address, "--persist", str(path),
             "--fsync", policy],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        err, out = Output(proc.stderr), Output(proc.stdout)
        try:
            line = err.wait_for("serving at", timeout=30)
            assert f"persist {path}, fsync {policy.replace('-', ' ')}" in line, line
            with zproc.State(address) as state:
                if run == 0:
                    state["kept"] = policy
                else:
                    assert state["kept"] == policy  # committed at SIGTERM, loaded again
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == -signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            err.close()
            out.close()
