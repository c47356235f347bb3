"""PostgresTaskStore: the shared store on CockroachDB or PostgreSQL, and the transaction runner it uses.

psycopg's async API needs asyncio, so this module is the edge where trio meets
the sync driver: every transaction runs in a worker thread on a connection from
a ``psycopg_pool.ConnectionPool``, and nothing outside this file knows it. Two
connections are driven from the trio thread itself, through libpq's asynchronous
calls (psycopg's ``pgconn``), where a thread hand-off would be most of the cost:
the lane, for single statements that find tasks by id (a Ki's result, a task
read), and the connection that listens for recorded results.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from typing import Any, TypeVar

import outcome
import psycopg
import trio
from psycopg import pq, sql
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from p2pnn import logs
from p2pnn.store import _schema
from p2pnn.store._sql import POSTGRES, Db, SqlTaskStore, task_from_row
from p2pnn.store.base import AmbiguousCommit, StoreError, StoreUnreachable
from p2pnn.tasks import Task

T = TypeVar("T")
log = logs.get(__name__)

# 40001 serialization_failure: CockroachDB's "restart transaction" and PostgreSQL
# SERIALIZABLE conflicts; 40P01 deadlock_detected. Both roll the whole
# transaction back, so running it again from the start is safe.
RETRYABLE_SQLSTATES: frozenset[str] = frozenset({"40001", "40P01"})
# Two nodes creating the same schema or migrations table at once collide on a
# catalog unique index (23505) or see the table appear (42P07, 42P06); the
# retry then finds the work done.
MIGRATION_RACE_SQLSTATES: frozenset[str] = frozenset({"23505", "42P07", "42P06"})
TX_MAX_ATTEMPTS = 10  # CockroachDB restarts contended transactions; ten failures in a row is a hot spot, not bad luck
TX_BACKOFF_FIRST = 0.005  # seconds; the first retry waits up to this, doubling after each failure (full jitter)
TX_BACKOFF_MAX = 1.0  # seconds; no single back-off waits longer, so a burst of conflicts stays interactive
CONNECT_TIMEOUT = 5.0  # seconds for one TCP+auth handshake (default); a reachable database answers far sooner
STATEMENT_TIMEOUT = 10.0  # seconds one transaction may take (default): the server's statement_timeout and our deadline
DEADLINE_SLACK = 2.0  # the client-side deadline exceeds the server's timeout by this, so the server's error wins
POOL_TIMEOUT = 30.0  # seconds a transaction waits for a free pooled connection before it is an error
CANCEL_TIMEOUT = 5.0  # seconds to deliver a cancel request for an abandoned query
# TCP keepalives and a user timeout, so that a connection whose peer vanished silently (a dead
# host, a dropped link, a partition) errors within about 5 s instead of the kernel's two hours;
# then the pool replaces it, and a principal's lease renewals recover.
KEEPALIVE_IDLE = 2  # seconds of silence before the first probe
KEEPALIVE_INTERVAL = 1  # seconds between probes
KEEPALIVE_COUNT = 3  # unanswered probes before the connection is dead
TCP_USER_TIMEOUT_MS = 5_000  # unacknowledged data older than this kills the connection
# What opens a transaction (run_transaction's ``begin``).
BEGIN = "BEGIN"
# Run first in a relaxed transaction (see SqlTaskStore._transact): PostgreSQL then answers the
# commit without waiting for the WAL flush, which takes milliseconds; a later durable commit flushes it too.
RELAXED_COMMIT = "SET LOCAL synchronous_commit = off"
RELAXED_SESSION = "SET synchronous_commit = off"  # the same for every commit of a connection: the relaxed lane's
# make_durable's one statement. A durable commit waits for the WAL flush up to its own commit
# record, so past every commit before it; but PostgreSQL commits a transaction that wrote no WAL
# without that wait, even one given a transaction id (SELECT pg_current_xact_id() alone is no
# barrier). A row lock is both: it is logged and it assigns an id. KEY SHARE conflicts with nothing
# the store does to that row, and the migrations table has a row wherever the store was opened.
DURABILITY_BARRIER = "SELECT 1 FROM schema_migrations ORDER BY version LIMIT 1 FOR KEY SHARE"
# Server-side prepared statements spare the server parsing and analysing the store's statements on
# every run, but only with a plan made for each run's values: a generic plan made while the tasks
# table was new and small looked tasks up through a (state, ...) index instead of the primary key,
# reading every task in that state on each claim and finish. So a connection prepares its statements
# only once the server took CUSTOM_PLANS_ONLY (PostgreSQL 12+), after this many runs of one statement
# text: the hot ones reach it at once, one-off statements never do.
PREPARE_THRESHOLD = 2
CUSTOM_PLANS_ONLY = "SET plan_cache_mode = force_custom_plan"
# 40003 statement_completion_unknown: CockroachDB lost track of whether a commit happened.
AMBIGUOUS_COMMIT_SQLSTATE = "40003"
# follow_finished's listening connection: how long it waits before connecting again.
LISTEN_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)
# The lane (see _Lane): its statements are planned once, for any values. Only ``keyed`` statements
# go there: they find tasks by id alone, the state hidden from the indexes, so the one plan takes
# the primary key whatever the statistics (the failure PREPARE_THRESHOLD's comment records).
LANE_PLANS = "SET plan_cache_mode = force_generic_plan"
LANE_PREPARED_MAX = 64  # statements prepared on the lane's connection; any more are sent unprepared
# After a lane's connection failed, keyed statements take the pool this long before it is made
# again; each attempt to make it that fails doubles the pause, up to LANE_RETRY_MAX.
LANE_RETRY_SECONDS, LANE_RETRY_MAX = 1.0, 8.0


class _Attempt:
    """One transaction attempt shared between the trio task and its worker thread.

    The lock makes "cancel the query" and "hand the connection back to the pool"
    mutually exclusive, so a cancel can never reach a query that another
    transaction started on the same pooled connection.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None
        self.abandoned = False

    def cancel_in_flight(self) -> None:
        """Runs in a thread of its own: cancel_safe blocks while it reaches the server."""
        with self.lock:
            if self.conn is not None:
                try:
                    self.conn.cancel_safe(timeout=CANCEL_TIMEOUT)
                except psycopg.Error:
                    pass  # the query ends on its own; the connection goes back to the pool either way


