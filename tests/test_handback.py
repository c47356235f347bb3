"""No task stranded: a Ki that stops (role change, SIGTERM) hands its tasks back *and* publishes them
again; its slots survive any number of role switches; the sweeper finds what a failed publish left.

Real RabbitMQ (a vhost of the test's own), a real store and real worker processes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pnn.bus import TASKS, ki_queue
from p2pnn.bus.amqp import AmqpBus, AmqpSettings
from p2pnn.client import AsyncClient
from p2pnn.compute.pool import KiPool
from p2pnn.metrics import Metrics
from p2pnn.store import NewTask, TaskStore, open_store
from p2pnn.tasks import Limits, State
from p2pnn.work import KiRunner, RoleHost, Sweeper
from tests.swarmutil import BusSwarm

NODE = "ki-under-test"
T0 = 1_700_000_000.0


async def _queued_task(store: TaskStore, sleep: float, payload: object = None) -> str:
    (task,), _ = await store.create(
        [NewTask("echo", {"kind": "echo", "payload": payload, "sleep": sleep}, "tester", 3)], now=time.time()
    )
    await store.mark_queued([task.id], now=time.time())
    return task.id


async def _until_state(store: TaskStore, task_id: str, state: State, timeout: float) -> None:
    with trio.fail_after(timeout):
        while (await store.get(task_id)).state is not state:
            await trio.sleep(0.05)


@asynccontextmanager
async def running_ki(
    amqp_url: str, tmp_path: Path, *, prefix: str, slots: int, lease_seconds: float,
    host: Callable[[KiRunner], Callable[..., Awaitable[None]]] = lambda runner: runner.run,
    short_queue: str | None = None,
) -> AsyncIterator[tuple[TaskStore, AmqpBus, KiRunner]]:
    """A KiRunner on its own queue (and ``short_queue``, if given; RabbitMQ, SQLite, real worker
    processes), started by what ``host(runner)`` returns (the runner itself unless a test hosts
    it otherwise); stopped after."""
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    bus = AmqpBus(AmqpSettings(url=amqp_url, prefix=prefix, ki_message_ttl=60))
    pool = KiPool(slots=slots, torch_threads=1, limits=Limits(), workdir=tmp_path / "work")
    runner = KiRunner(
        node_id=NODE, store=store, bus=bus, pool=pool, metrics=Metrics(), lease_seconds=lease_seconds,
        queue=ki_queue(NODE), short_queue=short_queue,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            assert await bus.wait_connected(20), "no connection to RabbitMQ"
            await nursery.start(pool.run)
            await nursery.start(host(runner))
            yield store, bus, runner
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


@pytest.fixture
async def ki(amqp_url: str, tmp_path: Path):
    """A Ki role (one slot) on RabbitMQ and SQLite, hosted by a RoleHost, and the bus to watch it with."""
    hosts: list[RoleHost] = []

    def host(runner: KiRunner) -> Callable[..., Awaitable[None]]:
        hosts.append(RoleHost({"ki": runner.run}))
        return hosts[0].run

    async with running_ki(amqp_url, tmp_path, prefix="hb", slots=1, lease_seconds=30, host=host) as (store, bus, runner):
        yield store, bus, hosts[0], runner


async def test_a_ki_whose_role_is_taken_away_publishes_its_running_task_again(ki):
    store, bus, roles, runner = ki
    await roles.assume({"ki"})
    task_id = await _queued_task(store, sleep=60)
    await bus.publish([task_id], queue=ki_queue(NODE))
    await _until_state(store, task_id, State.RUNNING, 60)

    await roles.assume(set())  # the principal gives this node another role

    task = await store.get(task_id)
    assert task.state is State.QUEUED and task.attempts == 0
    # The message is on the shared queue now, not 600 s later: an An would forward it at once.
    async with bus.consume(TASKS, prefetch=5) as inbox:
        with trio.fail_after(10):
            delivery = await inbox.receive()
        await inbox.ack(delivery)
    assert delivery.task_id == task_id
    assert await store.stranded(older_than=time.time() + 3600) == {}, "confirmed, so not stranded"
    assert runner.metrics.handed_back._value.get() == 1


def _ready_messages(amqp_url: str, queue: str) -> int:
    """Messages ready on ``queue`` (not those delivered and unacked), as the broker counts them."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


