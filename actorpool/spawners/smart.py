"""SmartSpawner: one preloader per app imports the app once and forks workers.

Passenger offers this "smart spawning" for Ruby only. A worker forked from a
preloader starts in about the time a ``fork()`` takes, however slow the app's
import, and shares the imported code and data with its siblings
copy-on-write. Command apps (``actorpool.toml``) cannot be preloaded; they
are started directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from actorpool.errors import ConfigError, SpawnError
from actorpool.spawner import Instance, Spawner, SpawnRequest
from actorpool.spawners._process import (
    KILL_GRACE,
    MAX_MESSAGE,
    Lifeline,
    OutputLog,
    PidfdInstance,
    SocketDirs,
    popen_user_args,
    read_message,
    user_env,
    write_message,
)
from actorpool.spawners.approot import AppSpec, RunAs, load_app_spec, run_as
from actorpool.spawners.direct import (
    KILLED_OUTPUT_WAIT,
    _as,
    socket_path,
    start_direct,
)

__all__ = ["SmartSpawner"]

logger = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


class _Subreaper:
    """This process's child-subreaper flag, held by every started
    SmartSpawner and set back as it was found when the last one closes.

    The flag is the process's, not a spawner's: a library that sets it must
    not leave it set (a test process would adopt every orphan of its
    children, and they would stay its zombies).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._set_by_us = False

    def hold(self) -> None:
        with self._lock:
            if not self._holders:
                libc = ctypes.CDLL(None, use_errno=True)
                was = ctypes.c_int(0)
                if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0):
                    raise OSError(
                        ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER) failed"
                    )
                if not was.value and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
                    raise OSError(
                        ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed"
                    )
                self._set_by_us = not was.value
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if not self._holders and self._set_by_us:
                # Children it adopted meanwhile stay its own: only orphans
                # from now on go to init, as before.
                ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
                self._set_by_us = False

    def forked(self) -> None:
        # fork() does not pass the flag on: a child starts with no holder
        # (its copies of the parent's spawners are the parent's business).
        self._lock = threading.Lock()
        self._holders = 0
        self._set_by_us = False


_subreaper = _Subreaper()
os.register_at_fork(after_in_child=_subreaper.forked)


