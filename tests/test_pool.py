"""Specification of KiPool: real worker processes, real signals, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from p2pnn.compute.pool import Job, KiPool, Outcome, user_error
from p2pnn.tasks import Limits, validate_spec

LIMITS = Limits()


@asynccontextmanager
async def running_pool(
    workdir: Path, slots: int = 2, limits: Limits = LIMITS, preload_torch: bool = False
) -> AsyncIterator[KiPool]:
    pool = KiPool(slots, 1, limits, workdir, preload_torch=preload_torch)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


def echo(task_id: str, payload: Any = None, sleep: float = 0.0) -> Job:
    return Job(task_id, 1, validate_spec({"kind": "echo", "payload": payload, "sleep": sleep}, LIMITS))


async def ignore(progress: dict[str, Any]) -> None:
    pass


async def until_running(pool: KiPool, task_id: str) -> int:
    with trio.fail_after(10):
        while (pid := pool.pid_of(task_id)) is None:
            await trio.sleep(0.01)
    return pid


async def start_long_echo(pool: KiPool, nursery: trio.Nursery, task_id: str, results: dict[str, Outcome]) -> int:
    """Start a 30 s echo in ``nursery`` (its Outcome lands in ``results``); its worker's pid once it runs."""

    async def run() -> None:
        results[task_id] = await pool.execute(echo(task_id, sleep=30), ignore)

    nursery.start_soon(run)
    return await until_running(pool, task_id)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_echo_jobs_run_concurrently_across_slots(tmp_path: Path) -> None:
    async with running_pool(tmp_path) as pool:
        assert pool.slots == 2 and pool.free_slots == 2 and len(set(pool.worker_pids())) == 2
        outcomes: dict[str, Outcome] = {}

        async def run(job: Job) -> None:
            outcomes[job.task_id] = await pool.execute(job, ignore)

        async with trio.open_nursery() as nursery:
            for name in ("a", "b"):
                nursery.start_soon(run, echo(name, payload={"name": name}, sleep=60))
            # Side by side, not one after the other: both run at once, each in its own worker.
            with trio.fail_after(30):
                while pool.pid_of("a") is None or pool.pid_of("b") is None:
                    await trio.sleep(0.01)
            assert pool.pid_of("a") != pool.pid_of("b") and pool.free_slots == 0
            assert pool.cancel("a") and pool.cancel("b")
        assert outcomes["a"].status == outcomes["b"].status == "cancelled"

        async with trio.open_nursery() as nursery:
            for name in ("c", "d"):
                nursery.start_soon(run, echo(name, payload={"name": name}))
    assert outcomes["c"] == Outcome("succeeded", result={"payload": {"name": "c"}})
    assert outcomes["d"].result == {"payload": {"name": "d"}}


async def test_worker_killed_mid_task_crashes_the_task_and_is_replaced(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1) as pool:
        results: dict[str, Outcome] = {}
        async with trio.open_nursery() as nursery:
            victim = await start_long_echo(pool, nursery, "long", results)
            os.kill(victim, signal.SIGKILL)
        outcome = results["long"]
        assert outcome.status == "crashed" and outcome.retryable
        assert outcome.error == f"worker process {victim} exited with signal SIGKILL"

        after = await pool.execute(echo("next", payload=1), ignore)
        assert after.status == "succeeded" and after.result == {"payload": 1}
        assert len(pool.worker_pids()) == 1 and victim not in pool.worker_pids()


async def test_idle_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1) as pool:
        (victim,) = pool.worker_pids()
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(10):
            while pool.worker_pids() in ([], [victim]) or pool.free_slots != 1:
                await trio.sleep(0.01)
        assert (await pool.execute(echo("after"), ignore)).status == "succeeded"


async def test_cancel_stops_a_running_task(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1) as pool:
        results: dict[str, Outcome] = {}
        async with trio.open_nursery() as nursery:
            victim = await start_long_echo(pool, nursery, "long", results)
            assert pool.cancel("long") is True
        assert results["long"].status == "cancelled" and not results["long"].retryable
        assert not alive(victim)
        assert pool.cancel("long") is False  # it is gone
        assert (await pool.execute(echo("next"), ignore)).status == "succeeded"


async def test_cancel_of_a_queued_task_never_starts_it(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1) as pool:
        results: dict[str, Outcome] = {}

        async def run(job: Job) -> None:
            results[job.task_id] = await pool.execute(job, ignore)

        async with trio.open_nursery() as nursery:
            await start_long_echo(pool, nursery, "running", results)
            nursery.start_soon(run, echo("queued"))
            # The one slot is busy for 30 s: once the pool knows the job, it can only be waiting.
            with trio.fail_after(10):
                while not pool.cancel("queued"):
                    await trio.sleep(0.01)
            assert pool.pid_of("queued") is None
            assert pool.cancel("running") is True
        assert results["queued"] == Outcome("cancelled", error="cancelled before it started")
        assert results["running"].status == "cancelled"


