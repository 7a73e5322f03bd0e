"""The maps of :class:`~zproc.Context` (mixed in): ``spawn_map``, ``process_map`` on the
worker pool (:mod:`zproc._pool`) or on an executor, and the results of a returned task."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from ._chunks import as_args, as_kwargs, map_inputs, map_length
from ._pool import Pool, worker_main
from ._security import SecretKey
from ._transport import ServerAddress
from .executor import FuturesExecutor, map_on
from .process import Process, ProcessList
from .state import State

__all__ = ["ContextMapping", "TaskDetail"]

Target = Callable[..., Any]

#: Defaults of a Context that also apply to its process_map workers.
WORKER_KEYWORDS = ("backend",)


class TaskDetail(NamedTuple):
    """A ``process_map`` started with ``return_task=True``: pass it to
    :meth:`Context.pull_results_for_task`."""

    task_id: int
    chunk_count: int


class _MapHost(Protocol):
    """What the maps use of their :class:`~zproc.Context`."""

    server_address: ServerAddress
    namespace: str
    request_timeout: float | None
    state: State
    process_list: ProcessList
    worker_list: ProcessList
    _secret_key: SecretKey | None
    _process_kwargs: dict[str, Any]
    _pool: Pool | None
    _tasks: dict[int, Iterator[Any]]
    _task_ids: itertools.count[int]

    def _check_usable(self) -> None: ...

    def _spawn_worker(self, worker_args: tuple[Any, ...]) -> Process: ...

    def process(self, target: Target, **process_kwargs: Any) -> Process: ...


class ContextMapping:
    """``spawn_map``, ``process_map`` and ``pull_results_for_task`` of
    :class:`~zproc.Context` (mixed in)."""

    _pool: Pool | None  # the process_map workers, started by the first process_map

    def spawn_map(
        self: _MapHost,
        target: Target,
        map_iter: Iterable[Any] | None = None,
        *,
        map_args: Iterable[Iterable[Any]] | None = None,
        map_kwargs: Iterable[Mapping[str, Any]] | None = None,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **process_kwargs: Any,
    ) -> list[Process]:
        """Start one :class:`Process` per item, with the argument rules of :meth:`process_map`.

        Each process gets a State first unless ``stateful=False``.

        .. versionadded:: 1.0
        """
        self._check_usable()
        if not callable(target):
            raise TypeError(f"spawn_map() needs a callable target, got {target!r}")
        items, margs, mkwargs = map_inputs(map_iter, map_args, map_kwargs)
        fixed_args, fixed_kwargs = as_args(args, "args"), as_kwargs(kwargs, "kwargs")
        length = map_length(items, margs, mkwargs)
        processes = []
        for i in range(length):
            call_args = () if items is None else (items[i],)
            if margs is not None:
                call_args += tuple(margs[i])
            call_kwargs = {} if mkwargs is None else dict(mkwargs[i])
            duplicate = call_kwargs.keys() & fixed_kwargs.keys()
            if duplicate:
                raise TypeError(
                    f"spawn_map item {i}: keyword(s) {sorted(duplicate)} given by both "
                    f"map_kwargs and kwargs"
                )
            call_kwargs.update(fixed_kwargs)
            processes.append(
                self.process(
                    target,
                    args=call_args + fixed_args,
                    kwargs=call_kwargs,
                    **process_kwargs,
                )
            )
        return processes

    def process_map(
        self: _MapHost,
        target: Target,
        map_iter: Iterable[Any] | None = None,
        *,
        map_args: Iterable[Iterable[Any]] | None = None,
        args: Iterable[Any] | None = None,
        map_kwargs: Iterable[Mapping[str, Any]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        count: int | None = None,
        stateful: bool = False,
        new: bool = False,
        return_task: bool = False,
        progress: bool = False,
        executor: FuturesExecutor | None = None,
    ) -> Any:
        """A parallel ``map`` on long-lived worker processes; results come back in order.

        For item ``i`` the call is ``target(map_iter[i], *map_args[i], *args,
        **map_kwargs[i], **kwargs)`` (a State first with ``stateful=True``); parts whose
        ``map_*`` argument is ``None`` are left out, and the length is that of the
        shortest ``map_*`` input.

        Parameters
        ----------
        count
            Number of chunks, and of workers used (default: ``os.cpu_count()``). The
            inputs are cut into ``count`` consecutive chunks, one per worker.
        new
            Start ``count`` new workers for this call instead of reusing idle ones.
        return_task
            Return a :class:`TaskDetail` instead of the iterator; fetch the results later
            with :meth:`pull_results_for_task` (they are kept until then).
        progress
            Show how many results have arrived: a progress bar when tqdm is installed
            (``pip install "zproc[progress]"``), else ``process_map: done/total`` lines on
            stderr. Results are counted as the iterator yields them.

            .. versionadded:: 1.0
        executor
            Run the chunks on this :class:`concurrent.futures.Executor` (dask, Ray; see
            :ref:`beyond-one-machine`); ``new`` and ``return_task`` do not apply.

        Returns
        -------
        Iterator
            Lazy; the work starts right away. An exception raised by ``target`` is
            raised at the failing item's position (after every earlier result), with its
            original type and the worker's traceback as ``__cause__``. Results of an
            iterator that is closed or dropped are discarded.

        Raises
        ------
        ValueError
            None of ``map_iter``, ``map_args``, ``map_kwargs`` is given, or ``count < 1``.
        """
        self._check_usable()
        if not callable(target):
            raise TypeError(f"process_map() needs a callable target, got {target!r}")
        if count is None:
            count = os.cpu_count() or 1
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        items, margs, mkwargs = map_inputs(map_iter, map_args, map_kwargs)
        fixed_args, fixed_kwargs = as_args(args, "args"), as_kwargs(kwargs, "kwargs")
        if executor is not None:
            return map_on(executor, target, (items, margs, mkwargs), (fixed_args, fixed_kwargs),
                          count, self.state if stateful else None)
        if self._pool is None:
            self._pool = Pool(self._spawn_worker, self.server_address, self.namespace,
                              self.request_timeout, self._secret_key)
        results = self._pool.map(target, items, margs, mkwargs, fixed_args, fixed_kwargs, count,
                                 stateful, new, progress)
        if not return_task:
            return results
        task = TaskDetail(next(self._task_ids), count if map_length(items, margs, mkwargs) else 0)
        self._tasks[task.task_id] = results
        return task

    def pull_results_for_task(self: _MapHost, task: TaskDetail) -> Iterator[Any]:
        """The results of a ``process_map(..., return_task=True)``, as its iterator.

        Each task's results can be pulled once, from the Context that started it.

        .. versionadded:: 1.0
        """
        self._check_usable()
        try:
            return self._tasks.pop(task.task_id)
        except KeyError:
            raise ValueError(
                f"no results for task {task.task_id} here: it was already pulled, or it "
                f"was started by another Context"
            ) from None

    def _spawn_worker(self: _MapHost, worker_args: tuple[Any, ...]) -> Process:
        defaults = {
            key: self._process_kwargs[key] for key in WORKER_KEYWORDS if key in self._process_kwargs
        }
        process = Process(
            self.server_address,
            worker_main,
            args=worker_args,
            stateful=False,
            start=False,
            **defaults,
        )
        self.process_list.append(process)
        self.worker_list.append(process)
        process.start()
        return process
