"""The path of a waited-for task: what hears of its result, and what is left out of its way.

- PostgreSQL announces each result ``apply`` records (NOTIFY), to a listener in any process.
- A submit with ``wait`` marks its task queued only if it still waits MARK_QUEUED_AFTER on.
- A Ki that runs a short task unclaimed beats once its outcome is recorded: its first beat after
  the run names the task finished (no beat in between to hold that one back).
- A node reads the beats only while somebody waits on it, and for a while after.

Real PostgreSQL and SQLite stores, real RabbitMQ (a vhost of the test's own), real worker processes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import p2pnn.service as service_mod
from p2pnn.bus import BEATS, SHORT
from p2pnn.bus.amqp import AmqpBus, AmqpSettings
from p2pnn.callers import ANONYMOUS_ADMIN
from p2pnn.service import MARK_QUEUED_AFTER, TaskService
from p2pnn.store import ClaimOp, FinishOp, FinishUnclaimedOp, NewTask, StoreError, TaskStore, open_store
from p2pnn.store.postgres import PostgresTaskStore
from p2pnn.tasks import Limits, State
from p2pnn.work.ki import KiAgent
from tests.conftest import rabbitmqctl
from tests.test_handback import running_ki


async def _pending(store: TaskStore, n: int) -> list[str]:
    tasks, _ = await store.create(
        [NewTask("echo", {"kind": "echo", "payload": i}, "tester", 3) for i in range(n)], now=time.time()
    )
    return [t.id for t in tasks]


def _listener_pids(url: str, store: TaskStore) -> list[int]:
    """The server processes of ``store``'s connections that listen for results."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s", (f'LISTEN "{store._finished_channel}"',)
        )]


async def _until_listening(url: str, store: TaskStore) -> None:
    """follow_finished has started at once; it hears results once its connection listens."""
    with trio.fail_after(10):
        while not await trio.to_thread.run_sync(_listener_pids, url, store):
            await trio.sleep(0.02)


@pytest.mark.postgres
async def test_postgres_announces_the_results_apply_records_to_a_listener_elsewhere(postgres_url, pg_schema) -> None:
    listening = open_store("postgres", url=postgres_url, schema=pg_schema)
    recording = open_store("postgres", url=postgres_url, schema=pg_schema)
    await listening.open()
    await recording.open()
    heard: list[tuple[str, object]] = []  # (id, the task as announced, or None)

    def ids() -> list[str]:
        return sorted(tid for tid, _ in heard)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(listening.follow_finished, heard.extend)
            await _until_listening(postgres_url, listening)
            a, b, c, d, e, f, g = await _pending(recording, 7)
            spec_a = (await recording.get(a)).spec
            (claimed_b,) = await recording.apply([ClaimOp(b, "ki", 30)], now=time.time())
            assert claimed_b is not None
            # Only results: the claim of c announces nothing, a finish refused (d is not running) neither.
            answers = await recording.apply([
                FinishUnclaimedOp(a, "ki", spec_a, State.SUCCEEDED, time.time(), result={"ok": 1}),
                FinishOp(b, claimed_b.attempts, State.SUCCEEDED, result={"ok": 2}, worker="ki"),
                ClaimOp(c, "ki", 30),
                FinishOp(d, 1, State.SUCCEEDED, result={}, worker="ki"),
            ], now=time.time())
            assert answers[0] is True and answers[1] is True and answers[3] is False
            with trio.fail_after(10):
                while ids() != sorted([a, b]):
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # nothing more comes
            assert ids() == sorted([a, b])
            # A group of unclaimed finishes alone (one statement on PostgreSQL): the recorded ones,
            # not f, whose message's spec is not its own; then a group that records nothing.
            specs = {tid: (await recording.get(tid)).spec for tid in (e, g)}
            forged = FinishUnclaimedOp(f, "ki", {"forged": True}, State.SUCCEEDED, time.time(), result={})
            answers = await recording.apply([
                FinishUnclaimedOp(e, "ki", specs[e], State.SUCCEEDED, time.time(), result={"ok": 3}),
                forged,
                FinishUnclaimedOp(g, "ki", specs[g], State.FAILED, time.time(), error="boom"),
            ], now=time.time())
            assert answers == [True, False, True]
            assert await recording.apply([forged], now=time.time()) == [False]
            with trio.fail_after(10):
                while ids() != sorted([a, b, e, g]):
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert ids() == sorted([a, b, e, g])
            # A result recorded unclaimed is announced with the task as a read gives it (the long poll
            # answers from it); others with their id alone, and the task is read.
            announced = dict(heard)
            for tid in (e, g):
                assert announced[tid] == await recording.get(tid)
            assert announced[b] is None
            # A task too long for a notification's payload is announced by its id.
            (h,) = await _pending(recording, 1)
            spec_h = (await recording.get(h)).spec
            big = FinishUnclaimedOp(h, "ki", spec_h, State.SUCCEEDED, time.time(), result={"big": "x" * 8000})
            assert await recording.apply([big], now=time.time()) == [True]
            with trio.fail_after(10):
                while h not in dict(heard):
                    await trio.sleep(0.01)
            assert dict(heard)[h] is None
            nursery.cancel_scope.cancel()
    finally:
        await listening.close()
        await recording.close()


