"""serve_client end to end: a real pool server, real app processes, real HTTP.

Each test gets a :class:`Front`: a TCP listener on 127.0.0.1, an accept
thread that runs :func:`serve_client` on a thread per connection, and a pool
server with a DirectSpawner. Clients are :mod:`http.client`, or raw sockets
for what http.client will not send. Teardown stops the accept loop, sets
``stopping`` and checks every client thread returned without raising.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import http.client
import io
import json
import logging
import math
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h11
import pytest
from test_spawners import me, write_app
from test_wsgi import recv_all, recv_head

from actorpool import ApplicationPool, ApplicationPoolServer
from actorpool._poll import poll_ms
from actorpool.errors import ConfigError
from actorpool.frontend import proxy as proxy_module
from actorpool.frontend.proxy import ProxyOptions, serve_client
from actorpool.frontend.routes import Router, parse_route
from actorpool.spawners import DirectSpawner

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
"""Seconds any single wait in these tests may take before the test fails
(generous: a spawn on a loaded machine can take several seconds)."""

APP = """
import hashlib, json, os, threading

KEYS = [
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "HTTP_HOST",
    "HTTP_X_FORWARDED_FOR", "HTTP_X_ACTORPOOL_SCRIPT_NAME", "HTTP_CONNECTION",
    "HTTP_KEEP_ALIVE", "HTTP_TE", "HTTP_UPGRADE", "HTTP_X_HOP", "HTTP_X_CUSTOM",
    "HTTP_EXPECT", "CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING",
]
BLOCK = bytes(range(256)) * 4096  # 1 MiB

def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/exit":
        os._exit(1)
    if path == "/early":
        return respond(start_response, {"early": True})
    if path == "/upload":
        return upload(environ, start_response)
    if path == "/echo":  # the body back, as it is read
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return iter(lambda: environ["wsgi.input"].read(65536), b"")
    if path == "/hang":
        threading.Event().wait()  # for ever
    if path == "/hang-midway":
        start_response("200 OK", [("Content-Length", "1000000")])
        return hang_midway()
    if path == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (BLOCK for _ in range(int(environ["QUERY_STRING"])))
    if path == "/die-midway":
        start_response("200 OK", [("Content-Length", "1000000")])
        return die_midway()
    seen = {key: environ.get(key) for key in KEYS}
    body = environ["wsgi.input"].read().decode()
    seen.update(root=os.getcwd(), pid=os.getpid(), body=body)
    return respond(start_response, seen)

def upload(environ, start_response):
    digest, size = hashlib.sha256(), 0
    while chunk := environ["wsgi.input"].read(65536):
        digest.update(chunk)
        size += len(chunk)
    return respond(start_response, {"size": size, "sha256": digest.hexdigest()})

def die_midway():
    yield b"x" * 1000
    os._exit(1)

def hang_midway():
    yield b"x" * 1000
    threading.Event().wait()

def respond(start_response, data):
    body = json.dumps(data).encode()
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "keep-alive"),
        ("X-App", "yes"),
    ])
    return [body]
"""

BROKEN = """
def helper():
    raise RuntimeError("the database is on fire")

helper()
"""

BLOCK = bytes(range(256)) * 4096
"""The 1 MiB block the app's ``/big`` repeats."""


class SendallCountingSocket(socket.socket):
    """A socket that counts its ``sendall`` calls (the proxy's way to send)."""

    sendalls = 0

    def sendall(self, data: Any, flags: int = 0, /) -> None:
        self.sendalls += 1
        super().sendall(data, flags)


