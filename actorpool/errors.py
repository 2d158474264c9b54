"""The error hierarchy of actorpool.

Every error a user can see derives from :class:`ActorPoolError`. Errors that
happen in the server travel to the client as an ``ErrorReply`` naming the
class (see :func:`error_from_reply`), so the client raises the same class the
server meant.
"""

from __future__ import annotations

__all__ = [
    "ActorPoolError",
    "ConfigError",
    "GetTimeoutError",
    "LocalProtocolError",
    "ProtocolError",
    "QueueFullError",
    "RemoteProtocolError",
    "ServerGoneError",
    "SpawnError",
    "error_from_reply",
]


class ActorPoolError(Exception):
    """Base class of every error raised by actorpool."""


class ConfigError(ActorPoolError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class SpawnError(ActorPoolError):
    """An application process could not be started.

    :attr:`output` holds what the application printed or the traceback it
    raised while loading, so that the cause reaches the client.
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output
        """What the application printed, or its traceback ("" if nothing)."""

    def __str__(self) -> str:
        message = super().__str__()
        if self.output:
            return f"{message}\n{self.output}"
        return message


class QueueFullError(ActorPoolError):
    """The app's wait queue is at ``max_queue_size``; the 503 of this pool."""


class GetTimeoutError(ActorPoolError, TimeoutError):
    """A ``get`` waited in the queue for longer than its timeout."""


class ServerGoneError(ActorPoolError, ConnectionError):
    """The pool server closed the connection or is no longer running."""


class ProtocolError(ActorPoolError):
    """The wire protocol was about to be, or was, broken.

    A :class:`RemoteProtocolError` ends the connection; a
    :class:`LocalProtocolError` changes nothing (the message was not sent).
    """


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol: the message was not sent, and
    the connection can still be used (too many requests in flight, a request
    over the size limit, a bug on our side of the wire)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the connection
    cannot be used any more."""


# The error kinds that may cross the wire in an ErrorReply, by name. The names
# are part of the protocol: renaming a class here changes the wire format.
_WIRE_ERRORS: dict[str, type[ActorPoolError]] = {
    "ConfigError": ConfigError,
    "SpawnError": SpawnError,
    "QueueFullError": QueueFullError,
    "GetTimeoutError": GetTimeoutError,
    "ServerGoneError": ServerGoneError,
    "ProtocolError": RemoteProtocolError,
}


def error_from_reply(kind: str, message: str, detail: str = "") -> ActorPoolError:
    """Build the exception an ``ErrorReply`` stands for.

    An unknown ``kind`` (a newer server, say) becomes a plain
    :class:`ActorPoolError` rather than a crash in the client.
    """
    cls = _WIRE_ERRORS.get(kind, ActorPoolError)
    if cls is SpawnError:
        return SpawnError(message, detail)
    return cls(message)
