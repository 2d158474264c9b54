"""HTTP front-end benchmark: ``actorpool serve`` against gunicorn, under wrk.

Run from the repository root, with wrk and gunicorn installed::

    apt-get install -y wrk && pip install gunicorn    # once
    python benchmarks/bench_serve.py            # about a minute
    python benchmarks/bench_serve.py --quick    # a smoke run, 3 s per load

Every server serves ``examples/hello`` (one WSGI app, ``hello world``) from
the same number of application processes (``--processes``, 4), and wrk loads
it with 2 threads and 16 keep-alive connections (``wrk -t2 -c16 -d10s
--latency``; ``--connections`` sets another number) after a warm-up that
leaves every application process started.
It measures, in one run, requests per second and the 99th-percentile latency
of:

1. ``actorpool serve`` with 2 front-end workers (one per CPU of the reference
   machine), ``--max-pool-size 4 --min-instances 4``, with the direct spawner
   and again with the smart one;
2. ``gunicorn`` with 4 sync workers, the baseline: the same processes
   serving the app, with no pool in between (a sync worker answers each
   request with ``Connection: close``, so wrk reconnects for every request);
3. ``actorpool serve`` with two apps: hello at ``/`` and, at ``/slow``, a
   temporary app that sleeps 5 s in its start-up and asks to be restarted
   on every request (``tmp/always_restart.txt``, ``--restart-check-interval
   0``). hello is loaded twice: with ``/slow`` untouched, then while a
   background client asks for ``/slow/`` again and again (each answer needs a
   new 5-second spawn, and the next request follows 0.5 s later), so that the
   slow app is being spawned throughout the measurement. The pool has room
   for hello's 4 processes and the slow one (``--max-pool-size 6
   --max-per-app 4``), so neither app evicts the other.

and prints each figure with its ratio to gunicorn, the two-app figures with
their ratio to the one-app direct-spawner run, and the CPU each part of the
server spent while wrk ran (from ``/proc/PID/stat``, sampled every second, in
% of one CPU and in µs per request), with what the rest of the machine spent
meanwhile (``/proc/stat``): other work there skews the figures. Targets:
actorpool at least 0.5x gunicorn's requests per second, and hello's requests
per second while the other app spawns at least 0.9x the one-app figure (no
slowdown beyond noise).

Every server is stopped with SIGTERM at the end, and the benchmark checks
that each process it saw (masters, front-end workers, pool servers, app
processes, gunicorn workers) has exited, and that ``ps`` shows none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _procfs import ProcessTracker, descendants, stat_fields

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello"

FRONTEND_WORKERS = 2
"""actorpool's front-end workers: one per CPU of the 2-CPU reference machine."""


@dataclasses.dataclass
class WrkShape:
    """How wrk loads a server: its threads and its keep-alive connections."""

    threads: int = 2
    connections: int = 16


WRK = WrkShape()
"""Set from ``--connections`` before any load."""

SLOW_START = 5.0
"""Seconds the slow app sleeps in its start-up."""
SLOW_PAUSE = 0.5
"""Seconds between one answer from /slow/ and the next request for it."""

START_TIMEOUT = 60.0
"""Seconds a server may take to start answering."""
STOP_TIMEOUT = 60.0
"""Seconds a server may take to exit after SIGTERM before it is killed."""

SERVE_TARGET = 0.5
"""Least actorpool may serve, as a share of gunicorn's requests per second."""
TWO_APP_TARGET = 0.9
"""Least hello may serve while the other app spawns, as a share of one app alone."""

BUSY = 0.2
"""CPU seconds per second of other work during a run above which it is flagged."""

SLOW_APP = '''\
"""An app whose start-up takes {seconds} s: it stands for a slow app."""

import time

time.sleep({seconds})

BODY = b"slow app ready\\n"


def application(environ, start_response):
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))],
    )
    return [BODY]
'''


# --- what the machine must have -----------------------------------------------------


