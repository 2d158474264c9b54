"""The supervisor of a command app (``actorpool.toml``): one per process.

Started by the spawner as a fresh interpreter in a session of its own::

    python -m actorpool.spawners.supervise SOCKET READY LIFELINE UID GID -- ARGV...

A command (gunicorn, uvicorn, a program in another language) knows nothing of
the lifeline, so this small process stands between: it starts the command
(as ``UID``/``GID`` when they are not -1), says ``["ready", pid]`` on
``READY`` once the command's socket accepts a connection (``["error",
text, ""]`` if the command exits first), then waits. When the lifeline
reaches end of file, whether the command is ready yet or not, it stops the
command; when the command exits, so does the supervisor. The command gets
SIGKILL from the kernel if the supervisor itself is killed
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import socket
import subprocess
import sys

from actorpool.spawners._process import (
    KILL_GRACE,
    die_with_parent,
    groups_of,
    write_message,
)

__all__ = ["main"]

READY_POLL = 0.02
"""Seconds between two attempts to connect to a starting command's socket."""


def main(argv: list[str]) -> int:
    """Run the supervisor; see the module's docstring for the arguments."""
    socket_path, ready, lifeline = argv[0], int(argv[1]), int(argv[2])
    uid, gid = int(argv[3]), int(argv[4])
    command = argv[argv.index("--") + 1 :]
    user: dict[str, object] = {}
    if uid != -1:
        # The user's supplementary groups as well, as for a WSGI worker.
        user = {"user": uid, "group": gid, "extra_groups": groups_of(uid, gid)}
    try:
        child = subprocess.Popen(  # type: ignore[call-overload]
            command, preexec_fn=functools.partial(_die_with_parent, os.getpid()), **user
        )
    except OSError as exc:
        write_message(ready, ["error", f"cannot run {command[0]!r}: {exc}", ""])
        return 1
    # SIGTERM to the supervisor alone (not its group) still stops the command.
    signal.signal(signal.SIGTERM, lambda *_: _terminate(child))
    pidfd = os.pidfd_open(child.pid)
    while not _accepts(socket_path):
        # Between two attempts, watch the lifeline too: a server that dies
        # while the command starts (or never listens) must not leave it.
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select([lifeline, pidfd], [], [], READY_POLL)
            if lifeline in readable:
                _terminate(child)
                return 0
        if child.poll() is not None:
            write_message(
                ready,
                [
                    "error",
                    f"{command[0]} exited with status {child.returncode} "
                    f"before it listened on {socket_path}",
                    "",
                ],
            )
            return 1
    write_message(ready, ["ready", child.pid])
    os.close(ready)
    while True:
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select([lifeline, pidfd], [], [])
            if pidfd in readable:
                status: int = child.wait()
                return status & 0xFF
            if lifeline in readable:
                _terminate(child)
                return 0


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _terminate(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _die_with_parent(parent: int) -> None:
    # Runs in the child after it has switched users (a later switch would
    # clear the setting) and before exec, in this single-threaded process.
    die_with_parent(parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
