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
is ever held in memory whole. The two directions move at once: an app may
send its response while it still reads the request body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import logging
import re
import select
import socket
import string
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence

import h11

from actorpool._poll import poll_ms
from actorpool.client import ApplicationPool, Session
from actorpool.config import check_int, check_seconds
from actorpool.errors import (
    ActorPoolError,
    GetTimeoutError,
    QueueFullError,
    ServerGoneError,
    SpawnError,
)
from actorpool.frontend.routes import Route, Router

__all__ = ["PATH_INFO_HEADER", "SCRIPT_NAME_HEADER", "ProxyOptions", "serve_client"]

logger = logging.getLogger("actorpool.frontend")
access_logger = logging.getLogger("actorpool.access")

SCRIPT_NAME_HEADER = "x-actorpool-script-name"
"""Request header that tells the app the prefix it is mounted at.

The bundled WSGI worker makes it ``SCRIPT_NAME``. Its value is the prefix as
it appears in the URL (%-encoded, like the path the app receives). One sent
by the client is always removed.
"""

PATH_INFO_HEADER = "x-actorpool-path-info"
"""Request header that tells the app its ``PATH_INFO`` (%-encoded).

The rest of the path after the prefix is the request target the app
receives, except for a request for the bare prefix (``/blog`` of an app at
``/blog``): that rest is empty, which a request target cannot be, so the app
receives ``/``, as for ``/blog/``. Such a request (only) comes with this
header, empty, from which the bundled WSGI worker makes ``PATH_INFO`` ``""``
as PEP 3333 (and CGI) have it. One sent by the client is always removed.
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
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})
"""Headers a ``Connection`` header may not remove (see :func:`_end_to_end`)."""
_SCRIPT_NAME = SCRIPT_NAME_HEADER.encode("ascii")
_PATH_INFO = PATH_INFO_HEADER.encode("ascii")


@dataclasses.dataclass(frozen=True)
class ProxyOptions:
    """How :func:`serve_client` treats clients and reports trouble."""

    development: bool = False
    """Show the app's traceback on the 500 page when it cannot start."""
    client_timeout: float = 30.0
    """Seconds a client may be silent mid-request, or idle in keep-alive; and
    the longest a request head may take from its first byte to its end."""
    max_header_size: int = 16384
    """Largest request head accepted; a larger one gets 431."""
    get_timeout: float | None = None
    """Longest wait for a session (``pool.get(timeout=...)``); then 504."""
    app_timeout: float = 60.0
    """Seconds the app may keep the proxy waiting on it alone (no response
    byte, no request body taken); then 504, or the client connection is
    dropped once the response has begun."""
    retry_after: int = 5
    """``Retry-After`` seconds on the 503 of a full queue."""
    access_log: bool = False
    """Log each request in Common Log Format to ``actorpool.access`` (INFO)."""

    def __post_init__(self) -> None:
        # The same checks, and the same bounds, as PoolConfig's fields.
        check_seconds("client_timeout", self.client_timeout, allow_zero=False)
        check_int("max_header_size", self.max_header_size, minimum=1)
        check_seconds("app_timeout", self.app_timeout, allow_zero=False)
        if self.get_timeout is not None:
            check_seconds("get_timeout", self.get_timeout, allow_zero=True)
        check_int("retry_after", self.retry_after, minimum=0)


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


class _AppTimeout(_AppError):
    """The app kept the proxy waiting longer than ``app_timeout``."""


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
    if request.method == b"CONNECT":
        # A tunnel is not an app's request. Forwarded, the app would answer
        # it as a plain request, and h11 takes a 2xx to CONNECT for a switch
        # of protocol: the client got a 502 for the app's answer.
        client.respond(501, "501 Not Implemented\n\nCONNECT is not served here.\n")
        return
    target = _Target.of(request)
    if target is None:
        client.respond(400, "400 Bad Request\n\nThe request target is not a path.\n")
        return
    match = _route(context.router, target)
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
            _relay(client, session, forward, context.options.app_timeout)
    except ActorPoolError as exc:
        # Only pool.get raises these: the relay raises its own errors.
        _pool_failed(client, route, exc, context.options)


