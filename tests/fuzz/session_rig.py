"""A ClientSessionActor whose reads the test makes, with a recording registry.

In the server a SocketReader calls the actor's input half (``_on_data``)
with each chunk it reads. Here :class:`ManualReader` takes its place, so the
test calls ``_on_data`` itself, on its own thread, with reads cut exactly
where it wants them, and sees what each call returns. Everything else is
real: the actor, its Connection and Outbox, a socket pair to the client,
and a :class:`~actorpool.testing.Recorder` standing in for the registry, as
in ``tests/test_session.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pykka
from wire_strategies import HEADER

from actorpool.messages import ClientAttached, WireMessage, decode
from actorpool.protocol import MAX_FRAME_SIZE
from actorpool.session import ClientSessionActor
from actorpool.testing import Recorder, take

WAIT = 5.0
"""Seconds to wait for anything the actor does on its own thread."""

CLIENT_ID = 7


class ManualReader:
    """Stands in for the SocketReader: the test calls ``on_data`` itself."""

    def __init__(self) -> None:
        self.on_data: Any = None
        self.added = threading.Event()

    def add(self, sock: socket.socket, on_data: Any) -> None:
        self.on_data = on_data
        self.added.set()

    def remove(self, sock: socket.socket, then: Any) -> None:
        then()  # nothing reads concurrently: closing now is safe

    def close(self) -> None:
        pass


class WatchedSession(ClientSessionActor):
    """A session actor that says when it has finished, and whether it failed."""

    def __init__(
        self,
        sock: socket.socket,
        registry: pykka.ActorRef[Any],
        reader: ManualReader,
        done: threading.Event,
        failures: list[object],
    ) -> None:
        super().__init__(sock, CLIENT_ID, registry, reader=reader)  # type: ignore[arg-type]
        self.done = done
        self.failures = failures

    def on_stop(self) -> None:
        super().on_stop()
        self.done.set()

    def on_failure(self, *exc_info: object) -> None:
        self.failures.append(exc_info)
        super().on_failure(*exc_info)
        self.done.set()


class ErrorLog(logging.Handler):
    """Collects ERROR records from actorpool and pykka."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        """What was logged, for an assertion's message."""
        return [record.getMessage() for record in self.records]


@contextlib.contextmanager
def capture_errors() -> Iterator[ErrorLog]:
    """ERROR records logged by actorpool or pykka (a failing actor) meanwhile.

    A session logs at ERROR only for a bug on our side (its "internal error"
    path, a frame it cannot send), never for a client's bad input.
    """
    handler = ErrorLog()
    loggers = [logging.getLogger("actorpool"), logging.getLogger("pykka")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class Client:
    """The test's end of the socket pair: reads whole frames, then the end."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT)
        self.sock = sock
        self.data = bytearray()
        self.frames: list[WireMessage] = []

    def _frame(self) -> bool:
        if len(self.data) < HEADER:
            return False
        size = int.from_bytes(self.data[:HEADER], "big")
        if len(self.data) < HEADER + size:
            return False
        body = bytes(self.data[HEADER : HEADER + size])
        del self.data[: HEADER + size]
        self.frames.append(decode(body, max_size=MAX_FRAME_SIZE))
        return True

    def next_frame(self) -> WireMessage:
        """Wait for the server's next frame."""
        while not self._frame():
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed instead of answering"
            self.data += chunk
        return self.frames[-1]

    def until_closed(self) -> list[WireMessage]:
        """Every frame the server sent (including those read already), to its end."""
        while chunk := self.sock.recv(65536):
            self.data += chunk
        while self._frame():
            pass
        assert not self.data, "the server closed in the middle of a frame"
        return self.frames


@dataclasses.dataclass
class Rig:
    """One session actor, its stand-in registry and the client's socket."""

    actor: pykka.ActorRef[Any]
    on_data: Any
    """The actor's input half, as the reader thread calls it."""
    done: threading.Event
    """Set once the actor has finished (stopped or failed)."""
    failures: list[object]
    """``on_failure``'s arguments, each time it was called."""
    registry: pykka.ActorRef[Any]
    reports: queue.Queue[Any]
    """What the registry was told, after ``ClientAttached``."""
    client: Client
    socks: tuple[socket.socket, socket.socket]

    def close(self) -> None:
        """Stop both actors and close both ends (the actor's is closed already)."""
        self.actor.stop()  # a no-op unless a check failed half-way
        self.registry.stop()
        for sock in self.socks:
            sock.close()


@contextlib.contextmanager
def running_session() -> Iterator[Rig]:
    """A session actor that has attached and waits for its first read.

    Both actors are stopped and both sockets closed on the way out, however
    the test went.
    """
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, done, failures = ManualReader(), threading.Event(), []
    actor = WatchedSession.start(ours, registry, reader, done, failures)
    rig = Rig(
        actor,
        None,
        done,
        failures,
        registry,
        reports,
        Client(theirs),
        (ours, theirs),
    )
    try:
        assert take(reports, ClientAttached, WAIT).client_id == CLIENT_ID
        assert reader.added.wait(WAIT)
        rig.on_data = reader.on_data
        yield rig
    finally:
        rig.close()
