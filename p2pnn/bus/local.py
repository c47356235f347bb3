"""The in-process bus of the embedded default: FIFOs of task ids in memory, and in-memory topics.

Nothing survives a restart, and nothing needs to: on start the node
re-publishes every ``queued`` task from the store.
"""

from __future__ import annotations

import collections
import itertools
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import trio

from p2pnn.bus.base import TASKS, Delivery, Inbox, Subscription, TaskBus


class _Queue:
    def __init__(self) -> None:
        self.items: collections.deque[Delivery] = collections.deque()
        self.wakeup = trio.lowlevel.ParkingLot()


class _LocalInbox(Inbox):
    def __init__(self, queue: _Queue, tags: itertools.count) -> None:
        self._queue = queue
        self._tags = tags
        self.unacked: dict[int, Delivery] = {}

    async def receive(self) -> Delivery:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue.items:
            await self._queue.wakeup.park()
        delivery = self._take()
        # Shielded: a cancellation here would lose the message we just took.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return delivery

    def receive_nowait(self) -> Delivery | None:
        return self._take() if self._queue.items else None

    def _take(self) -> Delivery:
        delivery = self._queue.items.popleft()
        self.unacked[delivery.tag] = delivery
        return delivery

    async def ack(self, delivery: Delivery) -> None:
        self.unacked.pop(delivery.tag, None)
        await trio.lowlevel.checkpoint()

    async def nack(self, delivery: Delivery) -> None:
        if self.unacked.pop(delivery.tag, None) is not None:
            self.give_back(delivery)
        await trio.lowlevel.checkpoint()

    def give_back(self, delivery: Delivery) -> None:
        self._queue.items.appendleft(
            Delivery(delivery.task_id, next(self._tags), redelivered=True, headers=delivery.headers)
        )
        self._queue.wakeup.unpark()


class _LocalSubscription(Subscription):
    def __init__(self, receive: trio.MemoryReceiveChannel) -> None:
        self._receive = receive

    async def receive(self) -> dict[str, Any]:
        return await self._receive.receive()


class LocalBus(TaskBus):
    in_process = True

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = collections.defaultdict(_Queue)
        self._topics: dict[str, set[trio.MemorySendChannel]] = collections.defaultdict(set)
        self._tags = itertools.count(1)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def publish(
        self, task_ids: list[str], *, queue: str = TASKS, headers: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        q = self._queues[queue]
        for task_id in task_ids:
            q.items.append(Delivery(task_id=task_id, tag=next(self._tags), headers=(headers or {}).get(task_id, {})))
        q.wakeup.unpark(count=len(task_ids))
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def consume(self, queue: str, *, prefetch: int) -> AsyncIterator[Inbox]:
        inbox = _LocalInbox(self._queues[queue], self._tags)
        try:
            yield inbox
        finally:  # like a broker: what the consumer still held is delivered again
            for delivery in list(inbox.unacked.values()):
                inbox.give_back(delivery)

    async def broadcast(self, topic: str, body: Mapping[str, Any]) -> None:
        for send in list(self._topics[topic]):
            try:
                send.send_nowait(dict(body))
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._topics[topic].add(send)
        try:
            yield _LocalSubscription(receive)
        finally:
            self._topics[topic].discard(send)

    def depth(self, queue: str = TASKS) -> int:
        return len(self._queues[queue].items)
