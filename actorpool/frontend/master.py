"""The master process of ``actorpool serve``: the seed's picture as a command.

The master binds the TCP address, creates the pool server, and forks the
front-end workers (and the metrics process, if asked for), which all
connect to the pool and detach, as the seed's children do. It stays
single-threaded, so it can fork a replacement whenever a worker dies. It
waits in one ``select`` on its signal pipe and its status socket; signal
handlers only write to that pipe (gunicorn's arbiter does the same).

- SIGTERM, SIGINT: stop; workers finish their requests within the grace
  period; the pool server and every app process stop; exit 0.
- SIGHUP: restart every app (new processes for new requests; busy ones
  finish first).
- A worker that dies is replaced.

The status socket (in a private runtime directory) answers ``actorpool
status`` and ``actorpool restart-app``: one JSON request line, one JSON reply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from actorpool.config import PoolConfig
from actorpool.errors import ActorPoolError
from actorpool.frontend.worker import WorkerOptions, run_worker
from actorpool.server import ApplicationPoolServer
from actorpool.spawner import Spawner

__all__ = ["ServeOptions", "default_runtime_dir", "serve"]

logger = logging.getLogger("actorpool.frontend")

STATUS_TIMEOUT = 2.0
"""Seconds a status client may take to send its whole request line, and
to take the reply: the master answers nothing else meanwhile (signals, dead
workers), so a client that sends a byte now and then must not hold it
longer."""

KILL_AFTER_GRACE = 5.0
"""Seconds past the grace period after which stopping workers are killed."""

HEALTHY_LIFETIME = 5.0
"""Seconds a worker (or the metrics process) must live for its death to be
made up for at once."""
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Waits before replacing a worker that died young, one more step each
time in a row: a worker that cannot start (say, --max-clients below
--workers) is not forked again in a tight loop; nor is a metrics process
that cannot bind its address."""

METRICS_SLOT = -1
"""The metrics process's slot among the workers' (0, 1, ...), for the
bookkeeping of deaths and replacements they share."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything ``actorpool serve`` was told."""

    host: str
    port: int
    workers: int
    worker: WorkerOptions
    pool: PoolConfig
    spawner: Spawner
    runtime_dir: str
    metrics: tuple[str, int] | None = None


def default_runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/actorpool``, else ``/tmp/actorpool-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "actorpool")
    return f"/tmp/actorpool-{os.geteuid()}"


def private_dir(path: str) -> str:
    """Create ``path`` mode 0700, or check that it is ours and private."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ActorPoolError(f"{path} is not a directory of this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ActorPoolError(f"{path} is open to other users (mode must be 0700)")
    return path


def serve(options: ServeOptions) -> int:
    """Run until SIGTERM or SIGINT; the exit status."""
    listeners = _listen(options.host, options.port, options.workers)
    metrics_listener = None
    try:
        if options.metrics is not None:
            # Bound here, once, and held: an address in use stops the start,
            # a metrics process that is replaced serves the same socket (no
            # one can take the port in between), and port 0 is one port.
            metrics_listener = _listen_once(*options.metrics)
        master = _Master(options, listeners, metrics_listener)
    except BaseException:
        for listener in listeners:
            listener.close()
        if metrics_listener is not None:
            metrics_listener.close()
        raise
    try:
        return master.run()
    finally:
        master.close()


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """:func:`_listeners`, failing with an error that names the address."""
    return _naming_the_address(host, port, lambda: _listeners(host, port, count))


def _listen_once(host: str, port: int) -> socket.socket:
    """One socket bound to ``(host, port)``, without ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _naming_the_address(
        host,
        port,
        lambda: socket.create_server((host, port), family=family, backlog=64),
    )


_T = TypeVar("_T")


def _naming_the_address(host: str, port: int, bind: Callable[[], _T]) -> _T:
    """``bind()``, its OSError turned into an error that names the address."""
    try:
        return bind()
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ActorPoolError(
            f"cannot listen on {where}: {exc.strerror or exc}"
        ) from exc


