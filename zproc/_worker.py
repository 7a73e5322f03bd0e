"""The swarm's worker side: the worker processes, and ``zproc worker`` which runs them.

Data flow (the broker is in zproc._broker, in the server process)::

    worker process                               broker thread
    --------------                               -------------
    discover: SWARM request to the server ─────▶ (started on first use) its endpoints
    DEALER ── READY (pid, host) ───────────────▶ idle queue
           ◀── CHUNK: task, chunk, code (once per task), items
    run_chunk (zproc._chunks); the code is
    decoded once per task (CodeCache)
           ── RESULT: results or failure record ▶ kept for the caller
    heartbeat thread, its own DEALER:
           ── HEARTBEAT ───────────────────────▶ proves it is alive (WORKER_LIVENESS)
           ◀── PONG (or "unknown": say READY again)

SIGINT or SIGTERM makes a worker hand its chunk back (BYE) and leave. A worker whose
parent process is gone leaves too.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import _protocol as P
from . import _serialization as S
from . import _swarmwire as W
from ._chunks import CodeCache, failure, run_chunk
from ._client import Connection, new_identity
from ._queues import flush_pending
from ._security import ClientKeys, client_keys, configure_client
from ._swarm import CODE_CACHE, WORKER_LIVENESS
from ._transport import ServerAddress, get_context
from .exceptions import ProtocolError, ServerUnavailableError, TimeoutError
from .state import State

__all__ = ["discover", "run_workers", "worker_main"]

log = logging.getLogger("zproc")

#: Seconds between two heartbeats of a worker (the broker drops a worker after
#: WORKER_LIVENESS seconds without one).
HEARTBEAT_INTERVAL = 0.25
#: Seconds an idle worker waits before it says READY again (in case the broker lost it).
REANNOUNCE = 1.0
#: Seconds ``zproc worker`` waits for its workers to join before it reports them.
JOIN_TIMEOUT = 60.0


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
        header = W.work_header(P.WorkOp.HEARTBEAT)
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
                    pong = W.parse_work(frames[0])
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
        #: the code of the tasks, by task id (the broker mirrors this cache)
        self.codes = CodeCache(CODE_CACHE)
        self.states: dict[str, State] = {}
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
        self.send([W.work_header(P.WorkOp.READY, status=again, counter=self.received),
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
                    self.send([W.work_header(P.WorkOp.BYE, counter=self.received)])
                except zmq.ZMQError:
                    pass
            self.disconnect(linger=1000)
            for state in self.states.values():
                state.close()

    def handle(self, frames: list[bytes]) -> None:
        header = W.parse_work(frames[0])
        if header.op != P.WorkOp.CHUNK or len(frames) != 3:
            return
        self.received = header.counter
        code, items = frames[1], frames[2]
        try:
            if code:
                task = self.codes.put(header.task, S.loads(code))
            else:
                task = self.codes.get(header.task)
                if task is None:
                    self.reply(header, P.ChunkStatus.NEED_CODE)
                    return
            pass_state, namespace, target, args, kwargs = task
            state = self.state(namespace) if pass_state else None
            chunk = S.loads(items)
        except Exception as exc:
            ok, body = False, failure([], 0, exc)
        else:
            self.running = True
            try:
                ok, body = run_chunk((target, args, kwargs), state, chunk, reraise=(_Leave,))
            finally:
                self.running = False
        self.reply(header, P.ChunkStatus.OK if ok else P.ChunkStatus.FAILED, body)

    def reply(self, chunk: W.WorkHeader, status: int, *body: bytes) -> None:
        flush_pending()  # what the target's queue handles sent arrives before its results
        self.send([W.work_header(P.WorkOp.RESULT, status=status, counter=self.received,
                                 task=chunk.task, chunk=chunk.chunk), *body])

    def state(self, namespace: str) -> State:
        state = self.states.get(namespace)
        if state is None:
            state = self.states[namespace] = State(
                self.server_address, namespace=namespace, secret_key=self.secret_key
            )
        return state


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
    stop: list[int] = []
    with _BrokerInfo(address, secret_key) as broker:
        host = _socket.gethostname()
        broker.workers_on(host)  # fails early: no server, or the key does not match
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
            pids = {p.pid for p in workers}
            deadline = time.monotonic() + JOIN_TIMEOUT
            while not stop and time.monotonic() < deadline:
                if pids <= broker.workers_on(host) or not any(p.is_alive() for p in workers):
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


class _BrokerInfo:
    """A connection to the broker that asks which workers it knows."""

    def __init__(self, address: ServerAddress, secret_key: Any, timeout: float = 10.0) -> None:
        keys = client_keys(secret_key)
        tasks, _workers = discover(address, keys, timeout=timeout)
        self.timeout = timeout
        self.conn = Connection(ServerAddress(tasks, address.pub_sub), keys=keys)

    def workers_on(self, host: str) -> set[int]:
        """The pids of the workers of ``host`` that the broker knows."""
        info = self.conn.request(P.SwarmKind.INFO, 0, S.dumps(None), b"default",
                                 timeout=self.timeout)
        return {w["pid"] for w in info["workers"] if w["host"] == host}

    def __enter__(self) -> _BrokerInfo:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.conn.close()
