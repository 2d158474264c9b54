"""DirectSpawner: a fresh interpreter for every application process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from actorpool.errors import SpawnError
from actorpool.spawner import Instance, Spawner, SpawnRequest
from actorpool.spawners._process import (
    Lifeline,
    OutputLog,
    PopenInstance,
    SocketDirs,
    popen_user_args,
    read_message,
    user_env,
)
from actorpool.spawners.approot import AppSpec, RunAs, load_app_spec, run_as

__all__ = ["DirectSpawner", "start_direct"]


class DirectSpawner(Spawner):
    """Starts each application process as a fresh interpreter.

    A ``passenger_wsgi.py`` app is loaded by the bundled worker
    (``actorpool.spawners.worker``); an ``actorpool.toml`` app's command
    runs under a small supervisor (``actorpool.spawners.supervise``). A
    spawn returns once the process is ready: the worker has loaded the app,
    or the command's socket accepts connections.
    """

    def __init__(self) -> None:
        # Made in the user's process and pickled into the server: nothing
        # live until start().
        self._dirs: SocketDirs | None = None
        self._lifeline: Lifeline | None = None

    def __repr__(self) -> str:
        return "DirectSpawner()"

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def start(self, socket_dir: str) -> None:
        self._dirs = SocketDirs(socket_dir)
        self._lifeline = Lifeline()

    def spawn(self, request: SpawnRequest) -> Instance:
        if self._dirs is None or self._lifeline is None:
            raise SpawnError("the spawner was not started (or is closed)")
        spec = load_app_spec(request.app_root)
        user = run_as(spec, request.user)
        address = socket_path(self._dirs.for_user(user), request.instance_id)
        return start_direct(spec, user, address, request.timeout, self._lifeline)

    def close(self) -> None:
        if self._lifeline is not None:
            self._lifeline.close()
        if self._dirs is not None:
            self._dirs.close()
        self._dirs = self._lifeline = None


def socket_path(directory: str, instance_id: int) -> str:
    """Where instance ``instance_id`` listens."""
    return os.path.join(directory, f"instance-{instance_id}.sock")


def start_direct(
    spec: AppSpec,
    user: RunAs | None,
    address: str,
    timeout: float,
    lifeline: Lifeline,
) -> PopenInstance:
    """Start one process for ``spec`` listening at ``address``; wait until ready."""
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    if spec.is_wsgi:
        what = "worker"
        argv = [
            sys.executable,
            "-m",
            "actorpool.spawners.worker",
            spec.app_root,
            address,
            str(ready_w),
            str(lifeline.read_fd),
        ]
        user_args = popen_user_args(user)
    else:
        # The supervisor stays the server's user and switches only the
        # command's, so that it can always stop the command.
        what = "command"
        uid, gid = (user.uid, user.gid) if user is not None else (-1, -1)
        argv = [
            sys.executable,
            "-m",
            "actorpool.spawners.supervise",
            address,
            str(ready_w),
            str(lifeline.read_fd),
            str(uid),
            str(gid),
            "--",
            *spec.argv(address, sys.executable),
        ]
        user_args = {}
    env = user_env(user)
    env.update(spec.env)
    try:
        process = subprocess.Popen(
            argv,
            cwd=spec.app_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            pass_fds=(ready_w, lifeline.read_fd),
            start_new_session=True,
            **user_args,
        )
    # ValueError: a NUL byte in the command or the environment, or an "="
    # in a variable's name (actorpool.toml can hold either).
    except (OSError, ValueError) as exc:
        os.close(ready_r)
        os.close(out_r)
        raise SpawnError(
            f"cannot start a process for {spec.app_root}{_as(user)}: {exc}"
        ) from exc
    except BaseException:
        os.close(ready_r)
        os.close(out_r)
        raise
    finally:
        os.close(ready_w)
        os.close(out_w)
    output = OutputLog(out_r, spec.app_root, what)
    output.pid = process.pid
    try:
        message = read_message(ready_r, time.monotonic() + timeout)
    except TimeoutError:
        _kill(process)
        raise SpawnError(
            f"{spec.app_root} did not start within spawn_timeout ({timeout:g} s)",
            output=output.tail(wait=KILLED_OUTPUT_WAIT),
        ) from None
    except SpawnError:
        _kill(process)
        raise
    finally:
        os.close(ready_r)
    if message is None or message[0] != "ready":
        _kill(process)
        if message is not None and message[0] == "error" and len(message) == 3:
            text, trace = str(message[1]), str(message[2])
        else:
            text = (
                f"the {what} exited with status {process.returncode} "
                "before it was ready"
            )
            trace = ""
        tail = output.tail(wait=KILLED_OUTPUT_WAIT)
        raise SpawnError(f"{spec.app_root}: {text}", output=_join(trace, tail))
    return PopenInstance(process, int(message[1]), address, output)


KILLED_OUTPUT_WAIT = 5.0
"""Most seconds a failed start waits for the rest of the process's output.
The process is dead by then, so the end of its output is normally at hand;
the bound is for a machine too loaded to read it at once."""


def _as(user: RunAs | None) -> str:
    """How an error names the user a process was to run as."""
    if user is None:
        return ""
    return (
        f" as user {user.name} (the interpreter, actorpool and the app must be"
        " readable by that user; PoolConfig(user=...) names another)"
    )


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _join(trace: str, tail: str) -> str:
    if trace and trace.strip() in tail:
        return tail  # the worker printed its traceback to the log as well
    return "\n".join(part for part in (trace.rstrip(), tail) if part)