def _relay(
    client: _Client, session: Session, request: h11.Request, app_timeout: float
) -> None:
    """Forward `request` to the session's app and its response to the client."""
    app = _App(session.socket)
    try:
        _exchange(client, app, request, app_timeout)
    except _AppError as exc:
        if isinstance(exc, _AppTimeout):
            # Hung: given back, it would be the next request's too.
            session.discard()
        if client.body_unread:
            client.keep_alive = False  # the rest of the body has nowhere to go
        if not client.response_started:
            status, text = 502, "The application did not answer properly."
            if isinstance(exc, _AppTimeout):
                status, text = 504, "The application did not answer in time."
            logger.error(
                "%s (pid %d): %s; answering %d",
                session.app_root,
                session.pid,
                exc,
                status,
            )
            phrase = http.HTTPStatus(status).phrase
            client.respond(status, f"{status} {phrase}\n\n{text}\n")
            return
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
    session.close()  # the app's response is all read: free its process now


def _exchange(
    client: _Client, app: _App, request: h11.Request, app_timeout: float
) -> None:
    """Send `request` and the client's body to the app while passing its
    response on to the client, until the response is complete.

    Both directions move at once, each as far as the other side is ready:
    an app may answer (an echo, a transcoder) while it still reads the body,
    and if the body all had to go first, the app would block writing its
    response once the socket buffers fill, no longer reading, and the proxy
    would block sending it the body: both stuck for ever.

    One side is waited on at a time. While the proxy needs more of the body,
    the client: silent for ``client_timeout`` it gets 408 (the app's
    response data is passed on meanwhile, but does not excuse the client).
    Otherwise the app, which must send or take a byte every `app_timeout`
    seconds (:class:`_AppTimeout`). If the app stops taking the body (it
    answered early, or died), sending stops and the rest of the body is
    left unread; the app's response is read on. Once the response is
    complete, nothing more is forwarded.
    """
    app.send(request)
    forwarding = True
    waiting_for_client: bool | None = None
    since = time.monotonic()
    poller = select.poll()
    poller.register(client.conn, 0)
    poller.register(app.sock, 0)
    while True:
        # Take as much of the body as has arrived, as long as the app takes
        # it: the client's bytes are read no faster than the app's. Each
        # piece is offered to the socket at once: it usually takes it all,
        # which saves a poll for writability (a whole poll per request for
        # the request head).
        while forwarding:
            if app.outgoing:
                sent = app.write()
                if sent is None:  # the app takes no more
                    forwarding = False
                    _no_keep_alive_if_unread(client)
                    break
                if app.outgoing:
                    break
            event = client.body_event()
            if event is None:
                break
            if isinstance(event, h11.EndOfMessage):
                forwarding = False
                app.send(h11.EndOfMessage())
                if app.outgoing and app.write() is None:
                    _no_keep_alive_if_unread(client)
            else:
                app.send(h11.Data(data=event.data))
        writing_since = time.monotonic()
        for answer in app.events():
            if isinstance(answer, h11.Response):
                if client.body_unread:
                    # The app answered before the body was all read, and
                    # may never read the rest: keeping the connection
                    # would mean reading (any amount of) it here.
                    client.keep_alive = False
                headers = _end_to_end(answer, set())
                head = client.response(answer.status_code, headers, answer.reason)
                client.send(head, flush=False)
            elif isinstance(answer, h11.Data):
                client.send(h11.Data(data=answer.data), flush=False)
            elif isinstance(answer, h11.EndOfMessage):
                client.send(h11.EndOfMessage(), flush=False)
                client.flush()
                return
        # What goes to the client is held back only while the app's next
        # bytes are already read: it leaves before any wait for more.
        client.flush()

        on_client = forwarding and not app.outgoing
        now = time.monotonic()
        if on_client is not waiting_for_client:
            waiting_for_client, since = on_client, now
        elif not on_client:
            # Time spent blocked writing to a slow client is not the app's:
            # a healthy app must not be taken for hung because of it.
            since += now - writing_since
        limit = client.timeout if on_client else app_timeout
        remaining = since + limit - now
        if remaining <= 0:
            if on_client:
                raise _ClientError("the client was silent too long", 408)
            raise _AppTimeout(f"the application was silent for {limit:g} s")
        poller.modify(client.conn, select.POLLIN if on_client else 0)
        poller.modify(app.sock, select.POLLIN | (select.POLLOUT if app.outgoing else 0))
        ready = dict(poller.poll(poll_ms(remaining)))
        app_ready = ready.get(app.sock.fileno(), 0)
        if app_ready & ~select.POLLIN and app.outgoing:
            sent = app.write()
            if sent is None:
                forwarding = False
                _no_keep_alive_if_unread(client)
            elif sent and not on_client:
                since = time.monotonic()
        if app_ready and app.read() and not on_client:
            since = time.monotonic()
        client_ready = ready.get(client.conn.fileno(), 0)
        if client_ready and on_client:
            client.receive()
            since = time.monotonic()
        elif client_ready:
            # Not asked for (we wait on the app): poll reports an error or a
            # hang-up regardless. The client is gone and will stay gone;
            # going on would poll again at once, for ever, and the app's
            # timer would never run out.
            raise _Abort("the client went away while the app was answering")


