"""Test helpers users can reuse: :class:`FakeSpawner` and :class:`FakeClock`.

:class:`FakeSpawner` starts no processes. Each "instance" is a Unix-socket
listener on threads inside the server process that greets every connection
with one line, ``"<app_root> <pid>\\n"``, then echoes what it is sent. Its pids
are fake (above any real pid) and unique. Tests control it from their own
process, even though the spawner runs inside the pool server: every control
method travels over a private Unix socket in a temporary directory made when
the FakeSpawner is. In the process where it runs (actor-level tests), the
same methods act directly.

::

    spawner = FakeSpawner(hold=True)
    with ApplicationPoolServer(PoolConfig(), spawner=spawner) as server:
        pool = server.connect()
        ...  # a get now waits for the held spawn
        spawner.wait_for("spawn", app_root="/srv/a")
        spawner.release("/srv/a")
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import msgpack
import pykka

from actorpool.errors import SpawnError
from actorpool.spawner import Instance, Spawner, SpawnRequest

__all__ = ["Barrier", "FakeCall", "FakeClock", "FakeSpawner", "Recorder", "take"]

FAKE_PID_BASE: Final = 10_000_000
"""Fake pids start above this, out of reach of real ones (Linux caps at 2**22)."""


@dataclasses.dataclass(frozen=True, slots=True)
class FakeCall:
    """One thing that happened in a FakeSpawner."""

    kind: str
    """``spawn`` (started), ``ready``, ``failed``, ``stopped`` or ``crashed``."""
    app_root: str
    """The instance's app."""
    instance_id: int
    """The pool's number for the instance."""
    pid: int
    """Its fake pid (0 for ``spawn`` and ``failed``)."""


class Barrier:
    """Ask it of an actor: the answer means every earlier message was handled."""


class Recorder(pykka.ThreadingActor):
    """A stand-in actor that puts every message it is told into a queue.

    Give its URN where an actor expects a collaborator (``ClientAttached``,
    ``RegistryAttached``), then :func:`take` what it was told.
    """

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self.inbox = inbox

    def on_receive(self, message: Any) -> None:
        if not isinstance(message, Barrier):
            self.inbox.put(message)


_M = TypeVar("_M")


def take(inbox: queue.Queue[Any], kind: type[_M], timeout: float = 5.0) -> _M:
    """The next message in ``inbox``, which must be a ``kind``."""
    message = inbox.get(timeout=timeout)
    assert isinstance(message, kind), message
    return message


class FakeClock:
    """A clock for the pure policy and actors: time moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FakeClock {self._now}>"

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; returns the new time."""
        with self._lock:
            self._now += seconds
            return self._now


