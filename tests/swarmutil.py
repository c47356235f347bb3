"""A swarm of real `p2pnn-node` processes on 127.0.0.1 for tests: one PostgreSQL schema, one join secret."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from p2pnn.launcher import NodeProcess, start_node
from tests.nodeutil import FAST, token

# Timings a little slower than the defaults: two cores are shared with other test runs.
SWARM_ENV = {
    "P2PNN_COMPUTE__SLOTS": "0", "P2PNN_DHT__HOST": "127.0.0.1", "P2PNN_DHT__PORT": "0",
    "P2PNN_PEER__HOST": "127.0.0.1", "P2PNN_PEER__PORT": "0", "P2PNN_SWARM__HEARTBEAT_SECONDS": "0.5",
    "P2PNN_SWARM__ELECTION_TIMEOUT_SECONDS": "2.5", "P2PNN_SWARM__LEASE_SECONDS": "3",
    "P2PNN_DHT__REFRESH_SECONDS": "0.5", "P2PNN_DHT__REPUBLISH_SECONDS": "2", "P2PNN_DHT__RECORD_TTL_SECONDS": "8",
}


class Swarm:
    """Nodes n0, n1, ... under ``root``; n0 is everyone's bootstrap peer."""

    def __init__(self, root: Path, pg_url: str, schema: str, name: str = "testswarm") -> None:
        self.root = root
        self.name = name
        self.secret = root / "swarm-secret"
        root.mkdir(parents=True, exist_ok=True)
        if not self.secret.exists():
            self.secret.write_text(secrets.token_hex(32))
        self.env = {
            **FAST, **SWARM_ENV, "P2PNN_SWARM__NAME": name, "P2PNN_SWARM__SECRET_FILE": str(self.secret),
            "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": pg_url, "P2PNN_STORE__SCHEMA": schema,
            "P2PNN_STORE__POOL_SIZE": "2",
        }
        self.nodes: dict[str, NodeProcess] = {}
        self.bootstrap = ""

    def start(self, name: str, *, command: str = "run", env: dict[str, str] | None = None) -> NodeProcess:
        extra = {"P2PNN_DHT__BOOTSTRAP_PEERS": self.bootstrap} if self.bootstrap else {}
        node = start_node(self.root / name, env={**self.env, **extra, **(env or {})}, command=command)
        self.nodes[name] = node
        if not self.bootstrap:
            self.bootstrap = node.info["dht"]
        return node

    def kill(self, name: str) -> None:
        self.nodes[name].stop(signal.SIGKILL)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop(signal.SIGKILL)

    def running(self) -> dict[str, NodeProcess]:
        return {n: p for n, p in self.nodes.items() if p.proc.poll() is None}

    def get(self, name: str, path: str) -> Any:
        node = self.nodes[name]
        tok = token(self.root / name, "viewer")
        return httpx.get(node.url + path, headers={"Authorization": f"Bearer {tok}"}, timeout=5).json()

    def views(self) -> dict[str, dict[str, Any]]:
        """Each running node's /cluster, with its list of member ids added under ``members``."""
        out = {}
        for name in self.running():
            try:
                cluster = self.get(name, "/api/v1/cluster")
                cluster["members"] = sorted(n["id"] for n in self.get(name, "/api/v1/nodes")["nodes"])
            except httpx.HTTPError:
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
