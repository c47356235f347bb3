"""A swarm of real processes on RabbitMQ and PostgreSQL: fan-out, load split, cancellation, chaos."""

from __future__ import annotations

import collections
import random
import time

import pytest
import trio

from p2pnn.client import AsyncClient
from tests.swarmutil import BusSwarm, bus_swarm as swarm, until  # noqa: F401 (a fixture)

pytestmark = pytest.mark.postgres

TERMINAL = ("succeeded", "failed", "cancelled")


async def _an_sees(swarm: BusSwarm, an: str, kis: int) -> None:
    await until(lambda: swarm.metric(an, "p2pnn_an_kis") == kis, 30, f"{an} to see {kis} Ki")


def _states(swarm: BusSwarm, ids: list[str]) -> dict[str, str]:
    return dict(swarm.rows("SELECT id::text, state FROM tasks WHERE id::text = ANY(%s)", ids))


async def test_load_splits_by_capacity_short_tasks_skip_the_queue_and_cancel_reaches_the_ki(swarm):
    swarm.start("principal", "principal")
    swarm.start("an", "an")
    kis = {name: swarm.start(name, "ki", slots=slots) for name, slots in (("ki1", 1), ("ki2", 2), ("ki4", 4))}
    await _an_sees(swarm, "an", 3)
    async with AsyncClient(swarm.nodes["principal"].url) as client:
        # Long tasks, 20 rounds of 7 slots: each Ki runs about its share of slots.
        long = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i, "sleep": 1.0} for i in range(140)])]
        done = await client.wait_all(long, timeout=180)
        assert all(t["state"] == "succeeded" for t in done.values())
        ran = collections.Counter(
            owner for (owner,) in swarm.rows("SELECT lease_owner FROM tasks WHERE id::text = ANY(%s)", long)
        )
        split = {name: ran[node.node_id] for name, node in kis.items()}
        print(f"\nload split over Ki of 1, 2, 4 slots: {split}")
        for name, slots in (("ki1", 1), ("ki2", 2), ("ki4", 4)):
            share = 140 * slots / 7
            assert abs(split[name] - share) <= 0.15 * share, split

        # Six of seven slots busy for a long time: short tasks still run in the free one, all of
        # them while the long ones are still running, rather than waiting behind them.
        busy = [t["id"] for t in await client.submit_many([{"kind": "echo", "sleep": 600} for _ in range(6)])]
        await until(lambda: list(_states(swarm, busy).values()).count("running") == 6, 60, "6 long tasks running")
        short = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i} for i in range(5)])]
        done = await client.wait_all(short, timeout=120)
        assert all(t["state"] == "succeeded" for t in done.values())
        assert set(_states(swarm, busy).values()) == {"running"}

        # Cancelling through a node that does not run the task stops it on its Ki.
        victim = busy[0]
        await client.cancel(victim)
        cancelled = await client.wait(victim, timeout=60)
        assert cancelled["state"] == "cancelled"
        assert any(
            e.get("event") == "task.cancel_received" and e.get("task_id") == victim
            for node in kis.values() for e in node.events()
        )
        for task_id in busy[1:]:
            await client.cancel(task_id)


@pytest.fixture
def private_swarm(tmp_path, private_rabbitmq, pg_schema):
    """A BusSwarm on a RabbitMQ node of its own, which the test may restart."""
    s = BusSwarm(tmp_path, private_rabbitmq.url, pg_schema)
    try:
        yield s, private_rabbitmq
    finally:
        s.stop_all()


