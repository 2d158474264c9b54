"""Application processes for the benchmarks: tiny echo servers, one per process.

The pool under test and its baselines hand out sessions on the same kind of
process, so the comparison is about the pool, not the app. Each instance is
a fresh interpreter that listens on a Unix socket, echoes what it is sent,
says ``ready`` on its stdout, and exits when its stdin (held by whoever
started it) closes, so it never outlives the pool.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from actorpool import Instance, Spawner, SpawnError, SpawnRequest

ECHO_SERVER = r"""
import os, selectors, socket, sys
os.sched_setaffinity(0, range(os.cpu_count()))  # do not inherit a pinned server's CPU
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(512)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
selector.register(sys.stdin, selectors.EVENT_READ)
os.write(1, b"ready\n")
while True:
    for key, _ in selector.select():
        if key.fileobj is listener:
            conn, _ = listener.accept()
            selector.register(conn, selectors.EVENT_READ)
        elif key.fileobj is sys.stdin:
            sys.exit(0)
        else:
            data = key.fileobj.recv(65536)
            if data:
                key.fileobj.sendall(data)
            else:
                selector.unregister(key.fileobj)
                key.fileobj.close()
"""


class EchoProcess:
    """A running echo-server process (an :class:`actorpool.Instance`)."""

    def __init__(self, address: str, concurrency: int = 1) -> None:
        self.address = address
        self.concurrency = concurrency
        self._process = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pid = self._process.pid
        assert self._process.stdout is not None
        if self._process.stdout.readline() != b"ready\n":
            self._process.wait()
            raise SpawnError(f"echo server at {address} did not start")
        self._process.stdout.close()

    def stop(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()

    def wait(self) -> None:
        self._process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)


class EchoSpawner(Spawner):
    """Spawns :class:`EchoProcess` instances for the pool under test."""

    def __init__(self, concurrency: int = 1) -> None:
        self.concurrency = concurrency

    def spawn(self, request: SpawnRequest) -> Instance:
        address = os.path.join(request.socket_dir, f"echo-{request.instance_id}.sock")
        return EchoProcess(address, self.concurrency)
