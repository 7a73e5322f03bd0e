"""The worker swarm: the worker loop, and the constants it shares with the broker
(:mod:`zproc._broker`, a thread of the server process).

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

import logging
import os
import signal
import socket as _socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from . import _protocol as P
from . import _serialization as S
from ._client import Connection, new_identity
from ._security import ClientKeys, client_keys, configure_client
from ._transport import ServerAddress, get_context
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError

__all__ = ["worker_main"]

log = logging.getLogger("zproc")

#: Default of the attempts per chunk.
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL = 0.25
#: Seconds without a heartbeat after which the broker drops a worker (and the worker,
#: without a PONG, looks for the broker again).
WORKER_LIVENESS = 3.0
#: Seconds an idle worker waits before it says READY again (in case the broker lost it).
REANNOUNCE = 1.0
#: Task codes a worker keeps (the broker mirrors this cache per worker).
CODE_CACHE = 8


# -- the worker ------------------------------------------------------------------------


class _Leave(BaseException):
    """Raised in a worker's chunk by SIGINT/SIGTERM: hand the chunk back and leave."""


def discover(
    server_address: ServerAddress,
    keys: ClientKeys | None,
    settings: dict[str, Any] | None = None,
    timeout: float | None = 10.0,
    connect_timeout: float | None = 10.0,
) -> tuple[str, str]:
    """Ask the server for its swarm broker's endpoints (starting the broker if needed)."""
    conn = Connection(server_address, keys=keys, connect_timeout=connect_timeout)
    try:
        endpoints = conn.request(
            P.Kind.SWARM, 0, S.dumps(settings or {}), b"default", timeout=timeout
        )
    finally:
        conn.close()
    return str(endpoints[0]), str(endpoints[1])


class _Heartbeat(threading.Thread):
    """Sends HEARTBEATs from its own socket; notes the broker's PONGs."""

    def __init__(self, endpoint: str, keys: ClientKeys | None, worker_id: bytes) -> None:
        super().__init__(name="zproc-swarm-heartbeat", daemon=True)
        self.endpoint = endpoint
        self.keys = keys
        self.worker_id = worker_id
        self.last_pong = time.monotonic()
        self.unknown = False  # the broker does not know this worker (any more)
        self.stop = threading.Event()

    def run(self) -> None:
        sock = get_context().socket(zmq.DEALER)
        sock.linger = 0
        configure_client(sock, self.keys)
        sock.connect(self.endpoint)
        header = P.work_header(P.WorkOp.HEARTBEAT)
        try:
            while not self.stop.is_set():
                sock.send_multipart([header, self.worker_id], zmq.NOBLOCK)
                deadline = time.monotonic() + HEARTBEAT_INTERVAL
                while (remaining := deadline - time.monotonic()) > 0:
                    if not sock.poll(min(remaining, 0.05) * 1000):
                        if self.stop.is_set():
                            return
                        continue
                    frames = sock.recv_multipart()
                    pong = P.parse_work(frames[0])
                    if pong.op == P.WorkOp.PONG:
                        self.last_pong = time.monotonic()
                        if pong.status:
                            self.unknown = True
        except (zmq.ZMQError, ProtocolError):
            pass
        finally:
            sock.close(0)


