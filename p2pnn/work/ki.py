"""The Ki: takes tasks from its queue, runs them in the worker pool, reports.

GroupCommit  a Ki's claims and results, committed together: whatever arrives
          while one store transaction is in flight goes into the next one, so
          a slot's result and its next task's claim usually share one commit.

KiRunner  takes deliveries while a worker slot is free, claims each task in
          the store (the lease, not the message, covers it from then on),
          acks, runs it in the KiPool, renews the lease, records the outcome;
          a short task whose message from the API carries its spec is run
          first and then recorded in one write, with no claim (the message
          covers it until then).
          One lease keeper per runner renews every running attempt's lease
          when due (an attempt is an entry in a dict, not a task of its own).
KiAgent   the Ki role on a swarm bus: runs the KiRunner on the Ki's own
          queue (and on the shared ``short`` queue, see KiRunner), beats its
          capacity (slots, tasks in hand, deliveries received per An,
          capabilities, the An it is attached to, and the tasks it finished
          since the last beat, so a node holding a long poll learns at once)
          on the ``beats`` topic, and stops tasks named on the ``cancel``
          topic.
          ``attach(an_id)`` is the hook the control plane uses to move a Ki
          between An at runtime.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import trio

from p2pnn import logs
from p2pnn.bus import BEATS, CANCEL, TASKS, BusError, Delivery, Inbox, TaskBus
from p2pnn.compute.pool import Job, KiPool, Outcome
from p2pnn.membership.records import capabilities as machine_capabilities
from p2pnn.metrics import Metrics
from p2pnn.store import ClaimOp, FinishOp, FinishUnclaimedOp, StoreError, TaskStore
from p2pnn.store.base import MAX_ARTIFACT_BYTES, Op
from p2pnn.tasks import TERMINAL, State, Task, needs_of
from p2pnn.work.trials import SweepRunner

log = logs.get(__name__)

T = TypeVar("T")

MODEL_ARTIFACT = "model.safetensors"
# A train task's latest checkpoint (model, optimizer, epoch, RNG): its next attempt resumes from it.
CHECKPOINT_ARTIFACT = "checkpoint.safetensors"
# Where a data-parallel group spread over several Ki meets: rank 0's Ki writes it, the others read it.
RENDEZVOUS_ARTIFACT = "rendezvous.json"
RENDEZVOUS_POLL_SECONDS = 0.2  # how often a joining Ki looks for the rendezvous in the store
RENEWALS_PER_LEASE = 3  # renew well before expiry: two renewals may fail before the lease lapses
STORE_RETRY_SECONDS = 1.0  # pause after a claim failed on an unreachable store
STORE_RETRY_FIRST = 0.25  # first pause before a store write of an outcome is tried again; doubles
STORE_RETRY_MAX = 4.0  # longest pause between two tries
HANDBACK_SECONDS = 8.0  # how long handing one task back (release, publish, confirm) may take
# Pauses before recording again the outcome of a task that is not stored yet (see _run_unclaimed):
# a submit's insert takes milliseconds, one that failed never lands; two seconds in all.
UNSTORED_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BEAT_MIN_GAP = 0.002  # beats on change: at most one per this many seconds
# A change that leaves the An's picture good enough (a short task taken or finished, one finished
# with others still running) waits up to this long for the next beat, which then carries every
# change made meanwhile: the An's credit ahead covers the gap, and each beat costs a publish and a
# delivery to every subscriber, at the moment a waiting client's answer is on its way. A beat goes
# at once (after BEAT_MIN_GAP) for what someone waits on: a Ki that ran dry where its last beat said
# it was full or held a long task, a task taken that is not known to be short, or a finished task
# whose waiters learn of it from the beats (a store that does not announce results).
BEAT_BUSY_GAP = 0.010
FAREWELL_SECONDS = 1.0  # how long a stopping Ki tries to send its last beat
FINISHED_PER_BEAT = 256  # task ids a beat names as finished; beyond that, waiters learn it from the store
MAX_GROUP = 64  # claims and results in one transaction; bounds how long the row locks are held
# Scheduler turns a woken committer lets pass before it takes what is waiting: a freed slot's
# next delivery reaches its claim in about that many, so it joins the result just sent.
GATHER_TURNS = 3
# How long a Ki that stops taking from the short queue lets the claims in flight ack on its
# consumer before it closes (a later ack is lost and the task's message delivered again, harmlessly).
SHORT_SETTLE_SECONDS = 1.0


class _Waiter:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None


class _Lease:
    """One running attempt's lease, as the runner's one lease keeper sees it: renewed when ``due``
    (trio time) comes. Most attempts end before their first renewal, so an attempt costs the
    keeper nothing but an entry in a dict (no task, timer or cancel scope of its own)."""

    __slots__ = ("task_id", "attempt", "due", "done", "renewing")

    def __init__(self, task_id: str, attempt: int, due: float) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.due = due
        self.done = False
        self.renewing: trio.CancelScope | None = None

    def end(self) -> None:
        self.done = True
        if self.renewing is not None:  # a renewal in flight is not waited for
            self.renewing.cancel()


class GroupCommit:
    """Claims and finishes of one Ki, several to a transaction.

    Resource handling: ``run`` commits until cancelled; a request waits for the
    transaction that carries it. A request whose caller is cancelled may still
    be applied (a claim then lapses with its lease, as an abandoned one would).

    Error handling: a store failure fails every request of that transaction
    with the same StoreError; refusals (None / False) are per request.
    """

    def __init__(self, store: TaskStore, clock: Callable[[], float], in_hand: Callable[[], int] = lambda: MAX_GROUP) -> None:
        self.store = store
        self._clock = clock
        self._in_hand = in_hand  # deliveries that may yet send a claim or a result here
        self._waiting: list[tuple[Op, _Waiter]] = []
        self._wake = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._in_hand() > len(self._waiting):  # a Ki with one task in hand commits it at once
                for _ in range(GATHER_TURNS):
                    await trio.lowlevel.cancel_shielded_checkpoint()
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                try:
                    results: list[Any] = await self.store.apply([op for op, _ in group], now=self._clock())
                except StoreError as exc:
                    results = [exc] * len(group)
                for (_, waiter), result in zip(group, results):
                    waiter.value = result
                    waiter.done.set()

    async def submit(self, op: Op) -> Any:
        """What ``store.apply`` answers for ``op``. Error handling: StoreError as the store raised it."""
        waiter = _Waiter()
        self._waiting.append((op, waiter))
        self._wake.set()
        await waiter.done.wait()
        if isinstance(waiter.value, StoreError):
            raise waiter.value
        return waiter.value


async def _no_progress(progress: dict[str, Any]) -> None:
    pass  # an echo reports none


def _spec_to_run_unclaimed(delivery: Delivery, short: bool) -> dict[str, Any] | None:
    """The spec a short task's message carries, when the task can run before it is claimed.

    Only on a first delivery: one delivered again may have run already (its result recorded, the
    ack lost with a connection), so it takes the claim path, which runs only what still waits.
    The store records the outcome only if the spec is the task's own (see FinishUnclaimedOp)."""
    spec = delivery.headers.get("spec")
    if not short or delivery.redelivered or not isinstance(spec, dict):
        return None
    try:
        return spec if needs_of(spec)["short"] else None
    except (TypeError, ValueError):  # not a spec this node would have written
        return None


