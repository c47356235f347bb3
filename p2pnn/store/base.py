"""The TaskStore interface every backend implements.

The store is the source of truth. Every state change is a conditional update
(``UPDATE ... WHERE state = ANY(expected)``): an illegal or stale transition
changes nothing and the method says so by returning ``None`` / ``False``.
Times are Unix seconds (floats) taken from the caller's clock.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pnn.tasks import State, Task

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024  # one safetensors file; larger models do not belong in the store


class StoreError(RuntimeError):
    """The backend failed (connection lost, schema mismatch); the message says how."""


class IdempotencyConflict(StoreError):
    """An Idempotency-Key was reused with a different request body."""


@dataclass(frozen=True)
class NewTask:
    kind: str
    spec: dict[str, Any]
    owner: str
    max_attempts: int


@dataclass(frozen=True)
class ClaimOp:
    """``claim`` as one step of ``apply``."""

    task_id: str
    worker: str
    lease_seconds: float


@dataclass(frozen=True)
class FinishOp:
    """``finish`` as one step of ``apply``."""

    task_id: str
    attempt: int
    state: State
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class Fence:
    """A principal's claim: ``holder`` holds ``term`` of ``swarm``. Fenced writes happen only while it still does."""

    swarm: str
    term: int
    holder: str


@dataclass(frozen=True)
class Lease:
    swarm: str
    term: int
    holder: str
    expires_at: float


@dataclass(frozen=True)
class TermRecord:
    term: int
    holder: str
    acquired_at: float
    expires_at: float  # the last expiry granted (by acquisition or renewal)
    ended_at: float | None
    end_reason: str | None  # released | expired | None while current


@dataclass(frozen=True)
class Assignment:
    roles: tuple[str, ...]
    an_id: str | None


