"""Scaling curves: aggregate rates by number of clients, and by the size of the state.

Run from the repository root::

    python -m benchmarks --only scaling          # about 3 minutes
    python -m benchmarks.bench_scaling [--quick] [--json FILE] [--figure FILE]

Two curves:

* **Clients.** 1, 2, 4 and 8 client processes (each on its own key, started together at a
  barrier) doing ``state[k] = v``: the aggregate rate (operations per second, all
  clients together) of zproc, of the floor (the raw pyzmq DEALER/ROUTER echo server of
  ``bench_ops``, one request at a time) and of ``multiprocessing.Manager().dict()``. The
  three backends take turns within each repetition; the figure is the median.
* **State size.** One client's ``state[k] = v`` and ``state[k]`` rates on states of 10,
  10,000 and 1,000,000 keys (the keys cycle through the whole state; each state is filled
  with ``update`` in chunks of 100,000 keys, in its own namespace of one server).

Run as ``python -m benchmarks.bench_scaling`` it prints the table, writes the points as
JSON (``docs/_static/scaling.json`` by default) and draws them into
``docs/_static/scaling.png`` (needs matplotlib: ``pip install "zproc[bench]"``; without
it the JSON is written and the exit status is 1). Through ``python -m benchmarks`` it
returns the rows, and a full run (not ``--quick``) also writes that JSON and figure when
matplotlib is installed (a note in the table says so otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import zproc

from ._common import (
    Counter,
    WorkerGroup,
    environment,
    manager_dict,
    median,
    raw_echo,
    row,
    time_loop,
    zproc_server,
)
from .bench_ops import FLOOR, MANAGER, _getter, _manager_client, _raw_client, _setter, _zproc_client

CLIENTS = (1, 2, 4, 8)
SIZES = (10, 10_000, 1_000_000)
FILL_CHUNK = 100_000
BACKENDS = ("zproc", "floor", "manager")
HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(os.path.dirname(HERE), "docs", "_static")
FIGURE = os.path.join(STATIC, "scaling.png")
JSON = os.path.join(STATIC, "scaling.json")
INSTALL = 'pip install "zproc[bench]"'


def _settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"n": 300, "reps": 3, "warmup": 100, "size_n": 1000, "size_reps": 3}
    return {"n": 3000, "reps": 7, "warmup": 300, "size_n": 3000, "size_reps": 7}


def bench_clients(
    address: Any, endpoint: str, proxy: Any, *, n: int, reps: int, warmup: int
) -> dict[str, dict[int, float]]:
    """Aggregate set rates by backend and client count (ops/s)."""
    counter = Counter()
    factories = {
        "zproc": _zproc_client(address),
        "floor": _raw_client(endpoint),
        "manager": _manager_client(proxy),
    }
    rates: dict[str, dict[int, float]] = {name: {} for name in BACKENDS}
    for count in CLIENTS:
        per_op = max(1, n // count)  # about the same total work at every count
        with ExitStack() as stack:
            groups = {
                name: stack.enter_context(WorkerGroup(factory, count, f"{name}-x{count}"))
                for name, factory in factories.items()
            }
            for group in groups.values():
                group.run("set", warmup, counter)
            samples: dict[str, list[float]] = {name: [] for name in groups}
            for rep in range(reps):
                shift = rep % len(BACKENDS)
                for name in BACKENDS[shift:] + BACKENDS[:shift]:
                    samples[name].append(groups[name].run("set", per_op, counter))
        for name, values in samples.items():
            rates[name][count] = median(values)
        print(f"  scaling: {count} client(s) done", file=sys.stderr, flush=True)
    return rates


def _keys(count: int) -> list[str]:
    return [f"key{i:07d}" for i in range(count)]


def _fill(state: zproc.State, keys: Sequence[str]) -> float:
    """Fill ``state`` with ``keys`` (value 0) in chunks; return the seconds taken."""
    t0 = time.perf_counter()
    for start in range(0, len(keys), FILL_CHUNK):
        state.update(dict.fromkeys(keys[start : start + FILL_CHUNK], 0))
    return time.perf_counter() - t0


def bench_sizes(
    address: Any, *, size_n: int, size_reps: int, warmup: int
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """One client's set and get rates by state size (ops/s), and the fill times (s)."""
    counter = Counter()
    rates: dict[str, dict[int, float]] = {"set": {}, "get": {}}
    fill: dict[int, float] = {}
    with ExitStack() as stack:
        loops = {}
        for size in SIZES:
            state = stack.enter_context(zproc.State(address, namespace=f"bench-size-{size}"))
            keys = _keys(size)
            fill[size] = _fill(state, keys)
            if len(state) != size:
                raise RuntimeError(f"bench_scaling: the state of {size} keys was not filled")
            loops[size] = {"set": _setter(state.__setitem__, keys),
                           "get": _getter(state.__getitem__, keys)}
            print(f"  scaling: {size:,} keys filled in {fill[size]:.1f} s",
                  file=sys.stderr, flush=True)
        for ops in loops.values():
            for fn in ops.values():
                time_loop(fn, warmup, counter.take(warmup))
        samples: dict[tuple[str, int], list[float]] = {
            (op, size): [] for op in rates for size in SIZES
        }
        for rep in range(size_reps):
            shift = rep % len(SIZES)
            for size in SIZES[shift:] + SIZES[:shift]:
                for op, fn in loops[size].items():
                    seconds = time_loop(fn, size_n, counter.take(size_n))
                    samples[op, size].append(size_n / seconds)
    for (op, size), values in samples.items():
        rates[op][size] = median(values)
    return rates, fill


