"""Shared fixtures: app roots, a clean actor registry, servers that always stop."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pykka
import pytest

from actorpool import ApplicationPool, ApplicationPoolServer, PoolConfig
from actorpool.testing import FakeSpawner


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """Every test ends with no actor running, whatever it started (pykka's habit)."""
    yield
    pykka.ActorRegistry.stop_all()


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[[str], str]:
    """Make an app root directory (with a ``tmp/``) and return its absolute path."""

    def make(name: str = "app") -> str:
        root = tmp_path / name
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        return os.fspath(root)

    return make


@pytest.fixture
def spawner() -> Iterator[FakeSpawner]:
    """A FakeSpawner whose control directory is removed after the test."""
    with FakeSpawner() as fake:
        yield fake


class _TrackedServer(ApplicationPoolServer):
    """A server that remembers its connections so teardown can close them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pools: list[ApplicationPool] = []
        super().__init__(*args, **kwargs)

    def connect(self) -> ApplicationPool:
        pool = super().connect()
        self.pools.append(pool)
        return pool


@pytest.fixture
def start_server() -> Iterator[Callable[..., ApplicationPoolServer]]:
    """Start pool servers; their connections and the servers close after the test."""
    servers: list[_TrackedServer] = []

    def start(spawner: FakeSpawner, **config: Any) -> ApplicationPoolServer:
        server = _TrackedServer(PoolConfig(**config), spawner=spawner)
        servers.append(server)
        return server

    yield start
    for server in servers:
        for pool in server.pools:
            pool.close()
        server.close()


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    """Run blocking calls (a get that must wait) beside the test; joined after it."""
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="test") as executor:
        yield executor


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Re-check ``predicate`` until it holds or ``timeout`` passes.

    For state only reachable by asking (the pool's statistics, a process's
    entry in /proc): each check is a round trip to the server or a read of
    the kernel's state, so this loop waits on those, not on a sleep.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}\n{thread_stacks()}"
            )
        # Lets the threads and processes it waits on have the GIL and the
        # core: on a two-core machine a loop that never lets go slows them.
        os.sched_yield()


def thread_stacks() -> str:
    """Where each thread of this process is: a wait that timed out says what
    the code it waited on was doing (a CI log is all there is to go on)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
        if ident != threading.get_ident()
    )


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., None]:
    """:func:`wait_until` as a fixture."""
    return wait_until
