"""The example apps in examples/, served by both real spawners."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_spawners import SPAWNERS, fetch, me

from actorpool import ApplicationPoolServer
from actorpool.spawner import Spawner

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("make_spawner", SPAWNERS)
@pytest.mark.parametrize(
    ("example", "body"),
    [
        ("hello", "hello world\n"),
        ("slow_start", "slow start ready\n"),
        ("command_app", "hello from a command app\n"),
    ],
)
def test_an_example_answers(
    start_server: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    example: str,
    body: str,
) -> None:
    pool = start_server(make_spawner(), user=me()).connect()
    with pool.get(os.fspath(EXAMPLES / example)) as session:
        assert fetch(session) == body
