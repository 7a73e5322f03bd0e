"""The server's figures in the Prometheus text format (``zproc serve --metrics HOST:PORT``).

An HTTP server in a thread of the server process answers each scrape by reading the
figures once (the same dict as ``State.stats()``); the requests themselves pay nothing
for it. Needs the optional ``prometheus_client`` package (``pip install
"zproc[metrics]"``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["EXTRA", "MetricsServer", "load_prometheus", "parse_listen"]

log = logging.getLogger("zproc.server")

EXTRA = 'pip install "zproc[metrics]"'

Report = Callable[[], dict[str, Any]]


def load_prometheus() -> Any:
    """The ``prometheus_client`` module; ImportError naming the extra if it is missing."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError(
            f"the metrics endpoint needs the prometheus_client package, which is not "
            f"installed: {EXTRA}"
        ) from exc
    return prometheus_client


def parse_listen(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[v6]:PORT`` for an IPv6 address) as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--metrics needs HOST:PORT, e.g. 127.0.0.1:9150, got {text!r}"
        )
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"--metrics {text!r}: {host!r} is not an IP address (or localhost)"
            ) from None
    return host, int(port)


class MetricsServer:
    """Serves ``/metrics`` at ``(host, port)`` from a daemon thread until :meth:`close`."""

    def __init__(self, report: Report, host: str, port: int) -> None:
        prometheus = load_prometheus()
        registry = prometheus.CollectorRegistry(auto_describe=False)
        registry.register(_Collector(report, prometheus))
        started = prometheus.start_http_server(port, addr=host, registry=registry)
        self._httpd = started[0] if isinstance(started, tuple) else None
        self.address = (host, port)
        self.url = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


class _Collector:
    """Turns one reading of the figures into metric families (names: ``zproc_*``)."""

    def __init__(self, report: Report, prometheus: Any) -> None:
        self.report = report
        self.core = prometheus.core

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            figures = self.report()
        except Exception:
            log.exception("zproc server: could not read the figures for a metrics scrape")
            return
        yield from self._families(figures)

    def _families(self, f: dict[str, Any]) -> Iterator[Any]:
        core = self.core

        def gauge(name: str, doc: str, value: float) -> Any:
            return core.GaugeMetricFamily(f"zproc_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> Any:
            return core.CounterMetricFamily(f"zproc_{name}", doc, value=value)

        requests = f["requests"]
        yield gauge("uptime_seconds", "Seconds since the server started", f["uptime"])
        yield gauge("clients", "Clients with a request in the last 10 s", f["clients"])
        def labelled(family: Any, name: str, doc: str, label: str,
                     values: dict[str, float]) -> Any:
            metric = family(f"zproc_{name}", doc, labels=[label])
            for key, value in values.items():
                metric.add_metric([key], value)
            return metric

        yield labelled(core.CounterMetricFamily, "requests", "Requests handled, by kind",
                       "kind", requests["by_kind"])
        yield counter("request_errors", "Requests answered with an error", requests["errors"])
        yield labelled(core.GaugeMetricFamily, "requests_per_second",
                       "Request rate over a window", "window", requests["per_second"])
        yield labelled(core.GaugeMetricFamily, "namespace_keys", "Keys in a namespace",
                       "namespace", {name: ns["keys"] for name, ns in f["namespaces"].items()})
        slowest = max((entry["duration"] for entry in f["slow_log"]), default=0.0)
        yield gauge("slowest_request_seconds", "Slowest request of the last 60 s", slowest)
        events = f["events"]
        yield counter("events_published", "State changes published", events["published"])
        yield counter("replays", "Replays (FETCH) served", events["replays"])
        yield counter("resets", "Clients that fell behind the history", events["resets"])
        yield counter("received_bytes", "Request bytes received", f["bytes"]["in"])
        yield counter("sent_bytes", "Reply and event bytes sent", f["bytes"]["out"])
        yield gauge("resident_memory_bytes", "Resident memory of the server",
                    f["memory"]["rss"])
        persistence = f["persistence"]
        if persistence is not None:
            yield gauge("persist_file_bytes", "Size of the persist file and its WAL",
                        persistence["file_bytes"])
            yield gauge("persist_journal_rows", "Journal rows after the last snapshot",
                        persistence["journal_rows"])
            if persistence["last_snapshot"] is not None:
                yield gauge("persist_last_snapshot_timestamp_seconds",
                            "When this run last took a snapshot", persistence["last_snapshot"])
        swarm = f["swarm"]
        if swarm is not None:
            yield gauge("swarm_workers", "Swarm workers connected", swarm["workers"])
            yield gauge("swarm_chunks_running", "Chunks being run", swarm["running"])
            yield gauge("swarm_chunks_queued", "Chunks waiting for a worker", swarm["queued"])
        coord = f["coordination"]
        yield gauge("coord_primitives", "Locks, semaphores, events, barriers",
                    coord["primitives"])
        yield gauge("coord_held", "Permits held", coord["held"])
        yield gauge("coord_waiters", "Waiting acquires and barrier parties", coord["waiters"])
