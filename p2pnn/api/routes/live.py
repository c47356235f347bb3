"""Live views: a task's progress series, and Server-Sent Event streams of a task's and the swarm's changes.

GET /api/v1/tasks/{id}/progress   every progress report of the current attempt (one per epoch)
GET /api/v1/tasks/{id}/events     ``event: task`` with the task now and at each change; ends when it ends
GET /api/v1/events                ``event: swarm`` (cluster + nodes) at each change of the membership,
                                  ``event: task`` (a summary) for each task that changes

Streams are authenticated like every route (a browser reads them with
``fetch``, not ``EventSource``, so that the token travels in a header, never
in a URL). They follow the store, not this node's memory, so any node of a
swarm streams any task, wherever it runs.

Resource handling: each stream is one request held open and one store read
every POLL_SECONDS; at most MAX_STREAMS are open per node (503 beyond). A
stream ends when the node stops: hypercorn's request tasks are cancelled with
the node's nursery, so shutdown never waits on an open stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response

from p2pnn import logs
from p2pnn.api.http import ApiContext, ApiError, json_response, json_text
from p2pnn.store import StoreError
from p2pnn.tasks import Task

log = logs.get(__name__)

POLL_SECONDS = 0.25  # how often a stream looks for changes: a new epoch shows within a quarter of a second
KEEPALIVE_SECONDS = 15.0  # a comment line this often, so proxies and clients do not take a quiet stream for dead
MAX_STREAMS = 64  # open streams per node; each reads the store four times a second
MEMBERSHIP_SECONDS = 1.0  # how often the swarm stream compares the member list
# The swarm stream asks for tasks changed since a little before the last change it saw: updated_at
# comes from the clock of whichever node wrote it, and the members' clocks differ by a little.
CLOCK_OVERLAP_SECONDS = 2.0
CHANGES_PER_READ = 1000  # tasks one read of the swarm stream takes; more wait for the next read

# The parts of a task the swarm stream sends: enough for a list, without specs and results.
SUMMARY_FIELDS = (
    "id", "kind", "state", "owner", "attempts", "max_attempts", "created_at", "updated_at", "started_at",
    "finished_at", "lease_owner", "cancel_requested", "progress", "error",
)


def task_summary(task: Task) -> dict[str, Any]:
    full = task.to_json()
    return {k: full[k] for k in SUMMARY_FIELDS}


def sse_event(name: str, data: Any) -> bytes:
    # json.dumps never emits a raw newline, so the data is one line.
    return f"event: {name}\ndata: {json_text(data)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


class _Streams:
    """How many streams are open on this node."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def check(self) -> None:
        if self.open >= self.limit:
            raise ApiError(503, "too many streams", f"this node serves at most {self.limit} event streams at once")

    async def counted(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.open += 1
        try:
            async for chunk in events:
                yield chunk
        finally:
            self.open -= 1


def _sse_response(streams: _Streams, events: AsyncIterator[bytes]) -> Response:
    resp = Response(
        streams.counted(events), content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    resp.timeout = None  # Quart's response timeout would cut a stream after a minute
    return resp


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("live", __name__)
    streams = _Streams(MAX_STREAMS)
    store = ctx.service.store if ctx.service is not None else None

    @bp.get("/api/v1/tasks/<task_id>/progress")
    async def progress(task_id: str) -> Response:
        ctx.caller("viewer")
        series = await store.progress_series(task_id)
        if series is None:
            raise ApiError(404, "no such task", task_id)
        return json_response({
            "task_id": series.task_id, "attempt": series.attempt, "points": series.points, "truncated": series.truncated,
        })

    @bp.get("/api/v1/tasks/<task_id>/events")
    async def task_events(task_id: str) -> Response:
        ctx.caller("viewer")
        streams.check()
        first = await ctx.task_or_404(task_id)
        return _sse_response(streams, _follow_task(ctx, first))

    @bp.get("/api/v1/events")
    async def swarm_events() -> Response:
        ctx.caller("viewer")
        streams.check()
        return _sse_response(streams, _follow_swarm(ctx))

    return bp


async def _follow_task(ctx: ApiContext, task: Task) -> AsyncIterator[bytes]:
    sent: tuple | None = None
    quiet = 0.0
    while True:
        key = (task.updated_at, task.state, task.attempts, task.cancel_requested)
        if key != sent:
            yield sse_event("task", task.to_json())
            sent, quiet = key, 0.0
        if task.state.terminal:
            return
        await trio.sleep(POLL_SECONDS)
        quiet += POLL_SECONDS
        if quiet >= KEEPALIVE_SECONDS:
            yield KEEPALIVE
            quiet = 0.0
        try:
            now = await ctx.service.get(task.id)
        except StoreError as exc:  # the store is away for a moment: keep the stream, ask again next tick
            log.warning("events.store_unreachable", task_id=task.id, error=str(exc))
            continue
        if now is None:
            return
        task = now


def _membership(ctx: ApiContext) -> tuple[dict[str, Any], str]:
    """The swarm event and what a change is judged by: not ``last_seen`` or lease times, which move every beat."""
    cluster, nodes = ctx.cluster() if ctx.cluster is not None else ({}, [])
    steady = (
        {k: v for k, v in cluster.items() if k != "lease_expires_at"},
        [{k: v for k, v in n.items() if k != "last_seen"} for n in nodes],
    )
    return {"cluster": cluster, "nodes": nodes}, json.dumps(steady, sort_keys=True, default=str)


async def _follow_swarm(ctx: ApiContext) -> AsyncIterator[bytes]:
    store = ctx.service.store
    after = time.time()  # changes from now on: a client lists the tasks that exist already
    seen: dict[str, float] = {}  # id -> updated_at already sent, within the overlap window
    membership_sent = ""
    next_membership = 0.0
    quiet = 0.0
    while True:
        sent_any = False
        if trio.current_time() >= next_membership:
            event, digest = _membership(ctx)
            if digest != membership_sent:
                yield sse_event("swarm", event)
                membership_sent, sent_any = digest, True
            next_membership = trio.current_time() + MEMBERSHIP_SECONDS
        try:
            changed = await store.changed_since(after - CLOCK_OVERLAP_SECONDS, limit=CHANGES_PER_READ)
        except StoreError as exc:
            log.warning("events.store_unreachable", error=str(exc))
            changed = []
        for task in changed:
            if seen.get(task.id) != task.updated_at:
                yield sse_event("task", task_summary(task))
                seen[task.id] = task.updated_at
                sent_any = True
        if changed:
            # A full read means more changes are waiting: go on from the last one, without the overlap.
            after = max(after, changed[-1].updated_at + (CLOCK_OVERLAP_SECONDS if len(changed) == CHANGES_PER_READ else 0))
            seen = {tid: at for tid, at in seen.items() if at >= after - CLOCK_OVERLAP_SECONDS}
        quiet = 0.0 if sent_any else quiet + POLL_SECONDS
        if quiet >= KEEPALIVE_SECONDS:
            yield KEEPALIVE
            quiet = 0.0
        await trio.sleep(POLL_SECONDS)
