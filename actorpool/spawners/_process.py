"""What the real spawners share: the lifeline, socket directories, output
capture, the ready message and the instances they hand back.

Every process a spawner starts gets the read end of the *lifeline*, a pipe
whose write end only the server process holds. When the server goes away,
however it goes (``close()``, a crash, SIGKILL), the kernel closes that write
end, the read end reports end of file, and every worker, preloader and
supervisor exits. No signal needs sending and no process needs to outlive
the server to send it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import math
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

import msgpack

from actorpool._poll import poll_ms
from actorpool.errors import SpawnError
from actorpool.spawners.approot import RunAs

__all__ = [
    "KILL_GRACE",
    "Lifeline",
    "OutputLog",
    "PidfdInstance",
    "PopenInstance",
    "SocketDirs",
    "die_with_parent",
    "groups_of",
    "read_message",
    "write_message",
]

logger = logging.getLogger("actorpool.app")

KILL_GRACE = 1.0
"""Seconds a stopped process has between SIGTERM and SIGKILL."""

OUTPUT_TAIL = 40
"""Lines of an instance's output kept for the SpawnError of a failed start."""

MAX_MESSAGE = 1 << 20
"""Largest message a child may send on its ready or control channel."""


class Lifeline:
    """A pipe whose write end only the server holds (see the module's docstring)."""

    def __init__(self) -> None:
        # os.pipe() descriptors are close-on-exec: a child gets the read end
        # only through pass_fds, and the write end never.
        self.read_fd, self._write_fd = os.pipe()

    def close(self) -> None:
        """Cut the lifeline: every process holding the read end exits."""
        for fd in (self._write_fd, self.read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class SocketDirs:
    """Where instance sockets go: the server's private directory, or one per
    user when a root server runs apps as other users (they cannot enter the
    server's 0700 directory, and must not share theirs with another user)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._by_uid: dict[int, str] = {}

    def for_user(self, user: RunAs | None) -> str:
        """The directory for sockets of processes running as ``user``."""
        if user is None:
            return self.base
        with self._lock:
            path = self._by_uid.get(user.uid)
            if path is None:
                path = tempfile.mkdtemp(  # mode 0700
                    prefix=f"actorpool-{os.getpid()}-{user.name}-",
                    dir=os.path.dirname(self.base),
                )
                os.chown(path, user.uid, user.gid)
                self._by_uid[user.uid] = path
            return path

    def close(self) -> None:
        """Remove the per-user directories (the server removes its own)."""
        with self._lock:
            paths = list(self._by_uid.values())
            self._by_uid.clear()
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


class OutputLog:
    """Logs what a process writes, line by line, tagged with app and pid, and
    keeps the last lines for the error of a start that fails."""

    def __init__(self, fd: int, app_root: str, what: str) -> None:
        self.app_root = app_root
        self.pid = 0
        self._what = what
        self._tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(fd,), name="actorpool-output", daemon=True
        )
        self._thread.start()

    def tail(self, wait: float = 0.0) -> str:
        """The last lines so far; waits up to ``wait`` s for the end of output."""
        self._done.wait(wait)
        return "\n".join(self._tail)

    def _run(self, fd: int) -> None:
        try:
            with open(fd, "rb", buffering=0, closefd=True) as stream:
                pending = b""
                while chunk := stream.read(65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        self._log(line)
                if pending:
                    self._log(pending)
        finally:
            self._done.set()

    def _log(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._tail.append(line)
        logger.info("%s %s pid %d: %s", self.app_root, self._what, self.pid, line)


def write_message(fd: int, message: list[Any]) -> None:
    """Write one msgpack message to a pipe or socket descriptor."""
    data = msgpack.packb(message, use_bin_type=True)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_message(fd: int, deadline: float, unpacker: Any = None) -> list[Any] | None:
    """Read one msgpack message (a list) from ``fd`` by ``deadline``.

    None at end of file; :class:`TimeoutError` when the deadline passes.
    Pass the same ``unpacker`` for every read of one stream.
    """
    if unpacker is None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
    while True:
        try:
            message = next(unpacker)
        except StopIteration:
            pass
        except (msgpack.UnpackException, ValueError) as exc:  # not msgpack at all
            raise SpawnError(f"bad message from a child process: {exc}") from exc
        else:
            if not isinstance(message, list) or not message:
                raise SpawnError(f"bad message from a child process: {message!r:.200}")
            return message
        remaining = None if deadline == math.inf else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        if _readable(fd, remaining):
            data = os.read(fd, 65536)
            if not data:
                return None
            try:
                unpacker.feed(data)
            except msgpack.BufferFull as exc:
                raise SpawnError("a child process sent an oversized message") from exc


def _readable(fd: int, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable, at most ``timeout`` seconds (None: for
    ever). poll, not select: the server holds a socket per client and two
    descriptors per process, and select() refuses numbers past 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if timeout is None:
        return bool(poller.poll())
    return bool(poller.poll(poll_ms(timeout)))


class PopenInstance:
    """A process the server started itself (a direct worker, a supervisor).

    Its process group is its own (``start_new_session``), so stopping it
    reaches whatever it started too.
    """

    concurrency = 1

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        pid: int,
        address: str,
        output: OutputLog | None,
    ) -> None:
        self.pid = pid
        self.address = address
        self._process = process
        self._output = output
        self._killer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<PopenInstance pid={self.pid} address={self.address!r}>"

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after :data:`KILL_GRACE`."""
        if self._process.returncode is not None or self._killer is not None:
            return
        self._signal_group(signal.SIGTERM)
        self._killer = threading.Timer(
            KILL_GRACE, self._signal_group, args=(signal.SIGKILL,)
        )
        self._killer.daemon = True
        self._killer.start()

    def wait(self) -> None:
        """Block until the process has exited; clean up after it."""
        self._process.wait()
        if self._killer is not None:
            self._killer.cancel()
        # Its children (a command app's workers, say) go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(self.address)

    def _signal_group(self, signum: int) -> None:
        # Popen.poll() reaps; once the process is reaped its pid (the group id)
        # may be reused, so only signal while it is still unreaped.
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signum)