async def test_a_caller_that_gives_up_takes_its_task_down_with_it(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1) as pool:
        async with trio.open_nursery() as nursery:
            victim = await start_long_echo(pool, nursery, "abandoned", {})
            nursery.cancel_scope.cancel()
        assert pool.pid_of("abandoned") is None
        assert (await pool.execute(echo("next"), ignore)).status == "succeeded"
        assert victim not in pool.worker_pids()


async def test_wall_time_cap_kills_the_task_as_timeout(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1, limits=Limits(max_wall_seconds=0.5)) as pool:
        outcome = await pool.execute(echo("slow", sleep=5), ignore)
        assert outcome.status == "timeout" and not outcome.retryable
        assert "max_wall_seconds=0.5" in (outcome.error or "")
        assert (await pool.execute(echo("quick"), ignore)).status == "succeeded"


async def test_bad_job_is_a_clear_error_and_the_worker_stays_alive(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=1, limits=Limits(max_epochs=2)) as pool:
        (pid,) = pool.worker_pids()
        unknown = await pool.execute(Job("x", 1, {"kind": "dance"}), ignore)
        assert unknown == Outcome("failed", error="spec.kind: unknown kind 'dance'", retryable=False)
        too_long = await pool.execute(Job("y", 1, validate_spec({"kind": "train", "epochs": 5}, LIMITS)), ignore)
        assert too_long == Outcome("failed", error="spec.epochs: 5 is more than the limit of 2", retryable=False)
        assert pool.worker_pids() == [pid]
        assert (await pool.execute(echo("z"), ignore)).status == "succeeded"


async def test_training_relays_progress_and_returns_weights_that_evaluate_reads(tmp_path: Path) -> None:
    train_spec = validate_spec({"kind": "train", "epochs": 2}, LIMITS)
    progress: list[dict[str, Any]] = []

    async def collect(p: dict[str, Any]) -> None:
        progress.append(p)

    async with running_pool(tmp_path / "pool", slots=1) as pool:
        trained = await pool.execute(Job("t", 1, train_spec), collect)
        assert trained.status == "succeeded", trained.error
        assert [p["epoch"] for p in progress] == [1, 2]
        weights = trained.artifacts["model.safetensors"]
        assert weights[8:9] == b"{"  # a safetensors header, not a pickle
        evaluate = validate_spec({"kind": "evaluate", "model_task": "t"}, LIMITS)
        measured = await pool.execute(Job("e", 1, evaluate, model_file=weights, source_spec=train_spec), ignore)
        assert measured.status == "succeeded", measured.error
        assert measured.result is not None and trained.result is not None
        assert measured.result["accuracy"] == trained.result["test_accuracy"]
    assert list((tmp_path / "pool").iterdir()) == []  # every attempt cleaned up after itself


async def test_stopping_the_pool_stops_every_worker(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=2) as pool:
        pids = pool.worker_pids()
        assert all(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in pids)


