"""The ``process_map`` worker pool: long-lived workers, one stream socket each.

Data flow::

    Context process                                   worker processes (zproc Process)
    ---------------                                   --------------------------------
    listener (Unix socket in a private 0700 dir) <--- connect, send its 16-byte token
    process_map(target, inputs, count)
      cut the inputs into count chunks of near-equal size
      socket ---(task, chunk, start, code, items)---> load the target (cached), apply it
                                                      to each item in order
      socket <--(task, chunk, status, results)------- results, or the error and the
                                                      results before it
    the iterator yields chunk after chunk, in input order;
    a worker's sentinel fires -> its unanswered chunks fail with ProcessError

Messages are length-prefixed pickles (the frames are defined in :mod:`zproc._protocol`;
the chunks, their running and their failures in :mod:`zproc._chunks`). The target and its
fixed arguments are pickled once per call; each chunk's inputs once per chunk. A plain
stream socket wakes the reader directly (ZeroMQ would add an I/O-thread hop at each end),
which matters for short maps.
The parent never blocks on a send (it keeps an outbox per worker and flushes it while it
waits for results), so a worker writing a large result can never deadlock with it. The
parent knows which worker holds which chunk: a chunk is answered by its worker, or failed
when that worker dies, never silently lost. Only processes started with the listener's
token are accepted; the listener is a Unix socket in a private directory (127.0.0.1 where
Unix sockets are unavailable), removed by :meth:`Pool.close`.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

from . import _pipes as W
from ._chunks import CodeCache, cut, dumps_code, failure, layout, map_length, read_chunk
from ._chunks import run_chunk
from ._proctree import POLLERR, POLLIN, POLLOUT, poll_fds
from ._progress import track
from ._queues import flush_pending
from ._transport import ServerAddress, make_private_ipc_dir, remove_ipc_dir
from .exceptions import ProcessError, TimeoutError, ZProcError
from .process import Process
from .state import State

__all__ = ["MapResult", "Pool", "Worker", "worker_main"]

#: Bytes read from a worker's socket at a time.
READ_SIZE = 1 << 18
#: Seconds new workers get to connect before ``process_map`` gives up.
READY_TIMEOUT = 60.0

_OK, _FAILED, _DEAD, _PART = (
    int(W.PoolStatus.OK), int(W.PoolStatus.FAILED), int(W.PoolStatus.DEAD), int(W.PoolStatus.PART)
)


class _Worker:
    """The parent's view of one worker: its Process, its socket and what it holds."""

    __slots__ = ("process", "token", "sock", "out", "inbuf", "busy", "scratch")

    def __init__(self, process: Process, token: bytes) -> None:
        self.process = process
        self.token = token
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.inbuf = bytearray()
        self.busy: set[tuple[int, int]] = set()
        self.scratch = bytearray(READ_SIZE)

    def send(self, data: bytes) -> None:
        """Queue one message and write what the socket takes now (never blocks)."""
        frame = W.pool_frame(data)
        if self.out:
            self.out += frame
            self.flush()
            return
        assert self.sock is not None
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            self.out += memoryview(frame)[sent:]

    def flush(self) -> None:
        assert self.sock is not None
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            del self.out[:sent]

    def receive(self) -> tuple[list[bytes], bool]:
        """Read what is available: ``(complete messages, end of stream)``."""
        assert self.sock is not None
        eof = False
        scratch = memoryview(self.scratch)
        while True:
            try:
                size = self.sock.recv_into(scratch)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not size:
                eof = True
                break
            self.inbuf += scratch[:size]
        return W.split_pool_frames(self.inbuf), eof

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


Worker = _Worker


class _Task:
    __slots__ = ("id", "chunks", "replies", "done")

    def __init__(self, task_id: int, chunks: list[tuple[int, int]]) -> None:
        self.id = task_id
        self.chunks = chunks  # (start, count) of each
        self.replies: dict[int, deque[tuple[int, Any]]] = {}
        self.done: set[int] = set()  # chunks whose last reply arrived

    def store(self, index: int, status: int, body: Any) -> None:
        if index in self.done:
            return
        self.replies.setdefault(index, deque()).append((status, body))
        if status != _PART:
            self.done.add(index)


