"""Two scripts, one state: this script uses the server that two_scripts_server.py owns.

Start ``python examples/two_scripts_server.py`` first, then this one (with the same
endpoints, if you gave the server any)::

    python examples/two_scripts_client.py [REQ_ENDPOINT PUB_ENDPOINT]

``zproc.State(ADDRESS)`` connects to the server at the fixed address; it starts nothing.
The client waits for the key the server script sets (``get_when_available``, which
returns at once if it is already there), then writes back and counts its visit with the
atomic helpers ``zproc.append`` and ``zproc.increase``. If no server answers at the
address, requests fail with ``zproc.ServerUnavailableError`` after the connection
timeout (10 s by default).
"""

from __future__ import annotations

import os
import sys

import zproc

ADDRESS = ("tcp://127.0.0.1:25821", "tcp://127.0.0.1:25822")


def main() -> int:
    endpoints = sys.argv[1:] or list(ADDRESS)
    if len(endpoints) != 2:
        sys.exit(f"usage: {sys.argv[0]} [REQ_ENDPOINT PUB_ENDPOINT]")
    with zproc.State(endpoints) as state:
        try:
            message = state.get_when_available("message", timeout=30)
        except zproc.ServerUnavailableError as exc:  # nobody serves at that address
            print(f"client: {exc}", file=sys.stderr)
            return 1
        print(f"client: the server script says {message!r}")
        zproc.append(state, "replies", f"hello from the client script (pid {os.getpid()})")
        visit = zproc.increase(state, "visits")
        print(f"client: I was visitor #{visit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
