"""The Python of one get+close, piece by piece: policy, wire codec, client.

Run from the repository root::

    python benchmarks/bench_policy.py            # under ten seconds
    python benchmarks/bench_policy.py --quick    # a smoke run

``bench_pool.py`` measures whole round trips between processes, whose
figures move by half from run to run on a shared VM. This one times, in a
hot loop in one process, the two pieces of pure Python that every get+close
goes through on the server, and the client's whole share, each against the
least that piece could do or the baseline pool's counterpart:

(a) the pool's policy (:class:`actorpool.pool.Pool`): ``get``,
    ``close_session`` and ``next_deadline`` (the registry asks for the next
    deadline after every message), with 1 and 32 idle processes of one app,
    and with 31 of 32 busy; against a dict of idle-process stacks, which is
    what the ``multiprocessing.managers`` baseline of ``bench_pool.py`` keeps
    (no limits, no queue, no deadlines, no checks);
(b) the wire codec, both sides of a get+close: the client's ``Get`` frame,
    the server's ``SessionGranted`` reply and the client's ``CloseSession``,
    each built and checked by a sans-IO :class:`actorpool.protocol.Connection`
    on the sending side and decoded and checked by one on the receiving side;
    against ``msgpack.packb`` and ``msgpack.unpackb`` of the same lists;
(c) the client process of a whole get+close (``pool.get(app)``, connect to
    the process, close), against a live pool server and echo process; against
    the client of the ``multiprocessing.managers`` pool of ``bench_pool.py``
    doing the same. Timed, it is the round trip as the client sees it
    (``bench_pool.py``'s (a)); counted, only the client process's own
    instructions, which is what each of ``bench_pool.py``'s client processes
    spends of the machine;
(d) counted only (``--instructions``): the pool server process's share of a
    get+close from one client (its every thread: the sockets read, the
    codec, the actors, the policy, the reply written), against a server that
    does the least: a loop that reads msgpack requests from a socket, answers
    each get with a canned grant and reads each close notice.

Each figure is the best of 5 repeats of 3,000, in µs per get+close, with its
ratio to its baseline. Even these move by a third from run to run on a
shared VM, so ``--instructions`` counts instead what each case executes, with
valgrind's callgrind (``apt-get install -y valgrind``): the same count every
run, whatever else the machine does. Each case runs in a process of its own
under callgrind, twice, with 200 and 1,200 get+closes; the difference over
1,000 is the count per get+close, start-up and warm-up cancelled out (about
five minutes)::

    python benchmarks/bench_policy.py --instructions
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable, Iterator

import msgpack

from actorpool import ApplicationPoolServer
from actorpool.config import PoolConfig
from actorpool.messages import CloseSession, Get, Hello, SessionGranted, Welcome
from actorpool.pool import Grant, Pool, Spawn
from actorpool.protocol import Connection, Role

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _callgrind
import _managers_pool
from _instances import EchoSpawner

APP = "/srv/app"
ADDRESS = "/tmp/actorpool-0/instance-1.sock"


def best(run: Callable[[], None], number: int) -> float:
    """Seconds per call of ``run``: the best of 5 repeats of ``number`` calls."""
    return min(timeit.repeat(run, number=number, repeat=5)) / number


# --- (a) the policy ----------------------------------------------------------------


def pool_with(processes: int, busy: int) -> tuple[Pool, Callable[[], None]]:
    """A Pool with ``processes`` ready processes of one app, ``busy`` of them held."""
    pool = Pool(PoolConfig(max_pool_size=processes))
    spawns = [d for c in range(processes) for d in pool.get(c, 1, APP, 0.0)]
    grants = [
        d
        for s in spawns
        if isinstance(s, Spawn)
        for d in pool.instance_ready(
            s.instance_id, 1000 + s.instance_id, ADDRESS, 1, 0.0
        )
        if isinstance(d, Grant)
    ]
    assert len(grants) == processes, grants
    for grant in grants[busy:]:
        pool.close_session(grant.client_id, grant.session_id, 1.0)
    requests = itertools.count(100)

    def get_close() -> None:
        (grant,) = pool.get(1, next(requests), APP, 2.0)
        assert isinstance(grant, Grant)
        pool.close_session(1, grant.session_id, 2.0)
        pool.next_deadline()

    return pool, get_close


def stacks_with(processes: int, busy: int) -> Callable[[], None]:
    """The baseline: a dict of idle stacks and a dict of sessions."""
    idle: dict[str, list[int]] = {APP: list(range(busy, processes))}
    sessions: dict[int, tuple[str, int]] = {}
    ids = itertools.count()

    def get_close() -> None:
        session = next(ids)
        sessions[session] = (APP, idle[APP].pop())
        app, instance = sessions.pop(session)
        idle[app].append(instance)

    return get_close


# --- (b) the codec -------------------------------------------------------------------


def connected() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Hello(1, 1)))
    server.next_event()
    client.receive_data(server.send(Welcome(1, 2, 3)))
    client.next_event()
    return client, server


def codec_get_close() -> Callable[[], None]:
    client, server = connected()
    requests = itertools.count(1)

    def get_close() -> None:
        request_id = next(requests)
        server.receive_data(client.send(Get(request_id, APP, None)))
        server.next_event()
        reply = SessionGranted(request_id, request_id, 1234, APP, ADDRESS)
        client.receive_data(server.send(reply))
        client.next_event()
        server.receive_data(client.send(CloseSession(request_id)))
        server.next_event()

    return get_close


def raw_get_close() -> None:
    msgpack.unpackb(msgpack.packb([10, 7, APP, None]))
    msgpack.unpackb(msgpack.packb([30, 7, 7, 1234, APP, ADDRESS]))
    msgpack.unpackb(msgpack.packb([20, 7]))


# --- (c) the client --------------------------------------------------------------


def actorpool_client(stack: contextlib.ExitStack) -> Callable[[], None]:
    return get_close_on_a_server(stack, sys.executable)


def get_close_on_a_server(
    stack: contextlib.ExitStack, python: str
) -> Callable[[], None]:
    """A get+close on a pool server started with ``python``, after its spawn."""
    real, sys.executable = sys.executable, python  # the server is started with it
    try:
        server = stack.enter_context(
            ApplicationPoolServer(PoolConfig(max_pool_size=1), spawner=EchoSpawner())
        )
    finally:
        sys.executable = real
    pool = stack.enter_context(server.connect())
    app = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-app-"))

    def get_close() -> None:
        with pool.get(app):
            pass

    get_close()  # the spawn
    return get_close


def managers_client(stack: contextlib.ExitStack) -> Callable[[], None]:
    manager, address = _managers_pool.start(1)
    # The stack keeps the manager alive too: its shutdown is a finalizer
    # that runs as soon as the manager object is collected.
    stack.enter_context(manager)
    pool = _managers_pool.connect(address)
    stack.callback(pool.shutdown)  # the echo processes, before the manager

    def get_close() -> None:
        session_id, _pid, process_address = pool.get(APP)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(process_address)
        pool.close(session_id)

    get_close()  # the spawn
    return get_close


# --- (d) the server, counted in its own process --------------------------------

COUNT_FILE = "BENCH_POLICY_COUNT_FILE"
"""Environment variable: where the process under callgrind writes its counts."""

RAW_SERVER = """
import socket, sys, msgpack
sock = socket.socket(fileno=int(sys.argv[1]))
unpacker = msgpack.Unpacker()
while data := sock.recv(65536):
    unpacker.feed(data)
    for message in unpacker:
        if message[0] == 10:
            sock.sendall(msgpack.packb([30, message[1], 1, 1234, message[2], "x"]))
