"""ClientSessionActor over a real socket pair, with a stand-in registry.

The test holds the client end of the pair and speaks the protocol with a
client-side sans-IO :class:`~actorpool.protocol.Connection`; the registry is
a recording actor whose messages land in a queue the test reads with a
timeout.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pykka
import pytest

from actorpool import session as session_module
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientAttached,
    ClientDetached,
    ClientRequest,
    CloseSession,
    ErrorReply,
    Get,
    GetStatistics,
    Hello,
    SessionFailed,
    SessionGranted,
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
from actorpool.reader import SocketReader
from actorpool.session import (
    ClientProxy,
    ClientSessionActor,
    HangUp,
    Outbox,
)
from actorpool.testing import Barrier, Recorder, take

WAIT = 5.0
CLIENT_ID = 7


class Peer:
    """The client's end of the connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT)
        self.sock = sock
        self.conn = Connection(Role.CLIENT)

    def send(self, message: WireMessage) -> None:
        self.sock.sendall(self.conn.send(message))

    def receive(self) -> object:
        """The next message from the server, or ``PEER_CLOSED``."""
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def handshake(self) -> Welcome:
        self.send(Hello(PROTOCOL_VERSION, os.getpid()))
        welcome = self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def expect_protocol_error(self) -> ErrorReply:
        """A connection-level error, then the server closes."""
        error = self.receive()
        assert isinstance(error, ErrorReply), error
        assert (error.request_id, error.kind) == (0, "ProtocolError")
        assert self.receive() is PEER_CLOSED
        return error


@dataclasses.dataclass
class Rig:
    actor: pykka.ActorRef[Any]
    registry: pykka.ActorRef[Any]
    reports: queue.Queue[Any]
    peer: Peer
    ours: socket.socket
    done: threading.Event

    def quiet(self) -> None:
        """Assert that the registry was told nothing more."""
        if self.actor.is_alive():
            self.actor.ask(Barrier(), timeout=WAIT)
        self.registry.ask(Barrier(), timeout=WAIT)
        assert self.reports.empty(), self.reports.get_nowait()


class _Pausable(ClientSessionActor):
    """Told a threading.Event, it waits for it: lines up messages in its inbox.

    ``done`` is set once ``on_stop`` has run (``actor_stopped`` is set before).
    """

    def __init__(
        self,
        sock: socket.socket,
        client_id: int,
        registry: pykka.ActorRef[Any],
        done: threading.Event,
    ) -> None:
        super().__init__(sock, client_id, registry)
        self.done = done

    def on_stop(self) -> None:
        super().on_stop()
        self.done.set()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, threading.Event):
            message.wait(WAIT)
        elif not isinstance(message, Barrier):
            super().on_receive(message)


@pytest.fixture
def make_rig() -> Iterator[Any]:
    peers: list[socket.socket] = []

    def make(
        registry: pykka.ActorRef[Any] | None = None,
        reports: queue.Queue[Any] | None = None,
    ) -> Rig:
        if registry is None:
            reports = queue.Queue()
            registry = Recorder.start(reports)
        assert reports is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peers.append(theirs)
        done = threading.Event()
        actor = _Pausable.start(ours, CLIENT_ID, registry, done)
        return Rig(actor, registry, reports, Peer(theirs), ours, done)

    yield make
    for sock in peers:
        sock.close()


@pytest.fixture
def rig(make_rig: Any) -> Rig:
    rig: Rig = make_rig()
    attached = take(rig.reports, ClientAttached)
    assert attached == ClientAttached(CLIENT_ID, rig.actor.actor_urn)
    return rig


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_the_handshake_welcomes_the_client(rig: Rig) -> None:
    welcome = rig.peer.handshake()
    assert welcome == Welcome(PROTOCOL_VERSION, os.getpid(), CLIENT_ID)
    rig.quiet()  # a hello is not the registry's business


def test_a_get_goes_to_the_registry_and_its_grant_to_the_socket(rig: Rig) -> None:
    rig.peer.handshake()
    rig.peer.send(Get(1, "/srv/a", 2.5))
    request = take(rig.reports, ClientRequest)
    assert request == ClientRequest(CLIENT_ID, Get(1, "/srv/a", 2.5))

    grant = SessionGranted(1, 11, 4242, "/srv/a", "/sock/a")
    rig.actor.tell(grant)

    assert rig.peer.receive() == grant
    rig.peer.send(CloseSession(11))
    rig.peer.send(SessionFailed(11))
    assert take(rig.reports, ClientRequest).message == CloseSession(11)
    assert take(rig.reports, ClientRequest).message == SessionFailed(11)


