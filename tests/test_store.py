"""TaskStore: the same specification, run against SQLite and PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg_pool import ConnectionPool

from p2pnn.store import ClaimOp, FinishOp, IdempotencyConflict, NewTask, StoreError, TaskStore, open_store
from p2pnn.store._schema import LATEST_VERSION
from p2pnn.store.postgres import run_transaction
from p2pnn.tasks import State, Task

T0 = 1_700_000_000.0  # a fixed "now": the store takes time from its caller, except for task leases
LEASE = 30.0
SHORT_LEASE = 0.2  # task leases run on the database's clock: one that lapses while the test waits


def new(owner: str = "alice", kind: str = "echo", max_attempts: int = 3, payload: object = None) -> NewTask:
    return NewTask(kind=kind, spec={"kind": kind, "payload": payload}, owner=owner, max_attempts=max_attempts)


async def running(
    store: TaskStore, *, max_attempts: int = 3, worker: str = "ki-1", now: float = T0, lease: float = LEASE
):
    """A task claimed by ``worker``: (task id, attempt)."""
    (task,), _ = await store.create([new(max_attempts=max_attempts)], now=now)
    assert await store.mark_queued([task.id], now=now) == 1
    claimed = await store.claim(task.id, worker=worker, now=now, lease_seconds=lease)
    assert claimed is not None
    return task.id, claimed.attempts


# --- creation and reading -------------------------------------------------------


async def test_created_tasks_are_pending_and_readable(store: TaskStore) -> None:
    tasks, created = await store.create([new(payload={"x": [1, 2.5]}), new(kind="train")], now=T0)
    assert created is True
    assert [t.state for t in tasks] == [State.PENDING, State.PENDING]
    got = await store.get(tasks[0].id)
    assert got == tasks[0]
    assert got.spec == {"kind": "echo", "payload": {"x": [1, 2.5]}}
    assert (got.attempts, got.max_attempts, got.created_at, got.artifacts) == (0, 3, T0, [])


async def test_get_of_an_unknown_or_malformed_id_is_none(store: TaskStore) -> None:
    assert await store.get("00000000-0000-4000-8000-000000000000") is None
    for bad in ("not-a-uuid", "", "'; DROP TABLE tasks; --", "1" * 100):
        assert await store.get(bad) is None
        assert await store.claim(bad, worker="w", now=T0, lease_seconds=LEASE) is None
        assert await store.request_cancel(bad, now=T0) is None
        assert await store.get_artifact(bad, "model") is None


async def test_list_filters_by_state_kind_and_owner(store: TaskStore) -> None:
    a, _ = await store.create([new(owner="alice", kind="echo"), new(owner="alice", kind="train")], now=T0)
    b, _ = await store.create([new(owner="bob", kind="echo")], now=T0 + 1)
    await store.mark_queued([a[1].id], now=T0 + 2)

    def ids(page) -> set[str]:
        return {t.id for t in page.tasks}

    assert ids(await store.list()) == {a[0].id, a[1].id, b[0].id}
    assert ids(await store.list(owner="alice")) == {a[0].id, a[1].id}
    assert ids(await store.list(kind="echo")) == {a[0].id, b[0].id}
    assert ids(await store.list(state=State.QUEUED)) == {a[1].id}
    assert ids(await store.list(state=State.PENDING, kind="echo", owner="bob")) == {b[0].id}
    assert (await store.list(owner="carol")).tasks == []


async def test_a_sweeps_trials_name_it_as_parent_and_are_listed_by_it(store: TaskStore) -> None:
    (sweep,), _ = await store.create([new(kind="sweep")], now=T0)
    trials, _ = await store.create(
        [NewTask(kind="train", spec={"kind": "train", "lr": lr}, owner="alice", max_attempts=3, parent=sweep.id)
         for lr in (0.1, 0.2)], now=T0 + 1,
    )
    await store.create([new()], now=T0 + 2)
    assert sweep.parent is None and {t.parent for t in trials} == {sweep.id}
    listed = (await store.list(parent=sweep.id)).tasks
    assert sorted(t.id for t in listed) == sorted(t.id for t in trials)
    assert (await store.get(trials[0].id)).parent == sweep.id
    assert (await store.list(parent="not-a-task-id")).tasks == []


async def test_list_pages_newest_first_without_duplicates_or_gaps(store: TaskStore) -> None:
    # Batches share a created_at, so the pages must break ties by id.
    made = []
    for i in range(5):
        tasks, _ = await store.create([new() for _ in range(5)], now=T0 + i)
        made += tasks
    seen = []
    cursor = None
    while True:
        page = await store.list(limit=7, cursor=cursor)
        seen += page.tasks
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == 25
    assert {t.id for t in seen} == {t.id for t in made}
    keys = [(t.created_at, t.id) for t in seen]
    assert keys == sorted(keys, reverse=True)
    assert (await store.list(limit=25)).next_cursor is None


async def test_a_malformed_cursor_is_a_value_error(store: TaskStore) -> None:
    for bad in ("garbage", "W10", "WyJ4IiwieSJd"):
        with pytest.raises(ValueError, match="cursor"):
            await store.list(cursor=bad)


async def test_an_idempotent_repeat_returns_the_first_tasks(store: TaskStore) -> None:
    first, created = await store.create([new(), new()], now=T0, idempotency_key="k1", request_hash="h1")
    await store.mark_queued([first[0].id], now=T0 + 1)
    again, created_again = await store.create([new(), new()], now=T0 + 2, idempotency_key="k1", request_hash="h1")
    assert created and not created_again
    assert [t.id for t in again] == [t.id for t in first]
    assert again[0].state is State.QUEUED  # the tasks as they are now
    assert again[0].idempotency_key == "k1"
    assert len((await store.list()).tasks) == 2


async def test_an_idempotency_key_reused_with_another_body_conflicts(store: TaskStore) -> None:
    await store.create([new()], now=T0, idempotency_key="k1", request_hash="h1")
    with pytest.raises(IdempotencyConflict):
        await store.create([new(payload=2)], now=T0, idempotency_key="k1", request_hash="h2")
    assert len((await store.list()).tasks) == 1


async def test_concurrent_repeats_of_an_idempotent_create_make_the_tasks_once(
    store: TaskStore, make_store: Callable[[], TaskStore]
) -> None:
    other = make_store()
    await other.open()
    answers = []

    async def submit(i: int) -> None:
        s = (store, other)[i % 2]
        answers.append(await s.create([new(), new()], now=T0, idempotency_key="k", request_hash="h"))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(submit, i)
    finally:
        await other.close()
    assert sorted(created for _, created in answers) == [False] * 9 + [True]
    assert len({tuple(t.id for t in tasks) for tasks, _ in answers}) == 1
    assert len((await store.list()).tasks) == 2


async def test_idempotency_keys_belong_to_their_owner(store: TaskStore) -> None:
    (a,), _ = await store.create([new(owner="alice")], now=T0, idempotency_key="k", request_hash="h")
    (b,), created = await store.create([new(owner="bob")], now=T0, idempotency_key="k", request_hash="other")
    assert created and a.id != b.id


# --- transitions ------------------------------------------------------------------


async def test_a_task_goes_pending_queued_running_succeeded(store: TaskStore) -> None:
    (task,), _ = await store.create([new()], now=T0)
    assert await store.mark_queued([task.id, "not-a-uuid"], now=T0 + 1) == 1
    assert (await store.get(task.id)).state is State.QUEUED
    claimed = await store.claim(task.id, worker="ki-1", now=T0 + 2, lease_seconds=LEASE)
    assert claimed.state is State.RUNNING
    assert (claimed.attempts, claimed.lease_owner, claimed.started_at) == (1, "ki-1", T0 + 2)
    # The lease runs on the database's clock, not the caller's: members' clock skew does not matter.
    assert abs(claimed.lease_expires_at - (time.time() + LEASE)) < 5
    assert await store.renew(task.id, worker="ki-1", attempt=1, now=T0 + 3, lease_seconds=2 * LEASE)
    assert abs((await store.get(task.id)).lease_expires_at - (time.time() + 2 * LEASE)) < 5
    assert await store.finish(task.id, attempt=1, state=State.SUCCEEDED, now=T0 + 4, result={"accuracy": 0.97})
    done = await store.get(task.id)
    assert (done.state, done.result, done.finished_at, done.error) == (
        State.SUCCEEDED, {"accuracy": 0.97}, T0 + 4, None,
    )


async def test_only_pending_tasks_are_marked_queued(store: TaskStore) -> None:
    (task,), _ = await store.create([new()], now=T0)
    assert await store.mark_queued([task.id], now=T0) == 1
    assert await store.mark_queued([task.id], now=T0) == 0
    assert await store.mark_queued([], now=T0) == 0


async def test_tasks_created_queued_count_as_published_and_are_not_stranded(store: TaskStore) -> None:
    """The in-process queue's path: stored queued (published at creation), no mark_queued needed."""
    tasks, created = await store.create([new(), new(kind="train")], now=T0, queued=True)
    assert created is True and [t.state for t in tasks] == [State.QUEUED, State.QUEUED]
    assert (await store.get(tasks[0].id)).state is State.QUEUED
    assert await store.mark_queued([tasks[0].id], now=T0) == 0
    assert await store.counts() == {("queued", "echo"): 1, ("queued", "train"): 1}
    assert await store.stranded(older_than=T0 + 100) == {}
    assert set(await store.published_before(before=T0 + 1)) == {t.id for t in tasks}
    claimed = await store.claim(tasks[0].id, worker="w", now=T0, lease_seconds=LEASE)
    assert claimed is not None and claimed.state is State.RUNNING


