"""The worker swarm: map/run/map_lazy, results by task id, the ``zproc worker`` command,
workers dying in the middle of a chunk, retention, load balancing, CURVE, and two hosts."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _netns import Output, TestBed, created_bed

import zproc
from zproc import _swarm, _worker
from zproc._cli import main
from zproc._security import client_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "swarm secret 0c7e51"


def square(x: int) -> int:
    return x * x


def add(a: int, b: int, c: int = 0, *, d: int = 0) -> int:
    return a + b + c + d


def fail_at_7(x: int) -> float:
    return 1 / (x - 7)


def slow_pid(x: int) -> tuple[int, int]:
    time.sleep(0.002)
    return x, os.getpid()


def stateful(state: zproc.State, key: str) -> Any:
    return state.get(key)


@pytest.fixture
def swarm(ctx: zproc.Context) -> Iterator[zproc.Swarm]:
    yield ctx.create_swarm(2)


def workers_pids(swarm: zproc.Swarm) -> list[int]:
    return [p.pid for p in swarm.worker_list if p.pid is not None]


# -- map, run, map_lazy ----------------------------------------------------------------


def test_map_run_and_lazy(swarm: zproc.Swarm) -> None:
    assert swarm.count == 2
    assert {w["pid"] for w in swarm.info()["workers"]} == set(workers_pids(swarm))
    assert swarm.map(square, range(1000)) == [x * x for x in range(1000)]
    assert swarm.map(lambda x: -x, [3, 1, 2]) == [-3, -1, -2]
    assert swarm.map(square, []) == []
    assert swarm.run(add, (1, 2), {"d": 4}) == 7
    assert swarm.run(lambda: "no arguments") == "no arguments"
    lazy_run = swarm.run(add, (5, 6), lazy=True)
    assert isinstance(lazy_run, zproc.SimpleTaskResult)
    assert lazy_run.value == 11 and lazy_run.value == 11
    assert lazy_run.forget() is True
    lazy = swarm.map_lazy(square, range(4), num_chunks=4)  # upstream refused this one
    assert isinstance(lazy, zproc.SequenceTaskResult)
    assert len(lazy) == 4
    assert list(lazy) == [0, 1, 4, 9]
    assert lazy.as_list == [0, 1, 4, 9]  # fetched again: still there
    assert swarm.map(square, range(3), num_chunks=10) == [0, 1, 4]  # more chunks than items
    # the map and run results were dropped once returned; the lazy one stays
    assert swarm.info()["tasks"] == 1
    assert lazy.forget() is True and lazy.forget() is False
    assert swarm.info()["tasks"] == 0


def test_arguments_and_state(ctx: zproc.Context, swarm: zproc.Swarm) -> None:
    got = swarm.map(
        add, [1, 2, 3, 4], map_args=[(10,), (20,), (30,)], args=(100,),
        map_kwargs=[{"d": 1000}, {"d": 2000}, {"d": 3000}, {"d": 4000}],
    )
    assert got == [1111, 2122, 3133]  # the shortest input sets the length
    assert swarm.map(add, map_args=[(1, 2), (3, 4)], kwargs={"d": 1}) == [4, 8]
    assert swarm.map(add, map_kwargs=({"a": i, "b": i} for i in range(3))) == [0, 2, 4]
    ctx.state["answer"] = 42
    assert swarm.map(stateful, ["answer", "none"], pass_state=True) == [42, None]
    assert swarm.run(stateful, ("answer",), pass_state=True) == 42
    with pytest.raises(ValueError, match="at least one of"):
        swarm.map(square)
    with pytest.raises(ValueError, match="num_chunks"):
        swarm.map(square, range(3), num_chunks=0)
    with pytest.raises(TypeError, match="callable"):
        swarm.map(42, range(3))  # type: ignore[arg-type]


def test_results_from_another_process(ctx: zproc.Context, swarm: zproc.Swarm) -> None:
    lazy = swarm.map_lazy(square, range(50), num_chunks=7)
    single = swarm.run(add, (2, 3), lazy=True)

    def fetch(sequence_id: str, simple_id: str, address: tuple[str, str]) -> Any:
        with zproc.SequenceTaskResult(address, sequence_id, timeout=20) as seq, \
                zproc.SimpleTaskResult(address, simple_id, timeout=20) as simple:
            return len(seq), seq.as_list, simple.value

    child = ctx.process(fetch, args=(lazy.task_id, single.task_id, ctx.server_address),
                        stateful=False)
    assert child.wait(30) == (50, [x * x for x in range(50)], 5)
    zproc.consume(lazy)
    assert lazy.forget() and single.forget()
    with zproc.SequenceTaskResult(ctx.server_address, lazy.task_id) as gone:
        with pytest.raises(zproc.TaskError, match="forgotten") as info:
            gone.get(timeout=10)
        assert info.value.task_id == lazy.task_id
    with pytest.raises(ValueError, match="not a swarm task id"):
        zproc.SimpleTaskResult(ctx.server_address, "not hex")


def test_function_error_keeps_type_index_and_earlier_results(swarm: zproc.Swarm) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        swarm.map(fail_at_7, range(20), num_chunks=3)
    cause = info.value.__cause__
    assert isinstance(cause, zproc.RemoteTraceback)
    assert "item 7" in cause.tb and "fail_at_7" in cause.tb
    lazy = swarm.map_lazy(fail_at_7, range(20), num_chunks=3)
    seen = []
    with pytest.raises(ZeroDivisionError):
        for value in lazy:
            seen.append(value)
    assert seen == [1 / (x - 7) for x in range(7)]
    lazy.forget()
    with pytest.raises(ZeroDivisionError):
        swarm.run(fail_at_7, (7,))
    assert swarm.map(square, range(5)) == [0, 1, 4, 9, 16]  # the workers survived


def test_timeout_and_unpicklable_result(swarm: zproc.Swarm) -> None:
    start = time.monotonic()
    with pytest.raises(zproc.TimeoutError, match="not finished"):
        swarm.map(time.sleep, [0.5, 0.5], timeout=0.2)
    assert time.monotonic() - start < 0.45
    with pytest.raises(TypeError, match="cannot be pickled"):
        swarm.map(lambda x: (i for i in ()) if x == 2 else x, range(4), num_chunks=1)
    time.sleep(0.5)  # the timed-out chunks end; then the swarm is free again
    assert swarm.map(square, range(3)) == [0, 1, 4]


def test_count_stop_and_close(ctx: zproc.Context) -> None:
    swarm = ctx.create_swarm(1)
    swarm.count = 3
    assert swarm.count == 3 and len(swarm.info()["workers"]) == 3
    swarm.count = 1
    assert swarm.count == 1
    assert swarm.map(square, range(10)) == [x * x for x in range(10)]
    swarm.stop(force=True)
    assert swarm.count == 0
    other = zproc.Swarm(ctx.server_address)
    other.start(2)
    assert other.map(square, range(10)) == [x * x for x in range(10)]
    other.close()
    other.close()
    assert other.closed
    with pytest.raises(zproc.ZProcError, match="closed"):
        other.map(square, range(3))
    with pytest.raises(ValueError, match="max_attempts"):
        zproc.Swarm(ctx.server_address, max_attempts=0)


# -- load balancing and fault tolerance ------------------------------------------------


def test_a_slow_worker_does_not_hold_back_the_map(swarm: zproc.Swarm) -> None:
    slow = workers_pids(swarm)[0]

    def work(x: int) -> int:
        time.sleep(0.02 if os.getpid() == slow else 0.001)
        return os.getpid()

    start = time.monotonic()
    pids = swarm.map(work, range(200))  # 8 chunks of 25: 0.5 s each on the slow worker
    elapsed = time.monotonic() - start
    counts = Counter(pids)
    assert counts[slow] <= 50, counts  # at most two chunks
    assert elapsed < 1.5, elapsed  # an even split would take 2 s on the slow worker


def test_sigkill_in_the_middle_of_a_chunk_loses_nothing(
    ctx: zproc.Context, tmp_path: pathlib.Path
) -> None:
    swarm = ctx.create_swarm(3)
    folder = str(tmp_path)

    def work(x: int) -> tuple[int, int]:
        open(os.path.join(folder, f"{x}-{os.getpid()}"), "w").close()
        time.sleep(0.004)
        return x, os.getpid()

    lazy = swarm.map_lazy(work, range(600), num_chunks=12)  # 0.2 s per chunk
    deadline = time.monotonic() + 10
    while sum(w["busy"] for w in swarm.info()["workers"]) < 3:
        assert time.monotonic() < deadline
    time.sleep(0.05)  # in the middle of its chunk
    victim = workers_pids(swarm)[0]
    os.kill(victim, signal.SIGKILL)
    results = lazy.get(timeout=30)
    lazy.forget()
    assert [x for x, _ in results] == list(range(600))  # every result, once, in order
    ran = {name for name in os.listdir(folder)}
    handed_over = [x for x, pid in results if f"{x}-{victim}" in ran and pid != victim]
    assert handed_over, "the killed worker's chunk was not run again"
    assert victim not in {w["pid"] for w in swarm.info()["workers"]}


def test_sigterm_hands_the_chunk_back_at_once(swarm: zproc.Swarm) -> None:
    lazy = swarm.map_lazy(slow_pid, range(400), num_chunks=4)  # 0.2 s per chunk
    deadline = time.monotonic() + 10
    while sum(w["busy"] for w in swarm.info()["workers"]) < 2:
        assert time.monotonic() < deadline
    start = time.monotonic()
    swarm.count = 1  # SIGTERM to one worker, busy with its chunk
    results = lazy.get(timeout=30)
    assert time.monotonic() - start < _swarm.WORKER_LIVENESS  # no wait for a deadline
    assert [x for x, _ in results] == list(range(400))
    lazy.forget()


def test_a_chunk_lost_on_every_attempt_fails_clearly(ctx: zproc.Context) -> None:
    swarm = zproc.Swarm(ctx.server_address, max_attempts=1)
    try:
        swarm.start(2)

        def crash(x: int) -> int:
            if x == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

        with pytest.raises(zproc.TaskError, match="failed on all 1 attempts") as info:
            swarm.map(crash, range(10), num_chunks=2)
        assert info.value.chunk == 1 and info.value.items == range(5, 10)
        assert "items 5 to 9" in str(info.value)
        assert swarm.map(square, range(3)) == [0, 1, 4]  # the other worker goes on
    finally:
        swarm.close()


UNCLOSED_SWARM = """
import sys, zproc
def square(x):
    return x * x
