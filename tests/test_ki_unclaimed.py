"""A short task whose message from the API carries its spec runs before any claim: its outcome is
recorded in one transaction, as its next attempt, only while the task still waits and only for the
spec the store holds; anything else (a message an An forwarded among them) takes the claim path.

Real RabbitMQ (a vhost of the test's own), a real store and real worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnn.bus import SHORT, Delivery, ki_queue
from p2pnn.store import ClaimOp, FinishOp, FinishUnclaimedOp
from p2pnn.tasks import State, needs_of
from p2pnn.work.ki import _spec_to_run_unclaimed
from tests.test_handback import NODE, _queued_task, _until_state, running_ki


@pytest.fixture
async def ki(amqp_url: str, tmp_path: Path):
    async with running_ki(amqp_url, tmp_path, prefix="ku", slots=2, lease_seconds=30, short_queue=SHORT) as (
        store, bus, runner
    ):
        applied: list[tuple[Any, Any]] = []  # (op, answer) of every group the Ki committed
        apply = store.apply

        async def recording(ops, *, now):
            answers = await apply(ops, now=now)
            applied.extend(zip(ops, answers))
            return answers

        store.apply = recording
        yield store, bus, runner, applied


async def _ops_of(applied: list[tuple[Any, Any]], task_id: str, count: int) -> list[Any]:
    """The groups the Ki applied for ``task_id`` once there are ``count`` of them: the store shows a
    commit a moment before the Ki's coroutine, back from it, has noted the answer."""
    with trio.fail_after(10):
        while len(ops := [(type(op), answer) for op, answer in applied if op.task_id == task_id]) < count:
            await trio.sleep(0.01)
    return ops


def _headers(task_id: str, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {task_id: {"needs": needs_of(spec), "spec": spec}}


async def test_a_short_task_carrying_its_spec_is_run_then_recorded_with_no_claim(ki):
    store, bus, runner, applied = ki
    task_id = await _queued_task(store, sleep=0.0, payload="p")
    spec = (await store.get(task_id)).spec
    await bus.publish([task_id], queue=SHORT, headers=_headers(task_id, spec))
    await _until_state(store, task_id, State.SUCCEEDED, 30)
    task = await store.get(task_id)
    assert (task.result, task.attempts, task.lease_owner) == ({"payload": "p"}, 1, NODE)
    assert task.started_at is not None and task.started_at <= task.finished_at
    assert await _ops_of(applied, task_id, 1) == [(FinishUnclaimedOp, True)]


async def test_a_message_carrying_another_spec_cannot_change_the_result(ki):
    """The store refuses the outcome of the message's spec; the claim path runs the stored one."""
    store, bus, runner, applied = ki
    task_id = await _queued_task(store, sleep=0.0, payload="stored")
    forged = {**(await store.get(task_id)).spec, "payload": "forged"}
    await bus.publish([task_id], queue=SHORT, headers=_headers(task_id, forged))
    await _until_state(store, task_id, State.SUCCEEDED, 30)
    task = await store.get(task_id)
    assert (task.result, task.attempts) == ({"payload": "stored"}, 1)
    ops = await _ops_of(applied, task_id, 3)
    assert ops[0] == (FinishUnclaimedOp, False)
    assert [kind for kind, _ in ops[1:]] == [ClaimOp, FinishOp] and ops[2][1] is True


async def test_the_message_of_a_task_cancelled_meanwhile_records_nothing(ki):
    store, bus, runner, applied = ki
    task_id = await _queued_task(store, sleep=0.0, payload="late")
    spec = (await store.get(task_id)).spec
    await store.request_cancel(task_id, now=1.0)
    stale = runner.metrics.stale_deliveries._value.get()
    await bus.publish([task_id], queue=SHORT, headers=_headers(task_id, spec))
    with trio.fail_after(30):
        while runner.metrics.stale_deliveries._value.get() == stale:
            await trio.sleep(0.05)
    task = await store.get(task_id)
    assert (task.state, task.result, task.attempts) == (State.CANCELLED, None, 0)
    assert await _ops_of(applied, task_id, 2) == [(FinishUnclaimedOp, False), (ClaimOp, None)]


def test_only_a_first_delivery_of_a_short_spec_runs_unclaimed() -> None:
    """A delivery seen again may have run already (its ack lost with a connection): it is claimed."""
    spec = {"kind": "echo", "payload": 1, "sleep": 0.0}
    first = Delivery("t", tag=1, headers={"needs": needs_of(spec), "spec": spec})
    assert _spec_to_run_unclaimed(first, short=True) == spec
    assert _spec_to_run_unclaimed(Delivery("t", tag=2, redelivered=True, headers=first.headers), short=True) is None
    assert _spec_to_run_unclaimed(first, short=False) is None
    for other in ({"kind": "echo", "sleep": 5.0}, {"kind": "train"}, {"kind": "echo", "sleep": "x"}, "spec"):
        assert _spec_to_run_unclaimed(Delivery("t", tag=3, headers={"spec": other}), short=True) is None


async def test_a_message_an_an_forwarded_is_claimed_even_with_a_spec(ki):
    """An An killed between its forward and its ack forwards the task again, as a new message: two
    Ki running it before asking would both run it. So the Ki's own queue takes the claim path."""
    store, bus, runner, applied = ki
    task_id = await _queued_task(store, sleep=0.0, payload="forwarded")
    spec = (await store.get(task_id)).spec
    await bus.publish([task_id], queue=ki_queue(NODE), headers=_headers(task_id, spec))
    await _until_state(store, task_id, State.SUCCEEDED, 30)
    assert (await store.get(task_id)).result == {"payload": "forwarded"}
    assert [(kind, answer is not None) for kind, answer in await _ops_of(applied, task_id, 2)] == [
        (ClaimOp, True), (FinishOp, True)]
