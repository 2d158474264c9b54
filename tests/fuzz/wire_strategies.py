"""Shared pieces of the fuzz tests: hostile input, the wire spec, the checks.

The strategies here build what a hostile or broken client could put on the
socket: arbitrary bytes, arbitrary msgpack, and valid messages mangled at the
value level (wrong tag, wrong field types, huge ints, deep containers, strings
near the frame limit) and at the byte level (flips, truncation, insertion),
in frames whose length prefix may lie, cut into chunks at arbitrary points.

:data:`SPEC` restates the field types of ``docs/protocol.md`` independently of
``actorpool.messages``, so that the decoder is checked against the document
and not against itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgpack
from hypothesis import strategies as st

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    Clear,
    CloseSession,
    Done,
    ErrorReply,
    Get,
    GetStatistics,
    Hello,
    Request,
    RestartApp,
    SessionFailed,
    SessionGranted,
    SetMaxIdleTime,
    SetMaxPerApp,
    SetMaxPoolSize,
    StatisticsReply,
    Welcome,
    WireMessage,
)
from actorpool.protocol import (
    MAX_FRAME_SIZE,
    MAX_REQUEST_FRAME,
    NEED_DATA,
    PEER_CLOSED,
    Connection,
    Role,
)
from actorpool.protocol import State as ConnState

HEADER = 4
"""Bytes of the length prefix (``struct ">I"``)."""

MAX_ID = 2**63 - 1

# --- the spec, from docs/protocol.md ------------------------------------------------

SPEC: dict[int, tuple[type[WireMessage], tuple[str, ...]]] = {
    1: (Hello, ("int", "int")),
    2: (Welcome, ("int", "int", "int")),
    10: (Get, ("int", "str", "float?")),
    11: (GetStatistics, ("int",)),
    12: (Clear, ("int",)),
    13: (SetMaxPoolSize, ("int", "int")),
    14: (SetMaxPerApp, ("int", "int")),
    15: (SetMaxIdleTime, ("int", "float")),
    16: (RestartApp, ("int", "str")),
    20: (CloseSession, ("int",)),
    21: (SessionFailed, ("int",)),
    30: (SessionGranted, ("int", "int", "int", "str", "str")),
    31: (StatisticsReply, ("int", "map")),
    32: (Done, ("int",)),
    33: (ErrorReply, ("int", "str", "str", "str")),
}
"""Tag -> (class, wire field types), as the protocol document's table says."""

CLIENT_TAGS = (1, 10, 11, 12, 13, 14, 15, 16, 20, 21)
"""Tags a client may send (hello, requests, notices)."""


def spec_accepts(value: Any, kind: str, *, limit: int) -> bool:
    """Whether one unpacked field value has the documented wire type ``kind``."""
    if kind == "int":
        return type(value) is int and 0 <= value <= MAX_ID
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)
    if kind == "float?":
        return value is None or spec_accepts(value, "float", limit=limit)
    if kind == "str":
        return type(value) is str and within_limits(value, limit)
    if kind == "map":
        return type(value) is dict and within_limits(value, limit)
    raise AssertionError(kind)


def within_limits(value: Any, limit: int) -> bool:
    """Whether the unpacker's documented limits let ``value`` through.

    The document's "msgpack limits" row: strings up to the frame limit,
    arrays up to ``min(limit, 1024)`` elements, maps up to ``min(limit,
    65536)`` entries with string keys, no bin or ext values. As implemented,
    an *empty* bin or ext passes (``max_bin_len=0`` allows length 0). Only a
    StatisticsReply's map can carry one, and ``PoolStatistics.from_dict``
    refuses it, so here the oracle follows the implementation.
    """
    if isinstance(value, str):
        return len(value.encode()) <= limit
    if isinstance(value, bytes):
        return value == b""
    if isinstance(value, msgpack.Timestamp):
        return False  # an ext of 4, 8 or 12 bytes
    if isinstance(value, msgpack.ExtType):
        return value.data == b""
    if isinstance(value, list | tuple):
        return len(value) <= min(limit, 1024) and all(
            within_limits(v, limit) for v in value
        )
    if isinstance(value, dict):
        return len(value) <= min(limit, 65536) and all(
            (type(k) is str or k == b"")
            and within_limits(k, limit)
            and within_limits(v, limit)
            for k, v in value.items()
        )
    return True


