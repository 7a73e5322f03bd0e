"""The main job in one screen: a server, two processes, one shared dict.

A Context starts a state server. A "baker" process puts cookies in the shared state; an
"eater" process blocks until cookies appear and eats them. The parent watches the counters
and prints what happened. Run it with ``python examples/demo.py``.
"""

from __future__ import annotations

import zproc


def baker(state: zproc.State, batches: int) -> str:
    for batch in range(1, batches + 1):
        zproc.increase(state, "cookies", 2)  # atomic: read, add, write in one step
        state["baked"] = batch * 2
    state["oven"] = "off"
    return f"baked {batches * 2} cookies"


def eater(state: zproc.State, wanted: int) -> str:
    eaten = 0
    while eaten < wanted:
        # block until another process changes the cookie count
        state.get_when(lambda s: s["cookies"] > 0, timeout=10)
        zproc.decrease(state, "cookies")
        eaten += 1
        state["eaten"] = eaten
    return f"ate {eaten} cookies"


def main() -> None:
    with zproc.Context() as ctx:
        print(f"state server pid {ctx.server_process.pid} at {ctx.server_address.req_rep}")
        ctx.state.update(cookies=0, baked=0, eaten=0, oven="on")
        bake = ctx.process(baker, args=(5,))
        eat = ctx.process(eater, args=(10,))
        ctx.state.get_when_equal("eaten", 10, timeout=30)
        print(f"baker says: {bake.wait(timeout=30)}")
        print(f"eater says: {eat.wait(timeout=30)}")
        print(f"final state, as every process sees it: {ctx.state.copy()}")
    print("context closed: server and processes stopped")


if __name__ == "__main__":
    main()
