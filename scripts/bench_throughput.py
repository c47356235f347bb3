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
records in PostgreSQL). Then, per task of the measured run, where the work
went:
  - database commits: ``pg_stat_database.xact_commit`` of a database each
    system has to itself, from its creation until its processes stopped
    (start-up, warm-up and background chores included, divided by every task
    run), and the index that read the most rows per task (this script's own
    completion poll, a count every 250 ms, included);
  - AMQP socket reads and writes by the broker (``rabbitmqctl
    list_connections recv_cnt send_cnt`` of the system's own vhost, the
    submitting client's connection included): RabbitMQ without its
    management plugin counts no messages, and one read may carry several
    frames (a publish is 3, an ack 1), so fewer means better batching;
  - CPU ms of each process (user + system, from /proc): the p2pnn nodes
    and their worker processes, Celery's worker and its pool processes.
With ``--sequential N``: N tasks one at a time, submit -> done as the client
sees it, p50/p99 (p2pnn: a POST then a long poll, GET ?wait=, and then N more
as one POST ?wait=, submit and long poll in one request; the same two on an
embedded node, SQLite and the in-process queue, started after the swarm's
nodes stopped; Celery: ``AsyncResult.get`` polling the database every
millisecond).

Needs the `bench` extra: .venv/bin/pip install -e '.[bench]'
Usage: .venv/bin/python scripts/bench_throughput.py [--tasks 1000] [--workers 2] [--sequential 200]
Environment: P2PNN_* variables reach both p2pnn nodes (e.g. P2PNN_BUS__PREFETCH=64).
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
from typing import Any

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from p2pnn.client import AsyncClient
from p2pnn.launcher import start_node

BATCH = 100
WARMUP = 50
# Seconds between this script's counts of finished tasks. The figures come from the completion times
# each system records, not from when a count saw them, so this only sets when the run is seen to end;
# each count reads every finished row (it was p2pnn's busiest index at 0.05 s, ~100 rows per task).
POLL = 0.25
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


CELERY_SEQUENTIAL_POLL = 0.001  # seconds between Celery's result-backend reads in --sequential


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60, text=True).stdout


def amqp_frames(vhost: str) -> tuple[int, int]:
    """Socket reads and writes by the broker on the open connections of ``vhost``."""
    recv = sent = 0
    for line in rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "recv_cnt", "send_cnt").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == vhost:
            recv, sent = recv + int(parts[1]), sent + int(parts[2])
    return recv, sent


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def cpu_of(procs: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and, as ``<name> workers``, of its children together."""
    out = {}
    for name, pid in procs.items():
        out[name] = cpu_seconds(pid)
        kids = children(pid)
        if kids:
            out[f"{name} workers"] = sum(cpu_seconds(k) for k in kids)
    return out


SERVICES = {"rabbitmq": "beam.smp", "postgresql": "postgres"}


def service_cpu() -> dict[str, dict[int, float]]:
    """CPU seconds so far of every process of the broker and of the database server, by pid."""
    out: dict[str, dict[int, float]] = {}
    for name, comm in SERVICES.items():
        found = subprocess.run(["pgrep", "-x", comm], capture_output=True, text=True).stdout.split()
        out[name] = {int(pid): cpu_seconds(int(pid)) for pid in found}
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every core: /proc/stat less idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def cpu_snapshot(procs: dict[str, int]) -> dict[str, Any]:
    return {"procs": cpu_of(procs), "services": service_cpu(), "machine": machine_busy()}


def cpu_spent(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds between two snapshots: the system's own processes, the broker and database
    servers (their processes serve only the bench while it runs), and the whole machine."""
    out = {k: after["procs"].get(k, 0.0) - before["procs"].get(k, 0.0) for k in after["procs"]}
    for name, pids in after["services"].items():
        out[name] = sum(cpu - before["services"][name].get(pid, 0.0) for pid, cpu in pids.items())
    out["machine"] = after["machine"] - before["machine"]
    return out


def db_url(dbname: str) -> str:
    return make_conninfo(PG_URL, dbname=dbname)


def commits(dbname: str) -> int:
    """Commits in ``dbname`` by the system under test: this script's own statements there are taken off.

    Error handling: called once every connection to ``dbname`` is closed (a backend
    reports its counts when it exits; an idle one may hold them back for seconds)."""
    close_pg(db_url(dbname))
    time.sleep(1.5)  # a backend that exited reports within a second
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        total = int(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)).fetchone()[0])
    return total - _statements.get(db_url(dbname), 0)