if __name__ == "__main__":
    server, address = zproc.start_server()
    swarm = zproc.Swarm(address)
    swarm.start(1)
    print(swarm.map(square, range(3), timeout=30), flush=True)
    server.terminate()
    server.join(10)
"""


def test_a_script_that_does_not_close_its_swarm_still_exits(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "unclosed.py"
    script.write_text(UNCLOSED_SWARM)
    done = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[0, 1, 4]"


def test_a_swarm_goes_on_after_its_server_restarts() -> None:
    from conftest import make_address, stop

    address = make_address("tcp")
    server, _ = zproc.start_server(address)
    swarm = zproc.Swarm(address)
    try:
        swarm.start(1)
        lazy = swarm.map_lazy(square, range(4))
        assert lazy.get(timeout=30) == [0, 1, 4, 9]
        server.kill()
        server.join(10)
        server, _ = zproc.start_server(address)  # a new server, a new broker, no old tasks
        with pytest.raises(zproc.TaskError, match="no task"):
            lazy.get(timeout=30)
        assert swarm.map(square, range(5), timeout=30) == [0, 1, 4, 9, 16]
    finally:
        swarm.close()
        stop(server)


@pytest.mark.parametrize(
    "message",
    [
        ("not an id", 1, b"", 3, True, 0.0, [(0, 1, b"x")]),
        (2**64, 1, b"", 3, True, 0.0, [(0, 1, b"x")]),
        (12345, 1, "code", 3, True, 0.0, [(0, 1, b"x")]),
        (12345, 1, b"", 3, True, 0.0, [(0, 1, 7)]),
        (12345, 1, b"", 3, True, 0.0, "chunks"),
    ],
)
def test_a_malformed_submit_is_refused_and_the_broker_goes_on(
    swarm: zproc.Swarm, message: tuple[Any, ...]
) -> None:
    from zproc import _protocol as P
    from zproc.swarm import _Link

    link = _Link(swarm.server_address, None, 10.0)
    try:
        with pytest.raises(zproc.ProtocolError, match="malformed swarm SUBMIT"):
            link.request(P.SwarmKind.SUBMIT, message)
    finally:
        link.close()
    assert swarm.map(square, range(6), timeout=30) == [0, 1, 4, 9, 16, 25]
    assert swarm.info()["tasks"] == 0


def test_a_late_need_code_from_a_dropped_worker_does_not_queue_a_chunk_twice(
    ctx: zproc.Context,
) -> None:
    """A worker dropped for silence answers at last: its chunk is queued once, not twice."""
    from zproc import _protocol as P
    from zproc import _serialization as S
    from zproc import _swarmwire as W

    swarm = ctx.create_swarm(0)
    fake = zmq.Context.instance().socket(zmq.DEALER)
    fake.linger = 0
    fake.rcvtimeo = 10_000
    try:
        fake.connect(_worker.discover(swarm.server_address, None)[1])
        fake.send_multipart([W.work_header(P.WorkOp.READY), S.dumps((os.getpid(), "fake"))])
        deadline = time.monotonic() + 10
        while not swarm.info()["workers"]:
            assert time.monotonic() < deadline, "the fake worker never joined"
            time.sleep(0.02)
        result = swarm.map_lazy(square, range(4), num_chunks=1)
        header = W.parse_work(fake.recv_multipart()[0])  # the chunk; then no heartbeat
        assert header.op == P.WorkOp.CHUNK
        deadline = time.monotonic() + 15
        while swarm.info()["workers"]:  # dropped for silence, its chunk queued again
            assert time.monotonic() < deadline, "the silent worker was never dropped"
            time.sleep(0.1)
        assert swarm.info()["queued"] == 1
        fake.send_multipart([
            W.work_header(P.WorkOp.RESULT, status=P.ChunkStatus.NEED_CODE,
                          counter=header.counter, task=header.task, chunk=header.chunk),
            b"",
        ])  # fmt: skip
        time.sleep(0.3)  # let the broker read it
        assert swarm.info()["queued"] == 1
        swarm.start(1)
        assert result.as_list == [0, 1, 4, 9]
    finally:
        fake.close(0)


# -- retention -------------------------------------------------------------------------


def test_results_expire_by_count_and_age(ctx: zproc.Context) -> None:
    swarm = zproc.Swarm(ctx.server_address, max_tasks=2, max_age=0.6)
    try:
        swarm.start(1)
        lazies = [swarm.map_lazy(square, range(3)) for _ in range(3)]
        assert [lazy.get(timeout=10) for lazy in lazies[1:]] == [[0, 1, 4]] * 2
        time.sleep(0.25)  # housekeeping runs every 0.1 s
        with pytest.raises(zproc.TaskError, match="expired"):
            lazies[0].get(timeout=10)  # the oldest of 3 finished tasks, over max_tasks=2
        assert lazies[2].as_list == [0, 1, 4]
        time.sleep(0.8)
        with pytest.raises(zproc.TaskError):
            lazies[2].get(timeout=10)  # older than max_age
        info = swarm.info()
        assert info["tasks"] == 0 and (info["max_tasks"], info["max_age"]) == (2, 0.6)
    finally:
        swarm.close()


# -- security --------------------------------------------------------------------------


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
def test_curve_swarm(tmp_path: pathlib.Path) -> None:
    with zproc.Context(secret_key=SECRET) as ctx:
        swarm = ctx.create_swarm(2)
        assert swarm.map(square, range(100)) == [x * x for x in range(100)]
        tasks_endpoint = _worker.discover(ctx.server_address, client_keys(SECRET))[0]
        wrong = "the wrong swarm passphrase"
        with zproc.Swarm(ctx.server_address, secret_key=wrong, request_timeout=3) as bad:
            with pytest.raises((zproc.AuthenticationError, zproc.TimeoutError)):
                bad.info()
        # no key at all: the broker's endpoint refuses the handshake
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.linger = 0
            sock.connect(tasks_endpoint)
            sock.send_multipart([b"x", b"y"])
            assert not sock.poll(300)
        finally:
            sock.close(0)
            context.term()
        assert swarm.map(square, range(3)) == [0, 1, 4]


# -- the command line ------------------------------------------------------------------


def start_cli_workers(
    address: tuple[str, str], count: int, *extra: str
) -> tuple[subprocess.Popen[str], Output]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "zproc", "worker", *address, "--count", str(count), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,  # another process group, as from another terminal
    )
    err = Output(proc.stderr)
    try:
        err.wait_for("joined the swarm", timeout=30)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    return proc, err


def stop_cli_workers(proc: subprocess.Popen[str], err: Output) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        err.close()
    return code


def test_cli_workers_map_100000_items(ctx: zproc.Context) -> None:
    swarm = ctx.create_swarm(0)
    proc, err = start_cli_workers(ctx.server_address, 2)
    try:
        pids = {w["pid"] for w in swarm.info()["workers"]}
        assert len(pids) == 2
        start = time.monotonic()
        got = swarm.map(lambda x: x * 3 + 1, range(100_000))
        assert got == [x * 3 + 1 for x in range(100_000)]
        assert time.monotonic() - start < 10
        assert set(swarm.map(lambda _: os.getpid(), range(8), num_chunks=8)) <= pids
    finally:
        code = stop_cli_workers(proc, err)
    assert code == -signal.SIGTERM, err.text()
    deadline = time.monotonic() + 10
    while swarm.info()["workers"]:  # they said BYE
        assert time.monotonic() < deadline


def test_cli_worker_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "--count", "0"]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["worker", "tcp://127.0.0.1:5000"])
    assert info.value.code == 2


def test_consume() -> None:
    iterator = iter(range(10))
    zproc.consume(iterator, 3)
    assert next(iterator) == 3
    zproc.consume(iterator)
    assert next(iterator, None) is None
    with pytest.raises(ValueError):
        zproc.consume(iter(()), -1)


# -- two hosts -------------------------------------------------------------------------


TWO_HOST_CLIENT = """
import json, os, sys, time, zproc
req, pub, key = sys.argv[1], sys.argv[2], sys.argv[3]