async def test_claim_takes_a_queued_or_pending_task_once(store: TaskStore) -> None:
    (task,), _ = await store.create([new()], now=T0)
    await store.mark_queued([task.id], now=T0)
    assert await store.claim(task.id, worker="ki-1", now=T0, lease_seconds=LEASE) is not None
    assert await store.claim(task.id, worker="ki-2", now=T0, lease_seconds=LEASE) is None  # taken
    assert (await store.get(task.id)).lease_owner == "ki-1"
    # Published, its message already at a worker, not yet marked queued by the API: claimed all the same,
    # and the late mark changes nothing.
    (early,), _ = await store.create([new()], now=T0)
    claimed = await store.claim(early.id, worker="ki-1", now=T0, lease_seconds=LEASE)
    assert claimed is not None and claimed.state is State.RUNNING and claimed.attempts == 1
    assert await store.mark_queued([early.id], now=T0) == 0
    (gone,), _ = await store.create([new()], now=T0)
    await store.request_cancel(gone.id, now=T0)
    assert await store.claim(gone.id, worker="ki-1", now=T0, lease_seconds=LEASE) is None  # cancelled


async def test_a_stale_attempt_cannot_finish_renew_or_report(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    assert await store.retry_or_fail(task_id, attempt=attempt, error="oom", now=T0 + 1) is State.QUEUED
    second = await store.claim(task_id, worker="ki-2", now=T0 + 2, lease_seconds=LEASE)
    assert second.attempts == 2
    assert not await store.finish(task_id, attempt=1, state=State.SUCCEEDED, now=T0 + 3, result={"old": True})
    assert not await store.renew(task_id, worker="ki-1", attempt=1, now=T0 + 3, lease_seconds=LEASE)
    assert not await store.progress(task_id, worker="ki-1", attempt=1, progress={"epoch": 9}, now=T0 + 3)
    assert not await store.progress(task_id, worker="ki-1", attempt=2, progress={"epoch": 9}, now=T0 + 3)
    now = await store.get(task_id)
    assert (now.state, now.result, now.progress) == (State.RUNNING, None, None)


async def test_the_first_terminal_result_wins(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    assert await store.finish(task_id, attempt=attempt, state=State.SUCCEEDED, now=T0 + 1, result={"n": 1})
    assert not await store.finish(task_id, attempt=attempt, state=State.FAILED, now=T0 + 2, error="late")
    assert not await store.finish(task_id, attempt=attempt, state=State.SUCCEEDED, now=T0 + 2, result={"n": 2})
    assert await store.retry_or_fail(task_id, attempt=attempt, error="late", now=T0 + 2) is None
    assert not await store.release(task_id, attempt=attempt, now=T0 + 2)
    done = await store.get(task_id)
    assert (done.state, done.result, done.error, done.finished_at) == (State.SUCCEEDED, {"n": 1}, None, T0 + 1)


async def test_finish_needs_a_terminal_state(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    with pytest.raises(ValueError):
        await store.finish(task_id, attempt=attempt, state=State.QUEUED, now=T0)


async def test_retry_or_fail_requeues_until_the_attempts_run_out(store: TaskStore) -> None:
    task_id, attempt = await running(store, max_attempts=2)
    assert await store.retry_or_fail(task_id, attempt=attempt, error="first", now=T0 + 1) is State.QUEUED
    again = await store.get(task_id)
    assert (again.state, again.lease_owner, again.error) == (State.QUEUED, None, "first")
    second = await store.claim(task_id, worker="ki-1", now=T0 + 2, lease_seconds=LEASE)
    assert await store.retry_or_fail(task_id, attempt=second.attempts, error="second", now=T0 + 3) is State.FAILED
    failed = await store.get(task_id)
    assert (failed.state, failed.attempts, failed.error, failed.finished_at) == (State.FAILED, 2, "second", T0 + 3)


async def test_release_hands_the_task_back_without_counting_the_attempt(store: TaskStore) -> None:
    task_id, attempt = await running(store, max_attempts=1)
    assert await store.release(task_id, attempt=attempt, now=T0 + 1)
    back = await store.get(task_id)
    assert (back.state, back.attempts, back.lease_owner) == (State.QUEUED, 0, None)
    again = await store.claim(task_id, worker="ki-2", now=T0 + 2, lease_seconds=LEASE)
    assert again.attempts == 1  # still within max_attempts=1


async def test_request_cancel_in_every_state(store: TaskStore) -> None:
    pending, queued = (await store.create([new(), new()], now=T0))[0]
    await store.mark_queued([queued.id], now=T0)
    for task in (pending, queued):
        cancelled = await store.request_cancel(task.id, now=T0 + 1)
        assert (cancelled.state, cancelled.finished_at) == (State.CANCELLED, T0 + 1)
        assert await store.claim(task.id, worker="ki-1", now=T0 + 2, lease_seconds=LEASE) is None

    task_id, attempt = await running(store)
    marked = await store.request_cancel(task_id, now=T0 + 1)
    assert (marked.state, marked.cancel_requested) == (State.RUNNING, True)
    assert (await store.request_cancel(task_id, now=T0 + 2)).cancel_requested  # a repeat is harmless
    assert await store.finish(task_id, attempt=attempt, state=State.CANCELLED, now=T0 + 3)

    finished_id, finished_attempt = await running(store)
    await store.finish(finished_id, attempt=finished_attempt, state=State.SUCCEEDED, now=T0 + 1, result={})
    unchanged = await store.request_cancel(finished_id, now=T0 + 2)
    assert (unchanged.state, unchanged.cancel_requested, unchanged.updated_at) == (State.SUCCEEDED, False, T0 + 1)
    assert await store.request_cancel("00000000-0000-4000-8000-000000000000", now=T0) is None


async def test_a_failed_or_released_attempt_of_a_cancelled_task_is_not_requeued(store: TaskStore) -> None:
    failing, attempt = await running(store)
    await store.request_cancel(failing, now=T0 + 1)
    assert await store.retry_or_fail(failing, attempt=attempt, error="killed", now=T0 + 2) is State.CANCELLED
    releasing, attempt = await running(store)
    await store.request_cancel(releasing, now=T0 + 1)
    assert await store.release(releasing, attempt=attempt, now=T0 + 2)
    assert (await store.get(releasing)).state is State.CANCELLED


async def test_expired_leases_requeue_fail_or_cancel(store: TaskStore) -> None:
    requeued, _ = await running(store, max_attempts=3, lease=SHORT_LEASE)
    exhausted, _ = await running(store, max_attempts=1, lease=SHORT_LEASE)
    cancelling, _ = await running(store, max_attempts=3, lease=SHORT_LEASE)
    await store.request_cancel(cancelling, now=T0 + 1)
    alive, attempt = await running(store, now=T0 + LEASE)  # a lease of LEASE seconds from the database's now
    # The caller's clock says nothing about leases: far in its future, nothing has lapsed yet
    # unless the database's clock says so.
    await trio.sleep(2 * SHORT_LEASE)

    outcome = dict(await store.expire_leases(now=T0 + LEASE + 1))
    assert outcome == {requeued: State.QUEUED, exhausted: State.FAILED, cancelling: State.CANCELLED}
    assert (await store.get(requeued)).lease_owner is None
    assert (await store.get(exhausted)).error
    assert (await store.get(alive)).state is State.RUNNING
    assert await store.expire_leases(now=T0 + LEASE + 1) == []
    # The expired attempt's late result loses to the expiry.
    assert not await store.finish(requeued, attempt=1, state=State.SUCCEEDED, now=T0 + LEASE + 2)
    assert await store.finish(alive, attempt=attempt, state=State.SUCCEEDED, now=T0 + LEASE + 2)


async def test_progress_is_recorded_for_the_current_attempt_only(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    assert await store.progress(task_id, worker="ki-1", attempt=attempt, progress={"epoch": 1, "loss": 0.5}, now=T0)
    assert not await store.progress(task_id, worker="ki-2", attempt=attempt, progress={"epoch": 7}, now=T0)
    assert (await store.get(task_id)).progress == {"epoch": 1, "loss": 0.5}
    # JSON has no NaN: a diverged loss is stored as null instead of failing the report.
    assert await store.progress(task_id, worker="ki-1", attempt=attempt, progress={"loss": float("nan")}, now=T0)
    assert (await store.get(task_id)).progress == {"loss": None}
    await store.retry_or_fail(task_id, attempt=attempt, error="x", now=T0 + 1)
    second = await store.claim(task_id, worker="ki-2", now=T0 + 2, lease_seconds=LEASE)
    assert second.progress is None


async def test_ids_in_state_lists_the_oldest_first(store: TaskStore) -> None:
    old, _ = await store.create([new()], now=T0)
    newer, _ = await store.create([new()], now=T0 + 10)
    await store.create([new()], now=T0 + 100)
    assert await store.ids_in_state(State.PENDING, older_than=T0 + 50) == [old[0].id, newer[0].id]
    assert await store.ids_in_state(State.PENDING, older_than=T0 + 50, limit=1) == [old[0].id]
    assert await store.ids_in_state(State.QUEUED, older_than=T0 + 500) == []


async def test_counts_by_state_and_kind(store: TaskStore) -> None:
    tasks, _ = await store.create([new(kind="echo"), new(kind="echo"), new(kind="train")], now=T0)
    await store.mark_queued([tasks[0].id], now=T0)
    assert await store.counts() == {("queued", "echo"): 1, ("pending", "echo"): 1, ("pending", "train"): 1}


async def test_counts_follow_every_transition(store: TaskStore) -> None:
    """counts() reads kept counts, not the tasks table: after every kind of transition they still
    agree with the tasks themselves."""
    a, b, c, d, e, f = [(await running(store))[0] for _ in range(6)]
    await store.finish(a, attempt=1, state=State.SUCCEEDED, now=T0, result={})
    await store.finish(b, attempt=1, state=State.FAILED, now=T0, error="x")
    await store.retry_or_fail(c, attempt=1, error="crash", now=T0)  # queued again
    await store.release(d, attempt=1, now=T0)  # queued again
    await store.request_cancel(e, now=T0)  # running, cancel requested
    await store.finish(e, attempt=1, state=State.CANCELLED, now=T0, error="cancelled")
    await store.renew(f, worker="ki-1", attempt=1, now=T0, lease_seconds=LEASE)  # stays running
    pending, _ = await store.create([new(kind="train"), new(kind="train")], now=T0)
    await store.request_cancel(pending[0].id, now=T0)  # pending -> cancelled
    queued, _ = await store.create([new()], now=T0)
    await store.mark_queued([queued[0].id, queued[0].id, pending[1].id], now=T0)
    await store.request_cancel(queued[0].id, now=T0)  # queued -> cancelled
    await store.request_cancel(queued[0].id, now=T0)  # already cancelled: nothing moves
    for _ in range(2):
        await running(store, max_attempts=1, lease=SHORT_LEASE)  # its lease lapses first
    await trio.sleep(2 * SHORT_LEASE)
    assert [s for _, s in await store.expire_leases(now=T0 + 1, limit=1)] == [State.FAILED]  # out of attempts
    assert await store.finish(a, attempt=1, state=State.FAILED, now=T0) is False  # a late duplicate moves nothing

    tasks = (await store.list(limit=1000)).tasks
    expected: dict[tuple[str, str], int] = {}
    for t in tasks:
        expected[(t.state.value, t.kind)] = expected.get((t.state.value, t.kind), 0) + 1
    assert await store.counts() == expected
    assert set(expected) == {(s.value, "echo") for s in State if s is not State.PENDING} | {
        ("cancelled", "train"), ("queued", "train")}


# --- artifacts --------------------------------------------------------------------


async def test_artifacts_round_trip_byte_for_byte(store: TaskStore) -> None:
    (task,), _ = await store.create([new()], now=T0)
    blob = bytes(range(256)) * 4096 + b"\x00"
    await store.put_artifact(task.id, "model.safetensors", blob, now=T0)
    await store.put_artifact(task.id, "Metrics.json", b"{}", now=T0)
    assert await store.get_artifact(task.id, "model.safetensors") == blob
    await store.put_artifact(task.id, "Metrics.json", b'{"a":1}', now=T0 + 1)  # replaced
    assert await store.get_artifact(task.id, "Metrics.json") == b'{"a":1}'
    assert await store.get_artifact(task.id, "missing") is None
    assert (await store.get(task.id)).artifacts == ["Metrics.json", "model.safetensors"]


async def test_get_returns_each_tasks_own_artifact_names_none_one_or_several(store: TaskStore) -> None:
    """get reads a task and its artifact names together (one statement on PostgreSQL): each task
    has its own names, sorted, whatever characters they hold."""
    tasks, _ = await store.create([new(), new(), new()], now=T0)
    await store.put_artifact(tasks[1].id, "only", b"x", now=T0)
    names = ["z", "Model weights.pt", 'quote" and, comma', "ünïcode ✓", "back\\slash", "[]", "null"]
    for name in names:
        await store.put_artifact(tasks[2].id, name, b"y", now=T0)
    assert [(await store.get(t.id)).artifacts for t in tasks] == [[], ["only"], sorted(names)]
    memory = open_store("sqlite", sqlite_path=":memory:")  # no second connection: get goes the threaded way
    await memory.open()
    try:
        (task,), _ = await memory.create([new()], now=T0)
        assert (await memory.get(task.id)).artifacts == []
        await memory.put_artifact(task.id, "b", b"x", now=T0)
        await memory.put_artifact(task.id, "a", b"x", now=T0)
        assert (await memory.get(task.id)).artifacts == ["a", "b"]
    finally:
        await memory.close()


async def test_an_artifact_needs_an_existing_task(store: TaskStore) -> None:
    for task_id in ("00000000-0000-4000-8000-000000000000", "not-a-uuid"):
        with pytest.raises(StoreError):
            await store.put_artifact(task_id, "model", b"x", now=T0)


# --- lifetime, migrations and concurrency -----------------------------------------


async def test_a_reopened_store_keeps_its_data_and_schema_version(
    store: TaskStore, make_store: Callable[[], TaskStore]
) -> None:
    (task,), _ = await store.create([new()], now=T0)
    assert await store.schema_version() == LATEST_VERSION
    await store.close()
    await store.open()
    assert (await store.get(task.id)).id == task.id
    assert await store.schema_version() == LATEST_VERSION
    other = make_store()
    await other.open()
    try:
        assert (await other.get(task.id)).id == task.id
        assert await other.schema_version() == LATEST_VERSION
    finally:
        await other.close()


async def test_twenty_concurrent_claims_have_exactly_one_winner(
    store: TaskStore, make_store: Callable[[], TaskStore]
) -> None:
    # Several stores on the same database: the race is decided by the database, not by one process's lock.
    others = [make_store() for _ in range(3)]
    for other in others:
        await other.open()
    stores = [store, *others]
    try:
        (task,), _ = await store.create([new()], now=T0)
        await store.mark_queued([task.id], now=T0)
        winners = []

        async def claim(i: int) -> None:
            got = await stores[i % len(stores)].claim(task.id, worker=f"ki-{i}", now=T0, lease_seconds=LEASE)
            if got is not None:
                winners.append(got)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(claim, i)
        assert len(winners) == 1
        final = await store.get(task.id)
        assert (final.attempts, final.lease_owner) == (1, winners[0].lease_owner)
    finally:
        for other in others:
            await other.close()


async def test_a_sqlite_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    first = open_store("sqlite", sqlite_path=path)
    await first.open()
    await first.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    conn.close()
    with pytest.raises(StoreError, match="version 999"):
        await open_store("sqlite", sqlite_path=path).open()


async def test_a_relaxed_sqlite_write_runs_on_the_event_loop_and_never_waits_there_for_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, it runs without a worker thread; with another process holding the write lock it goes
    the threaded way, waiting there (busy timeout) while the event loop runs on."""
    path = tmp_path / "tasks.sqlite3"
    store = open_store("sqlite", sqlite_path=path)
    await store.open()
    threads = 0
    to_thread = trio.to_thread.run_sync

    async def counted(*args, **kwargs):
        nonlocal threads
        threads += 1
        return await to_thread(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    other = sqlite3.connect(path, isolation_level=None)  # another process's connection, as far as SQLite knows
    try:
        (first,), _ = await store.create([new(payload=1)], now=T0, relaxed=True)
        assert threads == 0
        other.execute("BEGIN IMMEDIATE")
        gaps: list[float] = []
        async with trio.open_nursery() as nursery:
            async def tick() -> None:
                last = trio.current_time()
                while True:
                    await trio.sleep(0.01)
                    gaps.append(trio.current_time() - last)
                    last = trio.current_time()

            async def release() -> None:
                await trio.sleep(0.5)
                other.execute("COMMIT")

            nursery.start_soon(tick)
            nursery.start_soon(release)
            await trio.sleep(0.05)  # ticking
            started = time.monotonic()
            (second,), _ = await store.create([new(payload=2)], now=T0, relaxed=True)
            waited = time.monotonic() - started
            nursery.cancel_scope.cancel()
        assert threads == 1 and 0.3 < waited < 3 and len(gaps) > 20 and max(gaps) < 0.2, (threads, waited, max(gaps))
        assert [(await store.get(t.id)).spec["payload"] for t in (first, second)] == [1, 2]
    finally:
        other.close()
        await store.close()


async def test_the_sqlite_log_is_checkpointed_every_so_many_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wal_autocheckpoint is off (a checkpoint must not run on the event loop): the store's own
    checkpoints keep the log from growing with every write, relaxed or not."""
    from p2pnn.store import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "tasks.sqlite3"
    store = open_store("sqlite", sqlite_path=path)
    await store.open()
    wal = Path(f"{path}-wal")
    try:
        sizes = []
        for i in range(300):
            await store.create([new(payload="x" * 2000)], now=T0, relaxed=i % 2 == 0)
            if i in (49, 299):
                sizes.append(wal.stat().st_size)
        assert sizes[1] <= sizes[0] * 1.5, sizes  # without checkpoints: six times as large
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_postgres_database_newer_than_the_code_is_refused(postgres_url: str, pg_schema: str) -> None:
    first = open_store("postgres", url=postgres_url, schema=pg_schema)
    await first.open()
    await first.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (999, 'from the future', 0)").format(
                sql.Identifier(pg_schema, "schema_migrations")
            )
        )
    with pytest.raises(StoreError, match="version 999"):
        await open_store("postgres", url=postgres_url, schema=pg_schema).open()


@pytest.mark.postgres
async def test_nodes_opening_a_fresh_database_together_migrate_it_once(postgres_url: str, pg_schema: str) -> None:
    stores = [open_store("postgres", url=postgres_url, schema=pg_schema, pool_size=1) for _ in range(4)]
    try:
        async with trio.open_nursery() as nursery:
            for s in stores:
                nursery.start_soon(s.open)
        assert [await s.schema_version() for s in stores] == [LATEST_VERSION] * 4
    finally:
        for s in stores:
            await s.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version FROM {}").format(sql.Identifier(pg_schema, "schema_migrations"))
        ).fetchall()
    assert sorted(r[0] for r in rows) == list(range(1, LATEST_VERSION + 1))


# --- PostgreSQL serialization failures (SQLSTATE 40001) ---------------------------


@pytest.fixture
def counter_pool(postgres_url: str, pg_schema: str) -> Iterator[ConnectionPool]:
    """A pool on a one-row table ``counter(k=1, v=0)`` in the test's own schema."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
        conn.execute(sql.SQL("CREATE TABLE {} (k INT PRIMARY KEY, v INT)").format(sql.Identifier(pg_schema, "counter")))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 0)").format(sql.Identifier(pg_schema, "counter")))
    pool = ConnectionPool(postgres_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False)
    pool.open(wait=True, timeout=10)
    try:
        yield pool
    finally:
        pool.close()


def _conflicting_increment(url: str, table: sql.Composable, conflict_on: Callable[[int], bool]):
    """An increment in a SERIALIZABLE transaction that, on the calls ``conflict_on`` picks, lets a
    second SERIALIZABLE transaction update the row between its read and its write."""
    calls = []

    def increment(conn: psycopg.Connection) -> int:
        calls.append(1)
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        (value,) = conn.execute(sql.SQL("SELECT v FROM {} WHERE k = 1").format(table)).fetchone()
        if conflict_on(len(calls)):
            with psycopg.connect(url) as other:
                other.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                other.execute(sql.SQL("UPDATE {} SET v = v + 100 WHERE k = 1").format(table))
                other.commit()
        conn.execute(sql.SQL("UPDATE {} SET v = %s WHERE k = 1").format(table), (value + 1,))
        return value

    return increment, calls


@pytest.mark.postgres
async def test_a_serialization_failure_is_retried(
    postgres_url: str, pg_schema: str, counter_pool: ConnectionPool
) -> None:
    table = sql.Identifier(pg_schema, "counter")
    increment, calls = _conflicting_increment(postgres_url, table, lambda call: call == 1)
    seen = await run_transaction(counter_pool, increment)
    assert (len(calls), seen) == (2, 100)  # the first try hit 40001; the retry read the other's write
    with counter_pool.connection() as conn:
        assert conn.execute(sql.SQL("SELECT v FROM {}").format(table)).fetchone() == (101,)


@pytest.mark.postgres
async def test_serialization_failures_give_up_after_max_attempts(
    postgres_url: str, pg_schema: str, counter_pool: ConnectionPool
) -> None:
    table = sql.Identifier(pg_schema, "counter")
    increment, calls = _conflicting_increment(postgres_url, table, lambda call: True)
    with pytest.raises(StoreError, match="40001"):
        await run_transaction(counter_pool, increment, max_attempts=3)
    assert len(calls) == 3


@pytest.mark.postgres
async def test_a_cancelled_transaction_is_abandoned_and_its_connection_reused(postgres_url: str) -> None:
    pool = ConnectionPool(postgres_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False)
    pool.open(wait=True, timeout=10)
    try:
        with trio.move_on_after(0.2) as scope:
            await run_transaction(pool, lambda conn: conn.execute("SELECT pg_sleep(30)"))
        assert scope.cancelled_caught
        # The only connection comes back, idle and usable, only if the server-side cancel reached the sleep.
        with trio.fail_after(5):
            assert await run_transaction(pool, lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
    finally:
        pool.close()


@pytest.mark.postgres
async def test_a_dead_pooled_connection_costs_one_failed_transaction(postgres_url: str, pg_schema: str) -> None:
    """Connections are not checked on checkout: a connection the server dropped fails the one
    transaction that meets it (StoreError), and the pool then hands out live connections."""
    store = open_store("postgres", url=postgres_url, schema=pg_schema, pool_size=2)
    await store.open()
    try:
        (task,), _ = await store.create([new()], now=T0)
        pids = set()
        for _ in range(4):  # whichever pooled connections exist by now
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(lambda: _remember_pid(store, pids))
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        failures = 0

        async def read() -> str:  # on the pool (a task read by id takes the lane: see the next test)
            return (await store._transact(lambda db: db.one("SELECT CAST(id AS TEXT) FROM tasks"), write=False))[0]

        for _ in range(len(pids) + 2):
            try:
                assert await read() == task.id
            except StoreError:
                failures += 1
        assert failures == 1  # the first error makes the pool check (and drop) every idle connection
        assert await read() == task.id
    finally:
        await store.close()


@pytest.fixture
async def pg_store(postgres_url: str, pg_schema: str) -> AsyncIterator[TaskStore]:
    """An opened PostgreSQL store on a schema of its own; closed afterwards."""
    store = open_store("postgres", url=postgres_url, schema=pg_schema)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _lane_pid(store: TaskStore) -> int:
    return (await store._statement("SELECT pg_backend_pid()", keyed=True))[0][0]


@pytest.mark.postgres
async def test_a_lost_lane_costs_no_statement_and_is_made_again(pg_store: TaskStore, postgres_url: str) -> None:
    """A keyed statement whose lane connection the server dropped runs on the pool instead; the lane
    is made again once LANE_RETRY_SECONDS passed, and keyed statements take it again."""
    from p2pnn.store.postgres import LANE_RETRY_SECONDS

    store = pg_store
    (task,), _ = await store.create([new()], now=T0)
    before = await _lane_pid(store)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (before,))
    assert (await store.get(task.id)).id == task.id  # no error: on the pool
    assert store._lanes[False].lane is None
    with trio.fail_after(LANE_RETRY_SECONDS + 10):
        while store._lanes[False].lane is None:
            assert (await store.get(task.id)).id == task.id
            await trio.sleep(0.05)
    after = await _lane_pid(store)
    assert after != before
    pooled = (await store._statement("SELECT pg_backend_pid()"))[0][0]
    assert pooled != after  # a statement not keyed never takes the lane


@pytest.mark.postgres
async def test_keyed_statements_that_find_the_lane_busy_take_the_pool(pg_store: TaskStore) -> None:
    store = pg_store
    tasks, _ = await store.create([new(payload=i) for i in range(20)], now=T0)
    found: dict[str, Task] = {}

    async def get(task_id: str) -> None:
        found[task_id] = await store.get(task_id)

    async with trio.open_nursery() as nursery:
        for t in tasks:
            nursery.start_soon(get, t.id)
    assert {tid: t.spec["payload"] for tid, t in found.items()} == {t.id: t.spec["payload"] for t in tasks}
    assert store._lanes[False].lane is not None and not store._lanes[False].lane.busy


@pytest.mark.postgres
async def test_a_lane_statement_cancelled_midway_ends_on_the_server_too(
    pg_store: TaskStore, postgres_url: str, pg_schema: str
) -> None:
    """What the server made of an interrupted statement is unknown: the lane's connection is closed,
    which ends the statement there, and the next keyed statement runs as usual."""
    store = pg_store
    (task,), _ = await store.create([new()], now=T0)
    marker = f"lane-{pg_schema}"
    with trio.move_on_after(0.5) as waited:
        await store._statement(f"SELECT pg_sleep(30), '{marker}'", keyed=True)
    assert waited.cancelled_caught and store._lanes[False].lane is None

    def sleeping() -> int:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE state = 'active' AND position(%s in query) > 0 "
                "AND pid <> pg_backend_pid()", (marker,)
            ).fetchone()[0]

    with trio.fail_after(10):
        while await trio.to_thread.run_sync(sleeping):
            await trio.sleep(0.1)
    assert (await store.get(task.id)).id == task.id


@pytest.mark.postgres
async def test_the_lane_plans_its_statements_once_and_takes_the_primary_key(
    pg_store: TaskStore, postgres_url: str, pg_schema: str
) -> None:
    """The lane's one plan per statement is made for any values: it must take the primary key even
    where the statistics say every task is pending (the failure PREPARE_THRESHOLD's comment records)."""
    from psycopg import ClientCursor

    from p2pnn.store import FinishUnclaimedOp
    from p2pnn.store._sql import GET_TASK, POSTGRES, _finish_unclaimed_counted
    from p2pnn.store.postgres import LANE_PLANS, _numbered

    store = pg_store
    tasks, _ = await store.create([new(payload=i) for i in range(500)], now=T0)
    await store._transact(lambda db: db.run("ANALYZE tasks"), write=True)  # every task pending
    await store.mark_queued([t.id for t in tasks[:250]], now=T0)
    for t in tasks[:6]:
        op = FinishUnclaimedOp(t.id, "ki-1", t.spec, State.SUCCEEDED, started_at=T0, result={})
        assert await store.apply([op], now=T0) == [True]
        assert (await store.get(t.id)).state is State.SUCCEEDED
    plans = await store._statement(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements WHERE name LIKE 'p2pnn_lane_%'",
        keyed=True,
    )
    runs = {text: (generic, custom) for text, generic, custom in plans}
    # Planned for any values, never for each run.
    assert runs[_numbered(GET_TASK).decode()] == (6, 0)
    assert [n for text, n in runs.items() if text.startswith("WITH v ")] == [(6, 0)]  # the finishes

    t = tasks[300]
    op = FinishUnclaimedOp(t.id, "ki-1", t.spec, State.SUCCEEDED, started_at=T0, result={})
    statements = [(GET_TASK, (t.id,)), _finish_unclaimed_counted(POSTGRES, [(t.id, op)], T0, "p2pnn_plan_test")]

    def generic_plans() -> list[str]:
        with psycopg.connect(postgres_url, autocommit=True, cursor_factory=ClientCursor) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
            conn.execute(LANE_PLANS)
            out = []
            for i, (text, params) in enumerate(statements):
                conn.execute(f"PREPARE lane_{i} AS {_numbered(text).decode()}")
                args = ", ".join(["%s"] * len(params))
                out.append("\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE lane_{i}({args})", params)))
            return out

    for plan in await trio.to_thread.run_sync(generic_plans):
        assert "tasks_pkey" in plan and "tasks_by_state" not in plan, plan


