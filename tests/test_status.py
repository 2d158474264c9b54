"""``actorpool status``: status data from a snapshot, and its passenger-status text."""

from __future__ import annotations

import io
import json
import os
import re
import time
from typing import Any

import pytest

import actorpool
from actorpool.frontend import status
from actorpool.frontend.status import format_status, process_memory_kb, status_data
from actorpool.statistics import AppStatistics, PoolStatistics, ProcessStatistics

ME = os.getpid()
# Above PID_MAX_LIMIT (2**22), so no process can have it.
GONE = 2**22 + 1


def process(instance_id: int, pid: int, **changes: Any) -> ProcessStatistics:
    values: dict[str, Any] = {
        "instance_id": instance_id,
        "pid": pid,
        "state": "ready",
        "sessions": 1,
        "concurrency": 1,
        "processed": 17,
        "uptime": 3723.4,
        "idle": 12.0,
    }
    values.update(changes)
    return ProcessStatistics(**values)


SNAPSHOT = PoolStatistics(
    max_pool_size=6,
    max_per_app=2,
    count=4,
    active=3,
    waiting=3,
    clients=5,
    apps=(
        AppStatistics(
            app_root="/srv/blog",
            count=2,
            active=1,
            waiting=0,
            processes=(
                process(1, ME),
                process(2, GONE, sessions=0, processed=250, uptime=59.9, idle=7.5),
            ),
        ),
        AppStatistics(
            app_root="/srv/shop",
            count=2,
            active=2,
            waiting=3,
            processes=(
                process(3, 5201, sessions=2, concurrency=4, processed=9, uptime=125),
                process(4, 0, state="spawning", sessions=0, processed=0, uptime=0.2),
            ),
        ),
    ),
)


def processes(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for app in data["apps"] for p in app["processes"]}


def test_status_data_holds_the_snapshot_and_the_hosts_figures() -> None:
    started = time.time() - 100
    data = status_data(SNAPSHOT, server_pid=4321, started=started)
    after = time.time() - started

    for key, value in SNAPSHOT.to_dict().items():
        if key != "apps":
            assert data[key] == value
    assert [app["app_root"] for app in data["apps"]] == ["/srv/blog", "/srv/shop"]
    assert data["server_pid"] == 4321
    assert 100 <= data["uptime"] <= after
    assert data["version"] == actorpool.__version__

    by_pid = processes(data)
    assert set(by_pid) == {ME, GONE, 5201, 0}
    mine = by_pid[ME]
    assert isinstance(mine["memory_kb"], int)
    assert mine["memory_kb"] > 0
    assert by_pid[GONE]["memory_kb"] is None
    assert by_pid[0]["memory_kb"] is None
    for p in by_pid.values():
        assert p["last_used"] == p["idle"]
    assert by_pid[5201]["sessions"] == 2
    assert by_pid[GONE]["processed"] == 250


def test_status_data_round_trips_through_json() -> None:
    data = status_data(
        SNAPSHOT,
        server_pid=1,
        started=time.time(),
        extra={"workers": 4, "bind": "127.0.0.1:8000", "routes": {"/": "/srv/blog"}},
    )
    assert json.loads(json.dumps(data)) == data
    assert data["workers"] == 4
    assert data["routes"] == {"/": "/srv/blog"}


def test_uptime_is_never_negative() -> None:
    # A wall clock set back after the server started.
    data = status_data(SNAPSHOT, server_pid=1, started=time.time() + 3600)
    assert data["uptime"] == 0.0


def test_extra_must_not_replace_the_pools_figures() -> None:
    with pytest.raises(ValueError, match="waiting"):
        status_data(SNAPSHOT, server_pid=1, started=0.0, extra={"waiting": 0})


def fake_proc(monkeypatch: pytest.MonkeyPatch, files: dict[str, str | None]) -> None:
    """``open`` in the status module sees ``files`` (None: permission denied)."""

    def fake_open(path: str, *args: Any, **kwargs: Any) -> io.StringIO:
        name = path.rsplit("/", 1)[-1]
        content = files.get(name)
        if content is None:
            raise PermissionError(13, "Permission denied", path)
        return io.StringIO(content)

    monkeypatch.setattr(status, "open", fake_open, raising=False)


def test_memory_is_pss_when_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(
        monkeypatch,
        {
            "smaps_rollup": "Rss:   5000 kB\nPss:   1200 kB\n",
            "status": "Name:\tpython\nVmRSS:\t  5000 kB\n",
        },
    )
    assert process_memory_kb(1234) == 1200


def test_memory_falls_back_to_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    # An app run as another user: smaps_rollup is denied, status is not.
    fake_proc(monkeypatch, {"smaps_rollup": None, "status": "VmRSS:\t  5000 kB\n"})
    assert process_memory_kb(1234) == 5000


@pytest.mark.parametrize(
    "files",
    [
        {"smaps_rollup": None, "status": None},
        # A zombie: no memory map, no VmRSS line.
        {"smaps_rollup": "", "status": "Name:\tpython\nState:\tZ (zombie)\n"},
        {"smaps_rollup": "Pss: lots\n", "status": "VmRSS:\n"},
    ],
)
def test_memory_unknown(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, str | None]
) -> None:
    fake_proc(monkeypatch, files)
    assert process_memory_kb(1234) is None


