"""The command line's checks of serve's settings, before anything starts.

``serve`` itself is replaced by a stand-in that records what it was given,
so a check that fails to fire shows as a wrong result, not as a server.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from actorpool import cli
from actorpool.errors import ActorPoolError
from actorpool.frontend import master
from actorpool.frontend.master import ServeOptions


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServeOptions]:
    """What each run of ``serve`` was given."""
    calls: list[ServeOptions] = []

    def record(options: ServeOptions) -> int:
        calls.append(options)
        return 0

    monkeypatch.setattr(master, "serve", record)
    return calls


@pytest.fixture
def app(tmp_path: Path) -> str:
    return str(tmp_path)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--grace", "-1"], "--grace"),
        (["--client-timeout", "0"], "--client-timeout"),
        (["--client-timeout", "1e10"], "--client-timeout"),
        (["--app-timeout", "0"], "--app-timeout"),
        (["--get-timeout", "-5"], "--get-timeout"),
        (["--max-header-size", "0"], "--max-header-size"),
        (["--threads", "0"], "--threads"),
        (["--spawner", "smart", "--max-preloader-idle-time", "1e10"], "preloader"),
        (["--spawn-timeout", "1e10"], "spawn_timeout"),
    ],
)
def test_a_bad_option_is_refused_naming_it(
    served: list[ServeOptions],
    app: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    named: str,
) -> None:
    assert cli.main(["serve", *args, app]) == 2
    assert named in capsys.readouterr().err
    assert served == []


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('access_log = "false"', "access_log must be true or false"),
        ('workers = "2"', "workers must be an integer"),
        ("workers = true", "workers must be an integer"),
        ('grace = "5"', "grace must be a number"),
        ("bind = 8000", "bind must be a string"),
    ],
)
def test_a_setting_of_the_wrong_type_in_the_file_is_refused(
    served: list[ServeOptions],
    app: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    line: str,
    named: str,
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(line + "\n")
    assert cli.main(["serve", "--config", str(config), app]) == 2
    assert named in capsys.readouterr().err
    assert served == []


def test_good_settings_reach_serve(
    served: list[ServeOptions], app: str, tmp_path: Path
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("access_log = true\ngrace = 5\nget_timeout = 2.5\n")
    args: list[Any] = ["serve", "--config", str(config), "--client-timeout", "7"]
    args += ["--app-timeout", "9"]
    assert cli.main([*args, "--max-header-size", "1000", app]) == 0
    (options,) = served
    assert options.worker.grace == 5.0
    assert options.worker.proxy.access_log is True
    assert options.worker.proxy.get_timeout == 2.5
    assert options.worker.proxy.client_timeout == 7.0
    assert options.worker.proxy.max_header_size == 1000
    assert options.worker.proxy.app_timeout == 9.0


@pytest.mark.parametrize(
    ("entry", "prefix", "path"),
    [
        ("hello", "", "{base}/hello"),
        ("/=my=app", "", "{base}/my=app"),
        ("/blog=blog", "/blog", "{base}/blog"),
        ("/abs=/srv/a=b", "/abs", "/srv/a=b"),
    ],
)
def test_app_paths_in_a_file_are_taken_from_its_directory(
    served: list[ServeOptions], tmp_path: Path, entry: str, prefix: str, path: str
) -> None:
    """Split at the first "=", as routes are: a path holding "=" was split at
    its own "=" and joined to the file's directory in the middle."""
    config = tmp_path / "serve.toml"
    config.write_text(f'apps = ["{entry}"]\n')
    assert cli.main(["serve", "--config", str(config)]) == 0
    (options,) = served
    (route,) = options.worker.router.routes
    assert (route.prefix, route.app_root) == (prefix, path.format(base=tmp_path))


def test_a_stale_status_socket_is_not_taken_for_a_running_serve(
    tmp_path: Path,
) -> None:
    """A serve killed with SIGKILL leaves serve-PID.sock behind, and its pid
    may belong to another process by now (here: this one)."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / f"serve-{os.getpid()}.sock"))
    stale.close()  # the file stays; nothing listens
    with pytest.raises(ActorPoolError, match="no actorpool serve is running"):
        cli._find_socket(str(tmp_path))
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "serve-1.sock"))
    live.listen()
    with live:
        assert cli._find_socket(str(tmp_path)) == str(tmp_path / "serve-1.sock")
