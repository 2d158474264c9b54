"""SocketReader: one thread that reads every client socket of the server.

Client connections are read by a single ``epoll`` loop instead of a thread
each. Under load one wake-up then reads many clients' requests and hands
them to the registry in a row; with a thread per client, every request
cost a thread switch (and a fight for the GIL) of its own.

The loop only calls back: ``on_data(bytes)`` for each chunk read (``b""``
at end of stream). The callback decides; returning ``False`` stops reading
that socket. Registering and removing sockets also run on the loop's
thread, so a socket is never closed while the loop may still ``recv`` on
its descriptor (which a reused descriptor number would turn into reading
someone else's connection).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["OnData", "SocketReader"]

logger = logging.getLogger(__name__)

OnData = Callable[[bytes], bool]
"""Called on the reader thread with each chunk read; False stops reading."""

_RECV_SIZE = 64 * 1024


class SocketReader:
    """Reads registered sockets on one thread and calls their callbacks."""

    def __init__(self, name: str = "actorpool-reader") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<SocketReader {state} sockets={len(self._selector.get_map()) - 1}>"

    def add(self, sock: socket.socket, on_data: OnData) -> None:
        """Start reading ``sock``; ``on_data`` gets each chunk (on this thread)."""

        def command() -> None:
            self._selector.register(sock, selectors.EVENT_READ, on_data)

        self._call(command)

    def remove(self, sock: socket.socket, then: Callable[[], None]) -> None:
        """Stop reading ``sock``, run ``then`` on the reader thread, and wait for it.

        ``then`` is where the socket may be closed safely.
        """
        done = threading.Event()

        def command() -> None:
            try:
                if sock.fileno() != -1:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(sock)
                then()
            finally:
                done.set()

        self._call(command)
        if threading.current_thread() is not self._thread:
            done.wait()

    def close(self) -> None:
        """Stop the thread (after running what was asked of it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the loop -----------------------------------------------------------

    def _call(self, command: Callable[[], None]) -> None:
        with self._lock:
            if not self._closed:
                self._commands.append(command)
                queued = True
            else:
                queued = False
        if queued:
            self._wake()
        else:
            command()  # the loop is gone: nothing can race with us any more

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        finally:
            self._drain_commands()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _loop_once(self) -> bool:
        for key, _ in self._selector.select():
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
                self._drain_commands()
                if self._closed:
                    return False
                continue
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            try:
                keep = key.data(data)
            except Exception:
                logger.exception("reader callback failed; dropping the socket")
                keep = False
            if not keep or not data:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
        return True

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command()
            except Exception:
                logger.exception("reader command failed")
