"""Tasks as a user sees them: submit, read, cancel, whichever node is asked.

The API routes are thin over this; the rules (validation, ownership,
publish-after-commit) live here once.

Where a task's message goes: on a swarm bus with ``direct_short``, a task
known to be short (``needs_of(spec)["short"]``) goes to the ``short`` queue,
which the Ki consume directly (one broker hop); every other task, and every
message published again without its task (sweeper, hand-back), goes to the
shared ``tasks`` queue, where an An places it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import outcome
import trio

from p2pnn import logs
from p2pnn.callers import Caller
from p2pnn.bus import BEATS, CANCEL, SHORT, TASKS, TaskBus
from p2pnn.store import NewTask, TaskStore
from p2pnn.tasks import TERMINAL, Limits, SpecError, State, Task, check_against_model, needs_of, validate_spec

log = logs.get(__name__)
MAX_BATCH = 1000  # specs in one submission; keeps a single transaction and response bounded
MAX_SPEC_IN_MESSAGE = 4096  # bytes of JSON: a short task's spec up to this size travels in its message
# A waiter is woken at once when this node records the task's result, or when a Ki's beat names
# it as finished (a swarm bus). The store is asked as well, in case no hint comes (a sweeper's
# or another node's cancel, a lost beat): first often, then less, so a long wait costs about
# one query a second whatever the task's length.
WAIT_POLL_SECONDS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# A submit that waits for its tasks marks them queued only if they are still waiting this long after
# their publish: a short task has been run and recorded by then (pending -> succeeded, no claim), and
# an UPDATE of its row meanwhile would only hold up the Ki's commit of its result. Well below the
# sweeper's least pending_after_seconds (0.1), so no sweep publishes such a task a second time.
MARK_QUEUED_AFTER = 0.05
FOLLOW_LINGER_SECONDS = 60.0  # feeds of finished tasks are read this long after the last wait here ended


@dataclass
class _Waiting:
    event: trio.Event = field(default_factory=trio.Event)
    count: int = 0
    task: Task | None = None  # the task as the store announced it recorded (terminal), if it did


def _headers(tasks: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each message (of a task id and its spec) carries what its task needs (GPU, memory), so an An
    places it without reading the store; a short task's message carries its spec too (small ones
    only), so a Ki can run it before any store round trip (see KiRunner)."""
    out: dict[str, dict[str, Any]] = {}
    for task_id, spec in tasks:
        needs = needs_of(spec)
        out[task_id] = {"needs": needs}
        if needs["short"] and len(json.dumps(spec)) <= MAX_SPEC_IN_MESSAGE:
            out[task_id]["spec"] = spec
    return out


def _canonical_id(task_id: str) -> str | None:
    """The form results and beats name a task by (task ids are UUIDs); None for what is no UUID."""
    try:
        return str(uuid.UUID(task_id))
    except (ValueError, TypeError, AttributeError):
        return None


