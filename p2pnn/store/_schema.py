"""Versioned migrations shared by both backends, and the step that applies them.

A migration is a version number and the statements that reach it, written once
with ``{uuid}``, ``{json}`` and ``{blob}`` where the dialects differ. Applied
versions are rows of ``schema_migrations``; a database is migrated inside the
caller's transaction, the version row first, so that two nodes opening the same
fresh database at once collide on that row's primary key instead of applying
the DDL twice.

Only statements CockroachDB also accepts appear here: no sequences or SERIAL
(ids are uuid4 made by the client), no triggers, no stored procedures, partial
indexes and ``CHECK`` constraints only.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pnn.store._sql import Db
from p2pnn.store.base import StoreError


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks, idempotency keys and artifacts",
        (
            """
            CREATE TABLE tasks (
                id {uuid} PRIMARY KEY,
                kind TEXT NOT NULL,
                spec {json} NOT NULL,
                state TEXT NOT NULL
                    CHECK (state IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
                owner TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                lease_owner TEXT,
                lease_expires_at DOUBLE PRECISION,
                cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
                progress {json},
                result {json},
                error TEXT,
                idempotency_key TEXT,
                batch_index INTEGER NOT NULL DEFAULT 0
            )
            """,
            "CREATE INDEX tasks_by_created ON tasks (created_at, id)",
            "CREATE INDEX tasks_by_owner_created ON tasks (owner, created_at, id)",
            "CREATE INDEX tasks_by_state_updated ON tasks (state, updated_at)",
            "CREATE INDEX tasks_by_state_lease ON tasks (state, lease_expires_at)",
            """
            CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (owner, idempotency_key, batch_index)
                WHERE idempotency_key IS NOT NULL
            """,
            # One row per (owner, key), whatever the batch size: the row that
            # makes a repeat of a batch submission find the first one.
            """
            CREATE TABLE idempotency_keys (
                owner TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                request_hash TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (owner, idempotency_key)
            )
            """,
            """
            CREATE TABLE artifacts (
                task_id {uuid} NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                data {blob} NOT NULL,
                size INTEGER NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (task_id, name)
            )
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "swarm: the principal's lease, its term history, role assignments",
        (
            # One row per swarm: the term in force, who holds it, until when.
            # Every change is a compare-and-set on (term, holder, expires_at).
            """
            CREATE TABLE swarm_lease (
                swarm TEXT PRIMARY KEY,
                term INTEGER NOT NULL CHECK (term >= 1),
                holder TEXT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
            )
            """,
            # Every term ever granted: the primary key makes a term impossible to grant twice.
            """
            CREATE TABLE swarm_terms (
                swarm TEXT NOT NULL,
                term INTEGER NOT NULL,
                holder TEXT NOT NULL,
                acquired_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                ended_at DOUBLE PRECISION,
                end_reason TEXT CHECK (end_reason IN ('released', 'expired')),
                PRIMARY KEY (swarm, term)
            )
            """,
            """
            CREATE TABLE swarm_roles (
                swarm TEXT NOT NULL,
                node_id TEXT NOT NULL,
                roles TEXT NOT NULL,
                an_id TEXT,
                term INTEGER NOT NULL,
                assigned_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (swarm, node_id)
            )
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "tasks.published_at: when the last message for a queued task was confirmed by the bus",
        (
            # NULL while a queued task has no message known to be on its way (handed back, its lease
            # expired, an attempt failed and a retry is due): the sweeper's stranded rule looks for
            # queued tasks with NULL here and an update older than sweeper.stranded_after_seconds.
            "ALTER TABLE tasks ADD COLUMN published_at DOUBLE PRECISION",
            "CREATE INDEX tasks_by_state_published ON tasks (state, published_at)",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "swarm: the deny list of revoked API tokens, members' DHT addresses",
        (
            # A row lives until the token would have expired anyway; then it is of no use and is deleted.
            """
            CREATE TABLE revoked_tokens (
                jti TEXT PRIMARY KEY,
                expires_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION NOT NULL
            )
            """,
            # Where each member's DHT listens, written by the member itself: a node whose bootstrap
            # peers and saved peers are all gone (or on the other side of a partition) finds the swarm here.
            """
            CREATE TABLE swarm_members (
                swarm TEXT NOT NULL,
                node_id TEXT NOT NULL,
                dht_host TEXT NOT NULL,
                dht_port INTEGER NOT NULL,
                seen_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (swarm, node_id)
            )
            """,
        ),
    ),
)

MIGRATIONS += (
    Migration(
        5,
        "live progress: each attempt's per-epoch series; tasks by update time",
        (
            # One row per progress report of an attempt (seq 1, 2, ...), at most
            # MAX_PROGRESS_POINTS of them; the tasks row keeps only the latest.
            """
            CREATE TABLE task_progress (
                task_id {uuid} NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
                attempt INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                data {json} NOT NULL,
                PRIMARY KEY (task_id, attempt, seq)
            )
            """,
            # The event streams ask for "tasks changed since" every fraction of a second.
            "CREATE INDEX tasks_by_updated ON tasks (updated_at)",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        6,
        "task_counts: tasks by state and kind, kept by every transition, so /metrics reads a few rows",
        (
            # A (state, kind) count is split over a few shard rows: concurrent transactions each
            # add to a shard of their own choosing, so no single row serialises every state change.
            """
            CREATE TABLE task_counts (
                state TEXT NOT NULL,
                kind TEXT NOT NULL,
                shard INTEGER NOT NULL,
                n INTEGER NOT NULL,
                PRIMARY KEY (state, kind, shard)
            )
            """,
            # Tasks stored before this migration are counted once, here.
            "INSERT INTO task_counts (state, kind, shard, n) SELECT state, kind, 0, COUNT(*) FROM tasks GROUP BY state, kind",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        7,
        "tasks.parent_id: the sweep a trial task belongs to",
        (
            # NULL for a task submitted on its own; a sweep's trials name it, and are listed by it.
            "ALTER TABLE tasks ADD COLUMN parent_id {uuid}",
            "CREATE INDEX tasks_by_parent ON tasks (parent_id, created_at)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

_CREATE_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY,
        description TEXT NOT NULL,
        applied_at DOUBLE PRECISION NOT NULL
    )
"""


def current_version(db: Db) -> int:
    """The highest applied migration (0 for a database that has none)."""
    row = db.one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(row[0]) if row else 0


def migrate(db: Db, *, now: float) -> int:
    """Bring the database to LATEST_VERSION inside the caller's transaction; returns the version.

    Opening an already-migrated database reads one row and changes nothing.

    Error handling: a database newer than this code raises StoreError naming
    both versions; a concurrent migrator makes the ``schema_migrations``
    insert fail with a unique violation, which the backend retries (by then the
    other node's migration is visible and there is nothing left to do).
    """
    db.run(_CREATE_MIGRATIONS_TABLE)
    version = current_version(db)
    if version > LATEST_VERSION:
        raise StoreError(
            f"the database schema is at version {version}, but this p2pnn only knows versions up to "
            f"{LATEST_VERSION}: upgrade p2pnn on this node instead of pointing it at a newer database"
        )
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        db.run(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.description, now),
        )
        for statement in migration.statements:
            db.run(db.dialect.ddl(statement))
        version = migration.version
    return version

