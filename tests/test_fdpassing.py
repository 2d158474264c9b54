"""SCM_RIGHTS: one descriptor per message, close-on-exec, nothing leaked."""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from actorpool.fdpassing import recv_fd, send_fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


@pytest.fixture
def payload() -> Iterator[tuple[socket.socket, socket.socket]]:
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with x, y:
        yield x, y


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    rights = array.array("i", fds)
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])


def test_send_and_receive_a_socket(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    x, y = payload
    send_fd(a, b"accepted", x.fileno())
    data, fd = recv_fd(b, 64)
    assert data == b"accepted"
    assert fd is not None
    assert fd != x.fileno()
    with socket.socket(fileno=fd) as received:
        assert os.fstat(fd).st_ino == os.fstat(x.fileno()).st_ino
        received.sendall(b"through the passed socket")
        assert y.recv(100) == b"through the passed socket"


def test_received_fd_is_close_on_exec(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    x, _ = payload
    os.set_inheritable(x.fileno(), True)  # the sender's copy may be inheritable
    send_fd(a, b"fd", x.fileno())
    _, fd = recv_fd(b, 64)
    assert fd is not None
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_messages_stay_apart_on_seqpacket(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    x, y = payload
    send_fd(a, b"one", x.fileno())
    send_fd(a, b"two", y.fileno())
    got = [recv_fd(b, 64), recv_fd(b, 64)]
    assert [data for data, _ in got] == [b"one", b"two"]
    for _, fd in got:
        assert fd is not None
        os.close(fd)


@pytest.mark.parametrize("count", [2, 3])
def test_more_than_one_fd_raises_and_closes_them_all(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
    count: int,
) -> None:
    a, b = channel
    x, y = payload
    before = open_fds()
    send_raw(a, b"two", [x.fileno(), y.fileno(), x.fileno()][:count])
    with pytest.raises(OSError, match="descriptor"):
        recv_fd(b, 64)
    assert open_fds() == before


def test_truncated_message_raises_and_closes_the_fd(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    x, _ = payload
    before = open_fds()
    send_fd(a, b"a message longer than the buffer", x.fileno())
    with pytest.raises(OSError, match="descriptor"):
        recv_fd(b, 4)
    assert open_fds() == before


def test_message_without_fd_gives_none(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    a.send(b"shutdown")
    assert recv_fd(b, 64) == (b"shutdown", None)


def test_peer_closed_gives_empty_bytes(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    a.close()
    assert recv_fd(b, 64) == (b"", None)


def test_no_fd_is_left_behind_after_a_good_exchange(
    channel: tuple[socket.socket, socket.socket],
    payload: tuple[socket.socket, socket.socket],
) -> None:
    a, b = channel
    x, _ = payload
    before = open_fds()
    send_fd(a, b"x", x.fileno())
    _, fd = recv_fd(b, 64)
    assert fd is not None
    assert open_fds() == before + 1
    os.close(fd)
    assert open_fds() == before