def spec_decode(value: Any, *, limit: int) -> WireMessage | None:
    """The message ``value`` encodes per the document, or None if it is none.

    ``value`` is what was packed into a body; ``limit`` is the receiver's
    frame limit, which the unpacker's limits follow.
    """
    if type(value) not in (list, tuple) or not value or type(value[0]) is not int:
        return None
    if len(value) > min(limit, 1024):
        return None
    entry = SPEC.get(value[0])
    if entry is None:
        return None
    cls, kinds = entry
    fields = value[1:]
    if len(fields) != len(kinds) or not all(
        spec_accepts(v, k, limit=limit) for v, k in zip(fields, kinds, strict=True)
    ):
        return None
    return cls(
        *(
            float(v) if k.startswith("float") and v is not None else v
            for v, k in zip(fields, kinds, strict=True)
        )
    )


def frame(body: bytes) -> bytes:
    """``body`` behind a truthful length prefix."""
    return struct.pack(">I", len(body)) + body


def pack(value: Any) -> bytes:
    """msgpack bytes of ``value``, as a peer's msgpack library would send them."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return body


def cut(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``data`` in chunks of the given sizes, cycled: how reads may split a stream."""
    chunks = []
    start = 0
    for size in itertools.cycle(sizes or [len(data) or 1]):
        if start >= len(data):
            break
        chunks.append(data[start : start + size])
        start += size
    return chunks


# --- values -------------------------------------------------------------------------

INT_EDGES = (0, 1, 2**31 - 1, 2**32, MAX_ID, MAX_ID + 1, 2**64 - 1, -1, -(2**63))
"""Integers where a range check or an encoding width changes."""

ints = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(INT_EDGES)
"""Every integer msgpack can carry."""

floats = st.floats() | st.floats(width=32)
"""Every float, NaN and infinities included."""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    st.text(max_size=20),
    st.binary(max_size=12),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6)),
    st.builds(
        msgpack.Timestamp, st.integers(-(2**40), 2**40), st.integers(0, 10**9 - 1)
    ),
)
"""Every msgpack type, including the ones decode() must refuse (bin, ext)."""

map_keys = st.text(max_size=8) | st.binary(max_size=4) | ints | st.booleans()

msgpack_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(map_keys, inner, max_size=4)
    ),
    max_leaves=10,
)
"""Arbitrary msgpack-able values of random shapes."""

_finite = st.floats(allow_nan=False, allow_infinity=False)
_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | _finite | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)

VALID_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(0, MAX_ID) | st.sampled_from([0, 1, MAX_ID]),
    "float": _finite,
    "float?": st.none() | _finite,
    "str": st.text(max_size=24),
    "map": st.dictionaries(st.text(max_size=10), _json_like, max_size=4),
}
"""Values each documented field type accepts (floats as floats: they round-trip)."""


@st.composite
def valid_values(draw: st.DrawFn, tags: Sequence[int] = tuple(SPEC)) -> list[Any]:
    """``[tag, field, ...]`` of a valid message with one of ``tags``."""
    tag = draw(st.sampled_from(tags))
    return [tag, *(draw(VALID_FIELD[kind]) for kind in SPEC[tag][1])]


def valid_messages(tags: Sequence[int] = tuple(SPEC)) -> st.SearchStrategy[WireMessage]:
    """Valid wire messages with one of ``tags``."""
    return valid_values(tags).map(lambda v: SPEC[v[0]][0](*v[1:]))


# --- mutations ----------------------------------------------------------------------

INTERESTING_BYTES = (
    0x00,
    0x7F,
    0x80,  # fixmap 0
    0x90,  # fixarray 0
    0x9F,  # fixarray 15
    0xA0,  # fixstr 0
    0xC0,  # nil
    0xC1,  # never used
    0xC2,  # false
    0xC3,  # true
    0xC4,  # bin 8
    0xC6,  # bin 32
    0xC9,  # ext 32
    0xCA,  # float 32
    0xCB,  # float 64
    0xCF,  # uint 64
    0xD3,  # int 64
    0xD4,  # fixext 1
    0xDB,  # str 32
    0xDD,  # array 32
    0xDF,  # map 32
    0xE0,  # negative fixint -32
    0xFF,
)
"""Type bytes that start a different msgpack value (or none at all)."""

DEEP_DEPTHS = st.integers(1, 1100)
"""Nesting depths to try, past msgpack's own limit (1023) too.

Around 1000 deep, Python 3.11's repr() of the value recursed too deep (error
messages quoted it), until decode() quoted with reprlib; see
``test_fuzz_regressions.py``.
"""


_PLACEHOLDER = "\x00actorpool-fuzz-placeholder\x00"


