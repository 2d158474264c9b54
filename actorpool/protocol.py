"""The wire protocol as a sans-IO state machine.

A :class:`Connection` does no I/O, starts no threads and knows nothing of
pykka: bytes go in through :meth:`Connection.receive_data` and come out as
messages from :meth:`Connection.next_event`; messages go in through
:meth:`Connection.send` and come out as bytes to write. Both ends of the wire
use the same class, with their own :class:`Role`.

Framing: each message is a 4-byte big-endian length followed by that many
bytes of msgpack (see :mod:`actorpool.messages`). The length is checked
before the body is buffered, so an oversized frame costs nothing.

Every legal step is one row of :data:`TRANSITIONS`; anything else is a
protocol error. Errors in what the peer sent raise
:class:`~actorpool.errors.RemoteProtocolError` and leave the connection in
``ERROR``; errors in what we try to send raise
:class:`~actorpool.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    Category,
    ErrorReply,
    Reply,
    Request,
    WireMessage,
    decode,
    encode,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_IN_FLIGHT",
    "MAX_REQUEST_FRAME",
    "NEED_DATA",
    "PEER_CLOSED",
    "TRANSITIONS",
    "Connection",
    "Direction",
    "Role",
    "State",
]

MAX_FRAME_SIZE: Final = 1 << 20
"""Largest frame body accepted by default (1 MiB)."""

MAX_REQUEST_FRAME: Final = 64 * 1024
"""Largest request frame body (64 KiB): every request is far smaller, and
the server reads client frames with this limit. A request over it is
refused when it is sent, so it never costs the connection."""

MAX_IN_FLIGHT: Final = 1024
"""Most requests a server accepts from one client before it has replied."""

_HEADER = struct.Struct(">I")


class Role(enum.Enum):
    """Which end of the wire a connection is."""

    # Members are singletons: hash by identity, in C. Enum's own __hash__ is
    # Python code, and the transition table hashes four of these per message.
    __hash__ = object.__hash__

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where a connection is in its life."""

    # Members are singletons: hash by identity, in C. Enum's own __hash__ is
    # Python code, and the transition table hashes four of these per message.
    __hash__ = object.__hash__

    START = "start"
    """Client: must send ``Hello``. Server: waits for ``Hello``."""
    AWAIT_WELCOME = "await-welcome"
    """Client: has sent ``Hello``, waits for ``Welcome``."""
    SEND_WELCOME = "send-welcome"
    """Server: has received ``Hello``, must answer it."""
    OPEN = "open"
    """Requests, notices and replies flow."""
    ERROR = "error"
    """The peer broke the protocol; a server may still send its error reply."""
    CLOSED = "closed"
    """Nothing more may be sent or received."""


class Direction(enum.Enum):
    """Whether a message is being sent or was received."""

    # Members are singletons: hash by identity, in C. Enum's own __hash__ is
    # Python code, and the transition table hashes four of these per message.
    __hash__ = object.__hash__

    SEND = "send"
    RECEIVE = "receive"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
"""From :meth:`Connection.next_event`: no whole frame is buffered yet."""

PEER_CLOSED: Final = _Sentinel("PEER_CLOSED")
"""From :meth:`Connection.next_event`: the peer closed its end cleanly."""

_C, _S = Role.CLIENT, Role.SERVER
_SEND, _RECV = Direction.SEND, Direction.RECEIVE

TRANSITIONS: Final[dict[tuple[Role, State, Direction, Category], State]] = {
    # The client opens with a hello and waits for the welcome.
    (_C, State.START, _SEND, Category.HELLO): State.AWAIT_WELCOME,
    (_C, State.AWAIT_WELCOME, _RECV, Category.WELCOME): State.OPEN,
    # A server that refuses the hello says why in a connection-level error.
    (_C, State.AWAIT_WELCOME, _RECV, Category.REPLY): State.CLOSED,
    (_C, State.OPEN, _SEND, Category.REQUEST): State.OPEN,
    (_C, State.OPEN, _SEND, Category.NOTICE): State.OPEN,
    (_C, State.OPEN, _RECV, Category.REPLY): State.OPEN,
    # The server waits for the hello, then must answer it.
    (_S, State.START, _RECV, Category.HELLO): State.SEND_WELCOME,
    # A server that will not take a connection at all says why at once.
    (_S, State.START, _SEND, Category.REPLY): State.CLOSED,
    (_S, State.SEND_WELCOME, _SEND, Category.WELCOME): State.OPEN,
    (_S, State.SEND_WELCOME, _SEND, Category.REPLY): State.CLOSED,
    (_S, State.OPEN, _RECV, Category.REQUEST): State.OPEN,
    (_S, State.OPEN, _RECV, Category.NOTICE): State.OPEN,
    (_S, State.OPEN, _SEND, Category.REPLY): State.OPEN,
    # After the client broke the protocol the server may explain, then close.
    (_S, State.ERROR, _SEND, Category.REPLY): State.CLOSED,
}
"""Every legal step: (our role, state, direction, message category) -> next state.

A ``REPLY`` with request id 0 is a connection-level error (only an
``ErrorReply`` may carry it): sending or receiving one in ``OPEN`` closes the
connection too, and it is the only reply a server may send in ``ERROR``."""


_STEPS: dict[tuple[Role, State, Direction, type], State | None] = {}
""":data:`TRANSITIONS` by message class instead of category, filled as
classes are met (None: not allowed): one lookup per message instead of
finding the category first. At most roles x states x directions x classes."""


