"""The ``zproc`` command line: run a server, and look at one from a shell.

::

    zproc serve REQ_ENDPOINT PUB_ENDPOINT [--secret-key-file F | --insecure]
                [--persist PATH [--fsync P]] [--metrics HOST:PORT] [--slow-log-ms MS] [-v]
    zproc ping  REQ_ENDPOINT PUB_ENDPOINT [--secret-key-file F] [--timeout S]
    zproc dump  REQ_ENDPOINT PUB_ENDPOINT [--secret-key-file F] [--namespace NS] [--json]
    zproc watch REQ_ENDPOINT PUB_ENDPOINT [KEY ...] [--secret-key-file F] [--count N]
    zproc stats REQ_ENDPOINT PUB_ENDPOINT [--secret-key-file F] [--json] [--watch S]
    zproc keygen DIRECTORY
    zproc worker REQ_ENDPOINT PUB_ENDPOINT [--count N] [--secret-key-file F]

Also ``python -m zproc``. The secret key comes from ``--secret-key-file`` (a file whose
first line is the passphrase, or a certificate directory made by ``zproc keygen``), else
from the environment variable ``ZPROC_SECRET_KEY`` (a passphrase), else there is none.

Exit status: 0 success, 1 failure (no server, rejected key, timeout...), 2 bad usage.
``zproc serve`` runs until SIGINT or SIGTERM, then closes its sockets and ends by that
signal, as Unix servers do (status 130 or 143 in a shell). Messages go to stderr; data
(``dump``, ``watch``, ``ping``, ``stats``) to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import pathlib
import pprint
import reprlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import _serialization as S
from ._persist import FSYNC_POLICIES
from ._security import CLI_FIX, create_certificates, refuse_exposed, server_keys, warn_exposed
from ._launch import serve
from ._metrics import load_prometheus, parse_listen
from ._server import Server
from ._worker import run_workers
from ._transport import ServerAddress, normalize_address
from ._utils import OWNER_ONLY, check_private
from ._version import __version__
from .exceptions import ZProcError
from .state import State, ping, stats

__all__ = ["main"]

PROG = "zproc"
ENV_SECRET_KEY = "ZPROC_SECRET_KEY"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- arguments --------------------------------------------------------------------------


def _address(endpoints: Sequence[str]) -> ServerAddress:
    if len(endpoints) != 2:
        raise UsageError(
            f"expected two endpoints, REQ_ENDPOINT PUB_ENDPOINT (e.g. tcp://10.0.0.1:5000 "
            f"tcp://10.0.0.1:5001), got {len(endpoints)}"
        )
    try:
        return normalize_address(tuple(endpoints))
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def read_secret_key(path: str | None) -> Any:
    """The ``secret_key`` named on the command line or in the environment (None: no key).

    A directory is a certificate directory; a file holds the passphrase on its first line.
    """
    if path is None:
        value = os.environ.get(ENV_SECRET_KEY)
        if value is not None and not value:
            raise UsageError(
                f"${ENV_SECRET_KEY} is set but empty; put the passphrase in it, or unset it "
                f"to run without a secret key"
            )
        return value
    if os.path.isdir(path):
        return pathlib.Path(path)
    check_private(path, "the secret key file", OWNER_ONLY)
    try:
        with open(path, "rb") as f:
            first = f.readline().rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"cannot read the secret key file {path!r}: {exc.strerror}") from None
    if not first:
        raise UsageError(f"the secret key file {path!r} is empty; put the passphrase on line 1")
    return first


def _listen(text: str) -> tuple[str, int]:
    """``--metrics HOST:PORT``."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fsync_policy(text: str) -> str:
    """``--fsync``: a policy name, with ``-`` or ``_`` for the space of "every second"."""
    return text.replace("-", " ").replace("_", " ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a zproc state server, or look at one.",
        epilog=f"The secret key may also come from ${ENV_SECRET_KEY} (a passphrase).",
    )
    parser.add_argument("--version", action="version", version=f"zproc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--secret-key-file",
            metavar="F",
            help="passphrase file (first line) or certificate directory (zproc keygen)",
        )

    serve = commands.add_parser(
        "serve", help="run a server in the foreground until SIGINT/SIGTERM"
    )
    serve.add_argument("req_endpoint", metavar="REQ_ENDPOINT")
    serve.add_argument("pub_endpoint", metavar="PUB_ENDPOINT")
    common(serve)
    serve.add_argument("--persist", metavar="PATH", help="keep the state in PATH")
    serve.add_argument(
        "--fsync", type=_fsync_policy, choices=FSYNC_POLICIES, default=None, metavar="POLICY",
        help="with --persist: when changes reach the disk: always (the default, before "
        "each reply), every-second or never (left to the operating system)",
    )
    serve.add_argument(
        "--history-size", type=int, default=None, metavar="N",
        help="events per namespace kept for clients to replay",
    )
    serve.add_argument(
        "--history-bytes", type=int, default=None, metavar="N",
        help="most bytes of those events per namespace (default 64 MiB)",
    )
    serve.add_argument(
        "--insecure", action="store_true",
        help="serve a non-loopback tcp address without a secret key (trusted networks only)",
    )
    serve.add_argument(
        "--metrics", type=_listen, default=None, metavar="HOST:PORT",
        help='serve Prometheus metrics at http://HOST:PORT/metrics (pip install '
        '"zproc[metrics]")',
    )
    serve.add_argument(
        "--slow-log-ms", type=float, default=None, metavar="MS",
        help="log requests that take at least MS milliseconds (default 100)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log every rejection")

    stats = commands.add_parser("stats", help="print the server's figures")
    stats.add_argument("endpoints", nargs="+", metavar="ADDRESS")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print JSON (one line per reading)")
    stats.add_argument("--watch", type=float, default=None, metavar="S",
                       help="read again every S seconds until Ctrl-C")
    stats.add_argument("--count", type=int, default=None, metavar="N",
                       help="with --watch: stop after N readings")
    stats.add_argument("--timeout", type=float, default=5.0, metavar="S")

    ping = commands.add_parser("ping", help="check that a server answers; print its pid")
    ping.add_argument("endpoints", nargs="+", metavar="ADDRESS")
    common(ping)
    ping.add_argument("--timeout", type=float, default=5.0, metavar="S")

    dump = commands.add_parser("dump", help="print the state")
    dump.add_argument("endpoints", nargs="+", metavar="ADDRESS")
    common(dump)
    dump.add_argument("--namespace", default="default")
    dump.add_argument("--timeout", type=float, default=10.0, metavar="S")
    dump.add_argument("--json", action="store_true", help="print JSON instead of Python")

    watch = commands.add_parser(
        "watch", help="print changes as they happen (of KEYs, or of everything)"
    )
    watch.add_argument(
        "endpoints", nargs="+", metavar="ADDRESS [KEY]",
        help="the two endpoints, then the keys to watch (str keys)",
    )
    common(watch)
    watch.add_argument("--namespace", default="default")
    watch.add_argument("--count", type=int, default=None, metavar="N",
                       help="stop after N changes")
    watch.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="fail when no change comes for S seconds")
    watch.add_argument("--full", action="store_true", help="do not shorten long values")

    keygen = commands.add_parser(
        "keygen", help="write a server and a client certificate pair into DIRECTORY"
    )
    keygen.add_argument("directory", metavar="DIRECTORY")

    worker = commands.add_parser(
        "worker", help="run swarm workers for the server until SIGINT/SIGTERM"
    )
    worker.add_argument("req_endpoint", metavar="REQ_ENDPOINT")
    worker.add_argument("pub_endpoint", metavar="PUB_ENDPOINT")
    common(worker)
    worker.add_argument("--count", type=int, default=None, metavar="N",
                        help="worker processes (default: the number of CPUs)")
    return parser


