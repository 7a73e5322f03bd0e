"""Starting a state server: the server process's entry point and :func:`start_server`.

:mod:`zproc._server` is the server itself (its sockets and its loop); this module runs one
in a process of its own, reports its address back to the starter and stops it cleanly.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _serialization as S
from ._persist import DEFAULT_COMPACT_AFTER, check_files, check_fsync
from ._metrics import MetricsServer
from ._proctree import exit_with_owner, owner_token
from ._security import SecretKey, refuse_exposed, server_keys, warn_exposed
from ._server import (
    DEFAULT_HISTORY,
    DEFAULT_HISTORY_BYTES,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_NAMESPACES,
    DEFAULT_SLOW_LOG_MS,
    SHUTDOWN_LINGER_MS,
    Server,
)
from ._transport import ServerAddress, get_context, normalize_address, raise_open_files_limit
from .exceptions import ServerError, TimeoutError

__all__ = ["serve", "start_server"]

log = logging.getLogger("zproc.server")


def _flush(timeout: float) -> None:
    """Let ZeroMQ deliver what the closed sockets still hold (bounded: a stray open socket
    must not keep a stopping server alive)."""
    thread = threading.Thread(target=get_context().term, daemon=True)
    thread.start()
    thread.join(timeout)

# -- process entry point ---------------------------------------------------------------


def serve(
    address: ServerAddress | None,
    report: Any,
    options: dict[str, Any] | None = None,
    owner: tuple[int, bool] | None = None,
) -> None:
    """Entry point of a server process: bind, report through ``report`` (a Connection), serve.

    Exits quietly on SIGINT and SIGTERM after closing its sockets and removing the ipc
    files it created. ``owner`` (an :func:`~zproc._proctree.owner_token`): also once that
    process ends, however it ends; ``None`` (``zproc serve``): the server outlives its
    starter.
    """
    stop: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)  # the loop notices within its poll interval

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if owner is not None:
        exit_with_owner(owner, signal.SIGTERM)
        if stop:
            return  # the owner died before it could hear from us
    raise_open_files_limit()  # each connection, even an idle one, takes a descriptor
    options = dict(options or {})
    listen = options.pop("metrics", None)  # (host, port): zproc serve --metrics
    server: Server | None = None
    metrics: MetricsServer | None = None
    try:
        try:
            server = Server(address, **options)
            if listen is not None:
                metrics = MetricsServer(server.report, *listen)
        except BaseException as exc:
            log.error("zproc server %d could not start at %s: %s", os.getpid(),
                      " ".join(address) if address else "a random address", exc)
            report.send(("error", S.dumps_exception(exc)))
            report.close()
            return
        report.send(("ok", tuple(server.address)))
        report.close()
        log.info(
            "zproc server %d serving at %s %s (%s; persist %s)%s", os.getpid(),
            *server.address, "CURVE on" if options.get("keys") else "no secret key",
            options.get("persist") or "off",
            "" if metrics is None else f"; metrics at http://{metrics.url}/metrics",
        )
        server.serve(until=lambda: bool(stop))
    finally:
        if metrics is not None:
            metrics.close()
        if server is not None:
            server.close(linger=SHUTDOWN_LINGER_MS)
            _flush(SHUTDOWN_LINGER_MS / 1000 + 0.5)
            log.info("zproc server %d stopped%s", os.getpid(),
                     f" by signal {stop[0]}" if stop else "")
    if stop:
        signal.signal(stop[0], signal.SIG_DFL)
        os.kill(os.getpid(), stop[0])




# -- starting a server -------------------------------------------------------------------


def _persist_options(
    persist: str | os.PathLike[str], fsync: str, compact_after: int
) -> dict[str, Any]:
    """Check the durability options in the caller's process (before any server starts)."""
    path = os.path.abspath(os.fspath(persist))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValueError(f"persist={persist!r}: the directory {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"persist={persist!r} is a directory; give a file path")
    if compact_after < 1:
        raise ValueError(f"compact_after must be >= 1, got {compact_after!r}")
    check_files(path)
    return {"persist": path, "fsync": check_fsync(fsync), "compact_after": compact_after}


def _slow_log_ms(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"slow_log_ms must be a number of milliseconds > 0, got {value!r}")
    return float(value)


def start_server(
    server_address: Iterable[str] | None = None,
    *,
    backend: Callable[..., Any] = multiprocessing.Process,
    timeout: float | None = 10.0,
    history_size: int = DEFAULT_HISTORY,
    history_bytes: int = DEFAULT_HISTORY_BYTES,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_namespaces: int = DEFAULT_MAX_NAMESPACES,
    secret_key: SecretKey | None = None,
    persist: str | os.PathLike[str] | None = None,
    fsync: str = "always",
    compact_after: int = DEFAULT_COMPACT_AFTER,
    insecure: bool = False,
    slow_log_ms: float = DEFAULT_SLOW_LOG_MS,
) -> tuple[Any, ServerAddress]:
    """Start a state server in a new process and return ``(process, address)``.

    Returns only once the server has bound both sockets. The server ends with the process
    that started it, however that one ends (even by ``SIGKILL``), and removes its ipc
    files; a server meant to outlive its starter is what ``zproc serve`` is for (see
    :ref:`lifetimes`).

    .. versionchanged:: 1.0
       The server ends with its starter.

    Parameters
    ----------
    server_address
        ``(req_rep_endpoint, pub_sub_endpoint)``; ``None`` picks random endpoints (ipc in
        a private temporary directory on POSIX, tcp on 127.0.0.1 elsewhere).
    backend
        A :class:`multiprocessing.Process`-compatible class (e.g. from a
        ``multiprocessing.get_context("spawn")``). Threads are not supported.
    timeout
        How long to wait for the server to report that it is listening.
    history_size
        How many events per namespace the server keeps for clients to replay.
    history_bytes
        Most bytes (of encoded changes) that history holds per namespace, default 64 MiB;
        older events are dropped first, and a client that missed them gets the whole
        namespace as one change (see :doc:`security`).

        .. versionadded:: 1.0
    max_message_size
        Largest request (and swarm message) accepted, in bytes; a peer announcing a
        larger one is disconnected, also before it has authenticated.
    max_namespaces
        Most namespaces the server creates.
    secret_key
        Run CURVE on both sockets and admit only clients with the same ``secret_key``: a
        passphrase (``str``/``bytes``), a :class:`pathlib.Path` to a certificate
        directory, or a ``(server_cert, client_cert)`` pair (see :ref:`across-machines`).
        ``None``: no encryption, no authentication (fine on ipc and loopback; refused on
        any other tcp address unless ``insecure=True``).

        .. versionadded:: 1.0
    insecure
        Serve a tcp address that other hosts can reach without a ``secret_key``. Without
        it such an address is refused; with it, the server starts and
        :func:`warnings.warn` names every endpoint it exposes (the swarm broker's too,
        when a swarm starts). Only for networks where every host is trusted; see
        :doc:`security`.

        .. versionadded:: 1.0
    persist
        Keep the state in this file (an SQLite database: snapshots plus a journal of
        changes; it and its WAL get mode 0600). A server started on an existing file
        continues its state and its sequence numbers exactly, so clients and watchers
        carry on. ``None``: memory only.

        .. versionadded:: 1.0
    fsync
        With ``persist``: ``"always"`` (every acknowledged write is on disk before its
        reply is sent), ``"every second"`` (commits at most once per second: a crash loses
        about the last second) or ``"never"`` (each batch is handed to the OS unsynced: a
        crash of the server loses nothing, one of the machine may lose recent writes).

        .. versionadded:: 1.0
    compact_after
        With ``persist``: journal rows after the last snapshot (counted in the file, so
        across restarts) that trigger a new snapshot and cut the journal down to
        ``history_size`` rows per namespace. A start decodes the rows after the snapshot:
        lower it when changes are large and start time matters.

        .. versionadded:: 1.0

    slow_log_ms
        Requests that take at least this long (in milliseconds) to handle are logged as
        warnings by the ``zproc.server`` logger; see :doc:`production`.

        .. versionadded:: 1.0

    Raises
    ------
    AddressInUseError
        An endpoint is taken (a server probably runs there already).
    ValueError
        A tcp endpoint that other hosts can reach without ``secret_key`` or
        ``insecure=True``, a malformed or unsupported endpoint, certificates that cannot
        be read, a bad ``fsync`` or ``compact_after``, or a ``persist`` path whose
        directory does not exist (raised before any process starts).
    TimeoutError
        The server did not report within ``timeout``; it is terminated.
    PermissionError
        The ``persist`` file, its WAL or its directory is owned by another user or
        writable by group or others (the message says which, and the fix).
    ServerError
        The server failed to start for another reason (its traceback is the cause), e.g.
        the ``persist`` file is used by another server or is not a zproc persist file.
    """
    address = None if server_address is None else normalize_address(server_address)
    if isinstance(backend, type) and issubclass(backend, threading.Thread):
        raise TypeError("start_server needs a process backend; threads are not supported")
    if history_size < 1:
        raise ValueError(f"history_size must be >= 1, got {history_size}")
    if history_bytes < 1:
        raise ValueError(f"history_bytes must be >= 1, got {history_bytes}")
    exposed = refuse_exposed(address or (), secure=secret_key is not None, insecure=insecure)
    options = {
        "history_size": history_size,
        "history_bytes": history_bytes,
        "max_message_size": max_message_size,
        "max_namespaces": max_namespaces,
        "keys": server_keys(secret_key),
        "insecure": insecure,
        "slow_log_ms": _slow_log_ms(slow_log_ms),
    }
    if persist is not None:
        options.update(_persist_options(persist, fsync, compact_after))
    receiver, sender = multiprocessing.Pipe(duplex=False)
    factory: Callable[..., Any] = backend
    process: Any = factory(
        target=serve, args=(address, sender, options, owner_token()), name="zproc-server"
    )
    process.start()
    sender.close()
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if receiver.poll(0.05 if remaining is None else min(0.05, remaining)):
                try:
                    message = receiver.recv()
                except EOFError:
                    message = None
                break
            if not process.is_alive():
                message = None
                break
            if deadline is not None and time.monotonic() >= deadline:
                process.terminate()
                process.join(5)
                raise TimeoutError(
                    f"the server process {process.pid} did not report that it listens at "
                    f"{address or 'a random address'} within {timeout} s; it was terminated"
                )
    finally:
        receiver.close()
    if message is None:
        process.join(5)
        raise ServerError(
            f"the server process {process.pid} exited (exit code {process.exitcode}) before "
            f"it reported its address; see its output on stderr"
        )
    if message[0] == "error":
        process.join(5)
        raise S.loads_exception(message[1])
    if exposed:
        warn_exposed(
            exposed,
            f"server (pid {process.pid})",
            extra="; a swarm on it listens at two more ports of the same host (warned then)",
        )
    return process, ServerAddress(*message[1])
