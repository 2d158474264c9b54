"""Spawn benchmark: DirectSpawner against SmartSpawner, in time and in memory.

Run from the repository root::

    python benchmarks/bench_spawn.py            # under a minute
    python benchmarks/bench_spawn.py --quick    # a smoke run

It measures, in one run, for ``examples/hello`` (the smallest WSGI app) and
``examples/slow_start`` (an app whose import costs over 200 ms of CPU and
leaves a 48 MiB table behind):

(a) spawn time: from ``pool.get(app)`` on an app with no process to a
    connected session, median of several samples, each on a fresh server.
    "first spawn" is the server's first get; for SmartSpawner it includes
    starting the app's preloader. "second spawn" is a second get while the
    first session is still held, so the pool must start another process; for
    SmartSpawner that is a fork of the preloader that is already running.
(b) memory of 8 instances of slow_start, all busy at once: the sum of their
    PSS (proportional set size: each shared page counted once in total, split
    between the processes that share it) from ``/proc/PID/smaps_rollup``. For
    SmartSpawner the preloader's PSS is shown apart and in a total with it.

and prints each figure with its SmartSpawner / DirectSpawner ratio, then the
ratios against the targets: a warm SmartSpawner spawn of slow_start at most
0.1x a DirectSpawner one, and 8 SmartSpawner instances in at most 0.6x the
memory of 8 DirectSpawner ones. The spawn target compares the two "second
spawn" columns, where both servers are already running with one process up.

Every server is closed at the end, and the benchmark checks that each
process it saw (servers, app processes, preloaders) has exited.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import os
import pwd
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _procfs import ProcessTracker, cmdline, descendants

from actorpool import ApplicationPoolServer, PoolConfig, Session, Spawner
from actorpool.spawners import DirectSpawner, SmartSpawner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APPS = {
    "hello": (EXAMPLES / "hello", b"hello world\n"),
    "slow_start": (EXAMPLES / "slow_start", b"slow start ready\n"),
}
SPAWNERS: dict[str, Callable[[], Spawner]] = {
    "DirectSpawner": DirectSpawner,
    "SmartSpawner": SmartSpawner,
}
INSTANCES = 8
"""Processes of slow_start held at once in (b)."""

GET_TIMEOUT = 120.0
"""Seconds a get may wait: longer than any sane spawn, shorter than forever."""

SPAWN_TARGET = 0.1
"""Most a warm SmartSpawner spawn of slow_start may take, as a share of Direct's."""

MEMORY_TARGET = 0.6
"""Most 8 SmartSpawner instances may use, as a share of 8 DirectSpawner ones."""


def pool_config(processes: int) -> PoolConfig:
    """Room for ``processes`` processes of one app, run as the current user.

    Naming the user matters when the benchmark runs as root: a root server
    would otherwise run the examples (owned by root) as ``nobody``, as
    Passenger does, and ``nobody`` may not be able to run this interpreter.
    """
    return PoolConfig(
        max_pool_size=processes,
        max_per_app=processes,
        user=pwd.getpwuid(os.geteuid()).pw_name,
    )


# --- processes: who they are, how much memory, whether they are gone --------------


