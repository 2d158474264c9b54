"""The HTTP/1.1 side of the bundled worker: a WSGI app served over a Unix socket.

A worker process loads one PEP 3333 application and owns a listening Unix
stream socket. :func:`serve_forever` accepts one connection at a time and
:func:`serve_connection` serves its requests one at a time (keep-alive), as
Passenger's request handler does. All HTTP parsing and framing is h11's; this
module moves bytes between h11 and the socket and between h11 and the app.

Every wait (for a connection, for request bytes, for room to send) also
watches the *lifeline*, the read end of a pipe whose write end the pool
server holds: when it reaches end of file the pool server is gone, and
serving stops at once, even in the middle of a request.

Bodies stream both ways: ``wsgi.input`` pulls request body bytes from the
socket as the app reads them, and every chunk the app produces is sent
before the next is asked for.
"""

from __future__ import annotations

import http
import io
import logging
import math
import select
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias
from wsgiref.types import StartResponse

import h11

if TYPE_CHECKING:
    from _typeshed import OptExcInfo, WriteableBuffer

__all__ = ["StartResponse", "WSGIApp", "serve_connection", "serve_forever"]

logger = logging.getLogger("actorpool.worker")

WSGIApp: TypeAlias = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
"""A PEP 3333 application callable."""

_RECV_SIZE = 64 * 1024
"""Bytes asked of the socket per ``recv``, and the ``wsgi.input`` buffer size."""
_MAX_HEAD_SIZE = 1024 * 1024
"""Largest request head (request line and headers) accepted; more gets a
431. A guard on the worker's memory, not a policy: the front end's
``--max-header-size`` (16 KiB) is that, and the heads it forwards, with the
headers it adds, must pass here."""
_DRAIN_LIMIT = 1024 * 1024
"""Unread request body discarded to keep a connection alive (or while
closing it); a longer leftover closes the connection instead."""
_LINGER_SECONDS = 2.0
"""How long closing waits for the client to finish sending, so that unread
input does not turn our close into a reset that could destroy the response."""
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
"""Send flag: report a vanished peer as EPIPE even if SIGPIPE is not ignored."""

_WSGI_CONSTANTS: dict[str, Any] = {
    "SCRIPT_NAME": "",
    "REMOTE_ADDR": "",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.multithread": False,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
    "wsgi.input_terminated": True,
}
"""Environ entries that are the same for every request."""

_SCRIPT_NAME_VARIABLE = "HTTP_X_ACTORPOOL_SCRIPT_NAME"
"""The environ key of the header that ``actorpool serve``'s proxy
(:data:`actorpool.frontend.proxy.SCRIPT_NAME_HEADER`) sets to the prefix the
app is mounted at, %-encoded like the path. It becomes ``SCRIPT_NAME``; the
proxy removes any a client sent, so the worker can trust it."""
_PATH_INFO_VARIABLE = "HTTP_X_ACTORPOOL_PATH_INFO"
"""The environ key of the header (:data:`actorpool.frontend.proxy.PATH_INFO_HEADER`)
that, when present, is ``PATH_INFO`` (%-encoded) in place of the target's
path. The proxy sends it, empty, for a request for the bare prefix, whose
target cannot be empty. Trusted for the same reason."""

_UNPREFIXED_HEADERS = {
    b"content-type": "CONTENT_TYPE",
    b"content-length": "CONTENT_LENGTH",
}
"""Headers whose environ keys, per PEP 3333, have no ``HTTP_`` prefix."""


class _Abort(Exception):
    """The connection cannot go on; nothing more is sent or received on it."""


class _LifelineFired(_Abort):
    """The lifeline reached end of file: the pool server is gone."""


class _PeerGone(ConnectionError, _Abort):
    """The client closed or reset the connection before the exchange ended.

    A ConnectionError, so that an app reading ``wsgi.input`` can catch it as one.
    """


class _Dropped(Exception):
    """The app failed after its response began; the connection is dropped."""


