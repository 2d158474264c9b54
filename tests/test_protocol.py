"""The sans-IO protocol state machine: handshake, framing, request ids, fuzz."""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    Category,
    Clear,
    CloseSession,
    Done,
    ErrorReply,
    Get,
    GetStatistics,
    Hello,
    SessionFailed,
    SessionGranted,
    StatisticsReply,
    Welcome,
    WireMessage,
    decode,
    encode,
)
from actorpool.protocol import (
    MAX_FRAME_SIZE,
    MAX_REQUEST_FRAME,
    NEED_DATA,
    PEER_CLOSED,
    TRANSITIONS,
    Connection,
    Direction,
    Role,
    State,
)

Event = WireMessage | object


def frame(message: WireMessage) -> bytes:
    body = encode(message)
    return struct.pack(">I", len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def events(conn: Connection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` (if any) and collect events up to NEED_DATA/PEER_CLOSED."""
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if event is NEED_DATA or event is PEER_CLOSED:
            return out


HELLO = Hello(PROTOCOL_VERSION, 1234)
WELCOME = Welcome(PROTOCOL_VERSION, 99, 7)


def open_pair(**server_kwargs: int) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, **server_kwargs)
    assert events(server, client.send(HELLO)) == [HELLO, NEED_DATA]
    assert events(client, server.send(WELCOME)) == [WELCOME, NEED_DATA]
    assert client.state is State.OPEN
    assert server.state is State.OPEN
    return client, server


def open_server(**kwargs: int) -> Connection:
    server = Connection(Role.SERVER, **kwargs)
    events(server, frame(HELLO))
    server.send(WELCOME)
    assert server.state is State.OPEN
    return server


def open_client(**kwargs: int) -> Connection:
    client = Connection(Role.CLIENT, **kwargs)
    client.send(HELLO)
    events(client, frame(WELCOME))
    assert client.state is State.OPEN
    return client


# --- handshake ------------------------------------------------------------------


def test_handshake_accepted() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    assert client.state is State.START
    assert server.state is State.START
    hello = client.send(HELLO)
    assert client.state is State.AWAIT_WELCOME  # type: ignore[comparison-overlap]
    assert events(server) == [NEED_DATA]
    assert events(server, hello) == [HELLO, NEED_DATA]
    assert server.state is State.SEND_WELCOME
    assert events(client, server.send(WELCOME)) == [WELCOME, NEED_DATA]
    assert client.state is State.OPEN
    assert server.state is State.OPEN


def test_handshake_refused_by_the_server() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    events(server, client.send(Hello(PROTOCOL_VERSION + 1, 1)))
    refusal = server.send_protocol_error("version 2 is not supported")
    assert server.state is State.CLOSED
    got = events(client, refusal)
    assert got[0] == ErrorReply(0, "ProtocolError", "version 2 is not supported")
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Get(1, "/a"))
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)


def test_client_cannot_send_requests_before_welcome() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Get(1, "/a"))
    client.send(HELLO)
    with pytest.raises(LocalProtocolError):
        client.send(Get(1, "/a"))
    assert client.state is State.AWAIT_WELCOME
    assert client.in_flight == 0


def test_server_refuses_requests_before_hello() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        events(server, frame(Get(1, "/a")))
    assert server.state is State.ERROR


def test_server_refuses_a_second_hello() -> None:
    _, server = open_pair()
    with pytest.raises(RemoteProtocolError):
        events(server, frame(HELLO))


def test_repr_is_informative() -> None:
    client, _ = open_pair()
    client.send(Get(1, "/a"))
    text = repr(client)
    assert "client" in text
    assert "open" in text
    assert "in_flight=1" in text


# --- many requests in flight ----------------------------------------------------


def test_many_requests_in_flight_with_out_of_order_replies() -> None:
    client, server = open_pair()
    ids = list(range(1, 201))
    wire = b"".join(client.send(Get(i, f"/app{i % 3}")) for i in ids)
    assert client.in_flight == len(ids)
    received = events(server, wire)
    assert received[:-1] == [Get(i, f"/app{i % 3}") for i in ids]
    assert server.in_flight == len(ids)

    order = ids[:]
    random.Random(7).shuffle(order)
    replies: list[WireMessage] = [
        SessionGranted(i, 1000 + i, 4242, f"/app{i % 3}", f"/tmp/s{i}") for i in order
    ]
    wire = b"".join(server.send(reply) for reply in replies)
    assert server.in_flight == 0
    assert events(client, wire)[:-1] == replies
    assert client.in_flight == 0
    assert client.state is State.OPEN
    assert server.state is State.OPEN


def test_notices_do_not_count_as_in_flight() -> None:
    client, server = open_pair()
    wire = client.send(CloseSession(5)) + client.send(SessionFailed(6))
    assert client.in_flight == 0
    assert events(server, wire)[:-1] == [CloseSession(5), SessionFailed(6)]
    assert server.in_flight == 0


# --- the transition table ---------------------------------------------------------

SAMPLE = {
    Category.HELLO: HELLO,
    Category.WELCOME: WELCOME,
    Category.REQUEST: GetStatistics(77),
    Category.NOTICE: CloseSession(3),
    Category.REPLY: ErrorReply(0, "ProtocolError", "bye"),
}


def reach(role: Role, state: State) -> Connection:
    """A connection brought to ``state`` by legal steps where possible."""
    conn = Connection(role)
    if role is Role.CLIENT:
        if state is State.START:
            return conn
        conn.send(HELLO)
        if state is State.AWAIT_WELCOME:
            return conn
        events(conn, frame(WELCOME))
        if state is State.OPEN:
            return conn
        if state is State.ERROR:
            with pytest.raises(RemoteProtocolError):
                events(conn, frame(Done(5)))
        elif state is State.CLOSED:
            events(conn, frame(ErrorReply(0, "ProtocolError", "go away")))
        else:
            conn.state = state  # not reachable by a client
    else:
        if state is State.START:
            return conn
        events(conn, frame(HELLO))
        if state is State.SEND_WELCOME:
            return conn
        conn.send(WELCOME)
        if state is State.OPEN:
            return conn
        with pytest.raises(RemoteProtocolError):
            events(conn, raw_frame(b"\xc1"))
        if state is State.CLOSED:
            conn.send_protocol_error("bad frame")
        elif state is not State.ERROR:
            conn.state = state  # not reachable by a server
    assert conn.state is state
    return conn


def step(conn: Connection, direction: Direction, message: WireMessage) -> None:
    if direction is Direction.SEND:
        conn.send(message)
    else:
        events(conn, frame(message))


# How each row of the table is taken for real: (setup, message).
Setup = Callable[[Connection], None]


def _nothing(conn: Connection) -> None:
    pass


def _client_sent_request_9(conn: Connection) -> None:
    conn.send(Get(9, "/a"))


def _server_got_request_9(conn: Connection) -> None:
    events(conn, frame(Get(9, "/a")))


ROWS: dict[tuple[Role, State, Direction, Category], tuple[Setup, WireMessage]] = {
    (Role.CLIENT, State.START, Direction.SEND, Category.HELLO): (_nothing, HELLO),
    (Role.CLIENT, State.AWAIT_WELCOME, Direction.RECEIVE, Category.WELCOME): (
        _nothing,
        WELCOME,
    ),
    (Role.CLIENT, State.AWAIT_WELCOME, Direction.RECEIVE, Category.REPLY): (
        _nothing,
        ErrorReply(0, "ProtocolError", "no"),
    ),
    (Role.CLIENT, State.OPEN, Direction.SEND, Category.REQUEST): (
        _nothing,
        Get(1, "/a", 2.0),
    ),
    (Role.CLIENT, State.OPEN, Direction.SEND, Category.NOTICE): (
        _nothing,
        SessionFailed(4),
    ),
    (Role.CLIENT, State.OPEN, Direction.RECEIVE, Category.REPLY): (
        _client_sent_request_9,
        Done(9),
    ),
    (Role.SERVER, State.START, Direction.RECEIVE, Category.HELLO): (_nothing, HELLO),
    (Role.SERVER, State.START, Direction.SEND, Category.REPLY): (
        _nothing,
        ErrorReply(0, "ProtocolError", "refused: max_clients=1 reached"),
    ),
    (Role.SERVER, State.SEND_WELCOME, Direction.SEND, Category.WELCOME): (
        _nothing,
        WELCOME,
    ),
    (Role.SERVER, State.SEND_WELCOME, Direction.SEND, Category.REPLY): (
        _nothing,
        ErrorReply(0, "ProtocolError", "version"),
    ),
    (Role.SERVER, State.OPEN, Direction.RECEIVE, Category.REQUEST): (
        _nothing,
        Clear(3),
    ),
    (Role.SERVER, State.OPEN, Direction.RECEIVE, Category.NOTICE): (
        _nothing,
        CloseSession(8),
    ),
    (Role.SERVER, State.OPEN, Direction.SEND, Category.REPLY): (
        _server_got_request_9,
        Done(9),
    ),
    (Role.SERVER, State.ERROR, Direction.SEND, Category.REPLY): (
        _nothing,
        ErrorReply(0, "ProtocolError", "you broke it"),
    ),
}


def test_every_row_has_a_case() -> None:
    assert set(ROWS) == set(TRANSITIONS)


@pytest.mark.parametrize(
    "row", list(TRANSITIONS), ids=lambda r: "-".join(str(x.value) for x in r)
)
def test_transition_row(row: tuple[Role, State, Direction, Category]) -> None:
    role, state, direction, category = row
    setup, message = ROWS[row]
    assert message.CATEGORY is category
    conn = reach(role, state)
    setup(conn)
    assert conn.state is state
    step(conn, direction, message)
    assert conn.state is TRANSITIONS[row]


ILLEGAL = [
    (role, state, direction, category)
    for role, state, direction, category in itertools.product(
        Role, State, Direction, Category
    )
    if (role, state, direction, category) not in TRANSITIONS
]


@pytest.mark.parametrize(
    "row", ILLEGAL, ids=lambda r: "-".join(str(x.value) for x in r)
)
def test_step_not_in_table_raises(row: tuple[Role, State, Direction, Category]) -> None:
    role, state, direction, category = row
    conn = reach(role, state)
    message = SAMPLE[category]
    if direction is Direction.SEND:
        with pytest.raises(LocalProtocolError):
            conn.send(message)
        assert conn.state is state  # a refused send changes nothing
    else:
        with pytest.raises(RemoteProtocolError):
            events(conn, frame(message))
        assert conn.state is State.ERROR


def test_illegal_steps_cover_every_pair() -> None:
    total = len(Role) * len(State) * len(Direction) * len(Category)
    assert len(ILLEGAL) + len(TRANSITIONS) == total


# --- request ids ------------------------------------------------------------------


def test_client_may_not_send_request_id_zero() -> None:
    client = open_client()
    with pytest.raises(LocalProtocolError):
        client.send(Get(0, "/a"))
    assert client.in_flight == 0
    assert client.state is State.OPEN


def test_server_refuses_request_id_zero() -> None:
    server = open_server()
    with pytest.raises(RemoteProtocolError):
        events(server, frame(Get(0, "/a")))
    assert server.state is State.ERROR


def test_client_may_not_reuse_an_id_in_flight() -> None:
    client, server = open_pair()
    events(server, client.send(Get(5, "/a")))
    with pytest.raises(LocalProtocolError):
        client.send(GetStatistics(5))
    assert client.in_flight == 1
    events(client, server.send(Done(5)))
    assert client.in_flight == 0
    # Once answered, the id is free again.
    events(server, client.send(GetStatistics(5)))
    assert server.in_flight == 1


def test_server_refuses_a_duplicate_id_in_flight() -> None:
    server = open_server()
    events(server, frame(Get(5, "/a")))
    with pytest.raises(RemoteProtocolError):
        events(server, frame(Clear(5)))
    assert server.state is State.ERROR


def test_client_refuses_a_reply_to_an_unknown_id() -> None:
    client = open_client()
    client.send(Get(1, "/a"))
    with pytest.raises(RemoteProtocolError):
        events(client, frame(Done(2)))
    assert client.state is State.ERROR


def test_client_refuses_a_second_reply_to_the_same_id() -> None:
    client = open_client()
    client.send(Get(1, "/a"))
    assert events(client, frame(Done(1)))[0] == Done(1)
    with pytest.raises(RemoteProtocolError):
        events(client, frame(Done(1)))


def test_server_may_not_reply_to_an_unknown_id() -> None:
    server = open_server()
    with pytest.raises(LocalProtocolError):
        server.send(Done(3))
    assert server.state is State.OPEN


@pytest.mark.parametrize(
    "reply", [Done(0), SessionGranted(0, 1, 2, "/a", "/s")], ids=["Done", "Granted"]
)
def test_only_an_error_reply_may_carry_id_zero(reply: WireMessage) -> None:
    client = open_client()
    with pytest.raises(RemoteProtocolError):
        events(client, frame(reply))
    server = open_server()
    with pytest.raises(LocalProtocolError):
        server.send(reply)
    assert server.state is State.OPEN


def test_a_request_is_held_to_the_limit_the_server_reads_requests_with() -> None:
    """Before, a client sent requests up to MAX_FRAME_SIZE, and one over
    MAX_REQUEST_FRAME cost it the connection (and every thread using it)."""
    client = open_client()
    path = "/" + "x" * MAX_REQUEST_FRAME
    with pytest.raises(LocalProtocolError, match="limit"):
        client.send(Get(1, path))
    assert client.state is State.OPEN
    assert client.send(Get(1, "/a"))  # the connection carries on
    server = open_server()
    events(server, frame(Get(1, "/a")))
    assert server.send(StatisticsReply(1, {"x": path}))  # replies may be larger


def test_a_failed_send_leaves_the_request_id_free() -> None:
    client = open_client()
    with pytest.raises(LocalProtocolError, match="over the 65536-byte limit"):
        client.send(Get(1, "/" + "x" * MAX_FRAME_SIZE))
    assert client.in_flight == 0
    assert client.state is State.OPEN
    client.send(Get(1, "/a"))
    assert client.in_flight == 1


def test_a_send_with_a_bad_field_changes_nothing() -> None:
    client = open_client()
    with pytest.raises(LocalProtocolError):
        client.send(Get(True, "/a"))
    with pytest.raises(LocalProtocolError):
        client.send(Get(2, "/a", float("nan")))
    assert client.in_flight == 0
    assert client.state is State.OPEN


# --- max_in_flight ----------------------------------------------------------------


def test_server_limits_requests_in_flight() -> None:
    server = open_server(max_in_flight=3)
    events(server, b"".join(frame(Get(i, "/a")) for i in (1, 2, 3)))
    assert server.in_flight == 3
    server.send(Done(2))
    events(server, frame(Get(4, "/a")))
    assert server.in_flight == 3
    with pytest.raises(RemoteProtocolError, match="in flight"):
        events(server, frame(Get(5, "/a")))
    assert server.state is State.ERROR


def test_notices_are_not_limited_by_max_in_flight() -> None:
    server = open_server(max_in_flight=1)
    events(server, frame(Get(1, "/a")))
    got = events(server, b"".join(frame(CloseSession(i)) for i in range(10)))
    assert len(got) == 11
    assert server.state is State.OPEN


def test_client_limits_requests_in_flight() -> None:
    client = open_client(max_in_flight=2)
    client.send(Get(1, "/a"))
    client.send(Get(2, "/a"))
    with pytest.raises(LocalProtocolError, match="in flight"):
        client.send(Get(3, "/a"))
    assert client.in_flight == 2
    assert client.state is State.OPEN
    events(client, frame(Done(1)))
    client.send(Get(3, "/a"))
    assert client.in_flight == 2


# --- framing ----------------------------------------------------------------------


def test_default_frame_limit() -> None:
    assert Connection(Role.SERVER).max_frame_size == MAX_FRAME_SIZE


def test_oversized_frame_fails_on_the_header_alone() -> None:
    server = open_server(max_frame_size=100)
    server.receive_data(struct.pack(">I", 101))
    with pytest.raises(RemoteProtocolError, match="101"):
        server.next_event()
    assert server.state is State.ERROR


def test_huge_header_fails_before_any_body() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_frame_at_the_limit_is_accepted() -> None:
    body = encode(Get(1, "/" + "x" * 200))
    server = open_server(max_frame_size=len(body))
    server.receive_data(struct.pack(">I", len(body)))
    assert server.next_event() is NEED_DATA
    assert events(server, body)[0] == Get(1, "/" + "x" * 200)


def test_send_refuses_a_frame_over_the_protocol_limit() -> None:
    # The receive limit may be smaller (a server takes small requests) but
    # what is sent is bounded by what every peer accepts: MAX_FRAME_SIZE.
    server = open_server(max_frame_size=40)
    events(server, frame(GetStatistics(1)))
    server.send(ErrorReply(1, "SpawnError", "x", "traceback " * 20))
    events(server, frame(GetStatistics(2)))
    with pytest.raises(LocalProtocolError):
        server.send(ErrorReply(2, "SpawnError", "x", "x" * MAX_FRAME_SIZE))
    assert server.in_flight == 1
    assert server.state is State.OPEN


def test_zero_length_frame_is_refused() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_eof_mid_frame_is_an_error() -> None:
    data = frame(HELLO)
    server = Connection(Role.SERVER)
    server.receive_data(data[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        server.next_event()


def test_eof_mid_header_is_an_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00")
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_peer_closed() -> None:
    client, server = open_pair()
    server.receive_data(client.send(CloseSession(1)))
    server.receive_data(b"")
    assert server.next_event() == CloseSession(1)
    assert server.next_event() is PEER_CLOSED
    assert server.state is State.CLOSED
    assert server.next_event() is PEER_CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_peer_closed_before_hello() -> None:
    server = Connection(Role.SERVER)
    assert events(server) == [NEED_DATA]
    server.receive_data(b"")
    assert server.next_event() is PEER_CLOSED


def test_undecodable_body_is_an_error() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        events(server, raw_frame(b"\x93\x01\x02"))  # an array of 3, 2 items


def test_byte_at_a_time() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    sent: list[WireMessage] = [HELLO]
    wire = client.send(HELLO)
    for byte in wire:
        assert server.next_event() is NEED_DATA
        server.receive_data(bytes([byte]))
    assert server.next_event() == HELLO
    wire = server.send(WELCOME)
    for byte in wire:
        client.receive_data(bytes([byte]))
    assert events(client) == [WELCOME, NEED_DATA]

    sent = [Get(1, "/a", 1.5), CloseSession(3), GetStatistics(2), Clear(9)]
    wire = b"".join(client.send(m) for m in sent)
    got: list[Event] = []
    for byte in wire:
        server.receive_data(bytes([byte]))
        got.extend(e for e in events(server) if e is not NEED_DATA)
        assert server.buffered < 4 + server.max_frame_size
    assert got == sent
    assert server.buffered == 0


# --- connection-level errors and ERROR -------------------------------------------


def test_connection_level_error_reply_closes_the_client() -> None:
    client, server = open_pair()
    events(server, client.send(Get(1, "/a")))
    error = ErrorReply(0, "ProtocolError", "shutting down")
    wire = server.send(error)
    assert server.state is State.CLOSED
    assert events(client, wire)[0] == error
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Get(2, "/a"))


def test_a_request_error_reply_does_not_close() -> None:
    client, server = open_pair()
    events(server, client.send(Get(1, "/a")))
    error = ErrorReply(1, "QueueFullError", "queue full")
    assert events(client, server.send(error))[0] == error
    assert client.state is State.OPEN
    assert server.state is State.OPEN


def test_after_error_next_event_keeps_raising() -> None:
    server = open_server()
    with pytest.raises(RemoteProtocolError):
        events(server, raw_frame(b"\xc1"))
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    server.receive_data(frame(Get(1, "/a")))
    assert server.buffered == 0  # nobody will read it: not kept
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_in_error_only_the_connection_level_reply_may_be_sent() -> None:
    server = open_server()
    events(server, frame(Get(1, "/a")))
    with pytest.raises(RemoteProtocolError):
        events(server, raw_frame(b"\xc1"))
    with pytest.raises(LocalProtocolError):
        server.send(Done(1))
    assert server.state is State.ERROR
    wire = server.send_protocol_error("bad frame")
    assert server.state is State.CLOSED  # type: ignore[comparison-overlap]
    assert decode(wire[4:], max_size=MAX_FRAME_SIZE) == ErrorReply(
        0, "ProtocolError", "bad frame"
    )
    with pytest.raises(LocalProtocolError):
        server.send_protocol_error("again")


def test_client_in_error_cannot_send() -> None:
    client = open_client()
    with pytest.raises(RemoteProtocolError):
        events(client, frame(Done(4)))
    with pytest.raises(LocalProtocolError):
        client.send(Get(1, "/a"))


# --- fuzz -------------------------------------------------------------------------


def _feed_hostile(server: Connection, chunks: list[bytes], eof: bool) -> None:
    """Feed chunks; only RemoteProtocolError may come out; memory stays bounded."""
    limit = server.max_frame_size
    for chunk in [*chunks, b""] if eof else chunks:
        server.receive_data(chunk)
        assert server.buffered <= 4 + limit + len(chunk)
        try:
            while True:
                event = server.next_event()
                if event is NEED_DATA or event is PEER_CLOSED:
                    break
                assert isinstance(event, WireMessage)
        except RemoteProtocolError:
            assert server.state is State.ERROR
            assert server.buffered == 0
            return
        assert server.buffered < 4 + limit
        if event is PEER_CLOSED:
            return


@settings(max_examples=300, deadline=None)
@given(
    hello=st.booleans(),
    chunks=st.lists(st.binary(min_size=1, max_size=64), max_size=30),
    max_frame_size=st.integers(1, 128),
    eof=st.booleans(),
)
def test_fuzz_random_bytes(
    hello: bool, chunks: list[bytes], max_frame_size: int, eof: bool
) -> None:
    server = Connection(Role.SERVER, max_frame_size=max_frame_size)
    if hello:
        prefix = frame(HELLO)
        server = Connection(Role.SERVER, max_frame_size=max(max_frame_size, 16))
        events(server, prefix)
        server.send(WELCOME)
    _feed_hostile(server, chunks, eof)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers around random or mangled msgpack bodies."""
    kind = draw(st.sampled_from(["random", "mangled", "valid"]))
    if kind == "random":
        body = draw(st.binary(min_size=1, max_size=60))
    else:
        message = draw(
            st.sampled_from(
                [
                    Get(draw(st.integers(0, 5)), "/a", 1.0),
                    CloseSession(1),
                    HELLO,
                    WELCOME,
                    Done(draw(st.integers(0, 5))),
                    ErrorReply(0, "ProtocolError", "x"),
                    GetStatistics(draw(st.integers(1, 5))),
                ]
            )
        )
        body = encode(message)
        if kind == "mangled":
            position = draw(st.integers(0, len(body) - 1))
            body = (
                body[:position]
                + bytes([draw(st.integers(0, 255))])
                + body[position + 1 :]
            )
    return raw_frame(body)


@settings(max_examples=300, deadline=None)
@given(
    hello=st.booleans(),
    frames=st.lists(framed_garbage(), max_size=12),
    cuts=st.lists(st.integers(1, 40), max_size=20),
    eof=st.booleans(),
)
def test_fuzz_framed_garbage(
    hello: bool, frames: list[bytes], cuts: list[int], eof: bool
) -> None:
    server = Connection(Role.SERVER, max_frame_size=64)
    if hello:
        events(server, frame(HELLO))
        server.send(WELCOME)
    data = b"".join(frames)
    chunks = []
    for cut in itertools.cycle(cuts or [len(data) or 1]):
        if not data:
            break
        chunks.append(data[:cut])
        data = data[cut:]
    _feed_hostile(server, chunks, eof)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(1, 2**63 - 1), unique=True, min_size=1, max_size=20),
    cuts=st.lists(st.integers(1, 30), min_size=1, max_size=10),
)
def test_any_chunking_gives_the_same_messages(ids: list[int], cuts: list[int]) -> None:
    client, server = open_pair()
    sent = [Get(i, f"/app/{i}", None) for i in ids]
    data = b"".join(client.send(m) for m in sent)
    got: list[Event] = []
    for cut in itertools.cycle(cuts):
        if not data:
            break
        got.extend(e for e in events(server, data[:cut]) if e is not NEED_DATA)
        data = data[cut:]
    assert got == sent
    assert server.in_flight == len(ids)