class Connection:
    """One end of a client/server connection, with no I/O of its own."""

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.role: Final = role
        self.state = State.START
        self.max_frame_size: Final = max_frame_size
        self.max_in_flight: Final = max_in_flight
        self._buffer = bytearray()
        self._eof = False
        self._in_flight: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"<Connection {self.role.value} {self.state.value} "
            f"in_flight={len(self._in_flight)} buffered={len(self._buffer)}>"
        )

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into messages."""
        return len(self._buffer)

    @property
    def in_flight(self) -> int:
        """Requests sent (client) or received (server) and not yet answered."""
        return len(self._in_flight)

    # --- sending ---------------------------------------------------------

    def send(self, message: WireMessage) -> bytes:
        """Check that sending ``message`` is legal now; return its frame.

        Nothing changes when this raises
        :class:`~actorpool.errors.LocalProtocolError`: the message was not
        sent and the connection can still be used.
        """
        next_state = self._next_state(_SEND, message, LocalProtocolError)
        # What we send is bounded by what the peer accepts (a server reads
        # requests with MAX_REQUEST_FRAME), not by our own (possibly
        # smaller) limit on what we receive.
        limit = MAX_FRAME_SIZE
        if isinstance(message, Request):
            limit = MAX_REQUEST_FRAME
            if message.request_id == 0 or message.request_id in self._in_flight:
                raise LocalProtocolError(
                    f"request id {message.request_id} is 0 or already in flight"
                )
            if len(self._in_flight) >= self.max_in_flight:
                raise LocalProtocolError(
                    f"already {self.max_in_flight} requests in flight"
                )
        elif isinstance(message, Reply):
            if message.request_id == 0:
                if not isinstance(message, ErrorReply):
                    raise LocalProtocolError(
                        "only an ErrorReply may carry request id 0"
                    )
                next_state = State.CLOSED  # a connection-level error
            elif self.state is State.ERROR:
                raise LocalProtocolError(
                    "after a protocol error only the connection-level error "
                    "reply (request id 0) may be sent"
                )
            elif message.request_id not in self._in_flight:
                raise LocalProtocolError(
                    f"reply to request {message.request_id}, which is not in flight"
                )
        body = encode(message)
        if len(body) > limit:
            raise LocalProtocolError(
                f"frame of {len(body)} bytes is over the {limit}-byte limit"
            )
        # Every check passed: only now does the connection change.
        self.state = next_state
        if isinstance(message, Request):
            self._in_flight.add(message.request_id)
        elif isinstance(message, Reply):
            self._in_flight.discard(message.request_id)
        return _HEADER.pack(len(body)) + body

    def send_protocol_error(self, text: str) -> bytes:
        """The frame that tells the client why the server is closing on it."""
        return self.send(ErrorReply(0, "ProtocolError", text))

    # --- receiving -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the peer; ``b""`` means the peer closed."""
        if self._eof and data:
            raise LocalProtocolError("data after end of stream")
        if self.state is State.ERROR:
            return  # nothing more will be read; do not hoard the peer's bytes
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> WireMessage | _Sentinel:
        """The next message, ``NEED_DATA`` or ``PEER_CLOSED``.

        Raises :class:`~actorpool.errors.RemoteProtocolError` (and moves to
        ``ERROR``) when the peer sent something it must not have.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.state = State.ERROR
            self._buffer.clear()
            raise

    def _next_event(self) -> WireMessage | _Sentinel:
        if len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size == 0 or size > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {size} bytes (the limit is {self.max_frame_size})"
                )
            end = _HEADER.size + size
            if len(self._buffer) >= end:
                body = self._buffer[_HEADER.size : end]  # a copy
                del self._buffer[:end]
                message = decode(
                    body,
                    max_size=self.max_frame_size,
                    # A server's replies (statistics of a large pool) may
                    # hold long arrays; what a client sends never does.
                    max_array_len=1024 if self.role is Role.SERVER else size,
                )
                self._receive(message)
                return message
        if not self._eof:
            return NEED_DATA
        if self._buffer:
            raise RemoteProtocolError("the peer closed in the middle of a frame")
        self.state = State.CLOSED
        return PEER_CLOSED

    def _receive(self, message: WireMessage) -> None:
        self.state = self._next_state(_RECV, message, RemoteProtocolError)
        if isinstance(message, Request):
            if message.request_id == 0 or message.request_id in self._in_flight:
                raise RemoteProtocolError(
                    f"request id {message.request_id} is 0 or already in flight"
                )
            if len(self._in_flight) >= self.max_in_flight:
                raise RemoteProtocolError(
                    f"more than {self.max_in_flight} requests in flight"
                )
            self._in_flight.add(message.request_id)
        elif isinstance(message, Reply):
            if message.request_id == 0:
                if not isinstance(message, ErrorReply):
                    raise RemoteProtocolError(
                        f"{type(message).__name__} with request id 0 "
                        "(only an ErrorReply may carry it)"
                    )
                self.state = State.CLOSED  # a connection-level error
            elif message.request_id in self._in_flight:
                self._in_flight.discard(message.request_id)
            else:
                raise RemoteProtocolError(
                    f"reply to request {message.request_id}, which is not in flight"
                )

    def _next_state(
        self,
        direction: Direction,
        message: WireMessage,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> State:
        key = (self.role, self.state, direction, type(message))
        try:
            next_state = _STEPS[key]
        except KeyError:
            category = getattr(type(message), "CATEGORY", None)
            next_state = None
            if isinstance(category, Category):
                next_state = TRANSITIONS.get(
                    (self.role, self.state, direction, category)
                )
            _STEPS[key] = next_state
        if next_state is None:
            verb = "send" if direction is _SEND else "receive"
            raise error(
                f"a {self.role.value} in state {self.state.value} "
                f"cannot {verb} {type(message).__name__}"
            )
        return next_state
