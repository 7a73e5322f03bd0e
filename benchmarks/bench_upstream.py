"""Upstream zproc 0.9.1 as a baseline, from a separate environment.

Run from the repository root (the venv is never this project's environment)::

    python -m venv /tmp/up && /tmp/up/bin/pip install zproc==0.9.1
    python -m benchmarks --only upstream --upstream-python /tmp/up/bin/python

The same standalone script (``_upstream_script.py``, API common to both versions only)
runs alternately with the upstream python and with this python, so both versions go
through the same harness in the same run: set and get round trips per second with one
client, and the aggregate set rate of 4 client processes. Each figure is the median of all
repetitions of all alternations. Without ``--upstream-python`` this module is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from ._common import median, row

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_upstream_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = 4


def _measure(python: str, ours: bool, n: int, reps: int, warmup: int) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    if ours:  # make sure this checkout's zproc is the one imported
        env["PYTHONPATH"] = ROOT
    try:
        done = subprocess.run(
            [python, SCRIPT, str(n), str(reps), str(warmup), str(CLIENTS)],
            cwd=tempfile.gettempdir(),
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{python}: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{python} exited with {done.returncode}:\n{done.stderr.strip()[-2000:]}"
        )
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (ValueError, IndexError) as exc:
        raise RuntimeError(f"{python} printed no result: {done.stdout[-500:]!r}") from exc


def run(quick: bool = False, upstream_python: str | None = None) -> list[dict[str, Any]]:
    """Rows comparing this zproc with upstream (empty/skipped without a python path)."""
    if not upstream_python:
        return [{"name": "upstream", "skipped": "no --upstream-python given"}]
    if not (os.path.isfile(upstream_python) and os.access(upstream_python, os.X_OK)):
        return [{"name": "upstream", "skipped": f"{upstream_python} is not an executable"}]
    rounds, n, reps, warmup = (1, 800, 2, 200) if quick else (2, 2000, 3, 500)
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "upstream": []}
    try:
        for _ in range(rounds):
            results["ours"].append(_measure(sys.executable, True, n, reps, warmup))
            results["upstream"].append(_measure(upstream_python, False, n, reps, warmup))
    except RuntimeError as exc:
        return [{"name": "upstream", "skipped": f"the upstream run failed: {exc}"}]
    version = results["upstream"][0].get("version", "?")
    ours_file = results["ours"][0].get("file", "")
    if not ours_file.startswith(ROOT):
        raise RuntimeError(f"the comparison imported {ours_file}, not this checkout's zproc")
    if results["upstream"][0].get("file", "").startswith(ROOT):
        return [{"name": "upstream", "skipped": f"{upstream_python} imports this checkout's "
                                                f"zproc, not an upstream release"}]
    baseline = f"zproc {version} (separate venv)"

    def figure(who: str, key: str) -> float:
        return median([rate for result in results[who] for rate in result[key]])

    note = (f"both through benchmarks/_upstream_script.py, alternately, "
            f"{rounds * reps} repetitions each; upstream python {upstream_python}")
    rows = [
        row("upstream.set 1 client", figure("ours", "set"), "ops/s", baseline,
            figure("upstream", "set"), note=note),
        row("upstream.get 1 client", figure("ours", "get"), "ops/s", baseline,
            figure("upstream", "get")),
        row(f"upstream.set x{CLIENTS} clients", figure("ours", f"set_x{CLIENTS}"), "ops/s",
            baseline, figure("upstream", f"set_x{CLIENTS}")),
    ]
    return rows


def main() -> None:
    from .__main__ import print_table

    python = sys.argv[1] if len(sys.argv) > 1 else None
    print_table(run(upstream_python=python))


if __name__ == "__main__":
    main()
