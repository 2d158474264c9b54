"""A command app: a standard-library HTTP server on a Unix socket.

Run as ``python server.py SOCKET_PATH``. It answers every GET with the
``GREETING`` environment variable and a newline, and exits cleanly (status
0, socket file removed) on SIGTERM or SIGINT. ``actorpool.toml`` tells the
pool how to start it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from types import FrameType


class GreetingHandler(BaseHTTPRequestHandler):
    """Answers GET with the greeting, over HTTP/1.1 with keep-alive."""

    # HTTP/1.1 lets one session send several requests on its connection.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = (os.environ.get("GREETING", "hello") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        # On a Unix socket the peer address is "" (or a path), not the
        # (host, port) pair the base class indexes into.
        return "unix"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A line on stderr per successful request is noise in the pool's log;
        # failures (and log_error's messages, which bypass this) still show.
        if isinstance(code, int) and code < 400:
            return
        super().log_request(code, size)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, so a held keep-alive session blocks no one."""

    # Threads of open connections must not keep the process alive on SIGTERM.
    daemon_threads = True
    block_on_close = False


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Raised in the main thread, this unwinds serve_forever() and the with
    # block below; server.shutdown() would deadlock here, as it waits for
    # the very loop this handler interrupted.
    sys.exit(0)


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} SOCKET_PATH", file=sys.stderr)
        return 2
    path = sys.argv[1]
    # A socket file left by a previous run that died would make bind() fail.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        with Server(path, GreetingHandler) as server:
            server.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
