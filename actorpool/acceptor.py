"""AcceptorActor: ``accept()`` emulated over an anonymous socket pair.

The server keeps one end of a ``SOCK_SEQPACKET`` pair, the *connect
channel*; the process that created the server, and every child it forks,
holds the other. ``connect()`` makes a fresh ``socketpair()`` and sends one
end, with :data:`CONNECT`, through the channel by SCM_RIGHTS; the acceptor
hands it to a new :class:`~actorpool.session.ClientSessionActor`, and the
client's handshake on its own end says whether that worked. No port and no
socket file: only holders of the channel can connect.

Nothing comes back on the channel, which every process shares. (The first
design answered each CONNECT with the new connection's descriptor: a client
killed between its CONNECT and its read left that answer queued, and with
it a connection nobody would ever close.) A connection the acceptor will
not take (``max_clients``) gets an ``ErrorReply`` saying why, and is closed.

When every holder has closed the channel (end of stream) or the creator
writes :data:`SHUTDOWN`, the acceptor calls ``on_close`` and the server
stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

import pykka

from actorpool.fdpassing import BadDescriptorMessage, recv_fd
from actorpool.protocol import Connection, Role
from actorpool.reader import SocketReader
from actorpool.session import ClientSessionActor

__all__ = ["CONNECT", "SHUTDOWN", "AcceptorActor"]

logger = logging.getLogger(__name__)

CONNECT: Final = b"connect"
"""Sent by ``connect()`` with one end of the new connection attached."""
SHUTDOWN: Final = b"shutdown"
"""Written by ``close()`` in the creating process: stop the server."""

DEFAULT_MAX_CLIENTS: Final = 1024

MAX_REFUSED: Final = 64
"""Refused connections kept open until their clients have read why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelMessage:
    """Reader thread to the acceptor: one message from the connect channel."""

    data: bytes
    """The message (``b""``: every holder has closed the channel)."""
    fd: int | None = None
    """The descriptor that came with it."""


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
        self._refused: collections.deque[socket.socket] = collections.deque()
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
        elif message.data == CONNECT and message.fd is not None:
            self._accept(message.fd)
        elif message.fd is not None:
            os.close(message.fd)
            logger.warning("ignoring a descriptor sent without CONNECT")
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
        while self._refused:
            self._refused.popleft().close()
        if self._own_reader:
            self._client_reader.close()

    def on_failure(self, *_exc_info: object) -> None:
        # Nobody could connect any more: clean up and let the server stop.
        logger.critical("the acceptor failed; shutting the pool server down")
        self.on_stop()
        self._on_close()

    def _accept(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # not a socket at all
            os.close(fd)
            logger.warning("ignoring a CONNECT with no socket: %s", exc)
            return
        try:
            self._take(sock)
        except Exception:
            # The acceptor's failure stops the server: nothing one client
            # sends may cause it. That connection is dropped; the rest go on.
            logger.exception("dropping a connection the acceptor could not take")
            sock.close()

    def _take(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            # %r: a type the socket module has no name for is a bare int.
            logger.warning(
                "ignoring a CONNECT with a socket of family %r, type %r",
                sock.family,
                sock.type,
            )
            return
        self._clients = [c for c in self._clients if c.is_alive()]
        if len(self._clients) >= self._max_clients:
            logger.warning(
                "refusing a connection: %d clients already (max_clients)",
                len(self._clients),
            )
            self._refuse(sock, f"max_clients={self._max_clients} reached")
            return
        client_id = next(self._client_ids)
        try:
            client = ClientSessionActor.start(
                sock, client_id, self._registry, self._client_reader
            )
        except Exception:
            # Out of threads, say: this client sees end of stream; the
            # acceptor and every other client carry on.
            logger.exception("cannot start the actor of client %d", client_id)
            sock.close()
            return
        self._clients.append(client)

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Tell a connection why it is not taken, then let it go.

        Closing at once would lose the reason: a Unix socket closed with
        unread input (the client's hello) resets the connection, and the
        client reads ECONNRESET instead. So the socket waits, half-closed,
        until its client has read the reason and closed its end.
        """
        frame = Connection(Role.SERVER).send_protocol_error(
            f"the pool server refused the connection: {reason}"
        )
        try:
            sock.setblocking(False)
            sock.send(frame)  # a few dozen bytes into an empty buffer
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._refused.append(sock)
        for parked in list(self._refused):
            if len(self._refused) > MAX_REFUSED or _peer_closed(parked):
                self._refused.remove(parked)
                parked.close()

    def _read(self) -> None:
        while True:
            try:
                data, fd = recv_fd(self._channel, 64)
            except BadDescriptorMessage as exc:
                logger.warning("ignoring a message on the connect channel: %s", exc)
                continue
            except OSError:
                data, fd, end = b"", None, True
            else:
                # A record may be empty, and reads as b"" just as the end of
                # the channel does: only a hang-up is the end.
                end = not data and fd is None and _hung_up(self._channel)
            if not data and not end:
                if fd is not None:
                    os.close(fd)
                logger.warning("ignoring an empty message on the connect channel")
                continue
            try:
                self.actor_ref.tell(ChannelMessage(data, fd))
            except pykka.ActorDeadError:
                if fd is not None:
                    os.close(fd)
                return
            if end:
                return


def _hung_up(channel: socket.socket) -> bool:
    """Whether every holder of the far end of ``channel`` has closed it.

    Also when ``channel`` itself is shut down or broken: nothing more will
    come then either.
    """
    poller = select.poll()
    poller.register(channel, 0)  # POLLHUP and POLLERR are reported regardless
    return any(
        events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
        for _, events in poller.poll(0)
    )


def _peer_closed(sock: socket.socket) -> bool:
    """Discard what ``sock`` has to read; whether its peer has closed."""
    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True