def check_tools() -> None:
    """Exit with a clear message when wrk or gunicorn is missing."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (the load generator): apt-get install -y wrk")
    if importlib.util.find_spec("gunicorn") is None:
        missing.append(
            f"gunicorn (the baseline) for {sys.executable}: pip install gunicorn"
        )
    if missing:
        sys.exit(
            "bench_serve: missing "
            + "; and ".join(missing)
            + ". Install what is missing and run again."
        )


# --- processes: who they are, how much CPU, whether they are gone -----------------


def cpu_ticks(pid: int) -> int | None:
    """User + system clock ticks of every thread of ``pid``; None if it is gone."""
    try:
        fields = stat_fields(pid)
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def leftovers_in_ps(markers: list[str]) -> list[str]:
    """Lines of ``ps`` for live processes whose command line names a marker."""
    output = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    own = str(os.getpid())
    return [
        line.strip()
        for line in output.splitlines()
        if line.split(None, 1)[0] != own
        and "ps -eo" not in line
        and any(marker in line for marker in markers)
    ]


# --- CPU accounting while wrk runs ------------------------------------------------


class CpuSampler:
    """CPU ticks of every process under some roots, sampled about once a second.

    A process's share is its last sample minus its first; one first seen
    after the start was born during the run and counts from zero. Sampling
    every second keeps most of the CPU of a process that exits mid-run.
    """

    def __init__(self, roots: list[int], interval: float = 1.0) -> None:
        self._roots = roots
        self._interval = interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        for root in self._roots:
            for pid in [root, *descendants(root)]:
                ticks = cpu_ticks(pid)
                if ticks is None:
                    continue
                if pid not in self.first:
                    self.first[pid] = ticks if initial else 0
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        self.parent[pid] = int(stat_fields(pid)[1])
                self.last[pid] = ticks

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample(initial=False)

    def start(self) -> None:
        self._sample(initial=True)
        self._thread.start()

    def stop(self) -> dict[int, float]:
        """CPU seconds of each process over the run."""
        self._stop.set()
        self._thread.join()
        self._sample(initial=False)
        ticks = os.sysconf("SC_CLK_TCK")
        return {pid: (self.last[pid] - self.first[pid]) / ticks for pid in self.first}


# --- wrk --------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    """What one wrk run measured, and the CPU spent while it ran."""

    requests_per_second: float
    p99: float
    """Seconds."""
    requests: int
    errors: str
    seconds: float
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    """CPU seconds over the run by role ("wrk", "pool server", ...)."""
    cpu_detail: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """CPU seconds of each process of a role with several."""
    elsewhere: float = 0.0
    """CPU seconds the rest of the machine spent over the run (other work)."""


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str, seconds: float) -> Load:
    """The figures of one ``wrk --latency`` report."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    count = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rate is None or p99 is None or count is None:
        raise RuntimeError(f"cannot read wrk's report:\n{output}")
    errors = [
        line.strip()
        for line in output.splitlines()
        if line.strip().startswith(("Socket errors", "Non-2xx"))
    ]
    return Load(
        float(rate[1]), _duration(p99[1]), int(count[1]), "; ".join(errors), seconds
    )


