"""End to end: a real server process, FakeSpawner instances, real sockets.

Each test starts its own pool server (``start_server``) and talks to it
through the public client API, the way a user's prefork workers would.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from actorpool import (
    ActorPoolError,
    ApplicationPool,
    ApplicationPoolServer,
    ConfigError,
    GetTimeoutError,
    PoolConfig,
    QueueFullError,
    ServerGoneError,
    Session,
    SpawnError,
)
from actorpool.server import _BOOT, _Bootstrap
from actorpool.testing import FakeSpawner

pytestmark = pytest.mark.slow

WAIT = 10.0
"""Seconds a test waits for what should happen at once."""

StartServer = Callable[..., ApplicationPoolServer]
WaitUntil = Callable[..., None]


def greeting(session: Session) -> tuple[str, int]:
    """The line a fake instance sends first: its app root and pid."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = session.socket.recv(4096)
        assert chunk, "the instance closed before greeting"
        line += chunk
    app_root, pid = line.decode().split()
    return app_root, int(pid)


def waiting(pool: ApplicationPool, app_root: str | None = None) -> int:
    stats = pool.statistics()
    if app_root is None:
        return stats.waiting
    app = stats.app(app_root)
    return 0 if app is None else app.waiting


# --- sessions ------------------------------------------------------------------


