"""SocketReader: one thread reading many sockets, calling back, closing safely."""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Iterator

import pytest

from actorpool.reader import OnData, SocketReader

WAIT = 5.0


@pytest.fixture
def reader() -> Iterator[SocketReader]:
    r = SocketReader().start("test-reader")
    yield r
    r.close()


def collect(into: queue.Queue[bytes], keep: bool = True) -> OnData:
    def on_data(data: bytes) -> bool:
        into.put(data)
        return keep

    return on_data


def test_chunks_from_many_sockets_reach_their_callbacks(reader: SocketReader) -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    got: list[queue.Queue[bytes]] = [queue.Queue() for _ in pairs]
    for (ours, _), q in zip(pairs, got, strict=True):
        reader.add(ours, collect(q))
    for n, (_, theirs) in enumerate(pairs):
        theirs.sendall(f"hello {n}".encode())
    for n, q in enumerate(got):
        assert q.get(timeout=WAIT) == f"hello {n}".encode()
    for ours, theirs in pairs:
        reader.remove(ours, ours.close)
        theirs.close()


def test_end_of_stream_is_delivered_once_and_stops_reading(
    reader: SocketReader,
) -> None:
    ours, theirs = socket.socketpair()
    got: queue.Queue[bytes] = queue.Queue()
    reader.add(ours, collect(got))
    theirs.close()
    assert got.get(timeout=WAIT) == b""
    reader.remove(ours, ours.close)  # a no-op unregister, then the close
    assert ours.fileno() == -1
    assert got.empty()


def test_a_false_return_stops_reading(reader: SocketReader) -> None:
    ours, theirs = socket.socketpair()
    got: queue.Queue[bytes] = queue.Queue()
    reader.add(ours, collect(got, keep=False))
    theirs.sendall(b"first")
    assert got.get(timeout=WAIT) == b"first"
    theirs.sendall(b"second")
    # Prove the loop went round again (another socket is served) without
    # ever delivering the second chunk of the dropped one.
    other, other_peer = socket.socketpair()
    probe: queue.Queue[bytes] = queue.Queue()
    reader.add(other, collect(probe))
    other_peer.sendall(b"probe")
    assert probe.get(timeout=WAIT) == b"probe"
    assert got.empty()
    for sock in (ours, other):
        reader.remove(sock, sock.close)
    theirs.close()
    other_peer.close()


def test_remove_runs_then_on_the_reader_thread_and_waits(reader: SocketReader) -> None:
    ours, theirs = socket.socketpair()
    reader.add(ours, collect(queue.Queue()))
    ran_on: list[str] = []

    def then() -> None:
        ran_on.append(threading.current_thread().name)
        ours.close()

    reader.remove(ours, then)
    assert ran_on == ["test-reader"]  # done by the time remove() returned
    theirs.close()


def test_a_failing_callback_drops_only_its_socket(reader: SocketReader) -> None:
    bad, bad_peer = socket.socketpair()
    good, good_peer = socket.socketpair()

    def explode(data: bytes) -> bool:
        raise RuntimeError("bug")

    got: queue.Queue[bytes] = queue.Queue()
    reader.add(bad, explode)
    reader.add(good, collect(got))
    bad_peer.sendall(b"x")
    good_peer.sendall(b"still here")
    assert got.get(timeout=WAIT) == b"still here"
    for sock in (bad, good):
        reader.remove(sock, sock.close)
    bad_peer.close()
    good_peer.close()


def test_close_releases_its_descriptors_and_runs_later_commands_inline() -> None:
    before = len(os.listdir("/proc/self/fd"))
    reader = SocketReader().start()
    ours, theirs = socket.socketpair()
    reader.add(ours, collect(queue.Queue()))
    reader.close()
    reader.close()  # idempotent
    reader.remove(ours, ours.close)  # after close: runs at once, here
    assert ours.fileno() == -1
    theirs.close()
    assert len(os.listdir("/proc/self/fd")) == before


# --- as an actor's inbox --------------------------------------------------------


def test_as_an_inbox_get_reads_sockets_until_an_item_is_queued() -> None:
    inbox = SocketReader()
    ours, theirs = socket.socketpair()

    def on_data(data: bytes) -> bool:
        inbox.put(("decoded", data))  # from the loop's own thread: no wake-up
        return bool(data)

    inbox.add(ours, on_data)
    theirs.sendall(b"request")
    assert inbox.get() == ("decoded", b"request")  # the socket was read by get()
    assert inbox.empty()

    told = threading.Thread(target=inbox.put, args=("told",))
    told.start()
    assert inbox.get() == "told"  # a put from another thread wakes the loop
    told.join()

    inbox.remove(ours, ours.close)  # on the loop's thread: runs at once
    assert ours.fileno() == -1
    inbox.close()
    theirs.close()


def test_a_pykka_actor_runs_on_a_socket_reader_inbox() -> None:
    import pykka

    got: queue.Queue[object] = queue.Queue()

    class Echo(pykka.ThreadingActor):
        @staticmethod
        def _create_actor_inbox() -> object:
            return SocketReader()

        def on_receive(self, message: object) -> object:
            got.put(message)
            return message

        def on_stop(self) -> None:
            self.actor_inbox.close()  # type: ignore[attr-defined]

    ref = Echo.start()
    assert ref.ask("ping", timeout=WAIT) == "ping"
    ours, theirs = socket.socketpair()
    ref.actor_inbox.add(ours, lambda data: ref.tell(data) is None and bool(data))  # type: ignore[attr-defined]
    theirs.sendall(b"from a socket")
    assert got.get(timeout=WAIT) == "ping"
    assert got.get(timeout=WAIT) == b"from a socket"
    ref.actor_inbox.remove(ours, ours.close)  # type: ignore[attr-defined]
    ref.stop()
    theirs.close()
