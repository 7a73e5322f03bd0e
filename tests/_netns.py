"""A two-host test bed on one machine: two network namespaces joined by a veth pair.

::

    namespace A (host A)                     namespace B (host B)
    vethA 10.123.0.1/24  <-- veth pair -->   vethB 10.123.0.2/24

The addresses exist only inside the two namespaces, which the bed creates and deletes, so
no traffic leaves them. Needs Linux, root and iproute2 (``ip``).

Run as a script it prints whether the bed can be built here (``.ci/run`` shows it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_A_IP = "10.123.0.1"
HOST_B_IP = "10.123.0.2"
PREFIX = 24
COMMAND_TIMEOUT = 20.0


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they probably can)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if result.returncode:
        raise OSError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")


class Output:
    """Collects the lines a process writes to one pipe, in a thread."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line containing ``text``; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    ended = "" if remaining <= 0 else " (the output ended)"
                    raise AssertionError(
                        f"no line containing {text!r} within {timeout} s{ended}; got "
                        f"{self.lines!r}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def text(self) -> str:
        self._thread.join(5)
        return "\n".join(self.lines)

    def close(self) -> None:
        """Wait for the end of the output (the process ended), then close the pipe."""
        self._thread.join(5)
        if not self._thread.is_alive():
            self.pipe.close()


class Host:
    """One namespace: runs commands and Python code inside it."""

    def __init__(self, bed: TestBed, netns: str, ip: str, device: str) -> None:
        self.bed = bed
        self.netns = netns
        self.ip = ip
        self.device = device

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command in this host and wait for it.

        A command still running after ``timeout`` seconds gets SIGABRT (a Python process
        prints the stacks of its threads then) and fails the test with its output.
        """
        command = self.command(args)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.bed.env, cwd=ROOT,
        ) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                try:
                    out, err = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                raise AssertionError(
                    f"{' '.join(command[4:6])}... in {self.netns} did not finish within "
                    f"{timeout} s; stdout:\n{out}\nstderr:\n{err}"
                ) from None
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    def python(
        self, code: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code args...`` in this host and wait for it."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout)

    def start(self, args: Sequence[str]) -> tuple[subprocess.Popen[str], Output, Output]:
        """Start a command in this host; the bed stops it at the latest when it is removed."""
        proc = subprocess.Popen(
            self.command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.bed.env, cwd=ROOT,
        )
        out, err = Output(proc.stdout), Output(proc.stderr)
        self.bed.processes.append((proc, out, err))
        return proc, out, err

    def start_python(
        self, code: str, *args: str
    ) -> tuple[subprocess.Popen[str], Output, Output]:
        return self.start([sys.executable, "-c", code, *args])


def remove_stale() -> None:
    """Delete the namespaces of beds whose test process died without removing them."""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        check=False,
    )
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != "zproc" or parts[1] not in ("a", "b"):
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # its test process is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            _ip("netns", "del", name)
        except OSError:
            pass


class TestBed:
    """Creates the namespaces and the link (:meth:`create`), removes them (:meth:`destroy`)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        suffix = f"{os.getpid()}-{os.urandom(2).hex()}"
        self.a = Host(self, f"zproc-a-{suffix}", HOST_A_IP, "vethA")
        self.b = Host(self, f"zproc-b-{suffix}", HOST_B_IP, "vethB")
        self.processes: list[tuple[subprocess.Popen[str], Output, Output]] = []
        self.created: list[str] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONFAULTHANDLER"] = "1"

    def create(self) -> None:
        """Build both namespaces and the veth pair; on failure, remove what was made."""
        remove_stale()
        a, b = self.a, self.b
        try:
            for host in (a, b):
                _ip("netns", "add", host.netns)
                self.created.append(host.netns)
            _ip("link", "add", a.device, "netns", a.netns, "type", "veth",
                "peer", "name", b.device, "netns", b.netns)
            for host in (a, b):
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/{PREFIX}", "dev", host.device)
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "link", "set", host.device, "up")
        except BaseException:
            self.destroy()
            raise

    def set_link(self, up: bool) -> None:
        """Bring host A's end of the link up or down (as pulling the cable)."""
        _ip("-n", self.a.netns, "link", "set", self.a.device, "up" if up else "down")

    def stop_processes(self) -> None:
        """SIGTERM every process started in the bed, then SIGKILL what is left."""
        for proc, _out, _err in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, out, err in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            out.close()
            err.close()
        self.processes.clear()

    def destroy(self) -> None:
        """Stop the processes and delete the namespaces (which deletes the veth pair)."""
        try:
            self.stop_processes()
        finally:
            for netns in reversed(self.created):
                try:
                    _ip("netns", "del", netns)
                except OSError:
                    pass
            self.created.clear()


@contextlib.contextmanager
def created_bed() -> Iterator[TestBed]:
    """A created :class:`TestBed`, destroyed on exit; skips the test where none can be made."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"two-host test bed unavailable: {reason}")
    testbed = TestBed()
    try:
        testbed.create()
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"two-host test bed unavailable: cannot create network namespaces: {exc}")
    try:
        yield testbed
    finally:
        testbed.destroy()


def probe() -> str | None:
    """Build and remove a bed; the reason it cannot be built, or None."""
    reason = unavailable_reason()
    if reason:
        return reason
    bed = TestBed()
    try:
        bed.create()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create network namespaces here: {exc}"
    finally:
        bed.destroy()
    return None


if __name__ == "__main__":
    why = probe()
    capture = shutil.which("tcpdump") or "a raw AF_PACKET socket (tcpdump not installed)"
    if why is None:
        print(f"two-host test bed (tests/test_two_hosts.py): WILL RUN (capture with {capture})")
    else:
        print(f"two-host test bed (tests/test_two_hosts.py): WILL BE SKIPPED: {why}")
