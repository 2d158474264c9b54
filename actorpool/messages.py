"""Every message actorpool sends, as immutable typed values.

Two families live here:

* **Wire messages** travel between a client and the server. Each has a
  ``TAG`` (its number on the wire) and a ``CATEGORY`` that the protocol's
  transition table keys on. :func:`encode` turns one into msgpack bytes and
  :func:`decode` turns untrusted bytes back into one, checking every field's
  type.
* **Actor messages** travel between the actors inside the server process.
  They are the same kind of value (plain data that round-trips through
  msgpack), but never leave the process.

A message is a frozen dataclass whose fields are documented where they are
declared, the way pykka's ``messages.py`` and h11's events are.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import reprlib
import threading
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgpack

from actorpool.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "AppRestarted",
    "Category",
    "Clear",
    "ClientAttached",
    "ClientDetached",
    "ClientRequest",
    "CloseSession",
    "Done",
    "ErrorReply",
    "Get",
    "GetStatistics",
    "Hello",
    "InstanceExited",
    "InstanceReady",
    "RegistryAttached",
    "Reply",
    "Request",
    "RestartApp",
    "SessionFailed",
    "SessionGranted",
    "SetMaxIdleTime",
    "SetMaxPerApp",
    "SetMaxPoolSize",
    "SpawnFailed",
    "SpawnInstance",
    "StatisticsReply",
    "StopInstance",
    "Tick",
    "Welcome",
    "WireMessage",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
"""Bumped whenever a wire message changes shape."""


class Category(enum.Enum):
    """What role a wire message plays; the protocol's table keys on it."""

    # Members are singletons: hash by identity, in C. Enum's own __hash__ is
    # Python code, and the transition table hashes four of these per message.
    __hash__ = object.__hash__

    HELLO = "hello"
    """The client's first message."""
    WELCOME = "welcome"
    """The server's answer to a hello."""
    REQUEST = "request"
    """Client to server, carries a request id, gets exactly one reply."""
    NOTICE = "notice"
    """Client to server, gets no reply."""
    REPLY = "reply"
    """Server to client, answers the request with the same id."""


class WireMessage:
    """Base of every message that crosses the wire."""

    TAG: ClassVar[int]
    CATEGORY: ClassVar[Category]


_BY_TAG: dict[int, type[WireMessage]] = {}
_VALIDATORS: dict[type[WireMessage], tuple[Callable[[Any], Any], ...]] = {}

_W = TypeVar("_W", bound=type[WireMessage])


def _wire(tag: int, category: Category) -> Callable[[_W], _W]:
    def register(cls: _W) -> _W:
        assert tag not in _BY_TAG, f"duplicate tag {tag}"
        cls.TAG = tag
        cls.CATEGORY = category
        _BY_TAG[tag] = cls
        return cls

    return register


# --- handshake ---------------------------------------------------------------


@_wire(1, Category.HELLO)
@dataclasses.dataclass(frozen=True, slots=True)
class Hello(WireMessage):
    """Opens a connection: the client says which protocol it speaks."""

    version: int
    """The client's ``PROTOCOL_VERSION``."""
    client_pid: int
    """The client's process id, for the server's log and statistics."""


@_wire(2, Category.WELCOME)
@dataclasses.dataclass(frozen=True, slots=True)
class Welcome(WireMessage):
    """The server accepts the hello; requests may follow."""

    version: int
    """The server's ``PROTOCOL_VERSION``."""
    server_pid: int
    """The pool server's process id."""
    client_id: int
    """The number the server gave this connection."""


# --- requests (client to server, one reply each) -----------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Request(WireMessage):
    """Base of requests: each carries an id its reply repeats."""

    request_id: int
    """Chosen by the client, unique among its requests in flight."""


