"""The HTTP work of one request, piece by piece, against gunicorn's whole request.

Run from the repository root, with gunicorn installed (``pip install
gunicorn``)::

    python benchmarks/bench_http.py                  # about ten seconds
    python benchmarks/bench_http.py --quick          # a smoke run
    python benchmarks/bench_http.py --instructions   # counted (valgrind)

``bench_serve.py`` measures whole servers under wrk, where every figure
includes the scheduling of a dozen processes on two CPUs. This one times, in
a hot loop in one process and one thread, what each part of ``actorpool
serve`` must do in Python for one request of ``examples/hello``, with its
real code and real sockets, and compares it with what a gunicorn sync
worker does for the whole request:

(a) gunicorn's sync worker, the baseline: its own ``handle`` (parse the
    request, build the environ, call the app, write the response, close) on
    a connection whose request is already there;
(b) actorpool's WSGI worker: ``serve_connection`` and the close, the same
    way (h11 parses and frames; the environ; the app);
(c) actorpool's front end, without the pool: ``serve_client`` for one
    request, with a stand-in pool whose session is a socket that already
    holds the app's response (h11 parses the client's request, frames the
    request to the app, parses the app's response and frames it for the
    client: h11 on both sides). The stand-in session's own sockets (a
    socket pair, the response written into it, two closes) are timed apart
    and left out.

Every request is a ``GET`` over a fresh ``socketpair``, written and followed
by end of file before the server part runs, and read after it, so no piece
waits and none is woken: these are the least each piece costs (the end of
file stands for the client's close that gunicorn, which always closes, waits
for; and for the next request of a keep-alive client in the front end). The
pool's get+close comes on top (``bench_policy.py`` counts it), and so does
everything scheduling costs. gunicorn's figure leaves out the TCP accept and
close a sync worker does per request under wrk, which makes the baseline
look cheaper than it is in ``bench_serve.py``.

The last line adds up (b) and (c): the HTTP work of one proxied request,
against (a). If it is k times (a), a server doing only this work, with the
pool and all scheduling for free, could serve at most 1/k of gunicorn's
requests per second on a machine where both are CPU-bound.

(d) is h11's share of (b) + (c): the same h11 calls on the same bytes, with
no sockets and nothing else (the front end's server and client
connections, the worker's server connection). Taken out, it gives the
ceiling for a server whose HTTP parsing and framing cost nothing, which
bounds what any faster parser (a C one such as httptools) could bring.

Each figure is the best of 5 rounds of 2,000 requests, in µs per request;
the cases take turns, round by round. Even so the figures move by a fifth
from run to run on a shared VM, so ``--instructions`` counts instead what
each case executes, with valgrind's callgrind (``apt-get install -y
valgrind``; about three minutes), the same way as ``bench_policy.py``: each
case in a process of its own, with 200 and 1,200 requests, the difference
over 1,000. Either way each figure includes the client's side of the socket
pair (a send, a shutdown, the reads), the same in every case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import logging
import os
import shutil
import socket
import sys
import threading
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello"

sys.path.insert(0, str(HELLO))
from passenger_wsgi import application  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import h11  # noqa: E402
from _callgrind import add_arguments, instructions_per_call  # noqa: E402

from actorpool.frontend.proxy import ProxyOptions, serve_client  # noqa: E402
from actorpool.frontend.routes import Router, parse_route  # noqa: E402
from actorpool.spawners.wsgi import serve_connection  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
"""What wrk sends."""

APP_REQUEST = (
    b"GET / HTTP/1.1\r\nhost: 127.0.0.1:8000\r\nx-forwarded-for: 127.0.0.1\r\n"
    b"connection: close\r\n\r\n"
)
"""What actorpool's front end sends the app for :data:`REQUEST`."""


def best(runs: list[Callable[[], object]], number: int) -> list[float]:
    """Seconds per call of each of ``runs``: the best of 5 rounds of ``number``
    calls, the rounds taking turns so that a slow spell of a shared machine
    does not fall on one of them only."""
    times = [float("inf")] * len(runs)
    for _ in range(5):
        for index, run in enumerate(runs):
            times[index] = min(times[index], timeit.timeit(run, number=number))
    return [t / number for t in times]


