"""The An: places tasks from the swarm's shared queue on Ki, by their free capacity.

Dispatcher  consumes the shared task queue, picks for each task the capable
            Ki with the most free slots (as beats report them, minus what it
            forwarded since), forwards the task to that Ki's queue with a
            confirmed publish and only then acks it. An An that dies before
            the ack gets its messages redelivered to another.

A data-parallel train task (``workers`` > 1) is placed whole or not at all
(:meth:`Dispatcher.plan_group`): its ranks go to distinct Ki first, then to
more slots of Ki with room, and it waits until free slots hold every rank.
It asks for ``workers`` ranks, or as many as the live capable Ki have slots
for, down to ``min_workers``. Each Ki of the plan gets the task with a
``group`` header (group id, size, its first rank and rank count); the first
(rank 0's) claims the task and publishes where the group meets, the others
join it.

How an An counts what a Ki has room for: ``free = slots + ahead - busy -
in flight``, where ``in flight`` is what this An forwarded that the Ki's last
beat does not yet count as received. Forwards older than the Ki queue's
message TTL stop counting (the broker has dead-lettered them back to the
shared queue by then).

``ahead`` (credit ahead, ``slots x forward_ahead``) keeps slots busy: a slot
that frees finds its next task already in its Ki's hands (taken and claimed
ahead, see KiRunner) instead of waiting for a beat to reach the An and a
forward to come back; it also covers the up to BEAT_BUSY_GAP a busy Ki's
beats are coalesced over. Only tasks known to
be short (``needs["short"]``) are sent ahead, and only to a Ki whose tasks in
hand are all known to be short and younger than ``ahead_age``, so no task
waits behind a long one; ``pick`` looks at free slots first, so an idle slot
anywhere is filled before any task is sent ahead.
Both terms scale with slots, so placement stays proportional to capacity.

With ``direct_short`` (bus.direct_short) tasks known to be short mostly skip
the An: the Ki take them from the ``short`` queue themselves, and they sit in
a Ki's hand beside what the An sent. A task that is not short (or a group)
then needs only a slot not held by a long task: ``room = slots - long - in
flight`` must be positive, and among the Ki with room the one with the most
free slots (as above) is picked. The short tasks ahead of it are short, so
it waits little, and a flood of short tasks cannot keep long ones out.

A task no live Ki is able to run (it needs a GPU and none is up) is parked:
held unacked, out of the way of the tasks behind it, and placed on the first
beat from a Ki that could run it. At most ``prefetch // 2`` are parked at
once (the rest of the prefetch window keeps the queue moving); a task
parked for ``park_fail_seconds`` fails with an error naming what no Ki had.
"""

from __future__ import annotations

import collections
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from p2pnn import logs
from p2pnn.bus import BEATS, TASKS, BusError, Delivery, Inbox, TaskBus, ki_queue
from p2pnn.metrics import Metrics
from p2pnn.store import StoreError, TaskStore
from p2pnn.tasks import MAX_WORKERS, TERMINAL, State, needs_of

log = logs.get(__name__)

WAIT_FOR_ROOM = 0.5  # how long an An waits for a beat before looking at its Ki again
BUS_RETRY_SECONDS = 0.5  # pause after a forward failed (broker away)
PARK_SHARE = 2  # at most prefetch // PARK_SHARE deliveries are parked, so unparked work keeps flowing


def can_run(caps: dict[str, Any], needs: dict[str, Any]) -> bool:
    if needs.get("gpu") and not caps.get("gpu"):
        return False
    return int(needs.get("memory_mb", 0)) <= int(caps.get("memory_mb", 0) or 1 << 40)


def missing(needs: dict[str, Any]) -> str:
    """What a task needs, in words, for the error of a task no Ki could run."""
    parts = ["a GPU"] if needs.get("gpu") else []
    if needs.get("memory_mb"):
        parts.append(f"{int(needs['memory_mb'])} MB of memory")
    if int(needs.get("workers", 1)) > 1:
        parts.append(f"{int(needs.get('min_workers', needs['workers']))} worker slots in all")
    return " and ".join(parts) or "its needs"


def _clean_needs(raw: Any) -> dict[str, Any] | None:
    """A ``needs`` header as placement reads it, or None when it makes no sense."""
    if not isinstance(raw, dict):
        return None
    gpu, memory, short = raw.get("gpu", False), raw.get("memory_mb", 0), raw.get("short", False)
    if not isinstance(gpu, bool) or isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        return None
    if not isinstance(short, bool):
        return None
    workers, least = raw.get("workers", 1), raw.get("min_workers", raw.get("workers", 1))
    for value in (workers, least):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            return None
    if least > workers:
        return None
    needs: dict[str, Any] = {"gpu": gpu, "memory_mb": memory, "short": short}
    if workers > 1:
        needs["workers"], needs["min_workers"] = workers, least
    return needs


