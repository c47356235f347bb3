"""The An: places tasks from the swarm's shared queue on Ki, by their free capacity.

Dispatcher  consumes the shared task queue, picks for each task the capable
            Ki with the most free slots (as beats report them, minus what it
            forwarded since), forwards the task to that Ki's queue with a
            confirmed publish and only then acks it. An An that dies before
            the ack gets its messages redelivered to another.

A data-parallel train task (``workers`` > 1) goes to one Ki with as many free
slots as it will run ranks (``workers``, or all of a smaller Ki's slots down
to ``min_workers``); the Ki runs the group on its slots.

How an An counts what a Ki has room for: ``free = slots - busy - in
flight``, where ``in flight`` is what this An forwarded that the Ki's last
beat does not yet count as received. Forwards older than the Ki queue's
message TTL stop counting (the broker has dead-lettered them back to the
shared queue by then). An An only forwards into a free slot, so a short task
never waits behind a long one while some Ki has a slot free.
"""

from __future__ import annotations

import collections
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from p2pnn import logs
from p2pnn.bus import BEATS, TASKS, BusError, Delivery, Inbox, TaskBus, ki_queue
from p2pnn.metrics import Metrics
from p2pnn.store import StoreError, TaskStore
from p2pnn.tasks import TERMINAL, needs_of

log = logs.get(__name__)

WAIT_FOR_ROOM = 0.5  # how long an An waits for a beat before looking at its Ki again
BUS_RETRY_SECONDS = 0.5  # pause after a forward failed (broker away)


def group_ranks(slots: int, needs: dict[str, Any]) -> int | None:
    """How many ranks of a task a Ki with ``slots`` would run (1 for a plain task); None if too few."""
    workers = int(needs.get("workers", 1))
    ranks = min(workers, slots)
    return ranks if ranks >= int(needs.get("min_workers", workers)) else None


def can_run(caps: dict[str, Any], needs: dict[str, Any]) -> bool:
    if needs.get("gpu") and not caps.get("gpu"):
        return False
    return int(needs.get("memory_mb", 0)) <= int(caps.get("memory_mb", 0) or 1 << 40)


@dataclass
class _KiView:
    """What an An knows of one Ki."""

    node: str
    boot: str = ""
    slots: int = 0
    busy: int = 0
    caps: dict[str, Any] = field(default_factory=dict)
    an: str | None = None
    seen: float = 0.0
    received: int = 0  # deliveries from this An, as of the last beat
    in_flight: collections.deque[float] = field(default_factory=collections.deque)  # forward times

    def update(self, beat: dict[str, Any], me: str, now: float) -> None:
        received = int(beat.get("received", {}).get(me, 0))
        if beat.get("boot") != self.boot:  # new Ki or restarted: its counters start over
            self.boot, self.in_flight = str(beat.get("boot")), collections.deque()
        else:
            for _ in range(max(0, received - self.received)):
                if self.in_flight:
                    self.in_flight.popleft()
        self.received = received
        self.slots, self.busy = int(beat.get("slots", 0)), int(beat.get("busy", 0))
        self.caps, self.an, self.seen = dict(beat.get("caps") or {}), beat.get("an"), now

    def free(self, now: float, ttl: float) -> int:
        while self.in_flight and self.in_flight[0] < now - ttl:
            self.in_flight.popleft()
        return self.slots - self.busy - len(self.in_flight)


