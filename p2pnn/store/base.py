"""The TaskStore interface every backend implements.

The store is the source of truth. Every state change is a conditional update
(``UPDATE ... WHERE state = ANY(expected)``): an illegal or stale transition
changes nothing and the method says so by returning ``None`` / ``False``.
Times are Unix seconds (floats) taken from the caller's clock, except task
leases: ``claim``, ``renew`` and ``expire_leases`` compute them from the
database's own clock, so that members whose clocks disagree still agree on
when a lease lapsed (``lease_seconds`` is a duration; ``now`` only stamps
``updated_at``/``started_at``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from p2pnn.tasks import State, Task

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024  # one safetensors file; larger models do not belong in the store
# Points kept per attempt in a progress series: one per epoch, and compute.max_epochs is far below this.
# Reports past it still update the task's latest progress; the series says it was truncated.
MAX_PROGRESS_POINTS = 2000


class StoreError(RuntimeError):
    """The backend failed (connection lost, schema mismatch); the message says how."""


class StoreUnreachable(StoreError):
    """The database could not be reached or did not answer in time: a fault that may pass by itself."""


class AmbiguousCommit(StoreError):
    """The database could not tell whether the transaction committed (CockroachDB's SQLSTATE 40003).

    As CockroachDB's documentation prescribes, the outcome is unknown: a caller
    re-reads the row and acts on what it finds, never assumes either way."""


class IdempotencyConflict(StoreError):
    """An Idempotency-Key was reused with a different request body."""


@dataclass(frozen=True)
class NewTask:
    kind: str
    spec: dict[str, Any]
    owner: str
    max_attempts: int
    # The sweep this task is a trial of.
    parent: str | None = None
    # The task's id, when the caller chose it (a UUID, so that it can name the task before the insert
    # commits: see TaskService.submit); None: the store makes one.
    id: str | None = None


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
    worker: str | None = None  # set: the attempt must still be leased to this worker


@dataclass(frozen=True)
class FinishUnclaimedOp:
    """The outcome of a run that no claim preceded, as one step of ``apply``: a short task run
    straight from its message. It becomes the task's next attempt, only while the task still waits
    to be claimed (``pending`` or ``queued``, so neither cancelled, claimed nor finished meanwhile)
    and its stored spec is ``spec``: a message cannot make a result count for another spec."""

    task_id: str
    worker: str
    spec: dict[str, Any]
    state: State
    started_at: float
    result: dict[str, Any] | None = None
    error: str | None = None


Op = ClaimOp | FinishOp | FinishUnclaimedOp


@dataclass(frozen=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class ProgressSeries:
    """The progress reports of a task's current attempt, oldest first (one per epoch for training)."""

    task_id: str
    attempt: int
    points: list[dict[str, Any]]
    truncated: bool  # reports past MAX_PROGRESS_POINTS were not kept


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
        self, tasks: list[NewTask], *, now: float, idempotency_key: str | None = None, request_hash: str | None = None,
        queued: bool = False, relaxed: bool = False,
    ) -> tuple[list[Task], bool]:
        """Insert tasks as ``pending`` in one transaction.

        With ``queued``, they are inserted ``queued`` and published at ``now``
        instead: for a bus whose messages cannot be lost without the store
        knowing (the in-process queue, which is rebuilt from the store at
        start), the caller publishes right after and skips ``mark_queued``.

        With ``relaxed``, the commit need not wait for the disk, where the
        database offers that: a crash of the database server or the machine
        may lose the tasks. Only for a caller that tells no one of them until
        either ``make_durable`` returned or a later durable commit recorded a
        result for one of them (every terminal state is recorded durably, and
        a durable commit makes every earlier commit durable too).

        With an idempotency key, a repeat (same owner, same key) returns the
        tasks created the first time and ``False``; a repeat whose
        ``request_hash`` differs raises IdempotencyConflict. Returns the tasks
        and whether they were created now.
        """

    @abc.abstractmethod
    async def make_durable(self) -> None:
        """A durability barrier: once it returns, every transaction this store committed before
        the call (a relaxed one too) is on disk, as far as the store's configuration makes any
        commit durable. Costs one durable commit at most; returns at once where every commit
        is durable anyway.

        Error handling: raises StoreError when that cannot be assured (the database is
        unreachable); nothing is then known to be durable."""

    @property
    def announces_finished(self) -> bool:
        """Whether ``follow_finished`` delivers anything on this store (known once it is open)."""
        return False

    async def follow_finished(
        self, on_finished: Callable[[list[tuple[str, Task | None]]], None], *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_finished`` (in trio) with the tasks whose results ``apply`` recorded, in any
        process on this store, as their commits land; until cancelled: (id, the task as committed)
        for each, the task None where the store sent only its id. A hint for long polls: nothing
        depends on it arriving, and a task it carries is what a read right after the commit gives.

        SQLite announces the results recorded by this process only (``announces_finished`` False).
        Where the store has no such feed (CockroachDB) this returns at once after
        ``task_status.started()``, and the default does just that."""
        task_status.started()

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
        parent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Tasks, newest first, ``limit`` at a time; ``cursor`` is the previous page's ``next_cursor``.
        ``parent``: only the trials of that sweep."""

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
    async def mark_published(self, versions: dict[str, float], *, now: float) -> int:
        """The bus confirmed a message for each of these ``queued`` tasks: set ``published_at``.

        ``versions`` maps a task id to the ``updated_at`` the publisher saw; a
        task updated since (taken and handed back again) is left unmarked, so
        the sweeper still finds it. Returns how many were marked."""

    @abc.abstractmethod
    async def stranded(self, *, older_than: float, limit: int = 1000) -> dict[str, float]:
        """``queued`` tasks with no message known to be on its way (``published_at`` is NULL),
        last updated before ``older_than``: task id -> updated_at, oldest first."""

    @abc.abstractmethod
    async def published_before(self, *, before: float, limit: int = 1000) -> dict[str, float]:
        """``queued`` tasks whose last confirmed message is older than ``before``: task id -> updated_at."""

    @abc.abstractmethod
    async def claim(self, task_id: str, *, worker: str, now: float, lease_seconds: float) -> Task | None:
        """``queued|pending -> running``: attempts + 1, lease to ``worker`` until the database's now + lease_seconds.

        A pending task is taken too: the worker holds its message, so it was published and only
        the submitter's ``mark_queued`` is still to land (it then changes nothing). None when the
        task is neither (taken, cancelled, finished) or does not exist.
        """

    @abc.abstractmethod
    async def renew(self, task_id: str, *, worker: str, attempt: int, now: float, lease_seconds: float) -> bool:
        """Extend a running task's lease to the database's now + lease_seconds; False when the lease is no
        longer this worker's attempt."""

    @abc.abstractmethod
    async def progress(self, task_id: str, *, worker: str, attempt: int, progress: dict[str, Any], now: float) -> bool:
        """Record progress of a running attempt; False when the attempt is no longer current.

        The report becomes the task's ``progress`` and is appended to the
        attempt's series (see ``progress_series``), in one transaction.
        """

    @abc.abstractmethod
    async def progress_series(self, task_id: str) -> ProgressSeries | None:
        """Every progress report of the task's latest attempt, oldest first; None for an unknown task.

        Earlier attempts' series are dropped when a new attempt reports; a task
        that never reported has an empty series.
        """

    @abc.abstractmethod
    async def changed_since(self, after: float, *, limit: int = 100) -> list[Task]:
        """Tasks whose ``updated_at`` is later than ``after``, oldest change first, at most ``limit``.

        Times come from the writers' clocks: a caller that follows changes
        should ask again a little before its last ``updated_at`` and drop what
        it has seen, or a write from a node whose clock lags is missed.
        """

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
        worker: str | None = None,
        artifacts: dict[str, bytes] | None = None,
    ) -> bool:
        """``running -> succeeded|failed|cancelled`` for that attempt: the first terminal result wins.

        With ``worker``, the attempt must also still be leased to that worker.
        ``artifacts`` are stored in the same transaction, only when this result
        wins. ``cancelled`` is accepted only when a cancel was requested in the
        store. A late or duplicate result returns False and changes nothing.
        """

    @abc.abstractmethod
    async def apply(self, ops: Sequence[Op], *, now: float) -> list[Task | None | bool]:
        """Several claims and finishes in one transaction (group commit: one commit for all).

        Each step does exactly what ``claim`` or ``finish`` alone would, conditions
        included; a FinishUnclaimedOp answers True when its result was recorded. The
        answers come back in the order of ``ops``. Error handling: a backend failure
        fails them all (StoreError), nothing is applied.
        """

    @abc.abstractmethod
    async def retry_or_fail(
        self, task_id: str, *, attempt: int, error: str, now: float, worker: str | None = None
    ) -> State | None:
        """The attempt failed: back to ``queued`` (no message yet: ``published_at`` cleared) while
        attempts remain, else ``failed``.

        Returns the new state, or None when the attempt (with ``worker``: and its lease) was no longer current.
        """

    @abc.abstractmethod
    async def release(self, task_id: str, *, attempt: int, now: float, worker: str | None = None) -> bool:
        """Hand a running attempt back (role change, shutdown): ``running -> queued``, the attempt not
        counted, ``published_at`` cleared until the caller's new message is confirmed."""

    @abc.abstractmethod
    async def fail_queued(self, task_id: str, *, error: str, now: float) -> bool:
        """``queued -> failed`` with ``error`` (no Ki could ever run it); False when it was no longer queued."""

    @abc.abstractmethod
    async def request_cancel(self, task_id: str, *, now: float) -> Task | None:
        """Cancel: ``pending|queued -> cancelled`` at once; a running task gets ``cancel_requested``.

        Returns the task after the change (a finished task is returned unchanged), None if unknown.
        """

    @abc.abstractmethod
    async def expire_leases(self, *, now: float, limit: int = 1000, fence: Fence | None = None) -> list[tuple[str, State]]:
        """Every running task whose lease lapsed (by the database's clock) goes back to ``queued`` (or ``failed`` when out of
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

    @abc.abstractmethod
    async def record_member(self, swarm: str, node_id: str, dht: tuple[str, int], *, now: float) -> None:
        """Record (or refresh) where ``node_id``'s DHT listens."""

    @abc.abstractmethod
    async def members(self, swarm: str, *, since: float) -> dict[str, tuple[str, int]]:
        """The DHT address of every member recorded at or after ``since``: node id -> (host, port)."""

    # --- API tokens: the deny list ---

    @abc.abstractmethod
    async def revoke_token(self, jti: str, *, expires_at: float, now: float) -> None:
        """Put the token ``jti`` on the deny list until ``expires_at`` (when it would expire anyway)."""

    @abc.abstractmethod
    async def revoked_tokens(self, *, now: float) -> frozenset[str]:
        """The ``jti`` of every revoked token that has not expired yet."""

    # --- artifacts ---

    @abc.abstractmethod
    async def put_artifact(self, task_id: str, name: str, data: bytes, *, now: float) -> None:
        """Store (or replace) an artifact of a task. Raises StoreError over MAX_ARTIFACT_BYTES."""

    @abc.abstractmethod
    async def get_artifact(self, task_id: str, name: str) -> bytes | None: ...