async def _remember_pid(store: TaskStore, pids: set[int]) -> None:
    pids.add((await store._transact(lambda db: db.one("SELECT pg_backend_pid()"), write=False))[0])
    await trio.sleep(0.05)


async def test_apply_runs_claims_and_finishes_in_one_transaction_each_as_alone(store: TaskStore) -> None:

    done_id, attempt = await running(store)
    taken_id, _ = await running(store)
    (fresh,), _ = await store.create([new(kind="train")], now=T0)
    await store.mark_queued([fresh.id], now=T0)
    out = await store.apply([
        FinishOp(done_id, attempt, State.SUCCEEDED, result={"ok": 1}),
        ClaimOp(fresh.id, "ki-2", LEASE),
        ClaimOp(taken_id, "ki-2", LEASE),  # running already: refused
        FinishOp(taken_id, attempt + 1, State.FAILED, error="x"),  # not its attempt: refused
        ClaimOp("not-a-uuid", "ki-2", LEASE),
    ], now=T0 + 1)
    assert out[0] is True and out[2] is None and out[3] is False and out[4] is None
    assert isinstance(out[1], Task) and out[1].state is State.RUNNING and out[1].lease_owner == "ki-2"
    assert (await store.get(done_id)).result == {"ok": 1}
    assert (await store.apply([FinishOp(done_id, attempt, State.FAILED)], now=T0 + 2)) == [False]  # first result won
    assert await store.counts() == {("succeeded", "echo"): 1, ("running", "echo"): 1, ("running", "train"): 1}
    with pytest.raises(ValueError):
        await store.apply([FinishOp(taken_id, 1, State.RUNNING)], now=T0)


