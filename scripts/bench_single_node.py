#!/usr/bin/env python3
"""Benchmark one embedded node, side by side with plain torch, in one run.

Starts a real `p2pnn-node run` process (SQLite, in-process queue, 2 worker
slots) on a loopback port and prints:
  - echo tasks per second through the REST API to a terminal state, with one
    task per POST and with batches of 100 per POST;
  - submit -> done latency p50/p99 of single echo tasks, one at a time, as the
    client sees it: a POST then a long poll (GET ?wait=), and one POST ?wait=
    (Celery's figure on this machine comes from scripts/bench_throughput.py
    --sequential, which runs an embedded node beside the swarm and Celery);
  - the wall time of the demo's training task (digits, mlp, the default spec) through
    the node, submit to result, against the same training as a plain torch
    script (scripts/train_digits_plain.py), as ratios, with both accuracies
    (the node's workers import torch when they start, the script when it runs);
  - the daemon's idle RSS and whether it has torch loaded.
Measured once the workers have imported torch in the background (their preload) and gone quiet.

Usage: .venv/bin/python scripts/bench_single_node.py [--tasks 1000] [--latency-samples 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from p2pnn import config as config_mod
from p2pnn.api.auth import Authenticator
from p2pnn.client import AsyncClient
from p2pnn.launcher import start_node

ROOT = Path(__file__).resolve().parents[1]
CONCURRENT_SUBMITTERS = 8  # parallel HTTP clients for the one-task-per-POST run
BATCH = 100
TORCH_THREADS = 1  # the node's default compute.torch_threads; the plain script is given the same
# The default train spec: the plain script's defaults are the same training.
DEMO_SPEC = {"kind": "train", "model": {"name": "mlp"}, "dataset": {"name": "digits"}}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _has_torch(pid: int) -> bool:
    return "torch/lib" in Path(f"/proc/{pid}/maps").read_text()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _workers_settled(pid: int, timeout: float = 120.0) -> None:
    """Wait until the node's workers have imported torch in the background and gone quiet, so
    that the figures measure a warm node, not one whose workers still compete for the CPU."""
    with trio.move_on_after(timeout):
        while True:
            workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            before = sum(_cpu_seconds(w) for w in workers)
            await trio.sleep(0.5)
            if workers and all(_has_torch(w) for w in workers) and sum(_cpu_seconds(w) for w in workers) - before < 0.02:
                return


async def _drain(client: AsyncClient, ids: list[str], timeout: float = 600.0) -> float:
    """Wait until every task is terminal; return the latest finished_at."""
    done = await client.wait_all(ids, timeout=timeout)
    bad = [t for t in done.values() if t["state"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} tasks did not succeed, e.g. {bad[0]['state']}: {bad[0]['error']}")
    return max(t["finished_at"] for t in done.values())


async def echo_single(client: AsyncClient, n: int) -> float:
    ids: list[str] = []
    start = time.time()

    async def submitter(count: int) -> None:
        for _ in range(count):
            ids.append((await client.submit({"kind": "echo", "payload": "x"}))["id"])

    async with trio.open_nursery() as nursery:
        for i in range(CONCURRENT_SUBMITTERS):
            nursery.start_soon(submitter, n // CONCURRENT_SUBMITTERS + (i < n % CONCURRENT_SUBMITTERS))
    return n / (await _drain(client, ids) - start)


async def echo_batched(client: AsyncClient, n: int) -> float:
    start = time.time()
    ids: list[str] = []
    for i in range(0, n, BATCH):
        batch = [{"kind": "echo", "payload": "x"} for _ in range(min(BATCH, n - i))]
        ids += [t["id"] for t in await client.submit_many(batch)]
    return n / (await _drain(client, ids) - start)


async def latency(client: AsyncClient, samples: int) -> dict[str, tuple[float, float]]:
    """Echo tasks one at a time, submit -> done as the client sees it: p50, p99 of each way to wait."""
    out = {}
    for mode in ("POST then GET ?wait=", "one POST ?wait="):
        lat = []
        for _ in range(samples):
            start = time.time()
            if mode == "one POST ?wait=":  # submit and long poll in one request
                task = await client.submit({"kind": "echo", "payload": "x"}, wait=30)
            else:
                task = await client.submit({"kind": "echo", "payload": "x"})
                task = await client.get(task["id"], wait=30)  # one long poll: answered when the result lands
            assert task["state"] == "succeeded"
            lat.append(time.time() - start)  # as the client sees it
        q = statistics.quantiles(lat, n=100)
        out[mode] = (q[49], q[98])
    return out


async def training(client: AsyncClient) -> dict:
    start = time.perf_counter()
    task = await client.wait((await client.submit(DEMO_SPEC))["id"], timeout=600)
    wall = time.perf_counter() - start
    if task["state"] != "succeeded":
        raise RuntimeError(f"training {task['state']}: {task['error']}")
    return {"wall": wall, "train_seconds": task["result"]["seconds"], "accuracy": task["result"]["test_accuracy"]}


def plain_torch() -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_digits_plain.py"), "--threads", str(TORCH_THREADS)],
        capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall": wall, "train_seconds": result["seconds"], "accuracy": result["test_accuracy"]}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="p2pnn-bench-") as tmp:
        data = Path(tmp)
        node = start_node(data, env={"P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0",
                                     "P2PNN_COMPUTE__SLOTS": "2", "P2PNN_COMPUTE__TORCH_THREADS": str(TORCH_THREADS),
                                     "P2PNN_LOG__LEVEL": "warning"})
        try:
            await _workers_settled(node.proc.pid)
            idle_rss = _rss_mb(node.proc.pid)
            cfg = config_mod.load(env={}).replace("node", data_dir=str(data))
            token = Authenticator.from_config(cfg).mint("bench", "operator", 3600)
            async with AsyncClient(node.url, token) as client:
                await _drain(client, [(await client.submit({"kind": "echo"}))["id"]])  # warm up
                single = await echo_single(client, args.tasks)
                batched = await echo_batched(client, args.tasks)
                latencies = await latency(client, args.latency_samples)
                first = await training(client)
                second = await training(client)
            plain = plain_torch()
            torch_in_daemon = _has_torch(node.proc.pid)
        finally:
            node.stop()
    print(f"machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; node: 2 worker slots, SQLite; "
          f"torch threads per training: {TORCH_THREADS} (node slot and plain script alike)")
    print(f"daemon idle RSS: {idle_rss:.0f} MiB; torch loaded in daemon: {torch_in_daemon}")
    print(f"echo throughput, 1 task per POST ({CONCURRENT_SUBMITTERS} clients): {single:.0f} tasks/s ({args.tasks} tasks)")
    print(f"echo throughput, {BATCH} tasks per POST: {batched:.0f} tasks/s ({args.tasks} tasks)")
    for mode, (p50, p99) in latencies.items():
        print(f"submit->done latency, one at a time, {mode}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
              f"({args.latency_samples} tasks)")
    print("digits train (mlp, the default spec, seed 0):")
    print(f"  plain torch script: process wall {plain['wall']:.2f} s, training {plain['train_seconds']:.2f} s, accuracy {plain['accuracy']:.4f}")
    print(f"  p2pnn, first task : submit->done {first['wall']:.2f} s, training {first['train_seconds']:.2f} s, accuracy {first['accuracy']:.4f}")
    print(f"  p2pnn, second task: submit->done {second['wall']:.2f} s, training {second['train_seconds']:.2f} s, accuracy {second['accuracy']:.4f}")
    print(f"  ratio p2pnn/plain: first submit->done / plain training = {first['wall'] / plain['train_seconds']:.2f}; "
          f"second = {second['wall'] / plain['train_seconds']:.2f}; "
          f"first submit->done / plain process wall (torch import included) = {first['wall'] / plain['wall']:.2f}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="echo tasks per throughput run (default 1000)")
    parser.add_argument("--latency-samples", type=int, default=200, help="tasks for the latency run (default 200)")
    trio.run(main, parser.parse_args())