"""
"""The baseline server: a canned grant for each get, close notices read."""


@contextlib.contextmanager
def python_under_callgrind() -> Iterator[str]:
    """A script that runs Python under callgrind, writing to ``$COUNT_FILE``."""
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as work:
        script = os.path.join(work, "python")
        with open(script, "w") as file:
            file.write(
                "#!/bin/sh\nexec valgrind -q --tool=callgrind"
                f' --callgrind-out-file="${COUNT_FILE}" {sys.executable} "$@"\n'
            )
        os.chmod(script, 0o755)
        yield script


def actorpool_server(stack: contextlib.ExitStack) -> Callable[[], None]:
    return get_close_on_a_server(stack, stack.enter_context(python_under_callgrind()))


def raw_server(stack: contextlib.ExitStack) -> Callable[[], None]:
    python = stack.enter_context(python_under_callgrind())
    ours, theirs = socket.socketpair()
    stack.enter_context(ours)
    with theirs:
        process = subprocess.Popen(
            [python, "-c", RAW_SERVER, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
    stack.callback(process.wait)
    stack.callback(ours.shutdown, socket.SHUT_WR)  # its end of file: it exits
    unpacker = msgpack.Unpacker()
    ids = itertools.count(1)

    def get_close() -> None:
        request_id = next(ids)
        ours.sendall(msgpack.packb([10, request_id, APP, None]))
        while next(unpacker, None) is None:
            unpacker.feed(ours.recv(65536))
        ours.sendall(msgpack.packb([20, request_id]))

    return get_close


COUNTED_ELSEWHERE = {"server", "raw-server"}
"""Cases counted in a process they start under callgrind, not in the runner."""

Factory = Callable[[contextlib.ExitStack], Callable[[], None]]

CASES: dict[str, tuple[str, Factory]] = {
    "policy-1": ("(a) policy, 1 process, idle", lambda _: pool_with(1, 0)[1]),
    "policy-32": ("(a) policy, 32 processes, idle", lambda _: pool_with(32, 0)[1]),
    "policy-32-busy": (
        "(a) policy, 32 processes, 31 busy",
        lambda _: pool_with(32, 31)[1],
    ),
    "stacks-1": ("", lambda _: stacks_with(1, 0)),
    "stacks-32": ("", lambda _: stacks_with(32, 0)),
    "stacks-32-busy": ("", lambda _: stacks_with(32, 31)),
    "codec": ("(b) codec, get + grant + close", lambda _: codec_get_close()),
    "raw": ("", lambda _: raw_get_close),
    "client": ("(c) client process, get + connect + close", actorpool_client),
    "managers-client": ("", managers_client),
    "server": ("(d) server process, get + close", actorpool_server),
    "raw-server": ("", raw_server),
}
"""Each case: its row's name (none for a baseline) and what makes its loop body."""

