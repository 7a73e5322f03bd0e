"""``zproc.Executor``: a :class:`concurrent.futures.Executor` on a Context's worker processes.

Data flow::

    any thread                 dispatcher thread (one per executor)       workers
    ----------                 ------------------------------------       -------
    submit(fn, *args)
      pickle the call, queue it
      wake the dispatcher ---> send queued calls to the least busy
                               workers, several per message burst --> run_chunk
                               replies: complete the futures      <-- results or failure
                               a worker dies: retry its calls on
                               another worker (max_retries), or
                               fail them with ProcessError; start
                               a replacement

The workers are ``process_map`` workers (:mod:`zproc._pool`: same processes, same wire
format, listed in the Context's ``worker_list``) that the executor starts for itself and
stops at shutdown: only the dispatcher thread touches their sockets. ``process_map(...,
executor=ex)`` runs a map's chunks on any other :class:`concurrent.futures.Executor` (a
dask or Ray cluster) with :func:`run_items`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from . import _pipes as W
from . import _serialization as S
from ._chunks import cut, dumps_code, layout, map_length, read_chunk, run_chunk
from ._pool import Pool, Worker
from ._proctree import POLLERR, POLLIN, POLLOUT, poll_fds
from ._queues import flush_pending
from .exceptions import ProcessError, ZProcError
from .process import Process, stop_processes
from .state import State

__all__ = [
    "ContextExecutor",
    "Executor",
    "FuturesExecutor",
    "PoolExecutor",
    "SwarmExecutor",
    "map_on",
    "run_items",
]

#: A worker gets more than one call at a time only when at least this many wait: a small
#: backlog stays cancellable, a large one is pipelined (fewer round trips).
PIPELINE_BACKLOG = 8
#: At most this many calls in flight per worker.
PIPELINE_DEPTH = 32

#: Any :class:`concurrent.futures.Executor` (``process_map(..., executor=...)``).
FuturesExecutor = concurrent.futures.Executor

_OK, _FAILED, _PART = int(W.PoolStatus.OK), int(W.PoolStatus.FAILED), int(W.PoolStatus.PART)


class _Job:
    """One call (``submit``) or one chunk (``map``): its future and its message."""

    __slots__ = ("future", "message", "start", "tries", "parts", "chunk")

    def __init__(self, future: concurrent.futures.Future[Any], message: bytes, start: int,
                 chunk: bool) -> None:
        self.future = future
        self.message = message
        self.start = start
        self.chunk = chunk
        self.tries = 0
        self.parts: list[Any] = []


def exit_text(exitcode: int | None) -> str:
    """``killed by SIGKILL`` / ``exit code 3`` for a worker's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            pass
    return f"exit code {exitcode}"


