"""Shared fixtures. Each section is self-contained; add new ones as sections of their own."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from p2pnn.store import TaskStore, open_store

# --- store: PostgreSQL and the two TaskStore backends -------------------------

PG_URL = os.environ.get("P2PNN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_START_WAIT = 30.0  # seconds for a cluster started by pg_ctlcluster to accept connections


def _pg_reachable() -> str | None:
    """None when PG_URL accepts a connection, else why not."""
    import psycopg

    try:
        with psycopg.connect(PG_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """PG_URL, once PostgreSQL answers on it; starts the local cluster if it is down.

    Error handling: fails the tests that need it (never skips) when the
    database is still unreachable, so a broken machine cannot pass silently.
    """
    if _pg_reachable() is None:
        return PG_URL
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            check=False, capture_output=True, timeout=60,
        )
    deadline = time.monotonic() + PG_START_WAIT
    while (why := _pg_reachable()) is not None:
        if time.monotonic() > deadline:
            pytest.fail(f"PostgreSQL at {PG_URL} is not reachable and could not be started: {why}", pytrace=False)
        time.sleep(0.5)
    return PG_URL


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A schema name no other test (or test run) uses; the schema is dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"p2pnn_test_{os.getpid()}_{secrets.token_hex(4)}"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], TaskStore]:
    """A factory of unopened stores that all share one fresh database of the parametrized backend."""
    if request.param == "sqlite":
        path = tmp_path / "tasks.sqlite3"
        return lambda: open_store("sqlite", sqlite_path=path)
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("pg_schema")
    return lambda: open_store("postgres", url=url, schema=schema)


@pytest.fixture
async def store(make_store: Callable[[], TaskStore]) -> AsyncIterator[TaskStore]:
    """An opened TaskStore on a fresh database, for both backends; closed afterwards."""
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --- bus: RabbitMQ, one throw-away vhost per test ------------------------------

AMQP_HOST = os.environ.get("P2PNN_TEST_AMQP_HOST", "127.0.0.1")
RABBITMQCTL_TIMEOUT = 60  # rabbitmqctl starts an Erlang VM per call: seconds, not milliseconds


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=check)


@pytest.fixture
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own (guest has every permission); deleted afterwards."""
    name = f"p2pnn-test-{os.getpid()}-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    rabbitmqctl("delete_vhost", name, check=False)


@pytest.fixture
def amqp_url(amqp_vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:5672/{amqp_vhost}"


# --- bus: a private RabbitMQ node, for tests that restart or kill the broker ----


@pytest.fixture
def private_rabbitmq() -> Iterator["PrivateRabbitMQ"]:
    """A RabbitMQ node of this test's own (the machine's broker is shared and never restarted); removed afterwards."""
    from tests.brokers import PrivateRabbitMQ

    rabbit = PrivateRabbitMQ()
    rabbit.start()
    try:
        yield rabbit
    finally:
        rabbit.stop()