async def test_chaos_ki_an_and_broker_restarts_lose_nothing(private_swarm):
    swarm, rabbit = private_swarm
    swarm.start("principal", "principal")
    swarm.start("an", "an")
    for name in ("ki1", "ki2", "ki3"):
        swarm.start(name, "ki", slots=2)
    await _an_sees(swarm, "an", 3)
    rng = random.Random(4)
    specs = [{"kind": "echo", "payload": i, "sleep": rng.choice([0, 0.02, 0.1, 0.3])} for i in range(495)]
    specs += [{"kind": "train", "epochs": 1, "dataset": {"name": "digits"}} for _ in range(5)]
    rng.shuffle(specs)
    accepted: list[str] = []
    chaos = {
        6: ("kill and restart ki1", lambda: (swarm.kill("ki1"), swarm.restart("ki1"))),
        10: ("kill and restart the An", lambda: (swarm.kill("an"), swarm.restart("an"))),
        14: ("restart RabbitMQ", rabbit.restart),
    }
    started = time.monotonic()
    for batch in range(20):
        if batch in chaos:
            what, act = chaos[batch]
            t0 = time.monotonic()
            await trio.to_thread.run_sync(act)
            print(f"\nchaos after {len(accepted)} accepted: {what} ({time.monotonic() - t0:.1f} s)")
        entry = ("principal", "ki1", "ki2", "ki3")[batch % 4]
        async with AsyncClient(swarm.nodes[entry].url, timeout=60) as client:
            accepted += [t["id"] for t in await client.submit_many(specs[batch * 25:(batch + 1) * 25])]
        await trio.sleep(0.5)
    assert len(accepted) == 500

    def settled() -> bool:
        return all(s in TERMINAL for s in _states(swarm, accepted).values())

    await until(settled, 300, "every accepted task to reach a terminal state")
    elapsed = time.monotonic() - started
    states = _states(swarm, accepted)
    lost = [t for t in accepted if states.get(t) not in TERMINAL]
    counts = collections.Counter(states.values())
    retried = swarm.rows("SELECT count(*) FROM tasks WHERE attempts > 1")[0][0]
    duplicates = sum(swarm.metric(n, "p2pnn_duplicate_results_total") for n in swarm.nodes)
    stale = sum(swarm.metric(n, "p2pnn_stale_deliveries_total") for n in swarm.nodes)
    redelivered = sum(swarm.metric(n, "p2pnn_bus_redeliveries_total") for n in swarm.nodes)
    print(f"chaos: accepted 500, {dict(counts)}, lost {len(lost)}, retried {retried}, duplicate results dropped "
          f"{duplicates:g}, stale deliveries {stale:g}, redeliveries {redelivered:g}, {elapsed:.0f} s")
    assert lost == [] and len(states) == 500
    assert counts["succeeded"] == 500


async def test_with_the_principal_dead_a_standby_sweeper_requeues_a_dead_kis_task(swarm):
    swarm.start("principal", "principal")
    swarm.start("an", "an")
    swarm.start("ki", "ki", slots=1)
    await _an_sees(swarm, "an", 1)
    swarm.kill("principal")  # and it stays dead: no election yet to name another
    async with AsyncClient(swarm.nodes["an"].url) as client:
        task = await client.submit({"kind": "echo", "payload": "orphan", "sleep": 3})
        await until(lambda: _states(swarm, [task["id"]]).get(task["id"]) == "running", 30, "the task to run")
        swarm.kill("ki")
        swarm.restart("ki")
        done = await client.wait(task["id"], timeout=60)
    assert done["state"] == "succeeded" and done["attempts"] == 2
    expired = [e for n in ("an", "ki") for e in swarm.nodes[n].events() if e.get("event") == "task.lease_expired"]
    assert expired, "no standby sweeper saw the lease lapse"


async def test_short_tasks_go_from_the_api_to_a_ki_in_one_hop_without_an_an(swarm):
    # No node holds the An role: only tasks that need no placement can run at all.
    swarm.start("api", "principal")
    ki = swarm.start("ki", "ki", slots=2)
    async with AsyncClient(swarm.nodes["api"].url) as client:
        short = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i} for i in range(20)])]
        placed = await client.submit({"kind": "echo", "payload": "needs an An", "sleep": 0.5})
        done = await client.wait_all(short, timeout=60)
        assert {t["state"] for t in done.values()} == {"succeeded"}
        assert {owner for (owner,) in swarm.rows("SELECT lease_owner FROM tasks WHERE id::text = ANY(%s)", short)} == {
            ki.node_id
        }
        # A task not known to be short waits in the shared queue for an An; once one starts, it runs.
        assert _states(swarm, [placed["id"]])[placed["id"]] == "queued"
        swarm.start("an", "an")
        assert (await client.wait(placed["id"], timeout=60))["state"] == "succeeded"
    assert swarm.metric("an", "p2pnn_an_forwarded_total") == 1


async def test_a_short_task_never_waits_behind_long_ones_on_a_full_ki(swarm):
    swarm.start("principal", "principal")
    swarm.start("an", "an")
    full = swarm.start("full", "ki", slots=2)
    await _an_sees(swarm, "an", 1)
    async with AsyncClient(swarm.nodes["principal"].url) as client:
        long = [t["id"] for t in await client.submit_many([{"kind": "echo", "sleep": 600} for _ in range(2)])]
        await until(lambda: list(_states(swarm, long).values()).count("running") == 2, 60, "2 long tasks running")
        free = swarm.start("free", "ki", slots=1)
        await _an_sees(swarm, "an", 2)
        short = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i} for i in range(30)])]
        done = await client.wait_all(short, timeout=60)
        assert {t["state"] for t in done.values()} == {"succeeded"}
        owners = {owner for (owner,) in swarm.rows("SELECT lease_owner FROM tasks WHERE id::text = ANY(%s)", short)}
        assert owners == {free.node_id}
        assert set(_states(swarm, long).values()) == {"running"}
        assert not any(e.get("event") == "task.started" and e.get("task_id") in short for e in full.events())
        # The full Ki was consuming the short queue when its slots filled: what reached it went back.
        assert any(e.get("event") == "ki.short_paused" for e in full.events())
        for task_id in long:
            await client.cancel(task_id)
