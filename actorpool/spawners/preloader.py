"""The preloader of :class:`~actorpool.spawners.SmartSpawner`: one per app root.

Started as a fresh, single-threaded interpreter::

    python -m actorpool.spawners.preloader APP_ROOT CONTROL_FD LIFELINE_FD

It imports the app once, says ``["ready", pid]`` on the control socket (or
``["error", text, traceback]``), then answers each ``["spawn", SOCKET]``
with ``["spawned", pid]`` (or ``["error", text, ""]``): it binds the
socket, forks, and the child serves the app on it. The child shares the
preloader's memory copy-on-write, so the app's code and data are in memory
once however many workers there are.

Workers are forked twice: the middle process exits at once, so a worker is
nobody's child but the server's (which is a child subreaper) and lives on
when its preloader is stopped or restarted. The preloader exits when the
control socket closes (the spawner stopped it) or the lifeline reaches end
of file (the server is gone); a worker exits on the latter too.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

import msgpack

from actorpool.spawners._process import MAX_MESSAGE, die_with_parent, write_message
from actorpool.spawners.worker import (
    LifelineWatch,
    exit_now,
    exit_with_lifeline,
    line_buffered_output,
    listen,
    load_application,
    report_failure,
)
from actorpool.spawners.wsgi import WSGIApp, serve_forever

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run the preloader; see the module's docstring for the arguments."""
    app_root, control_fd, lifeline = argv[0], int(argv[1]), int(argv[2])
    line_buffered_output()  # the workers it forks inherit it
    control = socket.socket(fileno=control_fd)
    try:
        with LifelineWatch(lifeline):
            application = load_application(app_root)
    except BaseException as exc:
        report_failure(control.fileno(), exc)
        return 1
    # Objects that exist now are never looked at by the collector again, so
    # it does not write to (and copy) the pages they share with the workers.
    gc.freeze()
    write_message(control.fileno(), ["ready", os.getpid()])
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
    while True:
        readable, _, _ = select.select([control.fileno(), lifeline], [], [])
        if lifeline in readable:
            return 0
        data = control.recv(65536)
        if not data:
            return 0
        unpacker.feed(data)
        for request in unpacker:
            reply = _spawn(application, request, control, lifeline)
            write_message(control.fileno(), reply)


def _spawn(
    application: WSGIApp, request: Any, control: socket.socket, lifeline: int
) -> list[Any]:
    if not (isinstance(request, list) and len(request) == 2 and request[0] == "spawn"):
        return ["error", f"bad request {request!r:.100}", ""]
    try:
        listener = listen(str(request[1]))
    except OSError as exc:
        return ["error", f"cannot listen on {request[1]}: {exc}", ""]
    pid_r, pid_w = os.pipe()
    # Called on the main thread only: the middle process's death signal
    # fires when the thread that forked it ends, not the process.
    preloader = os.getpid()
    try:
        middle = os.fork()
        if middle == 0:  # the middle process: fork the worker and go
            try:
                # A preloader killed mid-spawn (it was too slow) takes this
                # process along, before it forks a worker nobody would track.
                die_with_parent(preloader)
                os.close(pid_r)
                worker = os.fork()
                if worker == 0:
                    os.close(pid_w)
                    _worker(application, listener, control, lifeline)
                os.write(pid_w, worker.to_bytes(4, "big"))
            finally:
                os._exit(0)
        os.close(pid_w)
        pid_w = -1
        os.waitpid(middle, 0)
        data = os.read(pid_r, 4)
    finally:
        listener.close()
        os.close(pid_r)
        if pid_w != -1:
            os.close(pid_w)
    if len(data) != 4:
        return ["error", "the worker could not be forked", ""]
    return ["spawned", int.from_bytes(data, "big")]


def _worker(
    application: WSGIApp, listener: socket.socket, control: socket.socket, lifeline: int
) -> None:
    """The forked worker: never returns."""
    status = 0
    try:
        control.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own group, so stopping it stops what it starts
        _tag_output()
        exit_with_lifeline(lifeline)
        with listener:
            serve_forever(application, listener, lifeline=lifeline)
    except BaseException:
        status = 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _tag_output() -> None:
    """Prefix each line the worker writes with its pid: its output shares the
    preloader's pipe to the server's log."""
    shared = os.dup(1)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    prefix = f"[worker pid {os.getpid()}] ".encode()

    def copy() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                os.write(shared, prefix + line + b"\n")
        if pending:
            os.write(shared, prefix + pending + b"\n")

    threading.Thread(target=copy, name="actorpool-output", daemon=True).start()


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
