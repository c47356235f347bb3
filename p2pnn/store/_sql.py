"""The queries both backends run, written once against a thin connection wrapper.

A backend supplies one thing: ``_transact(fn, write=...)``, which runs ``fn(db)``
in a worker thread inside a database transaction (SQLite: ``BEGIN IMMEDIATE``
for writes, one connection behind a trio lock; PostgreSQL/CockroachDB: a pooled
connection, retried on serialization failures). It may also run a transaction
of one statement (``_statement``) more cheaply than ``_transact`` does:
PostgreSQL sends it without BEGIN and COMMIT. Everything else, every
conditional update included, lives here so the two backends cannot drift apart.

SQL is written with ``?`` placeholders and only the constructs SQLite,
PostgreSQL and CockroachDB all accept: ``UPDATE ... RETURNING``,
``WITH v (...) AS (VALUES ...) UPDATE ... FROM v`` (SQLite 3.33+; RETURNING
already needs 3.35), ``INSERT ... ON CONFLICT``, row-value comparisons, ``CASE``,
``IN (...)`` lists rather than ``= ANY(array)`` (a text array does not compare
with a UUID column). A few statements differ by dialect: a group's claims read
each task's state under a ``FOR UPDATE`` lock in the same statement where rows
are locked (``Dialect.locks_rows``), and in a statement of their own on SQLite;
a create inserts its tasks in a WITH clause of the statement that counts them
(``Dialect.writes_in_with``), where SQLite runs two, and a group of unclaimed
finishes records its results in a WITH clause of the statement that counts them
and announces them, where SQLite runs a transaction of several; ``get`` gathers
a task's artifact names with each database's JSON aggregate (``Dialect.names_json``).
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import collections
import dataclasses
import math
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from p2pnn.store.base import (
    MAX_ARTIFACT_BYTES,
    MAX_PROGRESS_POINTS,
    Assignment,
    ClaimOp,
    FinishOp,
    FinishUnclaimedOp,
    Fence,
    IdempotencyConflict,
    Lease,
    NewTask,
    Op,
    Page,
    ProgressSeries,
    StoreError,
    TaskStore,
    TermRecord,
)
from p2pnn.tasks import State, Task

T = TypeVar("T")

MAX_PAGE = 1000  # one page of a listing; a larger limit is clamped so a client cannot ask for the whole table
MAX_ARTIFACT_NAME = 200  # artifact names travel in URLs and file names
MAX_CURSOR_CHARS = 200  # longer cursors are refused unread; the ones this store makes are under 100
# What a stored JSON value too deeply nested to parse reads as (see load_json).
UNREADABLE_JSON = {"unreadable": "stored JSON nested too deeply to read"}
LEASE_EXPIRED_ERROR = "lease expired on the last attempt"  # the error a task gets when its final lease lapses
COUNT_SHARDS = 8  # rows per (state, kind) in task_counts: concurrent transactions seldom pick the same one
IDS_PER_NOTIFY = 200  # task ids in one NOTIFY payload: 200 x 37 bytes, under PostgreSQL's 8,000
# Tasks one statement inserts and counts together (see create): 12 parameters each, far below the
# 65,535 one PostgreSQL statement takes; a larger batch is inserted row by row, then counted.
MAX_INSERT_WITH_COUNT = 1000

TASK_COLUMNS = (
    "id, kind, spec, state, owner, attempts, max_attempts, created_at, updated_at, started_at, finished_at, "
    "lease_owner, lease_expires_at, cancel_requested, progress, result, error, idempotency_key, parent_id"
)

# A task row as one JSON array of TASK_COLUMNS (ids and JSON columns as text, as the driver reads them
# here), which task_from_row takes: what a notification of a recorded result carries (see follow_finished).
TASK_ROW_JSON = "json_build_array(" + ", ".join(
    f"CAST(tasks.{c} AS TEXT)" if c in ("id", "spec", "progress", "result", "parent_id") else f"tasks.{c}"
    for c in TASK_COLUMNS.split(", ")
) + ")"
# A notification's payload is under 8,000 bytes: a task row longer than this goes as its id alone.
MAX_ROW_NOTIFY_BYTES = 7900

# What an attempt that ended without a result leads to: a requested cancel wins,
# then the attempt budget decides between another try and giving up.
_STATE_AFTER_LOST_ATTEMPT = (
    "CASE WHEN cancel_requested THEN 'cancelled' WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END"
)
_TERMINAL_AFTER_LOST_ATTEMPT = "(cancel_requested OR attempts >= max_attempts)"


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL databases: placeholders, three column types, the clock, and one aggregate."""

    name: str
    placeholder: str
    uuid_type: str
    json_type: str
    blob_type: str
    now: str  # the database's own time, in Unix seconds, as an SQL expression
    # An aggregate over a group's artifact names: their JSON array as text (NULL or "[]" for none),
    # so that a task and its names come back in one row of one statement.
    names_json: str
    # Whether concurrent transactions write (and so SELECT ... FOR UPDATE takes row locks): SQLite
    # has one writer at a time and no FOR UPDATE.
    locks_rows: bool = False
    # Whether a WITH clause may hold an INSERT, run with the statement around it (SQLite's may not).
    writes_in_with: bool = False

    def sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in this dialect's style (no query here contains a literal ``?``),
        ``{now}`` replaced by the database's clock and ``{names_json}`` by its aggregate."""
        return _render(text, self)

    def ddl(self, text: str) -> str:
        return text.format(uuid=self.uuid_type, json=self.json_type, blob=self.blob_type)


@lru_cache(maxsize=256)  # the queries are a fixed set, plus IN and VALUES lists of a few lengths
def _render(text: str, dialect: Dialect) -> str:
    text = text.replace("{now}", dialect.now).replace("{names_json}", dialect.names_json)
    return text if dialect.placeholder == "?" else text.replace("?", dialect.placeholder)


# SQLite: TEXT for ids and JSON because a type name without TEXT in it gives a
# column NUMERIC affinity, which would try to turn strings into numbers.
SQLITE = Dialect(
    "sqlite", "?", uuid_type="TEXT", json_type="TEXT", blob_type="BLOB",
    now="((julianday('now') - 2440587.5) * 86400.0)", names_json="json_group_array(name)",
)
# now() is the transaction's start: one time for every row a statement touches. EXTRACT gives a
# NUMERIC on PostgreSQL 14+ and a FLOAT on CockroachDB; the cast makes both a DOUBLE PRECISION.
POSTGRES = Dialect(
    "postgres", "%s", uuid_type="UUID", json_type="JSONB", blob_type="BYTEA",
    now="CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)", names_json="CAST(json_agg(name) AS TEXT)",
    locks_rows=True, writes_in_with=True,
)


class Db:
    """A DB-API connection (``sqlite3`` or ``psycopg``) with the dialect's placeholders applied.

    Resource handling: owns nothing; the backend opens, closes and wraps the
    transaction around every use.
    """

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect
        # One cursor for every statement: each is read to the end before the next runs, and a new
        # psycopg cursor per statement (copying the connection's adapters) cost more than the reuse.
        self._cursor: Any = None

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        if self._cursor is None:
            self._cursor = self.conn.cursor()
        self._cursor.execute(self.dialect.sql(sql), tuple(params))
        return self._cursor

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute a statement; returns the number of rows it changed."""
        return self._execute(sql, params).rowcount

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._cursor is None:
            self._cursor = self.conn.cursor()
        self._cursor.executemany(self.dialect.sql(sql), [tuple(r) for r in rows])

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows the statement returned; none for one that returns no rows (an INSERT without RETURNING)."""
        cursor = self._execute(sql, params)
        return list(cursor.fetchall()) if cursor.description is not None else []

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        found = self.rows(sql, params)
        return found[0] if found else None


# --- values in and out -------------------------------------------------------


