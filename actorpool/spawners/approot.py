"""What an app root holds, and who its processes run as.

An app root is one of two kinds, found by the file it has:

``passenger_wsgi.py``
    Passenger's convention for Python apps: a module exposing a WSGI
    callable named ``application``. actorpool's bundled worker serves it.
``actorpool.toml``
    Any other server: ``command`` is an argv list run in the app root, with
    ``{socket}`` replaced by the Unix socket path it must listen on and
    ``{python}`` by the server's interpreter; ``env`` is a table of
    environment variables to add.

When both are present, ``passenger_wsgi.py`` wins, as the more specific.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import tomllib
from typing import Any

from actorpool.errors import SpawnError

__all__ = ["TOML_FILE", "WSGI_FILE", "AppSpec", "RunAs", "load_app_spec", "run_as"]

WSGI_FILE = "passenger_wsgi.py"
TOML_FILE = "actorpool.toml"
PLACEHOLDERS = ("{socket}", "{python}")


@dataclasses.dataclass(frozen=True, slots=True)
class AppSpec:
    """How to start one app root's processes."""

    app_root: str
    """The application's root directory (absolute)."""
    startup_file: str
    """``passenger_wsgi.py`` or ``actorpool.toml``, as an absolute path."""
    command: tuple[str, ...] | None = None
    """For a command app: its argv, placeholders not yet filled in."""
    env: tuple[tuple[str, str], ...] = ()
    """For a command app: variables added to its environment."""

    @property
    def is_wsgi(self) -> bool:
        """Whether the bundled worker serves it."""
        return self.command is None

    def argv(self, socket_path: str, python: str) -> list[str]:
        """The command with its placeholders filled in."""
        assert self.command is not None
        return [
            arg.replace("{socket}", socket_path).replace("{python}", python)
            for arg in self.command
        ]


def load_app_spec(app_root: str) -> AppSpec:
    """How to run ``app_root``.

    Raises :class:`~actorpool.errors.SpawnError` when it cannot be run.
    """
    if not os.path.isdir(app_root):
        raise SpawnError(f"app root {app_root} is not a directory")
    wsgi = os.path.join(app_root, WSGI_FILE)
    if os.path.isfile(wsgi):
        return AppSpec(app_root, wsgi)
    toml = os.path.join(app_root, TOML_FILE)
    if os.path.isfile(toml):
        return _load_toml(app_root, toml)
    raise SpawnError(
        f"{app_root} is not an app root: it has neither {WSGI_FILE} "
        f"(a WSGI app exposing `application`) nor {TOML_FILE} (a `command`)"
    )


def _load_toml(app_root: str, path: str) -> AppSpec:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpawnError(f"cannot read {path}: {exc}") from exc
    command = data.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(arg, str) for arg in command)
    ):
        raise SpawnError(
            f"{path}: `command` must be a non-empty list of strings "
            '(e.g. ["gunicorn", "--bind", "unix:{socket}", "app:app"])'
        )
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(value, str) for value in env.values()
    ):
        raise SpawnError(f"{path}: `env` must be a table of strings")
    unknown = set(data) - {"command", "env"}
    if unknown:
        raise SpawnError(f"{path}: unknown keys {sorted(unknown)}")
    return AppSpec(app_root, path, tuple(command), tuple(sorted(_str_items(env))))


def _str_items(env: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(key), str(value)) for key, value in env.items()]


@dataclasses.dataclass(frozen=True, slots=True)
class RunAs:
    """A user to run an app's processes as (the server being root)."""

    name: str
    uid: int
    gid: int
    home: str

    def env(self) -> dict[str, str]:
        """The variables that name the user, for the process's environment."""
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home}


def run_as(spec: AppSpec, configured: str | None) -> RunAs | None:
    """Who ``spec``'s processes run as; None for the server's own user.

    Only a root server switches users. It follows Passenger: the user named
    in ``PoolConfig.user`` if any, else the owner of the startup file, or
    ``nobody`` when that owner is root (an app must not run as root because
    root happens to own its files).
    """
    if os.geteuid() != 0:
        if configured is not None and configured != _current_user():
            raise SpawnError(
                f"cannot run {spec.app_root} as {configured!r}: "
                "only a pool server running as root can switch users"
            )
        return None
    if configured is not None:
        user = _lookup(configured)
        return None if user.uid == 0 else user  # root named on purpose
    try:
        owner = os.stat(spec.startup_file).st_uid
    except OSError as exc:
        raise SpawnError(f"cannot stat {spec.startup_file}: {exc}") from exc
    if owner == 0:
        return _lookup("nobody")
    try:
        entry = pwd.getpwuid(owner)
    except KeyError:  # an owner with no passwd entry: run as that uid and gid
        gid = os.stat(spec.startup_file).st_gid
        return RunAs(str(owner), owner, gid, "/")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _lookup(name: str) -> RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SpawnError(f"no such user: {name!r}") from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
