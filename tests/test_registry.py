"""RegistryActor with stand-in actors: a recording spawner and recording clients.

Every reply the registry tells a client, and every order it tells the spawner,
lands in a ``queue.Queue`` that the test reads with a timeout. To show that
something did *not* happen, :meth:`Rig.settle` first asks every actor
involved (an ``ask`` returns once all earlier messages were handled), then
the queues must be empty. Time is a :class:`FakeClock`; ``Tick`` is told
explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka
import pytest

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
    Hello,
    InstanceExited,
    InstanceReady,
    RegistryAttached,
    Request,
    RestartApp,
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
from actorpool.registry import RegistryActor
from actorpool.spawner import SpawnerActor
from actorpool.statistics import PoolStatistics
from actorpool.testing import Barrier, FakeClock, FakeSpawner, Recorder, take

WAIT = 5.0


class ExplodingClock(FakeClock):
    """A FakeClock that raises once told to, to make the registry fail."""

    explode = False

    def __call__(self) -> float:
        if self.explode:
            raise RuntimeError("the clock broke")
        return super().__call__()


@dataclasses.dataclass
class Rig:
    registry: pykka.ActorRef[Any]
    spawner: pykka.ActorRef[Any]
    orders: queue.Queue[Any]
    clock: FakeClock
    fatal: threading.Event
    clients: dict[int, tuple[pykka.ActorRef[Any], queue.Queue[Any]]] = (
        dataclasses.field(default_factory=dict)
    )

    def attach(self, client_id: int) -> queue.Queue[Any]:
        inbox: queue.Queue[Any] = queue.Queue()
        ref = Recorder.start(inbox)
        self.clients[client_id] = (ref, inbox)
        self.registry.tell(ClientAttached(client_id, ref.actor_urn))
        return inbox

    def send(self, client_id: int, message: Any) -> None:
        self.registry.tell(ClientRequest(client_id, message))

    def settle(self) -> None:
        """Return once everything told so far has been handled everywhere."""
        self.registry.ask(Barrier(), timeout=WAIT)
        self.spawner.ask(Barrier(), timeout=WAIT)
        for ref, _ in self.clients.values():
            if ref.is_alive():
                ref.ask(Barrier(), timeout=WAIT)

    def quiet(self, *inboxes: queue.Queue[Any]) -> None:
        """Assert that nothing more arrived in the spawner's or ``inboxes``."""
        self.settle()
        for inbox in (self.orders, *inboxes):
            assert inbox.empty(), inbox.get_nowait()

    def spawned(self, app_root: str) -> int:
        order = take(self.orders, SpawnInstance)
        assert order.app_root == app_root
        return order.instance_id

    def ready(self, instance_id: int, pid: int) -> None:
        self.registry.tell(InstanceReady(instance_id, pid, f"/sock/{pid}", 1))

    def statistics(self, client_id: int, request_id: int = 999) -> PoolStatistics:
        self.send(client_id, GetStatistics(request_id))
        reply = take(self.clients[client_id][1], StatisticsReply)
        assert reply.request_id == request_id
        return PoolStatistics.from_dict(reply.statistics)

    def session(self, client_id: int, request_id: int, app: str, pid: int) -> int:
        """Get a session on a new process of ``app``; return the session id."""
        self.send(client_id, Get(request_id, app))
        instance_id = self.spawned(app)
        self.ready(instance_id, pid)
        grant = take(self.clients[client_id][1], SessionGranted)
        assert (grant.request_id, grant.pid) == (request_id, pid)
        return grant.session_id


@pytest.fixture
def make_rig() -> Callable[..., Rig]:
    def make(clock: FakeClock | None = None, **config: Any) -> Rig:
        orders: queue.Queue[Any] = queue.Queue()
        spawner = Recorder.start(orders)
        fatal = threading.Event()
        clock = clock or FakeClock()
        registry = RegistryActor.start(
            PoolConfig(**config), spawner, clock=clock, on_fatal=fatal.set
        )
        attached = take(orders, RegistryAttached)
        assert attached.actor_urn == registry.actor_urn
        return Rig(registry, spawner, orders, clock, fatal)

    return make


A, B = "/srv/a", "/srv/b"


