"""Two scripts, one state: this script owns the server; two_scripts_client.py uses it.

Start this script first, then the client in another terminal::

    python examples/two_scripts_server.py             # serves at a fixed tcp address
    python examples/two_scripts_client.py             # any number of times

Both use the same fixed address: ``zproc.start_server(ADDRESS)`` starts the one server
at that address (start exactly one per address), and ``zproc.State(ADDRESS)`` in any
other script connects to it. To use another address, give the two endpoints to both
scripts, e.g. ``python examples/two_scripts_server.py tcp://127.0.0.1:7000
tcp://127.0.0.1:7001`` (ipc endpoints such as ``ipc:///tmp/demo-rr`` work as well, on one
machine).

The server script sets ``"message"``, waits until ``--clients`` clients have visited
(``get_when``, with a timeout), prints what they wrote and stops the server. The script
that owns the server must outlive the scripts that use it.
"""

from __future__ import annotations

import argparse
import os
import sys

import zproc

ADDRESS = ("tcp://127.0.0.1:25821", "tcp://127.0.0.1:25822")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "endpoints",
        nargs="*",
        default=list(ADDRESS),
        metavar="ENDPOINT",
        help="request and publish endpoints",
    )
    parser.add_argument("--clients", type=int, default=1, help="clients to wait for")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait")
    args = parser.parse_args()
    if len(args.endpoints) != 2:
        parser.error("give two endpoints (or none, for the default address)")

    server, address = zproc.start_server(args.endpoints)  # exactly once per address
    try:
        with zproc.State(address) as state:
            state.update(
                message=f"hello from the server script (pid {os.getpid()})", visits=0, replies=[]
            )
            print(
                f"server: serving at {address.req_rep} {address.pub_sub} "
                f"(server pid {server.pid}); waiting for {args.clients} client(s)",
                flush=True,
            )
            try:
                state.get_when(lambda d: d["visits"] >= args.clients, timeout=args.timeout)
            except zproc.TimeoutError:
                print(f"server: no client came within {args.timeout} s", file=sys.stderr)
                return 1
            for reply in state["replies"]:
                print(f"server: a client said {reply!r}")
            print(f"server: {state['visits']} visit(s); stopping the server")
    finally:
        server.terminate()  # the server exits quietly on SIGTERM
        server.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
