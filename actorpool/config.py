"""PoolConfig: the limits and timings of one pool, validated once."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

from actorpool.errors import ConfigError

__all__ = ["PoolConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """The limits and timings of one pool.

    Every field is checked when the config is made, so a bad value fails in
    the caller with :class:`~actorpool.errors.ConfigError` rather than later
    in the server process. Use :meth:`replace` to derive a changed copy.
    """

    max_pool_size: int = 6
    """Most application processes alive at once, over every app (>= 1)."""

    max_per_app: int = 0
    """Most processes of one app; 0 means no cap but ``max_pool_size``."""

    min_instances: int = 1
    """Processes per app that idle reaping leaves running (>= 0)."""

    max_idle_time: float = 300.0
    """Seconds a process may stay idle before it is stopped; 0 never reaps."""

    max_requests: int = 0
    """Sessions a process serves before it is retired; 0 means unlimited."""

    max_queue_size: int = 100
    """Gets that may wait per app; one more fails with ``QueueFullError``.
    0 means unbounded."""

    spawn_timeout: float = 90.0
    """Seconds a process may take to become ready before its spawn fails."""

    restart_check_interval: float = 1.0
    """Least seconds between two looks at an app's ``tmp/restart.txt`` and
    ``tmp/always_restart.txt``; 0 looks on every get."""

    max_clients: int = 1024
    """Client connections open at once; one more is refused with a clear
    error (each costs the server a thread and a socket)."""

    user: str | None = None
    """Who application processes run as when the server runs as root. None
    follows Passenger: the owner of the app's startup file, or ``nobody``
    when that owner is root. Ignored (but checked) when the server is not
    root: then processes run as the server's user, and naming another user
    fails each spawn with ``SpawnError``."""

    def __post_init__(self) -> None:
        check_int("max_pool_size", self.max_pool_size, minimum=1)
        check_int("max_per_app", self.max_per_app, minimum=0)
        check_int("min_instances", self.min_instances, minimum=0)
        check_int("max_requests", self.max_requests, minimum=0)
        check_int("max_queue_size", self.max_queue_size, minimum=0)
        check_int("max_clients", self.max_clients, minimum=1)
        check_seconds("max_idle_time", self.max_idle_time, allow_zero=True)
        check_seconds("spawn_timeout", self.spawn_timeout, allow_zero=False)
        check_seconds(
            "restart_check_interval", self.restart_check_interval, allow_zero=True
        )
        if self.user is not None and (
            not isinstance(self.user, str) or not self.user or "\0" in self.user
        ):
            raise ConfigError(f"user must be a user name or None, not {self.user!r}")

    def replace(self, **changes: Any) -> PoolConfig:
        """A copy with ``changes`` applied and validated."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc


MAX_INT = 2**63 - 1
"""Largest count the wire protocol carries (msgpack's signed 64 bits): a
larger limit could not even be reported by ``statistics()``."""


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int in range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= MAX_INT:
        raise ConfigError(f"{name} must be >= {minimum} and < 2**63, not {value}")


MAX_SECONDS = threading.TIMEOUT_MAX
"""Longest span accepted, about 292 years: the most a thread's wait or a
``select`` takes (longer ones raise ``OverflowError`` deep in a spawn)."""


def check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a span of seconds in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float: out of range too
        seconds = math.inf
    if not (0 <= seconds <= MAX_SECONDS) or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            f"{name} must be {bound} and at most {MAX_SECONDS:.0f} (about 292"
            f" years), not {value}"
        )