class FakeSpawner(Spawner):
    """A spawner whose instances are in-process listeners, fully under test control.

    ``spawn_delay`` seconds pass before each spawn completes; ``hold`` (True
    or some app roots) keeps spawns waiting until :meth:`release`; ``fail``
    (app roots, or a mapping of app root to message) makes spawns of those
    apps fail; ``concurrency`` is what each instance reports.
    """

    def __init__(
        self,
        *,
        spawn_delay: float = 0.0,
        hold: bool | Iterable[str] = False,
        fail: Iterable[str] | Mapping[str, str] = (),
        concurrency: int = 1,
    ) -> None:
        self._control_dir = tempfile.mkdtemp(prefix="actorpool-fake-")
        self.control_path = os.path.join(self._control_dir, "control.sock")
        """Where the control socket listens once the spawner has started."""
        failing = dict(fail) if isinstance(fail, Mapping) else dict.fromkeys(fail, "")
        self._settings: dict[str, Any] = {
            "spawn_delay": spawn_delay,
            "hold_all": hold is True,
            "held": [] if isinstance(hold, bool) else list(hold),
            "failing": {
                k: v or f"fake spawn failure of {k}" for k, v in failing.items()
            },
            "concurrency": concurrency,
        }
        self._backend: _Backend | None = None

    def __repr__(self) -> str:
        where = "running" if self._backend else "controller"
        return f"<FakeSpawner {where} control={self.control_path!r}>"

    def __getstate__(self) -> dict[str, Any]:
        # Only configuration travels to the server process.
        return {**self.__dict__, "_backend": None}

    # --- the Spawner side (inside the server process) -----------------------

    def start(self, socket_dir: str) -> None:
        self._backend = _Backend(self._settings, socket_dir, self.control_path)

    def spawn(self, request: SpawnRequest) -> Instance:
        assert self._backend is not None, "start() was not called"
        return self._backend.spawn(request)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    # --- the control side (any process) ------------------------------------

    def hold(self, app_root: str | None = None) -> None:
        """Hold spawns of ``app_root`` (None: every app) until :meth:`release`."""
        self._control("hold", app_root=app_root)

    def release(self, app_root: str | None = None) -> None:
        """Let held spawns of ``app_root`` (None: every app) go ahead."""
        self._control("release", app_root=app_root)

    def fail(self, app_root: str, message: str = "") -> None:
        """Make spawns of ``app_root`` fail from now on."""
        self._control("fail", app_root=app_root, message=message)

    def succeed(self, app_root: str) -> None:
        """Undo :meth:`fail` for ``app_root``."""
        self._control("succeed", app_root=app_root)

    def crash(self, pid: int) -> None:
        """Make the instance with fake ``pid`` die, as if killed."""
        self._control("crash", pid=pid)

    def calls(self) -> list[FakeCall]:
        """Everything that happened so far, in order."""
        return [FakeCall(**c) for c in self._control("calls")]

    def wait_for(
        self,
        kind: str,
        *,
        app_root: str | None = None,
        pid: int | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[FakeCall]:
        """Block until ``count`` calls of ``kind`` match; return the matches.

        Raises :class:`TimeoutError` after ``timeout`` seconds.
        """
        found = self._control(
            "wait_for",
            kind=kind,
            app_root=app_root,
            pid=pid,
            count=count,
            timeout=timeout,
        )
        return [FakeCall(**c) for c in found]

    def cleanup(self) -> None:
        """Remove the control directory (call it in the test's process)."""
        shutil.rmtree(self._control_dir, ignore_errors=True)

    def __enter__(self) -> FakeSpawner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _control(self, method: str, **kwargs: Any) -> Any:
        if self._backend is not None:
            return self._backend.call(method, kwargs)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.control_path)
            sock.sendall(msgpack.packb([method, kwargs]))
            sock.shutdown(socket.SHUT_WR)
            ok, result = msgpack.unpackb(_read_all(sock))
        if not ok:
            kind, text = result
            raise TimeoutError(text) if kind == "TimeoutError" else RuntimeError(text)
        return result