async def _counts_of_tasks(store: TaskStore) -> dict[tuple[str, str], int]:
    """What counts() should say: the tasks table itself, grouped."""
    rows = await store._transact(lambda db: db.rows("SELECT state, kind, COUNT(*) FROM tasks GROUP BY state, kind"),
                                 write=False)
    return {(r[0], r[1]): int(r[2]) for r in rows}


async def test_apply_claims_queued_and_pending_tasks_together_and_counts_each_from_its_state(store: TaskStore) -> None:
    from p2pnn.store import ClaimOp

    tasks, _ = await store.create([new(), new(), new(kind="train"), new(kind="train")], now=T0)
    await store.mark_queued([tasks[0].id, tasks[2].id], now=T0)  # two queued, two still pending
    gone = (await store.create([new()], now=T0))[0][0]
    await store.request_cancel(gone.id, now=T0)
    out = await store.apply([ClaimOp(t.id, "ki-1", LEASE) for t in tasks] + [ClaimOp(gone.id, "ki-1", LEASE)],
                            now=T0 + 1)
    assert [t.id for t in out[:4]] == [t.id for t in tasks] and out[4] is None
    assert all(t.state is State.RUNNING and t.attempts == 1 and t.lease_owner == "ki-1" for t in out[:4])
    assert await store.counts() == await _counts_of_tasks(store) == {
        ("running", "echo"): 2, ("running", "train"): 2, ("cancelled", "echo"): 1}


