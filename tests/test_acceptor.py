"""AcceptorActor over a SOCK_SEQPACKET pair, with a stand-in registry.

The test holds the far end of the connect channel, as ``connect()`` does in
a client process: it makes a socket pair, sends one end with ``CONNECT``
(:func:`actorpool.fdpassing.send_fd`), then speaks the protocol on the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

from actorpool import acceptor as acceptor_module
from actorpool.acceptor import CONNECT, SHUTDOWN, AcceptorActor
from actorpool.fdpassing import send_fd
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientAttached,
    ClientDetached,
    ClientRequest,
    ErrorReply,
    Get,
    Hello,
    Welcome,
)
from actorpool.protocol import NEED_DATA, PEER_CLOSED, Connection, Role
from actorpool.testing import Recorder, take

WAIT = 5.0


class Peer:
    """A client's end of a connection the acceptor handed out."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT)
        self.sock = sock
        self.conn = Connection(Role.CLIENT)

    def receive(self) -> object:
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def handshake(self) -> Welcome:
        self.sock.sendall(self.conn.send(Hello(PROTOCOL_VERSION, os.getpid())))
        welcome = self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome


@dataclasses.dataclass
class Rig:
    acceptor: pykka.ActorRef[Any]
    reports: queue.Queue[Any]
    channel: socket.socket
    closed: threading.Event
    peers: list[Peer] = dataclasses.field(default_factory=list)

    def connect(self) -> Peer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            send_fd(self.channel, CONNECT, theirs.fileno())
        peer = Peer(ours)
        self.peers.append(peer)
        return peer


@pytest.fixture
def rig() -> Iterator[Rig]:
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(WAIT)
    closed = threading.Event()
    acceptor = AcceptorActor.start(ours, registry, on_close=closed.set)
    rig = Rig(acceptor, reports, theirs, closed)
    yield rig
    for peer in rig.peers:
        peer.sock.close()
    theirs.close()


def test_connect_passes_back_a_connection_that_speaks_the_protocol(rig: Rig) -> None:
    first = rig.connect()
    attached = take(rig.reports, ClientAttached)
    assert first.handshake().client_id == attached.client_id == 1

    second = rig.connect()
    assert take(rig.reports, ClientAttached).client_id == 2
    assert second.handshake().client_id == 2

    first.sock.sendall(first.conn.send(Get(1, "/srv/a")))
    assert take(rig.reports, ClientRequest) == ClientRequest(1, Get(1, "/srv/a"))
    assert not rig.closed.is_set()


def test_unexpected_bytes_on_the_channel_are_ignored(rig: Rig) -> None:
    rig.channel.send(b"please?")
    rig.channel.send(CONNECT + b"!")
    assert rig.connect().handshake().client_id == 1
    assert not rig.closed.is_set()


def test_an_empty_message_is_not_the_end_of_the_channel(rig: Rig) -> None:
    # SOCK_SEQPACKET has empty records, which recv() returns as b"", as it
    # does at the end of the channel.
    rig.channel.send(b"")
    assert rig.connect().handshake().client_id == 1
    assert not rig.closed.is_set()


def test_an_empty_message_with_a_descriptor_is_ignored(rig: Rig) -> None:
    with socket.socket(socket.AF_UNIX) as thing:
        send_fd(rig.channel, b"", thing.fileno())
    assert rig.connect().handshake().client_id == 1
    assert not rig.closed.is_set()
    rig.channel.close()
    assert rig.closed.wait(WAIT)  # and the reader still sees the real end


def test_end_of_the_channel_calls_on_close_and_connections_carry_on(
    rig: Rig,
) -> None:
    peer = rig.connect()
    peer.handshake()
    take(rig.reports, ClientAttached)

    rig.channel.close()  # every holder has let go

    assert rig.closed.wait(WAIT)
    peer.sock.sendall(peer.conn.send(Get(1, "/srv/a")))
    assert take(rig.reports, ClientRequest).client_id == 1


def test_a_shutdown_message_calls_on_close(rig: Rig) -> None:
    rig.channel.send(SHUTDOWN)
    assert rig.closed.wait(WAIT)