def test_workers_die_with_a_daemon_that_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, trio
        from pathlib import Path
        from p2pnn.compute.pool import KiPool
        from p2pnn.tasks import Limits

        async def main():
            pool = KiPool(1, 1, Limits(), Path({str(tmp_path)!r}))
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                print(pool.worker_pids()[0], flush=True)
                await trio.sleep_forever()

        trio.run(main)
        """
    )
    daemon = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        worker = int(daemon.stdout.readline())  # type: ignore[union-attr]
        assert alive(worker)
    finally:
        daemon.kill()
        daemon.wait()
    deadline = time.monotonic() + 30  # the kernel signals at once; the margin is for a loaded machine
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(worker)


def test_native_stack_frames_are_cut_from_the_error_a_user_reads() -> None:
    # A genuine torch error with its C++ stack trace on, made in a process of its own (this one stays torch-free).
    probe = textwrap.dedent("""
        import torch
        try:
            torch.nn.Linear(6, 3)(torch.zeros(2, 5))
        except RuntimeError as exc:
            print(" ".join(f"RuntimeError: {exc}".split()))
    """)
    env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_DISABLE_ADDR2LINE": "1"}
    raw = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env, timeout=300).stdout
    assert "Exception raised from" in raw  # the frames are really there to be cut
    assert user_error(raw.strip()) == "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 6x3)"
    assert user_error("spec.epochs: 5 is more than the limit of 2") == "spec.epochs: 5 is more than the limit of 2"
    assert user_error("Exception raised from f at x.cpp:1 frame #0: c10::Error") == "the task failed inside a native library"


def test_the_daemon_side_never_imports_torch() -> None:
    probe = "import sys, p2pnn.compute.pool, p2pnn.compute; print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'p2pnn.nn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _has_torch(pid: int) -> bool:
    return "torch/lib" in Path(f"/proc/{pid}/maps").read_text()


async def test_preloading_workers_import_torch_before_their_first_job(tmp_path: Path) -> None:
    async with running_pool(tmp_path / "lazy", slots=1) as lazy, running_pool(
        tmp_path / "eager", slots=1, preload_torch=True
    ) as eager:
        with trio.fail_after(60):
            while not _has_torch(eager.worker_pids()[0]):
                await trio.sleep(0.1)
        # echo jobs are served while (and after) torch loads
        assert (await eager.execute(echo("e1", "x"), ignore)).status == "succeeded"
        assert not _has_torch(lazy.worker_pids()[0])


async def test_a_pool_of_no_slots_runs_nothing_and_starts_no_process(tmp_path: Path) -> None:
    async with running_pool(tmp_path, slots=0) as pool:
        assert pool.slots == 0 and pool.worker_pids() == []


# --- checkpoints and data-parallel groups ---------------------------------------


async def test_checkpoints_reach_the_caller_and_a_later_attempt_resumes_from_one(tmp_path: Path) -> None:
    spec = validate_spec({"kind": "train", "epochs": 3, "checkpoint_every": 1, "model": {"name": "mlp", "hidden": [16]}}, LIMITS)
    checkpoints: list[tuple[int, bytes]] = []

    async def keep(epoch: int, data: bytes) -> None:
        checkpoints.append((epoch, data))

    async with running_pool(tmp_path / "pool", slots=1) as pool:
        whole = await pool.execute(Job("t", 1, spec), ignore, keep)
        assert whole.status == "succeeded", whole.error
        assert [e for e, _ in checkpoints] == [1, 2] and checkpoints[0][1][8:9] == b"{"
        resumed = await pool.execute(Job("t", 2, spec, resume_file=checkpoints[1][1]), ignore)
        assert resumed.status == "succeeded", resumed.error
    assert resumed.result is not None and whole.result is not None
    assert resumed.result["resumed_at_epoch"] == 2 and resumed.result["epochs"] == whole.result["epochs"]
    assert list((tmp_path / "pool").iterdir()) == []


async def test_a_group_of_two_ranks_on_one_node_trains_like_one_process(tmp_path: Path) -> None:
    spec = validate_spec({"kind": "train", "epochs": 8, "workers": 2}, LIMITS)
    single = validate_spec({"kind": "train", "epochs": 8}, LIMITS)
    progress: list[dict[str, Any]] = []

    async def collect(p: dict[str, Any]) -> None:
        progress.append(p)

    async with running_pool(tmp_path / "pool", slots=2) as pool:
        grouped = await pool.execute_group(Job("g", 1, spec), 2, collect)
        assert grouped.status == "succeeded", grouped.error
        alone = await pool.execute(Job("s", 1, single), ignore)
    assert grouped.result is not None and alone.result is not None
    assert grouped.result["workers"] == 2 and grouped.result["backend"] == "gloo"
    assert [p["epoch"] for p in progress] == list(range(1, 9)) and progress[0]["workers"] == 2
    assert "model.safetensors" in grouped.artifacts
    assert abs(grouped.result["test_accuracy"] - alone.result["test_accuracy"]) <= 0.005 + 1e-9


async def test_two_groups_competing_for_the_slots_both_finish(tmp_path: Path) -> None:
    spec = validate_spec({"kind": "train", "epochs": 1, "workers": 2, "model": {"name": "mlp", "hidden": [8]}}, LIMITS)
    outcomes: dict[str, Outcome] = {}

    async with running_pool(tmp_path / "pool", slots=3) as pool:

        async def run(task_id: str) -> None:
            outcomes[task_id] = await pool.execute_group(Job(task_id, 1, spec), 2, ignore)

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for name in ("a", "b"):
                    nursery.start_soon(run, name)
        too_big = await pool.execute_group(Job("c", 1, spec), 4, ignore)
    assert {k: o.status for k, o in outcomes.items()} == {"a": "succeeded", "b": "succeeded"}, outcomes
    assert too_big.status == "failed" and "do not fit" in (too_big.error or "")


async def test_a_killed_rank_ends_its_group_at_once_as_a_retryable_crash(tmp_path: Path) -> None:
    spec = validate_spec({"kind": "train", "epochs": 200, "workers": 2, "dataset": {"name": "synthetic", "samples": 20000}}, LIMITS)
    async with running_pool(tmp_path / "pool", slots=2) as pool:
        outcome: list[Outcome] = []

        async def run() -> None:
            outcome.append(await pool.execute_group(Job("g", 1, spec), 2, ignore))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(60):
                while (pid := pool.pid_of("g", rank=1)) is None:
                    await trio.sleep(0.05)
            peer = pool.pid_of("g", rank=0)
            await trio.sleep(2)  # let the group form, so rank 0 would otherwise wait in a collective
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(60):  # far less than the rendezvous timeout: the peer is killed, not waited out
                while not outcome:
                    await trio.sleep(0.05)
    assert outcome[0].status == "crashed" and outcome[0].retryable
    assert peer is not None and not alive(peer)