@_wire(10, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Get(Request):
    """Check out a session on a process of ``app_root``."""

    app_root: str
    """Absolute path of the application's root directory."""
    timeout: float | None = None
    """Seconds the get may wait in the queue; ``None`` waits as long as it takes."""


@_wire(11, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class GetStatistics(Request):
    """Ask for a snapshot of the pool."""


@_wire(12, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Clear(Request):
    """Retire every process (busy ones finish their sessions first)."""


@_wire(13, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class SetMaxPoolSize(Request):
    """Change ``max_pool_size`` while the pool runs."""

    value: int
    """The new limit, >= 1."""


@_wire(14, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class SetMaxPerApp(Request):
    """Change ``max_per_app`` while the pool runs."""

    value: int
    """The new limit, >= 0 (0: no cap)."""


@_wire(15, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class SetMaxIdleTime(Request):
    """Change ``max_idle_time`` while the pool runs."""

    value: float
    """Seconds, >= 0 (0: never reap)."""


@_wire(16, Category.REQUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class RestartApp(Request):
    """Restart one app as if its ``tmp/restart.txt`` had been touched."""

    app_root: str
    """Absolute path of the application's root directory."""


# --- notices (client to server, no reply) ------------------------------------


@_wire(20, Category.NOTICE)
@dataclasses.dataclass(frozen=True, slots=True)
class CloseSession(WireMessage):
    """The client is done with a session."""

    session_id: int
    """The id from the ``SessionGranted`` reply."""


@_wire(21, Category.NOTICE)
@dataclasses.dataclass(frozen=True, slots=True)
class SessionFailed(WireMessage):
    """The session's process is unusable: the client could not connect to
    it, or it misbehaved (``Session.discard()``). The server stops it."""

    session_id: int
    """The id from the ``SessionGranted`` reply."""


# --- replies (server to client) ----------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Reply(WireMessage):
    """Base of replies: each answers the request with the same id."""

    request_id: int
    """The id of the request this answers; 0 for a connection-level error."""


@_wire(30, Category.REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class SessionGranted(Reply):
    """A process is reserved for the client; connect to ``address``."""

    session_id: int
    """Names the session in ``CloseSession`` and ``SessionFailed``."""
    pid: int
    """Process id of the application process."""
    app_root: str
    """The app the process runs."""
    address: str
    """Path of the process's Unix socket."""


@_wire(31, Category.REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class StatisticsReply(Reply):
    """A snapshot of the pool, as ``PoolStatistics.to_dict()`` gives it."""

    statistics: dict[str, Any]
    """The snapshot; ``PoolStatistics.from_dict`` checks its shape."""


@_wire(32, Category.REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class Done(Reply):
    """The request was carried out."""


@_wire(33, Category.REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """The request failed; the client raises the error ``kind`` names."""

    kind: str
    """An error class name from ``actorpool.errors`` (``QueueFullError``, ...)."""
    message: str
    """Human-readable text."""
    detail: str = ""
    """More text, such as an app's traceback for a ``SpawnError``."""


# --- actor messages (inside the server process only) -------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClientAttached:
    """Client session to registry, before anything else: a client connected."""

    client_id: int
    """The connection's number."""
    actor_urn: str
    """URN of its ClientSessionActor, where replies go."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientRequest:
    """Client session to registry: a decoded request or notice from a client."""

    client_id: int
    """Who sent it; replies go to this client's actor."""
    message: Request | CloseSession | SessionFailed
    """The message as it came off the wire."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientDetached:
    """Client session to registry: the client is gone; release what it held."""

    client_id: int
    """The connection's number."""


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryAttached:
    """Registry to spawner, before anything else: where to report."""

    actor_urn: str
    """URN of the RegistryActor."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnInstance:
    """Registry to spawner: start a process for ``app_root``."""

    instance_id: int
    """The registry's number for the new process."""
    app_root: str
    """The app to start."""


@dataclasses.dataclass(frozen=True, slots=True)
class StopInstance:
    """Registry to spawner: stop a process (or cancel its spawn)."""

    instance_id: int
    """The registry's number for the process."""


@dataclasses.dataclass(frozen=True, slots=True)
class AppRestarted:
    """Registry to spawner: an app restarted (``restart.txt`` or ``restart_app``).

    Told before the spawns that follow it, so a spawner that keeps state per
    app (the smart spawner's preloader) starts those from the new code.
    """

    app_root: str
    """The application's root directory."""


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceReady:
    """Spawner to registry: a spawn finished; the process accepts sessions."""

    instance_id: int
    """The registry's number for the process."""
    pid: int
    """Its process id."""
    address: str
    """Path of its Unix socket."""
    concurrency: int
    """Sessions it serves at once."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpawnFailed:
    """Spawner to registry: a spawn failed."""

    instance_id: int
    """The registry's number for the process that did not start."""
    message: str
    """Why."""
    detail: str = ""
    """The app's output or traceback."""


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceExited:
    """Spawner to registry: a process exited (crashed or stopped)."""

    instance_id: int
    """The registry's number for the process."""


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """Alarm to registry: a deadline (timeout, idle time) may have passed."""


# --- encoding ----------------------------------------------------------------

_MAX_ID = 2**63 - 1

# Error messages quote untrusted values through this: the plain repr of a
# list nested a thousand deep recurses too deep before any cut to length.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel = 2
_QUOTE.maxstring = _QUOTE.maxother = 40


def _quote(value: Any) -> str:
    return _QUOTE.repr(value)


def _check_int(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_ID:
        raise TypeError(f"expected a non-negative int, got {_quote(value)}")
    return value


def _check_float(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {_quote(value)}")
    return float(value)


def _check_optional_float(value: Any) -> float | None:
    return None if value is None else _check_float(value)


def _check_str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a str, got {type(value).__name__}")
    return value


def _check_dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise TypeError(f"expected a map, got {type(value).__name__}")
    return value


_CHECKS: dict[Any, Callable[[Any], Any]] = {
    int: _check_int,
    float: _check_float,
    float | None: _check_optional_float,
    str: _check_str,
    dict[str, Any]: _check_dict,
}


def _field_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving the values of fields ``names``, as a tuple."""
    if len(names) > 1:
        return operator.attrgetter(*names)  # one call into C
    if names:
        name = names[0]
        return lambda message: (getattr(message, name),)
    return lambda message: ()


# Per class, once: the field names, each field's check and a getter of all
# the values. encode() and decode() run for every message, and
# dataclasses.fields() per call is slow.
_FIELD_NAMES: dict[type[WireMessage], tuple[str, ...]] = {}
_GET_FIELDS: dict[type[WireMessage], Callable[[Any], tuple[Any, ...]]] = {}
for _cls in _BY_TAG.values():
    _hints = typing.get_type_hints(_cls)
    _FIELD_NAMES[_cls] = tuple(f.name for f in dataclasses.fields(_cls))  # type: ignore[arg-type]
    _VALIDATORS[_cls] = tuple(_CHECKS[_hints[name]] for name in _FIELD_NAMES[_cls])
    _GET_FIELDS[_cls] = _field_getter(_FIELD_NAMES[_cls])


class _Packers(threading.local):
    """One msgpack Packer per thread: ``msgpack.packb`` makes a new one per
    call, which costs three times the packing of a small message."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_PACKERS = _Packers()


def encode(message: WireMessage) -> bytes:
    """The msgpack body of ``message``: ``[tag, field, field, ...]``.

    The fields get the same checks :func:`decode` applies, so a message the
    peer would refuse (and close the connection over) raises
    :class:`~actorpool.errors.LocalProtocolError` here instead.
    """
    cls = type(message)
    validators = _VALIDATORS.get(cls)
    if validators is None:
        raise LocalProtocolError(f"{cls.__name__} is not a wire message")
    values = _GET_FIELDS[cls](message)
    try:
        for check, value in zip(validators, values, strict=True):
            check(value)
        body: bytes = _PACKERS.packer.pack([message.TAG, *values])
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot send {cls.__name__}: {exc}") from exc
    return body


def decode(
    body: bytes | bytearray, *, max_size: int, max_array_len: int = 1024
) -> WireMessage:
    """Parse one untrusted msgpack body into a wire message.

    Raises :class:`~actorpool.errors.RemoteProtocolError` for anything that
    is not exactly one known message with fields of the right types. The
    unpacker's limits keep a hostile body from allocating more than
    ``max_size`` bytes' worth of containers.
    """
    try:
        data = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=0,
            max_array_len=min(max_size, max_array_len),
            max_map_len=min(max_size, 65536),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input
        raise RemoteProtocolError(f"undecodable frame: {exc}") from exc
    if type(data) is not list or not data:
        raise RemoteProtocolError("a frame must be a non-empty msgpack array")
    tag = data[0]
    cls = _BY_TAG.get(tag) if type(tag) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message tag {_quote(tag)}")
    validators = _VALIDATORS[cls]
    if len(data) != len(validators) + 1:
        raise RemoteProtocolError(
            f"{cls.__name__} takes {len(validators)} fields, got {len(data) - 1}"
        )
    try:
        checked = [
            check(value) for check, value in zip(validators, data[1:], strict=True)
        ]
    except TypeError as exc:
        raise RemoteProtocolError(f"bad field in {cls.__name__}: {exc}") from exc
    return cls(*checked)
