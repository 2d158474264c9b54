"""RegistryActor: the one owner of the pool's state.

It wraps the pure :class:`~actorpool.pool.Pool`: each message becomes a call
with the current time, and each decision that comes back becomes a reply to
a client or a message to the spawner. It never blocks on another actor:
replies go out through the client's :class:`~actorpool.session.ClientProxy`
(a non-blocking write), and a get that cannot be served now simply stays in
the pool's queue until a later event answers it.

Its inbox is a :class:`~actorpool.reader.SocketReader`, which reads the
client sockets while no message is queued; see that module for why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pykka

from actorpool.config import PoolConfig
from actorpool.messages import (
    AppRestarted,
    Clear,
    ClientAttached,
    ClientDetached,
    ClientRequest,
    CloseSession,
    Done,
    ErrorReply,
    Get,
    GetStatistics,
    InstanceExited,
    InstanceReady,
    RegistryAttached,
    Reply,
    Request,
    RestartApp,
    SessionFailed,
    SessionGranted,
    SetMaxIdleTime,
    SetMaxPerApp,
    SetMaxPoolSize,
    SpawnFailed,
    SpawnInstance,
    StatisticsReply,
    StopInstance,
    Tick,
)
from actorpool.pool import Decision, Fail, Grant, Pool, Spawn, Stop
from actorpool.reader import SocketReader
from actorpool.restart import RestartWatcher
from actorpool.session import ClientProxy

__all__ = ["RegistryActor"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

MAX_ALARM_WAIT = 3600.0
"""Longest single wait of the alarm thread; longer deadlines are re-checked."""


@dataclasses.dataclass(frozen=True, slots=True)
class _InboxBroken:
    """The inbox's socket loop failed: the registry fails with ``error``."""

    error: Exception


