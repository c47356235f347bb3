"""The An's placement, driven through the in-process bus: beats in, forwards out."""

from __future__ import annotations

import trio

from p2pnn.bus import BEATS, LocalBus, ki_queue
from p2pnn.metrics import Metrics
from p2pnn.work.an import Dispatcher

AN = "an-1"


def _beat(node: str, slots: int, busy: int = 0, received: int = 0, gpu: bool = False, an: str | None = None) -> dict:
    return {"node": node, "boot": "b", "slots": slots, "busy": busy, "received": {AN: received},
            "caps": {"gpu": gpu, "memory_mb": 1000}, "an": an}


async def _an(nursery: trio.Nursery, bus: LocalBus, **options) -> Dispatcher:
    """A started An on ``bus`` that reads no store; ``options`` go to the Dispatcher."""
    an = Dispatcher(node_id=AN, store=None, bus=bus, metrics=Metrics(), prefetch=50, beat_timeout=60, ki_message_ttl=60,
                    **options)
    await nursery.start(an.run)
    return an


async def _settle() -> None:
    await trio.sleep(0.1)


async def test_an_fills_free_slots_only_and_counts_what_it_sent_until_the_ki_beats():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        await _an(nursery, bus)
        await bus.broadcast(BEATS, _beat("k1", slots=1))
        await bus.broadcast(BEATS, _beat("k2", slots=2))
        await bus.broadcast(BEATS, _beat("k4", slots=4))
        await _settle()
        await bus.publish([f"t{i}" for i in range(10)], headers={f"t{i}": {"needs": {}} for i in range(10)})
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [1, 2, 4]
        assert bus.depth() == 0  # the other three are held, unacked, until a slot frees
        # k4 took its four and finished one: room for exactly one more, there.
        await bus.broadcast(BEATS, _beat("k4", slots=4, busy=3, received=4))
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [1, 2, 5]
        nursery.cancel_scope.cancel()


async def test_gpu_tasks_go_to_gpu_ki_and_ki_attached_elsewhere_get_nothing():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        await _an(nursery, bus)
        await bus.broadcast(BEATS, _beat("cpu", slots=8))
        await bus.broadcast(BEATS, _beat("gpu", slots=1, gpu=True))
        await bus.broadcast(BEATS, _beat("theirs", slots=8, gpu=True, an="an-2"))
        await _settle()
        await bus.publish(["g1", "g2"], headers={"g1": {"needs": {"gpu": True}}, "g2": {"needs": {"gpu": True}}})
        await _settle()
        assert bus.depth(ki_queue("gpu")) == 1 and bus.depth(ki_queue("cpu")) == 0
        assert bus.depth(ki_queue("theirs")) == 0
        nursery.cancel_scope.cancel()


async def test_credit_ahead_fills_free_slots_first_then_sends_ahead_by_slots_while_tasks_are_young():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        an = await _an(nursery, bus, forward_ahead=1.0, forward_ahead_age=5.0)
        for node, slots in (("k1", 1), ("k2", 2), ("k4", 4)):
            await bus.broadcast(BEATS, _beat(node, slots=slots))
        await _settle()
        await bus.publish(["a0"], headers={"a0": {"needs": {"short": True}}})
        await _settle()
        # One task: into a free slot of the roomiest Ki, not ahead anywhere.
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [0, 0, 1]
        await bus.publish([f"t{i}" for i in range(20)], headers={f"t{i}": {"needs": {"short": True}} for i in range(20)})
        await _settle()
        # Every slot, then one more per slot ahead: 2 : 4 : 8, the rest held.
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [2, 4, 8]
        assert bus.depth() == 0
        # k4's oldest task has run longer than the age limit: no credit ahead there any more.
        await bus.broadcast(BEATS, {**_beat("k4", slots=4, busy=4, received=8), "oldest": 6.0})
        await bus.broadcast(BEATS, {**_beat("k2", slots=2, busy=2, received=4), "oldest": 0.1})
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [2, 6, 8]  # k2: two more ahead
        # Nothing is sent ahead to a Ki holding a task not known to be short.
        await bus.broadcast(BEATS, {**_beat("k1", slots=1, busy=1, received=2), "oldest": 0.1, "long": 1})
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [2, 6, 8]
        await bus.broadcast(BEATS, {**_beat("k1", slots=1, busy=1, received=2), "oldest": 0.1, "long": 0})
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("k1", "k2", "k4")] == [3, 6, 8]
        nursery.cancel_scope.cancel()


