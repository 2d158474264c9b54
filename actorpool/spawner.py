"""The Spawner protocol and the SpawnerActor that runs it off the registry.

A :class:`Spawner` knows how to start one application process and hands back
an :class:`Instance`. It is the replaceable part: ``FakeSpawner`` for tests,
``DirectSpawner`` and ``SmartSpawner`` for real apps. A spawner object is
made in the user's process and pickled into the server process, so it holds
configuration only until :meth:`Spawner.start` runs there.

:class:`SpawnerActor` calls the spawner. Every spawn runs on a thread of its
own, so a slow or hung app start delays only the clients that wait for that
app; each running instance has a watcher thread that reports its exit. The
actor talks to the registry only with messages from :mod:`actorpool.messages`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pykka

from actorpool.errors import SpawnError
from actorpool.messages import (
    AppRestarted,
    InstanceExited,
    InstanceReady,
    RegistryAttached,
    SpawnFailed,
    SpawnInstance,
    StopInstance,
)

__all__ = ["Instance", "SpawnRequest", "Spawner", "SpawnerActor"]

logger = logging.getLogger(__name__)

STOP_GRACE = 5.0
"""Seconds shutdown waits for stopped instances to exit."""

SPAWN_TIMEOUT_GRACE = 1.0
"""Seconds past ``spawn_timeout`` after which the actor gives up on a spawn
that its spawner did not time out itself."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnRequest:
    """What a spawner is asked to start."""

    instance_id: int
    """The pool's number for the new process (unique in this server)."""
    app_root: str
    """The application's root directory (absolute)."""
    socket_dir: str
    """A private (0700) directory where the instance should put its socket."""
    timeout: float
    """Seconds the process may take to become ready; then the spawn fails."""
    user: str | None = None
    """``PoolConfig.user``: who the process should run as (None: the default)."""


class Instance(Protocol):
    """A running application process, as a spawner hands it back."""

    pid: int
    """Its process id."""
    address: str
    """Path of the Unix socket it accepts sessions on."""
    concurrency: int
    """Sessions it serves at once (1: one request at a time)."""

    def stop(self) -> None:
        """Ask the process to exit. Returns promptly; :meth:`wait` sees the exit."""

    def wait(self) -> None:
        """Block until the process has exited."""


