"""The worker's HTTP side: real Unix sockets, a real HTTP client, a real thread.

Each test runs :func:`serve_forever` on a thread with a listener in
``tmp_path`` and a lifeline pipe; teardown cuts the lifeline and checks the
thread ends. Clients are :mod:`http.client` over AF_UNIX, or raw sockets for
what http.client will not send.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import http.client
import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actorpool.frontend.proxy import PATH_INFO_HEADER, SCRIPT_NAME_HEADER
from actorpool.spawners import wsgi
from actorpool.spawners.wsgi import (
    StartResponse,
    WSGIApp,
    serve_connection,
    serve_forever,
)

TIMEOUT = 10.0
"""Seconds any single wait in these tests may take before the test fails."""

Environ = dict[str, Any]


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 client connection to a Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class CountingListener(socket.socket):
    """A listening socket that counts the connections it accepted."""

    def __init__(self) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.accepts = 0

    def accept(self) -> tuple[socket.socket, Any]:
        conn, address = super().accept()
        self.accepts += 1
        return conn, address


@dataclasses.dataclass
class Server:
    """A serve_forever thread and what it takes to talk to it and stop it."""

    path: str
    listener: CountingListener
    lifeline_r: int
    lifeline_w: int | None
    thread: threading.Thread = dataclasses.field(init=False)
    errors: list[BaseException] = dataclasses.field(default_factory=list)

    def start(self, app: WSGIApp) -> None:
        def run() -> None:
            try:
                serve_forever(
                    app,
                    self.listener,
                    lifeline=self.lifeline_r,
                    server_name="worker.test",
                )
            except BaseException as exc:
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name="serve_forever", daemon=True)
        self.thread.start()

    def connect(self) -> contextlib.closing[UnixHTTPConnection]:
        """An HTTP client connection, closed at the end of a ``with`` block."""
        return contextlib.closing(UnixHTTPConnection(self.path))

    def raw(self) -> socket.socket:
        """A connected raw socket (a context manager)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        """Cut the lifeline and check serve_forever returns."""
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)
            self.lifeline_w = None
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve_forever did not return"
        assert not self.errors, f"serve_forever raised {self.errors!r}"

    def get(self, target: str = "/") -> tuple[int, bytes]:
        """One GET on a fresh connection: status and body."""
        with self.connect() as conn:
            conn.request("GET", target)
            response = conn.getresponse()
            return response.status, response.read()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[WSGIApp], Server]]:
    """Start serve_forever on a thread; it is stopped and checked after the test."""
    servers: list[Server] = []

    def start(app: WSGIApp) -> Server:
        path = os.fspath(tmp_path / f"w{len(servers)}.sock")
        listener = CountingListener()
        listener.bind(path)
        listener.listen()
        server = Server(path, listener, *os.pipe())
        servers.append(server)
        server.start(app)
        return server

    yield start
    for server in servers:
        try:
            server.stop()
        finally:
            server.listener.close()
            os.close(server.lifeline_r)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_head(sock: socket.socket) -> bytes:
    """Bytes up to and including the first blank line (one response head)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {data!r}"
        data += byte
    return data


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes (the server may send them in pieces)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def hello_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    body = b"hello " + environ["PATH_INFO"].encode("latin-1")
    start_response(
        "201 Created",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]


def test_get_returns_status_headers_and_body(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.connect() as conn:
        conn.request("GET", "/there")
        response = conn.getresponse()
        assert (response.status, response.reason) == (201, "Created")
        assert response.getheader("Content-Type") == "text/plain"
        assert response.getheader("Content-Length") == "12"
        assert response.getheader("Transfer-Encoding") is None
        assert response.read() == b"hello /there"


def recording_app(seen: list[Environ]) -> WSGIApp:
    """An app that keeps each environ (and the body it read) in `seen`."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        seen.append({**environ, "body": environ["wsgi.input"].read()})
        start_response("200 OK", [("Content-Length", "0")])
        return []

    return app


