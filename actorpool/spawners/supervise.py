"""The supervisor of a command app (``actorpool.toml``): one per process.

Started by the spawner as a fresh interpreter in a session of its own::

    python -m actorpool.spawners.supervise SOCKET READY LIFELINE UID GID -- ARGV...

A command (gunicorn, uvicorn, a program in another language) knows nothing of
the lifeline, so this small process stands between: it starts the command
(as ``UID``/``GID`` when they are not -1), says ``["ready", pid]`` on
``READY`` once the command's socket accepts a connection (``["error",
text, ""]`` if the command exits first), then waits. When the lifeline
reaches end of file, whether the command is ready yet or not, it stops the
command; when the command exits, so does the supervisor. Either way, what
the command started in its process group (a wrapper script's server, say)
is stopped too. The command gets SIGKILL from the kernel if the supervisor
itself is killed (``PR_SET_PDEATHSIG``).
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
import time

from actorpool.spawners._process import (
    KILL_GRACE,
    die_with_parent,
    groups_of,
    write_message,
)

__all__ = ["main"]

READY_POLL = 0.02
"""Seconds between two attempts to connect to a starting command's socket."""

GROUP_POLL = 0.05
"""Seconds between two looks at what is left of the process group."""


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
                _stop_the_rest_of_the_group()  # what it left behind
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
    """Stop the command and whatever it started in this process group."""
    # The group's SIGTERM is for the command's processes, not for us (the
    # spawner's own stop sends it to the whole group as well).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    try:
        child.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    _stop_the_rest_of_the_group()


def _stop_the_rest_of_the_group() -> None:
    """SIGTERM, then SIGKILL after :data:`KILL_GRACE`, to every other process
    of this process group (the spawner started the supervisor in a session
    of its own, and the command is in it): a command's children would
    otherwise run on, untracked, after the command is gone."""
    others = _others_in_group()
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while others and time.monotonic() < deadline:
        time.sleep(GROUP_POLL)
        others = _others_in_group()
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _others_in_group() -> list[int]:
    """The running processes of this process group, this one left out."""
    me, group = os.getpid(), os.getpgid(0)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # After the command name: state, ppid, pgrp, ...
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry))
    return found


def _die_with_parent(parent: int) -> None:
    # Runs in the child after it has switched users (a later switch would
    # clear the setting) and before exec, in this single-threaded process.
    die_with_parent(parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
