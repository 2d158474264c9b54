"""Baseline: the same pool operations served by ``multiprocessing.managers``.

A thread-per-client manager server holding a lock-and-condition pool, the
straightforward way to share a pool between processes in the standard
library. It hands out sessions on the same echo processes as actorpool.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from multiprocessing.managers import BaseManager
from typing import Any

from _instances import EchoProcess


class LockedPool:
    """One lock, one condition: get blocks while every process is busy."""

    def __init__(self, max_pool_size: int) -> None:
        self._max = max_pool_size
        self._cond = threading.Condition()
        self._socket_dir = tempfile.mkdtemp(prefix="bench-managers-")
        self._idle: dict[str, list[EchoProcess]] = {}
        self._count = 0
        self._sessions: dict[int, tuple[str, EchoProcess]] = {}
        self._ids = itertools.count(1)
        self._all: list[EchoProcess] = []

    def get(self, app_root: str) -> tuple[int, int, str]:
        with self._cond:
            while True:
                idle = self._idle.get(app_root)
                if idle:
                    instance = idle.pop()
                    break
                if self._count < self._max:
                    self._count += 1
                    address = os.path.join(self._socket_dir, f"{self._count}.sock")
                    instance = EchoProcess(address)
                    self._all.append(instance)
                    break
                self._cond.wait()
            session_id = next(self._ids)
            self._sessions[session_id] = (app_root, instance)
            return session_id, instance.pid, instance.address

    def close(self, session_id: int) -> None:
        with self._cond:
            app_root, instance = self._sessions.pop(session_id)
            self._idle.setdefault(app_root, []).append(instance)
            self._cond.notify()

    def shutdown(self) -> None:
        for instance in self._all:
            instance.stop()
            instance.wait()


_POOL: LockedPool | None = None


def _get_pool() -> LockedPool:
    assert _POOL is not None
    return _POOL


def _make_pool(max_pool_size: int) -> None:
    global _POOL
    _POOL = LockedPool(max_pool_size)


class PoolManager(BaseManager):
    pass


PoolManager.register("get_pool", callable=_get_pool)
PoolManager.register("make_pool", callable=_make_pool)


def start(max_pool_size: int) -> tuple[PoolManager, Any]:
    """Start a manager server; returns it and its address (for children)."""
    address = os.path.join(tempfile.mkdtemp(prefix="bench-managers-"), "manager")
    manager = PoolManager(address=address, authkey=b"bench")
    manager.start()
    manager.make_pool(max_pool_size)
    return manager, address


def connect(address: str) -> Any:
    """A proxy to the pool, from any process."""
    manager = PoolManager(address=address, authkey=b"bench")
    manager.connect()
    return manager.get_pool()