def _no_keep_alive_if_unread(client: _Client) -> None:
    """The app takes no more of the body: what is left of it must not be
    read as the next request. (Only ever to False: a request may have made
    the connection end after its response already.)"""
    if client.body_unread:
        client.keep_alive = False


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
    """The path, still %-encoded, with only what RFC 3986 counts the same
    made so (see :func:`_normalized`): what the app gets."""
    query: str
    """``?`` and the query, or ``""`` if there is none."""

    @classmethod
    def of(cls, request: h11.Request) -> _Target | None:
        """The target of `request`; None if it is not a path (nor absolute URL)."""
        raw = request.target.decode("latin-1")
        if raw == "*":
            return cls(_header(request.headers, b"host"), raw, "")
        if raw.startswith("/"):
            path, question, query = raw.partition("?")
            host = _header(request.headers, b"host")
            return cls(host, _normalized(path, _UNRESERVED), question + query)
        # Absolute form ("GET http://host/path"): servers must accept it.
        try:
            url = urllib.parse.urlsplit(raw)
        except ValueError:  # "http://[::1/x": a 400, as any target not a path
            return None
        if url.scheme.lower() not in ("http", "https") or not url.netloc:
            return None
        query = f"?{url.query}" if url.query else ""
        host = url.netloc.rpartition("@")[2]
        return cls(host, _normalized(url.path or "/", _UNRESERVED), query)


# RFC 3986 section 6.2.2.2: escapes of these mean the same as the
# characters, so the app may get them decoded.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Every character a route's prefix may hold but "/": decoded for matching
# only (an app may tell "%3B" from ";"); an escaped "/" stays one.
_DECODED = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"//+")


