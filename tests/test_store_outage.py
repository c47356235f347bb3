"""Transient faults never kill a node: the store goes silent for 10 s under a running task.

The node reaches PostgreSQL through a TCP proxy this test owns (tests/tcpproxy.py)
and stops (SIGSTOP: connections stay open, nothing moves); the machine's
PostgreSQL itself stays up.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from p2pnn.client import AsyncClient
from tests.nodeutil import start_node_process

pytestmark = pytest.mark.postgres

OUTAGE_SECONDS = 10.0


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_a_ten_second_store_outage_during_a_task_leaves_the_node_up_and_the_task_finishes(
    tmp_path, postgres_url, pg_schema
):
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("tcpproxy.py")), "127.0.0.1", "0", "127.0.0.1", "5432"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(proxy.stdout.readline().split()[1])
        url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
        env = {
            "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": url, "P2PNN_STORE__SCHEMA": pg_schema,
            "P2PNN_STORE__STATEMENT_TIMEOUT_SECONDS": "2", "P2PNN_STORE__CONNECT_TIMEOUT_SECONDS": "2",
            "P2PNN_COMPUTE__LEASE_SECONDS": "30", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
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
    finally:
        proxy.kill()
        proxy.wait()
