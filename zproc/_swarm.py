"""The worker swarm's engine: a broker thread in the server process, and the worker loop.

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
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import zmq

from . import _protocol as P
from . import _serialization as S
from ._client import Connection, new_identity
from ._security import ClientKeys, ServerKeys, client_keys, configure_client, configure_server
from ._transport import ServerAddress, bind_random_tcp, get_context, make_private_ipc_dir
from ._transport import remove_ipc_dir
from .exceptions import ProtocolError, ServerUnavailableError, TaskError, TimeoutError

__all__ = ["Broker", "worker_main"]

log = logging.getLogger("zproc")

#: Defaults of the retention limits and of the attempts per chunk.
DEFAULT_MAX_TASKS = 1000
DEFAULT_MAX_AGE = 3600.0
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL = 0.25
#: Seconds without a heartbeat after which the broker drops a worker (and the worker,
#: without a PONG, looks for the broker again).
WORKER_LIVENESS = 3.0
#: Seconds an idle worker waits before it says READY again (in case the broker lost it).
REANNOUNCE = 1.0
#: A chunk sent this long ago to a worker that says it never got it is sent again.
RESEND_AFTER = 2.0
#: Most bytes of results in one RESULTS reply (a single larger chunk still goes out).
REPLY_BYTES = 64 * 1024 * 1024
#: Task codes a worker keeps (the broker mirrors this cache per worker).
CODE_CACHE = 8
#: A worker whose last chunk took less than this many seconds gets its next chunk before
#: it finishes the current one (hiding the round trip); slower workers get one at a time,
#: so that a chunk never waits behind a slow one.
PREFETCH_BELOW = 0.05
#: How often the broker looks at deadlines and retention, in seconds.
HOUSEKEEPING = 0.1


# -- the broker ------------------------------------------------------------------------


class _Chunk:
    __slots__ = ("index", "start", "count", "items", "attempts", "status", "body", "holder")

    def __init__(self, index: int, start: int, count: int, items: bytes) -> None:
        self.index = index
        self.start = start
        self.count = count
        self.items: bytes | None = items
        self.attempts = 0
        self.status: int | None = None  # a ChunkStatus once finished
        self.body = b""
        self.holder: str = ""  # description of the last worker that took it


class _Task:
    __slots__ = (
        "id", "code", "chunks", "length", "max_attempts", "keep", "left", "finished", "waiters",
        "done_bytes", "settled",
    )

    def __init__(
        self, task_id: int, length: int, code: bytes, max_attempts: int, keep: bool,
        chunks: list[_Chunk],
    ) -> None:
        self.id = task_id
        self.keep = keep  # False: dropped once its results were sent
        self.code = code
        self.chunks = chunks
        self.length = length
        self.max_attempts = max_attempts
        self.left = len(chunks)
        self.finished: float | None = None
        self.waiters: list[_Waiter] = []  # parked requests for results
        self.done_bytes = 0  # size of the finished chunks' results
        #: every chunk is done, one failed, or the finished results fill a reply: what a
        #: keep=False task (a map waiting for all its results) answers its requests with
        self.settled = not chunks


class _Waiter:
    """A request for results parked until its first chunk is done (or its deadline)."""

    __slots__ = ("identity", "rid", "first", "deadline", "workers")

    def __init__(
        self, identity: bytes, rid: int, first: int, deadline: float, workers: int | None
    ) -> None:
        self.identity = identity
        self.rid = rid
        self.first = first
        self.deadline = deadline
        self.workers = workers  # a SUBMIT that waits: its reply starts with this count


class _Worker:
    __slots__ = (
        "id", "pid", "host", "sent", "sent_at", "held", "began", "quick", "idle", "known",
        "seen",
    )

    def __init__(self, identity: bytes, pid: int, host: str, received: int, now: float) -> None:
        self.id = identity
        self.pid = pid
        self.host = host
        self.sent = received  # chunks sent to it (it tells how many it received)
        self.sent_at = now
        self.held: list[tuple[int, int]] = []  # (task, chunk) it holds, running one first
        self.began = now  # when the running chunk began (about)
        self.quick = False  # its last chunk took less than PREFETCH_BELOW
        self.idle = False  # in the idle queue
        self.known: OrderedDict[int, None] = OrderedDict()  # tasks whose code it has
        self.seen = now

    def describe(self) -> str:
        return f"worker pid {self.pid} on {self.host}"


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _check_submit(task_id: Any, length: Any, code: Any, max_attempts: Any, layout: Any) -> None:
    """Reject a SUBMIT whose fields would fail later, in the broker's loop."""
    problem = ""
    if not _is_int(task_id, 1, 2**64 - 1):
        problem = f"task id {task_id!r} is not an int in [1, 2**64)"
    elif not _is_int(length, 0, 2**63) or not _is_int(max_attempts, -(2**63), 2**63):
        problem = f"length {length!r} or max_attempts {max_attempts!r} is not an int"
    elif type(code) is not bytes:
        problem = f"the code is a {type(code).__name__}, not bytes"
    elif not isinstance(layout, (list, tuple)) or len(layout) >= 2**32:
        problem = "the chunks are not a list"
    else:
        for part in layout:
            if not (
                isinstance(part, tuple) and len(part) == 3 and _is_int(part[0], 0, 2**63)
                and _is_int(part[1], 0, 2**63) and type(part[2]) is bytes
            ):
                problem = f"a chunk is not (start, count, items bytes): {part!r:.80}"
                break
    if problem:
        raise ProtocolError(
            f"malformed swarm SUBMIT: {problem}; use the same zproc version on both sides"
        )


