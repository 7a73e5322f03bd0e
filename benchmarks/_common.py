"""Helpers shared by the benchmark modules (not a benchmark itself).

* :func:`row` builds one result row (the shape every ``run()`` returns).
* :func:`now` is the clock used for timestamps that cross processes:
  ``clock_gettime(CLOCK_MONOTONIC)``, one system-wide clock on Linux.
* :class:`RawEcho` is the floor: a tiny pyzmq ROUTER server in its own process that does
  what any request/reply state server must do at least (``pickle.loads`` the request,
  one dict operation, ``pickle.dumps`` the reply), with the same frames as zproc's wire
  format (a 7-byte header + namespace, and a pickled body).
* :class:`WorkerGroup` runs N client processes that execute timed loops in lock-step
  (a barrier before each loop) and report their start and end times, for aggregates.

Every wait has a timeout; every process started here is stopped by its own object.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import statistics
import struct
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import zmq

#: Children are forked (as zproc's own default): fast to start, and the targets may be
#: closures.
FORK = multiprocessing.get_context("fork")
CLOCK = time.CLOCK_MONOTONIC
PROTOCOL = 5

#: Default timeout of every wait on a child process, in seconds.
WAIT = 60.0


def now() -> float:
    """A timestamp comparable between processes of this machine."""
    return time.clock_gettime(CLOCK)


# -- rows ------------------------------------------------------------------------------


def row(
    name: str,
    value: float,
    unit: str,
    baseline: str,
    baseline_value: float,
    *,
    target: str | None = None,
    note: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result: ``ratio = value / baseline_value``.

    ``target`` is ``">= X"`` (higher is better, e.g. throughput) or ``"<= X"`` (lower is
    better, e.g. latency or cost), applied to the ratio; ``met`` is computed here.
    """
    ratio = value / baseline_value if baseline_value else float("nan")
    result: dict[str, Any] = {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio,
    }
    if target is not None:
        result["target"] = target
        result["met"] = target_met(target, ratio)
    if note:
        result["note"] = note
    result.update(extra)
    return result


def target_met(target: str, ratio: float) -> bool | None:
    """Evaluate ``">= X"`` / ``"<= X"`` against ``ratio`` (None if unparsable)."""
    text = target.strip()
    for op in (">=", "<="):
        if text.startswith(op):
            try:
                bound = float(text[len(op) :].strip().rstrip("x"))
            except ValueError:
                return None
            return ratio >= bound if op == ">=" else ratio <= bound
    return None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


def time_loop(fn: Callable[[int], Any], n: int, start: int) -> float:
    """Seconds taken by ``fn(start) ... fn(start + n - 1)``."""
    t0 = time.perf_counter()
    for i in range(start, start + n):
        fn(i)
    return time.perf_counter() - t0


class Counter:
    """Fresh integers, so that every set writes a new value (an unchanged value is no write)."""

    def __init__(self) -> None:
        self.value = 1_000_000

    def take(self, n: int) -> int:
        start = self.value
        self.value += n
        return start


# -- processes -------------------------------------------------------------------------


def stop_process(process: Any, timeout: float = 5.0) -> None:
    """Stop one process we started: join briefly, then SIGTERM, then SIGKILL."""
    if process is None or process.pid is None:
        return
    process.join(0.05 if process.is_alive() else 0)
    if process.is_alive():
        process.terminate()
        process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(timeout)


def recv(conn: Any, timeout: float, what: str) -> Any:
    """Receive one message from a child within ``timeout`` seconds, re-raising its errors."""
    if not conn.poll(timeout):
        raise TimeoutError(f"benchmark child ({what}) sent nothing within {timeout} s")
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"benchmark child ({what}) exited unexpectedly") from None
    if isinstance(message, tuple) and message and message[0] == "error":
        raise RuntimeError(f"benchmark child ({what}) failed:\n{message[1]}")
    return message