def connection_settings(connect_timeout: float, statement_timeout: float) -> dict[str, object]:
    """libpq keyword arguments for every pooled connection (timeouts, keepalives, the server-side statement limit)."""
    return {
        "autocommit": True,
        "connect_timeout": max(1, round(connect_timeout)),  # libpq takes whole seconds
        "application_name": "p2pnn",
        # No server-side prepared statements unless the server plans each run for its values
        # (PostgresTaskStore._configure turns them on where it does; see PREPARE_THRESHOLD).
        "prepare_threshold": None,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        # CockroachDB and PostgreSQL both take statement_timeout as a session option at connect.
        "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
    }


class _Abandoned(Exception):
    """The trio side gave up before this attempt got a connection: do not run it at all."""


def _in_transaction(conn: psycopg.Connection, begin: str, fn: Callable[[psycopg.Connection], T]) -> T:
    """``fn(conn)`` between ``begin`` and COMMIT, on a connection in autocommit mode.

    As ``conn.transaction()`` does, but ``begin`` may be several statements, sent in one message
    (the simple query protocol, hence no parameters).

    Error handling: any exception from ``begin`` or ``fn`` rolls the transaction back and
    propagates; an error of the rollback itself is dropped, as the first error is the one that
    tells what went wrong (a connection left broken is discarded by the pool when it comes back).
    A failed COMMIT raises, as it does from ``conn.transaction()``."""
    try:
        conn.execute(begin, prepare=False)
        out = fn(conn)
    except BaseException:
        try:
            conn.rollback()
        except psycopg.Error:
            pass
        raise
    conn.commit()
    return out


