"""Proxy one HTTP/1.1 client connection to application processes.

:func:`serve_client` is what each client thread of an ``actorpool serve``
worker runs. For each request it picks a route, checks a session out of the
pool, forwards the request to the session's application process over
HTTP/1.1, streams the response back and gives the session back as soon as
the app's response is read. h11 parses and frames HTTP on both sides: a
server connection faces the client, a client connection faces the app.

Bodies stream both ways a piece at a time: each piece the client sends is
passed on to the app before the next is read, and each piece the app sends
is passed on to the client likewise, so neither an upload nor a download
is ever held in memory whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import logging
import math
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence

import h11

from actorpool.client import ApplicationPool, Session
from actorpool.errors import (
    ActorPoolError,
    ConfigError,
    GetTimeoutError,
    QueueFullError,
    ServerGoneError,
    SpawnError,
)
from actorpool.frontend.routes import Route, Router

__all__ = ["SCRIPT_NAME_HEADER", "ProxyOptions", "serve_client"]

logger = logging.getLogger("actorpool.frontend")
access_logger = logging.getLogger("actorpool.access")

SCRIPT_NAME_HEADER = "x-actorpool-script-name"
"""Request header that tells the app the prefix it is mounted at.

The bundled WSGI worker makes it ``SCRIPT_NAME``. Its value is the prefix as
it appears in the URL (%-encoded, like the path the app receives). One sent
by the client is always removed.
"""

_Headers = list[tuple[bytes, bytes]]

_RECV_SIZE = 64 * 1024
"""Bytes asked of a socket per ``recv``: the largest body piece in memory."""
_APP_MAX_HEAD_SIZE = 64 * 1024
"""Largest response head taken from an app; apps are trusted more than
clients, and big cookies are common."""
_STOP_CHECK_INTERVAL = 0.25
"""Seconds between looks at ``stopping`` while a connection waits for a
request: a threading.Event cannot be waited on together with a socket."""
_DRAIN_LIMIT = 1024 * 1024
"""Unread request body discarded to keep a connection alive (or while
closing it); a longer leftover closes the connection instead."""
_LINGER_SECONDS = 2.0
"""Longest wait, when closing, for the client to stop sending."""
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
"""Headers that describe one connection, not the message (plus ``proxy-*``)."""
_SCRIPT_NAME = SCRIPT_NAME_HEADER.encode("ascii")


@dataclasses.dataclass(frozen=True)
class ProxyOptions:
    """How :func:`serve_client` treats clients and reports trouble."""

    development: bool = False
    """Show the app's traceback on the 500 page when it cannot start."""
    client_timeout: float = 30.0
    """Seconds a client may be silent mid-request, or idle in keep-alive."""
    max_header_size: int = 16384
    """Largest request head accepted; a larger one gets 431."""
    get_timeout: float | None = None
    """Longest wait for a session (``pool.get(timeout=...)``); then 504."""
    retry_after: int = 5
    """``Retry-After`` seconds on the 503 of a full queue."""
    access_log: bool = False
    """Log each request in Common Log Format to ``actorpool.access`` (INFO)."""

    def __post_init__(self) -> None:
        if not _seconds(self.client_timeout, allow_zero=False):
            raise ConfigError(
                f"client_timeout must be a number > 0, not {self.client_timeout!r}"
            )
        if not _int_at_least(self.max_header_size, 1):
            raise ConfigError(
                f"max_header_size must be an int >= 1, not {self.max_header_size!r}"
            )
        if self.get_timeout is not None and not _seconds(
            self.get_timeout, allow_zero=True
        ):
            raise ConfigError(
                f"get_timeout must be None or a number >= 0, not {self.get_timeout!r}"
            )
        if not _int_at_least(self.retry_after, 0):
            raise ConfigError(
                f"retry_after must be an int >= 0, not {self.retry_after!r}"
            )