def send_error(conn: Any) -> None:
    try:
        conn.send(("error", traceback.format_exc()))
    except Exception:
        pass


@contextmanager
def zproc_server(**kwargs: Any) -> Iterator[Any]:
    """A zproc state server (random private ipc address); yields its address."""
    import zproc

    process, address = zproc.start_server(timeout=30, **kwargs)
    try:
        yield address
    finally:
        stop_process(process)


@contextmanager
def manager_dict() -> Iterator[Any]:
    """A ``multiprocessing.Manager().dict()`` proxy (fork start method)."""
    manager = FORK.Manager()
    try:
        yield manager.dict()
    finally:
        manager.shutdown()


@contextmanager
def private_dir() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="zpb-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the raw pyzmq floor ---------------------------------------------------------------

_HEADER = struct.Struct("<BBBI")  # version, kind, method, request id (+ namespace)
_REPLY = struct.Struct("<BBI")  # version, status, request id
SET, GET = 2, 1
_NAMESPACE = b"default"


def _raw_echo_main(endpoint: str, conn: Any) -> None:
    """The floor server: ROUTER, ``pickle.loads``, one dict op, ``pickle.dumps``, reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    try:
        sock.bind(endpoint)
        conn.send("ok")
        conn.close()
        data: dict[Any, Any] = {}
        loads, dumps, unpack, pack = pickle.loads, pickle.dumps, _HEADER.unpack_from, _REPLY.pack
        recv_multipart, send_multipart = sock.recv_multipart, sock.send_multipart
        while True:
            identity, header, body = recv_multipart()
            _version, _kind, method, rid = unpack(header)
            args = loads(body)
            if method == SET:
                data[args[0]] = args[1]
                result = None
            else:
                result = data.get(args[0])
            send_multipart((identity, pack(1, 0, rid), dumps(result, PROTOCOL)))
    except Exception:
        send_error(conn)
    finally:
        sock.close(0)
        ctx.term()


def _raw_relay_main(endpoint: str, pub_endpoint: str, conn: Any) -> None:
    """The floor of a watched write: the echo server that also publishes each set.

    ROUTER, ``pickle.loads``, the dict operation, a pickled ``(key, value)`` published on
    a PUB socket, then the reply: the path of a zproc write seen by a watcher.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    sock.linger = pub.linger = 0
    try:
        sock.bind(endpoint)
        pub.bind(pub_endpoint)
        conn.send("ok")
        conn.close()
        data: dict[Any, Any] = {}
        loads, dumps, unpack, pack = pickle.loads, pickle.dumps, _HEADER.unpack_from, _REPLY.pack
        while True:
            identity, header, body = sock.recv_multipart()
            _version, _kind, method, rid = unpack(header)
            args = loads(body)
            if method == SET:
                data[args[0]] = args[1]
                pub.send(dumps((args[0], args[1]), PROTOCOL))
                result = None
            else:
                result = data.get(args[0])
            sock.send_multipart((identity, pack(1, 0, rid), dumps(result, PROTOCOL)))
    except Exception:
        send_error(conn)
    finally:
        sock.close(0)
        pub.close(0)
        ctx.term()


