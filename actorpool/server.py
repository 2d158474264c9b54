"""ApplicationPoolServer: starts the pool server process and connects to it.

The server runs in a fresh interpreter (``subprocess`` with
``sys.executable``), never in a bare ``fork()`` of the caller, and the
caller keeps nothing but one end of the connect channel and the child's
process handle: no threads. So the process that made the server can go on
to ``fork()`` workers safely, the way a prefork web server does, and each
child calls :meth:`ApplicationPoolServer.connect` then
:meth:`ApplicationPoolServer.detach`.

Inside the server process the actors start in order (spawner, registry,
acceptor) and stop in reverse; stopping the spawner stops every
application process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Any

import pykka

from actorpool._poll import poll_ms
from actorpool.acceptor import CONNECT, SHUTDOWN, AcceptorActor
from actorpool.client import ApplicationPool
from actorpool.config import PoolConfig, check_seconds
from actorpool.errors import ActorPoolError, ServerGoneError
from actorpool.fdpassing import send_fd
from actorpool.registry import RegistryActor
from actorpool.spawner import Spawner, SpawnerActor

__all__ = ["ApplicationPoolServer"]

logger = logging.getLogger(__name__)

_BOOT = "from actorpool.server import _server_main; _server_main()"


@dataclasses.dataclass(frozen=True)
class _Bootstrap:
    config: PoolConfig
    spawner: Spawner
    channel_fd: int
    log_level: int


class ApplicationPoolServer:
    """A pool server in its own process, reachable only through :meth:`connect`.

    ``config`` sets the pool's limits; ``spawner`` starts application
    processes (it is pickled into the server process). The constructor
    returns once the server is ready, or raises
    :class:`~actorpool.errors.ActorPoolError` if it could not start within
    ``start_timeout`` seconds.
    """

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        spawner: Spawner,
        start_timeout: float = 30.0,
    ) -> None:
        if config is not None and not isinstance(config, PoolConfig):
            # Or it would fail in the new process, with an AttributeError.
            raise TypeError(f"config must be a PoolConfig, not {type(config).__name__}")
        check_seconds("start_timeout", start_timeout, allow_zero=False)
        self.config = config or PoolConfig()
        self._creator_pid = os.getpid()
        self._connect_lock = threading.Lock()
        self._channel: socket.socket | None
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = _Bootstrap(
            self.config,
            spawner,
            theirs.fileno(),
            logging.getLogger("actorpool").getEffectiveLevel(),
        )
        payload = pickle.dumps((list(sys.path), pickle.dumps(boot)))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                # Own session: a Ctrl-C meant for the creator does not kill
                # the server behind its back; the creator's close() does.
                start_new_session=True,
            )
        except BaseException:
            self._channel.close()
            raise
        finally:
            theirs.close()
        try:
            self._await_ready(payload, start_timeout)
        except BaseException:
            self._kill()
            raise

    def __repr__(self) -> str:
        state = "detached" if self._channel is None else "attached"
        return f"<ApplicationPoolServer pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """Process id of the pool server."""
        return self._process.pid

    def connect(self) -> ApplicationPool:
        """Open a new connection to the server, as an :class:`ApplicationPool`.

        Works in the creating process and in any process forked from it that
        has not called :meth:`detach`. Each call gives a separate connection.
        Raises :class:`~actorpool.errors.ServerGoneError` when the server has
        stopped, :class:`~actorpool.errors.RemoteProtocolError` when it
        refuses the connection (its ``max_clients`` reached), saying so, and
        :class:`~actorpool.errors.ActorPoolError` after :meth:`detach` or
        :meth:`close`.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._connect_lock:
                if self._channel is None:
                    raise ActorPoolError(
                        "this ApplicationPoolServer was detached or closed"
                    )
                try:
                    send_fd(self._channel, CONNECT, theirs.fileno())
                except OSError as exc:
                    raise ServerGoneError(
                        f"cannot reach the pool server: {exc}"
                    ) from exc
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # The handshake (in ApplicationPool) says whether the server took it.
        return ApplicationPool(ours)

    def detach(self) -> None:
        """Close this process's copy of the connect channel.

        Call it in a forked child after :meth:`connect`: connections already
        made keep working, and the server can shut down once the creator and
        every child have let go of the channel. Idempotent.
        """
        with self._connect_lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
        self._close_pipes()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the server and every application process, and wait for it.

        In a process forked from the creator this only detaches. Idempotent.
        """
        if os.getpid() != self._creator_pid:
            self.detach()
            return
        with self._connect_lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.send(SHUTDOWN)
            channel.close()
        elif self._process.poll() is None:
            # Detached already: no channel to ask on, and children may still
            # hold theirs. The server takes SIGTERM as the same request.
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("the pool server did not stop in %.0f s; killing it", timeout)
            self._kill()
        self._close_pipes()

    def __enter__(self) -> ApplicationPoolServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- start-up -------------------------------------------------------------

    def _await_ready(self, payload: bytes, timeout: float) -> None:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            stdin.write(payload)
            stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the status read below says so
        status = _read_status(stdout, time.monotonic() + timeout)
        stdout.close()
        if status != b"ready":
            reason = status.decode(errors="replace") or "it exited during start-up"
            raise ActorPoolError(f"the pool server failed to start: {reason}")

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        self._process.wait()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _read_status(stdout: IO[bytes], deadline: float) -> bytes:
    chunks: list[bytes] = []
    fd = stdout.fileno()
    # poll, not select: the creator may well hold descriptors numbered past
    # select()'s 1024 (a busy web server does).
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ActorPoolError("the pool server did not start in time")
        if not poller.poll(poll_ms(remaining)):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).strip()
        chunks.append(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0].strip()


# --- inside the server process -----------------------------------------------------


def _server_main() -> None:
    """Entry point of the server process (see ``_BOOT``)."""
    status = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed from now on goes to the log, not the status pipe
    try:
        path, boot_bytes = pickle.load(sys.stdin.buffer)
        sys.path[:] = path
        boot: _Bootstrap = pickle.loads(boot_bytes)
        # Nothing more comes on stdin; instances must not inherit the pipe.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    except BaseException as exc:
        status.write(f"bad bootstrap: {exc!r}\n".encode())
        raise
    pid = os.getpid()
    logging.basicConfig(
        level=boot.log_level,
        format=f"%(asctime)s actorpool[{pid}] %(levelname)s %(name)s: %(message)s",
    )
    _run_server(boot, status)


def _run_server(boot: _Bootstrap, status: Any) -> None:
    channel = socket.socket(fileno=boot.channel_fd)
    socket_dir = tempfile.mkdtemp(prefix="actorpool-")  # mode 0700
    stopping = _StopRequest()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    started: list[Any] = []
    try:
        spawner = SpawnerActor.start(
            boot.spawner,
            socket_dir,
            boot.config.spawn_timeout,
            boot.config.user,
            on_fatal=stopping.set,
        )
        started.append(spawner)
        registry = RegistryActor.start(boot.config, spawner, on_fatal=stopping.set)
        started.append(registry)
        started.append(
            AcceptorActor.start(
                channel,
                registry,
                on_close=stopping.set,
                max_clients=boot.config.max_clients,
            )
        )
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the creator may be gone
            status.write(f"{exc!r}\n".encode())
        _stop_all(started)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    try:
        try:
            status.write(b"ready\n")
            status.close()
        except OSError as exc:
            # The creator died (or gave up) before it read the word: nobody
            # else can hold the channel yet. Without this the actors' threads
            # would keep the process alive with no one left to stop them.
            logger.warning("pool server's creator is gone (%s); stopping", exc)
            return
        logger.info(
            "pool server ready (pid %d, sockets in %s)", os.getpid(), socket_dir
        )
        stopping.wait()
        logger.info("pool server stopping")
    finally:
        _stop_all(started)
        shutil.rmtree(socket_dir, ignore_errors=True)


class _StopRequest:
    """A one-way flag the main thread waits on, safe to set in a signal handler.

    Not a ``threading.Event``: its ``set()`` takes a lock that the main thread
    holds for a few bytecodes inside ``wait()``, so a signal landing there
    would deadlock the server. A byte down a pipe takes no lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def set(self) -> None:
        """Ask the main thread to stop; from any thread or a signal handler."""
        with contextlib.suppress(OSError):  # a full pipe has said it already
            os.write(self._write, b"x")

    def wait(self) -> None:
        """Block until :meth:`set` has been called, once or more."""
        os.read(self._read, 1)


STOP_TIMEOUT = 30.0
"""Seconds each actor may take to stop before the server gives up and exits."""


def _stop_all(refs: list[Any]) -> None:
    for ref in reversed(refs):
        try:
            ref.stop(timeout=STOP_TIMEOUT)
        except pykka.Timeout:
            # A stuck actor must not keep the server (and the creator's
            # close()) waiting for ever: exit, and let the operating system
            # close every descriptor. Instances watch the server's end.
            logger.critical("%r did not stop in %.0f s; exiting", ref, STOP_TIMEOUT)
            os._exit(1)
        except Exception:
            logger.exception("stopping %r failed", ref)