async def test_group_commit_puts_claims_and_results_that_arrive_together_in_one_transaction(tmp_path):
    import time

    from p2pnn.store import ClaimOp, FinishOp, NewTask, open_store
    from p2pnn.tasks import State
    from p2pnn.work.ki import GroupCommit

    store = open_store("sqlite", sqlite_path=tmp_path / "tasks.db")
    await store.open()
    transactions = []
    apply = store.apply

    async def counting_apply(ops, *, now):
        transactions.append(len(ops))
        return await apply(ops, now=now)

    store.apply = counting_apply  # the real store, its transactions counted
    try:
        tasks, _ = await store.create([NewTask("echo", {"kind": "echo"}, "o", 3) for _ in range(4)], now=time.time())
        await store.mark_queued([t.id for t in tasks], now=time.time())
        commits = GroupCommit(store, time.time)
        claimed = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(commits.run)

            async def claim(task_id):
                claimed[task_id] = await commits.submit(ClaimOp(task_id, "ki-1", 30.0))

            for t in tasks[:3]:
                nursery.start_soon(claim, t.id)
            await _settle()
            assert transactions == [3] and all(c is not None and c.state is State.RUNNING for c in claimed.values())

            async def finish():
                assert await commits.submit(FinishOp(tasks[0].id, 1, State.SUCCEEDED, result={})) is True

            nursery.start_soon(finish)
            nursery.start_soon(claim, tasks[3].id)
            nursery.start_soon(claim, tasks[0].id)  # finished meanwhile (or running): refused
            await _settle()
            assert transactions == [3, 3] and claimed[tasks[0].id] is None and claimed[tasks[3].id] is not None
            assert (await store.get(tasks[0].id)).state is State.SUCCEEDED
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_long_poll_wakes_when_a_beat_names_its_task_finished(tmp_path, monkeypatch):
    import time

    from p2pnn import service as service_mod
    from p2pnn.callers import ANONYMOUS_ADMIN
    from p2pnn.store import open_store
    from p2pnn.tasks import Limits, State

    monkeypatch.setattr(service_mod, "WAIT_POLL_SECONDS", (30.0,))  # only the beat can wake it in time
    store = open_store("sqlite", sqlite_path=tmp_path / "tasks.db")
    await store.open()
    bus = LocalBus()
    try:
        service = service_mod.TaskService(store, bus, limits=Limits(), max_attempts=3)
        (task,), _ = await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN)
        claimed = await store.claim(task.id, worker="ki-elsewhere", now=time.time(), lease_seconds=30)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.follow_beats)
            done = {}

            async def wait():
                done["task"] = await service.wait(task.id, 20)
                done["at"] = time.monotonic()

            nursery.start_soon(wait)
            await _settle()
            assert "task" not in done
            assert await store.finish(task.id, attempt=claimed.attempts, state=State.SUCCEEDED, now=time.time(), result={})
            sent = time.monotonic()
            await bus.broadcast(BEATS, {**_beat("ki-elsewhere", slots=1), "finished": [task.id]})
            with trio.fail_after(10):
                while "task" not in done:
                    await trio.sleep(0.01)
            assert done["task"].state is State.SUCCEEDED and done["at"] - sent < 10
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_task_not_known_to_be_short_is_never_sent_ahead():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        an = await _an(nursery, bus, forward_ahead=1.0, forward_ahead_age=5.0)
        await bus.broadcast(BEATS, {**_beat("k1", slots=1, busy=1), "oldest": 0.1})
        await _settle()
        await bus.publish(["long"], headers={"long": {"needs": {"short": False}}})
        await _settle()
        assert bus.depth(ki_queue("k1")) == 0  # held by the An until the slot frees
        await bus.broadcast(BEATS, _beat("k1", slots=1, busy=0))
        await _settle()
        assert bus.depth(ki_queue("k1")) == 1
        nursery.cancel_scope.cancel()


