"""Fuzzing decode() and the sans-IO Connection (server role) with hostile bytes.

The properties, for any input:

* ``decode`` returns a wire message or raises RemoteProtocolError; a message
  it returns re-encodes, and decodes again to itself. When the body was
  packed from a known value, decode agrees with the protocol document
  (:func:`wire_strategies.spec_decode`): it accepts exactly what the
  document allows.
* ``Connection.next_event`` gives messages, ``NEED_DATA`` or ``PEER_CLOSED``,
  or raises RemoteProtocolError and stays failed; it never holds more than
  one frame's header and body while waiting, and refuses an oversized length
  prefix as soon as the prefix is in, before any of the body.
* How the stream is cut into reads changes nothing.
* A valid conversation decodes, in both directions, to exactly the messages
  sent, however it is cut.

Budgets come from ``conftest.py`` (``HYPOTHESIS_PROFILE=fuzz`` for the long run).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import (
    CLIENT_TAGS,
    HEADER,
    MAX_ID,
    SPEC,
    UNKNOWN,
    Body,
    chunk_sizes,
    cut,
    feed,
    frame,
    frame_limits,
    hello_frame,
    hostile_streams,
    long_string_values,
    msgpack_values,
    mutated_bytes,
    mutated_messages,
    pack,
    server_recursion_limit,
    spec_decode,
    valid_messages,
    valid_values,
)

from actorpool import messages
from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    Category,
    Done,
    ErrorReply,
    Get,
    Hello,
    Request,
    SessionGranted,
    StatisticsReply,
    Welcome,
    WireMessage,
    decode,
    encode,
)
from actorpool.protocol import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    Connection,
    Role,
    State,
)
from actorpool.session import MAX_REQUEST_FRAME


def same(a: object, b: object) -> bool:
    """Equal messages, NaN included (a StatisticsReply's map may carry one)."""
    return type(a) is type(b) and repr(a) == repr(b)


def check_decode(body: bytes, limit: int) -> WireMessage | None:
    """decode() ``body``: a message (checked to round-trip) or None if refused."""
    with server_recursion_limit():
        try:
            message = decode(body, max_size=limit)
        except RemoteProtocolError:
            return None
        assert type(message) in {cls for cls, _ in SPEC.values()}
        # What decode accepts, encode accepts, and it reads back the same.
        assert same(decode(encode(message), max_size=limit), message)
    return message


def test_the_spec_table_matches_the_messages() -> None:
    """SPEC restates docs/protocol.md; it must name the same tags and fields."""
    wire_classes = {
        obj
        for obj in vars(messages).values()
        if isinstance(obj, type) and issubclass(obj, WireMessage) and "TAG" in vars(obj)
    }
    assert {cls for cls, _ in SPEC.values()} == wire_classes
    for tag, (cls, kinds) in SPEC.items():
        assert tag == cls.TAG
        assert len(dataclasses.fields(cls)) == len(kinds)  # type: ignore[arg-type]
        client_bound = cls.CATEGORY in (Category.WELCOME, Category.REPLY)
        assert (tag in CLIENT_TAGS) is not client_bound


# --- decode() -----------------------------------------------------------------------


@settings.get_profile("fuzz-bytes")
@given(body=st.binary(max_size=300), limit=frame_limits)
def test_decode_takes_any_bytes(body: bytes, limit: int) -> None:
    check_decode(body, limit)


@settings.get_profile("fuzz-msgpack")
@given(value=msgpack_values, limit=frame_limits)
def test_decode_agrees_with_the_document_on_any_msgpack(value: Any, limit: int) -> None:
    assert same(check_decode(pack(value), limit), spec_decode(value, limit=limit))


@settings.get_profile("fuzz-mangled")
@given(data=st.data(), limit=frame_limits)
def test_decode_agrees_with_the_document_on_mangled_messages(
    data: st.DataObject, limit: int
) -> None:
    body: Body = data.draw(mutated_messages(limit), label="body")
    got = check_decode(body.data, limit)
    if body.value is not UNKNOWN:
        assert same(got, spec_decode(body.value, limit=limit))
    # The same message broken at the byte level: anything but a crash.
    check_decode(data.draw(mutated_bytes(body.data), label="bytes"), limit)


@settings.get_profile("fuzz-round-trip")
@given(message=valid_messages())
def test_valid_messages_round_trip(message: WireMessage) -> None:
    body = encode(message)
    assert same(decode(body, max_size=MAX_FRAME_SIZE), message)


# --- Connection ---------------------------------------------------------------------


def open_server(limit: int) -> Connection:
    """A server-role connection past the handshake."""
    server = Connection(Role.SERVER, max_frame_size=limit)
    server.receive_data(hello_frame())
    assert isinstance(server.next_event(), Hello)
    server.send(Welcome(PROTOCOL_VERSION, 1, 1))
    return server


@settings.get_profile("fuzz-stream")
@given(
    data=st.data(),
    limit=frame_limits,
    handshake=st.booleans(),
    sizes=chunk_sizes,
    eof=st.booleans(),
)
def test_connection_takes_any_stream_however_it_is_cut(
    data: st.DataObject, limit: int, handshake: bool, sizes: list[int], eof: bool
) -> None:
    if handshake:
        limit = max(limit, 16)  # room for the hello
    stream = data.draw(hostile_streams(limit), label="stream")

    def fresh() -> Connection:
        if handshake:
            return open_server(limit)
        return Connection(Role.SERVER, max_frame_size=limit)

    outcome = feed(fresh(), cut(stream, sizes), eof=eof)
    # Reads cut anywhere give what one read of the whole stream gives.
    assert feed(fresh(), [stream] if stream else [], eof=eof) == outcome


@settings.get_profile("fuzz-length-prefix")
@given(
    limit=frame_limits,
    size=st.just(0) | st.integers(1, 2**32 - 1),
    split=st.integers(0, HEADER),
    tail=st.binary(max_size=64),
    handshake=st.booleans(),
)
def test_an_oversized_length_prefix_is_refused_before_its_body(
    limit: int, size: int, split: int, tail: bytes, handshake: bool
) -> None:
    if handshake:
        limit = max(limit, 16)
    size = size if size == 0 else limit + size  # over the limit by 1 .. 2**32
    if size > 2**32 - 1:
        size = 2**32 - 1
    header = struct.pack(">I", size)
    conn = (
        open_server(limit)
        if handshake
        else Connection(Role.SERVER, max_frame_size=limit)
    )
    # (b"" would mean end of stream: every piece given here is non-empty.)
    if split:
        conn.receive_data(header[:split])
    if split < HEADER:
        assert conn.next_event() is NEED_DATA
        # The rest of the prefix, maybe with some of the body: refused at once.
        conn.receive_data(header[split:] + tail)
    with pytest.raises(RemoteProtocolError, match=f"frame of {size} bytes"):
        conn.next_event()
    assert conn.state is State.ERROR
    assert conn.buffered == 0
    conn.receive_data(tail or b"x")  # the rest of the body is not kept
    assert conn.buffered == 0
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@settings.get_profile("fuzz-large")
@given(
    limit=st.sampled_from([MAX_REQUEST_FRAME, MAX_FRAME_SIZE]),
    delta=st.integers(-3, 3),
    values=valid_values((10, 16)),
    first=st.integers(1, 8),
    sizes=st.lists(st.integers(4096, 1 << 20), min_size=1, max_size=4),
)
def test_a_frame_at_the_limit_passes_and_one_byte_over_does_not(
    limit: int, delta: int, values: list[Any], first: int, sizes: list[int]
) -> None:
    values[1] = max(values[1], 1)  # request id 0 is refused: not the point here
    values = long_string_values(values, 2, limit + delta)
    body = pack(values)
    conn = open_server(limit)
    data = frame(body)
    chunks = [data[:first], *cut(data[first:], sizes)]
    if len(body) <= limit:
        outcome = feed(conn, chunks, eof=False)
        assert outcome.end == "open"
        assert same(outcome.events, [spec_decode(values, limit=limit)])
        assert conn.buffered == 0
        return
    # Over the limit: refused by the first next_event() after the prefix is
    # in, without waiting for the body (the same read may bring some of it).
    received = 0
    for chunk in chunks:
        conn.receive_data(chunk)
        received += len(chunk)
        if received < HEADER:
            assert conn.next_event() is NEED_DATA
            continue
        with pytest.raises(RemoteProtocolError, match="frame of"):
            conn.next_event()
        break
    assert conn.buffered == 0


@settings.get_profile("fuzz-large")
@given(
    detail_size=st.integers(-3, 3),
    request_id=st.integers(1, MAX_ID),
    sizes=st.lists(st.integers(4096, 1 << 20), min_size=1, max_size=4),
)
def test_send_keeps_to_the_limit_every_peer_accepts(
    detail_size: int, request_id: int, sizes: list[int]
) -> None:
    """The server never sends a frame the client would refuse, at 1 MiB too."""
    values = long_string_values(
        [33, request_id, "SpawnError", "m", ""], 4, MAX_FRAME_SIZE + detail_size
    )
    reply = ErrorReply(*values[1:])
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(Hello(PROTOCOL_VERSION, 1)))
    server.next_event()
    client.receive_data(server.send(Welcome(PROTOCOL_VERSION, 1, 1)))
    assert isinstance(client.next_event(), Welcome)
    server.receive_data(client.send(Get(request_id, "/a")))
    server.next_event()
    try:
        data = server.send(reply)
    except LocalProtocolError:
        assert len(encode(reply)) > MAX_FRAME_SIZE
        assert server.in_flight == 1  # nothing changed
        return
    outcome = feed(client, cut(data, sizes), eof=False)
    assert outcome.events == [reply]