def serve_forever(
    app: WSGIApp,
    listener: socket.socket,
    *,
    lifeline: int | None = None,
    server_name: str = "localhost",
) -> None:
    """Accept connections on `listener` one at a time and serve each until it closes.

    Returns when `lifeline` (a file descriptor, the read end of a pipe)
    becomes readable (EOF: the pool server is gone), also while waiting
    inside a keep-alive connection. Nothing a client does ends the loop.
    `listener` is put in non-blocking mode; each accepted socket is closed
    after serving.
    """
    # Non-blocking: a client that gives up between select and accept must
    # not leave us blocked in accept() with the lifeline unwatched.
    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    if lifeline is not None:
        poller.register(lifeline, select.POLLIN)
    while True:
        # Wait first: the pool hands this process to the next client only
        # once the last one is done with it, so when a connection ends the
        # next one has seldom arrived yet (an accept tried first would fail
        # for nearly every request).
        if any(fd == lifeline for fd, _ in poller.poll()):
            return
        conn = _accept(listener)
        if conn is not None and not _serve_accepted(app, conn, lifeline, server_name):
            return


def serve_connection(
    app: WSGIApp,
    conn: socket.socket,
    *,
    lifeline: int | None = None,
    server_name: str = "localhost",
) -> bool:
    """Serve requests on one connection (keep-alive) until it ends.

    The connection ends when the peer closes it or asks to close, or an
    error ends it. Returns False if the lifeline fired (the caller should
    stop), True otherwise. `conn` is put in non-blocking mode; the caller
    still owns it and closes it.
    """
    conn.setblocking(False)
    channel = _Channel(conn, lifeline)
    try:
        _serve_requests(app, channel, server_name)
    except _LifelineFired:
        return False
    except _PeerGone as exc:
        logger.debug("client went away: %s", exc)
    finally:
        channel.close()
    return True


def _accept(listener: socket.socket) -> socket.socket | None:
    """The next connection, or None if it vanished before we accepted it."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return None
    return conn


def _serve_accepted(
    app: WSGIApp, conn: socket.socket, lifeline: int | None, server_name: str
) -> bool:
    """:func:`serve_connection`, then close `conn`; False if the lifeline fired."""
    with conn:
        try:
            return serve_connection(
                app, conn, lifeline=lifeline, server_name=server_name
            )
        except Exception:
            # A bug here must cost one connection, not the whole worker.
            logger.exception("unexpected error while serving a connection")
            return True


def _serve_requests(app: WSGIApp, channel: _Channel, server_name: str) -> None:
    """Serve requests until the connection should close, then close our side."""
    try:
        while _serve_next(app, channel, server_name):
            pass
    except h11.RemoteProtocolError as exc:
        channel.reject(exc)
    except _Dropped:
        return
    channel.linger()


def _serve_next(app: WSGIApp, channel: _Channel, server_name: str) -> bool:
    """Serve the next request; False when the connection should close."""
    event = channel.next_event()
    if isinstance(event, h11.ConnectionClosed):
        return False
    if not isinstance(event, h11.Request):
        raise RuntimeError(f"expected a request, h11 gave {event!r}")
    channel.request_method = event.method
    channel.check_head_size()
    try:
        _path_and_query(event.target)
    except ValueError as exc:  # an absolute-form target urlsplit refuses
        raise h11.RemoteProtocolError(
            f"bad request target: {exc}", error_status_hint=400
        ) from exc
    _serve_request(app, channel, event, server_name)
    return channel.next_cycle()


def _serve_request(
    app: WSGIApp, channel: _Channel, request: h11.Request, server_name: str
) -> None:
    """Run the app for `request` and send its response, or a 500."""
    responder = _Responder(channel, method=request.method)
    body = io.BufferedReader(_RequestBody(channel), _RECV_SIZE)
    try:
        _run_app(app, _environ(request, body, server_name), responder)
    except Exception as exc:
        if channel.failure is None:
            _app_failed(channel, request, exc)
    # Raised even if the app caught it: the connection's trouble, not the app's.
    if channel.failure is not None:
        raise channel.failure


def _run_app(app: WSGIApp, environ: dict[str, Any], responder: _Responder) -> None:
    """Call the app and send everything it produces; always close its iterable."""
    result = app(environ, responder.start_response)
    try:
        for chunk in result:
            responder.write(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    responder.finish()


def _app_failed(channel: _Channel, request: h11.Request, exc: Exception) -> None:
    """Answer 500 if nothing was sent yet; otherwise drop the connection."""
    what = f"{request.method.decode('ascii')} {request.target.decode('latin-1')}"
    if channel.http.our_state is h11.SEND_RESPONSE:
        logger.error("%s: the application raised", what, exc_info=exc)
        channel.respond_plain(500)
        return
    logger.error(
        "%s: the application raised after its response began; dropping the connection",
        what,
        exc_info=exc,
    )
    raise _Dropped from exc


def _environ(
    request: h11.Request, body: io.BufferedReader[_RequestBody], server_name: str
) -> dict[str, Any]:
    """The PEP 3333 environ for `request`."""
    path, query = _path_and_query(request.target)
    environ = dict(_WSGI_CONSTANTS)
    environ.update(_header_variables(request.headers))
    script_name = environ.pop(_SCRIPT_NAME_VARIABLE, None)
    if script_name is not None:
        environ["SCRIPT_NAME"] = _unquote(script_name.encode("latin-1"))
    path_info = environ.pop(_PATH_INFO_VARIABLE, None)
    if path_info is not None:
        path = path_info.encode("latin-1")
    name, port = _server_address(environ.get("HTTP_HOST"), server_name)
    environ.update(
        {
            "REQUEST_METHOD": request.method.decode("ascii"),
            "PATH_INFO": _unquote(path),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": name,
            "SERVER_PORT": port,
            "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("ascii"),
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
        }
    )
    return environ


def _path_and_query(target: bytes) -> tuple[bytes, bytes]:
    """A request target's path and query (ValueError if it cannot be read)."""
    if not target.startswith(b"/") and b"://" in target:
        # The absolute form (RFC 9112 section 3.2.2), which a server must
        # take as well: only its path and query are the app's business.
        parts = urllib.parse.urlsplit(target)
        return parts.path or b"/", parts.query
    path, _, query = target.partition(b"?")
    return path, query


