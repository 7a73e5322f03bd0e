"""A worker swarm: ``map`` and ``run`` on workers, and results fetched by task id.

``ctx.create_swarm(2)`` starts two worker processes that take their work from a broker
inside the state server. ``zproc worker ADDRESS`` starts more of them on other machines
(see the docs, "Worker swarms"); here everything runs on this one.

``swarm.map`` returns the results in order. ``swarm.map_lazy`` returns at once; its
results stay in the broker, so another process can fetch them with nothing but the
server's address and the task id. Finally one worker is killed in the middle of a map:
its chunk goes to the other worker and every result still arrives, once.

Run it with ``python examples/swarm.py``.
"""

from __future__ import annotations

import os
import signal
import time

import zproc


def collatz_steps(n: int) -> int:
    """Steps for ``n`` to reach 1 in the Collatz sequence."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def fetch(address: tuple[str, str], task_id: str) -> int:
    """In another process: read a task's results by its id, return their sum."""
    with zproc.SequenceTaskResult(address, task_id, timeout=30) as result:
        return sum(result)


def main() -> None:
    with zproc.Context() as ctx:
        swarm = ctx.create_swarm(2)
        print(f"workers: {len(swarm.info()['workers'])}")

        steps = swarm.map(collatz_steps, range(1, 100_001))
        best = max(range(len(steps)), key=steps.__getitem__)
        print(f"longest Collatz chain below 100001: {best + 1} ({steps[best]} steps)")

        print(f"run on one worker: 2**20 = {swarm.run(pow, (2, 20))}")

        lazy = swarm.map_lazy(lambda x: x * x, range(1000))
        reader = ctx.process(fetch, args=(ctx.server_address, lazy.task_id), stateful=False)
        print(f"sum of squares fetched by task id in another process: {reader.wait(30)}")
        lazy.forget()

        def slow_square(x: int) -> int:
            time.sleep(0.005)
            return x * x

        lazy = swarm.map_lazy(slow_square, range(200), num_chunks=8)
        time.sleep(0.1)  # both workers are in the middle of a chunk
        os.kill(swarm.worker_list[0].pid or 0, signal.SIGKILL)
        squares = lazy.get(timeout=60)
        lazy.forget()
        ok = squares == [x * x for x in range(200)]
        print(f"after killing a worker mid-map: {len(squares)} results, all correct: {ok}")


if __name__ == "__main__":
    main()
