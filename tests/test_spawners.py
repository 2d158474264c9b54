"""DirectSpawner and SmartSpawner end to end: real servers, real app processes,
real HTTP over the session's socket (Passenger's own pool tests, with apps)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import grp
import http.client
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest

from actorpool import ApplicationPoolServer, PoolConfig, Session, SpawnError
from actorpool.spawner import Instance, Spawner, SpawnRequest
from actorpool.spawners import DirectSpawner, SmartSpawner
from actorpool.spawners import smart as smart_module
from actorpool.spawners._process import Lifeline
from actorpool.spawners.approot import load_app_spec
from actorpool.spawners.direct import socket_path, start_direct
from actorpool.spawners.smart import _Preloader

pytestmark = pytest.mark.slow

SPAWNERS = [
    pytest.param(DirectSpawner, id="direct"),
    pytest.param(SmartSpawner, id="smart"),
]

HELLO = """
import os
GREETING = "hello"

def application(environ, start_response):
    body = f"{GREETING} pid={os.getpid()} uid={os.getuid()}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""

ECHO_SERVER = """
import os, socketserver, sys
from http.server import BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    def address_string(self):
        return "unix"

    def do_GET(self):
        body = f"{os.environ['GREETING']} pid={os.getpid()} uid={os.getuid()}\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

socketserver.UnixStreamServer(sys.argv[1], Handler).serve_forever()
"""


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def write_app(root: Path, source: str = HELLO) -> str:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "passenger_wsgi.py").write_text(textwrap.dedent(source))
    return os.fspath(root)


def write_command_app(root: Path, greeting: str = "command") -> str:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "server.py").write_text(ECHO_SERVER)
    (root / "actorpool.toml").write_text(
        'command = ["{python}", "server.py", "{socket}"]\n'
        f'[env]\nGREETING = "{greeting}"\n'
    )
    return os.fspath(root)


def fetch(session: Session, path: str = "/") -> str:
    """One HTTP/1.1 request over the session's socket, with a real client."""
    session.socket.sendall(
        f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
    )
    response = http.client.HTTPResponse(session.socket)
    try:
        response.begin()
        assert response.status == 200
        return response.read().decode()
    finally:
        response.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going as we look
        return False


def processes_in(directory: Path) -> set[int]:
    """Every live process whose working directory is inside ``directory``:
    our workers, preloaders, supervisors and commands all run in their app root."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(os.fspath(directory)) and alive(int(entry)):
                found.add(int(entry))
    return found


@pytest.fixture
def serve(
    start_server: Callable[..., ApplicationPoolServer],
) -> Callable[..., ApplicationPoolServer]:
    """Start servers (as this user, so root does not drop to nobody); their
    connections and the servers close after the test."""

    def start(spawner: Spawner, **config: Any) -> ApplicationPoolServer:
        config.setdefault("user", me())
        return start_server(spawner, **config)

    return start


# --- serving -------------------------------------------------------------------


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_a_session_gets_the_apps_response(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app")
    pool = serve(make_spawner()).connect()
    with pool.get(app) as session:
        assert fetch(session) == f"hello pid={session.pid} uid={os.getuid()}\n"
        assert session.app_root == app


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_two_apps_answer_with_their_own_bodies(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    first = write_app(tmp_path / "first", HELLO)
    second = write_app(tmp_path / "second", HELLO.replace('"hello"', '"bonjour"'))
    pool = serve(make_spawner()).connect()
    with pool.get(first) as one, pool.get(second) as two:
        assert fetch(one).startswith("hello ")
        assert fetch(two).startswith("bonjour ")
        assert one.pid != two.pid


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_a_command_app_is_served(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_command_app(tmp_path / "cmd", greeting="from a command")
    pool = serve(make_spawner()).connect()
    with pool.get(app) as session:
        assert fetch(session) == f"from a command pid={session.pid} uid={os.getuid()}\n"


def test_a_smart_worker_has_the_app_imported_already(
    serve: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    app = write_app(
        tmp_path / "app",
        HELLO
        + """
import sys
IMPORTED_AT = os.getpid()

def application(environ, start_response):
    body = f"{IMPORTED_AT} {os.getpid()} {'passenger_wsgi' in sys.modules}".encode()
    start_response("200 OK", [])
    return [body]