class _WorkerLoop:
    """One worker process's connection to the broker, and the chunks it runs."""

    def __init__(
        self, server_address: ServerAddress, secret_key: Any, parent_pid: int | None
    ) -> None:
        self.server_address = server_address
        self.secret_key = secret_key
        self.keys = client_keys(secret_key)
        self.parent_pid = parent_pid
        self.stopping = False
        self.running = False
        self.received = 0
        self.codes: OrderedDict[int, tuple[bool, str, tuple[Any, ...]]] = OrderedDict()
        self.states: dict[str, Any] = {}
        self.info = S.dumps((os.getpid(), _socket.gethostname()))
        self.sock: zmq.Socket[Any] | None = None
        self.heartbeat: _Heartbeat | None = None
        #: A signal writes a byte here (signal.set_wakeup_fd): the wait ends at once.
        self.wakeup = _socket.socketpair()
        for end in self.wakeup:
            end.setblocking(False)

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        if self.running:
            self.running = False
            raise _Leave(signum)

    def orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    # connection
    def connect(self) -> bool:
        """Find the broker through the server and connect; False when stopping."""
        delay = 0.1
        while not self.stopping and not self.orphaned():
            try:
                _tasks, endpoint = discover(self.server_address, self.keys)
                break
            except (ServerUnavailableError, TimeoutError) as exc:
                log.warning("zproc worker %d: %s; trying again", os.getpid(), exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        else:
            return False
        identity = new_identity()
        sock = get_context().socket(zmq.DEALER)
        sock.linger = 1000  # let a BYE or a last result leave
        sock.sndhwm = 0
        sock.identity = identity
        configure_client(sock, self.keys)
        sock.connect(endpoint)
        self.sock = sock
        self.heartbeat = _Heartbeat(endpoint, self.keys, identity)
        self.heartbeat.start()
        self.ready(again=False)
        return True

    def disconnect(self, linger: int = 0) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop.set()
            self.heartbeat.join(5)
            self.heartbeat = None
        if self.sock is not None:
            self.sock.close(linger)
            self.sock = None

    def send(self, frames: list[bytes]) -> None:
        assert self.sock is not None
        self.sock.send_multipart(frames)

    def ready(self, again: bool) -> None:
        self.send([P.work_header(P.WorkOp.READY, status=again, counter=self.received),
                   self.info])

    # the loop
    def run(self) -> None:
        if not self.connect():
            return
        idle_since = time.monotonic()
        wakeup = self.wakeup[0]
        try:
            while not self.stopping:
                assert self.sock is not None and self.heartbeat is not None
                poller = zmq.Poller()
                poller.register(self.sock, zmq.POLLIN)
                poller.register(wakeup, zmq.POLLIN)
                ready = dict(poller.poll(int(HEARTBEAT_INTERVAL * 1000)))
                if wakeup.fileno() in ready:
                    try:
                        wakeup.recv(256)
                    except OSError:
                        pass
                    continue
                if self.sock in ready:
                    self.handle(self.sock.recv_multipart())
                    idle_since = time.monotonic()
                    continue
                now = time.monotonic()
                if self.orphaned():
                    return
                if now - self.heartbeat.last_pong > WORKER_LIVENESS:
                    log.warning("zproc worker %d: the swarm broker stopped answering; looking "
                                "for it again", os.getpid())
                    self.disconnect()
                    if not self.connect():
                        return
                    idle_since = time.monotonic()
                elif self.heartbeat.unknown or now - idle_since > REANNOUNCE:
                    self.heartbeat.unknown = False
                    self.ready(again=True)
                    idle_since = now
        except _Leave:
            pass
        finally:
            if self.sock is not None:
                try:
                    self.send([P.work_header(P.WorkOp.BYE, counter=self.received)])
                except zmq.ZMQError:
                    pass
            self.disconnect(linger=1000)
            for state in self.states.values():
                state.close()

    def handle(self, frames: list[bytes]) -> None:
        header = P.parse_work(frames[0])
        if header.op != P.WorkOp.CHUNK or len(frames) != 3:
            return
        self.received = header.counter
        code, items = frames[1], frames[2]
        reply = [P.work_header(P.WorkOp.RESULT, counter=self.received, task=header.task,
                               chunk=header.chunk)]
        codes = self.codes
        try:
            if code:
                pass_state, namespace, target, args, kwargs = S.loads(code)
                codes[header.task] = (pass_state, namespace, (target, args, kwargs))
                if len(codes) > CODE_CACHE:
                    codes.popitem(last=False)
            elif header.task in codes:
                codes.move_to_end(header.task)
            else:
                self.send([P.work_header(P.WorkOp.RESULT, status=P.ChunkStatus.NEED_CODE,
                                         counter=self.received, task=header.task,
                                         chunk=header.chunk)])
                return
            pass_state, namespace, call = codes[header.task]
            state = self.state(namespace) if pass_state else None
            chunk = S.loads(items)
        except Exception as exc:
            status, body = _failure([], exc)
        else:
            self.running = True
            try:
                status, body = _run_chunk(call, state, chunk)
            finally:
                self.running = False
        reply[0] = P.work_header(P.WorkOp.RESULT, status=status, counter=self.received,
                                 task=header.task, chunk=header.chunk)
        self.send([*reply, body])

    def state(self, namespace: str) -> Any:
        state = self.states.get(namespace)
        if state is None:
            from .state import State

            state = self.states[namespace] = State(
                self.server_address, namespace=namespace, secret_key=self.secret_key
            )
        return state


def _run_chunk(call: tuple[Any, ...], state: Any, chunk: tuple[Any, ...]) -> tuple[int, bytes]:
    target, args, kwargs = call
    iters, margs, mkwargs, count = chunk
    results: list[Any] = []
    try:
        if iters is not None and margs is None and mkwargs is None and not (
            state is not None or args or kwargs
        ):
            results.extend(map(target, iters))  # keeps the results before a failure
        else:
            prefix = () if state is None else (state,)
            append = results.append
            for j in range(count):
                head = prefix if iters is None else (*prefix, iters[j])
                if margs is not None:
                    head = (*head, *margs[j])
                if mkwargs is not None:
                    append(target(*head, *args, **mkwargs[j], **kwargs))
                else:
                    append(target(*head, *args, **kwargs))
    except _Leave:
        raise
    except BaseException as exc:  # the target's failure is this item's result
        return _failure(results, exc)
    try:
        return P.ChunkStatus.OK, S.dumps_any(results)
    except Exception:
        pass
    i, refused = S.first_unpicklable(results)
    error = TypeError(
        f"the result (a {type(results[i]).__name__}) cannot be pickled: {refused}. Return "
        f"plain data (or an importable class)"
    )
    return _failure(results[:i], error)


def _failure(results: list[Any], exc: BaseException) -> tuple[int, bytes]:
    try:
        done = S.dumps_any(results)
    except Exception:
        results, done = [], S.dumps([])
    body = (done, len(results), S.dumps_exception(exc), os.getpid(), _socket.gethostname())
    return P.ChunkStatus.FAILED, S.dumps(body)


def worker_main(
    server_address: tuple[str, str], secret_key: Any = None, parent_pid: int | None = None
) -> None:
    """Entry point of a swarm worker: run chunks until SIGINT/SIGTERM or orphaned.

    On SIGINT or SIGTERM the worker hands back the chunk it runs (the broker gives it to
    another worker) and returns. ``parent_pid``: also return once that process is gone.
    """
    loop = _WorkerLoop(ServerAddress(*server_address), secret_key, parent_pid)
    previous = {sig: signal.signal(sig, loop.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(loop.wakeup[1].fileno(), warn_on_full_buffer=False)
    try:
        loop.run()
    except _Leave:
        pass
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for end in loop.wakeup:
            end.close()
        # deliver the last messages (BYE) before the process ends, within the linger
        flusher = threading.Thread(target=get_context().term, daemon=True)
        flusher.start()
        flusher.join(1.5)


def run_workers(
    address: ServerAddress, count: int, secret_key: Any, report: Callable[[str], None]
) -> int:
    """``zproc worker``: run ``count`` worker processes until SIGINT or SIGTERM.

    Returns 1 when the swarm cannot be joined (no server, wrong key) or every worker
    ended on its own. On SIGINT/SIGTERM the workers hand back their chunks and leave, then
    this process ends by the same signal (as ``zproc serve``).
    """
    import multiprocessing.connection

    from .swarm import Swarm

    stop: list[int] = []
    with Swarm(address, secret_key=secret_key) as swarm:
        swarm.info()  # fails early: no server, or the key does not match
        workers = [
            multiprocessing.Process(
                target=worker_main, args=(tuple(address), secret_key, os.getpid()),
                name=f"zproc-worker-{i}",
            )
            for i in range(count)
        ]
        for process in workers:
            process.start()

        def on_signal(signum: int, _frame: Any) -> None:
            stop.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            host = _socket.gethostname()
            pids = {p.pid for p in workers}
            deadline = time.monotonic() + 60
            while not stop and time.monotonic() < deadline:
                joined = {w["pid"] for w in swarm.info()["workers"] if w["host"] == host}
                if pids <= joined or not any(p.is_alive() for p in workers):
                    break
                time.sleep(0.05)
            mode = "CURVE on" if secret_key is not None else "no secret key"
            if not stop:
                report(
                    f"zproc worker {os.getpid()}: {count} workers (pids "
                    f"{' '.join(str(p.pid) for p in workers)}) joined the swarm of "
                    f"{address.req_rep} ({mode}); SIGINT or SIGTERM stops them"
                )
            alive = list(workers)
            while not stop and alive:
                multiprocessing.connection.wait([p.sentinel for p in alive], 0.2)
                for process in [p for p in alive if not p.is_alive()]:
                    alive.remove(process)
                    report(f"zproc worker {os.getpid()}: worker {process.pid} ended with "
                           f"exit code {process.exitcode}")
        finally:
            for process in workers:
                if process.is_alive():
                    process.terminate()
            for process in workers:
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join(5)
    if not stop:
        return 1
    signal.signal(stop[0], signal.SIG_DFL)
    os.kill(os.getpid(), stop[0])
    return 0
