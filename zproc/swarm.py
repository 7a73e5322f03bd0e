"""Worker swarms: ``map`` and ``run`` on worker processes of any number of machines.

A :class:`Swarm` sends tasks to a broker that runs inside the state server (started on
first use); workers (:mod:`zproc._worker`) on any host that can reach the server take the
tasks' chunks from it; chunks are cut, run and failed by :mod:`zproc._chunks`. Results stay
in the broker, so any process can fetch them by task id (:class:`SequenceTaskResult`,
:class:`SimpleTaskResult`). Everything is found from the server's 2-tuple address.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import multiprocessing.util
import os
import socket as _socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import _protocol as P
from . import _serialization as S
from ._chunks import as_args, as_kwargs, cut, dumps_code, layout, map_inputs, map_length
from ._chunks import read_chunk
from ._client import Connection
from ._security import SecretKey, client_keys
from ._swarm import DEFAULT_MAX_ATTEMPTS
from ._transport import ServerAddress, normalize_address
from ._worker import discover, worker_main
from .executor import SwarmExecutor
from .exceptions import (
    ProcessError,
    ServerUnavailableError,
    TaskError,
    TimeoutError,
    ZProcError,
)
from .process import Process, stop_processes

__all__ = ["SequenceTaskResult", "SimpleTaskResult", "Swarm"]

#: Request timeout when none is given (seconds).
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Chunks per worker when ``num_chunks`` is not given: enough for fast workers to take
#: more chunks than slow ones, few enough to keep the cost per chunk small.
CHUNKS_PER_WORKER = 4
#: Longest time one request for results waits in the broker (seconds).
POLL_WAIT = 1.0
#: How long a known number of workers is trusted for chunking (seconds).
WORKERS_FRESH = 1.0
#: Least work (seconds of one worker) worth a chunk of its own when ``map`` chooses the
#: number of chunks: each chunk costs a few hundred microseconds of messages, so a map whose
#: previous run of the same target and arguments showed less work gets fewer, larger
#: chunks (never fewer than one per worker).
MIN_CHUNK_WORK = 0.005
#: Targets (with their fixed arguments) whose pace a Swarm remembers for chunking.
PACE_MEMORY = 64

_NO_CHUNK = 1 << 31  # a chunk index past every task: asks for the task's size only


def _new_task_id() -> int:
    return int.from_bytes(os.urandom(8), "big") or 1


class _Link:
    """This process's connection to the swarm broker of one server."""

    def __init__(
        self,
        server_address: ServerAddress,
        secret_key: SecretKey | None,
        request_timeout: float | None,
        namespace: str = "default",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.server_address = server_address
        self.secret_key = secret_key
        self.keys = client_keys(secret_key)
        self.request_timeout = (
            DEFAULT_REQUEST_TIMEOUT if request_timeout is None else request_timeout
        )
        self.namespace = namespace.encode()
        self.settings = settings or {}
        self._connection: Connection | None = None
        self._pid = os.getpid()
        self.closed = False

    def connection(self) -> Connection:
        if self.closed:
            raise ZProcError("this swarm connection is closed")
        if self._connection is None or self._pid != os.getpid():
            tasks, _workers = discover(
                self.server_address, self.keys, self.settings, timeout=self.request_timeout
            )
            self._connection = Connection(
                ServerAddress(tasks, self.server_address.pub_sub), keys=self.keys
            )
            self._pid = os.getpid()
        return self._connection

    def request(self, kind: int, body: Any, timeout: float | None = None) -> Any:
        try:
            return self._request(kind, body, timeout)
        except ServerUnavailableError:
            if not P.is_read_only(kind, 0):
                raise
        return self._request(kind, body, timeout)  # a read: again, at the broker found anew

    def _request(self, kind: int, body: Any, timeout: float | None) -> Any:
        conn = self.connection()
        try:
            return conn.request(
                kind, 0, S.dumps(body), self.namespace,
                timeout=self.request_timeout if timeout is None else timeout,
            )
        except ServerUnavailableError as exc:
            # the broker is gone (its server died or restarted): look for it again next time
            if self._connection is conn:
                self._connection = None
                conn.close()
            raise ServerUnavailableError(
                f"lost the swarm broker of the zproc server at {self.server_address.req_rep} "
                f"({exc}); the next request asks the server for its broker again (a "
                f"restarted server has a new one, without the old tasks)"
            ) from exc

    def close(self) -> None:
        self.closed = True
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None


# -- results ---------------------------------------------------------------------------


class _TaskResult:
    """What both kinds of task results share: the link, the id, fetching and forgetting."""

    def __init__(
        self,
        server_address: Iterable[str],
        task_id: str,
        *,
        secret_key: SecretKey | None = None,
        timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> None:
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be a str (a task's .task_id), got {task_id!r}")
        try:
            self._id = int(task_id, 16)
        except ValueError:
            raise ValueError(f"{task_id!r} is not a swarm task id") from None
        self.server_address = normalize_address(server_address)
        self.task_id = task_id
        self.timeout = timeout
        self._link = _Link(self.server_address, secret_key, request_timeout)
        self._own_link = True
        self._length: int | None = None
        self._chunk_count: int | None = None
        self._early: list[tuple[Any, ...]] = []  # chunks that came with the SUBMIT reply
        self._pace_key = 0  # hash of the encoded target and fixed arguments (see Swarm)

    def _share(self, link: _Link, length: int, chunk_count: int) -> None:
        self._link.close()
        self._link = link
        self._own_link = False
        self._length = length
        self._chunk_count = chunk_count

    def _request(self, kind: int, body: Any, timeout: float | None = None) -> Any:
        if self._link.closed and not self._own_link:  # the Swarm was closed: go alone
            link = self._link
            self._link = _Link(self.server_address, link.secret_key, link.request_timeout)
            self._own_link = True
        return self._link.request(kind, body, timeout)

    def _fetch(self, first: int, deadline: float | None) -> list[tuple[Any, ...]]:
        """The finished chunks from ``first`` on, waiting until ``deadline`` for one."""
        while True:
            wait = POLL_WAIT
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            count, length, chunks = self._request(
                P.SwarmKind.RESULTS, (self._id, first, wait),
                self._link.request_timeout + wait,
            )
            self._chunk_count, self._length = count, length
            if chunks or first >= count:
                return list(chunks)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"swarm task {self.task_id}: chunk {first} of {count} was not finished "
                    f"within the timeout; the task goes on (fetch its results later, or "
                    f"forget() it)"
                )

    def _chunks(self, timeout: float | None) -> Iterator[tuple[list[Any], BaseException | None]]:
        """``(results, error)`` per finished chunk, in order; ``error`` ends the task."""
        deadline = None if timeout is None else time.monotonic() + timeout
        index = 0
        while self._chunk_count is None or index < self._chunk_count:
            if self._early:
                chunks, self._early = self._early, []
            else:
                chunks = self._fetch(index, deadline)
            if not chunks:
                return
            for i, start, count, status, body in chunks:
                index = i + 1
                if status == P.ChunkStatus.OK or status == P.ChunkStatus.FAILED:
                    results, error = read_chunk(
                        status == P.ChunkStatus.OK, body, start, f"swarm task {self.task_id}"
                    )
                    yield results, error
                    if error is not None:
                        return
                else:
                    yield [], TaskError(
                        str(S.loads(body)), task_id=self.task_id, chunk=i,
                        items=range(start, start + count),
                    )
                    return

    def forget(self) -> bool:
        """Drop the results from the broker (and stop the task's chunks still queued).

        Returns whether the broker still had the task. Any process may call it.
        """
        return bool(self._request(P.SwarmKind.FORGET, self._id))

    def close(self) -> None:
        """Close this object's connection (the results stay in the broker). Idempotent."""
        if self._own_link:
            self._link.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class SequenceTaskResult(_TaskResult):
    """The results of a swarm ``map``, fetched from the broker by task id.

    Iterating yields the results in input order, chunk by chunk as they finish (each
    iteration fetches them again; the broker keeps them until :meth:`forget` or until
    they expire). An exception raised by the function is raised at its item's position,
    after every earlier result, with its original type and the worker's traceback as
    ``__cause__``.

    Parameters
    ----------
    server_address
        The server of the swarm that ran the task.
    task_id
        The task's id (``result.task_id`` of the process that started it).
    secret_key
        As for the server.
    timeout
        Longest wait, in seconds, for all the results of one iteration (or of
        :attr:`as_list`); ``None``: no limit.
    request_timeout
        Timeout of each request to the broker.

    .. versionadded:: 1.0
    """

    def __iter__(self) -> Iterator[Any]:
        for values, error in self._chunks(self.timeout):
            yield from values
            if error is not None:
                raise error

    def get(self, timeout: float | None = None) -> list[Any]:
        """All the results as a list, waiting at most ``timeout`` seconds.

        Raises
        ------
        TimeoutError
            Not all chunks finished in time (the task goes on).
        TaskError
            A chunk was lost on every attempt, or the task is not known (forgotten,
            expired, or the server restarted).
        """
        out: list[Any] = []
        for values, error in self._chunks(timeout):
            out += values
            if error is not None:
                raise error
        return out

    @property
    def as_list(self) -> list[Any]:
        """All the results as a list (waits at most :attr:`timeout`)."""
        return self.get(self.timeout)

    def __len__(self) -> int:
        if self._length is None:
            self._fetch(_NO_CHUNK, None)
        assert self._length is not None
        return self._length

    def __repr__(self) -> str:
        return f"<SequenceTaskResult task_id={self.task_id!r} length={self._length}>"


class SimpleTaskResult(_TaskResult):
    """The value of a swarm ``run``, fetched from the broker by task id.

    Parameters as for :class:`SequenceTaskResult`.

    .. versionadded:: 1.0
    """

    def get(self, timeout: float | None = None) -> Any:
        """The function's return value, waiting at most ``timeout`` seconds.

        Raises the function's exception (with the worker's traceback as ``__cause__``),
        :class:`~zproc.TimeoutError` or :class:`~zproc.TaskError`.
        """
        for values, error in self._chunks(timeout):
            if error is not None:
                raise error
            if values:
                return values[0]
        raise TaskError(f"swarm task {self.task_id} has no value", task_id=self.task_id)

    @property
    def value(self) -> Any:
        """The function's return value (waits at most :attr:`timeout`)."""
        return self.get(self.timeout)

    def __repr__(self) -> str:
        return f"<SimpleTaskResult task_id={self.task_id!r}>"


# -- the swarm -------------------------------------------------------------------------


class Swarm:
    """Worker processes, here and on other machines, that share ``map`` and ``run`` tasks.

    Tasks go through a broker inside the state server (started on first use, bound next
    to the server's endpoints); workers started here (:meth:`start`) and by ``zproc
    worker`` on any host take their chunks. A chunk whose worker dies is given to another
    worker (at-least-once execution, each result kept once); the caller gets a
    :class:`~zproc.TaskError` only when a chunk was lost on all ``max_attempts``.

    Parameters
    ----------
    server_address
        The state server's ``(req_rep, pub_sub)`` address.
    namespace
        Namespace of the State passed with ``pass_state=True``.
    secret_key
        As for the server; the broker and every worker use it too (CURVE).
    request_timeout
        Timeout of each request to the broker (default 10 s).
    backend
        Process class for the workers started here.
    max_attempts
        Attempts per chunk before its task fails with :class:`~zproc.TaskError`.
    max_tasks, max_age
        Retention of finished tasks' results in the broker: the most finished tasks
        kept, and seconds a finished task is kept (``None``: leave the broker's setting,
        by default 1000 tasks and 3600 s). They apply to the whole server: the latest
        given wins.

    .. versionadded:: 1.0
    """

    def __init__(
        self,
        server_address: Iterable[str],
        *,
        namespace: str = "default",
        secret_key: SecretKey | None = None,
        request_timeout: float | None = None,
        backend: Any = multiprocessing.Process,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_tasks: int | None = None,
        max_age: float | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        if max_tasks is not None and max_tasks < 0:
            raise ValueError(f"max_tasks must be >= 0, got {max_tasks!r}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age!r}")
        self.server_address = normalize_address(server_address)
        self.namespace = namespace
        self.secret_key = secret_key
        self.backend = backend
        self.max_attempts = max_attempts
        self.worker_list: list[Process] = []
        self._owner = os.getpid()
        self._exit_hook: Any = None  # stops the workers started here if close() is not called
        self._known_workers = (0, 0.0)  # (count, when)
        #: hash of the encoded target and fixed arguments -> seconds of one worker per
        #: item, measured by the last ``map`` of them (see MIN_CHUNK_WORK)
        self._pace: OrderedDict[int, float] = OrderedDict()
        settings = {"max_tasks": max_tasks, "max_age": max_age}
        self._link = _Link(
            self.server_address, secret_key, request_timeout, namespace,
            {k: v for k, v in settings.items() if v is not None},
        )
        if max_tasks is not None or max_age is not None:
            self._link.connection()  # apply the settings now

    # -- workers ----------------------------------------------------------------------

    def start(self, count: int | None = None, *, timeout: float | None = 30.0) -> None:
        """Start ``count`` worker processes here (default: ``os.cpu_count()``).

        Returns once the broker knows them all.

        Raises
        ------
        TimeoutError
            The workers did not all join within ``timeout`` seconds.
        ProcessError
            A worker exited while starting.
        """
        self._check_owner()
        if count is None:
            count = os.cpu_count() or 1
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        new = []
        for _ in range(count):
            process = Process(
                self.server_address,
                worker_main,
                args=(tuple(self.server_address), self.secret_key, os.getpid()),
                stateful=False,
                backend=self.backend,
                namespace=self.namespace,
            )
            self.worker_list.append(process)
            new.append(process)
            self._hook_exit()
        if new:
            self._await_joined(new, timeout)

    def _hook_exit(self) -> None:
        """Close at interpreter exit (else exit would wait for the workers forever)."""
        if self._exit_hook is None:
            self._exit_hook = multiprocessing.util.Finalize(self, self.close, exitpriority=10)

    def _await_joined(self, processes: list[Process], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        host = _socket.gethostname()
        pids = {p.pid for p in processes}
        while True:
            for process in processes:
                if not process.is_alive:
                    raise ProcessError(
                        f"swarm worker {process.pid} exited with code {process.exitcode} "
                        f"while joining the swarm of {self.server_address.req_rep}; see its "
                        f"output on stderr",
                        pid=process.pid, exitcode=process.exitcode,
                    )
            joined = {w["pid"] for w in self.info()["workers"] if w["host"] == host}
            if pids <= joined:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(pids - joined)} of {len(pids)} swarm workers did not join the "
                    f"broker of {self.server_address.req_rep} within {timeout} s"
                )
            time.sleep(0.01)

    @property
    def count(self) -> int:
        """Worker processes started here and still running; setting it starts or stops
        workers to reach the new number."""
        self.worker_list = [p for p in self.worker_list if p.is_alive]
        return len(self.worker_list)

    @count.setter
    def count(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"count must be >= 0, got {value!r}")
        current = self.count
        if value > current:
            self.start(value - current)
        elif value < current:
            surplus = self.worker_list[value:]
            del self.worker_list[value:]
            stop_processes(surplus)
            for process in surplus:
                process.close()

    def stop(self, force: bool = False) -> None:
        """Stop the workers started here.

        ``force=False``: SIGTERM; each worker hands back the chunk it runs and leaves.
        ``force=True``: SIGKILL; the broker gives their chunks to other workers once
        their heartbeats stop.
        """
        self._check_owner()
        processes, self.worker_list = self.worker_list, []
        if force:
            for process in processes:
                if process.is_alive:
                    process.child.kill()
        stop_processes(processes)
        for process in processes:
            process.close()

    def info(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's view: ``workers`` (a list of ``{"pid", "host", "busy"}``, every
        host), ``idle``, ``queued`` (chunks), ``tasks`` and the retention settings."""
        info: dict[str, Any] = self._link.request(P.SwarmKind.INFO, None, timeout)
        self._known_workers = (len(info["workers"]), time.monotonic())
        return info

    def _workers(self) -> int:
        count, when = self._known_workers
        if time.monotonic() - when > WORKERS_FRESH:
            count = len(self.info()["workers"])
        return max(count, 1)

    # -- tasks ------------------------------------------------------------------------

    def map_lazy(
        self,
        target: Callable[..., Any],
        map_iter: Iterable[Any] | None = None,
        *,
        map_args: Iterable[Iterable[Any]] | None = None,
        args: Iterable[Any] | None = None,
        map_kwargs: Iterable[Mapping[str, Any]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        pass_state: bool = False,
        num_chunks: int | None = None,
        timeout: float | None = None,
    ) -> SequenceTaskResult:
        """Start a parallel ``map`` on the swarm and return its :class:`SequenceTaskResult`.

        For item ``i`` the call is ``target(map_iter[i], *map_args[i], *args,
        **map_kwargs[i], **kwargs)``, with a State first when ``pass_state=True``; parts
        whose ``map_*`` argument is ``None`` are left out, and the length is that of the
        shortest ``map_*`` input.

        Parameters
        ----------
        num_chunks
            Number of chunks (at most one per item). Default: 4 per worker known to the
            broker, so that fast workers take more of them than slow ones; fewer (down to
            one per worker) when the last :meth:`map` of the same target and arguments on
            this Swarm showed less than ``MIN_CHUNK_WORK`` (5 ms) of work per chunk.
        timeout
            Default timeout of the result (see :class:`SequenceTaskResult`).

        Raises
        ------
        ValueError
            None of ``map_iter``, ``map_args``, ``map_kwargs`` is given, or
            ``num_chunks < 1``.
        """
        return self._submit(
            target, map_iter, map_args, args, map_kwargs, kwargs, pass_state, num_chunks,
            timeout, keep=True,
        )

    def _submit(
        self,
        target: Callable[..., Any],
        map_iter: Iterable[Any] | None,
        map_args: Iterable[Iterable[Any]] | None,
        args: Iterable[Any] | None,
        map_kwargs: Iterable[Mapping[str, Any]] | None,
        kwargs: Mapping[str, Any] | None,
        pass_state: bool,
        num_chunks: int | None,
        timeout: float | None,
        keep: bool,
    ) -> SequenceTaskResult:
        self._check_open()
        if not callable(target):
            raise TypeError(f"map needs a callable target, got {target!r}")
        items, margs, mkwargs = map_inputs(map_iter, map_args, map_kwargs)
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks!r}")
        fixed_args, fixed_kwargs = as_args(args, "args"), as_kwargs(kwargs, "kwargs")
        length = map_length(items, margs, mkwargs)
        code = dumps_code(
            (pass_state, self.namespace, target, fixed_args, fixed_kwargs),
            target, fixed_args, fixed_kwargs,
        )
        if num_chunks is None:
            workers = self._workers()
            num_chunks = workers * CHUNKS_PER_WORKER
            pace = self._pace.get(hash(code))
            if pace is not None:
                worth = math.ceil(pace * length / MIN_CHUNK_WORK)
                num_chunks = max(workers, min(num_chunks, worth))
        chunks = [
            (start, count, S.dumps_any(cut((items, margs, mkwargs), start, count)))
            for start, count in layout(length, num_chunks)
        ]
        task_id = _new_task_id()
        wait = 0.0  # map and run wait for the first results in the same request
        if not keep:
            wait = POLL_WAIT if timeout is None else max(0.0, min(POLL_WAIT, timeout))
        workers, first = self._link.request(
            P.SwarmKind.SUBMIT, (task_id, length, code, self.max_attempts, keep, wait, chunks),
            self._link.request_timeout + wait,
        )
        self._known_workers = (int(workers), time.monotonic())
        result = SequenceTaskResult(
            self.server_address, f"{task_id:016x}", secret_key=self.secret_key, timeout=timeout
        )
        result._share(self._link, length, len(chunks))
        if first is not None:
            result._early = list(first[2])
        result._pace_key = hash(code)
        return result

    def _learn(self, key: int, length: int, seconds: float) -> None:
        """Remember the pace of a finished ``map`` (for the chunk count of the next one)."""
        if length > 0:
            pace = self._pace
            pace[key] = seconds * max(self._known_workers[0], 1) / length
            pace.move_to_end(key)
            if len(pace) > PACE_MEMORY:
                pace.popitem(last=False)

    def map(
        self,
        target: Callable[..., Any],
        map_iter: Iterable[Any] | None = None,
        *,
        timeout: float | None = None,
        map_args: Iterable[Iterable[Any]] | None = None,
        map_kwargs: Iterable[Mapping[str, Any]] | None = None,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        pass_state: bool = False,
        num_chunks: int | None = None,
    ) -> list[Any]:
        """:meth:`map_lazy`, then wait for every result (at most ``timeout`` seconds).

        The broker drops the results once they are sent (or once the call fails).
        Raises the function's first exception at its position, with the worker's
        traceback as ``__cause__``; :class:`~zproc.TaskError` when a chunk was lost on
        every attempt; :class:`~zproc.TimeoutError`.
        """
        start = time.monotonic()
        result = self._submit(
            target, map_iter, map_args, args, map_kwargs, kwargs, pass_state, num_chunks,
            timeout, keep=False,
        )
        try:
            values = result.get(_remaining(start, timeout))
        except BaseException:
            _forget_quietly(result)
            raise
        self._learn(result._pace_key, len(values), time.monotonic() - start)
        return values

    def run(
        self,
        target: Callable[..., Any],
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        pass_state: bool = False,
        lazy: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run ``target(*args, **kwargs)`` on one worker of the swarm.

        Returns its value, or with ``lazy=True`` a :class:`SimpleTaskResult` at once.
        """
        start = time.monotonic()
        sequence = self._submit(
            target, None, [as_args(args, "args")], None, [as_kwargs(kwargs, "kwargs")], None,
            pass_state, 1, timeout, keep=lazy,
        )
        result = SimpleTaskResult(
            self.server_address, sequence.task_id, secret_key=self.secret_key, timeout=timeout
        )
        result._share(self._link, 1, 1)
        result._early, sequence._early = sequence._early, []
        if lazy:
            return result
        try:
            return result.get(_remaining(start, timeout))
        except BaseException:
            _forget_quietly(result)
            raise

    def executor(self, max_retries: int = 0) -> SwarmExecutor:
        """A :class:`zproc.Executor` whose calls run on the swarm's workers, on any host.

        A call whose worker dies runs again on another worker up to ``max_retries``
        times, then fails with :class:`~zproc.TaskError`.

        .. versionadded:: 1.0
        """
        self._check_open()
        return SwarmExecutor(
            functools.partial(
                Swarm, self.server_address, namespace=self.namespace,
                secret_key=self.secret_key, request_timeout=self._link.request_timeout,
            ),
            max_retries,
        )

    # -- lifecycle ----------------------------------------------------------------------

    def _check_owner(self) -> None:
        self._check_open()
        if os.getpid() != self._owner:
            raise ZProcError(
                f"this Swarm's workers belong to process {self._owner}; create a new Swarm "
                f"in this process"
            )

    def _check_open(self) -> None:
        if self._link.closed:
            raise ZProcError("this Swarm is closed; create a new one")

    def close(self) -> None:
        """Stop the workers started here and close the connection. Idempotent.

        Results of lazy tasks stay in the broker until forgotten or expired.
        """
        if self._link.closed:
            return
        try:
            if os.getpid() == self._owner:
                self.stop()
        finally:
            self._link.close()
            hook, self._exit_hook = self._exit_hook, None
            if hook is not None and os.getpid() == self._owner:
                hook.cancel()

    @property
    def closed(self) -> bool:
        return self._link.closed

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"workers here={len(self.worker_list)}"
        return f"<Swarm {tuple(self.server_address)!r} {state}>"


def _remaining(start: float, timeout: float | None) -> float | None:
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))


def _forget_quietly(result: _TaskResult) -> None:
    try:
        result.forget()
    except ZProcError:
        pass