@dataclass
class _Parked:
    delivery: Delivery
    needs: dict[str, Any]
    since: float


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
    oldest: float = 0.0  # age of the Ki's oldest task in hand, as of the last beat
    long: int = 0  # tasks in hand not known to be short, as of the last beat
    in_flight: collections.deque[float] = field(default_factory=collections.deque)  # forward times

    def update(self, beat: dict[str, Any], me: str, now: float) -> None:
        """Error handling: a beat with fields of the wrong type raises ValueError/TypeError before any change."""
        received = int(beat.get("received", {}).get(me, 0))
        slots, busy = int(beat.get("slots", 0)), int(beat.get("busy", 0))
        oldest, long_tasks = float(beat.get("oldest", 0.0)), int(beat.get("long", 0))
        raw_caps, an = beat.get("caps") or {}, beat.get("an")
        caps = {"gpu": bool(raw_caps.get("gpu")), "memory_mb": int(raw_caps.get("memory_mb") or 0)}
        if an is not None and not isinstance(an, str):
            raise TypeError("an")
        if beat.get("boot") != self.boot:  # new Ki or restarted: its counters start over
            self.boot, self.in_flight = str(beat.get("boot")), collections.deque()
        else:
            for _ in range(max(0, received - self.received)):
                if self.in_flight:
                    self.in_flight.popleft()
        self.received = received
        self.slots, self.busy = slots, busy
        self.oldest, self.long = oldest, long_tasks
        self.caps, self.an, self.seen = caps, an, now

    def _expire(self, now: float, ttl: float) -> None:
        while self.in_flight and self.in_flight[0] < now - ttl:
            self.in_flight.popleft()

    def room(self, now: float, ttl: float) -> int:
        """Slots held by no long task and not yet promised to one this An sent (direct short tasks)."""
        self._expire(now, ttl)
        return self.slots - self.long - len(self.in_flight)

    def free(self, now: float, ttl: float, ahead: float = 0.0, ahead_age: float = 0.0) -> int:
        """Tasks this Ki has room for: free slots, plus the credit ahead while its tasks are short and young."""
        self._expire(now, ttl)
        credit = self.slots
        if ahead and self.long == 0 and (self.busy == 0 or self.oldest + (now - self.seen) < ahead_age):
            credit += math.ceil(self.slots * ahead)
        return credit - self.busy - len(self.in_flight)


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
        forward_ahead: float = 0.0,
        forward_ahead_age: float = 0.0,
        park_fail_seconds: float = 300.0,
        direct_short: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.prefetch = prefetch
        self.beat_timeout = beat_timeout
        self.ki_message_ttl = ki_message_ttl
        self.forward_ahead = forward_ahead
        self.forward_ahead_age = forward_ahead_age
        self.park_fail_seconds = park_fail_seconds
        self.direct_short = direct_short
        self._clock = clock
        self._parked: dict[str, _Parked] = {}  # task id -> delivery held until a capable Ki beats
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
                nursery.start_soon(self._unpark, inbox)
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
            node = beat.get("node") if isinstance(beat, dict) else None
            if not isinstance(node, str) or not node:
                self.metrics.malformed_messages.labels(source="beats").inc()
                continue
            view = self.kis.get(node) or _KiView(node)
            try:
                view.update(beat, self.node_id, self._clock())
            except (ValueError, TypeError, AttributeError, OverflowError):
                self.metrics.malformed_messages.labels(source="beats").inc()
                log.warning("an.malformed_beat", node=node[:64], beat=repr(beat)[:200])
                continue
            self.kis[node] = view
            self._beat_arrived.set()
            self._beat_arrived = trio.Event()
            self.metrics.kis_seen.set(len(self._live_kis()))
            self.metrics.an_queue_depth.labels(an=self.node_id).set(max(0, self.bus.depth(TASKS)) + self._held)

    def _live_kis(self) -> list[_KiView]:
        now = self._clock()
        return [k for k in self.kis.values() if now - k.seen < self.beat_timeout and k.an in (None, self.node_id)]

    def pick(self, needs: dict[str, Any]) -> _KiView | None:
        """The capable Ki with the most free slots (ties: at random); when no slot is free anywhere
        and the task is known to be short, the one with the most credit ahead left; None when all are full.
        With ``direct_short``, a task not known to be short goes to a Ki with room (see the module
        docstring), the one with the most free slots among them."""
        now = self._clock()
        if self.direct_short and not needs.get("short"):
            best, best_free = [], -math.inf
            for ki in self._live_kis():
                if not can_run(ki.caps, needs) or ki.room(now, self.ki_message_ttl) <= 0:
                    continue
                free = ki.free(now, self.ki_message_ttl)
                if free > best_free:
                    best, best_free = [ki], free
                elif free == best_free:
                    best.append(ki)
            return self._rng.choice(best) if best else None
        for ahead in (0.0, self.forward_ahead) if self.forward_ahead and needs.get("short") else (0.0,):
            best, best_free = [], 0
            for ki in self._live_kis():
                if not can_run(ki.caps, needs):
                    continue
                free = ki.free(now, self.ki_message_ttl, ahead, self.forward_ahead_age)
                if free > best_free:
                    best, best_free = [ki], free
                elif free == best_free and free > 0:
                    best.append(ki)
            if best:
                return self._rng.choice(best)
        return None

    def plan_group(self, needs: dict[str, Any]) -> list[tuple[_KiView, int]] | None:
        """Where a group's ranks go: ``[(ki, ranks), ...]``, rank 0's Ki first; None to wait.

        The size is ``workers``, or the slots of every live capable Ki when they
        are fewer, never below ``min_workers`` (then None until more Ki come).
        Ranks spread over distinct Ki first, most free slots first, then fill
        more slots of the same Ki; None while free slots cannot hold them all.
        """
        now = self._clock()
        kis = [k for k in self._live_kis() if can_run(k.caps, needs)]
        workers = int(needs.get("workers", 1))
        size = min(workers, sum(k.slots for k in kis))
        if size < int(needs.get("min_workers", workers)) or size < 1:
            return None
        free = {
            k.node: k.room(now, self.ki_message_ttl) if self.direct_short else k.free(now, self.ki_message_ttl)
            for k in kis
        }
        self._rng.shuffle(kis)  # ties broken at random, so groups do not all lead from one Ki
        ordered = sorted((k for k in kis if free[k.node] > 0), key=lambda k: -free[k.node])
        plan: dict[str, int] = {}
        left = size
        while left:
            placed = 0
            for ki in ordered:
                if left and plan.get(ki.node, 0) < free[ki.node]:
                    plan[ki.node] = plan.get(ki.node, 0) + 1
                    left -= 1
                    placed += 1
            if not placed:
                return None
        return [(ki, plan[ki.node]) for ki in ordered if ki.node in plan]

    async def _forward_group(
        self, inbox: Inbox, delivery: Delivery, needs: dict[str, Any], plan: list[tuple[_KiView, int]]
    ) -> None:
        """Send each Ki of the plan its part of the group; ack the shared queue's message once all hold theirs."""
        group_id = uuid.uuid4().hex
        world = sum(ranks for _, ranks in plan)
        first = 0
        try:
            for ki, ranks in plan:
                group = {"id": group_id, "world": world, "first": first, "ranks": ranks, "leader": plan[0][0].node}
                headers = {delivery.task_id: {"an": self.node_id, "needs": needs, "group": group}}
                await self.bus.publish([delivery.task_id], queue=ki_queue(ki.node), headers=headers)
                # One per rank: the Ki counts a group's part as that many received (see KiRunner.run).
                ki.in_flight.extend([self._clock()] * ranks)
                self.metrics.forwarded.labels(ki=ki.node[:12]).inc()
                first += ranks
        except BusError as exc:
            # Parts already sent find no rendezvous (or no peers) and give up; the task comes back here.
            log.warning("an.forward_failed", task_id=delivery.task_id, group=group_id, error=str(exc))
            await inbox.nack(delivery)
            self._held -= 1
            await trio.sleep(BUS_RETRY_SECONDS)
            return
        log.info("an.group_placed", task_id=delivery.task_id, group=group_id, world=world,
                 kis={ki.node[:12]: ranks for ki, ranks in plan})
        await inbox.ack(delivery)
        self._held -= 1

    def _could_run(self, needs: dict[str, Any]) -> bool:
        """Whether the live Ki could run the task once they have room (a group: enough slots in all)."""
        capable = [k for k in self._live_kis() if can_run(k.caps, needs)]
        if int(needs.get("workers", 1)) > 1:
            return sum(k.slots for k in capable) >= int(needs.get("min_workers", needs["workers"]))
        return bool(capable)

    def _park(self, delivery: Delivery, needs: dict[str, Any]) -> None:
        # No live Ki could run it however long we wait for room: out of the way it goes.
        self._parked[delivery.task_id] = _Parked(delivery, needs, self._clock())
        self.metrics.parked.set(len(self._parked))
        log.info("an.parked", task_id=delivery.task_id, needs=missing(needs))
        self._held -= 1

    async def _unpark(self, inbox: Inbox) -> None:
        """On every beat: forward parked tasks a Ki can now run; fail those parked too long."""
        while True:
            with trio.move_on_after(WAIT_FOR_ROOM):  # also without beats: parked tasks must time out
                await self._beat_arrived.wait()
            if not self._parked:
                continue
            now = self._clock()
            placed: dict[str, list[tuple[Delivery, dict[str, Any]]]] = collections.defaultdict(list)
            for task_id, parked in list(self._parked.items()):
                if int(parked.needs.get("workers", 1)) > 1:
                    plan = self.plan_group(parked.needs)
                    if plan is not None:
                        del self._parked[task_id]
                        self._held += 1
                        await self._forward_group(inbox, parked.delivery, parked.needs, plan)
                        continue
                    ki = None
                else:
                    ki = self.pick(parked.needs)
                if ki is not None:
                    del self._parked[task_id]
                    ki.in_flight.append(now)
                    placed[ki.node].append((parked.delivery, parked.needs))
                elif now - parked.since >= self.park_fail_seconds and not self._could_run(parked.needs):
                    del self._parked[task_id]
                    await self._fail_unplaceable(inbox, parked)
            self.metrics.parked.set(len(self._parked))
            if placed:
                self._held += sum(len(v) for v in placed.values())
                await self._forward(inbox, placed)

    async def _fail_unplaceable(self, inbox: Inbox, parked: _Parked) -> None:
        error = f"no Ki with {missing(parked.needs)} for {self.park_fail_seconds:g} s"
        try:
            failed = await self.store.fail_queued(parked.delivery.task_id, error=error, now=time.time())
        except StoreError as exc:  # try again on a later beat
            self.metrics.transient_faults.labels(component="store", operation="fail_queued").inc()
            log.warning("store.unreachable", error=str(exc))
            self._parked[parked.delivery.task_id] = parked
            return
        await inbox.ack(parked.delivery)
        if failed:
            self.metrics.unplaceable.inc()
            log.warning("task.unplaceable", task_id=parked.delivery.task_id, error=error)

    async def _needs(self, delivery: Delivery) -> dict[str, Any] | None:
        """What the task needs; None when it no longer needs running (finished, cancelled, unknown)."""
        if "group" in delivery.headers:
            # A group's part back from a Ki's queue (its Ki died or was too slow): the group
            # either formed without it and failed, or never formed; the store says which.
            task = await self.store.get(delivery.task_id)
            if task is None or task.state not in (State.PENDING, State.QUEUED):
                return None
            return needs_of(task.spec)
        if "needs" in delivery.headers:
            needs = _clean_needs(delivery.headers["needs"])
            if needs is not None:
                return needs
            self.metrics.malformed_messages.labels(source="tasks").inc()
            log.warning("an.malformed_needs", task_id=delivery.task_id, needs=repr(delivery.headers["needs"])[:200])
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
            if delivery.task_id in self._parked:  # a duplicate of a parked task's message
                self.metrics.stale_deliveries.inc()
                await inbox.ack(delivery)
                self._held -= 1
                continue
            if int(needs.get("workers", 1)) > 1:
                while (plan := self.plan_group(needs)) is None:
                    if not self._could_run(needs) and len(self._parked) < max(1, self.prefetch // PARK_SHARE):
                        self._park(delivery, needs)
                        break
                    await self._forward(inbox, placed)
                    with trio.move_on_after(WAIT_FOR_ROOM):
                        await self._beat_arrived.wait()
                if plan is not None:
                    await self._forward_group(inbox, delivery, needs, plan)
                continue
            while (ki := self.pick(needs)) is None:
                if not self._could_run(needs) and len(self._parked) < max(1, self.prefetch // PARK_SHARE):
                    self._park(delivery, needs)
                    break
                await self._forward(inbox, placed)  # what is placed goes now, not after the wait
                with trio.move_on_after(WAIT_FOR_ROOM):
                    await self._beat_arrived.wait()
            if ki is None:  # parked
                continue
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
            await inbox.ack_many([d for d, _ in items])
            self._held -= len(items)
            self.metrics.forwarded.labels(ki=ki[:12]).inc(len(ids))
