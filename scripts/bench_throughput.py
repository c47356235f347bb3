#!/usr/bin/env python3
"""Throughput of no-op tasks: a p2pnn swarm against Celery 5, on the same RabbitMQ and PostgreSQL.

p2pnn: two `p2pnn-node` processes on RabbitMQ (a vhost of this run's own)
and PostgreSQL (a schema of this run's own): one holds the principal and An
roles and serves the API (no workers), one is a Ki with ``--workers`` slots.
Tasks are submitted through the REST API in batches of 100 and counted done
when the store says ``succeeded``.

Celery: a prefork worker with ``--workers`` processes, ``acks_late``,
prefetch multiplier 1, persistent messages with publisher confirms, and the
database result backend on the same PostgreSQL (a schema of its own).

Both get a warm-up first, then the same number of tasks. Printed: tasks/s
from the first submit to the last completion, the p2pnn/Celery ratio, and
p50/p99 of submit -> done latency (done = the completion time each system
records in PostgreSQL).

Needs the `bench` extra: .venv/bin/pip install -e '.[bench]'
Usage: .venv/bin/python scripts/bench_throughput.py [--tasks 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timezone
from pathlib import Path

import psycopg
import trio

from p2pnn.client import AsyncClient
from p2pnn.launcher import start_node

BATCH = 100
WARMUP = 50
POLL = 0.05
PG_URL = os.environ.get("P2PNN_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP = os.environ.get("P2PNN_BENCH_AMQP", "guest:guest@127.0.0.1:5672")

CELERY_APP = textwrap.dedent('''
    import os
    from celery import Celery
    app = Celery("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
    app.conf.update(
        task_acks_late=True, worker_prefetch_multiplier=1, task_default_delivery_mode="persistent",
        broker_transport_options={"confirm_publish": True},
        database_table_schemas={"task": os.environ["BENCH_SCHEMA"], "group": os.environ["BENCH_SCHEMA"]},
        result_extended=False, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
    )

    @app.task
    def noop(i):
        return i
''')


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100)
    return q[49], q[98]


def pg(query: str, *params, schema: str) -> list[tuple]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


async def bench_p2pnn(n: int, workers: int, vhost: str, schema: str, root: Path) -> dict:
    env = {
        "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__URL": f"amqp://{AMQP}/{vhost}", "P2PNN_STORE__BACKEND": "postgres",
        "P2PNN_STORE__URL": PG_URL, "P2PNN_STORE__SCHEMA": schema, "P2PNN_API__HOST": "127.0.0.1",
        "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__PRELOAD_TORCH": "false", "P2PNN_LOG__LEVEL": "warning",
    }
    head = start_node(root / "head", "--insecure", "--slots", "0", env={**env, "P2PNN_NODE__ROLE": "auto"})
    ki = start_node(root / "ki", "--insecure", "--slots", str(workers), env={**env, "P2PNN_NODE__ROLE": "ki"})
    try:
        async with AsyncClient(head.url, timeout=120) as client:
            warm = [t["id"] for t in await client.submit_many([{"kind": "echo"}] * WARMUP)]
            await client.wait_all(warm, timeout=120)
            submitted: dict[str, float] = {}
            start = time.time()
            for i in range(0, n, BATCH):
                sent = time.time()
                for t in await client.submit_many([{"kind": "echo", "payload": j} for j in range(i, min(n, i + BATCH))]):
                    submitted[t["id"]] = sent
            ids = list(submitted)
            while True:
                rows = pg("SELECT id::text, state, finished_at FROM tasks WHERE id::text = ANY(%s)", ids, schema=schema)
                if sum(1 for _, state, _ in rows if state in ("succeeded", "failed", "cancelled")) == n:
                    break
                await trio.sleep(POLL)
        assert all(state == "succeeded" for _, state, _ in rows)
        finished = {tid: float(at) for tid, _, at in rows}
    finally:
        head.stop()
        ki.stop()
    latencies = [finished[t] - submitted[t] for t in ids]
    return {"seconds": max(finished.values()) - start, "latencies": latencies}


def bench_celery(n: int, workers: int, vhost: str, schema: str, root: Path) -> dict:
    (root / "bench_celery_app.py").write_text(CELERY_APP)
    env = {
        **os.environ, "PYTHONPATH": str(root), "BENCH_BROKER": f"pyamqp://{AMQP}/{vhost}",
        "BENCH_BACKEND": "db+" + PG_URL.replace("postgresql://", "postgresql+psycopg://", 1), "BENCH_SCHEMA": schema,
    }
    pg(f'CREATE SCHEMA IF NOT EXISTS "{schema}"', schema="public")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench_celery_app", "worker", "--pool", "prefork",
         "--concurrency", str(workers), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env=env, cwd=root, stdout=open(root / "celery-worker.log", "wb"), stderr=subprocess.STDOUT,
    )
    sys.path.insert(0, str(root))
    os.environ.update({k: env[k] for k in ("BENCH_BROKER", "BENCH_BACKEND", "BENCH_SCHEMA")})
    import bench_celery_app  # noqa: E402 - the module written above

    try:
        for r in [bench_celery_app.noop.delay(-1) for _ in range(WARMUP)]:
            r.get(timeout=120)
        submitted: dict[str, float] = {}
        start = time.time()
        for i in range(0, n, BATCH):
            sent = time.time()
            for j in range(i, min(n, i + BATCH)):
                submitted[bench_celery_app.noop.delay(j).id] = sent
        ids = list(submitted)
        while True:
            rows = pg("SELECT task_id, status, date_done FROM celery_taskmeta WHERE task_id = ANY(%s)", ids, schema=schema)
            if sum(1 for _, status, _ in rows if status in ("SUCCESS", "FAILURE")) == n:
                break
            time.sleep(POLL)
        assert all(status == "SUCCESS" for _, status, _ in rows)
        finished = {tid: at.replace(tzinfo=timezone.utc).timestamp() for tid, _, at in rows}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    latencies = [finished[t] - submitted[t] for t in ids]
    return {"seconds": max(finished.values()) - start, "latencies": latencies}


def report(name: str, n: int, r: dict) -> float:
    rate = n / r["seconds"]
    p50, p99 = percentiles(r["latencies"])
    print(f"{name:7s} {n} no-op tasks in {r['seconds']:.2f} s: {rate:8.1f} tasks/s   "
          f"submit->done p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes for each system")
    args = parser.parse_args()
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    vhost, p_schema, c_schema = f"p2pnn-bench-{tag}", f"bench_p2pnn_{tag.replace('-', '_')}", f"bench_celery_{tag.replace('-', '_')}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{args.tasks} no-op tasks, {args.workers} worker processes each; RabbitMQ vhost {vhost}, "
                  f"PostgreSQL {PG_URL}")
            p = trio.run(bench_p2pnn, args.tasks, args.workers, vhost, p_schema, Path(tmp) / "p2pnn")
            (Path(tmp) / "celery").mkdir()
            c = bench_celery(args.tasks, args.workers, vhost, c_schema, Path(tmp) / "celery")
            p_rate, c_rate = report("p2pnn", args.tasks, p), report("celery", args.tasks, c)
            print(f"ratio p2pnn/celery: {p_rate / c_rate:.2f}")
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
        for schema in (p_schema, c_schema):
            pg(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', schema="public")
    return 0


if __name__ == "__main__":
    sys.exit(main())