def where(x):
    time.sleep(0.005)
    return x, os.readlink("/proc/self/ns/net")

with zproc.Swarm((req, pub), secret_key=key) as swarm:
    workers = swarm.info()["workers"]
    results = swarm.map(where, range(400), num_chunks=20, timeout=60)
print(json.dumps({"workers": len(workers), "order": [x for x, _ in results] == list(range(400)),
                  "netns": sorted({ns for _, ns in results})}))
"""


@pytest.fixture(scope="module")
def bed() -> Iterator[TestBed]:
    with created_bed() as testbed:
        yield testbed


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
def test_two_hosts_share_one_map(bed: TestBed, tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "secret"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o600)
    address = (f"tcp://{bed.a.ip}:22100", f"tcp://{bed.a.ip}:22101")
    try:
        _server, _out, server_err = bed.a.start(
            [sys.executable, "-m", "zproc", "serve", *address, "--secret-key-file",
             str(key_file)]
        )
        server_err.wait_for("serving at", timeout=30)
        for host in (bed.a, bed.b):
            _proc, _out, err = host.start(
                [sys.executable, "-m", "zproc", "worker", *address, "--count", "1",
                 "--secret-key-file", str(key_file)]
            )
            err.wait_for("joined the swarm", timeout=30)
        netns = {
            host.run(["readlink", "/proc/self/ns/net"]).stdout.strip() for host in (bed.a, bed.b)
        }
        client = bed.b.python(TWO_HOST_CLIENT, *address, SECRET, timeout=90)
        lines = client.stdout.strip().splitlines()
        assert lines, client.stderr
        report = json.loads(lines[-1])
        assert report == {"workers": 2, "order": True, "netns": sorted(netns)}, report
    finally:
        bed.stop_processes()