# --- valid conversations ------------------------------------------------------------


@dataclasses.dataclass
class Conversation:
    """What each side sends, in rounds: client messages, then server replies."""

    hello: Hello
    rounds: list[tuple[list[WireMessage], list[WireMessage]]]


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    """A valid exchange: requests with ids not in flight, replies to ids in flight."""
    hello = Hello(PROTOCOL_VERSION, draw(st.integers(0, MAX_ID)))
    in_flight: set[int] = set()
    rounds = []
    for _ in range(draw(st.integers(1, 3))):
        sent: list[WireMessage] = []
        for message in draw(st.lists(valid_messages(CLIENT_TAGS[1:]), max_size=6)):
            if isinstance(message, Request):
                if message.request_id == 0 or message.request_id in in_flight:
                    continue
                in_flight.add(message.request_id)
            sent.append(message)
        replies: list[WireMessage] = []
        for request_id in sorted(in_flight):
            if draw(st.booleans()):
                kind = draw(
                    st.sampled_from([SessionGranted, StatisticsReply, Done, ErrorReply])
                )
                values = draw(valid_values((kind.TAG,)))
                replies.append(kind(request_id, *values[2:]))
                in_flight.discard(request_id)
        rounds.append((sent, replies))
    return Conversation(hello, rounds)


@settings.get_profile("fuzz-conversation")
@given(
    conversation=conversations(),
    up=chunk_sizes,
    down=chunk_sizes,
)
def test_a_valid_conversation_decodes_to_what_was_sent(
    conversation: Conversation, up: list[int], down: list[int]
) -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    welcome = Welcome(PROTOCOL_VERSION, 2, 3)
    assert feed(server, cut(client.send(conversation.hello), up), eof=False).events == [
        conversation.hello
    ]
    assert feed(client, cut(server.send(welcome), down), eof=False).events == [welcome]
    for sent, replies in conversation.rounds:
        data = b"".join(client.send(message) for message in sent)
        got = feed(server, cut(data, up), eof=False)
        assert (got.end, got.events) == ("open", sent)
        data = b"".join(server.send(reply) for reply in replies)
        got = feed(client, cut(data, down), eof=False)
        assert got.end == "open"
        assert all(same(a, b) for a, b in zip(got.events, replies, strict=True))
        assert server.in_flight == client.in_flight
    assert feed(server, [], eof=True).end == "closed"
