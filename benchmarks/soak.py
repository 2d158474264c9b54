"""Soak test: a pool under load, client deaths, app crashes and garbage, checked.

Run from the repository root::

    python benchmarks/soak.py                    # 60 s
    python benchmarks/soak.py --duration 600     # the 10-minute soak
    python benchmarks/soak.py --duration 30 --seed 7 --clients 32

A pool server with small limits (6 processes, 3 per app, 8 waiters per app,
so queues form) serves four tiny WSGI apps to ``--clients`` client
processes forked from the creator, as a prefork front end's workers are.
Each client loops: a random app, ``get`` with no timeout or one of
0.05-2 s, hold the session 0-20 ms (sometimes with a real HTTP request on
it, sometimes holding a second session), close. Every get is reported to
the creator over a pipe before it starts and when it is answered.

Faults, all drawn from ``--seed``: about every second a random client is
SIGKILLed and replaced; about every 5 s a random application process is
SIGKILLed; every few seconds a *rogue* client connects and sends a frame
that breaks the protocol (random bytes, msgpack of the wrong shape, an
oversized or zero length, a truncated frame), sometimes after taking a
session and sending forged notices that name other clients' sessions.

A monitor process samples ``statistics()`` every 100 ms and the server's
descriptors, threads and memory from ``/proc`` every 250 ms. At the end
the clients are stopped cleanly and the run prints a summary and the
result of each check; it exits 0 only if all hold:

* no unexpected outcome: every get ends in a session, ``QueueFullError``,
  ``GetTimeoutError`` or ``SpawnError``, and no client fails otherwise;
* no get hung: none took longer than its timeout + 10 s (a get without a
  timeout: 2 x ``spawn_timeout`` + 10 s), watched while it waits;
* every get answered exactly once: each client's gets begin and end in
  order, one answer each, and a client stopped cleanly has none pending and
  reports the same count as the books; the gets in flight when a client is
  killed are counted as lost with it, which is allowed;
* no process served two sessions at once: each client records a session
  when ``get`` has returned and again before ``close`` is sent, so these
  spans lie inside the real ones and overlap on one process only if the
  real ones did (a process here serves one session at a time);
* every session reached the app and the process it named: the session's
  ``app_root`` is the app asked for, and an HTTP answer names that app and
  the session's ``pid`` (a request may fail only on a process we killed);
* every rogue frame refused: a connection-level ``ProtocolError``, then end
  of stream;
* nothing held once the clients are gone: ``active == 0``, ``waiting ==
  0`` and ``clients`` is the monitor's one connection;
* ``count <= max_pool_size`` in every sample;
* server resources bounded: descriptors, threads and RSS at the end of the
  load within a small bound of the end of the warm-up (see ``FD_BOUND``);
* a process gone from the statistics is dead (exited, or a zombie) within
  2 s;
* no process left after ``close()``: every pid the statistics ever showed,
  and every child of the server the monitor ever saw, is dead within 2 s.

Process structure: the creator stays single-threaded for the whole run, so
it can fork replacement clients and rogues at any time; it runs the fault
schedule, reads every pipe and keeps the books. Clients, rogues and the
monitor are its forked children, single-threaded too; each dies with the
creator (``PR_SET_PDEATHSIG``) and ignores SIGINT, so Ctrl-C reaches the
creator only and its clean-up stops everything.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import dataclasses
import http.client
import logging
import os
import pwd
import random
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack

from actorpool import (
    ApplicationPoolServer,
    GetTimeoutError,
    PoolConfig,
    QueueFullError,
    Session,
    SpawnError,
)
from actorpool.errors import RemoteProtocolError
from actorpool.messages import CloseSession, SessionFailed, decode
from actorpool.protocol import MAX_REQUEST_FRAME
from actorpool.spawner import Spawner
from actorpool.spawners import DirectSpawner, SmartSpawner

# --- the load -------------------------------------------------------------------------

APPS = 4
"""App roots, each a ``passenger_wsgi.py`` that answers its name and pid."""

MAX_POOL_SIZE = 6
MAX_PER_APP = 3
MAX_QUEUE_SIZE = 8
MAX_REQUESTS = 500
"""A process is retired after this many sessions, so retirement runs too."""
MAX_IDLE_TIME = 5.0
"""Idle processes above min_instances are reaped, so reaping runs too."""
SPAWN_TIMEOUT = 10.0
"""Bounds a spawn, and with it how long a get without a timeout may wait."""

NO_TIMEOUT_SHARE = 0.25
"""Share of gets made without a timeout; the rest wait 0.05-2 s at most."""
SECOND_SESSION_SHARE = 0.15
"""Share of sessions during which a second one is taken (always with a
timeout: two clients each holding one and waiting for ever for another
could otherwise deadlock each other, which is the clients' fault)."""
HTTP_SHARE = 0.3
"""Share of sessions that carry one real HTTP request."""
HTTP_TIMEOUT = 10.0

# --- the faults -----------------------------------------------------------------------

CLIENT_KILL_EVERY = (0.5, 1.5)
"""Seconds between two client SIGKILLs (uniform), about one a second."""
APP_KILL_EVERY = (3.0, 7.0)
"""Seconds between two application-process SIGKILLs, about one in 5 s."""
ROGUE_EVERY = (1.5, 4.5)
"""Seconds between two rogue clients, about one in 3 s."""
ROGUE_KINDS = ("random-bytes", "wrong-shape", "oversized", "zero-length", "truncated")
ROGUE_VERDICT_WAIT = 10.0
"""Seconds a rogue waits for the server to answer its bad frame and close."""

# --- the checks -----------------------------------------------------------------------

HANG_GRACE = 10.0
"""A get that has taken longer than its timeout plus this is a hang."""
NO_TIMEOUT_BOUND = 2 * SPAWN_TIMEOUT
"""What a get without a timeout may legitimately wait before the grace: the
spawn it may be waiting for, and one more behind a failed one."""
DEATH_BOUND = 2.0
"""A process gone from the statistics must be dead within this (it is sent
SIGTERM, then SIGKILL one second later)."""
FD_BOUND = 10
THREAD_BOUND = 5
RSS_BOUND_MIB = 20.0
"""Growth allowed from the end of the warm-up to the end of the load. The
server holds a socket and an actor thread per client and a few descriptors
and threads per application process; both populations are the same at the
two marks (32 clients, up to 6 processes) but churn: a killed client's
replacement may be connecting, a spawn may be under way. Each mark is the
minimum over the two seconds before it, which takes out most of the churn;
the bounds cover what remains. A leak per event would be far over them: a
600 s run kills ~600 clients, ~120 processes and sends ~200 rogue frames.
RSS grows by a few MiB in the first minutes (the allocator's arenas fill)
and then stays; 20 MiB over ~300 000 gets is under 70 bytes a get."""
RESOURCE_WINDOW = 2.0
WARM_UP_SHARE = 0.1
MIN_WARM_UP = 5.0

SAMPLE_EVERY = 0.1
RESOURCES_EVERY = 0.25
QUIESCE_WAIT = 15.0
"""Seconds the pool may take to show no session, waiter or client left once
every client has gone (a killed client's actor must notice its end)."""
STOP_WAIT = 60.0
"""Seconds the clients get to stop cleanly once told to."""
ORPHAN_WAIT = 2.0

PR_SET_PDEATHSIG = 1

WSGI_APP = '''\
"""Soak app {name}: answers its name and its pid."""
import os


def application(environ, start_response):
    # The pid now, not at import: a SmartSpawner worker is forked after it.
    body = b"{name} %d\\n" % os.getpid()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
'''


def pack(record: Any) -> bytes:
    result: bytes = msgpack.packb(record, use_bin_type=True)
    return result


def send_record(fd: int, record: list[Any]) -> None:
    """Write one record to the creator, whole (a pipe may take part of it)."""
    view = memoryview(pack(record))
    while view:
        view = view[os.write(fd, view) :]


# --- /proc ----------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """State, parent pid and start time of ``pid``, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The name is in parentheses and may hold anything, spaces included.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def is_alive(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` is still the process that started at ``start_time``.

    A zombie is dead (it runs nothing; only its parent's ``wait`` is due),
    and so is a different process that has been given the same pid.
    """
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[2] == start_time


def children_of(parent: int) -> dict[int, int]:
    """Live children of ``parent``: pid -> start time."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = proc_stat(int(entry))
        if stat is not None and stat[1] == parent and stat[0] not in ("Z", "X"):
            found[int(entry)] = stat[2]
    return found


def server_resources(pid: int) -> tuple[int, int, int]:
    """Open descriptors, threads and resident memory (KiB) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return fds, threads, rss


# --- the client -----------------------------------------------------------------------


class _Broken(Exception):
    """The client's connection is unusable; it has said why and exits."""


def client_main(
    out: int, stop: int, server: ApplicationPoolServer, apps: list[str], seed: int
) -> int:
    """One client: get, hold, maybe HTTP, close, until ``stop`` reads end of file."""
    rng = random.Random(seed)
    pool = server.connect()
    server.detach()
    send_record(out, ["r", time.monotonic()])
    os.set_blocking(stop, False)
    gets = 0

    def get(app: int, timeout: float | None) -> Session | None:
        nonlocal gets
        gets += 1
        root = apps[app]
        send_record(out, ["b", gets, time.monotonic(), timeout, app])
        session = None
        try:
            session = pool.get(root, timeout=timeout)
            kind, text = "session", ""
        except (QueueFullError, GetTimeoutError, SpawnError) as exc:
            kind, text = type(exc).__name__, str(exc)
        except Exception as exc:
            kind, text = "other", f"{type(exc).__name__}: {exc}"
        if session is not None:
            send_record(
                out,
                [
                    "e",
                    gets,
                    time.monotonic(),
                    kind,
                    session.id,
                    session.pid,
                    session.app_root == root,
                    "",
                ],
            )
        else:
            send_record(
                out, ["e", gets, time.monotonic(), kind, 0, 0, True, text[:300]]
            )
        if kind == "other":
            raise _Broken
        return session

    def close(session: Session) -> None:
        # Recorded before the close is sent: the server can hand the process
        # to someone else only after it, so the books see hold times that lie
        # inside the real ones and overlap only if the real ones did.
        send_record(out, ["c", session.id, time.monotonic()])
        session.close()

    def fetch(session: Session, app: int) -> None:
        expected = f"app{app} {session.pid}\n"
        detail = ""
        try:
            session.socket.settimeout(HTTP_TIMEOUT)
            session.socket.sendall(
                b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
            )
            response = http.client.HTTPResponse(session.socket)
            try:
                response.begin()
                body = response.read().decode(errors="replace")
            finally:
                response.close()
            if response.status != 200 or body != expected:
                detail = f"status {response.status}, body {body!r:.80}"
        except (OSError, http.client.HTTPException) as exc:
            detail = f"{type(exc).__name__}: {exc}"
        send_record(out, ["h", session.pid, time.monotonic(), not detail, detail])

    try:
        while True:
            try:
                if os.read(stop, 1) == b"":
                    break
            except BlockingIOError:
                pass
            app = rng.randrange(len(apps))
            timeout = (
                None if rng.random() < NO_TIMEOUT_SHARE else rng.uniform(0.05, 2.0)
            )
            first = get(app, timeout)
            if first is None:
                time.sleep(rng.uniform(0, 0.01))  # a 503's worth of think time
                continue
            second = None
            try:
                if rng.random() < SECOND_SESSION_SHARE:
                    other = rng.randrange(len(apps))
                    second = get(other, rng.uniform(0.05, 0.5))
                    if second is not None and rng.random() < HTTP_SHARE:
                        fetch(second, other)
                time.sleep(rng.uniform(0, 0.02))
                if rng.random() < HTTP_SHARE:
                    fetch(first, app)
            finally:
                if second is not None:
                    close(second)
                close(first)
    except _Broken:
        return 3
    pool.close()
    send_record(out, ["d", gets])
    return 0


# --- the rogue ------------------------------------------------------------------------

_HEADER = struct.Struct(">I")


def bad_frame(kind: str, rng: random.Random) -> bytes:
    """A frame that breaks the protocol in the way ``kind`` names."""
    if kind == "random-bytes":
        while True:
            body = rng.randbytes(rng.randint(1, 200))
            try:
                decode(body, max_size=MAX_REQUEST_FRAME)
            except RemoteProtocolError:
                return _HEADER.pack(len(body)) + body
    if kind == "wrong-shape":
        body = pack(
            rng.choice(
                [
                    {"get": "/srv/app"},  # a map, not an array
                    [],  # no tag
                    "get /srv/app",  # not even a container
                    [99, 1],  # an unknown tag
                    [10, 1],  # Get without its fields
                    [10, 1, 42, None],  # Get with a number for a path
                    [10, 1, "/srv/app", "soon"],  # Get with a string timeout
                    [10, 0, "/srv/app", None],  # request id 0
                    [10, -1, "/srv/app", None],  # a negative request id
                    [1, 1, 4242],  # a second Hello
                    [30, 1, 1, 1, "/srv/app", "/tmp/x"],  # a reply, from a client
                    [20, "one"],  # CloseSession with a string id
                ]
            )
        )
        return _HEADER.pack(len(body)) + body
    if kind == "oversized":
        size = rng.choice([MAX_REQUEST_FRAME + 1, 1 << 24, 0xFFFFFFFF])
        return _HEADER.pack(size) + rng.randbytes(16)
    if kind == "zero-length":
        return _HEADER.pack(0) + pack([11, 1])
    if kind == "truncated":
        body = pack([10, 1, "/srv/app", None])
        return _HEADER.pack(len(body)) + body[: len(body) // 2]
    raise ValueError(kind)


def read_verdict(sock: socket.socket) -> tuple[str, str]:
    """How the server answered a bad frame: ``refused`` (a connection-level
    ProtocolError, then end of stream), ``closed`` (end of stream alone) or
    ``open`` (neither, in ``ROGUE_VERDICT_WAIT`` seconds)."""
    sock.settimeout(ROGUE_VERDICT_WAIT)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return "open", f"{len(data)} bytes and no end of stream"
    except OSError as exc:
        return "closed", f"{type(exc).__name__}: {exc}"
    if len(data) < _HEADER.size:
        return "closed", f"{len(data)} bytes"
    (size,) = _HEADER.unpack_from(data)
    try:
        reply = msgpack.unpackb(data[_HEADER.size : _HEADER.size + size])
    except Exception as exc:
        return "closed", f"undecodable answer: {exc}"
    if (
        isinstance(reply, list)
        and reply[:3] == [33, 0, "ProtocolError"]
        and len(data) == _HEADER.size + size
    ):
        return "refused", str(reply[3])[:200]
    return "closed", f"unexpected answer {reply!r:.200}"


def rogue_main(
    out: int, server: ApplicationPoolServer, apps: list[str], seed: int, kind: str
) -> int:
    """Connect, maybe take a session and forge notices, then break the protocol."""
    rng = random.Random(seed)
    pool = server.connect()
    server.detach()
    held = None
    forged = 0
    if rng.random() < 0.5:
        with contextlib.suppress(QueueFullError, GetTimeoutError, SpawnError):
            held = pool.get(rng.choice(apps), timeout=1.0)
    if held is not None:
        # The server must release it when it drops us. Only the socket goes,
        # so that the process can serve whoever gets it next.
        held.socket.close()
        # Session ids are consecutive, so the neighbours of ours belong to
        # other clients, some of them open now: the server must ignore both
        # notices for sessions that are not ours.
        for session_id in range(max(1, held.id - 10), held.id + 11):
            if session_id != held.id:
                pool._notify(CloseSession(session_id))
                pool._notify(SessionFailed(session_id))
                forged += 2
    pool._sock.sendall(bad_frame(kind, rng))
    if kind == "truncated":
        pool._sock.shutdown(socket.SHUT_WR)
    verdict, detail = read_verdict(pool._sock)
    pool.close()
    send_record(out, ["rogue", kind, held is not None, forged, verdict, detail])
    return 0


# --- the monitor ----------------------------------------------------------------------


def monitor_main(
    out: int, control: int, server: ApplicationPoolServer, max_pool_size: int
) -> int:
    """Sample the pool and the server until told to finish; then the final checks."""
    server_pid = server.pid
    pool = server.connect()
    server.detach()
    os.set_blocking(control, False)
    seen: dict[int, int | None] = {}  # pid in the statistics -> its start time
    present: set[int] = set()
    pending: dict[int, float] = {}  # pid gone from the statistics -> when
    descendants: dict[int, int] = {}
    samples = over = 0
    max_count = max_active = max_waiting = max_live = 0
    max_latency = max_gap = 0.0
    last = None
    next_resources = 0.0

    def check_deaths(now: float, final: bool = False) -> None:
        for pid, gone_at in list(pending.items()):
            if not is_alive(pid, seen[pid]):
                send_record(out, ["gone", pid, now - gone_at])
                del pending[pid]
            elif final or now - gone_at > 5 * DEATH_BOUND:
                send_record(out, ["gone", pid, None])
                del pending[pid]

    def sample_resources(now: float, phase: str) -> None:
        nonlocal max_live
        fds, threads, rss = server_resources(server_pid)
        live = children_of(server_pid)
        descendants.update(live)
        max_live = max(max_live, len(live))
        send_record(out, ["res", now, phase, fds, threads, rss, len(live)])

    while True:
        try:
            if os.read(control, 1) in (b"f", b""):
                break
        except BlockingIOError:
            pass
        start = time.monotonic()
        stats = pool.statistics()
        now = time.monotonic()
        max_latency = max(max_latency, now - start)
        if last is not None:
            max_gap = max(max_gap, now - last)
        last = now
        samples += 1
        max_count = max(max_count, stats.count)
        max_active = max(max_active, stats.active)
        max_waiting = max(max_waiting, stats.waiting)
        if stats.count > max_pool_size:
            over += 1
        ready = {p.pid for a in stats.apps for p in a.processes if p.pid}
        for pid in ready - seen.keys():
            stat = proc_stat(pid)
            # Already gone when first seen: it is dead, whatever has the pid now.
            seen[pid] = stat[2] if stat is not None else -1
        for pid in present - ready:
            pending[pid] = now
        present = ready
        check_deaths(now)
        send_record(
            out,
            [
                "s",
                now,
                stats.count,
                stats.active,
                stats.waiting,
                stats.clients,
                sorted(ready),
            ],
        )
        if now >= next_resources:
            sample_resources(now, "load")
            next_resources = now + RESOURCES_EVERY
        time.sleep(max(0.0, start + SAMPLE_EVERY - time.monotonic()))

    # Every client is gone: the pool must come to rest with nothing held.
    deadline = time.monotonic() + QUIESCE_WAIT
    while True:
        stats = pool.statistics()
        quiet = stats.active == 0 and stats.waiting == 0 and stats.clients == 1
        if quiet or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    now = time.monotonic()
    for pid in present - {p.pid for a in stats.apps for p in a.processes}:
        pending[pid] = now
    sample_resources(now, "rest")
    deadline = time.monotonic() + 5 * DEATH_BOUND
    while pending and time.monotonic() < deadline:
        check_deaths(time.monotonic())
        time.sleep(0.05)
    check_deaths(time.monotonic(), final=True)
    send_record(
        out,
        [
            "end",
            {
                "samples": samples,
                "over": over,
                "max_count": max_count,
                "max_active": max_active,
                "max_waiting": max_waiting,
                "max_live": max_live,
                "max_latency": max_latency,
                "max_gap": max_gap,
                "final": [stats.count, stats.active, stats.waiting, stats.clients],
                "seen": [[pid, t] for pid, t in seen.items()],
                "descendants": [[pid, t] for pid, t in descendants.items()],
            },
        ],
    )
    pool.close()
    return 0


# --- the creator ----------------------------------------------------------------------


@dataclasses.dataclass
class Child:
    """A forked child the creator reads from."""

    kind: str  # client, rogue or monitor
    number: int
    pid: int
    fd: int
    unpacker: Any = dataclasses.field(
        default_factory=lambda: msgpack.Unpacker(raw=False)
    )
    killed_at: float | None = None
    stopping: bool = False
    done: int | None = None
    broken: bool = False
    gets: int = 0
    in_flight: dict[int, tuple[float, float | None]] = dataclasses.field(
        default_factory=dict
    )
    hung: set[int] = dataclasses.field(default_factory=set)
    sessions: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Books:
    """Everything the creator counts, and every problem it sees."""

    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lost: int = 0
    lost_sessions: int = 0
    clients_started: int = 0
    clients_killed: int = 0
    apps_killed: int = 0
    killed_pids: set[int] = dataclasses.field(default_factory=set)
    http_ok: int = 0
    http_failed_killed: int = 0
    rogues: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    rogue_held: int = 0
    forged: int = 0
    max_wait_no_timeout: float = 0.0
    max_overshoot: float = 0.0
    holds: dict[int, array.array[float]] = dataclasses.field(default_factory=dict)
    samples: list[list[Any]] = dataclasses.field(default_factory=list)
    resources: list[list[Any]] = dataclasses.field(default_factory=list)
    deaths: list[float | None] = dataclasses.field(default_factory=list)
    monitor_end: dict[str, Any] | None = None
    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def problem(self, check: str, text: str) -> None:
        self.problems.setdefault(check, []).append(text)

    def example(self, kind: str, text: str) -> None:
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 3 and text not in examples:
            examples.append(text)


ANSWERED = "every get answered exactly once"
HUNG = "no get hung"
OTHER = "no unexpected outcome"
OVERLAP = "no process served two sessions at once"
ROUTING = "every session reached the app and the process it named"
ROGUES = "every rogue frame refused"
QUIET = "nothing held once the clients are gone"
COUNT = "count <= max_pool_size in every sample"
RESOURCES = "server resources bounded"
DEATHS = f"gone from the statistics -> dead within {DEATH_BOUND:g} s"
ORPHANS = "no process left after close()"
CHECKS = (
    OTHER,
    HUNG,
    ANSWERED,
    OVERLAP,
    ROUTING,
    ROGUES,
    QUIET,
    COUNT,
    RESOURCES,
    DEATHS,
)


class Soak:
    """The creator's side: forks, schedules faults, reads records, checks."""

    def __init__(
        self, args: argparse.Namespace, server: ApplicationPoolServer, apps: list[str]
    ) -> None:
        self.args = args
        self.server = server
        self.apps = apps
        self.rng = random.Random(args.seed)
        self.books = Books()
        self.children: dict[int, Child] = {}  # by pipe descriptor
        self.selector = selectors.DefaultSelector()
        # The clients stop when stop_w closes; the monitor finishes when it
        # reads from control_r. Only the creator holds the write ends.
        self.stop_r, self.stop_w = os.pipe()
        self.control_r, self.control_w = os.pipe()
        self.own_fds = {self.stop_r, self.stop_w, self.control_r, self.control_w}
        # What a child must close: the write ends above and every read end.
        self.parent_fds = {self.stop_w, self.control_w}
        self.numbers = 0
        self.latest_pids: list[int] = []
        self.monitor: Child | None = None
        self.t0 = self.warm_end = self.load_end = time.monotonic()

    # --- forking ---------------------------------------------------------------

    def fork(self, kind: str, target: Callable[[int], int]) -> Child:
        """Fork a child that runs ``target(pipe)``; its records come back on it."""
        # The point of the design: a fork of a threaded process may deadlock
        # in the child (and Python warns), so the creator never has threads.
        assert threading.active_count() == 1, threading.enumerate()
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        creator = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(read_fd)
                self._become_child(creator)
                code = target(write_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        self.numbers += 1
        child = Child(kind, self.numbers, pid, read_fd)
        self.children[read_fd] = child
        self.parent_fds.add(read_fd)
        self.selector.register(read_fd, selectors.EVENT_READ, child)
        return child

    def _become_child(self, creator: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the creator's
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != creator:  # it died before the line above
            os._exit(1)
        self.selector.close()
        for fd in self.parent_fds:
            os.close(fd)

    def start_client(self) -> Child:
        seed = self.rng.getrandbits(64)
        self.books.clients_started += 1
        return self.fork(
            "client",
            lambda out: client_main(out, self.stop_r, self.server, self.apps, seed),
        )

    def start_rogue(self) -> Child:
        seed = self.rng.getrandbits(64)
        kind = self.rng.choice(ROGUE_KINDS)
        return self.fork(
            "rogue", lambda out: rogue_main(out, self.server, self.apps, seed, kind)
        )

    def start_monitor(self) -> Child:
        def run(out: int) -> int:
            os.close(self.stop_r)  # the monitor is told to finish on its own pipe
            return monitor_main(out, self.control_r, self.server, MAX_POOL_SIZE)

        return self.fork("monitor", run)

    # --- faults ----------------------------------------------------------------

    def kill_client(self) -> None:
        running = [
            c
            for c in self.children.values()
            if c.kind == "client" and c.killed_at is None and not c.stopping
        ]
        if not running:
            return
        victim = self.rng.choice(sorted(running, key=lambda c: c.number))
        victim.killed_at = time.monotonic()  # before the kill: see ended()
        os.kill(victim.pid, signal.SIGKILL)
        self.books.clients_killed += 1
        self.start_client()

    def kill_app(self) -> None:
        candidates = sorted(self.latest_pids)
        if not candidates:
            return
        pid = self.rng.choice(candidates)
        stat = proc_stat(pid)
        if stat is None or stat[1] != self.server.pid or stat[0] in ("Z", "X"):
            return  # already gone (or not the server's): nothing to kill
        self.books.killed_pids.add(pid)  # before the kill: see record("h")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # it died (and was reaped) since we looked
        self.books.apps_killed += 1

    # --- records ---------------------------------------------------------------

    def read(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            child: Child = key.data
            try:
                data = os.read(child.fd, 65536)
            except OSError:
                data = b""
            if data:
                child.unpacker.feed(data)
                for record in child.unpacker:
                    self.record(child, record)
            else:
                self.ended(child)

    def record(self, child: Child, record: list[Any]) -> None:
        books = self.books
        kind = record[0]
        if kind == "b":
            _, number, started, timeout, _app = record
            if number != child.gets + 1 or child.in_flight:
                books.problem(
                    ANSWERED, f"client {child.number}: get {number} out of order"
                )
            child.gets = number
            child.in_flight[number] = (started, timeout)
        elif kind == "e":
            _, number, ended, outcome, session_id, pid, right_app, text = record
            begun = child.in_flight.pop(number, None)
            if begun is None:
                books.problem(
                    ANSWERED, f"client {child.number}: get {number} answered twice"
                )
                return
            started, timeout = begun
            books.outcomes[outcome] += 1
            waited = ended - started
            if timeout is None:
                books.max_wait_no_timeout = max(books.max_wait_no_timeout, waited)
            elif outcome == "GetTimeoutError":
                books.max_overshoot = max(books.max_overshoot, waited - timeout)
            if outcome == "session":
                child.sessions[session_id] = (pid, ended)
                if not right_app:
                    books.problem(ROUTING, f"session {session_id}: the wrong app")
            else:
                books.example(outcome, text)
                if outcome == "other":
                    child.broken = True  # it exits; its end is this problem's
                    books.problem(OTHER, f"client {child.number}: {text}")
        elif kind == "c":
            _, session_id, closing = record
            held = child.sessions.pop(session_id, None)
            if held is None:
                books.problem(ANSWERED, f"session {session_id} closed, never granted")
            else:
                self.hold(held[0], held[1], closing)
        elif kind == "h":
            _, pid, _when, ok, detail = record
            if ok:
                books.http_ok += 1
            elif pid in books.killed_pids:
                books.http_failed_killed += 1
            else:
                books.problem(ROUTING, f"HTTP on live process {pid}: {detail}")
        elif kind == "d":
            child.done = record[1]
        elif kind == "r":
            pass
        elif kind == "rogue":
            _, rogue_kind, held, forged, verdict, detail = record
            books.rogues[rogue_kind, verdict] += 1
            books.rogue_held += held
            books.forged += forged
            if verdict != "refused":
                books.problem(ROGUES, f"{rogue_kind}: {verdict} ({detail})")
        elif kind == "s":
            books.samples.append(record[:6])
            self.latest_pids = record[6]
        elif kind == "res":
            books.resources.append(record[1:])
        elif kind == "gone":
            books.deaths.append(record[2])
        elif kind == "end":
            books.monitor_end = record[1]

    def hold(self, pid: int, start: float, end: float) -> None:
        """Remember that ``pid`` served a session from ``start`` to ``end``."""
        self.books.holds.setdefault(pid, array.array("d")).extend((start, end))

    def ended(self, child: Child) -> None:
        """A child's pipe reached end of file: it has exited (or is about to)."""
        self.selector.unregister(child.fd)
        os.close(child.fd)
        self.parent_fds.discard(child.fd)
        del self.children[child.fd]
        _, status = os.waitpid(child.pid, 0)
        books = self.books
        if child.kind == "client":
            if child.killed_at is not None:
                books.lost += len(child.in_flight)
                # A killed client's sessions end when it dies; the server
                # hands their processes on only after that.
                for pid, start in child.sessions.values():
                    self.hold(pid, start, child.killed_at)
                books.lost_sessions += len(child.sessions)
                return
            clean = (
                os.waitstatus_to_exitcode(status) == 0
                and child.stopping
                and child.done == child.gets
                and not child.in_flight
                and not child.sessions
            )
            if not clean:
                books.problem(
                    ANSWERED if not child.broken else OTHER,
                    f"client {child.number} ended uncleanly (status {status}, "
                    f"{len(child.in_flight)} gets unanswered, done={child.done}, "
                    f"gets={child.gets})",
                )
                for pid, start in child.sessions.values():
                    self.hold(pid, start, time.monotonic())
                if not child.stopping and time.monotonic() < self.load_end:
                    self.start_client()  # keep the load up
        elif child.kind == "rogue":
            if os.waitstatus_to_exitcode(status) != 0:
                books.problem(ROGUES, f"rogue {child.number} exited with {status}")
        elif child.kind == "monitor" and books.monitor_end is None:
            books.problem(COUNT, f"the monitor died (status {status})")

    def watchdog(self, now: float) -> None:
        for child in self.children.values():
            if child.killed_at is not None:
                continue  # its gets are lost with it, not hung
            for number, (started, timeout) in child.in_flight.items():
                bound = (NO_TIMEOUT_BOUND if timeout is None else timeout) + HANG_GRACE
                if now - started > bound and number not in child.hung:
                    child.hung.add(number)
                    self.books.problem(
                        HUNG,
                        f"client {child.number} get {number} (timeout {timeout}) "
                        f"unanswered after {now - started:.1f} s",
                    )

    # --- the run ---------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        self.monitor = self.start_monitor()
        for _ in range(args.clients):
            self.start_client()
        self.t0 = now = time.monotonic()
        self.warm_end = self.t0 + max(WARM_UP_SHARE * args.duration, MIN_WARM_UP)
        self.load_end = self.t0 + args.duration
        rng = self.rng
        next_client_kill = now + rng.uniform(*CLIENT_KILL_EVERY)
        next_app_kill = now + rng.uniform(*APP_KILL_EVERY)
        next_rogue = now + rng.uniform(*ROGUE_EVERY)
        next_watchdog = now + 1.0
        next_progress = now + max(10.0, args.duration / 10)
        while now < self.load_end:
            due = min(
                next_client_kill,
                next_app_kill,
                next_rogue,
                next_watchdog,
                self.load_end,
            )
            self.read(max(0.0, due - now))
            now = time.monotonic()
            if now >= next_client_kill:
                self.kill_client()
                next_client_kill = now + rng.uniform(*CLIENT_KILL_EVERY)
            if now >= next_app_kill:
                self.kill_app()
                next_app_kill = now + rng.uniform(*APP_KILL_EVERY)
            if now >= next_rogue:
                self.start_rogue()
                next_rogue = now + rng.uniform(*ROGUE_EVERY)
            if now >= next_watchdog:
                self.watchdog(now)
                next_watchdog = now + 1.0
            if now >= next_progress:
                self.progress(now)
                next_progress = now + max(10.0, args.duration / 10)
            if self.monitor.fd not in self.children:
                break  # without the monitor nothing can be checked
        self.stop()

    def progress(self, now: float) -> None:
        books = self.books
        gets = sum(books.outcomes.values())
        print(
            f"  t={now - self.t0:5.0f} s  gets {gets:8d}  sessions "
            f"{books.outcomes['session']:8d}  clients killed {books.clients_killed:4d}"
            f"  processes killed {books.apps_killed:3d}  rogues "
            f"{sum(books.rogues.values()):3d}  problems "
            f"{sum(map(len, books.problems.values()))}",
            flush=True,
        )

    def stop(self) -> None:
        """Stop the clients cleanly, let rogues finish, then the monitor."""
        self.load_end = time.monotonic()
        for child in self.children.values():
            child.stopping = True
        os.close(self.stop_w)
        self.parent_fds.discard(self.stop_w)
        self.own_fds.discard(self.stop_w)
        self.drain(lambda c: c.kind != "monitor", STOP_WAIT, "stop")
        with contextlib.suppress(OSError):  # the monitor may be dead already
            os.write(self.control_w, b"f")
        self.drain(lambda c: True, QUIESCE_WAIT + 30, "finish")

    def drain(self, which: Callable[[Child], bool], wait: float, what: str) -> None:
        """Read until no child ``which`` selects is left; kill those that stay."""
        deadline = time.monotonic() + wait
        while any(which(c) for c in self.children.values()):
            now = time.monotonic()
            if now > deadline:
                for child in self.children.values():
                    if which(child):
                        self.books.problem(
                            ANSWERED,
                            f"{child.kind} {child.number} did not {what} in {wait:g} s",
                        )
                        os.kill(child.pid, signal.SIGKILL)
                deadline = float("inf")
            self.watchdog(now)
            self.read(1.0)

    def kill_everything(self) -> None:
        """Last resort (a failure, Ctrl-C): no child of ours outlives the run."""
        for child in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            with contextlib.suppress(OSError):
                os.close(child.fd)
        self.children.clear()
        self.selector.close()
        for fd in self.own_fds:
            os.close(fd)
        self.own_fds.clear()


# --- checks and the summary -----------------------------------------------------------


def overlaps(holds: dict[int, array.array[float]]) -> list[str]:
    """Processes that served two sessions at once (each serves one at a time)."""
    found = []
    for pid, flat in holds.items():
        spans = sorted(zip(flat[::2], flat[1::2], strict=True))
        busy_until = -1.0
        for start, end in spans:
            if start < busy_until:
                found.append(
                    f"pid {pid}: a session at {start:.3f} began before "
                    f"the previous one ended at {busy_until:.3f}"
                )
            busy_until = max(busy_until, end)
    return found


def resource_mark(resources: list[list[Any]], at: float) -> tuple[int, int, int]:
    """Descriptors, threads and RSS at ``at``: the least of each over the window
    before it (so a spawn or a reconnect under way at that instant is not
    counted)."""
    window = [
        r for r in resources if r[1] == "load" and at - RESOURCE_WINDOW <= r[0] <= at
    ]
    if not window:
        window = [min(resources, key=lambda r: abs(r[0] - at))]
    return (
        min(r[2] for r in window),
        min(r[3] for r in window),
        min(r[4] for r in window),
    )


def report(soak: Soak, spawner_name: str, orphans: tuple[int, int], total: int) -> bool:
    books = soak.books
    args = soak.args
    end = books.monitor_end or {}
    duration = soak.load_end - soak.t0
    gets = sum(books.outcomes.values())

    if books.samples:
        if end.get("over", 0):
            books.problem(COUNT, f"{end['over']} samples over max_pool_size")
    else:
        books.problem(COUNT, "no samples")
    if end:
        _count, active, waiting, clients = end["final"]
        if active or waiting or clients != 1:
            books.problem(
                QUIET,
                f"at rest: active={active} waiting={waiting} clients={clients} "
                "(expected 0, 0 and the monitor's 1)",
            )
    else:
        books.problem(QUIET, "the monitor did not report the pool at rest")
    for text in overlaps(books.holds)[:5]:
        books.problem(OVERLAP, text)
    late = [d for d in books.deaths if d is None or d > DEATH_BOUND]
    if late:
        shown = ", ".join("alive" if d is None else f"{d:.1f} s" for d in late[:5])
        books.problem(DEATHS, f"{len(late)} processes died late: {shown}")
    if not books.resources:
        books.problem(RESOURCES, "no resource samples")
        warm = final = (0, 0, 0)
    else:
        warm = resource_mark(books.resources, soak.warm_end)
        final = resource_mark(books.resources, soak.load_end)
        grown = (
            final[0] - warm[0] > FD_BOUND,
            final[1] - warm[1] > THREAD_BOUND,
            (final[2] - warm[2]) / 1024 > RSS_BOUND_MIB,
        )
        if any(grown):
            books.problem(RESOURCES, f"after warm-up {warm}, at the end {final}")
    rest = next((r[2:5] for r in books.resources if r[1] == "rest"), None)
    alive_at_close, alive_after = orphans
    if alive_after:
        books.problem(ORPHANS, f"{alive_after} processes alive {ORPHAN_WAIT:g} s after")

    slowest_death = max((d for d in books.deaths if d is not None), default=0.0)
    rogue_sent = sum(books.rogues.values())
    rogue_refused = sum(n for (_, v), n in books.rogues.items() if v == "refused")
    print()
    print(
        f"# soak: {duration:.0f} s, {args.clients} clients, seed {args.seed}, "
        f"{spawner_name}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(
        f"# pool: max_pool_size={MAX_POOL_SIZE} max_per_app={MAX_PER_APP} "
        f"max_queue_size={MAX_QUEUE_SIZE} max_requests={MAX_REQUESTS} "
        f"max_idle_time={MAX_IDLE_TIME:g} spawn_timeout={SPAWN_TIMEOUT:g}, "
        f"{APPS} apps"
    )
    rows: list[tuple[str, str]] = [
        ("duration under load", f"{duration:.1f} s"),
        ("gets answered", f"{gets} ({gets / max(duration, 1e-9):.0f}/s)"),
    ]
    for outcome in ("session", "QueueFullError", "GetTimeoutError", "SpawnError"):
        rows.append((f"  {outcome}", str(books.outcomes[outcome])))
    rows += [
        ("  other (unexpected)", str(books.outcomes["other"])),
        ("gets lost with their killed client", str(books.lost)),
        ("sessions held by a killed client", str(books.lost_sessions)),
        (
            "HTTP requests ok / failed",
            f"{books.http_ok} / {books.http_failed_killed} "
            "(failures all on killed processes)"
            if ROUTING not in books.problems
            else f"{books.http_ok} / see problems",
        ),
        ("longest get without a timeout", f"{books.max_wait_no_timeout:.2f} s"),
        ("latest GetTimeoutError past its timeout", f"{books.max_overshoot:.3f} s"),
        ("clients started (32 + replacements)", str(books.clients_started)),
        ("clients killed (SIGKILL)", str(books.clients_killed)),
        ("app processes killed (SIGKILL)", str(books.apps_killed)),
        (
            "rogue frames sent / refused",
            f"{rogue_sent} / {rogue_refused}"
            f" ({books.rogue_held} after taking a session,"
            f" {books.forged} forged notices)",
        ),
        (
            "  by kind (sent)",
            ", ".join(
                f"{kind} {sum(n for (k, _), n in books.rogues.items() if k == kind)}"
                for kind in ROGUE_KINDS
            ),
        ),
        ("statistics samples", str(end.get("samples", 0))),
        (
            "count: max seen / limit",
            f"{end.get('max_count', '?')} / {MAX_POOL_SIZE}",
        ),
        (
            "active, waiting: max seen",
            f"{end.get('max_active')}, {end.get('max_waiting')}",
        ),
        (
            "server's child processes at once (/proc): max",
            str(end.get("max_live", "?")),
        ),
        (
            "slowest statistics() / longest gap",
            f"{end.get('max_latency', 0):.3f} s / {end.get('max_gap', 0):.3f} s",
        ),
        (
            "processes gone from statistics",
            f"{len(books.deaths)} (slowest death "
            + ("never" if None in books.deaths else f"{slowest_death:.2f} s")
            + f"; bound {DEATH_BOUND:g} s)",
        ),
        ("server fds: warm / end / rest", _trio(warm[0], final[0], rest, 0, FD_BOUND)),
        (
            "server threads: warm / end / rest",
            _trio(warm[1], final[1], rest, 1, THREAD_BOUND),
        ),
        (
            "server RSS MiB: warm / end / rest",
            f"{warm[2] / 1024:.1f} / {final[2] / 1024:.1f} / "
            + (f"{rest[2] / 1024:.1f}" if rest else "?")
            + f" (bound +{RSS_BOUND_MIB:g})",
        ),
        (
            "processes ever seen / alive after close()",
            f"{total} / {alive_at_close} at once, {alive_after} after "
            f"{ORPHAN_WAIT:g} s",
        ),
    ]
    marks = [soak.t0 + duration * i / 10 for i in range(1, 11)]
    if books.resources:
        rows.append(
            (
                "server fds/threads/RSS MiB over time",
                "  ".join(
                    "{}/{}/{:.1f}".format(*m[:2], m[2] / 1024)
                    for m in (resource_mark(books.resources, at) for at in marks)
                ),
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for kind, texts in sorted(books.examples.items()):
        for text in texts:
            print(f"  e.g. {kind}: {text.splitlines()[0] if text else ''}")
    print()
    passed = True
    for check in (*CHECKS, ORPHANS):
        problems = books.problems.get(check, [])
        passed &= not problems
        print(f"[{'ok' if not problems else 'FAIL'}] {check}")
        for text in problems[:10]:
            print(f"       {text}")
        if len(problems) > 10:
            print(f"       ... and {len(problems) - 10} more")
    unknown = set(books.problems) - {*CHECKS, ORPHANS}
    for check in unknown:
        passed = False
        print(f"[FAIL] {check}: {books.problems[check][:5]}")
    print()
    print("ALL CHECKS PASSED" if passed else "SOME CHECKS FAILED")
    return passed


def _trio(warm: int, end: int, rest: list[int] | None, index: int, bound: int) -> str:
    rest_text = str(rest[index]) if rest else "?"
    return f"{warm} / {end} / {rest_text} (bound +{bound})"


def make_apps(directory: str) -> list[str]:
    roots = []
    for i in range(APPS):
        root = os.path.join(directory, f"app{i}")
        os.makedirs(os.path.join(root, "tmp"))
        with open(os.path.join(root, "passenger_wsgi.py"), "w") as file:
            file.write(WSGI_APP.format(name=f"app{i}"))
        roots.append(root)
    return roots


def alive_processes(processes: dict[int, int | None]) -> list[int]:
    return [pid for pid, start in processes.items() if is_alive(pid, start)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=32, help="client processes")
    parser.add_argument("--seed", type=int, default=1, help="seeds every choice")
    parser.add_argument(
        "--spawner", choices=("direct", "smart"), default="direct", help="app spawner"
    )
    parser.add_argument(
        "--log-level",
        default="ERROR",
        help="the server's log level (its warnings about every rogue are noise here)",
    )
    args = parser.parse_args()
    # The server takes its level from this logger when it starts.
    logging.getLogger("actorpool").setLevel(args.log_level.upper())

    # SIGTERM ends the run like Ctrl-C: through the clean-up below.
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # Also when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spawner: Spawner = DirectSpawner() if args.spawner == "direct" else SmartSpawner()
    spawner_name = type(spawner).__name__
    directory = tempfile.mkdtemp(prefix="actorpool-soak-")
    server = None
    soak = None
    try:
        apps = make_apps(directory)
        config = PoolConfig(
            max_pool_size=MAX_POOL_SIZE,
            max_per_app=MAX_PER_APP,
            max_queue_size=MAX_QUEUE_SIZE,
            max_requests=MAX_REQUESTS,
            max_idle_time=MAX_IDLE_TIME,
            spawn_timeout=SPAWN_TIMEOUT,
            # Root would otherwise run the apps as nobody, who may not be
            # able to run this interpreter.
            user=pwd.getpwuid(os.geteuid()).pw_name,
        )
        print(
            f"# soak: {args.duration:g} s, {args.clients} clients, seed {args.seed}, "
            f"{spawner_name}",
            flush=True,
        )
        server = ApplicationPoolServer(config, spawner=spawner)
        soak = Soak(args, server, apps)
        soak.run()
        end = soak.books.monitor_end or {}
        processes: dict[int, int | None] = {
            pid: (None if t == -1 else t) for pid, t in end.get("seen", [])
        }
        for pid, t in end.get("descendants", []):
            processes.setdefault(pid, t)
        server.close()
        alive_at_close = len(alive_processes(processes))
        deadline = time.monotonic() + ORPHAN_WAIT
        while alive_processes(processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive_after = alive_processes(processes)
        for pid in alive_after:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        passed = report(
            soak, spawner_name, (alive_at_close, len(alive_after)), len(processes)
        )
        return 0 if passed else 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if soak is not None:
            soak.kill_everything()
        if server is not None:
            server.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