def busiest_index(dbname: str) -> tuple[str, int, int]:
    """(index, scans, rows read) of the index that read the most rows in ``dbname``."""
    with psycopg.connect(db_url(dbname), autocommit=True) as conn:
        if os.environ.get("BENCH_INDEX_DETAIL"):
            for r in conn.execute("SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes ORDER BY 3 DESC"):
                print("  index", *r)
        row = conn.execute(
            "SELECT schemaname || '.' || indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes "
            "ORDER BY idx_tup_read DESC LIMIT 1"
        ).fetchone()
    return (row[0], int(row[1]), int(row[2])) if row else ("-", 0, 0)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100)
    return q[49], q[98]


_conns: dict[str, psycopg.Connection] = {}
_statements: dict[str, int] = {}  # statements (each a commit) this script ran in a bench database


def pg(query: str, *params, schema: str, url: str = PG_URL) -> list[tuple]:
    """Run one statement (autocommit) on a connection kept per database, so that what this script
    adds to a bench database's commit counter is exactly the number of statements it ran."""
    if url not in _conns:
        _conns[url] = psycopg.connect(url, autocommit=True)
    conn = _conns[url]
    conn.execute(f'SET search_path TO "{schema}"')
    cur = conn.execute(query, params)
    _statements[url] = _statements.get(url, 0) + 2
    return cur.fetchall() if cur.description else []


def close_pg(url: str) -> None:
    conn = _conns.pop(url, None)
    if conn is not None:
        conn.close()  # its statistics reach pg_stat_database when the backend exits


async def bench_p2pnn(n: int, workers: int, vhost: str, dbname: str, root: Path, sequential: int) -> dict:
    schema = "p2pnn"
    env = {
        "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__URL": f"amqp://{AMQP}/{vhost}", "P2PNN_STORE__BACKEND": "postgres",
        "P2PNN_STORE__URL": db_url(dbname), "P2PNN_STORE__SCHEMA": schema, "P2PNN_API__HOST": "127.0.0.1",
        "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__PRELOAD_TORCH": "false", "P2PNN_LOG__LEVEL": "warning",
    }
    head = start_node(root / "head", "--insecure", "--slots", "0", env={**env, "P2PNN_NODE__ROLE": "auto"})
    ki = start_node(root / "ki", "--insecure", "--slots", str(workers), env={**env, "P2PNN_NODE__ROLE": "ki"})
    try:
        async with AsyncClient(head.url, timeout=120) as client:
            warm = [t["id"] for t in await client.submit_many([{"kind": "echo"}] * WARMUP)]
            await client.wait_all(warm, timeout=120)
            procs = {"api+an node": head.proc.pid, "ki node": ki.proc.pid}
            cpu0, frames0 = cpu_snapshot(procs), amqp_frames(vhost)
            submitted: dict[str, float] = {}
            start = time.time()
            for i in range(0, n, BATCH):
                sent = time.time()
                for t in await client.submit_many([{"kind": "echo", "payload": j} for j in range(i, min(n, i + BATCH))]):
                    submitted[t["id"]] = sent
            ids = list(submitted)
            url = db_url(dbname)
            # Both systems are polled alike: a count of the finished rows of the whole table (every
            # row is this run's), the rows themselves once at the end.
            while pg("SELECT COUNT(*) FROM tasks WHERE state IN ('succeeded', 'failed', 'cancelled')",
                     schema=schema, url=url)[0][0] < n + WARMUP:
                await trio.sleep(POLL)
            rows = pg("SELECT id::text, state, finished_at FROM tasks WHERE id = ANY(%s::uuid[])", ids, schema=schema, url=url)
            cpu1, frames1 = cpu_snapshot(procs), amqp_frames(vhost)
            seq = await sequential_latency(client, sequential)
        assert all(state == "succeeded" for _, state, _ in rows)
        finished = {tid: float(at) for tid, _, at in rows}
    finally:
        head.stop()
        ki.stop()
    latencies = [finished[t] - submitted[t] for t in ids]
    return {
        "seconds": max(finished.values()) - start, "latencies": latencies, "sequential": seq["get"],
        "sequential_wait": seq["submit_wait"],
        "cpu": cpu_spent(cpu0, cpu1),
        "frames": (frames1[0] - frames0[0], frames1[1] - frames0[1]),
        "commits": commits(dbname), "tasks_run": n + WARMUP + 2 * sequential, "index": busiest_index(dbname),
    }