def wrk(url: str, seconds: float, shape: WrkShape = WRK) -> Load:
    """Load ``url`` for ``seconds`` with wrk; its report, and wrk's own CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            "wrk",
            f"-t{shape.threads}",
            f"-c{shape.connections}",
            f"-d{seconds:g}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stderr}")
    load = parse_wrk(done.stdout, seconds)
    load.cpu["wrk"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    return load


def measure(
    url: str, seconds: float, roots: list[int], roles: Roles, tracker: ProcessTracker
) -> Load:
    """One measured wrk run, with the CPU of every process under ``roots``."""
    sampler = CpuSampler(roots)
    own = resource.getrusage(resource.RUSAGE_SELF)
    busy = machine_busy()
    sampler.start()
    load = wrk(url, seconds)
    cpu = sampler.stop()
    busy = machine_busy() - busy
    mine = resource.getrusage(resource.RUSAGE_SELF)
    load.cpu["this benchmark"] = (mine.ru_utime - own.ru_utime) + (
        mine.ru_stime - own.ru_stime
    )
    for pid, used in cpu.items():
        tracker.add(pid)
        role = roles.of(pid, sampler.parent.get(pid, 0))
        load.cpu[role] = load.cpu.get(role, 0.0) + used
        load.cpu_detail.setdefault(role, []).append(used)
    load.elsewhere = max(0.0, busy - sum(load.cpu.values()))
    return load


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [int(field) for field in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is within user)
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


# --- the servers ------------------------------------------------------------------


@dataclasses.dataclass
class Roles:
    """Which part of a server each of its processes is."""

    top: int
    top_name: str
    child_name: str
    pool_server: int = 0

    def of(self, pid: int, parent: int) -> str:
        if pid == self.top:
            return self.top_name
        if self.pool_server and pid == self.pool_server:
            return "pool server"
        if parent == self.top:
            return self.child_name
        return "app processes"


class Server:
    """A server started as a subprocess in a session of its own."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, and wait; SIGKILL its process group if it will not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"  {self.name}: still running after SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_serving(server: Server, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not answer in {START_TIMEOUT:.0f} s")


@dataclasses.dataclass
class ActorPoolServe:
    server: Server
    port: int
    pool_server: int
    status_socket: str

    def status(self) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.status_socket)
            sock.sendall(b'{"command": "status"}\n')
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        reply: dict[str, object] = json.loads(data)
        return reply

    def processes_of(self, app_root: Path) -> int:
        apps = self.status()["apps"]
        assert isinstance(apps, list)
        for app in apps:
            if app["app_root"] == str(app_root):
                return len(app["processes"])
        return 0


def start_actorpool(
    name: str, apps: list[str], options: list[str], work: Path
) -> ActorPoolServe:
    """``actorpool serve`` on a free port; its port and pool server pid."""
    log = work / f"{name.replace(' ', '-')}.log"
    server = Server(
        name,
        [
            sys.executable,
            "-m",
            "actorpool",
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            str(FRONTEND_WORKERS),
            "--log-level",
            "warning",
            "--runtime-dir",
            str(work / "run"),
            *options,
            *apps,
        ],
        log,
    )
    pattern = re.compile(
        r"actorpool serve: http://[^ ]*:(\d+)/ \(master pid \d+, "
        r"pool server pid (\d+)\)\nactorpool serve: status socket (\S+)\n"
    )
    deadline = time.monotonic() + START_TIMEOUT
    while (match := pattern.search(log.read_text())) is None:
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not start:\n{server.log_tail()}")
        time.sleep(0.05)
    serve = ActorPoolServe(server, int(match[1]), int(match[2]), match[3])
    wait_until_serving(server, serve.port)
    return serve


def warm_up_actorpool(
    serve: ActorPoolServe, processes: int, tracker: ProcessTracker
) -> None:
    """Load hello until it has all its processes, so none is spawned mid-run."""
    url = f"http://127.0.0.1:{serve.port}/"
    for _ in range(10):
        wrk(url, 1, WrkShape())  # enough connections to busy every process
        if serve.processes_of(HELLO) >= processes:
            break
    else:
        raise RuntimeError(
            f"hello has {serve.processes_of(HELLO)} processes after warming up,"
            f" not {processes}"
        )
    tracker.add_tree(serve.server.proc.pid)


def run_actorpool(
    spawner: str, processes: int, seconds: float, work: Path, tracker: ProcessTracker
) -> Load:
    serve = start_actorpool(
        f"actorpool {spawner}",
        [str(HELLO)],
        [
            "--spawner",
            spawner,
            "--max-pool-size",
            str(processes),
            "--min-instances",
            str(processes),
        ],
        work,
    )
    try:
        tracker.add_tree(serve.server.proc.pid)
        warm_up_actorpool(serve, processes, tracker)
        return measure(
            f"http://127.0.0.1:{serve.port}/",
            seconds,
            [serve.server.proc.pid],
            Roles(
                serve.server.proc.pid, "master", "front-end workers", serve.pool_server
            ),
            tracker,
        )
    finally:
        tracker.add_tree(serve.server.proc.pid)
        serve.server.stop()