class _Backend:
    """The FakeSpawner's live state inside the server process."""

    _CONTROL_METHODS: Final = frozenset(
        {"hold", "release", "fail", "succeed", "crash", "calls", "wait_for"}
    )

    def __init__(
        self, settings: dict[str, Any], socket_dir: str, control_path: str
    ) -> None:
        self._socket_dir = socket_dir
        self._delay: float = settings["spawn_delay"]
        self._concurrency: int = settings["concurrency"]
        self._hold_all: bool = settings["hold_all"]
        self._held: set[str] = set(settings["held"])
        self._released: set[str] = set()
        self._failing: dict[str, str] = dict(settings["failing"])
        self._calls: list[FakeCall] = []
        self._instances: dict[int, _FakeInstance] = {}
        self._pids = itertools.count(FAKE_PID_BASE + 1)
        self._closed = False
        self._cond = threading.Condition()
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        self._control.bind(control_path)
        self._control.listen(16)
        self._control_path = control_path
        threading.Thread(
            target=self._serve_control, name="fake-control", daemon=True
        ).start()

    # --- spawning -------------------------------------------------------------

    def spawn(self, request: SpawnRequest) -> Instance:
        app = request.app_root
        self._record("spawn", app, request.instance_id, 0)
        with self._cond:
            released = self._cond.wait_for(
                lambda: self._closed or not self._is_held(app), request.timeout
            )
            if self._closed:
                raise SpawnError("the spawner is closing")
            if not released:
                self._record_locked("failed", app, request.instance_id, 0)
                raise SpawnError(f"{app} did not start in {request.timeout} s")
            if self._delay and self._cond.wait_for(lambda: self._closed, self._delay):
                raise SpawnError("the spawner is closing")
            message = self._failing.get(app)
            if message is not None:
                self._record_locked("failed", app, request.instance_id, 0)
                raise SpawnError(message, f"Traceback (fake):\n  spawning {app}\n")
            pid = next(self._pids)
            # Made under the lock, so that close() either sees it or has
            # already refused it: no listener outlives the spawner.
            address = os.path.join(self._socket_dir, f"fake-{request.instance_id}.sock")
            instance = _FakeInstance(
                app, pid, request.instance_id, address, self._concurrency, self._record
            )
            self._instances[pid] = instance
            self._record_locked("ready", app, request.instance_id, pid)
        return instance

    def close(self) -> None:
        with self._cond:
            self._closed = True
            instances = list(self._instances.values())
            self._cond.notify_all()
        for instance in instances:
            instance.stop()
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._control_path)

    def _is_held(self, app: str) -> bool:
        return app in self._held or (self._hold_all and app not in self._released)

    def _record(self, kind: str, app: str, instance_id: int, pid: int) -> None:
        with self._cond:
            self._record_locked(kind, app, instance_id, pid)

    def _record_locked(self, kind: str, app: str, instance_id: int, pid: int) -> None:
        self._calls.append(FakeCall(kind, app, instance_id, pid))
        self._cond.notify_all()

    # --- control --------------------------------------------------------------

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        if method not in self._CONTROL_METHODS:
            raise ValueError(f"unknown control method {method!r}")
        handler: Callable[..., Any] = getattr(self, f"_do_{method}")
        return handler(**kwargs)

    def _do_hold(self, app_root: str | None) -> None:
        with self._cond:
            if app_root is None:
                self._hold_all, self._released = True, set()
            else:
                self._held.add(app_root)

    def _do_release(self, app_root: str | None) -> None:
        with self._cond:
            if app_root is None:
                self._hold_all = False
                self._held.clear()
            else:
                self._held.discard(app_root)
                self._released.add(app_root)
            self._cond.notify_all()

    def _do_fail(self, app_root: str, message: str) -> None:
        with self._cond:
            self._failing[app_root] = message or f"fake spawn failure of {app_root}"

    def _do_succeed(self, app_root: str) -> None:
        with self._cond:
            self._failing.pop(app_root, None)

    def _do_crash(self, pid: int) -> None:
        with self._cond:
            instance = self._instances.get(pid)
        if instance is None:
            raise ValueError(f"no fake instance with pid {pid}")
        instance.crash()

    def _do_calls(self) -> list[dict[str, Any]]:
        with self._cond:
            return [dataclasses.asdict(c) for c in self._calls]

    def _do_wait_for(
        self,
        kind: str,
        app_root: str | None,
        pid: int | None,
        count: int,
        timeout: float,
    ) -> list[dict[str, Any]]:
        def matches() -> list[FakeCall]:
            return [
                c
                for c in self._calls
                if c.kind == kind
                and (app_root is None or c.app_root == app_root)
                and (pid is None or c.pid == pid)
            ]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matches()) >= count, timeout):
                seen = len(matches())
                raise TimeoutError(
                    f"waited {timeout} s for {count} {kind!r} calls; saw {seen}"
                )
            return [dataclasses.asdict(c) for c in matches()]

    def _serve_control(self) -> None:
        while True:
            try:
                conn, _ = self._control.accept()
            except OSError:
                self._control.close()
                return
            threading.Thread(
                target=self._answer, args=(conn,), name="fake-control-call", daemon=True
            ).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                method, kwargs = msgpack.unpackb(_read_all(conn))
                reply: list[Any] = [True, self.call(method, kwargs)]
            except Exception as exc:
                reply = [False, [type(exc).__name__, str(exc)]]
            with contextlib.suppress(OSError):
                conn.sendall(msgpack.packb(reply))


class _FakeInstance:
    """A listener that greets each connection and echoes; "dies" on demand."""

    def __init__(
        self,
        app_root: str,
        pid: int,
        instance_id: int,
        address: str,
        concurrency: int,
        record: Callable[[str, str, int, int], None],
    ) -> None:
        self.app_root = app_root
        self.pid = pid
        self.instance_id = instance_id
        self.address = address
        self.concurrency = concurrency
        self._record = record
        self._exited = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(address)
        self._listener.listen(64)
        threading.Thread(target=self._accept, name=f"fake-{pid}", daemon=True).start()

    def __repr__(self) -> str:
        state = "exited" if self._exited.is_set() else "running"
        return f"<_FakeInstance pid={self.pid} app={self.app_root!r} {state}>"

    def stop(self) -> None:
        self._end("stopped")

    def crash(self) -> None:
        self._end("crashed")

    def wait(self) -> None:
        self._exited.wait()

    def _end(self, kind: str) -> None:
        with self._lock:
            if self._exited.is_set():
                return
            self._exited.set()
            connections = list(self._connections)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._record(kind, self.app_root, self.instance_id, self.pid)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                break
            with self._lock:
                if self._exited.is_set():
                    conn.close()
                    break
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        self._listener.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.sendall(f"{self.app_root} {self.pid}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
