"""SpawnerActor over a FakeSpawner (or a scripted spawner), reporting to a stand-in.

The registry is a recording actor attached with ``RegistryAttached``: every
report lands in a queue the test reads with a timeout. The FakeSpawner's
control methods act in-process here (its backend runs in this process); a
pickled copy of it plays the test process of an end-to-end test and goes
through the control socket.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest
from test_spawners import ThreadStarts

from actorpool import spawner as spawner_module
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
from actorpool.spawner import Instance, Spawner, SpawnerActor, SpawnRequest
from actorpool.testing import (
    FAKE_PID_BASE,
    Barrier,
    FakeCall,
    FakeSpawner,
    Recorder,
    take,
)

WAIT = 5.0
A, B = "/srv/a", "/srv/b"


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short private directory (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="ap-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Rig:
    actor: pykka.ActorRef[Any]
    registry: pykka.ActorRef[Any]
    reports: queue.Queue[Any]

    def spawn(self, instance_id: int, app_root: str) -> None:
        self.actor.tell(SpawnInstance(instance_id, app_root))

    def ready(self, instance_id: int) -> InstanceReady:
        report = take(self.reports, InstanceReady)
        assert report.instance_id == instance_id
        return report

    def quiet(self) -> None:
        """Assert that no report is on its way."""
        self.actor.ask(Barrier(), timeout=WAIT)
        self.registry.ask(Barrier(), timeout=WAIT)
        assert self.reports.empty(), self.reports.get_nowait()


def start(spawner: Spawner, socket_dir: str) -> Rig:
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    actor = SpawnerActor.start(spawner, socket_dir, WAIT)
    actor.tell(RegistryAttached(registry.actor_urn))
    return Rig(actor, registry, reports)


@pytest.fixture
def rig(spawner: FakeSpawner, socket_dir: str) -> Rig:
    return start(spawner, socket_dir)


def greeting(address: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        data = b""
        while not data.endswith(b"\n") and (chunk := sock.recv(64)):
            data += chunk
        return data


def kinds(spawner: FakeSpawner, instance_id: int) -> list[str]:
    return [c.kind for c in spawner.calls() if c.instance_id == instance_id]


def test_spawn_reports_ready_with_a_working_instance(
    rig: Rig, spawner: FakeSpawner
) -> None:
    rig.spawn(1, A)
    report = rig.ready(1)
    assert report.pid > FAKE_PID_BASE
    assert report.concurrency == 1
    assert greeting(report.address) == f"{A} {report.pid}\n".encode()
    assert spawner.calls() == [
        FakeCall("spawn", A, 1, 0),
        FakeCall("ready", A, 1, report.pid),
    ]
    rig.quiet()


def test_a_held_spawn_of_one_app_does_not_delay_another(
    rig: Rig, spawner: FakeSpawner
) -> None:
    spawner.hold(A)
    rig.spawn(1, A)
    spawner.wait_for("spawn", app_root=A)
    rig.spawn(2, B)

    rig.ready(2)
    rig.quiet()  # A is still held
    assert kinds(spawner, 1) == ["spawn"]

    spawner.release(A)
    rig.ready(1)


def test_stop_instance_of_a_running_instance_reports_its_exit(
    rig: Rig, spawner: FakeSpawner
) -> None:
    rig.spawn(1, A)
    address = rig.ready(1).address
    rig.actor.tell(StopInstance(99))  # unknown: ignored

    rig.actor.tell(StopInstance(1))

    assert take(rig.reports, InstanceExited).instance_id == 1
    assert kinds(spawner, 1) == ["spawn", "ready", "stopped"]
    assert not os.path.exists(address)
    rig.quiet()


def test_stop_instance_during_a_spawn_stops_it_once_ready_and_hides_it(
    rig: Rig, spawner: FakeSpawner
) -> None:
    spawner.hold(A)
    rig.spawn(1, A)
    spawner.wait_for("spawn", app_root=A)
    rig.actor.tell(StopInstance(1))
    rig.quiet()  # the stop is recorded before the spawn finishes

    spawner.release(A)

    # The registry hears of the exit only: never that it was ready.
    assert take(rig.reports, InstanceExited).instance_id == 1
    assert kinds(spawner, 1) == ["spawn", "ready", "stopped"]
    rig.quiet()


def test_a_crash_reports_the_exit(rig: Rig, spawner: FakeSpawner) -> None:
    rig.spawn(1, A)
    pid = rig.ready(1).pid

    spawner.crash(pid)

    assert take(rig.reports, InstanceExited).instance_id == 1
    assert kinds(spawner, 1) == ["spawn", "ready", "crashed"]


def test_a_spawn_error_carries_the_apps_output(rig: Rig, spawner: FakeSpawner) -> None:
    spawner.fail(A, "no passenger_wsgi.py")
    rig.spawn(1, A)
    failed = take(rig.reports, SpawnFailed)
    assert (failed.instance_id, failed.message) == (1, "no passenger_wsgi.py")
    assert "Traceback" in failed.detail

    spawner.succeed(A)
    rig.spawn(2, A)
    rig.ready(2)


class _Broken(Spawner):
    def spawn(self, request: SpawnRequest) -> Instance:
        raise RuntimeError(f"bug while starting {request.app_root}")


class _Hung(Spawner):
    """Ignores request.timeout: its spawns end only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def spawn(self, request: SpawnRequest) -> Instance:
        self.release.wait(WAIT)
        raise SpawnError("released too late")


