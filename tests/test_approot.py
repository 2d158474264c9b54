"""App roots: which kind a directory is, actorpool.toml checks, who runs it."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from actorpool import SpawnError
from actorpool.spawners.approot import AppSpec, RunAs, load_app_spec, run_as


def test_passenger_wsgi_py_makes_a_wsgi_app(tmp_path: Path) -> None:
    (tmp_path / "passenger_wsgi.py").write_text("application = None\n")
    spec = load_app_spec(os.fspath(tmp_path))
    assert spec.is_wsgi
    assert spec.startup_file == os.fspath(tmp_path / "passenger_wsgi.py")


def test_actorpool_toml_makes_a_command_app(tmp_path: Path) -> None:
    (tmp_path / "actorpool.toml").write_text(
        'command = ["gunicorn", "--bind", "unix:{socket}", "app:app"]\n'
        '[env]\nA = "1"\nB = "two"\n'
    )
    spec = load_app_spec(os.fspath(tmp_path))
    assert not spec.is_wsgi
    assert spec.env == (("A", "1"), ("B", "two"))
    assert spec.argv("/s/x.sock", "/py") == [
        "gunicorn",
        "--bind",
        "unix:/s/x.sock",
        "app:app",
    ]


def test_python_placeholder_is_the_servers_interpreter(tmp_path: Path) -> None:
    (tmp_path / "actorpool.toml").write_text('command = ["{python}", "s.py"]\n')
    assert load_app_spec(os.fspath(tmp_path)).argv("/s", "/usr/bin/py") == [
        "/usr/bin/py",
        "s.py",
    ]


def test_passenger_wsgi_py_wins_over_actorpool_toml(tmp_path: Path) -> None:
    (tmp_path / "passenger_wsgi.py").write_text("")
    (tmp_path / "actorpool.toml").write_text('command = ["x"]\n')
    assert load_app_spec(os.fspath(tmp_path)).is_wsgi


def test_neither_file_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as raised:
        load_app_spec(os.fspath(tmp_path))
    assert "passenger_wsgi.py" in str(raised.value)
    assert "actorpool.toml" in str(raised.value)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="not a directory"):
        load_app_spec(os.fspath(tmp_path / "nope"))


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ("command = [", "cannot read"),
        ("", "`command` must be"),
        ("command = []", "`command` must be"),
        ('command = "gunicorn app:app"', "`command` must be"),
        ("command = [1, 2]", "`command` must be"),
        ('command = ["x"]\nenv = "A=1"', "`env` must be"),
        ('command = ["x"]\n[env]\nA = 1', "`env` must be"),
        ('command = ["x"]\nworkers = 4', "unknown keys"),
    ],
)
def test_a_bad_actorpool_toml_is_explained(
    tmp_path: Path, toml: str, complaint: str
) -> None:
    (tmp_path / "actorpool.toml").write_text(toml)
    with pytest.raises(SpawnError, match=complaint):
        load_app_spec(os.fspath(tmp_path))


def spec_owned_by(tmp_path: Path, uid: int) -> AppSpec:
    startup = tmp_path / "passenger_wsgi.py"
    startup.write_text("")
    os.chown(startup, uid, uid)
    return load_app_spec(os.fspath(tmp_path))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@needs_root
def test_root_owned_app_runs_as_nobody(tmp_path: Path) -> None:
    user = run_as(spec_owned_by(tmp_path, 0), None)
    assert user is not None
    assert user.name == "nobody"
    assert user.uid == pwd.getpwnam("nobody").pw_uid


@needs_root
def test_app_runs_as_its_startup_files_owner(tmp_path: Path) -> None:
    daemon = pwd.getpwnam("daemon")
    user = run_as(spec_owned_by(tmp_path, daemon.pw_uid), None)
    assert user == RunAs("daemon", daemon.pw_uid, daemon.pw_gid, daemon.pw_dir)


@needs_root
def test_an_owner_without_a_passwd_entry_runs_as_that_uid(tmp_path: Path) -> None:
    uid = 54321
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    user = run_as(spec_owned_by(tmp_path, uid), None)
    assert user is not None
    assert (user.uid, user.gid) == (uid, uid)


@needs_root
def test_the_configured_user_wins(tmp_path: Path) -> None:
    user = run_as(spec_owned_by(tmp_path, 0), "daemon")
    assert user is not None
    assert user.name == "daemon"


@needs_root
def test_naming_root_on_purpose_means_no_switch(tmp_path: Path) -> None:
    assert run_as(spec_owned_by(tmp_path, 0), "root") is None


@needs_root
def test_an_unknown_user_is_a_spawn_error(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="no such user"):
        run_as(spec_owned_by(tmp_path, 0), "no-such-user-here")


def test_without_root_only_the_current_user_may_be_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may switch users")
    (tmp_path / "passenger_wsgi.py").write_text("")
    spec = load_app_spec(os.fspath(tmp_path))
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert run_as(spec, None) is None
    assert run_as(spec, me) is None
    with pytest.raises(SpawnError, match="only a pool server running as root"):
        run_as(spec, "nobody")


def test_run_as_names_the_user_in_the_environment() -> None:
    assert RunAs("daemon", 1, 1, "/usr/sbin").env() == {
        "USER": "daemon",
        "LOGNAME": "daemon",
        "HOME": "/usr/sbin",
    }
