"""The command line: ``actorpool serve``, ``status`` and ``restart-app``.

``serve`` takes its settings from options, from a TOML config file
(``--config``), or both; an option given on the command line wins over the
file. The file's keys are the long option names with ``_`` for ``-``, and
``apps`` is a list of app specs (relative paths are taken from the file's
own directory)::

    bind = "0.0.0.0:8000"
    workers = 4
    spawner = "smart"
    apps = ["/=site", "/blog=blog", "api.example.com=api"]
    max_pool_size = 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pwd
import socket
import sys
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from actorpool import __version__
from actorpool.config import PoolConfig, check_seconds
from actorpool.errors import ActorPoolError, ConfigError
from actorpool.spawner import Spawner

__all__ = ["main"]

POOL_FIELDS = {field.name: field for field in dataclasses.fields(PoolConfig)}


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One ``serve`` setting: its type, default and help."""

    kind: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


def _seconds(text: str) -> float:
    return float(text)


SERVE_SETTINGS: dict[str, _Setting] = {
    "bind": _Setting(str, "127.0.0.1:8000", "HOST:PORT to listen on"),
    "workers": _Setting(int, 2, "front-end worker processes"),
    "threads": _Setting(int, 16, "client connections each worker serves at once"),
    "spawner": _Setting(str, "direct", "how to start apps", ("direct", "smart")),
    "max_preloader_idle_time": _Setting(
        _seconds, 300.0, "smart spawner: seconds before an idle preloader stops"
    ),
    "environment": _Setting(
        str,
        "production",
        "development shows app tracebacks on error pages",
        ("production", "development"),
    ),
    "client_timeout": _Setting(
        _seconds,
        30.0,
        "seconds a client may stay silent mid-request or idle, and may take"
        " to send a request head",
    ),
    "app_timeout": _Setting(
        _seconds,
        60.0,
        "seconds an app may keep a request waiting with nothing sent or taken"
        " (then 504, and the process is stopped)",
    ),
    "max_header_size": _Setting(int, 16384, "largest request head, in bytes"),
    "get_timeout": _Setting(
        _seconds, 0.0, "seconds a request may wait for a process (0: no limit)"
    ),
    "grace": _Setting(
        _seconds, 30.0, "seconds requests may take to finish after SIGTERM"
    ),
    "access_log": _Setting(bool, False, "log every request (common log format)"),
    "log_level": _Setting(
        str, "info", "log threshold", ("debug", "info", "warning", "error")
    ),
    "metrics_bind": _Setting(str, "", "HOST:PORT for a Prometheus /metrics endpoint"),
    "runtime_dir": _Setting(str, "", "private directory for the status socket"),
    "user_switching": _Setting(
        bool,
        False,
        "as root, run each app as its startup file's owner (nobody for root)",
    ),
}
"""``serve``'s own settings; PoolConfig's fields come on top."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except (ConfigError, ActorPoolError) as exc:
        print(f"actorpool: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an address in use, a directory that cannot be made
        print(f"actorpool: {exc}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actorpool", description="An application-process pool server."
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve apps over HTTP through a pool of their processes",
        description="Serve apps over HTTP through a pool of their processes.",
    )
    serve.add_argument(
        "apps",
        nargs="*",
        metavar="APP",
        help="PATH, /PREFIX=PATH, HOST=PATH or HOST/PREFIX=PATH",
    )
    serve.add_argument("--config", help="a TOML file of settings")
    for name, setting in SERVE_SETTINGS.items():
        default = setting.default if setting.default != "" else "none"
        _add_option(
            serve, name, setting.kind, f"{setting.help} ({default})", setting.choices
        )
    pool = serve.add_argument_group("pool settings (PoolConfig; see the docs)")
    for name, field in POOL_FIELDS.items():
        kind: Callable[[str], Any] = int if field.type in ("int", int) else _seconds
        text = f"({field.default})"
        if name == "user":
            kind = str
            # serve's own default, not the library's (see _pool_config)
            text = "who apps run as, when run as root (the user serve runs as)"
        _add_option(pool, name, kind, text)
    serve.set_defaults(run=_serve)

    for name, text, run in (
        ("status", "print the pool's status, as passenger-status does", _status),
        ("restart-app", "restart one app of a running serve", _restart_app),
    ):
        command = commands.add_parser(name, help=text, description=text)
        if name == "status":
            command.add_argument("--json", action="store_true", help="print JSON")
        else:
            command.add_argument("app_root", metavar="APP_ROOT")
        command.add_argument("--socket", help="the status socket serve printed")
        command.add_argument(
            "--runtime-dir", help="where to look for the status socket"
        )
        command.set_defaults(run=run)
    return parser


def _add_option(
    parser: Any,
    name: str,
    kind: Callable[[str], Any],
    help_text: str,
    choices: tuple[str, ...] | None = None,
) -> None:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(
            flag, action="store_const", const=True, default=None, help=help_text
        )
    else:
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            choices=choices,
            metavar=name.upper() if choices is None else None,
            help=help_text,
        )


# --- serve ---------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from actorpool.frontend.master import ServeOptions, default_runtime_dir, serve
    from actorpool.frontend.proxy import ProxyOptions
    from actorpool.frontend.routes import Router, parse_route
    from actorpool.frontend.worker import WorkerOptions

    settings, apps = _settings(args)
    for name in ("spawner", "environment", "log_level"):
        choices = SERVE_SETTINGS[name].choices or ()
        if settings[name] not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(choices)}, not {settings[name]!r}"
            )
    logging.basicConfig(
        level=str(settings["log_level"]).upper(),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not apps:
        raise ConfigError("no app to serve: give an app root, e.g. examples/hello")
    router = Router([parse_route(app) for app in apps])
    proxy = ProxyOptions(
        development=settings["environment"] == "development",
        client_timeout=_seconds_setting("client_timeout", settings, allow_zero=False),
        max_header_size=_at_least_one("max_header_size", settings),
        app_timeout=_seconds_setting("app_timeout", settings, allow_zero=False),
        get_timeout=_seconds_setting("get_timeout", settings, allow_zero=True) or None,
        access_log=bool(settings["access_log"]),
    )
    host, port = _address("bind", settings["bind"])
    metrics = None
    if settings["metrics_bind"]:
        metrics = _address("metrics_bind", settings["metrics_bind"])
        import actorpool.frontend.metrics  # noqa: F401 (fail now if not installed)
    options = ServeOptions(
        host=host,
        port=port,
        workers=_at_least_one("workers", settings),
        worker=WorkerOptions(
            router=router,
            proxy=proxy,
            threads=_at_least_one("threads", settings),
            grace=_seconds_setting("grace", settings, allow_zero=True),
        ),
        pool=_pool_config(settings),
        spawner=_spawner(settings),
        runtime_dir=settings["runtime_dir"] or default_runtime_dir(),
        metrics=metrics,
    )
    return serve(options)


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Defaults, then the config file, then the command line."""
    settings = {name: setting.default for name, setting in SERVE_SETTINGS.items()}
    settings.update({name: None for name in POOL_FIELDS})
    apps: list[str] = []
    if args.config:
        from_file, apps = _read_config(args.config)
        settings.update(from_file)
    for name in settings:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.apps:
        apps = list(args.apps)
    return settings, apps