def _bind(sock: zmq.Socket[Any], address: ServerAddress, folder: str | None, name: str) -> str:
    """Bind next to the server: same private ipc directory, or same tcp host."""
    req = address.req_rep
    if req.startswith("ipc://"):
        assert folder is not None
        endpoint = f"ipc://{folder}/{name}"
        sock.bind(endpoint)
        return endpoint
    host = req[len("tcp://") :].rsplit(":", 1)[0]
    if host.startswith("["):
        sock.ipv6 = True
    return bind_random_tcp(sock, host)


class Broker:
    """The swarm's broker: two ROUTER sockets served by one thread of the server process.

    Bound in the constructor (errors surface in the server's reply), then owned by the
    thread until :meth:`close`.
    """

    def __init__(
        self, address: ServerAddress, keys: ServerKeys | None, ipc_dir: str | None
    ) -> None:
        self.max_tasks = DEFAULT_MAX_TASKS
        self.max_age = DEFAULT_MAX_AGE
        ctx = get_context()
        self._own_dir: str | None = None
        folder = ipc_dir
        if address.req_rep.startswith("ipc://") and folder is None:
            folder = self._own_dir = make_private_ipc_dir()
        self.tasks_sock = ctx.socket(zmq.ROUTER)
        self.workers_sock = ctx.socket(zmq.ROUTER)
        try:
            for sock in (self.tasks_sock, self.workers_sock):
                sock.linger = 0
                sock.sndhwm = 0
                sock.rcvhwm = 0
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                configure_server(sock, keys)
            self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            tag = os.urandom(4).hex()
            self.endpoints = (
                _bind(self.tasks_sock, address, folder, f"swarm-tasks-{tag}"),
                _bind(self.workers_sock, address, folder, f"swarm-workers-{tag}"),
            )
        except BaseException:
            self._close_sockets()
            raise
        self.tasks: dict[int, _Task] = {}
        self.done: OrderedDict[int, float] = OrderedDict()  # finished tasks, oldest first
        self.queue: deque[tuple[_Task, _Chunk]] = deque()
        self.workers: dict[bytes, _Worker] = {}
        self.idle: deque[_Worker] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zproc-swarm", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def configure(self, settings: dict[str, Any]) -> None:
        """Apply retention settings (``max_tasks``, ``max_age``); absent keys stay."""
        if settings.get("max_tasks") is not None:
            self.max_tasks = int(settings["max_tasks"])
        if settings.get("max_age") is not None:
            self.max_age = float(settings["max_age"])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self.tasks_sock, self.workers_sock):
            if not sock.closed:
                sock.close(0)
        if self._own_dir is not None:
            remove_ipc_dir(self._own_dir)
            self._own_dir = None
        else:
            for endpoint in getattr(self, "endpoints", ()):
                if endpoint.startswith("ipc://"):
                    try:
                        os.unlink(endpoint[len("ipc://") :])
                    except OSError:
                        pass

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        tasks_sock, workers_sock = self.tasks_sock, self.workers_sock
        poller = zmq.Poller()
        poller.register(tasks_sock, zmq.POLLIN)
        poller.register(workers_sock, zmq.POLLIN)
        next_check = 0.0
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(HOUSEKEEPING * 1000)))
                if workers_sock in ready:
                    self._drain(workers_sock, self._on_worker)
                if tasks_sock in ready:
                    self._drain(tasks_sock, self._on_request)
                now = time.monotonic()
                if now >= next_check:
                    self._housekeeping(now)
                    next_check = now + HOUSEKEEPING
                self._dispatch()
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("zproc server %d: the swarm broker failed", os.getpid())
        finally:
            self._close_sockets()

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[list[bytes]], None]) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except ProtocolError as exc:
                log.warning("zproc swarm broker: dropped a message: %s", exc)
            except zmq.ContextTerminated:
                raise
            except Exception:  # keep serving the others
                log.exception("zproc swarm broker: failed to handle a message")

    # requests from clients
    def _reply(self, identity: bytes, rid: int, body: bytes, status: int = P.Status.OK) -> None:
        self.tasks_sock.send_multipart([identity, P.reply_header(status, rid), body])

    def _fail(self, identity: bytes, rid: int, exc: BaseException) -> None:
        self._reply(identity, rid, S.dumps_exception(exc), P.Status.ERROR)

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            raise ProtocolError(f"a swarm request has 2 frames, got {len(frames) - 1}")
        identity, header, body = frames
        try:
            request = P.parse_swarm_request(header)
        except ProtocolError as exc:
            rid = P.request_id_of(header)
            if rid is None:
                raise
            self._fail(identity, rid, exc)
            return
        rid = request.request_id
        try:
            kind = request.kind
            if kind == P.SwarmKind.RESULTS:
                task_id, first, wait = S.loads(body)
                self._wait(self._task(task_id), _Waiter(identity, rid, first, wait, None))
            elif kind == P.SwarmKind.SUBMIT:
                task, wait = self._submit(S.loads(body))
                waiter = _Waiter(identity, rid, 0, wait, len(self.workers))
                if wait > 0:
                    self._wait(task, waiter)
                else:
                    self._reply(identity, rid, S.dumps((len(self.workers), None)))
            elif kind == P.SwarmKind.FORGET:
                self._reply(identity, rid, S.dumps(self._forget(S.loads(body))))
            elif kind == P.SwarmKind.INFO:
                self._reply(identity, rid, S.dumps(self._info()))
        except Exception as exc:
            self._fail(identity, rid, exc)

    def _task(self, task_id: int) -> _Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise self._missing(task_id)
        return task

    def _missing(self, task_id: int) -> TaskError:
        return TaskError(
                f"the swarm has no task {task_id:016x}: it was forgotten, its results "
                f"expired (this broker keeps at most {self.max_tasks} finished tasks, for "
                f"{self.max_age:g} s), it was never submitted to this server, or the "
                f"server restarted",
                task_id=f"{task_id:016x}",
            )

    def _wait(self, task: _Task, waiter: _Waiter) -> None:
        """Answer now if the first chunk is done or the wait is 0, else park the request."""
        wait, waiter.deadline = waiter.deadline, time.monotonic() + waiter.deadline
        if not self._answer(task, waiter, force=wait <= 0):
            task.waiters.append(waiter)

    def _submit(self, message: tuple[Any, ...]) -> tuple[_Task, float]:
        task_id, length, code, max_attempts, keep, wait, layout = message
        _check_submit(task_id, length, code, max_attempts, layout)
        if task_id in self.tasks:
            raise ProtocolError(f"task {task_id:016x} was already submitted")
        chunks = [
            _Chunk(i, start, count, items) for i, (start, count, items) in enumerate(layout)
        ]
        task = _Task(task_id, length, code, max(1, max_attempts), bool(keep), chunks)
        self.tasks[task_id] = task
        self.queue.extend((task, chunk) for chunk in chunks)
        if not chunks:
            self._finish(task)
        return task, float(wait)

    def _forget(self, task_id: int) -> bool:
        task = self.tasks.pop(task_id, None)
        self.done.pop(task_id, None)
        if task is None:
            return False
        self._drop_waiters(task)
        return True

    def _drop_waiters(self, task: _Task) -> None:
        waiters, task.waiters = task.waiters, []
        for waiter in waiters:
            self._fail(waiter.identity, waiter.rid, self._missing(task.id))

    def _info(self) -> dict[str, Any]:
        return {
            "workers": [
                {"pid": w.pid, "host": w.host, "busy": bool(w.held)}
                for w in self.workers.values()
            ],
            "idle": sum(1 for w in self.workers.values() if not w.held),
            "queued": sum(1 for task, chunk in self.queue if chunk.status is None
                          and task.id in self.tasks),
            "tasks": len(self.tasks),
            "finished_tasks": len(self.done),
            "max_tasks": self.max_tasks,
            "max_age": self.max_age,
        }

    def _answer(self, task: _Task, waiter: _Waiter, force: bool = False) -> bool:
        """Reply with the finished chunks from the waiter's first on (none if ``force``);
        False if its first chunk is not done, or if the task is not settled and its
        results are not kept (a map's caller wants them all: one reply, not one per chunk)."""
        chunks, first = task.chunks, waiter.first
        if not (force or task.keep or task.settled) and first < len(chunks):
            return False
        out: list[tuple[int, int, int, int, bytes]] = []
        size = 0
        for i in range(first, len(chunks)):
            chunk = chunks[i]
            if chunk.status is None or (out and size + len(chunk.body) > REPLY_BYTES):
                break
            out.append((chunk.index, chunk.start, chunk.count, chunk.status, chunk.body))
            size += len(chunk.body)
        if not out and not force and first < len(chunks):
            return False
        payload = (len(chunks), task.length, out)
        self._reply(waiter.identity, waiter.rid,
                    S.dumps(payload if waiter.workers is None else (waiter.workers, payload)))
        last = out[-1] if out else None
        if not task.keep and (
            not chunks or last and (last[0] == len(chunks) - 1 or last[3] != P.ChunkStatus.OK)
        ):
            self._forget(task.id)  # its caller has everything it will read
        return True

    # messages from workers
    def _on_worker(self, frames: list[bytes]) -> None:
        identity = frames[0]
        header = P.parse_work(frames[1])
        op = header.op
        now = time.monotonic()
        if op == P.WorkOp.HEARTBEAT:
            worker = self.workers.get(frames[2]) if len(frames) > 2 else None
            if worker is not None:
                worker.seen = now
            self._send_worker(identity, [P.work_header(P.WorkOp.PONG, status=worker is None)])
            return
        worker = self.workers.get(identity)
        if op == P.WorkOp.RESULT:
            if worker is not None:
                worker.seen = now
                key = (header.task, header.chunk)
                held = key in worker.held
                if held:
                    if worker.held[0] == key:
                        worker.quick = now - worker.began < PREFETCH_BELOW
                        worker.began = now
                    worker.held.remove(key)
                self._set_idle(worker)
            else:
                held = False
            self._result(header, frames[2] if len(frames) > 2 else b"", worker, held)
        elif op == P.WorkOp.READY:
            if worker is None:
                pid, host = S.loads(frames[2]) if len(frames) > 2 else (0, "?")
                worker = self.workers[identity] = _Worker(identity, pid, host, header.counter,
                                                          now)
            worker.seen = now
            if worker.held and header.counter < worker.sent:
                if now - worker.sent_at > RESEND_AFTER:  # chunks that never reached it
                    self._requeue(worker, count_attempt=False)
                    worker.sent = header.counter
                    self._set_idle(worker)
            elif worker.held:
                self._requeue(worker, count_attempt=False)  # it got them, yet is idle
                self._set_idle(worker)
            else:
                worker.sent = max(worker.sent, header.counter)
                self._set_idle(worker)
        elif op == P.WorkOp.BYE:
            if worker is not None:
                self._remove(worker, lost=False)
        else:
            raise ProtocolError(f"unexpected swarm frame {op} from a worker")

    def _set_idle(self, worker: _Worker) -> None:
        if not worker.held and not worker.idle and self.workers.get(worker.id) is worker:
            worker.idle = True
            self.idle.append(worker)

    def _result(
        self, header: P.WorkHeader, body: bytes, worker: _Worker | None, held: bool
    ) -> None:
        task = self.tasks.get(header.task)
        if task is None or header.chunk >= len(task.chunks):
            return  # forgotten, expired or unknown: nobody wants it
        chunk = task.chunks[header.chunk]
        if chunk.status is not None:
            return  # a second execution of the same chunk: the first result stands
        if header.status == P.ChunkStatus.NEED_CODE:
            if worker is not None:
                worker.known.clear()
            if held:  # otherwise the chunk was queued again already (or another has it)
                chunk.attempts -= 1
                self.queue.appendleft((task, chunk))
            return
        self._complete(task, chunk, header.status, body)

    def _complete(self, task: _Task, chunk: _Chunk, status: int, body: bytes) -> None:
        chunk.status = status
        chunk.body = body
        chunk.items = None
        task.left -= 1
        task.done_bytes += len(body)
        if task.left <= 0 or status != P.ChunkStatus.OK or task.done_bytes > REPLY_BYTES:
            task.settled = True
        if task.left <= 0:
            self._finish(task)
        if task.waiters:
            waiters, task.waiters = task.waiters, []
            task.waiters = [w for w in waiters if not self._answer(task, w)]

    def _finish(self, task: _Task) -> None:
        task.finished = time.monotonic()
        task.code = b""
        self.done[task.id] = task.finished

    def _send_worker(self, identity: bytes, frames: list[bytes]) -> bool:
        try:
            self.workers_sock.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise

    def _dispatch(self) -> None:
        """Chunks to idle workers, longest idle first; then one more to each quick one."""
        queue, idle = self.queue, self.idle
        while queue and idle:
            worker = idle.popleft()
            worker.idle = False
            if not worker.held and self.workers.get(worker.id) is worker:
                if not self._send_chunk(worker):
                    return
        if queue:
            for worker in list(self.workers.values()):
                if len(worker.held) == 1 and worker.quick and not self._send_chunk(worker):
                    return

    def _send_chunk(self, worker: _Worker) -> bool:
        """Send the next live chunk of the queue to ``worker``; False if none is left."""
        queue, tasks = self.queue, self.tasks
        while True:
            if not queue:
                self._set_idle(worker)
                return False
            task, chunk = queue.popleft()
            if chunk.status is None and tasks.get(task.id) is task:
                break
        known = worker.known
        if task.id in known:
            known.move_to_end(task.id)
            code = b""
        else:
            code = task.code
            known[task.id] = None
            if len(known) > CODE_CACHE:
                known.popitem(last=False)
        assert chunk.items is not None
        header = P.work_header(
            P.WorkOp.CHUNK, counter=worker.sent + 1, task=task.id, chunk=chunk.index
        )
        if not self._send_worker(worker.id, [header, code, chunk.items]):
            queue.appendleft((task, chunk))
            self._remove(worker, lost=False)
            return True
        worker.sent += 1
        worker.sent_at = now = time.monotonic()
        if not worker.held:
            worker.began = now
        worker.held.append((task.id, chunk.index))
        chunk.attempts += 1
        chunk.holder = worker.describe()
        return True

    def _requeue(self, worker: _Worker, count_attempt: bool) -> None:
        """Put the chunks ``worker`` holds back in front of the queue (or fail them).

        Only the running one (the first) counts as a failed attempt when it is lost.
        """
        held, worker.held = worker.held, []
        for position, (task_id, index) in reversed(list(enumerate(held))):
            self._requeue_chunk(task_id, index, count_attempt and position == 0)

    def _requeue_chunk(self, task_id: int, index: int, count_attempt: bool) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        chunk = task.chunks[index]
        if chunk.status is not None:
            return
        if not count_attempt:
            chunk.attempts -= 1
        elif chunk.attempts >= task.max_attempts:
            message = (
                f"chunk {chunk.index} of swarm task {task.id:016x} (items {chunk.start} to "
                f"{chunk.start + chunk.count - 1}) failed on all {chunk.attempts} attempts "
                f"it was allowed: each worker that took it died or stopped answering for "
                f"{WORKER_LIVENESS:g} s (the last one: {chunk.holder}). Check the workers' "
                f"output (a crash, the OOM killer), or allow more attempts with "
                f"Swarm(max_attempts=...)"
            )
            self._complete(task, chunk, P.ChunkStatus.LOST, S.dumps(message))
            return
        self.queue.appendleft((task, chunk))

    def _remove(self, worker: _Worker, lost: bool) -> None:
        self.workers.pop(worker.id, None)
        if lost:
            log.warning(
                "zproc swarm: %s sent no heartbeat for %g s; its chunk goes to another worker",
                worker.describe(), WORKER_LIVENESS,
            )
        self._requeue(worker, count_attempt=lost)

    def _housekeeping(self, now: float) -> None:
        for worker in [w for w in self.workers.values() if now - w.seen > WORKER_LIVENESS]:
            self._remove(worker, lost=True)
        for task in self.tasks.values():
            if task.waiters:
                waiters, task.waiters = task.waiters, []
                task.waiters = [
                    w for w in waiters if w.deadline > now or not self._answer(task, w, True)
                ]
        done = self.done
        while done:
            task_id, finished = next(iter(done.items()))
            if len(done) <= self.max_tasks and now - finished <= self.max_age:
                break
            done.popitem(last=False)
            gone = self.tasks.pop(task_id, None)
            if gone is not None:
                self._drop_waiters(gone)


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
