"""ClientSessionActor: the server's side of one client connection.

Three pieces, in the manner of mopidy's logic / actor / proxy split:

* :class:`ClientSessionActor` owns the connection's life: it answers the
  hello, closes the connection on end of stream or a protocol error, and
  then tells the registry the client is gone (the registry releases every
  session and waiter it had).
* its **input half** runs wherever the socket is read: in the server, on the
  registry's own thread, whose inbox is a :class:`~actorpool.reader.SocketReader`.
  Each chunk goes through the sans-IO :class:`~actorpool.protocol.Connection`,
  and each decoded request is told to the registry as a ``ClientRequest``
  (which, on that thread, only appends it to the inbox).
* its **output half**, :class:`Outbox`, writes frames in order from any
  thread without ever blocking. The registry replies through a
  :class:`ClientProxy`, which puts the reply on the socket at once when the
  socket has room; only when it has not (a client that does not read) is
  the rest queued for the actor, which waits for room, bounded by
  ``SEND_TIMEOUT``.

Why not route every byte through the actor's inbox, as the design first
said? Each hand-off between threads is a wake-up and a trip through the
GIL; on the get/close round trip those hops cost more than everything else
the server does (see ``docs/benchmarks.md``). The actor keeps what needs one
owner; the hot path crosses no thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pykka

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientAttached,
    ClientDetached,
    ClientRequest,
    CloseSession,
    ErrorReply,
    Hello,
    Reply,
    Request,
    SessionFailed,
    Welcome,
    WireMessage,
)
from actorpool.protocol import (
    MAX_REQUEST_FRAME,
    NEED_DATA,
    PEER_CLOSED,
    Connection,
    Role,
    State,
)
from actorpool.reader import SocketReader

__all__ = ["ClientProxy", "ClientSessionActor", "Flush", "HangUp", "Outbox"]

logger = logging.getLogger(__name__)

_FOR_THE_REGISTRY = (Request, CloseSession, SessionFailed)
"""What a client sends that the registry handles. A tuple made once: the
``A | B | C`` union would be built anew for every message."""

SEND_TIMEOUT = 10.0
"""Seconds queued replies may wait for a client that does not read before it
is dropped."""

HELLO_TIMEOUT = 10.0
"""Seconds a new connection has to send its ``Hello`` before it is closed
with a protocol error: one that never does would hold one of the acceptor's
``max_clients`` places for as long as it stayed open."""


@dataclasses.dataclass(frozen=True, slots=True)
class _HelloOverdue:
    """To the actor, from its hello timer: ``HELLO_TIMEOUT`` has passed."""


@dataclasses.dataclass(frozen=True, slots=True)
class HangUp:
    """To the actor: the connection is over."""

    error: str = ""
    """Why, when the client broke the protocol; empty when it just closed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Flush:
    """Outbox to its actor: frames are queued; write them once there is room."""