""",
    )
    pool = serve(SmartSpawner(), max_pool_size=2).connect()
    with pool.get(app) as first, pool.get(app) as second:
        for session in (first, second):
            imported_at, pid, imported = fetch(session).split()
            assert int(pid) == session.pid
            assert int(imported_at) != session.pid  # imported in the preloader
            assert imported == "True"
        assert first.pid != second.pid


# --- failures --------------------------------------------------------------------


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_a_load_error_reaches_the_client_with_its_traceback(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(
        tmp_path / "broken",
        """
        print("about to fail")

        def helper():
            raise RuntimeError("the database is on fire")

        helper()
        """,
    )
    pool = serve(make_spawner()).connect()
    with pytest.raises(SpawnError) as raised:
        pool.get(app)
    assert "RuntimeError: the database is on fire" in str(raised.value)
    assert "Traceback (most recent call last)" in raised.value.output
    assert "in helper" in raised.value.output
    assert "about to fail" in raised.value.output


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_an_app_without_application_is_refused(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app", "app = None\n")
    pool = serve(make_spawner()).connect()
    with pytest.raises(SpawnError, match="callable `application`"):
        pool.get(app)


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_an_app_that_exits_while_loading_is_reported(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(
        tmp_path / "app",
        "import os, sys\nprint('giving up', flush=True)\nos._exit(3)\n",
    )
    pool = serve(make_spawner()).connect()
    with pytest.raises(SpawnError, match="exited") as raised:
        pool.get(app)
    assert "giving up" in raised.value.output


def test_a_command_that_exits_before_listening_is_reported(
    serve: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    root = tmp_path / "cmd"
    root.mkdir()
    (root / "actorpool.toml").write_text(
        'command = ["{python}", "-c", '
        "\"print('no port for you'); raise SystemExit(4)\"]\n"
    )
    pool = serve(DirectSpawner()).connect()
    with pytest.raises(SpawnError, match="status 4") as raised:
        pool.get(os.fspath(root))
    assert "no port for you" in raised.value.output


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_an_app_root_of_neither_kind_says_what_it_looked_for(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    pool = serve(make_spawner()).connect()
    with pytest.raises(SpawnError, match=r"passenger_wsgi\.py.*actorpool\.toml"):
        pool.get(tmp_path)


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_spawn_timeout_kills_a_slow_start(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(
        tmp_path / "slow",
        "import sys, threading\nprint('loading', flush=True)\n"
        "threading.Event().wait()\n",
    )
    # The direct worker must start an interpreter and print within the
    # timeout for its output to be checked: a second or more on a loaded
    # machine. The smart spawner's output is not checked.
    timeout = 3.0 if make_spawner is DirectSpawner else 0.5
    pool = serve(make_spawner(), spawn_timeout=timeout).connect()
    with pytest.raises(SpawnError, match="spawn_timeout") as raised:
        pool.get(app)
    assert "loading" in raised.value.output or make_spawner is SmartSpawner
    assert processes_in(tmp_path) == set()  # killed, not left behind


# --- death and restarts -----------------------------------------------------------


@pytest.mark.parametrize("make_spawner", SPAWNERS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_instance_is_replaced(
    serve: Callable[..., ApplicationPoolServer],
    wait_until: Callable[..., None],
    make_spawner: type[Spawner],
    signum: int,
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app")
    pool = serve(make_spawner()).connect()
    with pool.get(app) as session:
        victim = session.pid
    os.kill(victim, signum)
    # Noticed within a second: waiting on the server, not on a sleep.
    wait_until(lambda: pool.count == 0, timeout=1.0, what="the death noticed")
    with pool.get(app) as session:
        assert session.pid != victim
        assert fetch(session).startswith("hello ")


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_restart_txt_loads_the_new_code(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # as for users
    app = write_app(tmp_path / "app")
    pool = serve(make_spawner(), restart_check_interval=0).connect()
    with pool.get(app) as session:
        assert fetch(session).startswith("hello ")
    # An edit of the same size and mtime (as within one second): a loader
    # that trusted __pycache__ would run the old code.
    startup = Path(app, "passenger_wsgi.py")
    before = startup.stat()
    write_app(tmp_path / "app", HELLO.replace('"hello"', '"jello"'))
    os.utime(startup, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert startup.stat().st_size == before.st_size
    Path(app, "tmp", "restart.txt").touch()
    with pool.get(app) as session:
        assert fetch(session).startswith("jello ")


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_restart_txt_may_be_a_directory(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app")
    pool = serve(make_spawner(), restart_check_interval=0).connect()
    with pool.get(app) as session:
        fetch(session)
    write_app(tmp_path / "app", HELLO.replace('"hello"', '"changed"'))
    Path(app, "tmp", "restart.txt").mkdir()
    with pool.get(app) as session:
        assert fetch(session).startswith("changed ")


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_always_restart_txt_restarts_on_every_get(
    serve: Callable[..., ApplicationPoolServer],
    make_spawner: type[Spawner],
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app")
    Path(app, "tmp", "always_restart.txt").touch()
    pool = serve(make_spawner(), restart_check_interval=0).connect()
    pids = set()
    for round_ in range(3):
        write_app(tmp_path / "app", HELLO.replace('"hello"', f'"round{round_}"'))
        with pool.get(app) as session:
            assert fetch(session).startswith(f"round{round_} ")
            pids.add(session.pid)
    assert len(pids) == 3


def test_restart_app_restarts_the_preloader(
    serve: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    app = write_app(tmp_path / "app")
    pool = serve(SmartSpawner()).connect()
    with pool.get(app) as session:
        fetch(session)
    write_app(tmp_path / "app", HELLO.replace('"hello"', '"restarted"'))
    pool.restart_app(app)
    with pool.get(app) as session:
        assert fetch(session).startswith("restarted ")


def test_an_idle_preloader_is_stopped_and_its_workers_live_on(
    serve: Callable[..., ApplicationPoolServer],
    wait_until: Callable[..., None],
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path / "app")
    # Idle long enough for the reply to reach the test and the count below
    # to run before the preloader stops, even on a loaded machine.
    pool = serve(SmartSpawner(max_preloader_idle_time=1.5)).connect()
    with pool.get(app) as session:
        worker = session.pid
        assert len(processes_in(tmp_path)) == 2  # the preloader and the worker
        wait_until(
            lambda: processes_in(tmp_path) == {worker},
            timeout=5,
            what="the preloader to stop",
        )
        assert fetch(session).startswith("hello ")
    with pool.get(app) as session:  # the same worker, idle in the pool
        assert session.pid == worker


def _subreaper_flag() -> int:
    value = ctypes.c_int(-1)
    libc = ctypes.CDLL(None, use_errno=True)
    assert (
        libc.prctl(smart_module.PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)
        == 0
    )
    return value.value


@pytest.mark.timeout(30)
def test_the_last_smart_spawner_to_close_clears_the_subreaper_flag(
    tmp_path: Path,
) -> None:
    """The flag is the process's: left set, a process that used a spawner
    (a test run) adopts every orphan of its children as a zombie."""
    assert _subreaper_flag() == 0
    dirs = []
    for name in ("one", "two"):
        dirs.append(tmp_path / name)
        dirs[-1].mkdir(mode=0o700)
    first, second = SmartSpawner(), SmartSpawner()
    first.start(os.fspath(dirs[0]))
    try:
        assert _subreaper_flag() == 1
        second.start(os.fspath(dirs[1]))
        first.close()
        assert _subreaper_flag() == 1  # the second still needs it
    finally:
        first.close()
        second.close()
    assert _subreaper_flag() == 0


@pytest.mark.timeout(30)
def test_a_smart_spawner_cannot_start_twice_and_a_failed_close_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawner = SmartSpawner()
    spawner.start(os.fspath(tmp_path))
    with pytest.raises(RuntimeError, match="started already"):
        spawner.start(os.fspath(tmp_path))
    live = spawner._live
    assert live is not None

    def broken() -> None:
        raise OSError("cannot remove the socket directory")

    monkeypatch.setattr(live.dirs, "close", broken)
    with pytest.raises(OSError, match="socket directory"):
        spawner.close()
    assert _subreaper_flag() == 0


@pytest.mark.timeout(30)
def test_a_forked_child_holds_the_subreaper_flag_for_its_own_spawners(
    tmp_path: Path,
) -> None:
    """fork() does not pass the flag on, but it did pass on the count of
    the parent's holders, which made the child's spawner skip setting it."""
    parent = SmartSpawner()
    parent.start(os.fspath(tmp_path))
    try:
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(20)
                child_dir = tmp_path / "child"
                child_dir.mkdir(mode=0o700)
                child = SmartSpawner()
                child.start(os.fspath(child_dir))
                held = _subreaper_flag()
                child.close()
                os.write(report_w, f"{held} {_subreaper_flag()}".encode())
            finally:
                os._exit(0)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as report:
            assert report.read() == b"1 0"
        os.waitpid(pid, 0)
        assert _subreaper_flag() == 1  # the parent's own hold is untouched
    finally:
        parent.close()


def test_a_preloader_still_loading_is_not_idle(
    tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """The idle timer firing while the app loads must not stop the preloader.

    The app's import blocks on a FIFO until the timer has fired; before the
    fix the timer found it unused for longer than its idle time, closed its
    control socket, and the spawn failed ("Bad file descriptor"). Nor does
    the timer arm itself again while the spawn holds the preloader (with a
    tiny idle time that was a new timer thread every few milliseconds): the
    spawn arms it when it lets go, and the preloader is then stopped as idle.
    """
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    app = write_app(tmp_path / "app", f"open({os.fspath(gate)!r}).read()\n{HELLO}")
    socket_dir = tmp_path / "sockets"
    socket_dir.mkdir(mode=0o700)
    spawner = SmartSpawner(max_preloader_idle_time=0.05)
    timer_fired = threading.Event()
    rearmed_while_held: list[bool] = []
    on_idle = spawner._idle

    def idle(preloader: Any) -> None:
        timer = preloader._timer
        on_idle(preloader)
        if not timer_fired.is_set():  # the first firing: the spawn holds it
            rearmed_while_held.append(preloader._timer is not timer)
        timer_fired.set()

    spawner._idle = idle  # type: ignore[method-assign]
    spawner.start(os.fspath(socket_dir))
    try:
        with ThreadPoolExecutor(1) as executor:
            request = SpawnRequest(1, app, os.fspath(socket_dir), 30.0, me())
            spawning = executor.submit(spawner.spawn, request)
            try:
                fired = timer_fired.wait(30.0)
            finally:
                with open(gate, "w") as writer:  # lets the import go on
                    writer.write("go")
            assert fired, "the idle timer never fired"
            instance = spawning.result(30.0)
        try:
            assert instance.pid in processes_in(tmp_path)
            assert rearmed_while_held == [False]
            live = spawner._live
            assert live is not None
            wait_until(lambda: not live.preloaders, what="the idle preloader stops")
        finally:
            instance.stop()
            instance.wait()
    finally:
        spawner.close()


def unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet."""
    data = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", data)[0])