class TaskStore(abc.ABC):
    """Tasks, their attempts, leases and artifacts.

    Resource handling: ``open`` connects and applies pending migrations;
    ``close`` releases every connection. Methods are trio coroutines; backends
    run blocking drivers in worker threads.

    Error handling: a backend failure raises StoreError; a refused transition
    returns None/False and never raises.
    """

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest migration applied."""

    # --- creation and reading ---

    @abc.abstractmethod
    async def create(
        self, tasks: list[NewTask], *, now: float, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> tuple[list[Task], bool]:
        """Insert tasks as ``pending`` in one transaction.

        With an idempotency key, a repeat (same owner, same key) returns the
        tasks created the first time and ``False``; a repeat whose
        ``request_hash`` differs raises IdempotencyConflict. Returns the tasks
        and whether they were created now.
        """

    @abc.abstractmethod
    async def get(self, task_id: str) -> Task | None:
        """The task, or None when there is none (a malformed id is simply not found)."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        state: State | None = None,
        kind: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Tasks, newest first, ``limit`` at a time; ``cursor`` is the previous page's ``next_cursor``."""

    @abc.abstractmethod
    async def ids_in_state(self, state: State, *, older_than: float, limit: int = 1000) -> list[str]:
        """Ids of tasks in ``state`` whose last update is before ``older_than`` (oldest first)."""

    @abc.abstractmethod
    async def counts(self) -> dict[tuple[str, str], int]:
        """Number of tasks by (state, kind)."""

    # --- transitions ---

    @abc.abstractmethod
    async def mark_queued(self, task_ids: list[str], *, now: float) -> int:
        """``pending -> queued`` for those still pending; returns how many moved."""

    @abc.abstractmethod
    async def claim(self, task_id: str, *, worker: str, now: float, lease_seconds: float) -> Task | None:
        """``queued|pending -> running``: attempts + 1, lease to ``worker`` until now + lease_seconds.

        A pending task is taken too: the worker holds its message, so it was published and only
        the submitter's ``mark_queued`` is still to land (it then changes nothing). None when the
        task is neither (taken, cancelled, finished) or does not exist.
        """

    @abc.abstractmethod
    async def renew(self, task_id: str, *, worker: str, attempt: int, now: float, lease_seconds: float) -> bool:
        """Extend a running task's lease; False when the lease is no longer this worker's attempt."""

    @abc.abstractmethod
    async def progress(self, task_id: str, *, worker: str, attempt: int, progress: dict[str, Any], now: float) -> bool:
        """Record progress of a running attempt; False when the attempt is no longer current."""

    @abc.abstractmethod
    async def finish(
        self,
        task_id: str,
        *,
        attempt: int,
        state: State,
        now: float,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """``running -> succeeded|failed|cancelled`` for that attempt: the first terminal result wins.

        A late or duplicate result returns False and changes nothing.
        """

    @abc.abstractmethod
    async def apply(self, ops: Sequence[ClaimOp | FinishOp], *, now: float) -> list[Task | None | bool]:
        """Several claims and finishes in one transaction (group commit: one commit for all).

        Each step does exactly what ``claim`` or ``finish`` alone would, conditions
        included; the answers come back in the order of ``ops``. Error handling: a
        backend failure fails them all (StoreError), nothing is applied.
        """

    @abc.abstractmethod
    async def retry_or_fail(self, task_id: str, *, attempt: int, error: str, now: float) -> State | None:
        """The attempt failed: back to ``queued`` while attempts remain, else ``failed``.

        Returns the new state, or None when the attempt was no longer current.
        """

    @abc.abstractmethod
    async def release(self, task_id: str, *, attempt: int, now: float) -> bool:
        """Hand a running attempt back (clean shutdown): ``running -> queued``, the attempt not counted."""

    @abc.abstractmethod
    async def request_cancel(self, task_id: str, *, now: float) -> Task | None:
        """Cancel: ``pending|queued -> cancelled`` at once; a running task gets ``cancel_requested``.

        Returns the task after the change (a finished task is returned unchanged), None if unknown.
        """

    @abc.abstractmethod
    async def expire_leases(self, *, now: float, limit: int = 1000, fence: Fence | None = None) -> list[tuple[str, State]]:
        """Every running task whose lease lapsed goes back to ``queued`` (or ``failed`` when out of
        attempts, or ``cancelled`` when a cancel was requested). Returns (task id, new state) pairs.

        With a ``fence``, nothing changes (and ``[]`` is returned) unless that
        principal's lease still holds at ``now``, checked in the same transaction."""

    # --- swarm: the principal's lease (compare-and-set), its terms, role assignments ---

    @abc.abstractmethod
    async def acquire_lease(self, swarm: str, holder: str, *, now: float, lease_seconds: float) -> int | None:
        """Take the principal's lease with a new term (the last term + 1) when it is free or lapsed.

        Returns the new term, or None while another holder's lease runs (or
        another node won the same race). The previous term's history row is
        closed as ``expired`` unless it was released.
        """

    @abc.abstractmethod
    async def renew_lease(self, fence: Fence, *, now: float, lease_seconds: float) -> bool:
        """Extend the lease to now + lease_seconds; False (nothing changed) once it lapsed or moved on."""

    @abc.abstractmethod
    async def release_lease(self, fence: Fence, *, now: float) -> bool:
        """End the term now (a clean hand-over); False when it was no longer held."""

    @abc.abstractmethod
    async def lease(self, swarm: str) -> Lease | None: ...

    @abc.abstractmethod
    async def terms(self, swarm: str) -> list[TermRecord]:
        """Every term granted in ``swarm``, oldest first."""

    @abc.abstractmethod
    async def record_roles(self, fence: Fence, assignments: dict[str, Assignment], *, now: float) -> bool:
        """Replace the swarm's role map, only while ``fence`` holds; False (nothing written) otherwise."""

    @abc.abstractmethod
    async def roles(self, swarm: str) -> dict[str, tuple[Assignment, int]]:
        """The recorded role map: node id -> (assignment, term that wrote it)."""

    # --- artifacts ---

    @abc.abstractmethod
    async def put_artifact(self, task_id: str, name: str, data: bytes, *, now: float) -> None:
        """Store (or replace) an artifact of a task. Raises StoreError over MAX_ARTIFACT_BYTES."""

    @abc.abstractmethod
    async def get_artifact(self, task_id: str, name: str) -> bytes | None: ...
