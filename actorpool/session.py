"""ClientSessionActor: the server's side of one client connection.

The actor owns one client's socket and its sans-IO
:class:`~actorpool.protocol.Connection`, and works in two halves:

* its **reader thread** does the only blocking thing, ``recv``, feeds the
  bytes to the connection, and tells each decoded request straight to the
  registry (a ``ClientRequest``). Going through the actor's inbox first
  would add a thread hand-off to every request: on the get/close round trip
  that hop costs more than everything else the server does.
* the **actor** writes to the socket: the welcome, every reply the registry
  tells it, and the error frame before a close. Writes stay on one thread,
  so frames never interleave.

The two halves share the connection's state under a lock. When the client
closes, or sends anything the protocol does not allow, the reader tells the
actor, which closes this one connection and tells the registry; the registry
releases every session and waiter the client had. Nothing else in the
server is affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import struct
import threading
from typing import Any

import pykka

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientAttached,
    ClientDetached,
    ClientRequest,
    CloseSession,
    Hello,
    Reply,
    Request,
    SessionFailed,
    Welcome,
)
from actorpool.protocol import NEED_DATA, PEER_CLOSED, Connection, Role, State

__all__ = ["ClientSessionActor"]

logger = logging.getLogger(__name__)

MAX_REQUEST_FRAME = 64 * 1024
"""Largest frame a client may send; every request is far smaller."""

SEND_TIMEOUT = 10.0
"""Seconds a reply may wait for a client that does not read before it is dropped."""

_RECV_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class HangUp:
    """Reader thread to its actor: the connection is over."""

    error: str = ""
    """Why, when the client broke the protocol; empty when it just closed."""


class ClientSessionActor(pykka.ThreadingActor):
    """Speaks the protocol with one client on behalf of the registry."""

    def __init__(
        self, sock: socket.socket, client_id: int, registry: pykka.ActorRef[Any]
    ) -> None:
        super().__init__()
        self._sock = sock
        self._client_id = client_id
        self._registry = registry
        self._conn = Connection(Role.SERVER, max_frame_size=MAX_REQUEST_FRAME)
        self._conn_lock = threading.Lock()  # the reader receives, the actor sends
        self._closing = False  # stop() was asked for: ignore what still arrives
        self._closed = False
        self._reader = threading.Thread(
            target=self._read, name=f"actorpool-client-{client_id}", daemon=True
        )
        # A client that stops reading must not hold this actor for ever.
        seconds = int(SEND_TIMEOUT)
        micros = int((SEND_TIMEOUT - seconds) * 1e6)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros)
        )

    def __repr__(self) -> str:
        return f"<ClientSessionActor client={self._client_id} {self._conn!r}>"

    def on_start(self) -> None:
        try:
            self._registry.tell(ClientAttached(self._client_id, self.actor_urn))
        except pykka.ActorDeadError:
            # The server is going down. pykka would call neither on_stop nor
            # on_failure after a failed on_start, so close the socket here.
            logger.warning("no registry for client %d; closing it", self._client_id)
            self._closing = True
            self.stop()
            return
        self._reader.start()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Reply):
            self._send(message)
        elif isinstance(message, Hello):
            self._welcome(message)
        elif isinstance(message, HangUp):
            if message.error:
                self._fail(message.error)
            else:
                self._hang_up()
        else:
            logger.warning("ClientSessionActor ignores unexpected message %r", message)

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *_exc_info: object) -> None:
        self._close()

    # --- from the client ------------------------------------------------------

    def _on_data(self, data: bytes) -> HangUp | None:
        """Decode ``data`` and pass each message on (reader thread)."""
        hang_up = None
        events = []
        with self._conn_lock:
            self._conn.receive_data(data)
            try:
                while (event := self._conn.next_event()) is not NEED_DATA:
                    if event is PEER_CLOSED:
                        hang_up = HangUp()
                        break
                    events.append(event)
            except RemoteProtocolError as exc:
                hang_up = HangUp(str(exc))
        for event in events:
            if isinstance(event, Hello):
                self.actor_ref.tell(event)  # the answer is a write: the actor's job
            elif isinstance(event, Request | CloseSession | SessionFailed):
                try:
                    self._registry.tell(ClientRequest(self._client_id, event))
                except pykka.ActorDeadError:
                    return HangUp()  # the server is going down
        return hang_up

    def _welcome(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._fail(
                f"protocol version {hello.version} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})"
            )
            return
        logger.debug("client %d (pid %d) connected", self._client_id, hello.client_pid)
        self._send(Welcome(PROTOCOL_VERSION, os.getpid(), self._client_id))

    def _fail(self, text: str) -> None:
        if self._closing:
            return
        logger.warning("closing client %d: %s", self._client_id, text)
        with self._conn_lock:
            try:
                frame = self._conn.send_protocol_error(text)
            except LocalProtocolError:
                frame = b""
        with contextlib.suppress(OSError):
            self._sock.sendall(frame)
        self._hang_up()

    # --- to the client --------------------------------------------------------

    def _send(self, message: Welcome | Reply) -> None:
        if self._closing or (
            self._conn.state is not State.OPEN and not isinstance(message, Welcome)
        ):
            return  # closing: replies still in the inbox have nowhere to go
        try:
            with self._conn_lock:
                frame = self._conn.send(message)
        except LocalProtocolError:
            # A bug on our side (say, a reply over the frame limit): this
            # client cannot be answered correctly any more, the others can.
            logger.exception("cannot send %r to client %d", message, self._client_id)
            self._hang_up()
            return
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            logger.warning("dropping client %d: %s", self._client_id, exc)
            self._hang_up()

    def _hang_up(self) -> None:
        self._closing = True
        self.stop()

    # --- the reader thread and clean-up ----------------------------------------

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except OSError:
                data = b""
            hang_up = self._on_data(data)
            if hang_up is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    self.actor_ref.tell(hang_up)
                return

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # shutdown() wakes the reader's recv; only then is closing safe,
        # so that the descriptor cannot be reused under the reader's feet.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join()
        self._sock.close()
        # Only after the descriptor is closed: whoever sees the client gone
        # from the registry sees its descriptor gone too. A registry that is
        # already gone has nothing left to release.
        with contextlib.suppress(pykka.ActorDeadError):
            self._registry.tell(ClientDetached(self._client_id))
