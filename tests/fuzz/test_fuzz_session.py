"""Fuzzing ClientSessionActor's input half with hostile byte streams.

Each example starts a session actor on a socket pair, with a recording
stand-in for the registry (as ``tests/test_session.py`` does), and plays the
reader thread itself: it calls the actor's ``_on_data`` with the stream cut
into reads at arbitrary points. The property:

* ``_on_data`` never raises, and returns False exactly for the read that
  ended the connection (a protocol error or end of stream);
* every request and notice decoded before that reaches the registry, in
  order, and nothing else does;
* a protocol error makes the actor send exactly one connection-level
  ``ErrorReply(0, "ProtocolError", <the reason>)`` and close the socket; a
  clean end closes it with no error frame; either way the registry hears
  ``ClientDetached`` once, last;
* the actor stops, never fails, and nothing is logged at ERROR (the
  session's "internal error" path means a bug).

What is expected comes from a plain server-role Connection fed the same
reads (the session's own limits, and its answer to a hello). After a read
that carried a hello, the fuzz client waits for the server's answer before
it sends more, as the protocol requires: whatever came in the same read as
the hello is the client's mistake (and tested), but what comes in later
reads would otherwise race with the Welcome.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from session_rig import CLIENT_ID, WAIT, capture_errors, running_session
from wire_strategies import (
    CLIENT_TAGS,
    MAX_ID,
    chunk_sizes,
    cut,
    frame,
    hello_frame,
    hostile_streams,
    server_recursion_limit,
    valid_messages,
    valid_values,
)

from actorpool.errors import RemoteProtocolError
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientDetached,
    ClientRequest,
    Done,
    ErrorReply,
    Hello,
    Request,
    SessionGranted,
    StatisticsReply,
    Welcome,
    WireMessage,
    encode,
)
from actorpool.protocol import (
    MAX_REQUEST_FRAME,
    NEED_DATA,
    PEER_CLOSED,
    Connection,
    Role,
)
from actorpool.testing import Barrier, take

# --- what should happen -------------------------------------------------------------


@dataclasses.dataclass
class Expected:
    """What the session should do with a list of reads."""

    returns: list[bool] = dataclasses.field(default_factory=list)
    """``_on_data``'s answer to each read fed (feeding stops at the end)."""
    waits: list[bool] = dataclasses.field(default_factory=list)
    """Per read: it carried a hello the server welcomes, so the client waits."""
    requests: list[WireMessage] = dataclasses.field(default_factory=list)
    welcomed: bool = False
    error: str | None = None
    """Text of the connection-level error the client should get, if any."""


def refusal(version: int) -> str:
    """The session's text for a hello with another protocol version."""
    return (
        f"protocol version {version} is not supported "
        f"(this server speaks {PROTOCOL_VERSION})"
    )


def expect(reads: list[bytes]) -> Expected:
    """Run the reads through a plain Connection, answering a hello as the actor does.

    ``_on_data`` decodes a whole read before the actor answers a hello in it,
    so whatever follows the hello in that read meets a connection that still
    waits to send its Welcome: a protocol error, which the actor reports
    instead of the Welcome. A refused hello's refusal goes first, though.
    """
    conn = Connection(Role.SERVER, max_frame_size=MAX_REQUEST_FRAME)
    expected = Expected()
    for data in reads:
        conn.receive_data(data)
        hello = None
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if event is PEER_CLOSED:
                    expected.returns.append(False)
                    return expected
                if isinstance(event, Hello):
                    hello = event
                else:
                    assert isinstance(event, WireMessage)
                    expected.requests.append(event)
        except RemoteProtocolError as exc:
            expected.returns.append(False)
            if hello is not None and hello.version != PROTOCOL_VERSION:
                expected.error = refusal(hello.version)
            else:
                expected.error = str(exc)
            return expected
        expected.returns.append(True)
        welcome = hello is not None and hello.version == PROTOCOL_VERSION
        expected.waits.append(welcome)
        if hello is not None and not welcome:
            expected.error = refusal(hello.version)
            return expected
        if welcome:
            conn.send(Welcome(PROTOCOL_VERSION, os.getpid(), CLIENT_ID))
            expected.welcomed = True
    return expected


# --- running it ---------------------------------------------------------------------


