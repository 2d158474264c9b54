"""What ``actorpool status`` prints: a pool snapshot as JSON-able data and as text.

:func:`status_data` adds what only the serving host knows (memory of each
process, the server's pid and uptime) to a :class:`PoolStatistics`;
:func:`format_status` renders that data the way Phusion Passenger's
``passenger-status`` does. The text is built from the plain data alone, so it
works as well on data that came back through JSON.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import actorpool
from actorpool.statistics import PoolStatistics

__all__ = ["format_status", "process_memory_kb", "status_data"]


def status_data(
    stats: PoolStatistics,
    *,
    server_pid: int,
    started: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON-able status: ``stats.to_dict()`` plus what this host knows.

    Each process gains ``memory_kb`` (see :func:`process_memory_kb`) and
    ``last_used`` (seconds ago, the same as ``idle``). The top level gains
    ``server_pid``, ``uptime`` (seconds since ``started``, a
    :func:`time.time` value), ``version`` and every key of ``extra``. A key of
    ``extra`` that would replace one of those raises :class:`ValueError`:
    the figures must stay what the pool reported.
    """
    data = stats.to_dict()
    # Lists, not the snapshot's tuples, so the data equals its JSON round trip.
    data["apps"] = list(data["apps"])
    for app in data["apps"]:
        app["processes"] = list(app["processes"])
        for process in app["processes"]:
            process["memory_kb"] = process_memory_kb(process["pid"])
            process["last_used"] = process["idle"]
    # The wall clock may step back; a negative uptime would only confuse.
    data["server_pid"] = server_pid
    data["uptime"] = max(0.0, time.time() - started)
    data["version"] = actorpool.__version__
    if extra:
        clash = sorted(set(extra) & set(data))
        if clash:
            raise ValueError(f"extra status keys clash with the pool's: {clash}")
        data.update(extra)
    return data


def process_memory_kb(pid: int) -> int | None:
    """Memory of process ``pid`` in KiB: its PSS, else its RSS, else ``None``.

    PSS (``/proc/PID/smaps_rollup``) splits shared pages among the processes
    that share them, so forked workers of a preloader are not counted many
    times over; reading it needs the right to ptrace the process, so when it
    is denied (an app run as another user) RSS from ``/proc/PID/status``,
    which anyone may read, stands in. ``None`` when neither can be read:
    pid 0 (still spawning), or a process that has just exited.
    """
    if pid <= 0:
        return None
    for path, key in (
        (f"/proc/{pid}/smaps_rollup", "Pss:"),
        (f"/proc/{pid}/status", "VmRSS:"),
    ):
        value = _proc_field_kb(path, key)
        if value is not None:
            return value
    return None


def _proc_field_kb(path: str, key: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith(key):
                    # "Pss:    1234 kB"
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_status(data: Mapping[str, Any]) -> str:
    """The ``passenger-status``-like text for :func:`status_data`'s output."""
    apps: list[Mapping[str, Any]] = list(data.get("apps", ()))
    processes = [p for app in apps for p in app["processes"]]
    # Idle processes as passenger-status counts them: count - active would go
    # negative when a process serves several sessions.
    inactive = sum(1 for p in processes if p["sessions"] == 0 and p["state"] == "ready")
    max_per_app = data.get("max_per_app", 0)
    lines = [
        f"Version : {data.get('version', '?')}",
        f"Server  : PID {data.get('server_pid', '?')}, "
        f"up {_duration(data.get('uptime', 0.0))}",
        "",
        "----------- General information -----------",
        f"Max pool size : {data['max_pool_size']}",
        f"Max per app   : {max_per_app or 'no limit'}",
        f"Processes     : {data['count']}",
        f"Active        : {data['active']} sessions",
        f"Inactive      : {inactive} idle processes",
        f"Clients       : {data.get('clients', 0)} connections",
        f"Waiting on global queue: {data['waiting']}",
    ]
    extra = _extra_lines(data)
    if extra:
        lines += ["", "----------- Front end -----------", *extra]
    lines += ["", "----------- Application groups -----------"]
    if not apps:
        lines.append("(no application processes)")
    for app in apps:
        lines += [
            f"{app['app_root']}:",
            f"  Processes        : {app['count']}",
            f"  Active sessions  : {app['active']}",
            f"  Requests in queue: {app['waiting']}",
        ]
        for p in app["processes"]:
            sessions = f"{p['sessions']}/{p['concurrency']}"
            memory = _memory(p.get("memory_kb"))
            last_used = _duration(p.get("last_used", p["idle"]))
            lines += [
                f"  * PID: {p['pid']:<8} Sessions: {sessions:<7} "
                f"Processed: {p['processed']:<8} Uptime: {_duration(p['uptime'])}",
                f"    State: {p['state']:<9} Memory  : {memory:<7} "
                f"Last used: {last_used} ago",
            ]
        lines.append("")
    # No final newline: the caller prints it.
    return "\n".join(lines).rstrip("\n")


# The keys status_data always writes; anything else came in through ``extra``.
_KNOWN = frozenset(
    {"max_pool_size", "max_per_app", "count", "active", "waiting", "clients"}
    | {"apps", "server_pid", "uptime", "version"}
)


def _extra_lines(data: Mapping[str, Any]) -> list[str]:
    """The front end's own facts (workers, bind, routes...), one per line."""
    lines: list[str] = []
    for key in sorted(set(data) - _KNOWN):
        value = data[key]
        label = key.replace("_", " ").capitalize()
        if isinstance(value, Mapping):
            lines.append(f"{label}:")
            lines += [f"  {k} -> {v}" for k, v in value.items()]
        elif isinstance(value, list | tuple) and any(
            isinstance(item, Mapping) for item in value
        ):
            # Records (routes, say): one a line, repr so "" and None show.
            lines.append(f"{label}:")
            lines += [f"  {_record(item)}" for item in value]
        elif isinstance(value, list | tuple):
            lines.append(f"{label:<14}: {', '.join(map(str, value))}")
        else:
            lines.append(f"{label:<14}: {value}")
    return lines


def _record(item: Any) -> str:
    if not isinstance(item, Mapping):
        return str(item)
    return " ".join(f"{k}={v!r}" for k, v in item.items())


def _duration(seconds: float) -> str:
    """``3723`` -> ``1h 2m 3s``: the largest units that are not zero onward."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _memory(kb: int | None) -> str:
    """KiB as passenger-status shows memory: ``512K``, ``12M``, ``1.5G``."""
    if kb is None:
        return "n/a"
    if kb < 1024:
        return f"{kb}K"
    if kb < 1024 * 1024:
        return f"{round(kb / 1024)}M"
    return f"{kb / (1024 * 1024):.1f}G"
