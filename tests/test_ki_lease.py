"""A Ki's one lease keeper: every running attempt's lease is renewed while it runs, and an attempt
whose renewal finds a cancel requested (or the lease gone) is stopped.

Real RabbitMQ (a vhost of the test's own), a real store and real worker processes; a lease of
1.5 s, so a renewal is due every 0.5 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from p2pnn.bus import ki_queue
from p2pnn.tasks import State
from tests.test_handback import NODE, _queued_task, _until_state, running_ki

LEASE = 1.5


@pytest.fixture
async def ki(amqp_url: str, tmp_path: Path):
    async with running_ki(amqp_url, tmp_path, prefix="kl", slots=2, lease_seconds=LEASE) as parts:
        yield parts


async def test_tasks_running_past_their_lease_keep_it_and_finish_in_one_attempt(ki):
    store, bus, runner = ki
    long_ids = [await _queued_task(store, sleep=3 * LEASE, payload=i) for i in range(2)]
    await bus.publish(long_ids, queue=ki_queue(NODE))
    for task_id in long_ids:
        await _until_state(store, task_id, State.RUNNING, 60)
    seen: dict[str, float] = {}
    # Several renewal periods: each lease keeps moving ahead of the clock, never lapsing.
    with trio.move_on_after(2 * LEASE):
        while True:
            for task_id in long_ids:
                task = await store.get(task_id)
                if task.state is State.RUNNING:
                    assert task.lease_owner == NODE and task.lease_expires_at > time.time()
                    seen[task_id] = max(seen.get(task_id, 0.0), task.lease_expires_at)
            await trio.sleep(0.1)
    for task_id in long_ids:
        await _until_state(store, task_id, State.SUCCEEDED, 30)
        task = await store.get(task_id)
        assert task.attempts == 1
        # Renewed at least twice past the claim's expiry (claim + LEASE).
        assert seen[task_id] - task.created_at > LEASE + 2 * LEASE / 3
    assert not runner._leases  # every ended attempt left the keeper


async def test_a_cancel_found_by_the_renewal_stops_the_task(ki):
    store, bus, runner = ki
    task_id = await _queued_task(store, sleep=60)
    await bus.publish([task_id], queue=ki_queue(NODE))
    await _until_state(store, task_id, State.RUNNING, 60)
    # No cancel message on the bus: only the lease keeper's renewal can see this.
    await store.request_cancel(task_id, now=time.time())
    await _until_state(store, task_id, State.CANCELLED, 3 * LEASE)
    assert not runner._leases