async def test_slots_survive_three_role_switches_and_a_stopped_kis_buffer_goes_back_at_once(ki, amqp_url):
    store, bus, roles, runner = ki
    for switch in range(3):
        await roles.assume({"ki"})
        task_id = await _queued_task(store, sleep=0, payload=switch)
        await bus.publish([task_id], queue=ki_queue(NODE))
        # Before slots were counted per run, the second run found its only permit taken by the
        # first run's wait for a delivery, and ran nothing more.
        await _until_state(store, task_id, State.SUCCEEDED, 60)
        assert runner.in_hand == 0
        await roles.assume(set())

    # One slot, two messages: one runs, the other waits in the consumer's prefetch buffer. When
    # the role stops, that one is dead-lettered to the shared queue at once (the queue's TTL is
    # 60 s here), not left unacked until the connection dies nor back on a queue nobody reads.
    await roles.assume({"ki"})
    running, waiting = await _queued_task(store, sleep=60), await _queued_task(store, sleep=0)
    await bus.publish([running], queue=ki_queue(NODE))
    await _until_state(store, running, State.RUNNING, 60)
    await bus.publish([waiting], queue=ki_queue(NODE))  # confirmed: it is on the Ki's queue
    with trio.fail_after(30):  # until the broker has pushed it to the consumer (none ready on the queue)
        while await trio.to_thread.run_sync(_ready_messages, amqp_url, bus.name(ki_queue(NODE))):
            await trio.sleep(0.1)
    await roles.assume(set())
    back: set[str] = set()
    async with bus.consume(TASKS, prefetch=5) as inbox:
        with trio.fail_after(20):  # the running one handed back and published, the waiting one dead-lettered
            while back != {running, waiting}:
                delivery = await inbox.receive()
                await inbox.ack(delivery)
                back.add(delivery.task_id)
    assert (await store.get(waiting)).state is State.QUEUED


async def test_a_queued_task_without_a_confirmed_message_is_stranded_until_published(store):
    """The sweeper's rule: queued, no published_at, older than stranded_after."""
    (task,), _ = await store.create([NewTask("echo", {"kind": "echo"}, "tester", 3)], now=T0)
    await store.mark_queued([task.id], now=T0)
    assert await store.stranded(older_than=T0 + 100) == {}, "published and confirmed: in flight"
    claimed = await store.claim(task.id, worker="ki-1", now=T0 + 1, lease_seconds=30)
    assert not await store.release(task.id, attempt=claimed.attempts, now=T0 + 2, worker="ki-2"), "not its lease"
    assert await store.release(task.id, attempt=claimed.attempts, now=T0 + 2, worker="ki-1")
    assert await store.stranded(older_than=T0 + 2) == {}, "not yet older than the bound"
    assert await store.stranded(older_than=T0 + 12) == {task.id: T0 + 2}
    # A confirm for an older version of the row (the task was taken and handed back since) marks nothing.
    assert await store.mark_published({task.id: T0 + 1}, now=T0 + 3) == 0
    assert await store.mark_published({task.id: T0 + 2}, now=T0 + 3) == 1
    assert await store.stranded(older_than=T0 + 12) == {}
    assert await store.published_before(before=T0 + 4) == {task.id: T0 + 2}


SWEEP_READS = 4  # Sweeper.sweep without queued_after: lease expiry, their publish, pending, stranded


class _Clock:
    """A settable clock that counts its reads (so a test can tell that a sweep ran at the time it set)."""

    def __init__(self, now: float) -> None:
        self.now, self.reads = now, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


