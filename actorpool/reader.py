"""SocketReader: reading every client socket without a thread hand-off.

A request's trip through the server used to be: a reader thread wakes on
the socket, decodes, and tells the registry, whose thread wakes in turn.
Measured on the reference machine, that second wake-up (and the trip
through the GIL that comes with it) cost more than everything else the
server does for a get. So the sockets are read by the thread that needs the
requests: a :class:`SocketReader` is the **registry actor's inbox**. pykka
calls :meth:`~SocketReader.get` for the next message; while none is queued, the inbox
waits in ``epoll`` on the client sockets and on a wake-up socket that
:meth:`~SocketReader.put` (a ``tell`` from another thread) writes to. Each chunk read is
passed to its socket's callback, which decodes it and tells the registry,
that is, appends to this very inbox, with no system call and no wake-up.

Outside the registry (an actor-level test, say), :meth:`~SocketReader.start` runs the
same loop on a thread of its own.

Registering and removing sockets run on the loop's thread too, so a socket
is never closed while the loop may still ``recv`` on its descriptor (which a
reused descriptor number would turn into reading someone else's
connection).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["OnData", "SocketReader"]

logger = logging.getLogger(__name__)

OnData = Callable[[bytes], bool]
"""Called on the loop's thread with each chunk read (``b""``: end of stream);
returning False stops reading that socket."""

_RECV_SIZE = 64 * 1024

REMOVE_TIMEOUT = 10.0
"""Seconds :meth:`SocketReader.remove` waits for the loop before giving up."""


class SocketReader:
    """An inbox (``put``/``get``/``empty``) that also reads sockets while idle."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._items: deque[Any] = deque()
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._woken = False  # a wake-up byte is on its way: no need for another
        self._closed = False  # asked to stop
        self._stopped = False  # the loop has stopped reading
        self._loop_thread: threading.Thread | None = None
        self._loop_ident: int | None = None  # get_ident() of _loop_thread, cheaper
        self._own_thread: threading.Thread | None = None
        self.on_broken: Callable[[Exception], None] | None = None
        """Told, on the loop's thread, of an error that broke the loop itself
        (not one socket's callback, which costs only that socket). It should
        queue something that makes the owner fail; without it, :meth:`get`
        raises the error."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<SocketReader {state} queued={len(self._items)} "
            f"sockets={len(self._selector.get_map()) - 1}>"
        )

    # --- the inbox protocol pykka uses --------------------------------------

    def put(self, item: Any) -> None:
        """Queue ``item``; wakes the loop unless called from it."""
        with self._lock:
            self._items.append(item)
            wake = not self._woken and threading.get_ident() != self._loop_ident
            if wake:
                self._woken = True
        if wake:
            self._wake()

    def get(self) -> Any:
        """The next queued item; reads sockets and runs commands until one comes."""
        if self._loop_ident != threading.get_ident():  # the first call
            self._loop_thread = threading.current_thread()
            self._loop_ident = threading.get_ident()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
            try:
                self._poll()
            except Exception as error:
                # pykka calls get() outside its own try: raised from here,
                # the error would end the actor's thread with no on_failure,
                # and the actor would look alive with nobody serving.
                if self.on_broken is None:
                    raise
                self.on_broken(error)

    def empty(self) -> bool:
        """Whether no item is queued."""
        return not self._items

    # --- sockets --------------------------------------------------------------

    def add(self, sock: socket.socket, on_data: OnData) -> None:
        """Start reading ``sock``; ``on_data`` gets each chunk, on the loop's thread."""

        def command() -> None:
            self._selector.register(sock, selectors.EVENT_READ, on_data)

        self._call(command)

    def remove(self, sock: socket.socket, then: Callable[[], None]) -> None:
        """Stop reading ``sock``, run ``then`` on the loop's thread, wait for it.

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
        if threading.current_thread() is not self._loop_thread and not done.wait(
            REMOVE_TIMEOUT
        ):
            logger.error("the socket reader did not answer; %r is left open", sock)

    # --- running on a thread of its own, and closing -----------------------------

    def start(self, name: str = "actorpool-reader") -> SocketReader:
        """Run the loop on a new thread (when this is nobody's inbox)."""
        self._own_thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._loop_thread = self._own_thread
        self._own_thread.start()
        return self

    def close(self) -> None:
        """Stop reading; commands still pending run now. Idempotent.

        From then on :meth:`remove` runs its command at once, on the caller's
        thread: nothing reads any more, so nothing can race with it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        own = self._own_thread
        if own is not None and own is not threading.current_thread():
            self._wake()
            own.join()
        else:
            self._stop_loop()

    def _serve(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            while not self._closed:
                self._poll()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        # Only once the loop reads no more may commands run on other threads;
        # until then (closed, but still in _poll) they queue, and are run here.
        with self._lock:
            self._stopped = True
        self._drain_commands()
        self._release()

    def _release(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the loop ----------------------------------------------------------------

    def _call(self, command: Callable[[], None]) -> None:
        with self._lock:
            queued = not self._stopped
            if queued:
                self._commands.append(command)
                wake = (
                    not self._woken
                    and threading.current_thread() is not self._loop_thread
                )
                if wake:
                    self._woken = True
        if not queued:
            command()  # the loop is gone: nothing can race with us any more
        elif wake:
            self._wake()
        elif threading.current_thread() is self._loop_thread:
            self._drain_commands()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _poll(self) -> None:
        for key, _ in self._selector.select():
            if key.data is None:
                # Drain first, then clear the flag: a put that comes in
                # between finds the flag still set and sends no byte, but its
                # item or command is already queued and is seen below (or by
                # get()). The other order can lose a wake-up for good.
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(4096)
                with self._lock:
                    self._woken = False
                self._drain_commands()
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