class Spawning:
    """A spawn in a daemon thread of its own, so that a spawn that hangs
    fails the test that waits for it instead of hanging the run."""

    def __init__(self, spawner: Spawner, request: SpawnRequest) -> None:
        self.instance: Instance | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(spawner, request))
        self._thread.daemon = True
        self._thread.start()

    def _run(self, spawner: Spawner, request: SpawnRequest) -> None:
        try:
            self.instance = spawner.spawn(request)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def result(self, timeout: float) -> Instance:
        """Its instance; the spawn's own error; AssertionError if not done."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the spawn still runs after {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.instance is not None
        return self.instance


@pytest.fixture
def smart(tmp_path: Path) -> Iterator[tuple[SmartSpawner, str]]:
    """A started SmartSpawner (in this process) and its socket directory.

    Closed after the test in a thread of its own: a close that hangs (on a
    lock a stuck spawn holds) fails the test rather than the whole run.
    """
    socket_dir = tmp_path / "sockets"
    socket_dir.mkdir(mode=0o700)
    spawner = SmartSpawner(max_preloader_idle_time=0)
    spawner.start(os.fspath(socket_dir))
    yield spawner, os.fspath(socket_dir)
    closing = threading.Thread(target=spawner.close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "SmartSpawner.close() hangs"


def serving(address: str) -> bool:
    """Whether a process accepts connections at ``address``."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def stop_all(instances: list[Instance]) -> None:
    """Stop each instance and wait for it."""
    for instance in instances:
        instance.stop()
        instance.wait()


def first_spawn(
    spawner: SmartSpawner, socket_dir: str, tmp_path: Path
) -> tuple[str, list[Instance], _Preloader, int]:
    """Spawn a first worker of a new app: the app, [the worker], its
    preloader and the preloader's pid."""
    app = write_app(tmp_path / "app")
    instances = [spawner.spawn(SpawnRequest(1, app, socket_dir, 30.0, me()))]
    assert spawner._live is not None
    preloader = spawner._live.preloaders[app]
    assert preloader._process is not None
    return app, instances, preloader, preloader._process.pid