async def test_the_sweeper_publishes_a_stranded_task_within_the_bound(amqp_url, tmp_path):
    """Two tasks handed back 5 s apart, and nobody published either: on the sweeper's clock, the older
    one is published once it is older than ``stranded_after``, the younger one alone and later."""
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    published: list[list[str]] = []

    async def publish(ids: list[str]) -> bool:
        published.append(list(ids))
        return True

    async def strand(task_id: str, at: float) -> None:
        task = await store.claim(task_id, worker="ki-1", now=at, lease_seconds=60)
        # Released, and the node died before its publish: nothing carries the task.
        assert await store.release(task_id, attempt=task.attempts, now=at, worker="ki-1")

    try:
        t0 = time.time()
        older, younger = await _queued_task(store, sleep=0), await _queued_task(store, sleep=0)
        await strand(older, t0)
        await strand(younger, t0 + 5)
        clock = _Clock(t0 + 2)  # the older one stranded for 2 s, the younger one not yet handed back
        sweeper = Sweeper(store=store, publish=publish, metrics=Metrics(), interval=0.05, pending_after=1,
                          republish_queued=False, stranded_after=1.0, clock=clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweeper.run)
            with trio.fail_after(15):
                while not published:
                    await trio.sleep(0.05)
            assert published == [[older]], "only what is older than stranded_after is stranded"
            clock.now, clock.reads = t0 + 5.5, 0  # the younger one handed back 0.5 s ago: within the bound
            with trio.fail_after(15):
                # A sweep reads the clock SWEEP_READS times: after three times that, a whole sweep ran at this time.
                while clock.reads < 3 * SWEEP_READS:
                    await trio.sleep(0.05)
            assert published == [[older]], "a task handed back under stranded_after ago is not stranded yet"
            clock.now = t0 + 6.5
            with trio.fail_after(15):
                while len(published) < 2:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert published == [[older], [younger]]
        assert await store.stranded(older_than=time.time() + 60) == {}
    finally:
        await store.close()


@pytest.mark.postgres
async def test_sigterm_of_a_ki_hands_its_running_tasks_back_and_they_run_elsewhere(tmp_path, amqp_url, pg_schema):
    """No principal and no standby sweeper: only the Ki's own re-publish can bring the tasks back."""
    swarm = BusSwarm(tmp_path, amqp_url, pg_schema)
    quiet = {"P2PNN_SWEEPER__STANDBY": "false"}
    try:
        swarm.start("an", "an", slots=0, **quiet)
        swarm.start("ki1", "ki", slots=2, **quiet)
        with trio.fail_after(60):
            while swarm.metric("an", "p2pnn_an_kis") != 1:
                await trio.sleep(0.2)
        async with AsyncClient(swarm.nodes["an"].url, timeout=30) as client:
            tasks = [await client.submit({"kind": "echo", "payload": i, "sleep": 6}) for i in range(2)]
            ids = [t["id"] for t in tasks]
            with trio.fail_after(60):
                while sorted(s for (s,) in swarm.rows("SELECT state FROM tasks")) != ["running", "running"]:
                    await trio.sleep(0.2)
            swarm.start("ki2", "ki", slots=2, **quiet)
            with trio.fail_after(60):
                while swarm.metric("an", "p2pnn_an_kis") != 2:
                    await trio.sleep(0.2)
            assert await trio.to_thread.run_sync(swarm.nodes["ki1"].stop) == 0  # SIGTERM
            handed = [e for e in swarm.nodes["ki1"].events() if e.get("event") == "task.handed_back"]
            assert len(handed) == 2
            done = await client.wait_all(ids, timeout=60)
        assert all(t["state"] == "succeeded" for t in done.values()), done
        owners = {o for (o,) in swarm.rows("SELECT lease_owner FROM tasks")}
        assert owners == {swarm.nodes["ki2"].node_id}
    finally:
        swarm.stop_all()


