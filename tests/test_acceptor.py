"""AcceptorActor over a SOCK_SEQPACKET pair, with a stand-in registry.

The test holds the far end of the connect channel, as ``connect()`` does in
a client process: it writes ``CONNECT`` and receives a descriptor with
:func:`actorpool.fdpassing.recv_fd`, then speaks the protocol on it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actorpool import acceptor as acceptor_module
from actorpool.acceptor import ACCEPTED, CONNECT, REFUSED, SHUTDOWN, AcceptorActor
from actorpool.fdpassing import recv_fd
from actorpool.messages import (
    PROTOCOL_VERSION,
    ClientAttached,
    ClientDetached,
    ClientRequest,
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
        self.channel.send(CONNECT)
        data, fd = recv_fd(self.channel, 64)
        assert data == ACCEPTED
        assert fd is not None
        assert not os.get_inheritable(fd)
        peer = Peer(socket.socket(fileno=fd))
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


def test_a_connect_it_cannot_serve_is_refused_not_left_hanging(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*_args: object) -> tuple[socket.socket, socket.socket]:
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(socket, "socketpair", exhausted)
        rig.channel.send(CONNECT)
        data, fd = recv_fd(rig.channel, 64)
        assert fd is None
        assert data.startswith(REFUSED + b" ")

    assert rig.connect().handshake().client_id == 1  # and it carries on
    assert rig.acceptor.is_alive()


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

        theirs.send(CONNECT)
        data, fd = recv_fd(theirs, 64)
        assert fd is None
        assert data == REFUSED + b" max_clients=2 reached"
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
        rig.channel.send(CONNECT)
        data, fd = recv_fd(rig.channel, 64)
        assert data == ACCEPTED
        assert fd is not None
        with socket.socket(fileno=fd) as orphan:
            orphan.settimeout(WAIT)
            assert orphan.recv(1) == b""  # its server end was closed, not leaked

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

    monkeypatch.setattr(acceptor_module, "send_fd", broken)
    rig.channel.send(CONNECT)

    assert rig.closed.wait(WAIT)  # the server is told to stop
    assert healthy.receive() is PEER_CLOSED  # the clients were stopped
    assert rig.channel.recv(64) == b""
