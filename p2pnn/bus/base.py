"""The TaskBus interface: named durable queues of task ids, and broadcast topics.

Queues and topics have logical names (``tasks``, ``short``, ``ki.<node id>``,
``beats``, ``cancel``); a transport maps them onto its own (RabbitMQ: ``<prefix>.tasks``).
"""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Mapping

TASKS = "tasks"  # the swarm's shared queue: API and sweeper publish here, An (or a lone Ki) consumes
# A swarm's queue of tasks known to be short (tasks.needs_of), which need no placement: the API
# publishes them here and every Ki with room consumes it directly, one broker hop instead of two.
SHORT = "short"
BEATS = "beats"  # topic: Ki capacity beats, read by An
CANCEL = "cancel"  # topic: cancellation requests, read by every Ki


def ki_queue(node_id: str) -> str:
    """The durable queue an An forwards a Ki's tasks to."""
    return f"ki.{node_id}"


@dataclass(frozen=True)
class Delivery:
    """One message carrying one task id; ``tag`` identifies it for ack/nack on the inbox it came from.

    ``headers`` carry what a dispatcher needs without reading the store
    (``needs``) and who forwarded it (``an``).
    """

    task_id: str
    tag: Any
    redelivered: bool = False
    headers: Mapping[str, Any] = field(default_factory=dict)


class Inbox(abc.ABC):
    """One consumer of one queue. Every delivery must be acked or nacked exactly once;
    a delivery neither acked nor nacked when its consumer goes away is delivered again."""

    @abc.abstractmethod
    async def receive(self) -> Delivery:
        """The next delivery; waits until there is one."""

    @abc.abstractmethod
    def receive_nowait(self) -> Delivery | None:
        """The next delivery if one is already here, else None."""

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None: ...

    async def ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack several deliveries; a transport may send fewer acknowledgements than deliveries."""
        for delivery in deliveries:
            await self.ack(delivery)

    @abc.abstractmethod
    async def nack(self, delivery: Delivery) -> None:
        """Give the message back to be delivered again."""


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def receive(self) -> dict[str, Any]:
        """The next broadcast message on the topic."""


class TaskBus(abc.ABC):
    """Resource handling: ``run`` holds the transport's resources (connections,
    threads) for as long as it runs and signals readiness through task_status;
    ``consume`` and ``subscribe`` hold a consumer for the length of their
    ``async with``.

    Error handling: ``publish`` returns only once the transport has accepted
    every id (for a broker: confirmed); it raises BusError on failure, and the
    caller leaves the tasks ``pending`` for the sweeper. ``broadcast`` is
    best-effort: it never raises.
    """

    # True for a queue inside this process that is rebuilt from the store at start (LocalBus):
    # a task can then be stored ``queued`` right away and published after the commit, since
    # its message is lost only with the process, and the node's next start publishes it again.
    in_process: bool = False

    @abc.abstractmethod
    async def run(self, *, task_status) -> None: ...

    @abc.abstractmethod
    async def publish(
        self, task_ids: list[str], *, queue: str = TASKS, headers: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Put task ids on ``queue``; ``headers`` maps a task id to headers for its message."""

    @abc.abstractmethod
    def consume(self, queue: str, *, prefetch: int) -> AbstractAsyncContextManager[Inbox]:
        """Consume ``queue``, at most ``prefetch`` deliveries unacked at a time."""

    @abc.abstractmethod
    async def broadcast(self, topic: str, body: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]: ...

    @abc.abstractmethod
    def depth(self, queue: str = TASKS) -> int:
        """Messages waiting on ``queue`` (as far as this node last saw; -1 when unknown)."""


class BusError(RuntimeError):
    """The transport refused or lost a publish; the message says why."""
