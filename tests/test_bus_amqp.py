"""AmqpBus against the machine's RabbitMQ: confirms, redelivery, dead Ki queues, reconnect."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from p2pnn.callers import Caller
from p2pnn.bus import BusError, ki_queue
from p2pnn.bus.amqp import AmqpBus, AmqpSettings
from p2pnn.work.sweeper import Sweeper
from p2pnn.metrics import Metrics
from p2pnn.service import TaskService
from p2pnn.store import open_store
from p2pnn.tasks import Limits
from tests.conftest import rabbitmqctl

OPERATOR = Caller(sub="tester", role="operator")


def _bus(url: str, **settings) -> AmqpBus:
    return AmqpBus(AmqpSettings(url=url, prefix="t", **settings))


async def _started(nursery: trio.Nursery, bus: AmqpBus) -> AmqpBus:
    await nursery.start(bus.run)
    assert await bus.wait_connected(20), "no connection to RabbitMQ"
    return bus


async def test_batch_of_a_thousand_is_confirmed_and_consumed_in_order(amqp_url):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        assert bus.link.quorum  # RabbitMQ >= 3.10 here: quorum queues
        ids = [f"task-{i}" for i in range(1000)]
        await bus.publish(ids, headers={"task-7": {"needs": {"gpu": True}}})
        got = []
        async with bus.consume("tasks", prefetch=100) as inbox:
            while len(got) < len(ids):
                delivery = await inbox.receive()
                got.append(delivery)
                await inbox.ack(delivery)
        assert [d.task_id for d in got] == ids
        assert got[7].headers == {"needs": {"gpu": True}} and got[8].headers == {}
        nursery.cancel_scope.cancel()


async def test_publish_is_confirmed_before_the_task_is_queued(amqp_url, amqp_vhost, tmp_path):
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            bus = await _started(nursery, _bus(amqp_url))
            service = TaskService(store, bus, limits=Limits(), max_attempts=3)
            seen_at_confirm = []
            publish = bus.publish

            async def recording_publish(task_ids, **kw):
                await publish(task_ids, **kw)  # returns once the broker confirmed
                seen_at_confirm.extend([(await store.get(t)).state.value for t in task_ids])

            bus.publish = recording_publish
            (task,), _ = await service.submit([{"kind": "echo"}], OPERATOR)
            assert seen_at_confirm == ["pending"] and task.state.value == "queued"

            # The broker loses the queue, message and all: the next publish comes back unroutable,
            # so that task stays pending; the store still holds both.
            rabbitmqctl("delete_queue", "--vhost", amqp_vhost, "t.tasks")
            (refused,), _ = await service.submit([{"kind": "echo"}], OPERATOR)
            assert refused.state.value == "pending"
            # Reconnected (topology declared again), the sweeper publishes the pending task and
            # re-publishes the queued one whose message was lost.
            rabbitmqctl("close_all_connections", "-p", amqp_vhost, "test")
            sweeper = Sweeper(store=store, publish=service.publish, metrics=Metrics(), interval=0.2,
                              pending_after=0.5, queued_after=2.0, republish_queued=False)
            nursery.start_soon(sweeper.run)
            with trio.fail_after(30):
                while (await store.get(refused.id)).state.value != "queued":
                    await trio.sleep(0.1)
            async with bus.consume("tasks", prefetch=10) as inbox:
                with trio.fail_after(10):
                    got = {(await inbox.receive()).task_id for _ in range(2)}
            assert got == {task.id, refused.id}
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


CONSUMER = textwrap.dedent("""
    import sys, trio
    from p2pnn.bus.amqp import AmqpBus, AmqpSettings
    async def main():
        bus = AmqpBus(AmqpSettings(url=sys.argv[1], prefix="t"))
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            async with bus.consume("tasks", prefetch=1) as inbox:
                delivery = await inbox.receive()
                print("got", delivery.task_id, flush=True)
                await trio.sleep_forever()  # never acks
    trio.run(main)