def test_get_asks_the_spawner_and_ready_grants_the_session(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    client = rig.attach(1)
    rig.send(1, Get(1, A))
    instance_id = rig.spawned(A)
    rig.quiet(client)  # nothing is granted before the process is ready

    rig.registry.tell(InstanceReady(instance_id, 4242, "/sock/a", 1))

    grant = take(client, SessionGranted)
    assert (grant.request_id, grant.pid, grant.app_root, grant.address) == (
        1,
        4242,
        A,
        "/sock/a",
    )
    stats = rig.statistics(1)
    assert (stats.count, stats.active, stats.waiting, stats.clients) == (1, 1, 0, 1)


def test_each_grant_goes_to_the_client_that_asked(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    first, second = rig.attach(1), rig.attach(2)
    rig.send(1, Get(1, A))
    a = rig.spawned(A)
    rig.send(2, Get(1, B))  # the same request id, from another client
    b = rig.spawned(B)

    rig.ready(b, 200)
    grant = take(second, SessionGranted)
    assert (grant.request_id, grant.app_root, grant.pid) == (1, B, 200)
    rig.quiet(first)

    rig.ready(a, 100)
    grant = take(first, SessionGranted)
    assert (grant.request_id, grant.app_root, grant.pid) == (1, A, 100)
    rig.quiet(second)


def test_close_session_frees_the_process_for_the_next_waiter(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_pool_size=1)
    first, second = rig.attach(1), rig.attach(2)
    session = rig.session(1, 1, A, pid=100)
    rig.send(2, Get(7, A))
    rig.quiet(first, second)  # the pool is full: the get waits, nothing spawns

    rig.send(2, CloseSession(session))  # not its session: ignored
    rig.quiet(second)
    rig.send(1, CloseSession(session))

    grant = take(second, SessionGranted)
    assert (grant.request_id, grant.pid) == (7, 100)
    assert grant.session_id != session
    rig.quiet(first)


def test_client_detached_releases_its_sessions_and_drops_its_waiters(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_pool_size=1)
    holder, dropped, waiter = rig.attach(1), rig.attach(2), rig.attach(3)
    rig.session(1, 1, A, pid=100)
    rig.send(2, Get(5, A))
    rig.send(3, Get(7, A))
    assert rig.statistics(3).waiting == 2

    rig.registry.tell(ClientDetached(2))
    stats = rig.statistics(3)
    assert (stats.waiting, stats.clients) == (1, 2)

    rig.registry.tell(ClientDetached(1))
    grant = take(waiter, SessionGranted)
    assert (grant.request_id, grant.pid) == (7, 100)
    stats = rig.statistics(3)
    assert (stats.active, stats.waiting, stats.clients) == (1, 0, 1)
    rig.quiet(holder, dropped)


def test_spawn_failed_answers_every_waiter_of_that_app(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_per_app=1)
    first, second, other = rig.attach(1), rig.attach(2), rig.attach(3)
    rig.send(1, Get(1, A))
    a = rig.spawned(A)
    rig.send(2, Get(2, A))  # max_per_app=1: waits for the same spawn
    rig.send(3, Get(3, B))
    b = rig.spawned(B)

    rig.registry.tell(SpawnFailed(a, "no such app", "Traceback: boom"))

    for inbox, request_id in ((first, 1), (second, 2)):
        error = take(inbox, ErrorReply)
        assert (error.request_id, error.kind) == (request_id, "SpawnError")
        assert (error.message, error.detail) == ("no such app", "Traceback: boom")
    rig.quiet(other)  # the other app's waiter is left alone

    rig.ready(b, 300)
    assert take(other, SessionGranted).request_id == 3


def test_get_of_a_relative_path_is_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    client = rig.attach(1)
    rig.send(1, Get(1, "srv/a"))
    error = take(client, ErrorReply)
    assert (error.request_id, error.kind) == (1, "SpawnError")
    rig.quiet(client)


@pytest.mark.parametrize(
    ("request_", "error_kind"),
    [
        (GetStatistics(1), None),
        (Clear(1), None),
        (RestartApp(1, A), None),
        (SetMaxPoolSize(1, 3), None),
        (SetMaxPoolSize(1, 0), "ConfigError"),
        (SetMaxPerApp(1, 0), None),
        (SetMaxPerApp(1, -1), "ConfigError"),
        (SetMaxIdleTime(1, 0.0), None),
        (SetMaxIdleTime(1, -1.0), "ConfigError"),
    ],
)
def test_admin_requests_are_answered(
    make_rig: Callable[..., Rig], request_: Request, error_kind: str | None
) -> None:
    rig = make_rig()
    client = rig.attach(1)
    rig.send(1, request_)
    reply = client.get(timeout=WAIT)
    assert reply.request_id == 1
    if isinstance(request_, RestartApp):
        assert take(rig.orders, AppRestarted).app_root == request_.app_root
    if error_kind is not None:
        assert isinstance(reply, ErrorReply)
        assert reply.kind == error_kind
    elif isinstance(request_, GetStatistics):
        assert isinstance(reply, StatisticsReply)
        assert PoolStatistics.from_dict(reply.statistics).max_pool_size == 6
    else:
        assert isinstance(reply, Done)
    rig.quiet(client)


def test_limits_set_while_running_take_effect(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_pool_size=1)
    first, second = rig.attach(1), rig.attach(2)
    rig.send(1, SetMaxPerApp(1, 4))
    assert isinstance(take(first, Done), Done)
    rig.session(1, 2, A, pid=100)
    rig.send(2, Get(1, A))
    rig.quiet(second)  # full

    rig.send(1, SetMaxPoolSize(3, 2))
    assert take(first, Done).request_id == 3
    rig.ready(rig.spawned(A), 200)  # raising the limit serves the waiter
    assert take(second, SessionGranted).pid == 200
    stats = rig.statistics(1)
    assert (stats.max_pool_size, stats.max_per_app, stats.count) == (2, 4, 2)


def test_clear_and_restart_stop_idle_processes_and_retire_busy_ones(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    client = rig.attach(1)
    idle = rig.session(1, 1, A, pid=100)
    rig.send(1, CloseSession(idle))
    busy = rig.session(1, 2, B, pid=200)

    rig.send(1, RestartApp(3, A))
    assert take(client, Done).request_id == 3
    assert take(rig.orders, AppRestarted).app_root == A  # before the stop
    stopped = take(rig.orders, StopInstance).instance_id

    rig.send(1, Clear(4))
    assert take(client, Done).request_id == 4
    rig.quiet(client)  # the busy process finishes its session first

    rig.send(1, CloseSession(busy))
    assert take(rig.orders, StopInstance).instance_id != stopped
    assert rig.statistics(1).count == 0


def test_touching_restart_txt_between_gets_stops_the_old_instance(
    make_rig: Callable[..., Rig], make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    rig = make_rig(restart_check_interval=0)
    client = rig.attach(1)
    session = rig.session(1, 1, app, pid=100)
    rig.send(1, CloseSession(session))
    rig.send(1, Get(2, app))
    grant = take(client, SessionGranted)
    assert grant.pid == 100  # restart.txt did not change: reused
    rig.send(1, CloseSession(grant.session_id))
    rig.quiet(client)
    old = rig.statistics(1).apps[0].processes[0].instance_id

    Path(app, "tmp", "restart.txt").touch()
    rig.send(1, Get(3, app))

    assert take(rig.orders, AppRestarted).app_root == app  # before the spawn
    assert take(rig.orders, StopInstance).instance_id == old
    new = rig.spawned(app)
    assert new != old
    rig.ready(new, 200)
    assert take(client, SessionGranted).pid == 200


def test_tick_times_out_waiters_and_reaps_idle_processes(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_pool_size=1, max_idle_time=10, min_instances=0)
    holder, waiter = rig.attach(1), rig.attach(2)
    session = rig.session(1, 1, A, pid=100)
    rig.send(2, Get(2, A, timeout=5))
    rig.quiet(waiter)

    rig.clock.advance(6)
    rig.registry.tell(Tick())
    error = take(waiter, ErrorReply)
    assert (error.request_id, error.kind) == (2, "GetTimeoutError")

    rig.send(1, CloseSession(session))
    rig.quiet(holder)  # handled before the clock moves on
    rig.clock.advance(11)
    rig.registry.tell(Tick())
    assert isinstance(take(rig.orders, StopInstance), StopInstance)
    assert rig.statistics(1).count == 0


def test_exit_of_a_process_frees_its_slot(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_pool_size=1)
    holder, waiter = rig.attach(1), rig.attach(2)
    rig.session(1, 1, A, pid=100)
    rig.send(2, Get(2, A))
    rig.quiet(waiter)
    instance_id = rig.statistics(2).apps[0].processes[0].instance_id

    rig.registry.tell(InstanceExited(instance_id))

    rig.ready(rig.spawned(A), 200)
    assert take(waiter, SessionGranted).pid == 200
    rig.quiet(holder)


def test_unknown_messages_are_ignored(make_rig: Callable[..., Rig]) -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Unheard(Request):
        pass

    rig = make_rig()
    client = rig.attach(1)
    rig.registry.tell("what is this?")
    rig.registry.tell(object())
    rig.registry.tell(ClientRequest(99, Get(1, A)))  # a client never attached
    rig.send(1, Hello(1, os.getpid()))  # not a request
    rig.send(1, Unheard(5))  # a request it has no rule for

    error = take(client, ErrorReply)
    assert (error.request_id, error.kind) == (5, "ProtocolError")
    rig.quiet(client)
    assert rig.statistics(1).waiting == 0
    assert rig.registry.is_alive()
    assert not rig.fatal.is_set()


def test_a_reply_to_a_client_that_stopped_does_not_kill_the_registry(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    rig.attach(1)
    rig.attach(2)
    rig.send(1, Get(1, A))
    instance_id = rig.spawned(A)
    rig.clients[1][0].stop()  # its ClientDetached has not arrived yet

    rig.ready(instance_id, 100)  # the grant goes nowhere

    assert rig.statistics(2).active == 1
    rig.registry.tell(ClientDetached(1))
    assert rig.statistics(2).active == 0
    assert not rig.fatal.is_set()


def test_a_failure_inside_the_registry_calls_on_fatal(
    make_rig: Callable[..., Rig],
) -> None:
    clock = ExplodingClock()
    rig = make_rig(clock=clock)
    rig.settle()
    clock.explode = True

    rig.registry.tell(Tick())

    assert rig.fatal.wait(WAIT)
    assert not rig.registry.is_alive()
    assert not any(t.name == "actorpool-alarm" for t in threading.enumerate())


def test_an_error_that_breaks_the_inbox_loop_calls_on_fatal(
    make_rig: Callable[..., Rig],
) -> None:
    # Not one socket's callback (that costs only the socket): the loop that
    # waits on every socket. pykka reads its inbox outside its own try, so
    # unhandled, the error would end the thread with nobody the wiser.
    rig = make_rig()
    rig.settle()
    reader = rig.registry.proxy().client_reader.get(timeout=WAIT)
    real_select = reader._selector.select

    def broken_select(timeout: float | None = None) -> Any:
        reader._selector.select = real_select  # type: ignore[method-assign]
        raise MemoryError("out of memory in select")

    reader._selector.select = broken_select  # type: ignore[method-assign]
    rig.registry.tell(Tick())  # wakes the loop, which then waits again

    assert rig.fatal.wait(WAIT)
    rig.registry.actor_stopped.wait(WAIT)
    assert not rig.registry.is_alive()
    assert not any(t.name == "actorpool-alarm" for t in threading.enumerate())


def test_with_a_real_spawner_actor_the_session_reaches_a_fake_instance(
    spawner: FakeSpawner, tmp_path_factory: pytest.TempPathFactory
) -> None:
    socket_dir = os.fspath(tmp_path_factory.mktemp("s", numbered=True))
    spawner_actor = SpawnerActor.start(spawner, socket_dir, 5.0)
    registry = RegistryActor.start(PoolConfig(), spawner_actor, clock=FakeClock())
    inbox: queue.Queue[Any] = queue.Queue()
    client = Recorder.start(inbox)
    registry.tell(ClientAttached(1, client.actor_urn))

    registry.tell(ClientRequest(1, Get(1, A)))
    grant = take(inbox, SessionGranted)

    [ready] = spawner.wait_for("ready", app_root=A)
    assert grant.pid == ready.pid
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(grant.address)
        greeting = f"{A} {grant.pid}\n".encode()
        received = b""
        while len(received) < len(greeting) and (chunk := sock.recv(64)):
            received += chunk
        assert received == greeting
    registry.tell(ClientRequest(1, CloseSession(grant.session_id)))
    registry.tell(ClientRequest(1, Get(2, A)))
    assert take(inbox, SessionGranted).pid == grant.pid  # reused


def test_a_registry_that_cannot_reach_the_spawner_at_start_calls_on_fatal() -> None:
    spawner = Recorder.start(queue.Queue())
    spawner.stop()
    fatal = threading.Event()

    RegistryActor.start(PoolConfig(), spawner, on_fatal=fatal.set)

    assert fatal.wait(WAIT)
    assert not any(t.name == "actorpool-alarm" for t in threading.enumerate())
