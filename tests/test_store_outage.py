"""Transient faults never kill a node: the store goes silent for 10 s under running tasks.

The nodes reach PostgreSQL through a TCP proxy this test owns (tests/tcpproxy.py)
and stops (SIGSTOP: connections stay open, nothing moves); the machine's
PostgreSQL itself stays up. One node alone, then a swarm of real processes on
RabbitMQ (a principal, an An, two Ki), all through the one proxy.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from p2pnn.client import AsyncClient
from tests.nodeutil import start_node_process
from tests.swarmutil import BusSwarm

pytestmark = pytest.mark.postgres

OUTAGE_SECONDS = 10.0
TASK_LEASE = "30"  # seconds: a lease outlives the outage, so a task that kept running is not run again


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """(the proxy process, the PostgreSQL URL through it); SIGSTOP it to silence the store."""
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("tcpproxy.py")), "127.0.0.1", "0", "127.0.0.1", "5432"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(proxy.stdout.readline().split()[1])
        yield proxy, postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    finally:
        proxy.send_signal(signal.SIGCONT)
        proxy.kill()
        proxy.wait()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_a_ten_second_store_outage_during_a_task_leaves_the_node_up_and_the_task_finishes(
    tmp_path, pg_proxy, pg_schema
):
    proxy, url = pg_proxy
    env = {
        "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": url, "P2PNN_STORE__SCHEMA": pg_schema,
        "P2PNN_STORE__STATEMENT_TIMEOUT_SECONDS": "2", "P2PNN_STORE__CONNECT_TIMEOUT_SECONDS": "2",
        "P2PNN_COMPUTE__LEASE_SECONDS": TASK_LEASE, "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
    }
    node = await trio.to_thread.run_sync(lambda: start_node_process(tmp_path / "n", "--insecure", env=env))
    try:
        async with AsyncClient(node.url, timeout=60) as client, httpx.AsyncClient(base_url=node.url, timeout=30) as http:
            task = await client.submit({"kind": "echo", "payload": "through", "sleep": 5})
            with trio.fail_after(30):
                while (await client.get(task["id"]))["state"] != "running":
                    await trio.sleep(0.1)

            proxy.send_signal(signal.SIGSTOP)
            stalled_at = time.monotonic()
            ready_codes = set()
            while time.monotonic() - stalled_at < OUTAGE_SECONDS:
                ready_codes.add((await http.get("/ready")).status_code)
                assert node.proc.poll() is None, "the node exited during the outage"
                await trio.sleep(0.5)
            proxy.send_signal(signal.SIGCONT)

            done = await client.wait(task["id"], timeout=60)
            assert done["state"] == "succeeded" and done["result"]["payload"] == "through", done
            assert done["attempts"] == 1, "the attempt survived the outage; nothing ran twice"
            assert 503 in ready_codes, f"/ready answered {ready_codes} while the store was silent"
            with trio.fail_after(30):
                while (await http.get("/ready")).status_code != 200:
                    await trio.sleep(0.5)
            faults = _metric((await http.get("/metrics")).text, "p2pnn_transient_faults_total")
            assert faults >= 1
        assert node.proc.poll() is None
        print(f"\nstore outage {OUTAGE_SECONDS:g} s: /ready answered {sorted(ready_codes)}, "
              f"transient faults counted {faults:g}, task {done['state']} after 1 attempt")
    finally:
        proxy.send_signal(signal.SIGCONT)
        await trio.to_thread.run_sync(node.stop)


def _runs(swarm: BusSwarm, event: str) -> collections.Counter:
    """How many times each task logged ``event`` (task.started, task.finished) over every node of the swarm."""
    return collections.Counter(
        e["task_id"] for node in swarm.nodes.values() for e in node.events() if e.get("event") == event
    )


@pytest.mark.slow
async def test_a_ten_second_store_outage_under_a_running_swarm_kills_no_node_and_runs_nothing_twice(
    tmp_path, pg_proxy, pg_schema, amqp_url
):
    """A principal, an An and two Ki of two slots, every one of them reaching the store through the proxy;
    four tasks running and four waiting when it goes silent."""
    proxy, url = pg_proxy
    env = {
        "P2PNN_STORE__URL": url, "P2PNN_STORE__STATEMENT_TIMEOUT_SECONDS": "2",
        "P2PNN_STORE__CONNECT_TIMEOUT_SECONDS": "2", "P2PNN_COMPUTE__LEASE_SECONDS": TASK_LEASE,
    }
    swarm = BusSwarm(tmp_path, amqp_url, pg_schema)
    try:
        for name, role, slots in (("principal", "principal", 0), ("an", "an", 0), ("ki1", "ki", 2), ("ki2", "ki", 2)):
            await trio.to_thread.run_sync(lambda: swarm.start(name, role, slots=slots, **env))
        with trio.fail_after(60):
            while swarm.metric("an", "p2pnn_an_kis") != 2:
                await trio.sleep(0.2)
        async with AsyncClient(swarm.nodes["an"].url, timeout=60) as client:
            ids = [t["id"] for t in await client.submit_many(
                [{"kind": "echo", "payload": i, "sleep": 6} for i in range(8)]
            )]
            with trio.fail_after(60):
                while (running := [s for (s,) in swarm.rows("SELECT state FROM tasks")].count("running")) < 4:
                    await trio.sleep(0.1)

            proxy.send_signal(signal.SIGSTOP)
            stalled_at = time.monotonic()
            not_ready: set[str] = set()
            async with httpx.AsyncClient(timeout=30) as http:
                while time.monotonic() - stalled_at < OUTAGE_SECONDS:
                    for name, node in swarm.nodes.items():
                        assert node.proc.poll() is None, f"{name} exited during the outage"
                        if (await http.get(f"{node.url}/ready")).status_code == 503:
                            not_ready.add(name)
                    await trio.sleep(0.5)
            proxy.send_signal(signal.SIGCONT)
            healed_at = time.monotonic()

            done = await client.wait_all(ids, timeout=120)
            settled = time.monotonic() - healed_at
            assert {t["state"] for t in done.values()} == {"succeeded"}, done
            assert {t["attempts"] for t in done.values()} == {1}, "a task was taken again after the outage"
            with trio.fail_after(10):  # a Ki logs its finish a moment after the store shows it
                while not all((finished := _runs(swarm, "task.finished"))[t] for t in ids):
                    await trio.sleep(0.2)
            started = _runs(swarm, "task.started")
            assert all(started[t] == 1 and finished[t] == 1 for t in ids), (started, finished)
            # The swarm still works once the store is back.
            after = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i} for i in range(4)])]
            assert {t["state"] for t in (await client.wait_all(after, timeout=60)).values()} == {"succeeded"}
        exited = {name: node.proc.returncode for name, node in swarm.nodes.items() if node.proc.poll() is not None}
        assert exited == {}, f"nodes exited: {exited}"
        assert not_ready, "no node's /ready said the store was unreachable during the outage"
        print(f"\nstore outage {OUTAGE_SECONDS:g} s under a swarm of {len(swarm.nodes)}: {running} tasks running at the cut, "
              f"not ready during it: {sorted(not_ready)}, all 8 succeeded {settled:.1f} s after the store came back, "
              f"each started once")
    finally:
        proxy.send_signal(signal.SIGCONT)
        await trio.to_thread.run_sync(swarm.stop_all)
