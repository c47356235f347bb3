"""The state plane: tasks, attempts, leases and artifacts, kept in SQL.

TaskStore (base.py) is the interface and its contract: every transition is a
conditional update, and a refused one returns None/False. Two backends
implement it with the same queries (_sql.py):

- SqliteTaskStore (sqlite.py): one SQLite file in WAL mode, one connection
  behind a trio lock; the embedded single-node default.
- PostgresTaskStore (postgres.py): CockroachDB or PostgreSQL through a psycopg
  connection pool, with serialization failures (SQLSTATE 40001) retried.

The tables and their versions are in _schema.py; ``open()`` applies whatever
migrations a database lacks. ``open_store`` picks a backend by name.
"""

from __future__ import annotations

from pathlib import Path

from p2pnn.store.base import (
    AmbiguousCommit,
    Assignment,
    ClaimOp,
    Fence,
    FinishOp,
    FinishUnclaimedOp,
    IdempotencyConflict,
    Lease,
    NewTask,
    Page,
    ProgressSeries,
    StoreError,
    StoreUnreachable,
    TaskStore,
    TermRecord,
)

BACKENDS = ("sqlite", "postgres")

__all__ = [
    "BACKENDS", "AmbiguousCommit", "Assignment", "ClaimOp", "Fence", "FinishOp", "FinishUnclaimedOp", "IdempotencyConflict", "Lease",
    "NewTask", "Page", "ProgressSeries", "StoreError", "StoreUnreachable", "TaskStore",
    "TermRecord", "open_store",
]


def open_store(
    backend: str,
    *,
    sqlite_path: Path | None = None,
    url: str | None = None,
    schema: str = "public",
    pool_size: int = 4,
    sqlite_synchronous: str = "full",
    connect_timeout: float = 5.0,
    statement_timeout: float = 10.0,
) -> TaskStore:
    """A store for ``backend`` ("sqlite" needs ``sqlite_path``, "postgres" needs ``url``), not yet opened.

    The caller awaits ``open()`` and, at the end, ``close()``. A CockroachDB
    URL uses the "postgres" backend; ``connect_timeout`` and
    ``statement_timeout`` (seconds) apply to it alone.

    Error handling: an unknown backend or a missing path/URL raises ValueError.
    """
    if backend == "sqlite":
        if sqlite_path is None:
            raise ValueError("the sqlite backend needs sqlite_path")
        from p2pnn.store.sqlite import SqliteTaskStore

        return SqliteTaskStore(sqlite_path, synchronous=sqlite_synchronous)
    if backend == "postgres":
        if not url:
            raise ValueError("the postgres backend needs a database url")
        # Imported here so the embedded default never loads psycopg.
        from p2pnn.store.postgres import PostgresTaskStore

        return PostgresTaskStore(
            url, schema=schema, pool_size=pool_size, connect_timeout=connect_timeout, statement_timeout=statement_timeout
        )
    raise ValueError(f"unknown store backend {backend!r}; expected one of {', '.join(BACKENDS)}")