async def sequential_latency(client: AsyncClient, n: int) -> dict[str, list[float]]:
    """``n`` echo tasks one at a time, submit -> done as the client sees it, each way a client can wait:
    ``get``: POST, then a long poll (GET ?wait=); ``submit_wait``: one POST ?wait= (submit and long poll in one)."""
    out: dict[str, list[float]] = {"get": [], "submit_wait": []}
    for mode in out:
        for j in range(n):
            sent = time.time()
            if mode == "get":
                done = await client.get((await client.submit({"kind": "echo", "payload": j}))["id"], wait=30)
            else:
                done = await client.submit({"kind": "echo", "payload": j}, wait=30)
            assert done["state"] == "succeeded", done
            out[mode].append(time.time() - sent)
    return out


async def bench_embedded(workers: int, root: Path, sequential: int) -> dict[str, list[float]]:
    """The sequential latency of an embedded node (SQLite, the in-process queue), in the same run."""
    node = start_node(root, "--insecure", "--slots", str(workers), env={
        "P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
        "P2PNN_LOG__LEVEL": "warning",
    })
    try:
        async with AsyncClient(node.url, timeout=120) as client:
            await client.wait_all([t["id"] for t in await client.submit_many([{"kind": "echo"}] * WARMUP)], timeout=120)
            return await sequential_latency(client, sequential)
    finally:
        node.stop()


def bench_celery(n: int, workers: int, vhost: str, dbname: str, root: Path, sequential: int) -> dict:
    schema = "celery"
    url = db_url(dbname)
    (root / "bench_celery_app.py").write_text(CELERY_APP)
    env = {
        **os.environ, "PYTHONPATH": str(root), "BENCH_BROKER": f"pyamqp://{AMQP}/{vhost}",
        "BENCH_BACKEND": "db+" + sqlalchemy_url(dbname), "BENCH_SCHEMA": schema,
    }
    pg(f'CREATE SCHEMA IF NOT EXISTS "{schema}"', schema="public", url=url)
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
        procs = {"celery worker": worker.pid}
        cpu0, frames0 = cpu_snapshot(procs), amqp_frames(vhost)
        submitted: dict[str, float] = {}
        start = time.time()
        for i in range(0, n, BATCH):
            sent = time.time()
            for j in range(i, min(n, i + BATCH)):
                submitted[bench_celery_app.noop.delay(j).id] = sent
        ids = list(submitted)
        while pg("SELECT COUNT(*) FROM celery_taskmeta WHERE status IN ('SUCCESS', 'FAILURE')",
                 schema=schema, url=url)[0][0] < n + WARMUP:
            time.sleep(POLL)
        rows = pg("SELECT task_id, status, date_done FROM celery_taskmeta WHERE task_id = ANY(%s)", ids, schema=schema, url=url)
        cpu1, frames1 = cpu_snapshot(procs), amqp_frames(vhost)
        seq = []
        for j in range(sequential):
            sent = time.time()
            assert bench_celery_app.noop.delay(j).get(timeout=60, interval=CELERY_SEQUENTIAL_POLL) == j
            seq.append(time.time() - sent)
        assert all(status == "SUCCESS" for _, status, _ in rows)
        finished = {tid: at.replace(tzinfo=timezone.utc).timestamp() for tid, _, at in rows}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        bench_celery_app.app.pool.force_close_all()  # this process's broker connection
        bench_celery_app.app.backend.ResultSession().get_bind().dispose()  # and its database connections
    latencies = [finished[t] - submitted[t] for t in ids]
    return {
        "seconds": max(finished.values()) - start, "latencies": latencies, "sequential": seq,
        "cpu": cpu_spent(cpu0, cpu1),
        "frames": (frames1[0] - frames0[0], frames1[1] - frames0[1]),
        "commits": commits(dbname), "tasks_run": n + WARMUP + sequential, "index": busiest_index(dbname),
    }


