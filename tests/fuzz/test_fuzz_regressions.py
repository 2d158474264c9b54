"""Defects the fuzzing found, each as its smallest failing input.

All three were fixed in 4b0258a; these keep them fixed. The fuzz tests cover
the same ground at random, but a plain test says at once which one is back.
"""

from __future__ import annotations

import os

import pytest
from session_rig import CLIENT_ID, WAIT, capture_errors, running_session
from wire_strategies import frame, hello_frame

from actorpool.errors import LocalProtocolError, RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientDetached,
    ErrorReply,
    GetStatistics,
    Hello,
    StatisticsReply,
    Welcome,
    encode,
)
from actorpool.protocol import Connection, Role, State
from actorpool.statistics import AppStatistics, PoolStatistics, ProcessStatistics
from actorpool.testing import take

# --- 1. nested ~1000 deep: RecursionError, not a protocol error ---------------------
#
# decode() quoted the offending value in its error message with
# ``{value!r:.40}``: the repr was built in full before it was cut to 40
# characters. msgpack nests up to 1023 deep; on Python 3.11 the repr of a
# list or map nested more than ~990 deep (less on a deeper stack) raised
# RecursionError, which is not a RemoteProtocolError: it escaped
# next_event(), and the connection stayed in its state with the frame gone,
# as if it had never come. (3.12 and 3.13 count C recursion separately.) A
# session survived it only through its catch-all, which answered "internal
# error: RecursionError(...)" and logged a traceback. Hypothesis hides this
# kind of error (it raises the recursion limit while a test runs), hence
# ``server_recursion_limit`` in the fuzz tests.

NESTED = b"\x91" * 1000 + b"\x90"  # [[[ ... [] ... ]]]: 1000 arrays, 1001 bytes


@pytest.mark.parametrize(
    "body",
    [
        NESTED,  # the tag is a list 999 deep: "unknown message tag {tag!r:.40}"
        b"\x92\x0b" + NESTED,  # GetStatistics(request_id=<the same>): _check_int
    ],
    ids=["as-the-tag", "as-a-field"],
)
def test_a_value_nested_a_thousand_deep_is_a_protocol_error(body: bytes) -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(hello_frame())
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome(PROTOCOL_VERSION, 1, 1))
    conn.receive_data(frame(body))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR


# --- 2. a hello and a bad frame in one read: no error frame --------------------------
#
# _on_data decodes the whole read before the actor answers the hello, so the
# bad frame put the connection in ERROR first; then the actor's Welcome could
# not be sent (LocalProtocolError, logged at ERROR with a traceback) and
# _send hung up, which marked the session closing, so the HangUp carrying the
# protocol error was dropped. The client got an end of stream and no
# ErrorReply saying why. A client that sends its first request without
# waiting for the Welcome hit this whenever both writes came in one read.


@pytest.mark.parametrize(
    "after_hello",
    [
        b"\x00\x00\x00\x00",  # an empty frame: the smallest bad input
        frame(encode(GetStatistics(1))),  # a request sent before the Welcome
    ],
    ids=["empty-frame", "pipelined-request"],
)
def test_a_bad_frame_in_the_hellos_read_still_gets_its_error_reply(
    after_hello: bytes,
) -> None:
    with capture_errors() as errors, running_session() as rig:
        assert rig.on_data(hello_frame() + after_hello) is False
        assert take(rig.reports, ClientDetached, WAIT).client_id == CLIENT_ID
        frames = rig.client.until_closed()
    # Answered or not, the client must hear why it is cut off, and the
    # server must not log its own error for the client's mistake.
    assert frames, "the client was cut off without a word"
    assert isinstance(frames[-1], ErrorReply), frames
    assert (frames[-1].request_id, frames[-1].kind) == (0, "ProtocolError")
    assert frames[:-1] in ([], [Welcome(PROTOCOL_VERSION, os.getpid(), CLIENT_ID)])
    assert not errors.records, errors.messages


# --- 3. statistics that encode() sends and the client cannot decode ------------------
#
# encode() promises to refuse (LocalProtocolError) any message the peer would
# refuse, but StatisticsReply's map is only checked to be a dict, while the
# client's decode() capped arrays at 1024 elements. A snapshot with more than
# 1024 apps (apps with processes or waiting gets) or more than 1024 processes
# of one app made a reply that left the server fine and failed the client's
# whole ApplicationPool with RemoteProtocolError. Smallest input:
# StatisticsReply(1, {"apps": [0] * 1025}).


def test_statistics_of_a_large_pool_reach_the_client() -> None:
    process = ProcessStatistics(1, 4242, "ready", 0, 1, 0, 1.0, 1.0)
    apps = tuple(AppStatistics(f"/srv/{i}", 1, 0, 0, (process,)) for i in range(1025))
    stats = PoolStatistics(2000, 0, 1025, 0, 0, 1, apps)
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(Hello(PROTOCOL_VERSION, 1)))
    server.next_event()
    client.receive_data(server.send(Welcome(PROTOCOL_VERSION, 1, 1)))
    client.next_event()
    server.receive_data(client.send(GetStatistics(1)))
    server.next_event()

    try:
        data = server.send(StatisticsReply(1, stats.to_dict()))
    except LocalProtocolError:
        return  # refused on the sending side, as encode() promises: fine
    client.receive_data(data)
    reply = client.next_event()  # was RemoteProtocolError: 1025 > max_array_len
    assert isinstance(reply, StatisticsReply)
    assert PoolStatistics.from_dict(reply.statistics) == stats
