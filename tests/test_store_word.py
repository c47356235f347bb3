"""Results and cancels are the store's word, not the bus's."""

from __future__ import annotations

import time

import trio

from p2pnn.bus import CANCEL, LocalBus
from p2pnn.compute.pool import KiPool
from p2pnn.metrics import Metrics
from p2pnn.store import NewTask, open_store
from p2pnn.tasks import Limits, State
from p2pnn.work import KiAgent, KiRunner

T0 = 1_700_000_000.0
LEASE = 30.0


async def test_a_late_duplicate_attempt_cannot_replace_the_winners_artifacts(store):
    (task,), _ = await store.create([NewTask("train", {"kind": "train"}, "o", 3)], now=T0)
    await store.mark_queued([task.id], now=T0)
    first = await store.claim(task.id, worker="ki-1", now=T0, lease_seconds=0.1)  # database clock
    await trio.sleep(0.3)
    assert [s for _, s in await store.expire_leases(now=T0 + LEASE + 1)] == [State.QUEUED]  # ki-1 seemed dead
    second = await store.claim(task.id, worker="ki-2", now=T0 + LEASE + 2, lease_seconds=LEASE)
    assert await store.finish(task.id, attempt=second.attempts, state=State.SUCCEEDED, now=T0 + 40,
                              result={"by": "ki-2"}, worker="ki-2", artifacts={"model.safetensors": b"winner"})
    # ki-1 was only slow: its result and its artifact arrive late, and change nothing.
    assert not await store.finish(task.id, attempt=first.attempts, state=State.SUCCEEDED, now=T0 + 41,
                                  result={"by": "ki-1"}, worker="ki-1", artifacts={"model.safetensors": b"late"})
    done = await store.get(task.id)
    assert done.result == {"by": "ki-2"} and done.artifacts == ["model.safetensors"]
    assert await store.get_artifact(task.id, "model.safetensors") == b"winner"


async def test_finish_and_release_need_the_lease_owner_and_cancelled_needs_a_cancel_request(store):
    (task,), _ = await store.create([NewTask("echo", {"kind": "echo"}, "o", 3)], now=T0)
    await store.mark_queued([task.id], now=T0)
    claimed = await store.claim(task.id, worker="ki-1", now=T0, lease_seconds=LEASE)
    n = claimed.attempts
    assert not await store.finish(task.id, attempt=n, state=State.SUCCEEDED, now=T0 + 1, worker="ki-2")
    assert await store.retry_or_fail(task.id, attempt=n, error="x", now=T0 + 1, worker="ki-2") is None
    assert not await store.release(task.id, attempt=n, now=T0 + 1, worker="ki-2")
    assert not await store.finish(task.id, attempt=n, state=State.CANCELLED, now=T0 + 1, worker="ki-1")
    await store.request_cancel(task.id, now=T0 + 2)
    assert await store.finish(task.id, attempt=n, state=State.CANCELLED, now=T0 + 3, worker="ki-1")


async def test_a_forged_cancel_message_stops_nothing_a_requested_one_stops_the_task(tmp_path):
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    bus = LocalBus()
    pool = KiPool(slots=1, torch_threads=1, limits=Limits(), workdir=tmp_path / "work")
    runner = KiRunner(node_id="ki", store=store, bus=bus, pool=pool, metrics=Metrics(), lease_seconds=LEASE)
    agent = KiAgent(runner=runner, bus=bus, beat_interval=1.0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await nursery.start(agent.run)
            (task,), _ = await store.create([NewTask("echo", {"kind": "echo", "sleep": 60}, "o", 3)], now=time.time())
            await bus.publish([task.id])
            await store.mark_queued([task.id], now=time.time())
            with trio.fail_after(60):
                while task.id not in runner.running:
                    await trio.sleep(0.05)
            await bus.broadcast(CANCEL, {"id": task.id})  # nobody asked the store for this
            await bus.broadcast(CANCEL, {"id": ["not", "an", "id"]})
            with trio.fail_after(10):
                while runner.metrics.malformed_messages.labels(source="cancel")._value.get() < 1:
                    await trio.sleep(0.05)
            assert (await store.get(task.id)).state is State.RUNNING and task.id in runner.running

            await store.request_cancel(task.id, now=time.time())  # what the API does first
            await bus.broadcast(CANCEL, {"id": task.id})
            with trio.fail_after(30):
                while (await store.get(task.id)).state is not State.CANCELLED:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