def _group_of(delivery: Delivery) -> dict[str, Any]:
    """The ``group`` header an An puts on its part of a data-parallel task ({} for any other)."""
    group = delivery.headers.get("group")
    return group if isinstance(group, dict) else {}


class KiRunner:
    """Feeds the pool from the bus.

    Resource handling: at most ``pool.slots`` tasks are taken at a time from
    ``queue`` (the shared queue on a lone node, the Ki's own queue in a
    swarm); the slots are counted afresh by each ``run``, so a role stopped
    and started any number of times keeps its full capacity. On cancellation
    (role change, shutdown) every running attempt is handed back: released in
    the store (``queued`` again, the attempt not counted) and published again
    with a confirm, within HANDBACK_SECONDS; if that publish fails, the
    sweeper's stranded rule finds the task. Deliveries not yet taken go back
    to the broker when the consumer closes.

    Error handling: a store fault while recording an outcome is retried with
    back-off for up to a lease; after that the task is handed back (or its
    lease lapses). No store or bus error ends ``run``.

    Claim ahead: with ``take_ahead`` > 0 (a Ki's own queue, where its An
    forwards short tasks beyond its free slots) up to ``slots + take_ahead``
    deliveries are taken; a task known to be short is claimed as soon as it
    arrives, in the same commit as whatever else is waiting, and then waits in
    the pool's queue for a worker (holding no slot), so a worker that frees
    starts its next task without a store round trip, or a hop through the
    runner, first. Any other task waits for a slot before it is claimed, as
    without claim ahead. A short task waits at most for the short ones ahead
    of it; one claimed and still waiting when the runner stops is handed back.

    Direct short tasks: with ``short_queue`` (a swarm with ``bus.direct_short``)
    the runner also consumes that shared queue, with prefetch ``2 × (slots +
    take_ahead)`` and in the same ``hand`` budget, and runs its tasks unclaimed
    (below) or claims them ahead as above; as every Ki takes them as fast as it
    finishes them, the split stays proportional to slots. It takes from it only
    while at least one slot is not held by a long task (not known to be short,
    or a group's ranks), so a short task never waits behind long ones: a short
    delivery that finds every slot long is given back (nack, requeued) and the
    consumer closes, giving back what it prefetched, until a long task ends. A
    short message given back more than ``delivery_limit`` times is dead-lettered
    to the shared queue (an An places it).

    Unclaimed short tasks: a first delivery of a short task whose message
    carries its spec (see service._headers), taken from the short queue or from
    an in-process queue (a message the API published, never one an An forwarded:
    an An killed between its forward and its ack forwards the task again, as a
    new message), is not claimed at all. It is run at once (on the pool's queue,
    like one claimed ahead), and its outcome is recorded as the task's next
    attempt in one conditional write (FinishUnclaimedOp: only while the task
    still waits, and only for the spec the store holds); the message is acked
    after that write, so until then it covers the task. Any other delivery, a
    refused write, and a run with nothing to record (a worker crash, a cancel)
    take the claim path, which runs the task only while it still waits.

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
        take_ahead: int = 0,
        short_queue: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.queue = queue
        self.short_queue = short_queue
        self.take_ahead = take_ahead
        self.store = store
        self.bus = bus
        self.pool = pool
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._commits = GroupCommit(store, clock, lambda: self.in_hand)
        self.running: dict[str, int] = {}  # task id -> attempt
        self.in_hand = 0
        self._in_hand_since: dict[int, float] = {}  # one entry per delivery in hand: when it was taken
        self._long_in_hand: set[int] = set()  # deliveries in hand not known to be short (see tasks.needs_of)
        # Slots busy beyond one per task in hand: the extra ranks of data-parallel groups running here.
        self.group_ranks = 0
        self.received: dict[str, int] = {}  # forwarding An -> deliveries taken from it
        self.on_change: Callable[[], None] = lambda: None
        self.on_finished: Callable[[str], None] = lambda task_id: None  # a task's terminal result was recorded here
        self._hand_changed = trio.Event()  # set whenever a delivery is taken or done
        self._leases: dict[int, _Lease] = {}  # the running attempts' leases, by id(lease); see _keep_leases
        self._lease_added = trio.Event()  # set when a lease is added to none
        self._short_unsettled = 0  # deliveries from the short queue taken and not yet acked or nacked

    @property
    def long_in_hand(self) -> int:
        """Tasks in hand not known to be short: an An sends nothing ahead to a Ki holding one."""
        return len(self._long_in_hand)

    def room_for_short(self) -> bool:
        """Whether a slot is not held by a long task, so a short task taken now waits for short ones only."""
        return self.long_in_hand + self.group_ranks < self.pool.slots

    def oldest_in_hand(self) -> float:
        """Seconds the oldest task in hand has been here (0 with none): an An forwards ahead only to young ones."""
        return time.monotonic() - min(self._in_hand_since.values()) if self._in_hand_since else 0.0

    def cancel_local(self, task_id: str) -> bool:
        """Stop a task if it runs on this node's pool."""
        return task_id in self.running and self.pool.cancel(task_id)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if not self.pool.slots:  # slots = 0: this node runs no tasks
            task_status.started()
            await trio.sleep_forever()
        # One pair of semaphores per run: a permit taken while waiting for a delivery when the role
        # stopped dies with this run instead of shrinking the next one.
        slots = trio.Semaphore(self.pool.slots)  # tasks running (or about to)
        hand = trio.Semaphore(self.pool.slots + self.take_ahead)  # deliveries taken and not yet done
        # A committer per run too: a request left by a stopped run is not applied by the next one.
        self._commits = GroupCommit(self.store, self._clock, lambda: self.in_hand)
        prefetch = self.pool.slots + self.take_ahead
        async with self.bus.consume(self.queue, prefetch=prefetch) as inbox, trio.open_nursery() as nursery:
            await nursery.start(self._commits.run)
            nursery.start_soon(self._keep_leases, nursery)
            if self.short_queue is not None:
                nursery.start_soon(self._take_short, nursery, hand, slots)
            task_status.started()
            while True:
                # Received first, then counted: a permit is never held while waiting on one queue
                # that the other queue's next delivery needs.
                delivery = await inbox.receive()
                await hand.acquire()
                self._take(nursery, inbox, delivery, hand, slots, direct=False)

    def _take(
        self, nursery: trio.Nursery, inbox: Inbox, delivery: Delivery, hand: trio.Semaphore, slots: trio.Semaphore,
        *, direct: bool,
    ) -> None:
        """Count a delivery in hand (its ``hand`` permit is held) and start handling it."""
        self.in_hand += 1
        self._in_hand_since[id(delivery)] = time.monotonic()
        short = bool((delivery.headers.get("needs") or {}).get("short"))
        if not short:
            self._long_in_hand.add(id(delivery))
        if not direct:
            an = str(delivery.headers.get("an", ""))
            # A group's part counts as its ranks: the An reserved that many slots for it.
            self.received[an] = self.received.get(an, 0) + _group_of(delivery).get("ranks", 1)
        else:
            self._short_unsettled += 1
        if not short:  # a short task taken changes no An's count of free room (busy +1, in flight -1)
            self.on_change()
        self._changed()
        nursery.start_soon(self._handle, inbox, delivery, hand, slots, short, direct)

    def _changed(self) -> None:
        self._hand_changed.set()
        self._hand_changed = trio.Event()

    async def _take_short(self, nursery: trio.Nursery, hand: trio.Semaphore, slots: trio.Semaphore) -> None:
        """Consume the short queue while there is room for short tasks (see the class docstring)."""
        assert self.short_queue is not None
        # Twice what may be in hand: an unclaimed run's message is acked only once its outcome is
        # written, so the broker sends the next ones while the last ones are being recorded.
        # Measured (4,000 tasks, 2 slots): 1.3-1.5 broker writes per task instead of 1.8-2.2, and a
        # fifth to a third more tasks per second, against slots + take_ahead.
        prefetch = 2 * (self.pool.slots + self.take_ahead)
        while True:
            while not self.room_for_short():
                await self._hand_changed.wait()
            async with self.bus.consume(self.short_queue, prefetch=prefetch) as inbox:
                while True:
                    delivery = await inbox.receive()
                    # A permit as soon as one is free, unless long tasks take every slot meanwhile.
                    while self.room_for_short() and not self._try_acquire(hand):
                        await self._hand_changed.wait()
                    if not self.room_for_short():
                        await inbox.nack(delivery)
                        log.info("ki.short_paused", task_id=delivery.task_id, long=self.long_in_hand)
                        break
                    self._take(nursery, inbox, delivery, hand, slots, direct=True)
                # Closing the consumer gives back what it prefetched; first let the claims in
                # flight ack on it, so their messages are not delivered again.
                with trio.move_on_after(SHORT_SETTLE_SECONDS):
                    while self._short_unsettled:
                        await self._hand_changed.wait()

    @staticmethod
    def _try_acquire(semaphore: trio.Semaphore) -> bool:
        try:
            semaphore.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    async def _handle(
        self, inbox: Inbox, delivery: Delivery, hand: trio.Semaphore, slots: trio.Semaphore, short: bool,
        direct: bool = False,
    ) -> None:
        freed = False
        has_slot = False
        unsettled = direct

        def settled() -> None:
            nonlocal unsettled
            if unsettled:
                unsettled = False
                self._short_unsettled -= 1
                self._changed()

        async def take_slot() -> None:
            nonlocal has_slot
            await slots.acquire()
            has_slot = True

        def free_slot(beat: bool = True) -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.in_hand -= 1
                self._in_hand_since.pop(id(delivery), None)
                self._long_in_hand.discard(id(delivery))
                if has_slot:
                    slots.release()
                hand.release()
                if beat:
                    self.on_change()
                self._changed()

        group = _group_of(delivery)
        try:
            if group.get("first", 0) > 0:
                # Ranks of a group whose rank 0 runs on another Ki: that Ki holds the task's lease.
                await take_slot()
                await inbox.ack(delivery)
                await self._join_group(delivery.task_id, group, free_slot)
                return
            if not (short and (self.take_ahead or direct)):
                await take_slot()  # claimed only once it can run
            # Only a message straight from the API: an An's forward is a new message, which an An
            # killed before its ack sends again, so two Ki could each run it first and ask after.
            spec = _spec_to_run_unclaimed(delivery, short) if direct or self.bus.in_process else None
            # The worker is freed before the outcome is recorded, the beat saying so only after: a
            # beat sent then would go out just before the one naming the task finished, which a long
            # poll waits for, and hold it back (BEAT_MIN_GAP) while both cost the broker a fan-out.
            if spec is not None and await self._run_unclaimed(delivery.task_id, spec, lambda: free_slot(beat=False)):
                await inbox.ack(delivery)
                settled()
                return
            try:
                task = await self._claim(delivery.task_id)
            except StoreError as exc:
                self.metrics.transient_faults.labels(component="store", operation="claim").inc()
                log.warning("store.claim_failed", task_id=delivery.task_id, error=str(exc))
                await inbox.nack(delivery)
                settled()
                await trio.sleep(STORE_RETRY_SECONDS)
                return
            # From here the lease, not the message, covers the task: a run may outlast any broker timeout.
            await inbox.ack(delivery)
            settled()
            if task is not None:
                # One claimed ahead goes straight to the pool's queue, holding no slot: the worker that
                # frees next starts it at once, without a round trip through this task first.
                await self._execute(task, free_slot, group)
            else:  # taken elsewhere, cancelled or finished meanwhile: a duplicate message
                self.metrics.stale_deliveries.inc()
        finally:
            settled()
            free_slot()

    async def _run_unclaimed(self, task_id: str, spec: dict[str, Any], worker_free: Callable[[], None]) -> bool:
        """Run a short task from its message's spec, then record the outcome with no claim before it
        (one store transaction, shared with whatever else is waiting); True when it was recorded.

        False: the task changed meanwhile (cancelled, claimed elsewhere, finished), its stored spec
        is not the message's, or the run ended with no result to record (a worker crash, a cancel):
        the caller then takes the claim path, which runs the task again as a counted attempt only if
        it still waits. Error handling: a store fault is retried as a result is (``_retrying``)."""
        self.metrics.dispatched.labels(kind="echo").inc()
        log.info("task.started", task_id=task_id, kind="echo", claimed=False)
        started = self._clock()
        self.running[task_id] = 0  # cancel_local stops it; the attempt is known once recorded
        try:
            outcome = await self.pool.execute(Job(task_id=task_id, attempt=0, spec=spec), _no_progress)
        finally:
            self.running.pop(task_id, None)
        await trio.lowlevel.checkpoint_if_cancelled()  # at shutdown: the message goes back, nothing recorded
        if outcome.status not in ("succeeded", "failed") or outcome.retryable:
            log.info("task.unclaimed_run_ended", task_id=task_id, status=outcome.status, error=outcome.error)
            return False
        worker_free()  # the next task is taken while this one's outcome is recorded; beaten once it is
        state = State.SUCCEEDED if outcome.status == "succeeded" else State.FAILED
        op = FinishUnclaimedOp(task_id, self.node_id, spec, state, started, result=outcome.result, error=outcome.error)
        try:
            won = await self._retrying("record", lambda: self._commits.submit(op))
            # A submit that waits publishes a short task while it inserts it (TaskService.submit), so
            # an outcome may be ready before the insert committed: the task is then not stored at all.
            # Recorded once it is (a task found still waiting, with this spec, was stored since the
            # refusal: once more); a task still missing after the pauses was never stored (its insert
            # failed), and the claim path finds nothing to run either.
            for pause in UNSTORED_PAUSES:
                if won:
                    break
                stored = await self.store.get(task_id)
                if stored is not None:
                    if stored.state in (State.PENDING, State.QUEUED) and stored.spec == spec:
                        won = await self._retrying("record", lambda: self._commits.submit(op))
                    break
                await trio.sleep(pause)
                won = await self._retrying("record", lambda: self._commits.submit(op))
        except StoreError as exc:  # the claim path finds the store as it is by then
            log.warning("task.store_failed", task_id=task_id, error=str(exc))
            self.on_change()
            return False
        seconds = self._clock() - started
        if not won:
            self.metrics.duplicates_dropped.inc()
            log.info("task.result_dropped", task_id=task_id, status=outcome.status, claimed=False)
            self.on_change()
            return False
        self.on_finished(task_id)
        self.on_change()
        self.metrics.task_duration.labels(kind="echo", state=state.value).observe(seconds)
        log.info("task.finished", task_id=task_id, state=state.value, seconds=round(seconds, 3), error=outcome.error,
                 claimed=False)
        return True

    async def _claim(self, task_id: str) -> Task | None:
        # A message can arrive before the API has marked its task queued (publish, then mark):
        # the claim takes a pending task too, so there is nothing to wait for.
        return await self._commits.submit(ClaimOp(task_id, self.node_id, self.lease_seconds))

    async def _execute(
        self,
        task: Task,
        worker_free: Callable[[], None] = lambda: None,
        group: dict[str, Any] | None = None,
    ) -> None:
        """Run one claimed attempt; ``worker_free`` is called once its worker process is free again,
        so the next task can be taken while this one's outcome is being recorded. Cancelled while
        it waits for a worker (a task claimed ahead) or runs, the attempt is handed back."""
        attempt = task.attempts
        self.running[task.id] = attempt
        recorded = False
        try:
            self.metrics.dispatched.labels(kind=task.kind).inc()
            log.info("task.started", task_id=task.id, kind=task.kind, attempt=attempt)
            started = self._clock()
            try:
                job = await self._retrying("job", lambda: self._job(task, attempt))
                if job is not None:
                    if task.kind == "sweep":
                        worker_free()  # a sweep's coordinator needs no worker: its slot takes the next task
                    lease = self._hold_lease(task.id, attempt)
                    try:
                        outcome = await self._run(task, attempt, job, group or {})
                    finally:
                        self._leases.pop(id(lease), None)
                        lease.end()
                    # At shutdown the pool may stop the worker before we see the cancellation:
                    # that outcome is the shutdown's, not the task's, so hand the task back instead.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    worker_free()
                    seconds = self._clock() - started
                    await self._retrying("record", lambda: self._record(task, attempt, outcome, seconds))
                recorded = True
            except StoreError as exc:  # still failing after a lease's worth of tries
                log.warning("task.store_failed", task_id=task.id, attempt=attempt, error=str(exc))
        finally:
            # Role stopped or shutdown (a Cancelled, possibly inside an exception group) or a store failure.
            if not recorded:
                await self._hand_back(task.id, attempt)
            self.running.pop(task.id, None)

    async def _run(self, task: Task, attempt: int, job: Job, group: dict[str, Any]) -> Outcome:
        """Run the job on the pool: one worker, or rank 0 (and maybe more ranks) of a group."""

        async def progress(p: dict[str, Any]) -> None:
            await self._progress(task.id, attempt, p)

        async def checkpoint(epoch: int, data: bytes) -> None:
            await self._checkpoint(task.id, attempt, epoch, data)

        async def publish(address: str, port: int) -> None:
            # Where the other Ki's ranks meet rank 0; they read it from the store.
            record = {"group": group.get("id"), "attempt": attempt, "address": address, "port": port}
            try:
                await self.store.put_artifact(task.id, RENDEZVOUS_ARTIFACT, json.dumps(record).encode(), now=self._clock())
            except StoreError as exc:  # the others never come: rank 0 times out and the task is retried
                log.warning("store.rendezvous_failed", task_id=task.id, error=str(exc))

        if task.kind == "sweep":
            runner = SweepRunner(sweep=task, attempt=attempt, node_id=self.node_id, store=self.store, bus=self.bus,
                                 clock=self._clock)
            return await runner.run()
        workers = int(task.spec.get("workers", 1)) if task.kind == "train" else 1
        if workers <= 1:
            return await self.pool.execute(job, progress, checkpoint)
        if group:  # placed by an An: this Ki runs ranks 0 .. ranks-1 of a group of world
            world, ranks = int(group["world"]), int(group["ranks"])
        else:  # a lone node: as many ranks as its slots hold, down to min_workers
            world = ranks = min(workers, self.pool.slots)
            least = int(task.spec.get("min_workers", workers))
            if ranks < least:
                return Outcome("failed", error=f"spec.min_workers: {least} ranks do not fit this node's {self.pool.slots} slots")
        self.group_ranks += ranks - 1
        self.on_change()
        try:
            log.info("task.group", task_id=task.id, attempt=attempt, world=world, ranks_here=ranks, asked=workers)
            return await self.pool.execute_group(
                job, world, progress, checkpoint, ranks=range(ranks), on_rendezvous=publish if world > ranks else None
            )
        finally:
            self.group_ranks -= ranks - 1
            self.on_change()

    async def _join_group(self, task_id: str, group: dict[str, Any], free_slot: Callable[[], None]) -> None:
        """Run ranks ``first .. first+ranks-1`` of a group whose rank 0 runs on another Ki.

        Waits (up to the pool's rendezvous timeout) for rank 0's Ki to publish
        where the group meets; the outcome here is not recorded: rank 0's Ki
        records the task's, and a rank that fails here makes rank 0's fail too.
        """
        first, ranks, world = int(group["first"]), int(group["ranks"]), int(group["world"])
        record = await self._rendezvous(task_id, str(group.get("id")))
        if record is None:
            log.warning("task.group_no_rendezvous", task_id=task_id, group=group.get("id"))
            return
        try:
            task = await self.store.get(task_id)
            if task is None or task.state is not State.RUNNING:
                return
            resume_file = await self.store.get_artifact(task_id, CHECKPOINT_ARTIFACT)
        except StoreError as exc:  # rank 0 waits for these ranks in vain, fails, and the task is placed again
            log.warning("task.group_join_failed", task_id=task_id, error=str(exc))
            return
        job = Job(task_id=task_id, attempt=task.attempts, spec=task.spec, resume_file=resume_file)

        async def ignore_progress(p: dict[str, Any]) -> None:
            pass  # ranks other than 0 report nothing

        self.running[task_id] = task.attempts
        self.group_ranks += ranks - 1
        self.on_change()
        try:
            log.info("task.group_joined", task_id=task_id, group=group.get("id"), first=first, ranks_here=ranks, world=world)
            outcome = await self.pool.execute_group(
                job, world, ignore_progress, ranks=range(first, first + ranks),
                rendezvous=(str(record["address"]), int(record["port"])),
            )
            log.info("task.group_left", task_id=task_id, group=group.get("id"), status=outcome.status, error=outcome.error)
        finally:
            self.running.pop(task_id, None)
            self.group_ranks -= ranks - 1
            free_slot()

    async def _rendezvous(self, task_id: str, group_id: str) -> dict[str, Any] | None:
        """Rank 0's published meeting point for ``group_id``; None if it does not come in time."""
        with trio.move_on_after(self.pool.rendezvous_timeout):
            while True:
                try:
                    raw = await self.store.get_artifact(task_id, RENDEZVOUS_ARTIFACT)
                    task = await self.store.get(task_id)
                except StoreError as exc:
                    log.warning("store.rendezvous_failed", task_id=task_id, error=str(exc))
                    raw, task = None, None
                if task is not None and task.state in TERMINAL:
                    return None
                if raw is not None:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        record = {}
                    if isinstance(record, dict) and record.get("group") == group_id:
                        return record
                await trio.sleep(RENDEZVOUS_POLL_SECONDS)
        return None

    async def _checkpoint(self, task_id: str, attempt: int, epoch: int, data: bytes) -> None:
        """Keep the attempt's latest checkpoint in the store, while the attempt still holds its lease."""
        try:
            held = await self.store.renew(
                task_id, worker=self.node_id, attempt=attempt, now=self._clock(), lease_seconds=self.lease_seconds
            )
            if not held:  # a later attempt owns the task now: its checkpoints are the ones that count
                return
            await self.store.put_artifact(task_id, CHECKPOINT_ARTIFACT, data, now=self._clock())
        except StoreError as exc:  # the previous checkpoint (or none) stays: a resume just redoes more epochs
            log.warning("task.checkpoint_failed", task_id=task_id, epoch=epoch, error=str(exc))
            return
        log.info("task.checkpoint", task_id=task_id, attempt=attempt, epoch=epoch, bytes=len(data))

    async def _retrying(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again with back-off while the store fails, for up to one lease.

        Every step it guards is conditional on this attempt still holding the
        task, so running one again after an unknown outcome is safe.

        Error handling: the last StoreError propagates once the lease's time is spent."""
        deadline = trio.current_time() + self.lease_seconds
        pause = STORE_RETRY_FIRST
        while True:
            try:
                return await call()
            except StoreError as exc:
                self.metrics.transient_faults.labels(component="store", operation=operation).inc()
                if trio.current_time() + pause > deadline:
                    raise
                log.warning("store.retrying", operation=operation, error=str(exc), retry_in=pause)
                await trio.sleep(pause)
                pause = min(pause * 2, STORE_RETRY_MAX)

    async def _hand_back(self, task_id: str, attempt: int) -> None:
        """Release the attempt and publish the task again, with a confirm (shielded, bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(HANDBACK_SECONDS):
            now = self._clock()
            try:
                released = await self.store.release(task_id, attempt=attempt, now=now, worker=self.node_id)
            except StoreError as exc:  # the lease will lapse and the sweeper re-queues it
                self.metrics.transient_faults.labels(component="store", operation="release").inc()
                log.warning("task.hand_back_failed", task_id=task_id, error=str(exc))
                return
            if released:
                self.metrics.handed_back.inc()
                log.info("task.handed_back", task_id=task_id, attempt=attempt)
                await self._publish_again({task_id: now})

    async def _publish_again(self, versions: dict[str, float]) -> None:
        """Put queued tasks back on the shared queue and record the confirm; ``versions`` maps each to
        the ``updated_at`` this node gave it. Error handling: a failure is logged and counted; the
        task stays without ``published_at`` and the sweeper publishes it within stranded_after."""
        try:
            await self.bus.publish(list(versions))
        except BusError as exc:
            self.metrics.transient_faults.labels(component="bus", operation="publish").inc()
            log.warning("bus.publish_failed", tasks=len(versions), error=str(exc))
            return
        try:
            await self.store.mark_published(versions, now=self._clock())
        except StoreError as exc:  # published but not marked: the sweeper sends a harmless duplicate
            self.metrics.transient_faults.labels(component="store", operation="mark_published").inc()
            log.warning("store.mark_published_failed", tasks=len(versions), error=str(exc))

    async def _job(self, task: Task, attempt: int) -> Job | None:
        model_file = source_spec = resume_file = None
        if task.kind == "train":
            # An earlier attempt's checkpoint, if one was kept: this attempt starts after its epoch.
            resume_file = await self.store.get_artifact(task.id, CHECKPOINT_ARTIFACT)
        if task.kind in ("evaluate", "infer"):
            source = await self.store.get(task.spec["model_task"])
            model_file = await self.store.get_artifact(task.spec["model_task"], MODEL_ARTIFACT)
            if source is None or model_file is None:
                await self.store.finish(
                    task.id, attempt=attempt, state=State.FAILED, now=self._clock(), worker=self.node_id,
                    error=f"model task {task.spec['model_task']} has no {MODEL_ARTIFACT} artifact",
                )
                return None
            source_spec = source.spec
        return Job(
            task_id=task.id, attempt=attempt, spec=task.spec, model_file=model_file, source_spec=source_spec,
            resume_file=resume_file,
        )

    async def _progress(self, task_id: str, attempt: int, progress: dict[str, Any]) -> None:
        try:
            await self.store.progress(task_id, worker=self.node_id, attempt=attempt, progress=progress, now=self._clock())
        except StoreError as exc:  # progress is best-effort; the result is what must land
            log.warning("store.progress_failed", task_id=task_id, error=str(exc))

    def _hold_lease(self, task_id: str, attempt: int) -> _Lease:
        """Have the lease keeper renew this attempt's lease from a third of a lease on, until ``end()``."""
        lease = _Lease(task_id, attempt, trio.current_time() + self.lease_seconds / RENEWALS_PER_LEASE)
        if not self._leases:
            self._lease_added.set()
        self._leases[id(lease)] = lease
        return lease

    async def _keep_leases(self, nursery: trio.Nursery) -> None:
        """Renew each running attempt's lease every third of a lease, one renewal task per lease due.

        Sleeps until the earliest lease is due (a new lease is never due before the ones already
        held, which are older): with short tasks, whose leases end long before, it wakes about once
        a renewal period, whatever the rate of tasks."""
        period = self.lease_seconds / RENEWALS_PER_LEASE
        while True:
            if not self._leases:
                self._lease_added = trio.Event()
                await self._lease_added.wait()
                continue
            await trio.sleep_until(min(lease.due for lease in self._leases.values()))
            now = trio.current_time()
            for lease in list(self._leases.values()):
                if lease.due <= now:
                    lease.due = now + period  # also the next try after a renewal that failed or stalled
                    nursery.start_soon(self._renew, lease, period)

    async def _renew(self, lease: _Lease, period: float) -> None:
        """Renew one lease; stop the task when the lease is lost or a cancel was requested.

        Runs under a deadline of a third of the lease, so a stalled store cannot hold it past the
        point where the next renewal is due."""
        task_id, attempt = lease.task_id, lease.attempt
        held, task, answered = False, None, False
        with trio.move_on_after(period) as lease.renewing:
            try:
                held = await self.store.renew(
                    task_id, worker=self.node_id, attempt=attempt, now=self._clock(), lease_seconds=self.lease_seconds
                )
                task = await self.store.get(task_id)
                answered = True
            except StoreError as exc:
                log.warning("store.renew_failed", task_id=task_id, error=str(exc))
        lease.renewing = None
        if lease.done:
            return
        if not answered:  # the store failed or stalled: tried again when next due; the lease has two more periods
            self.metrics.transient_faults.labels(component="store", operation="renew").inc()
            return
        if not held or task is None or task.cancel_requested:
            log.info("task.stopping", task_id=task_id, reason="cancel requested" if held else "lease lost")
            self._leases.pop(id(lease), None)
            self.pool.cancel(task_id)

    async def _record(self, task: Task, attempt: int, outcome: Outcome, seconds: float) -> None:
        """Write the attempt's outcome, conditional on this worker's attempt still holding the task.

        A success's artifacts go in the same transaction as its result, so a late
        duplicate attempt can never replace the winner's."""
        now = self._clock()
        me = self.node_id
        oversized = [n for n, d in outcome.artifacts.items() if len(d) > MAX_ARTIFACT_BYTES]
        if outcome.status == "succeeded" and oversized:  # no retry can make it fit: a failure, not a fault
            outcome = dataclasses.replace(
                outcome, status="failed", retryable=False,
                error=f"artifact {oversized[0]} is larger than the store's limit of {MAX_ARTIFACT_BYTES} bytes",
            )
        if outcome.status == "succeeded":
            if outcome.artifacts:  # in the same transaction as the result
                won = await self.store.finish(
                    task.id, attempt=attempt, state=State.SUCCEEDED, now=now, result=outcome.result, worker=me,
                    artifacts=dict(outcome.artifacts),
                )
            else:  # the common case: grouped with other results and claims
                won = await self._commits.submit(
                    FinishOp(task.id, attempt, State.SUCCEEDED, result=outcome.result, worker=me)
                )
            state = State.SUCCEEDED
        elif outcome.status == "cancelled":
            # Only a cancel the store holds ends a task as cancelled; a worker stopped for any other
            # reason (a lease lost to the sweeper) leaves the task to whoever holds it now.
            won = await self._commits.submit(FinishOp(task.id, attempt, State.CANCELLED, error="cancelled", worker=me))
            state = State.CANCELLED
            if not won and await self.store.release(task.id, attempt=attempt, now=now, worker=me):
                self.metrics.handed_back.inc()
                log.info("task.handed_back", task_id=task.id, attempt=attempt, reason="stopped without a cancel")
                await self._publish_again({task.id: now})
                return
        elif outcome.retryable:
            if outcome.status == "crashed":
                self.metrics.worker_crashes.inc()
            new_state = await self.store.retry_or_fail(
                task.id, attempt=attempt, error=outcome.error or "", now=now, worker=me
            )
            won, state = new_state is not None, new_state or State.FAILED
            if new_state is State.QUEUED:
                await self._publish_again({task.id: now})
        else:
            won = await self._commits.submit(FinishOp(task.id, attempt, State.FAILED, error=outcome.error, worker=me))
            state = State.FAILED
        if not won:
            self.metrics.duplicates_dropped.inc()
            log.info("task.result_dropped", task_id=task.id, attempt=attempt, status=outcome.status)
            return
        if state.terminal:
            self.on_finished(task.id)
        self.metrics.task_duration.labels(kind=task.kind, state=state.value).observe(seconds)
        log.info("task.finished", task_id=task.id, attempt=attempt, state=state.value,
                 seconds=round(seconds, 3), error=outcome.error)


def capabilities() -> dict[str, Any]:
    """What placement looks at, taken from the machine's capabilities (those its node record carries)."""
    caps = machine_capabilities()
    return {"gpu": bool(caps["gpus"]), "memory_mb": caps["memory_bytes"] // (1024 * 1024)}


class KiAgent:
    """Resource handling: ``run`` runs the KiRunner, the beat loop and the cancel
    listener in one nursery; cancelling it hands running tasks back (KiRunner).
    """

    def __init__(self, *, runner: KiRunner, bus: TaskBus, beat_interval: float, an_id: str | None = None) -> None:
        self.runner = runner
        self.bus = bus
        self.beat_interval = beat_interval
        self.an_id = an_id
        self.boot = uuid.uuid4().hex[:12]  # tells an An that counters restarted
        self.caps = capabilities()
        self._changed = trio.Event()
        self._urgent = trio.Event()  # a change that should not wait out BEAT_BUSY_GAP
        self._long_beaten = 0  # long_in_hand as of the last beat
        self._busy_beaten = 0  # busy as of the last beat
        self._finished: collections.deque[str] = collections.deque(maxlen=FINISHED_PER_BEAT)
        runner.on_change = self._on_change
        local = runner.on_finished

        def finished(task_id: str) -> None:
            local(task_id)
            self._finished.append(task_id)
            self._on_change()

        runner.on_finished = finished

    def attach(self, an_id: str | None) -> None:
        """Work for ``an_id`` from the next beat on (None: for any An that sees the beats).

        The hook for role assignment: an An only forwards to Ki attached to it or to none.
        """
        if an_id != self.an_id:
            log.info("ki.attached", an=an_id)
        self.an_id = an_id
        self._on_change()

    def _take_finished(self) -> list[str]:
        out = list(self._finished)
        self._finished.clear()
        return out

    def _on_change(self) -> None:
        self._changed.set()
        r = self.runner
        idle = r.in_hand + r.group_ranks == 0
        if (
            r.long_in_hand > self._long_beaten  # an An must not count on those slots
            # An An may hold work back for this Ki: its last beat showed it full, or a long task.
            or (idle and (self._busy_beaten >= r.pool.slots or self._long_beaten > 0))
            or (self._finished and not self._results_announced())  # waiters read the beats
        ):
            self._urgent.set()

    def _results_announced(self) -> bool:
        """Whether every node's long polls hear of a result from the store (PostgreSQL's NOTIFY), not from beats."""
        store = self.runner.store
        return store is not None and store.announces_finished

    def beat(self) -> dict[str, Any]:
        r = self.runner
        self._long_beaten = r.long_in_hand
        self._busy_beaten = r.in_hand + r.group_ranks
        # ``long`` counts a group's extra ranks too: slots an An cannot count on soon.
        return {
            "node": r.node_id, "boot": self.boot, "slots": r.pool.slots, "busy": r.in_hand + r.group_ranks,
            "received": dict(r.received), "caps": self.caps, "an": self.an_id, "at": time.time(),
            "oldest": round(r.oldest_in_hand(), 3), "long": r.long_in_hand + r.group_ranks,
            "finished": self._take_finished(),
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.runner.run)
                await nursery.start(self._listen_for_cancels)
                nursery.start_soon(self._beat_loop)
                task_status.started()
        finally:
            # A last beat with no slots: an An forwards nothing more here at once, rather than until
            # the beats time out (what it sent meanwhile would wait out the Ki message TTL).
            with trio.CancelScope(shield=True), trio.move_on_after(FAREWELL_SECONDS):
                await self.bus.broadcast(BEATS, {**self.beat(), "slots": 0, "busy": 0})

    async def _beat_loop(self) -> None:
        while True:
            self._changed, self._urgent = trio.Event(), trio.Event()
            await self.bus.broadcast(BEATS, self.beat())
            sent = trio.current_time()
            if not self._changed.is_set():
                with trio.move_on_after(self.beat_interval):
                    await self._changed.wait()
            # A change that is not urgent waits BEAT_BUSY_GAP from when it came (under load: from
            # the last beat, as the next change comes at once), so that the changes of a lone short
            # task, taken and finished, share one beat or ride on the next. At most one beat per
            # BEAT_MIN_GAP, counted from the last one sent. One timed wait per beat, not two: under
            # load the busy gap runs out (each timeout that fires costs the trio thread a Cancelled
            # raised and caught), and the shorter pause is only taken when an urgent change came.
            if not self._urgent.is_set():
                with trio.move_on_after(BEAT_BUSY_GAP):
                    await self._urgent.wait()
            if trio.current_time() < sent + BEAT_MIN_GAP:
                await trio.sleep_until(sent + BEAT_MIN_GAP)

    async def _listen_for_cancels(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with self.bus.subscribe(CANCEL) as cancels:
            task_status.started()
            while True:
                message = await cancels.receive()
                task_id = message.get("id") if isinstance(message, dict) else None
                if not isinstance(task_id, str) or not task_id:
                    self.runner.metrics.malformed_messages.labels(source="cancel").inc()
                    log.warning("bus.malformed_cancel", body=repr(message)[:200])
                    continue
                if task_id not in self.runner.running:
                    continue
                # The message is only a hint: the store says whether a cancel was requested, so a
                # stray or forged message on the topic stops nothing.
                try:
                    task = await self.runner.store.get(task_id)
                except StoreError as exc:  # the lease renewal looks at cancel_requested too
                    log.warning("store.cancel_check_failed", task_id=task_id, error=str(exc))
                    continue
                if task is None or not task.cancel_requested:
                    log.warning("task.cancel_ignored", task_id=task_id, reason="no cancel requested in the store")
                    continue
                if self.runner.cancel_local(task_id):
                    log.info("task.cancel_received", task_id=task_id)
