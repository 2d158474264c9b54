"""Frozen snapshots of a pool, as ``ApplicationPool.statistics()`` returns them."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from actorpool.errors import RemoteProtocolError

__all__ = ["AppStatistics", "PoolStatistics", "ProcessStatistics"]


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessStatistics:
    """One application process."""

    instance_id: int
    """The pool's number for the process."""
    pid: int
    """Its process id (0 while it is being spawned)."""
    state: str
    """``spawning``, ``ready`` or ``retiring`` (finishing its sessions)."""
    sessions: int
    """Sessions open on it now."""
    concurrency: int
    """Sessions it may serve at once."""
    processed: int
    """Sessions it has been given since it started."""
    uptime: float
    """Seconds since its spawn began."""
    idle: float
    """Seconds since it was last given or released a session."""


@dataclasses.dataclass(frozen=True, slots=True)
class AppStatistics:
    """One application root and its processes."""

    app_root: str
    """The application's root directory."""
    count: int
    """Its processes, including those being spawned."""
    active: int
    """Sessions open on its processes."""
    waiting: int
    """Gets queued for it."""
    processes: tuple[ProcessStatistics, ...]
    """Each of its processes."""


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatistics:
    """The whole pool at one moment. ``str()`` reads like ``passenger-status``."""

    max_pool_size: int
    """The limit on processes over every app."""
    max_per_app: int
    """The limit on processes of one app (0: none)."""
    count: int
    """Processes alive or being spawned."""
    active: int
    """Sessions open."""
    waiting: int
    """Gets queued, over every app."""
    clients: int
    """Client connections open."""
    apps: tuple[AppStatistics, ...]
    """Each app that has processes or waiters."""

    def app(self, app_root: str) -> AppStatistics | None:
        """The statistics of ``app_root``, or ``None`` if the pool has none."""
        return next((a for a in self.apps if a.app_root == app_root), None)

    @property
    def idle_processes(self) -> int:
        """Processes that are up and serve no session."""
        return sum(
            1
            for app in self.apps
            for p in app.processes
            if p.sessions == 0 and p.state == "ready"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for msgpack and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolStatistics:
        """Rebuild a snapshot from :meth:`to_dict`'s output, checking its shape.

        ``data`` comes from the wire, so every field is checked: exactly the
        expected keys, non-negative ints, finite non-negative numbers, strings.
        Anything else raises :class:`~actorpool.errors.RemoteProtocolError`.
        """
        try:
            fields = _fields(cls, data)
            fields["apps"] = tuple(
                _app_from_dict(app) for app in _sequence("apps", fields["apps"])
            )
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed statistics: {exc}") from exc

    def __str__(self) -> str:
        lines = [
            "----------- General information -----------",
            f"max      = {self.max_pool_size}",
            f"count    = {self.count}",
            f"active   = {self.active}",
            # Idle processes, as passenger-status counts them; count - active
            # would go negative when a process serves several sessions.
            f"inactive = {self.idle_processes}",
            f"Waiting on global queue: {self.waiting}",
            "",
            "----------- Application groups -----------",
        ]
        for app in self.apps:
            lines.append(f"{app.app_root}:")
            lines.append(f"  Requests in queue: {app.waiting}")
            for p in app.processes:
                lines.append(
                    f"  * PID: {p.pid:<7} Sessions: {p.sessions:<3} "
                    f"Processed: {p.processed:<6} Uptime: {_duration(p.uptime)}"
                    f"  Idle: {_duration(p.idle)}  State: {p.state}"
                )
            lines.append("")
        return "\n".join(lines)


def _app_from_dict(data: Any) -> AppStatistics:
    fields = _fields(AppStatistics, data)
    fields["processes"] = tuple(
        ProcessStatistics(**_fields(ProcessStatistics, process))
        for process in _sequence("processes", fields["processes"])
    )
    return AppStatistics(**fields)


def _sequence(name: str, value: Any) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be an array, not {type(value).__name__}")
    return value


def _fields(cls: type[Any], data: Any) -> dict[str, Any]:
    """``data``'s fields for ``cls``, each scalar checked against its annotation."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a map, not {type(data).__name__}")
    names = [field.name for field in dataclasses.fields(cls)]
    if set(data) != set(names):
        missing = sorted(set(names) - set(data))
        extra = sorted(map(repr, set(data) - set(names)))
        raise TypeError(f"{cls.__name__}: missing {missing}, unexpected {extra}")
    hints = _HINTS[cls]
    fields: dict[str, Any] = {}
    for name in names:
        value = data[name]
        hint = hints[name]
        if hint is int:
            if type(value) is not int or value < 0:
                raise TypeError(f"{name} must be an int >= 0, not {value!r:.40}")
        elif hint is float:
            if type(value) not in (int, float) or not 0 <= value < math.inf:
                raise TypeError(f"{name} must be a number >= 0, not {value!r:.40}")
            value = float(value)
        elif hint is str and type(value) is not str:
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        fields[name] = value
    return fields


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


_HINTS: dict[type[Any], dict[str, Any]] = {
    cls: typing.get_type_hints(cls)
    for cls in (ProcessStatistics, AppStatistics, PoolStatistics)
}
