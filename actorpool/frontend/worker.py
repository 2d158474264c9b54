"""A front-end worker process of ``actorpool serve``.

Forked by the master, it connects to the pool server (and lets go of the
connect channel, as the seed's children do), then accepts HTTP clients on
its own listening socket (one per worker, bound with ``SO_REUSEPORT``; see
``master._listeners``), each served on a thread of its own by
:func:`~actorpool.frontend.proxy.serve_client`. A worker with every thread
busy stops accepting: the kernel has already chosen it for the clients in
its socket's queue, so they wait for one of its threads, not a sibling's.

SIGTERM or SIGINT: stop accepting, let the requests in progress finish
within the grace period, exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import signal
import socket
import threading
import time

from actorpool.client import ApplicationPool
from actorpool.frontend.proxy import ProxyOptions, serve_client
from actorpool.frontend.routes import Router
from actorpool.server import ApplicationPoolServer

__all__ = ["WorkerOptions", "run_worker"]

logger = logging.getLogger("actorpool.frontend")

ACCEPT_PAUSE = 0.5
"""Seconds a worker stops accepting after running out of descriptors or
memory: the clients it serves go on, and free some as they finish."""

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept(2): network errors already pending on the new connection are
# reported by accept itself, and are to be taken like EAGAIN (the client is
# gone); EPERM is a firewall's refusal of that one client.
_CLIENT_GONE = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.ENOPROTOOPT,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ENONET,
    errno.EOPNOTSUPP,
    errno.EPERM,
}


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What a front-end worker needs to know."""

    router: Router
    proxy: ProxyOptions
    threads: int = 16
    """Client connections served at once."""
    grace: float = 30.0
    """Seconds requests in progress may take to finish after SIGTERM."""


def run_worker(
    listener: socket.socket,
    server: ApplicationPoolServer,
    options: WorkerOptions,
    inherited: list[int],
) -> int:
    """Serve until told to stop; the exit status. ``inherited``: the master's
    descriptors this process must not keep (its signal pipe, status socket)."""
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # the wakeup fd says which
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's business
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pool = server.connect()
    server.detach()
    worker = _Worker(listener, pool, options)
    try:
        worker.accept_until_stopped(wake_r)
    finally:
        worker.finish(options.grace)
        pool.close()
    return 0


class _Worker:
    def __init__(
        self, listener: socket.socket, pool: ApplicationPool, options: WorkerOptions
    ) -> None:
        self._listener = listener
        self._pool = pool
        self._options = options
        self._stopping = threading.Event()
        self._free = threading.Semaphore(options.threads)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()

    def accept_until_stopped(self, wake_fd: int) -> None:
        """Accept clients until SIGTERM or SIGINT arrives on ``wake_fd``."""
        self._listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(wake_fd, selectors.EVENT_READ)
            while True:
                # Only accept with a thread to serve the client.
                while not self._free.acquire(timeout=1.0):
                    if _stop_signalled(wake_fd):
                        return
                for key, _ in selector.select():
                    if key.fileobj == wake_fd and _stop_signalled(wake_fd):
                        self._free.release()
                        return
                try:
                    conn, address = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    self._free.release()  # a sibling took it
                    continue
                except OSError as exc:
                    if exc.errno in _CLIENT_GONE:
                        self._free.release()
                        continue
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Not this worker's end: the clients it serves go on, and
                    # new ones wait in the queue meanwhile.
                    self._free.release()
                    logger.error(
                        "worker %d: cannot accept (%s); pausing %g s",
                        os.getpid(),
                        exc.strerror,
                        ACCEPT_PAUSE,
                    )
                    if _stop_signalled_within(wake_fd, ACCEPT_PAUSE):
                        return
                    continue
                self._start(conn, address)

    def _start(self, conn: socket.socket, address: object) -> None:
        conn.setblocking(True)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # A response goes out as head then body, two sends: with Nagle's
            # algorithm the body waits for the client's delayed ACK of the
            # head, 40 ms a response.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._connections.add(conn)
        thread = threading.Thread(
            target=self._serve,
            args=(conn, _address_string(address)),
            name="actorpool-client",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: this client only
            logger.error("worker %d: cannot serve a client: %s", os.getpid(), exc)
            conn.close()
            with self._lock:
                self._connections.discard(conn)
            self._free.release()

    def _serve(self, conn: socket.socket, address: str) -> None:
        try:
            serve_client(
                conn,
                address,
                self._pool,
                self._options.router,
                self._options.proxy,
                self._stopping,
            )
        except Exception:  # a bug costs this client only
            logger.exception("serving %s failed", address)
        finally:
            conn.close()
            with self._lock:
                self._connections.discard(conn)
                self._idle.notify_all()
            self._free.release()

    def finish(self, grace: float) -> None:
        """Stop accepting; wait up to ``grace`` s for the clients being served."""
        self._stopping.set()
        self._listener.close()
        deadline = time.monotonic() + grace
        with self._lock:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning(
                        "worker %d: %d client(s) still open after %.0f s; closing",
                        os.getpid(),
                        len(self._connections),
                        grace,
                    )
                    break
                self._idle.wait(remaining)


def _stop_signalled(wake_fd: int) -> bool:
    """Whether a stop signal is among what arrived on the wakeup fd."""
    os.set_blocking(wake_fd, False)
    try:
        data = os.read(wake_fd, 512)
    except BlockingIOError:
        return False
    return any(signum in (signal.SIGTERM, signal.SIGINT) for signum in data)


def _stop_signalled_within(wake_fd: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for a stop signal on the wakeup fd."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        with selectors.DefaultSelector() as selector:
            selector.register(wake_fd, selectors.EVENT_READ)
            if selector.select(remaining) and _stop_signalled(wake_fd):
                return True
    return False


def _address_string(address: object) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "-"