def parse_id(task_id: Any) -> str | None:
    """The canonical form of a task id, or None when it is not a UUID (such an id names no task)."""
    if isinstance(task_id, uuid.UUID):
        return str(task_id)
    if not isinstance(task_id, str):
        return None
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dump_json(value: dict[str, Any] | None) -> str | None:
    """JSON text for a spec, progress or result.

    JSON has no NaN or Infinity (and PostgreSQL's JSONB refuses them), so a
    non-finite float, such as the loss of a diverged run, is stored as null on
    both backends rather than failing the report.
    """
    if value is None:
        return None
    return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


def load_json(value: Any) -> Any:
    """A stored spec, progress or result. One nested deeper than the parser's stack allows
    (written before input depth was capped, or by other means) reads as UNREADABLE_JSON, so
    that one row cannot fail every listing it appears on."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode()
    try:
        return json.loads(value)
    except RecursionError:
        return dict(UNREADABLE_JSON)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def task_from_row(row: Sequence[Any], artifacts: list[str] | None = None) -> Task:
    """A Task from a row selected as TASK_COLUMNS."""
    (
        id_, kind, spec, state, owner, attempts, max_attempts, created_at, updated_at, started_at, finished_at,
        lease_owner, lease_expires_at, cancel_requested, progress, result, error, idempotency_key, parent_id,
    ) = row
    return Task(
        id=str(id_),
        kind=kind,
        spec=load_json(spec),
        state=State(state),
        owner=owner,
        attempts=int(attempts),
        max_attempts=int(max_attempts),
        created_at=float(created_at),
        updated_at=float(updated_at),
        started_at=_opt_float(started_at),
        finished_at=_opt_float(finished_at),
        lease_owner=lease_owner,
        lease_expires_at=_opt_float(lease_expires_at),
        cancel_requested=bool(cancel_requested),
        progress=load_json(progress),
        result=load_json(result),
        error=error,
        idempotency_key=idempotency_key,
        artifacts=sorted(artifacts or []),
        parent=None if parent_id is None else str(parent_id),
    )


def encode_cursor(created_at: float, task_id: str) -> str:
    """An opaque cursor: the (created_at, id) of the last task on a page."""
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Error handling: a cursor this store did not make raises ValueError("malformed cursor"), whatever it holds."""
    # A real cursor is under 100 characters; the cap keeps a crafted one from costing parse time.
    if len(cursor) > MAX_CURSOR_CHARS:
        raise ValueError("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = json.loads(raw)
        canonical = parse_id(task_id)
        if isinstance(created_at, bool) or not isinstance(created_at, (int, float)) or canonical is None:
            raise ValueError
        created = float(created_at)
        if not math.isfinite(created):
            raise ValueError
        return created, canonical
    # OverflowError: an integer too large for a float; RecursionError: brackets nested thousands deep.
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error, UnicodeDecodeError):
        raise ValueError("malformed cursor") from None


def _in_list(count: int) -> str:
    return "(" + ", ".join("?" * count) + ")"


# --- the store ---------------------------------------------------------------


