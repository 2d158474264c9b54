"""The serve master's fork: a child starts with none of the master's signals."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from actorpool.frontend.master import MASTER_SIGNALS, fork_without_signals


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
