"""Tasks that fail in the worker, as a user and an operator see them: a clear error, a readable log."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
import trio

from p2pnn.client import AsyncClient
from p2pnn.node import run_node
from tests.nodeutil import node_config, start_node_process, token

TINY_TRAIN = {
    "kind": "train", "model": {"name": "mlp", "hidden": [8]}, "epochs": 1, "seed": 1,
    "dataset": {"name": "synthetic", "samples": 100, "features": 6, "classes": 2},
}
MODEL = "model.safetensors"
EVENT_WAIT = 30.0  # seconds for a worker's stderr to reach the node's log on a loaded machine


def _set_artifact(db_path: Path, task_id: str, data: bytes | None) -> None:
    """Replace (or, with None, delete) a stored artifact, as a disk fault or an operator might."""
    with sqlite3.connect(db_path, timeout=30) as db:
        if data is None:
            changed = db.execute("DELETE FROM artifacts WHERE task_id = ? AND name = ?", (task_id, MODEL)).rowcount
        else:
            changed = db.execute("UPDATE artifacts SET data = ?, size = ? WHERE task_id = ? AND name = ?",
                                 (data, len(data), task_id, MODEL)).rowcount
    assert changed == 1


async def test_evaluate_and_infer_of_a_missing_artifact_fail_with_a_clear_error(nursery, tmp_path):
    data_dir = tmp_path / "node"
    handle = await nursery.start(run_node, node_config(data_dir))
    async with AsyncClient(handle.api_url, token(data_dir, "operator")) as client:
        trained = await client.wait((await client.submit(TINY_TRAIN))["id"], timeout=120)
        assert trained["state"] == "succeeded", trained["error"]
        await trio.to_thread.run_sync(_set_artifact, data_dir / "p2pnn.sqlite3", trained["id"], None)
        specs = [
            {"kind": "evaluate", "model_task": trained["id"], "max_attempts": 3},
            {"kind": "infer", "model_task": trained["id"], "inputs": [[0.5] * 6], "max_attempts": 3},
        ]
        for spec in specs:
            done = await client.wait((await client.submit(spec))["id"], timeout=60)
            assert done["state"] == "failed"
            assert done["error"] == f"model task {trained['id']} has no {MODEL} artifact"
            assert done["attempts"] == 1  # not retried: another try cannot find what is gone


async def test_a_worker_traceback_is_one_json_event_and_the_user_sees_one_line(tmp_path):
    data_dir = tmp_path / "node"
    node = start_node_process(data_dir)
    try:
        async with AsyncClient(node.url, token(data_dir, "operator")) as client:
            trained = await client.wait((await client.submit(TINY_TRAIN))["id"], timeout=120)
            assert trained["state"] == "succeeded", trained["error"]
            # A corrupt weights file makes the worker fail inside safetensors, with a traceback on its stderr.
            await trio.to_thread.run_sync(_set_artifact, data_dir / "p2pnn.sqlite3", trained["id"], b"\x00" * 64)
            done = await client.wait((await client.submit({"kind": "evaluate", "model_task": trained["id"]}))["id"], timeout=60)
        assert done["state"] == "failed"
        assert "\n" not in done["error"] and "Traceback" not in done["error"] and 0 < len(done["error"]) <= 500

        with trio.fail_after(EVENT_WAIT):
            while not [e for e in node.events() if e.get("event") == "worker.stderr" and "Traceback" in e.get("text", "")]:
                await trio.sleep(0.1)
    finally:
        node.stop()
    lines = node.log_path.read_text(errors="replace").splitlines()
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, not_json[:5]
    [event] = [e for e in node.events() if e.get("event") == "worker.stderr" and "Traceback" in e.get("text", "")]
    assert event["level"] == "warning" and event["pid"] > 0 and event["node"]
    # the whole traceback, to its last line (the exception), in that one event
    assert event["text"].splitlines()[-1].split(":")[0].endswith(("Error", "Exception"))


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("spec, field", [
    ({"kind": "train", "dataset": {"name": "synthetic", "samples": 5001, "features": 1}}, "spec.dataset.samples"),
    ({"kind": "echo", "sleep": 3601}, "spec.sleep"),
    ({"kind": "echo", "max_attempts": 21}, "spec.max_attempts"),
    ({"kind": "echo", "max_attempts": 0}, "spec.max_attempts"),
])
async def test_spec_caps_are_enforced_at_submission(nursery, tmp_path, spec, field):
    data_dir = tmp_path / "node"
    cfg = node_config(data_dir, compute={"max_samples": 5000, "max_wall_seconds": 3600.0})
    handle = await nursery.start(run_node, cfg)
    async with AsyncClient(handle.api_url, token(data_dir, "operator")) as client:
        with pytest.raises(Exception) as err:
            await client.submit(spec)
        assert getattr(err.value, "status", None) == 400
        assert err.value.body["field"] == field
        at_cap = {**spec}
        if field == "spec.max_attempts":
            at_cap["max_attempts"] = 20 if spec["max_attempts"] > 20 else 1
            assert (await client.submit(at_cap))["max_attempts"] == at_cap["max_attempts"]


def _steal(db_path: Path, task_id: str) -> None:
    """What another node that took the task over leaves in its row: the next attempt, its name, its lease."""
    with sqlite3.connect(db_path, timeout=30) as db:
        changed = db.execute(
            "UPDATE tasks SET attempts = attempts + 1, lease_owner = 'another-node', lease_expires_at = lease_expires_at + 3600 "
            "WHERE id = ? AND state = 'running'", (task_id,),
        ).rowcount
    assert changed == 1


async def test_a_task_whose_lease_was_lost_is_stopped_and_its_result_dropped(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="p2pnn")
    data_dir = tmp_path / "node"
    handle = await nursery.start(run_node, node_config(data_dir, compute={"slots": 1, "lease_seconds": 3.0}))
    async with AsyncClient(handle.api_url, token(data_dir, "operator")) as client:
        task = await client.submit({"kind": "echo", "sleep": 600})
        with trio.fail_after(60):
            while (await client.get(task["id"]))["state"] != "running":
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(_steal, data_dir / "p2pnn.sqlite3", task["id"])
        # The next renewal finds the lease gone: the worker is stopped and the one slot is free again,
        # long before the 600 s echo would have ended on its own.
        with trio.fail_after(60):
            while (await client._call("GET", "/ready"))["free_slots"] != 1:
                await trio.sleep(0.1)
        row = await client.get(task["id"])
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("running", "another-node", 2)  # the new owner's, untouched
    events = [(r.getMessage(), getattr(r, "p2pnn_fields", {})) for r in caplog.records]
    assert ("task.stopping", "lease lost") in [(name, f.get("reason")) for name, f in events if f.get("task_id") == task["id"]]
    assert any(name == "task.result_dropped" and f.get("task_id") == task["id"] for name, f in events)
