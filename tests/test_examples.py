"""Every program in examples/ runs, finishes in time, exits with 0 and prints what it says.

Each example runs as a user would run it: ``sys.executable examples/<name>.py`` in a
subprocess, from an empty temporary working directory, with the repository root on
``PYTHONPATH``. Every run has a timeout; on failure the script and everything it started
are killed by pid. The two-script and two-host examples are started as a server side,
then a client side.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60  # seconds for one example run

pytestmark = pytest.mark.timeout(3 * TIMEOUT)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ZPROC_SECRET_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _name(proc: subprocess.Popen[str]) -> str:
    return os.path.basename(cast("list[str]", proc.args)[1])


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and every process below it (by pid; nothing else)."""
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


class Runner:
    """Starts example scripts and guarantees that they, and what they started, end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []
        self.extra_pids: list[int] = []  # grandchildren that outlive a killed script

    def start(self, script: str, *args: str, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            cwd=self.folder,
            env=_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
        """Wait for ``proc``; check exit code 0 and a clean stderr; return stdout."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"{_name(proc)} ran longer than {timeout} s\n{out}\n{err}")
        assert proc.returncode == 0, f"{_name(proc)} exited {proc.returncode}:\n{out}\n{err}"
        assert "Traceback" not in err, err
        assert "Warning" not in err, err
        return out

    def run(self, script: str, *args: str, **env: str) -> str:
        return self.finish(self.start(script, *args, **env))

    def read_line(self, proc: subprocess.Popen[str], prefix: str, timeout: float = TIMEOUT) -> str:
        """The first stdout line of ``proc`` starting with ``prefix``, within ``timeout``."""
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {prefix!r} line from {_name(proc)} within {timeout} s")
                if selector.select(remaining):
                    line = proc.stdout.readline()
                    if not line:
                        _, err = proc.communicate(timeout=10)
                        pytest.fail(f"{_name(proc)} ended ({proc.returncode}) first:\n{err}")
                    if line.startswith(prefix):
                        return line

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _kill_tree(proc.pid)
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for pid in self.extra_pids:
            if psutil.pid_exists(pid):
                _kill_tree(pid)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    runs = Runner(tmp_path)
    try:
        yield runs
    finally:
        runs.cleanup()


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def lines_with(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


# -- one test per example ------------------------------------------------------------------


def test_every_example_has_a_test_and_a_docstring() -> None:
    tested = {
        "demo",
        "cookie_baker",
        "chain_reaction",
        "luck_test",
        "nested_processes",
        "atomic_increments",
        "peanut_watchers",
        "process_map",
        "swarm",
        "two_scripts_server",
        "two_scripts_client",
        "two_hosts",
        "async_watcher",
    }
    present = {path.stem for path in EXAMPLES.glob("*.py")}
    assert present == tested
    for name in present:
        source = (EXAMPLES / f"{name}.py").read_text()
        assert source.startswith('"""'), f"{name}.py has no module docstring"
        assert 'if __name__ == "__main__":' in source, name


def test_demo(runner: Runner) -> None:
    out = runner.run("demo.py")
    assert "baker says: baked 10 cookies" in out
    assert "eater says: ate 10 cookies" in out
    assert "context closed: server and processes stopped" in out


def test_cookie_baker(runner: Runner) -> None:
    out = runner.run("cookie_baker.py")
    story = lines_with(out, "baker:") + lines_with(out, "eater:")
    assert len(story) == 10, out
    # strictly alternating: each cookie is baked, then eaten, before the next one
    expected = []
    for n in range(1, 6):
        expected += [
            f"baker: cookie #{n} is out of the oven",
            "eater: 1 cookie(s) on the plate, nom nom",
        ]
    assert [line for line in out.splitlines() if line.startswith(("baker:", "eater:"))] == expected
    assert "baked 5 cookies, eaten 5, left on the plate 0" in out


def test_chain_reaction(runner: Runner) -> None:
    out = runner.run("chain_reaction.py")
    assert "chain: spark -> 1 -> 2 -> 3 -> 4 -> 5" in out
    assert re.search(r"^5 links fired in \d+ ms$", out, re.MULTILINE), out


def test_luck_test(runner: Runner) -> None:
    out = runner.run("luck_test.py")
    players = lines_with(out, "player ")
    assert len(players) == 8, out
    won = [line for line in players if line.endswith("and WON")]
    assert len(won) == 1, out  # the atomic claim lets exactly one player win
    match = re.search(r"^winner: player (\d) after (\d+) draws \((\d+) lucky", out, re.MULTILINE)
    assert match, out
    assert won[0].startswith(f"player {match[1]}: drew 7 after {match[2]} draws"), out
    too_late = [line for line in players if line.endswith("but too late")]
    assert len(too_late) == int(match[3]), out


def test_nested_processes(runner: Runner) -> None:
    out = runner.run("nested_processes.py")
    assert "7 processes across 3 levels, all sharing one state" in out
    levels = [len(re.findall(rf"^\s*level {n} process", out, re.MULTILINE)) for n in (1, 2, 3)]
    assert levels == [1, 2, 4], out


def test_atomic_increments(runner: Runner) -> None:
    out = runner.run("atomic_increments.py")
    assert "4 processes x 300 increments = 1200 expected" in out
    assert "atomic (@zproc.atomic)  : 1200 (0 increments lost)" in out
    match = re.search(
        r"^racy   \(state\[key\] \+= 1\): (\d+) \((\d+) increments lost\)$", out, re.MULTILINE
    )
    assert match, out
    assert int(match[1]) + int(match[2]) == 1200
    assert 0 < int(match[1]) <= 1200


def _numbers(out: str, label: str) -> list[int]:
    match = re.search(rf"^{label}:\s+\[([\d, ]+)\]", out, re.MULTILINE)
    assert match, out
    return [int(n) for n in match[1].split(",")]


def test_peanut_watchers(runner: Runner) -> None:
    out = runner.run("peanut_watchers.py")
    live, buffered, hybrid = (_numbers(out, label) for label in ("live", "buffered", "hybrid"))
    assert all(len(got) == 5 for got in (live, buffered, hybrid)), out
    assert live == sorted(set(live)), out
    # buffered: every peanut, in order, none skipped (a guarantee, not luck)
    assert buffered == list(range(buffered[0], buffered[0] + 5)), out
    assert "none skipped: True" in out
    assert hybrid == sorted(set(hybrid)), out
    # each consumer starts after the previous one finished
    assert live[-1] < buffered[0] and buffered[-1] < hybrid[0], out


def test_async_watcher(runner: Runner) -> None:
    out = runner.run("async_watcher.py")
    assert "watch: 200 readings, first 20.0, last 39.9" in out
    assert "watch: every reading once, in order: True" in out
    assert "finish: done is True" in out
    match = re.search(r"^tick: the event loop ticked (\d+) times while waiting$", out, re.M)
    assert match and int(match[1]) >= 3, out  # the loop ran while the watchers waited
    assert "summary: 200 readings, last 39.9" in out
    assert "context closed: server and processes stopped" in out


def test_process_map(runner: Runner) -> None:
    out = runner.run("process_map.py")
    results = re.findall(r"^\s+(\d)\^2 = +(\d+)  at ([\d.]+) s$", out, re.MULTILINE)
    assert [(int(x), int(sq)) for x, sq, _ in results] == [(x, x * x) for x in range(10)], out
    times = [float(t) for _, _, t in results]
    assert times == sorted(times)
    assert "x**3 + 1 for x in 0..5: [1, 2, 9, 28, 65, 126]" in out
    assert "workers: 2" in out


def test_swarm(runner: Runner) -> None:
    out = runner.run("swarm.py")
    assert "workers: 2" in out
    assert "longest Collatz chain below 100001: 77031 (350 steps)" in out
    assert "run on one worker: 2**20 = 1048576" in out
    assert f"fetched by task id in another process: {sum(x * x for x in range(1000))}" in out
    assert "after killing a worker mid-map: 200 results, all correct: True" in out


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_two_scripts(runner: Runner, tmp_path: Path, transport: str) -> None:
    if transport == "tcp":
        port = free_port_pair()
        endpoints = [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"]
    else:
        endpoints = [f"ipc://{tmp_path}/rr", f"ipc://{tmp_path}/ps"]
    server = runner.start(
        "two_scripts_server.py", *endpoints, "--clients", "2", "--timeout", str(TIMEOUT)
    )
    ready = runner.read_line(server, "server: serving at")
    runner.extra_pids.append(int(re.search(r"server pid (\d+)", ready)[1]))  # type: ignore[index]
    assert f"{endpoints[0]} {endpoints[1]}" in ready

    first = runner.run("two_scripts_client.py", *endpoints)
    second = runner.run("two_scripts_client.py", *endpoints)
    for out, visit in ((first, 1), (second, 2)):
        assert "client: the server script says 'hello from the server script (pid" in out
        assert f"client: I was visitor #{visit}" in out

    out = runner.finish(server)
    assert len(lines_with(out, "server: a client said 'hello from the client script")) == 2
    assert "server: 2 visit(s); stopping the server" in out


def test_two_scripts_default_address_is_fixed() -> None:
    """Both scripts default to the same fixed loopback tcp address."""
    server = (EXAMPLES / "two_scripts_server.py").read_text()
    client = (EXAMPLES / "two_scripts_client.py").read_text()
    pattern = r'^ADDRESS = \("tcp://127\.0\.0\.1:\d+", "tcp://127\.0\.0\.1:\d+"\)$'
    server_address = re.search(pattern, server, re.MULTILINE)
    assert server_address and server_address[0] in client


def test_two_hosts_default_runs_both_sides(runner: Runner) -> None:
    out = runner.run("two_hosts.py")
    assert "running both sides on this machine" in out
    assert re.search(
        r"^client: a server answers at tcp://127\.0\.0\.1:\d+ \(pid \d+", out, re.MULTILINE
    )
    assert "client: host A says 1 + 2 + 3 + 4 = 10" in out
    assert "server: host B said goodbye; stopping" in out


@pytest.mark.parametrize("secret", ["a shared secret for this test", ""])
def test_two_hosts_server_and_client(runner: Runner, secret: str) -> None:
    host_port = f"127.0.0.1:{free_port_pair()}"
    server = runner.start("two_hosts.py", "--server", host_port, ZPROC_SECRET_KEY=secret)
    ready = runner.read_line(server, "server: serving at")
    runner.extra_pids.append(int(re.search(r"server pid (\d+)", ready)[1]))  # type: ignore[index]
    assert ("CURVE on" in ready) == bool(secret), ready

    out = runner.run("two_hosts.py", "--client", host_port, ZPROC_SECRET_KEY=secret)
    assert "client: host A says 1 + 2 + 3 + 4 = 10" in out
    out = runner.finish(server)
    assert "server: host B asks {'from':" in out
    assert "server: host B said goodbye; stopping" in out
