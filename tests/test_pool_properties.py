"""Property-based tests of the pure pool policy: a simulated registry and spawner.

The state machine plays every other part of the server around one
:class:`~actorpool.pool.Pool`: clients that get, close and disappear, a
spawner that finishes, fails or loses processes whenever it likes, a clock,
and an administrator who restarts apps and changes limits. It keeps its own
record of what the pool told it and checks the pool's promises after every
step (design section 5.7): no more than ``max_pool_size`` processes, no more
sessions on a process than its concurrency, FIFO per app, every get answered
exactly once, no waiter left queued while its app has a free process, a
get that finds a process with room granted the most recently used one at
once, and the pool's index of free processes true to its processes. Some
rules take several steps at once (a burst of gets, every spawn finishing,
every session closing in turn), to reach states that single steps seldom do:
several processes of one app free, each last used at a different time.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from actorpool.config import PoolConfig
from actorpool.pool import Decision, Fail, Grant, Pool, Spawn, Stop

APPS = ("/srv/a", "/srv/b", "/srv/c")
CLIENTS = 3

apps = st.sampled_from(APPS)
picks = st.integers(min_value=0, max_value=50)
"""An index into some current list, taken modulo its length (shrinks to 0)."""


@dataclasses.dataclass
class _Get:
    client: int
    app: str
    arrival: int
    deadline: float | None


@dataclasses.dataclass
class _Process:
    app: str
    pid: int
    address: str
    concurrency: int
    grants: int = 0


class PoolMachine(RuleBasedStateMachine):
    """A registry and spawner simulated around one pure Pool."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.request_ids = itertools.count(1)
        self.arrivals = itertools.count()
        self.client_ids = itertools.count(CLIENTS + 1)
        self.clients = list(range(1, CLIENTS + 1))
        self.waiting: dict[int, _Get] = {}
        """Gets not answered yet, by request id."""
        self.answered: set[int] = set()
        self.dropped: set[int] = set()
        """Gets of clients that went away: nobody to answer."""
        self.spawning: dict[int, str] = {}
        """Spawns the pool asked for and the spawner has not finished."""
        self.processes: dict[int, _Process] = {}
        """Processes the spawner runs and the pool has not stopped."""
        self.sessions: dict[int, tuple[int, int]] = {}
        """Open sessions: session id -> (client, instance id)."""
        self.retired: set[int] = set()
        """Instances a restart or clear retired: they must get no new session."""
        self.lowered = False
        """A limit was lowered below what runs: the pool may be over it a while."""
        self.spawn_failed_app: str | None = None

    @initialize(
        max_pool_size=st.integers(1, 4),
        max_per_app=st.integers(0, 3),
        min_instances=st.integers(0, 2),
        max_idle_time=st.sampled_from([0.0, 0.3, 1.1, 5.0]),
        max_requests=st.integers(0, 3),
        max_queue_size=st.integers(0, 4),
    )
    def start(
        self,
        max_pool_size: int,
        max_per_app: int,
        min_instances: int,
        max_idle_time: float,
        max_requests: int,
        max_queue_size: int,
    ) -> None:
        self.config = PoolConfig(
            max_pool_size=max_pool_size,
            max_per_app=max_per_app,
            min_instances=min_instances,
            max_idle_time=max_idle_time,
            max_requests=max_requests,
            max_queue_size=max_queue_size,
        )
        self.pool = Pool(self.config)

    # --- applying the pool's decisions, checking each -----------------------

    def apply(self, decisions: list[Decision], *, request: int | None = None) -> None:
        spawned: set[str] = set()
        for decision in decisions:
            match decision:
                case Grant():
                    self.on_grant(decision)
                case Fail():
                    self.on_fail(decision, request)
                case Spawn():
                    assert decision.instance_id not in self.spawning
                    assert decision.instance_id not in self.processes
                    self.spawning[decision.instance_id] = decision.app_root
                    spawned.add(decision.app_root)
                case Stop():
                    self.on_stop(decision)
        if spawned:
            # A spawn never takes the pool (or its app) over a limit.
            assert self.pool.count <= self.pool.max_pool_size
            if self.pool.max_per_app:
                for app in spawned:
                    assert self.app_count(app) <= self.pool.max_per_app

    def on_grant(self, grant: Grant) -> None:
        get = self.waiting.pop(grant.request_id, None)
        assert get is not None, f"{grant} answers no waiting get"
        self.answered.add(grant.request_id)
        assert (grant.client_id, grant.app_root) == (get.client, get.app)
        # FIFO per app: nobody of this app who came earlier is still waiting.
        for other in self.waiting.values():
            assert not (other.app == get.app and other.arrival < get.arrival), grant
        process = self.processes.get(grant.instance_id)
        assert process is not None, f"{grant} is on no running process"
        assert grant.instance_id not in self.retired, grant
        assert (grant.app_root, grant.pid, grant.address) == (
            process.app,
            process.pid,
            process.address,
        )
        process.grants += 1
        if self.config.max_requests:
            assert process.grants <= self.config.max_requests
        assert grant.session_id not in self.sessions
        self.sessions[grant.session_id] = (grant.client_id, grant.instance_id)
        on_it = sum(1 for _, i in self.sessions.values() if i == grant.instance_id)
        assert on_it <= process.concurrency

    def on_fail(self, fail: Fail, request: int | None) -> None:
        get = self.waiting.pop(fail.request_id, None)
        assert get is not None, f"{fail} answers no waiting get"
        self.answered.add(fail.request_id)
        assert fail.client_id == get.client
        if fail.kind == "QueueFullError":
            assert fail.request_id == request  # at once, never later
        elif fail.kind == "GetTimeoutError":
            assert get.deadline is not None
            assert get.deadline <= self.now
        else:
            assert fail.kind == "SpawnError"
            assert get.app == self.spawn_failed_app

    def on_stop(self, stop: Stop) -> None:
        if self.spawning.pop(stop.instance_id, None) is None:
            assert self.processes.pop(stop.instance_id, None) is not None, stop
        self.forget_sessions_on(stop.instance_id)

    def forget_sessions_on(self, instance_id: int) -> None:
        for sid in [s for s, (_, i) in self.sessions.items() if i == instance_id]:
            del self.sessions[sid]

    def app_count(self, app: str) -> int:
        stats = self.pool.statistics(self.now).app(app)
        return 0 if stats is None else stats.count

    # --- clients -------------------------------------------------------------

    @rule(
        app=apps,
        client=picks,
        timeout=st.sampled_from([None, None, None, 0.0, 0.5, 2.0]),
    )
    def get(self, app: str, client: int, timeout: float | None) -> None:
        client_id = self.clients[client % len(self.clients)]
        request = next(self.request_ids)
        deadline = None if timeout is None else self.now + timeout
        expected = self.most_recently_used_with_room(app)
        self.waiting[request] = _Get(client_id, app, next(self.arrivals), deadline)
        decisions = self.pool.get(client_id, request, app, self.now, timeout)
        if expected is not None:
            # Reuse before anything else, and the most recently used process
            # with room (any of them if several were used at the same moment).
            grants = [d for d in decisions if isinstance(d, Grant)]
            assert [g.request_id for g in grants] == [request], decisions
            assert grants[0].instance_id in expected, (grants[0], expected)
        self.apply(decisions, request=request)
        if timeout == 0:
            assert request not in self.waiting  # answered at once, one way or another

    @rule(app=apps, client=picks, count=st.integers(2, 4))
    def burst_of_gets(self, app: str, client: int, count: int) -> None:
        # One app wanting several processes at once: with every spawn
        # finishing and every session closing in turn, it leaves several of
        # them free, a state that single steps seldom reach.
        for _ in range(count):
            self.get(app, client, None)

    @precondition(lambda self: self.apps_with_room())
    @rule(pick=picks, client=picks)
    def get_where_a_process_has_room(self, pick: int, client: int) -> None:
        # A plain get seldom finds a process with room (most examples are
        # busy or short of processes): this one always does.
        apps = self.apps_with_room()
        self.get(apps[pick % len(apps)], client, None)

    def apps_with_room(self) -> list[str]:
        return [app for app in APPS if self.most_recently_used_with_room(app)]

    def most_recently_used_with_room(self, app: str) -> set[int] | None:
        """The processes a get of ``app`` must go to now; None if it may not
        be served from a running process at once (none has room, or earlier
        gets of the app are queued)."""
        stats = self.pool.statistics(self.now).app(app)
        if stats is None or stats.waiting:
            return None
        roomy = [
            p
            for p in stats.processes
            if p.state == "ready" and p.sessions < p.concurrency
        ]
        if not roomy:
            return None
        latest = min(p.idle for p in roomy)
        return {p.instance_id for p in roomy if p.idle == latest}

    @precondition(lambda self: self.sessions)
    @rule(pick=picks)
    def close_session(self, pick: int) -> None:
        sid = sorted(self.sessions)[pick % len(self.sessions)]
        client, _ = self.sessions.pop(sid)
        self.apply(self.pool.close_session(client, sid, self.now))
        assert self.pool.active == len(self.sessions)

    @precondition(lambda self: len(self.sessions) > 1)
    @rule(client=picks)
    def every_session_closes_in_turn_then_a_get(self, client: int) -> None:
        # Several processes of one app free at once, each last used at a
        # different time: the state in which a get must pick the latest.
        for sid in sorted(self.sessions):
            self.time_passes(0.01)
            if sid not in self.sessions:
                continue  # its process was stopped as time passed
            owner, _ = self.sessions.pop(sid)
            self.apply(self.pool.close_session(owner, sid, self.now))
        roomy = self.apps_with_room()
        if roomy:
            self.get(roomy[0], client, None)

    @precondition(lambda self: self.sessions)
    @rule(pick=picks)
    def close_someone_elses_session(self, pick: int) -> None:
        sid = sorted(self.sessions)[pick % len(self.sessions)]
        client, _ = self.sessions[sid]
        assert self.pool.close_session(client + 1000, sid, self.now) == []
        assert self.pool.session_failed(client + 1000, sid, self.now) == []

    @precondition(lambda self: self.sessions)
    @rule(pick=picks)
    def session_failed(self, pick: int) -> None:
        sid = sorted(self.sessions)[pick % len(self.sessions)]
        client, instance_id = self.sessions.pop(sid)
        decisions = self.pool.session_failed(client, sid, self.now)
        assert Stop(instance_id, "unreachable") in decisions
        self.apply(decisions)

    @rule(pick=picks)
    def client_gone(self, pick: int) -> None:
        index = pick % len(self.clients)
        gone = self.clients[index]
        self.clients[index] = next(self.client_ids)  # a new client takes its place
        for request in [r for r, g in self.waiting.items() if g.client == gone]:
            del self.waiting[request]
            self.dropped.add(request)
        for sid in [s for s, (c, _) in self.sessions.items() if c == gone]:
            del self.sessions[sid]
        self.apply(self.pool.client_gone(gone, self.now))

    # --- the spawner -------------------------------------------------------------

    @precondition(lambda self: self.spawning)
    @rule(pick=picks, concurrency=st.sampled_from([1, 1, 2]))
    def spawn_ready(self, pick: int, concurrency: int) -> None:
        instance_id = sorted(self.spawning)[pick % len(self.spawning)]
        app = self.spawning.pop(instance_id)
        pid = 10_000 + instance_id
        address = f"/run/{instance_id}.sock"
        self.processes[instance_id] = _Process(app, pid, address, concurrency)
        self.apply(
            self.pool.instance_ready(instance_id, pid, address, concurrency, self.now)
        )

    @precondition(lambda self: self.spawning)
    @rule(concurrency=st.sampled_from([1, 1, 2]))
    def every_spawn_finishes(self, concurrency: int) -> None:
        # With concurrency 2 too: a full pool of such processes, busy, is
        # where an app with no process needs a drain (rule 3).
        while self.spawning:
            self.spawn_ready(0, concurrency)

    @precondition(lambda self: self.spawning)
    @rule(pick=picks)
    def spawn_fails(self, pick: int) -> None:
        instance_id = sorted(self.spawning)[pick % len(self.spawning)]
        self.spawn_failed_app = self.spawning.pop(instance_id)
        try:
            self.apply(self.pool.spawn_failed(instance_id, "boom", "", self.now))
        finally:
            self.spawn_failed_app = None

    @precondition(lambda self: self.processes)
    @rule(pick=picks)
    def process_dies(self, pick: int) -> None:
        instance_id = sorted(self.processes)[pick % len(self.processes)]
        del self.processes[instance_id]
        self.forget_sessions_on(instance_id)
        self.apply(self.pool.instance_exited(instance_id, self.now))
        assert self.pool.instance_exited(instance_id, self.now) == []

    # --- the clock and the administrator ---------------------------------------

    @rule(seconds=st.sampled_from([0.1, 0.3, 1.0, 3.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.pool.tick(self.now))

    @precondition(lambda self: self.pool.next_deadline() is not None)
    @rule()
    def alarm_fires(self) -> None:
        deadline = self.pool.next_deadline()
        assert deadline is not None
        self.now = max(self.now, deadline)
        self.apply(self.pool.tick(self.now))
        # Else the registry's alarm would fire again and again at once.
        after = self.pool.next_deadline()
        assert after is None or after > self.now

    @rule(app=apps)
    def restart_app(self, app: str) -> None:
        self.retired |= {i for i, a in self.spawning.items() if a == app}
        self.retired |= {i for i, p in self.processes.items() if p.app == app}
        self.apply(self.pool.restart_app(app, self.now))

    @rule()
    def clear(self) -> None:
        self.retired |= set(self.spawning) | set(self.processes)
        self.apply(self.pool.clear(self.now))

    @rule(value=st.integers(1, 4))
    def set_max_pool_size(self, value: int) -> None:
        self.lowered |= value < self.pool.count
        self.apply(self.pool.set_max_pool_size(value, self.now))

    @rule(value=st.integers(0, 3))
    def set_max_per_app(self, value: int) -> None:
        self.lowered |= value > 0 and any(self.app_count(app) > value for app in APPS)
        self.apply(self.pool.set_max_per_app(value, self.now))

    @rule(value=st.sampled_from([0.0, 0.3, 1.1, 5.0]))
    def set_max_idle_time(self, value: float) -> None:
        self.apply(self.pool.set_max_idle_time(value, self.now))

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def the_pool_agrees_with_the_simulation(self) -> None:
        assert self.pool.count == len(self.spawning) + len(self.processes)
        assert self.pool.active == len(self.sessions)
        assert self.pool.waiting == len(self.waiting)

    @invariant()
    def never_more_processes_than_the_limit(self) -> None:
        if self.pool.count <= self.pool.max_pool_size:
            return
        # Only a lowered limit, and only while the excess is busy.
        assert self.lowered
        stats = self.pool.statistics(self.now)
        for app in stats.apps:
            for process in app.processes:
                assert not (process.state == "ready" and process.sessions == 0)

    @invariant()
    def never_more_sessions_than_concurrency(self) -> None:
        for app in self.pool.statistics(self.now).apps:
            for process in app.processes:
                assert process.sessions <= process.concurrency

    @invariant()
    def no_waiter_queued_while_its_app_has_room(self) -> None:
        stats = self.pool.statistics(self.now)
        idle_elsewhere: dict[str, bool] = {}
        for app in stats.apps:
            idle_elsewhere[app.app_root] = any(
                p.state == "ready" and p.sessions == 0
                for other in stats.apps
                if other is not app
                for p in other.processes
            )
        for app in stats.apps:
            if not app.waiting:
                continue
            for process in app.processes:
                assert not (
                    process.state == "ready" and process.sessions < process.concurrency
                ), app
            # And it is not stuck: a spawn is on its way, or nothing can start.
            spawns = sum(1 for p in app.processes if p.state == "spawning")
            if spawns == 0:
                full = stats.count >= stats.max_pool_size
                capped = 0 < stats.max_per_app <= app.count
                assert capped or (full and not idle_elsewhere[app.app_root]), app

    @invariant()
    def an_app_with_no_process_has_a_slot_coming(self) -> None:
        # Rule 3 with concurrency above 1: such a process can stay busy for
        # as long as its app has load, so it is never idle to be evicted. An
        # app waiting with no process needs a process on its way out: a
        # retiring one (drained for it, or retired), or a busy one with
        # concurrency 1 (idle, and so evicted, at its close). Apps whose
        # own process is drained (white-box: the statistics show it only as
        # retiring) are left out: they wait in turn.
        stats = self.pool.statistics(self.now)
        drained_apps = {i.app_root for i in self.pool._draining.values()}
        starving = [
            app
            for app in stats.apps
            if app.waiting
            and not any(p.state != "retiring" for p in app.processes)
            and app.app_root not in drained_apps
            and not 0 < stats.max_per_app <= app.count
        ]
        processes = [p for app in stats.apps for p in app.processes]
        coming = sum(
            1
            for p in processes
            if p.sessions
            and (p.state == "retiring" or (p.state == "ready" and p.concurrency == 1))
        )
        drainable = any(
            p.state == "ready" and p.concurrency > 1 and p.sessions for p in processes
        )
        assert coming >= len(starving) or not drainable, stats

    @invariant()
    def every_drain_is_for_an_app_waiting_with_no_process(self) -> None:
        # White-box: a drain left behind after its app was served, or after
        # its waiters left, would stop a process for nobody.
        targets = [i.drained_for for i in self.pool._draining.values()]
        assert len(targets) == len(set(targets)), targets
        for instance in self.pool._draining.values():
            assert instance.retiring, instance
            assert instance.sessions, instance
            app = self.pool._apps.get(instance.drained_for or "")
            assert app is not None, instance
            assert app.waiters, instance
            assert not app.live, instance

    @invariant()
    def the_next_deadline_is_the_earliest_thing_due(self) -> None:
        # Worked out again from the statistics, the slow way: the earliest
        # deadline of a get still waiting, and per app above min_instances
        # the time its longest-idle process is due to be reaped.
        due = [g.deadline for g in self.waiting.values() if g.deadline is not None]
        if self.pool.max_idle_time > 0:
            for app in self.pool.statistics(self.now).apps:
                live = sum(1 for p in app.processes if p.state == "ready")
                idle = [
                    p.idle
                    for p in app.processes
                    if p.state == "ready" and p.sessions == 0
                ]
                if idle and live > self.pool.min_instances:
                    due.append(self.now - max(idle) + self.pool.max_idle_time)
        expected = min(due, default=None)
        actual = self.pool.next_deadline()
        if expected is None:
            assert actual is None
        else:
            assert actual == pytest.approx(expected)

    @invariant()
    def the_index_of_free_processes_is_true(self) -> None:
        # Pool keeps, per app, the processes with room in order of last use,
        # updated by hand at every change: white-box, since a stale entry
        # shows in a grant only when several processes of one app are free.
        for app in self.pool._apps.values():
            with_room = {i.id for i in app.instances.values() if i.has_room}
            assert set(app.free) == with_room, app
            used = [i.last_used for i in app.free.values()]
            assert used == sorted(used), app

    @invariant()
    def every_get_answered_at_most_once(self) -> None:
        assert not self.answered & set(self.waiting)
        assert not self.answered & self.dropped

    # --- the end: drain and check that nobody was lost ------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for _ in range(1000):
            if not (self.spawning or self.sessions or self.waiting):
                break
            for instance_id in sorted(self.spawning):
                if instance_id in self.spawning:
                    app = self.spawning.pop(instance_id)
                    self.processes[instance_id] = _Process(
                        app, 10_000 + instance_id, f"/run/{instance_id}.sock", 1
                    )
                    self.apply(
                        self.pool.instance_ready(
                            instance_id,
                            10_000 + instance_id,
                            f"/run/{instance_id}.sock",
                            1,
                            self.now,
                        )
                    )
            for sid in sorted(self.sessions):
                if sid in self.sessions:
                    client, _ = self.sessions.pop(sid)
                    self.apply(self.pool.close_session(client, sid, self.now))
        assert not self.waiting, f"lost waiters: {self.waiting}"
        assert (self.pool.waiting, self.pool.active) == (0, 0)
        assert not self.spawning
        for client in self.clients:
            assert self.pool.client_gone(client, self.now) == []
        # Much later, idle reaping leaves at most min_instances per app.
        if self.pool.max_idle_time:
            self.now += 1000
            self.apply(self.pool.tick(self.now))
            for stats in self.pool.statistics(self.now).apps:
                assert stats.count <= self.config.min_instances


# CPU-bound for 10 to 20 s here, a minute or more on a loaded machine: a
# pytest-timeout inside Hypothesis shows up as a misleading FlakyFailure.
TestPool = pytest.mark.timeout(600)(PoolMachine.TestCase)
TestPool.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
