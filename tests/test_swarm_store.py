"""The principal's lease in the store: compare-and-set terms, fencing, history, role map (SQLite and PostgreSQL)."""

from __future__ import annotations

import trio

from p2pnn.store import Assignment, Fence, NewTask, TaskStore

T0 = 1_700_000_000.0
LEASE = 3.0


async def test_only_one_node_gets_a_free_lease_and_terms_only_grow(store: TaskStore):
    assert await store.acquire_lease("s", "a", now=T0, lease_seconds=LEASE) == 1
    assert await store.acquire_lease("s", "b", now=T0 + 1, lease_seconds=LEASE) is None  # a's lease runs
    assert await store.renew_lease(Fence("s", 1, "a"), now=T0 + 2, lease_seconds=LEASE)
    assert await store.acquire_lease("s", "b", now=T0 + 4.9, lease_seconds=LEASE) is None  # renewed until T0+5
    assert await store.acquire_lease("s", "b", now=T0 + 5.1, lease_seconds=LEASE) == 2
    assert not await store.renew_lease(Fence("s", 1, "a"), now=T0 + 5.2, lease_seconds=LEASE)  # a was fenced off
    lease = await store.lease("s")
    assert (lease.term, lease.holder) == (2, "b")
    assert await store.lease("other") is None


async def test_a_released_lease_is_free_at_once_and_history_says_how_each_term_ended(store: TaskStore):
    await store.acquire_lease("s", "a", now=T0, lease_seconds=LEASE)
    assert await store.release_lease(Fence("s", 1, "a"), now=T0 + 1)
    assert not await store.release_lease(Fence("s", 1, "a"), now=T0 + 1.5)
    assert await store.acquire_lease("s", "b", now=T0 + 1.5, lease_seconds=LEASE) == 2
    assert await store.acquire_lease("s", "c", now=T0 + 10, lease_seconds=LEASE) == 3
    history = await store.terms("s")
    assert [(t.term, t.holder, t.end_reason) for t in history] == [(1, "a", "released"), (2, "b", "expired"), (3, "c", None)]
    for before, after in zip(history, history[1:]):
        assert before.ended_at <= after.acquired_at  # no two terms overlap


async def test_role_map_is_written_only_under_a_holding_fence(store: TaskStore):
    await store.acquire_lease("s", "a", now=T0, lease_seconds=LEASE)
    roles = {"a": Assignment(("principal",), None), "b": Assignment(("an",), None), "c": Assignment(("ki",), "b")}
    assert await store.record_roles(Fence("s", 1, "a"), roles, now=T0 + 1)
    assert not await store.record_roles(Fence("s", 1, "a"), {}, now=T0 + 3.5)  # lapsed
    assert not await store.record_roles(Fence("s", 7, "a"), {}, now=T0 + 1)  # not its term
    recorded = await store.roles("s")
    assert recorded["c"] == (Assignment(("ki",), "b"), 1) and set(recorded) == {"a", "b", "c"}


async def test_stale_principal_cannot_requeue_tasks(store: TaskStore):
    [task], _ = await store.create([NewTask("echo", {"kind": "echo"}, "u", 3)], now=T0)
    await store.mark_queued([task.id], now=T0)
    await store.claim(task.id, worker="w", now=T0, lease_seconds=0.1)  # on the database's clock
    await trio.sleep(0.3)
    await store.acquire_lease("s", "a", now=T0, lease_seconds=LEASE)
    await store.acquire_lease("s", "b", now=T0 + 4, lease_seconds=LEASE)
    assert await store.expire_leases(now=T0 + 5, fence=Fence("s", 1, "a")) == []
    assert [tid for tid, _ in await store.expire_leases(now=T0 + 5, fence=Fence("s", 2, "b"))] == [task.id]


async def test_racing_acquirers_get_distinct_outcomes(make_store):
    stores = [make_store() for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        won: list[int | None] = []

        async def race(i: int) -> None:
            won.append(await stores[i].acquire_lease("s", f"n{i}", now=T0, lease_seconds=LEASE))

        async with trio.open_nursery() as nursery:
            for i in range(len(stores)):
                nursery.start_soon(race, i)
        assert sorted(w for w in won if w is not None) == [1]
    finally:
        for s in stores:
            await s.close()


async def test_a_revoked_token_stays_on_the_deny_list_until_it_would_have_expired(store: TaskStore):
    await store.revoke_token("j1", expires_at=T0 + 60, now=T0)
    await store.revoke_token("j1", expires_at=T0 + 60, now=T0 + 1)  # revoking twice is harmless
    await store.revoke_token("j2", expires_at=T0 + 10, now=T0 + 2)
    assert await store.revoked_tokens(now=T0 + 5) == {"j1", "j2"}
    assert await store.revoked_tokens(now=T0 + 30) == {"j1"}


async def test_members_record_where_their_dht_listens(store: TaskStore):
    await store.record_member("s", "a", ("127.0.3.1", 8468), now=T0)
    await store.record_member("s", "b", ("127.0.3.2", 8468), now=T0 + 1)
    await store.record_member("s", "a", ("127.0.3.9", 9000), now=T0 + 100)  # moved, and seen again
    await store.record_member("other", "c", ("127.0.3.3", 8468), now=T0 + 100)
    assert await store.members("s", since=T0) == {"a": ("127.0.3.9", 9000), "b": ("127.0.3.2", 8468)}
    assert await store.members("s", since=T0 + 50) == {"a": ("127.0.3.9", 9000)}