# -- commands ---------------------------------------------------------------------------


class _Report:
    """Receives the server's start-up report (in this process) and prints it."""

    def __init__(self, secure: bool, persist: str = "") -> None:
        self.secure = secure
        self.persist = persist  # "; persist PATH, fsync POLICY", or ""
        self.error: BaseException | None = None

    def send(self, message: tuple[str, Any]) -> None:
        if message[0] == "ok":
            req, pub = message[1]
            mode = "CURVE on" if self.secure else "no secret key"
            print(
                f"zproc server {os.getpid()} serving at {req} {pub} ({mode}{self.persist}); "
                f"SIGINT or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.error = S.loads_exception(message[1])

    def close(self) -> None:
        pass


def _serve(args: argparse.Namespace) -> int:
    address = _address([args.req_endpoint, args.pub_endpoint])
    secret_key = read_secret_key(args.secret_key_file)
    exposed = refuse_exposed(
        address, secure=secret_key is not None, insecure=args.insecure, fix=CLI_FIX
    )
    options: dict[str, Any] = {"keys": server_keys(secret_key), "insecure": args.insecure}
    if args.history_size is not None:
        if args.history_size < 1:
            raise UsageError(f"--history-size must be >= 1, got {args.history_size}")
        options["history_size"] = args.history_size
    if args.history_bytes is not None:
        if args.history_bytes < 1:
            raise UsageError(f"--history-bytes must be >= 1, got {args.history_bytes}")
        options["history_bytes"] = args.history_bytes
    if args.persist is not None:
        if "persist" not in inspect.signature(Server).parameters:
            raise UsageError(
                "--persist is not supported by this version of the zproc server (it keeps "
                "the state in memory only)"
            )
        options["persist"] = args.persist
        options["fsync"] = args.fsync or "always"
    elif args.fsync is not None:
        raise UsageError("--fsync needs --persist PATH (without it nothing is written)")
    if args.slow_log_ms is not None:
        if not args.slow_log_ms > 0:
            raise UsageError(f"--slow-log-ms must be > 0, got {args.slow_log_ms}")
        options["slow_log_ms"] = args.slow_log_ms
    if args.metrics is not None:
        try:
            load_prometheus()
        except ImportError as exc:
            _error(f"--metrics: {exc}")
            return EXIT_FAILURE
        options["metrics"] = args.metrics
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    persist = ""
    if args.persist is not None:
        persist = f"; persist {args.persist}, fsync {options['fsync']}"
    report = _Report(secure=options["keys"] is not None, persist=persist)
    if exposed:
        warn_exposed(exposed, f"server {os.getpid()}", stacklevel=2)
    serve(address, report, options)  # returns on failure; ends the process on a signal
    if report.error is not None:
        _error(str(report.error))
        return EXIT_FAILURE
    return EXIT_OK


def _ping(args: argparse.Namespace) -> int:
    address = _address(args.endpoints)
    secret_key = read_secret_key(args.secret_key_file)
    start = time.perf_counter()
    pid = ping(address, timeout=args.timeout, secret_key=secret_key)
    elapsed = (time.perf_counter() - start) * 1000
    if pid is None:
        _error(f"the server at {address.req_rep} answered with a different payload")
        return EXIT_FAILURE
    print(f"zproc server {pid} at {address.req_rep} answered in {elapsed:.1f} ms")
    return EXIT_OK


def _dump(args: argparse.Namespace) -> int:
    address = _address(args.endpoints)
    secret_key = read_secret_key(args.secret_key_file)
    with State(
        address,
        namespace=args.namespace,
        request_timeout=args.timeout,
        connect_timeout=args.timeout,
        secret_key=secret_key,
    ) as state:
        data = state.copy()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=repr))
    else:
        pprint.pprint(data)
    return EXIT_OK