async def _attempt(pool: ConnectionPool, fn: Callable[[psycopg.Connection], T], begin: str | None) -> T:
    state = _Attempt()

    def work() -> T:
        with pool.connection() as conn:
            with state.lock:
                if state.abandoned:
                    raise _Abandoned
                state.conn = conn
            try:
                if begin is None:  # one statement, in autocommit mode: a transaction of its own
                    return fn(conn)
                return _in_transaction(conn, begin, fn)
            finally:
                with state.lock:
                    state.conn = None

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except psycopg.OperationalError:
        # Connections are not checked on checkout (that would cost a round trip per transaction):
        # when one turns out dead, the pool checks every idle one before this error is reported,
        # so the next transactions get live ones (a broken connection never goes back in the pool).
        with trio.CancelScope(shield=True), trio.move_on_after(CONNECT_TIMEOUT):
            try:
                await trio.to_thread.run_sync(pool.check, abandon_on_cancel=True)
            except psycopg.Error:
                pass  # the pool is closing, or the server is gone: the caller sees the first error
        raise
    except trio.Cancelled:
        with state.lock:
            state.abandoned = True
        # The abandoned thread's query gets QueryCanceled, its transaction rolls
        # back and its connection returns to the pool idle; nobody waits for it.
        trio.lowlevel.start_thread_soon(state.cancel_in_flight, lambda _outcome: None)
        raise