async def test_apply_finishes_the_current_attempt_and_refuses_a_stale_one_in_the_same_group(store: TaskStore) -> None:
    from p2pnn.store import ClaimOp, FinishOp

    current, attempt = await running(store)
    stale, first = await running(store, lease=SHORT_LEASE)
    await trio.sleep(2 * SHORT_LEASE)
    assert await store.expire_leases(now=T0 + 1) == [(stale, State.QUEUED)]
    again = await store.claim(stale, worker="ki-2", now=T0 + 1, lease_seconds=LEASE)
    await store.put_artifact(stale, "ckpt", b"x", now=T0 + 1)
    other, _ = await running(store)
    out = await store.apply([
        FinishOp(stale, first, State.SUCCEEDED, result={"late": True}, worker="ki-1"),  # the lapsed attempt
        FinishOp(current, attempt, State.SUCCEEDED, result={"ok": 1}, worker="ki-1"),
        FinishOp(other, 1, State.FAILED, error="x", worker="ki-9"),  # not its lease holder
    ], now=T0 + 2)
    assert out == [False, True, False]
    assert (await store.get(stale)).result is None and (await store.get(stale)).attempts == again.attempts == 2
    assert (await store.get(current)).result == {"ok": 1}
    assert (await store.get(other)).state is State.RUNNING
    # A re-attempt claimed in a group learns the artifacts the earlier attempt left.
    await store.release(stale, attempt=2, now=T0 + 3, worker="ki-2")
    (taken,) = await store.apply([ClaimOp(stale, "ki-1", LEASE)], now=T0 + 3)
    assert taken.artifacts == ["ckpt"] and taken.attempts == 2
    assert await store.counts() == await _counts_of_tasks(store)


