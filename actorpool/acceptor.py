"""AcceptorActor: ``accept()`` emulated over an anonymous socket pair.

The server keeps one end of a ``SOCK_SEQPACKET`` pair, the *connect
channel*; the process that created the server, and every child it forks,
holds the other. ``connect()`` writes :data:`CONNECT` to the channel. The
acceptor answers with a fresh ``socketpair()``: one end travels back through
the channel by SCM_RIGHTS, the other goes to a new
:class:`~actorpool.session.ClientSessionActor`. No port and no socket file:
only holders of the channel can connect.

When every holder has closed the channel (end of stream) or the creator
writes :data:`SHUTDOWN`, the acceptor calls ``on_close`` and the server
stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

import pykka

from actorpool.fdpassing import send_fd
from actorpool.reader import SocketReader
from actorpool.session import ClientSessionActor

__all__ = ["ACCEPTED", "CONNECT", "REFUSED", "SHUTDOWN", "AcceptorActor"]

logger = logging.getLogger(__name__)

CONNECT: Final = b"connect"
"""Written by ``connect()``: please make me a connection."""
SHUTDOWN: Final = b"shutdown"
"""Written by ``close()`` in the creating process: stop the server."""
ACCEPTED: Final = b"accepted"
"""The acceptor's answer; the new connection's descriptor rides along."""
REFUSED: Final = b"refused"
"""The acceptor's answer when it will not or cannot make a connection (no
descriptor). A reason may follow, after a space."""

DEFAULT_MAX_CLIENTS: Final = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelMessage:
    """Reader thread to the acceptor: one message from the connect channel."""

    data: bytes
    """The message (``b""``: every holder has closed the channel)."""


class AcceptorActor(pykka.ThreadingActor):
    """Turns wake-ups on the connect channel into client connections."""

    def __init__(
        self,
        channel: socket.socket,
        registry: pykka.ActorRef[Any],
        on_close: Callable[[], None],
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        super().__init__()
        self._channel = channel
        self._max_clients = max_clients
        self._registry = registry
        self._on_close = on_close
        self._client_ids = itertools.count(1)
        self._clients: list[pykka.ActorRef[Any]] = []
        # Client connections are read by the registry's own inbox, so that a
        # request reaches it without a thread hand-off (see actorpool.reader).
        # A stand-in registry (in a test) gets a reader thread instead. Done
        # here, in the starting thread, so that a failure shows at start().
        inbox = registry.actor_inbox
        self._own_reader = not isinstance(inbox, SocketReader)
        self._client_reader = (
            inbox
            if isinstance(inbox, SocketReader)
            else SocketReader().start("actorpool-clients")
        )
        self._reader = threading.Thread(
            target=self._read, name="actorpool-acceptor", daemon=True
        )

    def __repr__(self) -> str:
        return f"<AcceptorActor clients={len(self._clients)}>"

    def on_start(self) -> None:
        self._reader.start()

    def on_receive(self, message: Any) -> None:
        if not isinstance(message, ChannelMessage):
            logger.warning("AcceptorActor ignores unexpected message %r", message)
        elif message.data == CONNECT:
            self._accept()
        elif message.data in (b"", SHUTDOWN):
            self._on_close()
        else:
            logger.warning(
                "ignoring %d unexpected bytes on the connect channel", len(message.data)
            )

    def on_stop(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_RDWR)
        if self._reader.is_alive():
            self._reader.join()
        self._channel.close()
        for client in self._clients:
            client.stop()
        if self._own_reader:
            self._client_reader.close()

    def on_failure(self, *_exc_info: object) -> None:
        # Nobody could connect any more: clean up and let the server stop.
        logger.critical("the acceptor failed; shutting the pool server down")
        self.on_stop()
        self._on_close()

    def _accept(self) -> None:
        self._clients = [c for c in self._clients if c.is_alive()]
        if len(self._clients) >= self._max_clients:
            logger.warning(
                "refusing a connection: %d clients already (max_clients)",
                len(self._clients),
            )
            self._refuse(f"max_clients={self._max_clients} reached")
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors, say: refuse, do not hang
            logger.error("cannot make a connection: %s", exc)
            self._refuse(f"errno {exc.errno}")
            return
        try:
            send_fd(self._channel, ACCEPTED, theirs.fileno())
        except OSError as exc:
            logger.warning("could not pass a connection back: %s", exc)
            ours.close()
            return
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        client_id = next(self._client_ids)
        try:
            client = ClientSessionActor.start(
                ours, client_id, self._registry, self._client_reader
            )
        except Exception:
            # Out of threads, say: this client sees end of stream; the
            # acceptor and every other client carry on.
            logger.exception("cannot start the actor of client %d", client_id)
            ours.close()
            return
        self._clients.append(client)

    def _refuse(self, reason: str) -> None:
        with contextlib.suppress(OSError):
            self._channel.send(REFUSED + b" " + reason.encode()[:50])

    def _read(self) -> None:
        while True:
            try:
                data = self._channel.recv(64)
            except OSError:
                data = b""
            try:
                self.actor_ref.tell(ChannelMessage(data))
            except pykka.ActorDeadError:
                return
            if not data:
                return
