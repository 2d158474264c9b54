"""Reading ``/proc`` for the benchmarks: process trees, start times, command
lines, and a tracker that checks every process a benchmark caused has exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` from the state on (the name may hold spaces)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started; None if there is none.

    Together with the pid it names one process, even if the pid is reused.
    """
    try:
        return int(stat_fields(pid)[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(entry))[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # it exited while we looked
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" if gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


class ProcessTracker:
    """Remembers every process the benchmark caused, to check they all exit."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}  # pid -> start time
        self._what: dict[int, str] = {}

    def add(self, pid: int, what: str | None = None) -> None:
        """Remember ``pid`` (described by ``what``, else its command line)."""
        started = start_time(pid)
        if started is not None and pid not in self._seen:
            self._seen[pid] = started
            self._what[pid] = what if what is not None else cmdline(pid)

    def add_tree(self, root: int, what: str | None = None) -> None:
        """Remember ``root`` and every process below it."""
        self.add(root, what)
        for pid in descendants(root):
            self.add(
                pid,
                None if what is None else f"{what}'s descendant ({cmdline(pid)[:60]})",
            )

    def alive(self) -> list[int]:
        """The remembered processes still running (same pid, same start)."""
        return [pid for pid, t in sorted(self._seen.items()) if start_time(pid) == t]

    def still_running(self) -> list[str]:
        """:meth:`alive`, each with what it is."""
        return [f"{pid} {self._what[pid][:100]}" for pid in self.alive()]

    def check_all_gone(self, grace: float = 10.0) -> None:
        """Wait up to ``grace`` seconds for every process seen to exit.

        Any still there after that were left behind by a server: report them
        and kill them, so that the benchmark itself leaves nothing behind.
        """
        deadline = time.monotonic() + grace
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        print()
        if not left:
            print(f"processes: all {len(self._seen)} seen have exited")
            return
        print(f"WARNING: {len(left)} process(es) left behind; killing them:")
        for pid in left:
            print(f"  {pid}: {self._what[pid]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