def test_a_spawn_its_spawner_does_not_time_out_fails_after_spawn_timeout(
    socket_dir: str,
) -> None:
    hung = _Hung()
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    actor = SpawnerActor.start(hung, socket_dir, 0.1)
    actor.tell(RegistryAttached(registry.actor_urn))
    actor.tell(SpawnInstance(1, A))
    failed = take(reports, SpawnFailed)
    assert failed.instance_id == 1
    assert "spawn_timeout" in failed.message
    assert actor.is_alive()
    hung.release.set()


class _Journal(Spawner):
    """Records app restarts and spawns in the order the actor called them."""

    def __init__(self, fail_restart: bool = False) -> None:
        self.calls: queue.Queue[tuple[str, str, str | None]] = queue.Queue()
        self.fail_restart = fail_restart

    def app_restarted(self, app_root: str) -> None:
        self.calls.put(("restarted", app_root, None))
        if self.fail_restart:
            raise RuntimeError("restart bug")

    def spawn(self, request: SpawnRequest) -> Instance:
        self.calls.put(("spawn", request.app_root, request.user))
        raise SpawnError("not really")


@pytest.mark.parametrize("fail_restart", [False, True])
def test_app_restarted_reaches_the_spawner_before_later_spawns(
    socket_dir: str, fail_restart: bool
) -> None:
    journal = _Journal(fail_restart)
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    actor = SpawnerActor.start(journal, socket_dir, WAIT, "daemon")
    actor.tell(RegistryAttached(registry.actor_urn))
    actor.tell(AppRestarted(A))
    actor.tell(SpawnInstance(1, A))
    assert journal.calls.get(timeout=WAIT) == ("restarted", A, None)
    # The spawn follows, with PoolConfig.user passed on; a failing hook
    # costs nothing but a log line.
    assert journal.calls.get(timeout=WAIT) == ("spawn", A, "daemon")
    assert take(reports, SpawnFailed).instance_id == 1
    assert actor.is_alive()


def test_a_spawner_that_raises_a_non_spawn_error_reports_spawn_failed(
    socket_dir: str,
) -> None:
    rig = start(_Broken(), socket_dir)
    rig.spawn(1, A)
    failed = take(rig.reports, SpawnFailed)
    assert failed.instance_id == 1
    assert "bug while starting /srv/a" in failed.message
    assert rig.actor.is_alive()


def test_on_stop_stops_every_instance(rig: Rig, spawner: FakeSpawner) -> None:
    rig.spawn(1, A)
    rig.spawn(2, B)
    pids = {take(rig.reports, InstanceReady).pid for _ in range(2)}  # any order
    spawner.hold("/srv/c")
    rig.spawn(3, "/srv/c")
    spawner.wait_for("spawn", app_root="/srv/c")

    rig.actor.stop()

    stopped = {c.pid for c in spawner.calls() if c.kind == "stopped"}
    assert stopped == pids
    assert "ready" not in kinds(spawner, 3)