def test_many_requests_may_be_in_flight_and_are_answered_in_any_order(
    rig: Rig,
) -> None:
    rig.peer.handshake()
    ids = range(1, 101)
    for request_id in ids:
        rig.peer.send(Get(request_id, f"/srv/{request_id % 3}"))
    forwarded = [take(rig.reports, ClientRequest).message for _ in ids]
    assert forwarded == [Get(i, f"/srv/{i % 3}") for i in ids]

    for request_id in reversed(ids):
        rig.actor.tell(
            SessionGranted(request_id, request_id, 1, f"/srv/{request_id % 3}", "/s")
        )

    received = [rig.peer.receive() for _ in ids]
    assert [(type(r), getattr(r, "request_id", None)) for r in received] == [
        (SessionGranted, i) for i in reversed(ids)
    ]
    assert rig.peer.conn.in_flight == 0


def test_a_wrong_version_gets_an_error_and_the_connection_closes(rig: Rig) -> None:
    rig.peer.send(Hello(PROTOCOL_VERSION + 1, os.getpid()))

    error = rig.peer.expect_protocol_error()
    assert f"version {PROTOCOL_VERSION + 1}" in error.message
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID
    rig.quiet()


BAD_INPUT = {
    "garbage": frame(b"\xc1\xc1"),
    "not an array": frame(msgpack.packb({"tag": 10})),
    "unknown tag": frame(msgpack.packb([99, 1])),
    "wrong field type": frame(msgpack.packb([10, "one", "/srv/a", None])),
    "missing field": frame(msgpack.packb([10, 1])),
    "oversized header": struct.pack(">I", MAX_REQUEST_FRAME + 1),
    "huge header": b"\xff\xff\xff\xff",
    "empty frame": frame(b""),
    "a hello again": frame(msgpack.packb([1, PROTOCOL_VERSION, 1])),
    "request id 0": frame(msgpack.packb([11, 0])),
}


