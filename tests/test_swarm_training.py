"""Data-parallel training over a swarm of real processes (RabbitMQ fan-out, PostgreSQL store)."""

from __future__ import annotations

import pytest
import trio

from p2pnn.client import AsyncClient as Client
from tests.swarmutil import BusSwarm, bus_swarm as swarm, until  # noqa: F401 (a fixture)

pytestmark = pytest.mark.postgres

# One slot per Ki, so a group of three must span three Ki; torch preloaded so ranks meet quickly.
KI_ENV = {"P2PNN_COMPUTE__PRELOAD_TORCH": "true", "P2PNN_COMPUTE__RENDEZVOUS_TIMEOUT_SECONDS": "30"}


async def _three_ki(swarm: BusSwarm) -> dict[str, str]:
    swarm.start("principal", "principal", slots=0)
    swarm.start("an", "an", slots=0)
    ids = {swarm.start(name, "ki", slots=1, **KI_ENV).node_id: name for name in ("ki1", "ki2", "ki3")}
    await until(lambda: swarm.metric("an", "p2pnn_an_kis") == 3, 60, "the An to see 3 Ki")
    return ids


async def test_three_ki_train_digits_as_one_group_and_match_a_single_process(swarm):
    await _three_ki(swarm)
    async with Client(swarm.nodes["principal"].url, timeout=60) as client:
        grouped = await client.submit({"kind": "train", "workers": 3})
        single = await client.submit({"kind": "train"})
        done = await client.wait_all([grouped["id"], single["id"]], timeout=600)
    group, alone = done[grouped["id"]], done[single["id"]]
    assert group["state"] == "succeeded", group["error"]
    assert alone["state"] == "succeeded", alone["error"]
    assert group["result"]["workers"] == 3 and group["result"]["backend"] == "gloo"
    joined = {e.get("task_id") for n in ("ki1", "ki2", "ki3") for e in swarm.nodes[n].events()
              if e.get("event") == "task.group_joined"}
    assert grouped["id"] in joined  # ranks ran on Ki other than rank 0's
    gap = abs(group["result"]["test_accuracy"] - alone["result"]["test_accuracy"])
    print(f"\ndigits, 3 ranks on 3 Ki: {group['result']['test_accuracy']:.4f}; one process: "
          f"{alone['result']['test_accuracy']:.4f}")
    assert gap <= 0.005 + 1e-9


async def test_a_group_that_loses_a_ki_resumes_from_its_checkpoint_with_the_survivors(swarm):
    ids = await _three_ki(swarm)
    spec = {"kind": "train", "workers": 3, "min_workers": 2, "epochs": 60, "checkpoint_every": 2, "max_attempts": 5,
            "dataset": {"name": "synthetic", "samples": 6000, "features": 32, "classes": 4},
            "model": {"name": "mlp", "hidden": [128, 128]}}
    async with Client(swarm.nodes["principal"].url, timeout=60) as client:
        task = await client.submit(spec)

        async def progressed(epoch: int) -> dict:
            with trio.fail_after(300):
                while True:
                    current = await client.get(task["id"])
                    if (current.get("progress") or {}).get("epoch", 0) >= epoch:
                        return current
                    await trio.sleep(0.2)

        running = await progressed(5)
        assert running["state"] == "running" and running["progress"]["workers"] == 3
        leader = swarm.rows("SELECT lease_owner FROM tasks WHERE id::text = %s", task["id"])[0][0]
        victim = next(name for node_id, name in ids.items() if node_id != leader)
        swarm.kill(victim)  # a Ki running one rank of the group, not the one holding the lease
        done = await client.wait(task["id"], timeout=900)
    assert done["state"] == "succeeded", done["error"]
    result = done["result"]
    print(f"\nlost {victim} at epoch >= 5: resumed at epoch {result['resumed_at_epoch']} with "
          f"{result['workers']} workers after {done['attempts']} attempts")
    assert result["workers"] == 2 and result["resumed_at_epoch"] >= 4
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, 61))


async def test_a_twenty_trial_sweep_on_three_ki_cuts_epochs_early_and_finds_a_better_model(swarm):
    await _three_ki(swarm)
    sweep = {
        "kind": "sweep", "trials": 20, "parallelism": 3, "seed": 3,
        "base": {"epochs": 20, "batch_size": 16, "checkpoint_every": 0},
        "space": {"lr": {"log_uniform": [1e-5, 3e-2]}, "model.hidden": [[32], [128], [256]]},
        "early_stopping": {"rule": "median", "grace_epochs": 3, "min_trials": 3},
    }
    async with Client(swarm.nodes["principal"].url, timeout=60) as client:
        task = await client.submit(sweep)
        default = await client.submit({"kind": "train"})
        done = await client.wait_all([task["id"], default["id"]], timeout=1800)
        children = (await client.list(parent=task["id"], limit=100))["tasks"]
    result, baseline = done[task["id"]]["result"], done[default["id"]]["result"]
    assert done[task["id"]]["state"] == "succeeded", done[task["id"]]["error"]
    owners = {row[0] for row in swarm.rows(
        "SELECT lease_owner FROM tasks WHERE parent_id::text = %s AND lease_owner IS NOT NULL", task["id"])}
    print(f"\nsweep: {len(children)} trials on {len(owners)} Ki, {result['stopped_early']} stopped early, "
          f"{result['epochs_run']}/{result['epochs_budget']} epochs run (saved {result['epochs_saved_fraction']:.2f}); "
          f"best {result['best']['metric']:.4f} {result['best']['params']} vs default spec "
          f"{baseline['test_accuracy']:.4f}")
    assert len(children) == 20 and len(owners) == 3
    assert result["epochs_saved_fraction"] >= 1 / 3
    assert result["best"]["metric"] > baseline["test_accuracy"]
