"""The sweeper: the principal's chore of finding tasks nobody is carrying.

Sweeper   re-queues tasks whose lease lapsed and re-publishes tasks left
          ``pending`` by a failed publish, ``queued`` tasks that are stranded
          and, on a durable bus, ``queued`` tasks whose last message is older
          than ``queued_after``. Every transition it makes is conditional, so a
          standby sweeper on another node may run beside it.

Stranded or in flight: a ``queued`` task's ``published_at`` is set when the
bus confirms a message for it, and cleared by every step that puts it back
in ``queued`` without a message (hand-back, lapsed lease, failed attempt).
Whoever makes that step publishes at once; a ``queued`` task with no
``published_at`` whose last update is older than ``stranded_after`` is one
whose publisher failed or died, and the sweeper publishes it. A task with a
``published_at`` is in flight: its message is on the shared queue, held by
an An, or on a Ki's queue, from which the broker dead-letters it back to the
shared queue after the Ki message TTL; only a message the broker itself lost
(or a poison message dead-lettered for good) waits for ``queued_after``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import trio

from p2pnn import logs
from p2pnn.metrics import Metrics
from p2pnn.store import Fence, StoreError, TaskStore
from p2pnn.tasks import State

log = logs.get(__name__)

REPUBLISH_PAGE = 500  # queued tasks read per page when re-publishing them all at start


class Sweeper:
    """Re-queues lapsed leases and re-publishes stranded ``pending`` and ``queued`` tasks.

    ``republish_queued`` is for a bus that forgets on restart (the in-process
    queue): at start every ``queued`` task is published again; duplicates are
    harmless because a claim is conditional.
    """

    def __init__(
        self,
        *,
        store: TaskStore,
        publish: Callable[[list[str]], Any],
        metrics: Metrics,
        interval: float,
        pending_after: float,
        republish_queued: bool,
        queued_after: float = 0.0,
        stranded_after: float = 10.0,
        active: Callable[[], bool] = lambda: True,
        fence: Callable[[], Fence | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queued_after = queued_after
        self.stranded_after = stranded_after
        self.active = active
        # In a swarm, sweeping is a principal's action: it happens only under a lease that still
        # holds (checked by the store in the same transaction). None: no fence (a lone node, or
        # roles from configuration).
        self._fence = fence
        self._publish = publish
        self.metrics = metrics
        self.interval = interval
        self.pending_after = pending_after
        self.republish_queued = republish_queued
        self._clock = clock

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Error handling: a store fault skips one sweep (logged, counted); nothing ends the loop."""
        republish_all = self.republish_queued
        task_status.started()
        while True:
            try:
                if republish_all:
                    await self._republish_all_queued()
                    republish_all = False
                if self.active():
                    await self.sweep()
            except StoreError as exc:
                self.metrics.transient_faults.labels(component="store", operation="sweep").inc()
                log.warning("sweeper.store_unreachable", error=str(exc))
            await trio.sleep(self.interval)

    async def sweep(self) -> None:
        fence = self._fence() if self._fence is not None else None
        if self._fence is not None and fence is None:
            log.debug("sweeper.not_leading")
            return
        expired = await self.store.expire_leases(now=self._clock(), fence=fence)
        for task_id, state in expired:
            self.metrics.lease_expiries.inc()
            log.warning("task.lease_expired", task_id=task_id, new_state=state.value)
        # expire_leases set updated_at to ``now``: that is the version mark_published checks.
        now = self._clock()
        await self._publish_queued({task_id: now for task_id, state in expired if state is State.QUEUED})
        await self._republish(State.PENDING, older_than=self._clock() - self.pending_after)
        stranded = await self.store.stranded(older_than=self._clock() - self.stranded_after)
        if stranded:
            self.metrics.stranded.inc(len(stranded))
            log.warning("sweeper.stranded", tasks=len(stranded))
            await self._publish_queued(stranded)
        if self.queued_after:  # a durable bus should not lose a message; if one was lost anyway, this finds it
            stale = await self.store.published_before(before=self._clock() - self.queued_after)
            if stale:
                self.metrics.republished.inc(len(stale))
                log.info("sweeper.republish", state=State.QUEUED.value, tasks=len(stale))
                await self._publish_queued(stale)

    async def _publish_queued(self, versions: dict[str, float]) -> None:
        """Publish queued tasks and record the confirm (``versions``: task id -> the updated_at seen)."""
        if versions and await self._publish(list(versions)) is not False:
            await self.store.mark_published(versions, now=self._clock())

    async def _republish_all_queued(self) -> None:
        # Page through them: publishing leaves a queued task queued, so "the oldest N" would repeat.
        cursor, total = None, 0
        while True:
            page = await self.store.list(state=State.QUEUED, limit=REPUBLISH_PAGE, cursor=cursor)
            if page.tasks:
                total += len(page.tasks)
                await self._publish([t.id for t in page.tasks])
            cursor = page.next_cursor
            if cursor is None:
                break
        if total:
            self.metrics.republished.inc(total)
            log.info("sweeper.republish", state=State.QUEUED.value, tasks=total)

    async def _republish(self, state: State, *, older_than: float) -> None:
        ids = await self.store.ids_in_state(state, older_than=older_than)
        if ids:
            self.metrics.republished.inc(len(ids))
            log.info("sweeper.republish", state=state.value, tasks=len(ids))
            await self._publish(ids)
