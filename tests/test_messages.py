"""Wire messages: round trips, and untrusted bytes that must be refused."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actorpool import messages
from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    Category,
    Done,
    Get,
    Hello,
    Request,
    StatisticsReply,
    WireMessage,
    decode,
    encode,
)

MAX = 1 << 20

WIRE_CLASSES: list[type[WireMessage]] = sorted(
    (
        obj
        for name, obj in vars(messages).items()
        if not name.startswith("_")
        and isinstance(obj, type)
        and issubclass(obj, WireMessage)
        and "TAG" in vars(obj)
    ),
    key=lambda cls: cls.TAG,
)


def hints(cls: type[Any]) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    all_hints = typing.get_type_hints(cls)
    return {name: all_hints[name] for name in names}


SAMPLE: dict[Any, Any] = {
    int: 7,
    float: 1.5,
    float | None: 2.5,
    str: "/srv/app",
    dict[str, Any]: {"count": 1, "apps": [{"app_root": "/a"}], "f": 0.5},
}


def sample(cls: type[WireMessage], **overrides: Any) -> WireMessage:
    values = {name: SAMPLE[hint] for name, hint in hints(cls).items()}
    values.update(overrides)
    return cls(**values)


def raw(cls: type[WireMessage], values: list[Any]) -> bytes:
    return msgpack.packb([cls.TAG, *values], use_bin_type=True)  # type: ignore[no-any-return]


def sample_values(cls: type[WireMessage]) -> list[Any]:
    return [SAMPLE[hint] for hint in hints(cls).values()]


def test_every_wire_class_is_found_and_registered() -> None:
    # Every tag is unique, every category is used, and decode knows each class.
    tags = [cls.TAG for cls in WIRE_CLASSES]
    assert len(tags) == len(set(tags))
    assert {cls.CATEGORY for cls in WIRE_CLASSES} == set(Category)
    assert set(WIRE_CLASSES) == set(messages._BY_TAG.values())
    assert len(WIRE_CLASSES) >= 15


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[WireMessage]) -> None:
    message = sample(cls)
    body = encode(message)
    back = decode(body, max_size=MAX)
    assert back == message
    assert type(back) is cls
    assert msgpack.unpackb(body)[0] == cls.TAG


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda c: c.__name__)
def test_messages_are_immutable_and_documented(cls: type[WireMessage]) -> None:
    message = sample(cls)
    assert cls.__doc__
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, field.name, getattr(message, field.name))


def _strategy(hint: Any) -> st.SearchStrategy[Any]:
    ids = st.integers(0, 2**63 - 1)
    finite = st.floats(allow_nan=False, allow_infinity=False)
    json = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | finite
        | st.text(),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=10,
    )
    return {
        int: ids,
        float: finite,
        float | None: st.none() | finite,
        str: st.text(),
        dict[str, Any]: st.dictionaries(st.text(max_size=8), json, max_size=4),
    }[hint]


@st.composite
def any_message(draw: st.DrawFn) -> WireMessage:
    cls = draw(st.sampled_from(WIRE_CLASSES))
    values = {name: draw(_strategy(hint)) for name, hint in hints(cls).items()}
    return cls(**values)


@settings(max_examples=300, deadline=None)
@given(any_message())
def test_round_trip_any_field_values(message: WireMessage) -> None:
    assert decode(encode(message), max_size=MAX) == message


def test_int_timeout_decodes_as_float() -> None:
    back = decode(raw(Get, [1, "/a", 5]), max_size=MAX)
    assert back == Get(1, "/a", 5.0)
    assert isinstance(back, Get)
    assert type(back.timeout) is float


def test_optional_timeout_none_round_trips() -> None:
    assert decode(encode(Get(3, "/a")), max_size=MAX) == Get(3, "/a", None)


# --- wrong field values -------------------------------------------------------

BAD_VALUES: dict[Any, list[Any]] = {
    int: [True, False, -1, -(2**63), 2**63, 2**64 - 1, 1.0, "1", None, [1], {"a": 1}],
    float: [True, "1.5", None, math.nan, math.inf, -math.inf, [1.0], {"a": 1.0}],
    float | None: [True, "1.5", math.nan, math.inf, -math.inf, [1.0]],
    str: [1, True, None, 1.5, ["a"], {"a": "b"}, b"bytes"],
    dict[str, Any]: [[], "map", 1, None, True, [["a", 1]]],
}

BAD_FIELD_CASES = [
    pytest.param(cls, index, bad, id=f"{cls.__name__}.{name}={bad!r}")
    for cls in WIRE_CLASSES
    for index, (name, hint) in enumerate(hints(cls).items())
    for bad in BAD_VALUES[hint]
]


@pytest.mark.parametrize(("cls", "index", "bad"), BAD_FIELD_CASES)
def test_wrong_field_value_is_refused(
    cls: type[WireMessage], index: int, bad: Any
) -> None:
    values = sample_values(cls)
    values[index] = bad
    with pytest.raises(RemoteProtocolError):
        decode(raw(cls, values), max_size=MAX)


@pytest.mark.parametrize(("cls", "index", "bad"), BAD_FIELD_CASES)
def test_encode_refuses_what_decode_would_refuse(
    cls: type[WireMessage], index: int, bad: Any
) -> None:
    # A bad message fails at the sender, not by closing the peer's connection.
    values = sample_values(cls)
    values[index] = bad
    with pytest.raises(LocalProtocolError):
        encode(cls(*values))


def test_encode_refuses_a_map_key_that_is_not_a_string() -> None:
    body = raw(StatisticsReply, [1, {1: 2}])
    with pytest.raises(RemoteProtocolError):
        decode(body, max_size=MAX)


def test_encode_refuses_a_message_that_is_not_on_the_wire() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Request(1))


def test_encode_refuses_unpackable_statistics() -> None:
    with pytest.raises(LocalProtocolError):
        encode(StatisticsReply(1, {"x": object()}))


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda c: c.__name__)
def test_extra_field_is_refused(cls: type[WireMessage]) -> None:
    with pytest.raises(RemoteProtocolError, match="fields"):
        decode(raw(cls, [*sample_values(cls), 1]), max_size=MAX)


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda c: c.__name__)
def test_missing_field_is_refused(cls: type[WireMessage]) -> None:
    values = sample_values(cls)
    assert values, "every wire message has at least one field"
    with pytest.raises(RemoteProtocolError, match="fields"):
        decode(raw(cls, values[:-1]), max_size=MAX)


def test_defaulted_fields_are_still_required_on_the_wire() -> None:
    # Get.timeout has a default in Python, but the wire always carries it.
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb([Get.TAG, 1, "/a"]), max_size=MAX)


# --- malformed frames ---------------------------------------------------------


@pytest.mark.parametrize(
    "tag", [0, 3, 9, 99, 255, 2**40, -1, "1", None, 1.0, True, [1], {"t": 1}]
)
def test_unknown_tag_is_refused(tag: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb([tag, 1, 2]), max_size=MAX)


@pytest.mark.parametrize(
    "value", [1, "hello", None, True, 1.5, {"tag": 1}, [], b"\x01"]
)
def test_non_array_frame_is_refused(value: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb(value, use_bin_type=True), max_size=MAX)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # an array of two that ends after one
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
        b"\xdb\xff\xff\xff\xff",  # a string claiming 4 GiB
        b"\x91" * 100_000 + b"\x90",  # nested far too deep
        b"\x92\x0a\xd4\x01\x00",  # an ext type
    ],
    ids=["empty", "c1", "short-array", "huge-array", "huge-str", "deep", "ext"],
)
def test_undecodable_bytes_are_refused(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(body, max_size=MAX)


def test_truncated_message_is_refused() -> None:
    body = encode(Get(1, "/srv/app", 3.0))
    for end in range(len(body)):
        with pytest.raises(RemoteProtocolError):
            decode(body[:end], max_size=MAX)


@pytest.mark.parametrize("trailer", [b"\x00", b"\xc0", encode(Done(1))])
def test_trailing_data_is_refused(trailer: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(encode(Done(1)) + trailer, max_size=MAX)


def test_string_over_max_size_is_refused() -> None:
    body = encode(Get(1, "x" * 100))
    assert decode(body, max_size=200) == Get(1, "x" * 100)
    with pytest.raises(RemoteProtocolError):
        decode(body, max_size=50)


def test_hello_fields() -> None:
    assert decode(encode(Hello(messages.PROTOCOL_VERSION, 42)), max_size=MAX) == Hello(
        messages.PROTOCOL_VERSION, 42
    )


# --- fuzz ---------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_remote_protocol_error(body: bytes) -> None:
    try:
        message = decode(body, max_size=1024)
    except RemoteProtocolError:
        return
    assert isinstance(message, WireMessage)


_ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=4) | st.integers(-(2**63), 2**63 - 1), inner, max_size=3
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([cls.TAG for cls in WIRE_CLASSES]),
    st.lists(_ANY_VALUE, max_size=6),
)
def test_known_tag_with_random_fields_only_raises_remote_protocol_error(
    tag: int, values: list[Any]
) -> None:
    body = msgpack.packb([tag, *values], use_bin_type=True)
    try:
        message = decode(body, max_size=1024)
    except RemoteProtocolError:
        return
    assert tag == type(message).TAG
    assert decode(encode(message), max_size=1024) == message