def test_a_spawn_in_its_delay_when_the_spawner_closes_makes_no_instance(
    socket_dir: str,
) -> None:
    with FakeSpawner(spawn_delay=60) as spawner:
        rig = start(spawner, socket_dir)
        rig.spawn(1, A)
        spawner.wait_for("spawn", app_root=A)

        rig.actor.stop()  # closes the spawner, which ends the delay

        for thread in threading.enumerate():
            if thread.name == "actorpool-spawn-1":
                thread.join(WAIT)
                assert not thread.is_alive()
        assert kinds(spawner, 1) == ["spawn"]
        assert os.listdir(socket_dir) == []


class _GatedInstance:
    """An instance whose stop() can be held, to line up the actor's inbox."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.address = f"/nonexistent/{pid}.sock"
        self.concurrency = 1
        self.stopping = threading.Event()
        self.may_stop = threading.Event()
        self.may_stop.set()
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.may_stop.wait(WAIT)
        self.stopped.set()

    def wait(self) -> None:
        self.stopped.wait()


class _Scripted(Spawner):
    """Each spawn returns a prepared instance once its gate opens."""

    def __init__(self) -> None:
        self.instances = {n: _GatedInstance(1000 + n) for n in (1, 2)}
        self.gates = {n: threading.Event() for n in (1, 2)}
        self.closed = threading.Event()

    def spawn(self, request: SpawnRequest) -> Instance:
        if not self.gates[request.instance_id].wait(WAIT):
            raise SpawnError("gate never opened")
        return self.instances[request.instance_id]

    def close(self) -> None:
        self.closed.set()


def test_an_instance_whose_spawn_ends_just_as_the_actor_stops_is_stopped(
    socket_dir: str,
) -> None:
    scripted = _Scripted()
    first, second = scripted.instances[1], scripted.instances[2]
    rig = start(scripted, socket_dir)
    scripted.gates[1].set()
    rig.spawn(1, A)
    rig.ready(1)
    rig.spawn(2, B)  # its gate is shut: the spawn thread waits

    first.may_stop.clear()
    rig.actor.tell(StopInstance(1))
    assert first.stopping.wait(WAIT)  # the actor is busy in first.stop()
    rig.actor.stop(block=False)  # the stop message is queued ...
    # Found before its gate opens: the actor started it before it took
    # StopInstance(1), and once open it may end before a later lookup.
    spawn_thread = next(
        t for t in threading.enumerate() if t.name == "actorpool-spawn-2"
    )
    scripted.gates[2].set()
    spawn_thread.join(WAIT)  # ... and the second instance's report behind it
    first.may_stop.set()

    assert scripted.closed.wait(WAIT)
    assert second.stopped.is_set()


def test_control_methods_work_in_process_and_through_the_control_socket(
    rig: Rig, spawner: FakeSpawner
) -> None:
    remote = pickle.loads(pickle.dumps(spawner))
    assert "controller" in repr(remote)
    assert "running" in repr(spawner)

    remote.hold(A)
    rig.spawn(1, A)
    assert remote.wait_for("spawn", app_root=A) == [FakeCall("spawn", A, 1, 0)]
    with pytest.raises(TimeoutError):
        remote.wait_for("ready", app_root=A, timeout=0.05)
    remote.release(A)
    pid = rig.ready(1).pid

    remote.fail(B, "nope")
    rig.spawn(2, B)
    assert take(rig.reports, SpawnFailed).message == "nope"
    remote.succeed(B)
    rig.spawn(3, B)
    rig.ready(3)

    spawner.hold()  # every app, in-process this time
    rig.spawn(4, "/srv/c")
    spawner.wait_for("spawn", app_root="/srv/c")
    rig.quiet()
    remote.release()
    rig.ready(4)

    remote.crash(pid)
    assert take(rig.reports, InstanceExited).instance_id == 1
    assert remote.wait_for("crashed", pid=pid)[0].instance_id == 1
    with pytest.raises(RuntimeError, match="no fake instance"):
        remote.crash(12345)
    with pytest.raises(ValueError, match="no fake instance"):
        spawner.crash(12345)
    assert remote.calls() == spawner.calls()
    assert [c.kind for c in remote.calls()].count("ready") == 3


# --- what a spawner hands back, and the actor's own failures -------------------


class _Returns(Spawner):
    """Each spawn returns the instance it is given, or raises the error."""

    def __init__(self, instance: Any = None, error: Exception | None = None) -> None:
        self.instance = instance
        self.error = error

    def spawn(self, request: SpawnRequest) -> Instance:
        if self.error is not None:
            raise self.error
        return self.instance  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("address", pathlib.Path("/nonexistent/x.sock")),
        ("concurrency", None),
        ("concurrency", 0),
        ("pid", "1234"),
        ("pid", True),
    ],
)
def test_an_instance_with_a_bad_field_is_a_failed_spawn(
    socket_dir: str, field: str, value: object
) -> None:
    """Before, a Path address made the grant unsendable (the client got an
    error with no session to close, and the process stayed busy for ever),
    and a None concurrency failed the registry itself."""
    instance = _GatedInstance(4321)
    setattr(instance, field, value)
    rig = start(_Returns(instance), socket_dir)
    rig.spawn(1, A)
    failed = take(rig.reports, SpawnFailed)
    assert failed.instance_id == 1
    assert "bad instance" in failed.message
    assert field in failed.message
    assert instance.stopped.wait(WAIT)
    rig.quiet()
    assert rig.actor.is_alive()


def test_a_spawn_error_carrying_bytes_reaches_the_registry_as_text(
    socket_dir: str,
) -> None:
    """Before, the bytes went on to the wire, which refused them: every
    waiting client lost its whole connection."""
    rig = start(_Returns(error=SpawnError(b"boom", b"out \xff")), socket_dir)  # type: ignore[arg-type]
    rig.spawn(1, A)
    failed = take(rig.reports, SpawnFailed)
    assert isinstance(failed.message, str)
    assert "boom" in failed.message
    assert failed.detail == "out \ufffd"


def test_a_spawn_thread_that_cannot_start_fails_that_spawn_only(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_start: Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(
        spawner_module, "threading", ThreadStarts({"actorpool-spawn-1"}, refuse)
    )
    rig.spawn(1, A)
    failed = take(rig.reports, SpawnFailed)
    assert failed.instance_id == 1
    assert "can't start new thread" in failed.message
    monkeypatch.undo()
    rig.spawn(2, A)  # the actor carries on
    rig.ready(2)


def test_an_overdue_report_of_a_cancelled_spawn_says_nothing(
    rig: Rig, spawner: FakeSpawner
) -> None:
    """The registry forgot it when it cancelled it: two ERROR lines and a
    SpawnFailed for nothing, before."""
    spawner.hold(A)
    rig.spawn(1, A)
    spawner.wait_for("spawn", app_root=A)
    rig.actor.tell(StopInstance(1))
    rig.actor.tell(spawner_module._Overdue(1))  # as its timer would
    rig.quiet()
    spawner.release(A)
    assert take(rig.reports, InstanceExited).instance_id == 1


def test_a_failure_of_the_actor_stops_its_instances_and_is_fatal(
    spawner: FakeSpawner, socket_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, nobody heard of it: the server ran on, granting sessions on
    stopped processes, and spawns in flight were never answered."""

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SpawnerActor, "_on_stop_instance", broken)
    fatal = threading.Event()
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    actor = SpawnerActor.start(spawner, socket_dir, WAIT, on_fatal=fatal.set)
    actor.tell(RegistryAttached(registry.actor_urn))
    actor.tell(SpawnInstance(1, A))
    take(reports, InstanceReady)
    actor.tell(StopInstance(1))
    assert fatal.wait(WAIT)
    assert kinds(spawner, 1) == ["spawn", "ready", "stopped"]
    registry.stop()