def _group_parts(bus: LocalBus, *kis: str) -> dict[str, tuple[int, int, int]]:
    """Each Ki's part of the one group in its queue: (first rank, ranks, world)."""
    parts = {}
    for ki in kis:
        for item in bus._queues[ki_queue(ki)].items:
            group = item.headers["group"]
            parts[ki] = (group["first"], group["ranks"], group["world"])
    return parts


async def test_a_groups_ranks_go_to_distinct_ki_first_whole_or_not_at_all():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        await _an(nursery, bus)
        await bus.broadcast(BEATS, _beat("one", slots=1))
        await bus.broadcast(BEATS, _beat("busy", slots=2, busy=2))
        await bus.broadcast(BEATS, _beat("three", slots=3, busy=1))
        await _settle()
        await bus.publish(["g1"], headers={"g1": {"needs": {"workers": 3, "min_workers": 3}}})
        await _settle()
        # Free slots: one 1, busy 0, three 2. Three ranks fit only by taking a second slot of "three".
        parts = _group_parts(bus, "one", "busy", "three")
        assert parts == {"three": (0, 2, 3), "one": (2, 1, 3)}, parts  # rank 0 where most slots are free
        assert bus.depth() == 0

        # Nothing free now: a second group waits whole, nothing of it goes out.
        await bus.publish(["g2"], headers={"g2": {"needs": {"workers": 2, "min_workers": 2}}})
        await _settle()
        assert bus.depth(ki_queue("busy")) == 0 and bus.depth(ki_queue("one")) == 1
        # Two Ki free up a slot each: the group goes out, one rank on each.
        await bus.broadcast(BEATS, _beat("busy", slots=2, busy=1))
        await bus.broadcast(BEATS, _beat("one", slots=1, busy=0, received=1))
        await _settle()
        assert bus.depth(ki_queue("busy")) == 1 and bus.depth(ki_queue("one")) == 2
        nursery.cancel_scope.cancel()


async def test_a_swarm_with_fewer_slots_than_workers_runs_the_group_smaller_down_to_min_workers():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        await _an(nursery, bus)
        await bus.broadcast(BEATS, _beat("pair", slots=2))
        await _settle()
        await bus.publish(["g1"], headers={"g1": {"needs": {"workers": 4, "min_workers": 2}}})
        await _settle()
        assert _group_parts(bus, "pair") == {"pair": (0, 2, 2)}  # both ranks on one node's two slots
        await bus.publish(["g2"], headers={"g2": {"needs": {"workers": 4, "min_workers": 3}}})
        await _settle()
        assert bus.depth(ki_queue("pair")) == 1 and bus.depth() == 0  # parked: the swarm is too small for it
        nursery.cancel_scope.cancel()