class SqlTaskStore(TaskStore):
    """TaskStore over any SQL backend that can run ``fn(db)`` inside a transaction.

    Error handling: refused transitions return None/False; the backend turns
    driver errors into StoreError; misuse by the caller (a non-terminal state
    given to ``finish``, an idempotency key over tasks of several owners, a
    malformed cursor) raises ValueError.
    """

    # Where ``apply`` announces the tasks whose results it recorded (PostgreSQL's NOTIFY, delivered
    # to listeners when the transaction commits; see follow_finished); None: announced nowhere.
    _finished_channel: str | None = None
    # Who hears, in this process, of the results ``apply`` recorded here, each with its task as
    # committed (SqliteTaskStore.follow_finished); they are read inside the transaction only while
    # someone listens. PostgreSQL announces to every process through NOTIFY instead.
    _listeners: tuple[Callable[[list[tuple[str, Task | None]]], None], ...] = ()

    @property
    def announces_finished(self) -> bool:
        return self._finished_channel is not None
    # The SQL the backend speaks, for what ``apply`` decides before it opens a transaction (SQLITE's
    # flags: none of the shortcuts a WITH clause that writes or row locks make possible).
    _dialect: Dialect = SQLITE

    @abc.abstractmethod
    async def _transact(self, fn: Callable[[Db], T], *, write: bool, relaxed: bool = False) -> T:
        """Run ``fn(db)`` in one transaction in a worker thread and return its result.

        ``relaxed``: the commit need not wait for the disk, where the database offers that (a later
        durable commit makes it durable too, as the log is written in order). Only for a transaction
        whose loss in a crash of the database server or the machine costs a repeat and nothing
        else: mark_queued (a task left pending is published again by the sweeper) and a group of
        claims alone (a task whose claim rolled back is ``queued`` again; its message was acked, so
        the sweeper's ``queued_after`` rule, or an embedded node's next start, publishes it again,
        and the attempt that ran meanwhile cannot record a result without its claim); or one that
        no one hears of before a later durable commit: a relaxed ``create``."""

    async def _statement(
        self, sql: str, params: Sequence[Any] = (), *, write: bool = False, keyed: bool = False, relaxed: bool = False
    ) -> list[tuple[Any, ...]]:
        """The rows of one statement (a write's from RETURNING), run as a transaction of its own;
        ``write`` and ``relaxed`` as ``_transact``'s. A backend where one statement is a transaction
        of its own may run it without BEGIN and COMMIT (PostgreSQL does). ``keyed``: the statement
        finds its task rows by id alone (any state condition on _STATE_BY_ID, which no index serves)
        or inserts them, so one plan made for any values takes the primary key, and the backend may
        plan it once for all runs (PostgreSQL's lanes do); it must be safe to run again, as any
        transaction is."""
        return await self._transact(lambda db: db.rows(sql, params), write=write, relaxed=relaxed)

    # --- creation and reading ---

    async def create(
        self, tasks: list[NewTask], *, now: float, idempotency_key: str | None = None, request_hash: str | None = None,
        queued: bool = False, relaxed: bool = False,
    ) -> tuple[list[Task], bool]:
        owners = {t.owner for t in tasks}
        if idempotency_key is not None and len(owners) > 1:
            raise ValueError("an idempotency key belongs to one owner; the tasks have several")
        state = State.QUEUED if queued else State.PENDING
        new = [
            Task(
                id=t.id or str(uuid.uuid4()),
                kind=t.kind,
                spec=load_json(dump_json(t.spec)),
                state=state,
                owner=t.owner,
                attempts=0,
                max_attempts=t.max_attempts,
                created_at=float(now),
                updated_at=float(now),
                idempotency_key=idempotency_key,
                parent=t.parent,
            )
            for t in tasks
        ]
        key_owner = next(iter(owners), "")
        published_at = float(now) if queued else None
        rows = [
            (t.id, t.kind, dump_json(t.spec), state.value, t.owner, t.max_attempts, now, now, idempotency_key, i,
             None if t.parent is None else parse_id(t.parent), published_at)
            for i, t in enumerate(new)
        ]
        counts = collections.Counter((state.value, t.kind) for t in new)
        one_statement = self._dialect.writes_in_with and 0 < len(rows) <= MAX_INSERT_WITH_COUNT
        if one_statement:
            # One statement, so one round trip: the insert runs in a WITH clause of the count's upsert.
            upsert, upsert_params = _count_upsert(counts)
            insert = f"WITH inserted AS ({_INSERT_TASKS} {', '.join([_TASK_VALUES] * len(rows))}) {upsert}"
            insert_params = [*(v for row in rows for v in row), *upsert_params]
            if idempotency_key is None:  # nothing to read first: the statement is the transaction
                await self._statement(insert, insert_params, write=True, keyed=True, relaxed=relaxed)
                return new, True

        def create(db: Db) -> tuple[list[Task], bool]:
            if idempotency_key is not None:
                claimed = db.rows(
                    "INSERT INTO idempotency_keys (owner, idempotency_key, request_hash, created_at) "
                    "VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (owner, idempotency_key) DO NOTHING RETURNING owner",
                    (key_owner, idempotency_key, request_hash, now),
                )
                if not claimed:
                    return _repeat(db, key_owner, idempotency_key, request_hash)
            if one_statement:
                db.run(insert, insert_params)
            else:
                db.run_many(f"{_INSERT_TASKS} {_TASK_VALUES}", rows)
                _count(db, counts)
            return new, True

        return await self._transact(create, write=True, relaxed=relaxed)

    async def get(self, task_id: str) -> Task | None:
        tid = parse_id(task_id)
        if tid is None:
            return None
        rows = await self._statement(GET_TASK, (tid,), keyed=True)
        return _task_with_artifacts(rows[0]) if rows else None

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
        if limit < 1:
            raise ValueError("limit must be at least 1")
        parent_id = None
        if parent is not None:
            parent_id = parse_id(parent)
            if parent_id is None:
                return Page(tasks=[], next_cursor=None)  # not a task id: no task has it as parent
        limit = min(limit, MAX_PAGE)
        where: list[str] = []
        params: list[Any] = []
        state_value = State(state).value if state is not None else None
        for column, value in (("state", state_value), ("kind", kind), ("owner", owner), ("parent_id", parent_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if cursor is not None:
            after_created, after_id = decode_cursor(cursor)
            where.append("(created_at, id) < (?, ?)")
            params += [after_created, after_id]
        sql = f"SELECT {TASK_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # One row more than the page tells whether another page exists.
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)

        rows = await self._statement(sql, params)
        tasks = [task_from_row(r) for r in rows[:limit]]
        next_cursor = encode_cursor(tasks[-1].created_at, tasks[-1].id) if len(rows) > limit else None
        return Page(tasks=tasks, next_cursor=next_cursor)

    async def ids_in_state(self, state: State, *, older_than: float, limit: int = 1000) -> list[str]:
        rows = await self._statement(
            "SELECT id FROM tasks WHERE state = ? AND updated_at < ? ORDER BY updated_at, id LIMIT ?",
            (State(state).value, older_than, limit),
        )
        return [str(r[0]) for r in rows]

    async def counts(self) -> dict[tuple[str, str], int]:
        # task_counts, not tasks: a few rows per (state, kind) whatever the number of tasks.
        rows = await self._statement("SELECT state, kind, SUM(n) FROM task_counts GROUP BY state, kind")
        return {(state, kind): int(n) for state, kind, n in rows if n}

    # --- transitions ---

    async def mark_queued(self, task_ids: list[str], *, now: float) -> int:
        ids = sorted({tid for tid in map(parse_id, task_ids) if tid is not None})
        if not ids:
            return 0
        def mark(db: Db) -> int:
            kinds = [kind for (kind,) in db.rows(
                "UPDATE tasks SET state = 'queued', updated_at = ?, published_at = ? "
                f"WHERE state = 'pending' AND id IN {_in_list(len(ids))} RETURNING kind",
                (now, now, *ids),
            )]
            _count_moves(db, [(kind, State.PENDING.value, State.QUEUED.value) for kind in kinds])
            return len(kinds)

        return await self._transact(mark, write=True, relaxed=True)

    async def mark_published(self, versions: dict[str, float], *, now: float) -> int:
        """Record that a message for each queued task was confirmed; ``versions`` maps a task id to
        the ``updated_at`` its publisher saw. A task that changed since (claimed and handed back
        again meanwhile, whose message is then spent) is left alone. Returns how many were marked."""
        rows = [(now, tid, float(at)) for tid, at in ((parse_id(t), at) for t, at in versions.items()) if tid is not None]
        if not rows:
            return 0

        def mark(db: Db) -> int:
            return sum(
                db.run("UPDATE tasks SET published_at = ? WHERE id = ? AND state = 'queued' AND updated_at = ?", row)
                for row in rows
            )

        return await self._transact(mark, write=True)

    async def stranded(self, *, older_than: float, limit: int = 1000) -> dict[str, float]:
        return await self._queued_where("published_at IS NULL AND updated_at < ?", "updated_at", older_than, limit)

    async def published_before(self, *, before: float, limit: int = 1000) -> dict[str, float]:
        return await self._queued_where("published_at < ?", "published_at", before, limit)

    async def _queued_where(self, condition: str, order: str, bound: float, limit: int) -> dict[str, float]:
        """Queued tasks matching ``condition`` (one ``?``, given ``bound``), oldest ``order`` first: id -> updated_at."""
        rows = await self._statement(
            f"SELECT id, updated_at FROM tasks WHERE state = 'queued' AND {condition} ORDER BY {order}, id LIMIT ?",
            (bound, limit),
        )
        return {str(r[0]): float(r[1]) for r in rows}

    async def claim(self, task_id: str, *, worker: str, now: float, lease_seconds: float) -> Task | None:
        tid = parse_id(task_id)
        if tid is None:
            return None
        return await self._transact(lambda db: _counted(db, lambda moves: _claim(db, tid, worker, now, lease_seconds, moves)),
                                    write=True)

    async def apply(self, ops: Sequence[Op], *, now: float) -> list[Task | None | bool]:
        """As TaskStore's: all the claims in one statement, all the unclaimed finishes in another
        and all the finishes in a third, each locking its rows in task id order; a group naming one
        task twice runs step by step instead (in task id order, then in the order given), so a later
        step sees what an earlier one did. A group of unclaimed finishes alone (each task once, at
        most IDS_PER_NOTIFY) is one statement where a WITH clause may write and rows are locked
        (PostgreSQL): records, counts and notification together, without BEGIN and COMMIT."""
        for op in ops:
            if isinstance(op, (FinishOp, FinishUnclaimedOp)) and not State(op.state).terminal:
                raise ValueError(f"finish needs a terminal state, got {State(op.state).value}")
        tids = [parse_id(op.task_id) for op in ops]
        named = [tid for tid in tids if tid is not None]
        stepwise = len(set(named)) < len(named)  # a task named twice: see the docstring
        run = _apply_stepwise if stepwise else _apply_together
        # Claims alone commit without waiting for the disk (see _transact); a result always waits.
        relaxed = all(isinstance(op, ClaimOp) for op in ops)
        channel = None if relaxed else self._finished_channel
        if not stepwise and all(isinstance(op, FinishUnclaimedOp) for op in ops):
            items = sorted(((tid, op) for tid, op in zip(tids, ops) if tid is not None), key=lambda item: item[0])
            d = self._dialect
            # Every short task's result comes this way: one round trip, where the database can write
            # the counts and send the notification from the statement that records the results.
            if d.writes_in_with and d.locks_rows and 0 < len(items) <= IDS_PER_NOTIFY:
                rows = await self._statement(*_finish_unclaimed_counted(d, items, now, channel), write=True, keyed=True)
                recorded = {row[0] for row in rows}
                return [tid is not None and tid in recorded for tid in tids]

        listeners = () if relaxed else self._listeners

        def work(db: Db) -> tuple[list[Task | None | bool], list[tuple[str, Task | None]]]:
            out = _counted(db, lambda moves: run(db, ops, tids, now, moves))
            recorded = [tid for op, tid, won in zip(ops, tids, out) if won is True and not isinstance(op, ClaimOp)]
            if channel is not None:
                _announce(db, channel, recorded)
            return out, [(tid, _get(db, tid)) for tid in recorded if tid is not None] if listeners else []

        out, finished = await self._transact(work, write=True, relaxed=relaxed)
        if finished:
            for listener in listeners:
                listener(finished)
        return out

    async def _transition(
        self,
        task_id: str,
        assignments: str,
        set_params: Sequence[Any],
        *,
        attempt: int,
        worker: str | None = None,
        also: str = "",
        then: Callable[[Db, str], None] | None = None,
    ) -> str | None:
        """One conditional UPDATE of a running attempt; the task's new state, or None when it was not current.

        ``also`` adds a condition; ``then(db, tid)`` runs in the same transaction once the update matched."""
        tid = parse_id(task_id)
        if tid is None:
            return None
        return await self._transact(
            lambda db: _counted(
                db, lambda moves: _transition(db, tid, assignments, set_params, attempt, worker, moves, also, then)
            ),
            write=True,
        )

    async def renew(self, task_id: str, *, worker: str, attempt: int, now: float, lease_seconds: float) -> bool:
        tid = parse_id(task_id)
        if tid is None:
            return False
        # One statement: a renewal leaves the task running, so task_counts has nothing to learn.
        renewed = await self._statement(
            "UPDATE tasks SET lease_expires_at = {now} + ?, updated_at = ? "
            "WHERE id = ? AND state = 'running' AND attempts = ? AND lease_owner = ? RETURNING id",
            (lease_seconds, now, tid, attempt, worker),
            write=True,
        )
        return bool(renewed)

    async def progress(self, task_id: str, *, worker: str, attempt: int, progress: dict[str, Any], now: float) -> bool:
        tid = parse_id(task_id)
        if tid is None:
            return False
        data = dump_json(progress)

        def record(db: Db) -> bool:
            current = db.one(
                "UPDATE tasks SET progress = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND attempts = ? AND lease_owner = ? RETURNING id",
                (data, now, tid, attempt, worker),
            )
            if current is None:
                return False
            (kept,) = db.one("SELECT COUNT(*) FROM task_progress WHERE task_id = ? AND attempt = ?", (tid, attempt))
            if kept == 0:  # the first report of this attempt: the series of earlier ones is obsolete
                db.run("DELETE FROM task_progress WHERE task_id = ? AND attempt <> ?", (tid, attempt))
            if kept < MAX_PROGRESS_POINTS:
                # Only the attempt's lease holder gets here, one report at a time: seq cannot collide.
                db.run(
                    "INSERT INTO task_progress (task_id, attempt, seq, at, data) VALUES (?, ?, ?, ?, ?)",
                    (tid, attempt, int(kept) + 1, now, data),
                )
            return True

        return await self._transact(record, write=True)

    async def progress_series(self, task_id: str) -> ProgressSeries | None:
        tid = parse_id(task_id)
        if tid is None:
            return None

        def read(db: Db) -> ProgressSeries | None:
            row = db.one("SELECT attempts FROM tasks WHERE id = ?", (tid,))
            if row is None:
                return None
            attempt = int(row[0])
            rows = db.rows(
                "SELECT data FROM task_progress WHERE task_id = ? AND attempt = ? ORDER BY seq LIMIT ?",
                (tid, attempt, MAX_PROGRESS_POINTS + 1),
            )
            points = [load_json(r[0]) for r in rows]
            return ProgressSeries(
                task_id=tid, attempt=attempt, points=points[:MAX_PROGRESS_POINTS],
                truncated=len(points) >= MAX_PROGRESS_POINTS,
            )

        return await self._transact(read, write=False)

    async def changed_since(self, after: float, *, limit: int = 100) -> list[Task]:
        rows = await self._statement(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE updated_at > ? ORDER BY updated_at, id LIMIT ?",
            (after, max(1, min(limit, MAX_PAGE))),
        )
        return [task_from_row(r) for r in rows]

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
        state = State(state)
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, got {state.value}")
        blobs = {name: bytes(data) for name, data in (artifacts or {}).items()}
        for name, data in blobs.items():
            _check_artifact(name, data)

        def attach(db: Db, tid: str) -> None:
            for name, data in blobs.items():
                _put_artifact(db, tid, name, data, now)

        # The artifacts are written only when this attempt wins, in the same transaction: a late
        # duplicate cannot replace the winner's. A cancelled result needs a cancel requested in the store.
        changed = await self._transition(
            task_id,
            FINISH_ASSIGNMENTS,
            _finish_params(state, result, error, now),
            attempt=attempt,
            worker=worker,
            also=_finish_condition(state),
            then=attach if blobs else None,
        )
        return changed is not None

    async def retry_or_fail(
        self, task_id: str, *, attempt: int, error: str, now: float, worker: str | None = None
    ) -> State | None:
        """As TaskStore's; a task whose cancel was requested meanwhile becomes ``cancelled``, not queued again."""
        new_state = await self._transition(
            task_id,
            f"state = {_STATE_AFTER_LOST_ATTEMPT}, error = ?, "
            f"finished_at = CASE WHEN {_TERMINAL_AFTER_LOST_ATTEMPT} THEN ? ELSE NULL END, "
            "lease_owner = NULL, lease_expires_at = NULL, published_at = NULL, updated_at = ?",
            (error, now, now),
            attempt=attempt,
            worker=worker,
        )
        return None if new_state is None else State(new_state)

    async def release(self, task_id: str, *, attempt: int, now: float, worker: str | None = None) -> bool:
        """As TaskStore's; a task whose cancel was requested is ``cancelled`` instead of queued again.

        The released attempt's number is handed out again by the next claim, so
        a worker must stop touching the task once it has released it.
        """
        changed = await self._transition(
            task_id,
            "state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, "
            "attempts = CASE WHEN cancel_requested THEN attempts ELSE attempts - 1 END, "
            "finished_at = CASE WHEN cancel_requested THEN ? ELSE NULL END, "
            "lease_owner = NULL, lease_expires_at = NULL, published_at = NULL, updated_at = ?",
            (now, now),
            attempt=attempt,
            worker=worker,
        )
        return changed is not None

    async def fail_queued(self, task_id: str, *, error: str, now: float) -> bool:
        tid = parse_id(task_id)
        if tid is None:
            return False
        def fail(db: Db) -> bool:
            row = db.one(
                "UPDATE tasks SET state = 'failed', error = ?, finished_at = ?, updated_at = ?, published_at = NULL "
                "WHERE id = ? AND state = 'queued' RETURNING kind",
                (error, now, now, tid),
            )
            if row is not None:
                _count_moves(db, [(row[0], State.QUEUED.value, State.FAILED.value)])
            return row is not None

        return await self._transact(fail, write=True)

    async def request_cancel(self, task_id: str, *, now: float) -> Task | None:
        tid = parse_id(task_id)
        if tid is None:
            return None

        def cancel(db: Db) -> Task | None:
            # The row is locked first (SQLite: the whole database already is), so the state read
            # here is the one the UPDATE below changes: task_counts learns where the task came from.
            lock = " FOR UPDATE" if db.dialect.name == "postgres" else ""
            before = db.one(f"SELECT state FROM tasks WHERE id = ?{lock}", (tid,))
            changed = _updated_task(
                db,
                tid,
                "UPDATE tasks SET "
                "state = CASE WHEN state = 'running' THEN 'running' ELSE 'cancelled' END, "
                "finished_at = CASE WHEN state = 'running' THEN finished_at ELSE ? END, "
                "cancel_requested = TRUE, updated_at = ? "
                "WHERE id = ? AND (state IN ('pending', 'queued') OR (state = 'running' AND NOT cancel_requested))",
                (now, now, tid),
            )
            # None: unknown, finished, or a cancel already requested; the task is returned as it is.
            if changed is None:
                return _get(db, tid)
            if before is not None:
                _count_moves(db, [(changed.kind, before[0], changed.state.value)])
            return changed

        return await self._transact(cancel, write=True)

    async def expire_leases(self, *, now: float, limit: int = 1000, fence: Fence | None = None) -> list[tuple[str, State]]:
        # The outer WHERE repeats the inner one: under READ COMMITTED a row the
        # subquery picked may have been finished or renewed meanwhile, and only
        # the outer condition is re-checked against the latest row version.
        def expire(db: Db) -> list[tuple[Any, ...]]:
            if fence is not None and not _fence_holds(db, fence, now):
                return []
            rows = db.rows(
                f"UPDATE tasks SET state = {_STATE_AFTER_LOST_ATTEMPT}, "
                f"finished_at = CASE WHEN {_TERMINAL_AFTER_LOST_ATTEMPT} THEN ? ELSE NULL END, "
                "error = CASE WHEN NOT cancel_requested AND attempts >= max_attempts THEN ? ELSE error END, "
                "lease_owner = CASE WHEN cancel_requested OR attempts >= max_attempts THEN lease_owner ELSE NULL END, "
                "lease_expires_at = NULL, published_at = NULL, updated_at = ? "
                "WHERE state = 'running' AND lease_expires_at < {now} AND id IN ("
                "SELECT id FROM tasks WHERE state = 'running' AND lease_expires_at < {now} "
                "ORDER BY lease_expires_at LIMIT ?) RETURNING id, state, kind",
                (now, LEASE_EXPIRED_ERROR, now, limit),
            )
            _count_moves(db, [(kind, State.RUNNING.value, state) for _, state, kind in rows])
            return [(tid, state) for tid, state, _ in rows]

        rows = await self._transact(expire, write=True)
        return [(str(tid), State(state)) for tid, state in rows]

    # --- swarm ---

    async def acquire_lease(self, swarm: str, holder: str, *, now: float, lease_seconds: float) -> int | None:
        def acquire(db: Db) -> int | None:
            row = db.one("SELECT term, holder, expires_at FROM swarm_lease WHERE swarm = ?", (swarm,))
            expires = now + lease_seconds
            if row is None:
                term = 1
                if db.run(
                    "INSERT INTO swarm_lease (swarm, term, holder, expires_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (swarm) DO NOTHING", (swarm, term, holder, expires),
                ) != 1:
                    return None
            else:
                last, last_holder, last_expires = int(row[0]), row[1], float(row[2])
                if last_expires > now and last_holder != holder:
                    return None
                term = last + 1
                # Compare-and-set: the WHERE is re-checked against the latest row, so of two
                # nodes racing for the same lapsed term exactly one moves it on.
                if db.run(
                    "UPDATE swarm_lease SET term = ?, holder = ?, expires_at = ? "
                    "WHERE swarm = ? AND term = ? AND (expires_at <= ? OR holder = ?)",
                    (term, holder, expires, swarm, last, now, holder),
                ) != 1:
                    return None
                db.run(
                    "UPDATE swarm_terms SET ended_at = CASE WHEN expires_at < ? THEN expires_at ELSE ? END, "
                    "end_reason = 'expired' WHERE swarm = ? AND term = ? AND ended_at IS NULL",
                    (now, now, swarm, last),
                )
            db.run(
                "INSERT INTO swarm_terms (swarm, term, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (swarm, term, holder, now, expires),
            )
            return term

        return await self._transact(acquire, write=True)

    async def renew_lease(self, fence: Fence, *, now: float, lease_seconds: float) -> bool:
        def renew(db: Db) -> bool:
            expires = now + lease_seconds
            if db.run(
                "UPDATE swarm_lease SET expires_at = ? WHERE swarm = ? AND term = ? AND holder = ? AND expires_at > ?",
                (expires, fence.swarm, fence.term, fence.holder, now),
            ) != 1:
                return False
            db.run("UPDATE swarm_terms SET expires_at = ? WHERE swarm = ? AND term = ?", (expires, fence.swarm, fence.term))
            return True

        return await self._transact(renew, write=True)

    async def release_lease(self, fence: Fence, *, now: float) -> bool:
        def release(db: Db) -> bool:
            if db.run(
                "UPDATE swarm_lease SET expires_at = ? WHERE swarm = ? AND term = ? AND holder = ? AND expires_at > ?",
                (now, fence.swarm, fence.term, fence.holder, now),
            ) != 1:
                return False
            db.run(
                "UPDATE swarm_terms SET expires_at = ?, ended_at = ?, end_reason = 'released' "
                "WHERE swarm = ? AND term = ?", (now, now, fence.swarm, fence.term),
            )
            return True

        return await self._transact(release, write=True)

    async def lease(self, swarm: str) -> Lease | None:
        rows = await self._statement("SELECT term, holder, expires_at FROM swarm_lease WHERE swarm = ?", (swarm,))
        return Lease(swarm, int(rows[0][0]), rows[0][1], float(rows[0][2])) if rows else None

    async def terms(self, swarm: str) -> list[TermRecord]:
        rows = await self._statement(
            "SELECT term, holder, acquired_at, expires_at, ended_at, end_reason FROM swarm_terms "
            "WHERE swarm = ? ORDER BY term", (swarm,),
        )
        return [TermRecord(int(r[0]), r[1], float(r[2]), float(r[3]), _opt_float(r[4]), r[5]) for r in rows]

    async def record_roles(self, fence: Fence, assignments: dict[str, Assignment], *, now: float) -> bool:
        def record(db: Db) -> bool:
            if not _fence_holds(db, fence, now):
                return False
            db.run("DELETE FROM swarm_roles WHERE swarm = ?", (fence.swarm,))
            if assignments:
                db.run_many(
                    "INSERT INTO swarm_roles (swarm, node_id, roles, an_id, term, assigned_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(fence.swarm, node, ",".join(a.roles), a.an_id, fence.term, now) for node, a in assignments.items()],
                )
            return True

        return await self._transact(record, write=True)

    async def roles(self, swarm: str) -> dict[str, tuple[Assignment, int]]:
        rows = await self._statement("SELECT node_id, roles, an_id, term FROM swarm_roles WHERE swarm = ?", (swarm,))
        return {r[0]: (Assignment(tuple(x for x in r[1].split(",") if x), r[2]), int(r[3])) for r in rows}

    async def record_member(self, swarm: str, node_id: str, dht: tuple[str, int], *, now: float) -> None:
        await self._transact(
            lambda db: db.run(
                "INSERT INTO swarm_members (swarm, node_id, dht_host, dht_port, seen_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (swarm, node_id) DO UPDATE SET dht_host = excluded.dht_host, "
                "dht_port = excluded.dht_port, seen_at = excluded.seen_at",
                (swarm, node_id, dht[0], int(dht[1]), now),
            ),
            write=True,
        )

    async def members(self, swarm: str, *, since: float) -> dict[str, tuple[str, int]]:
        rows = await self._statement(
            "SELECT node_id, dht_host, dht_port FROM swarm_members WHERE swarm = ? AND seen_at >= ?", (swarm, since)
        )
        return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}

    # --- API tokens ---

    async def revoke_token(self, jti: str, *, expires_at: float, now: float) -> None:
        def revoke(db: Db) -> None:
            db.run("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))
            db.run(
                "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) VALUES (?, ?, ?) ON CONFLICT (jti) DO NOTHING",
                (jti, expires_at, now),
            )

        await self._transact(revoke, write=True)

    async def revoked_tokens(self, *, now: float) -> frozenset[str]:
        rows = await self._statement("SELECT jti FROM revoked_tokens WHERE expires_at >= ?", (now,))
        return frozenset(str(r[0]) for r in rows)

    # --- artifacts ---

    async def put_artifact(self, task_id: str, name: str, data: bytes, *, now: float) -> None:
        """As TaskStore's. Error handling: StoreError over MAX_ARTIFACT_BYTES or for an unknown task;
        ValueError for an empty or overlong name."""
        _check_artifact(name, data)
        tid = parse_id(task_id)
        if tid is None:
            raise StoreError(f"no task {task_id!r} to attach artifact {name!r} to")
        payload = bytes(data)

        def put(db: Db) -> None:
            if db.one("SELECT 1 FROM tasks WHERE id = ?", (tid,)) is None:
                raise StoreError(f"no task {tid} to attach artifact {name!r} to")
            _put_artifact(db, tid, name, payload, now)

        await self._transact(put, write=True)

    async def get_artifact(self, task_id: str, name: str) -> bytes | None:
        tid = parse_id(task_id)
        if tid is None:
            return None
        rows = await self._statement("SELECT data FROM artifacts WHERE task_id = ? AND name = ?", (tid, name))
        return bytes(rows[0][0]) if rows else None


def _check_artifact(name: str, data: bytes) -> None:
    if not name or len(name) > MAX_ARTIFACT_NAME:
        raise ValueError(f"an artifact name has 1 to {MAX_ARTIFACT_NAME} characters")
    if len(data) > MAX_ARTIFACT_BYTES:
        raise StoreError(f"artifact {name!r} has {len(data)} bytes, more than the limit of {MAX_ARTIFACT_BYTES}")


def _put_artifact(db: Db, tid: str, name: str, payload: bytes, now: float) -> None:
    db.run(
        "INSERT INTO artifacts (task_id, name, data, size, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (task_id, name) DO UPDATE SET data = excluded.data, size = excluded.size, "
        "created_at = excluded.created_at",
        (tid, name, payload, len(payload), now),
    )


def _fence_holds(db: Db, fence: Fence, now: float) -> bool:
    """Whether ``fence``'s lease holds at ``now``; a no-op write, so that it also locks the lease row
    for the rest of the transaction and a concurrent acquisition waits for (then re-checks after) it."""
    return db.run(
        "UPDATE swarm_lease SET expires_at = expires_at WHERE swarm = ? AND term = ? AND holder = ? AND expires_at > ?",
        (fence.swarm, fence.term, fence.holder, now),
    ) == 1


# What finish sets. The lease owner stays as a record of who ran the winning attempt.
FINISH_ASSIGNMENTS = "state = ?, result = ?, error = ?, finished_at = ?, updated_at = ?, lease_expires_at = NULL"


def _finish_params(state: State, result: dict[str, Any] | None, error: str | None, now: float) -> tuple[Any, ...]:
    return (State(state).value, dump_json(result), error, now, now)


def _finish_condition(state: State) -> str:
    """What finish also requires: a cancelled result only where a cancel was requested."""
    return "cancel_requested" if State(state) is State.CANCELLED else ""


# What a claim sets. progress belongs to an attempt: a new attempt starts without one.
CLAIM_ASSIGNMENTS = (
    "state = 'running', attempts = attempts + 1, lease_owner = ?, lease_expires_at = {now} + ?, started_at = ?, "
    "updated_at = ?, progress = NULL"
)


def _claim(db: Db, tid: str, worker: str, now: float, lease_seconds: float, moves: list[tuple[str, str, str]]) -> Task | None:
    """``claim`` inside a transaction; the move it made is appended to ``moves``."""
    # A pending task is claimed too: its message is what the worker holds, so it was
    # published; only the API's "mark queued" has not landed yet. Queued first: the usual case.
    # Queued once more at the end: the API may mark it queued between the first two statements
    # (each sees the latest committed row), and pending -> queued happens only once.
    for before in (State.QUEUED.value, State.PENDING.value, State.QUEUED.value):
        row = db.one(
            f"UPDATE tasks SET {CLAIM_ASSIGNMENTS} WHERE id = ? AND state = ? RETURNING {TASK_COLUMNS}",
            (worker, lease_seconds, now, now, tid, before),
        )
        if row is not None:
            task = task_from_row(row)
            if task.attempts > 1:  # only an earlier attempt can have left artifacts (a checkpoint)
                task = task_from_row(row, _artifact_names(db, tid))
            moves.append((task.kind, before, State.RUNNING.value))
            return task
    return None


def _apply_stepwise(
    db: Db, ops: Sequence[Op], tids: list[str | None], now: float, moves: list[tuple[str, str, str]]
) -> list[Task | None | bool]:
    """``apply`` one step at a time, in task id order (so two groups cannot deadlock)."""
    out: list[Task | None | bool] = [None] * len(ops)
    for i in sorted(range(len(ops)), key=lambda i: ops[i].task_id):
        op, tid = ops[i], tids[i]
        if isinstance(op, ClaimOp):
            out[i] = None if tid is None else _claim(db, tid, op.worker, now, op.lease_seconds, moves)
        elif isinstance(op, FinishUnclaimedOp):
            out[i] = tid is not None and tid in _finish_unclaimed(db, [(tid, op)], now, moves)
        else:
            out[i] = tid is not None and _transition(
                db, tid, FINISH_ASSIGNMENTS, _finish_params(op.state, op.result, op.error, now), op.attempt,
                op.worker, moves, _finish_condition(op.state),
            ) is not None
    return out


def _apply_together(
    db: Db, ops: Sequence[Op], tids: list[str | None], now: float, moves: list[tuple[str, str, str]]
) -> list[Task | None | bool]:
    """``apply`` of a group that names each task at most once: one claim statement (per worker and
    lease length: one in practice), one statement of unclaimed finishes, then one finish statement.

    Lock order: each statement locks its rows in task id order. A claim or an unclaimed finish
    locks only rows it sees pending or queued and a finish only rows it sees running, and every
    group takes the waiting rows before the running ones, so no two groups can each hold a row the
    other waits for. A group with both claims and unclaimed finishes first locks all their rows
    in one id order (two statements, each in order, could interleave with another group's two)."""
    out: list[Task | None | bool] = [None if isinstance(op, ClaimOp) else False for op in ops]
    claims: dict[tuple[str, float], list[tuple[str, int]]] = {}
    finishes: list[tuple[str, int, FinishOp]] = []
    unclaimed: list[tuple[str, int, FinishUnclaimedOp]] = []
    for i, (op, tid) in enumerate(zip(ops, tids)):
        if tid is None:
            continue
        if isinstance(op, ClaimOp):
            claims.setdefault((op.worker, float(op.lease_seconds)), []).append((tid, i))
        elif isinstance(op, FinishUnclaimedOp):
            unclaimed.append((tid, i, op))
        else:
            finishes.append((tid, i, op))
    if unclaimed and claims and db.dialect.locks_rows:
        waiting = sorted([tid for tid, _, _ in unclaimed] + [tid for group in claims.values() for tid, _ in group])
        db.rows(f"SELECT id FROM tasks WHERE id IN {_in_list(len(waiting))} ORDER BY id FOR UPDATE", waiting)
    # One row alone takes the plain statement of claim or finish: PostgreSQL plans it for less than the join.
    for (worker, lease_seconds), group in claims.items():
        if len(group) == 1:
            ((tid, i),) = group
            out[i] = _claim(db, tid, worker, now, lease_seconds, moves)
            continue
        claimed = _claim_many(db, sorted(tid for tid, _ in group), worker, lease_seconds, now, moves)
        for tid, i in group:
            out[i] = claimed.get(tid)
    if unclaimed:
        unclaimed.sort(key=lambda u: u[0])
        recorded = _finish_unclaimed(db, [(tid, op) for tid, _, op in unclaimed], now, moves)
        for tid, i, _ in unclaimed:
            out[i] = tid in recorded
    if len(finishes) == 1:
        ((tid, i, op),) = finishes
        out[i] = _transition(
            db, tid, FINISH_ASSIGNMENTS, _finish_params(op.state, op.result, op.error, now), op.attempt, op.worker,
            moves, _finish_condition(op.state),
        ) is not None
    elif finishes:
        finishes.sort(key=lambda f: f[0])
        won = _finish_many(db, [(tid, op) for tid, _, op in finishes], now, moves)
        for tid, i, _ in finishes:
            out[i] = tid in won
    return out


_CLAIMABLE = "('queued', 'pending')"  # a pending task's message was published too: see _claim
# A task's state where a statement finds its rows by a list of ids: as an expression, which no index
# covers, so that PostgreSQL takes the primary key. With statistics gathered while few tasks were in
# that state, it scanned a (state, ...) index instead, reading every entry that state ever had (the
# dead ones too): a thousand rows and more per claim or finish in a run of a few thousand tasks.
_STATE_BY_ID = "(tasks.state || '')"


def _claim_many(
    db: Db, tids: list[str], worker: str, lease_seconds: float, now: float, moves: list[tuple[str, str, str]]
) -> dict[str, Task]:
    """Claim the tasks ``tids`` (sorted) for ``worker``: the ones claimed, by id.

    Each move is counted from the state the claim found, which is the task's latest: PostgreSQL
    reads it under the row lock in the same statement (the API may mark a task queued until then);
    SQLite's transaction holds the database's write lock, so nothing changes between two statements."""
    ids = _in_list(len(tids))
    set_params = (worker, lease_seconds, now, now)
    if db.dialect.locks_rows:
        columns = ", ".join(f"tasks.{c}" for c in TASK_COLUMNS.split(", "))
        rows = db.rows(
            f"WITH old AS (SELECT id, state FROM tasks WHERE id IN {ids} AND {_STATE_BY_ID} IN {_CLAIMABLE} "
            f"ORDER BY id FOR UPDATE) UPDATE tasks SET {CLAIM_ASSIGNMENTS} FROM old "
            f"WHERE tasks.id = old.id AND {_STATE_BY_ID} IN {_CLAIMABLE} RETURNING old.state, {columns}",
            (*tids, *set_params),
        )
        found = [(row[0], row[1:]) for row in rows]
    else:
        found_before = db.rows(f"SELECT id, state FROM tasks WHERE id IN {ids} AND state IN {_CLAIMABLE}", tids)
        before = {str(r[0]): r[1] for r in found_before}
        if not before:
            return {}
        rows = db.rows(
            f"UPDATE tasks SET {CLAIM_ASSIGNMENTS} WHERE id IN {_in_list(len(before))} AND state IN {_CLAIMABLE} "
            f"RETURNING {TASK_COLUMNS}",
            (*set_params, *before),
        )
        found = [(before[str(row[0])], row) for row in rows]
    tasks = {str(row[0]): task_from_row(row) for _, row in found}
    again = sorted(tid for tid, task in tasks.items() if task.attempts > 1)  # only those can have artifacts
    if again:
        names: dict[str, list[str]] = {}
        rows = db.rows(f"SELECT task_id, name FROM artifacts WHERE task_id IN {_in_list(len(again))}", again)
        for task_id, name in rows:
            names.setdefault(str(task_id), []).append(name)
        for tid in again:
            tasks[tid] = dataclasses.replace(tasks[tid], artifacts=sorted(names.get(tid, [])))
    for old_state, row in found:
        moves.append((row[1], old_state, State.RUNNING.value))
    return tasks


def _finish_many(
    db: Db, finishes: list[tuple[str, FinishOp]], now: float, moves: list[tuple[str, str, str]]
) -> set[str]:
    """Every ``finish`` of ``finishes`` (sorted by task id, each task once) in one statement, with
    each one's conditions; the ids of those that won."""
    d = db.dialect
    values = ", ".join(f"(CAST(? AS {d.uuid_type}), CAST(? AS INTEGER), ?, ?, ?, ?)" for _ in finishes)
    params: list[Any] = []
    for tid, op in finishes:
        params += (tid, op.attempt, op.worker, State(op.state).value, dump_json(op.result), op.error)
    rows = db.rows(
        f"WITH v (id, attempt, worker, state, result, error) AS (VALUES {values}) "
        f"UPDATE tasks SET state = v.state, result = CAST(v.result AS {d.json_type}), error = v.error, "
        "finished_at = ?, updated_at = ?, lease_expires_at = NULL "
        f"FROM v WHERE tasks.id = v.id AND {_STATE_BY_ID} = 'running' AND tasks.attempts = v.attempt "
        "AND (v.worker IS NULL OR tasks.lease_owner = v.worker) "
        f"AND (v.state <> '{State.CANCELLED.value}' OR tasks.cancel_requested) "  # as _finish_condition
        "RETURNING tasks.id, tasks.kind, tasks.state",
        (*params, now, now),
    )
    for _, kind, state in rows:
        moves.append((kind, State.RUNNING.value, state))
    return {str(r[0]) for r in rows}


def _finish_unclaimed(
    db: Db, items: list[tuple[str, FinishUnclaimedOp]], now: float, moves: list[tuple[str, str, str]]
) -> set[str]:
    """Every FinishUnclaimedOp of ``items`` (sorted by task id, each task once): the ids recorded.

    The result is the task's next attempt, written as a claim and a finish would have left it.
    PostgreSQL: one statement, which locks the rows still waiting in id order and reads the state
    each had under the lock (for the counts); SQLite's transaction holds the write lock, so a read
    and then one update per task see the same rows."""
    d = db.dialect
    if d.locks_rows:
        with_list, update, params = _locked_unclaimed_update(d, items, now)
        rows = db.rows(f"WITH {with_list} {update}", params)
        for old_state, _, kind, state in rows:
            moves.append((kind, old_state, state))
        return {str(r[1]) for r in rows}
    ids = _in_list(len(items))
    before = {
        str(r[0]): r[1]
        for r in db.rows(f"SELECT id, state FROM tasks WHERE id IN {ids} AND state IN {_CLAIMABLE}", [t for t, _ in items])
    }
    recorded: set[str] = set()
    for tid, op in items:
        if tid not in before:
            continue
        row = db.one(
            "UPDATE tasks SET state = ?, result = ?, error = ?, attempts = attempts + 1, lease_owner = ?, "
            "lease_expires_at = NULL, started_at = ?, finished_at = ?, updated_at = ?, progress = NULL "
            f"WHERE id = ? AND state IN {_CLAIMABLE} AND spec = ? RETURNING kind, state",
            (State(op.state).value, dump_json(op.result), op.error, op.worker, float(op.started_at), now, now, tid,
             dump_json(op.spec)),
        )
        if row is not None:
            moves.append((row[0], before[tid], row[1]))
            recorded.add(tid)
    return recorded


def _locked_unclaimed_update(
    d: Dialect, items: list[tuple[str, FinishUnclaimedOp]], now: float, *, with_row: bool = False
) -> tuple[str, str, list[Any]]:
    """``_finish_unclaimed``'s statement where rows are locked, in two parts, for a statement to
    put together: its WITH list (no WITH keyword) and its UPDATE, then the parameters of both, in
    that order. The UPDATE locks the rows of ``items`` (sorted by task id, each task once) still
    waiting, in id order, and returns (old state, id, kind, new state) for each task recorded,
    and with ``with_row`` the task as recorded too (TASK_ROW_JSON)."""
    values = ", ".join(f"(CAST(? AS {d.uuid_type}), ?, ?, ?, ?, ?, CAST(? AS DOUBLE PRECISION))" for _ in items)
    params: list[Any] = []
    for tid, op in items:
        params += (tid, op.worker, dump_json(op.spec), State(op.state).value, dump_json(op.result), op.error,
                   float(op.started_at))
    tids = [tid for tid, _ in items]
    return (
        f"v (id, worker, spec, state, result, error, started) AS (VALUES {values}), "
        f"old AS (SELECT id, state FROM tasks WHERE id IN {_in_list(len(tids))} AND {_STATE_BY_ID} IN {_CLAIMABLE} "
        "ORDER BY id FOR UPDATE)",
        f"UPDATE tasks SET state = v.state, result = CAST(v.result AS {d.json_type}), error = v.error, "
        "attempts = tasks.attempts + 1, lease_owner = v.worker, lease_expires_at = NULL, started_at = v.started, "
        "finished_at = ?, updated_at = ?, progress = NULL FROM old, v "
        f"WHERE tasks.id = old.id AND v.id = old.id AND {_STATE_BY_ID} IN {_CLAIMABLE} "
        f"AND tasks.spec = CAST(v.spec AS {d.json_type}) "
        "RETURNING old.state, tasks.id, tasks.kind, tasks.state" + (f", {TASK_ROW_JSON}" if with_row else ""),
        [*params, *tids, now, now],
    )


def _finish_unclaimed_counted(
    d: Dialect, items: list[tuple[str, FinishUnclaimedOp]], now: float, channel: str | None
) -> tuple[str, list[Any]]:
    """One statement that does all ``apply`` does for a group of unclaimed finishes alone, where a
    WITH clause may write and rows are locked: records ``items`` (sorted by task id, each task
    once) as ``_finish_unclaimed`` does, adds their moves to task_counts as ``_count_moves`` does,
    and NOTIFYs ``channel`` (unless None) of each task recorded: one notification per task, which
    carries the task as recorded (TASK_ROW_JSON; its id alone when that is MAX_ROW_NOTIFY_BYTES
    or longer). Its parameters come with it.

    The statement returns a row per task recorded, its id; none when none was (and then no
    notification goes out).

    The counts: each recorded task takes one from its (old state, kind) and adds one to its
    (new state, kind), summed per (state, kind) (an upsert may not meet one row twice in a
    statement) and left out where the sum is nought; one shard row per statement chosen at
    random, written in (state, kind) order by code point as ``_count`` writes them (COLLATE "C":
    the database's own collation may order kinds otherwise; CockroachDB takes it from 22.2 on, and
    compares strings by their bytes anyway), so that this statement and a transaction counting in
    ``_count`` lock shard rows in the same order."""
    with_list, update, params = _locked_unclaimed_update(d, items, now, with_row=channel is not None)
    done = "done (before, id, kind, after, task)" if channel is not None else "done (before, id, kind, after)"
    sql = (
        f"WITH {with_list}, {done} AS ({update}), "
        "moves (state, kind, n) AS (SELECT before, kind, -1 FROM done UNION ALL SELECT after, kind, 1 FROM done), "
        # A WITH clause that writes runs whether or not the statement reads it.
        "counted AS (INSERT INTO task_counts (state, kind, shard, n) "
        "SELECT state, kind, CAST(? AS INTEGER), SUM(n) FROM moves GROUP BY state, kind HAVING SUM(n) <> 0 "
        'ORDER BY state COLLATE "C", kind COLLATE "C" '
        "ON CONFLICT (state, kind, shard) DO UPDATE SET n = task_counts.n + excluded.n) "
        # A row per task recorded, and for each a notification that carries the task as recorded
        # (its id alone when too long): a long poll answers from it, with no read of its own.
        "SELECT CAST(id AS TEXT)" + (
            f", pg_notify(?, CASE WHEN octet_length(CAST(task AS TEXT)) < {MAX_ROW_NOTIFY_BYTES} "
            "THEN CAST(task AS TEXT) ELSE CAST(id AS TEXT) END)" if channel is not None else ""
        ) + " FROM done ORDER BY id"
    )
    params.append(random.randrange(COUNT_SHARDS))
    if channel is not None:
        params.append(channel)
    return sql, params


def _transition(
    db: Db, tid: str, assignments: str, set_params: Sequence[Any], attempt: int, worker: str | None,
    moves: list[tuple[str, str, str]], also: str = "", then: Callable[[Db, str], None] | None = None,
) -> str | None:
    """One conditional UPDATE of a running attempt inside a transaction; its new state, or None.

    ``also`` adds a condition; ``then(db, tid)`` runs in the same transaction once the update matched."""
    where = "id = ? AND state = 'running' AND attempts = ?" + (" AND lease_owner = ?" if worker is not None else "")
    where += f" AND {also}" if also else ""
    where_params = (tid, attempt) + ((worker,) if worker is not None else ())
    row = db.one(f"UPDATE tasks SET {assignments} WHERE {where} RETURNING state, kind", (*set_params, *where_params))
    if row is None:
        return None
    if then is not None:
        then(db, tid)
    moves.append((row[1], State.RUNNING.value, row[0]))
    return row[0]


def _announce(db: Db, channel: str, tids: list[str | None]) -> None:
    """NOTIFY ``channel`` of ``tids`` (comma-separated, a bounded number to a message: PostgreSQL
    takes payloads under 8,000 bytes), sent to its listeners when this transaction commits."""
    ids = [tid for tid in tids if tid is not None]
    for i in range(0, len(ids), IDS_PER_NOTIFY):
        db.run("SELECT pg_notify(?, ?)", (channel, ",".join(ids[i:i + IDS_PER_NOTIFY])))


def _counted(db: Db, fn: Callable[[list[tuple[str, str, str]]], T]) -> T:
    """Run ``fn(moves)`` and then count every move it recorded, in one task_counts write."""
    moves: list[tuple[str, str, str]] = []
    out = fn(moves)
    _count_moves(db, moves)
    return out


def _count(db: Db, deltas: collections.Counter[tuple[str, str]] | dict[tuple[str, str], int]) -> None:
    """Add ``deltas`` ((state, kind) -> change) to task_counts, in the caller's transaction.

    One shard row per transaction, chosen at random, and the rows in a fixed
    order: two transactions lock shard rows in the same order, so they may
    wait for each other but never deadlock."""
    if any(deltas.values()):
        db.run(*_count_upsert(deltas))


def _count_upsert(
    deltas: collections.Counter[tuple[str, str]] | dict[tuple[str, str], int],
) -> tuple[str, list[Any]]:
    """The statement of ``_count`` and its parameters, for ``deltas`` with at least one change."""
    changes = sorted((key, n) for key, n in deltas.items() if n)
    shard = random.randrange(COUNT_SHARDS)
    return (
        "INSERT INTO task_counts (state, kind, shard, n) VALUES "
        + ", ".join("(?, ?, ?, ?)" for _ in changes)
        + " ON CONFLICT (state, kind, shard) DO UPDATE SET n = task_counts.n + excluded.n",
        [v for (state, kind), n in changes for v in (state, kind, shard, n)],
    )


def _count_moves(db: Db, moves: list[tuple[str, str, str]]) -> None:
    """Count tasks that moved: (kind, old state, new state) each; a task that stayed put changes nothing."""
    deltas: collections.Counter[tuple[str, str]] = collections.Counter()
    for kind, old, new in moves:
        if old != new:
            deltas[(old, kind)] -= 1
            deltas[(new, kind)] += 1
    _count(db, deltas)


def _artifact_names(db: Db, tid: str) -> list[str]:
    # Sorted in Python: PostgreSQL's collation and SQLite's byte order disagree.
    return sorted(r[0] for r in db.rows("SELECT name FROM artifacts WHERE task_id = ?", (tid,)))


def _updated_task(db: Db, tid: str, update: str, params: Sequence[Any]) -> Task | None:
    """Run an UPDATE of task ``tid`` and return the task as it changed, or None when the UPDATE matched nothing."""
    row = db.one(f"{update} RETURNING {TASK_COLUMNS}", params)
    return None if row is None else task_from_row(row, _artifact_names(db, tid))


_INSERT_TASKS = (
    "INSERT INTO tasks (id, kind, spec, state, owner, attempts, max_attempts, created_at, updated_at, "
    "idempotency_key, batch_index, parent_id, published_at) VALUES"
)
_TASK_VALUES = "(?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)"  # one task's row of _INSERT_TASKS

# One task with its artifact names, in one statement: one round trip, and a snapshot of its own.
GET_TASK = (
    f"SELECT {TASK_COLUMNS}, (SELECT {{names_json}} FROM artifacts WHERE artifacts.task_id = tasks.id) "
    "FROM tasks WHERE id = ?"
)


def _task_with_artifacts(row: Sequence[Any]) -> Task:
    """A Task from a row selected as GET_TASK."""
    names = row[-1]
    return task_from_row(row[:-1], [] if names is None else json.loads(names))


def _get(db: Db, tid: str) -> Task | None:
    row = db.one(GET_TASK, (tid,))
    return None if row is None else _task_with_artifacts(row)


def _repeat(db: Db, owner: str, key: str, request_hash: str | None) -> tuple[list[Task], bool]:
    """The answer to a repeated idempotent create: the first request's tasks, as they are now."""
    row = db.one(
        "SELECT request_hash FROM idempotency_keys WHERE owner = ? AND idempotency_key = ?", (owner, key)
    )
    if row is not None and row[0] != request_hash:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different request")
    rows = db.rows(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE owner = ? AND idempotency_key = ? ORDER BY batch_index",
        (owner, key),
    )
    return [task_from_row(r) for r in rows], False
