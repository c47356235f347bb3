"""Election step by step, on a real SQLite store with a hand-driven clock and scripted peer answers.

Every way a principal stops acting is here: a coordinator of an equal or older
term (answered stale, the principal keeps leading), a refused renewal, a failed
renewal (it stops acting at once and resumes only on a successful renewal), a
hung store (the deadline), a lease lapsed on its own clock, a newer term in a
reply or a coordinator message, a hand-over to a higher-ranked node (preempt),
and a clean stop (resign).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnn.config import SwarmConfig
from p2pnn.control.election import Election, StoreTimeout, rank
from p2pnn.identity import Identity, node_id_of
from p2pnn.membership.records import NodeRecord
from p2pnn.metrics import Metrics
from p2pnn.store import Fence, StoreError, TaskStore, open_store
from p2pnn.work import Sweeper

T0 = 1_700_000_000.0
CONFIG = SwarmConfig(heartbeat_seconds=0.2, election_timeout_seconds=0.8, lease_seconds=1.2, store_timeout_seconds=0.3)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """The real store, except that the lease calls and the sweep's fenced write can be made to fail (``down``) or never answer (``hang``)."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.down = False
        self.hang = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name not in ("acquire_lease", "renew_lease", "release_lease", "lease", "record_roles", "expire_leases"):
            return real

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.hang:
                await trio.sleep_forever()
            if self.down:
                raise StoreError("database error (08006): connection refused")
            return await real(*args, **kwargs)

        return call


