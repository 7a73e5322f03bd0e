"""A chain reaction: each process waits for the previous one's key, then sets its own.

Five processes are started at once, *last link first*, and each one blocks on
``get_when_available("link-<n-1>")``. Nothing happens until the parent sets the spark
(``"link-0"``); then link 1 fires, which wakes link 2, and so on down the chain. The order
in which the processes were started does not matter: each one reacts to a change of the
shared state.

``get_when_available`` is level-triggered: it returns at once when the key already
exists, so a link that starts late still fires. Each link appends its number to
``"order"`` with the atomic helper ``zproc.append``.

Run it with ``python examples/chain_reaction.py``.
"""

from __future__ import annotations

import time

import zproc

LINKS = 5


def link(state: zproc.State, number: int) -> float:
    before = state.get_when_available(f"link-{number - 1}", timeout=20)
    zproc.append(state, "order", number)
    state[f"link-{number}"] = before + 1  # how many links fired so far
    return time.monotonic()


def main() -> None:
    with zproc.Context() as ctx:
        ctx.state["order"] = []
        # started in reverse order, to show that only the state decides who goes first
        links = [ctx.process(link, args=(n,)) for n in range(LINKS, 0, -1)]
        print(f"{LINKS} processes started (last link first), all waiting")

        spark = time.monotonic()
        ctx.state["link-0"] = 0
        print("parent: spark!")
        fired = ctx.state.get_when_available(f"link-{LINKS}", timeout=30)
        elapsed = max(p.wait(timeout=30) for p in links) - spark

        order = " -> ".join(["spark"] + [str(n) for n in ctx.state["order"]])
        print(f"chain: {order}")
        print(f"{fired} links fired in {elapsed * 1000:.0f} ms")


if __name__ == "__main__":
    main()
