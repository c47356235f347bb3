"""Training through real `p2pnn-node` processes: checkpoints that outlive a killed node, groups of ranks."""

from __future__ import annotations

import signal

import trio

from p2pnn.client import AsyncClient as Client
from tests.nodeutil import start_node_process, token

# About a second per epoch here: long enough to kill the node mid-run, short enough for a test.
LONG_TRAIN = {
    "kind": "train", "epochs": 30, "checkpoint_every": 2, "batch_size": 64,
    "model": {"name": "mlp", "hidden": [256, 256]},
    "dataset": {"name": "synthetic", "samples": 15000, "features": 64, "classes": 4},
}


async def _wait_epoch(client: Client, task_id: str, epoch: int, timeout: float = 300.0) -> dict:
    with trio.fail_after(timeout):
        while True:
            task = await client.get(task_id)
            if (task.get("progress") or {}).get("epoch", 0) >= epoch or task["state"] in ("succeeded", "failed"):
                return task
            await trio.sleep(0.1)


async def test_a_train_task_whose_node_is_killed_resumes_from_its_last_checkpoint(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "1"})
    try:
        async with Client(node.url, token(data, "operator")) as client:
            task = await client.submit(LONG_TRAIN)
            seen = await _wait_epoch(client, task["id"], 5)
            assert seen["state"] == "running", seen  # killed mid-run, not after it
            kept = await client.artifact(task["id"], "checkpoint.safetensors")
            assert kept[8:9] == b"{"  # safetensors, never a pickle
    finally:
        node.stop(signal.SIGKILL)

    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "1"})
    try:
        async with Client(node.url, token(data, "viewer")) as client:
            done = await client.wait(task["id"], timeout=600)
        assert done["state"] == "succeeded", done["error"]
        result = done["result"]
        assert result["resumed_at_epoch"] >= 4 and result["resumed_at_epoch"] % 2 == 0
        assert [e["epoch"] for e in result["epochs"]] == list(range(1, 31))  # the history survives too
        assert done["attempts"] == 2
    finally:
        node.stop()


async def test_a_lone_node_runs_a_group_of_two_ranks_on_its_two_slots(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "2"})
    try:
        async with Client(node.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "train", "epochs": 4, "workers": 2})
            done = await client.wait(task["id"], timeout=300)
            assert done["state"] == "succeeded", done["error"]
            assert done["result"]["workers"] == 2 and done["result"]["backend"] == "gloo"
            assert done["progress"]["workers"] == 2
            too_many = await client.submit({"kind": "train", "epochs": 1, "workers": 3})
            refused = await client.wait(too_many["id"], timeout=120)
            assert refused["state"] == "failed" and "min_workers" in refused["error"]
            shrunk = await client.submit({"kind": "train", "epochs": 1, "workers": 3, "min_workers": 2})
            ran = await client.wait(shrunk["id"], timeout=300)
            assert ran["state"] == "succeeded" and ran["result"]["workers"] == 2
    finally:
        node.stop()


async def test_a_sweep_runs_its_trials_as_child_tasks_stops_bad_ones_early_and_ranks_them(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "3"})
    sweep = {
        "kind": "sweep", "base": {"epochs": 12, "batch_size": 8, "checkpoint_every": 0}, "parallelism": 3, "trials": 6,
        # 1e-5 barely moves in 12 epochs: those trials (the grid's last two, 4 and 5) are the ones median
        # stopping should cut. Last, so that they are judged against trials that already ran, whatever the load.
        "space": {"lr": [3e-3, 1e-2, 1e-5], "model.hidden": [[16], [128]]},
        "early_stopping": {"rule": "median", "grace_epochs": 2, "min_trials": 2},
    }
    try:
        async with Client(node.url, token(data, "operator")) as client:
            task = await client.submit(sweep)
            done = await client.wait(task["id"], timeout=900)
            assert done["state"] == "succeeded", done["error"]
            children = (await client.list(parent=task["id"], limit=50))["tasks"]
            winner = await client.get(done["result"]["best"]["task_id"])
    finally:
        node.stop()
    result = done["result"]
    assert len(children) == 6 and {c["parent"] for c in children} == {task["id"]}
    assert {row["task_id"] for row in result["trials"]} == {c["id"] for c in children}
    assert result["stopped_early"] >= 1 and result["epochs_run"] < result["epochs_budget"]
    stopped = [row for row in result["trials"] if row["stopped_at_epoch"] is not None]
    assert all(row["state"] == "cancelled" and row["epochs"] < 12 for row in stopped)
    # The rule compares each trial with the others as far as they got, so which of the fair ones it also cuts
    # depends on timing; one of the two hopeless ones (lr 1e-5) at least is always cut.
    assert {row["trial"] for row in stopped} & {4, 5}
    best = result["best"]
    assert best["params"]["lr"] != 1e-5 and best["metric"] == max(r["metric"] for r in result["trials"] if r["metric"] is not None)
    assert winner["state"] == "succeeded" and "model.safetensors" in winner["artifacts"]


async def test_cancelling_a_sweep_cancels_its_trials(tmp_path):
    data = tmp_path / "n1"
    node = start_node_process(data, env={"P2PNN_COMPUTE__SLOTS": "2"})
    try:
        async with Client(node.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "sweep", "base": LONG_TRAIN, "space": {"lr": [1e-3, 2e-3, 3e-3]},
                                        "parallelism": 2})
            with trio.fail_after(120):
                while True:
                    children = (await client.list(parent=task["id"]))["tasks"]
                    if sum(c["state"] == "running" for c in children) >= 1:
                        break
                    await trio.sleep(0.2)
            await client.cancel(task["id"])
            done = await client.wait(task["id"], timeout=120)
            assert done["state"] == "cancelled"
            with trio.fail_after(120):
                while True:
                    children = (await client.list(parent=task["id"]))["tasks"]
                    if all(c["state"] == "cancelled" for c in children):
                        break
                    await trio.sleep(0.2)
            assert len(children) == 2  # the third was never started
    finally:
        node.stop()
