"""Unit tests of the pure pool policy, driven with explicit ``now`` values."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from actorpool.config import PoolConfig
from actorpool.pool import Decision, Fail, Grant, Pool, Spawn, Stop

A = "/srv/a"
B = "/srv/b"
C = "/srv/c"

D = TypeVar("D", Grant, Fail, Spawn, Stop)


def make_pool(**config: Any) -> Pool:
    return Pool(PoolConfig(**config))


def only(decisions: Sequence[Decision], kind: type[D]) -> list[D]:
    return [d for d in decisions if isinstance(d, kind)]


def one(decisions: Sequence[Decision], kind: type[D]) -> D:
    found = only(decisions, kind)
    assert len(found) == 1, decisions
    return found[0]


def ready(
    pool: Pool, spawn: Spawn | int, now: float, concurrency: int = 1
) -> list[Decision]:
    """Report a spawn as finished, with a pid and address derived from its id."""
    iid = spawn if isinstance(spawn, int) else spawn.instance_id
    return pool.instance_ready(iid, 1000 + iid, f"/run/{iid}.sock", concurrency, now)


_requests = itertools.count(1)


def checkout(
    pool: Pool, app: str, now: float, client: int = 1, concurrency: int = 1
) -> Grant:
    """Get a session on ``app``, finishing the spawn it needs at once."""
    decisions = pool.get(client, next(_requests), app, now)
    spawns = only(decisions, Spawn)
    for spawn in spawns:
        decisions += ready(pool, spawn, now, concurrency)
    return one(decisions, Grant)


def idle_process(pool: Pool, app: str, now: float, client: int = 1) -> int:
    """Start a process of ``app``, use it once at ``now`` and leave it idle."""
    grant = checkout(pool, app, now, client)
    assert pool.close_session(client, grant.session_id, now) == []
    return grant.instance_id


def states(pool: Pool, app: str, now: float = 0.0) -> dict[int, str]:
    stats = pool.statistics(now).app(app)
    assert stats is not None
    return {p.instance_id: p.state for p in stats.processes}


# --- the first get, reuse and spawning ------------------------------------------------


def test_first_get_spawns_and_queues_until_ready() -> None:
    pool = make_pool()
    decisions = pool.get(7, 70, A, now=1.0)
    assert decisions == [Spawn(1, A)]
    assert (pool.count, pool.active, pool.waiting) == (1, 0, 1)

    decisions = pool.instance_ready(1, 4242, "/run/1.sock", 1, now=2.0)
    assert decisions == [Grant(7, 70, 1, 1, 4242, A, "/run/1.sock")]
    assert (pool.count, pool.active, pool.waiting) == (1, 1, 0)


def test_a_free_process_is_reused_without_spawning() -> None:
    pool = make_pool()
    instance = idle_process(pool, A, now=1.0)
    decisions = pool.get(1, 2, A, now=2.0)
    assert only(decisions, Spawn) == []
    assert one(decisions, Grant).instance_id == instance
    assert pool.count == 1


def test_reuse_prefers_the_most_recently_used_process() -> None:
    pool = make_pool(max_pool_size=3)
    first = checkout(pool, A, now=1.0)
    second = checkout(pool, A, now=1.0)
    third = checkout(pool, A, now=1.0)
    pool.close_session(1, second.session_id, now=5.0)
    pool.close_session(1, first.session_id, now=7.0)
    pool.close_session(1, third.session_id, now=6.0)
    grants = [one(pool.get(1, r, A, now=8.0), Grant) for r in (10, 11, 12)]
    assert [g.instance_id for g in grants] == [
        first.instance_id,
        third.instance_id,
        second.instance_id,
    ]


def test_a_busy_process_makes_the_next_get_spawn() -> None:
    pool = make_pool(max_pool_size=2)
    checkout(pool, A, now=1.0)
    assert pool.get(1, 2, A, now=2.0) == [Spawn(2, A)]


def test_spawns_in_flight_count_against_max_pool_size() -> None:
    pool = make_pool(max_pool_size=2)
    assert only(pool.get(1, 1, A, now=0.0), Spawn) != []
    assert only(pool.get(1, 2, B, now=0.0), Spawn) != []
    assert pool.get(1, 3, C, now=0.0) == []  # full of spawns, nothing to evict
    assert (pool.count, pool.waiting) == (2, 3)


def test_each_waiter_gets_its_own_spawn() -> None:
    pool = make_pool(max_pool_size=6)
    for r in range(3):
        pool.get(1, r, A, now=0.0)
    assert pool.count == 3  # one spawn per waiter
    pool.get(1, 9, A, now=0.0)
    assert pool.count == 4


def test_max_per_app_caps_one_app_but_not_the_others() -> None:
    pool = make_pool(max_pool_size=4, max_per_app=1)
    checkout(pool, A, now=0.0)
    assert pool.get(1, 2, A, now=1.0) == []  # queued behind the busy one
    assert only(pool.get(1, 3, B, now=1.0), Spawn) == [Spawn(2, B)]


def test_max_per_app_counts_spawns_in_flight() -> None:
    pool = make_pool(max_pool_size=4, max_per_app=2)
    decisions = [d for r in range(4) for d in pool.get(1, r, A, now=0.0)]
    assert len(only(decisions, Spawn)) == 2
    assert pool.waiting == 4


# --- eviction when the pool is full ---------------------------------------------------


def test_full_pool_evicts_the_least_recently_used_idle_process() -> None:
    pool = make_pool(max_pool_size=2)
    a = idle_process(pool, A, now=1.0)
    idle_process(pool, B, now=2.0)
    decisions = pool.get(1, 9, C, now=3.0)
    assert decisions == [Stop(a, "evicted"), Spawn(3, C)]
    assert pool.statistics(3.0).app(A) is None  # forgotten with its last process


def test_eviction_prefers_apps_above_min_instances() -> None:
    pool = make_pool(max_pool_size=3, min_instances=1)
    b = idle_process(pool, B, now=0.0)  # the oldest, but B's only process
    first = checkout(pool, A, now=1.0)
    second = checkout(pool, A, now=1.0)
    pool.close_session(1, first.session_id, now=2.0)
    pool.close_session(1, second.session_id, now=3.0)
    decisions = pool.get(1, 9, C, now=4.0)
    assert only(decisions, Stop) == [Stop(first.instance_id, "evicted")]
    assert b in states(pool, B)


def test_eviction_still_takes_an_app_at_min_instances_so_nothing_starves() -> None:
    # The documented deviation: min_instances only protects from idle reaping.
    pool = make_pool(max_pool_size=1, min_instances=1)
    a = idle_process(pool, A, now=0.0)
    assert pool.get(1, 9, B, now=1.0) == [Stop(a, "evicted"), Spawn(2, B)]


def test_eviction_spares_a_freed_process_its_own_app_waits_for() -> None:
    pool = make_pool(max_pool_size=2)
    a = checkout(pool, A, now=0.0, client=1)
    c = checkout(pool, C, now=0.0, client=1)
    pool.get(2, 11, A, now=1.0)  # A's waiter wants A's process back
    pool.get(2, 12, B, now=2.0)  # B has nothing
    decisions = pool.client_gone(1, now=3.0)
    assert only(decisions, Stop) == [Stop(c.instance_id, "evicted")]
    assert one(decisions, Spawn).app_root == B
    assert one(decisions, Grant).instance_id == a.instance_id


def test_busy_processes_are_never_evicted() -> None:
    pool = make_pool(max_pool_size=2)
    checkout(pool, A, now=0.0)
    checkout(pool, B, now=0.0)
    assert pool.get(1, 9, C, now=1.0) == []
    assert pool.waiting == 1


def test_spawning_processes_are_never_evicted() -> None:
    pool = make_pool(max_pool_size=1)
    pool.get(1, 1, A, now=0.0)
    assert pool.get(1, 2, B, now=1.0) == []
    assert states(pool, A) == {1: "spawning"}


# --- queueing, FIFO and fairness ------------------------------------------------------


def test_waiters_of_an_app_are_served_in_arrival_order() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0)
    for r in (101, 102, 103):
        assert pool.get(r, r, A, now=1.0) == []
    served = []
    session = held.session_id
    client = 1
    for t in (2.0, 3.0, 4.0):
        grant = one(pool.close_session(client, session, now=t), Grant)
        served.append(grant.request_id)
        client, session = grant.client_id, grant.session_id
    assert served == [101, 102, 103]


def test_freed_capacity_goes_first_to_an_app_with_no_process() -> None:
    pool = make_pool(max_pool_size=1)
    a = checkout(pool, A, now=0.0)
    pool.get(1, 11, A, now=1.0)  # A waits for its own busy process
    pool.get(1, 12, B, now=2.0)  # B has no process at all
    decisions = pool.close_session(1, a.session_id, now=3.0)
    assert decisions == [Stop(a.instance_id, "evicted"), Spawn(2, B)]
    b = one(ready(pool, 2, now=4.0), Grant)
    assert b.request_id == 12
    # Now A has no process: B's freed process goes to A in turn.
    decisions = pool.close_session(1, b.session_id, now=5.0)
    assert decisions == [Stop(2, "evicted"), Spawn(3, A)]
    assert one(ready(pool, 3, now=6.0), Grant).request_id == 11


def test_a_freed_slot_goes_to_an_app_with_no_process_first() -> None:
    pool = make_pool(max_pool_size=2)
    a1 = checkout(pool, A, now=0.0)
    checkout(pool, A, now=0.0)
    pool.get(1, 11, A, now=1.0)
    pool.get(1, 12, B, now=2.0)
    decisions = pool.instance_exited(a1.instance_id, now=3.0)
    assert decisions == [Spawn(3, B)]


def test_a_freed_slot_goes_to_the_freed_app_before_older_waiters() -> None:
    pool = make_pool(max_pool_size=3)
    a1 = checkout(pool, A, now=0.0)
    checkout(pool, A, now=0.0)
    checkout(pool, C, now=0.0)
    pool.get(1, 11, C, now=1.0)  # C's waiter is older
    pool.get(1, 12, A, now=2.0)
    decisions = pool.instance_exited(a1.instance_id, now=3.0)
    assert decisions == [Spawn(4, A)]


def test_a_freed_slot_goes_to_other_apps_by_arrival() -> None:
    pool = make_pool(max_pool_size=3)
    checkout(pool, A, now=0.0)
    checkout(pool, B, now=0.0)
    c = checkout(pool, C, now=0.0)
    pool.get(1, 11, B, now=1.0)
    pool.get(1, 12, A, now=2.0)
    decisions = pool.instance_exited(c.instance_id, now=3.0)
    assert decisions == [Spawn(4, B)]


def test_a_retired_process_freeing_its_slot_serves_its_own_app_first() -> None:
    pool = make_pool(max_pool_size=3, max_requests=2)
    a1 = checkout(pool, A, now=0.0)
    pool.close_session(1, a1.session_id, now=0.0)
    a1 = one(pool.get(1, 1, A, now=0.0), Grant)  # its second session: retiring
    checkout(pool, A, now=0.0)
    checkout(pool, C, now=0.0)
    pool.get(1, 11, C, now=1.0)  # the older waiter, of another app
    pool.get(1, 12, A, now=2.0)
    decisions = pool.close_session(1, a1.session_id, now=3.0)
    assert decisions == [Stop(a1.instance_id, "max-requests"), Spawn(4, A)]


# --- the queue limit ------------------------------------------------------------------


def test_a_full_queue_fails_the_get_at_once() -> None:
    pool = make_pool(max_pool_size=1, max_queue_size=2)
    checkout(pool, A, now=0.0)
    assert pool.get(1, 1, A, now=1.0) == []
    assert pool.get(1, 2, A, now=1.0) == []
    fail = one(pool.get(1, 3, A, now=1.0), Fail)
    assert (fail.client_id, fail.request_id, fail.kind) == (1, 3, "QueueFullError")
    assert pool.waiting == 2
    # Another app's queue is separate.
    assert pool.get(1, 4, B, now=1.0) == []
    assert pool.waiting == 3


def test_gets_that_wait_for_their_own_spawns_do_not_fill_the_queue() -> None:
    pool = make_pool(max_pool_size=4, max_queue_size=1)
    assert pool.get(1, 1, A, now=0.0) == [Spawn(1, A)]
    # The first get waits for that spawn, and this one can have its own.
    assert pool.get(1, 2, A, now=0.0) == [Spawn(2, A)]
    assert pool.waiting == 2


def test_the_queue_limit_counts_gets_past_the_spawns_under_way() -> None:
    pool = make_pool(max_pool_size=4, max_per_app=1, max_queue_size=1)
    assert pool.get(1, 1, A, now=0.0) == [Spawn(1, A)]
    assert pool.get(1, 2, A, now=0.0) == []  # no spawn of its own: it queues
    fail = one(pool.get(1, 3, A, now=0.0), Fail)
    assert (fail.request_id, fail.kind) == (3, "QueueFullError")
    assert fail.message == f"1 requests already wait for {A}"
    grants = only(ready(pool, 1, now=1.0, concurrency=2), Grant)
    assert [g.request_id for g in grants] == [1, 2]


def test_max_queue_size_zero_means_unbounded() -> None:
    pool = make_pool(max_pool_size=1, max_queue_size=0)
    checkout(pool, A, now=0.0)
    for r in range(500):
        assert pool.get(1, r, A, now=1.0) == []
    assert pool.waiting == 500


# --- get timeouts ---------------------------------------------------------------------


def test_a_waiter_times_out_on_tick() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0)
    assert pool.get(1, 5, A, now=10.0, timeout=2.5) == []
    assert pool.next_deadline() == 12.5
    assert pool.tick(12.4) == []
    fail = one(pool.tick(12.5), Fail)
    assert (fail.request_id, fail.kind) == (5, "GetTimeoutError")
    assert pool.waiting == 0
    assert pool.next_deadline() is None
    # Capacity freed later is not given to it.
    assert pool.close_session(1, held.session_id, now=13.0) == []


def test_a_timed_out_waiter_leaves_the_others_in_order() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=1.0)
    pool.get(1, 2, A, now=1.0, timeout=1.0)
    pool.get(1, 3, A, now=1.0)
    assert one(pool.tick(2.0), Fail).request_id == 2
    grant = one(pool.close_session(1, held.session_id, now=3.0), Grant)
    assert grant.request_id == 1
    assert one(pool.close_session(1, grant.session_id, now=4.0), Grant).request_id == 3


def test_timeout_zero_fails_at_once_when_nothing_is_free() -> None:
    pool = make_pool(max_pool_size=1)
    checkout(pool, A, now=0.0)
    fail = one(pool.get(1, 9, A, now=1.0, timeout=0), Fail)
    assert (fail.request_id, fail.kind) == (9, "GetTimeoutError")
    assert pool.waiting == 0


def test_timeout_zero_is_granted_when_a_process_is_free() -> None:
    pool = make_pool()
    idle_process(pool, A, now=0.0)
    assert one(pool.get(1, 9, A, now=1.0, timeout=0), Grant).request_id == 9


def test_a_timed_out_get_leaves_no_empty_app_behind() -> None:
    pool = make_pool(max_pool_size=1)
    checkout(pool, A, now=0.0)
    one(pool.get(1, 9, B, now=1.0, timeout=0), Fail)
    assert [app.app_root for app in pool.statistics(1.0).apps] == [A]


# --- spawn failure, dead processes ----------------------------------------------------


def test_a_spawn_failure_fails_every_waiter_of_that_app_only() -> None:
    pool = make_pool(max_pool_size=4)
    a = checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=1.0)
    pool.get(2, 2, A, now=1.0)
    spawn_b = one(pool.get(3, 3, B, now=1.0), Spawn)
    spawn_a = 2
    decisions = pool.spawn_failed(spawn_a, "boom", "Traceback...", now=2.0)
    fails = only(decisions, Fail)
    assert {(f.client_id, f.request_id) for f in fails} == {(1, 1), (2, 2)}
    assert {(f.kind, f.message, f.detail) for f in fails} == {
        ("SpawnError", "boom", "Traceback...")
    }
    assert only(decisions, Stop) == []  # the app's other process is left alone
    assert a.instance_id in states(pool, A)
    assert one(ready(pool, spawn_b, now=3.0), Grant).request_id == 3


def test_a_spawn_failure_frees_its_slot_for_other_apps() -> None:
    pool = make_pool(max_pool_size=1)
    pool.get(1, 1, A, now=0.0)
    pool.get(1, 2, B, now=0.0)
    decisions = pool.spawn_failed(1, "boom", "", now=1.0)
    assert one(decisions, Fail).request_id == 1
    assert one(decisions, Spawn) == Spawn(2, B)


def test_a_retired_spawn_that_fails_does_not_fail_the_new_waiters() -> None:
    pool = make_pool(max_pool_size=2)
    pool.get(1, 1, A, now=0.0)  # spawn 1, old code
    pool.restart_app(A, now=1.0)  # spawn 1 retires; spawn 2 serves the waiter
    assert pool.count == 2
    assert pool.spawn_failed(1, "old code broke", "", now=2.0) == []
    assert one(ready(pool, 2, now=3.0), Grant).request_id == 1


def test_a_dead_process_is_removed_and_its_waiters_respawned() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0)
    pool.get(2, 7, A, now=1.0)
    assert pool.instance_exited(held.instance_id, now=2.0) == [Spawn(2, A)]
    assert pool.active == 0
    # The session died with its process: closing it changes nothing.
    assert pool.close_session(1, held.session_id, now=3.0) == []
    assert one(ready(pool, 2, now=4.0), Grant).request_id == 7


def test_a_dead_idle_process_without_waiters_is_just_forgotten() -> None:
    pool = make_pool()
    a = idle_process(pool, A, now=0.0)
    assert pool.instance_exited(a, now=1.0) == []
    assert (pool.count, pool.statistics(1.0).apps) == (0, ())
    assert pool.instance_exited(a, now=2.0) == []  # a second notice is harmless


def test_session_failed_removes_the_unreachable_process() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0)
    pool.get(2, 7, A, now=1.0)
    assert pool.session_failed(2, held.session_id, now=2.0) == []  # not its session
    decisions = pool.session_failed(1, held.session_id, now=2.0)
    assert decisions == [Stop(held.instance_id, "unreachable"), Spawn(2, A)]
    assert pool.active == 0


# --- clients --------------------------------------------------------------------------


def test_close_session_by_another_client_is_ignored() -> None:
    pool = make_pool(max_pool_size=1)
    held = checkout(pool, A, now=0.0, client=1)
    pool.get(2, 7, A, now=1.0)
    assert pool.close_session(2, held.session_id, now=2.0) == []
    assert (pool.active, pool.waiting) == (1, 1)
    assert one(pool.close_session(1, held.session_id, now=3.0), Grant).client_id == 2
    assert pool.close_session(1, held.session_id, now=4.0) == []  # idempotent


def test_client_gone_drops_its_waiters_and_releases_its_sessions() -> None:
    pool = make_pool(max_pool_size=1)
    checkout(pool, A, now=0.0, client=1)
    pool.get(1, 1, A, now=1.0)
    pool.get(2, 2, A, now=1.0)
    pool.get(1, 3, A, now=1.0)
    pool.get(3, 4, A, now=1.0)
    decisions = pool.client_gone(1, now=2.0)
    assert decisions == [Grant(2, 2, 2, 1, 1001, A, "/run/1.sock")]
    assert (pool.active, pool.waiting) == (1, 1)
    assert pool.client_gone(1, now=3.0) == []


def test_client_gone_with_only_waiters_forgets_their_app() -> None:
    pool = make_pool(max_pool_size=1)
    checkout(pool, A, now=0.0, client=1)
    pool.get(2, 2, B, now=1.0)
    assert pool.client_gone(2, now=2.0) == []
    assert pool.statistics(2.0).app(B) is None


# --- idle reaping and max_requests ----------------------------------------------------


def test_idle_processes_are_reaped_down_to_min_instances() -> None:
    pool = make_pool(max_pool_size=3, min_instances=1, max_idle_time=10)
    grants = [checkout(pool, A, now=0.0) for _ in range(3)]
    for t, grant in zip((3.0, 1.0, 2.0), grants, strict=True):
        pool.close_session(1, grant.session_id, now=t)
    assert pool.next_deadline() == 11.0
    assert pool.tick(10.9) == []
    assert pool.tick(11.0) == [Stop(grants[1].instance_id, "idle")]
    assert pool.next_deadline() == 12.0
    assert pool.tick(100.0) == [Stop(grants[2].instance_id, "idle")]
    assert pool.next_deadline() is None  # the last one is kept
    assert pool.tick(1000.0) == []
    assert list(states(pool, A)) == [grants[0].instance_id]


def test_min_instances_zero_reaps_everything_and_forgets_the_app() -> None:
    pool = make_pool(min_instances=0, max_idle_time=5)
    a = idle_process(pool, A, now=0.0)
    assert pool.tick(5.0) == [Stop(a, "idle")]
    assert (pool.count, pool.statistics(5.0).apps) == (0, ())


def test_busy_processes_are_not_reaped() -> None:
    pool = make_pool(min_instances=0, max_idle_time=5)
    checkout(pool, A, now=0.0)
    assert pool.next_deadline() is None
    assert pool.tick(100.0) == []


def test_max_idle_time_zero_never_reaps() -> None:
    pool = make_pool(min_instances=0, max_idle_time=0)
    idle_process(pool, A, now=0.0)
    assert pool.next_deadline() is None
    assert pool.tick(1e9) == []
    assert pool.count == 1


@pytest.mark.parametrize("last_used", [0.1, 1355.099862898725, 1000.7, 12345.678])
@pytest.mark.parametrize("max_idle_time", [0.2, 1.1, 0.3, 300.0])
def test_tick_at_next_deadline_always_acts(
    last_used: float, max_idle_time: float
) -> None:
    # The alarm fires at next_deadline(): if tick did nothing then, the
    # deadline would stay in the past and the alarm would spin.
    pool = make_pool(min_instances=0, max_idle_time=max_idle_time)
    idle_process(pool, A, now=last_used)
    deadline = pool.next_deadline()
    assert deadline is not None
    assert only(pool.tick(deadline), Stop) != []
    assert pool.next_deadline() is None


def test_a_retiring_process_does_not_count_towards_min_instances() -> None:
    pool = make_pool(max_pool_size=2, min_instances=1, max_idle_time=5)
    old = checkout(pool, A, now=0.0)
    pool.restart_app(A, now=1.0)  # busy: it finishes its session, then goes
    new = checkout(pool, A, now=1.0)
    pool.close_session(1, new.session_id, now=1.0)
    assert pool.tick(100.0) == []  # the new one is the app's last live process
    assert pool.close_session(1, old.session_id, now=101.0) == [
        Stop(old.instance_id, "retired")
    ]
    assert list(states(pool, A)) == [new.instance_id]


def test_a_process_is_retired_after_max_requests_sessions() -> None:
    pool = make_pool(max_requests=2)
    first = checkout(pool, A, now=0.0)
    assert pool.close_session(1, first.session_id, now=1.0) == []
    second = one(pool.get(1, 2, A, now=2.0), Grant)
    assert second.instance_id == first.instance_id
    assert states(pool, A) == {first.instance_id: "retiring"}
    # A get now does not reuse it: it spawns a replacement.
    assert pool.get(1, 3, A, now=3.0) == [Spawn(2, A)]
    decisions = pool.close_session(1, second.session_id, now=4.0)
    assert decisions == [Stop(first.instance_id, "max-requests")]


# --- restart and clear ----------------------------------------------------------------


def test_restart_stops_idle_processes_and_retires_busy_ones() -> None:
    pool = make_pool(max_pool_size=4)
    busy = checkout(pool, A, now=0.0)
    idle = idle_process(pool, A, now=0.0)
    other = idle_process(pool, B, now=0.0)
    decisions = pool.restart_app(A, now=1.0)
    assert decisions == [Stop(idle, "restart")]
    assert states(pool, A) == {busy.instance_id: "retiring"}
    assert other in states(pool, B)
    # New gets never land on the retiring process.
    spawn = one(pool.get(1, 5, A, now=2.0), Spawn)
    assert spawn.instance_id != busy.instance_id
    assert pool.close_session(1, busy.session_id, now=3.0) == [
        Stop(busy.instance_id, "retired")
    ]


def test_a_spawn_in_flight_during_restart_is_stopped_when_ready() -> None:
    pool = make_pool(max_pool_size=2)
    old = one(pool.get(1, 1, A, now=0.0), Spawn)
    new = one(pool.restart_app(A, now=1.0), Spawn)  # the waiter gets a fresh spawn
    assert states(pool, A, now=1.0) == {
        old.instance_id: "retiring",
        new.instance_id: "spawning",
    }
    assert ready(pool, old, now=2.0) == [Stop(old.instance_id, "restart")]
    assert pool.waiting == 1
    assert one(ready(pool, new, now=3.0), Grant).instance_id == new.instance_id


def test_restart_of_an_unknown_app_does_nothing() -> None:
    pool = make_pool()
    idle_process(pool, A, now=0.0)
    assert pool.restart_app(B, now=1.0) == []
    assert pool.count == 1


def test_clear_retires_every_process_of_every_app() -> None:
    pool = make_pool(max_pool_size=4)
    busy = checkout(pool, A, now=0.0)
    a = idle_process(pool, A, now=0.0)
    b = idle_process(pool, B, now=0.0)
    decisions = pool.clear(now=1.0)
    assert sorted(only(decisions, Stop), key=lambda s: s.instance_id) == [
        Stop(a, "clear"),
        Stop(b, "clear"),
    ]
    assert pool.count == 1
    assert pool.close_session(1, busy.session_id, now=2.0) == [
        Stop(busy.instance_id, "retired")
    ]
    assert pool.count == 0


# --- changing limits at run time ------------------------------------------------------


def test_raising_max_pool_size_serves_waiters_at_once() -> None:
    pool = make_pool(max_pool_size=1)
    checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=1.0)
    pool.get(1, 2, B, now=1.0)
    decisions = pool.set_max_pool_size(3, now=2.0)
    assert sorted(s.app_root for s in only(decisions, Spawn)) == [A, B]
    assert pool.max_pool_size == 3


def test_lowering_max_pool_size_stops_idle_processes_oldest_first() -> None:
    pool = make_pool(max_pool_size=4)
    busy = checkout(pool, A, now=0.0)
    old = idle_process(pool, B, now=1.0)
    idle_process(pool, C, now=2.0)
    assert pool.set_max_pool_size(2, now=3.0) == [Stop(old, "limit")]
    assert pool.count == 2
    assert busy.instance_id in states(pool, A)


def test_processes_over_a_lowered_max_pool_size_stop_once_free() -> None:
    pool = make_pool(max_pool_size=3)
    grants = [checkout(pool, app, now=0.0) for app in (A, B, C)]
    assert pool.set_max_pool_size(1, now=1.0) == []  # all busy: they finish first
    assert pool.count == 3
    assert pool.close_session(1, grants[0].session_id, now=2.0) == [
        Stop(grants[0].instance_id, "limit")
    ]
    assert pool.close_session(1, grants[1].session_id, now=3.0) == [
        Stop(grants[1].instance_id, "limit")
    ]
    assert pool.close_session(1, grants[2].session_id, now=4.0) == []
    assert pool.count == 1


def test_a_get_never_spawns_past_a_lowered_max_pool_size() -> None:
    pool = make_pool(max_pool_size=2)
    checkout(pool, A, now=0.0)
    checkout(pool, B, now=0.0)
    pool.set_max_pool_size(1, now=1.0)
    assert pool.get(1, 1, C, now=2.0) == []
    assert pool.count == 2


def test_raising_max_per_app_serves_waiters_at_once() -> None:
    pool = make_pool(max_pool_size=4, max_per_app=1)
    checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=1.0)
    pool.get(1, 2, A, now=1.0)
    decisions = pool.set_max_per_app(2, now=2.0)
    assert decisions == [Spawn(2, A)]
    assert pool.set_max_per_app(0, now=3.0) == [Spawn(3, A)]


def test_lowering_max_per_app_stops_idle_processes_over_it() -> None:
    pool = make_pool(max_pool_size=4)
    busy, old, newer = (checkout(pool, A, now=0.0) for _ in range(3))
    pool.close_session(1, newer.session_id, now=2.0)
    pool.close_session(1, old.session_id, now=1.0)
    decisions = pool.set_max_per_app(2, now=3.0)
    assert decisions == [Stop(old.instance_id, "limit")]
    assert set(states(pool, A)) == {busy.instance_id, newer.instance_id}


def test_lowering_max_idle_time_reaps_at_once() -> None:
    pool = make_pool(max_pool_size=2, min_instances=0, max_idle_time=300)
    a = idle_process(pool, A, now=0.0)
    b = idle_process(pool, B, now=50.0)
    assert pool.set_max_idle_time(60, now=100.0) == [Stop(a, "idle")]
    assert pool.next_deadline() == 110.0
    assert pool.set_max_idle_time(0, now=200.0) == []
    assert pool.next_deadline() is None
    assert list(states(pool, B)) == [b]


# --- concurrency > 1 ------------------------------------------------------------------


def test_a_process_with_concurrency_serves_that_many_sessions() -> None:
    pool = make_pool(max_pool_size=1)
    for r in range(4):
        pool.get(1, r, A, now=0.0)
    decisions = ready(pool, 1, now=1.0, concurrency=3)
    grants = only(decisions, Grant)
    assert [g.request_id for g in grants] == [0, 1, 2]
    assert {g.instance_id for g in grants} == {1}
    assert pool.waiting == 1
    process = pool.statistics(1.0).apps[0].processes[0]
    assert (process.sessions, process.concurrency) == (3, 3)
    assert (
        one(pool.close_session(1, grants[0].session_id, now=2.0), Grant).request_id == 3
    )


def test_a_process_with_concurrency_is_not_idle_until_all_sessions_close() -> None:
    pool = make_pool(max_pool_size=1, min_instances=0, max_idle_time=5)
    pool.get(1, 1, A, now=0.0)
    pool.get(1, 2, A, now=0.0)
    first, second = only(ready(pool, 1, now=0.0, concurrency=2), Grant)
    pool.close_session(1, first.session_id, now=1.0)
    assert pool.get(1, 3, B, now=1.0) == []  # one session open: not evictable
    assert pool.tick(100.0) == []
    assert pool.close_session(1, second.session_id, now=2.0) == [
        Stop(1, "evicted"),
        Spawn(2, B),
    ]


def test_an_app_with_no_process_drains_a_busy_process_with_concurrency() -> None:
    # A process that takes two sessions may never be idle while its app is
    # busy: without a drain, B would wait for as long as A's load lasts.
    pool = make_pool(max_pool_size=1)
    first = checkout(pool, A, now=0.0, concurrency=2)
    assert pool.get(1, 2, B, now=1.0) == []
    assert states(pool, A) == {first.instance_id: "retiring"}
    assert pool.get(1, 3, A, now=2.0) == []  # a draining process takes no one
    assert pool.close_session(1, first.session_id, now=3.0) == [
        Stop(first.instance_id, "evicted"),
        Spawn(2, B),
    ]


def test_a_drain_prefers_an_app_that_keeps_another_process() -> None:
    pool = make_pool(max_pool_size=3)
    a = checkout(pool, A, now=0.0, concurrency=2)
    full = checkout(pool, C, now=1.0, concurrency=2)
    assert one(pool.get(1, 50, C, now=2.0), Grant).instance_id == full.instance_id
    half = checkout(pool, C, now=3.0, concurrency=2)
    assert pool.get(1, 51, B, now=4.0) == []
    assert states(pool, A) == {a.instance_id: "ready"}
    # Of C's two, the one with fewer sessions: it frees its slot sooner.
    assert states(pool, C) == {full.instance_id: "ready", half.instance_id: "retiring"}


def test_a_drain_is_undone_when_the_app_is_served_another_way() -> None:
    pool = make_pool(max_pool_size=2)
    a = checkout(pool, A, now=0.0, concurrency=2)
    spawn = one(pool.get(1, 2, C, now=0.0), Spawn)
    assert pool.get(1, 3, B, now=1.0) == []
    assert states(pool, A) == {a.instance_id: "retiring"}
    # C's spawn fails: its slot goes to B, and A's process is needed no more.
    decisions = pool.spawn_failed(spawn.instance_id, "boom", "", now=2.0)
    assert only(decisions, Spawn) == [Spawn(3, B)]
    assert only(decisions, Stop) == []
    assert states(pool, A) == {a.instance_id: "ready"}
    assert one(pool.get(1, 4, A, now=3.0), Grant).instance_id == a.instance_id


def test_a_drain_for_a_get_that_times_out_at_once_is_undone() -> None:
    pool = make_pool(max_pool_size=1)
    a = checkout(pool, A, now=0.0, concurrency=2)
    fail = one(pool.get(2, 100, B, now=1.0, timeout=0), Fail)
    assert fail.kind == "GetTimeoutError"
    assert states(pool, A) == {a.instance_id: "ready"}
    assert pool.close_session(1, a.session_id, now=2.0) == []


def test_a_drain_for_a_client_that_goes_away_is_undone_before_its_sessions_end() -> (
    None
):
    pool = make_pool(max_pool_size=1)
    a = checkout(pool, A, now=0.0, client=1, concurrency=2)
    assert one(pool.get(9, 200, A, now=0.5), Grant).instance_id == a.instance_id
    assert pool.get(9, 201, B, now=1.0) == []  # client 9's wait drains A's
    pool.close_session(1, a.session_id, now=1.5)
    assert pool.client_gone(9, now=2.0) == []  # nobody waits for the slot
    assert states(pool, A) == {a.instance_id: "ready"}


def test_the_slot_of_a_drained_process_goes_to_the_app_it_was_drained_for() -> None:
    # A's waiters are older than B's, and A has no process left either: the
    # slot is still B's, or A would win it back each time, B waiting on.
    pool = make_pool(max_pool_size=1)
    first = checkout(pool, A, now=0.0, concurrency=2)
    second = one(pool.get(1, 400, A, now=0.0), Grant)
    pool.get(1, 401, A, now=0.5)
    pool.get(2, 402, B, now=1.0)
    assert pool.close_session(1, first.session_id, now=2.0) == []
    assert pool.close_session(1, second.session_id, now=2.0) == [
        Stop(first.instance_id, "evicted"),
        Spawn(2, B),
    ]


def test_the_slot_of_a_drained_process_that_dies_goes_to_its_app() -> None:
    pool = make_pool(max_pool_size=1)
    a = checkout(pool, A, now=0.0, concurrency=2)
    pool.get(1, 300, B, now=1.0)
    pool.get(1, 301, A, now=2.0)
    assert pool.instance_exited(a.instance_id, now=3.0) == [Spawn(2, B)]


def test_an_app_with_no_process_is_not_held_off_by_another_apps_retiring_ones() -> None:
    # Each of A's processes retires after one session (max_requests=1), and
    # A always has a waiter: if the slot a retired process frees went back
    # to its own app, B would wait for as long as A's load lasts.
    pool = make_pool(max_pool_size=1, max_requests=1)
    a = checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=0.5)
    pool.get(2, 2, B, now=1.0)
    pool.get(1, 3, A, now=1.5)
    # Both have no process: the oldest waiter first, A's.
    assert pool.close_session(1, a.session_id, now=2.0) == [
        Stop(a.instance_id, "max-requests"),
        Spawn(2, A),
    ]
    second = one(ready(pool, 2, now=2.5), Grant)
    assert second.request_id == 1
    # Now B's waiter is older than any of A's.
    assert pool.close_session(1, second.session_id, now=3.0) == [
        Stop(second.instance_id, "max-requests"),
        Spawn(3, B),
    ]


def test_an_app_owed_a_slot_loses_its_turn_once_its_waiters_leave() -> None:
    pool = make_pool(max_pool_size=2, min_instances=0)
    a = checkout(pool, A, now=0.0, concurrency=2)
    c = one(pool.get(2, 2, C, now=0.0, timeout=5), Spawn)
    pool.restart_app(C, now=0.1)  # C keeps a retiring spawn, and no process
    pool.get(2, 3, C, now=0.2, timeout=5)
    assert states(pool, A) == {a.instance_id: "retiring"}  # drained for C
    pool.set_max_pool_size(1, now=0.3)
    # A's process goes, but with the lowered limit C cannot spawn yet.
    assert pool.close_session(1, a.session_id, now=0.4) == [
        Stop(a.instance_id, "evicted")
    ]
    assert len(only(pool.tick(10.0), Fail)) == 2  # C's gets give up
    pool.get(3, 4, B, now=11.0)
    pool.get(2, 5, C, now=12.0)
    # B has waited longer than C's new get: B's turn, C is owed nothing now.
    assert pool.instance_ready(c.instance_id, 22, "/run/c", 1, now=13.0) == [
        Stop(c.instance_id, "restart"),
        Spawn(3, B),
    ]


def test_processes_with_concurrency_one_are_never_drained() -> None:
    # Each becomes idle at its close, and is evicted for B then.
    pool = make_pool(max_pool_size=1)
    first = checkout(pool, A, now=0.0)
    assert pool.get(1, 2, B, now=1.0) == []
    assert states(pool, A) == {first.instance_id: "ready"}
    assert pool.close_session(1, first.session_id, now=2.0) == [
        Stop(first.instance_id, "evicted"),
        Spawn(2, B),
    ]


def test_instance_ready_for_an_unknown_instance_stops_it() -> None:
    pool = make_pool()
    assert ready(pool, 42, now=0.0) == [Stop(42, "cancelled")]


def test_a_repeated_instance_ready_does_not_stop_a_live_process() -> None:
    pool = make_pool()
    a = idle_process(pool, A, now=0.0)
    assert ready(pool, a, now=1.0) == []
    assert one(pool.get(1, 1, A, now=2.0), Grant).instance_id == a


# --- statistics and repr --------------------------------------------------------------


def test_statistics_snapshot() -> None:
    pool = make_pool(max_pool_size=3, max_per_app=2, max_requests=2)
    busy = checkout(pool, A, now=10.0)  # processed 1
    pool.close_session(1, busy.session_id, now=12.0)
    busy = one(pool.get(1, 1, A, now=15.0), Grant)  # processed 2: retiring
    pool.get(1, 2, A, now=16.0)  # spawns a second A process
    pool.get(1, 3, B, now=16.0)  # spawns B
    pool.get(1, 4, C, now=16.0)  # waits: the pool is full
    stats = pool.statistics(20.0, clients=5)
    assert (stats.max_pool_size, stats.max_per_app) == (3, 2)
    assert (stats.count, stats.active, stats.waiting, stats.clients) == (3, 1, 3, 5)
    assert [app.app_root for app in stats.apps] == [A, B, C]
    a, b, c = stats.apps
    assert (a.count, a.active, a.waiting) == (2, 1, 1)
    assert (b.count, b.active, b.waiting) == (1, 0, 1)
    assert (c.count, c.active, c.waiting, c.processes) == (0, 0, 1, ())
    first, second = a.processes
    assert first.instance_id == busy.instance_id
    assert first.pid == busy.pid
    assert (first.state, first.sessions, first.processed) == ("retiring", 1, 2)
    assert (first.uptime, first.idle) == (10.0, 5.0)
    assert (second.state, second.pid, second.sessions) == ("spawning", 0, 0)
    assert (second.uptime, second.concurrency) == (4.0, 1)
    assert b.processes[0].state == "spawning"
    assert "max      = 3" in str(stats)
    assert pool.statistics(20.0) == pool.statistics(20.0)


def test_statistics_of_a_ready_process() -> None:
    pool = make_pool()
    pool.get(1, 1, A, now=1.0)
    ready(pool, 1, now=2.0, concurrency=4)
    (process,) = pool.statistics(9.0).apps[0].processes
    assert (process.state, process.pid, process.concurrency) == ("ready", 1001, 4)
    assert (process.sessions, process.processed, process.uptime) == (1, 1, 8.0)
    assert process.idle == 7.0


def test_repr_names_the_counts() -> None:
    pool = make_pool(max_pool_size=2)
    checkout(pool, A, now=0.0)
    pool.get(1, 1, A, now=0.0)
    text = repr(pool)
    assert "count=2/2" in text
    assert "active=1" in text
    assert "waiting=1" in text


# --- found in review (2026-12-02) ------------------------------------------------


def test_a_lowered_limit_is_reached_while_a_queue_lasts() -> None:
    """Rule 7 under load: a process over the lowered limit that becomes idle
    is stopped, not handed to the next waiter (with a queue that never
    empties it was never idle, and the pool stayed over the limit)."""
    pool = make_pool(max_pool_size=3)
    grants = [checkout(pool, A, 0.0) for _ in range(3)]
    for rid in (10, 11, 12):
        pool.get(2, rid, A, 1.0)
    pool.set_max_pool_size(1, 2.0)
    for now, grant in ((3.0, grants[0]), (4.0, grants[1])):
        decisions = pool.close_session(1, grant.session_id, now)
        assert Stop(grant.instance_id, "limit") in decisions
        assert not only(decisions, Grant)
    assert pool.count == 1
    # The one left serves the queue.
    decisions = pool.close_session(1, grants[2].session_id, 5.0)
    assert one(decisions, Grant).instance_id == grants[2].instance_id


def test_a_spawn_in_flight_does_not_count_towards_min_instances() -> None:
    """Reaping counted a spawn under way as one of min_instances: the app's
    only running process was reaped, and when the spawn failed the app had
    none."""
    pool = make_pool(max_pool_size=4, min_instances=1, max_idle_time=10)
    first = checkout(pool, A, 0.0)
    pool.get(1, 2, A, 1.0, timeout=0.5)  # spawns a second, then times out
    pool.tick(1.5)
    pool.close_session(1, first.session_id, 2.0)
    assert pool.next_deadline() is None  # nothing to reap
    assert pool.tick(12.0) == []
    pool.spawn_failed(2, "boom", "", 13.0)
    assert pool.count == 1


def test_a_client_gone_frees_capacity_for_its_own_app_first() -> None:
    """Rule 3 for a client that disconnects, as for one that closes: the
    spawn its retiring process leaves room for goes to that process's app."""

    def setup() -> tuple[Pool, Grant]:
        pool = make_pool(max_pool_size=3, max_requests=2)
        pool.close_session(9, checkout(pool, A, 0.0, client=9).session_id, 0.0)
        second = one(pool.get(1, 1, A, 0.0), Grant)  # its last: retiring
        checkout(pool, A, 0.0, client=9)
        checkout(pool, C, 0.0, client=9)
        pool.get(5, 11, C, 1.0)
        pool.get(5, 12, A, 2.0)
        return pool, second

    pool, second = setup()
    by_close = one(pool.close_session(1, second.session_id, 3.0), Spawn)
    pool, second = setup()
    by_gone = one(pool.client_gone(1, 3.0), Spawn)
    assert by_close.app_root == by_gone.app_root == A