async def test_a_stopping_ki_says_so_and_an_an_forwards_it_nothing_more(tmp_path):
    from p2pnn.bus import BEATS, LocalBus
    from p2pnn.work import KiAgent
    from p2pnn.work.an import _KiView

    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    bus = LocalBus()
    pool = KiPool(slots=2, torch_threads=1, limits=Limits(), workdir=tmp_path / "work")
    runner = KiRunner(node_id=NODE, store=store, bus=bus, pool=pool, metrics=Metrics(), lease_seconds=30)
    agent = KiAgent(runner=runner, bus=bus, beat_interval=0.2)
    view, beats = _KiView(NODE), []
    try:
        async with bus.subscribe(BEATS) as inbox, trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            role = trio.CancelScope()

            async def ki_role() -> None:
                with role:
                    await agent.run()

            nursery.start_soon(ki_role)
            with trio.fail_after(30):
                beats.append(await inbox.receive())
            view.update(beats[-1], "an-1", time.time())
            assert view.free(time.time(), ttl=30) == 2
            role.cancel()  # the principal takes the role away
            with trio.fail_after(5):
                while beats[-1]["slots"] != 0:
                    beats.append(await inbox.receive())
            view.update(beats[-1], "an-1", time.time())
            assert view.free(time.time(), ttl=30, ahead=2.0, ahead_age=0.5) <= 0  # not even credit ahead
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_lone_finish_is_beaten_at_once_and_a_burst_is_coalesced(tmp_path, autojump_clock):
    """On a store that does not announce results, the beat that names a finished task is what wakes
    a waiting client: after a quiet spell it goes out at the instant of the finish; finishes that
    follow within BEAT_MIN_GAP share one beat."""
    from p2pnn.bus import BEATS, LocalBus
    from p2pnn.work import KiAgent
    from p2pnn.work.ki import BEAT_MIN_GAP

    bus = LocalBus()
    pool = KiPool(slots=0, torch_threads=1, limits=Limits(), workdir=tmp_path / "work")  # runs nothing: beats only
    runner = KiRunner(node_id=NODE, store=None, bus=bus, pool=pool, metrics=Metrics(), lease_seconds=30)  # type: ignore[arg-type]
    agent = KiAgent(runner=runner, bus=bus, beat_interval=60.0)
    async with bus.subscribe(BEATS) as inbox, trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert (await inbox.receive())["finished"] == []
        await trio.sleep(5.0)  # quiet
        finished_at = trio.current_time()
        runner.on_finished("t1")
        beat = await inbox.receive()
        assert beat["finished"] == ["t1"] and trio.current_time() == finished_at
        runner.on_finished("t2")
        runner.on_finished("t3")
        beat = await inbox.receive()
        assert beat["finished"] == ["t2", "t3"]
        assert trio.current_time() == pytest.approx(finished_at + BEAT_MIN_GAP)
        nursery.cancel_scope.cancel()


async def test_where_the_store_announces_results_a_short_task_rides_on_the_next_beat(tmp_path, autojump_clock):
    """Where the store announces results (PostgreSQL's NOTIFY), no long poll waits for a beat: the
    finish of a short task that no beat showed in hand goes out BEAT_BUSY_GAP later, with whatever
    changed meanwhile, not at the moment the waiting client's answer is on its way. A Ki whose last
    beat showed it full still beats at once when it runs dry: an An may hold work back for it."""
    import types

    from p2pnn.bus import BEATS, LocalBus
    from p2pnn.work import KiAgent
    from p2pnn.work.ki import BEAT_BUSY_GAP

    bus = LocalBus()
    pool = KiPool(slots=2, torch_threads=1, limits=Limits(), workdir=tmp_path / "work")
    announcing = types.SimpleNamespace(announces_finished=True)  # the agent reads nothing else of it
    runner = KiRunner(node_id=NODE, store=announcing, bus=bus, pool=pool, metrics=Metrics(), lease_seconds=30)  # type: ignore[arg-type]
    agent = KiAgent(runner=runner, bus=bus, beat_interval=60.0)
    async with bus.subscribe(BEATS) as inbox, trio.open_nursery() as nursery:
        nursery.start_soon(agent._beat_loop)  # the beats alone: no task is run
        assert (await inbox.receive())["busy"] == 0
        await trio.sleep(5.0)  # quiet
        finished_at = trio.current_time()
        runner.on_finished("t1")  # a short task, taken and finished unseen
        beat = await inbox.receive()
        assert beat["finished"] == ["t1"] and beat["busy"] == 0
        assert trio.current_time() == pytest.approx(finished_at + BEAT_BUSY_GAP)

        await trio.sleep(5.0)
        runner.in_hand = 2  # both slots taken
        runner.on_change()
        assert (await inbox.receive())["busy"] == 2
        await trio.sleep(5.0)
        runner.in_hand = 0
        finished_at = trio.current_time()
        runner.on_finished("t2")
        beat = await inbox.receive()
        assert beat["finished"] == ["t2"] and beat["busy"] == 0 and trio.current_time() == finished_at
        nursery.cancel_scope.cancel()
