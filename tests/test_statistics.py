"""Pool snapshots: plain-data round trips, malformed input, passenger-status text."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from actorpool.errors import RemoteProtocolError
from actorpool.messages import StatisticsReply, decode, encode
from actorpool.statistics import AppStatistics, PoolStatistics, ProcessStatistics


def process(instance_id: int, pid: int, **changes: Any) -> ProcessStatistics:
    values: dict[str, Any] = {
        "instance_id": instance_id,
        "pid": pid,
        "state": "ready",
        "sessions": 1,
        "concurrency": 1,
        "processed": 17,
        "uptime": 3725.5,
        "idle": 12.0,
    }
    values.update(changes)
    return ProcessStatistics(**values)


SNAPSHOT = PoolStatistics(
    max_pool_size=6,
    max_per_app=2,
    count=4,
    active=2,
    waiting=3,
    clients=5,
    apps=(
        AppStatistics(
            app_root="/srv/blog",
            count=2,
            active=1,
            waiting=0,
            processes=(
                process(1, 4101),
                process(2, 4102, sessions=0, processed=0, uptime=59.9, idle=59.9),
            ),
        ),
        AppStatistics(
            app_root="/srv/shop",
            count=2,
            active=1,
            waiting=3,
            processes=(
                process(3, 5201, uptime=125.0),
                process(4, 0, state="spawning", sessions=0, processed=0, uptime=0.2),
            ),
        ),
        AppStatistics(
            app_root="/srv/empty", count=0, active=0, waiting=0, processes=()
        ),
    ),
)


def test_to_dict_is_plain_data() -> None:
    data = SNAPSHOT.to_dict()
    assert type(data) is dict
    assert data["apps"][0]["processes"][0]["pid"] == 4101
    assert isinstance(data["apps"][0], dict)


def test_round_trip() -> None:
    assert PoolStatistics.from_dict(SNAPSHOT.to_dict()) == SNAPSHOT


def test_round_trip_through_msgpack() -> None:
    data = msgpack.unpackb(msgpack.packb(SNAPSHOT.to_dict()))
    assert isinstance(data["apps"], list)  # tuples come back as lists
    back = PoolStatistics.from_dict(data)
    assert back == SNAPSHOT
    assert isinstance(back.apps, tuple)
    assert isinstance(back.apps[0].processes, tuple)


def test_round_trip_through_a_statistics_reply() -> None:
    reply = decode(encode(StatisticsReply(1, SNAPSHOT.to_dict())), max_size=1 << 20)
    assert isinstance(reply, StatisticsReply)
    assert PoolStatistics.from_dict(reply.statistics) == SNAPSHOT


def test_integral_seconds_are_accepted_as_floats() -> None:
    data = SNAPSHOT.to_dict()
    data["apps"][0]["processes"][0]["uptime"] = 10
    back = PoolStatistics.from_dict(data)
    assert back.apps[0].processes[0].uptime == 10.0
    assert type(back.apps[0].processes[0].uptime) is float


def test_empty_pool_round_trips() -> None:
    empty = PoolStatistics(6, 0, 0, 0, 0, 0, ())
    assert PoolStatistics.from_dict(empty.to_dict()) == empty


def test_app_lookup() -> None:
    shop = SNAPSHOT.app("/srv/shop")
    assert shop is not None
    assert shop.waiting == 3
    assert SNAPSHOT.app("/srv/none") is None


def test_snapshot_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SNAPSHOT.count = 1  # type: ignore[misc]


Mangle = Callable[[dict[str, Any]], Any]


def _set(path: tuple[Any, ...], value: Any) -> Mangle:
    def mangle(data: dict[str, Any]) -> Any:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data

    return mangle


def _delete(path: tuple[Any, ...]) -> Mangle:
    def mangle(data: dict[str, Any]) -> Any:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return data

    return mangle


P0 = ("apps", 0, "processes", 0)

MALFORMED: dict[str, Mangle] = {
    "not a dict": lambda data: list(data.items()),
    "a string": lambda data: "statistics",
    "None": lambda data: None,
    "missing count": _delete(("count",)),
    "missing apps": _delete(("apps",)),
    "extra key": _set(("surprise",), 1),
    "int key": _set((1,), 1),
    "count is a str": _set(("count",), "4"),
    "count is a bool": _set(("count",), True),
    "count is negative": _set(("count",), -1),
    "count is a float": _set(("count",), 4.0),
    "apps is a dict": _set(("apps",), {"/srv/blog": {}}),
    "apps is a str": _set(("apps",), "ab"),
    "apps is None": _set(("apps",), None),
    "app is a list": _set(("apps", 0), ["/srv/blog", 2, 1, 0, []]),
    "app is None": _set(("apps", 0), None),
    "app_root is an int": _set(("apps", 0, "app_root"), 7),
    "app missing waiting": _delete(("apps", 0, "waiting")),
    "app extra key": _set(("apps", 0, "color"), "red"),
    "processes is a dict": _set(("apps", 0, "processes"), {"a": 1}),
    "processes is an int": _set(("apps", 0, "processes"), 3),
    "process is a str": _set((*P0[:-1], 0), "pid"),
    "process missing pid": _delete((*P0, "pid")),
    "process extra key": _set((*P0, "rss"), 1024),
    "pid is a str": _set((*P0, "pid"), "4101"),
    "pid is a bool": _set((*P0, "pid"), False),
    "pid is negative": _set((*P0, "pid"), -4101),
    "state is an int": _set((*P0, "state"), 1),
    "uptime is NaN": _set((*P0, "uptime"), math.nan),
    "uptime is inf": _set((*P0, "uptime"), math.inf),
    "uptime is negative": _set((*P0, "uptime"), -1.0),
    "uptime is a str": _set((*P0, "uptime"), "1m"),
    "idle is None": _set((*P0, "idle"), None),
}


@pytest.mark.parametrize("mangle", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_dict_is_a_remote_protocol_error(mangle: Mangle) -> None:
    data = mangle(copy.deepcopy(msgpack.unpackb(msgpack.packb(SNAPSHOT.to_dict()))))
    with pytest.raises(RemoteProtocolError, match="malformed statistics"):
        PoolStatistics.from_dict(data)


def test_str_reads_like_passenger_status() -> None:
    text = str(SNAPSHOT)
    assert "General information" in text
    assert "max      = 6" in text
    assert "count    = 4" in text
    assert "active   = 2" in text
    assert "inactive = 1" in text  # the idle ready process; not the spawning one
    assert "Waiting on global queue: 3" in text
    assert "Application groups" in text
    for app in SNAPSHOT.apps:
        assert f"{app.app_root}:" in text
        for p in app.processes:
            assert f"PID: {p.pid} " in text
    assert "Requests in queue: 3" in text
    assert "State: spawning" in text
    assert "Uptime: 1h 2m 5s" in text
    assert "Uptime: 2m 5s" in text
    assert "Uptime: 59s" in text
    assert "Processed: 17" in text


def test_str_lists_processes_under_their_app() -> None:
    lines = str(SNAPSHOT).splitlines()
    blog = lines.index("/srv/blog:")
    shop = lines.index("/srv/shop:")
    assert any("PID: 4101" in line for line in lines[blog:shop])
    assert not any("PID: 5201" in line for line in lines[blog:shop])
    assert any("PID: 5201" in line for line in lines[shop:])


def test_inactive_counts_idle_processes_even_with_concurrency() -> None:
    busy = dataclasses.replace(SNAPSHOT.apps[0].processes[0], sessions=3, concurrency=4)
    snapshot = dataclasses.replace(
        SNAPSHOT,
        count=1,
        active=3,
        apps=(dataclasses.replace(SNAPSHOT.apps[0], processes=(busy,)),),
    )
    assert snapshot.idle_processes == 0
    assert "inactive = 0" in str(snapshot)  # not count - active = -2