def test_a_preloader_that_does_not_fork_in_time_is_replaced(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    wait_until: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spawn whose preloader does not answer fails within its timeout, and
    the next spawn of the app gets a new preloader.

    Before the fix the timed-out fork stopped the preloader while holding the
    lock stop() takes: the spawn hung for ever, and so did every later spawn
    of the app (and close()).
    """
    # The late worker is stopped only if its answer comes within this wait;
    # SIGCONT and two forks must fit in it however slow the machine is.
    monkeypatch.setattr(smart_module, "LATE_ANSWER_WAIT", 30.0)
    spawner, socket_dir = smart
    app, instances, stuck, stuck_pid = first_spawn(spawner, socket_dir, tmp_path)
    live = spawner._live
    assert live is not None
    os.kill(stuck_pid, signal.SIGSTOP)  # stuck: it is sent the request, never answers
    try:
        spawning = Spawning(spawner, SpawnRequest(2, app, socket_dir, 0.5, me()))
        with pytest.raises(SpawnError, match="did not fork in time"):
            spawning.result(timeout=10)
        # It was only slow: it reads the request now and forks the worker,
        # whose spawn has failed. That worker is stopped, then the preloader.
        os.kill(stuck_pid, signal.SIGCONT)
        wait_until(
            lambda: not alive(stuck_pid), timeout=10, what="the stuck one killed"
        )
        assert not serving(socket_path(live.dirs.for_user(stuck.user), 2))
        instances.append(spawner.spawn(SpawnRequest(3, app, socket_dir, 30.0, me())))
        assert live.preloaders[app] is not stuck
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck_pid, signal.SIGKILL)
        stop_all(instances)


def test_a_spawn_waiting_for_a_preloader_that_is_stopped_fails_at_once(
    smart: tuple[SmartSpawner, str], tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """A restart stops a preloader still loading its app: the spawn waiting
    for it fails at once, saying so, and nothing stays blocked on the socket;
    so does close() for the next preloader.

    Before the fix stop() closed the control socket under the thread that
    waited on it in select(). The next preloader's socket, made at once for
    the next spawn, took the same descriptor number; the old thread read it
    once the old preloader was killed, and the spawn waited out its whole
    spawn timeout (or failed a second later with "Bad file descriptor").
    """
    spawner, socket_dir = smart
    app = write_app(
        tmp_path / "app",
        "import threading\nprint('loading', flush=True)\nthreading.Event().wait()\n",
    )
    first = Spawning(spawner, SpawnRequest(1, app, socket_dir, 30.0, me()))
    live = spawner._live
    assert live is not None
    wait_until(lambda: app in live.preloaders, what="the spawn to start a preloader")
    preloader = live.preloaders[app]
    # Well into the import: its loader thread has long been in select().
    wait_until(lambda: "loading" in preloader._output.tail(), what="the app to load")
    spawner.app_restarted(app)
    second = Spawning(spawner, SpawnRequest(2, app, socket_dir, 30.0, me()))
    stopped = r"was stopped \(its app restarted\) before it loaded the app"
    with pytest.raises(SpawnError, match=stopped):
        first.result(timeout=5)  # not the spawn's 30 s
    loader = preloader._loader
    assert loader is not None
    wait_until(lambda: not loader.is_alive(), timeout=5, what="the loader thread ends")
    wait_until(
        lambda: preloader._control.fileno() == -1, timeout=5, what="the socket closed"
    )
    wait_until(
        lambda: live.preloaders.get(app) not in (None, preloader),
        what="the second spawn to start a preloader",
    )
    spawner.close()  # stops the second preloader, loading too
    with pytest.raises(SpawnError, match=r"was stopped \(the spawner closed\)"):
        second.result(timeout=5)
    wait_until(lambda: not processes_in(tmp_path), timeout=5, what="preloaders gone")


HELD_FORK_APP = """
import os

PRELOADER = os.getpid()
GATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")

def held():
    # Once the test has made the gate (a FIFO), a fork waits until the test
    # lets it go on: a fork slower than its spawn's deadline. One byte a
    # fork, read unbuffered: a buffered read(1) takes all that is there, and
    # leaves none for the next process held (the first spawn's worker too,
    # which may run this hook only after the gate is made).
    if os.path.exists(GATE):
        with open(GATE, "rb", buffering=0) as gate:
            gate.read(1)

# In the child of each fork (the middle process, then the worker), before
# any of actorpool's code runs there.
os.register_at_fork(after_in_child=lambda: HOOK == "after_in_child" and held())
# In the middle process only, as it forks the worker: actorpool's code in
# it has run by then.
os.register_at_fork(
    before=lambda: HOOK == "before" and os.getpid() != PRELOADER and held()
)

def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"hi"]
"""


@pytest.mark.parametrize(
    ("hook", "released", "answered_late"),
    [
        ("after_in_child", "when the spawn has failed", True),
        ("after_in_child", "when the preloader is dead", False),
        ("before", "when the preloader is dead", False),
    ],
    ids=[
        "the-answer-comes-late",
        "killed-before-the-middle-process-runs",
        "killed-while-the-middle-process-forks",
    ],
)
def test_a_worker_forked_after_its_spawn_timed_out_is_stopped(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    wait_until: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    hook: str,
    released: str,
    answered_late: bool,
) -> None:
    """The preloader is only slow: it forks the worker for a spawn that has
    failed already. Nobody tracks that worker; killing the preloader does
    not stop it (a middle process forks it). It must not serve.

    Let go once the spawn has failed, the answer comes late, and the worker
    it names is stopped. Held until the preloader is dead (no answer came in
    the 2 s it is waited for), the middle process either finds its parent
    gone when it runs, or, held as it forks, is killed by the kernel with
    its parent (PR_SET_PDEATHSIG)."""
    spawner, socket_dir = smart
    if answered_late:
        # The answer comes as soon as the gate opens; the 2 s it is waited
        # for are the code's, and a loaded machine (this test's own wait
        # spinning on the GIL) must not make it miss them.
        monkeypatch.setattr(smart_module, "LATE_ANSWER_WAIT", 30.0)
    app = write_app(tmp_path / "app", HELD_FORK_APP.replace("HOOK", repr(hook)))
    first = spawner.spawn(SpawnRequest(1, app, socket_dir, 30.0, me()))
    gate = tmp_path / "app" / "gate"
    os.mkfifo(gate)  # from the next fork on
    # Read and write: opening it never blocks a fork, and what is written
    # stays for the forks still to come.
    keeper = os.open(gate, os.O_RDWR)
    try:
        assert spawner._live is not None
        preloader = spawner._live.preloaders[app]
        assert preloader._process is not None
        with pytest.raises(SpawnError, match="did not fork in time"):
            spawner.spawn(SpawnRequest(2, app, socket_dir, 0.3, me()))
        if released == "when the spawn has failed":
            os.write(keeper, b"go" * 4)
        wait_until(
            lambda: not alive(preloader._process.pid),  # type: ignore[union-attr]
            timeout=10,
            what="the slow preloader stopped",
        )
        os.write(keeper, b"go" * 4)
        # Nothing but the first worker: no second worker, and no process left
        # that could still fork one.
        wait_until(
            lambda: processes_in(tmp_path) == {first.pid},
            timeout=10,
            what="only the first worker left",
        )
        address = socket_path(spawner._live.dirs.for_user(preloader.user), 2)
        assert not serving(address)
        logged = "forked after its spawn timed out" in caplog.text
        assert logged is answered_late
    finally:
        os.close(keeper)
        first.stop()
        first.wait()


def pidfds_of(pid: int) -> list[int]:
    """This process's descriptors that are pidfds of ``pid``."""
    found = []
    for entry in os.listdir("/proc/self/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{entry}") as info:
            if f"Pid:\t{pid}\n" in info.read():
                found.append(int(entry))
    return found