async def test_apply_finishes_cancelled_only_where_a_cancel_was_requested(store: TaskStore) -> None:
    from p2pnn.store import FinishOp

    asked, _ = await running(store)
    unasked, _ = await running(store)
    await store.request_cancel(asked, now=T0)
    out = await store.apply([
        FinishOp(unasked, 1, State.CANCELLED, error="cancelled", worker="ki-1"),
        FinishOp(asked, 1, State.CANCELLED, error="cancelled", worker="ki-1"),
    ], now=T0 + 1)
    assert out == [False, True]
    assert (await store.get(unasked)).state is State.RUNNING
    assert (await store.get(asked)).state is State.CANCELLED
    assert await store.counts() == await _counts_of_tasks(store)


async def test_apply_mixing_claims_and_finishes_keeps_counts_equal_to_the_tasks(store: TaskStore) -> None:
    """A group of every kind of step, twice over (the second group finds most steps refused),
    and one naming a task twice (applied step by step: the first claim wins)."""
    from p2pnn.store import ClaimOp, FinishOp

    runs = [await running(store) for _ in range(4)]
    fresh, _ = await store.create([new(kind="train") for _ in range(4)], now=T0)
    await store.mark_queued([fresh[0].id, fresh[1].id], now=T0)
    await store.request_cancel(runs[3][0], now=T0)
    group = [
        FinishOp(runs[0][0], 1, State.SUCCEEDED, result={"n": 0}, worker="ki-1"),
        FinishOp(runs[1][0], 1, State.FAILED, error="boom", worker="ki-1"),
        FinishOp(runs[2][0], 1, State.SUCCEEDED, result={"loss": float("nan")}),
        FinishOp(runs[3][0], 1, State.CANCELLED, error="cancelled", worker="ki-1"),
    ] + [ClaimOp(t.id, "ki-2", LEASE) for t in fresh]
    first = await store.apply(group, now=T0 + 1)
    assert first[:4] == [True] * 4 and all(isinstance(t, Task) for t in first[4:])
    assert (await store.get(runs[2][0])).result == {"loss": None}
    assert await store.apply(group, now=T0 + 2) == [False] * 4 + [None] * 4
    (late,), _ = await store.create([new()], now=T0)
    twice = await store.apply([ClaimOp(late.id, "ki-1", LEASE), ClaimOp(late.id, "ki-2", LEASE)], now=T0 + 3)
    assert twice[0].lease_owner == "ki-1" and twice[1] is None
    assert await store.counts() == await _counts_of_tasks(store) == {
        ("succeeded", "echo"): 2, ("failed", "echo"): 1, ("cancelled", "echo"): 1, ("running", "train"): 4,
        ("running", "echo"): 1}


async def test_apply_records_an_unclaimed_run_only_while_the_task_waits_and_only_for_its_spec(store: TaskStore) -> None:
    """A short task run straight from its message: recorded as the next attempt, as a claim and a
    finish would have left it, unless the task was cancelled, claimed or finished meanwhile, or the
    message's spec is not the stored one."""
    from p2pnn.store import ClaimOp, FinishOp, FinishUnclaimedOp

    def ran(task: Task, *, spec: dict | None = None, state: State = State.SUCCEEDED) -> FinishUnclaimedOp:
        return FinishUnclaimedOp(task.id, "ki-1", spec if spec is not None else task.spec, state, started_at=T0 + 0.5,
                                 result={"payload": task.spec["payload"]} if state is State.SUCCEEDED else None,
                                 error=None if state is State.SUCCEEDED else "boom")

    tasks, _ = await store.create([new(payload=i) for i in range(7)], now=T0)
    queued, pending, failing, cancelled, claimed, forged, done = tasks
    await store.mark_queued([t.id for t in tasks if t is not pending], now=T0)
    await store.request_cancel(cancelled.id, now=T0)
    await store.claim(claimed.id, worker="ki-2", now=T0, lease_seconds=LEASE)
    out = await store.apply([
        ran(queued), ran(pending), ran(failing, state=State.FAILED), ran(cancelled), ran(claimed),
        ran(forged, spec={**forged.spec, "payload": "forged"}),
    ], now=T0 + 1)
    assert out == [True, True, True, False, False, False]
    for task, result in ((queued, {"payload": 0}), (pending, {"payload": 1})):
        got = await store.get(task.id)
        assert (got.state, got.result, got.attempts, got.lease_owner) == (State.SUCCEEDED, result, 1, "ki-1")
        assert (got.started_at, got.finished_at, got.lease_expires_at) == (T0 + 0.5, T0 + 1, None)
    assert (await store.get(failing.id)).state is State.FAILED and (await store.get(failing.id)).error == "boom"
    assert (await store.get(cancelled.id)).state is State.CANCELLED
    assert (await store.get(claimed.id)).lease_owner == "ki-2" and (await store.get(claimed.id)).state is State.RUNNING
    assert (await store.get(forged.id)).state is State.QUEUED and (await store.get(forged.id)).attempts == 0
    # With claims and finishes in the same group; then once more, where the first result has won.
    (late,), _ = await store.create([new(kind="train")], now=T0)
    mixed = [ran(done), ClaimOp(late.id, "ki-1", LEASE), ClaimOp(forged.id, "ki-1", LEASE),
             FinishOp(claimed.id, 1, State.SUCCEEDED, result={}, worker="ki-2")]
    first = await store.apply(mixed, now=T0 + 2)
    assert first[0] is True and isinstance(first[1], Task) and isinstance(first[2], Task) and first[3] is True
    assert await store.apply([ran(done), ran(queued)], now=T0 + 3) == [False, False]
    twice = await store.apply([ran(forged), ran(late), ran(late)], now=T0 + 3)  # both running by now
    assert twice == [False, False, False]
    assert await store.counts() == await _counts_of_tasks(store) == {
        ("succeeded", "echo"): 4, ("failed", "echo"): 1, ("cancelled", "echo"): 1, ("running", "echo"): 1,
        ("running", "train"): 1}