def run_gunicorn(
    processes: int, seconds: float, work: Path, tracker: ProcessTracker
) -> tuple[Load, int]:
    port = free_port()
    server = Server(
        "gunicorn",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(processes),
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--chdir",
            str(HELLO),
            "passenger_wsgi:application",
        ],
        work / "gunicorn.log",
    )
    try:
        wait_until_serving(server, port)
        wrk(f"http://127.0.0.1:{port}/", 1)  # warm-up, as for actorpool
        tracker.add_tree(server.proc.pid)
        return (
            measure(
                f"http://127.0.0.1:{port}/",
                seconds,
                [server.proc.pid],
                Roles(server.proc.pid, "arbiter", "sync workers"),
                tracker,
            ),
            port,
        )
    finally:
        tracker.add_tree(server.proc.pid)
        server.stop()


# --- two apps, one of them always spawning ------------------------------------------


def make_slow_app(work: Path) -> Path:
    """An app root that takes SLOW_START s to start and restarts on every get."""
    root = work / "slowapp"
    (root / "tmp").mkdir(parents=True)
    (root / "passenger_wsgi.py").write_text(SLOW_APP.format(seconds=SLOW_START))
    (root / "tmp" / "always_restart.txt").touch()
    return root


class SlowClient:
    """Asks for /slow/ again and again: each answer waits for a fresh spawn."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.requests: list[tuple[float, float, int]] = []  # start, end, status
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _ = http_get(self._port, "/slow/", timeout=SLOW_START * 6)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                status = 0
            self.requests.append((started, time.monotonic(), status))
            self._stop.wait(SLOW_PAUSE)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop asking; wait for the request in flight (a spawn) to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(SLOW_START * 8)

    def coverage(self, start: float, end: float) -> tuple[int, float]:
        """Requests overlapping [start, end], and the share of it they cover."""
        covered = 0.0
        count = 0
        for began, ended, _ in self.requests:
            overlap = min(ended, end) - max(began, start)
            if overlap > 0:
                count += 1
                covered += overlap
        return count, covered / (end - start)


@dataclasses.dataclass
class TwoApps:
    idle: Load
    spawning: Load
    slow_requests: int
    slow_coverage: float
    slow_statuses: list[int]
    slow_failures: list[str]


def run_two_apps(
    processes: int, seconds: float, work: Path, tracker: ProcessTracker
) -> TwoApps:
    slow = make_slow_app(work)
    serve = start_actorpool(
        "actorpool two apps",
        [f"/={HELLO}", f"/slow={slow}"],
        [
            "--max-pool-size",
            str(processes + 2),
            "--max-per-app",
            str(processes),
            "--min-instances",
            str(processes),
            "--restart-check-interval",
            "0",
            "--spawn-timeout",
            str(SLOW_START * 6),
        ],
        work,
    )
    master = serve.server.proc.pid
    roles = Roles(master, "master", "front-end workers", serve.pool_server)
    url = f"http://127.0.0.1:{serve.port}/"
    slow_client = SlowClient(serve.port)
    try:
        tracker.add_tree(master)
        warm_up_actorpool(serve, processes, tracker)
        idle = measure(url, seconds, [master], roles, tracker)
        slow_client.start()
        # Let the first /slow/ get reach the pool, so a spawn is under way
        # from the first request wrk makes.
        time.sleep(0.2)
        started = time.monotonic()
        spawning = measure(url, seconds, [master], roles, tracker)
        ended = time.monotonic()
        slow_client.stop()  # the request in flight is recorded when it ends
        count, coverage = slow_client.coverage(started, ended)
        return TwoApps(
            idle,
            spawning,
            count,
            coverage,
            sorted({status for _, _, status in slow_client.requests}),
            slow_client.failures,
        )
    finally:
        slow_client.stop()
        tracker.add_tree(master)
        serve.server.stop()


# --- the report -------------------------------------------------------------------


def print_table(rows: dict[str, Load], gunicorn: Load, one_app: Load) -> None:
    print()
    header = (
        f"{'':44} {'req/s':>9} {'p99':>10} {'vs gunicorn':>12} {'vs 1 app':>9}"
        f"   {'requests':>9}"
    )
    print(header)
    for name, load in rows.items():
        versus_one = (
            f"{load.requests_per_second / one_app.requests_per_second:8.2f}x"
            if name.startswith("actorpool, two apps")
            else ""
        )
        print(
            f"{name:44} {load.requests_per_second:9.0f} {load.p99 * 1e3:7.2f} ms"
            f" {load.requests_per_second / gunicorn.requests_per_second:11.2f}x"
            f" {versus_one:>9}   {load.requests:9d}"
        )
        if load.errors:
            print(f"{'':44} wrk: {load.errors}")


ROLE_ORDER = (
    "wrk",
    "this benchmark",
    "arbiter",
    "sync workers",
    "master",
    "front-end workers",
    "pool server",
    "app processes",
)

SHORT_NAMES = {
    "gunicorn": "gunicorn",
    f"actorpool serve, {FRONTEND_WORKERS} workers, direct": "direct",
    f"actorpool serve, {FRONTEND_WORKERS} workers, smart": "smart",
    "actorpool, two apps, /slow idle": "2 apps, idle",
    "actorpool, two apps, /slow spawning": "2 apps, spawn",
}


def _short(name: str) -> str:
    for prefix, short in SHORT_NAMES.items():
        if name.startswith(prefix):
            return short
    return name[:16]


def print_cpu(rows: dict[str, Load]) -> None:
    """CPU by part of each server: % of one CPU, and µs per request."""
    print()
    print(
        "CPU while wrk ran, by part: % of one CPU (2 CPUs = 200%) and µs of CPU"
        " per request"
    )
    print(f"{'':18}" + "".join(f"{_short(name):>18}" for name in rows))
    roles = [role for role in ROLE_ORDER if any(role in r.cpu for r in rows.values())]
    for role in roles:
        cells = []
        for load in rows.values():
            used = load.cpu.get(role)
            if used is None:
                cells.append(f"{'':>18}")
                continue
            percent = 100 * used / load.seconds
            per_request = 1e6 * used / max(1, load.requests)
            count = len(load.cpu_detail.get(role, []))
            many = f"{count}x " if count > 1 else ""
            cells.append(f"{many}{percent:3.0f}% {per_request:5.0f} µs".rjust(18))
        print(f"{role:18}" + "".join(cells))
    print(
        f"{'total':18}"
        + "".join(
            f"{100 * sum(load.cpu.values()) / load.seconds:3.0f}%"
            f" {1e6 * sum(load.cpu.values()) / max(1, load.requests):5.0f} µs".rjust(18)
            for load in rows.values()
        )
    )
    print(
        f"{'rest of machine':18}"
        + "".join(
            f"{100 * load.elsewhere / load.seconds:3.0f}%{'':8}".rjust(18)
            for load in rows.values()
        )
    )
    busy = [
        _short(name)
        for name, load in rows.items()
        if load.elsewhere > BUSY * load.seconds
    ]
    if busy:
        print(
            f"the machine was busy with other work during: {', '.join(busy)};"
            " their figures are skewed"
        )
    print("each process of a part with several, % of one CPU:")
    for name, load in rows.items():
        parts = [
            f"{role} " + " + ".join(f"{100 * used / load.seconds:.0f}" for used in each)
            for role, each in load.cpu_detail.items()
            if len(each) > 1
        ]
        print(f"  {_short(name):14} " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="application processes of hello, in every server (4)",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="per measured wrk run (10)"
    )
    parser.add_argument(
        "--no-smart", action="store_true", help="skip the smart-spawner run"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=WRK.connections,
        help=f"wrk's keep-alive connections ({WRK.connections}); with 1, one"
        " thread of one front-end worker does all the work",
    )
    args = parser.parse_args()
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    WRK.connections = args.connections
    WRK.threads = min(WRK.threads, args.connections)  # wrk wants threads <= conns
    check_tools()
    seconds = 3.0 if args.quick else args.seconds
    wrk_version = subprocess.run(
        ["wrk", "--version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    with open("/proc/loadavg") as loadavg:
        load_before = " ".join(loadavg.read().split()[:3])
    print(
        f"# bench_serve: {os.cpu_count()} CPUs, Python {sys.version.split()[0]},"
        f" {wrk_version.split(' [')[0]}, gunicorn"
        f" {importlib.metadata.version('gunicorn')}, load average {load_before}"
    )
    print(
        f"# hello with {args.processes} app processes everywhere;"
        f" wrk -t{WRK.threads} -c{WRK.connections} -d{seconds:g}s --latency;"
        f" actorpool with --workers {FRONTEND_WORKERS}"
    )

    tracker = ProcessTracker()
    rows: dict[str, Load] = {}
    gunicorn_port = 0
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        try:
            rows[f"gunicorn, {args.processes} sync workers"], gunicorn_port = (
                run_gunicorn(args.processes, seconds, work, tracker)
            )
            one_app = rows[f"actorpool serve, {FRONTEND_WORKERS} workers, direct"] = (
                run_actorpool("direct", args.processes, seconds, work, tracker)
            )
            if not args.no_smart:
                rows[f"actorpool serve, {FRONTEND_WORKERS} workers, smart"] = (
                    run_actorpool("smart", args.processes, seconds, work, tracker)
                )
            two = run_two_apps(args.processes, seconds, work, tracker)
            rows["actorpool, two apps, /slow idle"] = two.idle
            rows["actorpool, two apps, /slow spawning"] = two.spawning
        finally:
            time.sleep(0.5)  # let the last app processes finish exiting
            left = tracker.still_running()
            in_ps = leftovers_in_ps(
                [tmp, *([f"127.0.0.1:{gunicorn_port}"] if gunicorn_port else [])]
            )
            if left or in_ps:
                print("LEFT RUNNING:\n  " + "\n  ".join(left + in_ps))

    gunicorn = rows[f"gunicorn, {args.processes} sync workers"]
    print_table(rows, gunicorn, one_app)
    print(
        f"\n/slow during the 'spawning' run: {two.slow_requests} requests of"
        f" {SLOW_START:g} s spawns in flight for {100 * two.slow_coverage:.0f}%"
        f" of it; statuses {two.slow_statuses}"
        + (f"; failures {two.slow_failures}" if two.slow_failures else "")
    )
    print_cpu(rows)

    print()
    best = max(
        load.requests_per_second
        for name, load in rows.items()
        if name.startswith("actorpool serve")
    )
    ratio = one_app.requests_per_second / gunicorn.requests_per_second
    print(
        f"target: actorpool >= {SERVE_TARGET}x gunicorn req/s: {ratio:.2f}x"
        f" (best spawner {best / gunicorn.requests_per_second:.2f}x):"
        f" {'met' if ratio >= SERVE_TARGET else 'NOT met'}"
    )
    two_ratio = two.spawning.requests_per_second / one_app.requests_per_second
    print(
        f"target: hello while /slow spawns >= {TWO_APP_TARGET}x one app alone:"
        f" {two_ratio:.2f}x (vs the same server with /slow idle:"
        f" {two.spawning.requests_per_second / two.idle.requests_per_second:.2f}x):"
        f" {'met' if two_ratio >= TWO_APP_TARGET else 'NOT met'}"
    )
    if left or in_ps:
        sys.exit(1)
    print("every server and app process the benchmark started has exited")


if __name__ == "__main__":
    main()