""")


async def test_consumer_killed_before_ack_gets_its_message_redelivered(amqp_url):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        await bus.publish(["only-one"])
        proc = subprocess.Popen([sys.executable, "-c", CONSUMER, amqp_url], stdout=subprocess.PIPE, text=True)
        try:
            with trio.fail_after(60):  # the consumer process starts, connects and takes the message
                line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
            assert line.split() == ["got", "only-one"]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        async with bus.consume("tasks", prefetch=1) as inbox:
            with trio.fail_after(20):
                delivery = await inbox.receive()
            assert delivery.task_id == "only-one" and delivery.redelivered
            await inbox.ack(delivery)
        nursery.cancel_scope.cancel()


async def test_message_in_a_dead_ki_queue_goes_back_to_the_shared_queue(amqp_url):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url, ki_message_ttl=1.0))
        await bus.publish(["for-a-dead-ki"], queue=ki_queue("gone"), headers={"for-a-dead-ki": {"an": "a1"}})
        started = time.monotonic()
        async with bus.consume("tasks", prefetch=1) as inbox:
            with trio.fail_after(20):
                delivery = await inbox.receive()
            await inbox.ack(delivery)
        assert delivery.task_id == "for-a-dead-ki" and time.monotonic() - started >= 0.9
        nursery.cancel_scope.cancel()


async def test_bus_reconnects_after_the_broker_drops_its_connections(amqp_url, amqp_vhost):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        async with bus.consume("tasks", prefetch=10) as inbox:
            await bus.publish(["before"])
            with trio.fail_after(10):
                first = await inbox.receive()
            rabbitmqctl("close_all_connections", "-p", amqp_vhost, "test")
            await inbox.ack(first)  # from the dropped connection: it is delivered again
            with trio.fail_after(30):
                while True:
                    try:
                        await bus.publish(["after"])
                        break
                    except BusError:
                        await trio.sleep(0.2)
                got = set()
                while got != {"before", "after"}:
                    delivery = await inbox.receive()
                    got.add(delivery.task_id)
                    await inbox.ack(delivery)
        nursery.cancel_scope.cancel()


async def test_bus_without_a_broker_refuses_publishes_instead_of_hanging():
    async with trio.open_nursery() as nursery:
        bus = AmqpBus(AmqpSettings(url="amqp://guest:guest@127.0.0.1:1/x", prefix="t"))
        await nursery.start(bus.run)
        with trio.fail_after(10), pytest.raises(BusError):
            await bus.publish(["x"])
        nursery.cancel_scope.cancel()


async def test_ack_many_settles_a_batch_and_only_that_batch(amqp_url):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        await bus.publish([f"m{i}" for i in range(10)])
        async with bus.consume("tasks", prefetch=10) as inbox:
            got = [await inbox.receive() for _ in range(10)]
            await inbox.ack_many(got[:4])  # the oldest four: one multiple ack
            await inbox.ack_many([got[5], got[7]])  # with gaps below them: acked one by one
            await inbox.nack(got[9])
        # The consumer is gone: whatever it did not ack comes back (before a message published
        # after it went), and nothing it acked.
        assert sorted(await _delivered_again(bus)) == ["m4", "m6", "m8", "m9"]
        nursery.cancel_scope.cancel()


async def test_acks_of_one_turn_go_as_one_batch_and_settle_only_what_was_acked(amqp_url):
    """Acks asked for together are coalesced into one multiple ack where they cover every unsettled
    delivery up to the highest: one left unacked in their midst, and one nacked just after them,
    must still come back."""
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        await bus.publish([f"m{i}" for i in range(12)])
        async with bus.consume("tasks", prefetch=12) as inbox:
            got = [await inbox.receive() for _ in range(12)]
            async with trio.open_nursery() as acks:  # all in one turn, before the pika thread drains
                for delivery in got[:4] + got[5:10]:
                    acks.start_soon(inbox.ack, delivery)
                acks.start_soon(inbox.nack, got[10])
            await inbox.ack(got[11])  # a batch of its own, after the nack
        assert sorted(await _delivered_again(bus)) == ["m10", "m4"]
        nursery.cancel_scope.cancel()


async def _delivered_again(bus: AmqpBus) -> list[str]:
    """What the shared queue delivers before a marker published now: what earlier consumers left
    unsettled or gave back (acked as it comes)."""
    await bus.publish(["end"])
    async with bus.consume("tasks", prefetch=12) as inbox:
        again: list[str] = []
        with trio.fail_after(20):
            while not again or again[-1] != "end":
                delivery = await inbox.receive()
                again.append(delivery.task_id)
                await inbox.ack(delivery)
    return again[:-1]


async def test_a_shared_queue_declared_with_older_arguments_is_used_not_refused_forever(amqp_url):
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare("t.tasks", durable=True)  # as a p2pnn before at-least-once dead-lettering would
    conn.close()
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url))
        await bus.publish(["a-task"])
        async with bus.consume("tasks", prefetch=1) as inbox:
            with trio.fail_after(10):
                delivery = await inbox.receive()
            await inbox.ack(delivery)
        assert delivery.task_id == "a-task"
        nursery.cancel_scope.cancel()


async def test_malformed_bodies_are_dropped_and_counted_without_a_reconnect(amqp_url):
    import pika

    dropped: list[str] = []
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, AmqpBus(AmqpSettings(url=amqp_url, prefix="t"), on_malformed=dropped.append))
        generation = bus.link.generation
        async with bus.consume("tasks", prefetch=10) as inbox:
            conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
            ch = conn.channel()
            for body in (b"not json", b"[1, 2]", b'{"id": 7}', b'{"id": "x", "headers": [1, 2]}', b"[" * 5000):
                ch.basic_publish("", "t.tasks", body)
            ch.basic_publish("", "t.tasks", b'{"id": "good", "headers": {}}')
            conn.close()
            with trio.fail_after(10):
                delivery = await inbox.receive()
            await inbox.ack(delivery)
        assert delivery.task_id == "good" and dropped == ["tasks"] * 5
        assert bus.link.generation == generation, "a bad body must not cost the connection"
        nursery.cancel_scope.cancel()


async def test_what_waits_in_a_stopped_kis_queue_goes_to_the_shared_queue_at_once(amqp_url):
    async with trio.open_nursery() as nursery:
        bus = await _started(nursery, _bus(amqp_url, ki_message_ttl=60.0))
        queue, ids = ki_queue("stopping"), [f"waiting-{i}" for i in range(5)]
        async with bus.consume(queue, prefetch=1) as inbox:  # the Ki holds one; four wait in its queue
            await bus.publish(ids, queue=queue, headers={i: {"an": "a1"} for i in ids})
            with trio.fail_after(20):
                await inbox.receive()
        got: list[str] = []
        async with bus.consume("tasks", prefetch=10) as shared:  # its role stopped: nothing waits out 60 s
            with trio.fail_after(10):
                while len(got) < len(ids):
                    delivery = await shared.receive()
                    got.append(delivery.task_id)
                    await shared.ack(delivery)
        assert sorted(got) == ids
        nursery.cancel_scope.cancel()


def _queue_types(vhost: str) -> dict[str, str]:
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--quiet", "--no-table-headers").stdout
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


@pytest.mark.parametrize("short_type, expected", [(None, "classic"), ("quorum", "quorum"), ("auto", "quorum")])
async def test_the_short_queue_is_classic_unless_configured_and_the_shared_one_quorum(
    amqp_url, amqp_vhost, short_type, expected
):
    settings = {} if short_type is None else {"short_queue_type": short_type}
    async with trio.open_nursery() as nursery:
        await _started(nursery, _bus(amqp_url, **settings))
        types = await trio.to_thread.run_sync(_queue_types, amqp_vhost)
        assert (types["t.tasks"], types["t.short"]) == ("quorum", expected), types
        nursery.cancel_scope.cancel()