def test_memory_of_this_process_is_plausible() -> None:
    kb = process_memory_kb(ME)
    assert kb is not None
    # An interpreter with pytest loaded: more than 1 MiB, less than 64 GiB.
    assert 1024 < kb < 64 * 1024 * 1024


def block(text: str, pid: int) -> str:
    """The two lines of ``text`` about process ``pid``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"  * PID: {pid} "):
            return "\n".join(lines[i : i + 2])
    raise AssertionError(f"no process {pid} in:\n{text}")


def test_format_status_shows_every_figure() -> None:
    data = status_data(SNAPSHOT, server_pid=4321, started=time.time() - 90061)
    text = format_status(data)

    assert f"Version : {actorpool.__version__}" in text
    assert "PID 4321, up 1d 1h 1m 1s" in text
    assert "Max pool size : 6\n" in text
    assert "Max per app   : 2\n" in text
    assert "Processes     : 4\n" in text
    assert "Active        : 3 sessions\n" in text
    # Only GONE is ready with no session; the spawning one does not count.
    assert "Inactive      : 1 idle processes\n" in text
    assert "Clients       : 5 connections\n" in text
    assert "Waiting on global queue: 3\n" in text

    blog, shop = text.split("/srv/blog:\n")[1].split("/srv/shop:\n")
    assert "Requests in queue: 0\n" in blog
    assert "Requests in queue: 3\n" in shop
    assert "Processes        : 2\n" in shop
    assert "Active sessions  : 2\n" in shop
    assert f"PID: {ME} " in blog
    assert "PID: 5201 " in shop

    mine = block(text, ME)
    assert "Sessions: 1/1 " in mine
    assert "Processed: 17 " in mine
    assert "Uptime: 1h 2m 3s" in mine
    assert "Last used: 12s ago" in mine
    assert "State: ready " in mine
    assert re.search(r"Memory  : \d+(\.\d)?[KMG] ", mine), mine

    gone = block(text, GONE)
    assert "Processed: 250 " in gone
    assert "Uptime: 59s" in gone
    assert "Last used: 7s ago" in gone
    assert "Memory  : n/a " in gone

    shop_process = block(text, 5201)
    assert "Sessions: 2/4 " in shop_process
    assert "Uptime: 2m 5s" in shop_process
    assert "State: spawning" in block(text, 0)


def test_format_status_of_json_data_is_the_same() -> None:
    data = status_data(SNAPSHOT, server_pid=1, started=time.time(), extra={"a": [1]})
    assert format_status(json.loads(json.dumps(data))) == format_status(data)


def one_process_text(**changes: Any) -> str:
    stats = PoolStatistics(
        max_pool_size=1,
        max_per_app=0,
        count=1,
        active=0,
        waiting=0,
        clients=0,
        apps=(AppStatistics("/srv/one", 1, 0, 0, (process(1, 4242),)),),
    )
    data = status_data(stats, server_pid=1, started=time.time())
    data["apps"][0]["processes"][0].update(changes)
    return format_status(data)


@pytest.mark.parametrize(
    ("kb", "shown"),
    [
        (None, "n/a"),
        (0, "0K"),
        (512, "512K"),
        (12 * 1024, "12M"),
        (12 * 1024 + 600, "13M"),
        (1536 * 1024, "1.5G"),
    ],
)
def test_memory_units(kb: int | None, shown: str) -> None:
    assert f"Memory  : {shown} " in one_process_text(memory_kb=kb)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (59.99, "59s"),
        (60, "1m 0s"),
        (3600, "1h 0m 0s"),
        (3723, "1h 2m 3s"),
        (86400 + 5, "1d 0h 0m 5s"),
    ],
)
def test_durations(seconds: float, shown: str) -> None:
    text = one_process_text(uptime=seconds, last_used=seconds)
    assert f"Uptime: {shown}\n" in text
    assert f"Last used: {shown} ago" in text


def test_no_limit_per_app_and_no_apps() -> None:
    stats = PoolStatistics(6, 0, 0, 0, 0, 0, ())
    text = format_status(status_data(stats, server_pid=1, started=time.time()))
    assert "Max per app   : no limit\n" in text
    assert "Inactive      : 0 idle processes\n" in text
    assert text.endswith("(no application processes)")
    assert "Front end" not in text


def test_format_status_shows_the_front_ends_extra_facts() -> None:
    extra = {
        "workers": [301, 302],
        "master_pid": 300,
        "bind": "127.0.0.1:8000",
        "routes": [
            {"host": None, "prefix": "", "app_root": "/srv/blog"},
            {"host": "shop.example", "prefix": "/shop", "app_root": "/srv/shop"},
        ],
        "aliases": {"blog.example": "/srv/blog", "/shop": "/srv/shop"},
    }
    text = format_status(
        status_data(SNAPSHOT, server_pid=1, started=time.time(), extra=extra)
    )
    front = text.split("----------- Front end -----------\n")[1]
    front = front.split("-----------")[0]
    assert "Workers       : 301, 302\n" in front
    assert "Master pid    : 300\n" in front
    assert "Bind          : 127.0.0.1:8000\n" in front
    assert (
        "Routes:\n"
        "  host=None prefix='' app_root='/srv/blog'\n"
        "  host='shop.example' prefix='/shop' app_root='/srv/shop'\n"
    ) in front
    assert "Aliases:\n  blog.example -> /srv/blog\n  /shop -> /srv/shop\n" in front
