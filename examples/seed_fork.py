"""The fork example from Passenger's ApplicationPoolServer docs, in Python.

The parent creates the server and forks children, as a prefork web server
would. Each child connects, detaches, checks out a session on the app, reads
the line the (fake) application process greets it with, and exits with
``os._exit``. With ``max_pool_size=2`` and four children, some gets wait in
the server's queue until another child closes its session.

``FakeSpawner`` (from :mod:`actorpool.testing`) stands in for real
application processes: each instance is a small listener inside the server
process that answers a connection with ``"<app_root> <pid>"``.

Run it with ``python examples/seed_fork.py``.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

from actorpool import ApplicationPoolServer, PoolConfig
from actorpool.testing import FakeSpawner

APP_ROOT = "/home/webapps/foo"
CHILDREN = 4


def read_line(sock: socket.socket) -> bytes:
    """Read up to and including the first newline."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def child(server: ApplicationPoolServer, number: int) -> None:
    # Connect to the server. After connection, we have an ApplicationPool.
    pool = server.connect()
    # The child does not run the server, so it lets go of the connect channel.
    server.detach()
    with pool.get(APP_ROOT) as session:
        line = read_line(session.socket).decode().strip()
        print(
            f"child {number} (pid {os.getpid()}): session {session.id} "
            f"on process {session.pid}: {line!r}",
            flush=True,
        )
    pool.close()


def main() -> int:
    config = PoolConfig(max_pool_size=2)
    with (
        FakeSpawner() as spawner,
        ApplicationPoolServer(config, spawner=spawner) as server,
    ):
        print(f"pool server running as pid {server.pid}", flush=True)
        children = []
        for number in range(1, CHILDREN + 1):
            pid = os.fork()
            if pid == 0:  # child process
                status = 1
                try:
                    child(server, number)
                    status = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(status)
            children.append(pid)  # parent process

        failed = 0
        for pid in children:
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0

        # Only now that every child is done does the parent connect itself.
        with server.connect() as pool:
            print(pool.statistics(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