def test_get_returns_a_connected_session(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    with pool.get(app) as session:
        assert greeting(session) == (app, session.pid)
        session.socket.sendall(b"ping\n")
        assert session.socket.recv(100) == b"ping\n"
        assert session.app_root == app
    assert session.closed


def test_active_and_count_follow_sessions(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    assert (pool.count, pool.active) == (0, 0)
    session = pool.get(app)
    assert (pool.count, pool.active) == (1, 1)
    session.close()
    session.close()  # idempotent
    assert (pool.count, pool.active) == (1, 0)


def test_idle_process_is_reused(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    with pool.get(app) as first:
        pass
    with pool.get(app) as second:
        assert greeting(second)[1] == first.pid
    assert [c.kind for c in spawner.calls()] == ["spawn", "ready"]


def test_overlapping_gets_spawn_a_second_process(
    start_server: StartServer,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
) -> None:
    app = make_app("a")
    with FakeSpawner(hold=True) as spawner:
        pool = start_server(spawner).connect()
        first = threads.submit(pool.get, app)
        second = threads.submit(pool.get, app)
        spawner.wait_for("spawn", app_root=app, count=2)
        spawner.release()
        sessions = [first.result(10), second.result(10)]
        assert sessions[0].pid != sessions[1].pid
        assert pool.statistics().app(app).count == 2  # type: ignore[union-attr]
        for session in sessions:
            session.close()


def test_two_apps_at_once(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    a, b = make_app("a"), make_app("b")
    pool = start_server(spawner).connect()
    with pool.get(a) as sa, pool.get(b) as sb:
        assert greeting(sa)[0] == a
        assert greeting(sb)[0] == b
        assert sa.pid != sb.pid
        stats = pool.statistics()
        assert {x.app_root for x in stats.apps} == {a, b}
        assert stats.active == 2


# --- limits and queues -----------------------------------------------------------


def test_full_pool_makes_a_get_wait_until_a_session_closes(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_pool_size=1).connect()
    held = pool.get(app)
    queued = threads.submit(pool.get, app)
    wait_until(lambda: waiting(pool) == 1, what="the get to queue")
    assert not queued.done()
    held.close()
    with queued.result(10) as served:
        assert served.pid == held.pid


def test_full_pool_evicts_another_apps_idle_process(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    a, b = make_app("a"), make_app("b")
    pool = start_server(spawner, max_pool_size=1).connect()
    with pool.get(a) as sa:
        pass
    with pool.get(b) as sb:
        assert greeting(sb)[0] == b
    spawner.wait_for("stopped", pid=sa.pid)
    stats = pool.statistics()
    assert stats.count == 1
    assert stats.app(a) is None


def test_an_app_is_not_kept_waiting_by_a_busy_process_that_takes_two_sessions(
    start_server: StartServer,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    """A's process is never idle while A keeps one of its two sessions busy:
    it is drained for B (takes no new session) and B gets its slot."""
    a, b = make_app("a"), make_app("b")
    with FakeSpawner(concurrency=2) as spawner:
        pool = start_server(spawner, max_pool_size=1).connect()
        first = pool.get(a)
        for_b = threads.submit(pool.get, b, timeout=10)
        wait_until(lambda: waiting(pool, b) == 1, what="b's get to queue")
        (process,) = pool.statistics().app(a).processes  # type: ignore[union-attr]
        assert process.state == "retiring"
        with pytest.raises(GetTimeoutError):  # it has room, but is draining
            pool.get(a, timeout=0.2)
        first.close()
        with for_b.result(10) as session:
            assert greeting(session)[0] == b
        spawner.wait_for("stopped", pid=first.pid)


def test_max_per_app_queues_that_app_only(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    a, b = make_app("a"), make_app("b")
    pool = start_server(spawner, max_pool_size=4, max_per_app=1).connect()
    held = pool.get(a)
    queued = threads.submit(pool.get, a)
    wait_until(lambda: waiting(pool, a) == 1, what="the second get of a to queue")
    with pool.get(b) as sb:  # another app is not held up
        assert greeting(sb)[0] == b
    assert not queued.done()
    held.close()
    queued.result(10).close()


def test_queue_overflow_fails_at_once(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_pool_size=1, max_queue_size=1).connect()
    held = pool.get(app)
    queued = threads.submit(pool.get, app)
    wait_until(lambda: waiting(pool) == 1, what="the get to queue")
    with pytest.raises(QueueFullError):
        pool.get(app)
    held.close()
    queued.result(10).close()


def test_get_timeout(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_pool_size=1).connect()
    with pool.get(app):
        with pytest.raises(GetTimeoutError):
            pool.get(app, timeout=0.2)
        assert pool.statistics().waiting == 0


def test_one_connection_holds_two_sessions_while_a_third_get_waits(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    # The seed's deadlock: one connection, several sessions. Gone here.
    app = make_app("a")
    pool = start_server(spawner, max_pool_size=2).connect()
    first, second = pool.get(app), pool.get(app)
    third = threads.submit(pool.get, app)
    wait_until(lambda: waiting(pool) == 1, what="the third get to queue")
    threads.submit(first.close).result(10)
    with third.result(10) as served:
        assert served.pid == first.pid
    second.close()


# --- spawning and dying ----------------------------------------------------------


def test_spawn_failure_reaches_every_waiter_of_that_app_only(
    start_server: StartServer,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    a, b = make_app("a"), make_app("b")
    with FakeSpawner(hold=[a], fail=[a]) as spawner:
        pool = start_server(spawner, max_per_app=1).connect()
        waiters = [threads.submit(pool.get, a) for _ in range(3)]
        wait_until(lambda: waiting(pool, a) == 3, what="three gets of a to queue")
        with pool.get(b) as sb:
            spawner.release(a)
            for waiter in waiters:
                with pytest.raises(SpawnError) as info:
                    waiter.result(10)
                assert "Traceback (fake)" in str(info.value)
            assert greeting(sb)[0] == b  # the other app's session is untouched
        assert pool.statistics().app(a) is None


def test_crashed_instance_is_replaced(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    with pool.get(app) as first:
        pass
    spawner.crash(first.pid)
    with pool.get(app) as second:
        assert greeting(second) == (app, second.pid)
        assert second.pid != first.pid
    assert pool.count == 1


def test_idle_processes_are_reaped_down_to_min_instances(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_idle_time=0.2, min_instances=1).connect()
    first, second = pool.get(app), pool.get(app)
    first.close()
    second.close()
    stopped = spawner.wait_for("stopped", app_root=app)
    assert stopped[0].pid in (first.pid, second.pid)
    assert pool.count == 1  # min_instances keeps one


def test_idle_reaping_to_zero(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_idle_time=0.2, min_instances=0).connect()
    with pool.get(app) as session:
        pass
    spawner.wait_for("stopped", pid=session.pid)
    assert pool.count == 0


def test_max_requests_retires_a_process(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, max_requests=2).connect()
    pids = []
    for _ in range(3):
        with pool.get(app) as session:
            pids.append(session.pid)
    assert pids[0] == pids[1] != pids[2]
    spawner.wait_for("stopped", pid=pids[0])


def test_touching_restart_txt_restarts_the_app(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, restart_check_interval=0).connect()
    with pool.get(app) as first:
        pass
    Path(app, "tmp", "restart.txt").touch()
    with pool.get(app) as second:
        assert second.pid != first.pid
    spawner.wait_for("stopped", pid=first.pid)
    with pool.get(app) as third:  # no change since: no restart
        assert third.pid == second.pid


def test_restart_app_and_clear(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    busy = pool.get(app)
    pool.clear()
    assert greeting(busy)[1] == busy.pid  # a busy process finishes its session
    busy.close()
    spawner.wait_for("stopped", pid=busy.pid)
    with pool.get(app) as fresh:
        assert fresh.pid != busy.pid
    pool.restart_app(app)
    spawner.wait_for("stopped", pid=fresh.pid)


def test_raising_max_pool_size_serves_waiters(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    a, b = make_app("a"), make_app("b")
    pool = start_server(spawner, max_pool_size=1).connect()
    with pool.get(a):
        queued = threads.submit(pool.get, b)
        wait_until(lambda: waiting(pool) == 1, what="the get of b to queue")
        pool.set_max_pool_size(2)
        with queued.result(10) as sb:
            assert greeting(sb)[0] == b
        assert pool.statistics().max_pool_size == 2


# --- clients that go away --------------------------------------------------------


def test_killed_client_releases_its_sessions_and_waiters(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    wait_until: WaitUntil,
) -> None:
    a, b, c = make_app("a"), make_app("b"), make_app("c")
    server = start_server(spawner, max_pool_size=2)
    pool = server.connect()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold two sessions and queue a third get
        try:
            os.close(ready_r)
            child_pool = server.connect()
            server.detach()
            held = [child_pool.get(a), child_pool.get(b)]
            import threading

            threading.Thread(target=child_pool.get, args=(c,), daemon=True).start()
            while child_pool.statistics().waiting != 1:
                pass
            os.write(ready_w, str(len(held)).encode())
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 10) == b"2"
        stats = pool.statistics()
        assert (stats.active, stats.waiting) == (2, 1)
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    wait_until(lambda: pool.statistics().active == 0, what="the sessions' release")
    stats = pool.statistics()
    assert stats.waiting == 0
    with pool.get(a) as session:  # its processes are free for others
        assert greeting(session)[0] == a


# --- the server process ------------------------------------------------------------


SEED_EXAMPLE = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.simplefilter("error")  # a fork-with-threads warning fails the run
    from actorpool import ApplicationPoolServer, PoolConfig
    from actorpool.testing import FakeSpawner

    app_root = sys.argv[1]
    with FakeSpawner() as spawner:
        server = ApplicationPoolServer(PoolConfig(max_pool_size=4), spawner=spawner)
        server.connect().close()  # connecting starts no thread either
        # The creator stays single-threaded, so forking it is safe (3.11 has
        # no warning to catch: count the threads).
        assert len(os.listdir("/proc/self/task")) == 1, os.listdir("/proc/self/task")
        children = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    pool = server.connect()
                    server.detach()
                    with pool.get(app_root) as session:
                        line = session.socket.recv(4096)
                        expected = f"{app_root} {session.pid}\\n".encode()
                        status = 0 if line == expected else 2
                finally:
                    os._exit(status)
            children.append(pid)
        statuses = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in children]
        server.close()
    print(statuses)
    """
)


def test_the_seed_example_with_eight_forked_children(
    make_app: Callable[[str], str],
) -> None:
    app = make_app("a")
    result = subprocess.run(
        [sys.executable, "-c", SEED_EXAMPLE, app],
        capture_output=True,
        text=True,
        timeout=45,  # under the test's own timeout: its stderr is shown
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([0] * 8)
    assert "fork" not in result.stderr.lower()


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connect_close_cycles_leak_no_descriptors(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    wait_until: WaitUntil,
) -> None:
    app = make_app("a")
    # One process: a close and the next connection's get travel through
    # different session actors, so with room for two the pool could
    # rightly spawn a second instance and its socket would count here.
    server = start_server(spawner, max_pool_size=1)
    observer = server.connect()
    with observer.get(app):
        pass
    ours, theirs = open_fds(), open_fds(server.pid)
    for _ in range(200):
        pool = server.connect()
        with pool.get(app):
            pass
        pool.close()
    assert open_fds() == ours
    # The server closes its ends as it notices each client gone; each check
    # is a round trip to it, so this waits on the server, not a timer.
    wait_until(
        lambda: observer.statistics().clients == 1 and open_fds(server.pid) <= theirs,
        what="the server to close every connection",
    )
    assert open_fds(server.pid) <= theirs


def test_close_stops_the_server_and_its_instances(
    spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    server = ApplicationPoolServer(spawner=spawner)
    pool = server.connect()
    session = pool.get(app)
    server.close()
    assert server._process.poll() is not None
    with pytest.raises(ServerGoneError):
        pool.get(app)
    # The instance went with the server: its socket is gone.
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        session.socket.sendall(b"x" * 1_000_000)
    session.close()
    pool.close()


def test_server_stops_when_every_holder_lets_go(
    spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    server = ApplicationPoolServer(spawner=spawner)
    server.detach()  # the creator was the only holder of the connect channel
    assert server._process.wait(10) == 0
    with pytest.raises(Exception, match="detached"):
        server.connect()


def test_a_server_whose_creator_died_before_it_was_ready_stops(
    spawner: FakeSpawner,
) -> None:
    """Started as the constructor starts it, but with the creator's ends of
    the status pipe and the connect channel closed, as its death closes
    them. Before, writing "ready" raised BrokenPipeError in the main thread,
    the actors' threads kept the process alive and nothing would stop them
    (SIGTERM only set a flag nobody waited on any more)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    boot = _Bootstrap(PoolConfig(), spawner, theirs.fileno(), logging.WARNING)
    payload = pickle.dumps((list(sys.path), pickle.dumps(boot)))
    with subprocess.Popen(
        [sys.executable, "-c", _BOOT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(theirs.fileno(),),
        start_new_session=True,
    ) as process:
        theirs.close()
        ours.close()
        assert process.stdout is not None
        assert process.stdin is not None
        process.stdout.close()
        process.stdin.write(payload)
        process.stdin.close()
        try:
            assert process.wait(20) == 0
        finally:
            process.kill()
        assert process.stderr is not None
        assert b"creator is gone" in process.stderr.read()


def test_close_after_detach_still_stops_the_server_gracefully(
    spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    server = ApplicationPoolServer(spawner=spawner)
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that still holds the connect channel
        os.close(release_w)
        os.read(release_r, 1)
        os._exit(0)
    os.close(release_r)
    try:
        server.detach()
        server.close(timeout=20)
        # Stopped on request (exit status 0), not killed after the timeout.
        assert server._process.returncode == 0
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


def test_a_config_that_is_not_a_pool_config_is_refused_at_once(
    spawner: FakeSpawner,
) -> None:
    with pytest.raises(TypeError, match="PoolConfig, not dict"):
        ApplicationPoolServer({"max_pool_size": 2}, spawner=spawner)  # type: ignore[arg-type]


@pytest.mark.parametrize("start_timeout", [math.inf, math.nan, 0, -1, "30"])
def test_a_bad_start_timeout_is_refused_before_anything_starts(
    spawner: FakeSpawner, start_timeout: object
) -> None:
    """inf and NaN used to start the server, then fail (OverflowError,
    ValueError) while waiting for it."""
    with pytest.raises(ConfigError, match="start_timeout"):
        ApplicationPoolServer(spawner=spawner, start_timeout=start_timeout)  # type: ignore[arg-type]


def test_killed_server_gives_server_gone(
    spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    server = ApplicationPoolServer(spawner=spawner)
    pool = server.connect()
    try:
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(ServerGoneError):
            pool.get(app)
        with pytest.raises(ServerGoneError):
            server.connect()
    finally:
        pool.close()
        server.close()


# --- garbage on the wire -----------------------------------------------------------


def protocol_error_then_close(raw: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection."""
    raw.settimeout(10)
    received = b""
    while chunk := raw.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(random.Random(7).randbytes(64), id="random-bytes"),
        pytest.param(b"\x00\x00\x00\x05" + b"\x93\xa1x\x01\xc0", id="wrong-shape"),
        pytest.param(b"\x40\x00\x00\x00" + b"\x00" * 32, id="oversized-frame"),
    ],
)
def test_garbage_closes_that_connection_only(
    garbage: bytes,
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
) -> None:
    app = make_app("a")
    server = start_server(spawner)
    good = server.connect()
    bad = server.connect()
    bad._sock.sendall(garbage)
    answer = protocol_error_then_close(bad._sock)
    assert b"ProtocolError" in answer
    bad.close()
    with good.get(app) as session:
        assert greeting(session) == (app, session.pid)


def test_a_nul_in_an_app_root_fails_that_get_only(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner, restart_check_interval=0).connect()
    with pytest.raises(SpawnError, match="not an absolute path"):
        pool.get(app + "\0evil")
    with pool.get(app) as session:  # the server carries on
        assert greeting(session) == (app, session.pid)


def test_an_app_root_too_long_for_a_request_fails_that_get_only(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    """Before, it was sent, and the server closed the connection on it: every
    later call, from any thread, raised RemoteProtocolError."""
    app = make_app("a")
    pool = start_server(spawner).connect()
    with pytest.raises(ActorPoolError, match="limit"):
        pool.get("/" + "a" * 70_000)
    with pool.get(app) as session:  # the connection carries on
        assert greeting(session) == (app, session.pid)


def test_an_absurd_timeout_does_not_stop_other_timeouts(
    start_server: StartServer,
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    threads: ThreadPoolExecutor,
    wait_until: WaitUntil,
) -> None:
    app = make_app("a")
    server = start_server(spawner, max_pool_size=1)
    pool, other = server.connect(), server.connect()
    held = pool.get(app)
    patient = threads.submit(pool.get, app, timeout=1e300)
    wait_until(lambda: waiting(pool) == 1, what="the patient get to queue")
    with pytest.raises(GetTimeoutError):  # the alarm still serves this one
        other.get(app, timeout=0.2)
    held.close()
    patient.result(10).close()


def test_a_pool_used_across_fork_refuses_instead_of_sharing_the_socket(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    pid = os.fork()
    if pid == 0:  # the child must connect for itself, not borrow the parent's pool
        status = 1
        try:
            pool.get(app)
        except ActorPoolError as exc:
            status = 0 if "fork" in str(exc) else 2
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with pool.get(app) as session:  # the parent's connection is unharmed
        assert greeting(session) == (app, session.pid)


def test_closing_an_inherited_pool_in_a_child_leaves_the_parents_alone(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    app = make_app("a")
    pool = start_server(spawner).connect()
    pid = os.fork()
    if pid == 0:  # a child tidying up what it inherited, as with any socket
        try:
            pool.close()
        finally:
            os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with pool.get(app) as session:
        assert greeting(session) == (app, session.pid)


def test_closing_in_a_child_forked_while_a_parent_thread_held_the_lock(
    start_server: StartServer, spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    """A lock held by another thread at fork() stays held in the child for
    ever: close() took the pool's lock, and Session.close() its own, before
    noticing it was in a child, and hung there."""
    app = make_app("a")
    pool = start_server(spawner).connect()
    session = pool.get(app)
    locked, release = threading.Event(), threading.Event()

    def hold_the_locks() -> None:
        with pool._lock, session._lock:
            locked.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold_the_locks)
    holder.start()
    try:
        assert locked.wait(WAIT)
        with warnings.catch_warnings():  # forking with a thread is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            # A hang ends the child with SIGALRM (pytest-timeout's handler
            # would raise, and the finally below exit 0).
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(10)
            try:
                session.close()
                pool.close()
            finally:
                os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        release.set()
        holder.join(WAIT)
    assert greeting(session) == (app, session.pid)  # the parent's are unharmed
    session.close()
    assert pool.statistics().active == 0


def test_a_creator_holding_many_descriptors_can_start_a_server(
    spawner: FakeSpawner, make_app: Callable[[str], str]
) -> None:
    # A busy web server holds more than 1024 descriptors; select() refuses
    # to wait on one numbered past that, and starting the server used it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("cannot hold 1100 descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with (
            ApplicationPoolServer(spawner=spawner) as server,
            server.connect() as pool,
            pool.get(make_app("a")) as session,
        ):
            assert greeting(session)[1] == session.pid
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