def exchange(request: bytes, serve: Callable[[socket.socket], object]) -> bytes:
    """Have ``serve`` answer ``request`` on a fresh socket pair; the answer.

    The request is already there, followed by end of file, so nothing waits:
    the end of file stands for the client's close that gunicorn (which always
    closes) waits for, and for the next request of a keep-alive client in
    the front end.
    """
    server, client = socket.socketpair()
    with client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        with server:  # closed again if serve closed it: harmless
            serve(server)
        return read_all(client)


def read_all(sock: socket.socket) -> bytes:
    """Everything until end of file."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def response_of(raw: bytes) -> bytes:
    """The status line and body of an HTTP response, to compare servers by."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0] + b" | " + body


# --- (a) gunicorn ------------------------------------------------------------------


def gunicorn_request() -> Callable[[], bytes]:
    """One request through a gunicorn sync worker's own ``handle``."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from gunicorn.workers.sync import SyncWorker

    cfg = Config()
    cfg.set("errorlog", os.devnull)
    listener = socket.socket(socket.AF_INET)  # only asked for its name
    listener.bind(("127.0.0.1", 0))
    worker = SyncWorker(0, os.getpid(), [listener], None, 30, cfg, Logger(cfg))
    worker.wsgi = application

    def serve(server: socket.socket) -> None:
        worker.handle(listener, server, ("127.0.0.1", 40000))

    return functools.partial(exchange, REQUEST, serve)


# --- (b) actorpool's worker --------------------------------------------------------


def worker_request() -> Callable[[], bytes]:
    """One request through the bundled worker, as it serves a session."""
    return functools.partial(
        exchange, APP_REQUEST, functools.partial(serve_connection, application)
    )


# --- (c) actorpool's front end -----------------------------------------------------


class _CannedSession:
    """A session whose app has already answered: its socket holds the response."""

    app_root = str(HELLO)
    pid = 0

    def __init__(self, response: bytes) -> None:
        self.socket, self._app = socket.socketpair()
        self._app.sendall(response)
        self._app.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.socket.close()
        self._app.close()

    def __enter__(self) -> _CannedSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _CannedPool:
    """Stands in for ``ApplicationPool``: every get is a canned session."""

    def __init__(self, response: bytes) -> None:
        self._response = response

    def get(self, app_root: str, timeout: float | None = None) -> _CannedSession:
        return _CannedSession(self._response)


def frontend_request(app_response: bytes) -> Callable[[], bytes]:
    """One request through the front end's ``serve_client``, pool left out."""
    pool: Any = _CannedPool(app_response)
    router = Router([parse_route(str(HELLO))])
    options = ProxyOptions()
    stopping = threading.Event()

    def serve(server: socket.socket) -> None:
        serve_client(server, "127.0.0.1", pool, router, options, stopping)

    return functools.partial(exchange, REQUEST, serve)


# --- (d) h11's share ---------------------------------------------------------------


def _events(conn: h11.Connection) -> list[Any]:
    """Every event ``conn`` has, up to the first NEED_DATA or PAUSED."""
    events = []
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(event)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return events


def _send(conn: h11.Connection, *events: h11.Event) -> bytes:
    return b"".join(conn.send(event) or b"" for event in events)


def h11_work(app_response: bytes) -> dict[str, Callable[[], bytes]]:
    """The h11 calls of one request in the front end and in the worker."""
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    reader.send(h11.EndOfMessage())
    reader.receive_data(app_response)
    response, data, _ = _events(reader)
    body = data.data
    # The headers each side sends: the worker its app's, the front end those
    # it relays to the client (hop-by-hop ones dropped). The events are made
    # per request, as the real code makes them: h11 checks every header
    # when an event is made.
    app_headers = [(n, v) for n, v in response.headers if n != b"connection"]
    to_app_headers = [
        ("host", "127.0.0.1:8000"),
        ("x-forwarded-for", "127.0.0.1"),
        ("connection", "close"),
    ]

    def frontend() -> bytes:
        client = h11.Connection(h11.SERVER)
        client.receive_data(REQUEST)
        _events(client)
        app = h11.Connection(h11.CLIENT)
        to_app = h11.Request(method="GET", target="/", headers=to_app_headers)
        sent = _send(app, to_app, h11.EndOfMessage())
        app.receive_data(app_response)
        answer = _events(app)[0]
        relayed = h11.Response(
            status_code=answer.status_code,
            headers=[(n, v) for n, v in answer.headers if n != b"connection"],
        )
        sent += _send(client, relayed, h11.Data(data=body), h11.EndOfMessage())
        # Keep-alive: the next request, here the client's end of file.
        client.start_next_cycle()
        client.receive_data(b"")
        _events(client)
        return sent

    def worker() -> bytes:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(APP_REQUEST)
        _events(conn)
        response = h11.Response(status_code=200, headers=app_headers)
        return _send(conn, response, h11.Data(data=body), h11.EndOfMessage())

    return {"h11-frontend": frontend, "h11-worker": worker}


