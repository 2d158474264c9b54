"""The pool's policy: which process serves which get, when to spawn and stop.

:class:`Pool` is a plain class: no threads, no clock reads, no I/O. Each
event method takes ``now`` (seconds on a monotonic clock) and returns the
decisions the caller must carry out: :class:`Grant` a session,
:class:`Fail` a get, :class:`Spawn` or :class:`Stop` a process. The
:class:`~actorpool.registry.RegistryActor` owns one and applies what it
decides; tests drive one directly with a fake clock.

The rules (design section 5):

1. A process has room while its open sessions are below its concurrency.
2. A get reuses the most recently used process of its app that has room;
   else spawns within ``max_pool_size`` and ``max_per_app`` (processes being
   spawned count); else, when the pool is full, stops another app's idle
   process and spawns in its place; else waits in its app's queue.
3. Queues are FIFO per app. Freed capacity goes first to apps that have
   waiters and no process at all (even a process freed by its own app's
   waiters is stopped for them, else apps that always have a queue would
   keep every process), by the arrival of their oldest waiter; then to the
   app whose process freed it, then to the others by the arrival of their
   oldest waiter. A process that takes more than one session may never be
   idle while its app is busy, so for such an app one busy process of
   another app is drained: it takes no new session, and when its open ones
   close its slot goes to that app. ``max_queue_size`` counts the gets past
   those that spawns under way will serve.
4. A failed spawn fails every waiter of its app (unless the spawn was
   already retired by a restart: a fresh spawn serves them). A dead process
   is removed and its waiters are served by a new spawn.
5. Waiters time out; a client that goes away leaves every queue and
   releases its sessions.
6. Idle processes are reaped down to ``min_instances`` (retiring processes
   do not count: they are on their way out; nor do spawns in flight, which
   may fail); a process that has served ``max_requests`` sessions is
   retired.
7. After a limit is lowered below the busy processes, each one that becomes
   idle is stopped until the pool is back within its limits, before any
   waiter can take it.

One deliberate difference from the design text: when the pool is full, an
idle process of another app may be stopped even when that app is at its
``min_instances``. ``min_instances`` protects against idle reaping; if it
also blocked eviction, a full pool of idle single-process apps would make
every other app wait for ever. Processes of apps above ``min_instances`` are
evicted first, least recently used first.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from actorpool.config import PoolConfig
from actorpool.statistics import AppStatistics, PoolStatistics, ProcessStatistics

__all__ = [
    "Decision",
    "Fail",
    "Grant",
    "Pool",
    "Spawn",
    "Stop",
]


# --- decisions ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """Answer a get with a session on a process."""

    client_id: int
    """Whose get it was."""
    request_id: int
    """Which get."""
    session_id: int
    """The new session's id."""
    instance_id: int
    """The process serving it."""
    pid: int
    """The process's pid."""
    app_root: str
    """The process's app."""
    address: str
    """The process's socket path."""


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """Answer a get with an error."""

    client_id: int
    """Whose get it was."""
    request_id: int
    """Which get."""
    kind: str
    """The error class name: ``QueueFullError``, ``GetTimeoutError``, ``SpawnError``."""
    message: str
    """Human-readable text."""
    detail: str = ""
    """The app's output, for a ``SpawnError``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Spawn:
    """Start a process for an app."""

    instance_id: int
    """The number the new process will go by."""
    app_root: str
    """Its app."""


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """Stop a process (or cancel its spawn). The pool has already forgotten it."""

    instance_id: int
    """The process to stop."""
    reason: str
    """Why, for the log: ``idle``, ``evicted``, ``restart``, ``max-requests``..."""


Decision = Grant | Fail | Spawn | Stop


# --- state --------------------------------------------------------------------


class _State(enum.Enum):
    SPAWNING = "spawning"
    READY = "ready"


@dataclasses.dataclass(slots=True)
class _Instance:
    id: int
    app_root: str
    started_at: float
    last_used: float
    state: _State = _State.SPAWNING
    retiring: bool = False
    drained_for: str | None = None
    """The app with no process this one is retiring for (rule 3): it takes
    no new session, and its slot goes to that app. Undone if the app is
    served another way first."""
    pid: int = 0
    address: str = ""
    concurrency: int = 1
    sessions: int = 0
    processed: int = 0

    @property
    def draining(self) -> bool:
        return self.drained_for is not None

    @property
    def has_room(self) -> bool:
        return (
            self.state is _State.READY
            and not self.retiring
            and self.sessions < self.concurrency
        )

    @property
    def is_idle(self) -> bool:
        return self.state is _State.READY and not self.retiring and self.sessions == 0


@dataclasses.dataclass(slots=True)
class _Waiter:
    client_id: int
    request_id: int
    app_root: str
    deadline: float | None
    arrival: int


@dataclasses.dataclass(slots=True)
class _App:
    root: str
    instances: dict[int, _Instance] = dataclasses.field(default_factory=dict)
    waiters: deque[_Waiter] = dataclasses.field(default_factory=deque)
    free: dict[int, _Instance] = dataclasses.field(default_factory=dict)
    """The instances that can take a session, least recently used first:
    the pick for a get and the next to reap are at the two ends."""

    @property
    def live(self) -> int:
        """Processes that are or will be able to serve (not retiring)."""
        return sum(1 for i in self.instances.values() if not i.retiring)

    @property
    def serving(self) -> int:
        """Processes that serve now and stay (ready, not retiring): what
        ``min_instances`` keeps. A spawn in flight may still fail."""
        return sum(
            1
            for i in self.instances.values()
            if i.state is _State.READY and not i.retiring
        )

    def serves_more_than(self, count: int) -> bool:
        """Whether :attr:`serving` is above ``count``, counting no further
        than that: this runs after every message (see ``next_deadline``)."""
        for i in self.instances.values():
            if i.state is _State.READY and not i.retiring:
                count -= 1
                if count < 0:
                    return True
        return False

    @property
    def pending_spawns(self) -> int:
        """Spawns under way that will serve this app's waiters."""
        return sum(
            1
            for i in self.instances.values()
            if i.state is _State.SPAWNING and not i.retiring
        )