async def test_a_gpu_task_with_no_gpu_ki_is_parked_out_of_the_way_then_placed_or_failed(tmp_path):
    from p2pnn.store import NewTask, open_store

    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    bus = LocalBus()
    metrics = Metrics()
    try:
        created, _ = await store.create([NewTask("train", {"kind": "train"}, "o", 3) for _ in range(3)], now=0.0)
        await store.mark_queued([t.id for t in created], now=0.0)
        late, doomed, canary = (t.id for t in created)
        async with trio.open_nursery() as nursery:
            an = Dispatcher(node_id=AN, store=store, bus=bus, metrics=metrics, prefetch=10, beat_timeout=60,
                            ki_message_ttl=60, park_fail_seconds=3)
            await nursery.start(an.run)
            await bus.broadcast(BEATS, _beat("cpu", slots=8))
            await _settle()
            gpu = {"needs": {"gpu": True, "memory_mb": 0}}
            await bus.publish([late, doomed], headers={late: gpu, doomed: gpu})
            await bus.publish([f"c{i}" for i in range(3)], headers={f"c{i}": {"needs": {}} for i in range(3)})
            await _settle()
            # The CPU tasks behind the GPU ones were not held up.
            assert bus.depth(ki_queue("cpu")) == 3 and metrics.parked._value.get() == 2
            # Malformed beats are dropped and counted; the An keeps reading.
            await bus.broadcast(BEATS, {"node": "bad", "slots": "many"})
            await bus.broadcast(BEATS, {"node": ["not", "a", "str"]})
            await bus.broadcast(BEATS, _beat("gpu", slots=1, gpu=True))
            with trio.fail_after(10):
                while bus.depth(ki_queue("gpu")) < 1:
                    await trio.sleep(0.05)
            assert metrics.malformed_messages.labels(source="beats")._value.get() == 2
            # One GPU slot, now taken: the other stays parked while a capable Ki is alive... The canary, parked
            # after it, needs more memory than any Ki has: once the canary fails, the An has judged the
            # older parked task past park_fail_seconds in that same pass (parked tasks are judged in order).
            await bus.publish([canary], headers={canary: {"needs": {"gpu": True, "memory_mb": 5000}}})
            with trio.fail_after(20):
                while (await store.get(canary)).state.value != "failed":
                    await trio.sleep(0.05)
            assert (await store.get(canary)).error == "no Ki with a GPU and 5000 MB of memory for 3 s"
            assert (await store.get(doomed)).state.value == "queued"
            # ...and fails, with the reason, once no Ki that could run it beats any more.
            an.kis.pop("gpu")
            with trio.fail_after(10):
                while (await store.get(doomed)).state.value != "failed":
                    await trio.sleep(0.05)
            assert (await store.get(doomed)).error == "no Ki with a GPU for 3 s"
            assert (await store.get(late)).state.value == "queued"
            with trio.fail_after(10):  # the gauge is set once the pass over the parked tasks is done
                while metrics.parked._value.get() != 0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_wait_woken_before_it_began_reads_at_once(tmp_path, monkeypatch):
    """A result recorded while a submit with ?wait= was still publishing (the finish hint came
    before the wait proper began) is read at once, not after a poll interval."""
    import time

    from p2pnn import service as service_mod
    from p2pnn.callers import ANONYMOUS_ADMIN
    from p2pnn.store import open_store
    from p2pnn.tasks import Limits, State

    monkeypatch.setattr(service_mod, "WAIT_POLL_SECONDS", (30.0,))  # a poll would come far too late
    store = open_store("sqlite", sqlite_path=tmp_path / "tasks.db")
    await store.open()
    try:
        service = service_mod.TaskService(store, LocalBus(), limits=Limits(), max_attempts=3)
        (task,), _ = await service.submit([{"kind": "echo"}], ANONYMOUS_ADMIN)
        with service._watching([task.id]) as watched:
            claimed = await store.claim(task.id, worker="ki-1", now=time.time(), lease_seconds=30)
            assert await store.finish(task.id, attempt=claimed.attempts, state=State.SUCCEEDED, now=time.time(), result={})
            service.finished(task.id)
            with trio.fail_after(5):
                done = await service._until_terminal(task.id, watched[task.id])
        assert done.state is State.SUCCEEDED
    finally:
        await store.close()


async def test_with_direct_short_tasks_a_long_task_needs_a_slot_no_long_task_holds():
    bus = LocalBus()
    async with trio.open_nursery() as nursery:
        an = await _an(nursery, bus, direct_short=True)
        # "shorts": both slots busy with short tasks it took from the short queue, and four more in hand.
        await bus.broadcast(BEATS, {**_beat("shorts", slots=2, busy=6), "long": 0})
        # "longs": both slots held by long tasks.
        await bus.broadcast(BEATS, {**_beat("longs", slots=2, busy=2), "long": 2})
        await _settle()
        await bus.publish(["l1", "l2", "l3"], headers={t: {"needs": {}} for t in ("l1", "l2", "l3")})
        await _settle()
        # Two slots not held by long tasks: two go there, behind short tasks only; the third waits.
        assert [bus.depth(ki_queue(k)) for k in ("shorts", "longs")] == [2, 0]
        assert bus.depth() == 0
        # The third goes to the first Ki that beats with a slot free of long tasks.
        await bus.broadcast(BEATS, _beat("idle", slots=1))
        await _settle()
        assert [bus.depth(ki_queue(k)) for k in ("shorts", "longs", "idle")] == [2, 0, 1]
        nursery.cancel_scope.cancel()