def _format_changes(update: Any, keys: frozenset[str], shorten: Any) -> list[str]:
    before, after = update.before, update.after
    stamp = time.strftime("%H:%M:%S", time.localtime(update.timestamp))
    stamp += f".{int(update.timestamp * 1000) % 1000:03d}"
    lines = []
    for key, value in after.items():
        if keys and key not in keys:
            continue
        if key not in before or before[key] is not value and before[key] != value:
            lines.append(f"{stamp} {key!r} = {shorten(value)}")
    for key in before:
        if key not in after and (not keys or key in keys):
            lines.append(f"{stamp} {key!r} deleted")
    return lines


def _watch(args: argparse.Namespace) -> int:
    if len(args.endpoints) < 2:
        raise UsageError("expected two endpoints, REQ_ENDPOINT PUB_ENDPOINT, then keys")
    address = _address(args.endpoints[:2])
    keys = frozenset(args.endpoints[2:])
    if args.count is not None and args.count < 0:
        raise UsageError(f"--count must be >= 0, got {args.count}")
    secret_key = read_secret_key(args.secret_key_file)
    short = reprlib.Repr()
    short.maxstring = short.maxother = 200
    shorten = repr if args.full else short.repr
    seen = 0
    with State(address, namespace=args.namespace, secret_key=secret_key) as state:
        watcher = state.when_change_raw(timeout=args.timeout)
        what = ", ".join(sorted(map(repr, keys))) if keys else "every key"
        print(
            f"watching {what} at {address.req_rep} (namespace {args.namespace!r}); "
            f"Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while args.count is None or seen < args.count:
            lines = _format_changes(next(watcher), keys, shorten)
            if lines:
                print("\n".join(lines), flush=True)
                seen += 1
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    try:
        server, client = create_certificates(args.directory)
    except FileExistsError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    folder = os.path.abspath(args.directory)
    print(
        f"wrote {server} and {client} (and their public halves .key) in {folder}\n"
        f"server host: server.key_secret + client.key; client hosts: client.key_secret + "
        f"server.key. Pass the directory with --secret-key-file, or "
        f"secret_key=pathlib.Path(...)"
    )
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    address = _address([args.req_endpoint, args.pub_endpoint])
    count = (os.cpu_count() or 1) if args.count is None else args.count
    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    secret_key = read_secret_key(args.secret_key_file)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return run_workers(address, count, secret_key, report)  # ends on SIGINT/SIGTERM


def _stats(args: argparse.Namespace) -> int:
    address = _address(args.endpoints)
    if args.watch is not None and not args.watch > 0:
        raise UsageError(f"--watch must be > 0 seconds, got {args.watch}")
    if args.count is not None and (args.count < 1 or args.watch is None):
        raise UsageError("--count needs --watch and must be >= 1")
    secret_key = read_secret_key(args.secret_key_file)
    in_place = args.watch is not None and not args.json and sys.stdout.isatty()
    readings = 0
    while True:
        figures = stats(address, timeout=args.timeout, secret_key=secret_key)
        if args.json:
            print(json.dumps(figures, sort_keys=True, default=repr,
                             indent=None if args.watch else 2), flush=True)
        else:
            text = format_stats(figures)
            print(("\x1b[H\x1b[2J" if in_place else "") + text, flush=True)
        readings += 1
        if args.watch is None or (args.count is not None and readings >= args.count):
            return EXIT_OK
        time.sleep(args.watch)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def format_stats(f: dict[str, Any]) -> str:
    """The figures of ``zproc.stats()`` as a table for a terminal."""
    req, ev = f["requests"], f["events"]
    rates = "  ".join(f"{window} {rate:.0f}" for window, rate in req["per_second"].items())
    kinds = "  ".join(f"{kind} {count}" for kind, count in req["by_kind"].items())
    lines = [
        f"zproc server {f['pid']} (zproc {f['version']}) at {f['address'][0]}",
        f"uptime        {f['uptime']:.0f} s   clients {f['clients']}   "
        f"memory {_size(f['memory']['rss'])}",
        f"requests      {req['total']} ({req['errors']} errors)   per second: {rates}",
        f"  by kind     {kinds or '-'}",
        f"events        {ev['published']} published   {ev['replays']} replays "
        f"(largest {ev['largest_replay']} events, {ev['resets']} clients fell behind)",
        f"bytes         in {_size(f['bytes']['in'])}   out {_size(f['bytes']['out'])}",
    ]
    persistence = f["persistence"]
    if persistence is None:
        lines.append("persistence   off (memory only)")
    else:
        snapshot = persistence["last_snapshot"]
        when = "none this run" if snapshot is None else time.strftime(
            "%H:%M:%S", time.localtime(snapshot))
        lines.append(
            f"persistence   {persistence['path']} ({_size(persistence['file_bytes'])}, "
            f"{persistence['journal_rows']} journal rows, last snapshot {when})"
        )
    swarm = f["swarm"]
    if swarm is not None:
        lines.append(f"swarm         {swarm['workers']} workers   {swarm['running']} chunks "
                     f"running   {swarm['queued']} queued")
    coord = f["coordination"]
    lines.append(f"coordination  {coord['primitives']} primitives   {coord['held']} held   "
                 f"{coord['waiters']} waiting")
    lines.append(f"namespaces    {len(f['namespaces'])}")
    for name, ns in list(f["namespaces"].items())[:20]:
        lines.append(f"  {name!r:<20} {ns['keys']} keys   seq {ns['seq']}")
    lines.append("slow log      (the slowest requests of the last 60 s)")
    for entry in f["slow_log"]:
        lines.append(f"  {entry['duration'] * 1000:9.3f} ms  {entry['kind']:<10} "
                     f"{entry['namespace']!r:<20} client {entry['client']}")
    return "\n".join(lines)


COMMANDS = {
    "serve": _serve, "ping": _ping, "dump": _dump, "watch": _watch, "keygen": _keygen,
    "worker": _worker, "stats": _stats,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zproc`` command line; return the exit status.

    Parameters
    ----------
    argv
        The arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except (ZProcError, TimeoutError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except (TypeError, ValueError) as exc:  # an unusable secret key, a bad option value
        _error(str(exc))
        return EXIT_USAGE
