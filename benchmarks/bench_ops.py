"""Dict operations: ``state[k] = v`` and ``state[k]`` round trips, against the floor and peers.

Run from the repository root::

    python -m benchmarks --only ops

Rows (medians of several repetitions of ``n`` operations each, after a warm-up; the
backends take turns within each repetition, one-client ones in slices of ``n / 10``
operations, so that they share the machine's noise):

* ``ops.set`` / ``ops.get``, one client, ipc: operations per second of a zproc ``State``
  versus the floor, a raw pyzmq DEALER/ROUTER echo of the same frames (a tiny server in
  its own process doing ``pickle.loads`` + the dict operation + ``pickle.dumps``), and
  versus ``multiprocessing.Manager().dict()``.
* ``ops.set x4`` / ``ops.get x4``: the aggregate rate of 4 client processes (each on its
  own key, started together at a barrier), versus Manager with 4 clients and versus the
  floor with 4 clients.
* ``ops.set @10k keys`` / ``ops.get @10k keys``: the cost of one operation (microseconds)
  on a state of 10,000 keys versus a state of 10 keys (the keys cycle through the whole
  state). Both states live on the same server, in two namespaces.
* ``ops.set pipelined``: ``p[k] = v`` inside ``with state.pipeline() as p`` (one
  request per slice, its time included) versus Manager's ``d[k] = v``, in the same
  rotation as the rows above; also at 10,000 keys versus 10.
* ``ops.get cached``: ``state[k]`` on a ``State(..., cache=True)`` (replica reads, kept
  current by the event stream) versus Manager's ``d[k]``, in a second rotation of their
  own run after the first (so that the cached States, which subscribe to every change,
  do not load the machine while the rows above are measured); also at 10,000 keys.
  Nothing writes during that rotation: each change costs a cached State a few
  microseconds when it next reads, which these rows leave out.

Every set writes a fresh integer (an unchanged value would be no change at all).
``ratio = value / baseline_value``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import (
    Counter,
    RawClient,
    WorkerGroup,
    manager_dict,
    median,
    raw_echo,
    row,
    time_loop,
    zproc_server,
)

SMALL = 10
BIG = 10_000
CLIENTS = 4
#: One-client repetitions are cut into this many slices, interleaved between backends.
CHUNKS = 10

FLOOR = "raw pyzmq echo (floor)"
MANAGER = "Manager().dict()"


def _keys(count: int) -> list[str]:
    return [f"key{i:05d}" for i in range(count)]


def _setter(setitem: Callable[[Any, Any], Any], keys: Sequence[Any]) -> Callable[[int], None]:
    m = len(keys)

    def op(i: int) -> None:
        setitem(keys[i % m], i)

    return op


def _getter(getitem: Callable[[Any], Any], keys: Sequence[Any]) -> Callable[[int], None]:
    m = len(keys)

    def op(i: int) -> None:
        getitem(keys[i % m])

    return op


#: ``timer(n, start) -> seconds`` for ``n`` operations on the fresh integers from ``start``.
Timer = Callable[[int, int], float]


def _looped(fn: Callable[[int], None]) -> Timer:
    return lambda n, start: time_loop(fn, n, start)


def _pipelined(state: zproc.State, keys: Sequence[Any]) -> Timer:
    """``n`` writes through one pipeline, its flush included."""
    m = len(keys)

    def timer(n: int, start: int) -> float:
        t0 = time.perf_counter()
        with state.pipeline() as p:
            for i in range(start, start + n):
                p[keys[i % m]] = i
        return time.perf_counter() - t0

    return timer


def _rotate(
    backends: dict[str, dict[str, Timer]],
    counter: Counter,
    *,
    n: int,
    reps: int,
    warmup: int,
    slow: dict[str, int] | None = None,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Time every backend's operations, taking turns; return the median rates (ops/s)
    and costs (us/op) by ``(backend, op)``.

    Each repetition is ``CHUNKS`` slices per backend, the backends taking turns, so that
    a burst of outside load hits them all alike. ``slow`` gives some backends fewer
    operations per repetition.
    """
    counts = {name: (slow or {}).get(name, n) for name in backends}
    for ops in backends.values():
        for timer in ops.values():
            timer(warmup, counter.take(warmup))
    times: dict[tuple[str, str], list[float]] = {
        (name, op): [] for name, ops in backends.items() for op in ops
    }
    names = list(backends)
    for rep in range(reps):
        spent = dict.fromkeys(times, 0.0)
        for c in range(CHUNKS):
            shift = (rep + c) % len(names)
            for name in names[shift:] + names[:shift]:
                chunk = max(1, counts[name] // CHUNKS)
                for op, timer in backends[name].items():
                    spent[name, op] += timer(chunk, counter.take(chunk))
        for pair, seconds in spent.items():
            times[pair].append(seconds)
    done = {name: max(1, count // CHUNKS) * CHUNKS for name, count in counts.items()}
    rates = {pair: median([done[pair[0]] / t for t in ts]) for pair, ts in times.items()}
    costs = {pair: median([t / done[pair[0]] * 1e6 for t in ts]) for pair, ts in times.items()}
    return rates, costs


# -- one client ----------------------------------------------------------------------


def bench_single(
    address: Any, endpoint: str, proxy: Any, *, n: int, reps: int, warmup: int
) -> list[dict[str, Any]]:
    small_keys, big_keys = _keys(SMALL), _keys(BIG)
    counter = Counter()
    with ExitStack() as stack:
        small = stack.enter_context(zproc.State(address))
        big = stack.enter_context(zproc.State(address, namespace="bench-big"))
        raw = RawClient(endpoint)
        stack.callback(raw.close)
        small.update(dict.fromkeys(small_keys, 0))
        big.update(dict.fromkeys(big_keys, 0))
        proxy.update(dict.fromkeys(small_keys, 0))
        for key in small_keys:
            raw.set(key, 0)
        if len(big) != BIG or len(small) != SMALL:
            raise RuntimeError("bench_ops: the states were not filled as expected")

        loops: dict[str, dict[str, Callable[[int], None]]] = {
            "zproc": {
                "set": _setter(small.__setitem__, small_keys),
                "get": _getter(small.__getitem__, small_keys),
            },
            "zproc-big": {
                "set": _setter(big.__setitem__, big_keys),
                "get": _getter(big.__getitem__, big_keys),
            },
            "raw": {"set": _setter(raw.set, small_keys), "get": _getter(raw.get, small_keys)},
            "manager": {
                "set": _setter(proxy.__setitem__, small_keys),
                "get": _getter(proxy.__getitem__, small_keys),
            },
        }
        backends: dict[str, dict[str, Timer]] = {
            name: {op: _looped(fn) for op, fn in ops.items()} for name, ops in loops.items()
        }
        backends["pipelined"] = {"set": _pipelined(small, small_keys)}
        backends["pipelined-big"] = {"set": _pipelined(big, big_keys)}
        rates, costs = _rotate(backends, counter, n=n, reps=reps, warmup=warmup)
        small_cached = stack.enter_context(zproc.State(address, cache=True))
        big_cached = stack.enter_context(
            zproc.State(address, namespace="bench-big", cache=True)
        )
        reads: dict[str, dict[str, Timer]] = {
            "cached": {"get": _looped(_getter(small_cached.__getitem__, small_keys))},
            "cached-big": {"get": _looped(_getter(big_cached.__getitem__, big_keys))},
            "manager-read": {"get": backends["manager"]["get"]},
        }
        # a cached read is fast: time more of them (Manager's reads are timed alongside)
        read_rates, read_costs = _rotate(
            reads, counter, n=n * 50, reps=reps, warmup=warmup, slow={"manager-read": n}
        )
        rates.update(read_rates)
        costs.update(read_costs)

    def rate(name: str, op: str) -> float:
        return rates[name, op]

    def cost_us(name: str, op: str) -> float:
        return costs[name, op]

    rows = []
    for op in ("set", "get"):
        rows.append(
            row(f"ops.{op} 1 client", rate("zproc", op), "ops/s", FLOOR, rate("raw", op),
                target=">= 0.95")
        )
    for op in ("set", "get"):
        rows.append(row(f"ops.{op} 1 client", rate("zproc", op), "ops/s", MANAGER,
                        rate("manager", op)))
    for op in ("set", "get"):
        rows.append(
            row(f"ops.{op} @{BIG // 1000}k keys", cost_us("zproc-big", op), "us/op",
                f"ops.{op} @{SMALL} keys", cost_us("zproc", op), target="<= 1.2")
        )
    rows.append(row("ops.get cached", rate("cached", "get"), "ops/s", f"{MANAGER} d[k]",
                    rate("manager-read", "get"), target=">= 50"))
    rows.append(row("ops.set pipelined", rate("pipelined", "set"), "ops/s",
                    f"{MANAGER} d[k] = v", rate("manager", "set"), target=">= 2"))
    rows.append(row(f"ops.get cached @{BIG // 1000}k keys", cost_us("cached-big", "get"),
                    "us/op", f"ops.get cached @{SMALL} keys", cost_us("cached", "get"),
                    target="<= 1.2"))
    rows.append(row(f"ops.set pipelined @{BIG // 1000}k keys",
                    cost_us("pipelined-big", "set"), "us/op",
                    f"ops.set pipelined @{SMALL} keys", cost_us("pipelined", "set"),
                    target="<= 1.2"))
    return rows


# -- four clients --------------------------------------------------------------------


def _zproc_client(address: Any) -> Callable[[int], Any]:
    def factory(index: int) -> Any:
        state = zproc.State(address)
        key = f"client{index}"
        state[key] = 0
        return {
            "set": lambda i: state.__setitem__(key, i),
            "get": lambda i: state[key],
        }, state.close

    return factory


def _manager_client(proxy: Any) -> Callable[[int], Any]:
    def factory(index: int) -> Any:
        key = f"client{index}"
        proxy[key] = 0
        return {
            "set": lambda i: proxy.__setitem__(key, i),
            "get": lambda i: proxy[key],
        }, lambda: None

    return factory


def _raw_client(endpoint: str) -> Callable[[int], Any]:
    def factory(index: int) -> Any:
        raw = RawClient(endpoint)
        key = f"client{index}"
        raw.set(key, 0)
        return {"set": lambda i: raw.set(key, i), "get": lambda i: raw.get(key)}, raw.close

    return factory


def bench_multi(
    address: Any, endpoint: str, proxy: Any, *, n: int, reps: int, warmup: int
) -> list[dict[str, Any]]:
    counter = Counter()
    with ExitStack() as stack:
        groups = {
            "zproc": stack.enter_context(WorkerGroup(_zproc_client(address), CLIENTS, "zproc")),
            "manager": stack.enter_context(
                WorkerGroup(_manager_client(proxy), CLIENTS, "manager")
            ),
            "raw": stack.enter_context(WorkerGroup(_raw_client(endpoint), CLIENTS, "raw")),
        }
        for group in groups.values():
            for op in ("set", "get"):
                group.run(op, warmup, counter)
        rates: dict[tuple[str, str], list[float]] = {
            (name, op): [] for name in groups for op in ("set", "get")
        }
        names = list(groups)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                for op in ("set", "get"):
                    rates[name, op].append(groups[name].run(op, n, counter))

    def rate(name: str, op: str) -> float:
        return median(rates[name, op])

    rows = []
    for op in ("set", "get"):
        rows.append(
            row(f"ops.{op} x{CLIENTS} clients", rate("zproc", op), "ops/s",
                f"{MANAGER} x{CLIENTS}", rate("manager", op), target=">= 1.2")
        )
    for op in ("set", "get"):
        rows.append(
            row(f"ops.{op} x{CLIENTS} clients", rate("zproc", op), "ops/s",
                f"{FLOOR} x{CLIENTS}", rate("raw", op))
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark of this module and return one row per measurement."""
    if quick:
        single = {"n": 500, "reps": 5, "warmup": 200}
        multi = {"n": 300, "reps": 3, "warmup": 100}
    else:
        single = {"n": 2000, "reps": 7, "warmup": 500}
        multi = {"n": 1500, "reps": 7, "warmup": 300}
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        endpoint = stack.enter_context(raw_echo())
        proxy = stack.enter_context(manager_dict())
        rows = bench_single(address, endpoint, proxy, **single)
        rows += bench_multi(address, endpoint, proxy, **multi)
    return rows


def main() -> None:
    from .__main__ import print_table

    print_table(run())


if __name__ == "__main__":
    main()