def _seconds(value: object, *, allow_zero: bool) -> bool:
    """Whether `value` is a finite number of seconds, > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and (value > 0 or (allow_zero and value == 0))


def _int_at_least(value: object, minimum: int) -> bool:
    """Whether `value` is an int (not a bool) >= `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def serve_client(
    conn: socket.socket,
    client_address: str,
    pool: ApplicationPool,
    router: Router,
    options: ProxyOptions,
    stopping: threading.Event,
) -> None:
    """Serve HTTP/1.1 requests on one client connection until it ends.

    It ends when the client closes it, times out or errs, or when
    `stopping` is set: a request in progress is finished first and answered
    with ``Connection: close``; a connection waiting for a request ends
    within a fraction of a second. Closes nothing it did not open: the
    caller closes `conn`.
    """
    conn.settimeout(options.client_timeout)
    client = _Client(conn, options, stopping)
    context = _Context(pool, router, options, client_address)
    try:
        while _serve_one(client, context):
            pass
    except _Abort as exc:
        logger.debug("%s: dropping the connection: %s", client_address, exc)


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every request on a connection needs besides the connection."""

    pool: ApplicationPool
    router: Router
    options: ProxyOptions
    client_address: str


class _ClientError(Exception):
    """The client connection cannot go on: closed, silent too long, or malformed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The status to answer with, if no response has begun."""


class _AppError(Exception):
    """The app process closed the connection or broke HTTP."""


class _Abort(Exception):
    """The response cannot be completed; the client connection is dropped."""


def _serve_one(client: _Client, context: _Context) -> bool:
    """Serve the next request; False when the connection should end."""
    try:
        request = client.next_request()
    except _ClientError as exc:
        _reject(client, exc, context.client_address)
        client.linger()
        return False
    if request is None:
        return False
    started = time.time()
    try:
        _handle(client, request, context)
        if client.next_cycle():
            return True
    except _ClientError as exc:
        _reject(client, exc, context.client_address)
    finally:
        if context.options.access_log:
            _log_access(context.client_address, request, client, started)
    client.linger()
    return False


def _reject(client: _Client, error: _ClientError, client_address: str) -> None:
    """Answer a client's error with its status, if no response has begun."""
    logger.debug("%s: %s", client_address, error)
    if error.status is not None and not client.response_started:
        client.keep_alive = False
        text = f"{error.status} {http.HTTPStatus(error.status).phrase}\n"
        client.respond(error.status, text)


def _handle(client: _Client, request: h11.Request, context: _Context) -> None:
    """Route `request` and answer it, from an app or with an error page."""
    target = _Target.of(request)
    if target is None:
        client.respond(400, "400 Bad Request\n\nThe request target is not a path.\n")
        return
    match = context.router.match(target.host, target.path)
    if match is None:
        client.respond(404, "404 Not Found\n\nNo application is mounted here.\n")
        return
    route, script_name, path_info = match
    forward = _upstream_request(
        request, target, script_name, path_info, context.client_address, client
    )
    try:
        with context.pool.get(
            route.app_root, timeout=context.options.get_timeout
        ) as session:
            _relay(client, session, forward)
    except ActorPoolError as exc:
        # Only pool.get raises these: the relay raises its own errors.
        _pool_failed(client, route, exc, context.options)


def _relay(client: _Client, session: Session, request: h11.Request) -> None:
    """Forward `request` to the session's app and its response to the client."""
    # What goes to the client is held back only while the app's next bytes
    # are already read: it leaves before any wait for more.
    app = _App(session.socket, before_wait=client.flush)
    try:
        _send_request(client, app, request)
        response = app.next_response()
    except _AppError as exc:
        logger.error(
            "%s (pid %d): %s; answering 502", session.app_root, session.pid, exc
        )
        client.respond(
            502, "502 Bad Gateway\n\nThe application did not answer properly.\n"
        )
        return
    headers = _end_to_end(response, set())
    head = client.response(response.status_code, headers, response.reason)
    client.send(head, flush=False)
    try:
        for data in app.body():
            client.send(h11.Data(data=data), flush=False)
    except _AppError as exc:
        # The status is out already (or about to be: what was held back
        # goes now): all the client can be told is that the response is cut
        # short, by losing the connection.
        with contextlib.suppress(_Abort):
            client.flush()
        logger.error(
            "%s (pid %d): %s after the response began; dropping the client",
            session.app_root,
            session.pid,
            exc,
        )
        raise _Abort(str(exc)) from exc
    client.send(h11.EndOfMessage(), flush=False)
    client.flush()
    session.close()  # the app's response is all read: free its process now


def _send_request(client: _Client, app: _App, request: h11.Request) -> None:
    """Send the request head to the app, then its body, a piece at a time.

    If the app stops taking it (it answered early, or died), sending stops
    and the rest of the body is left unread; the app's response is read next.
    """
    try:
        app.send(request)
        while True:
            event = client.next_body_event()
            if isinstance(event, h11.EndOfMessage):
                app.send(h11.EndOfMessage())
                return
            app.send(h11.Data(data=event.data))
    except _AppError as exc:
        logger.debug("sending the request stopped: %s", exc)
        client.keep_alive = client.http.their_state is h11.DONE


def _pool_failed(
    client: _Client, route: Route, exc: ActorPoolError, options: ProxyOptions
) -> None:
    """Answer a failed ``pool.get`` with an error page, and log it."""
    headers: _Headers = []
    if isinstance(exc, QueueFullError):
        logger.warning("%s: queue full, answering 503: %s", route.app_root, exc)
        status, text = 503, "The application is too busy. Try again later."
        headers.append((b"retry-after", str(options.retry_after).encode("ascii")))
    elif isinstance(exc, GetTimeoutError):
        logger.warning("%s: answering 504: %s", route.app_root, exc)
        status, text = 504, "The application did not become available in time."
    elif isinstance(exc, SpawnError):
        logger.error("%s: could not start the application: %s", route.app_root, exc)
        status, text = 500, "The application could not be started."
        if options.development:
            text += f"\n\n{exc}"
    elif isinstance(exc, ServerGoneError):
        logger.error("%s: the pool server is gone: %s", route.app_root, exc)
        status, text = 503, "The application pool is not running."
    else:
        logger.error("%s: the pool failed: %s", route.app_root, exc)
        status, text = 503, "The application pool failed."
    phrase = http.HTTPStatus(status).phrase
    client.respond(status, f"{status} {phrase}\n\n{text}\n", headers)


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where a request goes: host (for routing), path and query."""

    host: str | None
    """The Host header, or the authority of an absolute-form target."""
    path: str
    """The raw, still %-encoded path."""
    query: str
    """``?`` and the query, or ``""`` if there is none."""

    @classmethod
    def of(cls, request: h11.Request) -> _Target | None:
        """The target of `request`; None if it is not a path (nor absolute URL)."""
        raw = request.target.decode("latin-1")
        if raw.startswith("/") or raw == "*":
            path, question, query = raw.partition("?")
            return cls(_header(request.headers, b"host"), path, question + query)
        # Absolute form ("GET http://host/path"): servers must accept it.
        url = urllib.parse.urlsplit(raw)
        if url.scheme.lower() not in ("http", "https") or not url.netloc:
            return None
        query = f"?{url.query}" if url.query else ""
        return cls(url.netloc.rpartition("@")[2], url.path or "/", query)


def _upstream_request(
    request: h11.Request,
    target: _Target,
    script_name: str,
    path_info: str,
    client_address: str,
    client: _Client,
) -> h11.Request:
    """The request to send to the app, with the headers a proxy adds and drops."""
    chunked = _header(request.headers, b"transfer-encoding") is not None
    # Client-sent script names, Expect (this proxy answers 100 Continue
    # itself), and what is replaced below never reach the app.
    drop = {_SCRIPT_NAME, b"expect", b"host", b"x-forwarded-for"}
    if chunked:
        drop.add(b"content-length")
    forwarded_for = [v for n, v in request.headers if n == b"x-forwarded-for"]
    forwarded_for.append(client_address.encode("latin-1"))
    host = target.host if target.host is not None else client.local_host()
    headers: _Headers = [(b"host", host.encode("latin-1"))]
    headers += _end_to_end(request, drop)
    headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    if script_name:
        headers.append((_SCRIPT_NAME, script_name.encode("latin-1")))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    headers.append((b"connection", b"close"))
    forward_target = (path_info or "/") + target.query
    return h11.Request(
        method=request.method,
        target=forward_target.encode("latin-1"),
        headers=headers,
    )


def _end_to_end(message: h11.Request | h11.Response, drop: set[bytes]) -> _Headers:
    """The headers of `message` (names as sent) but hop-by-hop ones and `drop`."""
    connection = {
        token.strip().lower()
        for name, value in message.headers
        if name == b"connection"
        for token in value.split(b",")
    }
    dropped = _HOP_BY_HOP | connection | drop
    return [
        (name, value)
        for name, value in message.headers.raw_items()
        if name.lower() not in dropped and not name.lower().startswith(b"proxy-")
    ]


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _log_access(
    client_address: str, request: h11.Request, client: _Client, started: float
) -> None:
    """Log one request in Common Log Format."""
    line = _escape(
        b" ".join([request.method, request.target, b"HTTP/" + request.http_version])
    )
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(started))
    access_logger.info(
        '%s - - [%s] "%s" %s %s',
        client_address,
        stamp,
        line,
        client.status or "-",
        client.body_bytes or "-",
    )


def _escape(raw: bytes) -> str:
    """`raw` for a log line: quotes, backslashes and non-printables escaped."""
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in raw
    )


class _Client:
    """The h11 server side of one client connection, with its timeouts."""

    def __init__(
        self, conn: socket.socket, options: ProxyOptions, stopping: threading.Event
    ) -> None:
        self.conn = conn
        self.http = h11.Connection(
            h11.SERVER, max_incomplete_event_size=options.max_header_size
        )
        self.keep_alive = True
        """False once the request body will not be read to its end."""
        self.status: int | None = None
        """Status of the response to the current request, once sent."""
        self.body_bytes = 0
        """Response body bytes sent for the current request."""
        self._timeout = options.client_timeout
        self._stopping = stopping
        self._eof = False
        self._head = False
        self._poll = select.poll()
        self._poll.register(conn, select.POLLIN)
        self._pending: list[bytes] = []

    @property
    def response_started(self) -> bool:
        """Whether a response head went out for the current request."""
        return self.http.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    def local_host(self) -> str:
        """A Host header for requests that came without one: our own address."""
        address = self.conn.getsockname()
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return "localhost"

    def next_request(self) -> h11.Request | None:
        """The next request; None if the connection should end quietly."""
        event = self._next_event(idle=True)
        if event is None or isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise RuntimeError(f"expected a request, h11 gave {event!r}")
        self.status, self.body_bytes = None, 0
        self._head = event.method == b"HEAD"
        return event

    def next_body_event(self) -> h11.Data | h11.EndOfMessage:
        """The next piece of the request body, saying ``100 Continue`` if asked."""
        if self.http.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        event = self._next_event(idle=False)
        if not isinstance(event, h11.Data | h11.EndOfMessage):
            raise RuntimeError(f"expected a request body, h11 gave {event!r}")
        return event

    def must_close(self) -> bool:
        """Whether the response must end the connection."""
        return (
            self._stopping.is_set()
            or not self.keep_alive
            # The client holds its body back; reading on would be a guess.
            or self.http.they_are_waiting_for_100_continue
        )

    def response(
        self, status: int, headers: _Headers, reason: bytes = b""
    ) -> h11.Response:
        """A response head, made to close the connection if it must."""
        if self.must_close():
            headers = [*headers, (b"connection", b"close")]
        if not reason:
            reason = http.HTTPStatus(status).phrase.encode("ascii")
        return h11.Response(status_code=status, headers=headers, reason=reason)

    def respond(
        self, status: int, text: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Send a complete plain-text response (no body to a HEAD)."""
        body = text.encode("utf-8")
        fields: _Headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            *headers,
        ]
        self.send(self.response(status, fields))
        if not self._head:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def send(self, event: h11.Event, *, flush: bool = True) -> None:
        """Send `event` to the client; :class:`_Abort` if that fails.

        With ``flush=False`` its bytes wait for the next :meth:`flush` (or
        flushing send), so that a response head and the body that came with
        it leave in one system call and one TCP segment.
        """
        data = self.http.send(event)
        if isinstance(event, h11.Response):
            self.status = event.status_code
        elif isinstance(event, h11.Data):
            self.body_bytes += len(event.data)
        if data:
            self._pending.append(data)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Send what :meth:`send` held back; :class:`_Abort` if that fails."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        try:
            self.conn.sendall(data)
        except OSError as exc:
            raise _Abort(f"sending to the client failed: {exc}") from exc

    def next_cycle(self) -> bool:
        """Get ready for the next request; False if the connection must close."""
        if self.http.our_state is h11.DONE and self.http.their_state is h11.SEND_BODY:
            self._drain()
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            return True
        return False

    def linger(self) -> None:
        """Close our side gracefully: send EOF, then discard what the client sends.

        Closing a socket with unread input resets the connection, which can
        destroy the response before the client has read it; so wait (bounded
        in bytes and time) for the client to close first.
        """
        if self._eof:
            return
        try:
            self.conn.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + min(_LINGER_SECONDS, self._timeout)
        discarded = 0
        while discarded <= _DRAIN_LIMIT and self._wait(deadline, idle=False):
            try:
                data = self.conn.recv(_RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            discarded += len(data)

    def _drain(self) -> None:
        """Read and discard the rest of a request body no one read."""
        discarded = 0
        while discarded <= _DRAIN_LIMIT:
            event = self._next_event(idle=False)
            if isinstance(event, h11.EndOfMessage):
                return
            if isinstance(event, h11.Data):
                discarded += len(event.data)

    def _next_event(self, *, idle: bool) -> h11.Event | None:
        """The client's next event, receiving as needed.

        With `idle`, None if the connection should end before a request
        begins (silent too long, or stopping).
        """
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                # Cut off mid-message is a client going away, not bad syntax.
                if self._eof:
                    raise _ClientError("the client closed mid-request") from exc
                raise _ClientError(
                    f"malformed request: {exc}", exc.error_status_hint
                ) from exc
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise RuntimeError("h11 paused: read past the end of a request")
            waiting = idle and not self._request_begun()
            if not self._receive(idle=waiting):
                return None

    def _request_begun(self) -> bool:
        """Whether any byte of the next request has arrived."""
        return self.http.their_state is not h11.IDLE or bool(self.http.trailing_data[0])

    def _receive(self, *, idle: bool) -> bool:
        """Feed h11 the client's next bytes; False if it should end instead."""
        deadline = time.monotonic() + self._timeout
        if not self._wait(deadline, idle=idle):
            if idle:
                return False
            raise _ClientError("the client was silent too long", 408)
        try:
            data = self.conn.recv(_RECV_SIZE)
        except OSError as exc:
            raise _ClientError(f"receiving from the client failed: {exc}") from exc
        self._eof = not data
        self.http.receive_data(data)
        return True

    def _wait(self, deadline: float, *, idle: bool) -> bool:
        """Wait until the client sent something; False at `deadline`.

        Idle (between requests), also False once ``stopping`` is set and
        nothing has arrived: a request already sent is still served.
        """
        while True:
            stop = idle and self._stopping.is_set()
            remaining = max(0.0, deadline - time.monotonic())
            if stop:
                remaining = 0.0
            elif idle:
                remaining = min(remaining, _STOP_CHECK_INTERVAL)
            if self._poll.poll(math.ceil(remaining * 1000)):
                return True
            if stop or time.monotonic() >= deadline:
                return False


class _App:
    """The h11 client side of a session's connection to an app process."""

    def __init__(
        self, sock: socket.socket, before_wait: Callable[[], None] = lambda: None
    ) -> None:
        self.sock = sock
        self.http = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=_APP_MAX_HEAD_SIZE
        )
        self._before_wait = before_wait

    def send(self, event: h11.Event) -> None:
        """Send `event` to the app; :class:`_AppError` if that fails."""
        data = self.http.send(event)
        if data:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise _AppError(f"sending to the application failed: {exc}") from exc

    def next_response(self) -> h11.Response:
        """The app's response head, past any interim (1xx) responses."""
        while True:
            event = self._next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise _AppError(f"expected a response, h11 gave {event!r}")

    def body(self) -> Iterator[bytes]:
        """The response body, a piece at a time as it arrives."""
        while True:
            event = self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if isinstance(event, h11.Data):
                yield event.data

    def _next_event(self) -> h11.Event:
        """The app's next event, receiving as needed."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                raise _AppError(f"the application broke HTTP: {exc}") from exc
            if isinstance(event, h11.ConnectionClosed):
                raise _AppError("the application closed the connection")
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise _AppError("h11 paused: read past the end of the response")
            self._before_wait()
            try:
                data = self.sock.recv(_RECV_SIZE)
            except OSError as exc:
                raise _AppError(
                    f"receiving from the application failed: {exc}"
                ) from exc
            self.http.receive_data(data)