def _read_config(path: str) -> tuple[dict[str, Any], list[str]]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    known = set(SERVE_SETTINGS) | set(POOL_FIELDS) | {"apps"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}")
    for name, value in data.items():
        if name in SERVE_SETTINGS:
            _check_type(path, name, SERVE_SETTINGS[name].kind, value)
    apps = data.pop("apps", [])
    if not isinstance(apps, list) or not all(isinstance(app, str) for app in apps):
        raise ConfigError(f"{path}: apps must be a list of strings")
    base = os.path.dirname(os.path.abspath(path))
    return data, [_from(base, app) for app in apps]


_FILE_TYPES: dict[Callable[[str], Any], tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    str: ((str,), "a string"),
    _seconds: ((int, float), "a number"),
}
"""What a setting of each kind may be in a config file, and its name."""


def _check_type(path: str, name: str, kind: Callable[[str], Any], value: Any) -> None:
    """A setting from a file must already be of its type: TOML has types, and
    ``bool("false")`` is True."""
    allowed, wanted = _FILE_TYPES[kind]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, allowed):
        raise ConfigError(f"{path}: {name} must be {wanted}, not {value!r}")


def _from(base: str, app: str) -> str:
    """``app`` with a relative path taken from ``base``.

    Split where :func:`~actorpool.frontend.routes.parse_route` splits, at the
    first ``=``: the path may hold ``=`` itself (``/=my=app``).
    """
    mount, equals, path = app.partition("=")
    if not equals:
        mount, path = "", app
    if not os.path.isabs(path):
        path = os.path.join(base, path)
    return f"{mount}{equals}{path}"