class Outbox:
    """Writes frames to one client, in order, from any thread, never blocking.

    Encoding (which updates the connection's state) and writing happen under
    one lock, so frames leave in the order they were sent. A frame that does
    not fit in the socket's buffer is queued, and ``on_backlog`` is called
    once so that the owner can :meth:`flush` it.
    """

    def __init__(
        self,
        sock: socket.socket,
        conn: Connection,
        lock: threading.Lock,
        on_backlog: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._conn = conn
        self._lock = lock
        self._on_backlog = on_backlog
        self._backlog: deque[bytes] = deque()
        self._flushing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<Outbox backlog={len(self._backlog)} closed={self._closed}>"

    def send(self, message: WireMessage) -> None:
        """Encode ``message`` and write it, or queue it. Raises LocalProtocolError.

        Replies to a connection that is no longer open (the client broke the
        protocol, or is closing) are dropped: nobody is there to read them.
        """
        with self._lock:
            if self._closed or (
                self._conn.state is not State.OPEN and not isinstance(message, Welcome)
            ):
                return
            self._write_locked(self._conn.send(message))

    def send_protocol_error(self, text: str) -> None:
        """Write the connection-level error frame, if the protocol allows it now."""
        with self._lock:
            if self._closed:
                return
            try:
                frame = self._conn.send_protocol_error(text)
            except LocalProtocolError:
                return
            self._write_locked(frame)

    def flush(self, timeout: float = SEND_TIMEOUT) -> bool:
        """Write the queued frames, waiting for room; False if the client is
        stuck: it took nothing for ``timeout`` seconds.

        Waiting happens outside the lock, so other threads' sends only queue
        behind it and never block. A client that reads, however slowly, is
        not dropped: only its own actor waits for it.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    return True
                mark = self._left_locked()
                if not self._drain_locked():
                    return False
                if not self._backlog:
                    self._flushing = False
                    return True
                if self._left_locked() != mark:
                    deadline = time.monotonic() + timeout  # it took some
                fd = self._sock.fileno()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(remaining * 1000)

    def close(self) -> None:
        """Close the socket; later sends are dropped."""
        with self._lock:
            self._closed = True
            self._backlog.clear()
            self._sock.close()

    def _write_locked(self, frame: bytes) -> None:
        if not self._flushing:
            try:
                sent = self._sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the connection is broken; the reader sees its end
            if sent == len(frame):
                return
            frame = frame[sent:]
            self._flushing = True
            self._backlog.append(frame)
            self._on_backlog()
        else:
            self._backlog.append(frame)

    def _left_locked(self) -> tuple[int, int]:
        """What is left to send, to tell whether a drain sent anything."""
        return (len(self._backlog), len(self._backlog[0]) if self._backlog else 0)

    def _drain_locked(self) -> bool:
        while self._backlog:
            try:
                sent = self._sock.send(self._backlog[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if sent == len(self._backlog[0]):
                self._backlog.popleft()
            else:
                self._backlog[0] = self._backlog[0][sent:]
        return True


# Outboxes of the running session actors, by actor URN, so that a
# ClientProxy made from a ClientAttached message (plain data: the URN) can
# write replies without a hop through the actor.
_outboxes: dict[str, Outbox] = {}
_outboxes_lock = threading.Lock()


def _send_or_say_why(outbox: Outbox, message: WireMessage) -> None:
    """Send ``message``; if it cannot be (a reply over the frame limit, say,
    a statistics snapshot of many thousand apps), answer its request with an
    error instead, so that the client hears why and its connection lives.

    Raises :class:`LocalProtocolError` when not even that can be sent.
    """
    try:
        outbox.send(message)
    except LocalProtocolError as exc:
        # Named, not shown: the message may be a megabyte long.
        what = type(message).__name__
        request_id = getattr(message, "request_id", 0)
        logger.error("cannot send %s (request %d): %s", what, request_id, exc)
        if not request_id or isinstance(message, ErrorReply):
            raise
        outbox.send(
            ErrorReply(
                request_id,
                "ActorPoolError",
                f"the server could not send its answer ({what}): {exc}",
            )
        )


class ClientProxy:
    """How the registry answers one client: a reply goes out at once.

    Made from the URN in ``ClientAttached``. For a client that is not a
    :class:`ClientSessionActor` (a test's stand-in), replies are told to the
    actor as ordinary messages.
    """

    def __init__(self, ref: pykka.ActorRef[Any], outbox: Outbox | None) -> None:
        self.ref = ref
        self._outbox = outbox

    def __repr__(self) -> str:
        return f"<ClientProxy {self.ref.actor_urn} direct={self._outbox is not None}>"

    @classmethod
    def from_urn(cls, urn: str) -> ClientProxy | None:
        """The proxy of the actor with ``urn``, or None if it is gone."""
        ref = pykka.ActorRegistry.get_by_urn(urn)
        if ref is None:
            return None
        with _outboxes_lock:
            outbox = _outboxes.get(urn)
        return cls(ref, outbox)

    def reply(self, reply: Reply) -> None:
        """Send ``reply`` to the client; never blocks, never raises."""
        try:
            if self._outbox is None:
                self.ref.tell(reply)
                return
            try:
                _send_or_say_why(self._outbox, reply)
            except LocalProtocolError:
                self.ref.tell(HangUp())
        except pykka.ActorDeadError:
            pass  # it is closing; the registry hears ClientDetached next


class ClientSessionActor(pykka.ThreadingActor):
    """Speaks the protocol with one client on behalf of the registry.

    ``reader`` is the server's shared :class:`~actorpool.reader.SocketReader`;
    without one the actor runs a reader of its own (handy in tests).
    """

    def __init__(
        self,
        sock: socket.socket,
        client_id: int,
        registry: pykka.ActorRef[Any],
        reader: SocketReader | None = None,
    ) -> None:
        super().__init__()
        self._sock = sock
        self._client_id = client_id
        self._registry = registry
        self._own_reader = reader is None
        self._reader = reader or SocketReader().start(f"actorpool-client-{client_id}")
        self._conn = Connection(Role.SERVER, max_frame_size=MAX_REQUEST_FRAME)
        self._conn_lock = threading.Lock()  # input and output halves share it
        self._outbox = Outbox(sock, self._conn, self._conn_lock, self._ask_flush)
        self._closing = False  # answered already, or the peer closed
        self._finished = False
        self._hello_timer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<ClientSessionActor client={self._client_id} {self._conn!r}>"

    def on_start(self) -> None:
        # Before ClientAttached, so the registry's ClientProxy finds it; not
        # in __init__, so an actor whose thread never starts leaves nothing.
        with _outboxes_lock:
            _outboxes[self.actor_urn] = self._outbox
        try:
            self._registry.tell(ClientAttached(self._client_id, self.actor_urn))
        except pykka.ActorDeadError:
            # The server is going down: stop (on_stop cleans up).
            logger.warning("no registry for client %d; closing it", self._client_id)
            self._hang_up()
            return
        self._reader.add(self._sock, self._on_data)
        self._arm_hello_timer()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Hello):
            self._welcome(message)
        elif isinstance(message, Reply):
            self._send(message)
        elif isinstance(message, Flush):
            if not self._outbox.flush():
                logger.warning("dropping client %d: it does not read", self._client_id)
                self._hang_up()
        elif isinstance(message, HangUp):
            if message.error:
                self._fail(message.error)
            else:
                self._hang_up()
        elif isinstance(message, _HelloOverdue):
            self._hello_overdue()
        else:
            logger.warning("ClientSessionActor ignores unexpected message %r", message)

    def on_stop(self) -> None:
        self._finish()

    def on_failure(self, *_exc_info: object) -> None:
        self._finish()

    # --- input half: runs on the reader thread ---------------------------------

    def _on_data(self, data: bytes) -> bool:
        """Decode ``data`` and pass each message on; False when the end came."""
        hang_up = None
        events = []
        with self._conn_lock:
            try:
                self._conn.receive_data(data)
                while (event := self._conn.next_event()) is not NEED_DATA:
                    if event is PEER_CLOSED:
                        hang_up = HangUp()
                        break
                    events.append(event)
            except RemoteProtocolError as exc:
                hang_up = HangUp(str(exc))
            except Exception as exc:  # a bug: it costs this connection only
                logger.exception("decoding client %d's input failed", self._client_id)
                hang_up = HangUp(f"internal error: {exc!r}")
        try:
            for event in events:
                if isinstance(event, Hello):
                    self.actor_ref.tell(event)  # answering is the actor's job
                elif isinstance(event, _FOR_THE_REGISTRY):
                    try:
                        self._registry.tell(ClientRequest(self._client_id, event))
                    except pykka.ActorDeadError:
                        hang_up = HangUp()  # the server is going down
                        break
            if hang_up is not None:
                self.actor_ref.tell(hang_up)
        except pykka.ActorDeadError:
            return False  # the actor is stopping and will close the socket
        return hang_up is None

    # --- the actor's own work ------------------------------------------------

    def _arm_hello_timer(self) -> None:
        timer = threading.Timer(HELLO_TIMEOUT, self._tell_hello_overdue)
        timer.name = f"actorpool-hello-{self._client_id}"
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread to be had: the client goes without
            logger.warning("no hello deadline for client %d", self._client_id)
            self._hello_timer = None
        else:
            self._hello_timer = timer

    def _tell_hello_overdue(self) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(_HelloOverdue())

    def _hello_overdue(self) -> None:
        with self._conn_lock:
            overdue = self._conn.state is State.START
        if not overdue or self._closing:
            return
        # The reader may not have got to input that came in time: in the
        # server it reads only while the registry has nothing to do, and
        # after a stall (a stopped or swapping server) every deadline fires
        # at once. Input waiting on the socket gets another term.
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if poller.poll(0):
            self._arm_hello_timer()
            return
        self._fail(f"no hello within {HELLO_TIMEOUT:g} s")

    def _welcome(self, hello: Hello) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()  # ends its thread now, not in 10 s
        if hello.version != PROTOCOL_VERSION:
            self._fail(
                f"protocol version {hello.version} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})"
            )
            return
        logger.debug("client %d (pid %d) connected", self._client_id, hello.client_pid)
        self._send(Welcome(PROTOCOL_VERSION, os.getpid(), self._client_id))

    def _send(self, message: Welcome | Reply) -> None:
        if (
            self._closing
            # Broken by input read after the Hello: its HangUp says why.
            or self._conn.state is State.ERROR
            or (self._conn.state is not State.OPEN and not isinstance(message, Welcome))
        ):
            return  # closing: replies still in the inbox have nowhere to go
        try:
            _send_or_say_why(self._outbox, message)
        except LocalProtocolError:
            self._hang_up()

    def _fail(self, text: str) -> None:
        if self._closing:
            return
        logger.warning("closing client %d: %s", self._client_id, text)
        self._outbox.send_protocol_error(text)
        self._hang_up()

    def _hang_up(self) -> None:
        self._closing = True
        self.stop()

    def _ask_flush(self) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(Flush())

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        with _outboxes_lock:
            _outboxes.pop(self.actor_urn, None)
        # Closing runs on the reader thread, so it can never race with a recv
        # on the same descriptor; remove() returns once it has happened.
        self._reader.remove(self._sock, self._outbox.close)
        if self._own_reader:
            self._reader.close()
        # Only after the descriptor is closed: whoever sees the client gone
        # from the registry sees its descriptor gone too. A registry that is
        # already gone has nothing left to release.
        with contextlib.suppress(pykka.ActorDeadError):
            self._registry.tell(ClientDetached(self._client_id))