@dataclasses.dataclass
class Front:
    """A listener, an accept thread and a serve_client thread per connection."""

    pool: ApplicationPool
    router: Router
    options: ProxyOptions
    listener: socket.socket = dataclasses.field(init=False)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    accepts: int = 0
    errors: list[BaseException] = dataclasses.field(default_factory=list)
    _closing: bool = False
    _acceptor: threading.Thread = dataclasses.field(init=False)
    _clients: list[threading.Thread] = dataclasses.field(default_factory=list)
    connections: list[SendallCountingSocket] = dataclasses.field(default_factory=list)
    """The accepted client connections, in order."""

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self._acceptor = threading.Thread(target=self._accept_loop, name="accept")
        self._acceptor.start()

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def connect(self) -> contextlib.closing[http.client.HTTPConnection]:
        """An HTTP client connection, closed at the end of a ``with`` block."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        return contextlib.closing(conn)

    def raw(self) -> socket.socket:
        """A connected raw socket (a context manager)."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def get(
        self, target: str, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One GET on a fresh connection: status, headers and body."""
        with self.connect() as conn:
            conn.request("GET", target, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()

    def environ(
        self, target: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """What the app saw of a GET of `target` (its ``/env`` answer)."""
        status, _, body = self.get(target, headers)
        assert status == 200, body
        seen: dict[str, Any] = json.loads(body)
        return seen

    def join_clients(self) -> None:
        """Check every serve_client thread has returned (or does soon)."""
        for thread in self._clients:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "serve_client did not return"
        assert not self.errors, f"serve_client raised {self.errors!r}"

    def stop(self) -> None:
        """Stop accepting, set ``stopping`` and check every thread ended cleanly."""
        self._closing = True
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT):
            pass  # wakes the acceptor, which sees _closing
        self._acceptor.join(TIMEOUT)
        assert not self._acceptor.is_alive(), "the accept loop did not end"
        self.listener.close()
        self.stopping.set()
        self.join_clients()

    def _accept_loop(self) -> None:
        while True:
            conn, address = self.listener.accept()
            if self._closing:
                conn.close()
                return
            self.accepts += 1
            conn = SendallCountingSocket(conn.family, conn.type, fileno=conn.detach())
            self.connections.append(conn)
            thread = threading.Thread(
                target=self._serve, args=(conn, address[0]), name="client"
            )
            self._clients.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, address: str) -> None:
        with conn:
            try:
                serve_client(
                    conn, address, self.pool, self.router, self.options, self.stopping
                )
            except BaseException as exc:
                self.errors.append(exc)


def read_responses(data: bytes) -> list[tuple[int, http.client.HTTPMessage, bytes]]:
    """Status, headers and body of each response in `data` (all a connection
    sent), for requests pipelined on one connection."""

    class Stream(io.BytesIO):
        def close(self) -> None:
            pass  # reading a response to its end closes it: the next follows

    class Recorded:
        """What HTTPResponse needs of a socket."""

        def __init__(self) -> None:
            self.stream = Stream(data)

        def makefile(self, mode: str) -> Stream:
            return self.stream

    recorded = Recorded()
    responses = []
    while recorded.stream.tell() < len(data):
        response = http.client.HTTPResponse(recorded)  # type: ignore[arg-type]
        response.begin()
        responses.append((response.status, response.headers, response.read()))
    return responses


StartFront = Callable[..., Front]


@pytest.fixture
def front(
    start_server: Callable[..., ApplicationPoolServer],
) -> Iterator[StartFront]:
    """Start fronts: ``front(routes, options, **pool_config)``; stopped after."""
    fronts: list[Front] = []

    def start(
        routes: Sequence[str], options: ProxyOptions | None = None, **config: Any
    ) -> Front:
        config.setdefault("user", me())
        config.setdefault("max_pool_size", 4)
        server = start_server(DirectSpawner(), **config)
        router = Router([parse_route(route) for route in routes])
        started = Front(server.connect(), router, options or ProxyOptions())
        started.start()
        fronts.append(started)
        return started

    yield start
    for started in fronts:
        started.stop()


@pytest.fixture
def app(tmp_path: Path) -> str:
    """The test app's root."""
    return write_app(tmp_path / "app", APP)


# --- routing ---------------------------------------------------------------------


def test_a_request_gets_the_apps_response(front: StartFront, app: str) -> None:
    proxy = front([app])
    status, headers, body = proxy.get("/hello?x=1")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["X-App"] == "yes"
    seen = json.loads(body)
    assert seen["root"] == app
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("", "/hello")
    assert seen["QUERY_STRING"] == "x=1"
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"


def test_a_small_response_leaves_in_one_send(front: StartFront, app: str) -> None:
    """The head and the body the app sent with it go to the client together."""
    proxy = front([app])
    status, _, body = proxy.get("/hello")
    assert status == 200
    assert json.loads(body)["PATH_INFO"] == "/hello"
    proxy.join_clients()
    assert [conn.sendalls for conn in proxy.connections] == [1]


def test_script_name_and_path_info_by_prefix_and_host(
    front: StartFront, tmp_path: Path
) -> None:
    root, blog, site = (write_app(tmp_path / name, APP) for name in "abc")
    proxy = front([root, f"/blog={blog}", f"site.test={site}"])

    seen = proxy.environ("/blog/post%20one/?q=%20")
    assert seen["root"] == blog
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/blog", "/post one/")
    assert seen["QUERY_STRING"] == "q=%20"

    # The bare prefix has an empty PATH_INFO, as PEP 3333 has it: the app
    # can tell it from the prefix and a slash.
    seen = proxy.environ("/blog")
    assert (seen["root"], seen["SCRIPT_NAME"], seen["PATH_INFO"]) == (
        blog,
        "/blog",
        "",
    )
    seen = proxy.environ("/blog?q=1")
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
        "/blog",
        "",
        "q=1",
    )
    seen = proxy.environ("/blog/")
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/blog", "/")

    seen = proxy.environ("/blogroll")
    assert (seen["root"], seen["SCRIPT_NAME"], seen["PATH_INFO"]) == (
        root,
        "",
        "/blogroll",
    )

    seen = proxy.environ("/blog/x", {"Host": "SITE.test:8080"})
    assert (seen["root"], seen["SCRIPT_NAME"], seen["PATH_INFO"]) == (
        site,
        "",
        "/blog/x",
    )
    assert seen["HTTP_HOST"] == "SITE.test:8080"


