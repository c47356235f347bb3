"""TaskStore's live-progress reads, on SQLite and PostgreSQL: the per-attempt series and 'changed since'."""

from __future__ import annotations

from p2pnn.store import TaskStore
from p2pnn.store.base import MAX_PROGRESS_POINTS
from p2pnn.tasks import State
from tests.test_store import LEASE, T0, new, running


async def test_progress_series_keeps_every_report_of_the_current_attempt(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    assert (await store.progress_series(task_id)).points == []
    for epoch in range(1, 4):
        assert await store.progress(task_id, worker="ki-1", attempt=attempt, progress={"epoch": epoch, "loss": 1 / epoch}, now=T0 + epoch)
    # A report of a worker that does not hold the attempt is refused and not kept.
    assert not await store.progress(task_id, worker="ki-2", attempt=attempt, progress={"epoch": 99}, now=T0 + 4)
    series = await store.progress_series(task_id)
    assert (series.task_id, series.attempt, series.truncated) == (task_id, attempt, False)
    assert [p["epoch"] for p in series.points] == [1, 2, 3]
    assert series.points[-1] == (await store.get(task_id)).progress

    # A new attempt starts a new series; the old one is dropped at its first report.
    await store.retry_or_fail(task_id, attempt=attempt, error="worker died", now=T0 + 5)
    second = await store.claim(task_id, worker="ki-2", now=T0 + 6, lease_seconds=LEASE)
    assert (await store.progress_series(task_id)).points == []
    assert await store.progress(task_id, worker="ki-2", attempt=second.attempts, progress={"epoch": 1}, now=T0 + 7)
    series = await store.progress_series(task_id)
    assert (series.attempt, series.points) == (second.attempts, [{"epoch": 1}])
    # The series outlives the attempt's end: a finished task's curve can still be drawn.
    assert await store.finish(task_id, attempt=second.attempts, state=State.SUCCEEDED, now=T0 + 8)
    assert (await store.progress_series(task_id)).points == [{"epoch": 1}]


async def test_progress_series_is_bounded(store: TaskStore) -> None:
    task_id, attempt = await running(store)
    for i in range(MAX_PROGRESS_POINTS + 3):
        assert await store.progress(task_id, worker="ki-1", attempt=attempt, progress={"step": i}, now=T0 + i)
    series = await store.progress_series(task_id)
    assert len(series.points) == MAX_PROGRESS_POINTS and series.truncated
    assert (await store.get(task_id)).progress == {"step": MAX_PROGRESS_POINTS + 2}  # the latest is never lost


async def test_progress_series_of_unknown_tasks_is_none(store: TaskStore) -> None:
    assert await store.progress_series("00000000-0000-4000-8000-000000000000") is None
    assert await store.progress_series("not-a-uuid") is None


async def test_changed_since_lists_changes_oldest_first(store: TaskStore) -> None:
    (a,), _ = await store.create([new()], now=T0)
    (b,), _ = await store.create([new()], now=T0 + 1)
    await store.mark_queued([a.id], now=T0 + 2)
    assert [t.id for t in await store.changed_since(T0 - 1)] == [b.id, a.id]
    assert [(t.id, t.state) for t in await store.changed_since(T0 + 1)] == [(a.id, State.QUEUED)]
    assert await store.changed_since(T0 + 2) == []
    assert len(await store.changed_since(0, limit=1)) == 1
