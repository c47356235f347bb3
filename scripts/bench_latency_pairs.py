#!/usr/bin/env python3
"""Sequential submit->done latency of two (or more) versions of p2pnn, measured in pairs.

On a shared, noisy host the p50 of the same code moves by 2-3 ms between runs, more than most
changes to it. Here every version runs at once (an embedded node each, or a swarm each: an
API+An node and a Ki node on RabbitMQ and PostgreSQL), and one client alternates ``POST
/api/v1/tasks?wait=`` between them, so each sees the same host at the same time. The order
alternates too (A B, then B A), as a request right after another node's runs a little slower.

A version is a checkout of the repository: ``NAME=DIR`` (its nodes run DIR's code; the client is
this checkout's). Extra settings for one version: ``NAME=DIR:P2PNN_X=1,P2PNN_Y=2``.

Usage:
    .venv/bin/python scripts/bench_latency_pairs.py new=. old=/tmp/p2pnn-old [--swarm] [--requests 800]

    git worktree add /tmp/p2pnn-old HEAD~3     # one way to get an older checkout

Prints, per version: p50, p25 and mean latency in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bench  # noqa: E402 - the broker and database helpers

from p2pnn.client import AsyncClient  # noqa: E402
from p2pnn.node import READY_FILE  # noqa: E402

READY_SECONDS = 60.0
WARMUP = 50  # waited-for tasks per version before the measured ones: workers and connections warm


def start(code: Path, data: Path, env: dict[str, str], slots: int) -> tuple[subprocess.Popen, str]:
    """A ``p2pnn-node run`` of ``code``'s checkout; (process, API URL) once it is ready."""
    data.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pnn.cli", "run", "--data-dir", str(data), "--insecure", "--slots", str(slots)],
        cwd=code, env={**os.environ, "PYTHONPATH": str(code), **env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        try:
            return proc, json.loads((data / READY_FILE).read_text())["api"]
        except (OSError, ValueError, KeyError):
            if proc.poll() is not None:
                raise RuntimeError(f"the node of {code} exited with {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"the node of {code} was not ready within {READY_SECONDS:g} s")


def parse_version(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    where, _, settings = rest.partition(":")
    if not name or not where:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR[:VAR=VALUE,...], got {text!r}")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, Path(where).resolve(), env


async def measure(versions: list[tuple[str, Path, dict[str, str]]], requests: int, swarm: bool) -> None:
    procs: list[subprocess.Popen] = []
    made: list[tuple[str, str]] = []  # (vhost, database) of each swarm
    root = Path(tempfile.mkdtemp(prefix="p2pnn-pairs-"))
    common = {"P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
              "P2PNN_LOG__LEVEL": "warning", "P2PNN_LOG__FORMAT": "json"}
    try:
        urls = []
        for name, code, extra in versions:
            env = {**common, **extra}
            if swarm:
                tag = secrets.token_hex(3)
                vhost, db = f"pairs-{tag}", f"pairs_{tag}"
                bench.rabbitmqctl("add_vhost", vhost)
                bench.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
                bench.pg(f'CREATE DATABASE "{db}"', schema="public")
                made.append((vhost, db))
                env.update({"P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__URL": f"amqp://{bench.AMQP}/{vhost}",
                            "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": bench.db_url(db),
                            "P2PNN_STORE__SCHEMA": "p2pnn"})
                head, url = start(code, root / name / "head", {**env, "P2PNN_NODE__ROLE": "auto"}, 0)
                ki, _ = start(code, root / name / "ki", {**env, "P2PNN_NODE__ROLE": "ki"}, 2)
                procs += [head, ki]
            else:
                node, url = start(code, root / name, env, 2)
                procs.append(node)
            urls.append(url)
        clients = [AsyncClient(url, timeout=60) for url in urls]
        for client in clients:
            for i in range(WARMUP):
                await client.submit({"kind": "echo", "payload": i}, wait=30)
        latencies: list[list[float]] = [[] for _ in versions]
        for j in range(requests):
            order = range(len(versions)) if j % 2 == 0 else reversed(range(len(versions)))
            for i in order:
                sent = time.perf_counter()
                done = await clients[i].submit({"kind": "echo", "payload": j}, wait=30)
                latencies[i].append(time.perf_counter() - sent)
                assert done["state"] == "succeeded", done
        for client in clients:
            await client.aclose()
        path = "swarm path (API+An node, Ki node, RabbitMQ, PostgreSQL)" if swarm else "embedded node (SQLite)"
        print(f"{requests} sequential POST ?wait= per version, alternating, {path}:")
        for (name, code, _), values in zip(versions, latencies):
            values.sort()
            print(f"  {name:12s} p50 {values[len(values) // 2] * 1e3:6.2f}  p25 {values[len(values) // 4] * 1e3:6.2f}  "
                  f"mean {statistics.mean(values) * 1e3:6.2f} ms   ({code})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for vhost, db in made:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
            bench.pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', schema="public")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", type=parse_version, metavar="NAME=DIR[:VAR=VALUE,...]")
    parser.add_argument("--requests", type=int, default=800, help="measured requests per version (default 800)")
    parser.add_argument("--swarm", action="store_true", help="a swarm per version instead of an embedded node")
    args = parser.parse_args()
    if len({name for name, _, _ in args.versions}) != len(args.versions):
        parser.error("each version needs a name of its own")
    trio.run(measure, args.versions, args.requests, args.swarm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
