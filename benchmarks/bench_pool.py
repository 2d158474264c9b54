"""Core pool benchmark: actorpool against a raw round trip and a managers pool.

Run from the repository root::

    python benchmarks/bench_pool.py            # about a minute
    python benchmarks/bench_pool.py --quick    # a smoke run

It measures, in one run:

(a) ``get`` + ``close`` of a session on a warm process, one client, as a
    round-trip time (the get includes connecting to the process);
(b) aggregate get+close per second with 1, 8 and 32 client processes;
(c) a raw msgpack round trip over a socket pair between two processes;
(d) the same pool operations served by a ``multiprocessing.managers`` server.

and prints each figure with its ratio to the baseline. actorpool runs twice:
as it comes, and with the server's threads confined to one core (the server
is GIL-bound; keeping its threads on one core saves cross-core wake-ups).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import msgpack

from actorpool import ApplicationPoolServer, PoolConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _managers_pool
from _instances import EchoSpawner

APP = tempfile.mkdtemp(prefix="bench-app-")


# --- (c) the raw round trip ---------------------------------------------------------


def raw_round_trip(n: int) -> float:
    """Seconds per msgpack request/reply between two processes over a socketpair."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        unpacker = msgpack.Unpacker()
        while data := theirs.recv(65536):
            unpacker.feed(data)
            for request in unpacker:
                theirs.sendall(msgpack.packb([request[0], "reply"]))
        os._exit(0)
    theirs.close()
    unpacker = msgpack.Unpacker()
    start = time.perf_counter()
    for i in range(n):
        ours.sendall(msgpack.packb([i, "get", APP]))
        while True:
            unpacker.feed(ours.recv(65536))
            if next(unpacker, None) is not None:
                break
    elapsed = time.perf_counter() - start
    ours.close()
    os.waitpid(pid, 0)
    return elapsed / n


# --- the two pools, behind one interface ------------------------------------------


class ActorPoolUnderTest:
    name = "actorpool"

    def __init__(self, max_pool_size: int, pin: bool) -> None:
        self.server = ApplicationPoolServer(
            PoolConfig(max_pool_size=max_pool_size), spawner=EchoSpawner()
        )
        self._creator = os.getpid()
        if pin:
            self.name = "actorpool, server on one core"
            pin_process(self.server.pid, {0})

    def client(self) -> Callable[[], None]:
        pool = self.server.connect()
        if os.getpid() != self._creator:
            self.server.detach()  # a forked client, as in the seed

        def get_close() -> None:
            with pool.get(APP):
                pass

        return get_close

    @property
    def server_pid(self) -> int:
        return self.server.pid

    def close(self) -> None:
        self.server.close()


class ManagersPoolUnderTest:
    name = "multiprocessing.managers"

    def __init__(self, max_pool_size: int) -> None:
        self.manager, self.address = _managers_pool.start(max_pool_size)

    def client(self) -> Callable[[], None]:
        pool = _managers_pool.connect(self.address)

        def get_close() -> None:
            session_id, _pid, address = pool.get(APP)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(address)
            pool.close(session_id)

        return get_close

    @property
    def server_pid(self) -> int:
        return self.manager._process.pid  # type: ignore[attr-defined]

    def close(self) -> None:
        _managers_pool.connect(self.address).shutdown()
        self.manager.shutdown()


def pin_process(pid: int, cpus: set[int]) -> None:
    """Confine every thread of ``pid`` (and the threads it makes later) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


# --- (a) and (b) ----------------------------------------------------------------------


def one_client_round_trip(
    pool: ActorPoolUnderTest | ManagersPoolUnderTest, n: int
) -> dict[str, float]:
    """Seconds per get+close, and the CPU seconds each side spent on one."""
    get_close = pool.client()
    for _ in range(50):
        get_close()  # warm: the process exists, the code paths are hot
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    server_before = process_cpu(pool.server_pid)
    start = time.perf_counter()
    for _ in range(n):
        get_close()
    elapsed = time.perf_counter() - start
    server_after = process_cpu(pool.server_pid)
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rtt": elapsed / n,
        "client_user": (client_after.ru_utime - client_before.ru_utime) / n,
        "client_sys": (client_after.ru_stime - client_before.ru_stime) / n,
        "server_user": (server_after[0] - server_before[0]) / n,
        "server_sys": (server_after[1] - server_before[1]) / n,
    }


def process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def throughput(
    pool: ActorPoolUnderTest | ManagersPoolUnderTest, clients: int, seconds: float
) -> float:
    """Aggregate get+close per second over ``clients`` forked client processes."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    children = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            count = 0
            try:
                os.close(go_w)
                get_close = pool.client()
                get_close()  # warm-up, possibly spawning
                os.write(done_w, b"r")
                os.read(go_r, 1)
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    get_close()
                    count += 1
            finally:
                os.write(done_w, count.to_bytes(8, "big"))
                os._exit(0)
        children.append(pid)
    os.close(go_r)
    for _ in range(clients):
        os.read(done_r, 1)
    os.write(go_w, b"g" * clients)
    total = 0
    for _ in range(clients):
        total += int.from_bytes(_read_exact(done_r, 8), "big")
    for pid in children:
        os.waitpid(pid, 0)
    os.close(go_w)
    os.close(done_r)
    os.close(done_w)
    return total / seconds


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += os.read(fd, n - len(data))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    args = parser.parse_args()
    n = 300 if args.quick else 3000
    seconds = 0.5 if args.quick else args.seconds
    client_counts = (1, 8, 32)
    max_pool_size = max(client_counts)

    print(f"# bench_pool: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    raw = raw_round_trip(n)
    print(f"(c) raw msgpack round trip: {raw * 1e6:8.1f} us")

    results: dict[str, dict[str, float]] = {}
    for make in (
        lambda: ManagersPoolUnderTest(max_pool_size),
        lambda: ActorPoolUnderTest(max_pool_size, pin=False),
        lambda: ActorPoolUnderTest(max_pool_size, pin=True),
    ):
        pool = make()
        try:
            row = one_client_round_trip(pool, n)
            for clients in client_counts:
                row[f"x{clients}"] = throughput(pool, clients, seconds)
        finally:
            pool.close()
        results[pool.name] = row

    baseline = results["multiprocessing.managers"]
    print()
    print(
        f"{'':32} {'(a) get+close':>14} {'vs (c)':>7}   "
        + "   ".join(
            f"{'(b) ' + str(c) + ' clients':>16} {'vs (d)':>7}" for c in client_counts
        )
    )
    for name, row in results.items():
        cells = [f"{row['rtt'] * 1e6:11.1f} us", f"{row['rtt'] / raw:6.2f}x"]
        for c in client_counts:
            key = f"x{c}"
            cells.append(f"{row[key]:12.0f} /s")
            cells.append(f"{row[key] / baseline[key]:6.2f}x")
        print(
            f"{name:32} "
            + "   ".join(
                f"{cells[i]:>14} {cells[i + 1]:>7}" for i in range(0, len(cells), 2)
            )
        )

    print()
    print("CPU per get+close with one client (us):")
    columns = ("client user", "client sys", "server user", "server sys")
    print(f"{'':32} " + " ".join(f"{column:>12}" for column in columns))
    for name, row in results.items():
        keys = ("client_user", "client_sys", "server_user", "server_sys")
        print(f"{name:32} " + " ".join(f"{row[key] * 1e6:12.1f}" for key in keys))


if __name__ == "__main__":
    main()
