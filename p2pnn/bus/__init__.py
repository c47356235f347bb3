"""Task transport: how "task X is ready to run" reaches a worker.

base.py   the TaskBus interface: named queues (Inbox), topics (Subscription), Delivery
local.py  the in-process queues of the embedded single-node default
amqp.py   RabbitMQ through pika: one connection in a thread of its own, durable
          (quorum) queues, confirmed publishes, manual acks, reconnect

A message is only a hint that work exists: the store is the truth, and a
sweeper re-publishes what a lost message would have carried.
"""

from p2pnn.bus.base import BEATS, CANCEL, SHORT, TASKS, BusError, Delivery, Inbox, Subscription, TaskBus, ki_queue
from p2pnn.bus.local import LocalBus

__all__ = [
    "BEATS", "CANCEL", "SHORT", "TASKS", "BusError", "Delivery", "Inbox", "LocalBus", "Subscription", "TaskBus", "ki_queue",
]
