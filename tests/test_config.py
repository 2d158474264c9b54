"""PoolConfig: the documented defaults, validation of every field, replace()."""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import pytest

from actorpool.config import MAX_SECONDS, PoolConfig
from actorpool.errors import ActorPoolError, ConfigError

INT_FIELDS = {
    "max_pool_size": 1,
    "max_per_app": 0,
    "min_instances": 0,
    "max_requests": 0,
    "max_queue_size": 0,
    "max_clients": 1,
}
"""Each int field and its smallest legal value."""

SECONDS_FIELDS = {
    "max_idle_time": True,
    "spawn_timeout": False,
    "restart_check_interval": True,
}
"""Each seconds field and whether 0 is allowed."""


def test_fields_are_all_covered() -> None:
    names = {field.name for field in dataclasses.fields(PoolConfig)}
    assert names == set(INT_FIELDS) | set(SECONDS_FIELDS) | {"user"}


def test_defaults_match_the_design() -> None:
    config = PoolConfig()
    assert config.max_pool_size == 6
    assert config.max_per_app == 0
    assert config.min_instances == 1
    assert config.max_idle_time == 300
    assert config.max_requests == 0
    assert config.max_queue_size == 100
    assert config.spawn_timeout == 90
    assert 0 < config.restart_check_interval < math.inf
    assert config.user is None


@pytest.mark.parametrize("user", ["", "a\0b", 0, b"root"])
def test_user_must_be_a_name(user: Any) -> None:
    with pytest.raises(ConfigError, match="user"):
        PoolConfig(user=user)


def test_user_may_be_named() -> None:
    assert PoolConfig(user="nobody").user == "nobody"


def test_config_is_frozen_and_keyword_only() -> None:
    config = PoolConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_pool_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoolConfig(3)  # type: ignore[call-arg]


def test_config_pickles() -> None:
    # The server process gets its config by pickle.
    config = PoolConfig(max_pool_size=3, max_idle_time=0.5)
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(("name", "minimum"), INT_FIELDS.items())
def test_int_field_accepts_its_minimum_and_large_values(
    name: str, minimum: int
) -> None:
    assert getattr(PoolConfig(**{name: minimum}), name) == minimum
    assert getattr(PoolConfig(**{name: 10_000}), name) == 10_000
    # The largest the wire carries: statistics() must still be able to say it.
    assert getattr(PoolConfig(**{name: 2**63 - 1}), name) == 2**63 - 1


@pytest.mark.parametrize(("name", "allow_zero"), SECONDS_FIELDS.items())
def test_seconds_field_accepts_ints_and_floats(name: str, allow_zero: bool) -> None:
    values: list[Any] = [5, 0.25, MAX_SECONDS, *([0, 0.0] if allow_zero else [])]
    for value in values:
        assert getattr(PoolConfig(**{name: value}), name) == value


INT_BAD: list[Any] = [True, False, 1.0, 2.5, "3", None, [1]]
SECONDS_BAD: list[Any] = [
    True,
    False,
    "1",
    None,
    [1.0],
    math.nan,
    math.inf,
    -math.inf,
    -1,
    -0.001,
    10**400,
    1e10,  # beyond threading.TIMEOUT_MAX: a spawn's wait would overflow
]

CASES = [
    *(
        pytest.param(name, bad, id=f"{name}={bad!r}")
        for name, minimum in INT_FIELDS.items()
        for bad in [*INT_BAD, minimum - 1, -(10**30), 2**63]
    ),
    *(
        pytest.param(name, bad, id=f"{name}={bad!r:.20}")
        for name, allow_zero in SECONDS_FIELDS.items()
        for bad in SECONDS_BAD + ([] if allow_zero else [0, 0.0])
    ),
]


@pytest.mark.parametrize(("name", "bad"), CASES)
def test_bad_value_is_a_config_error_naming_the_field(name: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        PoolConfig(**{name: bad})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ActorPoolError)


@pytest.mark.parametrize(("name", "bad"), CASES)
def test_replace_validates_too(name: str, bad: Any) -> None:
    config = PoolConfig()
    with pytest.raises(ConfigError, match=name):
        config.replace(**{name: bad})


def test_replace_returns_a_changed_copy() -> None:
    config = PoolConfig(max_pool_size=4)
    changed = config.replace(max_pool_size=8, max_idle_time=0)
    assert changed.max_pool_size == 8
    assert changed.max_idle_time == 0
    assert changed.spawn_timeout == config.spawn_timeout
    assert config.max_pool_size == 4  # the original is untouched
    assert config.replace() == config


def test_replace_with_an_unknown_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_pool"):
        PoolConfig().replace(max_pool=3)


def test_unknown_field_in_constructor_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="pool_size"):
        PoolConfig(pool_size=3)  # type: ignore[call-arg]
