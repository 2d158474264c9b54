"""The helpers in actorpool.testing, on their own."""

from __future__ import annotations

import pickle
import queue
import threading
from typing import Any

import pytest

from actorpool.spawner import SpawnRequest
from actorpool.testing import Barrier, FakeClock, FakeSpawner, Recorder, take


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(start=10.0)
    assert clock() == 10.0
    assert clock.advance(2.5) == 12.5
    assert clock() == 12.5


def test_recorder_and_take() -> None:
    inbox: queue.Queue[Any] = queue.Queue()
    recorder = Recorder.start(inbox)
    recorder.tell("hello")
    recorder.ask(Barrier(), timeout=5)  # not recorded, but orders after "hello"
    assert take(inbox, str) == "hello"
    assert inbox.empty()
    recorder.tell(42)
    with pytest.raises(AssertionError):
        take(inbox, str)


def test_only_configuration_is_pickled(tmp_path: Any) -> None:
    with FakeSpawner(hold=True, fail={"/srv/x": "boom"}) as spawner:
        spawner.start(str(tmp_path))
        try:
            copy = pickle.loads(pickle.dumps(spawner))
            assert copy._backend is None
            assert copy.control_path == spawner.control_path
            # The copy controls the running one through the control socket.
            assert copy.calls() == []
        finally:
            spawner.close()


def test_held_spawn_waits_for_release_and_wait_for_times_out(tmp_path: Any) -> None:
    with FakeSpawner(hold=True) as spawner:
        spawner.start(str(tmp_path))
        try:
            request = SpawnRequest(1, "/srv/a", str(tmp_path), timeout=5.0)
            result: list[Any] = []
            thread = threading.Thread(
                target=lambda: result.append(spawner.spawn(request))
            )
            thread.start()
            spawner.wait_for("spawn", app_root="/srv/a")
            with pytest.raises(TimeoutError):
                spawner.wait_for("ready", app_root="/srv/a", timeout=0.1)
            spawner.release("/srv/a")
            thread.join(5)
            [ready] = spawner.wait_for("ready", app_root="/srv/a")
            assert result[0].pid == ready.pid
            result[0].stop()
            assert spawner.wait_for("stopped", pid=ready.pid)
        finally:
            spawner.close()