# --- the report --------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No log lines from the servers while they are timed."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def cases() -> dict[str, Callable[[], bytes]]:
    """Each case's loop body: one request, returning what the client read."""
    worker = worker_request()
    # The front end relays what the worker really answers.
    app_response = worker()
    return {
        "gunicorn": gunicorn_request(),
        "worker": worker,
        "frontend": frontend_request(app_response),
        "stand-in": functools.partial(stand_in_sockets, app_response),
        **h11_work(app_response),
    }


def stand_in_sockets(app_response: bytes) -> bytes:
    """What a :class:`_CannedSession` costs by itself, to take out of (c)."""
    _CannedSession(app_response).close()
    return b""


def check_answers(runs: dict[str, Callable[[], bytes]]) -> None:
    """Exit unless every server answers as gunicorn does: else no comparison."""
    expected = response_of(runs["gunicorn"]())
    for name in ("worker", "frontend"):
        answer = runs[name]()
        if response_of(answer) != expected:
            sys.exit(f"{name} answered {answer!r}, gunicorn {expected!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        import gunicorn
    except ImportError:
        sys.exit("bench_http needs gunicorn (the baseline): pip install gunicorn")
    if args.run:  # one case's loop, for callgrind to count
        body = cases()[args.run[0]]
        with quiet():
            for _ in range(int(args.run[1])):
                body()
        return
    runs = cases()
    with quiet():
        check_answers(runs)
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("--instructions needs valgrind (apt-get install -y valgrind)")
        how, unit = "counted by callgrind", "instructions"
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as executor:
            counts = executor.map(
                lambda case: instructions_per_call(__file__, case), runs
            )
            figures = dict(zip(runs, counts, strict=True))
    else:
        number = 200 if args.quick else 2000
        how, unit = f"best of 5 rounds of {number}", "µs"
        with quiet():
            seconds = best(list(runs.values()), number)
        figures = {case: 1e6 * each for case, each in zip(runs, seconds, strict=True)}
    print(
        f"# bench_http: Python {sys.version.split()[0]}, gunicorn"
        f" {gunicorn.__version__}; per request, {how}"
    )
    # The stand-in's own sockets are not the front end's work (it would
    # make one socket and connect it instead): left out, in its favour.
    base, worker = figures["gunicorn"], figures["worker"]
    frontend = figures["frontend"] - figures["stand-in"]
    h11_share = figures["h11-frontend"] + figures["h11-worker"]
    rows = [
        ("(a) gunicorn sync worker, whole request", base),
        ("(b) actorpool worker (h11, WSGI)", worker),
        ("(c) actorpool front end, pool left out (h11 x 2)", frontend),
        ("(b) + (c): HTTP work of one proxied request", worker + frontend),
        ("(d) of which h11 (front end and worker)", h11_share),
        ("(b) + (c) - (d): the rest", worker + frontend - h11_share),
    ]
    style = ",.0f" if args.instructions else ".1f"
    print(f"\n{'':52} {unit:>12} {'vs (a)':>8}")
    for name, figure in rows:
        print(f"{name:52} {figure:12{style}} {figure / base:7.2f}x")
    print(
        f"\n(c) leaves out the stand-in session's own sockets,"
        f" {figures['stand-in']:{style}} {unit} a request"
    )
    print(
        f"ceiling with the pool and all scheduling free: "
        f"{base / (worker + frontend):.2f}x gunicorn's requests per second"
    )
    print(
        f"... and h11 free too: "
        f"{base / (worker + frontend - h11_share):.2f}x gunicorn's requests per second"
    )


if __name__ == "__main__":
    main()
