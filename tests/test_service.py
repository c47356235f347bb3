"""TaskService.submit with ``wait``: the insert does not wait for the disk, the answer does.

Run against SQLite and PostgreSQL (the ``store`` fixture), on the in-process bus with no Ki
unless a test plays one. Which inserts were relaxed is seen by a spy around the store's ``create``, which
runs each unchanged; that the barrier itself reaches the disk
is the store's test (test_store.py).
"""

from __future__ import annotations

import time

import pytest
import trio

from p2pnn.bus import LocalBus
from p2pnn.callers import ANONYMOUS_ADMIN
from p2pnn.service import TaskService
from p2pnn.store import StoreError, TaskStore
from p2pnn.tasks import Limits, State

WAIT = 0.3  # seconds a submit waits for a task no Ki runs


class Seen:
    """What a store was asked to do, in order: ("create", relaxed) for each insert, "barrier" for
    each make_durable (with the monotonic time it began)."""

    def __init__(self, store: TaskStore) -> None:
        self.events: list[object] = []
        self.barrier_at: list[float] = []
        create, make_durable = store.create, store.make_durable

        async def spy_create(tasks, **kwargs):
            self.events.append(("create", kwargs.get("relaxed", False)))
            return await create(tasks, **kwargs)

        async def spy_make_durable() -> None:
            self.events.append("barrier")
            self.barrier_at.append(time.monotonic())
            await make_durable()

        store.create = spy_create  # type: ignore[method-assign]
        store.make_durable = spy_make_durable  # type: ignore[method-assign]


def service_on(store: TaskStore) -> TaskService:
    return TaskService(store, LocalBus(), limits=Limits(), max_attempts=3)


async def test_a_submit_that_waits_inserts_relaxed_and_is_made_durable_before_it_answers(store: TaskStore) -> None:
    seen = Seen(store)
    began = time.monotonic()
    tasks, created = await service_on(store).submit([{"kind": "echo"}, {"kind": "echo"}], ANONYMOUS_ADMIN, wait=WAIT)
    assert created and [t.state for t in tasks] == [State.QUEUED, State.QUEUED]  # no Ki: the wait ran out
    assert seen.events == [("create", True), "barrier"]
    assert seen.barrier_at[0] - began >= WAIT  # once the wait was over, before the answer


async def test_a_submit_without_wait_inserts_durably_and_needs_no_barrier(store: TaskStore) -> None:
    seen = Seen(store)
    (task,), created = await service_on(store).submit([{"kind": "echo"}], ANONYMOUS_ADMIN)
    assert created and task.state is State.QUEUED
    assert seen.events == [("create", False)]


async def test_a_result_recorded_during_the_wait_makes_the_insert_durable_without_a_barrier(store: TaskStore) -> None:
    """A result is recorded by a durable commit after the insert, which puts the insert on disk too."""
    service = service_on(store)
    seen = Seen(store)
    answer = {}

    async def submit() -> None:
        answer["tasks"], _ = await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN, wait=20)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit)
        with trio.fail_after(10):  # a Ki: take the task and finish it
            while not (queued := (await store.list(state=State.QUEUED)).tasks):
                await trio.sleep(0.01)
        claimed = await store.claim(queued[0].id, worker="ki-1", now=time.time(), lease_seconds=30)
        assert await store.finish(
            claimed.id, attempt=claimed.attempts, state=State.SUCCEEDED, now=time.time(), result={}, worker="ki-1"
        )
        service.finished(claimed.id)
    assert [t.state for t in answer["tasks"]] == [State.SUCCEEDED]
    assert seen.events == [("create", True)]


async def test_a_repeated_submit_is_made_durable_before_it_answers(store: TaskStore) -> None:
    """The first request may have inserted relaxed and been abandoned by its client during the
    wait (no barrier then); the repeat's answer names the same tasks, so it waits for the disk."""
    service = service_on(store)
    with trio.move_on_after(WAIT / 2):  # the client goes away before the wait is over
        await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN, idempotency_key="k", body_hash="h", wait=WAIT)
    seen = Seen(store)
    (task,), created = await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN, idempotency_key="k", body_hash="h")
    assert not created and task.state is State.QUEUED
    assert seen.events == [("create", False), "barrier"]


async def test_a_submit_whose_barrier_fails_raises_instead_of_answering(store: TaskStore) -> None:
    seen = Seen(store)
    make_durable = store.make_durable

    async def close_then_make_durable() -> None:  # the database goes away just as the wait ends
        await store.close()
        await make_durable()

    store.make_durable = close_then_make_durable  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await service_on(store).submit([{"kind": "echo"}], ANONYMOUS_ADMIN, wait=WAIT)
    assert seen.events == [("create", True), "barrier"]