class Dispatcher:
    """The An. Resource handling: holds at most ``prefetch`` unacked messages of the
    shared queue; whatever it holds when it stops (or dies) is redelivered.

    Error handling: a forward that fails (broker away) nacks the messages, so
    they come back; a store failure while looking up a task's needs does the same.
    """

    def __init__(
        self,
        *,
        node_id: str,
        store: TaskStore,
        bus: TaskBus,
        metrics: Metrics,
        prefetch: int,
        beat_timeout: float,
        ki_message_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.prefetch = prefetch
        self.beat_timeout = beat_timeout
        self.ki_message_ttl = ki_message_ttl
        self._clock = clock
        self.kis: dict[str, _KiView] = {}
        self._beat_arrived = trio.Event()
        self._held = 0
        self._rng = random.Random(os.getpid())

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with self.bus.subscribe(BEATS) as beats, trio.open_nursery() as nursery:
            nursery.start_soon(self._read_beats, beats)
            watch = getattr(self.bus, "watch_depth", None)
            if watch is not None:
                watch(TASKS)
            async with self.bus.consume(TASKS, prefetch=self.prefetch) as inbox:
                task_status.started()
                log.info("an.started", prefetch=self.prefetch)
                while True:
                    batch = [await inbox.receive()]
                    while len(batch) < self.prefetch and (more := inbox.receive_nowait()) is not None:
                        batch.append(more)
                    await self._dispatch(inbox, batch)

    async def _read_beats(self, beats: Any) -> None:
        while True:
            beat = await beats.receive()
            node = str(beat.get("node", ""))
            if not node:
                continue
            view = self.kis.setdefault(node, _KiView(node))
            view.update(beat, self.node_id, self._clock())
            self._beat_arrived.set()
            self._beat_arrived = trio.Event()
            self.metrics.kis_seen.set(len(self._live_kis()))
            self.metrics.an_queue_depth.labels(an=self.node_id).set(max(0, self.bus.depth(TASKS)) + self._held)

    def _live_kis(self) -> list[_KiView]:
        now = self._clock()
        return [k for k in self.kis.values() if now - k.seen < self.beat_timeout and k.an in (None, self.node_id)]

    def pick(self, needs: dict[str, Any]) -> _KiView | None:
        """The capable Ki with the most free slots (ties: at random); None when all are full."""
        now = self._clock()
        best, best_free = [], 0
        for ki in self._live_kis():
            ranks = group_ranks(ki.slots, needs)
            if not can_run(ki.caps, needs) or ranks is None:
                continue
            free = ki.free(now, self.ki_message_ttl)
            if free < ranks:  # a group starts with all its ranks or waits: never half of it here
                continue
            if free > best_free:
                best, best_free = [ki], free
            elif free == best_free and free > 0:
                best.append(ki)
        return self._rng.choice(best) if best else None

    async def _needs(self, delivery: Delivery) -> dict[str, Any] | None:
        """What the task needs; None when it no longer needs running (finished, cancelled, unknown)."""
        if "needs" in delivery.headers:
            return dict(delivery.headers["needs"])
        task = await self.store.get(delivery.task_id)  # re-published by a sweeper: no headers
        if task is None or task.state in TERMINAL:
            return None
        return needs_of(task.spec)

    async def _dispatch(self, inbox: Inbox, batch: list[Delivery]) -> None:
        self._held = len(batch)
        placed: dict[str, list[tuple[Delivery, dict[str, Any]]]] = collections.defaultdict(list)
        for delivery in batch:
            try:
                needs = await self._needs(delivery)
            except StoreError as exc:
                log.warning("store.unreachable", error=str(exc))
                await inbox.nack(delivery)
                self._held -= 1
                continue
            if needs is None:
                self.metrics.stale_deliveries.inc()
                await inbox.ack(delivery)
                self._held -= 1
                continue
            while (ki := self.pick(needs)) is None:
                await self._forward(inbox, placed)  # what is placed goes now, not after the wait
                with trio.move_on_after(WAIT_FOR_ROOM):
                    await self._beat_arrived.wait()
            ki.in_flight.append(self._clock())
            placed[ki.node].append((delivery, needs))
        await self._forward(inbox, placed)

    async def _forward(self, inbox: Inbox, placed: dict[str, list[tuple[Delivery, dict[str, Any]]]]) -> None:
        for ki, items in list(placed.items()):
            del placed[ki]
            ids = [d.task_id for d, _ in items]
            headers = {d.task_id: {"an": self.node_id, "needs": needs} for d, needs in items}
            try:
                await self.bus.publish(ids, queue=ki_queue(ki), headers=headers)
            except BusError as exc:
                log.warning("an.forward_failed", ki=ki, tasks=len(ids), error=str(exc))
                view = self.kis.get(ki)
                if view is not None:
                    view.in_flight.clear()
                for d, _ in items:
                    await inbox.nack(d)
                self._held -= len(items)
                await trio.sleep(BUS_RETRY_SECONDS)
                continue
            # Only now, with the Ki's queue holding them, may the shared queue forget them.
            for d, _ in items:
                await inbox.ack(d)
            self._held -= len(items)
            self.metrics.forwarded.labels(ki=ki[:12]).inc(len(ids))