async def test_unclaimed_finishes_alone_keep_counts_equal_to_the_tasks(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups of unclaimed finishes alone, with results recorded and refused, over kinds that sort
    differently by code point and by a language's rules: the counts are the tasks table's after
    each, on PostgreSQL both in the one statement that counts them (up to IDS_PER_NOTIFY tasks,
    here lowered to 6) and in a transaction beyond."""
    from p2pnn.store import FinishUnclaimedOp, _sql

    monkeypatch.setattr(_sql, "IDS_PER_NOTIFY", 6)

    def ran(task: Task, *, spec: dict | None = None, state: State = State.SUCCEEDED) -> FinishUnclaimedOp:
        return FinishUnclaimedOp(task.id, "ki-1", task.spec if spec is None else spec, state, started_at=T0,
                                 result={"ok": True} if state is State.SUCCEEDED else None)

    kinds = ["echo", "train", "a_c", "ab", "Zed"]
    for size in (2, 3, 4):  # with three refused: one statement, one at the limit, a transaction beyond
        tasks, _ = await store.create([new(kind=kinds[i % len(kinds)]) for i in range(size + 3)], now=T0)
        await store.mark_queued([t.id for t in tasks[::2]], now=T0)  # queued ones and pending ones
        gone, taken, forged = tasks[size:]
        await store.request_cancel(gone.id, now=T0)
        assert await store.claim(taken.id, worker="ki-2", now=T0, lease_seconds=LEASE) is not None
        group = [ran(t, state=State.FAILED if i % 2 else State.SUCCEEDED) for i, t in enumerate(tasks[:size])]
        group += [ran(gone), ran(taken), ran(forged, spec={"forged": True})]
        assert await store.apply(group, now=T0 + 1) == [True] * size + [False] * 3
        assert await store.counts() == await _counts_of_tasks(store)
        # Nothing recorded: every task is done, claimed or gone by now, or its id names none.
        again = group + [FinishUnclaimedOp("not-a-uuid", "ki-1", {}, State.SUCCEEDED, T0)]
        assert await store.apply(again, now=T0 + 2) == [False] * (size + 4)
        assert await store.counts() == await _counts_of_tasks(store)
        failed = await store.get(tasks[1].id)
        assert (failed.state, failed.attempts, failed.lease_owner, failed.finished_at) == (
            State.FAILED, 1, "ki-1", T0 + 1)
        assert (await store.get(forged.id)).attempts == 0
    assert await store.counts() == {
        ("succeeded", "echo"): 3, ("succeeded", "a_c"): 2, ("failed", "train"): 3, ("failed", "ab"): 1,
        ("cancelled", "a_c"): 1, ("cancelled", "ab"): 1, ("cancelled", "Zed"): 1,
        ("running", "ab"): 1, ("running", "Zed"): 1, ("running", "echo"): 1,
        ("queued", "Zed"): 1, ("queued", "train"): 1, ("pending", "echo"): 1,
    }


async def test_postgresql_prepares_repeated_statements_but_plans_each_run_for_its_values(store: TaskStore) -> None:
    """Prepared statements only with custom plans: a generic plan once read every task in a state
    through the (state, ...) index instead of taking the primary key."""
    from p2pnn.store.postgres import PostgresTaskStore

    if not isinstance(store, PostgresTaskStore):
        return
    tasks, _ = await store.create([new() for _ in range(3)], now=T0)

    def gets_thrice(db):
        for t in tasks:
            db.one("SELECT state FROM tasks WHERE id = ?", (t.id,))
        modes = db.one("SHOW plan_cache_mode")[0]
        prepared = db.rows(
            "SELECT statement FROM pg_prepared_statements WHERE position('SELECT state FROM tasks' in statement) = 1"
        )
        return modes, len(prepared)

    assert await store._transact(gets_thrice, write=False) == ("force_custom_plan", 1)


async def test_postgresql_finds_a_groups_tasks_by_primary_key_whatever_the_statistics(store: TaskStore) -> None:
    """Statistics gathered while every task was pending once made PostgreSQL look a group's tasks up
    through a (state, ...) index, reading every entry that state ever had."""
    from p2pnn.store import ClaimOp, FinishOp
    from p2pnn.store._sql import POSTGRES, Db, _apply_together, _counted
    from p2pnn.store.postgres import PostgresTaskStore

    if not isinstance(store, PostgresTaskStore):
        return
    tasks, _ = await store.create([new() for _ in range(500)], now=T0)
    await store._transact(lambda db: db.run("ANALYZE tasks"), write=True)  # every task pending, none running
    await store.mark_queued([t.id for t in tasks], now=T0)
    held = await store.apply([ClaimOp(t.id, "ki-1", LEASE) for t in tasks[:3]], now=T0)
    group = [FinishOp(t.id, 1, State.SUCCEEDED, worker="ki-1") for t in held]
    group += [ClaimOp(t.id, "ki-1", LEASE) for t in tasks[3:6]]
    seen: list[tuple[str, tuple]] = []

    class Recording(Db):
        """Keeps each query it runs, to be explained afterwards."""

        def rows(self, text, params=()):
            seen.append((self.dialect.sql(text), tuple(params)))
            return super().rows(text, params)

    def apply_recorded(db: Db):
        rec = Recording(db.conn, POSTGRES)
        return _counted(rec, lambda moves: _apply_together(rec, group, [op.task_id for op in group], T0, moves))

    def plans(db: Db) -> list[str]:
        return ["\n".join(r[0] for r in db.conn.execute("EXPLAIN " + text, params).fetchall())
                for text, params in seen if text.startswith("WITH")]

    out = await store._transact(apply_recorded, write=True)
    assert out[:3] == [True] * 3 and all(isinstance(t, Task) for t in out[3:])
    found = await store._transact(plans, write=False)
    assert len(found) == 2  # the claims and the finishes
    for plan in found:
        assert "tasks_pkey" in plan and "tasks_by_state" not in plan, plan


async def test_a_relaxed_transaction_alone_commits_without_waiting_for_the_disk(store: TaskStore) -> None:
    """Inside a relaxed transaction the commit does not wait for the disk (PostgreSQL:
    synchronous_commit off; SQLite on a file: synchronous NORMAL); the setting does not leak into
    the next transaction on the same connection."""
    from p2pnn.store.postgres import PostgresTaskStore

    if isinstance(store, PostgresTaskStore):
        setting, strict, loose = "SHOW synchronous_commit", "on", "off"
        assert store._relaxed_commit == "SET LOCAL synchronous_commit = off"
    else:
        setting, strict, loose = "PRAGMA synchronous", 2, 1  # FULL, NORMAL
        if store._synchronous != "full":
            strict = loose

    async def read(relaxed: bool) -> object:
        return await store._transact(lambda db: db.rows(setting)[0][0], write=True, relaxed=relaxed)

    assert [await read(False), await read(True), await read(False), await read(True)] == [strict, loose, strict, loose]
    assert await read(False) == strict


async def test_a_transaction_that_raises_rolls_back_and_leaves_its_connection_usable(
    make_store: Callable[[], TaskStore]
) -> None:
    """Relaxed or not, an error inside a transaction (raised by the code, or by a failing statement)
    undoes its writes, and the connection (PostgreSQL: the pool's only one) goes on serving the
    next transactions, with nothing of the failed one's setting left."""
    from p2pnn.store.postgres import PostgresTaskStore

    store = make_store()
    postgres = isinstance(store, PostgresTaskStore)
    if postgres:
        store._pool_size = 1  # every transaction below meets the same connection
    await store.open()
    try:
        (task,), _ = await store.create([new()], now=T0)

        def mark_then(fail: Callable[[object], None]):
            def fn(db):
                db.run("UPDATE tasks SET owner = 'mallory' WHERE id = ?", (task.id,))
                fail(db)

            return fn

        def bad_statement(db) -> None:
            db.run("SELECT no_such_column FROM tasks")

        def refusal(db) -> None:
            raise IdempotencyConflict("refused by the code")

        for relaxed in (True, False):
            with pytest.raises(StoreError):
                await store._transact(mark_then(bad_statement), write=True, relaxed=relaxed)
            with pytest.raises(IdempotencyConflict):
                await store._transact(mark_then(refusal), write=True, relaxed=relaxed)
            assert (await store.get(task.id)).owner == "alice"
        assert await store.mark_queued([task.id], now=T0) == 1  # a relaxed transaction after them commits
        assert (await store.get(task.id)).state is State.QUEUED
        assert await store.counts() == {("queued", "echo"): 1}
        if postgres:
            setting = await store._transact(lambda db: db.rows("SHOW synchronous_commit")[0][0], write=True)
            assert setting == "on"
    finally:
        await store.close()


async def test_creates_of_any_size_are_counted(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is inserted and counted in one statement on PostgreSQL, up to MAX_INSERT_WITH_COUNT
    tasks, and row by row beyond (here lowered to 2): every way gives the same tasks and counts."""
    from p2pnn.store import _sql

    monkeypatch.setattr(_sql, "MAX_INSERT_WITH_COUNT", 2)
    made = []
    for size, kind in ((1, "echo"), (2, "train"), (3, "echo")):
        tasks, _ = await store.create([new(kind=kind) for _ in range(size)], now=T0, relaxed=size == 2)
        made += tasks
    assert await store.create([], now=T0) == ([], True)
    assert [await store.get(t.id) for t in made] == made
    assert await store.counts() == await _counts_of_tasks(store) == {("pending", "echo"): 4, ("pending", "train"): 2}


async def _round_trips(store: TaskStore, trace_path: Path, call: Callable[[], Awaitable[object]]) -> tuple[int, ...]:
    """How many times ``call`` waited for the server on the store's only pooled connection, on its
    lane's and on its relaxed lane's: libpq's trace of what each sent, where each Query and each
    Sync message waits for the server's answer."""
    with store._pool.connection() as conn:
        pooled = conn.pgconn
    conns = [pooled] + [store._lanes[relaxed].lane.conn.pgconn for relaxed in (False, True)]
    paths = [trace_path.with_suffix(f".{i}") for i in range(len(conns))]
    files = [open(path, "w") for path in paths]
    try:
        for pgconn, file in zip(conns, files):
            pgconn.trace(file.fileno())
            pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        try:
            await call()
        finally:
            for pgconn in conns:
                pgconn.untrace()  # flushes the trace
    finally:
        for file in files:
            file.close()

    def waits(path: Path) -> int:
        sent = [line.split("\t")[2].strip() for line in path.read_text().splitlines() if line.startswith("F\t")]
        return sum(1 for message in sent if message in ("Query", "Sync"))

    return tuple(waits(path) for path in paths)


@pytest.mark.postgres
async def test_postgresql_common_calls_take_the_fewest_round_trips(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """A read of one statement, and a lease renewal, go without BEGIN and COMMIT; a relaxed
    transaction sends its setting with BEGIN; a create counts its tasks in the insert's statement;
    a group of unclaimed finishes is recorded, counted and announced in one statement, without
    BEGIN and COMMIT, whether it records results or none."""
    from p2pnn.store import FinishUnclaimedOp
    from p2pnn.store.postgres import PostgresTaskStore

    store = PostgresTaskStore(postgres_url, schema=pg_schema, pool_size=1)
    await store.open()
    try:
        assert store._finished_channel is not None  # the statement notifies too
        task_id, attempt = await running(store)
        pending = [t.id for t in (await store.create([new() for _ in range(4)], now=T0))[0]]
        waiting = (await store.create([new(kind=("echo", "train")[i % 2]) for i in range(12)], now=T0))[0]
        await store.mark_queued([t.id for t in waiting[::3]], now=T0)

        def ran(task: Task) -> FinishUnclaimedOp:
            return FinishUnclaimedOp(task.id, "ki-1", task.spec, State.SUCCEEDED, started_at=T0, result={})

        async def record_three() -> None:
            assert await store.apply([ran(waiting.pop()) for _ in range(3)], now=T0) == [True] * 3

        taken = await store.get(task_id)

        async def refuse_one() -> None:  # the task is running: a run of it without a claim does not count
            assert await store.apply([ran(taken)], now=T0) == [False]

        # Round trips on the pool's connection, the lane's and the relaxed lane's (statements that
        # find tasks by id, or insert them).
        calls = {
            "get": (lambda: store.get(task_id), (0, 1, 0)),
            "list": (lambda: store.list(limit=2), (1, 0, 0)),
            "renew": (lambda: store.renew(task_id, worker="ki-1", attempt=attempt, now=T0, lease_seconds=LEASE), (1, 0, 0)),
            # the insert counted, one statement: no BEGIN or COMMIT
            "relaxed create": (lambda: store.create([new()], now=T0, relaxed=True), (0, 0, 1)),
            "create": (lambda: store.create([new()], now=T0), (0, 1, 0)),
            # BEGIN with its setting, the update, its count, COMMIT
            "mark_queued": (lambda: store.mark_queued([pending.pop()], now=T0), (4, 0, 0)),
            # the finishes, their counts and their notification: one statement
            "unclaimed finishes": (record_three, (0, 1, 0)),
            "unclaimed finish refused": (refuse_one, (0, 1, 0)),
        }
        seen = {}
        for name, (call, _) in calls.items():
            for _ in range(3):  # past the run that prepares each statement
                await call()
            seen[name] = await _round_trips(store, tmp_path / "trace.txt", call)
        assert seen == {name: trips for name, (_, trips) in calls.items()}
        assert await store.counts() == await _counts_of_tasks(store)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_transaction_opened_by_several_statements_is_retried_on_serialization_failure(
    postgres_url: str, pg_schema: str, counter_pool: ConnectionPool
) -> None:
    table = sql.Identifier(pg_schema, "counter")
    increment, calls = _conflicting_increment(postgres_url, table, lambda call: call == 1)

    def relaxed_increment(conn: psycopg.Connection) -> tuple[int, str]:
        return increment(conn), conn.execute("SHOW synchronous_commit").fetchone()[0]

    seen = await run_transaction(counter_pool, relaxed_increment, begin="BEGIN; SET LOCAL synchronous_commit = off")
    assert (len(calls), seen) == (2, (100, "off"))  # the first try hit 40001 and rolled back; the retry committed
    with counter_pool.connection() as conn:
        assert conn.execute(sql.SQL("SELECT v FROM {}").format(table)).fetchone() == (101,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


async def test_only_claims_alone_and_mark_queued_are_relaxed(store: TaskStore) -> None:
    """A group of claims, or marking tasks queued, may be lost in a crash and repeated; a group
    with a result in it is durable before anyone hears of the result."""
    seen: list[bool] = []
    transact = store._transact

    async def spy(fn, *, write, relaxed=False):
        seen.append(relaxed)
        return await transact(fn, write=write, relaxed=relaxed)

    tasks, _ = await store.create([new(), new()], now=T0)
    store._transact = spy  # type: ignore[method-assign]
    assert await store.mark_queued([t.id for t in tasks], now=T0) == 2
    first = await store.apply([ClaimOp(tasks[0].id, "ki", LEASE)], now=T0)
    await store.apply([FinishOp(tasks[0].id, first[0].attempts, State.SUCCEEDED, worker="ki"),
                       ClaimOp(tasks[1].id, "ki", LEASE)], now=T0)
    await store.apply([FinishOp(tasks[1].id, 1, State.SUCCEEDED, worker="ki")], now=T0)
    assert seen == [True, True, False, False]
    assert (await store.get(tasks[0].id)).state is State.SUCCEEDED
    assert (await store.get(tasks[1].id)).state is State.SUCCEEDED


async def test_make_durable_puts_every_earlier_relaxed_commit_on_disk(store: TaskStore) -> None:
    """The barrier after a relaxed insert: on PostgreSQL the WAL is flushed past the insert when
    it returns (repeated, since the WAL writer flushes on its own every 200 ms); on SQLite it
    commits a page to the WAL with synchronous FULL, which syncs the log, the insert included."""
    from p2pnn.store.postgres import PostgresTaskStore

    if isinstance(store, PostgresTaskStore):
        flushed_past = "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn"
        for _ in range(20):
            await store.create([new()], now=T0, relaxed=True)
            (inserted,) = (await store._transact(lambda db: db.rows("SELECT pg_current_wal_insert_lsn()"), write=False))[0]
            await store.make_durable()
            assert (await store._transact(lambda db: db.rows(flushed_past, (inserted,)), write=False))[0][0]
        return

    settings: list[int] = []
    transact = store._transact

    async def spy(fn, *, write, relaxed=False):
        def inside(db):
            settings.append(db.rows("PRAGMA synchronous")[0][0])
            return fn(db)

        return await transact(inside, write=write, relaxed=relaxed)

    await store.create([new()], now=T0, relaxed=True)
    side = sqlite3.connect(store._path, isolation_level=None)
    try:
        assert side.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)  # an empty log
        store._transact = spy  # type: ignore[method-assign]
        await store.make_durable()
        busy, frames, _ = side.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        side.close()
    assert settings == [2]  # one transaction, FULL
    assert busy == 0 and frames >= 1  # it wrote to the log, so its commit synced it


async def test_sqlite_point_reads_see_every_commit_and_never_write(tmp_path: Path) -> None:
    """SQLite's get reads on the trio thread through a second, read-only connection: it sees each
    commit of the writer at once, and cannot change the database."""
    store = open_store("sqlite", sqlite_path=tmp_path / "t.sqlite3")
    await store.open()
    try:
        assert store._reader is not None
        (task,), _ = await store.create([new()], now=T0)
        assert (await store.get(task.id)).state is State.PENDING
        claimed = await store.claim(task.id, worker="w", now=T0, lease_seconds=LEASE)
        assert (await store.get(task.id)).state is State.RUNNING
        assert await store.finish(task.id, attempt=claimed.attempts, state=State.SUCCEEDED, now=T0, result={"ok": 1}, worker="w")
        assert (await store.get(task.id)).result == {"ok": 1}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store._reader.execute("DELETE FROM tasks")
    finally:
        await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get(task.id)