@pytest.mark.postgres
async def test_a_listener_whose_connection_was_dropped_listens_again(postgres_url, pg_schema) -> None:
    """The listening connection is read from the trio thread; when the server drops it, the store
    connects again (after LISTEN_RETRY_SECONDS[0]) and announces the results recorded from then on."""
    import psycopg

    store = open_store("postgres", url=postgres_url, schema=pg_schema)
    await store.open()
    heard: list[tuple[str, object]] = []

    def listener_pids() -> list[int]:
        return _listener_pids(postgres_url, store)

    async def record(tid: str) -> None:
        spec = (await store.get(tid)).spec
        assert await store.apply([FinishUnclaimedOp(tid, "ki", spec, State.SUCCEEDED, time.time(), result={})],
                                 now=time.time()) == [True]
        with trio.fail_after(10):
            while tid not in dict(heard):
                await trio.sleep(0.01)

    try:
        a, b = await _pending(store, 2)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.follow_finished, heard.extend)
            await _until_listening(postgres_url, store)
            await record(a)
            (pid,) = await trio.to_thread.run_sync(listener_pids)
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with trio.fail_after(10):
                while (now := await trio.to_thread.run_sync(listener_pids)) in ([], [pid]):
                    await trio.sleep(0.05)
            assert len(now) == 1 and now != [pid]
            await record(b)
            nursery.cancel_scope.cancel()
        with trio.fail_after(10):  # cancelled: its connection is closed
            while await trio.to_thread.run_sync(listener_pids):
                await trio.sleep(0.05)
    finally:
        await store.close()


async def test_sqlite_announces_the_results_this_process_records_at_once_with_their_tasks(tmp_path: Path) -> None:
    """An embedded node's long poll answers from the announcement, with no read of its own."""
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    heard: list[tuple[str, object]] = []
    try:
        a, b, c, d = await _pending(store, 4)
        spec_a, spec_d = (await store.get(a)).spec, (await store.get(d)).spec
        async with trio.open_nursery() as nursery:
            await nursery.start(store.follow_finished, heard.extend)
            (claimed_b,) = await store.apply([ClaimOp(b, "ki", 30)], now=time.time())
            assert claimed_b is not None and heard == []  # a claim is no result
            answers = await store.apply([
                FinishUnclaimedOp(a, "ki", spec_a, State.SUCCEEDED, time.time(), result={"ok": 1}),
                FinishOp(b, claimed_b.attempts, State.FAILED, error="boom", worker="ki"),
                FinishOp(c, 1, State.SUCCEEDED, result={}, worker="ki"),  # not running: refused
            ], now=time.time())
            assert answers == [True, True, False]
            assert heard == [(a, await store.get(a)), (b, await store.get(b))]  # once committed, each as committed
            assert not store.announces_finished  # what other processes record on the file is not announced
            nursery.cancel_scope.cancel()
        assert await store.apply([FinishUnclaimedOp(d, "ki", spec_d, State.SUCCEEDED, time.time(), result={})],
                                 now=time.time()) == [True]
        assert [tid for tid, _ in heard] == [a, b]  # nobody listens any more: nothing read or heard
    finally:
        await store.close()


def _spy_marks(store: TaskStore) -> list[list[str]]:
    """Record the ids of every mark_queued call (each runs unchanged)."""
    calls: list[list[str]] = []
    mark_queued = store.mark_queued

    async def spy(task_ids, *, now):
        calls.append(list(task_ids))
        return await mark_queued(task_ids, now=now)

    store.mark_queued = spy  # type: ignore[method-assign]
    return calls


