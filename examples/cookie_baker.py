"""A cookie baker and a cookie eater, two processes reacting to each other's changes.

The baker puts one cookie on the plate, then waits with ``get_when_equal`` until the eater
has eaten it before baking the next one. The eater is a ``call_when`` handler: a process
that calls its function whenever a change made by someone else leaves cookies on the
plate.

Things to notice:

* The eater's condition is *level-triggered*: it is also checked once when the eater
  sits down, so a cookie baked before the eater's process was ready is eaten all the
  same.
* The eater uses ``live=False`` (buffered): a cookie baked while the eater is still busy
  with the previous one waits in its buffer instead of being missed.
* ``pass_value=True`` hands the watcher's result (here, the state right after the change)
  to the handler as its first argument.
* The eater changes ``"cookies"`` itself (it eats one), yet that does not wake it up
  again: a State never sees its own changes.
* ``zproc.increase`` / ``zproc.decrease`` change a number in one atomic step.

Run it with ``python examples/cookie_baker.py``.
"""

from __future__ import annotations

import zproc

COOKIES = 5


def baker(state: zproc.State, count: int) -> int:
    for number in range(1, count + 1):
        print(f"baker: cookie #{number} is out of the oven", flush=True)
        zproc.increase(state, "cookies")
        # level-triggered: returns at once if the eater was already faster than us
        state.get_when_equal("eaten", number, timeout=10)
    return count


def main() -> None:
    with zproc.Context() as ctx:
        ctx.state.update(cookies=0, eaten=0)

        @ctx.call_when(lambda d: d["cookies"] > 0, live=False, pass_value=True)
        def eater(snapshot: dict[str, int], state: zproc.State) -> None:
            print(f"eater: {snapshot['cookies']} cookie(s) on the plate, nom nom", flush=True)
            zproc.decrease(state, "cookies")  # our own change: does not wake us up
            zproc.increase(state, "eaten")

        baked = ctx.process(baker, args=(COOKIES,)).wait(timeout=30)
        eaten, left = ctx.state["eaten"], ctx.state["cookies"]
        print(f"baked {baked} cookies, eaten {eaten}, left on the plate {left}")
        # leaving the with-block stops the eater (it would wait forever) and the server


if __name__ == "__main__":
    main()
