"""The only code in actorpool that passes file descriptors (SCM_RIGHTS).

``connect()`` sends one end of a fresh connection with :func:`send_fd`; the
acceptor receives it with :func:`recv_fd`. Received descriptors are close-on-exec
from the moment they arrive: :func:`socket.recv_fds` ignores its ``flags``
on the Pythons we support, so this module calls ``recvmsg`` with
``MSG_CMSG_CLOEXEC`` itself.
"""

from __future__ import annotations

import array
import os
import socket

__all__ = ["BadDescriptorMessage", "recv_fd", "send_fd"]

_FD_SIZE = array.array("i").itemsize


class BadDescriptorMessage(OSError):
    """A message came with more than one descriptor, or was cut short."""


def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send ``data`` with one descriptor attached, as one message."""
    fds = array.array("i", [fd])
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def recv_fd(sock: socket.socket, bufsize: int) -> tuple[bytes, int | None]:
    """Receive one message and the descriptor attached to it, if any.

    Returns ``(data, fd)``; ``data`` is ``b""`` when the peer closed. A
    message that carried more than one descriptor, or was cut short, closes
    every descriptor that came with it and raises :class:`OSError`, so that
    nothing leaks into this process.
    """
    # Room for two descriptors, so that a second one shows up as an error
    # instead of silently setting MSG_CTRUNC and vanishing.
    data, ancdata, flags, _ = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(2 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise BadDescriptorMessage(
            f"unexpected descriptor message (flags={flags:#x}, fds={len(fds)})"
        )
    return data, (fds[0] if fds else None)