async def test_a_waited_short_task_run_at_once_is_never_marked_queued_and_the_next_beat_names_it(
    amqp_url: str, tmp_path: Path
) -> None:
    def agent(runner):
        return KiAgent(runner=runner, bus=runner.bus, beat_interval=60).run

    async with running_ki(amqp_url, tmp_path, prefix="wp", slots=1, lease_seconds=30, short_queue=SHORT, host=agent) as (
        store, bus, runner
    ):
        marks = _spy_marks(store)
        service = TaskService(store, bus, limits=Limits(), max_attempts=3, direct_short=True)
        beats: list[dict] = []

        async def read_beats(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with bus.subscribe(BEATS) as subscription:
                task_status.started()
                while True:
                    beats.append(await subscription.receive())

        async with trio.open_nursery() as nursery:
            await nursery.start(read_beats)
            await nursery.start(service.follow_beats)
            await trio.sleep(0.5)  # the Ki's first beats, before the task
            began = time.time()
            (task,), created = await service.submit([{"kind": "echo", "payload": "w"}], ANONYMOUS_ADMIN, wait=20)
            assert created and task.state is State.SUCCEEDED and task.result == {"payload": "w"}
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert marks == []  # pending -> succeeded: no UPDATE of the row in the Ki's way
        after = [b for b in beats if b["at"] >= began and b["node"] == runner.node_id]
        assert after and after[0]["finished"] == [task.id], after


async def test_a_waited_task_still_waiting_is_marked_queued_once_before_the_answer(amqp_url: str, tmp_path: Path) -> None:
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    bus = AmqpBus(AmqpSettings(url=amqp_url, prefix="wq"))
    marks = _spy_marks(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            assert await bus.wait_connected(20), "no connection to RabbitMQ"
            service = TaskService(store, bus, limits=Limits(), max_attempts=3, direct_short=True)
            began = trio.current_time()
            (task,), _ = await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN, wait=0.3)  # no Ki runs it
            assert trio.current_time() - began >= 0.3
            assert task.state is State.QUEUED and (await store.get(task.id)).state is State.QUEUED
            assert marks == [[task.id]]
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
    assert MARK_QUEUED_AFTER < 0.3


def _bound_to_beats(vhost: str, prefix: str) -> int:
    out = rabbitmqctl("list_bindings", "-p", vhost, "source_name", "destination_name", "--quiet").stdout
    return sum(1 for line in out.splitlines() if line.split("\t")[0] == f"{prefix}.{BEATS}")


@asynccontextmanager
async def _service_on_rabbitmq(
    store: TaskStore, amqp_url: str, prefix: str
) -> AsyncIterator[tuple[trio.Nursery, TaskService]]:
    """A TaskService on ``store`` and a connected RabbitMQ bus (queue names under ``prefix``), in a
    nursery the caller may start more in; leaving it cancels them all."""
    bus = AmqpBus(AmqpSettings(url=amqp_url, prefix=prefix))
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        assert await bus.wait_connected(20), "no connection to RabbitMQ"
        yield nursery, TaskService(store, bus, limits=Limits(), max_attempts=3)
        nursery.cancel_scope.cancel()


async def test_a_node_reads_beats_only_while_somebody_waits_there_and_a_while_after(
    amqp_vhost: str, amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_mod, "FOLLOW_LINGER_SECONDS", 1.0)
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    try:
        async with _service_on_rabbitmq(store, amqp_url, "wb") as (nursery, service):
            await nursery.start(service.follow_beats)
            (task_id,) = await _pending(store, 1)
            await trio.sleep(0.5)
            assert await trio.to_thread.run_sync(_bound_to_beats, amqp_vhost, "wb") == 0
            waiting = trio.Event()

            async def wait() -> None:
                waiting.set()
                await service.wait(task_id, 8)

            nursery.start_soon(wait)
            await waiting.wait()
            await trio.sleep(0.5)
            assert await trio.to_thread.run_sync(_bound_to_beats, amqp_vhost, "wb") == 1
            await service.cancel(task_id, ANONYMOUS_ADMIN)  # ends the wait: the task is terminal
            with trio.fail_after(30):  # the linger (1 s), then the queue goes with the subscription
                while await trio.to_thread.run_sync(_bound_to_beats, amqp_vhost, "wb"):
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_node_whose_store_announces_results_reads_no_beats_for_its_long_polls(
    amqp_vhost: str, amqp_url: str, make_store
) -> None:
    """PostgreSQL announces each result as it commits: beats would only wake a long poll already
    woken. SQLite announces nothing to other processes: there the beats are what wakes it."""
    store = make_store()
    await store.open()
    try:
        async with _service_on_rabbitmq(store, amqp_url, "wa") as (nursery, service):
            await nursery.start(service.follow)
            (task_id,) = await _pending(store, 1)
            nursery.start_soon(service.wait, task_id, 30)
            with trio.fail_after(10):  # the store's feed is up, and the beats' if any
                while await trio.to_thread.run_sync(_bound_to_beats, amqp_vhost, "wa") == 0 and not store.announces_finished:
                    await trio.sleep(0.1)
            await trio.sleep(0.5)
            bound = await trio.to_thread.run_sync(_bound_to_beats, amqp_vhost, "wa")
            assert (store.announces_finished, bound) == ((True, 0) if isinstance(store, PostgresTaskStore) else (False, 1))
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


def _recording_applies(store: TaskStore) -> list[tuple[object, object]]:
    """Record (op, answer) of every op the store applies (each group runs unchanged)."""
    applied: list[tuple[object, object]] = []
    apply = store.apply

    async def recording(ops, *, now):
        answers = await apply(ops, now=now)
        applied.extend(zip(ops, answers))
        return answers

    store.apply = recording  # type: ignore[method-assign]
    return applied


@pytest.mark.parametrize("lands", ["later", "between"])
async def test_a_short_task_run_before_its_insert_committed_is_recorded_once_it_has(
    amqp_url: str, tmp_path: Path, lands: str
) -> None:
    """A submit that waits publishes a short task while inserting it: here the insert is held back
    until the Ki has run the task and found it missing, so the Ki records it when it lands: later,
    or between that refusal and the Ki's look for the task (which then finds it still waiting)."""
    async with running_ki(amqp_url, tmp_path, prefix="wr", slots=1, lease_seconds=30, short_queue=SHORT) as (
        store, bus, runner
    ):
        applied = _recording_applies(store)
        create, apply = store.create, store.apply
        refused, inserted = trio.Event(), trio.Event()

        async def refusal_then_insert(ops, *, now):
            answers = await apply(ops, now=now)
            if not refused.is_set():
                refused.set()
                if lands == "between":
                    await inserted.wait()
            return answers

        async def slow_create(*args, **kwargs):
            with trio.fail_after(20):
                await refused.wait()  # the Ki ran the task and tried to record it: nothing stored yet
            out = await create(*args, **kwargs)
            inserted.set()
            return out

        store.apply = refusal_then_insert  # type: ignore[method-assign]
        store.create = slow_create  # type: ignore[method-assign]
        service = TaskService(store, bus, limits=Limits(), max_attempts=3, direct_short=True)
        (task,), created = await service.submit([{"kind": "echo", "payload": "late"}], ANONYMOUS_ADMIN, wait=20)
        assert created and task.state is State.SUCCEEDED and task.result == {"payload": "late"}
        assert task.attempts == 1
        with trio.fail_after(10):  # the commit shows a moment before the Ki, back from it, notes its answer
            while True not in (answers := [answer for op, answer in applied if op.task_id == task.id]):
                await trio.sleep(0.01)
        assert answers[0] is False and answers[-1] is True and len(answers) >= 2
        assert all(isinstance(op, FinishUnclaimedOp) for op, _ in applied)


async def test_a_short_task_whose_insert_failed_records_nothing_and_frees_its_ki(amqp_url: str, tmp_path: Path) -> None:
    async with running_ki(amqp_url, tmp_path, prefix="wf", slots=1, lease_seconds=30, short_queue=SHORT) as (
        store, bus, runner
    ):
        applied = _recording_applies(store)
        create = store.create
        failing = True

        async def failing_create(*args, **kwargs):
            if failing:
                await trio.sleep(0.2)  # the message is out meanwhile
                raise StoreError("the database went away")
            return await create(*args, **kwargs)

        store.create = failing_create  # type: ignore[method-assign]
        service = TaskService(store, bus, limits=Limits(), max_attempts=3, direct_short=True)
        with pytest.raises(StoreError):
            await service.submit([{"kind": "echo", "payload": "lost"}], ANONYMOUS_ADMIN, wait=20)
        with trio.fail_after(20):  # the Ki tries to record it, then gives up
            while not applied:
                await trio.sleep(0.01)
        failing = False
        (task,), _ = await service.submit([{"kind": "echo", "payload": "next"}], ANONYMOUS_ADMIN, wait=20)
        assert task.state is State.SUCCEEDED  # the one slot was freed
        assert [t.id for t in (await store.list()).tasks] == [task.id]  # the failed insert stored nothing
        assert not any(answer is True for op, answer in applied if op.task_id != task.id)
