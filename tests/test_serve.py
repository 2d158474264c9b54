"""``actorpool serve``, ``status`` and ``restart-app`` as a user runs them:
the command in a subprocess, a real HTTP client, real app processes."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_spawners import alive, processes_in, write_app

pytestmark = pytest.mark.slow

ENVIRON_APP = """
import json

def application(environ, start_response):
    keys = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "HTTP_HOST")
    body = json.dumps({key: environ.get(key) for key in keys}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""

BLOCKING_APP = """
import os

def application(environ, start_response):
    if environ["PATH_INFO"] == "/wait":
        with open(os.path.join(os.path.dirname(__file__), "gate")) as gate:
            gate.read()  # a FIFO: returns when the test writes to it
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done\\n"]
"""

STREAMING_APP = """
import hashlib

CHUNK = b"x" * (1 << 20)

def application(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        digest = hashlib.sha256()
        size = 0
        while chunk := environ["wsgi.input"].read(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{size} {digest.hexdigest()}".encode()]
    mib = int(environ["QUERY_STRING"] or "1")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (CHUNK for _ in range(mib))
"""

CRASHING_APP = """
import os

def application(environ, start_response):
    os._exit(1)  # the process dies without answering
"""


class Serve:
    """A running ``actorpool serve``."""

    def __init__(self, process: subprocess.Popen[str], runtime_dir: Path) -> None:
        self.process = process
        self.runtime_dir = runtime_dir
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"http://([\d.]+):(\d+)/ \(master pid (\d+)", first)
        assert match, first
        self.host, self.port = match[1], int(match[2])
        self.master = int(match[3])
        second = process.stdout.readline()
        assert "status socket" in second, second
        self.status_socket = second.rsplit(" ", 1)[1].strip()

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(
        self, path: str, *, host: str | None = None, method: str = "GET"
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = self.connection()
        try:
            headers = {"Host": host} if host else {}
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.msg, response.read()
        finally:
            conn.close()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "actorpool", *args, "--socket", self.status_socket],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def status(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.cli("status", "--json"))
        return data

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Start ``actorpool serve``; stopped (SIGKILL if need be) after the test."""
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        runtime = tmp_path / "run"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "actorpool",
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--runtime-dir",
                os.fspath(runtime),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            running = Serve(process, runtime)
        except BaseException:
            process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()
            raise
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
            try:
                running.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()
        assert running.process.stdout is not None
        running.process.stdout.close()


def test_hello_world(serve: Callable[..., Serve], tmp_path: Path) -> None:
    app = write_app(tmp_path / "hello")
    running = serve(app)
    status, _, body = running.request("/")
    assert status == 200
    assert body.startswith(b"hello pid=")


def test_two_apps_by_prefix_and_by_host(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    blog = write_app(tmp_path / "blog", ENVIRON_APP)
    site = write_app(tmp_path / "site", ENVIRON_APP)
    api = write_app(tmp_path / "api", ENVIRON_APP)
    running = serve(f"/={site}", f"/blog={blog}", f"api.example.com={api}")

    _, _, body = running.request("/blog/posts/1?x=2")
    assert json.loads(body) == {
        "SCRIPT_NAME": "/blog",
        "PATH_INFO": "/posts/1",
        "QUERY_STRING": "x=2",
        "HTTP_HOST": f"{running.host}:{running.port}",
    }
    # The bare prefix and the prefix with a slash are two URLs to the app.
    _, _, body = running.request("/blog?x=3")
    assert json.loads(body)["SCRIPT_NAME"] == "/blog"
    assert json.loads(body)["PATH_INFO"] == ""
    assert json.loads(body)["QUERY_STRING"] == "x=3"
    _, _, body = running.request("/blog/")
    assert json.loads(body)["PATH_INFO"] == "/"
    _, _, body = running.request("/blogroll")  # not under /blog
    assert json.loads(body)["SCRIPT_NAME"] == ""
    assert json.loads(body)["PATH_INFO"] == "/blogroll"
    _, _, body = running.request("/v1/users", host="API.example.com:8080")
    assert json.loads(body)["SCRIPT_NAME"] == ""
    assert json.loads(body)["PATH_INFO"] == "/v1/users"
    pids = {app["app_root"] for app in running.status()["apps"]}  # type: ignore[attr-defined]
    assert pids == {blog, site, api}


def test_keep_alive_reuses_the_client_connection(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "hello"))
    conn = running.connection()
    try:
        sockets = []
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            sockets.append(conn.sock)
        assert sockets[0] is not None
        assert sockets.count(sockets[0]) == 3  # never reconnected
    finally:
        conn.close()


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_100_mib_upload_and_download_stream(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "stream", STREAMING_APP), "--workers", "1")
    mib = 100
    conn = running.connection()
    try:
        conn.request("GET", f"/?{mib}")
        response = conn.getresponse()
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
        assert received == mib << 20

        block = os.urandom(1 << 20)
        digest = hashlib.sha256()
        for _ in range(mib):
            digest.update(block)
        conn.request("POST", "/", body=(block for _ in range(mib)))  # chunked
        response = conn.getresponse()
        assert response.read().decode() == f"{mib << 20} {digest.hexdigest()}"
    finally:
        conn.close()
    status = running.status()
    worker = status["workers"][0]  # type: ignore[index]
    for pid in (running.master, worker, *status_pids(status)):
        assert peak_rss_kb(pid) < 100 * 1024, pid


def status_pids(status: dict[str, object]) -> list[int]:
    return [
        process["pid"]
        for app in status["apps"]  # type: ignore[attr-defined]
        for process in app["processes"]
    ]


def make_gate(app: str) -> Path:
    gate = Path(app, "gate")
    os.mkfifo(gate)
    return gate


def in_thread(function: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def waiting(running: Serve) -> int:
    return int(running.status()["waiting"])  # type: ignore[call-overload]


def test_a_full_queue_is_503_with_retry_after(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    app = write_app(tmp_path / "slow", BLOCKING_APP)
    gate = make_gate(app)
    running = serve(app, "--max-pool-size", "1", "--max-queue-size", "1")
    busy, busy_result = in_thread(lambda: running.request("/wait"))
    wait_for(lambda: int(running.status()["active"]) == 1, "the busy request")  # type: ignore[call-overload]
    queued, queued_result = in_thread(lambda: running.request("/wait"))
    wait_for(lambda: waiting(running) == 1, "the queued request")
    status, headers, _ = running.request("/")
    assert status == 503
    assert int(headers["Retry-After"]) > 0
    # One writer per reader: the queued request runs on the same process,
    # which opens the FIFO again only once the busy one is done.
    for thread in (busy, queued):
        with open(gate, "w") as release:
            release.write("go")
        thread.join(10)
    assert busy_result[0][0] == 200  # type: ignore[index]
    assert queued_result[0][0] == 200  # type: ignore[index]


@pytest.mark.parametrize("environment", ["production", "development"])
def test_a_spawn_error_is_500_with_the_traceback_only_in_development(
    serve: Callable[..., Serve], tmp_path: Path, environment: str
) -> None:
    app = write_app(tmp_path / "broken", "raise RuntimeError('secret wiring')\n")
    running = serve(app, "--environment", environment)
    status, _, body = running.request("/")
    assert status == 500
    shown = b"secret wiring" in body
    assert shown == (environment == "development")


def test_an_app_that_drops_the_connection_is_502(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "crash", CRASHING_APP))
    status, _, _ = running.request("/")
    assert status == 502
    status, _, _ = running.request("/")  # a new process, the same story
    assert status == 502


def test_get_timeout_is_504(serve: Callable[..., Serve], tmp_path: Path) -> None:
    app = write_app(tmp_path / "slow", BLOCKING_APP)
    gate = make_gate(app)
    running = serve(app, "--max-pool-size", "1", "--get-timeout", "0.5")
    # The get timeout covers a spawn, which can take longer on a loaded
    # machine: the process is running before the busy request is sent.
    wait_for(lambda: running.request("/")[0] == 200, "a process to be spawned")
    busy, busy_result = in_thread(lambda: running.request("/wait"))
    wait_for(lambda: int(running.status()["active"]) == 1, "the busy request")  # type: ignore[call-overload]
    assert running.request("/")[0] == 504
    with open(gate, "w") as release:
        release.write("go")
    busy.join(10)
    assert busy_result[0][0] == 200  # type: ignore[index]


def refused(running: Serve) -> bool:
    """Whether a connection to ``running``'s address is refused (or reset
    in the handshake: the listener closed under it)."""
    try:
        socket.create_connection((running.host, running.port), timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:  # queued behind others nobody accepts
        return False
    return False


def test_sigterm_lets_a_slow_request_finish_then_leaves_nothing(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    app = write_app(tmp_path / "slow", BLOCKING_APP)
    gate = make_gate(app)
    running = serve(app, "--spawner", "smart")
    busy, busy_result = in_thread(lambda: running.request("/wait"))
    wait_for(lambda: int(running.status()["active"]) == 1, "the busy request")  # type: ignore[call-overload]
    everything = processes_in(tmp_path)
    running.process.send_signal(signal.SIGTERM)
    # A new client is refused at once, not queued on a socket that nobody
    # accepts from any more (then reset when serve exits).
    wait_for(lambda: refused(running), "new clients refused")
    with open(gate, "w") as release:
        release.write("go")
    busy.join(10)
    assert busy_result[0][0] == 200  # type: ignore[index]
    assert running.process.wait(timeout=30) == 0
    assert everything
    wait_for(lambda: not processes_in(tmp_path), "the app processes to go", 2)
    assert not os.path.exists(running.status_socket)


def test_sighup_restarts_every_app(serve: Callable[..., Serve], tmp_path: Path) -> None:
    app = write_app(tmp_path / "hello")
    running = serve(app)
    assert running.request("/")[2].startswith(b"hello ")
    write_app(
        tmp_path / "hello",
        (tmp_path / "hello" / "passenger_wsgi.py")
        .read_text()
        .replace('"hello"', '"hi again"'),
    )
    os.kill(running.master, signal.SIGHUP)
    wait_for(
        lambda: running.request("/")[2].startswith(b"hi again "),
        "the new code to answer",
    )


def test_a_dead_worker_is_replaced(serve: Callable[..., Serve], tmp_path: Path) -> None:
    running = serve(write_app(tmp_path / "hello"), "--workers", "2")
    before = set(running.status()["workers"])  # type: ignore[call-overload]
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(set(running.status()["workers"]) - before) == 1,  # type: ignore[call-overload]
        "a new worker",
    )
    assert not alive(victim)
    assert running.request("/")[0] == 200


def test_status_text_json_and_restart_app(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    app = write_app(tmp_path / "hello")
    running = serve(app)
    running.request("/")
    data = running.status()
    assert data["count"] == 1
    (process,) = data["apps"][0]["processes"]  # type: ignore[index]
    assert process["processed"] == 1
    assert process["memory_kb"] > 0
    text = running.cli("status")
    assert str(process["pid"]) in text
    assert app in text

    assert running.cli("restart-app", app).strip() == f"restarted {app}"
    with pytest.raises(subprocess.CalledProcessError) as unknown:
        running.cli("restart-app", app + "x")  # a typo is not a success
    assert f"{app}x is not an app this serve runs" in unknown.value.stderr
    running.request("/")
    (fresh,) = running.status()["apps"][0]["processes"]  # type: ignore[index]
    assert fresh["pid"] != process["pid"]


def test_status_finds_the_only_running_serve(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "hello"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "actorpool",
            "status",
            "--json",
            "--runtime-dir",
            os.fspath(running.runtime_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out)["server_pid"] > 0
    mode = os.stat(running.runtime_dir).st_mode & 0o777
    assert mode == 0o700
    assert os.stat(running.status_socket).st_mode & 0o777 == 0o600


def test_metrics_are_scraped(serve: Callable[..., Serve], tmp_path: Path) -> None:
    # Port 0: the master binds it once, says which port it got, and holds it
    # (a port picked here and bound later by the serve could be taken first).
    running = serve(write_app(tmp_path / "hello"), "--metrics-bind", "127.0.0.1:0")
    assert running.process.stdout is not None
    line = running.process.stdout.readline()
    match = re.fullmatch(
        r"actorpool serve: metrics (http://127\.0\.0\.1:\d+/metrics)\n", line
    )
    assert match, line
    url = match[1]
    running.request("/")

    def scrape() -> str:
        try:
            with urllib.request.urlopen(url, timeout=10) as page:
                return str(page.read().decode())
        except OSError:
            return ""

    wait_for(lambda: "actorpool_pool_processes 1.0" in scrape(), "the metrics")
    # A metrics process that dies is replaced on the same socket.
    status = running.status()
    children = Path(f"/proc/{running.master}/task/{running.master}/children")
    metrics_pids = set(map(int, children.read_text().split())) - {
        status["server_pid"],
        *status["workers"],  # type: ignore[misc]
    }
    assert len(metrics_pids) == 1, metrics_pids
    os.kill(metrics_pids.pop(), signal.SIGKILL)
    wait_for(lambda: "actorpool_pool_processes 1.0" in scrape(), "a new one")


def test_a_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actorpool", "serve", "--workers", "0", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers must be an integer >= 1" in result.stderr


def test_settings_come_from_a_config_file(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    write_app(tmp_path / "apps" / "hello")
    config = tmp_path / "apps" / "actorpool-serve.toml"
    config.write_text('apps = ["/hi=hello"]\nmax_pool_size = 3\nworkers = 1\n')
    running = serve("--config", os.fspath(config))
    assert running.request("/hi/")[0] == 200
    data = running.status()
    assert data["max_pool_size"] == 3
    assert len(data["workers"]) == 1  # type: ignore[arg-type]


def test_the_pool_server_dying_stops_serve_with_status_1(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "hello"))
    assert running.request("/")[0] == 200
    server_pid = int(running.status()["server_pid"])  # type: ignore[call-overload]
    os.kill(server_pid, signal.SIGKILL)
    assert running.process.wait(timeout=30) == 1
    wait_for(lambda: not processes_in(tmp_path), "the app processes to go", 2)


def status_reply(sock: socket.socket, deadline: float) -> bytes:
    """The line the status socket answers, read by ``deadline``.

    Up to its newline, not to EOF: a byte the master left unread makes its
    close a reset, which comes after the reply.
    """
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        data += chunk
        if not chunk or data.endswith(b"\n"):
            return data
    raise AssertionError(f"no full reply by the deadline: {data!r}")


def test_a_bad_or_slow_status_client_costs_the_master_nothing(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    running = serve(write_app(tmp_path / "hello"))
    # JSON nested deeper than the parser's stack: before, the master died of
    # the RecursionError and left its workers running.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(running.status_socket)
        sock.sendall(b"[" * 60000 + b"\n")
        reply = json.loads(status_reply(sock, time.monotonic() + 30))
    assert reply["error"].startswith("bad request")
    # A byte now and then: before, each byte gave the client its 5 s again,
    # and the master answered nobody else (nor signals) for as long as it
    # went on. Now the whole request has a deadline.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(running.status_socket)
        give_up = time.monotonic() + 30
        answered = False
        while not answered and time.monotonic() < give_up:
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break  # the master answered and closed as this byte went
            # Waits for the master's answer, and paces the bytes.
            answered = bool(select.select([sock], [], [], 0.5)[0])
        assert time.monotonic() < give_up, "the master still reads the trickle"
        assert b"bad request" in status_reply(sock, time.monotonic() + 30)
    assert running.status()["count"] == 0
    assert running.request("/")[0] == 200


def test_a_port_in_use_is_a_clear_error(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """SO_REUSEPORT let a second serve (of the same user) bind the port of a
    running one and take half its clients."""
    app = write_app(tmp_path / "hello")
    running = serve(app)
    for option in ("--bind", "--metrics-bind"):
        second = subprocess.Popen(
            [
                *(sys.executable, "-m", "actorpool", "serve", app),
                *("--runtime-dir", os.fspath(tmp_path / "run2")),
                *("--bind", "127.0.0.1:0", option, f"127.0.0.1:{running.port}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, err = second.communicate(timeout=30)
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate()
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{running.port}" in err
        assert "Traceback" not in err


def test_an_unusable_runtime_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "actorpool", "serve", "--bind", "127.0.0.1:0"),
            *("--runtime-dir", "/proc/actorpool", write_app(tmp_path / "hello")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot use /proc/actorpool as the runtime directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_serve_binds_an_ipv6_address(tmp_path: Path) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "actorpool", "serve", "--bind", "[::1]:0"),
            *("--runtime-dir", os.fspath(tmp_path / "run")),
            write_app(tmp_path / "hello"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"http://\[::1\]:(\d+)/", first)
        assert match, first
        conn = http.client.HTTPConnection("::1", int(match[1]), timeout=30)
        try:
            conn.request("GET", "/")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stdout is not None
        process.stdout.close()
