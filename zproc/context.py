"""Context: starts (or attaches to) a server, owns a State, creates and cleans up processes."""

from __future__ import annotations

import atexit
import enum
import multiprocessing
import os
import signal
import threading
import warnings
from collections.abc import Iterable
from typing import Any

from ._server import start_server
from ._transport import ServerAddress, normalize_address
from .exceptions import ZProcError
from .state import State, ping

__all__ = ["Context"]


class ContextStatus(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Context:
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
    **process_kwargs
        Defaults for every :class:`~zproc.Process` this Context creates; keywords given to
        a single call override them.
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
        **process_kwargs: Any,
    ) -> None:
        address = None if server_address is None else normalize_address(server_address)
        if start_server is False and address is None:
            raise ValueError("start_server=False needs a server_address to attach to")
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._wait_at_exit = wait
        self._cleanup = cleanup
        self._process_kwargs = dict(process_kwargs)
        self._status = ContextStatus.OPEN
        self._pid = os.getpid()
        self.server_process: Any = None
        if start_server or (start_server is None and address is None):
            self.server_process, address = _start(address, server_backend)
        assert address is not None
        self.server_address: ServerAddress = address
        try:
            self.state = State(address, namespace=namespace, request_timeout=request_timeout)
        except BaseException:
            self._stop_server()
            raise
        self._previous_sigterm: Any = None
        self._install_hooks()

    # -- lifecycle -------------------------------------------------------------------

    def _install_hooks(self) -> None:
        atexit.register(self._atexit)
        if self._cleanup and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _remove_hooks(self) -> None:
        atexit.unregister(self._atexit)
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
        if self._wait_at_exit:
            self._wait_before_exit()
        if self._cleanup:
            self.close()

    def _wait_before_exit(self) -> None:
        """Hook for waiting on processes at exit (overridden once processes exist)."""

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
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        else:
            proc.join(0)

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
        """Stop the processes of this Context (overridden once processes exist)."""

    @property
    def closed(self) -> bool:
        return self._status is ContextStatus.CLOSED

    def _check_open(self) -> None:
        if self._status is ContextStatus.CLOSED:
            raise ZProcError("this Context is closed; create a new one")

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
        return f"<Context {owner} server {tuple(self.server_address)!r} {self._status.value}>"

    # -- server -----------------------------------------------------------------------

    @property
    def process_kwargs(self) -> dict[str, Any]:
        """A copy of the defaults for every Process this Context creates."""
        return dict(self._process_kwargs)

    def ping(self, **kwargs: Any) -> int | None:
        """Ping this Context's server: see :func:`zproc.ping`."""
        return ping(self.server_address, **kwargs)

    def create_state(self, value: Any = None, *, namespace: str | None = None) -> State:
        """A new State for this Context's server, optionally updated with ``value``."""
        self._check_open()
        state = State(
            self.server_address,
            namespace=self.namespace if namespace is None else namespace,
            request_timeout=self.request_timeout,
        )
        if value is not None:
            state.update(value)
        return state


def _start(address: ServerAddress | None, backend: Any) -> tuple[Any, ServerAddress]:
    return start_server(address, backend=backend)