def test_environ_as_seen_by_the_app(serve: Callable[[WSGIApp], Server]) -> None:
    seen: list[Environ] = []
    server = serve(recording_app(seen))
    with server.connect() as conn:
        conn.putrequest("POST", "/a%20b/caf%C3%A9%2Fx?q=1&r=%20", skip_host=True)
        conn.putheader("Host", "example.com:8080")
        conn.putheader("Content-Type", "text/plain")
        conn.putheader("Content-Length", "4")
        conn.putheader("X-Custom-Thing", "v")
        conn.putheader("X-Dup", "1")
        conn.putheader("X-Dup", "2")
        conn.putheader("X_Custom_Thing", "forged")
        conn.endheaders(b"data")
        assert conn.getresponse().read() == b""

    [environ] = seen
    expected = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/a b/café/x".encode().decode("latin-1"),
        "QUERY_STRING": "q=1&r=%20",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "4",
        "SERVER_NAME": "example.com",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "",
        "HTTP_HOST": "example.com:8080",
        "HTTP_X_CUSTOM_THING": "v",
        "HTTP_X_DUP": "1,2",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "body": b"data",
    }
    assert {key: environ.get(key) for key in expected} == expected
    assert "HTTP_CONTENT_LENGTH" not in environ
    assert "HTTP_CONTENT_TYPE" not in environ


def test_script_name_header_becomes_script_name(
    serve: Callable[[WSGIApp], Server],
) -> None:
    seen: list[Environ] = []
    server = serve(recording_app(seen))
    with server.connect() as conn:
        conn.request(
            "GET", "/rest%21?q=1", headers={"X-Actorpool-Script-Name": "/my%20blog"}
        )
        assert conn.getresponse().read() == b""
        conn.request("GET", "/plain")
        assert conn.getresponse().read() == b""
        conn.request(  # the bare prefix: the target is "/", PATH_INFO is ""
            "GET",
            "/?q=2",
            headers={"X-Actorpool-Script-Name": "/blog", "X-Actorpool-Path-Info": ""},
        )
        assert conn.getresponse().read() == b""

    mounted, plain, bare = seen
    assert (mounted["SCRIPT_NAME"], mounted["PATH_INFO"]) == ("/my blog", "/rest!")
    assert mounted["QUERY_STRING"] == "q=1"
    assert "HTTP_X_ACTORPOOL_SCRIPT_NAME" not in mounted
    assert (plain["SCRIPT_NAME"], plain["PATH_INFO"]) == ("", "/plain")
    assert (bare["SCRIPT_NAME"], bare["PATH_INFO"]) == ("/blog", "")
    assert bare["QUERY_STRING"] == "q=2"
    assert "HTTP_X_ACTORPOOL_PATH_INFO" not in bare


def test_the_worker_reads_the_headers_the_proxy_sets() -> None:
    for header, variable in (
        (SCRIPT_NAME_HEADER, wsgi._SCRIPT_NAME_VARIABLE),
        (PATH_INFO_HEADER, wsgi._PATH_INFO_VARIABLE),
    ):
        assert "HTTP_" + header.upper().replace("-", "_") == variable


BODY = b"first line\nsecond line\n" + b"x" * 200_000 + b"\n\nlast, unterminated"


def reading_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Reads the body the way PATH_INFO names and returns the pieces' repr."""
    body = environ["wsgi.input"]
    how = environ["PATH_INFO"]
    if how == "/read":
        pieces = [body.read()]
    elif how == "/read-n":
        pieces = list(iter(lambda: body.read(1000), b""))
    elif how == "/readline":
        pieces = list(iter(body.readline, b""))
    elif how == "/readlines":
        pieces = body.readlines()
    else:
        pieces = list(body)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [repr(pieces).encode()]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("how", ["read", "read-n", "readline", "readlines", "iter"])
def test_request_body_through_wsgi_input(
    serve: Callable[[WSGIApp], Server], how: str, chunked: bool
) -> None:
    server = serve(reading_app)
    with server.connect() as conn:
        if chunked:
            pieces = [BODY[i : i + 7000] for i in range(0, len(BODY), 7000)]
            conn.request("POST", f"/{how}", body=iter(pieces), encode_chunked=True)
        else:
            conn.request("POST", f"/{how}", body=BODY)
        response = conn.getresponse()
        assert response.status == 200
        got = ast.literal_eval(response.read().decode())

    assert b"".join(got) == BODY
    if how == "read-n":
        assert max(map(len, got)) <= 1000
    elif how != "read":
        assert got == BODY.splitlines(keepends=True)