ROWS = [
    ("policy-1", "stacks-1"),
    ("policy-32", "stacks-32"),
    ("policy-32-busy", "stacks-32-busy"),
    ("codec", "raw"),
    ("client", "managers-client"),
    ("server", "raw-server"),
]
"""Each row: a case of ours and its baseline."""


def seconds_per_call(case: str, number: int) -> float:
    with contextlib.ExitStack() as stack:
        return best(CASES[case][1](stack), number)


def instructions_per_call(case: str) -> float:
    """Instructions per call of ``case``'s loop body, counted by callgrind."""
    return _callgrind.instructions_per_call(
        __file__, case, under_valgrind=case not in COUNTED_ELSEWHERE
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    _callgrind.add_arguments(parser)
    args = parser.parse_args()
    if args.run:  # one case's loop, for callgrind to count
        case, iterations = args.run[0], int(args.run[1])
        with tempfile.TemporaryDirectory(prefix="bench-policy-") as work:
            os.environ[COUNT_FILE] = os.path.join(work, "callgrind.out")
            with contextlib.ExitStack() as stack:
                body = CASES[case][1](stack)
                for _ in range(iterations):
                    body()
            if case in COUNTED_ELSEWHERE:  # that process has exited: read it
                with open(os.environ[COUNT_FILE]) as file:
                    match = re.search(r"^summary: (\d+)$", file.read(), re.MULTILINE)
                assert match is not None, "callgrind wrote no summary"
                print(f"Collected : {match[1]}", file=sys.stderr)
        return
    print(f"# bench_policy: Python {sys.version.split()[0]}")
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("--instructions needs valgrind (apt-get install -y valgrind)")
        measure, unit = instructions_per_call, "instructions"
    else:
        number = 300 if args.quick else 3_000

        def measure(case: str) -> float:
            return seconds_per_call(case, number) * 1e6

        unit = "us"
    print(f"per get+close, in {unit}")
    print(f"{'':40} {'actorpool':>12} {'baseline':>12} {'ratio':>7}")
    for ours, baseline in ROWS:
        if ours in COUNTED_ELSEWHERE and not args.instructions:
            continue  # a server under callgrind: only counting makes sense
        mine, theirs = measure(ours), measure(baseline)
        figures = (
            f"{mine:12,.0f} {theirs:12,.0f}"
            if args.instructions
            else f"{mine:12.2f} {theirs:12.2f}"
        )
        print(f"{CASES[ours][0]:40} {figures} {mine / theirs:6.1f}x")


if __name__ == "__main__":
    main()
