"""The worker swarm's shared settings: what the broker (:mod:`zproc._broker`, a thread
of the server process) and the workers (:mod:`zproc._worker`) must agree on.

Data flow::

    Swarm / task result (DEALER)        broker thread, in the server process
    ----------------------------        ------------------------------------
    SWARM request on server_address[0] ─▶ the server starts the broker (once) and
                                          replies with its endpoints (tasks, workers)
    SUBMIT: code + chunks ─────────────▶ tasks ROUTER ── queue of chunks
    RESULTS: task, first chunk, wait ──▶  parked until that chunk is done (for a map's
                                          caller: until all are) or wait ends
                       ◀─────────────────  the finished chunks, in order

                                          workers ROUTER                worker processes
                                            ── CHUNK (code once) ──▶   DEALER: run the chunk
                                            ◀── RESULT (now idle) ──
                                            ◀── HEARTBEAT ──────────   2nd DEALER, a thread
                                            ── PONG ───────────────▶

Load balancing: a worker holds at most one chunk; a chunk goes to the worker idle for
the longest time, so fast workers take more chunks than slow ones. The broker knows which
chunk each worker holds. A worker whose heartbeats stop for ``WORKER_LIVENESS`` seconds
is dropped and its chunk goes back to the front of the queue (a worker that says ``BYE``
hands its chunk back at once); after ``max_attempts`` lost attempts the chunk is marked
``LOST`` and the caller gets a :class:`~zproc.TaskError`. A chunk may thus run twice
(at-least-once execution); only its first result is kept.

Results stay in the broker until :meth:`forget`, or until the retention limits drop the
oldest finished tasks (``max_tasks``) or those finished more than ``max_age`` seconds ago.
Unfinished tasks are never dropped by these limits.

Workers cache each task's code by task id, so the target is pickled once per task and
sent once per worker. The heartbeat thread has its own socket, so a worker running a long
pure-Python chunk keeps proving it is alive.
"""

from __future__ import annotations

__all__ = ["CODE_CACHE", "DEFAULT_MAX_ATTEMPTS", "WORKER_LIVENESS"]

#: Default of the attempts per chunk.
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds without a heartbeat after which the broker drops a worker (and the worker,
#: without a PONG, looks for the broker again).
WORKER_LIVENESS = 3.0
#: Task codes a worker keeps (the broker mirrors this cache per worker).
CODE_CACHE = 8
