"""Context: starts (or attaches to) a server, owns a State, creates and cleans up processes.

Everything a Context creates is its own to clean up: :meth:`Context.close` (also run at
interpreter exit and on SIGTERM when ``cleanup=True``) stops its processes with their
descendants, its ``process_map`` workers and the server it started, and nothing else.
"""

from __future__ import annotations

import atexit
import enum
import functools
import inspect
import itertools
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, overload

from ._handlers import watch_loop
from ._pool import Pool
from ._security import SecretKey
from ._launch import start_server
from ._mapping import ContextMapping
from ._transport import ServerAddress, normalize_address, remove_server_files
from .coordination import ContextCoordination
from .exceptions import ZProcError
from .executor import ContextExecutor
from .process import Process, ProcessList, ProcessStatus, stop_processes, wait_processes
from .state import State, ping
from .swarm import Swarm

__all__ = ["Context"]


#: Keywords a Context accepts as defaults for its processes.
PROCESS_KEYWORDS = frozenset(inspect.signature(Process).parameters) - {
    "server_address",
    "target",
}

Target = Callable[..., Any]


class ContextStatus(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Context(ContextCoordination, ContextExecutor, ContextMapping):
    """A server (started here or attached to), a State for it, and the processes made here.

    Parameters
    ----------
    server_address
        Attach to the server at this address; ``None`` starts a new server owned by this
        Context.
    wait
        At interpreter exit, wait for this Context's processes before cleaning up.
    cleanup
        At interpreter exit (and on SIGTERM, when created in the main thread), stop the
        server this Context started and every process it created, with their children.
    server_backend
        Process class used to start the server.
    namespace, request_timeout
        Passed to ``ctx.state`` and to the State of every process.
    secret_key
        CURVE for every connection: the server this Context starts requires it, and
        ``ctx.state``, every process, ``process_map`` worker and ``call_when_*`` handler
        uses it (see :ref:`across-machines`). Read-only afterwards (``ctx.secret_key``).

        .. versionadded:: 1.0
    insecure
        For a server this Context starts: serve a tcp address that other hosts can reach
        without a ``secret_key`` (refused otherwise; see :func:`zproc.start_server`);
        ``ValueError`` when attaching to a server.

        .. versionadded:: 1.0
    start_server
        ``None``: start a server only when no ``server_address`` is given; ``False``:
        attach only; ``True``: start a server at ``server_address``.
    persist, fsync
        For a server this Context starts: keep its state on disk at ``persist`` (see
        :func:`zproc.start_server`); ``ValueError`` when attaching to a server.
    **process_kwargs
        Defaults for every :class:`~zproc.Process` this Context creates (any Process
        keyword but ``server_address`` and ``target``); keywords given to a single call
        override them. ``process_map`` workers take only ``backend`` from them.

    Attributes
    ----------
    state
        A State owned by this Context, for use in this process.
    process_list
        Every :class:`~zproc.Process` created here, in creation order, workers included.
    worker_list
        The ``process_map`` workers.
    server_process
        The server's process when this Context started it, else ``None``.

    Notes
    -----
    A Context created in the main thread stops what it created on SIGTERM, then lets the
    signal take its course. At interpreter exit (or when the child process that created
    it ends) it waits for its processes if ``wait=True``, then cleans up if
    ``cleanup=True``; the exit status is never changed. With ``cleanup=False`` nothing is
    stopped: the interpreter waits for the processes, as :mod:`multiprocessing` does.
    """

    def __init__(
        self,
        server_address: Iterable[str] | None = None,
        *,
        wait: bool = False,
        cleanup: bool = True,
        server_backend: Any = multiprocessing.Process,
        namespace: str = "default",
        request_timeout: float | None = None,
        start_server: bool | None = None,
        persist: str | os.PathLike[str] | None = None,
        fsync: str = "always",
        secret_key: SecretKey | None = None,
        insecure: bool = False,
        **process_kwargs: Any,
    ) -> None:
        unknown = sorted(set(process_kwargs) - PROCESS_KEYWORDS)
        if unknown:
            raise TypeError(
                f"Context() got unexpected keyword(s) {', '.join(unknown)}; process defaults "
                f"must be Process keywords: {', '.join(sorted(PROCESS_KEYWORDS))}"
            )
        address = None if server_address is None else normalize_address(server_address)
        if start_server is False and address is None:
            raise ValueError("start_server=False needs a server_address to attach to")
        owns_server = bool(start_server or (start_server is None and address is None))
        if persist is not None and not owns_server:
            raise ValueError(
                "persist= applies to a server this Context starts; this one attaches to "
                f"{tuple(address or ())!r}: pass persist= to whoever starts that server"
            )
        if insecure and not owns_server:
            raise ValueError(
                "insecure=True applies to a server this Context starts; this one attaches "
                f"to {tuple(address or ())!r}: pass insecure=True to whoever starts it"
            )
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._secret_key = secret_key
        self._wait_at_exit = wait
        self._cleanup = cleanup
        self._process_kwargs = dict(process_kwargs)
        self._status = ContextStatus.OPEN
        self._pid = os.getpid()
        self.process_list = ProcessList()
        self.worker_list = ProcessList()
        self._pool: Pool | None = None
        self._swarms: list[Swarm] = []
        self._tasks: dict[int, Iterator[Any]] = {}
        self._task_ids = itertools.count(1)
        self.server_process: Any = None
        self._random_address = address is None  # the server makes its own ipc directory
        if owns_server:
            options: dict[str, Any] = {"insecure": insecure}
            if persist is not None:
                options.update(persist=persist, fsync=fsync)
            try:
                self.server_process, address = _start(
                    address, server_backend, secret_key=secret_key, **options
                )
            except BaseException:
                self._status = ContextStatus.CLOSED  # nothing started, nothing to warn about
                raise
        assert address is not None
        self.server_address: ServerAddress = address
        try:
            self.state = State(
                address,
                namespace=namespace,
                request_timeout=request_timeout,
                secret_key=secret_key,
            )
        except BaseException:
            self._stop_server()
            self._status = ContextStatus.CLOSED  # nothing left open to warn about
            raise
        self._previous_sigterm: Any = None
        self._install_hooks()

    # -- lifecycle -------------------------------------------------------------------

    def _install_hooks(self) -> None:
        atexit.register(self._atexit)
        self._finalizer: Any = None
        if multiprocessing.parent_process() is not None:
            # A multiprocessing child ends without running atexit hooks, but runs these
            # finalizers (before it joins its own children).
            self._finalizer = multiprocessing.util.Finalize(self, self._atexit, exitpriority=10)
        if self._cleanup and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _remove_hooks(self) -> None:
        atexit.unregister(self._atexit)
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None
        if (
            self._previous_sigterm is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None

    def _atexit(self) -> None:
        if os.getpid() != self._pid or self._status is ContextStatus.CLOSED:
            return
        try:
            if self._wait_at_exit:
                self._wait_before_exit()
        finally:
            if self._cleanup:
                self.close()

    def _wait_before_exit(self) -> None:
        """Wait for this Context's processes (not workers); report failures on stderr."""
        workers = {id(w) for w in self.worker_list}
        for process in list(self.process_list):
            if (
                id(process) in workers
                or process._status is ProcessStatus.CREATED
                or process._stopped
                or process.closed
            ):
                continue
            try:
                process.wait()
            except Exception as exc:
                print(f"zproc: at exit, {process!r} failed:", file=sys.stderr)
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._previous_sigterm
        if os.getpid() == self._pid:
            self.close()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def _stop_server(self) -> None:
        proc = self.server_process
        if proc is None or os.getpid() != self._pid:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(0.1)
            if proc.is_alive():
                # A server blocked in a receive may not run its signal handler until a
                # message arrives: send one (the reply does not matter).
                try:
                    ping(self.server_address, timeout=0.05, secret_key=self._secret_key)
                except Exception:
                    pass
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        else:
            proc.join(0)
        if not proc.is_alive():
            # a killed server leaves its ipc files (its own directory, for a random address)
            remove_server_files(self.server_address, whole_dir=self._random_address)

    def close(self) -> None:
        """Stop this Context's processes and the server it started; close its State.

        Idempotent; the Context cannot be used afterwards.
        """
        if self._status is ContextStatus.CLOSED:
            return
        self._status = ContextStatus.CLOSED
        try:
            self._close_processes()
        finally:
            self.state.close()
            self._stop_server()
            self._remove_hooks()

    def _close_processes(self) -> None:
        """Stop the processes of this Context, with their descendants, and the pool."""
        if os.getpid() != self._pid:
            return
        try:
            for swarm in self._swarms:
                swarm.close()
            self._close_executors()
            stop_processes(self.process_list)
        finally:
            for process in self.process_list:
                process.close()
            self._tasks.clear()  # results never pulled
            if self._pool is not None:
                self._pool.close()

    @property
    def closed(self) -> bool:
        return self._status is ContextStatus.CLOSED

    def _check_open(self) -> None:
        if self._status is ContextStatus.CLOSED:
            raise ZProcError("this Context is closed; create a new one")

    def _check_usable(self) -> None:
        self._check_open()
        if os.getpid() != self._pid:
            raise ZProcError(
                f"this Context belongs to process {self._pid}; in a child, create "
                f"Context(state.server_address) (or use pass_context=True)"
            )

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_status", ContextStatus.CLOSED) is ContextStatus.OPEN and (
            self._pid == os.getpid()
        ):
            warnings.warn(
                f"unclosed Context for {self.server_address}; call close() or use "
                f"'with Context(...)'",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        owner = "owns" if self.server_process is not None else "attached to"
        return (
            f"<Context {owner} server {tuple(self.server_address)!r} "
            f"processes={len(self.process_list)} {self._status.value}>"
        )

    # -- server -----------------------------------------------------------------------

    @property
    def process_kwargs(self) -> dict[str, Any]:
        """A copy of the defaults for every Process this Context creates."""
        return dict(self._process_kwargs)

    def ping(self, **kwargs: Any) -> int | None:
        """Ping this Context's server: see :func:`zproc.ping`."""
        kwargs.setdefault("secret_key", self._secret_key)
        return ping(self.server_address, **kwargs)

    @property
    def secret_key(self) -> SecretKey | None:
        """The ``secret_key`` of this Context's server and States (read-only)."""
        return self._secret_key

    def create_state(self, value: Any = None, *, namespace: str | None = None) -> State:
        """A new State for this Context's server, optionally updated with ``value``."""
        self._check_open()
        state = State(
            self.server_address,
            namespace=self.namespace if namespace is None else namespace,
            request_timeout=self.request_timeout,
            secret_key=self._secret_key,
        )
        if value is not None:
            state.update(value)
        return state

    # -- processes ----------------------------------------------------------------------

    def _merged(self, process_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """This Context's process defaults, overridden by ``process_kwargs``."""
        merged = dict(self._process_kwargs)
        if "stateful" in process_kwargs or "pass_state" in process_kwargs:
            merged.pop("stateful", None)
            merged.pop("pass_state", None)
        merged.update(process_kwargs)
        merged.setdefault("namespace", self.namespace)
        merged.setdefault("request_timeout", self.request_timeout)
        merged.setdefault("secret_key", self._secret_key)
        return merged

    @overload
    def process(self, target: Target, **process_kwargs: Any) -> Process: ...

    @overload
    def process(
        self, target: None = None, **process_kwargs: Any
    ) -> Callable[[Target], Process]: ...

    def process(
        self, target: Target | None = None, **process_kwargs: Any
    ) -> Process | Callable[[Target], Process]:
        """Start a :class:`Process` for ``target`` on this Context's server.

        Also a decorator, plain (``@ctx.process``) or with keywords
        (``@ctx.process(args=(1,))``): the decorated name is bound to the Process.
        Keywords override the Context's process defaults.

        Raises
        ------
        TypeError
            ``target`` is neither callable nor ``None``, or a keyword is not a Process
            keyword.
        """
        self._check_usable()
        if target is None:

            def decorator(fn: Target) -> Process:
                return self.process(fn, **process_kwargs)

            return decorator
        if not callable(target):
            raise TypeError(
                f"ctx.process() needs a callable target (or none, as a decorator), got {target!r}"
            )
        merged = self._merged(process_kwargs)
        start = merged.pop("start", True)
        process = Process(self.server_address, target, start=False, **merged)
        self.process_list.append(process)
        if start:
            process.start()
        return process

    def process_factory(
        self, *targets: Target, count: int = 1, **process_kwargs: Any
    ) -> list[Process]:
        """Start ``count`` processes for each target, in order: ``[t1, t1, t2, t2]``."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        return [self.process(target, **process_kwargs) for target in targets for _ in range(count)]

    def create_swarm(self, count: int | None = None) -> Swarm:
        """A :class:`~zproc.Swarm` on this Context's server, with ``count`` workers
        started here (default: ``os.cpu_count()``; ``0``: none, e.g. to use only workers
        of other hosts).

        The swarm gets this Context's namespace, ``secret_key``, ``request_timeout`` and
        ``backend``; :meth:`close` stops its workers.

        .. versionadded:: 1.0
        """
        self._check_usable()
        swarm = Swarm(
            self.server_address,
            namespace=self.namespace,
            secret_key=self._secret_key,
            request_timeout=self.request_timeout,
            backend=self._process_kwargs.get("backend", multiprocessing.Process),
        )
        self._swarms.append(swarm)
        try:
            swarm.start(count)
        except BaseException:
            swarm.close()
            raise
        return swarm

    def wait_all(
        self, timeout: float | None = None, safe: bool = False
    ) -> list[tuple[Process, Any]]:
        """Wait for every started process except the ``process_map`` workers.

        Returns ``[(process, value), ...]`` in creation order. ``timeout`` is one deadline
        for all of them. Errors propagate (the first wins) unless ``safe=True``, which
        puts the exception in place of the value.
        """
        self._check_usable()
        workers = {id(w) for w in self.worker_list}
        return wait_processes([p for p in self.process_list if id(p) not in workers], timeout, safe)

    def start_all(self) -> None:
        """Start every process of this Context that was not started yet."""
        self._check_usable()
        for process in self.process_list:
            try:
                process.start()
            except (AssertionError, ZProcError):
                pass

    def stop_all(self) -> list[int | None]:
        """Stop every process (workers included) with its descendants; return exit codes.

        ``None`` stands for a process never started.
        """
        self._check_usable()
        return stop_processes(self.process_list)

    # -- watchers in processes ----------------------------------------------------------

    def call_when_change(
        self,
        *keys: Hashable,
        exclude: bool = False,
        live: bool = True,
        pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: start a process that calls the function after every change.

        The process waits with :meth:`State.get_when_change` (same ``keys``, ``exclude``
        and ``live``) and calls ``fn(state, *args, **kwargs)`` after each qualifying
        change made by another State; with ``pass_value=True`` the watcher's result comes
        first: ``fn(value, state, *args, **kwargs)``. ``stateful=False`` leaves ``state``
        out. The decorated name is bound to the :class:`Process`.
        """
        return self._call_when(("change", keys, exclude), live, pass_value, process_kwargs)

    def call_when(
        self,
        test_fn: Callable[[dict[Any, Any]], Any],
        *,
        live: bool = True,
        pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever ``test_fn(snapshot)`` holds after a change.

        Checks the current state once at start, then every change made by another State
        (never in a loop while the condition merely stays true). The value passed with
        ``pass_value`` is the snapshot.
        """
        return self._call_when(("when", test_fn), live, pass_value, process_kwargs)

    def call_when_equal(
        self, key: Hashable, value: Any, *, live: bool = True, pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever ``state.get(key) == value`` after a change."""
        return self._call_when(("equal", key, value), live, pass_value, process_kwargs)

    def call_when_not_equal(
        self, key: Hashable, value: Any, *, live: bool = True, pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever ``state.get(key) != value`` after a change."""
        return self._call_when(("not_equal", key, value), live, pass_value, process_kwargs)

    def call_when_none(
        self, key: Hashable, *, live: bool = True, pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever ``key`` exists and is ``None``."""
        return self._call_when(("none", key), live, pass_value, process_kwargs)

    def call_when_not_none(
        self, key: Hashable, *, live: bool = True, pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever ``key`` exists and is not ``None``."""
        return self._call_when(("not_none", key), live, pass_value, process_kwargs)

    def call_when_available(
        self, key: Hashable, *, live: bool = True, pass_value: bool = False,
        **process_kwargs: Any,
    ) -> Callable[[Target], Process]:
        """Decorator: call the function whenever a change leaves ``key`` present."""
        return self._call_when(("available", key), live, pass_value, process_kwargs)

    def _call_when(
        self,
        spec: tuple[Any, ...],
        live: bool,
        pass_value: bool,
        process_kwargs: dict[str, Any],
    ) -> Callable[[Target], Process]:
        self._check_usable()
        if "timeout" in process_kwargs:
            raise TypeError("call_when_* takes no timeout: the process watches until stopped")
        merged = self._merged(process_kwargs)
        stateful = merged.get("stateful", merged.get("pass_state", True))
        kwargs = {k: v for k, v in process_kwargs.items() if k not in ("stateful", "pass_state")}

        def decorator(fn: Target) -> Process:
            if not callable(fn):
                raise TypeError(f"call_when_* decorates a callable, got {fn!r}")
            loop = functools.partial(watch_loop, spec, live, pass_value, bool(stateful), fn)
            functools.update_wrapper(loop, fn)
            return self.process(loop, stateful=True, **kwargs)

        return decorator


def _sigterm_without_contexts() -> None:
    """In a forked child, put back the SIGTERM handler that was there before any Context.

    A Context's handler belongs to the process that created it. A child forked by anyone
    (a ``multiprocessing.Pool``, a ``ProcessPoolExecutor``...) inheriting it would handle
    SIGTERM in Python, late: a child blocked in a lock when the signal arrives may never
    run the handler, and ``terminate()`` then waits for it forever.
    """
    handler = signal.getsignal(signal.SIGTERM)
    original = handler
    while getattr(handler, "__func__", None) is Context._on_sigterm:
        previous = handler.__self__._previous_sigterm  # type: ignore[union-attr]
        handler = signal.SIG_DFL if previous is None else previous
    if handler is not original:
        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread; cannot happen right after fork
            pass


# zproc.context starts processes, so zproc.process cannot import it: a Process learns here
# which class to build in the child for pass_context=True.
Process.context_class = Context


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_sigterm_without_contexts)


def _start(
    address: ServerAddress | None, backend: Any, **options: Any
) -> tuple[Any, ServerAddress]:
    # a module-level helper: inside Context.__init__ the name start_server is a parameter
    return start_server(address, backend=backend, **options)