class Spawner(abc.ABC):
    """Starts application processes. Runs inside the server process."""

    def start(self, socket_dir: str) -> None:  # noqa: B027 (optional hook)
        """Called once in the server process before the first spawn."""

    @abc.abstractmethod
    def spawn(self, request: SpawnRequest) -> Instance:
        """Start a process and block until it is ready.

        Runs on a thread of its own. Raise :class:`~actorpool.errors.SpawnError`
        (with the app's output) when the app cannot start.
        """

    def app_restarted(self, app_root: str) -> None:  # noqa: B027 (optional hook)
        """The app restarted: later spawns must load its code afresh.

        Called on the spawner actor's thread, before any spawn that follows
        the restart; it must return promptly.
        """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Called once at shutdown, after every instance was stopped."""


# Private messages of the SpawnerActor, from its own threads. _SpawnDone holds
# a live Instance, so unlike every other message it never leaves this module.


@dataclasses.dataclass(frozen=True, slots=True)
class _SpawnDone:
    instance_id: int
    instance: Instance | None
    error: SpawnError | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Exited:
    instance_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Overdue:
    instance_id: int


class SpawnerActor(pykka.ThreadingActor):
    """Runs a :class:`Spawner` for the registry, one thread per spawn."""

    def __init__(
        self,
        spawner: Spawner,
        socket_dir: str,
        spawn_timeout: float,
        user: str | None = None,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        # __init__ runs in the thread that starts the actor, so a spawner that
        # cannot start fails the server's start-up instead of a later spawn.
        spawner.start(socket_dir)
        self._spawner = spawner
        self._on_fatal = on_fatal
        self._socket_dir = socket_dir
        self._spawn_timeout = spawn_timeout
        self._user = user
        self._registry: pykka.ActorRef[Any] | None = None
        self._spawning: dict[int, bool] = {}  # instance id -> cancelled
        self._running: dict[int, Instance] = {}
        # Instances a spawn thread has told the actor about that the actor has
        # not taken yet: a _SpawnDone queued behind the stop message is never
        # handled, so on_stop must find them here. Shared with spawn threads.
        self._lock = threading.Lock()
        self._stopping = False
        self._unclaimed: dict[int, Instance] = {}
        self._spawn_threads: dict[int, threading.Thread] = {}
        self._overdue: dict[int, threading.Timer] = {}
        self._watchers: dict[int, threading.Thread] = {}
        self._handlers: dict[type, Any] = {
            RegistryAttached: self._on_registry_attached,
            SpawnInstance: self._on_spawn,
            StopInstance: self._on_stop_instance,
            AppRestarted: self._on_app_restarted,
            _SpawnDone: self._on_spawn_done,
            _Exited: self._on_exited,
            _Overdue: self._on_overdue,
        }

    def __repr__(self) -> str:
        return (
            f"<SpawnerActor {type(self._spawner).__name__} "
            f"spawning={len(self._spawning)} running={len(self._running)}>"
        )

    def on_receive(self, message: Any) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            logger.warning("SpawnerActor ignores unexpected message %r", message)
            return
        handler(message)

    def on_stop(self) -> None:
        for overdue in self._overdue.values():
            overdue.cancel()
        with self._lock:
            self._stopping = True
            unclaimed = list(self._unclaimed.values())
            self._unclaimed.clear()
        for instance in [*self._running.values(), *unclaimed]:
            _stop_quietly(instance)
        deadline = time.monotonic() + STOP_GRACE
        for watcher in self._watchers.values():
            watcher.join(max(0.0, deadline - time.monotonic()))
        self._spawner.close()
        # Spawns still under way finish (or give up, now that the spawner is
        # closed) and stop what they started, before the server removes the
        # socket directory under them.
        for thread in self._spawn_threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def on_failure(self, *_exc_info: object) -> None:
        # Nothing could be spawned any more, nor an exit reported: the
        # registry would hand out sessions on stopped processes and leave
        # waiters waiting. Stop what runs and let the server stop.
        logger.critical("the spawner actor failed; shutting the pool server down")
        self.on_stop()
        if self._on_fatal is not None:
            self._on_fatal()

    # --- handlers -----------------------------------------------------------

    def _on_registry_attached(self, message: RegistryAttached) -> None:
        self._registry = pykka.ActorRegistry.get_by_urn(message.actor_urn)

    def _on_spawn(self, message: SpawnInstance) -> None:
        request = SpawnRequest(
            message.instance_id,
            message.app_root,
            self._socket_dir,
            self._spawn_timeout,
            self._user,
        )
        thread = threading.Thread(
            target=self._run_spawn,
            args=(request,),
            name=f"actorpool-spawn-{message.instance_id}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had (a thread limit)
            logger.error("cannot spawn instance %d: %s", message.instance_id, exc)
            self._tell_registry(
                SpawnFailed(message.instance_id, f"cannot start a spawn thread: {exc}")
            )
            return
        self._spawning[message.instance_id] = False
        self._spawn_threads[message.instance_id] = thread
        # A backstop for spawners that do not honour request.timeout: the
        # waiters get their SpawnError on time, and whatever the spawn still
        # brings up is stopped (the spawn counts as cancelled).
        overdue = threading.Timer(
            self._spawn_timeout + SPAWN_TIMEOUT_GRACE,
            self._tell_self,
            args=(_Overdue(message.instance_id),),
        )
        overdue.daemon = True
        try:
            overdue.start()
        except RuntimeError as exc:  # the spawn goes on, with its own timeout
            logger.warning(
                "no backstop for instance %d's spawn_timeout: %s",
                message.instance_id,
                exc,
            )
            return
        self._overdue[message.instance_id] = overdue

    def _on_stop_instance(self, message: StopInstance) -> None:
        if message.instance_id in self._spawning:
            self._spawning[message.instance_id] = True  # stop it once it is up
        elif (instance := self._running.get(message.instance_id)) is not None:
            logger.debug(
                "stopping instance %d (pid %d)", message.instance_id, instance.pid
            )
            _stop_quietly(instance)

    def _on_app_restarted(self, message: AppRestarted) -> None:
        try:
            self._spawner.app_restarted(message.app_root)
        except Exception:  # a spawner bug must not stop the actor
            logger.exception("spawner failed to restart %s", message.app_root)

    def _on_overdue(self, message: _Overdue) -> None:
        if self._overdue.pop(message.instance_id, None) is None:
            return  # it finished meanwhile
        if self._spawning.pop(message.instance_id, True):
            return  # gone, or cancelled: the registry forgot it already
        logger.error(
            "instance %d did not start in %g s",
            message.instance_id,
            self._spawn_timeout,
        )
        self._tell_registry(
            SpawnFailed(
                message.instance_id,
                f"the app did not start within spawn_timeout ({self._spawn_timeout} s)",
            )
        )

    def _on_spawn_done(self, message: _SpawnDone) -> None:
        self._spawn_threads.pop(message.instance_id, None)
        if (overdue := self._overdue.pop(message.instance_id, None)) is not None:
            overdue.cancel()
        with self._lock:
            self._unclaimed.pop(message.instance_id, None)
        cancelled = self._spawning.pop(message.instance_id, True)
        instance = message.instance
        if instance is None:
            if not cancelled:  # else the registry has forgotten it already
                self._spawn_failed(message.instance_id, message.error)
            return
        # What a spawner hands back goes on the wire and into the policy: a
        # wrong type there would fail every client that waits for it, or the
        # registry itself. Such an instance is a failed spawn.
        try:
            ready = InstanceReady(
                message.instance_id,
                _checked(instance.pid, int, "pid"),
                _checked(instance.address, str, "address"),
                _checked(instance.concurrency, int, "concurrency"),
            )
            if ready.pid < 1 or ready.concurrency < 1:
                raise ValueError(f"pid {ready.pid}, concurrency {ready.concurrency}")
        except Exception as exc:
            logger.error(
                "instance %d: the spawner handed back a bad instance: %s",
                message.instance_id,
                exc,
            )
            _stop_quietly(instance)
            if not cancelled:
                self._spawn_failed(
                    message.instance_id,
                    SpawnError(f"the spawner handed back a bad instance: {exc}"),
                )
            return
        watcher = threading.Thread(
            target=self._watch,
            args=(message.instance_id, instance),
            name=f"actorpool-watch-{message.instance_id}",
            daemon=True,
        )
        try:
            watcher.start()
        except RuntimeError as exc:  # no thread: its exit could not be seen
            _stop_quietly(instance)
            if not cancelled:
                self._spawn_failed(
                    message.instance_id,
                    SpawnError(f"cannot start a thread to watch the process: {exc}"),
                )
            return
        self._running[message.instance_id] = instance
        self._watchers[message.instance_id] = watcher
        if cancelled:
            _stop_quietly(instance)
            return
        self._tell_registry(ready)

    def _spawn_failed(self, instance_id: int, error: BaseException | None) -> None:
        """Tell the registry, with text the wire can carry whatever the
        spawner put in its error (bytes from a pipe, say)."""
        message = str(error.args[0]) if error is not None and error.args else ""
        output = getattr(error, "output", "")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        elif not isinstance(output, str):
            output = repr(output)
        self._tell_registry(SpawnFailed(instance_id, message or "spawn failed", output))

    def _on_exited(self, message: _Exited) -> None:
        self._running.pop(message.instance_id, None)
        self._watchers.pop(message.instance_id, None)
        self._tell_registry(InstanceExited(message.instance_id))

    # --- threads --------------------------------------------------------------

    def _run_spawn(self, request: SpawnRequest) -> None:
        instance: Instance | None = None
        error: SpawnError | None = None
        try:
            instance = self._spawner.spawn(request)
        except SpawnError as exc:
            error = exc
        except Exception as exc:  # a spawner bug must not lose the waiters
            logger.exception("spawner raised while starting %s", request.app_root)
            error = SpawnError(f"spawner failed: {exc!r}")
        if instance is not None:
            with self._lock:
                stopping = self._stopping
                if not stopping:
                    self._unclaimed[request.instance_id] = instance
            if stopping:  # shutting down: nobody else will stop it
                _stop_quietly(instance)
                return
        # If the actor is gone, on_stop (or on_failure) stops the unclaimed one.
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(_SpawnDone(request.instance_id, instance, error))

    def _watch(self, instance_id: int, instance: Instance) -> None:
        try:
            instance.wait()
        finally:
            with contextlib.suppress(pykka.ActorDeadError):
                self.actor_ref.tell(_Exited(instance_id))

    def _tell_self(self, message: object) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(message)

    def _tell_registry(self, message: object) -> None:
        if self._registry is not None:
            # At shutdown the registry stops before the spawner.
            with contextlib.suppress(pykka.ActorDeadError):
                self._registry.tell(message)


_T = TypeVar("_T")


def _checked(value: object, kind: type[_T], name: str) -> _T:
    """``value``, if it is a ``kind`` (a bool is no int here); else TypeError."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {kind.__name__}, not {value!r}")
    return value


def _stop_quietly(instance: Instance) -> None:
    try:
        instance.stop()
    except Exception:
        logger.exception(
            "stopping instance pid %s failed", getattr(instance, "pid", "?")
        )