class Executor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` running calls in zproc worker processes.

    Made by :meth:`Context.executor <zproc.Context.executor>` (the Context's worker
    processes) and :meth:`Swarm.executor <zproc.Swarm.executor>` (the swarm's workers, on
    any host). ``submit`` returns a real :class:`concurrent.futures.Future`; functions
    travel with cloudpickle (lambdas and closures work); a failed call raises its own
    exception, with the worker's traceback as ``__cause__``. ``map(..., chunksize=n)``
    sends ``n`` items per message.

    .. versionadded:: 1.0
    """

    max_retries: int

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like :func:`map`, calls in parallel: ``chunksize`` items travel together."""
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        futures = []
        zipped = iterables[0] if len(iterables) == 1 else zip(*iterables, strict=False)
        it = iter(zipped)
        start = 0
        while True:
            block = list(itertools.islice(it, chunksize))
            if not block:
                break
            items = (block, None, None, len(block)) if len(iterables) == 1 else (
                None, block, None, len(block))
            futures.append((start, self._chunk(fn, items, start)))
            start += len(block)
        return _chunk_results(futures, end, self._decode)

    def _chunk(self, fn: Callable[..., Any], items: Any, start: int
               ) -> concurrent.futures.Future[Any]:
        """A future of the reply of one chunk of :meth:`map` (read by :meth:`_decode`)."""
        return self.submit(run_items, dumps_code((fn, (), {}), fn, (), {}), None, items, start)

    def _decode(self, start: int, reply: Any) -> tuple[list[Any], BaseException | None]:
        return _read_reply(start, reply, "Executor.map")


class PoolExecutor(Executor):
    """The :class:`Executor` of :meth:`Context.executor <zproc.Context.executor>`.

    A worker that dies during a call is replaced; its calls run again on another worker
    up to ``max_retries`` times, then fail with :class:`~zproc.ProcessError` naming how the
    worker ended. The executor stays usable.
    """

    def __init__(self, pool: Pool, max_workers: int, max_retries: int = 0) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self.max_workers = max_workers
        self.max_retries = max_retries
        self._pool = pool
        self._workers: list[Worker] = pool.start_workers(max_workers)
        self._flight: dict[Worker, dict[int, _Job]] = {w: {} for w in self._workers}
        self._pending: collections.deque[tuple[int, _Job]] = collections.deque()
        self._ids = itertools.count(1)
        self._code: tuple[Any, bytes] = (None, b"")
        self._lock = threading.Lock()
        self._shutdown = False
        self._closing = False  # the Context is closing: fail what runs, start nothing
        self._queued = 0  # calls queued so far (the dispatcher compares it before sleeping)
        self._asleep = False
        self._broken: BaseException | None = None  # why the dispatcher thread stopped
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="zproc-executor", daemon=True)
        self._thread.start()

    @property
    def worker_list(self) -> list[Process]:
        """The worker processes serving this executor now."""
        return [w.process for w in self._workers]

    # -- the caller's side --------------------------------------------------------------

    def _encode(self, fn: Callable[..., Any]) -> bytes:
        last, code = self._code
        if last is not fn:
            code = dumps_code((fn, (), {}, False), fn, (), {})
            self._code = (fn, code)
        return code

    def _queue(self, future: concurrent.futures.Future[Any], fn: Callable[..., Any],
               items: Any, start: int, chunk: bool) -> None:
        job_id = next(self._ids)
        try:
            message = W.pool_frame(W.pool_task(job_id, 0, start, self._encode(fn), items))
        except S.PICKLING_ERRORS as exc:
            raise TypeError(
                f"this call cannot be sent to a worker: {exc}. Pass data that pickles "
                f"(plain values, importable classes) and a function cloudpickle takes"
            ) from exc
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._broken is not None or os.getpid() != self._pid:
                raise ZProcError(
                    f"this executor cannot take calls (its dispatcher stopped: "
                    f"{self._broken!r}, or it belongs to process {self._pid}); create a new one"
                )
            self._pending.append((job_id, _Job(future, message, start, chunk)))
            self._queued += 1
        if self._asleep:
            self._wake()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; its :class:`~concurrent.futures.Future`."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r}")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue(future, fn, (None, [args], [kwargs] if kwargs else None, 1), 0, False)
        return future

    def _chunk(self, fn: Callable[..., Any], items: Any, start: int
               ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue(future, fn, items, start, True)
        return future

    def _decode(self, start: int, reply: Any) -> tuple[list[Any], BaseException | None]:
        return cast(tuple[list[Any], BaseException | None], reply)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; with ``cancel_futures``, cancel those not sent to a worker.

        The workers stop once the calls sent to them are done (``wait``: wait for that).
        """
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft()[1].future.cancel()
        self._wake()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (a full pipe), or closed

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"workers={len(self._workers)}"
        return f"<zproc.Executor (Context) {state} pending={len(self._pending)}>"

    # -- the dispatcher thread ----------------------------------------------------------

    def _abort(self) -> None:
        """For the Context's close: cancel what waits, fail what runs, stop the workers."""
        self._closing = True
        self.shutdown(wait=False, cancel_futures=True)
        if self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def _run(self) -> None:
        try:
            while True:
                seen = self._queued
                self._dispatch()
                if self._closing:
                    self._fail_all(ZProcError("the Context of this executor was closed"))
                    return
                if self._shutdown and not self._pending and not any(self._flight.values()):
                    return
                self._poll(seen)
        except BaseException as exc:  # never leave futures hanging
            with self._lock:
                self._broken = exc
            self._fail_all(exc)
            raise
        finally:
            self._close()

    def _dispatch(self) -> None:
        pending = self._pending
        while pending:
            if not self._workers:
                if not self._replace():
                    return
            busy = self._flight
            worker = min(self._workers, key=lambda w: len(busy[w]))
            load = len(busy[worker])
            if load and (len(pending) < PIPELINE_BACKLOG or load >= PIPELINE_DEPTH):
                break
            job_id, job = pending.popleft()
            if not job.tries and not job.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited (a retried call is running already)
            busy[worker][job_id] = job
            worker.out += job.message
        for worker in self._workers:
            if worker.out:
                self._flush(worker)

    def _flush(self, worker: Worker) -> None:
        try:
            worker.flush()
        except OSError:
            self._died(worker)

    def _poll(self, seen: int) -> None:
        fds = {self._wake_r: POLLIN}
        timeout = 1.0
        sentinels: dict[int, Worker] = {}
        for worker in self._workers:
            assert worker.sock is not None
            fds[worker.sock.fileno()] = POLLIN | (POLLOUT if worker.out else 0)
            process = worker.process
            if not process._sentinel_exact:
                timeout = 0.1
                if process.exitcode is not None:
                    self._died(worker)
                    return
            sentinel = process._sentinel
            if sentinel is not None:
                sentinels[sentinel] = worker
                fds[sentinel] = POLLIN
        self._asleep = True
        if self._queued != seen or self._closing:
            timeout = 0.0  # queued while the dispatcher was busy: no wake-up comes
        try:
            ready = poll_fds(fds, timeout)
        finally:
            self._asleep = False
        by_fd: dict[int, Worker] = {
            w.sock.fileno(): w for w in self._workers if w.sock is not None
        }
        for fd, events in ready:
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            connected = by_fd.get(fd)
            if connected is not None:
                if events & POLLOUT:
                    self._flush(connected)
                if events & (POLLIN | POLLERR) and connected in self._flight:
                    self._receive(connected)
            elif fd in sentinels and sentinels[fd] in self._flight:
                if sentinels[fd].process.exitcode is not None:
                    self._died(sentinels[fd])

    def _receive(self, worker: Worker) -> None:
        if self._drain(worker):
            if worker.process.is_alive:
                worker.process._wait_exit(time.monotonic() + 1.0)
            self._died(worker)

    def _drain(self, worker: Worker) -> bool:
        """Complete the calls whose replies arrived; ``True`` at the end of the stream."""
        if worker.sock is None:
            return True
        messages, eof = worker.receive()
        busy = self._flight[worker]
        for message in messages:
            job_id, _index, status, body = W.parse_pool_reply(message)
            job = busy.get(job_id) if status == _PART else busy.pop(job_id, None)
            if job is None:
                continue
            if status == _PART:
                job.parts.append(read_chunk(True, body, job.start, "")[0])
                continue
            results, error = read_chunk(
                status == _OK, body, job.start, "Executor.map" if job.chunk else "Executor.submit"
            )
            if job.chunk:
                job.parts.append(results)
                job.future.set_result((list(itertools.chain.from_iterable(job.parts)), error))
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results[0])
        return eof

    def _died(self, worker: Worker) -> None:
        """A worker ended: retry or fail its calls, and start another in its place."""
        if worker not in self._flight:
            return
        self._drain(worker)  # the replies it sent before it ended
        self._workers.remove(worker)
        jobs = self._flight.pop(worker)
        worker.close()
        process = worker.process
        how = exit_text(process.exitcode)
        for job_id, job in reversed(list(jobs.items())):
            if job.tries < self.max_retries and not self._closing:
                job.tries += 1
                job.parts.clear()
                self._pending.appendleft((job_id, job))
            else:
                attempts = f" (after {job.tries + 1} attempts)" if job.tries else ""
                job.future.set_exception(ProcessError(
                    f"the zproc.Executor worker {process.pid} running this call was {how}"
                    f"{attempts}; the call probably crashed it (os._exit, a signal, out of "
                    f"memory) or the worker was stopped. Give ctx.executor(max_retries=N) to "
                    f"run it again on another worker",
                    pid=process.pid,
                    exitcode=process.exitcode,
                ))
        stop_processes([process])
        if not self._closing:
            self._replace()

    def _replace(self) -> bool:
        """Bring the workers back to ``max_workers``; ``False`` if none could start."""
        try:
            for worker in self._pool.start_workers(self.max_workers - len(self._workers)):
                self._workers.append(worker)
                self._flight[worker] = {}
        except Exception as exc:
            if not self._workers:
                self._fail_all(exc)
                return False
        return True

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            jobs = [job for _, job in self._pending]
            self._pending.clear()
        for busy in self._flight.values():
            jobs.extend(busy.values())
            busy.clear()
        for job in jobs:
            if not job.future.done():
                if job.future.running() or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(exc)

    def _close(self) -> None:
        processes = [w.process for w in self._workers]
        for worker in self._workers:
            worker.close()  # the worker sees the end of its stream and exits
        self._workers.clear()
        self._flight.clear()
        self._pool.close()
        deadline = time.monotonic() + 2.0
        for process in processes:
            process._wait_exit(deadline)
        stop_processes(processes)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _chunk_results(
    futures: list[tuple[int, concurrent.futures.Future[Any]]],
    end: float | None,
    decode: Callable[[int, Any], tuple[list[Any], BaseException | None]],
) -> Iterator[Any]:
    """The results of chunk futures, in order (``decode(start, value)``: ``(results,
    error)``); the error of a chunk is raised after its results."""
    try:
        for start, future in futures:
            results, error = decode(start, future.result(
                None if end is None else end - time.monotonic()))
            yield from results
            if error is not None:
                raise error
    finally:
        for _start, future in futures:
            future.cancel()


# -- process_map on any executor ---------------------------------------------------------


def run_items(code: bytes, spec: Any, items: Any, start: int) -> tuple[bool, bytes]:
    """Run one chunk of a ``process_map`` where an executor put it (a dask or Ray worker):
    ``(ok, results or failure record)``, as :func:`zproc._chunks.read_chunk` reads it.

    ``spec``: ``None``, or the address and settings of the State the target gets first
    (plain data: an executor may pickle and unpickle its arguments just to hash them, as
    dask does, and a State made there would be a connection nobody closes).
    """
    target, args, kwargs = S.loads(code)
    state = None if spec is None else State(spec[0], **spec[1])
    try:
        return run_chunk((target, args, kwargs), state, items, start=start)
    finally:
        flush_pending()  # the queue handles of other States the target used, too
        if state is not None:
            state.close()


def map_on(
    executor: concurrent.futures.Executor, target: Callable[..., Any], inputs: tuple[Any, Any, Any],
    fixed: tuple[tuple[Any, ...], dict[str, Any]], count: int, state: Any,
) -> Iterator[Any]:
    """``process_map``'s chunks on ``executor``; the results in order (lazy)."""
    length = map_length(*inputs)
    if length == 0:
        return iter(())
    args, kwargs = fixed
    code = dumps_code((target, args, kwargs), target, args, kwargs)
    spec = None if state is None else (tuple(state.server_address), state._settings())
    futures = [
        (start, executor.submit(run_items, code, spec, cut(inputs, start, size), start))
        for start, size in layout(length, count)
    ]
    return _chunk_results(futures, None, functools.partial(_read_reply, what="process_map"))


def _read_reply(start: int, reply: tuple[bool, bytes], what: str
                ) -> tuple[list[Any], BaseException | None]:
    return read_chunk(reply[0], reply[1], start, what)


class ContextExecutor:
    """:meth:`executor` of :class:`~zproc.Context` (mixed in)."""

    def executor(self, max_workers: int | None = None, *, max_retries: int = 0) -> PoolExecutor:
        """A :class:`zproc.Executor` on ``max_workers`` worker processes of this Context.

        Default: ``os.cpu_count()`` workers. They are ``process_map`` workers (listed in
        ``worker_list``), started for this executor and stopped by its ``shutdown`` (or
        by :meth:`close`). A call whose worker dies runs again on another worker up to
        ``max_retries`` times.

        .. versionadded:: 1.0
        """
        ctx: Any = self
        ctx._check_usable()
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        pool = Pool(ctx._spawn_worker, ctx.server_address, ctx.namespace, ctx.request_timeout,
                    ctx._secret_key)
        try:
            executor = PoolExecutor(pool, max_workers, max_retries)
        except BaseException:
            pool.close()
            raise
        ctx.__dict__.setdefault("_executors", []).append(executor)
        return executor

    def _close_executors(self) -> None:
        for executor in self.__dict__.get("_executors", ()):
            executor._abort()


# -- on a swarm ----------------------------------------------------------------------------

#: Calls a swarm executor keeps in flight at once (one thread, one connection each).
SWARM_THREADS = 32


class SwarmExecutor(Executor):
    """The :class:`Executor` of :meth:`Swarm.executor <zproc.Swarm.executor>`.

    Each call is a swarm ``run`` task, sent by one of up to :data:`SWARM_THREADS` threads
    (each with its own connection to the broker). A call whose worker dies is given to
    another worker ``max_retries`` times; after that its future fails with
    :class:`~zproc.TaskError` (the broker learns of a dead worker from its silence, not
    from an exit code).
    """

    def __init__(self, connect: Callable[..., Any], max_retries: int = 0) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self.max_retries = max_retries
        self._connect = connect  # (max_attempts=) -> a Swarm client that starts no worker
        self._local = threading.local()
        self._clients: list[Any] = []
        self._threads = concurrent.futures.ThreadPoolExecutor(
            SWARM_THREADS, thread_name_prefix="zproc-swarm-executor"
        )

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect(max_attempts=self.max_retries + 1)
            self._clients.append(client)
        return client.run(fn, args, kwargs)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` on a worker of the swarm."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r}")
        return self._threads.submit(self._run, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; with ``cancel_futures``, cancel those not sent yet."""
        self._threads.shutdown(wait, cancel_futures=cancel_futures)
        if wait:
            for client in self._clients:
                client.close()
            self._clients.clear()