def test_an_absolute_form_target_is_routed_by_its_host(
    front: StartFront, tmp_path: Path
) -> None:
    root, site = (write_app(tmp_path / name, APP) for name in "ab")
    proxy = front([root, f"site.test/shop={site}"])
    with proxy.connect() as conn:
        conn.request("GET", "http://site.test/shop/cart?n=2", headers={"Host": "x"})
        seen = json.loads(conn.getresponse().read())
    assert seen["root"] == site
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/shop", "/cart")
    assert (seen["QUERY_STRING"], seen["HTTP_HOST"]) == ("n=2", "site.test")


def test_no_route_gives_404_and_the_connection_stays_open(
    front: StartFront, app: str
) -> None:
    proxy = front([f"/blog={app}", f"site.test={app}"])
    with proxy.connect() as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 404
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
        assert b"No application" in response.read()
        conn.request("GET", "/blog/x")
        assert json.loads(conn.getresponse().read())["PATH_INFO"] == "/x"
    assert proxy.accepts == 1
    assert proxy.pool.count == 1


def test_a_client_sent_script_name_is_not_trusted(
    front: StartFront, tmp_path: Path
) -> None:
    root, blog = (write_app(tmp_path / name, APP) for name in "ab")
    proxy = front([root, f"/blog={blog}"])
    forged = {"X-Actorpool-Script-Name": "/forged", "X-Actorpool-Path-Info": "/p"}

    seen = proxy.environ("/x", forged)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("", "/x")
    seen = proxy.environ("/blog/x", forged)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/blog", "/x")
    assert seen["HTTP_X_ACTORPOOL_SCRIPT_NAME"] is None
    seen = proxy.environ("/blog", forged)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/blog", "")


def test_hop_by_hop_headers_are_dropped_both_ways(front: StartFront, app: str) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request(
            "GET",
            "/env",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Upgrade": "websocket",
                "X-Custom": "kept",
                "X-Forwarded-For": "10.1.2.3",
            },
        )
        response = conn.getresponse()
        seen = json.loads(response.read())
        # The app said "Connection: keep-alive" to the proxy, not to us.
        assert response.getheader("Connection") is None
        assert response.getheader("X-App") == "yes"
    assert seen["HTTP_CONNECTION"] == "close"
    for dropped in ("HTTP_X_HOP", "HTTP_KEEP_ALIVE", "HTTP_TE", "HTTP_UPGRADE"):
        assert seen[dropped] is None, dropped
    assert seen["HTTP_X_CUSTOM"] == "kept"
    assert seen["HTTP_X_FORWARDED_FOR"] == "10.1.2.3, 127.0.0.1"


