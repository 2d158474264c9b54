"""ApplicationPool against a scripted server on a socket pair (no server process).

The fake server speaks the real protocol (a server-role sans-IO Connection)
and answers as each test scripts it, so the client's own logic is tested:
replies matched to requests by id, many threads sharing one connection with
no thread of the client's own, errors raised as their classes.
"""

from __future__ import annotations

import errno
import math
import queue
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from actorpool import (
    ApplicationPool,
    ConfigError,
    QueueFullError,
    RemoteProtocolError,
    ServerGoneError,
    Session,
    SpawnError,
)
from actorpool import client as client_module
from actorpool.messages import (
    PROTOCOL_VERSION,
    CloseSession,
    Done,
    ErrorReply,
    Get,
    GetStatistics,
    Hello,
    Request,
    SessionFailed,
    SessionGranted,
    Welcome,
    WireMessage,
)
from actorpool.protocol import NEED_DATA, PEER_CLOSED, Connection, Role

WAIT = 5.0


class FakeServer:
    """The server's end: decodes what the client sends, sends what it is told."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT)
        self.sock = sock
        self.conn = Connection(Role.SERVER)

    def receive(self) -> WireMessage | object:
        while (event := self.conn.next_event()) is NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def request(self) -> Request:
        message = self.receive()
        assert isinstance(message, Request), message
        return message

    def send(self, message: WireMessage) -> None:
        self.sock.sendall(self.conn.send(message))

    def welcome(self) -> None:
        assert isinstance(self.receive(), Hello)
        self.send(Welcome(PROTOCOL_VERSION, 4242, 9))


Pair = tuple[Callable[[], ApplicationPool], FakeServer]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A client factory and the fake server it will talk to (welcome sent)."""
    ours, theirs = socket.socketpair()
    server = FakeServer(theirs)
    pools: list[ApplicationPool] = []

    def connect() -> ApplicationPool:
        greeter = threading.Thread(target=server.welcome)
        greeter.start()
        pool = ApplicationPool(ours)
        greeter.join(WAIT)
        pools.append(pool)
        return pool

    yield connect, server
    for pool in pools:
        pool.close()
    theirs.close()


@pytest.fixture
def listener(tmp_path: object) -> Iterator[str]:
    """A Unix socket that accepts sessions, standing in for an app process."""
    path = f"{tmp_path}/app.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(16)
    yield path
    sock.close()


def test_the_handshake_learns_the_server(pair: Pair) -> None:
    connect, _ = pair
    pool = connect()
    assert (pool.server_pid, pool.client_id) == (4242, 9)


