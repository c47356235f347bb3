"""Task transport: how "task X is ready to run" reaches a worker.

base.py   the TaskBus interface and Delivery
local.py  the in-process queue of the embedded single-node default

A message is only a hint that work exists: the store is the truth, and a
sweeper re-publishes what a lost message would have carried.
"""

from p2pnn.bus.base import Delivery, TaskBus
from p2pnn.bus.local import LocalBus

__all__ = ["Delivery", "LocalBus", "TaskBus"]
