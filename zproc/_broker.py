"""The swarm's broker: two ROUTER sockets served by one thread of the server process.

The server starts it on the first ``SWARM`` request (:meth:`zproc._server.Server.swarm`).
Clients send tasks (code and chunks) and ask for results on the *tasks* endpoint; workers
(:mod:`zproc._worker`) take chunks and return results on the *workers* endpoint. The wire
format is in :mod:`zproc._protocol`, the constants both sides share in :mod:`zproc._swarm`.

Load balancing: a worker holds at most one chunk (two when it is quick: the next one is
sent before it finishes, hiding the round trip); a chunk goes to the worker idle for the
longest time, so fast workers take more chunks than slow ones. A worker whose heartbeats
stop for ``WORKER_LIVENESS`` seconds is dropped and its chunk goes back to the front of
the queue (a worker that says ``BYE`` hands its chunk back at once); after
``max_attempts`` lost attempts the chunk is marked ``LOST`` and the caller gets a
:class:`~zproc.TaskError`. A chunk may thus run twice (at-least-once execution); only its
first result is kept.

Results stay in the broker until ``FORGET``, or until the retention limits drop the
oldest finished tasks (``max_tasks``) or those finished more than ``max_age`` seconds ago.
Unfinished tasks are never dropped by these limits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import zmq

from . import _protocol as P
from . import _serialization as S
from . import _swarmwire as W
from ._security import Guard, _noteworthy, configure_server
from ._swarm import CODE_CACHE, WORKER_LIVENESS
from ._transport import (
    ROUTER_HWM,
    ServerAddress,
    bind_random_tcp,
    make_private_ipc_dir,
    remove_ipc_dir,
    server_socket,
)
from .exceptions import ProtocolError, TaskError

__all__ = ["Broker"]

log = logging.getLogger("zproc")

#: Defaults of the retention limits.
DEFAULT_MAX_TASKS = 1000
DEFAULT_MAX_AGE = 3600.0
#: A chunk sent this long ago to a worker that says it never got it is sent again.
RESEND_AFTER = 2.0
#: Most bytes of results in one RESULTS reply (a single larger chunk still goes out).
REPLY_BYTES = 64 * 1024 * 1024
#: A worker whose last chunk took less than this many seconds gets its next chunk before
#: it finishes the current one (hiding the round trip); slower workers get one at a time,
#: so that a chunk never waits behind a slow one.
PREFETCH_BELOW = 0.05
#: How often the broker looks at deadlines and retention, in seconds.
HOUSEKEEPING = 0.1


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
        self,
        address: ServerAddress,
        guard: Guard | None,
        ipc_dir: str | None,
        max_message_size: int,
    ) -> None:
        self.max_tasks = DEFAULT_MAX_TASKS
        self.max_age = DEFAULT_MAX_AGE
        self._own_dir: str | None = None
        folder = ipc_dir
        if address.req_rep.startswith("ipc://") and folder is None:
            folder = self._own_dir = make_private_ipc_dir()
        self.tasks_sock = server_socket(zmq.ROUTER, max_message_size, ROUTER_HWM)
        self.workers_sock = server_socket(zmq.ROUTER, max_message_size, ROUTER_HWM)
        try:
            for sock in (self.tasks_sock, self.workers_sock):
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                configure_server(sock, None if guard is None else guard.keys)
            self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if guard is not None:  # its failed handshakes are counted and logged too
                guard.watch([("swarm tasks", self.tasks_sock),
                             ("swarm workers", self.workers_sock)])
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
        #: RESULT messages dropped because their sender did not hold the chunk
        self.refused_results = 0
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
    def _reply(self, identity: bytes, rid: int, body: bytes) -> None:
        self.tasks_sock.send_multipart(P.reply(identity, P.OK, rid, body))

    def _fail(self, identity: bytes, rid: int, exc: BaseException) -> None:
        self.tasks_sock.send_multipart(P.error_reply(identity, rid, exc))

    def _on_request(self, frames: list[bytes]) -> None:
        try:
            request, body = P.parse_routed(frames, P.parse_swarm_request)
        except P.Rejected as rejected:
            if rejected.reply is None:
                raise  # logged by _drain
            self.tasks_sock.send_multipart(rejected.reply)  # the sender hears why
            return
        identity = frames[0]
        rid = request.request_id
        try:
            kind = request.kind
            if kind == P.SwarmKind.RESULTS:
                asked = P.decode(W.ResultsRequest, S.loads(body))
                waiter = _Waiter(identity, rid, asked.first, asked.wait, None)
                self._wait(self._task(asked.task), waiter)
            elif kind == P.SwarmKind.SUBMIT:
                submit = W.parse_submit_request(body)
                task = self._submit(submit)
                waiter = _Waiter(identity, rid, 0, submit.wait, len(self.workers))
                if submit.wait > 0:
                    self._wait(task, waiter)
                else:
                    self._reply(identity, rid, P.encode(W.SubmitReply(len(self.workers), None)))
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

    def _submit(self, submit: W.SubmitRequest) -> _Task:
        task_id = submit.task
        if task_id in self.tasks:
            raise ProtocolError(f"task {task_id:016x} was already submitted")
        chunks = [
            _Chunk(i, start, count, items)
            for i, (start, count, items) in enumerate(submit.chunks)
        ]
        task = _Task(
            task_id, submit.length, submit.code, max(1, submit.max_attempts), submit.keep,
            chunks,
        )
        self.tasks[task_id] = task
        self.queue.extend((task, chunk) for chunk in chunks)
        if not chunks:
            self._finish(task)
        return task

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
        out: list[W.ChunkResult] = []
        size = 0
        for i in range(first, len(chunks)):
            chunk = chunks[i]
            if chunk.status is None or (out and size + len(chunk.body) > REPLY_BYTES):
                break
            out.append((chunk.index, chunk.start, chunk.count, chunk.status, chunk.body))
            size += len(chunk.body)
        if not out and not force and first < len(chunks):
            return False
        self._reply(waiter.identity, waiter.rid,
                    W.encode_results_reply(len(chunks), task.length, out, waiter.workers))
        last = out[-1] if out else None
        if not task.keep and (
            not chunks or last and (last[0] == len(chunks) - 1 or last[3] != P.ChunkStatus.OK)
        ):
            self._forget(task.id)  # its caller has everything it will read
        return True

    # messages from workers
    def _on_worker(self, frames: list[bytes]) -> None:
        identity = frames[0]
        header, payload = W.parse_work_message(frames[1:])
        op = header.op
        now = time.monotonic()
        if op == P.WorkOp.HEARTBEAT:  # payload: the worker's identity on its main socket
            worker = None if payload is None else self.workers.get(payload)
            if worker is not None:
                worker.seen = now
            self._send_worker(identity, W.pong_message(unknown=worker is None))
            return
        worker = self.workers.get(identity)
        if op == P.WorkOp.RESULT:
            key = (header.task, header.chunk)
            if worker is None or key not in worker.held:
                # only the worker that holds a chunk completes it: a late result of a
                # chunk sent elsewhere since, or one from a peer that was never sent it
                self._refuse_result(header, worker)
                return
            worker.seen = now
            if worker.held[0] == key:
                worker.quick = now - worker.began < PREFETCH_BELOW
                worker.began = now
            worker.held.remove(key)
            self._set_idle(worker)
            self._result(header, payload or b"", worker)
        elif op == P.WorkOp.READY:
            if worker is None:
                info = W.WorkerInfo(0, "?")
                if payload is not None:
                    info = P.decode(W.WorkerInfo, S.loads(payload))
                worker = self.workers[identity] = _Worker(
                    identity, info.pid, info.host, header.counter, now
                )
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

    def _result(self, header: W.WorkHeader, body: bytes, worker: _Worker) -> None:
        """A result (or a request for the code) from the worker that holds the chunk."""
        task = self.tasks.get(header.task)
        if task is None or header.chunk >= len(task.chunks):
            return  # forgotten, expired or unknown: nobody wants it
        chunk = task.chunks[header.chunk]
        if chunk.status is not None:
            return  # a second execution of the same chunk: the first result stands
        if header.status == P.ChunkStatus.NEED_CODE:
            worker.known.clear()
            chunk.attempts -= 1
            self.queue.appendleft((task, chunk))
            return
        self._complete(task, chunk, header.status, body)

    def _refuse_result(self, header: W.WorkHeader, worker: _Worker | None) -> None:
        """Drop a RESULT from a peer that does not hold its chunk; counted and logged."""
        if header.status == P.ChunkStatus.NEED_CODE and worker is not None:
            worker.known.clear()  # a late request for code: nothing to refuse
            return
        self.refused_results += 1
        sender = "an unregistered peer" if worker is None else worker.describe()
        (log.warning if _noteworthy(self.refused_results) else log.debug)(
            "zproc swarm broker: refused a result for chunk %d of task %016x from %s, "
            "which does not hold that chunk (a late result of a chunk sent to another "
            "worker since, or a forged one); %d refused so far",
            header.chunk, header.task, sender, self.refused_results,
        )

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
        message = W.chunk_message(worker.sent + 1, task.id, chunk.index, code, chunk.items)
        if not self._send_worker(worker.id, message):
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