class Forbidden(Exception):
    """The caller may not touch this task."""


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        bus: TaskBus,
        *,
        limits: Limits,
        max_attempts: int,
        cancel_local: Callable[[str], bool] = lambda task_id: False,
        direct_short: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.bus = bus
        self.limits = limits
        self.max_attempts = max_attempts
        self._cancel_local = cancel_local
        self.direct_short = direct_short
        self._clock = clock
        self._finished: dict[str, _Waiting] = {}  # task id -> its waiters, woken when this node finishes it
        self._waiter_came = trio.Event()  # set when the first waiter comes after none
        self._idle_since = -math.inf  # trio time when the last waiter here left

    async def submit(
        self, raw_specs: list[Any], caller: Caller, *, idempotency_key: str | None = None, body_hash: str | None = None,
        wait: float = 0.0,
    ) -> tuple[list[Task], bool]:
        """Validate, store as ``pending``, publish, mark ``queued`` (on an in-process
        bus: store as ``queued``, publish).

        With ``wait`` (seconds), the tasks are returned once all are terminal, or
        as they are after ``wait`` seconds: a submit and a long poll in one call.
        Their insert then does not wait for the disk: the answer does instead, and
        only when no result covers the insert (see ``_make_told_durable``); and
        they are marked queued only if still pending MARK_QUEUED_AFTER seconds on.

        Error handling: raises SpecError (path names the spec and field) before
        anything is stored; a failed publish is logged and left to the sweeper,
        so an accepted task is never lost.
        """
        if not raw_specs:
            raise SpecError("spec", "a submission needs at least one spec")
        if len(raw_specs) > MAX_BATCH:
            raise SpecError("spec", f"at most {MAX_BATCH} specs per submission, got {len(raw_specs)}")
        batch = len(raw_specs) > 1
        specs = []
        for i, raw in enumerate(raw_specs):
            try:
                spec = validate_spec(raw, self.limits)
                if spec["kind"] in ("evaluate", "infer"):
                    check_against_model(spec, await self.store.get(spec["model_task"]))
            except SpecError as exc:
                if batch:
                    raise SpecError(f"spec[{i}]{exc.path[4:]}", exc.message) from None
                raise
            specs.append(spec)
        # Ids are chosen here, before the insert, unless an idempotency key may name an earlier
        # request's tasks instead.
        ahead = idempotency_key is None
        ids = [str(uuid.uuid4()) for _ in specs] if ahead else []
        new = [
            NewTask(kind=s["kind"], spec=s, owner=caller.sub, max_attempts=s.get("max_attempts", self.max_attempts),
                    id=ids[i] if ahead else None)
            for i, s in enumerate(specs)
        ]
        # A queue in this process cannot lose a message without the process: the tasks are stored
        # ``queued`` and published after the commit, one transaction fewer than pending -> queued.
        in_process = self.bus.in_process
        # With ``wait``, the tasks a Ki runs from their message alone (short ones, whose message carries
        # the spec, straight to a Ki) are published while they are inserted, not after: their run does
        # not wait for the insert. A Ki that has a result before the insert committed finds no task and
        # tries again shortly (KiRunner); an insert that fails leaves a message that records nothing.
        early: dict[str, dict[str, Any]] = {}
        if wait > 0 and ahead and (in_process or self.direct_short):
            early = {tid: h for tid, h in _headers(list(zip(ids, specs))).items() if "spec" in h}
        published: set[str] = set()  # with ``wait``: published, not yet marked queued
        with ExitStack() as watches:
            # Watched from before the publish, so a result recorded at once still wakes the wait.
            watched = watches.enter_context(self._watching(ids)) if wait > 0 else {}
            async with trio.open_nursery() as nursery:
                if early:
                    nursery.start_soon(self._publish_early, early, published)
                # Captured, so that a store error leaves the nursery as itself, not in an ExceptionGroup.
                inserted = await outcome.acapture(partial(
                    self.store.create, new, now=self._clock(), idempotency_key=idempotency_key,
                    request_hash=body_hash, queued=in_process, relaxed=wait > 0,
                ))
            tasks, created = inserted.unwrap()
            if wait > 0 and not ahead:
                watched = watches.enter_context(self._watching([t.id for t in tasks]))
            if created:
                for task in tasks:
                    log.info("task.submitted", task_id=task.id, kind=task.kind, owner=task.owner)
                rest = [t for t in tasks if t.id not in early]
                if in_process:
                    await self.bus.publish([t.id for t in rest], headers=_headers([(t.id, t.spec) for t in rest]))
                elif wait > 0:
                    published |= await self._publish_only([t.id for t in rest], tasks=rest)
                elif await self.publish([t.id for t in tasks], tasks=tasks):
                    tasks = [dataclasses.replace(t, state=State.QUEUED) for t in tasks]
            if wait > 0:
                tasks = await self._until_all_terminal(tasks, watched, min(wait, MARK_QUEUED_AFTER))
                waiting = [t.id for t in tasks if t.state is State.PENDING and t.id in published]
                if waiting:
                    await self.store.mark_queued(waiting, now=self._clock())
                if wait > MARK_QUEUED_AFTER:
                    tasks = await self._until_all_terminal(tasks, watched, wait - MARK_QUEUED_AFTER)
        if wait > 0 or not created:
            await self._make_told_durable(tasks)
        return tasks, created

    async def _make_told_durable(self, tasks: list[Task]) -> None:
        """Before the caller hears of ``tasks`` (inserted together, perhaps by a relaxed commit:
        a submit with ``wait``, or the first of a repeated idempotent submit), they are on disk.

        A terminal task's result was recorded by a durable commit (only queueing and claims are
        relaxed), which came after the insert and so made it durable too; else the store's
        barrier does. Error handling: a store error propagates, so no one is told of tasks
        that may yet be lost."""
        if not any(t.state in TERMINAL for t in tasks):
            await self.store.make_durable()

    async def publish(self, task_ids: list[str], *, tasks: list[Task] | None = None) -> bool:
        """Hand pending tasks to the bus, then mark them queued; False when the bus refused.

        With ``tasks``, each message carries what its task needs (GPU, memory), so an An
        places it without reading the store; with ``direct_short``, those known to be short
        go to the ``short`` queue instead. Error handling: the tasks of a queue whose publish
        failed stay pending (the sweeper publishes them), the others are marked queued."""
        published = await self._publish_only(task_ids, tasks=tasks)
        if published:
            await self.store.mark_queued(sorted(published), now=self._clock())
        return len(published) == len(task_ids)

    async def _publish_early(self, headers: dict[str, dict[str, Any]], published: set[str]) -> None:
        """Publish the tasks of ``headers`` (short, their spec in the message) before their insert
        has committed, adding to ``published`` those the broker confirmed (all, on the in-process
        queue). Error handling: a failed publish is logged; the sweeper publishes the task again."""
        ids = list(headers)
        if await self._publish_to(TASKS if self.bus.in_process else SHORT, ids, headers):
            published.update(ids)

    async def _publish_only(self, task_ids: list[str], *, tasks: list[Task] | None = None) -> set[str]:
        """``publish`` without marking anything queued: the ids whose messages the broker confirmed.
        Error handling: a queue whose publish failed is logged; its ids are left out."""
        headers = _headers([(t.id, t.spec) for t in tasks or []])
        queues: dict[str, list[str]] = {}
        for task_id in task_ids:
            short = self.direct_short and headers.get(task_id, {}).get("needs", {}).get("short")
            queues.setdefault(SHORT if short else TASKS, []).append(task_id)
        published: set[str] = set()
        for queue, ids in queues.items():
            if await self._publish_to(queue, ids, headers):
                published.update(ids)
        return published

    async def _publish_to(self, queue: str, ids: list[str], headers: dict[str, dict[str, Any]]) -> bool:
        """One publish of ``ids`` to ``queue``; False when the bus refused it (logged): those tasks
        stay pending, and the sweeper publishes them again."""
        try:
            await self.bus.publish(ids, queue=queue, headers=headers)
        except Exception as exc:  # the sweeper re-publishes whatever stayed pending
            log.warning("bus.publish_failed", queue=queue, tasks=len(ids), error=str(exc))
            return False
        return True

    async def get(self, task_id: str) -> Task | None:
        return await self.store.get(task_id)

    async def wait(self, task_id: str, timeout: float) -> Task | None:
        """The task once it is terminal, or as it is after ``timeout`` seconds; None if unknown.

        Resource handling: one store read per poll (WAIT_POLL_SECONDS); ``finished``
        (this node recorded the result, or a Ki's beat named the task) wakes it at once.
        The waiter is registered before the first read, so a result recorded in between
        is not missed.
        """
        key = _canonical_id(task_id)
        if key is None or timeout <= 0:
            return await self.store.get(task_id)
        with self._watching([key]) as watched:
            task = await self.store.get(key)
            if task is None or task.state in TERMINAL:
                return task
            with trio.move_on_after(timeout):
                return await self._until_terminal(key, watched[key])
            return await self.store.get(key)

    async def _until_all_terminal(self, tasks: list[Task], watched: dict[str, _Waiting], timeout: float) -> list[Task]:
        """``tasks`` once each is terminal, or as they are after ``timeout`` seconds (read again)."""
        out = list(tasks)
        with trio.move_on_after(timeout):
            for i, task in enumerate(out):
                if task.state not in TERMINAL:
                    out[i] = await self._until_terminal(task.id, watched[task.id]) or task
            return out
        for i, task in enumerate(out):
            if task.state not in TERMINAL:
                out[i] = await self.store.get(task.id) or task
        return out

    async def _until_terminal(self, key: str, waiting: _Waiting) -> Task | None:
        """Wait (woken by ``finished``, else polling the store) until the task is terminal; None if gone."""
        read_since_woken = False
        for i in itertools.count():
            pause = WAIT_POLL_SECONDS[min(i, len(WAIT_POLL_SECONDS) - 1)]
            if read_since_woken:  # woken, yet not terminal when read: poll on
                await trio.sleep(pause)
            else:  # returns at once if woken before this call (a result recorded during the submit)
                with trio.move_on_after(pause):
                    await waiting.event.wait()
            read_since_woken = waiting.event.is_set()
            if waiting.task is not None:
                return waiting.task
            task = await self.store.get(key)
            if task is None or task.state in TERMINAL:
                return task
        raise AssertionError("unreachable")

    @contextmanager
    def _watching(self, keys: list[str]) -> Iterator[dict[str, _Waiting]]:
        """Register waiters for ``keys`` (canonical task ids) for the length of the ``with``."""
        watched = {}
        if keys and not self._finished:  # the first waiter after a quiet spell: feeds that stopped start again
            self._waiter_came.set()
            self._waiter_came = trio.Event()
        for key in keys:
            waiting = watched[key] = self._finished.setdefault(key, _Waiting())
            waiting.count += 1
        try:
            yield watched
        finally:
            for key, waiting in watched.items():
                waiting.count -= 1
                if waiting.count == 0:
                    del self._finished[key]
                    if not self._finished:
                        self._idle_since = trio.current_time()

    def finished(self, task_id: str, task: Task | None = None) -> None:
        """A hint that ``task_id`` reached a terminal state: wakes whoever waits for it here. With
        ``task`` (terminal, as the store announced it committed), they answer with it unread."""
        waiting = self._finished.get(task_id)
        if waiting is not None:
            if task is not None and task.state in TERMINAL:
                waiting.task = task
            waiting.event.set()

    async def follow(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Every feed of finished tasks that long polls here need: the store's announcements and,
        where the store makes none (SQLite, CockroachDB) and Ki on other nodes record results, their
        beats. With announcements the beats would only wake a long poll already woken, at the cost
        of a delivery of every beat to this node while it answers."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.follow_store)
            if not self.bus.in_process and not self.store.announces_finished:
                await nursery.start(self.follow_beats)
            task_status.started()

    async def follow_store(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Wake long polls for the tasks whose results the store announces as their commits land, in
        any process (TaskStore.follow_finished: PostgreSQL's NOTIFY, a tenth of a millisecond after
        the commit, where a beat takes a broker hop); nothing where the store has no such feed."""

        def hint(finished: list[tuple[str, Task | None]]) -> None:
            if self._finished:
                for task_id, task in finished:
                    self.finished(task_id, task)

        await self._while_waited_for(partial(self.store.follow_finished, hint), task_status=task_status)

    async def follow_beats(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Wake long polls for the tasks that Ki beats name as finished (a swarm bus: Ki on other nodes)."""

        async def read() -> None:
            async with self.bus.subscribe(BEATS) as beats:
                while True:
                    finished = (await beats.receive()).get("finished")
                    if isinstance(finished, list) and self._finished:
                        for task_id in finished:
                            self.finished(str(task_id))

        await self._while_waited_for(read, task_status=task_status)

    async def _while_waited_for(
        self, follow: Callable[[], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``follow`` (a feed of finished tasks) while somebody waits here, and for
        FOLLOW_LINGER_SECONDS after: every Ki's beats, and every result the store announces, would
        otherwise cost each node (a Ki node among them, as it records results) a delivery and a
        wake-up whether anyone waits or not. A wait that starts a feed may miss what came before
        the feed was up; its store poll (WAIT_POLL_SECONDS) finds the result.

        While the feed runs, this looks at the waiters once per FOLLOW_LINGER_SECONDS, not as each
        wait ends: a node answering one wait after another would otherwise wake it twice a request."""
        task_status.started()
        while True:
            while not self._finished:
                await self._waiter_came.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                while True:
                    if self._finished:
                        await trio.sleep(FOLLOW_LINGER_SECONDS)
                    elif trio.current_time() < (until := self._idle_since + FOLLOW_LINGER_SECONDS):
                        await trio.sleep_until(until)
                    else:
                        break
                nursery.cancel_scope.cancel()

    async def cancel(self, task_id: str, caller: Caller) -> Task | None:
        """Cancel a task; an operator only its own. A task running here is stopped at once;
        elsewhere a broadcast reaches its Ki, which also sees ``cancel_requested`` when it
        next renews the lease."""
        task = await self.store.get(task_id)
        if task is None:
            return None
        if not caller.at_least("admin") and task.owner != caller.sub:
            raise Forbidden(f"task {task_id} belongs to another user; cancelling it needs the admin role")
        task = await self.store.request_cancel(task_id, now=self._clock())
        if task is not None and task.state is State.RUNNING:
            if not self._cancel_local(task_id):  # running on another node: tell every Ki
                await self.bus.broadcast(CANCEL, {"id": task_id})
        if task is not None:
            log.info("task.cancel_requested", task_id=task_id, state=task.state.value)
            if task.state in TERMINAL:
                self.finished(task_id)
        return task
