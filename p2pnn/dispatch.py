"""Running tasks: the Ki side (lease, run in the pool, report) and the sweeper.

KiRunner  takes deliveries while a worker slot is free, claims each task in
          the store (the lease, not the message, covers it from then on),
          acks, runs it in the KiPool, renews the lease, records the outcome.
Sweeper   the principal's chore: re-queues tasks whose lease lapsed and
          re-publishes tasks left ``pending`` by a failed publish (and, on a
          durable bus, ``queued`` tasks untouched for ``queued_after``).
          Every transition it makes is conditional, so a standby sweeper on
          another node may run beside it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import trio

from p2pnn import logs
from p2pnn.bus import TASKS, BusError, Delivery, Inbox, TaskBus
from p2pnn.compute.pool import Job, KiPool, Outcome
from p2pnn.metrics import Metrics
from p2pnn.store import Fence, StoreError, TaskStore
from p2pnn.tasks import State, Task

log = logs.get(__name__)

MODEL_ARTIFACT = "model.safetensors"
RENEWALS_PER_LEASE = 3  # renew well before expiry: two renewals may fail before the lease lapses
STORE_RETRY_SECONDS = 1.0  # back-off when the store is unreachable
HANDBACK_SECONDS = 5.0  # how long a clean shutdown may spend handing running tasks back
REPUBLISH_PAGE = 500  # queued tasks read per page when re-publishing them all at start
# A message can arrive before the API has marked its task queued (publish, then mark):
# claim again for about a second; a task still pending after that is the sweeper's to publish again.
PENDING_CLAIM_TRIES = 20
PENDING_CLAIM_PAUSE = 0.05


class KiRunner:
    """Feeds the pool from the bus.

    Resource handling: at most ``pool.slots`` tasks are taken at a time from
    ``queue`` (the shared queue on a lone node, the Ki's own queue in a
    swarm). On cancellation (shutdown) every running attempt is handed back to
    the store (``queued`` again, the attempt not counted), within
    HANDBACK_SECONDS.

    ``in_hand`` (deliveries taken and not yet finished) and ``received`` (per
    forwarding An) are what a Ki's beat reports; ``on_change`` is called
    whenever they change.
    """

    def __init__(
        self,
        *,
        node_id: str,
        store: TaskStore,
        bus: TaskBus,
        pool: KiPool,
        metrics: Metrics,
        lease_seconds: float,
        queue: str = TASKS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.queue = queue
        self.store = store
        self.bus = bus
        self.pool = pool
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._slots = trio.Semaphore(pool.slots) if pool.slots else None
        self.running: dict[str, int] = {}  # task id -> attempt
        self.in_hand = 0
        self.received: dict[str, int] = {}  # forwarding An -> deliveries taken from it
        self.on_change: Callable[[], None] = lambda: None

    def cancel_local(self, task_id: str) -> bool:
        """Stop a task if it runs on this node's pool."""
        return task_id in self.running and self.pool.cancel(task_id)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._slots is None:  # slots = 0: this node runs no tasks
            task_status.started()
            await trio.sleep_forever()
        async with self.bus.consume(self.queue, prefetch=self.pool.slots) as inbox, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self._slots.acquire()
                delivery = await inbox.receive()
                self.in_hand += 1
                an = str(delivery.headers.get("an", ""))
                self.received[an] = self.received.get(an, 0) + 1
                self.on_change()
                nursery.start_soon(self._handle, inbox, delivery)

    async def _handle(self, inbox: Inbox, delivery: Delivery) -> None:
        freed = False

        def free_slot() -> None:
            nonlocal freed
            if not freed:
                freed = True
                assert self._slots is not None
                self.in_hand -= 1
                self._slots.release()
                self.on_change()

        try:
            try:
                task = await self._claim(delivery.task_id)
            except StoreError as exc:
                log.warning("store.claim_failed", task_id=delivery.task_id, error=str(exc))
                await inbox.nack(delivery)
                await trio.sleep(STORE_RETRY_SECONDS)
                return
            # From here the lease, not the message, covers the task: a run may outlast any broker timeout.
            await inbox.ack(delivery)
            if task is not None:
                await self._execute(task, free_slot)
            else:  # taken elsewhere, cancelled or finished meanwhile: a duplicate message
                self.metrics.stale_deliveries.inc()
        finally:
            free_slot()

    async def _claim(self, task_id: str) -> Task | None:
        for _ in range(PENDING_CLAIM_TRIES):
            task = await self.store.claim(task_id, worker=self.node_id, now=self._clock(), lease_seconds=self.lease_seconds)
            if task is not None:
                return task
            current = await self.store.get(task_id)
            if current is None or current.state not in (State.PENDING, State.QUEUED):
                return None
            if current.state is State.PENDING:  # published, not yet marked queued
                await trio.sleep(PENDING_CLAIM_PAUSE)
            # QUEUED: marked between our claim and our look; claim again at once.
        return None

    async def _execute(self, task: Task, worker_free: Callable[[], None] = lambda: None) -> None:
        """Run one claimed attempt; ``worker_free`` is called once its worker process is free again,
        so the next task can be taken while this one's outcome is being recorded."""
        attempt = task.attempts
        self.running[task.id] = attempt
        self.metrics.dispatched.labels(kind=task.kind).inc()
        log.info("task.started", task_id=task.id, kind=task.kind, attempt=attempt)
        started = self._clock()
        recorded = False
        try:
            job = await self._job(task, attempt)
            if job is not None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_lease, task.id, attempt)
                    outcome = await self.pool.execute(job, lambda p: self._progress(task.id, attempt, p))
                    nursery.cancel_scope.cancel()
                # At shutdown the pool may stop the worker before we see the cancellation:
                # that outcome is the shutdown's, not the task's, so hand the task back instead.
                await trio.lowlevel.checkpoint_if_cancelled()
                worker_free()
                await self._record(task, attempt, outcome, self._clock() - started)
            recorded = True
        finally:
            # Shutdown (a Cancelled, possibly inside an exception group) or a store failure.
            if not recorded:
                await self._hand_back(task.id, attempt)
            self.running.pop(task.id, None)

    async def _hand_back(self, task_id: str, attempt: int) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(HANDBACK_SECONDS):
            try:
                if await self.store.release(task_id, attempt=attempt, now=self._clock()):
                    log.info("task.handed_back", task_id=task_id, attempt=attempt)
            except StoreError as exc:  # the lease will lapse and the sweeper re-queues it
                log.warning("task.hand_back_failed", task_id=task_id, error=str(exc))

    async def _job(self, task: Task, attempt: int) -> Job | None:
        model_file = source_spec = None
        if task.kind in ("evaluate", "infer"):
            source = await self.store.get(task.spec["model_task"])
            model_file = await self.store.get_artifact(task.spec["model_task"], MODEL_ARTIFACT)
            if source is None or model_file is None:
                await self.store.finish(
                    task.id, attempt=attempt, state=State.FAILED, now=self._clock(),
                    error=f"model task {task.spec['model_task']} has no {MODEL_ARTIFACT} artifact",
                )
                return None
            source_spec = source.spec
        return Job(task_id=task.id, attempt=attempt, spec=task.spec, model_file=model_file, source_spec=source_spec)

    async def _progress(self, task_id: str, attempt: int, progress: dict[str, Any]) -> None:
        try:
            await self.store.progress(task_id, worker=self.node_id, attempt=attempt, progress=progress, now=self._clock())
        except StoreError as exc:  # progress is best-effort; the result is what must land
            log.warning("store.progress_failed", task_id=task_id, error=str(exc))

    async def _keep_lease(self, task_id: str, attempt: int) -> None:
        """Renew the lease; stop the task when the lease is lost or a cancel was requested."""
        while True:
            await trio.sleep(self.lease_seconds / RENEWALS_PER_LEASE)
            try:
                held = await self.store.renew(
                    task_id, worker=self.node_id, attempt=attempt, now=self._clock(), lease_seconds=self.lease_seconds
                )
                task = await self.store.get(task_id)
            except StoreError as exc:
                log.warning("store.renew_failed", task_id=task_id, error=str(exc))
                continue
            if not held or task is None or task.cancel_requested:
                log.info("task.stopping", task_id=task_id, reason="cancel requested" if held else "lease lost")
                self.pool.cancel(task_id)
                return

    async def _record(self, task: Task, attempt: int, outcome: Outcome, seconds: float) -> None:
        now = self._clock()
        if outcome.status == "succeeded":
            for name, data in outcome.artifacts.items():
                await self.store.put_artifact(task.id, name, data, now=now)
            won = await self.store.finish(task.id, attempt=attempt, state=State.SUCCEEDED, now=now, result=outcome.result)
            state = State.SUCCEEDED
        elif outcome.status == "cancelled":
            won = await self.store.finish(task.id, attempt=attempt, state=State.CANCELLED, now=now, error="cancelled")
            state = State.CANCELLED
        elif outcome.retryable:
            if outcome.status == "crashed":
                self.metrics.worker_crashes.inc()
            new_state = await self.store.retry_or_fail(task.id, attempt=attempt, error=outcome.error or "", now=now)
            won, state = new_state is not None, new_state or State.FAILED
            if new_state is State.QUEUED:
                try:
                    await self.bus.publish([task.id])
                except BusError as exc:  # still queued in the store: the sweeper publishes it again
                    log.warning("bus.publish_failed", task_id=task.id, error=str(exc))
        else:
            won = await self.store.finish(task.id, attempt=attempt, state=State.FAILED, now=now, error=outcome.error)
            state = State.FAILED
        if not won:
            self.metrics.duplicates_dropped.inc()
            log.info("task.result_dropped", task_id=task.id, attempt=attempt, status=outcome.status)
            return
        self.metrics.task_duration.labels(kind=task.kind, state=state.value).observe(seconds)
        log.info("task.finished", task_id=task.id, attempt=attempt, state=state.value,
                 seconds=round(seconds, 3), error=outcome.error)


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
