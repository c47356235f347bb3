"""Tasks across a principal's death: how long from the SIGKILL until every task has succeeded.

A swarm of --nodes real `p2pnn-node` processes on 127.0.0.1 (election,
assigned roles, fan-out over RabbitMQ, a PostgreSQL store), in a schema and a
RabbitMQ vhost of its own (both removed at the end). Each run: submit --tasks
echo tasks of --sleep seconds to a node that is not the principal, wait until
some run, SIGKILL the principal, and time the kill until the last task's
``finished_at`` in the store; the bound is ``sweeper.stranded_after_seconds +
compute.lease_seconds`` (a Ki that lost its role hands its tasks back and
re-publishes them at once; a dead holder's lease lapses within the lease; a
publish that failed is found within ``stranded_after``). Then the killed node
comes back and the swarm settles before the next run. Prints one line per
run and the worst.

    .venv/bin/python scripts/bench_task_failover.py [--runs 10] [--nodes 4] [--tasks 12] [--sleep 1]
                                                     [--timings test|default] [--lease S]

--timings test (the default): the test suite's (tests/swarmutil.py: heartbeat
0.5 s, election timeout 2.5 s, lease 3 s; Ki message TTL 5 s, stranded_after
2 s) and a task lease of 10 s: bound 12 s. --timings default: the project's
defaults, as scripts/swarm runs them (stranded_after 10 s, task lease 30 s):
bound 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pnn import config as config_mod  # noqa: E402
from p2pnn.api.auth import Authenticator  # noqa: E402
from p2pnn.client import Client  # noqa: E402
from p2pnn.launcher import LocalSwarm, agreed  # noqa: E402

PG_URL = os.environ.get("P2PNN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_BASE = os.environ.get("P2PNN_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
SETTLE_TIMEOUT = 120.0  # two shared cores: a node start and an election take seconds
RUN_TIMEOUT = 180.0  # a run whose tasks have not all ended by then is reported as a failure

# The test suite's swarm timings (tests/swarmutil.py SWARM_ENV and FANOUT_ENV).
SWARM_TIMINGS = {
    "P2PNN_SWARM__HEARTBEAT_SECONDS": "0.5", "P2PNN_SWARM__ELECTION_TIMEOUT_SECONDS": "2.5",
    "P2PNN_SWARM__LEASE_SECONDS": "3", "P2PNN_DHT__REFRESH_SECONDS": "0.5", "P2PNN_DHT__REPUBLISH_SECONDS": "2",
    "P2PNN_DHT__RECORD_TTL_SECONDS": "8", "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__BEAT_INTERVAL_SECONDS": "0.5",
    "P2PNN_BUS__BEAT_TIMEOUT_SECONDS": "3", "P2PNN_BUS__KI_MESSAGE_TTL_SECONDS": "5",
    "P2PNN_SWEEPER__STRANDED_AFTER_SECONDS": "2", "P2PNN_SWEEPER__INTERVAL_SECONDS": "0.5",
    "P2PNN_COMPUTE__SLOTS": "2", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
}


@dataclass(frozen=True)
class Run:
    took: float  # seconds from the kill to the last task's finished_at
    bound: float  # stranded_after + task lease
    states: dict[str, int]  # final state -> tasks
    started_again: int  # tasks started more than once (handed back by a Ki whose role changed, or lost with it)
    running_at_kill: int
    new_principal_was: str  # the roles the node elected next held before the kill


# The project's defaults, as scripts/swarm runs them (only the bus, the slots and no torch preloading set).
DEFAULT_TIMINGS = {
    "P2PNN_BUS__BACKEND": "amqp", "P2PNN_COMPUTE__SLOTS": "2", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
}
DEFAULT_STRANDED_AFTER = 10.0  # sweeper.stranded_after_seconds' default


def swarm_env(amqp_url: str, lease: float, timings: str = "test") -> dict[str, str]:
    base = SWARM_TIMINGS if timings == "test" else DEFAULT_TIMINGS
    return {**base, "P2PNN_BUS__URL": amqp_url, "P2PNN_COMPUTE__LEASE_SECONDS": f"{lease:g}"}


def bound_of(env: dict[str, str]) -> float:
    """stranded_after + the task lease, for a swarm started with ``env``."""
    stranded = float(env.get("P2PNN_SWEEPER__STRANDED_AFTER_SECONDS", DEFAULT_STRANDED_AFTER))
    return stranded + float(env["P2PNN_COMPUTE__LEASE_SECONDS"])


def operator_token(swarm: LocalSwarm, name: str) -> str:
    cfg = config_mod.load(env={}).replace("node", data_dir=str(swarm.root / name))
    return Authenticator.from_config(cfg).mint("bench", "operator", 3600)


def kill_principal_under_load(
    swarm: LocalSwarm, rows: Callable[..., list[tuple]], *, tasks: int, sleep: float, bound: float
) -> Run:
    """One run on a settled swarm (every member agreed): submit, kill the principal mid-load, wait for the end.

    ``rows(query, *params)`` reads the swarm's schema. The killed node stays down; the caller restarts it.
    Error handling: TimeoutError when a task has not ended RUN_TIMEOUT seconds after the kill.
    """
    view = next(iter(swarm.views().values()))
    principal = next(n for n, p in swarm.running().items() if p.node_id == view["principal"])
    roles_before = {node_id: r["roles"] for node_id, r in view["roles"].items()}
    via = next(n for n in swarm.running() if n != principal)
    with Client(swarm.nodes[via].url, operator_token(swarm, via), timeout=60) as client:
        ids = [t["id"] for t in client.submit_many([{"kind": "echo", "payload": i, "sleep": sleep} for i in range(tasks)])]
    # Kill while work is under way: at least two tasks running (on as many Ki as there are), some waiting.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (running := rows("SELECT count(*) FROM tasks WHERE state = 'running' AND id::text = ANY(%s)", ids)[0][0]) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no two of {tasks} tasks running after {SETTLE_TIMEOUT} s")
        time.sleep(0.05)
    killed_wall = time.time()
    swarm.kill(principal)
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        states = dict(rows("SELECT id::text, state FROM tasks WHERE id::text = ANY(%s)", ids))
        if all(s in ("succeeded", "failed", "cancelled") for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"tasks not ended {RUN_TIMEOUT} s after the kill: {states}")
        time.sleep(0.2)
    (last,), = rows("SELECT max(finished_at) FROM tasks WHERE id::text = ANY(%s)", ids)
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    started = starts(swarm.root)
    successor = next(iter(swarm.views().values()))["principal"]
    return Run(took=last - killed_wall, bound=bound, states=counts, started_again=sum(started.get(t, 0) > 1 for t in ids),
               running_at_kill=running, new_principal_was=",".join(roles_before.get(successor, [])) or "-")


def starts(root: Path) -> dict[str, int]:
    """Task id -> how many times a Ki logged ``task.started`` for it, over every log of every node under ``root``."""
    out: dict[str, int] = {}
    for path in root.glob("*/node-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"task.started"' in line:
                try:
                    task_id = json.loads(line)["task_id"]
                except (ValueError, KeyError, TypeError):
                    continue
                out[task_id] = out.get(task_id, 0) + 1
    return out


def restart_and_settle(swarm: LocalSwarm, count: int) -> None:
    for name in set(swarm.nodes) - set(swarm.running()):
        swarm.start(name)
    swarm.wait_for(agreed(count), SETTLE_TIMEOUT)


def schema_rows(pg_url: str, schema: str) -> Callable[..., list[tuple]]:
    def rows(query: str, *params: object) -> list[tuple]:
        with psycopg.connect(pg_url) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            return conn.execute(query, params).fetchall()

    return rows


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--sleep", type=float, default=1.0, help="each echo task's sleep, seconds")
    ap.add_argument("--timings", choices=("test", "default"), default="test",
                    help="the test suite's swarm timings, or the project's defaults (as scripts/swarm)")
    ap.add_argument("--lease", type=float, help="compute.lease_seconds (default: 10 with test timings, 30 with default)")
    ap.add_argument("--keep", type=Path, help="put the nodes' data directories and logs here and keep them")
    args = ap.parse_args()
    lease = args.lease if args.lease is not None else (10.0 if args.timings == "test" else 30.0)
    schema, vhost = f"p2pnn_bench_{secrets.token_hex(4)}", f"p2pnn-bench-{os.getpid()}-{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = swarm_env(f"{AMQP_BASE}/{vhost}", lease, args.timings)
    bound = bound_of(env)
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            swarm = LocalSwarm(args.keep or Path(tmp), PG_URL, schema, name="bench", env=env)
            try:
                for i in range(args.nodes):
                    swarm.start(f"n{i}")
                swarm.wait_for(agreed(args.nodes), SETTLE_TIMEOUT)
                for k in range(args.runs):
                    run = kill_principal_under_load(swarm, schema_rows(PG_URL, schema), tasks=args.tasks, sleep=args.sleep,
                                                    bound=bound)
                    runs.append(run)
                    print(f"run {k + 1:2d}: {run.running_at_kill} running at the kill; every task ended "
                          f"{run.took:.2f} s after it (bound {run.bound:g} s): {run.states}, "
                          f"{run.started_again} started again; the new principal was {run.new_principal_was}", flush=True)
                    restart_and_settle(swarm, args.nodes)
            finally:
                swarm.stop_all()
    finally:
        rabbitmqctl("delete_vhost", vhost)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    ok = [r for r in runs if r.took <= r.bound and r.states == {"succeeded": args.tasks}]
    if runs:
        print(f"{len(ok)} of {len(runs)} runs: every task succeeded within the bound ({bound:g} s); "
              f"worst {max(r.took for r in runs):.2f} s, median {sorted(r.took for r in runs)[len(runs) // 2]:.2f} s")
    return 0 if len(ok) == len(runs) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