def test_a_connection_header_cannot_remove_framing_headers(
    front: StartFront, app: str
) -> None:
    # Dropping the Content-Length named here would leave the body read by
    # its length unframed for the app: h11 refused to send it, and the
    # client got no answer at all.
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(
            b"POST /env HTTP/1.1\r\nHost: x\r\n"
            b"Connection: content-length, host, transfer-encoding, x-hop\r\n"
            b"X-Hop: 1\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first, second = read_responses(recv_all(sock))
    assert first[0] == 200
    seen = json.loads(first[2])
    assert (seen["body"], seen["CONTENT_LENGTH"]) == ("hello", "5")
    assert (seen["HTTP_HOST"], seen["HTTP_X_HOP"]) == ("x", None)
    assert json.loads(second[2])["PATH_INFO"] == "/after"
    proxy.join_clients()


def test_a_request_with_content_length_and_chunked_closes_the_connection(
    front: StartFront, app: str
) -> None:
    # RFC 9112 section 6.1: a request with both may be a smuggling attempt
    # (a hop that goes by Content-Length would see "0\r\n\r\nGET ..." as
    # body); the server must close after its response, so the request
    # pipelined after it is never served.
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(
            b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        [(status, headers, body)] = read_responses(recv_all(sock))
    assert status == 200
    assert headers["Connection"] == "close"
    assert json.loads(body)["body"] == "hello"
    proxy.join_clients()


def test_an_http_10_request_without_host_is_served(front: StartFront, app: str) -> None:
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        head, _, body = recv_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(body)
    assert seen["PATH_INFO"] == "/old"
    assert seen["HTTP_HOST"] == f"127.0.0.1:{proxy.port}"


# --- keep-alive, bodies, streaming ---------------------------------------------


def test_keep_alive_two_requests_on_one_connection(
    front: StartFront, app: str, wait_until: Callable[..., None]
) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        for path in ("/one", "/two"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert json.loads(response.read())["PATH_INFO"] == path
            assert not response.will_close
            # The session went back to the pool with the response.
            wait_until(lambda: proxy.pool.active == 0, what="the session to close")
    assert proxy.accepts == 1


def test_head_gets_headers_and_no_body(front: StartFront, app: str) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request("HEAD", "/env")
        response = conn.getresponse()
        assert response.status == 200
        assert int(response.getheader("Content-Length", "0")) > 0
        assert response.read() == b""
        conn.request("GET", "/env")
        assert json.loads(conn.getresponse().read())["REQUEST_METHOD"] == "GET"
    assert proxy.accepts == 1


UPLOAD = hashlib.sha256(b"upload").digest() * (3 * 1024 * 1024 // 32 + 17)
"""A little over 3 MiB to post."""


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_posted_body_is_streamed_to_the_app(
    front: StartFront, app: str, chunked: bool
) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        if chunked:
            pieces = (UPLOAD[i : i + 50_000] for i in range(0, len(UPLOAD), 50_000))
            conn.request("POST", "/upload", body=pieces, encode_chunked=True)
        else:
            conn.request("POST", "/upload", body=UPLOAD)
        response = conn.getresponse()
        assert response.status == 200
        got = json.loads(response.read())
        conn.request("GET", "/after")  # the connection is still good
        assert json.loads(conn.getresponse().read())["PATH_INFO"] == "/after"
    assert got == {"size": len(UPLOAD), "sha256": hashlib.sha256(UPLOAD).hexdigest()}


def test_head_to_an_error_page_gets_no_body(front: StartFront, app: str) -> None:
    proxy = front([f"/blog={app}"])
    with proxy.connect() as conn:
        conn.request("HEAD", "/nowhere")
        response = conn.getresponse()
        assert response.status == 404
        assert int(response.getheader("Content-Length", "0")) > 0
        assert response.read() == b""
        conn.request("GET", "/blog/x")
        assert json.loads(conn.getresponse().read())["PATH_INFO"] == "/x"
    assert proxy.accepts == 1


def test_an_early_answer_to_a_big_upload_closes_the_connection(
    front: StartFront, app: str
) -> None:
    # The app answers without reading the body; the bundled worker then
    # drains at most 1 MiB and closes, so the proxy cannot pass on the rest
    # and must not wait for the client to finish: it answers and closes.
    size = 8 * 1024 * 1024
    proxy = front([app])
    with proxy.raw() as sock:

        def upload() -> None:
            head = f"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
            with contextlib.suppress(OSError):  # the proxy closes first
                sock.sendall(head.encode())
                for _ in range(size // len(BLOCK)):
                    sock.sendall(BLOCK)

        sender = threading.Thread(target=upload, name="upload")
        sender.start()
        try:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            assert response.getheader("Connection") == "close"
            assert json.loads(response.read()) == {"early": True}
            response.close()
        finally:
            sender.join(TIMEOUT)
        assert not sender.is_alive(), "the upload never ended"
    proxy.join_clients()


def test_an_app_may_answer_while_it_reads_a_big_upload(
    front: StartFront, app: str
) -> None:
    # The app echoes each piece as it reads it. Were the whole body sent
    # before the response is read, the app would block writing once the
    # socket buffers are full, stop reading, and both would wait for ever.
    blocks = 16
    proxy = front([app])
    with proxy.raw() as sock:

        def upload() -> None:
            size = blocks * len(BLOCK)
            sock.sendall(
                f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                "\r\n".encode()
            )
            for _ in range(blocks):
                sock.sendall(BLOCK)

        sender = threading.Thread(target=upload, name="upload")
        sender.start()
        digest, size = hashlib.sha256(), 0
        try:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            while chunk := response.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
            response.close()
        finally:
            sender.join(TIMEOUT)
        assert not sender.is_alive(), "the upload never ended"
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(BLOCK)
    assert size == blocks * len(BLOCK)
    assert digest.hexdigest() == expected.hexdigest()
    proxy.join_clients()


def test_expect_100_continue_works(front: StartFront, app: str) -> None:
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(
            b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        assert recv_head(sock).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"hello")
        head, _, body = recv_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(body)
    assert seen["body"] == "hello"
    assert seen["HTTP_EXPECT"] is None


def test_a_large_streamed_response_arrives_whole(front: StartFront, app: str) -> None:
    blocks = 50
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request("GET", f"/big?{blocks}")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Transfer-Encoding") == "chunked"
        digest, size = hashlib.sha256(), 0
        while chunk := response.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(BLOCK)
    assert size == blocks * len(BLOCK)
    assert digest.hexdigest() == expected.hexdigest()


# --- pool errors -----------------------------------------------------------------


def test_a_full_queue_gives_503_with_retry_after(
    front: StartFront,
    app: str,
    threads: ThreadPoolExecutor,
    wait_until: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = front([app], ProxyOptions(retry_after=7), max_pool_size=1, max_queue_size=1)
    held = proxy.pool.get(app)
    waiter = threads.submit(proxy.pool.get, app, timeout=TIMEOUT)
    try:
        wait_until(lambda: proxy.pool.statistics().waiting == 1, what="a waiter")
        status, headers, body = proxy.get("/env")
    finally:
        held.close()
        waiter.result(TIMEOUT).close()
    assert status == 503
    assert headers["Retry-After"] == "7"
    assert b"too busy" in body
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.WARNING
    assert app in record.getMessage()


def test_a_get_timeout_gives_504(
    front: StartFront, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = front([app], ProxyOptions(get_timeout=0.3), max_pool_size=1)
    with proxy.pool.get(app):
        status, _, body = proxy.get("/env")
    assert status == 504
    assert b"in time" in body
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.WARNING
    assert app in record.getMessage()
    assert proxy.get("/env")[0] == 200


@pytest.mark.parametrize("development", [False, True], ids=["production", "dev"])
def test_an_app_that_cannot_start_gives_500(
    front: StartFront,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    development: bool,
) -> None:
    broken = write_app(tmp_path / "broken", BROKEN)
    proxy = front([broken], ProxyOptions(development=development))
    status, headers, body = proxy.get("/")
    assert status == 500
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert b"could not be started" in body
    details = [b"RuntimeError: the database is on fire", b"Traceback", b"in helper"]
    for detail in details:
        assert (detail in body) is development, detail
    assert broken.encode() not in body or development
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.ERROR
    assert broken in record.getMessage()
    assert "the database is on fire" in record.getMessage()


def test_a_closed_pool_connection_gives_503(front: StartFront, app: str) -> None:
    proxy = front([app])
    proxy.pool.close()
    status, _, body = proxy.get("/env")
    assert status == 503
    assert b"not running" in body


# --- app failures ----------------------------------------------------------------


def pids(pool: ApplicationPool) -> set[int]:
    """The pids of the pool's processes."""
    apps = pool.statistics().apps
    return {process.pid for app in apps for process in app.processes}


def test_an_app_that_closes_without_answering_gives_502(
    front: StartFront,
    app: str,
    caplog: pytest.LogCaptureFixture,
    wait_until: Callable[..., None],
) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request("GET", "/env")
        first_pid = json.loads(conn.getresponse().read())["pid"]
        conn.request("GET", "/exit")
        response = conn.getresponse()
        assert response.status == 502
        assert b"did not answer" in response.read()
        # Until the pool has seen it die, a get may still pick it.
        wait_until(lambda: first_pid not in pids(proxy.pool), what="the death")
        conn.request("GET", "/env")  # on the same connection, a new process
        assert json.loads(conn.getresponse().read())["pid"] != first_pid
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.ERROR
    assert f"{app} (pid {first_pid})" in record.getMessage()


def test_an_app_that_dies_mid_response_drops_the_client(
    front: StartFront,
    app: str,
    caplog: pytest.LogCaptureFixture,
    wait_until: Callable[..., None],
) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request("GET", "/die-midway")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.ERROR
    assert "after the response began" in record.getMessage()
    match = re.search(r"\(pid (\d+)\)", record.getMessage())
    assert match is not None
    dead = int(match[1])
    wait_until(lambda: dead not in pids(proxy.pool), what="the death")
    assert proxy.get("/env")[0] == 200


def test_an_app_that_hangs_before_answering_gives_504(
    front: StartFront, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = front([app], ProxyOptions(app_timeout=2.0))
    status, _, body = proxy.get("/hang")
    assert status == 504
    assert b"in time" in body
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.ERROR
    assert app in record.getMessage()
    assert "504" in record.getMessage()
    match = re.search(r"\(pid (\d+)\)", record.getMessage())
    assert match is not None
    # The hung process is stopped, not given to the next request.
    assert int(match[1]) not in pids(proxy.pool)
    assert proxy.get("/env")[0] == 200
    proxy.join_clients()


def test_an_app_that_hangs_mid_response_drops_the_client(
    front: StartFront, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = front([app], ProxyOptions(app_timeout=2.0))
    with proxy.connect() as conn:
        conn.request("GET", "/hang-midway")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    [record] = [r for r in caplog.records if r.name == "actorpool.frontend"]
    assert record.levelno == logging.ERROR
    assert "after the response began" in record.getMessage()
    proxy.join_clients()


# --- stopping, timeouts, bad clients ---------------------------------------------


def test_stopping_finishes_the_request_in_progress_with_connection_close(
    front: StartFront, app: str, wait_until: Callable[..., None]
) -> None:
    proxy = front([app])
    with proxy.connect() as conn:
        conn.request("GET", "/warm-up")  # spawn the process before the real test
        assert conn.getresponse().read()
        conn.putrequest("POST", "/env")
        conn.putheader("Content-Length", "5")
        conn.endheaders()
        # The proxy holds a session once it has passed the request head on.
        wait_until(lambda: proxy.pool.active == 1, what="the request to reach the app")
        proxy.stopping.set()
        conn.send(b"hello")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Connection") == "close"
        assert json.loads(response.read())["body"] == "hello"
    proxy.join_clients()


def test_stopping_ends_a_connection_idle_in_keep_alive(
    front: StartFront, app: str
) -> None:
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert json.loads(response.read())["PATH_INFO"] == "/env"
        response.close()
        proxy.stopping.set()
        assert sock.recv(1) == b"", "the idle connection was not closed"
    proxy.join_clients()


def test_a_request_already_sent_when_stopping_is_set_is_served(
    front: StartFront, app: str
) -> None:
    # Straight through serve_client, so the request is surely there first.
    proxy = front([app])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.settimeout(TIMEOUT)
        theirs.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.stopping.set()
        serving = threading.Thread(
            target=serve_client,
            args=(ours, "peer", proxy.pool, proxy.router, proxy.options),
            kwargs={"stopping": proxy.stopping},
        )
        serving.start()
        try:
            response = http.client.HTTPResponse(theirs)
            response.begin()
            assert response.getheader("Connection") == "close"
            assert json.loads(response.read())["HTTP_X_FORWARDED_FOR"] == "peer"
            response.close()
            assert theirs.recv(1) == b""
        finally:
            theirs.shutdown(socket.SHUT_WR)
            serving.join(TIMEOUT)
        assert not serving.is_alive(), "serve_client did not return"


def test_a_slow_client_times_out(front: StartFront, app: str) -> None:
    proxy = front([app], ProxyOptions(client_timeout=0.5))
    with proxy.raw() as sock:
        sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n")  # and never the end
        answer = recv_all(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
    proxy.join_clients()


def test_an_idle_keep_alive_connection_times_out(front: StartFront, app: str) -> None:
    proxy = front([app], ProxyOptions(client_timeout=0.5))
    with proxy.raw() as sock:
        sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200
        response.read()
        response.close()
        assert sock.recv(1) == b"", "the idle connection was not closed"
    proxy.join_clients()


def test_a_client_silent_mid_body_gets_408(front: StartFront, app: str) -> None:
    proxy = front([app], ProxyOptions(client_timeout=0.5))
    with proxy.raw() as sock:
        sock.sendall(b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
        assert recv_all(sock).startswith(b"HTTP/1.1 408 ")
    proxy.join_clients()


def test_garbage_gets_400(front: StartFront, app: str) -> None:
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(b"\x00\x01\x02 this is not HTTP\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 400 ")
    assert proxy.get("/env")[0] == 200


def test_an_absolute_form_target_that_cannot_be_read_gets_400(
    front: StartFront, app: str
) -> None:
    """urlsplit's ValueError escaped serve_client: no answer at all."""
    proxy = front([app])
    with proxy.raw() as sock:
        # The request is well framed, so the connection stays open after the
        # 400 and serves the next one (waiting for EOF here raced the
        # front end's idle timeout against the socket's).
        sock.sendall(b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        first = http.client.HTTPResponse(sock)
        first.begin()
        assert first.status == 400
        first.read()
        assert_the_connection_serves_a_get(sock)


def assert_the_connection_serves_a_get(sock: socket.socket) -> None:
    """A GET on `sock`, after a response read to its end, gets a 200."""
    # Sent only now, so the first response's buffer cannot hold any of it.
    sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 200
    response.read()


@pytest.mark.parametrize(
    "target", [b"example.com:443", b"/env"], ids=["authority-form", "a-path"]
)
def test_connect_gets_501_and_the_connection_carries_on(
    front: StartFront, app: str, target: bytes
) -> None:
    """Forwarded to the app, a CONNECT to a path got the app's 200, which h11
    takes for a switch of protocol: the client got a 502."""
    proxy = front([app])
    with proxy.raw() as sock:
        sock.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        first = http.client.HTTPResponse(sock, method="CONNECT")
        first.begin()
        assert first.status == 501
        first.read()
        assert_the_connection_serves_a_get(sock)


def test_an_oversized_request_head_gets_431(front: StartFront, app: str) -> None:
    proxy = front([app], ProxyOptions(max_header_size=4096))
    with proxy.raw() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 8000)
        assert recv_all(sock).startswith(b"HTTP/1.1 431 ")
    assert proxy.get("/env", {"X-Fits": "f" * 3000})[0] == 200


def test_an_oversized_request_head_that_arrives_whole_gets_431(
    front: StartFront, app: str
) -> None:
    # Pipelined in one send, so each head is complete in the first read: a
    # body bigger than the limit is not part of the head, the second head is.
    proxy = front([app], ProxyOptions(max_header_size=4096))
    with proxy.raw() as sock:
        sock.sendall(
            b"POST /env HTTP/1.1\r\nHost: x\r\nContent-Length: 8000\r\n\r\n"
            + b"a" * 8000
            + b"GET /env HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"b" * 8000
            + b"\r\nConnection: close\r\n\r\n"
        )
        first, second = read_responses(recv_all(sock))
    assert first[0] == 200
    assert json.loads(first[2])["body"] == "a" * 8000
    assert second[0] == 431
    proxy.join_clients()


def test_a_request_head_trickled_in_times_out_as_a_whole(
    front: StartFront, app: str
) -> None:
    # Each byte comes well within client_timeout of the last one, so only
    # a deadline for the whole head ends this; without one the thread is
    # the client's for as long as it likes.
    timeout = 0.5
    proxy = front([app], ProxyOptions(client_timeout=timeout))
    head = b"GET /env HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 10_000
    answer = b""
    with proxy.raw() as sock:
        give_up = time.monotonic() + 10 * timeout
        for byte in head:
            # Waiting for the answer between bytes paces the trickle.
            if select.select([sock], [], [], timeout / 5)[0]:
                answer = recv_all(sock)
                break
            assert time.monotonic() < give_up, "the trickling client was not cut off"
            sock.sendall(bytes([byte]))
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    proxy.join_clients()


def test_the_access_log_has_one_common_log_format_line_per_request(
    front: StartFront, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actorpool.access")
    proxy = front([f"/blog={app}"], ProxyOptions(access_log=True))
    # Each line is written once the response is out: wait for the thread.
    _, _, body = proxy.get('/blog/x?y="1"')
    proxy.join_clients()
    proxy.get("/nowhere")
    proxy.join_clients()
    lines = [r.getMessage() for r in caplog.records if r.name == "actorpool.access"]
    assert len(lines) == 2
    stamp = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]"
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - {stamp} "GET /blog/x\?y=\\x221\\x22 HTTP/1\.1" 200 '
        + str(len(body)),
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - {stamp} "GET /nowhere HTTP/1\.1" 404 \d+', lines[1]
    )


def test_proxy_options_are_checked() -> None:
    for bad in (
        {"client_timeout": 0},
        {"client_timeout": float("inf")},
        {"app_timeout": 0},
        {"max_header_size": 0},
        {"get_timeout": -1},
        {"retry_after": True},
    ):
        with pytest.raises(ConfigError):
            ProxyOptions(**bad)
    assert ProxyOptions(get_timeout=0).get_timeout == 0


# --- the relay loop alone, against socket pairs -----------------------------------


RelayRig = tuple[
    proxy_module._Client, h11.Request, socket.socket, socket.socket, socket.socket
]


@pytest.fixture
def relay_rig() -> Iterator[Callable[[bytes, ProxyOptions], RelayRig]]:
    """Make a client connection holding a request, parsed; give back the far
    ends of the client's and of an app's socket pair, and the proxy's end of
    the app's. Every socket is closed after the test."""
    sockets: list[socket.socket] = []

    def make(request: bytes, options: ProxyOptions) -> RelayRig:
        proxy_side, client_side = socket.socketpair()
        to_app, app_side = socket.socketpair()
        sockets.extend((proxy_side, client_side, to_app, app_side))
        proxy_side.settimeout(options.client_timeout)  # as serve_client does
        client_side.sendall(request)
        client = proxy_module._Client(proxy_side, options, threading.Event())
        parsed = client.next_request()
        assert parsed is not None
        return client, parsed, client_side, app_side, to_app

    yield make
    for sock in sockets:
        sock.close()


def answer(app_side: socket.socket, body: bytes) -> None:
    """Read a request head on ``app_side``, answer it with ``body``."""
    with app_side.makefile("rb") as lines:
        while lines.readline() not in (b"\r\n", b""):
            pass
    app_side.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    app_side.sendall(body)


def test_a_very_long_app_timeout_is_waited_in_pieces(
    relay_rig: Callable[[bytes, ProxyOptions], RelayRig],
) -> None:
    # poll() takes at most 2**31 - 1 ms (24.8 days): a longer timeout raised
    # OverflowError on every request.
    options = ProxyOptions(app_timeout=3e6)
    client, request, client_side, app_side, to_app = relay_rig(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", options
    )
    app = threading.Thread(target=answer, args=(app_side, b"ok"))
    app.start()
    proxy_module._exchange(client, proxy_module._App(to_app), request, 3e6)
    app.join(10)
    assert recv_head(client_side).startswith(b"HTTP/1.1 200")
    assert poll_ms(3e6) == 2**31 - 1
    assert poll_ms(math.inf) == poll_ms(math.nan) == 2**31 - 1


class _SlowClientClock:
    """``time`` for the proxy module, whose clock jumps by ``write_seconds``
    each time the proxy writes to the client: a client that takes that long
    to read each piece, with no test waiting on the real clock."""

    def __init__(self, write_seconds: float) -> None:
        self.write_seconds = write_seconds
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_time_blocked_on_a_slow_client_is_not_the_apps(
    relay_rig: Callable[[bytes, ProxyOptions], RelayRig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app has the whole response ready; each write to the client takes
    # ten times app_timeout. The proxy is stuck sending to the client, not
    # waiting for the app, which must not be taken for hung.
    options = ProxyOptions(app_timeout=1, client_timeout=30)
    client, request, client_side, app_side, to_app = relay_rig(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", options
    )
    clock = _SlowClientClock(write_seconds=10)
    monkeypatch.setattr(proxy_module, "time", clock)
    real_flush = client.flush

    def slow_flush() -> None:
        if client._pending:
            clock.offset += clock.write_seconds
        real_flush()

    monkeypatch.setattr(client, "flush", slow_flush)
    body = b"x" * (1 << 20)  # many writes' worth
    app = threading.Thread(target=answer, args=(app_side, body), daemon=True)
    app.start()
    received = bytearray()

    def reader() -> None:
        while data := client_side.recv(1 << 20):
            received.extend(data)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    proxy_module._exchange(client, proxy_module._App(to_app), request, 1)
    client.conn.shutdown(socket.SHUT_WR)  # the end, for the reader
    reading.join(10)
    assert received.endswith(body)
    assert clock.offset > 10 * options.app_timeout  # the writes were slow


class _ClosedAfterTwoSends:
    """An app socket that takes the request head and first chunk, then has
    answered and gone: its third send fails with EPIPE."""

    def __init__(self, response: bytes) -> None:
        self.real, self.peer = socket.socketpair()
        self.peer.sendall(response)
        self.sends = 0

    def close(self) -> None:
        self.real.close()
        self.peer.close()

    def setblocking(self, flag: bool) -> None:
        self.real.setblocking(flag)

    def fileno(self) -> int:
        return self.real.fileno()

    def send(self, data: bytes) -> int:
        self.sends += 1
        if self.sends >= 3:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.real.recv(size)


def test_an_app_gone_mid_upload_does_not_undo_a_close_the_request_needs(
    relay_rig: Callable[[bytes, ProxyOptions], RelayRig],
) -> None:
    # Content-Length and Transfer-Encoding both: the connection must close
    # after the response (RFC 9112 6.1). The app stopping taking the body
    # once it was all read set keep-alive back to True, and the request
    # smuggled after the body was served.
    options = ProxyOptions()
    client, request, client_side, _, _ = relay_rig(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        options,
    )
    assert client.keep_alive is False
    app_socket = _ClosedAfterTwoSends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    app = proxy_module._App(app_socket)  # type: ignore[arg-type]
    proxy_module._exchange(client, app, request, 5.0)
    app_socket.close()
    assert app_socket.sends == 3  # the case: the app refused a write
    assert client.keep_alive is False
    assert b"connection: close" in recv_head(client_side).lower()


def test_a_client_gone_while_the_app_is_quiet_ends_the_relay_at_once(
    relay_rig: Callable[[bytes, ProxyOptions], RelayRig],
) -> None:
    # The app sends a head and part of the body, then nothing (long polling,
    # say); the client reads that much and closes. poll() reports the
    # hang-up even when only the app is asked about: taking it as data, the
    # relay polled again at once, for ever, and the app's timer never ran.
    options = ProxyOptions(app_timeout=30)
    client, request, client_side, app_side, to_app = relay_rig(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", options
    )
    app_side.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    outcome: list[BaseException | None] = []

    def relay() -> None:
        try:
            proxy_module._exchange(client, proxy_module._App(to_app), request, 30)
            outcome.append(None)
        except BaseException as exc:  # reported to the test
            outcome.append(exc)

    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    recv_head(client_side)
    assert client_side.recv(2) == b"ab"
    client_side.close()
    relaying.join(10)
    assert not relaying.is_alive(), "the relay spins on a client that is gone"
    [error] = outcome
    assert isinstance(error, proxy_module._Abort)


@pytest.mark.parametrize(
    ("target", "app", "path_info"),
    [
        ("/%62log/post", "blog", "/post"),
        ("/%62%6C%6Fg", "blog", ""),
        ("/x/../blog/post", "blog", "/post"),
        ("/blog/./a/../b", "blog", "/b"),
        ("/blog/..", "site", "/"),
        ("/blog%2Fpost", "site", "/blog%2Fpost"),  # an escaped "/" stays one
        ("/a/.hidden", "site", "/a/.hidden"),
        ("/c%2B%2B/admin", "c++", "/admin"),
        ("//blog//post", "blog", "/post"),
        # Decoded to be matched only: "%3B" and ";" may differ to an app.
        ("/c%2B%2B/a%3Bv=1", "c++", "/a%3Bv=1"),
        ("/files/a%3Bv=1%26b", "site", "/files/a%3Bv=1%26b"),
    ],
)
def test_a_path_is_normalized_before_it_is_routed(
    target: str, app: str, path_info: str
) -> None:
    """Escapes of unreserved characters and dot segments (RFC 3986) were
    matched as sent: /%62log/post and /x/../blog/post went to the root's
    app, which then saw /blog/post, a path of another app."""
    router = Router(
        [
            parse_route("/=/srv/site"),
            parse_route("/blog=/srv/blog"),
            parse_route("/c++=/srv/c++"),
        ]
    )
    request = h11.Request(method="GET", target=target, headers=[("Host", "x")])
    parsed = proxy_module._Target.of(request)
    assert parsed is not None
    match = proxy_module._route(router, parsed)
    assert match is not None
    route, _, rest = match
    assert (route.app_root, rest) == (f"/srv/{app}", path_info)
