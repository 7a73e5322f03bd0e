"""A luck test: many processes draw random numbers; the first to draw the lucky one wins.

Eight players are started with ``ctx.spawn_map`` (one process per item) and wait at the
start line (``get_when_equal("go", True)``) until the parent fires the starting gun. Then
each draws numbers until it gets the lucky number or learns that someone else already
won. Several
players may be lucky at nearly the same moment, so "check whether there is a winner,
then write my name" must happen in one step: the ``claim`` function is marked
``@zproc.atomic`` and runs inside the state server, where no other request can come in
between. Exactly one claim succeeds; a lucky player who comes second is told so.

The parent waits with ``get_when_not_none("winner")``, then collects every player's
report with ``wait()``.

Run it with ``python examples/luck_test.py``.
"""

from __future__ import annotations

import random
from typing import Any

import zproc

PLAYERS = 8
LUCKY = 7
NUMBERS = 1000  # draw from 1..NUMBERS
CHECK_EVERY = 20  # draws between two looks at the shared state


@zproc.atomic
def claim(d: dict[str, Any], player: int, draws: int) -> bool:
    """Runs in the server: write the winner only if there is none yet."""
    if d.get("winner") is not None:
        d["too_late"] += 1
        return False
    d["winner"] = (player, draws)
    return True


def player(state: zproc.State, number: int) -> str:
    rng = random.Random()
    draws = 0
    state.get_when_equal("go", True, timeout=30)  # the start line
    while True:
        draws += 1
        if rng.randint(1, NUMBERS) == LUCKY:
            if claim(state, number, draws):
                return f"player {number}: drew {LUCKY} after {draws} draws and WON"
            return f"player {number}: drew {LUCKY} after {draws} draws, but too late"
        if draws % CHECK_EVERY == 0 and state.get("winner") is not None:
            return f"player {number}: gave up after {draws} draws"


def main() -> None:
    with zproc.Context() as ctx:
        ctx.state.update(winner=None, too_late=0, go=False)
        players = ctx.spawn_map(player, range(1, PLAYERS + 1))
        print(f"{PLAYERS} players at the start line; lucky number {LUCKY} of 1..{NUMBERS}")
        ctx.state["go"] = True
        winner, draws = ctx.state.get_when_not_none("winner", timeout=30)
        for process in players:
            print(process.wait(timeout=30))
        print(
            f"winner: player {winner} after {draws} draws "
            f"({ctx.state['too_late']} lucky player(s) came too late)"
        )


if __name__ == "__main__":
    main()
