"""Nested processes: a process that starts processes of its own, three levels deep.

The top-level process gets a State like any other. To start children of its own it
creates ``zproc.Context(state.server_address)``: a Context that *attaches* to the
existing server (it starts no second server), so every process at every level shares
the same dict. Each process records itself in ``"tree"`` with the atomic helper
``zproc.append`` and returns the number of processes in its subtree, which its parent
collects with ``wait()``.

Closing a Context (here, leaving its ``with`` block) stops the processes it created
together with *their* children, so nothing outlives the program.
(``ctx.process(target, pass_context=True)`` is a shortcut: the child then receives such
an attached Context instead of a State.)

Run it with ``python examples/nested_processes.py``.
"""

from __future__ import annotations

import os

import zproc

LEVELS = 3
CHILDREN = 2  # children per process


def node(state: zproc.State, level: int, path: str) -> int:
    zproc.append(state, "tree", (path, level, os.getpid(), os.getppid()))
    if level == LEVELS:
        return 1
    # attach to the same server; starts no server of its own
    with zproc.Context(state.server_address) as ctx:
        children = [
            ctx.process(node, args=(level + 1, f"{path}.{i}")) for i in range(1, CHILDREN + 1)
        ]
        return 1 + sum(int(child.wait(timeout=30)) for child in children)


def main() -> None:
    with zproc.Context() as ctx:
        ctx.state["tree"] = []
        total = ctx.process(node, args=(1, "1")).wait(timeout=60)
        tree = sorted(ctx.state["tree"])
        pids = {pid for _, _, pid, _ in tree}
        for path, level, pid, ppid in tree:
            parent = "the main script" if ppid == os.getpid() else f"pid {ppid}"
            print(
                f"{'    ' * (level - 1)}level {level} process {path} (pid {pid}, "
                f"started by {parent})"
            )
        assert all(ppid in pids for _, level, _, ppid in tree if level > 1)
        print(f"{total} processes across {LEVELS} levels, all sharing one state")


if __name__ == "__main__":
    main()