def sqlalchemy_url(dbname: str) -> str:
    """The same database for SQLAlchemy (Celery's result backend), through psycopg 3."""
    return "postgresql+psycopg://" + PG_URL.split("://", 1)[1].rsplit("/", 1)[0] + f"/{dbname}"


def report(name: str, n: int, r: dict) -> float:
    rate = n / r["seconds"]
    p50, p99 = percentiles(r["latencies"])
    print(f"{name:7s} {n} no-op tasks in {r['seconds']:.2f} s: {rate:8.1f} tasks/s   "
          f"submit->done p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    return rate


def report_costs(name: str, n: int, r: dict) -> None:
    cpu = dict(r["cpu"])
    services = {k: cpu.pop(k) for k in (*SERVICES, "machine")}
    parts = "  ".join(f"{k} {v * 1000 / n:.2f}" for k, v in cpu.items())
    index, scans, read = r["index"]
    print(f"{name:7s} per task: CPU ms {sum(cpu.values()) * 1000 / n:.2f} ({parts}); "
          f"servers: RabbitMQ {services['rabbitmq'] * 1000 / n:.2f}, PostgreSQL {services['postgresql'] * 1000 / n:.2f}; "
          f"whole machine {services['machine'] * 1000 / n:.2f}; "
          f"AMQP broker socket reads/writes {r['frames'][0] / n:.2f}/{r['frames'][1] / n:.2f}; "
          f"db commits {r['commits'] / r['tasks_run']:.2f} (over all {r['tasks_run']} tasks and start-up); "
          f"busiest index {index}: {scans / r['tasks_run']:.2f} scans, {read / r['tasks_run']:.1f} rows read")
    if r["sequential"]:
        report_sequential(name, r["sequential"], "" if name == "celery" else "swarm path, POST then GET ?wait=")
    if r.get("sequential_wait"):
        report_sequential(name, r["sequential_wait"], "swarm path, one POST ?wait=")


def report_sequential(name: str, latencies: list[float], how: str) -> None:
    p50, p99 = percentiles(latencies)
    print(f"{name:7s} sequential, {len(latencies)} tasks one at a time, submit->done as the client sees it"
          f"{f' ({how})' if how else ''}: p50 {p50 * 1000:.1f} ms  p99 {p99 * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes for each system")
    parser.add_argument("--sequential", type=int, default=0, help="then this many tasks one at a time, for latency")
    args = parser.parse_args()
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    # A vhost and a database for each system: broker and commit counters then count that system alone.
    vhosts = {"p2pnn": f"p2pnn-bench-{tag}", "celery": f"celery-bench-{tag}"}
    dbs = {"p2pnn": f"bench_p2pnn_{tag}", "celery": f"bench_celery_{tag}"}
    for vhost in vhosts.values():
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    for db in dbs.values():
        pg(f'CREATE DATABASE "{db}"', schema="public")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{args.tasks} no-op tasks, {args.workers} worker processes each; RabbitMQ vhosts {', '.join(vhosts.values())}, "
                  f"PostgreSQL databases {', '.join(dbs.values())}")
            p = trio.run(bench_p2pnn, args.tasks, args.workers, vhosts["p2pnn"], dbs["p2pnn"], Path(tmp) / "p2pnn",
                         args.sequential)
            embedded = trio.run(bench_embedded, args.workers, Path(tmp) / "embedded", args.sequential) if args.sequential else None
            (Path(tmp) / "celery").mkdir()
            c = bench_celery(args.tasks, args.workers, vhosts["celery"], dbs["celery"], Path(tmp) / "celery", args.sequential)
            p_rate, c_rate = report("p2pnn", args.tasks, p), report("celery", args.tasks, c)
            print(f"ratio p2pnn/celery: {p_rate / c_rate:.2f}")
            report_costs("p2pnn", args.tasks, p)
            if embedded:
                report_sequential("p2pnn", embedded["get"], "embedded node, POST then GET ?wait=")
                report_sequential("p2pnn", embedded["submit_wait"], "embedded node, one POST ?wait=")
            report_costs("celery", args.tasks, c)
    finally:
        for vhost in vhosts.values():
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
        for db in dbs.values():
            pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', schema="public")
    return 0


if __name__ == "__main__":
    sys.exit(main())