def nested_bytes(depth: int, kind: str, leaf: bytes) -> bytes:
    """msgpack of ``leaf`` wrapped ``depth`` times in one-element arrays or maps.

    Written byte by byte: msgpack's packer refuses to nest this deep.
    """
    opener = b"\x91" if kind == "list" else b"\x81\xa1k"  # [x] or {"k": x}
    return opener * depth + leaf


def long_string_values(values: list[Any], index: int, target: int) -> list[Any]:
    """``values`` with field ``index`` a string so the body is ``target`` bytes.

    Built, not drawn: Hypothesis draws are a few KB at most, and the limits
    under test are 64 KiB and 1 MiB. Exact where msgpack's str header allows
    (it grows at 32, 256 and 65536 bytes), else the nearest size above.
    """
    values = list(values)
    values[index] = ""
    base = len(pack(values))
    for extra_header in (0, 1, 2, 4):
        size = max(0, target - base - extra_header)
        values[index] = "a" * size
        if len(pack(values)) >= target:
            break
    return values


UNKNOWN = object()
"""A body's value when it was not made by packing one (so no oracle)."""


@dataclasses.dataclass(frozen=True)
class Body:
    """A frame body and, when it was packed from one, the value it encodes."""

    data: bytes
    value: Any = UNKNOWN


MUTATIONS = (
    "none",
    "retag",
    "field",
    "huge int",
    "drop field",
    "add field",
    "deep",
    "long string",
    "not a list",
)


@st.composite
def mutated_messages(draw: st.DrawFn, limit: int) -> Body:
    """A valid message, broken (or not) at the value level."""
    how = draw(st.sampled_from(MUTATIONS))
    if how == "long string":
        # Get and RestartApp (server-bound) and ErrorReply carry strings.
        values = draw(valid_values((10, 16, 33)))
        index = draw(st.sampled_from([2, 2, 1]))  # mostly the string field
        values = long_string_values(values, index, limit + draw(st.integers(-3, 3)))
        return Body(pack(values), values)
    if how == "not a list":
        value = draw(msgpack_values)
        return Body(pack(value), value)
    values = draw(valid_values())
    index = draw(st.integers(0, len(values) - 1))
    if how == "retag":
        values[0] = draw(
            st.sampled_from(tuple(SPEC)) | st.integers(-5, 300) | msgpack_values
        )
    elif how == "field":
        values[index] = draw(msgpack_values)
    elif how == "huge int":
        values[index] = draw(st.sampled_from(INT_EDGES) | ints)
    elif how == "drop field":
        del values[index]
    elif how == "add field":
        values.insert(index, draw(msgpack_values))
    elif how == "deep":
        values[index] = _PLACEHOLDER
        deep = nested_bytes(
            draw(DEEP_DEPTHS),
            draw(st.sampled_from(["list", "map"])),
            pack(draw(scalars)),
        )
        return Body(pack(values).replace(pack(_PLACEHOLDER), deep))
    return Body(pack(values), values)


