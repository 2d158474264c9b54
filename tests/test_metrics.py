"""Prometheus metrics: the collector's families, a failing fetch, /metrics served."""

from __future__ import annotations

import copy
import importlib
import json
import select
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actorpool.frontend.metrics import PoolCollector, make_metrics_server

Labels = frozenset[tuple[str, str]]


def proc(pid: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "instance_id": pid % 100,
        "pid": pid,
        "state": "ready",
        "sessions": 1,
        "concurrency": 1,
        "processed": 17,
        "uptime": 3723.5,
        "idle": 12.0,
        "last_used": 12.0,
        "memory_kb": 2048,
    }
    values.update(changes)
    return values


# status_data's output, written out so every figure is known.
DATA: dict[str, Any] = {
    "max_pool_size": 6,
    "max_per_app": 2,
    "count": 4,
    "active": 3,
    "waiting": 2,
    "clients": 5,
    "server_pid": 999,
    "uptime": 60.0,
    "version": "0.1.0",
    "workers": 4,
    "apps": [
        {
            "app_root": "/srv/blog",
            "count": 2,
            "active": 1,
            "waiting": 0,
            "processes": [
                proc(4101),
                proc(4102, sessions=0, processed=250, uptime=59.5, memory_kb=None),
            ],
        },
        {
            "app_root": "/srv/shop",
            "count": 2,
            "active": 2,
            "waiting": 2,
            "processes": [
                proc(5201, sessions=2, concurrency=4, processed=9, memory_kb=1024),
                proc(0, state="spawning", sessions=0, processed=0, memory_kb=None),
            ],
        },
    ],
}


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name -> labels -> value, with each family's type checked on the way."""
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == ("counter" if "requests" in family.name else "gauge")
        for sample in family.samples:
            labels = frozenset(sample.labels.items())
            series = samples.setdefault(sample.name, {})
            assert labels not in series, f"duplicate series {sample}"
            series[labels] = sample.value
    return samples


def scrape(fetch: Callable[[], Mapping[str, Any]]) -> dict[str, dict[Labels, float]]:
    registry = CollectorRegistry()
    registry.register(PoolCollector(fetch))
    return parse(generate_latest(registry).decode())


def one(samples: dict[str, dict[Labels, float]], name: str) -> float:
    series = samples[name]
    assert list(series) == [frozenset()]
    return series[frozenset()]


def by_app(samples: dict[str, dict[Labels, float]], name: str) -> dict[str, float]:
    return {dict(labels)["app"]: value for labels, value in samples[name].items()}


def by_pid(samples: dict[str, dict[Labels, float]], name: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for labels, value in samples[name].items():
        label = dict(labels)
        app = "blog" if label["app"] == "/srv/blog" else "shop"
        result[f"{app}:{label['pid']}"] = value
    return result


def test_pool_figures() -> None:
    samples = scrape(lambda: DATA)
    assert one(samples, "actorpool_pool_server_up") == 1
    assert one(samples, "actorpool_pool_max_size") == 6
    assert one(samples, "actorpool_pool_processes") == 4
    assert one(samples, "actorpool_pool_active_sessions") == 3
    assert one(samples, "actorpool_pool_waiting") == 2


def test_app_figures() -> None:
    samples = scrape(lambda: DATA)
    processes = by_app(samples, "actorpool_app_processes")
    assert processes == {"/srv/blog": 2, "/srv/shop": 2}
    active = by_app(samples, "actorpool_app_active_sessions")
    assert active == {"/srv/blog": 1, "/srv/shop": 2}
    queue = by_app(samples, "actorpool_app_queue_length")
    assert queue == {"/srv/blog": 0, "/srv/shop": 2}


def test_process_figures() -> None:
    samples = scrape(lambda: DATA)
    # The spawning process (pid 0) has no series; 4102's memory is unknown.
    assert by_pid(samples, "actorpool_process_sessions") == {
        "blog:4101": 1,
        "blog:4102": 0,
        "shop:5201": 2,
    }
    assert by_pid(samples, "actorpool_process_memory_bytes") == {
        "blog:4101": 2048 * 1024,
        "shop:5201": 1024 * 1024,
    }
    assert by_pid(samples, "actorpool_process_uptime_seconds") == {
        "blog:4101": 3723.5,
        "blog:4102": 59.5,
        "shop:5201": 3723.5,
    }
    assert by_pid(samples, "actorpool_process_requests_total") == {
        "blog:4101": 17,
        "blog:4102": 250,
        "shop:5201": 9,
    }


def test_a_pool_with_no_apps_still_has_its_families() -> None:
    data = {**DATA, "apps": [], "count": 0, "active": 0, "waiting": 0}
    samples = scrape(lambda: data)
    assert one(samples, "actorpool_pool_server_up") == 1
    assert one(samples, "actorpool_pool_processes") == 0
    assert "actorpool_app_processes" not in samples


def test_each_scrape_fetches_afresh_and_registering_does_not() -> None:
    calls = []
    data = copy.deepcopy(DATA)

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return data

    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(fetch))
    assert calls == []
    first = parse(generate_latest(registry).decode())
    data["waiting"] = 7
    second = parse(generate_latest(registry).decode())
    assert len(calls) == 2
    assert one(first, "actorpool_pool_waiting") == 2
    assert one(second, "actorpool_pool_waiting") == 7


