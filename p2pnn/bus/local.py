"""The in-process queue of the embedded default: a FIFO of task ids in memory.

Nothing survives a restart, and nothing needs to: on start the node
re-publishes every ``queued`` task from the store.
"""

from __future__ import annotations

import collections
import itertools

import trio

from p2pnn.bus.base import Delivery, TaskBus


class LocalBus(TaskBus):
    def __init__(self) -> None:
        self._queue: collections.deque[Delivery] = collections.deque()
        self._unacked: dict[int, Delivery] = {}
        self._tags = itertools.count(1)
        self._wakeup = trio.lowlevel.ParkingLot()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def publish(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self._queue.append(Delivery(task_id=task_id, tag=next(self._tags)))
        self._wakeup.unpark(count=len(task_ids))
        await trio.lowlevel.checkpoint()

    async def receive(self) -> Delivery:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            await self._wakeup.park()
        delivery = self._queue.popleft()
        self._unacked[delivery.tag] = delivery
        # Shielded: a cancellation here would lose the message we just took.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return delivery

    async def ack(self, delivery: Delivery) -> None:
        self._unacked.pop(delivery.tag, None)
        await trio.lowlevel.checkpoint()

    async def nack(self, delivery: Delivery) -> None:
        if self._unacked.pop(delivery.tag, None) is not None:
            self._queue.appendleft(Delivery(delivery.task_id, next(self._tags), redelivered=True))
            self._wakeup.unpark()
        await trio.lowlevel.checkpoint()

    def depth(self) -> int:
        return len(self._queue)