class MapResult(itertools.chain):  # type: ignore[type-arg]
    """The lazy iterator returned by ``process_map`` (iterates in C, chunk by chunk).

    :meth:`close` (or dropping it) discards the results still to come.
    """

    __slots__ = ("_pool", "_task_id", "_chunks")

    def _bind(self, pool: Pool, task_id: int, chunks: Iterator[list[Any]]) -> MapResult:
        self._pool: Pool | None = pool
        self._task_id = task_id
        self._chunks = chunks
        return self

    def close(self) -> None:
        """Stop iterating; results not consumed yet are discarded."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool._discard(self._task_id)
            self._chunks.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        self.close()


class Pool:
    """The workers of one Context and the listener they connect to.

    Parameters
    ----------
    spawn
        Starts one worker ``Process`` with the given :func:`worker_main` arguments (the
        Context records it in ``process_list`` and ``worker_list``).
    """

    def __init__(
        self,
        spawn: Callable[[tuple[Any, ...]], Process],
        server_address: ServerAddress,
        namespace: str,
        request_timeout: float | None,
        secret_key: Any = None,
    ) -> None:
        self._spawn = spawn
        self._server = (tuple(server_address), namespace, request_timeout, secret_key)
        self._listener: socket.socket | None = None
        self._address: Any = None
        self._dir: str | None = None
        self._workers: dict[int, _Worker] = {}  # connected, by socket fd
        self._tasks: dict[int, _Task] = {}
        self._next_task = 0
        self._rotate = 0
        self._closed = False

    # -- listener and workers -------------------------------------------------------------

    def _listen(self) -> socket.socket:
        if self._closed:
            raise ZProcError("the Context of this process_map is closed")
        if self._listener is None:
            if hasattr(socket, "AF_UNIX"):
                self._dir = make_private_ipc_dir()
                self._address = os.path.join(self._dir, "map")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                self._address = ("127.0.0.1", 0)
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind(self._address)
                listener.listen(128)
            except BaseException:
                listener.close()
                self._remove_dir()
                raise
            self._address = listener.getsockname()
            listener.setblocking(False)
            self._listener = listener
        return self._listener

    def _start_worker(self) -> _Worker:
        token = os.urandom(W.POOL_TOKEN_SIZE)
        address, namespace, request_timeout, secret_key = self._server
        process = self._spawn(
            (self._address, token, address, namespace, request_timeout, os.getpid(), secret_key)
        )
        return _Worker(process, token)

    def _workers_for(self, count: int, new: bool) -> list[_Worker]:
        self._listen()
        for worker in list(self._workers.values()):
            if not worker.process.is_alive:
                self._worker_died(worker)
        missing = count if new else max(0, count - len(self._workers))
        if missing:
            fresh = [self._start_worker() for _ in range(missing)]
            self._await_connected(fresh)
            if new:
                return fresh
        workers = list(self._workers.values())
        self._rotate = (self._rotate + count) % len(workers)
        workers = workers[self._rotate :] + workers[: self._rotate]
        workers.sort(key=lambda w: len(w.busy))
        return workers[:count]

    def start_workers(self, count: int) -> list[_Worker]:
        """Start ``count`` new workers and wait until they are connected.

        For a caller that drives their sockets itself (``zproc.executor``): the workers
        stay out of :meth:`map`'s reach, and :meth:`forget` drops one of them.
        """
        self._listen()
        fresh = [self._start_worker() for _ in range(count)]
        self._await_connected(fresh)
        for worker in fresh:
            self.forget(worker)
            worker.busy.clear()
        return fresh

    def forget(self, worker: _Worker) -> None:
        """Stop counting ``worker`` among the workers :meth:`map` uses."""
        if worker.sock is not None and self._workers.get(worker.sock.fileno()) is worker:
            del self._workers[worker.sock.fileno()]

    def _await_connected(self, workers: list[_Worker]) -> None:
        listener = self._listen()
        pending = {w.token: w for w in workers}
        deadline = time.monotonic() + READY_TIMEOUT
        while pending:
            fds = {listener.fileno(): POLLIN}
            for worker in pending.values():
                sentinel = worker.process._sentinel
                if sentinel is None or worker.process.exitcode is not None:
                    process = worker.process
                    raise ProcessError(
                        f"a process_map worker (pid {process.pid}) exited with code "
                        f"{process.exitcode} before it connected; see its stderr. Check "
                        f"that the Context's process defaults (backend=...) can start "
                        f"processes",
                        pid=process.pid,
                        exitcode=process.exitcode,
                    )
                fds[sentinel] = POLLIN
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(pending)} process_map worker(s) did not connect to "
                    f"{self._address!r} within {READY_TIMEOUT} s; the machine may be "
                    f"overloaded"
                )
            poll_fds(fds, min(remaining, 0.1))
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                connected = pending.pop(_read_token(conn), None)
                if connected is None:
                    conn.close()  # not one of ours
                    continue
                conn.setblocking(False)
                connected.sock = conn
                self._workers[conn.fileno()] = connected

    # -- receiving ------------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for results or worker deaths, and handle them."""
        fds: dict[int, int] = {}
        sentinels: dict[int, _Worker] = {}
        for fd, worker in list(self._workers.items()):
            fds[fd] = POLLIN | (POLLOUT if worker.out else 0)
            if worker.busy:
                sentinel = worker.process._sentinel
                if sentinel is None or (
                    not worker.process._sentinel_exact and worker.process.exitcode is not None
                ):
                    self._dead(worker)
                    return
                if not worker.process._sentinel_exact:
                    timeout = min(timeout, 0.1)
                sentinels[sentinel] = worker
                fds[sentinel] = POLLIN
        for fd, events in poll_fds(fds, timeout):
            connected = self._workers.get(fd)
            if connected is not None:
                if events & POLLOUT:
                    self._flush(connected)
                if events & (POLLIN | POLLERR):
                    self._receive(connected)
            elif fd in sentinels and sentinels[fd].process.exitcode is not None:
                self._dead(sentinels[fd])

    def _dead(self, worker: _Worker) -> None:
        if worker.sock is not None:
            self._receive(worker)  # what it sent before it died
        self._worker_died(worker)

    def _flush(self, worker: _Worker) -> None:
        try:
            worker.flush()
        except OSError:
            self._worker_died(worker)

    def _receive(self, worker: _Worker) -> None:
        messages, eof = worker.receive()
        for message in messages:
            task_id, index, status, body = W.parse_pool_reply(message)
            if status != _PART:
                worker.busy.discard((task_id, index))
            task = self._tasks.get(task_id)
            if task is not None:
                task.store(index, status, body)
        if eof:
            # The worker's end closed: it is exiting. Give it a moment, for its exit code.
            if worker.process.is_alive:
                worker.process._wait_exit(time.monotonic() + 1.0)
            self._worker_died(worker)

    def _worker_died(self, worker: _Worker) -> None:
        if worker.sock is not None:
            fd = worker.sock.fileno()
            if self._workers.get(fd) is worker:
                del self._workers[fd]
            worker.close()
        info = (worker.process.pid, worker.process.exitcode)
        for task_id, index in worker.busy:
            task = self._tasks.get(task_id)
            if task is not None:
                task.store(index, _DEAD, info)
        worker.busy.clear()

    # -- mapping --------------------------------------------------------------------------

    def map(
        self,
        target: Callable[..., Any],
        map_iter: Any,
        map_args: Any,
        map_kwargs: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        count: int,
        stateful: bool,
        new: bool,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Send the chunks to the workers now; return the iterator over the results.

        The ``map_*`` inputs are sequences or None, as ``_chunks.map_inputs`` makes
        them. With ``progress``, the results are counted as they are consumed (see
        ``_progress``).
        """
        inputs = (map_iter, map_args, map_kwargs)
        length = map_length(*inputs)
        if length == 0:
            return iter(())
        chunks = layout(length, count)
        code = dumps_code((target, args, kwargs, stateful), target, args, kwargs)
        workers = self._workers_for(count, new)
        self._next_task += 1
        task = _Task(self._next_task, chunks)
        self._tasks[task.id] = task
        for index, (start, size) in enumerate(chunks):
            message = W.pool_task(task.id, index, start, code, cut(inputs, start, size))
            self._send(task, index, message, workers[index % len(workers)])
        results = self._results(task)
        if progress:
            results = track(results, length, "process_map")
        result = cast(MapResult, MapResult.from_iterable(results))
        return result._bind(self, task.id, results)

    def _send(self, task: _Task, index: int, message: bytes, worker: _Worker) -> None:
        for candidate in [worker, *self._workers.values()]:
            if candidate.sock is None:
                continue
            try:
                candidate.send(message)
            except OSError:
                self._worker_died(candidate)
                continue
            candidate.busy.add((task.id, index))
            return
        task.store(index, _DEAD, (worker.process.pid, worker.process.exitcode))

    def _wait(self, task: _Task, index: int) -> tuple[int, Any]:
        while not task.replies.get(index):
            if self._closed:
                raise ZProcError(
                    "the Context of this process_map was closed before all results arrived"
                )
            self._pump(1.0)
        return task.replies[index].popleft()

    def _results(self, task: _Task) -> Iterator[list[Any]]:
        """Each chunk's results, in order; raises where a chunk failed."""
        try:
            for index, (start, count) in enumerate(task.chunks):
                status = _PART
                while status == _PART:
                    status, body = self._wait(task, index)
                    if status != _DEAD:
                        results, error = read_chunk(status != _FAILED, body, start, "process_map")
                        yield results
                        if error is not None:
                            raise error
                    else:
                        pid, exitcode = body
                        raise ProcessError(
                            f"the process_map worker {pid} died (exit code {exitcode}) while "
                            f"it computed items {start} to {start + count - 1}; the target "
                            f"probably crashed it "
                            f"(os._exit, a signal, out of memory) or the worker was stopped",
                            pid=pid,
                            exitcode=exitcode,
                        )
        finally:
            self._discard(task.id)

    def _discard(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _remove_dir(self) -> None:
        if self._dir is not None:
            remove_ipc_dir(self._dir)
            self._dir = None

    def close(self) -> None:
        """Close the sockets and remove the listener's directory.

        The workers themselves are stopped by the Context.
        """
        if self._closed:
            return
        self._closed = True
        self._tasks.clear()
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._remove_dir()


def _read_token(conn: socket.socket) -> bytes:
    """The token a new connection sends first (empty if it sends none within 5 s)."""
    conn.settimeout(5.0)
    token = b""
    try:
        while len(token) < W.POOL_TOKEN_SIZE:
            data = conn.recv(W.POOL_TOKEN_SIZE - len(token))
            if not data:
                break
            token += data
    except OSError:
        pass
    return token


# -- the worker side ---------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            return None
        view = view[got:]
    return buf


def worker_main(
    address: Any,
    token: bytes,
    server_address: tuple[str, str],
    namespace: str,
    request_timeout: float | None,
    parent_pid: int,
    secret_key: Any = None,
) -> None:
    """Entry point of a ``process_map`` worker: run chunks until stopped or orphaned."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    sock.sendall(token)
    codes = CodeCache()
    state: State | None = None
    try:
        while True:
            if not poll_fds({sock.fileno(): POLLIN}, 1.0):
                if os.getppid() != parent_pid:
                    return  # the Context's process is gone
                continue
            prefix = _recv_exact(sock, W.POOL_SIZE_BYTES)
            message = None if prefix is None else _recv_exact(sock, W.pool_frame_size(prefix))
            if message is None:
                return  # the Context closed its end
            task_id, index, start, code, items = W.parse_pool_task(memoryview(message))
            send = functools.partial(_send_reply, sock, task_id, index)
            try:
                target, args, kwargs, stateful = codes.load(code)
                if stateful and state is None:
                    state = State(
                        server_address,
                        namespace=namespace,
                        request_timeout=request_timeout,
                        secret_key=secret_key,
                    )
            except Exception as exc:
                send(_FAILED, failure([], 0, exc))
                continue
            ok, body = run_chunk(
                (target, args, kwargs),
                state if stateful else None,
                items,
                start=start,
                send_part=functools.partial(send, _PART),
            )
            send(_OK if ok else _FAILED, body)
    finally:
        if state is not None:
            state.close()
        sock.close()


def _send_reply(sock: socket.socket, task_id: int, index: int, status: int, body: bytes) -> None:
    flush_pending()  # what the target's queue handles sent arrives before its results
    sock.sendall(W.pool_reply(task_id, index, status, body))