class PidfdInstance:
    """A process the server did not start (a smart worker, forked by its
    preloader), watched and signalled through a pidfd so that a reused pid
    can never be hit."""

    concurrency = 1

    def __init__(self, pid: int, address: str) -> None:
        self.pid = pid
        self.address = address
        self._pidfd = os.pidfd_open(pid)
        self._lock = threading.Lock()
        self._exited = False
        self._killer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<PidfdInstance pid={self.pid} address={self.address!r}>"

    def stop(self) -> None:
        """SIGTERM, SIGKILL after :data:`KILL_GRACE`."""
        with self._lock:
            if self._exited or self._killer is not None:
                return
            self._killer = threading.Timer(
                KILL_GRACE, self._signal, args=(signal.SIGKILL,)
            )
            self._killer.daemon = True
        self._signal(signal.SIGTERM)
        self._killer.start()

    def wait(self) -> None:
        """Block until the process has exited (and reap it if it is ours)."""
        self.wait_for(None)

    def wait_for(self, timeout: float | None) -> bool:
        """:meth:`wait`, for at most ``timeout`` seconds (None: for ever);
        whether the process has exited."""
        if not _readable(self._pidfd, timeout):
            return False
        # The server is a child subreaper, so a smart worker whose preloader
        # let go of it is the server's to reap.
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        self.forget()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        return True

    def forget(self) -> None:
        """Let go of the process (once it has exited, or when it will not):
        its pidfd is closed, and a SIGKILL :meth:`stop` has timed is not
        sent. Neither waits nor signals are possible after it."""
        with self._lock:
            if self._exited:
                return
            self._exited = True
            if self._killer is not None:
                self._killer.cancel()
            os.close(self._pidfd)

    def _signal(self, signum: int) -> None:
        with self._lock:
            if self._exited:
                return
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise


def user_env(user: RunAs | None) -> dict[str, str]:
    """The environment of a process running as ``user``."""
    env = dict(os.environ)
    if user is not None:
        env.update(user.env())
    return env


def popen_user_args(user: RunAs | None) -> dict[str, Any]:
    """Popen arguments that run the child as ``user`` (set in the child
    before exec, so no Python runs in between)."""
    if user is None:
        return {}
    return {
        "user": user.uid,
        "group": user.gid,
        "extra_groups": groups_of(user.uid, user.gid),
    }


PR_SET_PDEATHSIG = 1
"""prctl() option: a signal for this process when its parent dies."""

# Looked up now, in the parent: in a child forked from a process with other
# threads, dlopen() may wait for ever on a loader lock one of them held.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies; exit now
    if it has died already (before the prctl, which would then never fire).

    For a child just forked: the setting is not inherited by its own
    children, and a later switch of user clears it.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def groups_of(uid: int, gid: int) -> list[int]:
    """The groups a process running as ``uid`` has, as a login would give it:
    ``gid`` and every group the user is a member of. Shared by WSGI workers
    and the supervisor's command, so that both kinds of app get the same."""
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:  # a uid with no passwd entry
        return [gid]
