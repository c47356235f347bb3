"""The TaskBus interface: publish task ids, receive deliveries, ack them."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """One message carrying one task id; ``tag`` identifies it for ack/nack."""

    task_id: str
    tag: int
    redelivered: bool = False


class TaskBus(abc.ABC):
    """Resource handling: ``run`` holds the transport's resources (connections,
    threads) for as long as it runs and signals readiness through task_status.

    Error handling: ``publish`` returns only once the transport has accepted
    every id (for a broker: confirmed); it raises on failure, and the caller
    leaves the tasks ``pending`` for the sweeper.
    """

    @abc.abstractmethod
    async def run(self, *, task_status) -> None: ...

    @abc.abstractmethod
    async def publish(self, task_ids: list[str]) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> Delivery:
        """The next delivery; waits until there is one."""

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    async def nack(self, delivery: Delivery) -> None:
        """Give the message back to be delivered again."""

    @abc.abstractmethod
    def depth(self) -> int:
        """Messages waiting to be delivered (as far as this node can tell)."""