def _pool_config(settings: dict[str, Any]) -> PoolConfig:
    values = {
        name: settings[name] for name in POOL_FIELDS if settings[name] is not None
    }
    if values.get("user") is None and not settings["user_switching"]:
        # Like `passenger start`: apps run as whoever runs the server, unless
        # asked otherwise. (The library's default follows Passenger's
        # user-switching rule, for servers started as root on purpose.)
        values["user"] = pwd.getpwuid(os.geteuid()).pw_name
    return PoolConfig(**values)


def _spawner(settings: dict[str, Any]) -> Spawner:
    from actorpool.spawners import DirectSpawner, SmartSpawner

    if settings["spawner"] == "direct":
        return DirectSpawner()
    if settings["spawner"] == "smart":
        return SmartSpawner(
            max_preloader_idle_time=_seconds_setting(
                "max_preloader_idle_time", settings, allow_zero=True
            )
        )
    raise ConfigError(f"--spawner must be direct or smart, not {settings['spawner']!r}")


def _address(name: str, text: object) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 <= number <= 65535:
        raise ConfigError(f"--{name.replace('_', '-')} must be HOST:PORT, not {text!r}")
    return host.strip("[]"), number


def _at_least_one(name: str, settings: dict[str, Any]) -> int:
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        name = name.replace("_", "-")
        raise ConfigError(f"--{name} must be an integer >= 1, not {value!r}")
    return value


def _seconds_setting(name: str, settings: dict[str, Any], *, allow_zero: bool) -> float:
    value = settings[name]
    check_seconds(f"--{name.replace('_', '-')}", value, allow_zero=allow_zero)
    return float(value)


# --- status and restart-app ---------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "status"})
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        from actorpool.frontend.status import format_status

        print(format_status(reply))
    return 0


def _restart_app(args: argparse.Namespace) -> int:
    app_root = os.path.abspath(args.app_root)
    _ask(args, {"command": "restart-app", "app_root": app_root})
    print(f"restarted {app_root}")
    return 0


def _ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    path = args.socket or _find_socket(args.runtime_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        try:
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise ActorPoolError(
                f"cannot reach actorpool serve at {path}: {exc}"
            ) from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ActorPoolError(f"bad reply from {path}: {exc}") from exc
    if not isinstance(reply, dict):
        raise ActorPoolError(f"bad reply from {path}")
    if "error" in reply:
        raise ActorPoolError(str(reply["error"]))
    return reply


def _find_socket(runtime_dir: str | None) -> str:
    from actorpool.frontend.master import default_runtime_dir

    directory = runtime_dir or default_runtime_dir()
    try:
        names = sorted(
            name
            for name in os.listdir(directory)
            if name.startswith("serve-") and name.endswith(".sock")
        )
    except OSError:
        names = []
    live = [
        path
        for path in (os.path.join(directory, name) for name in names)
        if _answers(path)
    ]
    if not live:
        raise ActorPoolError(f"no actorpool serve is running (looked in {directory})")
    if len(live) > 1:
        raise ActorPoolError(
            "several actorpool serves are running; pick one with --socket:\n  "
            + "\n  ".join(live)
        )
    return live[0]


def _answers(path: str) -> bool:
    """Whether a serve listens on the status socket at ``path``: the file
    of one that was killed stays, and its pid may be another process's by
    now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # a full backlog, say: somebody is there
            return True
    return True


if __name__ == "__main__":
    sys.exit(main())
