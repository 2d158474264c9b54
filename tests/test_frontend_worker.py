"""A front-end worker's accept loop: what it does when accepting fails."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from actorpool.frontend import worker as worker_module
from actorpool.frontend.proxy import ProxyOptions
from actorpool.frontend.routes import Router
from actorpool.frontend.worker import WorkerOptions, _Worker


class FailingListener:
    """A listening socket whose next accepts raise the given errors."""

    def __init__(self, errors: list[OSError]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.errors = errors

    def accept(self) -> tuple[socket.socket, Any]:
        if self.errors:
            raise self.errors.pop(0)
        return self.sock.accept()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wake() -> Iterator[tuple[int, int]]:
    """A worker's wake-up pipe: the test writes the signal numbers."""
    wake_r, wake_w = os.pipe()
    yield wake_r, wake_w
    os.close(wake_r)
    os.close(wake_w)


def served_by(listener: FailingListener, wake: tuple[int, int]) -> bytes:
    """Run a worker's accept loop on ``listener``, connect one client, and
    return what it got; the loop is stopped after."""
    options = WorkerOptions(router=Router([]), proxy=ProxyOptions(), threads=2)
    worker = _Worker(listener, None, options)  # type: ignore[arg-type]
    failure: list[BaseException] = []

    def accept() -> None:
        try:
            worker.accept_until_stopped(wake[0])
        except BaseException as exc:
            failure.append(exc)

    loop = threading.Thread(target=accept, daemon=True)
    loop.start()
    try:
        with socket.create_connection(
            listener.sock.getsockname(), timeout=10
        ) as client:
            data = client.recv(100)
    finally:
        os.write(wake[1], bytes([signal.SIGTERM]))
        loop.join(10)
        worker.finish(5)
    assert not loop.is_alive()
    assert failure == []
    return data


@pytest.mark.parametrize(
    "code",
    [
        errno.EMFILE,
        errno.ENFILE,
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENONET,
        errno.EPERM,
    ],
)
def test_a_failed_accept_costs_the_worker_nothing(
    code: int, wake: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (or a client gone before its accept): the worker
    pauses and accepts again. Before, the error ended the worker, and with
    it every client it was serving."""
    monkeypatch.setattr(worker_module, "ACCEPT_PAUSE", 0.01)
    monkeypatch.setattr(
        worker_module,
        "serve_client",
        lambda conn, *_: conn.sendall(b"served"),
    )
    listener = FailingListener([OSError(code, os.strerror(code))])
    assert served_by(listener, wake) == b"served"