class RawClient:
    """A DEALER speaking the floor protocol; ``set``/``get`` are one round trip each."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = 10_000  # a lost reply raises zmq.Again, never hangs
        self.sock.connect(endpoint)
        self.rid = 0

    def _call(self, method: int, body: bytes) -> Any:
        self.rid = rid = self.rid + 1
        self.sock.send_multipart((_HEADER.pack(1, 5, method, rid) + _NAMESPACE, body))
        header, reply = self.sock.recv_multipart()
        if _REPLY.unpack_from(header)[2] != rid:
            raise RuntimeError("raw echo: reply out of order")
        return pickle.loads(reply)

    def set(self, key: Any, value: Any) -> None:
        self._call(SET, pickle.dumps((key, value), PROTOCOL))

    def get(self, key: Any) -> Any:
        return self._call(GET, pickle.dumps((key,), PROTOCOL))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@contextmanager
def raw_echo() -> Iterator[str]:
    """Start the floor server on a private ipc endpoint; yields the endpoint."""
    with private_dir() as folder:
        endpoint = f"ipc://{folder}/echo"
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_raw_echo_main, args=(endpoint, sender), name="raw-echo", daemon=True
        )
        process.start()
        sender.close()
        try:
            if recv(receiver, 30, "raw echo server") != "ok":
                raise RuntimeError("raw echo server did not start")
            yield endpoint
        finally:
            receiver.close()
            stop_process(process)


# -- client processes in lock-step -----------------------------------------------------

#: A client factory: ``factory(index) -> (ops, close)`` where ``ops`` maps an operation
#: name to ``fn(i)`` doing one operation with the fresh integer ``i``.
Factory = Callable[[int], "tuple[dict[str, Callable[[int], Any]], Callable[[], None]]"]


def _worker_main(factory: Factory, index: int, conn: Any, barrier: Any) -> None:
    close: Callable[[], None] | None = None
    try:
        ops, close = factory(index)
        conn.send(("ready",))
        while True:
            if not conn.poll(600):
                break  # the parent vanished or forgot us
            command = conn.recv()
            if command[0] == "stop":
                break
            _, op, n, start, synchronized = command
            fn = ops[op]
            if synchronized:
                barrier.wait(WAIT)
            t0 = now()
            for i in range(start, start + n):
                fn(i)
            t1 = now()
            conn.send(("done", t0, t1))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        send_error(conn)
    finally:
        if close is not None:
            try:
                close()
            except Exception:
                pass
        conn.close()


class WorkerGroup:
    """``count`` client processes made by ``factory``, driven in lock-step."""

    def __init__(self, factory: Factory, count: int, name: str) -> None:
        self.name = name
        self.count = count
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        barrier = FORK.Barrier(count)
        try:
            for index in range(count):
                parent, child = FORK.Pipe()
                process = FORK.Process(
                    target=_worker_main,
                    args=(factory, index, child, barrier),
                    name=f"{name}-{index}",
                    daemon=True,
                )
                process.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(process)
            for conn in self.conns:
                recv(conn, WAIT, f"{name} start")
        except BaseException:
            self.close()
            raise

    def run(self, op: str, n: int, counter: Counter, synchronized: bool = True) -> float:
        """Every client does ``n`` ``op``; return the aggregate rate (operations per second)."""
        for conn in self.conns:
            conn.send(("run", op, n, counter.take(n), synchronized))
        spans = [recv(conn, WAIT + 60, f"{self.name} {op}")[1:] for conn in self.conns]
        start = min(t0 for t0, _ in spans)
        end = max(t1 for _, t1 in spans)
        return float(self.count * n / (end - start))

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except Exception:
                pass
        for process in self.processes:
            process.join(5)
        for process in self.processes:
            stop_process(process)
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def environment() -> dict[str, Any]:
    """The machine and versions, for the JSON output."""
    import platform

    import zproc

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "zproc": getattr(zproc, "__version__", "?"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


@contextmanager
def raw_relay() -> Iterator[tuple[str, str]]:
    """Start the relay floor server; yields ``(request endpoint, pub endpoint)``."""
    with private_dir() as folder:
        endpoint, pub_endpoint = f"ipc://{folder}/relay", f"ipc://{folder}/relay-pub"
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_raw_relay_main,
            args=(endpoint, pub_endpoint, sender),
            name="raw-relay",
            daemon=True,
        )
        process.start()
        sender.close()
        try:
            if recv(receiver, 30, "raw relay server") != "ok":
                raise RuntimeError("raw relay server did not start")
            yield endpoint, pub_endpoint
        finally:
            receiver.close()
            stop_process(process)
