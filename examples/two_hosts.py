"""Two machines, one state: a server on host A, a client on host B, over tcp.

Across machines the endpoints must be tcp, and the server must listen on an address that
host B can reach: host A's own IP address or name on the shared network, e.g.
``tcp://192.168.1.10:5000``. The server *binds* exactly the string that clients
*connect* to, so a wildcard such as ``tcp://0.0.0.0:5000`` is not accepted.

Everything zproc sends is pickled, and unpickling runs code: a server reachable from the
network must not accept just anyone. Both sides therefore use the same ``secret_key``
(here a passphrase from the environment variable ``ZPROC_SECRET_KEY``), which turns on
CURVE: traffic is encrypted, and the server admits only clients holding that key.
Without the key, ``zproc.start_server`` refuses an address other hosts can reach (pass
``insecure=True`` only on a network where every host is trusted).

Usage (HOST:PORT is host A's address; the two endpoints are PORT and PORT + 1)::

    # on host A
    ZPROC_SECRET_KEY='a long shared secret' python two_hosts.py --server 192.168.1.10:5000
    # on host B
    ZPROC_SECRET_KEY='a long shared secret' python two_hosts.py --client 192.168.1.10:5000

    # both sides on this machine, over loopback tcp (what happens without arguments)
    python two_hosts.py

The client pings the server (``zproc.ping`` returns the server's pid), waits for the
key the server sets, asks a question, and says goodbye; then the server stops.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import zmq

import zproc

TIMEOUT = 60  # seconds either side waits for the other


def address_of(host_port: str) -> zproc.ServerAddress:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {host_port!r}")
    return zproc.ServerAddress(f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}")


def secret_key() -> str | None:
    key = os.environ.get("ZPROC_SECRET_KEY") or None
    if key is not None and not zmq.has("curve"):
        raise SystemExit("ZPROC_SECRET_KEY is set, but this libzmq has no CURVE support")
    return key


def run_server(address: zproc.ServerAddress, key: str | None) -> int:
    server, address = zproc.start_server(address, secret_key=key)
    try:
        with zproc.State(address, secret_key=key) as state:
            state["host_a"] = f"{socket.gethostname()} (server pid {server.pid})"
            print(
                f"server: serving at {address.req_rep} and {address.pub_sub} "
                f"(server pid {server.pid}), "
                f"{'CURVE on' if key else 'no secret_key: trusted network only'}",
                flush=True,
            )
            try:
                question = state.get_when_available("question", timeout=TIMEOUT)
                print(f"server: host B asks {question!r}", flush=True)
                state["answer"] = sum(question["add"])
                state.get_when_equal("bye", True, timeout=TIMEOUT)
            except zproc.TimeoutError:
                print(f"server: no client within {TIMEOUT} s", file=sys.stderr)
                return 1
            print("server: host B said goodbye; stopping", flush=True)
    finally:
        server.terminate()
        server.join(10)
    return 0


def run_client(
    address: zproc.ServerAddress, key: str | None, server_up: Callable[[], bool] = lambda: True
) -> int:
    deadline = time.monotonic() + TIMEOUT
    while True:  # the server may still be starting: ping until it answers
        try:
            pid = zproc.ping(address, timeout=1, secret_key=key)
            break
        except zproc.TimeoutError as exc:
            if time.monotonic() > deadline or not server_up():
                print(f"client: no server answered, giving up. {exc}", file=sys.stderr)
                return 1
    print(f"client: a server answers at {address.req_rep} (pid {pid} on host A)", flush=True)
    with zproc.State(address, secret_key=key) as state:
        host_a = state.get_when_available("host_a", timeout=TIMEOUT)
        print(f"client: connected to {host_a}", flush=True)
        state["question"] = {"from": socket.gethostname(), "add": [1, 2, 3, 4]}
        answer = state.get_when_available("answer", timeout=TIMEOUT)
        print(f"client: host A says 1 + 2 + 3 + 4 = {answer}", flush=True)
        state["bye"] = True
    return 0


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1 (at this instant)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no two consecutive free ports found")


def run_both() -> int:
    """Host A in a subprocess (this script with --server), host B here, over loopback."""
    host_port = f"127.0.0.1:{free_port_pair()}"
    key = secret_key()
    if key is None and zmq.has("curve"):
        key = secrets.token_urlsafe(32)  # a throwaway shared secret for this run
    env = dict(os.environ, ZPROC_SECRET_KEY=key or "")
    print(f"running both sides on this machine, at {host_port}", flush=True)
    host_a = subprocess.Popen([sys.executable, __file__, "--server", host_port], env=env)
    try:
        code = run_client(address_of(host_port), key, lambda: host_a.poll() is None)
        return code or host_a.wait(timeout=TIMEOUT)
    finally:
        if host_a.poll() is None:  # something failed: end host A and its server process
            zproc.clean_process_tree(host_a.pid)
            host_a.kill()
            host_a.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--server", metavar="HOST:PORT", help="run host A's side")
    side.add_argument("--client", metavar="HOST:PORT", help="run host B's side")
    args = parser.parse_args()
    if args.server:
        return run_server(address_of(args.server), secret_key())
    if args.client:
        return run_client(address_of(args.client), secret_key())
    return run_both()


if __name__ == "__main__":
    sys.exit(main())
