"""Standalone: set/get round trips of whichever ``zproc`` this interpreter imports.

Run by ``bench_upstream`` twice, with the same arguments: once with a python whose
environment has upstream ``zproc==0.9.1`` and once with this project's python, so both
go through exactly the same harness. Only API common to both versions is used:
``start_server(address)``, ``State(address)``, ``state[k] = v``, ``state[k]``, ``close()``.

Prints one JSON object on stdout and nothing else. Every process it starts is stopped,
and the ipc files it creates (and the ``~/.tmp/zproc`` folder that importing upstream
0.9.1 creates, when it did not exist before) are removed.
"""

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback

CLOCK = time.CLOCK_MONOTONIC
WAIT = 60.0


def now():
    return time.clock_gettime(CLOCK)


def _loop(state, op, key, n, start):
    if op == "set":
        for i in range(start, start + n):
            state[key] = i
    else:
        for _ in range(n):
            state[key]


def _client(zproc, address, index, n, reps, barrier, conn):
    state = None
    try:
        state = zproc.State(address)
        key = f"client{index}"
        state[key] = 0
        _loop(state, "set", key, n // 4 + 1, 1)
        spans = []
        for rep in range(reps):
            barrier.wait(WAIT)
            t0 = now()
            _loop(state, "set", key, n, 10_000_000 * (rep + 1))
            spans.append((t0, now()))
        conn.send(("ok", spans))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        if state is not None:
            try:
                state.close()
            except Exception:
                pass


def _stop(process):
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def measure(zproc, address, n, reps, warmup, clients):
    fork = multiprocessing.get_context("fork")
    state = zproc.State(address)
    try:
        key = "key"
        state[key] = 0
        _loop(state, "set", key, warmup, 1)
        _loop(state, "get", key, warmup, 0)
        result = {"set": [], "get": [], f"set_x{clients}": []}
        counter = 1_000_000
        for _ in range(reps):
            for op in ("set", "get"):
                t0 = time.perf_counter()
                _loop(state, op, key, n, counter)
                result[op].append(n / (time.perf_counter() - t0))
                counter += n
        if clients:
            barrier = fork.Barrier(clients)
            pipes, processes = [], []
            try:
                for index in range(clients):
                    receiver, sender = fork.Pipe(duplex=False)
                    process = fork.Process(
                        target=_client,
                        args=(zproc, address, index, n // 2, reps, barrier, sender),
                        daemon=True,
                    )
                    process.start()
                    sender.close()
                    pipes.append(receiver)
                    processes.append(process)
                spans = []
                for receiver in pipes:
                    if not receiver.poll(WAIT + 30 * reps):
                        raise TimeoutError("a client process sent nothing in time")
                    status, payload = receiver.recv()
                    if status != "ok":
                        raise RuntimeError("client process failed:\n" + payload)
                    spans.append(payload)
                for rep in range(reps):
                    start = min(s[rep][0] for s in spans)
                    end = max(s[rep][1] for s in spans)
                    result[f"set_x{clients}"].append(clients * (n // 2) / (end - start))
            finally:
                for process in processes:
                    process.join(5)
                    _stop(process)
                for receiver in pipes:
                    receiver.close()
        return result
    finally:
        state.close()


def main():
    n, reps, warmup, clients = (int(arg) for arg in sys.argv[1:5])
    home_tmp = os.path.join(os.path.expanduser("~"), ".tmp")
    upstream_dir = os.path.join(home_tmp, "zproc")
    existed = {path: os.path.exists(path) for path in (home_tmp, upstream_dir)}
    folder = tempfile.mkdtemp(prefix="zpb-up-")
    process = None
    try:
        import zproc  # upstream 0.9.1 creates ~/.tmp/zproc here

        try:
            from importlib.metadata import version

            dist_version = version("zproc")
        except Exception:
            dist_version = getattr(zproc, "__version__", "?")
        address = (f"ipc://{folder}/rr", f"ipc://{folder}/ps")
        process, address = zproc.start_server(address)
        result = measure(zproc, tuple(address), n, reps, warmup, clients)
        result["version"] = dist_version
        result["file"] = zproc.__file__
        result["python"] = sys.version.split()[0]
        sys.stdout.write(json.dumps(result) + "\n")
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)
        for path in (upstream_dir, home_tmp):
            if not existed[path] and os.path.isdir(path):
                try:
                    os.rmdir(path)  # only if empty: never remove anything else
                except OSError:
                    pass


if __name__ == "__main__":
    main()