def test_replies_out_of_order_reach_their_own_threads(
    pair: Pair,
    listener: str,
) -> None:
    connect, server = pair
    pool = connect()
    results: queue.Queue[tuple[str, object]] = queue.Queue()

    def get(app: str) -> None:
        session = pool.get(app)
        results.put((app, session.id))
        session.socket.close()

    threads = [threading.Thread(target=get, args=(f"/srv/{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    gets = [server.receive() for _ in threads]
    assert all(isinstance(g, Get) for g in gets)
    for g in reversed(gets):  # answer the last first
        assert isinstance(g, Get)
        server.send(
            SessionGranted(g.request_id, 100 + g.request_id, 1, g.app_root, listener)
        )
    for thread in threads:
        thread.join(WAIT)
    got = dict(results.get_nowait() for _ in threads)
    by_app = {g.app_root: 100 + g.request_id for g in gets if isinstance(g, Get)}
    assert got == by_app
    assert not any(t.name.startswith("actorpool") for t in threading.enumerate())


def test_an_error_reply_is_raised_as_its_class(pair: Pair) -> None:
    connect, server = pair
    pool = connect()
    answered = threading.Thread(
        target=lambda: server.send(
            ErrorReply(server.request().request_id, "QueueFullError", "full")
        )
    )
    answered.start()
    with pytest.raises(QueueFullError, match="full"):
        pool.get("/srv/a")
    answered.join(WAIT)


def test_a_reply_of_the_wrong_kind_is_a_protocol_error(pair: Pair) -> None:
    connect, server = pair
    pool = connect()
    answered = threading.Thread(
        target=lambda: server.send(Done(server.request().request_id))
    )
    answered.start()
    with pytest.raises(RemoteProtocolError, match="SessionGranted"):
        pool.get("/srv/a")
    answered.join(WAIT)


def test_closing_a_session_tells_the_server_once(
    pair: Pair,
    listener: str,
) -> None:
    connect, server = pair
    pool = connect()
    answered = threading.Thread(
        target=lambda: server.send(
            SessionGranted(server.request().request_id, 77, 1, "/srv/a", listener)
        )
    )
    answered.start()
    session = pool.get("/srv/a")
    answered.join(WAIT)
    session.close()
    session.close()
    assert server.receive() == CloseSession(77)
    pool.close()
    assert server.receive() is PEER_CLOSED  # nothing more was sent


def grant_the_next_get(server: FakeServer, session_id: int, address: str) -> None:
    """Answer the next request, a get, with a session, from another thread."""
    threading.Thread(
        target=lambda: server.send(
            SessionGranted(server.request().request_id, session_id, 1, "/a", address)
        ),
        daemon=True,
    ).start()


def test_a_get_interrupted_before_its_grant_gives_the_session_back_later(
    pair: Pair, listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect, server = pair
    pool = connect()
    lead = pool._lead

    def interrupted_while_reading() -> None:
        monkeypatch.setattr(pool, "_lead", lead)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "_lead", interrupted_while_reading)
    with pytest.raises(KeyboardInterrupt):
        pool.get("/srv/a")
    get = server.request()
    assert isinstance(get, Get)
    server.send(SessionGranted(get.request_id, 55, 1, "/srv/a", listener))
    # The grant is read with the next reply, and given straight back.
    answered = threading.Thread(
        target=lambda: server.send(Done(server.request().request_id))
    )
    answered.start()
    pool.clear()
    answered.join(WAIT)
    assert server.receive() == CloseSession(55)


def test_a_get_interrupted_after_its_grant_came_in_gives_the_session_back(
    pair: Pair, listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect, server = pair
    pool = connect()
    lead = pool._lead

    def interrupted_after_reading() -> None:
        lead()  # files the grant under its request id
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "_lead", interrupted_after_reading)
    grant_the_next_get(server, 56, listener)
    with pytest.raises(KeyboardInterrupt):
        pool.get("/srv/a")
    assert server.receive() == CloseSession(56)
    assert pool._replies == {}


class InterruptedRelock:
    """The pool's lock, but a wait to take it back after reading (the
    leader's) is interrupted once, as a signal whose handler raises would."""

    def __init__(self, pool: ApplicationPool) -> None:
        self.pool = pool
        self.lock = pool._lock
        self.armed = False
        self.fired = False

    def acquire(self) -> bool:
        if self.armed:
            self.armed, self.fired = False, True
            raise KeyboardInterrupt
        return self.lock.acquire()

    def release(self) -> None:
        # The leader releases the lock to read; its next acquire is the one.
        self.armed = self.pool._reading and not self.fired
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def test_a_leader_interrupted_taking_the_lock_back_keeps_what_it_read(
    pair: Pair, listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the bytes it had read were dropped (other threads' replies
    with them; here the grant, so the session was never given back), and
    the unlocked lock's release raised RuntimeError over the interrupt."""
    connect, server = pair
    pool = connect()
    relock = InterruptedRelock(pool)
    monkeypatch.setattr(pool, "_lock", relock)
    grant_the_next_get(server, 58, listener)
    with pytest.raises(KeyboardInterrupt):
        pool.get("/srv/a")
    assert relock.fired
    assert server.receive() == CloseSession(58)
    monkeypatch.undo()
    answered = threading.Thread(
        target=lambda: server.send(Done(server.request().request_id))
    )
    answered.start()
    pool.clear()  # the connection carries on
    answered.join(WAIT)


def test_a_grant_that_cannot_get_a_socket_is_given_back(
    pair: Pair, listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect, server = pair
    pool = connect()

    def no_descriptors_left(*_args: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    grant_the_next_get(server, 57, listener)
    monkeypatch.setattr(client_module.socket, "socket", no_descriptors_left)
    with pytest.raises(OSError, match="Too many open files"):
        pool.get("/srv/a")
    monkeypatch.undo()
    assert server.receive() == CloseSession(57)


def test_discarding_a_session_tells_the_server_it_failed_once(
    pair: Pair, listener: str
) -> None:
    connect, server = pair
    pool = connect()
    grant_the_next_get(server, 78, listener)
    session = pool.get("/srv/a")
    session.discard()
    session.discard()
    session.close()
    assert session.closed
    assert server.receive() == SessionFailed(78)
    pool.close()
    assert server.receive() is PEER_CLOSED  # nothing more was sent


def test_the_server_going_away_fails_every_waiter(pair: Pair) -> None:
    connect, server = pair
    pool = connect()
    errors: queue.Queue[BaseException] = queue.Queue()

    def wait_for_statistics() -> None:
        try:
            pool.statistics()
        except BaseException as exc:
            errors.put(exc)

    threads = [threading.Thread(target=wait_for_statistics) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert isinstance(server.receive(), GetStatistics)
    server.sock.close()
    for thread in threads:
        thread.join(WAIT)
    assert [type(errors.get_nowait()) for _ in threads] == [ServerGoneError] * 3
    with pytest.raises(ServerGoneError):
        pool.clear()


def test_a_connection_level_error_is_raised(pair: Pair) -> None:
    connect, server = pair
    pool = connect()
    answered = threading.Thread(
        target=lambda: (
            server.receive(),
            server.sock.sendall(server.conn.send_protocol_error("you broke it")),
        )
    )
    answered.start()
    with pytest.raises(RemoteProtocolError, match="you broke it"):
        pool.statistics()
    answered.join(WAIT)


BAD_CALLS: list[tuple[str, Callable[[ApplicationPool], object]]] = [
    ("timeout", lambda pool: pool.get("/srv/a", timeout=-1)),
    ("timeout", lambda pool: pool.get("/srv/a", timeout=math.nan)),
    ("timeout", lambda pool: pool.get("/srv/a", timeout="5")),  # type: ignore[arg-type]
    ("max_pool_size", lambda pool: pool.set_max_pool_size(0)),
    ("max_pool_size", lambda pool: pool.set_max_pool_size(2**63)),
    ("max_pool_size", lambda pool: pool.set_max_pool_size(True)),
    ("max_per_app", lambda pool: pool.set_max_per_app(-1)),
    ("max_idle_time", lambda pool: pool.set_max_idle_time(-1.0)),
    ("max_idle_time", lambda pool: pool.set_max_idle_time(math.inf)),
    ("max_idle_time", lambda pool: pool.set_max_idle_time(math.nan)),
]


def test_bad_arguments_fail_before_anything_is_sent(pair: Pair) -> None:
    connect, server = pair
    pool = connect()
    for name, call in BAD_CALLS:
        with pytest.raises(ConfigError, match=name):
            call(pool)
    pool.close()
    assert server.receive() is PEER_CLOSED


@pytest.mark.parametrize(("timeout", "sent"), [(None, None), (math.inf, None), (2, 2)])
def test_an_endless_timeout_is_sent_as_none(
    pair: Pair, listener: str, timeout: float | None, sent: float | None
) -> None:
    connect, server = pair
    pool = connect()
    got: queue.Queue[object] = queue.Queue()
    getter = threading.Thread(
        target=lambda: got.put(pool.get("/srv/a", timeout=timeout))
    )
    getter.start()
    request = server.receive()
    assert isinstance(request, Get)
    if sent is None:
        assert request.timeout is None
    else:  # what is left of the timeout, a moment later
        assert request.timeout is not None
        assert 0 < request.timeout <= sent
    server.send(SessionGranted(request.request_id, 1, 1, request.app_root, listener))
    getter.join(WAIT)
    session = got.get_nowait()
    assert isinstance(session, Session)
    session.socket.close()


def test_a_dead_process_found_at_connect_is_reported_and_another_asked_for(
    pair: Pair, listener: str, tmp_path: object
) -> None:
    connect, server = pair
    pool = connect()
    dead = f"{tmp_path}/gone.sock"  # nothing listens here: the process died

    def answer() -> None:
        first = server.request()
        server.send(SessionGranted(first.request_id, 1, 11, "/srv/a", dead))
        assert server.receive() == SessionFailed(1)  # reported, not just dropped
        second = server.request()
        assert isinstance(second, Get)
        server.send(SessionGranted(second.request_id, 2, 22, "/srv/a", listener))

    answering = threading.Thread(target=answer)
    answering.start()
    session = pool.get("/srv/a")
    answering.join(WAIT)
    assert (session.id, session.pid) == (2, 22)
    session.close()


def test_get_gives_up_after_three_dead_processes(pair: Pair, tmp_path: object) -> None:
    connect, server = pair
    pool = connect()
    dead = f"{tmp_path}/gone.sock"

    def answer() -> None:
        for session_id in (1, 2, 3):
            request = server.request()
            server.send(SessionGranted(request.request_id, session_id, 1, "/a", dead))
            assert server.receive() == SessionFailed(session_id)

    answering = threading.Thread(target=answer)
    answering.start()
    with pytest.raises(SpawnError, match="3 tries"):
        pool.get("/a")
    answering.join(WAIT)