async def run_transaction(
    pool: ConnectionPool,
    fn: Callable[[psycopg.Connection], T],
    *,
    max_attempts: int = TX_MAX_ATTEMPTS,
    retry_sqlstates: Iterable[str] = RETRYABLE_SQLSTATES,
    deadline: float | None = None,
    begin: str | None = BEGIN,
) -> T:
    """Run ``fn(conn)`` in one transaction on a pooled connection in a worker thread; return its result.

    ``begin``: the statements, without parameters, that open the transaction, sent together in
    one round trip ("BEGIN; SET LOCAL ...", for one). None runs ``fn`` without BEGIN and COMMIT,
    saving both round trips; only for an ``fn`` that runs a single statement, which the
    connection's autocommit mode then makes a transaction of its own (several would each commit
    on their own, and a read on CockroachDB would no longer see one snapshot).

    ``fn`` must be safe to run again from the start: a transaction that fails
    with a SQLSTATE in ``retry_sqlstates`` (by default serialization failure
    40001 and deadlock 40P01) is rolled back and run again, at most
    ``max_attempts`` times, after a jittered, doubling back-off.

    Resource handling: the connection is back in the pool, idle, when this
    returns or raises. On cancellation the worker thread is abandoned and its
    query cancelled server-side; its transaction rolls back.

    Error handling: driver errors, and running out of attempts, raise StoreError
    (chained to the psycopg error); an attempt that takes longer than
    ``deadline`` seconds (a database that stopped answering, a stalled link) is
    abandoned and raises StoreError; SQLSTATE 40003 raises AmbiguousCommit;
    exceptions raised by ``fn`` itself propagate unchanged.
    """
    retryable = frozenset(retry_sqlstates)
    for attempt in range(1, max_attempts + 1):
        try:
            if deadline is None:
                return await _attempt(pool, fn, begin)
            with trio.fail_after(deadline):
                return await _attempt(pool, fn, begin)
        except trio.TooSlowError:
            raise StoreUnreachable(f"the database did not answer within {deadline:g} s") from None
        except PoolTimeout as exc:
            raise StoreUnreachable(f"no database connection available: {exc}") from exc
        except psycopg.Error as exc:
            if exc.sqlstate not in retryable:
                raise store_error(exc) from exc
            if attempt == max_attempts:
                raise StoreError(
                    f"transaction still conflicting after {max_attempts} attempts (SQLSTATE {exc.sqlstate}): {exc}"
                ) from exc
        await trio.sleep(random.uniform(0, min(TX_BACKOFF_MAX, TX_BACKOFF_FIRST * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")  # the loop returns or raises


def store_error(exc: psycopg.Error) -> StoreError:
    """The StoreError that tells of a driver error that is not to be retried."""
    if exc.sqlstate == AMBIGUOUS_COMMIT_SQLSTATE:
        return AmbiguousCommit(f"commit outcome unknown (SQLSTATE 40003): {exc}")
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnreachable(f"database unreachable ({exc.sqlstate or type(exc).__name__}): {exc}")
    return StoreError(f"database error ({exc.sqlstate or type(exc).__name__}): {exc}")


@lru_cache(maxsize=256)  # as _sql's rendering: a fixed set of statements, IN and VALUES lists of a few lengths
def _numbered(text: str) -> bytes:
    """The store's SQL as Db runs it on PostgreSQL, with libpq's numbered placeholders ($1, $2, ...)
    for psycopg's ``%s`` (and ``%%`` a literal ``%``)."""
    parts = POSTGRES.sql(text).split("%s")
    numbered = "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, 1))
    return numbered.replace("%%", "%").encode()


async def _answer(conn: psycopg.Connection) -> pq.PGresult:
    """Send what libpq holds for ``conn`` and read every result of the one command sent: the last.

    Runs in the trio thread: it waits for the socket, never in a blocking call. Error handling: an
    error the server answered raises as psycopg raises it (the connection stays usable); a broken
    connection raises psycopg.OperationalError."""
    pgconn, fd = conn.pgconn, conn.pgconn.socket
    while pgconn.flush():  # 1 while some of the command is still to be sent
        await trio.lowlevel.wait_writable(fd)
    pgconn.consume_input()
    while pgconn.is_busy():
        await trio.lowlevel.wait_readable(fd)
        pgconn.consume_input()
    last: pq.PGresult | None = None
    error: psycopg.Error | None = None
    while (result := pgconn.get_result()) is not None:
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        last = result
    if error is not None:
        raise error
    if last is None:
        raise psycopg.OperationalError("the server sent no result")
    return last


def _close_from_trio(conn: psycopg.Connection) -> None:
    """Close a connection whose socket trio may have waited on (trio is told first, as it asks)."""
    if not conn.closed:
        trio.lowlevel.notify_closing(conn.pgconn.socket)
        conn.close()


class _Lane:
    """A connection of the store's own, driven from the trio thread: single ``keyed`` statements run
    there with no thread hand-off (about 0.2 ms each way on a busy 2-core host, a quarter of a Ki's
    result) and are planned once (LANE_PLANS). One statement at a time: while ``busy``, others take
    the pool.

    Resource handling: a statement interrupted (cancelled, timed out) or whose connection failed
    closes the connection, as what the server made of it is unknown; the store then makes another
    (_LaneSlot.failed). Error handling: an error the server answered raises as psycopg
    raises it and the lane stays usable; any other leaves it ``broken``."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.busy = False
        self.broken = False
        self.retired = False  # closed by its store while a statement ran: closes once that ends
        self._prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (SQL, parameter types) -> name

    def close(self) -> None:
        self.broken = True
        _close_from_trio(self.conn)

    def retire(self) -> None:
        """Close now, or once the statement running ends."""
        self.retired = True
        if not self.busy:
            self.close()

    async def rows(self, text: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert not self.busy and not self.broken
        self.busy = True
        settled = False  # the statement's results are all read: the connection is ready for the next
        try:
            out = await self._rows(text, params)
            settled = True
            return out
        except psycopg.Error as exc:
            settled = not isinstance(exc, psycopg.OperationalError) and exc.sqlstate is not None
            raise
        finally:
            self.busy = False
            if not settled or self.retired:
                self.close()

    async def _rows(self, text: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        pgconn = self.conn.pgconn
        adapt = Transformer(self.conn)
        values = adapt.dump_sequence(params, [PyFormat.AUTO] * len(params))
        types = tuple(adapt.types)
        name = self._prepared.get((text, types))
        if name is None and len(self._prepared) < LANE_PREPARED_MAX:
            name = f"p2pnn_lane_{len(self._prepared)}".encode()
            pgconn.send_prepare(name, _numbered(text), param_types=types)
            await _answer(self.conn)
            self._prepared[(text, types)] = name
        if name is None:
            pgconn.send_query_params(_numbered(text), values, param_types=types, param_formats=adapt.formats)
        else:
            pgconn.send_query_prepared(name, values, param_formats=adapt.formats)
        result = await _answer(self.conn)
        adapt.set_pgresult(result)
        return adapt.load_rows(0, result.ntuples, tuple) if result.ntuples else []


class _LaneSlot:
    """Where a store keeps one lane: the lane while it works, and when to make it again once lost.

    Resource handling: ``close`` closes the lane (once its statement ends, if one runs) and any
    connection made for it later. Error handling: a lane that cannot be made is logged and tried
    again after LANE_RETRY_SECONDS, doubling up to LANE_RETRY_MAX while it keeps failing (a
    database down); its statements take the pool meanwhile."""

    def __init__(self, connect: Callable[[], psycopg.Connection | None]) -> None:
        self._connect = connect  # blocking: in a worker thread; None where the server takes no lane
        self.lane: _Lane | None = None
        self._due = math.inf  # trio time from which a lost lane is made again; inf: never
        self._pause = LANE_RETRY_SECONDS  # before the next attempt to make it, once one failed
        self._opening = False
        self._closed = False

    async def open(self) -> None:
        try:
            conn = await trio.to_thread.run_sync(self._connect)
        except psycopg.Error as exc:  # the pool's connections worked: a passing fault, made good later
            self._lost(exc)
            return
        if conn is not None:
            self.lane, self._due = _Lane(conn), trio.current_time()

    def free(self) -> _Lane | None:
        """The lane if it is there and idle. A lane lost is made again meanwhile, once it is due."""
        if self.lane is None:
            self._reopen()
        return None if self.lane is None or self.lane.busy else self.lane

    def failed(self, lane: _Lane) -> None:
        if self.lane is lane:
            self.lane, self._due = None, trio.current_time() + LANE_RETRY_SECONDS

    def close(self) -> None:
        self._closed = True
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.retire()

    def _lost(self, exc: Exception) -> None:
        log.warning("store.lane_failed", error=str(exc), retry_in=self._pause)
        self._due = trio.current_time() + self._pause
        self._pause = min(self._pause * 2, LANE_RETRY_MAX)

    def _reopen(self) -> None:
        if self._opening or self._closed or trio.current_time() < self._due:
            return
        self._opening = True
        token = trio.lowlevel.current_trio_token()

        def opened(result: outcome.Outcome) -> None:  # in trio
            self._opening = False
            if isinstance(result, outcome.Error):
                self._lost(result.error)
            elif self._closed or self.lane is not None:
                if result.value is not None:
                    result.value.close()
            elif result.value is None:
                self._due = math.inf  # the server takes no lane
            else:
                self.lane, self._pause = _Lane(result.value), LANE_RETRY_SECONDS

        def deliver(result: outcome.Outcome) -> None:  # in the worker thread
            try:
                token.run_sync_soon(opened, result)
            except trio.RunFinishedError:
                if isinstance(result, outcome.Value) and result.value is not None:
                    result.value.close()

        trio.lowlevel.start_thread_soon(self._connect, deliver)


def _finished_in(payload: str) -> list[tuple[str, Task | None]]:
    """The tasks a notification of recorded results names: a task row (TASK_ROW_JSON), read as the
    store reads one, or task ids joined by commas (the task to be read). Error handling: a payload
    that is neither (nothing of this store sends one) names nothing."""
    if payload.startswith("["):
        try:
            task = task_from_row(json.loads(payload))
        except (ValueError, TypeError, KeyError):
            return []
        return [(task.id, task)]
    return [(tid, None) for tid in payload.split(",") if tid]


def describe_url(url: str) -> str:
    """The database address without its password, for error messages and logs."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable database URL>"
    host = params.get("host", "localhost")
    return f"{params.get('user', '')}@{host}:{params.get('port', 5432)}/{params.get('dbname', '')}"


class PostgresTaskStore(SqlTaskStore):
    """Tasks in CockroachDB or PostgreSQL, in the tables of one schema.

    Resource handling: ``open`` starts a pool of up to ``pool_size``
    connections, creates ``schema`` if it is missing and migrates it; every
    pooled connection has its ``search_path`` set to that schema, and prepares the statements it
    runs repeatedly where the server plans each run afresh (see PREPARE_THRESHOLD). ``close``
    closes the pool and its threads. A transaction of one statement (``_statement``) runs without
    BEGIN and COMMIT, in one round trip: in autocommit mode a single statement is a transaction of its own.

    Error handling: an unreachable database raises StoreError from ``open``
    after ``connect_timeout``; every other driver error raises StoreError, and
    so does a transaction that takes longer than ``statement_timeout`` (the
    server cancels it; if the server cannot be reached, the client gives up
    DEADLINE_SLACK later).
    Serialization failures are retried (see run_transaction).
    """

    _dialect = POSTGRES

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        pool_size: int = 4,
        connect_timeout: float = CONNECT_TIMEOUT,
        statement_timeout: float = STATEMENT_TIMEOUT,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if connect_timeout <= 0 or statement_timeout <= 0:
            raise ValueError("connect_timeout and statement_timeout must be positive")
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._pool: ConnectionPool | None = None
        self._relaxed_commit: str | None = None  # what makes a transaction relaxed; None: the server has no such setting
        self._lanes: dict[bool, _LaneSlot] = {}  # relaxed or not -> its lane (see _statement)

    @property
    def deadline(self) -> float:
        """Seconds one transaction attempt may take before it is abandoned."""
        return self._statement_timeout + DEADLINE_SLACK

    def _configure(self, conn: psycopg.Connection) -> None:
        # JSON comes back as text, to be decoded by the code SQLite's rows share.
        conn.adapters.register_loader("jsonb", TextLoader)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._schema)))
        try:
            conn.execute(CUSTOM_PLANS_ONLY)
        except psycopg.Error:
            return  # a server without the setting: statements stay unprepared on this connection
        conn.prepare_threshold = PREPARE_THRESHOLD

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = ConnectionPool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            kwargs=connection_settings(self._connect_timeout, self._statement_timeout),
            configure=self._configure,
            timeout=POOL_TIMEOUT,
            name=f"p2pnn-store-{self._schema}",
            open=False,
        )
        try:
            await trio.to_thread.run_sync(partial(pool.open, wait=True, timeout=self._connect_timeout))
            await run_transaction(
                pool, self._migrate, retry_sqlstates=RETRYABLE_SQLSTATES | MIGRATION_RACE_SQLSTATES
            )
        except PoolTimeout as exc:
            await trio.to_thread.run_sync(pool.close)
            raise StoreUnreachable(f"cannot reach the database at {describe_url(self._url)}: {exc}") from exc
        except BaseException:
            await trio.to_thread.run_sync(pool.close)
            raise
        self._pool = pool
        self._relaxed_commit = await self._probe_relaxed_commit()
        self._finished_channel = await self._probe_notify()
        self._lanes = {False: _LaneSlot(self._lane_connection)}
        if self._relaxed_commit is not None:
            self._lanes[True] = _LaneSlot(partial(self._lane_connection, relaxed=True))
        for slot in self._lanes.values():
            await slot.open()

    def _lane_connection(self, relaxed: bool = False) -> psycopg.Connection | None:
        """A new connection for a lane (in a worker thread), or None where the server cannot plan a
        statement once for all runs (CockroachDB has no plan_cache_mode): keyed statements then take
        the pool. ``relaxed``: every commit there is relaxed (see SqlTaskStore._transact). Error
        handling: a failure to connect raises psycopg.Error."""
        conn = psycopg.connect(self._url, **connection_settings(self._connect_timeout, self._statement_timeout))
        try:
            self._configure(conn)
            conn.execute(LANE_PLANS)
            if relaxed:
                conn.execute(RELAXED_SESSION)
        except psycopg.Error:
            conn.close()
            return None
        return conn

    async def _probe_relaxed_commit(self) -> str | None:
        """``SET LOCAL synchronous_commit = off`` where the server takes it (PostgreSQL), else None
        (a server without that setting; also when the trial fails for any other reason: the
        only cost is that a relaxed transaction then waits for its commit to reach the disk)."""
        try:
            await self._transact(lambda db: db.run(RELAXED_COMMIT), write=True)
        except StoreError:
            return None
        return RELAXED_COMMIT

    async def _probe_notify(self) -> str | None:
        """The channel ``apply`` notifies of recorded results, where the server has NOTIFY
        (PostgreSQL), else None (CockroachDB): one per schema, as the tasks are. A channel name is
        an identifier (63 bytes at most), so it holds a digest of the schema name, not the name."""
        channel = "p2pnn_finished_" + hashlib.sha256(self._schema.encode()).hexdigest()[:20]
        try:
            await self._statement("SELECT pg_notify(?, '')", (channel,))
        except StoreError:
            return None
        return channel

    async def follow_finished(
        self, on_finished: Callable[[list[tuple[str, Task | None]]], None], *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """As TaskStore's, through LISTEN on a connection of its own (outside the pool), read from the
        trio thread: a notification reaches ``on_finished`` with no thread hand-off.

        Resource handling: cancelling closes the connection. Error handling: a lost connection is
        logged and made again (backing off, LISTEN_RETRY_SECONDS); results recorded meanwhile are
        not announced, and long polls find them by reading the store."""
        channel = self._finished_channel
        task_status.started()
        if channel is None:
            return
        settings = connection_settings(self._connect_timeout, self._statement_timeout)

        def listening() -> psycopg.Connection:  # in a worker thread
            conn = psycopg.connect(self._url, **settings)
            try:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            except BaseException:
                conn.close()
                raise
            return conn

        failures = 0
        while True:
            conn = None
            pause = LISTEN_RETRY_SECONDS[min(failures, len(LISTEN_RETRY_SECONDS) - 1)]
            try:
                conn = await trio.to_thread.run_sync(listening, abandon_on_cancel=True)
                failures = 0
                pgconn, encoding = conn.pgconn, conn.info.encoding
                while True:
                    await trio.lowlevel.wait_readable(pgconn.socket)
                    pgconn.consume_input()  # raises once the connection is lost
                    while (note := pgconn.notifies()) is not None:
                        finished = _finished_in(note.extra.decode(encoding, "replace"))
                        if finished:
                            on_finished(finished)
            except psycopg.Error as exc:
                failures += 1
                log.warning("store.listen_failed", error=str(exc), retry_in=pause)
            finally:
                if conn is not None:
                    _close_from_trio(conn)
            await trio.sleep(pause)

    async def make_durable(self) -> None:
        if self._relaxed_commit is None:
            return  # no relaxed commits on this server (CockroachDB): each commit was durable already
        await self._transact(lambda db: db.rows(DURABILITY_BARRIER), write=True)

    def _migrate(self, conn: psycopg.Connection) -> int:
        exists = conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (self._schema,)
        ).fetchone()
        if exists is None:  # skipped when present: creating even "IF NOT EXISTS" needs a privilege a user may lack
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema)))
        return _schema.migrate(Db(conn, POSTGRES), now=time.time())

    async def close(self) -> None:
        lanes, self._lanes = self._lanes, {}
        for slot in lanes.values():
            slot.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    async def schema_version(self) -> int:
        return await self._transact(_schema.current_version, write=False)

    def _open_pool(self) -> ConnectionPool:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open")
        return self._pool

    async def _transact(self, fn: Callable[[Db], T], *, write: bool, relaxed: bool = False) -> T:
        pool = self._open_pool()
        # A relaxed transaction sends its setting with BEGIN: no round trip of its own.
        begin = f"{BEGIN}; {self._relaxed_commit}" if relaxed and self._relaxed_commit is not None else BEGIN
        return await run_transaction(pool, lambda conn: fn(Db(conn, POSTGRES)), deadline=self.deadline, begin=begin)

    async def _statement(
        self, sql: str, params: Sequence[Any] = (), *, write: bool = False, keyed: bool = False, relaxed: bool = False
    ) -> list[tuple[Any, ...]]:
        """As SqlTaskStore's, in one round trip: no BEGIN or COMMIT around the statement. A ``keyed``
        one runs on a lane (the relaxed one for a relaxed write) when that lane is free, else (and
        when the lane fails: the pool checks its own connections, and the statement is safe to run
        again) on the pool, a relaxed write in a transaction that sends its setting with BEGIN."""
        pool = self._open_pool()
        slot = self._lanes.get(relaxed) if keyed else None
        lane = slot.free() if slot is not None else None
        if lane is not None:
            try:
                with trio.fail_after(self.deadline):
                    return await lane.rows(sql, params)
            except trio.TooSlowError:
                raise StoreUnreachable(f"the database did not answer within {self.deadline:g} s") from None
            except psycopg.Error as exc:
                if not lane.broken and exc.sqlstate not in RETRYABLE_SQLSTATES:
                    raise store_error(exc) from exc
                # A conflict: the pool's path tries again. A broken lane: the pool's connections may be
                # alive (only the lane's was cut); if not, its error is the one to tell.
            finally:
                if lane.broken:
                    slot.failed(lane)
        if relaxed:
            return await self._transact(lambda db: db.rows(sql, params), write=write, relaxed=True)
        return await run_transaction(
            pool, lambda conn: Db(conn, POSTGRES).rows(sql, params), deadline=self.deadline, begin=None
        )
