"""Defects found while building the soak test (``benchmarks/soak.py``), each as
the smallest reproduction: an open one fails until actorpool is fixed, a
fixed one guards the fix. Each cleans up after itself, pass or fail."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import pytest
from test_spawners import SPAWNERS, me, processes_in, write_app

import actorpool.server
from actorpool import ActorPoolError, ApplicationPoolServer, PoolConfig
from actorpool.spawner import Spawner
from actorpool.testing import FakeSpawner

pytestmark = pytest.mark.slow


def test_a_client_killed_inside_connect_leaves_no_connection_behind(
    start_server: Callable[..., ApplicationPoolServer],
    spawner: FakeSpawner,
    wait_until: Callable[..., None],
) -> None:
    """Open up to 4b0258a, fixed in 3685f6d. ``connect()`` was two steps on
    the connect channel that every process shares: send CONNECT, then
    receive the new connection's descriptor. A client SIGKILLed between the
    two (a prefork worker killed as it starts) left its answer queued on the
    channel. The server had made a client for it whose other end sat in
    that queued message, so it never saw end of stream: the connection was
    counted, and held an actor thread and a socket in the server, until the
    server stopped. (The next connect() anywhere took the stale answer, and
    left its own queued.)
    """
    server = start_server(spawner)
    pool = server.connect()  # first, so that it cannot take the stale answer
    pid = os.fork()
    if pid == 0:
        # The SIGKILL lands after connect() has asked, before any answer:
        # before it receives the descriptor, or (if connect() sends its own
        # end of the connection along) before the handshake.
        def killed(*_: object) -> NoReturn:
            os._exit(0)

        actorpool.server.recv_fd = killed  # type: ignore[attr-defined]
        actorpool.server.ApplicationPool = killed  # type: ignore[misc,assignment]
        try:
            server.connect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    # The acceptor takes the channel's messages in order: once a later
    # connection is up, the dead client's request has been handled. Then
    # its connection must go (each check is a round trip, not a sleep).
    later = server.connect()
    wait_until(
        lambda: pool.statistics().clients == 2, 5, "the dead client's connection"
    )
    later.close()


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_sigkill_of_the_server_stops_a_process_still_loading_its_app(
    make_spawner: type[Spawner],
    tmp_path: Path,
    threads: ThreadPoolExecutor,
    wait_until: Callable[..., None],
) -> None:
    """Found open at 637f298, fixed in 4b0258a (``LifelineWatch``).
    ``docs/spawning.md``: after a SIGKILL of the server "every process is
    gone within a second or two". Not one that was still importing its app:
    the worker (DirectSpawner) and the preloader (SmartSpawner) watched the
    lifeline only once the import had returned, so an import that never
    returns (waiting on a database, say) kept its process for ever. Two such
    preloaders, left by test runs, were found on the test machine.
    """
    importing = tmp_path / "importing"
    app = write_app(
        tmp_path / "app",
        f"import pathlib, threading\npathlib.Path({str(importing)!r}).touch()\n"
        "threading.Event().wait()\n",
    )
    server = ApplicationPoolServer(
        PoolConfig(user=me(), spawn_timeout=60), spawner=make_spawner()
    )
    pool = server.connect()
    try:
        pending = threads.submit(pool.get, app)
        # In the app's import, so the process is past its own start-up and
        # what follows measures only how it answers the lifeline.
        wait_until(importing.exists, 30, "the app's import")
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(ActorPoolError):
            pending.result(timeout=10)
        # /proc is read on every check: no sleeping.
        wait_until(lambda: not processes_in(tmp_path), 5, "the process to go")
    finally:
        for pid in processes_in(tmp_path):
            os.kill(pid, signal.SIGKILL)
        pool.close()
        server.close()