def test_a_late_worker_that_does_not_stop_is_let_go(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    wait_until: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker forked after its spawn timed out that does not stop in time
    (one stuck in the kernel) is given up on: its pidfd is closed, not kept
    open until the server exits."""
    spawner, socket_dir = smart
    monkeypatch.setattr(smart_module, "LATE_ANSWER_WAIT", 30.0)
    wait_for = smart_module.PidfdInstance.wait_for

    def never_in_time(instance: Any, timeout: float | None) -> bool:
        return False if timeout is not None else wait_for(instance, timeout)

    monkeypatch.setattr(smart_module.PidfdInstance, "wait_for", never_in_time)
    app = write_app(tmp_path / "app", HELD_FORK_APP.replace("HOOK", "'after_in_child'"))
    first = spawner.spawn(SpawnRequest(1, app, socket_dir, 30.0, me()))
    os.mkfifo(tmp_path / "app" / "gate")
    keeper = os.open(tmp_path / "app" / "gate", os.O_RDWR)
    try:
        assert spawner._live is not None
        preloader = spawner._live.preloaders[app]
        assert preloader._process is not None
        with pytest.raises(SpawnError, match="did not fork in time"):
            spawner.spawn(SpawnRequest(2, app, socket_dir, 0.3, me()))
        os.write(keeper, b"go" * 4)
        wait_until(
            lambda: not alive(preloader._process.pid),  # type: ignore[union-attr]
            timeout=10,
            what="the slow preloader stopped",
        )
        orphan = int(caplog.text.split("stopping worker ")[1].split(",")[0])
        assert "did not stop" in caplog.text
        assert pidfds_of(orphan) == []
    finally:
        os.close(keeper)
        first.stop()
        first.wait()


class ThreadStarts:
    """Stands in for the ``threading`` module in the module under test: a
    thread with one of ``names`` is started through ``start(real_start)``."""

    def __init__(
        self, names: set[str], start: Callable[[Callable[[], None]], None]
    ) -> None:
        self._names = names
        self._start = start

    def __getattr__(self, attribute: str) -> Any:
        return getattr(threading, attribute)

    def Thread(self, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(**kwargs)
        if thread.name in self._names:
            real_start = thread.start
            thread.start = lambda: self._start(real_start)  # type: ignore[method-assign]
        return thread


def test_a_late_fork_with_no_thread_to_wait_for_it_kills_the_preloader(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When no thread can be started (to wait for a timed-out fork's answer,
    nor to reap the preloader), the spawn still fails with a SpawnError, the
    fork lock is let go, and the preloader is killed and reaped at once.
    Before, the thread's RuntimeError escaped and the lock stayed held for
    ever, with the preloader running."""
    spawner, socket_dir = smart
    _, instances, stuck, pid = first_spawn(spawner, socket_dir, tmp_path)

    def refuse(_start: Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    # Neither the thread that would wait for the answer nor the reaper.
    refused = {"actorpool-preloader-late", "actorpool-preloader-reap"}
    monkeypatch.setattr(smart_module, "threading", ThreadStarts(refused, refuse))
    os.kill(pid, signal.SIGSTOP)  # answers no fork
    try:
        with pytest.raises(SpawnError, match="did not fork in time"):
            stuck.fork(os.path.join(socket_dir, "a.sock"), time.monotonic() + 0.2)
        assert not alive(pid)
        # Reaped in the spawn's own thread: the fork lock is free, and the
        # control socket closed.
        assert stuck._forking.acquire(blocking=False)
        stuck._forking.release()
        assert stuck._control.fileno() == -1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        stop_all(instances)


def test_join_waits_for_a_reaper_another_thread_is_still_starting(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait_until: Callable[..., None],
) -> None:
    """The spawner's close() joins a preloader that another thread (a late
    fork's collector) is still stopping. join() used to raise "cannot join
    thread before it is started" when it came between the reaper's creation
    and its start, and returned at once, before the reaper's work, when it
    came earlier."""
    spawner, socket_dir = smart
    _, instances, preloader, _ = first_spawn(spawner, socket_dir, tmp_path)
    starting = threading.Event()
    go_on = threading.Event()

    def held(start: Callable[[], None]) -> None:
        starting.set()
        go_on.wait(10)
        start()

    monkeypatch.setattr(
        smart_module, "threading", ThreadStarts({"actorpool-preloader-reap"}, held)
    )
    stopper = threading.Thread(target=lambda: preloader.stop(kill=True))
    stopper.start()
    try:
        assert starting.wait(10)
        failures: list[BaseException] = []

        def join() -> None:
            try:
                preloader.join()
            except BaseException as exc:
                failures.append(exc)

        joiner = threading.Thread(target=join)
        joiner.start()

        # It either fails at once (before the fix) or waits for the reaper.
        def failed_or_waiting() -> bool:
            frame = sys._current_frames().get(joiner.ident or 0)
            return frame is None or "wait" in traceback.format_stack(frame)[-1]

        wait_until(failed_or_waiting, what="join() to fail or to wait")
        go_on.set()
        joiner.join(10)
        assert failures == []
        # join() waits KILL_GRACE at most, which a slow machine may use up
        # before go_on is set: the reaper's work is then done a moment later.
        wait_until(lambda: preloader._control.fileno() == -1, what="the reaper's work")
    finally:
        go_on.set()
        stopper.join(10)
        stop_all(instances)


def test_a_preloader_whose_fork_timed_out_takes_no_other_fork(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait_until: Callable[..., None],
) -> None:
    """Once a timed-out fork has let go of the fork lock, and before the
    preloader is stopped, another spawn could send a request of its own and
    take the late answer to the first for its own worker. Here that gap is
    held open (stop() does nothing) to show no second request is sent."""
    spawner, socket_dir = smart
    _, instances, stuck, pid = first_spawn(spawner, socket_dir, tmp_path)
    asked_to_stop: list[object] = []
    monkeypatch.setattr(stuck, "stop", lambda **why: asked_to_stop.append(why))
    os.kill(pid, signal.SIGSTOP)  # takes requests into its buffer, answers none
    try:
        with pytest.raises(SpawnError, match="did not fork in time"):
            stuck.fork(os.path.join(socket_dir, "a.sock"), time.monotonic() + 0.2)
        sent = unread(stuck._control)
        assert sent > 0  # the first request, never read
        assert not stuck.usable(me())
        # The wait for a late answer ends (none comes) and lets go of the lock.
        wait_until(lambda: asked_to_stop, timeout=10, what="the lock let go")
        with pytest.raises(SpawnError, match="did not fork in time"):
            stuck.fork(os.path.join(socket_dir, "b.sock"), time.monotonic() + 5)
        assert unread(stuck._control) == sent  # no second request
    finally:
        os.kill(pid, signal.SIGKILL)
        stop_all(instances)


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1", msgpack.packb(["spawned"]), msgpack.packb(["spawned", "12"])],
    ids=["not-msgpack", "no-pid", "pid-not-an-int"],
)
def test_a_preloader_that_answers_garbage_fails_the_spawn_and_is_replaced(
    smart: tuple[SmartSpawner, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    garbage: bytes,
) -> None:
    spawner, socket_dir = smart
    app, instances, preloader, pid = first_spawn(spawner, socket_dir, tmp_path)
    # The preloader's end answers nothing (stopped); this stands in for it.
    os.kill(pid, signal.SIGSTOP)
    reading = preloader._control.fileno()
    real_read = smart_module.read_message

    def answered_with_garbage(fd: int, deadline: float, unpacker: Any = None) -> Any:
        if fd == reading:
            fresh = msgpack.Unpacker(raw=False)
            fresh.feed(garbage)
            monkeypatch.setattr(preloader, "_unpacker", fresh)
            return real_read(fd, deadline, fresh)
        return real_read(fd, deadline, unpacker)

    monkeypatch.setattr(smart_module, "read_message", answered_with_garbage)
    try:
        with pytest.raises(SpawnError, match=r"sent garbage|answered"):
            preloader.fork(os.path.join(socket_dir, "a.sock"), time.monotonic() + 5)
        assert not preloader.usable(me())
        assert not alive(pid)  # killed: it might still fork for the request
        monkeypatch.undo()
        instances.append(spawner.spawn(SpawnRequest(2, app, socket_dir, 30.0, me())))
        assert spawner._live is not None
        assert spawner._live.preloaders[app] is not preloader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        stop_all(instances)


def test_a_restart_does_not_wait_for_a_fork_under_way_and_lets_it_finish(
    smart: tuple[SmartSpawner, str], tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """app_restarted runs on the spawner actor's thread: it must not wait
    for a fork (before, it waited on the fork's lock, as long as the spawn
    timeout), and the fork under way still gets its worker."""
    spawner, socket_dir = smart
    app, instances, preloader, pid = first_spawn(spawner, socket_dir, tmp_path)
    os.kill(pid, signal.SIGSTOP)  # the fork we ask for waits until SIGCONT
    try:
        spawning = Spawning(spawner, SpawnRequest(2, app, socket_dir, 30.0, me()))
        wait_until(lambda: unread(preloader._control), what="the fork request sent")
        restarting = threading.Thread(target=spawner.app_restarted, args=(app,))
        restarting.daemon = True
        restarting.start()
        restarting.join(5)
        assert not restarting.is_alive(), "app_restarted waits for the fork"
        os.kill(pid, signal.SIGCONT)
        instances.append(spawning.result(timeout=10))
        wait_until(lambda: not alive(pid), timeout=5, what="the old preloader gone")
        assert instances[1].pid in processes_in(tmp_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        stop_all(instances)


# --- nothing outlives the server ---------------------------------------------------


def start_instances(pool: Any, tmp_path: Path) -> set[int]:
    """A WSGI app and a command app, two processes each; their pids."""
    wsgi = write_app(tmp_path / "wsgi")
    command = write_command_app(tmp_path / "cmd")
    sessions = [pool.get(app) for app in (wsgi, wsgi, command, command)]
    pids = {session.pid for session in sessions}
    for session in sessions:
        session.close()
    return pids


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_close_stops_every_process(
    make_spawner: type[Spawner], tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    server = ApplicationPoolServer(PoolConfig(user=me()), spawner=make_spawner())
    try:
        pool = server.connect()
        pids = start_instances(pool, tmp_path)
        everything = processes_in(tmp_path)
        assert pids <= everything
        pool.close()
    finally:
        server.close()
    wait_until(lambda: not processes_in(tmp_path), timeout=2, what="all gone")


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_sigkill_of_the_server_stops_every_process(
    make_spawner: type[Spawner], tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    server = ApplicationPoolServer(PoolConfig(user=me()), spawner=make_spawner())
    try:
        pool = server.connect()
        start_instances(pool, tmp_path)
        assert processes_in(tmp_path)
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not processes_in(tmp_path), timeout=2, what="all gone")
        pool.close()
    finally:
        server.close()


BUSY_APP = """
import threading

def application(environ, start_response):
    open("in-the-app", "w").close()  # in its app root
    stay = threading.Event()
    threading.Thread(target=stay.wait).start()  # not a daemon
    stay.wait()  # busy in the app's code for ever
"""


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_a_process_busy_in_the_app_does_not_outlive_the_server(
    make_spawner: type[Spawner], tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """The serving loop watches the lifeline only between requests: a worker
    busy in the app's code (with a thread of the app's own, which interpreter
    shutdown would wait for) ran on after the server was gone."""
    app = write_app(tmp_path / "busy", BUSY_APP)
    server = ApplicationPoolServer(PoolConfig(user=me()), spawner=make_spawner())
    try:
        pool = server.connect()
        session = pool.get(app)
        session.socket.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(
            lambda: (tmp_path / "busy" / "in-the-app").exists(),
            what="the request in the app",
        )
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not processes_in(tmp_path), timeout=10, what="all gone")
        session.close()
        pool.close()
    finally:
        server.close()


def test_what_a_command_started_does_not_outlive_the_server(
    tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """A command that is a wrapper (a shell that starts the server): the
    supervisor stopped only the shell, and the server it had started ran on
    after the pool server was gone."""
    root = tmp_path / "wrapped"
    write_command_app(root)
    (root / "actorpool.toml").write_text(
        'command = ["/bin/sh", "-c", "{python} server.py {socket} & wait"]\n'
        '[env]\nGREETING = "command"\n'
    )
    server = ApplicationPoolServer(PoolConfig(user=me()), spawner=DirectSpawner())
    try:
        pool = server.connect()
        with pool.get(os.fspath(root)) as session:
            assert "command" in fetch(session)
        assert len(processes_in(tmp_path)) == 3  # supervisor, shell, server
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not processes_in(tmp_path), timeout=10, what="all gone")
        pool.close()
    finally:
        server.close()


def test_a_command_that_cannot_be_run_leaks_nothing(tmp_path: Path) -> None:
    """An environment variable whose name holds "=" (or a NUL byte anywhere)
    makes Popen raise ValueError: it escaped as a spawner bug, and each try
    left two descriptors open."""
    root = tmp_path / "badenv"
    write_command_app(root)
    (root / "actorpool.toml").write_text(
        'command = ["{python}", "server.py", "{socket}"]\n[env]\n"A=B" = "x"\n'
    )
    spec = load_app_spec(os.fspath(root))
    lifeline = Lifeline()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for attempt in range(3):
            with pytest.raises(SpawnError, match="cannot start a process"):
                start_direct(spec, None, f"{tmp_path}/{attempt}.sock", 5.0, lifeline)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        lifeline.close()


CREATOR = """
import sys
from actorpool import ApplicationPoolServer, PoolConfig
from actorpool.spawners import DirectSpawner, SmartSpawner

spawner = {"direct": DirectSpawner, "smart": SmartSpawner}[sys.argv[1]]()
server = ApplicationPoolServer(PoolConfig(user=sys.argv[2]), spawner=spawner)
pool = server.connect()
sessions = [pool.get(app) for app in sys.argv[3:]]
print(server.pid, *(session.pid for session in sessions), flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("kind", ["direct", "smart"])
def test_sigkill_of_the_creator_stops_every_process(
    kind: str, tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    wsgi = write_app(tmp_path / "wsgi")
    command = write_command_app(tmp_path / "cmd")
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR, kind, me(), wsgi, wsgi, command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert creator.stdout is not None
        server_pid, *pids = map(int, creator.stdout.readline().split())
        assert len(set(pids)) == 3
        assert set(pids) <= processes_in(tmp_path)
        creator.kill()
        creator.wait()
        wait_until(lambda: not processes_in(tmp_path), timeout=2, what="all gone")
        wait_until(lambda: not alive(server_pid), timeout=2, what="server gone")
    finally:
        creator.kill()
        creator.wait()
        assert creator.stdin is not None
        assert creator.stdout is not None
        creator.stdin.close()
        creator.stdout.close()


def test_a_supervisor_stops_a_command_that_never_listens_when_the_server_goes(
    tmp_path: Path, wait_until: Callable[..., None]
) -> None:
    """The lifeline ends while the command is starting: the supervisor stops
    it and exits. Before the fix the supervisor looked at the lifeline only
    once the command listened, so both ran on for as long as the command
    did."""
    life_r, life_w = os.pipe()
    ready_r, ready_w = os.pipe()
    never_listens = "import os, signal; print(os.getpid(), flush=True); signal.pause()"
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actorpool.spawners.supervise",
            os.fspath(tmp_path / "never.sock"),
            str(ready_w),
            str(life_r),
            "-1",
            "-1",
            "--",
            sys.executable,
            "-c",
            never_listens,
        ],
        stdout=subprocess.PIPE,
        pass_fds=(ready_w, life_r),
        start_new_session=True,
    )
    os.close(ready_w)
    os.close(life_r)
    try:
        assert supervisor.stdout is not None
        command = int(supervisor.stdout.readline())  # it runs, and is not ready
        os.close(life_w)  # the server is gone
        life_w = -1
        supervisor.wait(timeout=5)
        wait_until(lambda: not alive(command), timeout=5, what="the command gone")
        assert os.read(ready_r, 100) == b""  # never said ready
    finally:
        if life_w != -1:
            os.close(life_w)
        os.close(ready_r)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
        assert supervisor.stdout is not None
        supervisor.stdout.close()


# --- sockets and output ------------------------------------------------------------


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_sockets_live_in_a_private_directory_removed_at_close(
    make_spawner: type[Spawner], tmp_path: Path
) -> None:
    app = write_app(tmp_path / "app")
    server = ApplicationPoolServer(PoolConfig(user=me()), spawner=make_spawner())
    try:
        pool = server.connect()
        with pool.get(app) as session:
            address = session.socket.getpeername()
            directory = os.path.dirname(address)
            mode = os.stat(directory).st_mode
            assert stat.S_IMODE(mode) == 0o700
            assert os.stat(directory).st_uid == os.geteuid()
        pool.close()
    finally:
        server.close()
    assert not os.path.exists(directory)


def test_app_output_reaches_the_server_log_tagged_with_app_and_pid(
    serve: Callable[..., ApplicationPoolServer],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    app = write_app(
        tmp_path / "app",
        HELLO + "\nprint('loading the talkative app', flush=True)\n",
    )
    logger = logging.getLogger("actorpool")
    level = logger.level
    logger.setLevel(logging.INFO)  # the server takes its level from ours
    try:
        server = serve(DirectSpawner())
    finally:
        logger.setLevel(level)
    pool = server.connect()
    with pool.get(app) as session:
        pid = session.pid
    server.close()
    err = capfd.readouterr().err
    assert f"{app} worker pid {pid}: loading the talkative app" in err


@pytest.mark.parametrize("make_spawner", SPAWNERS)
def test_what_an_app_prints_reaches_the_log_before_it_is_stopped(
    make_spawner: type[Spawner],
    serve: Callable[..., ApplicationPoolServer],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stdout is a pipe, which Python buffers by blocks: a line printed
    without a flush waited for 8 KiB more, and was lost when the worker was
    stopped (SIGTERM), the way workers end."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    app = write_app(
        tmp_path / "app",
        "def application(environ, start_response):\n"
        "    print('a request came')\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'hi']\n",
    )
    logger = logging.getLogger("actorpool")
    level = logger.level
    logger.setLevel(logging.INFO)  # the server takes its level from ours
    try:
        server = serve(make_spawner())
    finally:
        logger.setLevel(level)
    pool = server.connect()
    with pool.get(app) as session:
        session.socket.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert session.socket.recv(100).startswith(b"HTTP/1.1 200")
    server.close()
    assert "a request came" in capfd.readouterr().err


# --- privilege drop (the server runs as root) ---------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def write_uid_app(root: Path, owner: int, server: str = ECHO_SERVER) -> str:
    """A command app on the system interpreter (reachable by any user) that
    answers with its uid (or what ``server`` says); its startup file owned by
    ``owner``."""
    root.mkdir(parents=True)
    (root / "server.py").write_text(server)
    (root / "actorpool.toml").write_text(
        'command = ["/usr/bin/python3", "server.py", "{socket}"]\n'
        '[env]\nGREETING = "uid"\n'
    )
    os.chown(root / "actorpool.toml", owner, owner)
    for path in (root, root / "server.py"):
        path.chmod(0o755)
    return os.fspath(root)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can enter.

    Not under pytest's base directory: that is 0700, and opening it up
    does not last, since every pytest run that starts sets it back.
    """
    path = Path(tempfile.mkdtemp(prefix="actorpool-test-public-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def uid_of(session: Session) -> int:
    return int(fetch(session).split("uid=")[1])


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python")
@pytest.mark.parametrize(
    ("owner", "configured", "expected"),
    [
        ("root", None, "nobody"),  # Passenger's rule: never root by default
        ("daemon", None, "daemon"),  # the startup file's owner
        ("daemon", "nobody", "nobody"),  # PoolConfig.user wins
    ],
)
def test_a_root_server_runs_apps_as_a_lesser_user(
    owner: str,
    configured: str | None,
    expected: str,
    public_dir: Path,
) -> None:
    app = write_uid_app(public_dir / "app", pwd.getpwnam(owner).pw_uid)
    server = ApplicationPoolServer(PoolConfig(user=configured), spawner=DirectSpawner())
    try:
        with server.connect() as pool, pool.get(app) as session:
            assert uid_of(session) == pwd.getpwnam(expected).pw_uid
            directory = os.path.dirname(session.socket.getpeername())
            assert os.stat(directory).st_uid == pwd.getpwnam(expected).pw_uid
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    finally:
        server.close()
    assert not os.path.exists(directory)


def test_naming_another_user_without_root_fails_the_spawn(
    serve: Callable[..., ApplicationPoolServer], tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may switch users")
    pool = serve(DirectSpawner(), user="nobody").connect()
    with pytest.raises(SpawnError, match="only a pool server running as root"):
        pool.get(write_app(tmp_path / "app"))


@pytest.fixture
def grouped_user() -> pwd.struct_passwd:
    """A user (not root) listed as a member of a group other than its own;
    the test is skipped if there is none."""
    for group in grp.getgrall():
        for name in group.gr_mem:
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                continue
            if user.pw_uid != 0 and user.pw_gid != group.gr_gid:
                return user
    pytest.skip("no user here is a member of a group other than its own")


GROUPS_SERVER = ECHO_SERVER.replace(
    "uid={os.getuid()}", "groups={' '.join(map(str, sorted(os.getgroups())))}"
)


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python")
def test_a_command_app_has_its_users_supplementary_groups(
    public_dir: Path, grouped_user: pwd.struct_passwd
) -> None:
    """As a WSGI worker does (os.getgrouplist); before, a command had its
    user's primary group only."""
    user = grouped_user
    app = write_uid_app(public_dir / "app", user.pw_uid, GROUPS_SERVER)
    server = ApplicationPoolServer(
        PoolConfig(user=user.pw_name), spawner=DirectSpawner()
    )
    try:
        with server.connect() as pool, pool.get(app) as session:
            groups = {int(gid) for gid in fetch(session).split("groups=")[1].split()}
    finally:
        server.close()
    expected = set(os.getgrouplist(user.pw_name, user.pw_gid))
    assert len(expected) > 1
    assert groups == expected
