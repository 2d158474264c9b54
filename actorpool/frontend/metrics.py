"""Prometheus metrics of the pool, from the same data as ``actorpool status``.

:class:`PoolCollector` turns :func:`~actorpool.frontend.status.status_data`'s
output, fetched afresh on each scrape, into metric families;
:func:`serve_metrics` serves them at ``/metrics``. Needs the optional
``prometheus-client`` (``pip install 'actorpool[metrics]'``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised with the module hidden
    raise ImportError(
        "actorpool.frontend.metrics needs prometheus-client: "
        "pip install 'actorpool[metrics]'"
    ) from exc

__all__ = ["PoolCollector", "make_metrics_server", "serve_metrics"]

_log = logging.getLogger(__name__)

Fetch = Callable[[], Mapping[str, Any]]
"""Returns :func:`~actorpool.frontend.status.status_data`'s output."""


class PoolCollector(Collector):
    """A custom collector: the pool's figures, fetched afresh on each scrape.

    ``actorpool_pool_server_up`` is 1 when ``fetch`` answered; when it raises
    (or answers nonsense) it is 0 and the only metric, so the scrape itself
    succeeds and an alert can fire on the gauge.
    """

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        # Scrapes run in threads of their own; fetch (a pool connection, say)
        # need not be safe to call from several at once.
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        """Nothing: stops a registry calling :meth:`collect` (a fetch) to describe."""
        return ()

    def collect(self) -> Iterator[Metric]:
        """The metric families for one scrape."""
        up = GaugeMetricFamily(
            "actorpool_pool_server_up",
            "1 if the pool server answered this scrape, else 0.",
        )
        try:
            with self._lock:
                data = self._fetch()
            families = _families(data)
        except Exception:
            _log.warning("actorpool metrics: cannot fetch pool status", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def _families(data: Mapping[str, Any]) -> list[Metric]:
    """Every family but ``up``, built whole first so bad data fails before any."""

    def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"actorpool_{name}", doc, labels=labels)

    pool = [
        ("pool_max_size", "The limit on processes over every app.", "max_pool_size"),
        ("pool_processes", "Processes alive or being spawned.", "count"),
        ("pool_active_sessions", "Sessions open over every app.", "active"),
        ("pool_waiting", "Gets queued over every app.", "waiting"),
    ]
    families: list[Metric] = []
    for name, doc, key in pool:
        family = gauge(name, doc)
        family.add_metric([], data[key])
        families.append(family)

    app_processes = gauge("app_processes", "Processes of the app.", ["app"])
    app_active = gauge("app_active_sessions", "Sessions open on the app.", ["app"])
    app_queue = gauge("app_queue_length", "Gets queued for the app.", ["app"])
    by_process = ["app", "pid"]
    sessions = gauge("process_sessions", "Sessions open on the process.", by_process)
    memory = gauge(
        "process_memory_bytes",
        "Memory of the process: PSS, or RSS where PSS cannot be read.",
        by_process,
    )
    uptime = gauge(
        "process_uptime_seconds", "Seconds since the process's spawn began.", by_process
    )
    requests = CounterMetricFamily(
        "actorpool_process_requests",
        "Sessions the process has been given since it started.",
        labels=by_process,
    )
    for app in data["apps"]:
        root = str(app["app_root"])
        app_processes.add_metric([root], app["count"])
        app_active.add_metric([root], app["active"])
        app_queue.add_metric([root], app["waiting"])
        for process in app["processes"]:
            # pid 0: still being spawned, so no process to speak of yet, and two
            # of them would be two series with the same labels.
            if process["pid"] <= 0:
                continue
            labels = [root, str(process["pid"])]
            sessions.add_metric(labels, process["sessions"])
            uptime.add_metric(labels, process["uptime"])
            requests.add_metric(labels, process["processed"])
            if process.get("memory_kb") is not None:
                memory.add_metric(labels, process["memory_kb"] * 1024)
    families += [app_processes, app_active, app_queue]
    families += [sessions, memory, uptime, requests]
    return families


class _Server(ThreadingMixIn, WSGIServer):
    # A scrape stuck on a slow client must not keep the process from exiting.
    daemon_threads = True

    def __init__(self, listener: socket.socket) -> None:
        # Bound and listening already: the master binds once and holds the
        # socket, so a metrics process that is replaced serves the same port.
        self.address_family = listener.family
        super().__init__(
            listener.getsockname()[:2], _QuietHandler, bind_and_activate=False
        )
        self.socket.close()  # the one TCPServer made, never bound
        self.socket = listener
        self.server_address = listener.getsockname()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing: a line per scrape would drown the log; errors still show."""


def _only_metrics_path(app: Any) -> Any:
    """``app`` at ``/metrics``; 404 elsewhere, so a wrong URL is noticed."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            result: Iterable[bytes] = app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not found: metrics are at /metrics\n"]

    return wsgi


def make_metrics_server(listener: socket.socket, fetch: Fetch) -> WSGIServer:
    """An HTTP server for ``/metrics`` on ``listener``, not serving yet.

    ``listener`` is a TCP socket already bound and listening (as
    :func:`socket.create_server` makes one); the server takes it over and
    closes it when it is closed. Its registry holds only a
    :class:`PoolCollector` on ``fetch``. The caller runs ``serve_forever()``,
    stops it with ``shutdown()`` from another thread and closes it
    (``server_close()``, or use it as a context manager).
    """
    registry = CollectorRegistry()
    registry.register(PoolCollector(fetch))
    server = _Server(listener)
    server.set_app(_only_metrics_path(make_wsgi_app(registry)))
    return server


def serve_metrics(listener: socket.socket, fetch: Fetch) -> None:
    """Serve ``/metrics`` on ``listener`` until the process ends (blocking).

    Meant for a process of its own (the master forks one), so each scrape may
    run in a thread.
    """
    with make_metrics_server(listener, fetch) as server:
        server.serve_forever()