def check_session(reads: list[bytes]) -> Expected:
    """Feed ``reads`` to a fresh session and check it did what ``expect`` says."""
    with server_recursion_limit():
        expected = expect(reads)
    with capture_errors() as errors, running_session() as rig:
        for data, answer, wait in zip(
            reads, expected.returns, [*expected.waits, False], strict=False
        ):
            with server_recursion_limit():
                answer_given = rig.on_data(data)
            assert answer_given is answer
            if wait:  # as a client must, before it sends anything more
                assert isinstance(rig.client.next_frame(), Welcome)
        if expected.returns[-1:] == [True] and expected.error is None:
            rig.actor.stop()  # still open after the last read: the server ends it
        assert rig.done.wait(WAIT), "the session actor did not stop"

        frames = rig.client.until_closed()
        want: list[WireMessage] = []
        if expected.welcomed:
            want.append(Welcome(PROTOCOL_VERSION, os.getpid(), CLIENT_ID))
        if expected.error is not None:
            want.append(ErrorReply(0, "ProtocolError", expected.error))
        assert frames == want

        for request in expected.requests:
            assert take(rig.reports, ClientRequest, WAIT) == ClientRequest(
                CLIENT_ID, request
            )
        assert take(rig.reports, ClientDetached, WAIT).client_id == CLIENT_ID
        rig.registry.ask(Barrier(), timeout=WAIT)
        assert rig.reports.empty(), rig.reports.get_nowait()
        assert not rig.failures
    assert not errors.records, errors.messages
    return expected


# --- the tests ----------------------------------------------------------------------


@pytest.mark.parametrize("handshake", [True, False], ids=["after-hello", "raw"])
@settings.get_profile("fuzz-session")
@given(data=st.data(), sizes=chunk_sizes, eof=st.booleans())
def test_a_session_takes_any_stream_and_ends_cleanly(
    handshake: bool,
    data: st.DataObject,
    sizes: list[int],
    eof: bool,
) -> None:
    stream = data.draw(hostile_streams(MAX_REQUEST_FRAME), label="stream")
    if handshake:
        pid = data.draw(st.integers(0, MAX_ID), label="pid")
        stream = hello_frame(PROTOCOL_VERSION, pid) + stream
    reads = cut(stream, sizes)
    if eof:
        reads.append(b"")
    if reads:
        check_session(reads)


@st.composite
def client_scripts(draw: st.DrawFn) -> list[WireMessage]:
    """Valid requests and notices, with request ids unique (nothing is answered)."""
    script = []
    ids: set[int] = set()
    for message in draw(st.lists(valid_messages(CLIENT_TAGS[1:]), max_size=20)):
        if isinstance(message, Request):
            if message.request_id == 0 or message.request_id in ids:
                continue
            ids.add(message.request_id)
        script.append(message)
    return script


@settings.get_profile("fuzz-session")
@given(script=client_scripts(), sizes=chunk_sizes, data=st.data())
def test_a_valid_conversation_reaches_the_registry_and_back(
    script: list[WireMessage], sizes: list[int], data: st.DataObject
) -> None:
    """Every request reaches the registry as sent; every reply reaches the client."""
    hello = cut(frame(encode(Hello(PROTOCOL_VERSION, 1))), sizes)
    reads = cut(b"".join(frame(encode(m)) for m in script), sizes)
    with capture_errors() as errors, running_session() as rig:
        for read in hello:
            assert rig.on_data(read) is True
        welcome = rig.client.next_frame()
        assert welcome == Welcome(PROTOCOL_VERSION, os.getpid(), CLIENT_ID)
        for read in reads:
            assert rig.on_data(read) is True
        for message in script:
            assert take(rig.reports, ClientRequest, WAIT).message == message

        # The registry answers some requests, in any order.
        pending = [m.request_id for m in script if isinstance(m, Request)]
        answered = data.draw(st.permutations(pending), label="answer order")
        answered = answered[: data.draw(st.integers(0, len(answered)), label="n")]
        replies: list[WireMessage] = []
        for request_id in answered:
            kind = data.draw(
                st.sampled_from([SessionGranted, StatisticsReply, Done, ErrorReply])
            )
            values = data.draw(valid_values((kind.TAG,)), label="reply")
            replies.append(kind(request_id, *values[2:]))
            rig.actor.tell(replies[-1])
        for reply in replies:
            assert rig.client.next_frame() == reply

        assert rig.on_data(b"") is False  # the client closes: a clean end
        assert rig.done.wait(WAIT)
        assert rig.client.until_closed()[len(replies) + 1 :] == []  # no error frame
        assert take(rig.reports, ClientDetached, WAIT).client_id == CLIENT_ID
        rig.registry.ask(Barrier(), timeout=WAIT)
        assert rig.reports.empty(), rig.reports.get_nowait()
        assert not rig.failures
    assert not errors.records, errors.messages
