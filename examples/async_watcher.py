"""Watch the shared state from asyncio: ``async for`` over every change, loop never blocked.

A "sensor" process (an ordinary zproc Process with a sync State) writes READINGS
temperature readings in a quick burst, then sets "done". The main program is asyncio,
with one AsyncState and three tasks at once:

watch
    ``async for snapshot in state.when_change("temperature")``: an iterator watcher
    that yields every reading exactly once, in order, however fast they come.
tick
    a timer that keeps ticking while the others wait: awaiting a change never blocks
    the event loop.
finish
    ``await state.get_when_equal("done", True)``: a one-shot watcher.

At the end an atomic function, awaited like any other call, stores a summary.

Run it with ``python examples/async_watcher.py``.
"""

from __future__ import annotations

import asyncio
import time

import zproc

READINGS = 200
TICK = 0.05  # seconds between two ticks of the timer task


def sensor(state: zproc.State, count: int) -> int:
    time.sleep(0.3)  # the watcher is already in place; the ticker gets going meanwhile
    for n in range(count):
        state["temperature"] = 20.0 + n / 10
    state["done"] = True
    return count


@zproc.atomic
def summarize(d: dict[str, object], seen: int) -> str:
    d["summary"] = f"{seen} readings, last {d['temperature']}"
    return str(d["summary"])


async def watch(state: zproc.AsyncState, watcher: zproc.AsyncStateWatcher) -> list[float]:
    readings = []
    async for snapshot in watcher:
        readings.append(snapshot["temperature"])
    return readings


async def tick(stop: asyncio.Event) -> int:
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(TICK)
        ticks += 1
    return ticks


async def main(ctx: zproc.Context) -> None:
    async with zproc.AsyncState(ctx.server_address, request_timeout=10) as state:
        # Created before the sensor starts: the watcher will see every reading.
        watcher = state.when_change("temperature", count=READINGS, timeout=10)
        await state.time()  # the server has answered: the watcher's start is fixed
        ctx.process(sensor, args=(READINGS,))

        stop = asyncio.Event()
        ticker = asyncio.create_task(tick(stop))
        readings, done = await asyncio.gather(
            watch(state, watcher), state.get_when_equal("done", True, timeout=10)
        )
        stop.set()
        ticks = await ticker

        expected = [20.0 + n / 10 for n in range(READINGS)]
        print(f"watch: {len(readings)} readings, first {readings[0]}, last {readings[-1]}")
        print(f"watch: every reading once, in order: {readings == expected}")
        print(f"finish: done is {done}")
        print(f"tick: the event loop ticked {ticks} times while waiting")
        print(f"summary: {await summarize(state, len(readings))}")


if __name__ == "__main__":
    with zproc.Context() as context:
        asyncio.run(main(context))
    print("context closed: server and processes stopped")
