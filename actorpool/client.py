"""ApplicationPool and Session: the client side, used in the user's processes.

An :class:`ApplicationPool` is one connection to the pool server. It is
thread-safe and multiplexed: every request carries an id, so many threads
may have gets in flight and one connection may hold many sessions (the
seed's "one session per connection or it deadlocks" rule is gone).

It starts no thread of its own, so a process that holds one can still
``fork()``. Whichever waiting thread finds nobody reading becomes the reader
until its own reply arrives, handing every other reply to its owner on the
way (a leader/follower scheme).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, TypeVar

from actorpool.config import check_int, check_seconds
from actorpool.errors import (
    ActorPoolError,
    ConfigError,
    RemoteProtocolError,
    ServerGoneError,
    SpawnError,
    error_from_reply,
)
from actorpool.messages import (
    PROTOCOL_VERSION,
    Clear,
    CloseSession,
    ErrorReply,
    Get,
    GetStatistics,
    Hello,
    Reply,
    Request,
    RestartApp,
    SessionFailed,
    SessionGranted,
    SetMaxIdleTime,
    SetMaxPerApp,
    SetMaxPoolSize,
    StatisticsReply,
    WireMessage,
)
from actorpool.protocol import NEED_DATA, PEER_CLOSED, Connection, Role
from actorpool.statistics import PoolStatistics

__all__ = ["ApplicationPool", "Session"]

CONNECT_ATTEMPTS: Final = 3
"""Sessions ``get()`` tries before giving up when processes turn out dead."""

_RECV_SIZE = 64 * 1024

# How many times this process is a fork() away from where it started. A pool
# remembers the count it was made at; a different count means it is being
# used in a forked child. Cheaper than os.getpid(), a system call, per get.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class Session:
    """A connected socket to one application process, yours until :meth:`close`.

    Use it as a context manager, or call :meth:`close` (idempotent) when the
    request is done, so that the process can serve someone else.
    """

    def __init__(
        self,
        pool: ApplicationPool,
        grant: SessionGranted,
        sock: socket.socket,
    ) -> None:
        self._pool = pool
        self.id: Final = grant.session_id
        """The server's number for this session."""
        self.pid: Final = grant.pid
        """Process id of the application process."""
        self.app_root: Final = grant.app_root
        """The application the process runs."""
        self.socket: Final = sock
        """A stream socket connected to the application process."""
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Session id={self.id} pid={self.pid} app={self.app_root!r} {state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Close the socket and give the process back to the pool."""
        if self._pool._forks != _forks:  # a forked child (see _forks)
            self._close_copy()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.socket.close()
        self._pool._notify(CloseSession(self.id))

    def discard(self) -> None:
        """Close, and have the server stop the process rather than reuse it.

        For a process that misbehaved (it hung, say): the server stops it,
        and starts another when one is needed. Like :meth:`close`,
        idempotent, and nothing once closed.
        """
        if self._pool._forks != _forks:  # a forked child (see _forks)
            self._close_copy()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.socket.close()
        self._pool._notify(SessionFailed(self.id))

    def _close_copy(self) -> None:
        # In a forked child: the session is the parent's, so only this
        # process's copy of the socket is closed, and without the lock, which
        # a thread of the parent may have held at fork() (it is never
        # released here).
        self._closed = True
        self.socket.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ApplicationPool:
    """A client's connection to the pool server. Thread-safe.

    Get one from :meth:`ApplicationPoolServer.connect
    <actorpool.ApplicationPoolServer.connect>`; it speaks to the server over
    the socket it is given.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._forks = _forks  # see _check_process
        self._conn = Connection(Role.CLIENT)
        self._lock = threading.RLock()
        # Threads waiting for a reply while another thread reads the socket,
        # each on a condition of its own: the reader wakes just the threads
        # whose replies came in (and one successor when it leaves), not all.
        self._followers: dict[int, threading.Condition] = {}
        self._reading = False
        self._replies: dict[int, Reply | WireMessage] = {}
        self._abandoned: set[int] = set()
        self._error: ActorPoolError | None = None
        self._ids = itertools.count(1)
        self.server_pid = 0
        """Process id of the pool server (from its welcome)."""
        self.client_id = 0
        """The server's number for this connection."""
        try:
            self._handshake()
        except BaseException:
            sock.close()
            raise

    def __repr__(self) -> str:
        return (
            f"<ApplicationPool client={self.client_id} server_pid={self.server_pid} "
            f"{self._conn!r}>"
        )

    # --- public API -------------------------------------------------------------

    def get(
        self, app_root: str | os.PathLike[str], *, timeout: float | None = None
    ) -> Session:
        """Check out a session on a process of ``app_root``.

        Waits in the server's queue while the pool is at its limits, at most
        ``timeout`` seconds if given (then
        :class:`~actorpool.errors.GetTimeoutError`; None or ``math.inf``: for
        as long as it takes). Raises :class:`~actorpool.errors.QueueFullError`
        at once when the app's queue is full, and
        :class:`~actorpool.errors.SpawnError` when the app cannot start.
        ``timeout=0`` takes a process with room or fails at once; a spawn it
        starts (within the limits) goes on, for the gets after it.
        """
        root = os.path.abspath(os.fspath(app_root))
        if timeout is not None:
            timeout = _get_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        last_error: OSError | None = None
        for _ in range(CONNECT_ATTEMPTS):
            remaining = (
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            reply = _expect(
                self._call(functools.partial(Get, app_root=root, timeout=remaining)),
                SessionGranted,
            )
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except BaseException:  # out of descriptors, say: give it back
                self._notify(CloseSession(reply.session_id))
                raise
            try:
                sock.connect(reply.address)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                # The process died after the server chose it: say so, and
                # let the server pick (or spawn) another.
                sock.close()
                self._notify(SessionFailed(reply.session_id))
                last_error = exc
                continue
            except BaseException:
                sock.close()
                self._notify(CloseSession(reply.session_id))
                raise
            return Session(self, reply, sock)
        raise SpawnError(
            f"no process of {root} accepted a connection in {CONNECT_ATTEMPTS} tries"
        ) from last_error

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the whole pool."""
        reply = _expect(self._call(GetStatistics), StatisticsReply)
        return PoolStatistics.from_dict(reply.statistics)

    @property
    def active(self) -> int:
        """Sessions open in the whole pool."""
        return self.statistics().active

    @property
    def count(self) -> int:
        """Application processes alive or being spawned."""
        return self.statistics().count

    def clear(self) -> None:
        """Retire every process; busy ones finish their sessions first.

        Unlike :meth:`restart_app`, the spawner is not told: a
        :class:`~actorpool.spawners.SmartSpawner`'s preloaders keep the code
        they loaded.
        """
        self._call(Clear)

    def set_max_pool_size(self, value: int) -> None:
        """Change the limit on processes; waiters are served at once if it rises."""
        check_int("max_pool_size", value, minimum=1)
        self._call(lambda rid: SetMaxPoolSize(rid, value))

    def set_max_per_app(self, value: int) -> None:
        """Change the limit on processes per app (0: none)."""
        check_int("max_per_app", value, minimum=0)
        self._call(lambda rid: SetMaxPerApp(rid, value))

    def set_max_idle_time(self, seconds: float) -> None:
        """Change how long a process may stay idle (0: for ever)."""
        check_seconds("max_idle_time", seconds, allow_zero=True)
        self._call(lambda rid: SetMaxIdleTime(rid, float(seconds)))

    def restart_app(self, app_root: str | os.PathLike[str]) -> None:
        """Restart ``app_root``: new processes for new gets, busy ones finish first."""
        root = os.path.abspath(os.fspath(app_root))
        self._call(lambda rid: RestartApp(rid, root))

    def close(self) -> None:
        """Close the connection. Sessions still open are released by the server."""
        if self._forks != _forks:
            # The connection is the parent's: only this process's copy of the
            # socket is closed. No shutdown (it would end the parent's
            # connection too), and no lock: a thread of the parent may have
            # held it at fork(), and none here will ever release it.
            self._sock.close()
            return
        with self._lock:
            if self._error is None:
                self._error = ServerGoneError("this ApplicationPool was closed")
            for follower in self._followers.values():
                follower.notify()
        with contextlib.suppress(OSError):  # wakes a thread of ours reading
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> ApplicationPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- requests and replies ---------------------------------------------------

    def _handshake(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            # A server that refused the connection may have closed it already;
            # its reason is still there to read.
            self._sock.sendall(self._conn.send(Hello(PROTOCOL_VERSION, os.getpid())))
        welcome = self._wait(0)
        self.server_pid = getattr(welcome, "server_pid", 0)
        self.client_id = getattr(welcome, "client_id", 0)

    def _call(self, make: Callable[[int], Request]) -> Reply:
        """Send a request and wait for its reply; raise the error it carries."""
        self._check_process()
        with self._lock:
            if self._error is not None:
                raise self._error
            request_id = next(self._ids)
            self._send_locked(make(request_id))
        reply = self._wait(request_id)
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply.kind, reply.message, reply.detail)
        assert isinstance(reply, Reply)
        return reply

    def _notify(self, notice: WireMessage) -> None:
        """Send a notice (no reply). Quietly does nothing on a dead connection."""
        if self._forks != _forks:
            return
        with self._lock:
            if self._error is None:
                # Not contextlib.suppress: this runs for every session
                # closed, and suppress costs three Python calls.
                try:  # noqa: SIM105
                    self._send_locked(notice)
                except ActorPoolError:
                    pass

    def _send_locked(self, message: WireMessage) -> None:
        try:
            self._sock.sendall(self._conn.send(message))
        except OSError as exc:
            self._fail(ServerGoneError(f"lost the pool server: {exc}"))
            raise self._error from exc  # type: ignore[misc]

    def _wait(self, request_id: int) -> Reply | WireMessage:
        """Block until the reply to ``request_id`` (0: the welcome) is in."""
        try:
            with self._lock:
                try:
                    while request_id not in self._replies:
                        if self._error is not None:
                            raise self._error
                        if self._reading:
                            self._follow(request_id)
                        else:
                            self._lead()
                    return self._replies.pop(request_id)
                finally:
                    self._followers.pop(request_id, None)
                    if not self._reading:
                        self._hand_over()
        except BaseException:
            # Interrupted (KeyboardInterrupt, say): give back a session that
            # is granted later, or was granted just before, instead of
            # leaking it.
            if request_id:
                with self._lock:
                    reply = self._replies.pop(request_id, None)
                    if reply is None:
                        self._abandoned.add(request_id)
                if isinstance(reply, SessionGranted):
                    self._notify(CloseSession(reply.session_id))
            raise

    def _relock(self, pending: BaseException | None) -> BaseException | None:
        """Take the lock back, whatever signal handlers raise meanwhile
        (a wait for a lock can be interrupted); the first thing raised."""
        while True:
            try:
                self._lock.acquire()
                return pending
            except BaseException as exc:
                pending = pending or exc

    def _follow(self, request_id: int) -> None:
        """Wait (lock held) until the reader has news for ``request_id``."""
        follower = self._followers.get(request_id)
        if follower is None:
            follower = self._followers[request_id] = threading.Condition(self._lock)
        follower.wait()

    def _lead(self) -> None:
        """Read the socket once (lock held, released while reading)."""
        self._reading = True
        try:
            self._lock.release()
            data: bytes | None
            interrupted: BaseException | None = None
            try:
                data = self._sock.recv(_RECV_SIZE)
            except OSError:
                data = b""
            except BaseException as exc:  # a signal handler raised: nothing read
                data, interrupted = None, exc
            interrupted = self._relock(interrupted)
            # What was read is fed even if a signal came since: it may hold
            # other threads' replies, which would be lost with it.
            if data is not None:
                self._feed(data)
            if interrupted is not None:
                raise interrupted
        finally:
            self._reading = False
            for request_id, follower in self._followers.items():
                if self._error is not None or request_id in self._replies:
                    follower.notify()

    def _hand_over(self) -> None:
        """Wake one thread still waiting for its reply to read next (lock held)."""
        for request_id, follower in self._followers.items():
            if request_id not in self._replies:
                follower.notify()
                return

    def _feed(self, data: bytes) -> None:
        """Turn received bytes into replies for their waiters (lock held)."""
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                self._fail(exc)
                return
            if event is NEED_DATA:
                return
            if event is PEER_CLOSED:
                self._fail(ServerGoneError("the pool server closed the connection"))
                return
            assert isinstance(event, WireMessage)
            if isinstance(event, Reply) and event.request_id == 0:
                assert isinstance(event, ErrorReply)
                self._fail(
                    RemoteProtocolError(f"the server closed on us: {event.message}")
                )
                return
            key = event.request_id if isinstance(event, Reply) else 0
            if key in self._abandoned:
                self._abandoned.discard(key)
                if isinstance(event, SessionGranted):
                    self._send_locked(CloseSession(event.session_id))
                continue
            self._replies[key] = event

    def _fail(self, error: ActorPoolError) -> None:
        if self._error is None:
            self._error = error

    def _check_process(self) -> None:
        if self._forks != _forks:
            raise ActorPoolError(
                "an ApplicationPool cannot be used across fork(); "
                "call server.connect() in the child"
            )


_R = TypeVar("_R", bound=Reply)


def _get_timeout(timeout: object) -> float | None:
    """``timeout`` checked; None (no limit) for ``math.inf``.

    No upper bound, unlike the config's spans: the server's alarm copes with
    any deadline, and a huge one just means "for ever".
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"timeout must be a number or None, not {timeout!r}")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int beyond any float
        return None
    if not seconds >= 0:  # NaN too
        raise ConfigError(f"timeout must be >= 0, not {timeout!r}")
    return None if seconds == math.inf else seconds


def _expect(reply: Reply, kind: type[_R]) -> _R:
    """``reply`` if it is a ``kind``; any other answer breaks the protocol."""
    if not isinstance(reply, kind):
        raise RemoteProtocolError(
            f"expected {kind.__name__}, the server answered {type(reply).__name__}"
        )
    return reply
