"""The error hierarchy and its translation from ErrorReply."""

from __future__ import annotations

import pickle

import pytest

from actorpool import errors
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
    error_from_reply,
)

WIRE_KINDS: dict[str, type[ActorPoolError]] = {
    "ConfigError": ConfigError,
    "SpawnError": SpawnError,
    "QueueFullError": QueueFullError,
    "GetTimeoutError": GetTimeoutError,
    "ServerGoneError": ServerGoneError,
    "ProtocolError": RemoteProtocolError,
}


def test_every_wire_kind_is_tested() -> None:
    assert WIRE_KINDS == errors._WIRE_ERRORS


@pytest.mark.parametrize(
    "cls",
    [
        ConfigError,
        SpawnError,
        QueueFullError,
        GetTimeoutError,
        ServerGoneError,
        ProtocolError,
        LocalProtocolError,
        RemoteProtocolError,
    ],
)
def test_everything_is_an_actor_pool_error(cls: type[Exception]) -> None:
    assert issubclass(cls, ActorPoolError)


def test_builtin_bases() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(GetTimeoutError, TimeoutError)
    assert issubclass(ServerGoneError, ConnectionError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


@pytest.mark.parametrize(("kind", "cls"), WIRE_KINDS.items())
def test_error_from_reply_for_every_kind(kind: str, cls: type[ActorPoolError]) -> None:
    error = error_from_reply(kind, "it went wrong", "some detail")
    assert type(error) is cls
    assert "it went wrong" in str(error)


@pytest.mark.parametrize("kind", ["NoSuchError", "", "ActorPoolError", "ValueError"])
def test_unknown_kind_is_a_plain_actor_pool_error(kind: str) -> None:
    error = error_from_reply(kind, "from a newer server")
    assert type(error) is ActorPoolError
    assert str(error) == "from a newer server"


def test_spawn_error_carries_the_output() -> None:
    error = error_from_reply("SpawnError", "app failed to load", "Traceback: boom")
    assert isinstance(error, SpawnError)
    assert error.output == "Traceback: boom"
    assert "app failed to load" in str(error)
    assert "Traceback: boom" in str(error)


def test_spawn_error_without_output() -> None:
    error = SpawnError("no output")
    assert error.output == ""
    assert str(error) == "no output"


def test_spawn_error_pickles_with_its_output() -> None:
    error = pickle.loads(pickle.dumps(SpawnError("failed", "the traceback")))
    assert isinstance(error, SpawnError)
    assert error.output == "the traceback"
    assert "the traceback" in str(error)