def test_streaming_response_arrives_whole_in_order_chunked(
    serve: Callable[[WSGIApp], Server],
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(2000):
            yield f"chunk {i:05d}\n".encode()

    server = serve(app)
    with server.connect() as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.getheader("Content-Length") is None
        body = response.read()
    assert body == b"".join(f"chunk {i:05d}\n".encode() for i in range(2000))


def test_response_chunks_are_sent_as_the_app_yields_them(
    serve: Callable[[WSGIApp], Server],
) -> None:
    # The app cannot produce its second chunk before the client has read the
    # first, so a server that buffers the response never completes it.
    first_read = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        assert first_read.wait(TIMEOUT), "the client never got the first chunk"
        yield b"second"

    server = serve(app)
    with server.connect() as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.read(5) == b"first"
        first_read.set()
        assert response.read() == b"second"


def test_keep_alive_serves_two_requests_on_one_accepted_socket(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.connect() as conn:
        for path in ("/one", "/two"):
            conn.request("GET", path)
            assert conn.getresponse().read() == b"hello " + path.encode()
    assert server.listener.accepts == 1


def test_unread_request_body_is_drained_and_keep_alive_goes_on(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.connect() as conn:
        conn.request("POST", "/ignored", body=b"z" * 100_000)
        assert conn.getresponse().read() == b"hello /ignored"
        conn.request("GET", "/next")
        assert conn.getresponse().read() == b"hello /next"
    assert server.listener.accepts == 1


def test_http_10_request_gets_a_close_delimited_response(
    serve: Callable[[WSGIApp], Server],
) -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        seen.append(environ)
        start_response("200 OK", [])
        yield b"old "
        yield b"school"

    server = serve(app)
    with server.raw() as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        head, _, body = recv_all(sock).partition(b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"old school"
    [environ] = seen
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("worker.test", "80")


def test_head_response_has_headers_but_no_body(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.connect() as conn:
        conn.request("HEAD", "/x")
        response = conn.getresponse()
        assert response.getheader("Content-Length") == "8"
        assert response.read() == b""
        conn.request("GET", "/x")
        assert conn.getresponse().read() == b"hello /x"
    assert server.listener.accepts == 1


def raise_early(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    raise ValueError("broken before start_response")


def bad_status(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("OK", [])
    return [b"never sent"]


def no_start_response(environ: Environ, start_response: StartResponse) -> list[bytes]:
    return []


def str_body(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [])
    return ["text, not bytes"]  # type: ignore[list-item]


@pytest.mark.parametrize("app", [raise_early, bad_status, no_start_response, str_body])
def test_app_failing_before_the_response_gives_500(
    serve: Callable[[WSGIApp], Server], app: WSGIApp, caplog: pytest.LogCaptureFixture
) -> None:
    def dispatch(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        chosen = hello_app if environ["PATH_INFO"] == "/ok" else app
        return chosen(environ, start_response)

    server = serve(dispatch)
    assert server.get("/fail") == (500, b"Internal Server Error")
    [record] = [r for r in caplog.records if r.name == "actorpool.worker"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert server.get("/ok") == (201, b"hello /ok")


class ClosingBody:
    """A response iterable with close(), as PEP 3333 allows."""

    def __init__(self, chunks: Iterable[bytes], fail: bool = False) -> None:
        self.chunks = chunks
        self.fail = fail
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail:
            raise RuntimeError("broken mid-stream")

    def close(self) -> None:
        self.closed.set()


def test_iterable_close_is_called(serve: Callable[[WSGIApp], Server]) -> None:
    bodies: list[ClosingBody] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        bodies.append(ClosingBody([b"a", b"b"]))
        return bodies[-1]

    server = serve(app)
    assert server.get() == (200, b"ab")
    assert bodies[0].closed.wait(TIMEOUT)


def test_app_raising_mid_stream_drops_the_connection(
    serve: Callable[[WSGIApp], Server], caplog: pytest.LogCaptureFixture
) -> None:
    bodies: list[ClosingBody] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        bodies.append(ClosingBody([b"partial"], fail="fail" in environ["PATH_INFO"]))
        return bodies[-1]

    server = serve(app)
    with server.connect() as conn:
        conn.request("GET", "/fail")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    assert bodies[0].closed.wait(TIMEOUT)
    assert any(r.exc_info for r in caplog.records if r.name == "actorpool.worker")
    assert server.get("/fine") == (200, b"partial")


def test_write_callable_from_start_response(serve: Callable[[WSGIApp], Server]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [])
        write(b"written ")
        write(b"")
        write(b"then ")
        return [b"returned"]

    server = serve(app)
    assert server.get() == (200, b"written then returned")


def test_exc_info_replaces_headers_not_yet_sent(
    serve: Callable[[WSGIApp], Server],
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("X-First", "yes")])
        try:
            raise KeyError("late trouble")
        except KeyError:
            start_response("503 Service Unavailable", [], sys.exc_info())
        return [b"sorry"]

    server = serve(app)
    with server.connect() as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 503
        assert response.getheader("X-First") is None
        assert response.read() == b"sorry"


def test_exc_info_after_headers_were_sent_drops_the_connection(
    serve: Callable[[WSGIApp], Server],
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [])
        write(b"too late")
        try:
            raise KeyError("late trouble")
        except KeyError:
            start_response("500 Oops", [], sys.exc_info())
        return [b"not sent"]

    server = serve(app)
    with server.connect() as conn:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()


def test_garbage_gets_400_and_the_server_keeps_serving(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.raw() as sock:
        sock.sendall(b"\x00\x01\x02 this is not HTTP\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 400 ")
    assert server.get("/after") == (201, b"hello /after")


def test_oversized_request_head_gets_431(serve: Callable[[WSGIApp], Server]) -> None:
    server = serve(hello_app)
    with server.raw() as sock:
        big = b"b" * (wsgi._MAX_HEAD_SIZE + 40_000)  # and never complete
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + big)
        assert recv_all(sock).startswith(b"HTTP/1.1 431 ")
    assert server.get("/after") == (201, b"hello /after")


def test_a_head_the_front_end_forwards_is_taken_and_a_huge_one_refused(
    serve: Callable[[WSGIApp], Server],
) -> None:
    """The worker's limit guards its memory; the front end's
    --max-header-size is the policy. A 16 KiB limit here refused heads the
    front end had accepted (and added headers to)."""
    server = serve(hello_app)
    with server.raw() as sock:
        pad = b"p" * 40_000
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\n\r\n")
        assert recv_head(sock).startswith(b"HTTP/1.1 201 ")
    with server.raw() as sock:
        big = b"b" * (wsgi._MAX_HEAD_SIZE + 20_000)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 431 ")
    assert server.get("/after") == (201, b"hello /after")


def body_on(status: str, length: int | None = None) -> WSGIApp:
    """An app that answers ``status`` with a body of ten bytes, declaring
    ``length`` bytes if given."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        headers = [] if length is None else [("Content-Length", str(length))]
        start_response(status, headers)
        return [b"0123456789"]

    return app


@pytest.mark.parametrize(
    ("app", "status", "body"),
    [
        (body_on("204 No Content"), 204, b""),
        (body_on("304 Not Modified"), 304, b""),
        (body_on("200 OK", length=4), 200, b"0123"),
    ],
    ids=["204", "304", "longer-than-content-length"],
)
def test_a_body_the_response_cannot_have_is_cut(
    serve: Callable[[WSGIApp], Server], app: WSGIApp, status: int, body: bytes
) -> None:
    """A 204 or 304 has no body, and a body never goes past Content-Length
    (PEP 3333). h11 refused such a body with the head not yet sent: the
    client got nothing at all."""
    server = serve(app)
    with server.connect() as conn:
        for _ in range(2):  # and the connection goes on
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, body)


def test_an_app_failing_on_head_gets_500_and_keep_alive(
    serve: Callable[[WSGIApp], Server],
) -> None:
    """The 500 page went out with its body for HEAD too; h11 refused it and
    the connection was lost."""
    server = serve(raise_early)
    with server.connect() as conn:
        for _ in range(2):
            conn.request("HEAD", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (500, b"")


def test_an_absolute_form_target_gives_its_path(
    serve: Callable[[WSGIApp], Server],
) -> None:
    """RFC 9112 section 3.2.2: a server takes the absolute form too; its
    scheme and host ended up in PATH_INFO."""
    seen: list[Environ] = []
    server = serve(recording_app(seen))
    with server.raw() as sock:
        sock.sendall(
            b"GET http://example.com/a/b?q=1 HTTP/1.1\r\nHost: example.com\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert recv_all(sock).startswith(b"HTTP/1.1 200 ")
    assert (seen[0]["PATH_INFO"], seen[0]["QUERY_STRING"]) == ("/a/b", "q=1")
    # One urlsplit refuses is the client's error, not the app's.
    with server.raw() as sock:
        sock.sendall(b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 400 ")
    assert len(seen) == 1


def test_client_disconnecting_mid_body_is_quiet(
    serve: Callable[[WSGIApp], Server], caplog: pytest.LogCaptureFixture
) -> None:
    reading = threading.Event()
    errors: queue.Queue[Exception] = queue.Queue()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            reading.set()
            try:
                environ["wsgi.input"].read()
            except Exception as exc:
                errors.put(exc)
                raise
        return hello_app(environ, start_response)

    server = serve(app)
    with server.raw() as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n12345")
        assert reading.wait(TIMEOUT)
    assert isinstance(errors.get(timeout=TIMEOUT), ConnectionError)
    assert server.get("/after") == (201, b"hello /after")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_client_disconnecting_mid_response_is_quiet(
    serve: Callable[[WSGIApp], Server], caplog: pytest.LogCaptureFixture
) -> None:
    bodies: list[ClosingBody] = []

    def endless() -> Iterator[bytes]:
        while True:
            yield b"e" * 65536

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] != "/endless":
            return hello_app(environ, start_response)
        start_response("200 OK", [])
        bodies.append(ClosingBody(endless()))
        return bodies[-1]

    server = serve(app)
    with server.raw() as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_head(sock).startswith(b"HTTP/1.1 200 ")
    assert server.get("/after") == (201, b"hello /after")
    assert bodies[0].closed.wait(TIMEOUT)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def echo_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    body = environ["wsgi.input"].read() if "echo" in environ["PATH_INFO"] else b"-"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def test_expect_100_continue_is_answered_when_the_app_reads(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(echo_app)
    with server.raw() as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        assert recv_head(sock).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"hello")
        head, _, body = recv_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"hello"


def test_expect_100_continue_unread_body_closes_the_connection(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(echo_app)
    with server.raw() as sock:
        sock.sendall(
            b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        # recv_all returns only if the server closes the connection.
        head, _, body = recv_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert body == b"-"


def test_lifeline_stops_serving_while_idle_in_keep_alive(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    with server.connect() as conn:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"hello /"
        server.stop()
        assert conn.sock is not None
        assert conn.sock.recv(1) == b"", "the idle connection was not closed"
    assert server.listener.accepts == 1


def test_lifeline_stops_serving_while_waiting_in_accept(
    serve: Callable[[WSGIApp], Server],
) -> None:
    server = serve(hello_app)
    assert server.get() == (201, b"hello /")
    server.stop()
    assert server.listener.accepts == 1


def test_lifeline_stops_serving_while_waiting_for_a_request_body(
    serve: Callable[[WSGIApp], Server],
) -> None:
    reading = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        reading.set()
        return echo_app(environ, start_response)

    server = serve(app)
    with server.raw() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n1")
        assert reading.wait(TIMEOUT)
        server.stop()


@pytest.mark.parametrize("ending", ["client closes", "lifeline fires"])
def test_serve_connection_returns_false_only_when_the_lifeline_fired(
    ending: str,
) -> None:
    results: queue.Queue[bool] = queue.Queue()
    lifeline_r, lifeline_w = os.pipe()
    server_sock, client_sock = socket.socketpair()
    with server_sock, client_sock:
        thread = threading.Thread(
            target=lambda: results.put(
                serve_connection(hello_app, server_sock, lifeline=lifeline_r)
            )
        )
        thread.start()
        try:
            client_sock.settimeout(TIMEOUT)
            client_sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_head(client_sock).startswith(b"HTTP/1.1 201 ")
            assert recv_exactly(client_sock, 8) == b"hello /x"
            if ending == "client closes":
                client_sock.shutdown(socket.SHUT_WR)
            else:
                os.close(lifeline_w)
            thread.join(TIMEOUT)
            assert not thread.is_alive()
            assert results.get_nowait() is (ending == "client closes")
        finally:
            with contextlib.suppress(OSError):
                os.close(lifeline_w)
            thread.join(TIMEOUT)
            os.close(lifeline_r)


class SendCountingSocket(socket.socket):
    """A socket that counts its ``send`` calls (the worker sends with ``send``)."""

    sends = 0

    def send(self, data: Any, flags: int = 0, /) -> int:
        self.sends += 1
        return super().send(data, flags)


def closing_request_over(
    server_sock: socket.socket, client_sock: socket.socket
) -> bytes:
    """Serve one ``Connection: close`` GET on `server_sock`; the whole response.

    Checks that serving ends while the client still holds its side open.
    """
    thread = threading.Thread(
        target=serve_connection, args=(hello_app, server_sock), daemon=True
    )
    thread.start()
    client_sock.settimeout(TIMEOUT)
    client_sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = recv_all(client_sock)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    return response


def test_a_small_response_leaves_in_one_send() -> None:
    """Head and body in one system call: one wake-up of the reader, not two."""
    plain, client_sock = socket.socketpair()
    server_sock = SendCountingSocket(plain.family, plain.type, fileno=plain.detach())
    with server_sock, client_sock:
        response = closing_request_over(server_sock, client_sock)
    assert response.startswith(b"HTTP/1.1 201 ")
    assert response.endswith(b"\r\n\r\nhello /x")
    assert server_sock.sends == 1


def test_on_a_unix_socket_closing_does_not_wait_for_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Unix socket loses no response bytes on close: no linger, no wake-up."""
    monkeypatch.setattr(wsgi, "_LINGER_SECONDS", 3600.0)  # as good as for ever
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX)
    with server_sock, client_sock:
        # The client does not close its side, and the worker is done anyway.
        assert closing_request_over(server_sock, client_sock).endswith(b"hello /x")


class ShutdownNotingSocket(socket.socket):
    """A socket that notes when its sending side is shut down."""

    shut_down = False

    def shutdown(self, how: int, /) -> None:
        self.shut_down = True
        super().shutdown(how)


def test_on_a_tcp_socket_closing_waits_for_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unread input turns a TCP close into a reset, which some stacks let
    destroy the response before it is read: so the worker shuts down its
    side, then waits for the client to close before it lets go."""
    monkeypatch.setattr(wsgi, "_LINGER_SECONDS", 3600.0)  # as good as for ever
    # Set when the worker waits after shutting down, or when it is done.
    settled = threading.Event()
    waited_after_shutdown = threading.Event()
    original_wait = wsgi._Channel.wait

    def wait(channel: Any, events: int, timeout: float | None = None) -> bool:
        if getattr(channel.sock, "shut_down", False):
            waited_after_shutdown.set()
            settled.set()
        return original_wait(channel, events, timeout)

    monkeypatch.setattr(wsgi._Channel, "wait", wait)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname()[:2])
        plain, _ = listener.accept()
    server_sock = ShutdownNotingSocket(plain.family, plain.type, fileno=plain.detach())

    def serve() -> None:
        try:
            serve_connection(hello_app, server_sock)
        finally:
            settled.set()

    thread = threading.Thread(target=serve, daemon=True)
    with server_sock, client_sock:
        thread.start()
        client_sock.settimeout(TIMEOUT)
        client_sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # The whole response, then end of file: the worker shut its side down.
        assert recv_all(client_sock).endswith(b"\r\n\r\nhello /x")
        assert settled.wait(TIMEOUT)
        assert waited_after_shutdown.is_set(), "the worker let go without waiting"
        assert thread.is_alive()
        client_sock.close()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
