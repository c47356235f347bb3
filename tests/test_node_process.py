"""Real `p2pnn-node` processes: start, stop cleanly, die hard, come back; nothing accepted is lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import psycopg
import pytest
import trio

from p2pnn.client import AsyncClient
from tests.conftest import PG_URL
from tests.nodeutil import start_node_process, token


async def _wait_state(client: AsyncClient, task_id: str, state: str, timeout: float = 30.0) -> dict:
    with trio.fail_after(timeout):
        while True:
            task = await client.get(task_id)
            if task["state"] == state:
                return task
            await trio.sleep(0.05)


async def test_sigterm_hands_running_tasks_back_and_restart_finishes_them(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data)
    try:
        async with AsyncClient(node.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "echo", "payload": "survives", "sleep": 2})
            await _wait_state(client, task["id"], "running")
        assert node.stop(signal.SIGTERM) == 0
        events = [e["event"] for e in node.events()]
        assert "task.handed_back" in events and events[-1] == "node.stopped"
    finally:
        node.stop(signal.SIGKILL)

    node = start_node_process(data)
    try:
        async with AsyncClient(node.url, token(data, "viewer")) as client:
            done = await client.wait(task["id"], timeout=60)
        assert done["state"] == "succeeded" and done["result"]["payload"] == "survives"
        assert done["attempts"] == 1  # the handed-back attempt does not count
    finally:
        node.stop()


async def test_sigkilled_node_loses_nothing_after_restart(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data)
    async with AsyncClient(node.url, token(data, "operator")) as client:
        running = await client.submit({"kind": "echo", "payload": "was running", "sleep": 3})
        await _wait_state(client, running["id"], "running")
        waiting = await client.submit_many([{"kind": "echo", "payload": i, "sleep": 3} for i in range(4)])
    workers = node.worker_pids()
    node.stop(signal.SIGKILL)
    for pid in workers:  # workers die with their node
        with trio.fail_after(10):
            while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]:
                await trio.sleep(0.05)

    node = start_node_process(data)
    try:
        async with AsyncClient(node.url, token(data, "viewer")) as client:
            ids = [running["id"]] + [t["id"] for t in waiting]
            done = await client.wait_all(ids, timeout=90)
        assert all(t["state"] == "succeeded" for t in done.values())
        assert done[running["id"]]["attempts"] == 2  # its first attempt's lease lapsed
    finally:
        node.stop()


async def test_killed_worker_process_fails_the_attempt_and_the_task_is_retried(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "1"})
    try:
        async with AsyncClient(node.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "echo", "payload": "again", "sleep": 2})
            await _wait_state(client, task["id"], "running")
            (worker,) = node.worker_pids()
            os.kill(worker, signal.SIGKILL)
            done = await client.wait(task["id"], timeout=60)
            assert done["state"] == "succeeded" and done["attempts"] == 2

            doomed = await client.submit({"kind": "echo", "sleep": 30, "max_attempts": 1})
            await _wait_state(client, doomed["id"], "running")
            os.kill(node.worker_pids()[0], signal.SIGKILL)
            failed = await client.wait(doomed["id"], timeout=60)
            assert failed["state"] == "failed" and "SIGKILL" in failed["error"]
    finally:
        node.stop()


async def test_node_keeps_its_tasks_in_postgres_when_given_a_url(tmp_path, pg_schema):
    data = tmp_path / "n1"
    node = start_node_process(
        data, env={"P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": PG_URL, "P2PNN_STORE__SCHEMA": pg_schema},
    )
    try:
        async with AsyncClient(node.url, token(data, "operator")) as client:
            done = await client.wait((await client.submit({"kind": "echo", "payload": "in pg"}))["id"])
    finally:
        node.stop()
    assert not (data / "p2pnn.sqlite3").exists()
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute(f'SELECT state FROM "{pg_schema}".tasks WHERE id = %s', (done["id"],)).fetchone()
    assert row == ("succeeded",)


async def test_insecure_node_binds_loopback_only_and_warns(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, "--insecure", env={"P2PNN_API__HOST": "0.0.0.0"})
    try:
        assert node.url.startswith("http://127.0.0.1:")
        assert any(e["event"] == "api.insecure" and e["level"] == "warning" for e in node.events())
        async with AsyncClient(node.url) as client:  # no token at all
            done = await client.wait((await client.submit({"kind": "echo", "payload": 1}))["id"])
        assert done["state"] == "succeeded"
    finally:
        node.stop()


async def test_secure_node_needs_a_token_minted_by_the_cli(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data)
    try:
        minted = subprocess.run(
            [sys.executable, "-m", "p2pnn.cli", "token", "--role", "viewer", "--sub", "cli-user", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()
        async with AsyncClient(node.url, minted) as client:
            assert (await client.list())["tasks"] == []
        assert "eyJ" not in node.log_path.read_text()  # no token ever reaches the log
    finally:
        node.stop()


@pytest.mark.parametrize("command", ["run", "principal", "an", "ki", "init", "token", "demo"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "p2pnn.cli", command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: p2pnn-node" in out.stdout


def test_demo_trains_digits_to_95_percent_and_exits_0(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "p2pnn.cli", "demo"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    final = re.findall(r"^trained in .*; test accuracy ([0-9.]+)$", out.stdout, re.M)
    assert len(final) == 1, out.stdout  # said once
    assert float(final[0]) >= 0.95
    assert "predictions on 8 test images" in out.stdout


async def test_node_with_no_slots_accepts_tasks_but_runs_none(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, "--slots", "0")
    try:
        assert node.worker_pids() == []
        async with AsyncClient(node.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "echo"})
            queued = await _wait_state(client, task["id"], "queued")
            ready = await client._call("GET", "/ready")
        # Nothing to run it on, by construction rather than by waiting a while and seeing nothing.
        assert queued["attempts"] == 0 and (ready["slots"], ready["free_slots"]) == (0, 0)
        assert node.worker_pids() == []
        assert not [e for e in node.events() if e.get("event") == "task.started"]
    finally:
        node.stop()


async def test_every_queued_task_is_run_after_a_restart_even_past_one_page(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, "--slots", "0")  # accepts, runs nothing: all stay queued
    try:
        async with AsyncClient(node.url, token(data, "operator")) as client:
            ids = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": i} for i in range(600)])]
    finally:
        node.stop()
    node = start_node_process(data)
    try:
        async with AsyncClient(node.url, token(data, "viewer")) as client:
            done = await client.wait_all(ids, timeout=120)
        assert all(t["state"] == "succeeded" for t in done.values())
    finally:
        node.stop()