def _unquote(raw: bytes) -> str:
    """A %-encoded URL part as PEP 3333 wants it: decoded bytes, as latin-1."""
    return urllib.parse.unquote_to_bytes(raw).decode("latin-1")


def _header_variables(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Environ entries for the request headers; repeated headers comma-joined."""
    variables: dict[str, str] = {}
    for name, value in headers:
        # X-Foo and X_Foo would both become HTTP_X_FOO; dropping names with
        # underscores stops a client from forging a header a proxy has set.
        if b"_" in name:
            continue
        key = _UNPREFIXED_HEADERS.get(name) or "HTTP_" + name.decode(
            "ascii"
        ).upper().replace("-", "_")
        text = value.decode("latin-1")
        variables[key] = f"{variables[key]},{text}" if key in variables else text
    return variables


def _server_address(host: str | None, default_name: str) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT from a Host header, or the defaults."""
    if not host:
        return default_name, "80"
    name, colon, port = host.rpartition(":")
    # "[::1]" has colons but no port; only digits after the last one are one.
    if colon and port.isascii() and port.isdigit():
        return name, port
    return host, "80"


def _make_response(status: str, headers: list[tuple[str, str]]) -> h11.Response:
    """An h11 Response from WSGI's status and headers (h11 validates them)."""
    code, _, reason = status.partition(" ")
    if len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise ValueError(f"invalid WSGI status {status!r}")
    return h11.Response(
        status_code=int(code),
        reason=reason.encode("latin-1"),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
    )


class _Channel:
    """An h11 server connection over a non-blocking socket, watching the lifeline.

    A failure (lifeline, client gone, malformed request) is remembered in
    :attr:`failure` and raised again by every later receive, so an app that
    catches it cannot carry on as if the request were fine.
    """

    def __init__(self, sock: socket.socket, lifeline: int | None) -> None:
        self.sock = sock
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_SIZE)
        self.failure: Exception | None = None
        self.request_method = b""
        """The method of the request being answered (a HEAD's answer has no
        body, an error page's neither)."""
        self._received = 0
        """Bytes received since this request began, for its head's size."""
        self._eof = False
        self._lifeline = lifeline
        # A poll object, not an epoll selector: it costs no system calls to
        # set up and tear down, and there is one per connection.
        self._poller = select.poll()
        self._events = select.POLLIN
        self._poller.register(sock, self._events)
        if lifeline is not None:
            self._poller.register(lifeline, select.POLLIN)

    def close(self) -> None:
        """Nothing to release any more (the socket is the caller's)."""

    def next_event(self) -> h11.Event:
        """The client's next event, receiving as much as it takes."""
        if self.failure is not None:
            raise self.failure
        try:
            return self._next_event()
        except (_Abort, h11.RemoteProtocolError) as exc:
            self.failure = exc
            raise

    def send(self, *events: h11.Event | None) -> None:
        """Send `events` (None ones skipped), waiting for room as often as needed."""
        if isinstance(self.failure, _Abort):
            raise self.failure
        pieces: list[bytes] = []
        for event in events:
            if event is not None:
                pieces += self.http.send_with_data_passthrough(event) or []
        # h11 frames a chunk as three pieces; join small ones into one send.
        if sum(map(len, pieces)) <= _RECV_SIZE:
            pieces = [b"".join(pieces)]
        try:
            for data in pieces:
                self._send_all(data)
        except _Abort as exc:
            self.failure = exc
            raise

    def wait(self, events: int, timeout: float | None = None) -> bool:
        """Wait until the socket is ready for `events`; False on timeout.

        Raises :class:`_LifelineFired` if the lifeline is readable.
        """
        if events != self._events:
            self._poller.modify(self.sock, events)
            self._events = events
        ready = self._poller.poll(
            None if timeout is None else math.ceil(timeout * 1000)
        )
        if any(fd == self._lifeline for fd, _ in ready):
            raise _LifelineFired("the lifeline reached end of file")
        return bool(ready)

    def continue_if_expected(self) -> None:
        """Send ``100 Continue`` if the client waits for it to send the body."""
        if self.http.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))

    def prepare(self, response: h11.Response) -> h11.Response:
        """`response`, made to close the connection if it could not go on."""
        if not self.http.they_are_waiting_for_100_continue:
            return response
        # The client held the body back and may send it or not; reading on
        # would be a guess, so close (RFC 9110 section 10.1.1).
        headers = [*response.headers.raw_items(), (b"connection", b"close")]
        return h11.Response(
            status_code=response.status_code, reason=response.reason, headers=headers
        )

    def respond_plain(self, status: int) -> None:
        """Send a complete plain-text response whose body is the status phrase
        (left out for HEAD, as h11 requires)."""
        body = http.HTTPStatus(status).phrase.encode("ascii")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        self.send(self.prepare(h11.Response(status_code=status, headers=headers)))
        if self.request_method != b"HEAD":
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def check_head_size(self) -> None:
        """Refuse (431) a request head over the limit: h11's own limit only
        bounds a head still incomplete, and one receive takes up to 64 KiB.
        What h11 has not consumed is the body or the next request."""
        size = self._received - len(self.http.trailing_data[0])
        if size > _MAX_HEAD_SIZE:
            raise h11.RemoteProtocolError(
                f"request head of {size} bytes", error_status_hint=431
            )

    def reject(self, error: h11.RemoteProtocolError) -> None:
        """Answer a malformed request with h11's status hint, if still allowed."""
        logger.info("malformed request: %s", error)
        if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.respond_plain(error.error_status_hint)

    def next_cycle(self) -> bool:
        """Get ready for the next request; False if the connection must close."""
        if self.http.our_state is h11.DONE and self.http.their_state is h11.SEND_BODY:
            self._drain()
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            self.request_method = b""
            # What is already here belongs to the next request.
            self._received = len(self.http.trailing_data[0])
            return True
        return False

    def linger(self) -> None:
        """Close our side gracefully: send EOF, then discard what the client sends.

        Closing a TCP socket with unread input resets the connection, which
        can destroy the response before the client has read it; so wait
        (bounded in bytes and time) for the client to close first. A Unix
        socket delivers everything sent before a close whatever is unread
        (the reader sees the reset only after the last byte), so there only
        what has already arrived is discarded, and no time is spent waiting:
        that wait was a wake-up of the worker for every request.
        """
        if self._eof:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        wait = self.sock.family != socket.AF_UNIX
        deadline = time.monotonic() + _LINGER_SECONDS
        discarded = 0
        while discarded <= _DRAIN_LIMIT:
            data = self._recv()
            if data is None:
                if not wait:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.wait(select.POLLIN, remaining):
                    return
                continue
            if not data:
                return
            discarded += len(data)

    def _next_event(self) -> h11.Event:
        """:meth:`next_event` without the failure bookkeeping."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                # Cut off mid-message is a client going away, not bad syntax.
                if self._eof:
                    raise _PeerGone("the client closed mid-request") from exc
                raise
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise RuntimeError("h11 paused: the client sent past a request")
            # Read first, wait only if nothing is there: a request is usually
            # in the socket by the time its connection is accepted.
            data = self._recv()
            if data is None:
                self.wait(select.POLLIN)
                continue
            self._eof = not data
            self._received += len(data)
            self.http.receive_data(data)

    def _recv(self) -> bytes | None:
        """Bytes from the socket (``b""`` at EOF), None if none were ready."""
        try:
            return self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _PeerGone(f"receive failed: {exc}") from exc

    def _send_all(self, data: bytes) -> None:
        """Send all of `data`, waiting (and watching the lifeline) when full."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view, _MSG_NOSIGNAL)
            except BlockingIOError:
                self.wait(select.POLLOUT)
                continue
            except OSError as exc:
                raise _PeerGone(f"send failed: {exc}") from exc
            view = view[sent:]

    def _drain(self) -> None:
        """Read and discard the rest of a request body the app left unread."""
        discarded = 0
        while discarded <= _DRAIN_LIMIT:
            event = self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if isinstance(event, h11.Data):
                discarded += len(event.data)


