"""The serve master's fork: a child starts with none of the master's signals."""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actorpool.frontend import master as master_module
from actorpool.frontend.master import MASTER_SIGNALS, _Master, fork_without_signals


@pytest.fixture
def master_signals() -> Iterator[int]:
    """This process set up as the master is: handlers, and a wake-up pipe."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_fd = signal.set_wakeup_fd(wake_w)
    old = {signum: signal.signal(signum, lambda *_: None) for signum in MASTER_SIGNALS}
    yield wake_r
    signal.set_wakeup_fd(old_fd)
    for signum, handler in old.items():
        signal.signal(signum, handler)
    os.close(wake_r)
    os.close(wake_w)


def test_a_forked_child_keeps_none_of_the_masters_signal_handling(
    master_signals: int,
) -> None:
    report_r, report_w = os.pipe()
    pid = fork_without_signals()
    if pid == 0:
        try:
            state = {
                "wakeup_fd": signal.set_wakeup_fd(-1),
                "handlers": {
                    signal.Signals(signum).name: repr(signal.getsignal(signum))
                    for signum in MASTER_SIGNALS
                },
                "blocked": sorted(
                    signal.Signals(signum).name
                    for signum in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                ),
            }
            os.write(report_w, json.dumps(state).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r) as report:
        state = json.load(report)
    os.waitpid(pid, 0)
    assert state["wakeup_fd"] == -1  # a signal now cannot reach the master's pipe
    assert state["handlers"] == {
        "SIGTERM": repr(signal.SIG_DFL),
        "SIGINT": repr(signal.SIG_DFL),
        "SIGCHLD": repr(signal.SIG_DFL),
        "SIGHUP": repr(signal.SIG_IGN),
    }
    assert state["blocked"] == []  # and none is held back for ever
    # In the master itself, all is as it was.
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()
    assert callable(signal.getsignal(signal.SIGTERM))  # the master's own handler


def test_a_worker_that_cannot_start_is_replaced_ever_more_slowly(
    tmp_path: Path,
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "passenger_wsgi.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'hello']\n"
    )
    # The pool takes one client, and there are two workers: the second
    # cannot connect, dies at once, and would be forked again in a tight loop.
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "actorpool", "serve", "--bind", "127.0.0.1:0"),
            *("--runtime-dir", str(tmp_path / "run"), "--log-level", "warning"),
            *("--workers", "2", "--max-clients", "1", str(tmp_path / "app")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in process.stderr or ()], daemon=True
    )
    reader.start()
    try:
        delays = []
        deadline = time.monotonic() + 30
        while len(delays) < 3:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if match := re.search(r"starting another in ([\d.]+) s", line):
                delays.append(float(match[1]))
        assert delays == [0.1, 0.5, 1.0]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        reader.join(10)
        process.stderr.close()


def test_a_status_request_that_fails_is_answered_not_raised(tmp_path: Path) -> None:
    """Whatever answering a status request raises (here EMFILE on the pool
    connection) is the reply, not the end of the master's loop."""

    class NoConnections:
        def connect(self) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

    status = socket.socket(socket.AF_UNIX)
    status.bind(str(tmp_path / "status.sock"))
    status.listen()
    master = _Master.__new__(_Master)
    master.status = status
    master.server = NoConnections()  # type: ignore[assignment]
    with status, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(tmp_path / "status.sock"))
        client.sendall(b'{"command": "status"}\n')
        master._answer_status()
        client.settimeout(10)
        reply = json.loads(client.recv(65536))
    assert "Too many open files" in reply["error"]


def bare_master() -> _Master:
    """A master with just the state its signal and replacement paths use."""
    master = _Master.__new__(_Master)
    master.stopping = False
    master.due, master.workers, master.started_at, master.young_deaths = {}, {}, {}, {}
    return master


def test_a_sighup_that_cannot_reach_the_pool_does_not_end_the_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE on the pool connection raised out of the master's loop, which
    then stopped every worker."""

    class NoConnections:
        def connect(self) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

    master = bare_master()
    master.server = NoConnections()  # type: ignore[assignment]
    master._on_signals(bytes([signal.SIGHUP]))
    assert not master.stopping
    assert "SIGHUP: restarting the apps failed" in caplog.text


def test_a_replacement_fork_that_fails_is_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork failing for a moment (EAGAIN) raised out of the master's loop,
    which then stopped every worker."""

    def fail() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(master_module, "fork_without_signals", fail)
    master = bare_master()
    master.server = object()  # type: ignore[assignment]
    master.status = object()  # type: ignore[assignment]
    before = time.monotonic()
    master.due = {0: before - 1}
    master._replace_due_workers()
    assert master.due[0] > before  # rescheduled, after a back-off
    assert master.workers == {}