def pss_kb(pid: int) -> int:
    """The proportional set size of ``pid``, in kB."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


TRACKER = ProcessTracker()


@contextlib.contextmanager
def running_server(
    config: PoolConfig, spawner: Spawner
) -> Iterator[ApplicationPoolServer]:
    """A fresh pool server, closed on the way out whatever happens."""
    server = ApplicationPoolServer(config, spawner=spawner)
    try:
        yield server
    finally:
        # Note the whole tree while it stands, so that check_all_gone can
        # tell whether closing the server took every process with it.
        TRACKER.add_tree(server.pid, "pool server")
        server.close()


def request(session: Session, expected: bytes) -> None:
    """One GET over the session's socket; fail unless the app gives ``expected``."""
    session.socket.sendall(
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    response = http.client.HTTPResponse(session.socket, method="GET")
    try:
        response.begin()
        body = response.read()
    finally:
        response.close()
    if response.status != 200 or body != expected:
        raise RuntimeError(
            f"{session.app_root} answered {response.status} {body!r}, "
            f"not 200 {expected!r}"
        )


# --- (a) spawn time -----------------------------------------------------------------


def spawn_times(
    make_spawner: Callable[[], Spawner], app: Path, expected: bytes, samples: int
) -> tuple[list[float], list[float]]:
    """Seconds of each sample's first and second spawn of ``app``."""
    first: list[float] = []
    second: list[float] = []
    config = pool_config(2)
    for _ in range(samples):
        with running_server(config, make_spawner()) as server:
            pool = server.connect()
            try:
                start = time.perf_counter()
                session_1 = pool.get(app, timeout=GET_TIMEOUT)
                first.append(time.perf_counter() - start)
                with session_1:
                    TRACKER.add(session_1.pid, f"{app.name} process")
                    # Holding session 1 makes the pool start a second process.
                    start = time.perf_counter()
                    session_2 = pool.get(app, timeout=GET_TIMEOUT)
                    second.append(time.perf_counter() - start)
                    with session_2:
                        TRACKER.add(session_2.pid, f"{app.name} process")
                        if session_2.pid == session_1.pid:
                            raise RuntimeError(
                                "the second get did not start a second process"
                            )
                        # Timed first, checked after: a spawn that "succeeds"
                        # with a broken app must not count.
                        request(session_1, expected)
                        request(session_2, expected)
            finally:
                pool.close()
    return first, second


# --- (b) memory -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
    """PSS figures, in kB, of one spawner's busy instances."""

    per_process: list[int]
    """Each instance's PSS."""
    preloaders: list[int]
    """Pids of the preloader(s) found; empty if none."""
    preloader: int
    """Their PSS (0 if none)."""

    @property
    def instances(self) -> int:
        return sum(self.per_process)

    @property
    def with_preloader(self) -> int:
        return self.instances + self.preloader


def instance_memory(
    make_spawner: Callable[[], Spawner], app: Path, expected: bytes
) -> Memory:
    """PSS of INSTANCES busy processes of ``app``, and of any preloader."""
    config = pool_config(INSTANCES)
    with running_server(config, make_spawner()) as server:
        pool = server.connect()
        sessions: list[Session] = []
        try:
            # Each get finds every process busy, so each starts a new one.
            for _ in range(INSTANCES):
                sessions.append(pool.get(app, timeout=GET_TIMEOUT))
            for session in sessions:
                TRACKER.add(session.pid, f"{app.name} process")
                # Serve a request first: measure processes that have worked.
                request(session, expected)
            pids = sorted({session.pid for session in sessions})
            if len(pids) != INSTANCES:
                raise RuntimeError(
                    f"{INSTANCES} sessions held, but on {len(pids)} processes"
                )
            per_process = [pss_kb(pid) for pid in pids]
            # A preloader is a process of the server's (normally its child)
            # with "preloader" in its command line; the workers it forked may
            # carry the same command line, hence leaving out the app pids.
            preloaders = [
                pid
                for pid in descendants(server.pid)
                if pid not in pids and "preloader" in cmdline(pid).lower()
            ]
            preloader = sum(pss_kb(pid) for pid in preloaders)
        finally:
            for session in sessions:
                session.close()
            pool.close()
    return Memory(per_process, preloaders, preloader)


# --- the report ----------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def report_spawn(
    medians: dict[tuple[str, str], tuple[float, float]], samples: int
) -> None:
    print()
    print("(a) spawn time: get on an app with no process -> connected session")
    print(f"    median of {samples} samples, each on a fresh server")
    print(f"{'':28} {'first spawn':>14} {'second spawn':>14}")
    print(f"{'':28} {'(server cold)':>14} {'(1st held)':>14}")
    for app_name in APPS:
        direct = medians[app_name, "DirectSpawner"]
        smart = medians[app_name, "SmartSpawner"]
        for spawner_name, row in (("DirectSpawner", direct), ("SmartSpawner", smart)):
            cells = " ".join(f"{seconds * 1e3:11.1f} ms" for seconds in row)
            print(f"{app_name + ' ' + spawner_name:28} {cells}")
        ratios = " ".join(
            f"{_ratio(s, d):>14}" for s, d in zip(smart, direct, strict=True)
        )
        print(f"{app_name + ' Smart / Direct':28} {ratios}")
    print("    SmartSpawner's first spawn includes starting the app's preloader;")
    print("    its second is a fork of the preloader, already running.")


