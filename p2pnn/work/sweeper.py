"""The sweeper: the principal's chore of finding tasks nobody is carrying.

Sweeper   re-queues tasks whose lease lapsed and re-publishes tasks left
          ``pending`` by a failed publish (and, on a durable bus, ``queued``
          tasks untouched for ``queued_after``). Every transition it makes is
          conditional, so a standby sweeper on another node may run beside it.
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
    """Re-queues lapsed leases and re-publishes stranded ``pending`` tasks.

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
        active: Callable[[], bool] = lambda: True,
        fence: Callable[[], Fence | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queued_after = queued_after
        self._resent: dict[str, float] = {}
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
        if self.republish_queued:
            await self._republish_all_queued()
        task_status.started()
        while True:
            try:
                if self.active():
                    await self.sweep()
            except StoreError as exc:
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
        requeued = [task_id for task_id, state in expired if state is State.QUEUED]
        if requeued:
            await self._publish(requeued)
        await self._republish(State.PENDING, older_than=self._clock() - self.pending_after)
        if self.queued_after:  # a durable bus should not lose a message; if one was lost anyway, this finds it
            await self._republish_stale_queued()

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

    async def _republish_stale_queued(self) -> None:
        # Publishing leaves a queued task's row as it was: remember what was sent, so each stale
        # task is published once per ``queued_after``, not on every sweep.
        now = self._clock()
        self._resent = {t: at for t, at in self._resent.items() if at > now - self.queued_after}
        ids = [t for t in await self.store.ids_in_state(State.QUEUED, older_than=now - self.queued_after)
               if t not in self._resent]
        if ids:
            self._resent.update(dict.fromkeys(ids, now))
            self.metrics.republished.inc(len(ids))
            log.info("sweeper.republish", state=State.QUEUED.value, tasks=len(ids))
            await self._publish(ids)

    async def _republish(self, state: State, *, older_than: float) -> None:
        ids = await self.store.ids_in_state(state, older_than=older_than)
        if ids:
            self.metrics.republished.inc(len(ids))
            log.info("sweeper.republish", state=state.value, tasks=len(ids))
            await self._publish(ids)