def test_stop_stops_every_client_actor_and_closes_the_channel(rig: Rig) -> None:
    peers = [rig.connect(), rig.connect()]
    for peer in peers:
        peer.handshake()
        take(rig.reports, ClientAttached)

    rig.acceptor.stop()

    detached = {take(rig.reports, ClientDetached).client_id for _ in peers}
    assert detached == {1, 2}
    for peer in peers:
        assert peer.receive() is PEER_CLOSED
    assert rig.channel.recv(64) == b""
    assert not rig.closed.is_set()  # stopping is not a request to stop


def packet_socket() -> socket.socket:
    """A SOCK_PACKET socket: a type the socket module has no name for, which
    once made the acceptor fail (and the server stop) logging it."""
    try:
        return socket.socket(socket.AF_PACKET, 10)
    except OSError as exc:  # needs CAP_NET_RAW
        pytest.skip(f"cannot make a SOCK_PACKET socket here: {exc}")


@pytest.mark.parametrize(
    "make",
    [
        lambda: None,  # CONNECT alone
        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        lambda: open(os.devnull, "rb"),  # noqa: SIM115 (closed by the test)
        packet_socket,
    ],
    ids=["no-descriptor", "a-datagram-socket", "not-a-socket", "a-packet-socket"],
)
def test_a_connect_with_no_stream_socket_is_ignored(
    rig: Rig, make: Callable[[], Any]
) -> None:
    thing = make()
    if thing is None:
        rig.channel.send(CONNECT)
    else:
        with thing:
            send_fd(rig.channel, CONNECT, thing.fileno())
    assert rig.connect().handshake().client_id == 1  # and it carries on
    assert rig.acceptor.is_alive()


def test_a_client_killed_after_its_connect_leaves_nothing_behind(rig: Rig) -> None:
    # connect() is one message: a client that dies after sending it has
    # closed its end, and the server's end reads end of file.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    send_fd(rig.channel, CONNECT, theirs.fileno())
    theirs.close()
    ours.close()  # what the kernel does for a SIGKILLed client
    assert take(rig.reports, ClientAttached).client_id == 1
    assert take(rig.reports, ClientDetached).client_id == 1


def test_a_connection_beyond_max_clients_is_refused_until_one_leaves() -> None:
    reports: queue.Queue[Any] = queue.Queue()
    registry = Recorder.start(reports)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(WAIT)
    acceptor = AcceptorActor.start(
        ours, registry, on_close=threading.Event().set, max_clients=2
    )
    rig = Rig(acceptor, reports, theirs, threading.Event())
    try:
        first, second = rig.connect(), rig.connect()
        for peer in (first, second):
            peer.handshake()
            take(reports, ClientAttached)

        refused = rig.connect()
        hello = refused.conn.send(Hello(PROTOCOL_VERSION, 1))
        with contextlib.suppress(BrokenPipeError):  # it may be closed already
            refused.sock.sendall(hello)
        error = refused.receive()
        assert isinstance(error, ErrorReply)
        assert error.request_id == 0
        assert error.message.endswith("refused the connection: max_clients=2 reached")
        assert refused.receive() is PEER_CLOSED
        second.sock.sendall(second.conn.send(Get(1, "/srv/a")))
        assert take(reports, ClientRequest).client_id == 2

        first.sock.close()
        assert take(reports, ClientDetached).client_id == 1
        assert rig.connect().handshake().client_id == 3
    finally:
        for peer in rig.peers:
            peer.sock.close()
        theirs.close()


def test_a_client_actor_that_cannot_start_costs_that_client_only(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = rig.connect()
    healthy.handshake()

    class Unstartable:
        @staticmethod
        def start(*_args: object) -> None:
            raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(acceptor_module, "ClientSessionActor", Unstartable)
        orphan = rig.connect()
        assert orphan.sock.recv(1) == b""  # its server end was closed, not leaked

    assert rig.acceptor.is_alive()
    assert not rig.closed.is_set()
    assert rig.connect().handshake().client_id == 3  # and it carries on


def test_a_failure_in_the_acceptor_calls_on_close_and_cleans_up(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = rig.connect()
    healthy.handshake()

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the acceptor")

    monkeypatch.setattr(AcceptorActor, "_accept", broken)
    rig.connect()

    assert rig.closed.wait(WAIT)  # the server is told to stop
    assert healthy.receive() is PEER_CLOSED  # the clients were stopped
    assert rig.channel.recv(64) == b""
