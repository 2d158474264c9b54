"""The bundled worker: one application process serving a ``passenger_wsgi.py`` app.

Started by :class:`~actorpool.spawners.DirectSpawner` as a fresh interpreter::

    python -m actorpool.spawners.worker APP_ROOT SOCKET READY_FD LIFELINE_FD

It loads the app, listens on ``SOCKET``, says ``["ready", pid]`` on
``READY_FD`` (or ``["error", text, traceback]`` if the app failed to load)
and serves HTTP/1.1 on the socket, one connection at a time, until the
lifeline reaches end of file (the server is gone) or it is sent SIGTERM.

The preloader of :class:`~actorpool.spawners.SmartSpawner` uses
:func:`load_application` and :func:`listen` from here, then forks.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import traceback
import types
from typing import Any

from actorpool.spawners.approot import WSGI_FILE
from actorpool.spawners.wsgi import WSGIApp

__all__ = [
    "LifelineWatch",
    "LoadError",
    "exit_now",
    "exit_with_lifeline",
    "line_buffered_output",
    "listen",
    "load_application",
    "main",
    "report_failure",
]


class LoadError(Exception):
    """The app could not be loaded; ``args[0]`` says why, ``traceback`` how."""

    def __init__(self, message: str, traceback_text: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback_text


def load_application(app_root: str) -> WSGIApp:
    """Import ``APP_ROOT/passenger_wsgi.py`` as Passenger does and return its
    ``application``: the app root becomes the working directory and the
    first entry of ``sys.path``."""
    os.chdir(app_root)
    sys.path.insert(0, app_root)
    path = os.path.join(app_root, WSGI_FILE)
    # Compiled from source every time, never from __pycache__: a .pyc is
    # trusted when the source's mtime (in whole seconds) and size match, so an
    # edit of the same size within a second of the last load would be missed
    # on restart.
    module = types.ModuleType("passenger_wsgi")
    module.__file__ = path
    sys.modules["passenger_wsgi"] = module
    try:
        with open(path, "rb") as file:
            code = compile(file.read(), path, "exec")
        exec(code, module.__dict__)
    except BaseException as exc:
        raise LoadError(
            f"{path} raised {type(exc).__name__}: {exc}", traceback.format_exc()
        ) from exc
    application = getattr(module, "application", None)
    if not callable(application):
        raise LoadError(f"{path} does not define a callable `application`")
    return application  # type: ignore[no-any-return]


class LifelineWatch:
    """While the app loads, end the process if the server goes away.

    Loading may take a minute, or never end (an import waiting on a
    database); the serving loop watches the lifeline only once it runs. A
    thread watches it meanwhile, and is gone again when the block ends, so a
    preloader is single-threaded by the time it forks.
    """

    def __init__(self, lifeline: int) -> None:
        self._lifeline = lifeline
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._watch, name="actorpool-lifeline", daemon=True
        )

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *_exc: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _watch(self) -> None:
        # poll, not select: the lifeline's number may be past 1024.
        poller = select.poll()
        poller.register(self._lifeline, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        if any(fd == self._lifeline for fd, _ in poller.poll()):
            os._exit(1)  # the server is gone: nobody is waiting for this app


def exit_with_lifeline(lifeline: int) -> None:
    """End the process as soon as the lifeline reaches end of file (the pool
    server is gone), whatever it is doing then.

    The serving loop watches the lifeline only between requests: a request
    busy in the app's code, or threads the app started, would otherwise keep
    the process alive after the server. A daemon thread watches it the
    whole time.
    """

    def watch() -> None:
        poller = select.poll()
        poller.register(lifeline, select.POLLIN)
        poller.poll()  # nobody writes to it: readable means end of file
        exit_now(0)

    threading.Thread(target=watch, name="actorpool-lifeline", daemon=True).start()


def exit_now(status: int) -> None:
    """Flush what the app printed and end the process at once, without
    waiting for threads the app started (interpreter shutdown joins them)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def listen(path: str) -> socket.socket:
    """A Unix stream socket listening at ``path`` (a stale file is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener


def report_failure(fd: int, exc: BaseException) -> None:
    """Say on ``fd`` why the start failed, and print it to the log too."""
    from actorpool.spawners._process import write_message

    if isinstance(exc, LoadError):
        text, trace = exc.args[0], exc.traceback
    else:
        text, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    # The spawner kills the process as soon as it has the report, so what
    # the app printed must be out of stdout's buffer (a pipe's is not flushed
    # per line) before the report goes.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(trace or text, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        write_message(fd, ["error", text, trace])


def line_buffered_output() -> None:
    """Make stdout and stderr (pipes to the server's log) line-buffered: a
    pipe's are block-buffered, which held what the app printed back until
    8 KiB had piled up, and lost it when the process was stopped."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def main(argv: list[str]) -> int:
    """Run the worker; see the module's docstring for the arguments."""
    from actorpool.spawners._process import write_message
    from actorpool.spawners.wsgi import serve_forever

    line_buffered_output()

    app_root, socket_path, ready, lifeline = (
        argv[0],
        argv[1],
        int(argv[2]),
        int(argv[3]),
    )
    try:
        with LifelineWatch(lifeline):
            application = load_application(app_root)
        listener = listen(socket_path)
    except BaseException as exc:
        report_failure(ready, exc)
        return 1
    write_message(ready, ["ready", os.getpid()])
    os.close(ready)
    exit_with_lifeline(lifeline)
    with listener:
        serve_forever(application, listener, lifeline=lifeline)
    return 0


def _entry() -> Any:
    exit_now(main(sys.argv[1:]))


if __name__ == "__main__":
    _entry()