@dataclasses.dataclass(slots=True)
class _Session:
    instance_id: int
    client_id: int


class Pool:
    """The pool's state and rules, with no I/O and no clock of its own."""

    def __init__(self, config: PoolConfig) -> None:
        self.max_pool_size = config.max_pool_size
        self.max_per_app = config.max_per_app
        self.min_instances = config.min_instances
        self.max_idle_time = config.max_idle_time
        self.max_requests = config.max_requests
        self.max_queue_size = config.max_queue_size
        self._apps: dict[str, _App] = {}
        self._instances: dict[int, _Instance] = {}
        self._draining: dict[int, _Instance] = {}
        self._owed: set[str] = set()
        """Apps a drained process has stopped for, until they get a spawn."""
        self._sessions: dict[int, _Session] = {}
        self._instance_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._arrivals = itertools.count()

    def __repr__(self) -> str:
        return (
            f"<Pool count={self.count}/{self.max_pool_size} active={self.active} "
            f"waiting={self.waiting} apps={len(self._apps)}>"
        )

    # --- queries ----------------------------------------------------------

    @property
    def count(self) -> int:
        """Processes alive or being spawned."""
        return len(self._instances)

    @property
    def active(self) -> int:
        """Sessions open."""
        return len(self._sessions)

    @property
    def waiting(self) -> int:
        """Gets queued, over every app."""
        return sum(len(app.waiters) for app in self._apps.values())

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do, or ``None``."""
        # Runs after every message the registry handles: one pass, no lists.
        earliest: float | None = None
        for app in self._apps.values():
            for w in app.waiters:
                if w.deadline is not None and (
                    earliest is None or w.deadline < earliest
                ):
                    earliest = w.deadline
            if self.max_idle_time <= 0:
                continue
            # ``free`` is in order of last use: the first idle one is the
            # oldest (with one session per process, the very first).
            oldest = None
            for instance in app.free.values():
                if instance.sessions == 0:
                    oldest = instance
                    break
            # With min_instances 0 no count is needed.
            if oldest is not None and (
                not self.min_instances or app.serves_more_than(self.min_instances)
            ):
                due = oldest.last_used + self.max_idle_time
                if earliest is None or due < earliest:
                    earliest = due
        return earliest

    def statistics(self, now: float, *, clients: int = 0) -> PoolStatistics:
        """A frozen snapshot of the pool at ``now``."""
        apps = tuple(
            AppStatistics(
                app_root=app.root,
                count=len(app.instances),
                active=sum(i.sessions for i in app.instances.values()),
                waiting=len(app.waiters),
                processes=tuple(
                    ProcessStatistics(
                        instance_id=i.id,
                        pid=i.pid,
                        state="retiring" if i.retiring else i.state.value,
                        sessions=i.sessions,
                        concurrency=i.concurrency,
                        processed=i.processed,
                        uptime=max(0.0, now - i.started_at),
                        idle=max(0.0, now - i.last_used),
                    )
                    for i in app.instances.values()
                ),
            )
            for app in self._apps.values()
        )
        return PoolStatistics(
            max_pool_size=self.max_pool_size,
            max_per_app=self.max_per_app,
            count=self.count,
            active=self.active,
            waiting=self.waiting,
            clients=clients,
            apps=apps,
        )

    # --- events from clients ----------------------------------------------

    def get(
        self,
        client_id: int,
        request_id: int,
        app_root: str,
        now: float,
        timeout: float | None = None,
    ) -> list[Decision]:
        """A client asks for a session on ``app_root``."""
        app = self._app(app_root)
        if self.max_queue_size and len(app.waiters) >= self.max_queue_size:
            # Only gets that no spawn under way will serve count: the first
            # gets of an app wait for its spawns, and turning away a get
            # that could have a spawn of its own would be wrong. Waiters
            # past those spawns mean no process has room and no spawn can
            # start (dispatch never leaves either), so this get would queue
            # behind them.
            queued = len(app.waiters) - app.pending_spawns
            if queued >= self.max_queue_size:
                return [
                    Fail(
                        client_id,
                        request_id,
                        "QueueFullError",
                        f"{queued} requests already wait for {app_root}",
                    )
                ]
        deadline = None if timeout is None else now + max(0.0, timeout)
        waiter = _Waiter(
            client_id, request_id, app_root, deadline, next(self._arrivals)
        )
        if not self._anyone_waits():
            # The common case, answered without the full dispatch: with no
            # one queued anywhere no app wants a spawn (which could evict),
            # so dispatching would hand this get the same process.
            instance = self._most_recent_with_room(app)
            if instance is not None:
                return [self._grant(waiter, instance, now)]
        app.waiters.append(waiter)
        decisions: list[Decision] = []
        self._dispatch(now, decisions)
        if deadline is not None and deadline <= now:
            self._expire_waiters(now, decisions)
            if self._draining:  # a drain made for this get only
                self._balance_drains(now, decisions)
            self._forget_empty_apps()
        return decisions

    def close_session(
        self, client_id: int, session_id: int, now: float
    ) -> list[Decision]:
        """A client is done with a session. Others' sessions are left alone."""
        session = self._sessions.get(session_id)
        if session is None or session.client_id != client_id:
            return []
        decisions: list[Decision] = []
        freed_app = self._release(session_id, now, decisions)
        self._dispatch(now, decisions, freed_app)
        return decisions

    def session_failed(
        self, client_id: int, session_id: int, now: float
    ) -> list[Decision]:
        """A client could not connect to its session's process: it is dead."""
        session = self._sessions.get(session_id)
        if session is None or session.client_id != client_id:
            return []
        del self._sessions[session_id]
        decisions: list[Decision] = []
        instance = self._instances.get(session.instance_id)
        freed_app = None
        if instance is not None:
            self._remove(instance, "unreachable", decisions)
            freed_app = instance.app_root
        self._dispatch(now, decisions, freed_app)
        return decisions

    def client_gone(self, client_id: int, now: float) -> list[Decision]:
        """A client disconnected: drop its waiters, release its sessions."""
        for app in self._apps.values():
            if any(w.client_id == client_id for w in app.waiters):
                app.waiters = deque(w for w in app.waiters if w.client_id != client_id)
        decisions: list[Decision] = []
        if self._draining:
            # Before the sessions end: a drain made for this client's
            # waiters alone would stop its process once they have.
            self._balance_drains(now, decisions)
        freed_app = None
        for session_id in [
            sid for sid, s in self._sessions.items() if s.client_id == client_id
        ]:
            freed_app = self._release(session_id, now, decisions) or freed_app
        self._forget_empty_apps()
        # As for a close: the freed capacity goes to its own app first.
        self._dispatch(now, decisions, freed_app)
        return decisions

    # --- events from the spawner ------------------------------------------

    def instance_ready(
        self, instance_id: int, pid: int, address: str, concurrency: int, now: float
    ) -> list[Decision]:
        """A spawn finished and the process accepts sessions."""
        instance = self._instances.get(instance_id)
        if instance is None:
            # Stopped while it was being spawned; make sure it goes away.
            return [Stop(instance_id, "cancelled")]
        if instance.state is not _State.SPAWNING:
            return []  # a repeated notice: it is already serving
        instance.state = _State.READY
        instance.pid = pid
        instance.address = address
        instance.concurrency = max(1, concurrency)
        instance.last_used = now
        decisions: list[Decision] = []
        if instance.retiring:  # its app restarted while it was starting
            self._remove(instance, "restart", decisions)
        else:
            self._refresh_room(instance)
            # The waiters it was spawned for come first: an app with no
            # process must not take a process that has never served.
            self._serve_from_room(now, decisions)
        self._dispatch(now, decisions, freed_app=instance.app_root)
        return decisions

    def spawn_failed(
        self, instance_id: int, message: str, detail: str, now: float
    ) -> list[Decision]:
        """A spawn failed: every waiter of its app gets the error."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return []
        decisions: list[Decision] = []
        app = self._apps[instance.app_root]
        self._remove(instance, "spawn-failed", decisions, stop=False)
        if instance.retiring:
            # A restart retired it (often to fix the very error it hit): the
            # waiters are the business of the spawn that replaced it.
            self._dispatch(now, decisions, freed_app=app.root)
            return decisions
        for waiter in app.waiters:
            decisions.append(
                Fail(waiter.client_id, waiter.request_id, "SpawnError", message, detail)
            )
        app.waiters.clear()
        self._forget_empty_apps()
        self._dispatch(now, decisions)
        return decisions

    def instance_exited(self, instance_id: int, now: float) -> list[Decision]:
        """A process exited; its sessions end and its slot is free."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return []
        decisions: list[Decision] = []
        self._remove(instance, "exited", decisions, stop=False)
        self._dispatch(now, decisions, freed_app=instance.app_root)
        return decisions

    # --- events from the clock and the administrator ------------------------

    def tick(self, now: float) -> list[Decision]:
        """Time passed: time out waiters, reap idle processes."""
        decisions: list[Decision] = []
        self._expire_waiters(now, decisions)
        if self.max_idle_time > 0:
            for app in list(self._apps.values()):
                idle = sorted(
                    (i for i in app.instances.values() if i.is_idle),
                    key=lambda i: i.last_used,
                )
                for instance in idle:
                    if app.serving <= self.min_instances:
                        break
                    # Computed as next_deadline() does, so that a tick at
                    # that deadline reaps (now - last_used may round below).
                    if instance.last_used + self.max_idle_time > now:
                        break
                    self._remove(instance, "idle", decisions)
        self._forget_empty_apps()
        self._dispatch(now, decisions)
        return decisions

    def restart_app(self, app_root: str, now: float) -> list[Decision]:
        """Retire every process of ``app_root``; busy ones finish first."""
        decisions: list[Decision] = []
        app = self._apps.get(app_root)
        if app is not None:
            self._retire(app.instances.values(), "restart", decisions)
            self._dispatch(now, decisions)
        return decisions

    def clear(self, now: float) -> list[Decision]:
        """Retire every process of every app; busy ones finish first."""
        decisions: list[Decision] = []
        self._retire(list(self._instances.values()), "clear", decisions)
        self._dispatch(now, decisions)
        return decisions

    def set_max_pool_size(self, value: int, now: float) -> list[Decision]:
        """Change ``max_pool_size``: stop idle processes over it, serve waiters.

        Busy processes over a lowered limit finish their sessions first, and
        are stopped when they become idle (see ``_trim``).
        """
        self.max_pool_size = value
        decisions: list[Decision] = []
        self._dispatch(now, decisions)
        return decisions

    def set_max_per_app(self, value: int, now: float) -> list[Decision]:
        """Change ``max_per_app``: stop idle processes over it, serve waiters."""
        self.max_per_app = value
        decisions: list[Decision] = []
        self._dispatch(now, decisions)
        return decisions

    def set_max_idle_time(self, value: float, now: float) -> list[Decision]:
        """Change ``max_idle_time``; the next tick reaps with it."""
        self.max_idle_time = value
        return self.tick(now)

    # --- internals ----------------------------------------------------------

    def _app(self, app_root: str) -> _App:
        app = self._apps.get(app_root)
        if app is None:
            app = self._apps[app_root] = _App(app_root)
        return app

    def _forget_empty_apps(self) -> None:
        empty = [r for r, a in self._apps.items() if not a.instances and not a.waiters]
        for root in empty:
            del self._apps[root]
            self._owed.discard(root)

    def _release(
        self, session_id: int, now: float, decisions: list[Decision]
    ) -> str | None:
        """End a session; return the app whose process it freed, if any."""
        session = self._sessions.pop(session_id)
        instance = self._instances.get(session.instance_id)
        if instance is None:
            return None
        instance.sessions -= 1
        instance.last_used = now
        if instance.retiring and instance.sessions == 0:
            if self._used_up(instance):
                reason = "max-requests"
            elif instance.draining:
                reason = "evicted"
            else:
                reason = "retired"
            self._remove(instance, reason, decisions)
        else:
            self._refresh_room(instance)
        return instance.app_root

    def _used_up(self, instance: _Instance) -> bool:
        return 0 < self.max_requests <= instance.processed

    def _retire(
        self, instances: Iterable[_Instance], reason: str, decisions: list[Decision]
    ) -> None:
        for instance in list(instances):
            if instance.is_idle:
                self._remove(instance, reason, decisions)
            else:
                instance.retiring = True
                # Retired for good now: no longer a drain to be undone.
                instance.drained_for = None
                self._draining.pop(instance.id, None)
                self._refresh_room(instance)

    def _remove(
        self,
        instance: _Instance,
        reason: str,
        decisions: list[Decision],
        *,
        stop: bool = True,
    ) -> None:
        del self._instances[instance.id]
        app = self._apps[instance.app_root]
        del app.instances[instance.id]
        app.free.pop(instance.id, None)
        if self._draining.pop(instance.id, None) is not None:
            assert instance.drained_for is not None
            self._owed.add(instance.drained_for)
        if instance.sessions:
            # Its sessions end with it; a later close of one is a no-op.
            for sid in [
                sid for sid, s in self._sessions.items() if s.instance_id == instance.id
            ]:
                del self._sessions[sid]
        if stop:
            decisions.append(Stop(instance.id, reason))

    def _grant(self, waiter: _Waiter, instance: _Instance, now: float) -> Grant:
        session_id = next(self._session_ids)
        self._sessions[session_id] = _Session(instance.id, waiter.client_id)
        instance.sessions += 1
        instance.processed += 1
        instance.last_used = now
        if self._used_up(instance):
            instance.retiring = True
        self._refresh_room(instance)
        return Grant(
            waiter.client_id,
            waiter.request_id,
            session_id,
            instance.id,
            instance.pid,
            instance.app_root,
            instance.address,
        )

    def _expire_waiters(self, now: float, decisions: list[Decision]) -> None:
        for app in self._apps.values():
            expired = [
                w for w in app.waiters if w.deadline is not None and w.deadline <= now
            ]
            if not expired:
                continue
            gone = {id(w) for w in expired}
            app.waiters = deque(w for w in app.waiters if id(w) not in gone)
            decisions.extend(
                Fail(
                    w.client_id,
                    w.request_id,
                    "GetTimeoutError",
                    f"no process of {w.app_root} became free in time",
                )
                for w in expired
            )

    def _dispatch(
        self, now: float, decisions: list[Decision], freed_app: str | None = None
    ) -> None:
        """Hand capacity to waiters until nothing more can be done."""
        if not self._anyone_waits():
            # Nothing to hand out: of the steps below only these can act.
            self._trim(decisions)
            if self._draining or self._owed:
                self._balance_drains(now, decisions)
            self._forget_empty_apps()
            return
        # A process over a lowered limit that has just become idle is
        # stopped before a waiter can take it (rule 7): under a steady queue
        # it would never be idle again.
        self._trim(decisions)
        # Apps with no process at all come first (the sort puts them at the
        # front), even before the waiters of a process that has just freed
        # up: that process may be evicted for them (rule 3).
        for app in self._apps_wanting_spawns(freed_app):
            if app.live or not self._spawn_for(app, now, decisions):
                break
        self._serve_from_room(now, decisions)
        self._spawn_for_waiters(now, decisions, freed_app)
        self._balance_drains(now, decisions)
        self._forget_empty_apps()

    def _spawn_for_waiters(
        self, now: float, decisions: list[Decision], freed_app: str | None
    ) -> None:
        for app in self._apps_wanting_spawns(freed_app):
            while self._wants_spawn(app):
                if not self._spawn_for(app, now, decisions):
                    return  # nothing idle is left to evict, for any app

    def _balance_drains(self, now: float, decisions: list[Decision]) -> None:
        """Drain busy processes for apps that have no process (rule 3).

        Called at the end of a dispatch, after the spawns, so an app still
        waiting with no process found the pool full and nothing idle to
        evict; and where waiters leave without one (an expired get, a
        client gone), to undo drains made for them. A process with
        concurrency 1 becomes idle at its close, which evicts it for such
        an app; one with more can keep taking sessions and never be idle.
        Slots on their way (a retiring process, a busy one with concurrency
        1) go to the apps that have waited longest; each app after those
        gets a busy process of another app drained for it: it takes no new
        session and, once its open ones close, its slot is that app's. A
        drain no longer needed (its app was served another way, or left)
        is undone.
        """
        starving = [
            app
            for app in self._apps.values()
            if app.waiters
            and not app.live
            and self._wants_spawn(app)
            # An app whose own process drains was a victim: counting it
            # would drain another app's process for it, and so on down the
            # pool. It waits in turn like any app with no process.
            and not any(i.draining for i in app.instances.values())
        ]
        if self._owed:
            # Owed a slot only while it waits with no process: a stale
            # entry would later put it ahead of older waiters.
            self._owed = {
                root
                for root in self._owed
                if (app := self._apps.get(root)) is not None
                and app.waiters
                and not app.live
            }
        if not starving and not self._draining:
            return
        coming = sum(
            1
            for instance in self._instances.values()
            if not instance.draining
            and (
                instance.retiring
                or (instance.state is _State.READY and instance.concurrency == 1)
            )
            and instance.sessions
        )
        starving.sort(key=lambda app: app.waiters[0].arrival)
        needing = [app.root for app in starving[coming:]]
        undone = False
        for instance in list(self._draining.values()):
            if instance.drained_for not in needing:
                del self._draining[instance.id]
                instance.drained_for = None
                instance.retiring = False
                self._refresh_room(instance)
                undone = True
        if undone:
            self._serve_from_room(now, decisions)
        targeted = {i.drained_for for i in self._draining.values()}
        for root in needing:
            if root in targeted:
                continue
            victim = self._drain_victim()
            if victim is None:
                return
            victim.drained_for = root
            victim.retiring = True
            self._draining[victim.id] = victim
            self._refresh_room(victim)

    def _drain_victim(self) -> _Instance | None:
        """The busy process with concurrency above 1 that is best drained.

        Preferred: one whose app keeps other processes, then one whose app
        nobody waits for, then the one with the fewest sessions (it frees
        its slot soonest), then the least recently used.
        """
        candidates = [
            i
            for i in self._instances.values()
            if i.state is _State.READY
            and not i.retiring
            and i.concurrency > 1
            and i.sessions
        ]
        if not candidates:
            return None

        def cost(instance: _Instance) -> tuple[bool, bool, int, float]:
            owner = self._apps[instance.app_root]
            return (
                owner.live <= 1,
                bool(owner.waiters),
                instance.sessions,
                instance.last_used,
            )

        return min(candidates, key=cost)

    def _spawn_for(self, app: _App, now: float, decisions: list[Decision]) -> bool:
        """Spawn a process for ``app``, evicting to make room; False if full."""
        while self.count >= self.max_pool_size:
            if not self._evict_for(app, decisions):
                return False
        instance = _Instance(next(self._instance_ids), app.root, now, now)
        self._instances[instance.id] = instance
        app.instances[instance.id] = instance
        self._owed.discard(app.root)
        decisions.append(Spawn(instance.id, app.root))
        return True

    def _trim(self, decisions: list[Decision]) -> None:
        """Stop idle processes over a limit that was lowered, oldest first."""
        # The common case, no limit exceeded, must stay cheap: this runs on
        # every get and close.
        over_pool = self.count > self.max_pool_size
        if not over_pool and not (
            self.max_per_app
            and any(len(a.instances) > self.max_per_app for a in self._apps.values())
        ):
            return
        for instance in self._idle_by_age(self._instances.values()):
            app = self._apps[instance.app_root]
            over_app = 0 < self.max_per_app < len(app.instances)
            if self.count > self.max_pool_size or over_app:
                self._remove(instance, "limit", decisions)

    def _serve_from_room(self, now: float, decisions: list[Decision]) -> None:
        for app in self._apps.values():
            while app.waiters:
                instance = self._most_recent_with_room(app)
                if instance is None:
                    break
                decisions.append(self._grant(app.waiters.popleft(), instance, now))

    def _anyone_waits(self) -> bool:
        return any(app.waiters for app in self._apps.values())

    @staticmethod
    def _most_recent_with_room(app: _App) -> _Instance | None:
        """The process of ``app`` that can take a session and was used last."""
        # Most recently used first: its memory is the likeliest to be warm,
        # and the others stay idle long enough to be reaped.
        return next(reversed(app.free.values()), None)

    def _refresh_room(self, instance: _Instance) -> None:
        """Keep ``free`` true after ``instance`` changed; it goes to the end."""
        app = self._apps[instance.app_root]
        app.free.pop(instance.id, None)
        if not instance.has_room:
            return
        last = next(reversed(app.free.values()), None)
        app.free[instance.id] = instance
        if last is not None and last.last_used > instance.last_used:
            # ``now`` went back (only a caller's own clock can do that):
            # put the order right again.
            app.free = dict(
                sorted(app.free.items(), key=lambda item: item[1].last_used)
            )

    def _wants_spawn(self, app: _App) -> bool:
        if not app.waiters or len(app.waiters) <= app.pending_spawns:
            return False
        return not self.max_per_app or len(app.instances) < self.max_per_app

    def _apps_wanting_spawns(self, freed_app: str | None) -> list[_App]:
        wanting = [a for a in self._apps.values() if self._wants_spawn(a)]

        # Apps with no process at all first (no app starves; retiring ones
        # will never serve them): one a drained process stopped for, then
        # by the arrival of their oldest waiter. A process freed by an app
        # that has none left does not make its own app first: a retired
        # one would win its slot back, and an app that waited with no
        # process would wait for as long as the other's processes retire.
        # Then the app whose capacity was freed, then by oldest waiter.
        def order(a: _App) -> tuple[bool, bool, int]:
            if a.live:
                return (True, a.root != freed_app, a.waiters[0].arrival)
            return (False, a.root not in self._owed, a.waiters[0].arrival)

        wanting.sort(key=order)
        return wanting

    def _evict_for(self, app: _App, decisions: list[Decision]) -> bool:
        """Stop another app's idle process to make room for ``app``; True if done.

        The victim is the least recently used, preferring apps that nobody
        waits for, then apps above ``min_instances``.
        """
        candidates = [
            i
            for other in self._apps.values()
            if other is not app
            for i in other.instances.values()
            if i.is_idle
        ]
        if not candidates:
            return False

        def cost(instance: _Instance) -> tuple[bool, bool, float]:
            owner = self._apps[instance.app_root]
            at_min = owner.serving <= self.min_instances
            return (bool(owner.waiters), at_min, instance.last_used)

        victim = min(candidates, key=cost)
        self._remove(victim, "evicted", decisions)
        return True

    @staticmethod
    def _idle_by_age(instances: Iterable[_Instance]) -> Iterator[_Instance]:
        yield from sorted(
            (i for i in instances if i.is_idle), key=lambda i: i.last_used
        )
