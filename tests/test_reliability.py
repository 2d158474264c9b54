"""Limits that protect the server, boundaries between clients, and the server
dying, end to end (issue "Reliability under load, faults and bad input")."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
from test_spawners import me, write_app

from actorpool import (
    ActorPoolError,
    ApplicationPoolServer,
    GetTimeoutError,
    ServerGoneError,
)
from actorpool.messages import CloseSession, GetStatistics
from actorpool.protocol import MAX_IN_FLIGHT
from actorpool.spawners import DirectSpawner
from actorpool.testing import FakeSpawner

pytestmark = pytest.mark.slow


# --- limits ------------------------------------------------------------------------


def test_a_connection_beyond_max_clients_gets_a_clear_error(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
    wait_until: Callable[..., None],
) -> None:
    server = start_server(spawner, max_clients=2)
    first, second = server.connect(), server.connect()
    with pytest.raises(ActorPoolError, match=r"refused the connection.*max_clients=2"):
        server.connect()
    with first.get(make_app("a")) as session:  # the others carry on
        assert session.pid > 0
    first.close()
    # Once the server has seen the first one go, there is room again.
    deadline = time.monotonic() + 10
    while True:
        try:
            third = server.connect()
            break
        except ActorPoolError:
            assert time.monotonic() < deadline, "no room after a client left"
    # The acceptor makes room when the first client's session actor stops;
    # the registry counts it gone a moment later, when the actor's last
    # message arrives.
    wait_until(lambda: third.statistics().clients == 2, what="the first one gone")
    second.close()
    third.close()


def test_a_client_that_never_reads_its_replies_blocks_nobody_else(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
) -> None:
    server = start_server(spawner)
    rogue, honest = server.connect(), server.connect()
    app = make_app("a")
    for name in "bcdef":  # apps and processes make statistics replies longer
        honest.get(make_app(name)).close()
    # The rogue asks for as many statistics as it may have in flight and reads
    # none of the answers: far more than the socket buffers hold.
    reply_size = len(msgpack.packb(honest.statistics().to_dict()))
    buffered = rogue._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert reply_size * (MAX_IN_FLIGHT - 1) > 4 * buffered
    frames = b"".join(
        rogue._conn.send(GetStatistics(request_id))
        for request_id in range(1, MAX_IN_FLIGHT)
    )
    rogue._sock.sendall(frames)
    for _ in range(50):
        with honest.get(app, timeout=5):  # GetTimeoutError if the server stuck
            pass
    assert honest.statistics().clients == 2
    rogue.close()
    honest.close()


# --- boundaries --------------------------------------------------------------------


def test_a_client_cannot_close_another_clients_session(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
) -> None:
    server = start_server(spawner)
    owner, intruder = server.connect(), server.connect()
    with owner.get(make_app("a")) as session:
        for guess in range(session.id - 5, session.id + 5):
            intruder._notify(CloseSession(guess))
        stats = intruder.statistics()  # after the notices: same connection
        assert stats.active == 1
    owner.close()
    intruder.close()


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def inet_inodes() -> set[str]:
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        try:
            with open(f"/proc/net/{table}") as file:
                next(file)
                found.update(line.split()[9] for line in file)
        except FileNotFoundError:
            continue
    return found


def test_neither_the_server_nor_a_worker_opens_a_tcp_or_udp_port(
    start_server: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    server = start_server(DirectSpawner(), user=me())
    pool = server.connect()
    with pool.get(write_app(tmp_path / "app")) as session:
        for pid in (server.pid, session.pid):
            sockets = socket_inodes(pid)
            assert sockets, pid  # it has sockets, all of them Unix ones
            assert not sockets & inet_inodes(), pid


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


def test_no_descriptor_is_inherited_beyond_those_named(
    start_server: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    fd = os.open(marker, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(fd, True)  # as careless code in the creator might
    try:
        server = start_server(DirectSpawner(), user=me())
        pool = server.connect()
        with pool.get(write_app(tmp_path / "app")) as session:
            # Keep-alive: once the answer is in, the worker holds our
            # connection, waiting for the next request.
            session.socket.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            response = http.client.HTTPResponse(session.socket)
            response.begin()
            assert response.status == 200
            response.read()
            server_fds = fd_targets(server.pid)
            worker_fds = fd_targets(session.pid)
    finally:
        os.close(fd)
    assert str(marker) not in server_fds
    assert str(marker) not in worker_fds
    # The worker holds: stdin (/dev/null), stdout and stderr (one pipe to the
    # server's log), the lifeline, its listening socket and our session's
    # connection; whatever the interpreter adds is neither a socket nor a pipe.
    pipes = [t for t in worker_fds if t.startswith("pipe:")]
    sockets = [t for t in worker_fds if t.startswith("socket:")]
    assert len(set(pipes)) == 2, worker_fds  # the output pipe, the lifeline
    assert len(sockets) == 2, worker_fds
    assert os.devnull in worker_fds


# --- the server dying --------------------------------------------------------------


def test_clients_get_server_gone_within_a_second_when_the_server_dies(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
) -> None:
    server = start_server(spawner, max_pool_size=1)
    pool = server.connect()
    app = make_app("a")
    held = pool.get(app)
    with ThreadPoolExecutor(1) as executor:
        waiting = executor.submit(pool.get, app)  # queued behind `held`
        with pytest.raises(GetTimeoutError):
            pool.get(app, timeout=0.2)  # proof that the pool is full
        os.kill(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ServerGoneError):
            waiting.result(timeout=5)
        assert time.monotonic() - killed < 3.0
    start = time.monotonic()
    with pytest.raises(ServerGoneError):
        pool.get(app)
    assert time.monotonic() - start < 3.0
    held.close()  # quietly does nothing on a dead connection
    with pytest.raises(ServerGoneError):
        server.connect()


def test_many_threads_share_one_connection(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    make_app: Callable[[str], str],
) -> None:
    # Leader/follower with targeted wake-ups: every thread's reply reaches
    # that thread, whoever happens to be reading the socket.
    server = start_server(spawner, max_pool_size=4)
    pool = server.connect()
    apps = [make_app(name) for name in "abcd"]

    def work(worker: int) -> int:
        for round_ in range(30):
            with pool.get(apps[(worker + round_) % len(apps)], timeout=10):
                pool.statistics()
        return worker

    with ThreadPoolExecutor(16) as executor:
        done = list(executor.map(work, range(16), timeout=50))
    assert done == list(range(16))
    stats = pool.statistics()
    assert (stats.active, stats.waiting) == (0, 0)