def refuse() -> Mapping[str, Any]:
    raise ConnectionRefusedError("pool server gone")


def malformed() -> Mapping[str, Any]:
    data = copy.deepcopy(DATA)
    del data["apps"][1]["processes"][0]["sessions"]
    return data


@pytest.mark.parametrize("fetch", [refuse, malformed])
def test_a_failing_fetch_reports_the_server_down(
    fetch: Callable[[], Mapping[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    samples = scrape(fetch)
    assert samples == {"actorpool_pool_server_up": {frozenset(): 0.0}}
    assert "cannot fetch pool status" in caplog.text


def test_importing_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes an import fail, as if the package were missing.
    for name in list(sys.modules):
        if name.split(".")[0] == "prometheus_client":
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "actorpool.frontend.metrics")
    with pytest.raises(ImportError, match=r"pip install 'actorpool\[metrics\]'"):
        importlib.import_module("actorpool.frontend.metrics")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """A metrics server for DATA on a free port, in a thread, stopped at teardown."""
    server = make_metrics_server(socket.create_server(("127.0.0.1", 0)), lambda: DATA)
    # A short poll interval: shutdown() waits for serve_forever's next poll.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
    assert not thread.is_alive()


def test_server_serves_the_metrics(metrics_url: str) -> None:
    status, text = get(metrics_url + "/metrics")
    assert status == 200
    samples = parse(text)
    assert one(samples, "actorpool_pool_server_up") == 1
    assert one(samples, "actorpool_pool_max_size") == 6
    assert by_pid(samples, "actorpool_process_requests_total")["blog:4102"] == 250


@pytest.mark.parametrize("path", ["/", "/metrics/x", "/favicon.ico"])
def test_server_answers_404_off_the_metrics_path(metrics_url: str, path: str) -> None:
    status, text = get(metrics_url + path)
    assert status == 404
    assert "/metrics" in text


SERVE = """
import json, socket, sys
from actorpool.frontend.metrics import serve_metrics

data = json.loads(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
serve_metrics(listener, lambda: data)
"""


def test_serve_metrics_in_a_process_of_its_own() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SERVE, json.dumps(DATA)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            readable, _, _ = select.select([child.stdout], [], [], 30)
            assert readable, "the child never printed its port"
            port = int(child.stdout.readline())
            status, text = get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            samples = parse(text)
            assert one(samples, "actorpool_pool_server_up") == 1
            assert by_app(samples, "actorpool_app_queue_length")["/srv/shop"] == 2
            # Still serving after a scrape: it blocks until the process ends.
            assert child.poll() is None
        finally:
            child.terminate()
            _, errors = child.communicate(timeout=30)
    # No log line per scrape in the metrics process.
    assert errors == ""