def measure(quick: bool = False) -> dict[str, Any]:
    """Every point of both curves, with the machine and the settings."""
    settings = _settings(quick)
    started = time.monotonic()
    with ExitStack() as stack:
        address = stack.enter_context(zproc_server())
        endpoint = stack.enter_context(raw_echo())
        proxy = stack.enter_context(manager_dict())
        clients = bench_clients(address, endpoint, proxy, n=settings["n"],
                                reps=settings["reps"], warmup=settings["warmup"])
        sizes, fill = bench_sizes(address, size_n=settings["size_n"],
                                  size_reps=settings["size_reps"], warmup=settings["warmup"])
    return {
        "quick": quick,
        "settings": settings,
        "environment": environment(),
        "seconds": time.monotonic() - started,
        "clients": {name: {str(k): v for k, v in by.items()} for name, by in clients.items()},
        "sizes": {op: {str(k): v for k, v in by.items()} for op, by in sizes.items()},
        "fill_seconds": {str(k): v for k, v in fill.items()},
    }


def rows_of(points: dict[str, Any]) -> list[dict[str, Any]]:
    """The points as rows of the benchmarks table."""
    clients, sizes = points["clients"], points["sizes"]
    rows = []
    for count in CLIENTS:
        c = str(count)
        rows.append(row(f"scaling.set x{count}", clients["zproc"][c], "ops/s",
                        f"{FLOOR} x{count}", clients["floor"][c]))
        rows.append(row(f"scaling.set x{count}", clients["zproc"][c], "ops/s",
                        f"{MANAGER} x{count}", clients["manager"][c]))
    small = str(SIZES[0])
    for op in ("set", "get"):
        for size in SIZES[1:]:
            rows.append(row(f"scaling.{op} @{size:,} keys", sizes[op][str(size)], "ops/s",
                            f"scaling.{op} @{SIZES[0]} keys", sizes[op][small],
                            note=(f"filled in {points['fill_seconds'][str(size)]:.1f} s "
                                  f"(update, {FILL_CHUNK:,} keys a call)")
                            if op == "set" else None))
    return rows


def draw(points: dict[str, Any], path: str = FIGURE) -> None:
    """Draw both curves into ``path`` (PNG); raises ImportError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"drawing the scaling figure needs matplotlib: {INSTALL}") from exc
    env = points["environment"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"zproc": "zproc", "floor": "raw pyzmq floor (one request at a time)",
              "manager": "multiprocessing.Manager().dict()"}
    for name in BACKENDS:
        by = points["clients"][name]
        left.plot(CLIENTS, [by[str(c)] for c in CLIENTS], marker="o", label=labels[name])
    left.set_xscale("log", base=2)
    left.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
    left.set_xlabel("client processes")
    left.set_ylabel("aggregate state[k] = v per second")
    top = max(v for name in BACKENDS for v in points["clients"][name].values())
    left.set_ylim(0, top * 1.4)  # room for the legend above the curves
    left.set_title("clients")
    left.legend(fontsize="small", loc="upper left")
    for op, label in (("set", "state[k] = v"), ("get", "state[k]")):
        by = points["sizes"][op]
        right.plot(SIZES, [by[str(s)] for s in SIZES], marker="o", label=f"zproc {label}")
    right.set_xscale("log")
    right.set_xticks(SIZES, [f"{s:,}" for s in SIZES])
    right.set_xlabel("keys in the state")
    right.set_ylabel("operations per second, one client")
    right.set_ylim(bottom=0)
    right.set_title("state size")
    right.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"{env.get('cpus')} CPUs, {env.get('cpu', '?')}, Python {env.get('python')}"
                 + (" (--quick)" if points.get("quick") else ""), fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(points: dict[str, Any], json_path: str = JSON, figure: str = FIGURE) -> None:
    """Write the points as JSON, then draw them (ImportError without matplotlib)."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(points, f, indent=2)
        f.write("\n")
    draw(points, figure)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure both curves and return the rows; a full run also redraws the figure.

    A ``--quick`` run leaves the figure and its JSON as they are (its points are too
    noisy to show).
    """
    points = measure(quick)
    rows = rows_of(points)
    if quick:
        rows[0]["note"] = f"--quick: {FIGURE} not redrawn"
        return rows
    points["command"] = "python -m benchmarks --only scaling"
    try:
        save(points)
    except ImportError as exc:
        rows[0]["note"] = f"no figure drawn: {exc}"
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from .__main__ import print_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter repetitions")
    parser.add_argument("--json", default=JSON, metavar="FILE",
                        help=f"where to write the points (default {JSON})")
    parser.add_argument("--figure", default=FIGURE, metavar="FILE",
                        help=f"where to draw the figure (default {FIGURE})")
    args = parser.parse_args(argv)
    points = measure(args.quick)
    points["command"] = "python -m benchmarks.bench_scaling" + (" --quick" if args.quick else "")
    print_table(rows_of(points))
    try:
        save(points, args.json, args.figure)
    except ImportError as exc:
        print(f"wrote {args.json}; {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.json} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