def _listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one address with ``SO_REUSEPORT``.

    One per worker: the kernel spreads new connections over them evenly. On
    one shared socket, the worker that happened to be waiting took every
    client of a burst, and with it all the work, leaving the other cores idle.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # SO_REUSEPORT would let this serve share a port another one (of
        # the same user) listens on, and take half its clients: a bind
        # without it fails with EADDRINUSE there.
        with socket.create_server((host, port), family=family):
            pass
    first = socket.create_server(
        (host, port), family=family, backlog=1024, reuse_port=True
    )
    port = first.getsockname()[1]  # the one chosen, for port 0
    listeners = [first]
    try:
        for _ in range(count - 1):
            listeners.append(
                socket.create_server(
                    (host, port), family=family, backlog=1024, reuse_port=True
                )
            )
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


class _Master:
    def __init__(
        self,
        options: ServeOptions,
        listeners: list[socket.socket],
        metrics_listener: socket.socket | None = None,
    ) -> None:
        self.options = options
        self.listeners = listeners
        self.metrics_listener = metrics_listener
        self.started = time.time()
        self.workers: dict[int, int] = {}  # pid -> its listener's index
        self.started_at: dict[int, float] = {}  # slot -> when its worker was forked
        self.young_deaths: dict[int, int] = {}  # slot -> deaths in a row, young
        self.due: dict[int, float] = {}  # slot -> when to replace its worker
        self.metrics_pid = 0
        self.stopping = False
        self.status_code = 0
        self.server: ApplicationPoolServer | None = None
        self.status: socket.socket | None = None
        try:
            directory = private_dir(options.runtime_dir)
        except OSError as exc:
            raise ActorPoolError(
                f"cannot use {options.runtime_dir} as the runtime directory: {exc}"
            ) from exc
        self.status_path = os.path.join(directory, f"serve-{os.getpid()}.sock")
        self.wake_r, self.wake_w = os.pipe()

    def run(self) -> int:
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, lambda *_: None)  # the wakeup fd says which
        self.server = ApplicationPoolServer(
            self.options.pool, spawner=self.options.spawner
        )
        try:
            self.status = _listen_private(self.status_path)
        except OSError as exc:  # a path too long for a Unix socket, say
            raise ActorPoolError(
                f"cannot make the status socket {self.status_path}: {exc}"
            ) from exc
        print(
            f"actorpool serve: {_url(self.listeners[0])} (master pid "
            f"{os.getpid()}, pool server pid {self.server.pid})\n"
            f"actorpool serve: status socket {self.status_path}",
            flush=True,
        )
        if self.metrics_listener is not None:
            print(
                f"actorpool serve: metrics {_url(self.metrics_listener)}metrics",
                flush=True,
            )
        try:
            # In the try: a fork that fails (EAGAIN) must not leave the
            # workers forked before it running without a master.
            for slot in range(self.options.workers):
                self._fork_worker(slot)
            if self.options.metrics is not None:
                self._fork_metrics()
            while not self.stopping:
                status_fd = self.status.fileno()
                timeout = None
                if self.due:
                    timeout = max(0.0, min(self.due.values()) - time.monotonic())
                readable, _, _ = select.select(
                    [self.wake_r, status_fd], [], [], timeout
                )
                self._replace_due_workers()
                if status_fd in readable:
                    self._answer_status()
                if self.wake_r in readable:
                    self._on_signals(os.read(self.wake_r, 512))
        finally:
            # Closed now, not at exit: a client connecting while the workers
            # finish would wait in a queue nobody accepts from again, then
            # be reset; now it is refused at once (the workers close their
            # own copies as they stop).
            for listener in self.listeners:
                listener.close()
            # Whatever ended the loop, no worker outlives the master.
            self._stop_children()
        return self.status_code

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        if self.server is not None:
            self.server.close()
        if self.status is not None:
            self.status.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.status_path)
        for listener in self.listeners:
            listener.close()
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    # --- signals -------------------------------------------------------------------

    def _on_signals(self, data: bytes) -> None:
        # Stopping first: Ctrl-C signals the workers too, and their exits
        # must not be taken for deaths to make up for.
        if signal.SIGTERM in data or signal.SIGINT in data:
            logger.info("stopping (graceful, %.0f s)", self.options.worker.grace)
            self.stopping = True
        if signal.SIGCHLD in data:
            self._reap()
        if signal.SIGHUP in data and not self.stopping:
            self._restart_all()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                slot = self.workers.pop(pid)
                if not self.stopping:
                    self._schedule_replacement(slot, pid, status)
            elif self.server is not None and pid == self.server.pid:
                # Reaped here rather than by server.close(), which copes.
                logger.critical("the pool server exited (%s); stopping", _how(status))
                self.stopping = True
                self.status_code = 1
            elif pid == self.metrics_pid:
                self.metrics_pid = 0
                if not self.stopping:
                    self._schedule_replacement(METRICS_SLOT, pid, status)

    def _schedule_replacement(self, slot: int, pid: int, status: int) -> None:
        if time.monotonic() - self.started_at[slot] >= HEALTHY_LIFETIME:
            self.young_deaths.pop(slot, None)
            delay = 0.0
        else:
            delay = self._next_delay(slot)
        what = "metrics process" if slot == METRICS_SLOT else "worker"
        logger.warning(
            "%s %d exited (%s); starting another in %g s",
            what,
            pid,
            _how(status),
            delay,
        )
        self.due[slot] = time.monotonic() + delay

    def _replace_due_workers(self) -> None:
        now = time.monotonic()
        for slot, when in sorted(self.due.items()):
            if when <= now and not self.stopping:
                del self.due[slot]
                try:
                    if slot == METRICS_SLOT:
                        self._fork_metrics()
                    else:
                        self._fork_worker(slot)
                except OSError as exc:  # EAGAIN, ENOMEM: tried again later
                    delay = self._next_delay(slot)
                    logger.error("cannot fork (%s); trying again in %g s", exc, delay)
                    self.due[slot] = now + delay

    def _next_delay(self, slot: int) -> float:
        """One more failure in a row for ``slot``: how long to wait now."""
        deaths = self.young_deaths[slot] = self.young_deaths.get(slot, 0) + 1
        return RESTART_DELAYS[min(deaths, len(RESTART_DELAYS)) - 1]

    def _restart_all(self) -> None:
        assert self.server is not None
        pool = None
        try:
            pool = self.server.connect()
            apps = {route.app_root for route in self.options.worker.router.routes}
            apps.update(app.app_root for app in pool.statistics().apps)
            for app_root in sorted(apps):
                pool.restart_app(app_root)
            logger.info("SIGHUP: restarted %d app(s)", len(apps))
        except (ActorPoolError, OSError) as exc:  # EMFILE: not the serve's end
            logger.error("SIGHUP: restarting the apps failed: %s", exc)
        finally:
            if pool is not None:
                pool.close()

    # --- children ------------------------------------------------------------------

    def _fork_worker(self, slot: int) -> None:
        assert self.server is not None
        assert self.status is not None
        pid = fork_without_signals()
        if pid == 0:
            status = 1
            try:
                listener = self.listeners[slot]
                others = [s.detach() for s in self.listeners if s is not listener]
                if self.metrics_listener is not None:
                    others.append(self.metrics_listener.detach())
                status = run_worker(
                    listener,
                    self.server,
                    self.options.worker,
                    self._inherited() + others,
                )
            except BaseException:
                logger.exception("front-end worker %d failed", os.getpid())
            finally:
                _exit(status)
        self.workers[pid] = slot
        self.started_at[slot] = time.monotonic()

    def _fork_metrics(self) -> None:
        assert self.server is not None
        assert self.options.metrics is not None
        pid = fork_without_signals()
        if pid == 0:
            status = 1
            try:
                status = self._run_metrics()
            except BaseException:
                logger.exception("metrics process %d failed", os.getpid())
            finally:
                _exit(status)
        self.metrics_pid = pid
        self.started_at[METRICS_SLOT] = time.monotonic()

    def _run_metrics(self) -> int:
        from actorpool.frontend.metrics import serve_metrics

        assert self.server is not None
        assert self.metrics_listener is not None
        for fd in self._inherited():
            os.close(fd)
        for listener in self.listeners:
            listener.close()
        pool = self.server.connect()
        self.server.detach()
        serve_metrics(self.metrics_listener, lambda: self._status_data(pool))
        return 0

    def _inherited(self) -> list[int]:
        """The master's descriptors a child must close."""
        assert self.status is not None
        return [self.wake_r, self.wake_w, self.status.detach()]

    def _stop_children(self) -> None:
        children = set(self.workers)
        if self.metrics_pid:
            children.add(self.metrics_pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.worker.grace + KILL_AFTER_GRACE
        while children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                children.discard(pid)
                continue
            if time.monotonic() > deadline:
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            select.select([self.wake_r], [], [], 0.1)  # woken by SIGCHLD
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 512)

    # --- the status socket -------------------------------------------------------

    def _answer_status(self) -> None:
        assert self.status is not None
        try:
            conn, _ = self.status.accept()
        except OSError:
            return
        with conn:
            deadline = time.monotonic() + STATUS_TIMEOUT
            try:
                request = json.loads(_read_line(conn, deadline))
            # RecursionError: JSON nested deeper than the parser's stack.
            except (OSError, ValueError, RecursionError) as exc:
                reply: dict[str, Any] = {"error": f"bad request: {exc}"}
            else:
                try:
                    reply = self._status_request(request)
                except ActorPoolError as exc:
                    reply = {"error": str(exc)}
                except Exception as exc:  # never the master's end (EMFILE, say)
                    logger.exception("answering a status request failed")
                    reply = {"error": f"status failed: {exc}"}
            with contextlib.suppress(OSError):
                # Its own time, counted from now: the request's may be used
                # up by the statistics, and at 0 a large reply would be cut.
                conn.settimeout(STATUS_TIMEOUT)
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _status_request(self, request: Any) -> dict[str, Any]:
        assert self.server is not None
        command = request.get("command") if isinstance(request, dict) else None
        pool = self.server.connect()
        try:
            if command == "status":
                return self._status_data(pool)
            if command == "restart-app":
                app_root = request.get("app_root")
                if not isinstance(app_root, str) or not os.path.isabs(app_root):
                    return {"error": "restart-app needs an absolute app_root"}
                known = {r.app_root for r in self.options.worker.router.routes}
                known.update(app.app_root for app in pool.statistics().apps)
                if app_root not in known:
                    # Like passenger-config: a typo must not look like success.
                    return {"error": f"{app_root} is not an app this serve runs"}
                pool.restart_app(app_root)
                return {"restarted": app_root}
            return {"error": f"unknown command {command!r}"}
        finally:
            pool.close()

    def _status_data(self, pool: Any) -> dict[str, Any]:
        from actorpool.frontend.status import status_data

        assert self.server is not None
        return status_data(
            pool.statistics(),
            server_pid=self.server.pid,
            started=self.started,
            extra={
                "master_pid": os.getpid(),
                "workers": sorted(self.workers),
                "bind": f"{self.options.host}:{self.options.port}",
                "routes": [
                    dataclasses.asdict(route)
                    for route in self.options.worker.router.routes
                ],
            },
        )


MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
"""The signals the master handles (through its wake-up pipe)."""


def fork_without_signals() -> int:
    """``os.fork()``, with the master's signal handling left behind in the child.

    The master's signals are blocked across the fork, and the child drops
    the master's handlers and wake-up pipe before it unblocks them. Else a
    signal that reached a child before it set up its own would be written to
    the pipe it shares with the master, which would take it as its own: a
    SIGTERM meant for one new worker would stop the whole server.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for signum in MASTER_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's business
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return pid


def _url(listener: socket.socket) -> str:
    """``http://host:port/`` of a listening socket."""
    host, port = listener.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _listen_private(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _read_line(conn: socket.socket, deadline: float, limit: int = 65536) -> bytes:
    """One line from ``conn``, all of it by ``deadline`` (else TimeoutError)."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request took too long")
        conn.settimeout(remaining)
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError("request too long")
    return data


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