class Links:
    """Peer answers scripted per message type; every request is recorded."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any] | None] = {}
        self.sent: list[tuple[str, str]] = []

    async def request(self, peer: NodeRecord, msg_type: str, *, timeout: float, **fields: Any) -> dict[str, Any] | None:
        self.sent.append((peer.node_id, msg_type))
        return self.answers.get(msg_type)


def ids_in_order(n: int) -> list[str]:
    return sorted(node_id_of(Ed25519PrivateKey.generate().public_key()) for _ in range(n))


def record(node_id: str) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, dht=("127.0.0.1", 1), peer="ws://127.0.0.1:1", api="http://127.0.0.1:1", capabilities={},
        prefers="auto", priority=0, roles=(), an_id=None, load={}, term=0, timestamp=T0, expires_at=T0 + 3600,
    )


class Harness:
    def __init__(self, store: FlakyStore, me: str, peers: list[str], clock: Clock, nursery: trio.Nursery) -> None:
        self.store, self.clock, self.links = store, clock, Links()
        self.peer_records = [record(p) for p in peers]
        self.led: list[int] = []
        self.followed: list[dict[str, Any]] = []
        self.stepped_down = 0
        self.refuse_writes = False

        async def lead(fence: Fence) -> dict[str, Any] | None:
            if self.refuse_writes or not await store.record_roles(fence, {}, now=clock()):
                return None
            self.led.append(fence.term)
            return {"roles": {}}

        def stepped() -> None:
            self.stepped_down += 1

        self.election = Election(
            me=me, my_rank=rank(0, "auto", me), swarm="s", store=store, config=CONFIG,  # type: ignore[arg-type]
            links=self.links, peers=lambda: self.peer_records, lead=lead,  # type: ignore[arg-type]
            follow=self.followed.append, stepped_down=stepped, clock=clock,
        )
        self.election._nursery = nursery  # where its heartbeats go out (``run`` opens its own)

    def peer(self, node_id: str) -> NodeRecord:
        return next(r for r in self.peer_records if r.node_id == node_id)

    async def win(self) -> Fence:
        await self.election._elect()
        self.links.sent.clear()
        assert self.election.leading, "a node nobody answers takes the lease"
        assert self.election.fence is not None
        return self.election.fence


@pytest.fixture
async def store(tmp_path):
    real = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await real.open()
    yield FlakyStore(real)
    await real.close()


@pytest.fixture
def ids() -> list[str]:
    return ids_in_order(3)  # low, mid, high


async def test_a_principal_answers_a_coordinator_of_an_equal_or_older_term_as_stale_and_keeps_leading(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    for term in (fence.term, fence.term - 1):
        body = {"type": "coordinator", "term": term, "id": high, "roles": {}}
        assert await h.election.on_message(body, h.peer(high)) == {"type": "stale"}
    assert h.election.leading and h.election.fence is fence and h.election.principal == mid
    assert h.stepped_down == 0 and h.followed == []


async def test_a_coordinator_of_a_newer_term_makes_the_principal_step_down_and_follow(store, ids, nursery):
    low, mid, high = ids
    h = Harness(store, mid, [low, high], Clock(), nursery)
    fence = await h.win()
    body = {"type": "coordinator", "term": fence.term + 1, "id": low, "roles": {}}
    assert await h.election.on_message(body, h.peer(low)) is None
    assert h.election.fence is None and not h.election.leading and h.stepped_down == 1
    assert (h.election.principal, h.election.term) == (low, fence.term + 1) and len(h.followed) == 1


async def test_a_refused_renewal_makes_the_principal_step_down_before_its_lease_lapses(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    # The term moved on in the store (the lease was handed to another node): the renewal's compare-and-set fails.
    assert await store.release_lease(fence, now=clock())
    clock.now += 0.01
    assert await store.acquire_lease("s", high, now=clock(), lease_seconds=CONFIG.lease_seconds) == fence.term + 1
    clock.now += 0.2
    assert clock() < h.election.lease_expires  # not a lapse: the refusal alone makes it step down
    await h.election._beat()
    assert h.election.fence is None and not h.election.leading and h.stepped_down == 1
    assert h.led == [] and h.election.current_fence() is None


async def test_a_failed_renewal_stops_the_principal_at_once_and_only_a_successful_one_resumes_it(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    store.down = True
    clock.now += 0.2
    await h.election._beat()
    # Suspended: it keeps the fence (its lease may still be renewed) but does not act and does not answer ALIVE.
    assert h.election.fence is fence and not h.election.leading and h.election.current_fence() is None
    assert not h.election.can_lead() and h.stepped_down == 1
    assert await h.election.on_message({"type": "election", "term": fence.term, "id": low}, h.peer(low)) is None
    assert h.links.sent == [] and h.led == []  # no heartbeat while suspended
    store.down = False
    clock.now += 0.2
    await h.election._beat()
    assert h.election.leading and h.election.fence is fence and h.led == [fence.term]
    assert await h.election.on_message({"type": "election", "term": fence.term, "id": low}, h.peer(low)) == {"type": "alive"}


async def test_a_principal_whose_store_does_not_answer_stops_acting_within_the_deadline(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    store.hang = True
    started = trio.current_time()
    await h.election._beat()
    assert trio.current_time() - started < CONFIG.lease_seconds
    assert h.election.fence is fence and not h.election.leading and not h.election.store_ok


async def test_a_lease_lapsed_on_the_principals_own_clock_ends_its_term(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    assert h.election.current_fence() is fence
    clock.now = h.election.lease_expires  # no renewal happened in time: it stops acting by its own clock alone
    assert not h.election.leading and h.election.current_fence() is None
    store.down = True
    await h.election._beat()
    assert h.election.fence is None and h.stepped_down == 1


async def test_a_refused_fenced_write_ends_the_term(store, ids, nursery):
    low, mid, high = ids
    h = Harness(store, mid, [low, high], Clock(), nursery)
    await h.win()
    h.refuse_writes = True
    await h.election._beat()
    assert h.election.fence is None and h.stepped_down == 1


async def test_a_newer_term_in_a_heartbeats_reply_makes_the_principal_step_down(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    h.links.answers["coordinator"] = {"type": "stale", "term": fence.term + 3}
    async with trio.open_nursery() as beats:
        h.election._nursery = beats
        clock.now += 0.2
        await h.election._beat()
    assert sorted(h.links.sent) == sorted([(low, "coordinator"), (high, "coordinator")])
    assert h.election.fence is None and h.election.term == fence.term + 3 and h.stepped_down == 1


async def test_an_older_or_equal_term_in_a_reply_changes_nothing(store, ids, nursery):
    low, mid, high = ids
    h = Harness(store, mid, [low, high], Clock(), nursery)
    fence = await h.win()
    h.links.answers["coordinator"] = {"type": "stale", "term": fence.term}
    async with trio.open_nursery() as beats:
        h.election._nursery = beats
        await h.election._beat()
    assert h.election.leading and h.stepped_down == 0


async def test_preempt_a_principal_hands_its_lease_to_a_higher_ranked_node_which_takes_it_at_once(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    principal = Harness(store, mid, [low, high], clock, nursery)
    fence = await principal.win()
    # The higher-ranked node follows the lower-ranked principal's heartbeat, then challenges it.
    challenger = Harness(store, high, [low, mid], clock, nursery)
    beat = {"type": "coordinator", "term": fence.term, "id": mid, "roles": {}}
    assert await challenger.election.on_message(beat, challenger.peer(mid)) is None
    assert challenger.election._challenge and challenger.election.principal == mid

    async def deliver(peer: NodeRecord, msg_type: str, *, timeout: float, **fields: Any) -> dict[str, Any] | None:
        challenger.links.sent.append((peer.node_id, msg_type))
        if peer.node_id == mid:
            return await principal.election.on_message({"type": msg_type, "term": fence.term, "id": high}, record(high))
        return None

    challenger.links.request = deliver  # type: ignore[method-assign]
    clock.now += 0.1
    await challenger.election._elect()
    assert (mid, "election") in challenger.links.sent
    assert principal.election.fence is None and principal.stepped_down == 1
    assert challenger.election.leading and challenger.election.term == fence.term + 1
    history = await store.terms("s")
    assert [(t.holder, t.end_reason) for t in history] == [(mid, "released"), (high, None)]


async def test_a_node_that_cannot_reach_the_store_neither_preempts_nor_answers_alive(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, high, [low, mid], clock, nursery)
    store.down = True
    await h.election._elect()  # no answer from anyone, but no lease either
    assert h.election.fence is None and not h.election.store_ok
    assert await h.election.on_message({"type": "election", "term": 0, "id": low}, h.peer(low)) is None
    beat = {"type": "coordinator", "term": 5, "id": mid, "roles": {}}
    await h.election.on_message(beat, h.peer(mid))
    assert not h.election._challenge  # it follows, but does not make the principal hand over
    store.down = False
    clock.now += 0.3
    await h.election._elect()  # the probe: the store answers again
    assert h.election.store_ok and h.election.fence is None
    assert await h.election.on_message({"type": "election", "term": 5, "id": low}, h.peer(low)) == {"type": "alive"}


async def test_a_refused_candidate_asks_again_the_moment_the_lease_lapses(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    holder = Harness(store, high, [low, mid], clock, nursery)
    fence = await holder.win()
    clock.now += 0.5
    candidate = Harness(store, mid, [low, high], clock, nursery)  # the holder died: no ALIVE from it
    await candidate.election._elect()
    assert candidate.election.fence is None
    retry = candidate.election._retry_at
    assert retry is not None and math.isclose(retry, holder.election.lease_expires, abs_tol=0.05)
    assert retry < clock() + CONFIG.election_timeout_seconds
    clock.now = retry
    await candidate.election._elect()
    assert candidate.election.leading and candidate.election.term == fence.term + 1


async def test_a_resigning_principal_hands_its_term_back(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, high, [low, mid], clock, nursery)
    fence = await h.win()
    await h.election.resign()
    assert h.election.fence is None and h.stepped_down == 1
    # The next node need not wait for the lease: it is free at once.
    clock.now += 0.01
    assert await store.acquire_lease("s", mid, now=clock(), lease_seconds=CONFIG.lease_seconds) == fence.term + 1
    assert [t.end_reason for t in await store.terms("s")] == ["released", None]


async def test_a_renewal_that_hangs_stops_the_principal_within_one_heartbeat(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    fence = await h.win()
    store.hang = True
    beat_done = trio.Event()

    async def beat() -> None:
        await h.election._beat()
        beat_done.set()

    nursery.start_soon(beat)
    await trio.sleep(0.01)  # the renewal is in flight
    assert h.election.leading
    clock.now += CONFIG.heartbeat_seconds
    assert not h.election.leading and not h.election.can_lead() and h.election.current_fence() is None
    assert await h.election.on_message({"type": "election", "term": fence.term, "id": low}, h.peer(low)) is None
    await beat_done.wait()  # the deadline ends it: suspended until a renewal succeeds
    assert h.election.fence is fence and not h.election.leading


async def test_a_follower_that_hears_no_principal_for_longer_than_a_failover_is_orphaned(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)
    await h.election.on_message({"type": "coordinator", "term": 3, "id": high, "roles": {}}, h.peer(high))
    failover = CONFIG.election_timeout_seconds + CONFIG.lease_seconds + CONFIG.heartbeat_seconds
    clock.now += failover - 0.01
    assert not h.election.orphaned()
    clock.now += 0.02
    assert h.election.orphaned()
    # A principal renewing its lease is never orphaned, however long it hears nobody else.
    clock.now += 60
    await h.win()
    clock.now += failover + 1
    assert not h.election.orphaned()


async def test_the_principals_fenced_sweep_runs_under_the_elections_deadline_and_only_while_it_leads(store, ids, nursery):
    low, mid, high = ids
    clock = Clock()
    h = Harness(store, mid, [low, high], clock, nursery)

    async def publish(ids: list[str]) -> bool:
        return True

    sweeper = Sweeper(store=store, publish=publish, metrics=Metrics(), interval=0.1, pending_after=1,  # type: ignore[arg-type]
                      republish_queued=False, fenced=h.election.fenced, clock=clock)
    store.hang = True
    with trio.fail_after(30):
        await sweeper.sweep()  # not leading: it asks the store nothing (a hung call would not return)
    store.hang = False
    await h.win()
    await sweeper.sweep()
    store.hang = True
    with trio.fail_after(30), pytest.raises(StoreTimeout):  # the election's deadline ends it, nothing else
        await sweeper.sweep()


class CountingStore:
    """The store, counting the lease calls a candidate makes."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name not in ("acquire_lease", "lease"):
            return real

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.asked += 1
            return await real(*args, **kwargs)

        return call


async def test_a_refused_candidate_waits_for_the_lease_to_lapse_instead_of_asking_again_at_once(store, ids, nursery):
    import time

    low, mid, high = ids
    holder = Harness(store, high, [low, mid], time.time, nursery)
    await holder.win()  # and then it dies: its lease runs out unrenewed
    counting = CountingStore(store)
    candidate = Harness(counting, mid, [low, high], time.time, nursery)  # type: ignore[arg-type]
    candidate.election.last_heard = time.time() - 10 * CONFIG.election_timeout_seconds  # it heard nobody for long
    nursery.start_soon(candidate.election.run)
    await trio.sleep(CONFIG.lease_seconds / 3)
    # One refused candidacy (its lease ask and the read of whose lease it met), then quiet until the lapse.
    assert candidate.election.fence is None and counting.asked <= 4, counting.asked
    with trio.fail_after(CONFIG.lease_seconds + 5):
        while not candidate.election.leading:
            await trio.sleep(0.02)
