"""Start `p2pnn-node` processes and wait until they serve: for the local swarm script, benchmarks and tests.

A node started here logs JSON events to a file; it is ready once it has
written ``<data_dir>/node.json`` with its pid and the API address it bound
(so port 0 works, whatever the log level).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnn import config as config_mod
from p2pnn.api.auth import Authenticator
from p2pnn.client import Client, ClientError
from p2pnn.node import READY_FILE

READY_TIMEOUT = 60.0  # a cold start imports the stack and spawns the worker processes
POLL_SECONDS = 0.05
BOOTSTRAP_PEERS = 3  # a node of a LocalSwarm joins through (up to) this many nodes started before it


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    log_path: Path
    url: str = ""
    node_id: str = ""
    info: dict = field(default_factory=dict)  # the ready file: pid, node_id, api and, in a swarm, dht and peer

    def events(self) -> list[dict]:
        """Every JSON event the node has logged so far (other lines are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def worker_pids(self) -> list[int]:
        """The node's child processes: its task workers."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (if still running) and wait; SIGKILL if it outlives ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_node(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    command: str = "run",
    timeout: float = READY_TIMEOUT,
) -> NodeProcess:
    """Start `p2pnn-node <command> --data-dir DIR ARGS` and return once its API answers.

    ``env`` is added to this process's environment, P2PNN_* variables
    included, and wins over them: a benchmark run as ``P2PNN_X=... script``
    tunes every node it starts, while what the caller sets in ``env`` (the
    store, the bus, the ports a test gave the node) stays what it set.

    Error handling: raises RuntimeError (with the node's log) when the node
    exits during start-up, TimeoutError when it is not ready in ``timeout``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"node-{time.time_ns()}.log"
    full_env = {**os.environ, "P2PNN_LOG__FORMAT": "json", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pnn.cli", command, "--data-dir", str(data_dir), *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True,
        )
    node = NodeProcess(proc, log_path)
    ready_file = data_dir / READY_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads(ready_file.read_text())
        except (FileNotFoundError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:  # not a file left by an earlier, killed node
            node.url, node.node_id, node.info = info["api"], info["node_id"], info
            return node
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(POLL_SECONDS)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"node not ready after {timeout} s:\n{log_path.read_text(errors='replace')}")


# --- a local swarm: several nodes on this machine, for the swarm script, benchmarks and tests ---


class LocalSwarm:
    """Nodes n0, n1, ... on this machine under ``root``, in one PostgreSQL schema, with one join secret.

    Each node bootstraps from every node started before it (so any one of them may die). ``views``
    asks every running node's API for /cluster and /nodes with a viewer token minted from its own
    data directory."""

    def __init__(self, root: Path, pg_url: str, schema: str, name: str = "local", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.name = name
        self.secret = root / "swarm-secret"
        root.mkdir(parents=True, exist_ok=True)
        if not self.secret.exists():
            self.secret.write_text(secrets.token_hex(32))
        self.env = {
            "P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0", "P2PNN_DHT__HOST": "127.0.0.1",
            "P2PNN_DHT__PORT": "0", "P2PNN_PEER__HOST": "127.0.0.1", "P2PNN_PEER__PORT": "0",
            **(env or {}), "P2PNN_SWARM__NAME": name, "P2PNN_SWARM__SECRET_FILE": str(self.secret),
            "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": pg_url, "P2PNN_STORE__SCHEMA": schema,
            "P2PNN_STORE__POOL_SIZE": "2",
        }
        self.nodes: dict[str, NodeProcess] = {}

    def start(self, name: str, *, command: str = "run", env: dict[str, str] | None = None) -> NodeProcess:
        peers = [p.info["dht"] for n, p in self.nodes.items() if n != name][:BOOTSTRAP_PEERS]
        extra = {"P2PNN_DHT__BOOTSTRAP_PEERS": ",".join(peers)} if peers else {}
        node = start_node(self.root / name, env={**self.env, **extra, **(env or {})}, command=command)
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> None:
        self.nodes[name].stop(signal.SIGKILL)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop(signal.SIGKILL)

    def running(self) -> dict[str, NodeProcess]:
        return {n: p for n, p in self.nodes.items() if p.proc.poll() is None}

    def get(self, name: str, path: str) -> Any:
        """The JSON answer of GET ``path`` on node ``name``, as a viewer. Error handling: ClientError (p2pnn.client)."""
        node = self.nodes[name]
        cfg = config_mod.load(env={}).replace("node", data_dir=str(self.root / name))
        tok = Authenticator.from_config(cfg).mint("launcher", "viewer", 600)
        with Client(node.url, tok, timeout=5) as client:
            return client._call("GET", path)

    def views(self) -> dict[str, dict[str, Any]]:
        """Each running node's /cluster, with its list of member ids added under ``members``."""
        out = {}
        for name in self.running():
            try:
                cluster = self.get(name, "/api/v1/cluster")
                cluster["members"] = sorted(n["id"] for n in self.get(name, "/api/v1/nodes")["nodes"])
            except ClientError:
                continue
            out[name] = cluster
        return out

    def wait_for(self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float, poll: float = 0.2) -> float:
        """Seconds until ``check(views())`` holds. Error handling: AssertionError with the last views on timeout."""
        started = time.monotonic()
        views: dict[str, dict[str, Any]] = {}
        while time.monotonic() - started < timeout:
            views = self.views()
            if check(views):
                return time.monotonic() - started
            time.sleep(poll)
        raise AssertionError(f"swarm did not converge in {timeout} s: {views}")


def led(predicate: Callable[[str, int], bool] = lambda principal, term: True) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """Every running node names the same principal and term (``predicate`` holds for them), and the role map
    covers exactly the running nodes: what a failover has to reach (dead records may linger until their TTL)."""

    def check(views: dict[str, dict[str, Any]]) -> bool:
        if not views:
            return False
        principals = {(v["principal"], v["term"]) for v in views.values()}
        if len(principals) != 1:
            return False
        principal, term = next(iter(principals))
        if principal is None or not predicate(principal, term):
            return False
        running = {v["node_id"] for v in views.values()}
        return all(set(v["roles"]) == running for v in views.values())

    return check


def agreed(expected_members: int) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """Every running node lists ``expected_members`` members and names the same principal and term,
    and that principal's role map covers them all."""

    def check(views: dict[str, dict[str, Any]]) -> bool:
        if not views:
            return False
        principals = {(v["principal"], v["term"]) for v in views.values()}
        if len(principals) != 1 or None in next(iter(principals)):
            return False
        if any(len(v["members"]) != expected_members for v in views.values()):
            return False
        return all(len(v["roles"]) == expected_members for v in views.values())

    return check