def _normalized(path: str, decoded: frozenset[str]) -> str:
    """``path`` with escapes of the ``decoded`` characters decoded,
    repeated slashes merged, and dot segments removed (RFC 3986 section
    5.2.4: ``/x/../blog`` is ``/blog``), as nginx does before it matches a
    location. Else ``/%62log/post`` or ``/x/../blog/post`` reached the app
    of another prefix, under its own. Other escapes, ``%2F`` among them,
    stay as they came. Never a ``/`` more or less: the segments are those
    of the path as the app gets it, whatever ``decoded`` is.
    """
    if "%" in path:
        path = _ESCAPE.sub(lambda escape: _decode_if(escape, decoded), path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." not in path:
        return path
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")  # "/a/." is the directory "/a/"
    return "/" + "/".join(kept)


def _decode_if(escape: re.Match[str], decoded: frozenset[str]) -> str:
    char = chr(int(escape[1], 16))
    return char if char in decoded else escape[0]


def _route(router: Router, target: _Target) -> tuple[Route, str, str] | None:
    """``(route, script_name, path_info)`` for ``target``, or None: matched
    with every character a prefix may hold decoded, ``path_info`` as the
    app gets it (only unreserved characters decoded)."""
    match = router.match(target.host, _normalized(target.path, _DECODED))
    if match is None:
        return None
    route, script_name, _ = match
    return route, script_name, _below(target.path, script_name)


def _below(path: str, prefix: str) -> str:
    """The part of ``path`` below a matched ``prefix`` (as routes see it),
    counted in segments: ``/c%2B%2B/admin`` below ``/c++`` is ``/admin``."""
    if not prefix:
        return path
    rest = path.split("/")[prefix.count("/") + 1 :]
    return "/" + "/".join(rest) if rest else ""


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
    # Client-sent script names and path infos, Expect (this proxy answers
    # 100 Continue itself), and what is replaced below never reach the app.
    drop = {_SCRIPT_NAME, _PATH_INFO, b"expect", b"host", b"x-forwarded-for"}
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
        if not path_info:
            headers.append((_PATH_INFO, b""))
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
    # A Connection header may name framing headers ("Connection:
    # content-length"), though RFC 9110 forbids a sender to. Obeying it would
    # forward a message framed otherwise than h11 read it: the body would
    # have no length (h11 refuses to send it), or the next hop would find
    # the message's end elsewhere than we did, which is how requests are
    # smuggled. So those names are ignored there and the message goes on
    # framed as it came (Transfer-Encoding and Host the caller sets anew
    # anyway). A 400 would be as safe, but fail clients that are merely
    # sloppy, for nothing.
    connection = {
        token.strip().lower()
        for name, value in message.headers
        if name == b"connection"
        for token in value.split(b",")
    } - _FRAMING
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
        """False once the connection must end after the current response
        (the request body will not be read to its end, or the request was
        suspect)."""
        self.status: int | None = None
        """Status of the response to the current request, once sent."""
        self.body_bytes = 0
        """Response body bytes sent for the current request."""
        self.timeout = options.client_timeout
        """Seconds the client may be silent (``client_timeout``)."""
        self._max_head = options.max_header_size
        self._stopping = stopping
        self._received = 0
        """Bytes of this request cycle fed to h11 so far, counting what was
        left over from the last one: what a complete head is measured by."""
        self._eof = False
        self._head = False
        self._poll = select.poll()
        self._poll.register(conn, select.POLLIN)
        self._pending: list[bytes] = []

    @property
    def response_started(self) -> bool:
        """Whether a response head went out for the current request."""
        return self.http.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def body_unread(self) -> bool:
        """Whether some of the current request's body is still to be read."""
        return self.http.their_state is h11.SEND_BODY

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
        # h11's max_incomplete_event_size only bounds a head still
        # incomplete, and one recv takes up to 64 KiB: a bigger head that
        # arrives whole must be measured here. What h11 has not consumed is
        # the body or the next request.
        head_size = self._received - len(self.http.trailing_data[0])
        if head_size > self._max_head:
            raise _ClientError(f"request head of {head_size} bytes", 431)
        self.status, self.body_bytes = None, 0
        self._head = event.method == b"HEAD"
        if _header(event.headers, b"transfer-encoding") is not None and (
            _header(event.headers, b"content-length") is not None
        ):
            # h11 goes by Transfer-Encoding, but a sender of both may be
            # smuggling a request past a hop that goes by Content-Length:
            # RFC 9112 section 6.1 says to close the connection after the
            # response, so nothing after this body is taken as a request.
            self.keep_alive = False
        return event

    def body_event(self) -> h11.Data | h11.EndOfMessage | None:
        """The next piece of the request body, or None until more arrives.

        Says ``100 Continue`` first if the client waits for it and no
        response has begun.
        """
        if self.http.they_are_waiting_for_100_continue and not self.response_started:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        event = self._parse()
        if event is None:
            return None
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
            self._received = len(self.http.trailing_data[0])
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
        deadline = time.monotonic() + min(_LINGER_SECONDS, self.timeout)
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
        begins (silent too long, or stopping). With `idle` too, once a
        request has begun its head must be complete within ``client_timeout``
        of that: a time limit per recv alone would let a client that sends a
        byte now and then hold this thread for ever.
        """
        head_deadline: float | None = None
        while True:
            event = self._parse()
            if event is not None:
                return event
            waiting = idle and not self._request_begun()
            if idle and not waiting and head_deadline is None:
                head_deadline = time.monotonic() + self.timeout
            if not self._receive(idle=waiting, deadline=head_deadline):
                return None

    def _parse(self) -> h11.Event | None:
        """The next event h11 makes of what has arrived; None if none yet."""
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
        return None

    def _request_begun(self) -> bool:
        """Whether any byte of the next request has arrived."""
        return self.http.their_state is not h11.IDLE or bool(self.http.trailing_data[0])

    def _receive(self, *, idle: bool, deadline: float | None = None) -> bool:
        """Feed h11 the client's next bytes; False if it should end instead.

        The wait ends ``client_timeout`` from now, or at `deadline` if that
        comes first.
        """
        until = time.monotonic() + self.timeout
        if deadline is not None and deadline < until:
            until = deadline
        if not self._wait(until, idle=idle):
            if idle:
                return False
            if until == deadline:
                raise _ClientError("the client was too slow sending a request", 408)
            raise _ClientError("the client was silent too long", 408)
        self.receive()
        return True

    def receive(self) -> None:
        """Feed h11 what the client sent: call when its socket is readable."""
        try:
            data = self.conn.recv(_RECV_SIZE)
        except OSError as exc:
            raise _ClientError(f"receiving from the client failed: {exc}") from exc
        self._eof = not data
        self._received += len(data)
        self.http.receive_data(data)

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
            if self._poll.poll(poll_ms(remaining)):
                return True
            if stop or time.monotonic() >= deadline:
                return False


class _App:
    """The h11 client side of a session's connection to an app process.

    Its socket is made non-blocking: :func:`_exchange` polls it and moves
    what it can each way, so that a slow or hung app never blocks a send
    or receive (and its thread) for longer than ``app_timeout``.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.http = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=_APP_MAX_HEAD_SIZE
        )
        self.outgoing = bytearray()
        """Bytes for the app that its socket has not taken yet."""

    def send(self, event: h11.Event) -> None:
        """Queue `event` for the app; :meth:`write` sends it."""
        data = self.http.send(event)
        if data:
            self.outgoing += data

    def write(self) -> int | None:
        """Send what the socket takes of :attr:`outgoing`: the byte count,
        or None if the app no longer takes any (what is left is dropped)."""
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return 0
        except OSError as exc:
            logger.debug("sending the request stopped: %s", exc)
            self.outgoing.clear()
            return None
        del self.outgoing[:sent]
        return sent

    def read(self) -> bool:
        """Feed h11 what the app sent, if anything; whether anything came
        (end of file included)."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _AppError(f"receiving from the application failed: {exc}") from exc
        self.http.receive_data(data)
        return True

    def events(self) -> Iterator[h11.Event]:
        """The app's events that what has arrived makes, in order."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                raise _AppError(f"the application broke HTTP: {exc}") from exc
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.ConnectionClosed):
                raise _AppError("the application closed the connection")
            if event is h11.PAUSED:
                raise _AppError("h11 paused: read past the end of the response")
            assert isinstance(event, h11.Event)
            yield event