def report_memory(memory: dict[str, Memory]) -> None:
    direct = memory["DirectSpawner"]
    print()
    print(f"(b) memory of {INSTANCES} busy slow_start processes: PSS in MiB")
    print("    total = instances + preloader; vs Direct compares the totals")
    print(
        f"{'':16} {'instances':>10} {'per proc':>9} {'min-max':>13} "
        f"{'preloader':>10} {'total':>9} {'vs Direct':>10}"
    )
    for name, row in memory.items():
        low, high = min(row.per_process) / 1024, max(row.per_process) / 1024
        if row.preloaders:
            preloader = f"{row.preloader / 1024:.1f}"
        else:
            preloader = "not found" if name == "SmartSpawner" else "-"
        print(
            f"{name:16} {row.instances / 1024:10.1f} "
            f"{row.instances / len(row.per_process) / 1024:9.1f} "
            f"{f'{low:.1f}-{high:.1f}':>13} {preloader:>10} "
            f"{row.with_preloader / 1024:9.1f} "
            f"{_ratio(row.with_preloader, direct.with_preloader):>10}"
        )
    smart = memory["SmartSpawner"]
    if not smart.preloaders:
        print(
            "    SmartSpawner's preloader was not found (no process under the "
            "server with\n    'preloader' in its command line), so its total "
            "counts the instances only."
        )
    elif len(smart.preloaders) > 1:
        print(f"    the preloader column sums pids {smart.preloaders}")


def report_targets(
    medians: dict[tuple[str, str], tuple[float, float]], memory: dict[str, Memory]
) -> None:
    direct, smart = memory["DirectSpawner"], memory["SmartSpawner"]
    rows = [
        (
            "slow_start spawn, warm preloader vs Direct's 2nd spawn",
            medians["slow_start", "SmartSpawner"][1]
            / medians["slow_start", "DirectSpawner"][1],
            SPAWN_TARGET,
        ),
        (
            f"memory of {INSTANCES} slow_start instances",
            smart.instances / direct.instances,
            MEMORY_TARGET,
        ),
        (
            "the same, SmartSpawner's preloader counted too",
            smart.with_preloader / direct.instances,
            MEMORY_TARGET,
        ),
    ]
    print()
    print("targets, SmartSpawner / DirectSpawner:")
    for label, ratio, target in rows:
        print(
            f"  {label:56} {ratio:5.2f}x  (target <= {target}x: "
            f"{_verdict(ratio, target)})"
        )


def run(samples: int) -> None:
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for app_name, (app, expected) in APPS.items():
        for spawner_name, make_spawner in SPAWNERS.items():
            first, second = spawn_times(make_spawner, app, expected, samples)
            medians[app_name, spawner_name] = (
                statistics.median(first),
                statistics.median(second),
            )
    report_spawn(medians, samples)
    memory = {
        name: instance_memory(make, *APPS["slow_start"])
        for name, make in SPAWNERS.items()
    }
    report_memory(memory)
    report_targets(medians, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--samples", type=int, help="spawn samples per cell")
    args = parser.parse_args()
    samples = args.samples or (2 if args.quick else 5)
    print(f"# bench_spawn: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    try:
        run(samples)
    finally:
        TRACKER.check_all_gone()


if __name__ == "__main__":
    main()