@pytest.mark.parametrize("data", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_gets_a_protocol_error_then_the_connection_closes(
    rig: Rig, data: bytes
) -> None:
    rig.peer.handshake()
    rig.peer.sock.sendall(data)

    rig.peer.expect_protocol_error()
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID
    rig.quiet()


def test_a_request_before_the_hello_is_a_protocol_error(rig: Rig) -> None:
    rig.peer.sock.sendall(frame(msgpack.packb([11, 1])))
    rig.peer.conn.send(Hello(PROTOCOL_VERSION, 1))  # our side expects a reply
    rig.peer.expect_protocol_error()
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID


def test_bad_input_closes_only_that_connection(make_rig: Any) -> None:
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    bad: Rig = make_rig(registry=registry, reports=reports)
    good: Rig = make_rig(registry=registry, reports=reports)
    good.peer.handshake()

    bad.peer.sock.sendall(b"\xff\xff\xff\xff")
    bad.peer.conn.send(Hello(PROTOCOL_VERSION, 1))
    bad.peer.expect_protocol_error()

    good.peer.send(Get(1, "/srv/a"))
    while not isinstance(reports.get(timeout=WAIT), ClientRequest):
        pass  # skip the attach and detach reports
    good.actor.tell(SessionGranted(1, 1, 1, "/srv/a", "/s"))
    assert isinstance(good.peer.receive(), SessionGranted)
    assert good.actor.is_alive()
    assert not bad.actor.is_alive()


def test_the_error_frame_is_sent_once_however_the_bad_bytes_arrive(rig: Rig) -> None:
    rig.peer.handshake()
    rig.peer.sock.sendall(b"\x00\x00\x00\x02\xc1\xc1" * 2)  # two bad frames at once

    rig.peer.expect_protocol_error()  # one error, then the end of the stream
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID


def test_end_of_stream_detaches_the_client(rig: Rig) -> None:
    rig.peer.handshake()
    rig.peer.send(Get(1, "/srv/a"))
    take(rig.reports, ClientRequest)

    rig.peer.sock.shutdown(socket.SHUT_WR)

    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID
    assert rig.peer.sock.recv(1) == b""  # the server closed its end too
    rig.quiet()


def test_a_connection_that_never_says_hello_is_closed(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else it would hold one of the acceptor's max_clients places for ever."""
    monkeypatch.setattr(session_module, "HELLO_TIMEOUT", 0.2)
    rig: Rig = make_rig()
    take(rig.reports, ClientAttached)
    rig.peer.conn.send(Hello(PROTOCOL_VERSION, 1))  # our side expects a reply

    error = rig.peer.expect_protocol_error()
    assert "no hello within 0.2 s" in error.message
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID


def test_a_hello_read_in_time_but_answered_late_is_not_overdue(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is for the hello to arrive, not for the actor to get to
    it: here the timer fires with the hello still in the actor's inbox."""
    monkeypatch.setattr(session_module, "HELLO_TIMEOUT", 0.2)
    rig: Rig = make_rig()
    take(rig.reports, ClientAttached)
    rig.actor.ask(Barrier(), timeout=WAIT)  # on_start is over: the timer runs
    paused = threading.Event()
    rig.actor.tell(paused)
    rig.peer.send(Hello(PROTOCOL_VERSION, os.getpid()))
    timers = [
        t for t in threading.enumerate() if t.name == f"actorpool-hello-{CLIENT_ID}"
    ]
    assert timers
    for timer in timers:
        timer.join(WAIT)  # it fires: the paused actor cannot cancel it
        assert not timer.is_alive()
    paused.set()
    assert isinstance(rig.peer.receive(), Welcome)
    rig.actor.ask(Barrier(), timeout=WAIT)  # the overdue notice is handled

    rig.peer.send(Get(1, "/srv/a"))
    assert take(rig.reports, ClientRequest).message == Get(1, "/srv/a")
    rig.quiet()


def test_a_hello_that_came_in_time_but_was_not_read_yet_is_not_overdue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In the server the reader is the registry's loop, which reads only when
    the registry is idle; after a stall every deadline fires at once. A
    hello waiting on the socket then gets another term, not an error."""
    monkeypatch.setattr(session_module, "HELLO_TIMEOUT", 0.2)
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    reader = SocketReader().start()
    ours, theirs = socket.socketpair()
    actor = ClientSessionActor.start(ours, CLIENT_ID, registry, reader)
    try:
        take(reports, ClientAttached)
        actor.ask(Barrier(), timeout=WAIT)  # on_start is over: the timer runs
        (timer,) = [
            t
            for t in threading.enumerate()
            if t.name == f"actorpool-hello-{CLIENT_ID}" and t.is_alive()
        ]
        blocked, gate = threading.Event(), threading.Event()

        def stall() -> None:
            blocked.set()
            gate.wait(WAIT)

        reader._call(stall)
        assert blocked.wait(WAIT)
        peer = Peer(theirs)
        peer.send(Hello(PROTOCOL_VERSION, os.getpid()))
        timer.join(WAIT)  # the deadline passes with the hello unread
        actor.ask(Barrier(), timeout=WAIT)  # and the actor has seen it pass
        gate.set()
        assert isinstance(peer.receive(), Welcome)
    finally:
        gate.set()
        actor.stop()
        reader.close()
        registry.stop()
        theirs.close()


def test_end_of_stream_inside_a_frame_is_a_protocol_error(rig: Rig) -> None:
    rig.peer.handshake()
    rig.peer.sock.sendall(frame(msgpack.packb([11, 1]))[:-1])
    rig.peer.sock.shutdown(socket.SHUT_WR)

    rig.peer.expect_protocol_error()
    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID


def test_the_socket_is_closed_after_stop(make_rig: Any) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    before = open_fds()
    rig: Rig = make_rig(registry=registry, reports=reports)
    rig.peer.handshake()
    assert open_fds() > before  # the pair's end and the actor's own reader

    rig.actor.stop()

    assert rig.done.is_set()
    assert take(reports, ClientAttached).client_id == CLIENT_ID
    assert take(reports, ClientDetached).client_id == CLIENT_ID
    assert rig.ours.fileno() == -1
    assert rig.peer.receive() is PEER_CLOSED
    rig.peer.sock.close()
    assert open_fds() == before


def test_a_reply_after_the_client_closed_is_dropped(rig: Rig) -> None:
    rig.peer.handshake()
    rig.peer.send(Get(1, "/srv/a"))
    take(rig.reports, ClientRequest)
    pause = threading.Event()
    rig.actor.tell(pause)
    rig.actor.tell(HangUp())  # the client went away ...
    rig.actor.tell(SessionGranted(1, 1, 1, "/srv/a", "/s"))  # ... before this
    pause.set()

    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID
    assert rig.peer.receive() is PEER_CLOSED


def test_without_a_registry_the_connection_is_closed(make_rig: Any) -> None:
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    registry.stop()

    rig: Rig = make_rig(registry=registry, reports=reports)

    assert rig.peer.sock.recv(1) == b""
    assert rig.done.wait(WAIT)
    assert rig.ours.fileno() == -1


def test_a_request_after_the_registry_stopped_closes_the_connection(rig: Rig) -> None:
    rig.peer.handshake()
    rig.registry.stop()

    rig.peer.send(Get(1, "/srv/a"))

    assert rig.peer.sock.recv(1) == b""


def test_a_reply_to_no_request_in_flight_closes_only_this_connection(
    rig: Rig,
) -> None:
    rig.peer.handshake()

    rig.actor.tell(SessionGranted(5, 1, 1, "/srv/a", "/s"))  # a registry bug

    assert take(rig.reports, ClientDetached).client_id == CLIENT_ID
    assert rig.done.wait(WAIT)  # stopped by on_stop, not by a failure
    assert rig.peer.receive() is PEER_CLOSED


def _too_big_to_send(request_id: int) -> StatisticsReply:
    return StatisticsReply(request_id, {"apps": "x" * (MAX_FRAME_SIZE + 1)})


@pytest.mark.parametrize("through", ["the actor", "the direct proxy"])
def test_a_reply_too_big_to_send_is_answered_with_an_error_instead(
    rig: Rig, through: str
) -> None:
    # A statistics snapshot of many thousand apps can pass the frame limit:
    # the client hears why, and its connection lives on.
    rig.peer.handshake()
    rig.peer.send(GetStatistics(1))
    take(rig.reports, ClientRequest)
    if through == "the actor":
        rig.actor.tell(_too_big_to_send(1))
    else:
        proxy = ClientProxy.from_urn(rig.actor.actor_urn)
        assert proxy is not None
        proxy.reply(_too_big_to_send(1))
    error = rig.peer.receive()
    assert isinstance(error, ErrorReply)
    assert error.request_id == 1
    assert "could not send its answer (StatisticsReply)" in error.message
    rig.peer.send(Get(2, "/srv/a"))  # and the connection carries on
    take(rig.reports, ClientRequest)
    grant = SessionGranted(2, 11, 4242, "/srv/a", "/sock/a")
    rig.actor.tell(grant)
    assert rig.peer.receive() == grant


# --- the Outbox: replies from any thread, never blocking -------------------------


def _open_outbox() -> tuple[Outbox, socket.socket, socket.socket, list[int]]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = Connection(Role.SERVER)
    conn.receive_data(frame(msgpack.packb([1, PROTOCOL_VERSION, 1])))
    conn.next_event()
    backlogs: list[int] = []
    outbox = Outbox(ours, conn, threading.Lock(), lambda: backlogs.append(1))
    outbox.send(Welcome(PROTOCOL_VERSION, 1, 1))
    return outbox, ours, theirs, backlogs


def _fill(outbox: Outbox, conn_requests: int) -> None:
    for request_id in range(1, conn_requests + 1):
        outbox._conn.receive_data(frame(msgpack.packb([11, request_id])))
        outbox._conn.next_event()
        outbox.send(ErrorReply(request_id, "SpawnError", "x", "y" * 2000))


def test_outbox_queues_what_does_not_fit_and_flush_delivers_it_in_order() -> None:
    outbox, _, theirs, backlogs = _open_outbox()
    _fill(outbox, 200)  # far more than the socket buffer holds
    assert backlogs == [1]  # the owner is asked to flush once, not per frame
    received = bytearray()
    drained = threading.Event()

    def drain() -> None:
        while chunk := theirs.recv(65536):
            received.extend(chunk)
        drained.set()

    reader = threading.Thread(target=drain)
    reader.start()
    assert outbox.flush(timeout=WAIT)
    outbox.close()
    assert drained.wait(WAIT)
    reader.join()
    peer = Connection(Role.CLIENT)
    peer.send(Hello(PROTOCOL_VERSION, 1))
    peer.receive_data(bytes(received))
    peer.receive_data(b"")
    assert isinstance(peer.next_event(), Welcome)
    for request_id in range(1, 201):
        peer.send(GetStatistics(request_id))
    events = []
    while (event := peer.next_event()) is not PEER_CLOSED:
        events.append(event)
    assert [e.request_id for e in events] == list(range(1, 201))  # type: ignore[attr-defined]
    theirs.close()


def test_outbox_flush_waits_for_a_client_that_reads_slowly() -> None:
    """SEND_TIMEOUT is a limit on a client taking nothing, not on the whole
    backlog: before, one that read all along was dropped once the timeout
    had passed since the flush began."""
    outbox, _, theirs, _ = _open_outbox()
    _fill(outbox, 50)  # about 100 KiB, 4 KiB a read
    done = threading.Event()

    def read_slowly() -> None:
        theirs.settimeout(WAIT)
        # Paced, to be a slow client: a read every 0.05 s, well within the
        # flush's 0.5 s, while the whole backlog takes longer than that.
        while not done.wait(0.05):
            if not theirs.recv(4096):
                return

    reader = threading.Thread(target=read_slowly)
    reader.start()
    started = time.monotonic()
    try:
        assert outbox.flush(timeout=0.5)
        assert time.monotonic() - started > 0.5, "the backlog went too fast"
    finally:
        done.set()
        reader.join(WAIT)
        outbox.close()
        theirs.close()


def test_outbox_flush_gives_up_on_a_client_that_does_not_read() -> None:
    outbox, _, theirs, _ = _open_outbox()
    _fill(outbox, 200)
    assert not outbox.flush(timeout=0.2)
    outbox.close()
    theirs.close()
