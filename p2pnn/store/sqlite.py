"""SqliteTaskStore: the embedded single-node store, one SQLite file in WAL mode."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from p2pnn.store import _schema
from p2pnn.store._sql import SQLITE, Db, SqlTaskStore, _get, parse_id
from p2pnn.store.base import StoreError
from p2pnn.tasks import Task

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000  # another process (a CLI, a second node on the same file) may hold the write lock that long
# Write transactions between two WAL checkpoints, which run in a worker thread after a commit there:
# never on the trio thread, where a transaction that does not wait for the disk may run.
CHECKPOINT_EVERY = 200


# full: every commit reaches the disk (survives power loss); normal: in WAL mode, commits
# survive a crash of the process but the last ones may roll back after a power loss.
SYNCHRONOUS_MODES = ("full", "normal")


class SqliteTaskStore(SqlTaskStore):
    """Tasks in one SQLite file, reached through one connection.

    Every call but a relaxed write (below) runs in a worker thread while holding
    a trio lock, so the connection is never used by two threads at once;
    SQLite serialises writers anyway, so a second connection would buy nothing
    in one process. Writes
    run in ``BEGIN IMMEDIATE`` transactions: the write lock is taken up front,
    so two processes on the same file wait (``busy_timeout``) instead of
    failing half-way with SQLITE_BUSY on lock upgrade.

    Resource handling: ``open`` creates the file (and its directory) and
    migrates it; ``close`` closes the connection. A call is not abandoned on
    cancellation: it finishes (milliseconds) before the cancel is delivered,
    because an abandoned thread would still own the connection.

    ``get`` (one task by id: the long poll's read) runs on the trio thread
    itself, through a second connection that only reads: in WAL mode a reader
    never waits for the writer, and a point read takes tens of microseconds,
    less than the two thread hand-offs it saves. Should that read ever find
    the database busy (WAL recovery after a crash), it goes the threaded way.

    A write whose commit need not wait for the disk (``relaxed``: a submit that
    waits for its tasks inserts them so) runs on the trio thread when nothing
    else holds the connection: a few hundred microseconds, where a worker
    thread's hand-offs and its contention with the event loop for the GIL cost
    more and delayed the result that waited for it. It never waits there for
    another process's write lock (busy timeout 0: it goes the threaded way), and
    never checkpoints there: checkpoints run after every CHECKPOINT_EVERY writes,
    in the worker thread of a write (``wal_autocheckpoint`` is off).

    Error handling: sqlite3 errors become StoreError.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "full") -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self._path = str(path)
        self._synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # point reads on the trio thread (not for ":memory:")
        self._lock = trio.Lock()
        self._writes = 0  # write transactions since the last checkpoint

    async def open(self) -> None:
        if self._conn is not None:
            return

        def connect() -> sqlite3.Connection:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: the module's implicit transactions are off; we issue BEGIN ourselves.
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
                conn.execute("PRAGMA wal_autocheckpoint=0")  # see the class: checkpoints run in a thread
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            self._conn = await trio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self._path}: {exc}") from exc
        try:
            await self._transact(lambda db: _schema.migrate(db, now=time.time()), write=True)
            if self._path != ":memory:":  # a second connection to ":memory:" would be another database
                self._reader = await trio.to_thread.run_sync(self._connect_reader)
        except BaseException:
            await self.close()
            raise

    def _connect_reader(self) -> sqlite3.Connection:
        # busy_timeout 0: a read that would wait goes the threaded way instead of blocking the loop.
        reader = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=0)
        try:
            reader.execute("PRAGMA query_only=ON")
        except BaseException:
            reader.close()
            raise
        return reader

    async def get(self, task_id: str) -> Task | None:
        reader, tid = self._reader, parse_id(task_id)
        if reader is None or tid is None:
            return await super().get(task_id)
        try:
            reader.execute("BEGIN")
            try:
                task = _get(Db(reader, SQLITE), tid)
            finally:
                reader.execute("COMMIT")
        except sqlite3.OperationalError:  # busy or locked: the writer's connection, in a thread, waits its turn
            return await super().get(task_id)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite ({self._path}): {exc}") from exc
        await trio.lowlevel.checkpoint()
        return task

    async def follow_finished(
        self, on_finished: Callable[[list[tuple[str, Task | None]]], None], *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """As TaskStore's, for the results recorded by this process (one process holds the file
        as a rule): ``apply`` reads each task recorded inside its transaction while this runs, and
        calls ``on_finished`` once it committed. Results recorded by another process on the same
        file are not announced (``announces_finished`` stays False)."""
        self._listeners = (*self._listeners, on_finished)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._listeners = tuple(listener for listener in self._listeners if listener is not on_finished)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)

    async def schema_version(self) -> int:
        return await self._transact(_schema.current_version, write=False)

    async def make_durable(self) -> None:
        if self._synchronous != "full":
            return  # no commit here waits for the disk; a barrier would promise more than the store keeps

        # A commit syncs the WAL only when it writes a page; an update to a row's own values, or an
        # empty transaction, writes none. Setting user_version (unused otherwise), even to the value
        # it has, writes the header page: one frame, synced at this FULL commit together with every
        # frame before it, as the WAL is one file written in order.
        def touch(db: Db) -> None:
            (version,) = db.rows("PRAGMA user_version")[0]
            db.run(f"PRAGMA user_version = {int(version)}")

        await self._transact(touch, write=True)

    async def _transact(self, fn: Callable[[Db], T], *, write: bool, relaxed: bool = False) -> T:
        # In WAL mode a NORMAL commit does not sync the log; the next FULL one syncs it, this
        # commit included. SQLite takes the setting only outside a transaction.
        relax = relaxed and write and self._synchronous == "full"
        try:
            if relax and not self._lock.locked() and self._writes < CHECKPOINT_EVERY:
                done, out = self._run(fn, write=True, relax=True, wait=False)  # see the class
                if done:
                    await trio.lowlevel.checkpoint()
                    return out
            async with self._lock:
                _, out = await trio.to_thread.run_sync(partial(self._run, fn, write=write, relax=relax, wait=True))
                return out
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite ({self._path}): {exc}") from exc

    def _run(self, fn: Callable[[Db], T], *, write: bool, relax: bool, wait: bool) -> tuple[bool, T | None]:
        """``fn(db)`` in a transaction: (True, what it returned). Without ``wait``, (False, None) when
        another process holds the write lock: nothing was done. With it, a write also checkpoints
        the log every CHECKPOINT_EVERY writes."""
        conn = self._conn
        if conn is None:
            raise StoreError("the SQLite store is not open")
        settings = ["PRAGMA synchronous=NORMAL"] if relax else []
        if not wait:
            settings.append("PRAGMA busy_timeout=0")
        for setting in settings:
            conn.execute(setting)
        try:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:
                if wait or exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                return False, None
            try:
                out = fn(Db(conn, SQLITE))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT leaves the transaction open
                    conn.execute("ROLLBACK")
                raise
        finally:
            if relax:
                conn.execute("PRAGMA synchronous=FULL")
            if not wait:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if write:
            self._writes += 1
            if wait and self._writes >= CHECKPOINT_EVERY:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._writes = 0
        return True, out
