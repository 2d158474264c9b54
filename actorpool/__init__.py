"""actorpool: an application-process pool server built on pykka actors.

A server keeps a pool of application processes, spawned on demand per
application root, and lets many forked client processes check out a
*session*: a connected socket to one process, theirs until they close it.

::

    from actorpool import ApplicationPoolServer, PoolConfig
    from actorpool.testing import FakeSpawner

    config = PoolConfig(max_pool_size=6)
    with ApplicationPoolServer(config, spawner=FakeSpawner()) as server:
        pool = server.connect()
        with pool.get("/srv/app") as session:
            session.socket.recv(100)
"""

from __future__ import annotations

from actorpool.client import ApplicationPool, Session
from actorpool.config import PoolConfig
from actorpool.errors import (
    ActorPoolError,
    ConfigError,
    GetTimeoutError,
    LocalProtocolError,
    ProtocolError,
    QueueFullError,
    RemoteProtocolError,
    ServerGoneError,
    SpawnError,
)
from actorpool.server import ApplicationPoolServer
from actorpool.spawner import Instance, Spawner, SpawnRequest
from actorpool.statistics import AppStatistics, PoolStatistics, ProcessStatistics

__all__ = [
    "ActorPoolError",
    "AppStatistics",
    "ApplicationPool",
    "ApplicationPoolServer",
    "ConfigError",
    "GetTimeoutError",
    "Instance",
    "LocalProtocolError",
    "PoolConfig",
    "PoolStatistics",
    "ProcessStatistics",
    "ProtocolError",
    "QueueFullError",
    "RemoteProtocolError",
    "ServerGoneError",
    "Session",
    "SpawnError",
    "SpawnRequest",
    "Spawner",
]

__version__ = "0.1.0"
