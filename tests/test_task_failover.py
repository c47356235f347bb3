"""The principal of a 4-node swarm dies with tasks running: every task succeeds within
``stranded_after + lease`` of the kill, three times over (a new principal each time).

The runs are scripts/bench_task_failover.py's own (the script prints the figure over ten).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import trio

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NODES = 4
RUNS = 3
TASKS = 12
SLEEP = 1.0  # seconds each echo task takes
LEASE = 10.0  # compute.lease_seconds

_spec = importlib.util.spec_from_file_location(
    "bench_task_failover", Path(__file__).resolve().parents[1] / "scripts" / "bench_task_failover.py"
)
bench = sys.modules["bench_task_failover"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench)


async def test_every_task_succeeds_within_stranded_after_plus_lease_of_the_principals_death(
    tmp_path, postgres_url, pg_schema, amqp_url
):
    env = bench.swarm_env(amqp_url, LEASE)
    bound = bench.bound_of(env)
    swarm = bench.LocalSwarm(tmp_path, postgres_url, pg_schema, name="failover", env=env)
    rows = bench.schema_rows(postgres_url, pg_schema)
    runs = []
    try:
        for i in range(NODES):
            await trio.to_thread.run_sync(swarm.start, f"n{i}")
        await trio.to_thread.run_sync(swarm.wait_for, bench.agreed(NODES), bench.SETTLE_TIMEOUT)
        for k in range(RUNS):
            run = await trio.to_thread.run_sync(
                lambda: bench.kill_principal_under_load(swarm, rows, tasks=TASKS, sleep=SLEEP, bound=bound)
            )
            runs.append(run)
            print(f"\nrun {k + 1}: {run.running_at_kill} running at the kill; every task ended {run.took:.2f} s "
                  f"after it (bound {bound:g} s): {run.states}, {run.started_again} started again; "
                  f"the new principal was {run.new_principal_was}")
            assert run.states == {"succeeded": TASKS}, run
            assert run.took <= bound, f"run {k + 1}: the last task ended {run.took:.2f} s after the kill"
            await trio.to_thread.run_sync(bench.restart_and_settle, swarm, NODES)
    finally:
        await trio.to_thread.run_sync(swarm.stop_all)