class _RequestBody(io.RawIOBase):
    """The raw request body: h11 Data events, received as the app reads.

    ``wsgi.input`` is an :class:`io.BufferedReader` over this, which gives
    ``read``, ``readline``, ``readlines`` and iteration.
    """

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel
        self._chunk = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        """Yes: this is an input stream."""
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Copy up to ``len(buffer)`` body bytes into `buffer`; 0 at the end."""
        while not self._chunk and not self._done:
            self._chunk = self._next_chunk()
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._chunk))
        target[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        return count

    def _next_chunk(self) -> memoryview:
        """The next piece of the body (empty at its end)."""
        self._channel.continue_if_expected()
        event = self._channel.next_event()
        if isinstance(event, h11.Data):
            return memoryview(event.data)
        if not isinstance(event, h11.EndOfMessage):
            raise RuntimeError(f"expected request body, h11 gave {event!r}")
        self._done = True
        return memoryview(b"")


class _Responder:
    """PEP 3333's ``start_response`` and ``write`` for one request.

    The status line and headers go out with the first non-empty body chunk,
    or at the end, so the app may still replace them after an error.
    """

    def __init__(self, channel: _Channel, *, method: bytes) -> None:
        self._channel = channel
        self._method = method
        self._response: h11.Response | None = None
        self._head_sent = False
        self._no_body = False
        """A HEAD's answer, a 204 or a 304: what the app writes is dropped."""
        self._room: int | None = None
        """Bytes the response's Content-Length has left, if it has one."""

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        """Set the status and headers; return :meth:`write`."""
        error = exc_info[1] if exc_info is not None else None
        if error is not None:
            if self._head_sent:
                raise error
        elif self._response is not None:
            raise RuntimeError("start_response() called again without exc_info")
        self._response = _make_response(status, headers)
        self._no_body = self._method == b"HEAD" or self._response.status_code in (
            204,
            304,
        )
        lengths = [v for n, v in self._response.headers if n == b"content-length"]
        self._room = int(lengths[0]) if lengths else None
        return self.write

    def write(self, data: bytes) -> None:
        """Send `data` as the next piece of the response body."""
        if self._response is None:
            raise RuntimeError("write() called before start_response()")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"WSGI body chunks must be bytes, not {type(data)}")
        if self._room is not None:
            # PEP 3333: never more than the Content-Length (h11 would refuse
            # it, with the head unsent).
            data = data[: self._room]
            self._room -= len(data)
        if not data:
            return
        # These answers have no body (h11 would refuse one); skip it.
        body = None if self._no_body else h11.Data(data=data)
        if self._head_sent:
            if body is not None:
                self._channel.send(body)
            return
        # The head goes out in one send with the first chunk: one system
        # call, and one wake-up of the reader, fewer per response.
        self._head_sent = True
        self._channel.send(self._channel.prepare(self._response), body)

    def finish(self) -> None:
        """End the response, sending the head first if no body went out."""
        if self._response is None:
            raise RuntimeError("the application returned without start_response()")
        if self._head_sent:
            self._channel.send(h11.EndOfMessage())
        else:
            self._head_sent = True
            head = self._channel.prepare(self._response)
            self._channel.send(head, h11.EndOfMessage())
