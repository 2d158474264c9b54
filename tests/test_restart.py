"""Tests of RestartWatcher with real files and an explicit clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from actorpool import restart
from actorpool.restart import RestartWatcher


def restart_txt(root: str) -> Path:
    return Path(root, "tmp", "restart.txt")


def always_txt(root: str) -> Path:
    return Path(root, "tmp", "always_restart.txt")


def touch(path: Path, seconds: int) -> None:
    """Create ``path`` if need be and set its mtime to ``seconds`` exactly.

    An explicit time, not "now": two touches in one test must differ even on
    a file system whose clock ticks more coarsely than the test runs.
    """
    if not path.exists():
        path.touch()
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


@pytest.fixture
def app(make_app: Callable[[str], str]) -> str:
    return make_app("app")


class CountingStat:
    """``os.stat`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: str) -> os.stat_result:
        self.calls += 1
        return os.stat(path)


def test_the_first_look_only_learns(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=1.0)
    assert watcher.should_restart(app, now=0.0) is False
    assert watcher.should_restart(app, now=5.0) is False  # unchanged since


def test_touching_restart_txt_asks_for_one_restart(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=1.0)
    watcher.should_restart(app, now=0.0)
    touch(restart_txt(app), 200)
    assert watcher.should_restart(app, now=1.0) is True
    assert watcher.should_restart(app, now=2.0) is False
    touch(restart_txt(app), 300)
    assert watcher.should_restart(app, now=3.0) is True


def test_creating_restart_txt_after_the_first_look_asks_for_a_restart(
    app: str,
) -> None:
    watcher = RestartWatcher(check_interval=0)
    assert watcher.should_restart(app, now=0.0) is False  # no file yet
    assert watcher.should_restart(app, now=0.0) is False
    touch(restart_txt(app), 100)
    assert watcher.should_restart(app, now=0.0) is True


def test_removing_restart_txt_is_no_request_but_recreating_it_is(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=0)
    watcher.should_restart(app, now=0.0)
    restart_txt(app).unlink()
    assert watcher.should_restart(app, now=1.0) is False
    touch(restart_txt(app), 100)  # even with the very same mtime as before
    assert watcher.should_restart(app, now=2.0) is True


def test_replacing_restart_txt_with_the_same_mtime_asks_for_a_restart(
    app: str,
) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=0)
    watcher.should_restart(app, now=0.0)
    replacement = Path(app, "tmp", "restart.new")
    touch(replacement, 100)  # a new inode while the old one still exists
    replacement.replace(restart_txt(app))
    assert watcher.should_restart(app, now=1.0) is True


def test_restart_txt_may_be_a_directory(app: str) -> None:
    restart_dir = restart_txt(app)
    restart_dir.mkdir()
    touch(restart_dir, 100)
    watcher = RestartWatcher(check_interval=0)
    assert watcher.should_restart(app, now=0.0) is False
    assert watcher.should_restart(app, now=1.0) is False
    touch(restart_dir, 200)
    assert watcher.should_restart(app, now=2.0) is True
    assert watcher.should_restart(app, now=3.0) is False


def test_looks_are_throttled_per_app(app: str, make_app: Callable[[str], str]) -> None:
    other = make_app("other")
    touch(restart_txt(app), 100)
    touch(restart_txt(other), 100)
    watcher = RestartWatcher(check_interval=10.0)
    watcher.should_restart(app, now=0.0)
    watcher.should_restart(other, now=5.0)
    touch(restart_txt(app), 200)
    touch(restart_txt(other), 200)
    assert watcher.should_restart(app, now=9.9) is False  # too soon: not seen yet
    assert watcher.should_restart(app, now=10.0) is True  # seen at the next look
    assert watcher.should_restart(other, now=14.9) is False
    assert watcher.should_restart(other, now=15.0) is True


def test_a_throttled_look_does_not_stat_or_push_the_next_look_back(app: str) -> None:
    touch(restart_txt(app), 100)
    stat = CountingStat()
    watcher = RestartWatcher(check_interval=1.0, stat=stat)
    watcher.should_restart(app, now=0.0)
    looked = stat.calls
    assert looked > 0
    touch(restart_txt(app), 200)
    for now in (0.1, 0.5, 0.9):
        assert watcher.should_restart(app, now=now) is False
    assert stat.calls == looked
    assert watcher.should_restart(app, now=1.0) is True  # 1 s after the last look
    assert stat.calls > looked


def test_interval_zero_looks_every_time(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=0)
    watcher.should_restart(app, now=5.0)
    touch(restart_txt(app), 200)
    assert watcher.should_restart(app, now=5.0) is True


def test_always_restart_txt_restarts_on_every_look(app: str) -> None:
    touch(always_txt(app), 100)
    watcher = RestartWatcher(check_interval=1.0)
    assert watcher.should_restart(app, now=0.0) is True  # even the first look
    assert watcher.should_restart(app, now=0.5) is False  # throttled
    assert watcher.should_restart(app, now=1.0) is True
    assert watcher.should_restart(app, now=2.0) is True
    always_txt(app).unlink()
    assert watcher.should_restart(app, now=3.0) is False


def test_always_restart_txt_as_a_directory(app: str) -> None:
    always_txt(app).mkdir()
    watcher = RestartWatcher(check_interval=0)
    assert watcher.should_restart(app, now=0.0) is True
    assert watcher.should_restart(app, now=0.0) is True


def test_a_touch_while_always_restart_txt_exists_is_not_replayed(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=0)
    watcher.should_restart(app, now=0.0)
    touch(always_txt(app), 100)
    touch(restart_txt(app), 200)
    assert watcher.should_restart(app, now=1.0) is True
    always_txt(app).unlink()
    # That look already restarted the app after the touch: no second restart.
    assert watcher.should_restart(app, now=2.0) is False


def test_forget_starts_over(app: str) -> None:
    touch(restart_txt(app), 100)
    watcher = RestartWatcher(check_interval=10.0)
    watcher.should_restart(app, now=0.0)
    touch(restart_txt(app), 200)
    watcher.forget(app)
    assert "apps=0" in repr(watcher)
    # Not throttled, and the first look after forgetting only learns again.
    assert watcher.should_restart(app, now=1.0) is False
    touch(restart_txt(app), 300)
    assert watcher.should_restart(app, now=11.0) is True
    watcher.forget("/never/seen")  # harmless


def test_an_app_root_that_does_not_exist_never_restarts(tmp_path: Path) -> None:
    missing = os.fspath(tmp_path / "missing")
    watcher = RestartWatcher(check_interval=0)
    assert watcher.should_restart(missing, now=0.0) is False
    assert watcher.should_restart(missing, now=1.0) is False


def test_repr_names_the_apps_and_interval(app: str) -> None:
    watcher = RestartWatcher(check_interval=2.5)
    watcher.should_restart(app, now=0.0)
    assert repr(watcher) == "<RestartWatcher apps=1 interval=2.5>"


def test_memory_is_bounded_by_forgetting_the_least_recently_seen_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restart, "MAX_APPS", 3)
    watcher = RestartWatcher(check_interval=0)
    a, b, c, d = (str(tmp_path / name) for name in "abcd")
    for root in (a, b, c):
        watcher.should_restart(root, 0.0)
    watcher.should_restart(a, 1.0)  # a is looked at again: b is now the oldest
    watcher.should_restart(d, 1.0)
    assert set(watcher._stamps) == {c, a, d}
    assert set(watcher._checked_at) == {c, a, d}