class SmartSpawner(Spawner):
    """Forks application processes from one preloader per app.

    The preloader is started (fresh and single-threaded) by the first spawn
    of its app, restarted when the app restarts (``tmp/restart.txt`` or
    ``restart_app``), and stopped once no spawn has needed it for
    ``max_preloader_idle_time`` seconds (0: never). Workers outlive their
    preloader: stopping it stops no worker.
    """

    def __init__(self, *, max_preloader_idle_time: float = 300.0) -> None:
        if (
            isinstance(max_preloader_idle_time, bool)
            or not isinstance(max_preloader_idle_time, int | float)
            or not math.isfinite(max_preloader_idle_time)
            or max_preloader_idle_time < 0
        ):
            raise ConfigError(
                "max_preloader_idle_time must be a finite number >= 0, "
                f"not {max_preloader_idle_time!r}"
            )
        self.max_preloader_idle_time = float(max_preloader_idle_time)
        self._live: _Live | None = None

    def __repr__(self) -> str:
        return f"SmartSpawner(max_preloader_idle_time={self.max_preloader_idle_time})"

    def __getstate__(self) -> dict[str, object]:
        return {"max_preloader_idle_time": self.max_preloader_idle_time}

    def __setstate__(self, state: dict[str, float]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def start(self, socket_dir: str) -> None:
        if self._live is not None:
            raise RuntimeError("this SmartSpawner is started already")
        # A worker's preloader lets go of it at once (a double fork), so the
        # server must be the one to adopt and reap it.
        _subreaper.hold()
        try:
            self._live = _Live(SocketDirs(socket_dir), Lifeline())
        except BaseException:
            _subreaper.release()
            raise

    def spawn(self, request: SpawnRequest) -> Instance:
        live = self._live
        if live is None:
            raise SpawnError("the spawner was not started (or is closed)")
        spec = load_app_spec(request.app_root)
        user = run_as(spec, request.user)
        address = socket_path(live.dirs.for_user(user), request.instance_id)
        if not spec.is_wsgi:
            return start_direct(spec, user, address, request.timeout, live.lifeline)
        deadline = time.monotonic() + request.timeout
        preloader = self._preloader(live, spec, user, deadline)
        try:
            pid = preloader.fork(address, deadline)
        finally:
            with live.lock:
                preloader.users -= 1
                if not preloader.users:  # idle from now on
                    preloader.touch()
        return PidfdInstance(pid, address)

    def app_restarted(self, app_root: str) -> None:
        if self._live is not None:
            with self._live.lock:
                preloader = self._live.preloaders.pop(app_root, None)
            if preloader is not None:
                logger.info("restarting the preloader of %s", app_root)
                preloader.stop(why="its app restarted")

    def close(self) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        try:
            with live.lock:
                preloaders = list(live.preloaders.values())
                live.preloaders.clear()
            for preloader in preloaders:
                preloader.stop(why="the spawner closed")
            for preloader in preloaders:
                preloader.join()
            live.lifeline.close()
            live.dirs.close()
        finally:
            _subreaper.release()

    def _preloader(
        self, live: _Live, spec: AppSpec, user: RunAs | None, deadline: float
    ) -> _Preloader:
        with live.lock:
            if self._live is not live:
                # close() has stopped every preloader it found: one made now
                # would be left running, and this spawn waiting for it.
                raise SpawnError("the spawner was closed")
            preloader = live.preloaders.get(spec.app_root)
            if preloader is None or not preloader.usable(user):
                if preloader is not None:
                    preloader.stop()
                preloader = _Preloader(
                    spec, user, live.lifeline, self.max_preloader_idle_time, self._idle
                )
                live.preloaders[spec.app_root] = preloader
            # Held until the fork is done: a preloader still loading, or
            # forking, is not idle, however long that takes.
            preloader.users += 1
        try:
            preloader.wait_ready(deadline)
        except SpawnError:
            with live.lock:
                preloader.users -= 1
                if live.preloaders.get(spec.app_root) is preloader:
                    del live.preloaders[spec.app_root]
            # Spawns still waiting for it are told why (a failed load has
            # already told them its own error).
            preloader.stop(kill=True, why="it did not load within spawn_timeout")
            raise
        return preloader

    def _idle(self, preloader: _Preloader) -> None:
        live = self._live
        if live is None:
            return
        with live.lock:
            if live.preloaders.get(preloader.app_root) is not preloader:
                return
            if preloader.users:
                # A spawn holds it (it may still be loading): the last spawn
                # to let go arms the timer again, so none ticks meanwhile.
                return
            if not preloader.idle_for(self.max_preloader_idle_time):
                preloader.touch()  # used since the timer was set: look again later
                return
            del live.preloaders[preloader.app_root]
        logger.info("stopping the idle preloader of %s", preloader.app_root)
        preloader.stop()


class _Live:
    """A started SmartSpawner's state (never pickled)."""

    def __init__(self, dirs: SocketDirs, lifeline: Lifeline) -> None:
        self.dirs = dirs
        self.lifeline = lifeline
        self.lock = threading.Lock()
        self.preloaders: dict[str, _Preloader] = {}


LATE_ANSWER_WAIT = 2 * KILL_GRACE
"""Seconds to wait for the answer to a fork that timed out, so as to stop
the worker it names, before the preloader is killed."""


def _is_fork_reply(reply: list[Any]) -> bool:
    """Whether a preloader's reply to ``spawn`` is one it sends."""
    if reply[0] == "spawned":
        return len(reply) == 2 and type(reply[1]) is int and reply[1] > 0
    # ["error", text, traceback]: the fork failed, the preloader is fine
    return reply[0] == "error" and len(reply) == 3 and isinstance(reply[1], str)


class _Preloader:
    """One running preloader process and the control socket to it.

    It is started at once and waited for by whichever spawns need it; its
    control socket carries one request at a time.
    """

    def __init__(
        self,
        spec: AppSpec,
        user: RunAs | None,
        lifeline: Lifeline,
        idle_time: float,
        on_idle: Callable[[_Preloader], None],
    ) -> None:
        self.app_root = spec.app_root
        self.user = user
        self._idle_time = idle_time
        self._on_idle = on_idle
        self._state = threading.Lock()
        """Guards ``_stopped``, ``_last_used`` and the settling of ``_ready``;
        held only briefly, so that stop() never waits for a fork."""
        self._forking = threading.Lock()
        """Held by the one fork request on the control socket at a time."""
        self._ready = threading.Event()
        self._error: SpawnError | None = None
        self._stopped = False
        self._why = ""
        """How stop() was told to stop it, for the spawns that fail."""
        self._fork_under_way = False
        self._broken = ""
        """Why no more forks may be asked of it (a fork timed out, or got
        garbage back), set before the fork lock is let go."""
        self._last_used = time.monotonic()
        self._timer: threading.Timer | None = None
        self._loader: threading.Thread | None = None
        self._reaped = threading.Event()
        """Set when the reaper that the first stop() starts is done."""
        self.users = 0
        """Spawns that hold it, waiting for it to load or forking: while any
        does, it is not idle. Changed under the spawner's lock."""
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self._process: subprocess.Popen[bytes] | None = None
        self._control, child_end = socket.socketpair()
        out_r, out_w = os.pipe()
        env = user_env(user)
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "actorpool.spawners.preloader",
                    spec.app_root,
                    str(child_end.fileno()),
                    str(lifeline.read_fd),
                ],
                cwd=spec.app_root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                pass_fds=(child_end.fileno(), lifeline.read_fd),
                start_new_session=True,
                **popen_user_args(user),
            )
        except OSError as exc:
            self._control.close()
            os.close(out_r)
            self._error = SpawnError(
                f"cannot start a preloader for {spec.app_root}{_as(user)}: {exc}"
            )
            self._ready.set()
            self._process = None
            return
        finally:
            child_end.close()
            os.close(out_w)
        self._output = OutputLog(out_r, spec.app_root, "preloader")
        self._output.pid = self._process.pid
        self._loader = threading.Thread(
            target=self._await_ready, name="actorpool-preloader", daemon=True
        )
        self._loader.start()
        self.touch()

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"<Preloader {self.app_root!r} pid={pid}>"

    def usable(self, user: RunAs | None) -> bool:
        """Whether it can fork for a spawn as ``user`` (it may have died)."""
        return (
            user == self.user
            and self._process is not None
            and self._process.poll() is None
            and self._error is None
            # Stopped but not yet exited (the reaper gives it a second).
            and not self._stopped
            and not self._broken
        )

    def touch(self) -> None:
        """(Re)arm the idle timer to fire an idle time after the last use."""
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_time > 0 and not self._stopped:
            delay = self._last_used + self._idle_time - time.monotonic()
            self._timer = threading.Timer(max(0.0, delay), self._on_idle, args=(self,))
            self._timer.daemon = True
            self._timer.start()

    def idle_for(self, seconds: float) -> bool:
        """Whether it has not been used for ``seconds``."""
        with self._state:
            return time.monotonic() - self._last_used >= seconds

    def wait_ready(self, deadline: float) -> None:
        """Block until it has loaded the app.

        Raises :class:`~actorpool.errors.SpawnError` if it could not.
        """
        if not self._ready.wait(max(0.0, deadline - time.monotonic())):
            raise SpawnError(
                f"{self.app_root} did not load within spawn_timeout",
                output=self._output.tail(),
            )
        if self._error is not None:
            raise self._error

    def fork(self, address: str, deadline: float) -> int:
        """Have it fork a worker listening at ``address``; the worker's pid."""
        # Another spawn's fork may be stuck: wait for it no longer than our
        # own deadline (it stops the preloader when its deadline passes).
        if not self._forking.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise SpawnError(
                f"the preloader of {self.app_root} did not fork in time "
                "(busy with another spawn)"
            )
        broken = ""  # why this preloader can be trusted with no more forks
        late = False  # timed out: its answer may still come (see _collect_late)
        reply: list[Any] | None = None
        try:
            with self._state:
                if self._stopped:
                    raise SpawnError(self._stopped_text())
                if self._broken:
                    raise SpawnError(f"the preloader of {self.app_root} {self._broken}")
                if deadline <= time.monotonic():
                    # Used up waiting for the lock: a request sent now would
                    # time out at once and be answered to nobody.
                    raise SpawnError(
                        f"the preloader of {self.app_root} did not fork in time "
                        "(busy with another spawn)"
                    )
                self._fork_under_way = True
                self._last_used = time.monotonic()
            try:
                write_message(self._control.fileno(), ["spawn", address])
                reply = read_message(self._control.fileno(), deadline, self._unpacker)
            except TimeoutError:
                broken, late = "did not fork in time", True
            except SpawnError as exc:  # not msgpack, or not a list
                broken = f"sent garbage ({exc})"
            except OSError as exc:
                if self._stopped:  # killed under us
                    raise SpawnError(self._stopped_text()) from None
                broken = f"is gone ({exc})"
            except Exception as exc:
                # Whatever it was, a request may be left unanswered on the
                # socket: the next fork must not read its answer.
                broken = f"failed ({exc!r})"
            else:
                if reply is not None and not _is_fork_reply(reply):
                    broken = f"answered {reply!r:.100}"
        finally:
            with self._state:
                self._last_used = time.monotonic()
                # Marked before the fork lock is let go: a spawn waiting for
                # it must not send a request of its own and read this one's
                # late answer as its own.
                if broken:
                    self._broken = broken
                if not late:
                    self._fork_under_way = False
                    if self._stopped:  # stop() left the shutdown to us
                        self._shutdown()
            if late:
                # The fork lock and the socket go to the thread that waits
                # for the answer; the spawn fails now.
                try:
                    threading.Thread(
                        target=self._collect_late,
                        args=(address,),
                        name="actorpool-preloader-late",
                        daemon=True,
                    ).start()
                except RuntimeError:  # no thread to be had (a thread limit)
                    # Nobody waits for the answer, then: the preloader is
                    # killed below, as if the answer had not come in time.
                    logger.error("%s: no thread to wait for a late fork", self.app_root)
                    late = False
                    with self._state:
                        self._fork_under_way = False
                        if self._stopped:
                            self._shutdown()
            if not late:
                self._forking.release()
        if late:
            raise SpawnError(f"the preloader of {self.app_root} {broken}")
        if broken:
            # A fresh one serves the next spawn. Only once the fork lock is
            # let go, as the reaper that stop() starts takes it.
            self.stop(kill=True, why=broken)
            raise SpawnError(f"the preloader of {self.app_root} {broken}")
        if reply is None:
            if self._stopped:
                raise SpawnError(self._stopped_text())
            raise SpawnError(
                f"the preloader of {self.app_root} exited",
                output=self._output.tail(wait=KILLED_OUTPUT_WAIT),
            )
        if reply[0] == "error":  # the fork failed; the preloader is fine
            raise SpawnError(f"{self.app_root}: {reply[1]}")
        return int(reply[1])

    def stop(self, *, kill: bool = False, why: str = "") -> None:
        """Let it go: it exits when its control socket closes. ``kill``: a
        stuck one, killed at once. Spawns waiting for it to load fail at once
        with a :class:`~actorpool.errors.SpawnError` that gives ``why``."""
        if self._timer is not None:
            self._timer.cancel()
        with self._state:
            first = not self._stopped
            if first:
                self._stopped = True
                self._why = f"{'killed' if kill else 'stopped'}" + (
                    f" ({why})" if why else ""
                )
                if not self._ready.is_set():
                    self._error = SpawnError(
                        f"{self._stopped_text()} before it loaded the app",
                        output=self._output.tail() if self._process else "",
                    )
                    self._ready.set()
                # A fork under way is let finish (its worker is wanted) and
                # shuts the socket down itself when it is done.
                if not self._fork_under_way:
                    self._shutdown()
        if kill and self._process is not None:
            # A process it forked to fork a worker dies with it, before it
            # forks (PR_SET_PDEATHSIG, see preloader._spawn).
            self._process.kill()
            self._process.wait()
        if first and self._process is not None:
            try:
                threading.Thread(
                    target=self._reap, name="actorpool-preloader-reap", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had (a thread limit)
                self._reap()  # here, then: a second at most once killed

    def join(self) -> None:
        """Wait (a bounded time) for the process to exit and, once stopped,
        for its reaper."""
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(KILL_GRACE * 2)
            # An event, not the reaper thread: another thread's stop() may
            # be killing the process and not have started the reaper yet.
            if self._stopped:
                self._reaped.wait(KILL_GRACE)

    def _collect_late(self, address: str) -> None:
        """After a fork timed out (holding the fork lock, fork under way):
        wait a little for its answer, stop the worker it names, then kill
        the preloader.

        A preloader that was only slow still forks the worker it was asked
        for, and the spawn that asked has failed: nobody would track that
        worker, which would serve on until the server exits. Killing the
        preloader does not stop it either, once it has begun to fork.
        """
        try:
            reply = read_message(
                self._control.fileno(),
                time.monotonic() + LATE_ANSWER_WAIT,
                self._unpacker,
            )
        except Exception:  # no answer in time, garbage, or a socket gone
            reply = None
        try:
            if reply is not None and _is_fork_reply(reply) and reply[0] == "spawned":
                logger.warning(
                    "%s: stopping worker %d, forked after its spawn timed out",
                    self.app_root,
                    reply[1],
                )
                with contextlib.suppress(ProcessLookupError):
                    orphan = PidfdInstance(reply[1], address)
                    orphan.stop()
                    # Bounded: the fork lock is held, and a process may not
                    # die (one that is not ours, stuck in the kernel).
                    if not orphan.wait_for(2 * KILL_GRACE):
                        logger.error(
                            "%s: worker %d did not stop", self.app_root, reply[1]
                        )
                        orphan.forget()
        finally:
            with self._state:
                self._fork_under_way = False
                if self._stopped:  # stop() left the shutdown to us
                    self._shutdown()
            self._forking.release()
            self.stop(kill=True, why=self._broken)

    def _stopped_text(self) -> str:
        return f"the preloader of {self.app_root} was {self._why}"

    def _shutdown(self) -> None:
        # Shut down, not closed: the shutdown wakes whatever waits on the
        # socket (the loader thread, a fork) and is the preloader's end of
        # file, while the descriptor stays ours until the reaper closes it
        # once nothing can be using it, so that its number cannot be reused
        # under a thread still selecting on it.
        with contextlib.suppress(OSError):  # never started: already closed
            self._control.shutdown(socket.SHUT_RDWR)

    def _reap(self) -> None:
        assert self._process is not None
        assert self._loader is not None
        try:
            with self._forking:  # a fork under way has its spawn's deadline
                pass
            try:
                self._process.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            # Nothing reads the socket any more: the loader has returned (the
            # shutdown woke it, if the load was not over), no fork can start
            # (they see it stopped), and one that began first held this lock.
            self._loader.join()
            with self._forking:
                self._control.close()
        finally:
            self._reaped.set()

    def _await_ready(self) -> None:
        assert self._process is not None
        try:
            message = read_message(self._control.fileno(), math.inf, self._unpacker)
        except (OSError, SpawnError) as exc:
            message = ["error", f"the preloader failed: {exc}", ""]
        error = None
        if message is None or message[0] != "ready":
            if self._stopped:
                return  # stop() woke us, and has failed the waiting spawns
            if message is not None and message[0] == "error" and len(message) == 3:
                text, trace = str(message[1]), str(message[2])
            else:
                text, trace = "the preloader exited before it loaded the app", ""
            tail = self._output.tail(wait=KILLED_OUTPUT_WAIT)
            output = tail if trace.strip() in tail else f"{trace.rstrip()}\n{tail}"
            error = SpawnError(f"{self.app_root}: {text}", output=output.strip())
        with self._state:
            if not self._ready.is_set():  # else stop() got there first
                self._error = error
                self._ready.set()