@st.composite
def mutated_bytes(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` broken (or not) at the byte level."""
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"])
        )
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif how == "set" and data:
            data[pos] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        elif how == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif how == "truncate":
            del data[pos:]
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def hostile_bodies(draw: st.DrawFn, limit: int) -> bytes:
    """A frame body: random bytes, random msgpack, or a mangled message."""
    kind = draw(st.sampled_from(["bytes", "msgpack", "message", "message"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "msgpack":
        return pack(draw(msgpack_values))
    return draw(mutated_bytes(draw(mutated_messages(limit)).data))


@st.composite
def hostile_frames(draw: st.DrawFn, limit: int) -> bytes:
    """One frame, usually with a truthful length prefix, sometimes lying."""
    body = draw(hostile_bodies(limit))
    header = draw(
        st.sampled_from(["true", "true", "true", "short", "long", "oversized", "zero"])
    )
    if header == "true":
        return frame(body)
    if header == "short":
        size = max(0, len(body) - draw(st.integers(1, 8)))
    elif header == "long":
        size = len(body) + draw(st.integers(1, 8))
    elif header == "oversized":
        size = draw(st.integers(limit + 1, 2**32 - 1) | st.sampled_from([limit + 1]))
    else:
        size = 0
    return struct.pack(">I", size) + body


@st.composite
def hostile_streams(draw: st.DrawFn, limit: int) -> bytes:
    """What a hostile client writes after (or instead of) its hello."""
    kind = draw(st.sampled_from(["bytes", "frames", "valid then bad"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    frames = draw(st.lists(hostile_frames(limit), min_size=1, max_size=4))
    if kind == "valid then bad":
        good = draw(st.lists(valid_values(CLIENT_TAGS[1:]), max_size=4))
        frames = [frame(pack(values)) for values in good] + frames
    return b"".join(frames)


chunk_sizes = st.lists(
    st.integers(1, 16) | st.integers(1, 4096), min_size=1, max_size=12
)
"""How reads split a stream: cycled over the whole of it."""

frame_limits = st.sampled_from([MAX_REQUEST_FRAME, MAX_FRAME_SIZE]) | st.integers(
    1, 300
)
"""A receiver's frame limit: the real ones, and small ones that bring every
boundary within reach of a few hundred bytes."""


def hello_frame(version: int = PROTOCOL_VERSION, pid: int = 1) -> bytes:
    """A hello as a client sends it."""
    return frame(pack([1, version, pid]))


# --- the property -------------------------------------------------------------------


FREE_FRAMES = 980
"""Stack frames left to actorpool's code on the server's reader thread.

CPython's default recursion limit is 1000, and the reader calls the session
from about a dozen frames down (thread start, the pykka loop, the poll).
"""


@contextlib.contextmanager
def server_recursion_limit() -> Iterator[None]:
    """Give the code under test the stack room it has in the server, no more.

    Hypothesis raises the recursion limit while a test runs, to leave room
    for its own machinery; that would hide a RecursionError the server meets
    (a deeply nested msgpack value, say). Counting from the current depth,
    rather than setting the default limit, makes the room the same however
    deep the test runs, so a failure is not flaky when Hypothesis replays it.
    """
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + FREE_FRAMES)
    try:
        yield
    finally:
        sys.setrecursionlimit(saved)


@dataclasses.dataclass
class Outcome:
    """How a connection took a stream of bytes."""

    events: list[WireMessage]
    """Messages decoded, in order."""
    end: str
    """``open`` (wants more), ``closed`` (clean end) or ``error``."""
    error: str = ""
    """The RemoteProtocolError's text, for ``error``."""


SERVER_BOUND = (Hello, Request, CloseSession, SessionFailed)


def feed(conn: Connection, chunks: Iterable[bytes], *, eof: bool) -> Outcome:
    """Feed ``chunks`` (then end of stream, with ``eof``) and check every step.

    The property: ``next_event`` gives messages until ``NEED_DATA`` or
    ``PEER_CLOSED``, or raises RemoteProtocolError, never anything else;
    after that error the connection is in ``ERROR``, holds nothing, drops
    further bytes and keeps raising. While waiting for data it never holds
    more than one frame's header and body. Any other exception propagates
    and fails the test.
    """
    with server_recursion_limit():
        return _feed(conn, chunks, eof=eof)


def _feed(conn: Connection, chunks: Iterable[bytes], *, eof: bool) -> Outcome:
    limit = conn.max_frame_size
    events: list[WireMessage] = []
    ended = False
    for chunk in [*chunks, b""] if eof else chunks:
        ended = not chunk
        before = conn.buffered
        conn.receive_data(chunk)
        assert conn.buffered <= before + len(chunk)
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if event is PEER_CLOSED:
                    assert conn.state is ConnState.CLOSED
                    assert conn.buffered == 0
                    assert conn.next_event() is PEER_CLOSED
                    return Outcome(events, "closed")
                assert isinstance(event, WireMessage), event
                if conn.role is Role.SERVER:
                    assert isinstance(event, SERVER_BOUND), event
                assert conn.in_flight <= conn.max_in_flight
                events.append(event)
        except RemoteProtocolError as exc:
            check_failed(conn, more_data=not ended)
            return Outcome(events, "error", str(exc))
        # Waiting for data: at most one incomplete frame is held.
        assert conn.buffered < HEADER + limit
    return Outcome(events, "open")


def check_failed(conn: Connection, *, more_data: bool = True) -> None:
    """A connection after a RemoteProtocolError: inert, and says so every time.

    With ``more_data`` (the peer has not closed), bytes that keep coming are
    dropped, not kept.
    """
    assert conn.state is ConnState.ERROR
    assert conn.buffered == 0
    if more_data:
        conn.receive_data(b"\x00\x00\x00\x02\x91\x0b more bytes from the peer")
        assert conn.buffered == 0
    for _ in range(2):
        try:
            conn.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("next_event() did not raise after a protocol error")
    if conn.role is Role.SERVER:
        try:
            conn.send(Done(1))
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("sent an ordinary reply after a protocol error")
        assert conn.send_protocol_error("bye")[:HEADER] != b"\x00" * HEADER
        assert conn.state is ConnState.CLOSED