class RegistryActor(pykka.ThreadingActor):
    """Applies the pool's decisions; the only code that touches its state."""

    def __init__(
        self,
        config: PoolConfig,
        spawner: pykka.ActorRef[Any],
        *,
        clock: Clock = time.monotonic,
        restart_watcher: RestartWatcher | None = None,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._pool = Pool(config)
        self._spawner = spawner
        self._clock = clock
        self._watcher = restart_watcher or RestartWatcher(config.restart_check_interval)
        self._on_fatal = on_fatal
        self._clients: dict[int, ClientProxy] = {}
        self._alarm = _Alarm(self._tick, clock)
        self._handlers: dict[type, Callable[[Any], None]] = {
            ClientAttached: self._on_client_attached,
            ClientDetached: self._on_client_detached,
            ClientRequest: self._on_client_request,
            InstanceReady: self._on_instance_ready,
            SpawnFailed: self._on_spawn_failed,
            InstanceExited: self._on_instance_exited,
            Tick: self._on_tick,
            _InboxBroken: self._on_inbox_broken,
        }
        self._requests: dict[type, Callable[[int, Any], None]] = {
            Get: self._on_get,
            CloseSession: self._on_close_session,
            SessionFailed: self._on_session_failed,
            GetStatistics: self._on_statistics,
            Clear: self._on_clear,
            SetMaxPoolSize: self._on_set_max_pool_size,
            SetMaxPerApp: self._on_set_max_per_app,
            SetMaxIdleTime: self._on_set_max_idle_time,
            RestartApp: self._on_restart_app,
        }

    def __repr__(self) -> str:
        return f"<RegistryActor {self._pool!r} clients={len(self._clients)}>"

    # --- pykka hooks ------------------------------------------------------------

    def on_start(self) -> None:
        self.client_reader.on_broken = self._inbox_broken
        try:
            self._spawner.tell(RegistryAttached(self.actor_urn))
        except Exception:
            # pykka calls neither on_stop nor on_failure when on_start fails.
            self._fatal()
            raise

    def on_receive(self, message: Any) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            logger.warning("RegistryActor ignores unexpected message %r", message)
            return
        handler(message)
        self._alarm.set(self._pool.next_deadline())

    @staticmethod
    def _create_actor_inbox() -> Any:
        # The inbox reads the client sockets while no message is queued, so
        # a request goes from the socket to the registry on this one thread
        # (see actorpool.reader for why).
        return SocketReader()

    @property
    def client_reader(self) -> SocketReader:
        """The inbox, which the acceptor registers client sockets with."""
        inbox: SocketReader = self.actor_inbox  # type: ignore[assignment]
        return inbox

    def on_stop(self) -> None:
        self._alarm.close()
        self.client_reader.close()

    def _inbox_broken(self, error: Exception) -> None:
        # Called on this actor's own thread, from inside the inbox: the
        # message is queued without a wake-up and handled next, so the
        # error takes the usual way to on_failure.
        self.actor_ref.tell(_InboxBroken(error))

    def _on_inbox_broken(self, message: _InboxBroken) -> None:
        raise message.error

    def on_failure(self, *_exc_info: object) -> None:
        self._fatal()

    def _fatal(self) -> None:
        # Without the registry nothing can be served: take the server down
        # so that clients see ServerGoneError instead of waiting for ever.
        logger.critical("the registry failed; shutting the pool server down")
        self._alarm.close()
        self.client_reader.close()
        if self._on_fatal is not None:
            self._on_fatal()

    # --- messages from client session actors --------------------------------

    def _on_client_attached(self, message: ClientAttached) -> None:
        client = ClientProxy.from_urn(message.actor_urn)
        if client is not None:
            self._clients[message.client_id] = client

    def _on_client_detached(self, message: ClientDetached) -> None:
        if self._clients.pop(message.client_id, None) is not None:
            self._apply(self._pool.client_gone(message.client_id, self._clock()))

    def _on_client_request(self, message: ClientRequest) -> None:
        if message.client_id not in self._clients:
            return
        request = message.message
        handler = self._requests.get(type(request))
        if handler is not None:
            handler(message.client_id, request)
            return
        # A wire message the registry has no rule for must not take it down.
        logger.warning("RegistryActor ignores unexpected request %r", request)
        if isinstance(request, Request):
            self._reply(
                message.client_id,
                ErrorReply(
                    request.request_id,
                    "ProtocolError",
                    f"the server does not handle {type(request).__name__}",
                ),
            )

    def _on_get(self, client_id: int, get: Get) -> None:
        now = self._clock()
        # startswith, not os.path.isabs (a Python function) on the hot path.
        if not get.app_root.startswith("/") or "\0" in get.app_root:
            self._reply(
                client_id,
                ErrorReply(
                    get.request_id,
                    "SpawnError",
                    f"not an absolute path: {get.app_root!r:.200}",
                ),
            )
            return
        if self._watcher.should_restart(get.app_root, now):
            logger.info("restarting %s: restart.txt changed", get.app_root)
            self._restart(get.app_root, now)
        self._apply(
            self._pool.get(client_id, get.request_id, get.app_root, now, get.timeout)
        )

    def _on_close_session(self, client_id: int, notice: CloseSession) -> None:
        self._apply(
            self._pool.close_session(client_id, notice.session_id, self._clock())
        )

    def _on_session_failed(self, client_id: int, notice: SessionFailed) -> None:
        decisions = self._pool.session_failed(
            client_id, notice.session_id, self._clock()
        )
        if decisions:  # none for a session that is not this client's
            logger.warning(
                "client %d could not connect to session %d's process; removing it",
                client_id,
                notice.session_id,
            )
        self._apply(decisions)

    def _on_statistics(self, client_id: int, request: GetStatistics) -> None:
        snapshot = self._pool.statistics(self._clock(), clients=len(self._clients))
        self._reply(client_id, StatisticsReply(request.request_id, snapshot.to_dict()))

    def _on_clear(self, client_id: int, request: Clear) -> None:
        self._apply(self._pool.clear(self._clock()))
        self._reply(client_id, Done(request.request_id))

    def _on_set_max_pool_size(self, client_id: int, request: SetMaxPoolSize) -> None:
        if request.value < 1:
            self._config_error(
                client_id, request.request_id, "max_pool_size must be >= 1"
            )
            return
        self._apply(self._pool.set_max_pool_size(request.value, self._clock()))
        self._reply(client_id, Done(request.request_id))

    def _on_set_max_per_app(self, client_id: int, request: SetMaxPerApp) -> None:
        if request.value < 0:
            self._config_error(
                client_id, request.request_id, "max_per_app must be >= 0"
            )
            return
        self._apply(self._pool.set_max_per_app(request.value, self._clock()))
        self._reply(client_id, Done(request.request_id))

    def _on_set_max_idle_time(self, client_id: int, request: SetMaxIdleTime) -> None:
        if request.value < 0:
            self._config_error(
                client_id, request.request_id, "max_idle_time must be >= 0"
            )
            return
        self._apply(self._pool.set_max_idle_time(request.value, self._clock()))
        self._reply(client_id, Done(request.request_id))

    def _on_restart_app(self, client_id: int, request: RestartApp) -> None:
        logger.info("restarting %s on request", request.app_root)
        self._restart(request.app_root, self._clock())
        self._reply(client_id, Done(request.request_id))

    def _restart(self, app_root: str, now: float) -> None:
        # The spawner hears of it before any spawn the restart leads to.
        self._spawner.tell(AppRestarted(app_root))
        self._apply(self._pool.restart_app(app_root, now))

    # --- messages from the spawner and the alarm ------------------------------

    def _on_instance_ready(self, message: InstanceReady) -> None:
        self._apply(
            self._pool.instance_ready(
                message.instance_id,
                message.pid,
                message.address,
                message.concurrency,
                self._clock(),
            )
        )

    def _on_spawn_failed(self, message: SpawnFailed) -> None:
        logger.error(
            "spawn of instance %d failed: %s", message.instance_id, message.message
        )
        self._apply(
            self._pool.spawn_failed(
                message.instance_id, message.message, message.detail, self._clock()
            )
        )

    def _on_instance_exited(self, message: InstanceExited) -> None:
        self._apply(self._pool.instance_exited(message.instance_id, self._clock()))

    def _on_tick(self, _message: Tick) -> None:
        self._apply(self._pool.tick(self._clock()))

    def _tick(self) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(Tick())

    # --- carrying out decisions --------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            match decision:
                case Grant():
                    self._reply(
                        decision.client_id,
                        SessionGranted(
                            decision.request_id,
                            decision.session_id,
                            decision.pid,
                            decision.app_root,
                            decision.address,
                        ),
                    )
                case Fail():
                    self._reply(
                        decision.client_id,
                        ErrorReply(
                            decision.request_id,
                            decision.kind,
                            decision.message,
                            decision.detail,
                        ),
                    )
                case Spawn():
                    logger.info(
                        "spawning instance %d of %s",
                        decision.instance_id,
                        decision.app_root,
                    )
                    self._spawner.tell(
                        SpawnInstance(decision.instance_id, decision.app_root)
                    )
                case Stop():
                    logger.info(
                        "stopping instance %d (%s)",
                        decision.instance_id,
                        decision.reason,
                    )
                    self._spawner.tell(StopInstance(decision.instance_id))

    def _reply(self, client_id: int, reply: Reply) -> None:
        client = self._clients.get(client_id)
        if client is not None:
            # Written at once, without a hop through the client's actor; a
            # client that stopped has its ClientDetached on the way, and
            # replies to it are dropped until then.
            client.reply(reply)

    def _config_error(self, client_id: int, request_id: int, text: str) -> None:
        self._reply(client_id, ErrorReply(request_id, "ConfigError", text))


class _Alarm:
    """Tells the registry ``Tick`` when the pool's next deadline passes.

    One thread, parked on a condition until the earliest deadline; setting a
    new deadline wakes it to re-arm. It only enqueues a message, like a
    signal handler should.
    """

    def __init__(self, fire: Callable[[], None], clock: Clock) -> None:
        self._fire = fire
        self._clock = clock
        self._deadline: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name="actorpool-alarm", daemon=True
        )
        self._thread.start()

    def set(self, deadline: float | None) -> None:
        """Make sure a ``Tick`` comes no later than ``deadline``.

        Only an earlier deadline wakes the thread. A later one (the usual
        case: each get pushes the idle deadline back) keeps the armed time,
        and the early ``Tick`` then finds nothing due and re-arms. One
        spurious tick per deadline is much cheaper than a thread wake-up
        per message.
        """
        # Looked at without the lock first: this runs after every message.
        # A stale armed time read here is one the thread is firing or about
        # to fire, and the Tick it sends makes the registry set again.
        armed = self._deadline
        if deadline is None or (armed is not None and armed <= deadline):
            return
        with self._cond:
            if self._deadline is not None and self._deadline <= deadline:
                return
            self._deadline = deadline
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - self._clock()
                if remaining > 0:
                    # Capped: a client may ask for a timeout of 1e300 seconds,
                    # which Condition.wait would refuse (OverflowError).
                    self._cond.wait(min(remaining, MAX_ALARM_WAIT))
                    continue
                self._deadline = None
                self._fire()
